//! The vocabulary of settings, shared by every subsystem: the documented defaults, the range
//! each number and duration must fall in ([`limits`]), the checks that turn text into values that
//! cannot be invalid (an upstream URL with a host and no credentials, a CORS origin), and the
//! masking of URL credentials in messages.
//!
//! It is a leaf: it holds no loaded resources and depends on no subsystem, so any module may use
//! it. Each subsystem owns its own settings (`upstream::Settings`, `connection::Settings`, the
//! `tls` and `auth` files), and `server::Config` puts them together.

use std::borrow::Cow;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::time::Duration;

use hyper::header::HeaderValue;
use url::Url;

/// The limits of an HTTP/1.1 listener (`/metrics`, the simulator), fixed at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http1Limits {
    /// How long a request head may take, from accept (the first request) or from its first byte
    /// (later requests on a kept-alive connection).
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a request body may take once its head has arrived.
    pub body_read_timeout: Duration,
    /// How many connections may be open at once; more are closed as soon as accepted.
    pub max_connections: NonZeroUsize,
}

/// Which calls write an access line, the way Envoy filters its access log.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// Every call.
    #[default]
    All,
    /// Every call that did not end OK.
    Errors,
    /// None.
    Off,
}

impl AccessLog {
    /// Whether a call that ended with `code` writes an access line.
    pub fn records(self, code: tonic::Code) -> bool {
        match self {
            AccessLog::All => true,
            AccessLog::Errors => code != tonic::Code::Ok,
            AccessLog::Off => false,
        }
    }
}

/// Where the controller's Log Publisher is: a TCP address, spoken to in plain text or over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPublisherAddress {
    /// A host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// Whether the stream is read over TLS (with the upstream's CA and client certificate).
    pub tls: bool,
}

impl LogPublisherAddress {
    /// The Log Publisher beside a controller: the upstream URL's host on
    /// [`defaults::LOG_PUBLISHER_PORT`], over TLS when the task interface is HTTPS.
    pub fn beside(upstream: &Url) -> Option<LogPublisherAddress> {
        Some(LogPublisherAddress {
            host: host_text(upstream.host()?),
            port: defaults::LOG_PUBLISHER_PORT,
            tls: upstream.scheme() == "https",
        })
    }

    /// Reads `off` (`None`), `HOST:PORT` or `tls://HOST:PORT`; an IPv6 host is written in
    /// brackets, `[::1]:44001`. No other scheme is taken, `tcp://` included: an address that
    /// reads as a URL the gateway does not speak is refused rather than guessed at.
    pub fn parse(value: &str) -> Result<Option<LogPublisherAddress>, ConfigError> {
        if value == "off" {
            return Ok(None);
        }
        let invalid = || ConfigError::InvalidLogPublisher {
            value: mask_userinfo(value),
        };
        let (tls, rest) = match value.split_once("://") {
            Some(("tls", rest)) => (true, rest),
            Some(_) => return Err(invalid()),
            None => (false, value),
        };
        let (host, port) = rest.rsplit_once(':').ok_or_else(invalid)?;
        // Digits only: `parse` alone would take a sign.
        let port = Some(port)
            .filter(|port| !port.is_empty() && port.bytes().all(|byte| byte.is_ascii_digit()))
            .and_then(|port| port.parse::<u16>().ok())
            .filter(|port| *port != 0)
            .ok_or_else(invalid)?;
        // The upstream URL's host rules (IDNA, IPv6 in brackets); a user, path or query holds
        // characters no host may have, so it is refused here.
        let host = url::Host::parse(host).map_err(|_| invalid())?;
        Ok(Some(LogPublisherAddress {
            host: host_text(host),
            port,
            tls,
        }))
    }
}

/// A host as text to connect to: a name, or an IP address (IPv6 without brackets).
fn host_text<S: AsRef<str>>(host: url::Host<S>) -> String {
    match host {
        url::Host::Domain(domain) => domain.as_ref().to_owned(),
        url::Host::Ipv4(address) => address.to_string(),
        url::Host::Ipv6(address) => address.to_string(),
    }
}

/// `value` with anything before an `@` masked: an address has no user info, so whatever is
/// there may be a password.
fn mask_userinfo(value: &str) -> String {
    match value.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => value.to_owned(),
    }
}

impl std::fmt::Display for LogPublisherAddress {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "tls://" } else { "" };
        if self.host.contains(':') {
            write!(formatter, "{scheme}[{}]:{}", self.host, self.port)
        } else {
            write!(formatter, "{scheme}{}:{}", self.host, self.port)
        }
    }
}

