//! Every `serve` setting, declared once: [`ServeSettings`] is both the clap arguments and the
//! `--config` TOML file (keyed by the flag's name with underscores, `upstream_timeout = "10s"`).
//!
//! Each field is an `Option`, so "not given" stays visible: flags (clap lets a flag beat its
//! environment variable) are merged over the file once, at startup, and the documented defaults
//! ([`ServeSettings::defaults`], from `config::defaults`) fill what is still missing. Unknown
//! keys and bad values in the file are errors that give its line; relative paths in it are taken
//! from the file's own folder.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};

use taskgate::codec::WireFormat;
use taskgate::config::{AccessLog, defaults, redact_userinfo};
use taskgate::log::LogFormat;

use crate::cli::duration;

/// The `serve` settings: the flags, their environment variables and the config file's keys.
#[derive(Debug, Default, Clone, PartialEq, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServeSettings {
    /// The address to serve gRPC on, for example 0.0.0.0:50051.
    #[arg(long, env = "TASKGATE_LISTEN")]
    pub(super) listen: Option<SocketAddr>,

    /// The controller's task-interface URL (http or https).
    #[arg(long, env = "TASKGATE_UPSTREAM")]
    pub(super) upstream: Option<String>,

    /// An HTTP forward proxy to reach the controller through, http://HOST:PORT (no credentials).
    /// Off by default: HTTP_PROXY and the like in the environment are never used.
    #[arg(long, env = "TASKGATE_UPSTREAM_PROXY")]
    pub(super) upstream_proxy: Option<String>,

    /// The longest to wait for one controller reply, for example 10s or 500ms; a caller's
    /// shorter gRPC deadline wins. Also the longest any connect to the controller may take.
    /// 10ms to 1h: calls are never sent with less than 10ms left.
    #[arg(long, env = "TASKGATE_UPSTREAM_TIMEOUT", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) upstream_timeout: Option<Duration>,

    /// The delay put in RetryInfo when a retry is safe (fault 1148, controller unreachable,
    /// HTTP 503 or 429); 0s to 1h.
    #[arg(long, env = "TASKGATE_RETRY_DELAY", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) retry_delay: Option<Duration>,

    /// The largest controller reply to read, in bytes; 1024 to 67108864 (64 MiB).
    #[arg(long, env = "TASKGATE_MAX_RESPONSE_BYTES")]
    pub(super) max_response_bytes: Option<u64>,

    /// How long calls in flight may take to finish after SIGINT or SIGTERM, less the last
    /// second, kept for answering the calls it cuts off and sending their spans; 0s to 1h.
    #[arg(long, env = "TASKGATE_SHUTDOWN_GRACE", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) shutdown_grace: Option<Duration>,

    /// How often to probe the controller with a TCP connect for the health service (nothing is
    /// ever POSTed); 10ms to 1h.
    #[arg(long, env = "TASKGATE_HEALTH_INTERVAL", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) health_interval: Option<Duration>,

    /// How many task calls (CaseExtract, CaseCancel and CaseGetState together) may be in flight
    /// at once; more are refused at once with RESOURCE_EXHAUSTED (reason OVERLOADED). Health,
    /// reflection and WatchCaseEvents streams are not counted. 1 to 100000.
    #[arg(long, env = "TASKGATE_MAX_IN_FLIGHT")]
    pub(super) max_in_flight: Option<u64>,

    /// How long a CaseExtract or CaseCancel request_id (the idempotency key in the message, not
    /// the x-request-id header) is remembered after its call ended (never while in flight): a repeat within it is never
    /// sent to the controller twice. 1s to 1d.
    #[arg(long, env = "TASKGATE_IDEMPOTENCY_WINDOW", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) idempotency_window: Option<Duration>,

    /// How many request_ids are remembered at most, up to 609 bytes each; when full, the oldest
    /// answered fault is forgotten, then the oldest answered OK, and a new one is refused when
    /// none is left (all counted on /metrics). A forgotten OK means a repeat of that id is sent
    /// like a new call and can act twice: give at least --idempotency-window times the peak
    /// call rate, and alert on evictions with state "ok". 1 to 1000000, and more than
    /// --max-in-flight.
    #[arg(long, env = "TASKGATE_IDEMPOTENCY_MAX_ENTRIES")]
    pub(super) idempotency_max_entries: Option<u64>,

    /// How long a new gRPC connection may take to identify itself (TLS handshake, then the
    /// HTTP/2 preface or a complete first HTTP/1.1 request head) before it is closed; also the
    /// limit on later HTTP/1.1 request heads, and on each HTTP/1.1 (gRPC-Web) request body from
    /// its head. 10ms to 1h.
    #[arg(long, env = "TASKGATE_HANDSHAKE_TIMEOUT", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) handshake_timeout: Option<Duration>,

    /// How long a gRPC connection may stay without an open call or stream before it is closed
    /// (GOAWAY on HTTP/2), for example 5m; 10ms to 1d.
    #[arg(long, env = "TASKGATE_IDLE_TIMEOUT", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) idle_timeout: Option<Duration>,

    /// How many gRPC connections may be open at once; more are closed as soon as they are
    /// accepted. Default: the open-file limit (nofile, its soft limit once raised to the hard
    /// one) less (2 x --max-in-flight + 1) controller connections, --metrics-max-connections
    /// (when metrics are served) and 64 in reserve, at least 16 and at most 6553 (256 MiB for
    /// idle connections at 40 KiB each). 1 to 1000000.
    #[arg(long, env = "TASKGATE_MAX_CONNECTIONS")]
    pub(super) max_connections: Option<u64>,

    /// How many streams (calls) one HTTP/2 connection may have open at once; clients queue the
    /// rest. Each adds 1 KiB to the connection's flow-control window (64 KiB without). 1 to
    /// 100000.
    #[arg(long, env = "TASKGATE_MAX_CONCURRENT_STREAMS")]
    pub(super) max_concurrent_streams: Option<u64>,

    /// How many health Watch streams may be open at once over all connections; more are
    /// refused with RESOURCE_EXHAUSTED. 1 to 1000000.
    #[arg(long, env = "TASKGATE_MAX_HEALTH_WATCHES")]
    pub(super) max_health_watches: Option<u64>,

    /// The controller's Log Publisher, whose AutoCase (AC) segments WatchCaseEvents streams:
    /// HOST:PORT, or tls://HOST:PORT to read it over TLS with the --upstream-ca and client
    /// certificate; `off` to run without. Default: the --upstream host on port 44001, over TLS
    /// when the upstream is https. With --simulator: the simulator's own.
    #[arg(long, env = "TASKGATE_LOG_PUBLISHER")]
    pub(super) log_publisher: Option<String>,

    /// How many WatchCaseEvents streams may be open at once over all connections; more are
    /// refused with RESOURCE_EXHAUSTED (TOO_MANY_WATCHES). 1 to 1000000.
    #[arg(long, env = "TASKGATE_MAX_WATCHES")]
    pub(super) max_watches: Option<u64>,

    /// How many events a WatchCaseEvents caller may fall behind before its stream ends with
    /// RESOURCE_EXHAUSTED (WATCH_LAGGED); 16 to 1048576.
    #[arg(long, env = "TASKGATE_WATCH_BUFFER")]
    pub(super) watch_buffer: Option<u64>,

    /// How many worker threads tokio's runtime runs calls on. Default: one per core. 1 to 1024.
    #[arg(long, env = "TASKGATE_WORKER_THREADS")]
    pub(super) worker_threads: Option<u64>,

    /// How long a request head to /metrics may take, from accept or from its first byte; 10ms
    /// to 1h.
    #[arg(long, env = "TASKGATE_METRICS_HEADER_READ_TIMEOUT", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) metrics_header_read_timeout: Option<Duration>,

    /// How long a kept-alive connection to /metrics may wait for its next request; 10ms to 1h.
    #[arg(long, env = "TASKGATE_METRICS_IDLE_TIMEOUT", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) metrics_idle_timeout: Option<Duration>,

    /// How long a request body to /metrics may take once its head has arrived; 10ms to 1h.
    #[arg(long, env = "TASKGATE_METRICS_BODY_READ_TIMEOUT", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub(super) metrics_body_read_timeout: Option<Duration>,

    /// How many connections to /metrics may be open at once; more are closed as soon as they
    /// are accepted. 1 to 1000000.
    #[arg(long, env = "TASKGATE_METRICS_MAX_CONNECTIONS")]
    pub(super) metrics_max_connections: Option<u64>,

    /// How to speak to the controller: `xml` (the documented format) or `json`.
    #[arg(long, env = "TASKGATE_UPSTREAM_FORMAT", value_enum)]
    pub(super) upstream_format: Option<UpstreamFormat>,

    /// A file of bearer tokens, one per line (# starts a comment): task calls then need
    /// `authorization: Bearer <token>`. Health and reflection stay open. SIGHUP reloads the file,
    /// and so does a change of it (looked at every 2s).
    #[arg(long, env = "TASKGATE_AUTH_TOKENS_FILE")]
    pub(super) auth_tokens_file: Option<PathBuf>,

    /// Serve gRPC over TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "TASKGATE_TLS_CERT")]
    pub(super) tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "TASKGATE_TLS_KEY")]
    pub(super) tls_key: Option<PathBuf>,

    /// Require client certificates signed by this PEM CA (mutual TLS; needs --tls-cert).
    #[arg(long, env = "TASKGATE_TLS_CLIENT_CA")]
    pub(super) tls_client_ca: Option<PathBuf>,

    /// Trust only this PEM CA for an https:// controller (default: the system's roots).
    #[arg(long, env = "TASKGATE_UPSTREAM_CA")]
    pub(super) upstream_ca: Option<PathBuf>,

    /// Present this PEM client certificate to an https:// controller (needs
    /// --upstream-client-key).
    #[arg(long, env = "TASKGATE_UPSTREAM_CLIENT_CERT")]
    pub(super) upstream_client_cert: Option<PathBuf>,

    /// The PEM private key of --upstream-client-cert.
    #[arg(long, env = "TASKGATE_UPSTREAM_CLIENT_KEY")]
    pub(super) upstream_client_key: Option<PathBuf>,

    /// Browser origins allowed to call over gRPC-Web, comma-separated (for example
    /// `https://ops.example.com`), or * for any; off by default, so only same-origin pages can
    /// call.
    #[arg(long, env = "TASKGATE_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub(super) cors_allow_origin: Option<Vec<String>>,

    /// Which calls write an access line: `all`, `errors` (every call that did not end OK) or
    /// `off`.
    #[arg(long, env = "TASKGATE_ACCESS_LOG", value_enum)]
    pub(super) access_log: Option<AccessLog>,

    /// Serve Prometheus metrics at http://ADDRESS/metrics, for example 127.0.0.1:9464; off unless
    /// given.
    #[arg(long, env = "TASKGATE_METRICS_LISTEN")]
    pub(super) metrics_listen: Option<SocketAddr>,

    /// Export spans over OTLP to this collector, for example http://127.0.0.1:4317 (gRPC; for
    /// HTTP set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf); off
    /// unless given, here or in OTEL_EXPORTER_OTLP_ENDPOINT. Sampling is parent-based: a call
    /// follows its caller's traceparent, and one without is always sampled (OTEL_TRACES_SAMPLER
    /// changes that); see README, "Tracing".
    #[arg(long, env = "TASKGATE_OTLP_ENDPOINT")]
    pub(super) otlp_endpoint: Option<String>,

    /// Start the embedded simulated controller on an ephemeral loopback port and use it as the
    /// upstream.
    #[arg(long, env = "TASKGATE_SIMULATOR", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(super) simulator: Option<bool>,

    /// A TOML port layout for the embedded simulator (see `taskgate simulate --help`); default:
    /// the built-in layout.
    #[arg(long, env = "TASKGATE_SIMULATOR_CONFIG")]
    pub(super) simulator_config: Option<PathBuf>,

    /// Serve the operator console, a page showing every port's case state live, on the gRPC
    /// port: http://LISTEN/ (see README, "Console"). Default: on with --simulator, else off.
    #[arg(long, env = "TASKGATE_CONSOLE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(super) console: Option<bool>,

    /// The ports the console shows, in this order, comma-separated (for example 1,2,3,4), each 1
    /// to 2000. Default: with --simulator, its layout's ports; needed otherwise.
    #[arg(long, env = "TASKGATE_CONSOLE_PORTS", value_delimiter = ',')]
    pub(super) console_ports: Option<Vec<u32>>,

    /// The log format; a global flag (`--log-format`), and a key of the file.
    #[arg(skip)]
    pub(super) log_format: Option<LogFormat>,
}

