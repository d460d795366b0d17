//! The gateway's whole configuration: each subsystem's own settings, and what the wiring in
//! `server` uses itself. The command line builds one from flags, environment and file; a library
//! user builds one by hand from [`Config::with_upstream`]. [`serve`](super::serve) checks it
//! before anything starts.

use std::num::NonZeroUsize;
use std::time::Duration;

use hyper::header::HeaderValue;
use url::Url;

use crate::auth::TokenFile;
use crate::config::{
    AccessLog, ConfigError, Http1Flags, Http1Limits, LogPublisherAddress, defaults, limits,
};
use crate::connection;
use crate::console;
use crate::tls::ServerTls;
use crate::upstream;
use crate::watch;

/// The gateway's settings, fixed at startup.
#[derive(Debug, Clone)]
pub struct Config {
    /// How the controller is called: URL, format, time limit, reply cap, calls in flight, TLS.
    pub upstream: upstream::Settings,
    /// The gRPC port's connection limits: handshake and idle timeouts, how many connections and
    /// how many streams on each.
    pub connections: connection::Settings,
    /// When set, gRPC is served over TLS (and, with a client CA, requires client certificates).
    pub tls: Option<ServerTls>,
    /// When set, task calls need one of these bearer tokens; health and reflection stay open.
    pub auth_tokens: Option<TokenFile>,
    /// Browser origins allowed to call over gRPC-Web (`*` for any); empty sends no CORS headers.
    pub cors_allow_origins: Vec<HeaderValue>,
    /// Which calls write an access line.
    pub access_log: AccessLog,
    /// How long in-flight calls may take to finish once shutdown begins.
    pub shutdown_grace: Duration,
    /// How often health probes the controller with a TCP connect.
    pub health_interval: Duration,
    /// How many health Watch streams may be open at once, over all connections: health needs no
    /// token, so without a cap anyone who can connect could hold streams without end.
    pub max_health_watches: NonZeroUsize,
    /// The limits of the `/metrics` listener.
    pub metrics_limits: Http1Limits,
    /// The controller's Log Publisher, whose `AC` segments WatchCaseEvents streams; `None`
    /// runs without (WatchCaseEvents then answers FAILED_PRECONDITION).
    pub log_publisher: Option<LogPublisherAddress>,
    /// The limits on WatchCaseEvents streams.
    pub watches: watch::Settings,
    /// When set, the operator console is served on the gRPC port: the page at `/`, its files
    /// under `/console/`.
    pub console: Option<console::Settings>,
}

// === impl Config ===

impl Config {
    /// The documented defaults, pointed at the controller at `upstream_url` and at the Log
    /// Publisher beside it.
    pub fn with_upstream(upstream_url: Url) -> Self {
        Config {
            log_publisher: LogPublisherAddress::beside(&upstream_url),
            watches: watch::Settings {
                max_watches: defaults::MAX_WATCHES,
                buffer: defaults::WATCH_BUFFER,
            },
            upstream: upstream::Settings::new(upstream_url),
            connections: connection::Settings::default(),
            tls: None,
            auth_tokens: None,
            cors_allow_origins: Vec::new(),
            access_log: AccessLog::default(),
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            health_interval: defaults::HEALTH_INTERVAL,
            max_health_watches: defaults::MAX_HEALTH_WATCHES,
            metrics_limits: Http1Limits::with_max_connections(defaults::METRICS_MAX_CONNECTIONS),
            console: None,
        }
    }