/// A setting that cannot be used, with the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The upstream URL does not parse.
    #[error("upstream URL '{url}' is not a valid URL: {reason}")]
    InvalidUrl {
        /// The URL as given, its credentials masked.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The upstream URL carries a user name or password, which the gateway would never send.
    #[error(
        "upstream URL '{url}' has credentials, which are never sent: the task interface takes \
         none; remove them"
    )]
    Credentials {
        /// The URL with its credentials masked.
        url: String,
    },
    /// The upstream URL is not plain HTTP or HTTPS.
    #[error("upstream URL '{url}' must start with http:// or https://")]
    UnsupportedScheme {
        /// The URL as given, its credentials masked.
        url: String,
    },
    /// A CORS origin that is not `*` or `scheme://host[:port]`.
    #[error(
        "CORS origin '{origin}' must be '*' or like https://example.com[:port], without a path"
    )]
    InvalidOrigin {
        /// The origin as given.
        origin: String,
    },
    /// A `--log-publisher` value that is not `off`, `HOST:PORT` or `tls://HOST:PORT`.
    #[error(
        "--log-publisher '{value}' must be HOST:PORT (for example 10.0.0.5:44001), \
         tls://HOST:PORT or off"
    )]
    InvalidLogPublisher {
        /// The value as given, its credentials masked.
        value: String,
    },
    /// An `--upstream-proxy` that is not `http://HOST:PORT`.
    #[error("--upstream-proxy '{url}' {reason}")]
    InvalidProxy {
        /// The value as given, its credentials masked.
        url: String,
        /// What is wrong with it, and what to give instead.
        reason: String,
    },
    /// A numeric setting outside the range the gateway can run with.
    #[error("{setting} {value} is out of range {range}: {reason}")]
    OutOfRange {
        /// The setting's flag name.
        setting: &'static str,
        /// The value, as a user would write it.
        value: String,
        /// The allowed range, for example `10ms-1h`.
        range: String,
        /// Why values beyond that end are refused.
        reason: &'static str,
    },
    /// `--idempotency-max-entries` not above `--max-in-flight`.
    #[error(
        "--idempotency-max-entries {max_entries} must be more than --max-in-flight \
         {max_in_flight}: calls in flight keep their entries, so no room would be left for \
         answers"
    )]
    IdempotencyEntriesNotAboveInFlight {
        /// `--idempotency-max-entries`.
        max_entries: usize,
        /// `--max-in-flight`.
        max_in_flight: usize,
    },
}

/// The range a numeric setting must fall in, and why each end is where it is.
#[derive(Debug, Clone, Copy)]
pub struct Bounds<T> {
    /// The setting's flag name, as messages name it.
    pub setting: &'static str,
    /// The smallest value allowed.
    pub min: T,
    /// The largest value allowed.
    pub max: T,
    /// Why a smaller value is refused.
    pub below: &'static str,
    /// Why a larger value is refused.
    pub above: &'static str,
}

/// A setting's value as messages show it: as a user would write it on the command line.
pub trait SettingValue: PartialOrd + Copy {
    /// The value as text, for example `10ms` or `1024`.
    fn show(self) -> String;
}

/// The controller connections the gateway may hold at once with `max_in_flight` calls allowed:
/// one per call in flight, as many idle in the pool, and the health probe's.
///
/// The idle ones are hyper-util's: a call that finds no idle connection starts a connect, and
/// when a connection comes back to the pool first the call takes that one and the new
/// connection joins the pool, which keeps at most `--max-in-flight` idle (for 4 s), so after a
/// burst the gateway holds more connections than calls (the README's "How the controller is
/// called" has the figures). Connects still in progress are not counted: each ends within
/// `--upstream-timeout` (the controller client's connector), but their number follows the call
/// rate while a controller stops accepting.
pub const fn controller_connections(max_in_flight: NonZeroUsize) -> NonZeroUsize {
    NonZeroUsize::MIN.saturating_add(max_in_flight.get().saturating_mul(2))
}

/// The ranges every numeric `serve` setting is checked against at startup. Each is far wider
/// than any deployment needs and far narrower than what would make the runtime panic or every
/// call fail (a semaphore of 2^61 permits, a zero timer period, a timeout no call can meet).
pub mod limits {
    use std::num::{NonZeroU32, NonZeroUsize};
    use std::time::Duration;

    use super::Bounds;