/// The controller's wire format, as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum UpstreamFormat {
    /// `<methodcall>…</methodcall>`, Content-Type application/xml.
    Xml,
    /// `{"method":…,"params":{…}}`, Content-Type application/json.
    Json,
}

/// A default count as the settings hold it: a plain `u64`, which every `usize` fits in.
const fn count(value: NonZeroUsize) -> u64 {
    value.get() as u64
}

// === impl ServeSettings ===

impl ServeSettings {
    /// The documented defaults of every setting that has one, from `config::defaults`: what
    /// `--help`, `--print-config` and the README show, and what fills a setting nobody gave.
    pub(crate) fn defaults() -> ServeSettings {
        ServeSettings {
            listen: Some(defaults::LISTEN),
            upstream: Some(defaults::UPSTREAM.to_owned()),
            upstream_timeout: Some(defaults::UPSTREAM_TIMEOUT),
            retry_delay: Some(defaults::RETRY_DELAY),
            max_response_bytes: Some(count(defaults::MAX_RESPONSE_BYTES)),
            shutdown_grace: Some(defaults::SHUTDOWN_GRACE),
            health_interval: Some(defaults::HEALTH_INTERVAL),
            max_in_flight: Some(count(defaults::MAX_IN_FLIGHT)),
            idempotency_window: Some(defaults::IDEMPOTENCY_WINDOW),
            idempotency_max_entries: Some(count(defaults::IDEMPOTENCY_MAX_ENTRIES)),
            handshake_timeout: Some(defaults::HANDSHAKE_TIMEOUT),
            idle_timeout: Some(defaults::IDLE_TIMEOUT),
            max_concurrent_streams: Some(u64::from(defaults::MAX_CONCURRENT_STREAMS.get())),
            max_health_watches: Some(count(defaults::MAX_HEALTH_WATCHES)),
            max_watches: Some(count(defaults::MAX_WATCHES)),
            watch_buffer: Some(count(defaults::WATCH_BUFFER)),
            metrics_header_read_timeout: Some(defaults::HEADER_READ_TIMEOUT),
            metrics_idle_timeout: Some(defaults::HTTP1_IDLE_TIMEOUT),
            metrics_body_read_timeout: Some(defaults::BODY_READ_TIMEOUT),
            metrics_max_connections: Some(count(defaults::METRICS_MAX_CONNECTIONS)),
            upstream_format: Some(UpstreamFormat::Xml),
            access_log: Some(AccessLog::default()),
            simulator: Some(false),
            log_format: Some(LogFormat::Text),
            ..ServeSettings::default()
        }
    }