    /// Checks every setting whose type allows a value the gateway cannot run with, against the
    /// ranges in [`limits`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.upstream.validate()?;
        limits::SHUTDOWN_GRACE.check(self.shutdown_grace)?;
        limits::HEALTH_INTERVAL.check(self.health_interval)?;
        self.connections.validate()?;
        limits::MAX_HEALTH_WATCHES.check(self.max_health_watches)?;
        limits::MAX_WATCHES.check(self.watches.max_watches)?;
        limits::WATCH_BUFFER.check(self.watches.buffer)?;
        self.metrics_limits.validate(Http1Flags::METRICS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_upstream_url;

    #[test]
    fn a_url_built_by_hand_with_credentials_is_refused() {
        let mut url = parse_upstream_url(defaults::UPSTREAM).unwrap();
        url.set_password(Some("secret")).unwrap();
        url.set_username("user").unwrap();
        let config = Config::with_upstream(url);
        assert_eq!(
            config.validate(),
            Err(ConfigError::Credentials {
                url: "http://user:***@127.0.0.1:44000/api/v2/task".to_owned()
            })
        );
    }

    /// Validates the defaults with one setting changed; `expected` is the error, if any.
    fn check_setting(change: impl Fn(&mut Config), expected: Option<&str>) {
        let mut config = Config::with_upstream(parse_upstream_url(defaults::UPSTREAM).unwrap());
        change(&mut config);
        let error = config.validate().err().map(|error| error.to_string());
        assert_eq!(error.as_deref(), expected);
    }

    #[test]
    fn numeric_settings_are_checked_against_their_ranges() {
        let ms = Duration::from_millis;
        let count = |value: usize| NonZeroUsize::new(value).unwrap();
        check_setting(|_| {}, None);
        check_setting(|config| config.upstream.timeout = ms(10), None);
        check_setting(
            |config| config.upstream.timeout = Duration::from_nanos(1),
            Some(
                "--upstream-timeout 1ns is out of range 10ms-1h: the gateway never calls the \
                 controller with less than 10ms left, so a shorter timeout would fail every call",
            ),
        );
        check_setting(
            |config| config.upstream.timeout = Duration::from_secs(3601),
            Some(
                "--upstream-timeout 1h 1s is out of range 10ms-1h: no caller waits that long \
                 for a controller reply",
            ),
        );
        check_setting(|config| config.upstream.retry_delay = Duration::ZERO, None);
        check_setting(
            |config| config.shutdown_grace = Duration::from_secs(7200),
            Some(
                "--shutdown-grace 2h is out of range 0s-1h: service managers kill a process \
                 long before (systemd after 90s, Kubernetes after 30s by default)",
            ),
        );
        check_setting(
            |config| config.health_interval = Duration::ZERO,
            Some(
                "--health-interval 0s is out of range 10ms-1h: the probe opens a TCP connection \
                 to the controller every interval",
            ),
        );
        check_setting(
            |config| {
                config.upstream.max_in_flight = count(100_000);
                config.upstream.idempotency_max_entries = count(100_001);
            },
            None,
        );
        check_setting(
            |config| config.upstream.max_in_flight = count(1 << 61),
            Some(
                "--max-in-flight 2305843009213693952 is out of range 1-100000: each call in \
                 flight may hold a connection and a file descriptor to the controller, which \
                 serves far fewer calls at once",
            ),
        );
        check_setting(
            |config| config.upstream.idempotency_window = ms(999),
            Some(
                "--idempotency-window 999ms is out of range 1s-1day: a retry comes later than \
                 that, so nothing would be deduplicated",
            ),
        );
        check_setting(
            |config| config.upstream.idempotency_max_entries = count(1_000_001),
            Some(
                "--idempotency-max-entries 1000001 is out of range 1-1000000: each takes up to \
                 609 bytes, and a controller serves far fewer calls in a window",
            ),
        );
        check_setting(
            |config| {
                config.upstream.max_in_flight = count(8);
                config.upstream.idempotency_max_entries = count(8);
            },
            Some(
                "--idempotency-max-entries 8 must be more than --max-in-flight 8: calls in \
                 flight keep their entries, so no room would be left for answers",
            ),
        );
        check_setting(
            |config| {
                config.upstream.max_in_flight = count(8);
                config.upstream.idempotency_max_entries = count(9);
            },
            None,
        );
        check_setting(
            |config| config.upstream.max_response_bytes = count(1023),
            Some(
                "--max-response-bytes 1023 is out of range 1024-67108864: a smaller cap would \
                 refuse the controller's ordinary fault replies",
            ),
        );
    }
}