    /// The least time worth calling the controller with; a call with less left is refused
    /// without calling it (`DEADLINE_TOO_SHORT`), so `--upstream-timeout` may not be shorter.
    pub const MIN_UPSTREAM_TIME: Duration = Duration::from_millis(10);
    const HOUR: Duration = Duration::from_secs(60 * 60);
    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    /// `--upstream-timeout`.
    pub const UPSTREAM_TIMEOUT: Bounds<Duration> = Bounds {
        setting: "--upstream-timeout",
        min: MIN_UPSTREAM_TIME,
        max: HOUR,
        below: "the gateway never calls the controller with less than 10ms left, so a shorter \
                timeout would fail every call",
        above: "no caller waits that long for a controller reply",
    };
    /// `--retry-delay`.
    pub const RETRY_DELAY: Bounds<Duration> = Bounds {
        setting: "--retry-delay",
        min: Duration::ZERO,
        max: HOUR,
        below: "a delay cannot be negative",
        above: "a caller told to wait that long would rather give up",
    };
    /// `--shutdown-grace`.
    pub const SHUTDOWN_GRACE: Bounds<Duration> = Bounds {
        setting: "--shutdown-grace",
        min: Duration::ZERO,
        max: HOUR,
        below: "a grace cannot be negative",
        above: "service managers kill a process long before (systemd after 90s, Kubernetes \
                after 30s by default)",
    };
    /// `--health-interval`.
    pub const HEALTH_INTERVAL: Bounds<Duration> = Bounds {
        setting: "--health-interval",
        min: Duration::from_millis(10),
        max: HOUR,
        below: "the probe opens a TCP connection to the controller every interval",
        above: "health would take that long to notice that the controller is gone",
    };
    /// `--max-in-flight`.
    pub const MAX_IN_FLIGHT: Bounds<NonZeroUsize> = Bounds {
        setting: "--max-in-flight",
        min: NonZeroUsize::MIN,
        max: NonZeroUsize::new(100_000).unwrap(),
        below: "at least one call must be allowed",
        above: "each call in flight may hold a connection and a file descriptor to the \
                controller, which serves far fewer calls at once",
    };
    /// `--idempotency-window`.
    pub const IDEMPOTENCY_WINDOW: Bounds<Duration> = Bounds {
        setting: "--idempotency-window",
        min: Duration::from_secs(1),
        max: DAY,
        below: "a retry comes later than that, so nothing would be deduplicated",
        above: "no caller retries one call that much later",
    };
    /// `--idempotency-max-entries`.
    pub const IDEMPOTENCY_MAX_ENTRIES: Bounds<NonZeroUsize> = Bounds {
        setting: "--idempotency-max-entries",
        min: NonZeroUsize::MIN,
        max: NonZeroUsize::new(1_000_000).unwrap(),
        below: "at least one request_id must be remembered",
        above: "each takes up to 609 bytes, and a controller serves far fewer calls in a window",
    };
    /// `--handshake-timeout`.
    pub const HANDSHAKE_TIMEOUT: Bounds<Duration> = Bounds {
        setting: "--handshake-timeout",
        min: Duration::from_millis(10),
        max: HOUR,
        below: "a client needs some time to send its preface, a TLS handshake included",
        above: "a connection silent that long is not a client, and it holds a file descriptor",
    };
    /// `--idle-timeout`.
    pub const IDLE_TIMEOUT: Bounds<Duration> = Bounds {
        setting: "--idle-timeout",
        min: Duration::from_millis(10),
        max: DAY,
        below: "a client needs some time between calls to keep its connection",
        above: "an idle connection holds a file descriptor and memory for nothing",
    };
    /// A connection cap (`--max-connections`, and the HTTP/1.1 listeners' caps).
    pub const MAX_CONNECTIONS: Bounds<NonZeroUsize> = Bounds {
        setting: "--max-connections",
        min: NonZeroUsize::MIN,
        max: NonZeroUsize::new(1_000_000).unwrap(),
        below: "at least one connection must be allowed",
        above: "each connection takes a file descriptor, and no open-file limit allows that many",
    };
    /// `--max-concurrent-streams`.
    pub const MAX_CONCURRENT_STREAMS: Bounds<NonZeroU32> = Bounds {
        setting: "--max-concurrent-streams",
        min: NonZeroU32::MIN,
        max: NonZeroU32::new(100_000).unwrap(),
        below: "a connection must be allowed a call",
        above: "each open stream holds flow-control windows and buffers on its connection, \
                and a client that needs more streams can open another connection",
    };
    /// `--max-health-watches`.
    pub const MAX_HEALTH_WATCHES: Bounds<NonZeroUsize> = Bounds {
        setting: "--max-health-watches",
        min: NonZeroUsize::MIN,
        max: NonZeroUsize::new(1_000_000).unwrap(),
        below: "at least one watch must be allowed",
        above: "each watch holds a stream and memory; a load balancer needs a few",
    };
    /// A timeout of an HTTP/1.1 listener (the metrics endpoint, the simulator); each use names
    /// its own flag.
    pub const HTTP1_TIMEOUT: Bounds<Duration> = Bounds {
        setting: "--header-read-timeout",
        min: Duration::from_millis(10),
        max: HOUR,
        below: "a client needs some time to send a request",
        above: "a connection that slow holds a file descriptor for nothing",
    };
    /// `--max-watches`.
    pub const MAX_WATCHES: Bounds<NonZeroUsize> = Bounds {
        setting: "--max-watches",
        min: NonZeroUsize::MIN,
        max: NonZeroUsize::new(1_000_000).unwrap(),
        below: "at least one watch must be allowed",
        above: "each watch holds a stream and memory, and every event is copied to each",
    };
    /// `--worker-threads`.
    pub const WORKER_THREADS: Bounds<NonZeroUsize> = Bounds {
        setting: "--worker-threads",
        min: NonZeroUsize::MIN,
        max: NonZeroUsize::new(1024).unwrap(),
        below: "calls need a thread to run on",
        above: "threads beyond the machine's cores only take turns on them",
    };
    /// `--watch-buffer`.
    pub const WATCH_BUFFER: Bounds<NonZeroUsize> = Bounds {
        setting: "--watch-buffer",
        min: NonZeroUsize::new(16).unwrap(),
        max: NonZeroUsize::new(1_048_576).unwrap(),
        below: "a burst of a few extractions would cut every watcher off",
        above: "the buffer is held in memory whether or not anyone lags",
    };
    /// `--max-response-bytes`.
    pub const MAX_RESPONSE_BYTES: Bounds<NonZeroUsize> = Bounds {
        setting: "--max-response-bytes",
        min: NonZeroUsize::new(1024).unwrap(),
        max: NonZeroUsize::new(64 * 1024 * 1024).unwrap(),
        below: "a smaller cap would refuse the controller's ordinary fault replies",
        above: "each reply is held in memory while it is read, once for every call in flight",
    };
}