    /// Reads a config file; relative paths in it are made relative to its folder.
    pub(super) fn load(path: &Path) -> anyhow::Result<ServeSettings> {
        let text = taskgate::regular_file::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut file: ServeSettings = toml::from_str(&text)
            // A TOML error quotes the line it is about, which may be the upstream URL's.
            .map_err(|error| anyhow::anyhow!("{}", redact_userinfo(&error.to_string())))
            .with_context(|| format!("invalid config file {}", path.display()))?;
        let folder = path.parent().unwrap_or(Path::new("."));
        for path in file.paths_mut().into_iter().flatten() {
            if path.is_relative() {
                *path = folder.join(&*path);
            }
        }
        Ok(file)
    }

    /// These settings, with `fallback`'s where these have none. It goes through JSON objects
    /// (TOML's integers stop at 2^63, below what a flag may be given and must be refused with its
    /// range), so a new setting needs no line here.
    pub(super) fn or(&self, fallback: &ServeSettings) -> anyhow::Result<ServeSettings> {
        let mut merged = fallback.given()?;
        merged.extend(self.given()?);
        serde_json::from_value(serde_json::Value::Object(merged))
            .context("cannot merge the settings (a bug: please report it)")
    }

    /// The settings given, by key; a setting not given has no key.
    pub(super) fn given(&self) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        let value = serde_json::to_value(self)
            .context("cannot read the settings back (a bug: please report it)")?;
        let serde_json::Value::Object(mut settings) = value else {
            anyhow::bail!("the settings are not a map (a bug: please report it)");
        };
        settings.retain(|_, value| !value.is_null());
        Ok(settings)
    }

    /// The settings that are paths, which a config file gives relative to its own folder.
    fn paths_mut(&mut self) -> [&mut Option<PathBuf>; 8] {
        [
            &mut self.auth_tokens_file,
            &mut self.tls_cert,
            &mut self.tls_key,
            &mut self.tls_client_ca,
            &mut self.upstream_ca,
            &mut self.upstream_client_cert,
            &mut self.upstream_client_key,
            &mut self.simulator_config,
        ]
    }
}

