//! Validated settings. Every value here has been checked, so the rest of the crate never has to
//! ask whether a URL has a host or a duration is zero. Flag parsing lives in `cli`.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use hyper::header::HeaderValue;
use url::Url;

use crate::auth::TokenFile;
use crate::codec::WireFormat;
use crate::tls::{ServerTls, UpstreamTls};

/// The gateway's settings, fixed at startup.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The controller's task-interface URL, for example `http://10.0.0.5:44000/api/v2/task`.
    pub upstream_url: Url,
    /// The longest the gateway waits for one controller reply, whatever the caller's deadline.
    pub upstream_timeout: Duration,
    /// The delay put in `RetryInfo` when a retry is safe (fault 1148, controller unreachable).
    pub retry_delay: Duration,
    /// The largest controller reply body the gateway reads before giving up on it.
    pub max_response_bytes: NonZeroUsize,
    /// How long in-flight calls may take to finish once shutdown begins.
    pub shutdown_grace: Duration,
    /// How often health probes the controller with a TCP connect.
    pub health_interval: Duration,
    /// How many task calls may be in flight at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_in_flight: NonZeroUsize,
    /// Whether the controller is spoken to in XML (documented) or JSON.
    pub upstream_format: WireFormat,
    /// When set, task calls need one of these bearer tokens; health and reflection stay open.
    pub auth_tokens: Option<TokenFile>,
    /// When set, gRPC is served over TLS (and, with a client CA, requires client certificates).
    pub tls: Option<ServerTls>,
    /// HTTPS settings for the controller.
    pub upstream_tls: UpstreamTls,
    /// Browser origins allowed to call over gRPC-Web (`*` for any); empty sends no CORS headers.
    pub cors_allow_origins: Vec<HeaderValue>,
    /// Which calls write an access line.
    pub access_log: AccessLog,
    /// How long a new gRPC connection may take to identify itself: TLS, then the HTTP/2 preface
    /// or a complete first HTTP/1.1 request head (also the limit on later HTTP/1.1 heads).
    pub handshake_timeout: Duration,
    /// How long a gRPC connection may stay without an open call or stream before it is closed
    /// (with GOAWAY on HTTP/2).
    pub idle_timeout: Duration,
    /// How many gRPC connections may be open at once; more are closed as soon as accepted.
    /// `None`: sized from the open-file limit at startup (see `nofile`).
    pub max_connections: Option<NonZeroUsize>,
    /// How many streams (calls) one HTTP/2 connection may have open at once.
    pub max_concurrent_streams: NonZeroU32,
    /// How many health Watch streams may be open at once, over all connections.
    pub max_health_watches: NonZeroUsize,
    /// The limits of the `/metrics` listener.
    pub metrics_limits: Http1Limits,
}

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

/// A setting that cannot be used, with the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The upstream URL does not parse.
    #[error("upstream URL '{url}' is not a valid URL: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The upstream URL is not plain HTTP or HTTPS.
    #[error("upstream URL '{url}' must start with http:// or https://")]
    UnsupportedScheme {
        /// The URL as given.
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
    /// A duration that must be positive is zero.
    #[error("{setting} must be greater than zero")]
    ZeroDuration {
        /// The setting's flag name.
        setting: &'static str,
    },
    /// A count beyond what the runtime can take.
    #[error("{setting} {value} is too large: the most it can be is {max}")]
    TooLarge {
        /// The setting's flag name.
        setting: &'static str,
        /// The value given.
        value: usize,
        /// The largest value allowed.
        max: usize,
    },
}

/// The defaults the CLI documents.
pub mod defaults {
    use std::num::{NonZeroU32, NonZeroUsize};
    use std::time::Duration;

    /// Where the gateway listens for gRPC.
    pub const LISTEN: &str = "127.0.0.1:50051";
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
    /// How often health probes the controller.
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
    /// Where the standalone simulator listens: the controller's own port.
    pub const SIMULATOR_LISTEN: &str = "127.0.0.1:44000";
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
    /// Connections to the simulator: a gateway opens at most one per call in flight, so twice
    /// the gateway's default `--max-in-flight`.
    pub const SIMULATOR_MAX_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(2048).unwrap();
}