/// The defaults the CLI documents.
pub mod defaults {
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
    use std::num::{NonZeroU32, NonZeroUsize};
    use std::time::Duration;

    /// Where the gateway listens for gRPC.
    pub const LISTEN: SocketAddr = loopback(50051);
    /// The controller's task interface on the local machine.
    pub const UPSTREAM: &str = "http://127.0.0.1:44000/api/v2/task";
    /// The cap on one controller call.
    pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
    /// The `RetryInfo` delay.
    pub const RETRY_DELAY: Duration = Duration::from_secs(1);
    /// The graceful-shutdown bound.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// The largest controller reply read.
    pub const MAX_RESPONSE_BYTES: NonZeroUsize =
        NonZeroUsize::new(crate::codec::DEFAULT_MAX_BODY_BYTES).unwrap();
    /// How many task calls may be in flight at once.
    pub const MAX_IN_FLIGHT: NonZeroUsize = NonZeroUsize::new(1024).unwrap();
    /// How long a `request_id` is remembered after its call ended: longer than any client's
    /// retries of one call (AIP-155 asks for at least an hour only of services that keep ids
    /// in storage; these live in memory).
    pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(10 * 60);
    /// How many `request_id`s are remembered at most: 38.1 MiB at worst (609 bytes each), and
    /// over 100 calls a second for the whole default window.
    pub const IDEMPOTENCY_MAX_ENTRIES: NonZeroUsize = NonZeroUsize::new(65_536).unwrap();
    /// How often health probes the controller.
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
    /// Where the standalone simulator listens: the controller's own port.
    pub const SIMULATOR_LISTEN: SocketAddr = loopback(44000);
    /// How long a new gRPC connection may take to identify its protocol (linkerd2-proxy's
    /// detect timeout is the same).
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a gRPC connection may stay without an open call or stream.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
    /// Streams per HTTP/2 connection, as gRPC servers commonly allow; h2's own default is
    /// unlimited.
    pub const MAX_CONCURRENT_STREAMS: NonZeroU32 = NonZeroU32::new(256).unwrap();
    /// Open health Watch streams over all connections.
    pub const MAX_HEALTH_WATCHES: NonZeroUsize = NonZeroUsize::new(1024).unwrap();
    /// How long an HTTP/1.1 request head may take.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a kept-alive HTTP/1.1 connection may wait for its next request: longer than a
    /// typical Prometheus scrape interval, so scrapes reuse their connection.
    pub const HTTP1_IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 60);
    /// How long an HTTP/1.1 request body may take.
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Connections to `/metrics`: a few scrapers, with room to spare.
    pub const METRICS_MAX_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(64).unwrap();
    /// Connections to the simulator: as many as a gateway with the default `--max-in-flight`
    /// may hold to its controller ([`super::controller_connections`]).
    pub const SIMULATOR_MAX_CONNECTIONS: NonZeroUsize =
        super::controller_connections(MAX_IN_FLIGHT);

    /// The gateway's worker threads: one per core this process may use (which counts a
    /// container's CPU quota), within `--worker-threads`' range, as tokio's own default.
    pub fn worker_threads() -> NonZeroUsize {
        std::thread::available_parallelism().map_or(NonZeroUsize::MIN, |cores| {
            cores.min(super::limits::WORKER_THREADS.max)
        })
    }

    /// The Log Publisher's port on a controller (V1 used 53005).
    pub const LOG_PUBLISHER_PORT: u16 = 44001;
    /// Open WatchCaseEvents streams over all connections.
    pub const MAX_WATCHES: NonZeroUsize = NonZeroUsize::new(10_000).unwrap();
    /// Events a watcher may fall behind before its stream ends with WATCH_LAGGED: minutes of
    /// a busy grid's AutoCase traffic.
    pub const WATCH_BUFFER: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

    /// `port` on 127.0.0.1: nothing listens beyond the machine unless asked to.
    const fn loopback(port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
    }
}

// === impl Http1Limits ===

impl Http1Limits {
    /// The documented timeouts, with `max_connections`.
    pub fn with_max_connections(max_connections: NonZeroUsize) -> Self {
        Http1Limits {
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            idle_timeout: defaults::HTTP1_IDLE_TIMEOUT,
            body_read_timeout: defaults::BODY_READ_TIMEOUT,
            max_connections,
        }
    }

    /// Checks the limits; `flags` name them in the error.
    pub fn validate(&self, flags: Http1Flags) -> Result<(), ConfigError> {
        let timeout = |setting| Bounds {
            setting,
            ..limits::HTTP1_TIMEOUT
        };
        timeout(flags.header_read_timeout).check(self.header_read_timeout)?;
        timeout(flags.idle_timeout).check(self.idle_timeout)?;
        timeout(flags.body_read_timeout).check(self.body_read_timeout)?;
        Bounds {
            setting: flags.max_connections,
            ..limits::MAX_CONNECTIONS
        }
        .check(self.max_connections)?;
        Ok(())
    }
}

/// The flag names of one HTTP/1.1 listener's limits, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Http1Flags {
    header_read_timeout: &'static str,
    idle_timeout: &'static str,
    body_read_timeout: &'static str,
    max_connections: &'static str,
}