// === impl UpstreamFormat ===

impl From<UpstreamFormat> for WireFormat {
    fn from(format: UpstreamFormat) -> Self {
        match format {
            UpstreamFormat::Xml => WireFormat::Xml,
            UpstreamFormat::Json => WireFormat::Json,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeSettings, String> {
        toml::from_str(text).map_err(|error| error.to_string())
    }

    #[test]
    fn a_full_file_round_trips() {
        let file = parse(
            r#"
            listen = "0.0.0.0:50051"
            upstream = "http://10.0.0.5:44000/api/v2/task"
            upstream_timeout = "2s 500ms"
            upstream_format = "json"
            max_in_flight = 64
            simulator = false
            log_format = "json"
            cors_allow_origin = ["https://ops.example.com"]
            "#,
        )
        .unwrap();
        assert_eq!(file.upstream_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(file.max_in_flight, Some(64));
        let printed = toml::to_string(&file).unwrap();
        assert!(
            printed.contains("upstream_timeout = \"2s 500ms\""),
            "{printed}"
        );
        assert!(printed.contains("upstream_format = \"json\""), "{printed}");
        assert_eq!(parse(&printed), Ok(file));
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let check = |text: &str, expected: &[&str]| {
            let message = parse(text).unwrap_err();
            for part in expected {
                assert!(message.contains(part), "{part:?} missing from {message}");
            }
        };
        check(
            "listen = \"127.0.0.1:1\"\nupstream_timeot = \"1s\"\n",
            &["line 2", "unknown field `upstream_timeot`"],
        );
        check(
            "\n\nupstream_timeout = \"soon\"\n",
            &[
                "line 3",
                "upstream_timeout",
                "invalid value: string \"soon\", expected a duration",
            ],
        );
        check("max_in_flight = -1\n", &["line 1", "max_in_flight"]);
        check("listen = \"nowhere\"\n", &["line 1", "listen"]);
        check(
            "upstream_format = \"yaml\"\n",
            &["line 1", "unknown variant `yaml`"],
        );
    }

    #[test]
    fn given_settings_win_over_the_fallback_and_missing_ones_stay_missing() {
        let given = parse("upstream_timeout = \"3s\"\nsimulator = false\n").unwrap();
        let fallback =
            parse("upstream_timeout = \"9s\"\nmax_in_flight = 7\nsimulator = true\n").unwrap();
        let merged = given.or(&fallback).unwrap();
        assert_eq!(merged.upstream_timeout, Some(Duration::from_secs(3)));
        assert_eq!(merged.max_in_flight, Some(7));
        assert_eq!(merged.simulator, Some(false));
        assert_eq!(merged.listen, None);
    }
}