// === impl GatewayConfig ===

impl GatewayConfig {
    /// The documented defaults, pointed at `upstream_url`.
    pub fn with_upstream(upstream_url: Url) -> Self {
        GatewayConfig {
            upstream_url,
            upstream_timeout: defaults::UPSTREAM_TIMEOUT,
            retry_delay: defaults::RETRY_DELAY,
            max_response_bytes: defaults::MAX_RESPONSE_BYTES,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            health_interval: defaults::HEALTH_INTERVAL,
            max_in_flight: defaults::MAX_IN_FLIGHT,
            upstream_format: WireFormat::Xml,
            auth_tokens: None,
            tls: None,
            upstream_tls: UpstreamTls::default(),
            cors_allow_origins: Vec::new(),
            access_log: AccessLog::default(),
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_connections: None,
            max_concurrent_streams: defaults::MAX_CONCURRENT_STREAMS,
            max_health_watches: defaults::MAX_HEALTH_WATCHES,
            metrics_limits: Http1Limits::with_max_connections(defaults::METRICS_MAX_CONNECTIONS),
        }
    }

    /// Checks the settings whose types allow values that make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive(self.upstream_timeout, "--upstream-timeout")?;
        positive(self.health_interval, "--health-interval")?;
        positive(self.handshake_timeout, "--handshake-timeout")?;
        positive(self.idle_timeout, "--idle-timeout")?;
        // Both are counted with tokio semaphores, which take at most this many permits.
        let max = tokio::sync::Semaphore::MAX_PERMITS;
        if let Some(max_connections) = self.max_connections {
            at_most(max_connections.get(), max, "--max-connections")?;
        }
        at_most(self.max_health_watches.get(), max, "--max-health-watches")?;
        self.metrics_limits.validate(Http1Flags::METRICS)
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
        positive(self.header_read_timeout, flags.header_read_timeout)?;
        positive(self.idle_timeout, flags.idle_timeout)?;
        positive(self.body_read_timeout, flags.body_read_timeout)?;
        at_most(
            self.max_connections.get(),
            tokio::sync::Semaphore::MAX_PERMITS,
            flags.max_connections,
        )
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

/// Parses a task-interface URL and insists on HTTP or HTTPS with a host.
pub fn parse_upstream_url(raw: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(raw).map_err(|error| ConfigError::InvalidUrl {
        url: raw.to_owned(),
        reason: error.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::UnsupportedScheme {
            url: raw.to_owned(),
        });
    }
    if !url.username().is_empty() || url.password().is_some() {
        // The controller's task interface takes no credentials, so they would not be sent; the
        // password is not repeated in the message.
        let mut shown = url.clone();
        if url.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        return Err(ConfigError::InvalidUrl {
            url: shown.to_string(),
            reason: "credentials in the URL are not supported".to_owned(),
        });
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::InvalidUrl {
            url: raw.to_owned(),
            reason: "no host".to_owned(),
        });
    }
    Ok(url)
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

fn at_most(value: usize, max: usize, setting: &'static str) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::TooLarge {
            setting,
            value,
            max,
        });
    }
    Ok(())
}

fn positive(duration: Duration, setting: &'static str) -> Result<Duration, ConfigError> {
    if duration.is_zero() {
        Err(ConfigError::ZeroDuration { setting })
    } else {
        Ok(duration)
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
        assert_eq!(
            parse_upstream_url("http://user:secret@controller/api/v2/task")
                .unwrap_err()
                .to_string(),
            "upstream URL 'http://user:***@controller/api/v2/task' is not a valid URL: \
             credentials in the URL are not supported"
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

    #[test]
    fn a_zero_upstream_timeout_is_refused() {
        let url = parse_upstream_url(defaults::UPSTREAM).unwrap();
        let mut config = GatewayConfig::with_upstream(url);
        assert_eq!(config.validate(), Ok(()));
        config.upstream_timeout = Duration::ZERO;
        assert_eq!(
            config.validate(),
            Err(ConfigError::ZeroDuration {
                setting: "--upstream-timeout"
            })
        );
    }
}