impl Http1Flags {
    /// `serve`'s flags for the metrics endpoint.
    pub const METRICS: Http1Flags = Http1Flags {
        header_read_timeout: "--metrics-header-read-timeout",
        idle_timeout: "--metrics-idle-timeout",
        body_read_timeout: "--metrics-body-read-timeout",
        max_connections: "--metrics-max-connections",
    };
    /// `simulate`'s flags.
    pub const SIMULATE: Http1Flags = Http1Flags {
        header_read_timeout: "--header-read-timeout",
        idle_timeout: "--idle-timeout",
        body_read_timeout: "--body-read-timeout",
        max_connections: "--max-connections",
    };
}

/// Parses a task-interface URL and insists on HTTP or HTTPS with a host and no credentials.
/// Errors show the URL with its credentials masked, whichever check fails.
pub fn parse_upstream_url(raw: &str) -> Result<Url, ConfigError> {
    let shown = || redact_url(raw).into_owned();
    let url = Url::parse(raw).map_err(|error| ConfigError::InvalidUrl {
        url: shown(),
        reason: error.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::UnsupportedScheme { url: shown() });
    }
    refuse_credentials(&url)?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::InvalidUrl {
            url: shown(),
            reason: "no host".to_owned(),
        });
    }
    // Port 0 parses, but nothing can be connected to on it: every call would fail.
    if url.port() == Some(0) {
        return Err(ConfigError::InvalidUrl {
            url: shown(),
            reason: "port 0 cannot be connected to; give the controller's port (44000 by \
                     default)"
                .to_owned(),
        });
    }
    Ok(url)
}

/// Parses `--upstream-proxy`: an HTTP forward proxy's `http://HOST:PORT`, with nothing else in it.
/// The gateway speaks plain HTTP to it and sends it no credentials, so a URL that seemed to ask
/// for TLS or to carry a password would mislead; errors show the value with its credentials
/// masked.
pub fn parse_upstream_proxy(raw: &str) -> Result<Url, ConfigError> {
    let refuse = |reason: &str| ConfigError::InvalidProxy {
        url: redact_url(raw).into_owned(),
        reason: reason.to_owned(),
    };
    if raw.is_empty() {
        return Err(refuse(
            "is empty: give http://HOST:PORT, or leave the setting out for no proxy",
        ));
    }
    const PLAIN_HTTP: &str = "must start with http://: the gateway speaks plain HTTP to its \
                              proxy (an https:// controller's calls still cross it inside their \
                              own TLS)";
    let url = match Url::parse(raw) {
        Ok(url) if url.scheme() == "http" => url,
        // `10.0.0.9:3128` does not parse, and `proxy:3128` has the scheme `proxy`.
        Ok(_) | Err(url::ParseError::RelativeUrlWithoutBase) => return Err(refuse(PLAIN_HTTP)),
        Err(error) => {
            return Err(refuse(&format!(
                "is not a valid URL: {error}; give http://HOST:PORT"
            )));
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse(
            "has credentials, which are never sent: the gateway does not log in to a proxy; \
             let the proxy admit the gateway by its address",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(refuse("has no host; give http://HOST:PORT"));
    }
    if url.port() == Some(0) {
        return Err(refuse("has port 0, which cannot be connected to"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(refuse(
            "has a path, query or fragment, which a proxy's address has not; give http://HOST:PORT",
        ));
    }
    Ok(url)
}

/// `--upstream-proxy` as an operator gives it, `http://HOST:PORT`: without the `/` path that
/// [`parse_upstream_proxy`]'s URL holds, the only path it may have.
pub fn shown_proxy(proxy: &Url) -> &str {
    proxy.as_str().trim_end_matches('/')
}

/// Refuses a URL with a user name or password: the controller's task interface takes no
/// credentials, so they would not be sent, and a URL that seemed to carry them would mislead.
pub(crate) fn refuse_credentials(url: &Url) -> Result<(), ConfigError> {
    if url.username().is_empty() && url.password().is_none() {
        return Ok(());
    }
    Err(ConfigError::Credentials {
        url: redact_url(url.as_str()).into_owned(),
    })
}

/// One URL as given, with its credentials masked (see [`redact_userinfo`]); without `://` the
/// whole text is taken as an authority, so `user:password@host` is masked too. Unlike prose, the
/// text is one URL to its end: a quote or a space in it does not end it, so a password after
/// one is masked too (`http://'user:secret@host` showed its password; found by fuzzing, issue 11).
pub fn redact_url(raw: &str) -> Cow<'_, str> {
    const SCHEME_END: &str = "://";
    let mut shown = String::with_capacity(raw.len());
    let rest = match raw.split_once(SCHEME_END) {
        Some((scheme, rest)) => {
            shown.push_str(scheme);
            shown.push_str(SCHEME_END);
            rest
        }
        None => raw,
    };
    push_redacted_authority(rest, &mut shown);
    Cow::Owned(shown)
}

/// `text` with the credentials of every URL in it masked: `http://user:***@host`, and
/// `http://***@host` for a lone user name, which is how a token is often passed
/// (`https://TOKEN@host`). For text that may quote a URL a user gave, such as a parse error.
pub fn redact_userinfo(text: &str) -> Cow<'_, str> {
    const SCHEME_END: &str = "://";
    if !text.contains(SCHEME_END) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(SCHEME_END) {
        let (before, after) = rest.split_at(start + SCHEME_END.len());
        shown.push_str(before);
        // A URL ends with its line, or at the white space before the next URL on it. Not at a
        // quote, nor at white space within it: a TOML string may hold both
        // (`"http://'user:my pw@host"`), and masking a little too much is the safe side.
        let line = &after[..after.find('\n').unwrap_or(after.len())];
        let end = line
            .find(SCHEME_END)
            .and_then(|next| line[..next].rfind(char::is_whitespace))
            .unwrap_or(line.len());
        push_redacted_authority(&after[..end], &mut shown);
        rest = &after[end..];
    }
    shown.push_str(rest);
    Cow::Owned(shown)
}

/// Pushes `url_rest` (what follows `scheme://`) with everything before its last `@` masked but
/// the user name. The last `@`, not the first `/`, ends the credentials here, since a password
/// may hold a `/`; but text whose first `/` comes before any `:` is a host and a path that holds
/// an `@` (`controller/a@b`), and is kept.
fn push_redacted_authority(url_rest: &str, shown: &mut String) {
    // TOML's escapes of `@`, which a TOML error quotes as written.
    const ATS: [&str; 3] = ["@", "\\u0040", "\\U00000040"];
    let Some(at) = ATS.iter().filter_map(|at| url_rest.rfind(at)).max() else {
        shown.push_str(url_rest);
        return;
    };
    let (userinfo, host_and_path) = url_rest.split_at(at);
    let colon = userinfo.find(':');
    if userinfo
        .find('/')
        .is_some_and(|slash| colon.is_none_or(|colon| slash < colon))
    {
        shown.push_str(url_rest);
        return;
    }
    match colon {
        Some(colon) => {
            shown.push_str(&userinfo[..colon]);
            shown.push_str(":***");
        }
        None => shown.push_str("***"),
    }
    shown.push_str(host_and_path);
}

/// Checks a CORS origin: `*`, or a scheme, host and optional port with nothing after.
pub fn parse_cors_origin(raw: &str) -> Result<HeaderValue, ConfigError> {
    let invalid = || ConfigError::InvalidOrigin {
        origin: raw.to_owned(),
    };
    if raw != "*" {
        let url = Url::parse(raw).map_err(|_| invalid())?;
        let bare = url.path() == "/" && url.query().is_none() && url.fragment().is_none();
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none()
            || !bare
            || raw.ends_with('/')
        {
            return Err(invalid());
        }
    }
    HeaderValue::from_str(raw).map_err(|_| invalid())
}

// === impl Bounds ===

impl<T: SettingValue> Bounds<T> {
    /// `value` when it is in range, else an error naming the setting, the value, the range and
    /// the reason for the end it is beyond.
    pub fn check(&self, value: T) -> Result<T, ConfigError> {
        let reason = if value < self.min {
            self.below
        } else if value > self.max {
            self.above
        } else {
            return Ok(value);
        };
        Err(self.out_of_range(value.show(), reason))
    }

    /// `count` as the nonzero value it must be, when it is in range. Zero is below the range and
    /// a count too large for the setting's type above it, and each says so as any other value
    /// would: the settings take counts as plain `u64` numbers so that a flag, the environment
    /// and the file all get this message, with the real range.
    pub fn check_count(&self, count: u64) -> Result<T, ConfigError>
    where
        T: TryFrom<NonZeroU64>,
    {
        let Some(count) = NonZeroU64::new(count) else {
            return Err(self.out_of_range(count.to_string(), self.below));
        };
        match T::try_from(count) {
            Ok(value) => self.check(value),
            Err(_) => Err(self.out_of_range(count.to_string(), self.above)),
        }
    }

    fn out_of_range(&self, value: String, reason: &'static str) -> ConfigError {
        ConfigError::OutOfRange {
            setting: self.setting,
            value,
            range: format!("{}-{}", self.min.show(), self.max.show()),
            reason,
        }
    }
}

impl SettingValue for Duration {
    fn show(self) -> String {
        humantime::format_duration(self).to_string()
    }
}

impl SettingValue for NonZeroUsize {
    fn show(self) -> String {
        self.to_string()
    }
}

impl SettingValue for NonZeroU32 {
    fn show(self) -> String {
        self.to_string()
    }
}

impl SettingValue for NonZeroU64 {
    fn show(self) -> String {
        self.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_url(raw: &str, expected: Result<&str, ConfigError>) {
        let actual = parse_upstream_url(raw).map(|url| url.to_string());
        assert_eq!(actual.as_deref().map_err(Clone::clone), expected, "{raw}");
    }

    #[test]
    fn log_publisher_addresses() {
        let parsed = |value: &str| {
            LogPublisherAddress::parse(value)
                .map(|address| address.map(|address| address.to_string()))
                .map_err(|error| error.to_string())
        };
        assert_eq!(parsed("off"), Ok(None));
        for (value, shown) in [
            ("10.0.0.5:44001", "10.0.0.5:44001"),
            (
                "tls://controller.example:44001",
                "tls://controller.example:44001",
            ),
            ("[::1]:44001", "[::1]:44001"),
            ("Controller:80", "controller:80"),
            ("controller:080", "controller:80"),
        ] {
            assert_eq!(parsed(value), Ok(Some(shown.to_owned())), "{value}");
        }
        for value in [
            "",
            "controller",
            "controller:",
            "controller:99999",
            "controller:0",
            "controller:+80",
            ":44001",
            "http://controller:44001",
            // Issue 20, item 9: an undocumented scheme, once taken as plain TCP.
            "tcp://127.0.0.1:1",
            "controller:44001/x",
            "controller:44001/",
            "user:secret@controller:44001",
            "controller:44001?x",
            "Off",
        ] {
            let expected = format!(
                "--log-publisher '{}' must be HOST:PORT (for example 10.0.0.5:44001), \
                 tls://HOST:PORT or off",
                mask_userinfo(value)
            );
            assert_eq!(parsed(value), Err(expected), "{value}");
        }
        assert!(
            !parsed("user:secret@controller:44001")
                .unwrap_err()
                .contains("secret")
        );
    }

    #[test]
    fn the_log_publisher_is_beside_the_controller() {
        let beside = |url: &str| {
            LogPublisherAddress::beside(&parse_upstream_url(url).unwrap())
                .unwrap()
                .to_string()
        };
        assert_eq!(beside(defaults::UPSTREAM), "127.0.0.1:44001");
        assert_eq!(
            beside("https://controller.example:44000/api/v2/task"),
            "tls://controller.example:44001"
        );
        assert_eq!(beside("http://[::1]:44000/api/v2/task"), "[::1]:44001");
    }

    #[test]
    fn upstream_urls() {
        check_url(defaults::UPSTREAM, Ok(defaults::UPSTREAM));
        check_url(
            "https://controller:44000/api/v2/task",
            Ok("https://controller:44000/api/v2/task"),
        );
        check_url(
            "ftp://controller/x",
            Err(ConfigError::UnsupportedScheme {
                url: "ftp://controller/x".to_owned(),
            }),
        );
        check_url(
            "controller:44000",
            Err(ConfigError::UnsupportedScheme {
                url: "controller:44000".to_owned(),
            }),
        );
        assert!(matches!(
            parse_upstream_url("http//x"),
            Err(ConfigError::InvalidUrl { .. })
        ));
        // Issue 20, item 9: accepted, and then every call failed.
        check_url(
            "http://127.0.0.1:0/api/v2/task",
            Err(ConfigError::InvalidUrl {
                url: "http://127.0.0.1:0/api/v2/task".to_owned(),
                reason: "port 0 cannot be connected to; give the controller's port (44000 by \
                         default)"
                    .to_owned(),
            }),
        );
    }

    /// An operator names a forward proxy as `http://HOST:PORT`; anything it would not use, or
    /// that would seem to mean more than it does, is refused with what to give instead, and a
    /// password is never shown.
    #[test]
    fn upstream_proxies() {
        for (raw, accepted) in [
            ("http://proxy.example:3128", "http://proxy.example:3128/"),
            ("http://10.0.0.9:8080/", "http://10.0.0.9:8080/"),
            ("http://[::1]:3128", "http://[::1]:3128/"),
            ("http://proxy", "http://proxy/"),
        ] {
            assert_eq!(
                parse_upstream_proxy(raw).map(|url| url.to_string()),
                Ok(accepted.to_owned()),
                "{raw}"
            );
        }
        for (raw, refused) in [
            (
                "",
                "--upstream-proxy '' is empty: give http://HOST:PORT, or leave the setting out \
                 for no proxy",
            ),
            (
                "10.0.0.9:3128",
                "--upstream-proxy '10.0.0.9:3128' must start with http://: the gateway speaks \
                 plain HTTP to its proxy (an https:// controller's calls still cross it inside \
                 their own TLS)",
            ),
            (
                "proxy:3128",
                "--upstream-proxy 'proxy:3128' must start with http://: the gateway speaks plain \
                 HTTP to its proxy (an https:// controller's calls still cross it inside their \
                 own TLS)",
            ),
            (
                "https://proxy:3128",
                "--upstream-proxy 'https://proxy:3128' must start with http://: the gateway \
                 speaks plain HTTP to its proxy (an https:// controller's calls still cross it \
                 inside their own TLS)",
            ),
            (
                "http://user:secret@proxy:3128",
                "--upstream-proxy 'http://user:***@proxy:3128' has credentials, which are never \
                 sent: the gateway does not log in to a proxy; let the proxy admit the gateway \
                 by its address",
            ),
            (
                "http://proxy:3128/api/v2/task",
                "--upstream-proxy 'http://proxy:3128/api/v2/task' has a path, query or fragment, \
                 which a proxy's address has not; give http://HOST:PORT",
            ),
            (
                "http://proxy:3128?x=1",
                "--upstream-proxy 'http://proxy:3128?x=1' has a path, query or fragment, which \
                 a proxy's address has not; give http://HOST:PORT",
            ),
            (
                "http://proxy:0",
                "--upstream-proxy 'http://proxy:0' has port 0, which cannot be connected to",
            ),
            (
                "http://proxy:99999",
                "--upstream-proxy 'http://proxy:99999' is not a valid URL: invalid port number; \
                 give http://HOST:PORT",
            ),
        ] {
            assert_eq!(
                parse_upstream_proxy(raw).unwrap_err().to_string(),
                refused,
                "{raw}"
            );
        }
    }

    /// Issue 8, finding 5: whichever check refuses a URL, its password is not in the message.
    #[test]
    fn refused_upstream_urls_never_show_a_password() {
        let check = |raw: &str, expected: &str| {
            let message = parse_upstream_url(raw).unwrap_err().to_string();
            assert_eq!(message, expected, "{raw}");
        };
        check(
            "http://user:secret@controller/api/v2/task",
            "upstream URL 'http://user:***@controller/api/v2/task' has credentials, which are \
             never sent: the task interface takes none; remove them",
        );
        check(
            "http://TOKEN@controller/api/v2/task",
            "upstream URL 'http://***@controller/api/v2/task' has credentials, which are never \
             sent: the task interface takes none; remove them",
        );
        check(
            "http://user:secret@controller:99999/api/v2/task",
            "upstream URL 'http://user:***@controller:99999/api/v2/task' is not a valid URL: \
             invalid port number",
        );
        check(
            "ftp://user:secret@controller/x",
            "upstream URL 'ftp://user:***@controller/x' must start with http:// or https://",
        );
        check(
            "user:secret@controller:44000",
            "upstream URL 'user:***@controller:44000' must start with http:// or https://",
        );
        // Issue 11 (found by fuzzing `config_toml`): a quote in the user name ended the URL
        // for the masking, and the password was shown.
        check(
            "http:/'user:secret@controller:44000/api/v2/task",
            "upstream URL 'http://'user:***@controller:44000/api/v2/task' has credentials, which \
             are never sent: the task interface takes none; remove them",
        );
        check(
            "ftp://u ser:secret@controller/x",
            "upstream URL 'ftp://u ser:***@controller/x' must start with http:// or https://",
        );
    }

    #[test]
    fn credentials_in_text_are_masked() {
        let check = |text: &str, expected: &str| {
            assert_eq!(redact_userinfo(text), expected, "{text}");
        };
        check("no URL here", "no URL here");
        check("http://controller/a@b", "http://controller/a@b");
        check("http://u:p@h/x", "http://u:***@h/x");
        check("http://u:p/w@h/x", "http://u:***@h/x");
        check("https://t0ken@h", "https://***@h");
        check(
            "1 | upstream = \"http://u:p4ss@h:1/x\" junk\n  |  ^",
            "1 | upstream = \"http://u:***@h:1/x\" junk\n  |  ^",
        );
        check(
            "a http://u:p@h and 'https://v:q@i'",
            "a http://u:***@h and 'https://v:***@i'",
        );
        // A quote right after the scheme is part of the user name, found by the fuzzer; a
        // TOML error quoting such a line must not show the password either.
        check(
            "1 | upstream = \"http://'user:secret@controller:44000/x\"\n  |  ^",
            "1 | upstream = \"http://'user:***@controller:44000/x\"\n  |  ^",
        );
        assert_eq!(redact_url("u:p@h:1"), "u:***@h:1");
    }

    /// A TOML error quotes its line as written, and TOML lets a URL hold what ends a word in
    /// prose: a space in a quoted password (which the URL parser takes, encoded), or an `@`
    /// written as an escape. Neither may show the password.
    #[test]
    fn credentials_in_a_quoted_toml_line_are_masked() {
        let check = |text: &str, expected: &str| {
            assert_eq!(redact_userinfo(text), expected, "{text}");
        };
        check(
            "1 | upstream = \"http://u:my secret@h:1/x\" junk\n  |  ^",
            "1 | upstream = \"http://u:***@h:1/x\" junk\n  |  ^",
        );
        check(
            "invalid type: string \"http://u:my secret@h\", expected a sequence",
            "invalid type: string \"http://u:***@h\", expected a sequence",
        );
        check(
            "1 | upstream = \"http://u:secret\\u0040h:1/x\" junk",
            "1 | upstream = \"http://u:***\\u0040h:1/x\" junk",
        );
        check(
            "1 | upstream = \"http://secret\\U00000040h:1/x\" junk",
            "1 | upstream = \"http://***\\U00000040h:1/x\" junk",
        );
    }

    #[test]
    fn access_log_modes() {
        use tonic::Code;
        for (mode, ok, failed) in [
            (AccessLog::All, true, true),
            (AccessLog::Errors, false, true),
            (AccessLog::Off, false, false),
        ] {
            assert_eq!(mode.records(Code::Ok), ok, "{mode:?}");
            assert_eq!(mode.records(Code::Unavailable), failed, "{mode:?}");
        }
    }

    #[test]
    fn cors_origins() {
        for good in ["*", "https://ops.example.com", "http://localhost:5173"] {
            assert!(parse_cors_origin(good).is_ok(), "{good}");
        }
        for bad in [
            "ops.example.com",
            "https://ops.example.com/",
            "https://x/app",
            "ftp://x",
            "",
        ] {
            assert_eq!(
                parse_cors_origin(bad),
                Err(ConfigError::InvalidOrigin {
                    origin: bad.to_owned()
                }),
                "{bad}"
            );
        }
    }
}
