//! The `taskgate` command line: `serve`, `simulate`, `case-extract`, `case-cancel`, `case-state`,
//! `watch`, `bench` and `health`, one module each; `task_call` is what the three calling commands share.
//!
//! Clap types stay raw; they are turned into the library's checked settings before any port is
//! bound. Every flag can also be set with a `TASKGATE_…` environment variable. The command line
//! is part of the binary, not of the library: nothing in the library depends on it.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio::net::TcpListener;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use taskgate::config::{Bounds, redact_url};
use taskgate::log::LogFormat;

mod bench;
mod case_cancel;
mod case_extract;
mod case_state;
mod health;
mod output;
mod serve;
mod simulate;
mod task_call;
mod watch;

/// `taskgate --version`: the crate's version and the commit it was built from, or `unknown`
/// outside a git checkout (see `build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TASKGATE_GIT_COMMIT"),
    ")"
);

const EXIT_STATUS: &str = "\
EXIT STATUS:
    0  success (for serve and simulate: a clean shutdown on SIGINT or SIGTERM; for bench: the
       run completed, even if some calls failed; for health: the gateway is SERVING)
    1  the call returned an error status, the gateway cannot be reached, the server failed
       while running, (case-extract --wait) the case was cancelled, or (health) the gateway is
       not SERVING
    2  a usage or configuration error (bad flag, bad file, address already in use)
    3  case-extract --wait: the extraction was accepted, but following it stopped before the
       case ended (--wait-timeout ran out, or the watch failed): it may still be running

A closed stdout (a reader such as `head -n 1` that has gone) is not an error: the output ends
there and the exit code is the one above; `watch` stops and exits 0. A stdout that cannot be
written otherwise (a full disk) is an error on stderr; case-extract and case-cancel still exit
with the code above (with --wait, 0, 1 or 3 as above) and print their outcome on stderr, after
the error; any other command exits 1.";

/// taskgate: a gRPC gateway to the AutoStore task interface.
///
/// `serve` runs the gateway, `simulate` runs a simulated controller, `case-extract`,
/// `case-cancel` and `case-state` call a running gateway, `watch` prints the case events it
/// streams, `bench` puts a running gateway under load and reports its latency, and `health`
/// asks a running gateway whether it is serving. Logs go to stderr; set their level with
/// RUST_LOG (for example RUST_LOG=taskgate=debug).
#[derive(Debug, Parser)]
#[command(name = "taskgate", version = VERSION, after_help = EXIT_STATUS)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,

    /// The log format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors.
    #[arg(long, global = true, env = "TASKGATE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC gateway in front of a controller (or the embedded simulator).
    Serve(Box<serve::ServeArgs>),
    /// Run the simulated controller alone, speaking the task interface over HTTP.
    Simulate(simulate::SimulateArgs),
    /// Call CaseExtract on a running gateway and print the outcome; with --wait, follow the
    /// case until it is out.
    CaseExtract(watch::CaseExtractArgs),
    /// Call CaseCancel on a running gateway and print the outcome.
    CaseCancel(task_call::PortAndBinArgs),
    /// Call CaseGetState on a running gateway and print the port's case state.
    CaseState(case_state::CaseStateArgs),
    /// Print AutoCase events as a running gateway streams them from the Log Publisher, one line
    /// each.
    Watch(watch::WatchArgs),
    /// Put a running gateway under load with CaseExtract calls and report calls/s, latency
    /// percentiles and a count per gRPC status code.
    Bench(bench::BenchArgs),
    /// Ask a running gateway for its gRPC health: exit 0 when it is SERVING, 1 otherwise (for a
    /// container's HEALTHCHECK or a supervisor's probe).
    Health(health::HealthArgs),
}

/// A command whose settings are complete (for `serve`: flags, environment and file merged), so
/// that logging can be set up from them before it runs.
#[derive(Debug)]
pub(crate) struct Prepared {
    command: PreparedCommand,
    log_format: LogFormat,
    /// `serve`'s `--worker-threads`, checked; the other commands take tokio's default.
    worker_threads: Option<NonZeroUsize>,
    /// What `serve` does with spans; nothing for the other commands.
    span_export: serve::SpanExport,
}

/// The name of `serve`'s runtime threads (Linux keeps 15 bytes of a thread's name).
const WORKER_THREAD_NAME: &str = "taskgate-worker";

#[derive(Debug)]
enum PreparedCommand {
    Serve(Box<serve::Serve>),
    Simulate(simulate::SimulateArgs),
    CaseExtract(watch::CaseExtractArgs),
    CaseCancel(task_call::PortAndBinArgs),
    CaseState(case_state::CaseStateArgs),
    Watch(watch::WatchArgs),
    Bench(bench::BenchArgs),
    Health(health::HealthArgs),
}

/// How a command ended, as an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Success,
    CallFailed,
    Usage,
    /// `case-extract --wait` stopped following an accepted extraction before its case ended.
    FollowingStopped,
}

/// How a command ended.
#[derive(Debug)]
pub(crate) struct Ending {
    /// The process exit code.
    pub(crate) code: ExitCode,
    /// What to print on stderr, after the log is flushed, when the command failed.
    pub(crate) error: Option<String>,
}

type Outcome = Result<Exit, (Exit, anyhow::Error)>;

/// Parses the process's arguments; on a usage error prints it and exits 2, as clap does.
pub(crate) fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// The command line, with `serve`'s defaults shown in its help.
fn command() -> clap::Command {
    serve::show_defaults(Cli::command())
}

// === impl Cli ===

impl Cli {
    /// Completes the command's settings: for `serve`, reads the config file (once) and merges it
    /// under the flags and environment. Runs before logging starts, since the file may set the
    /// log format.
    pub(crate) fn prepare(self) -> Result<Prepared, Ending> {
        let refused = |error| ending(Err((Exit::Usage, error)));
        let mut worker_threads = None;
        let mut span_export = serve::SpanExport::Off;
        let (command, log_format) = match self.command {
            Command::Serve(args) => {
                let serve = args.prepare(self.log_format).map_err(refused)?;
                worker_threads = Some(serve.worker_threads().map_err(refused)?);
                span_export = serve.span_export().map_err(refused)?;
                let log_format = serve.log_format();
                (PreparedCommand::Serve(Box::new(serve)), log_format)
            }
            Command::Simulate(args) => (PreparedCommand::Simulate(args), self.log_format),
            Command::CaseExtract(args) => (PreparedCommand::CaseExtract(args), self.log_format),
            Command::CaseCancel(args) => (PreparedCommand::CaseCancel(args), self.log_format),
            Command::CaseState(args) => (PreparedCommand::CaseState(args), self.log_format),
            Command::Watch(args) => (PreparedCommand::Watch(args), self.log_format),
            Command::Bench(args) => (PreparedCommand::Bench(args), self.log_format),
            Command::Health(args) => (PreparedCommand::Health(args), self.log_format),
        };
        Ok(Prepared {
            command,
            log_format: log_format.unwrap_or(LogFormat::Text),
            worker_threads,
            span_export,
        })
    }
}

// === impl Prepared ===

impl Prepared {
    /// The log format: the flag or environment variable, else `serve`'s config file, else text.
    pub(crate) fn log_format(&self) -> LogFormat {
        self.log_format
    }

    /// The log level when RUST_LOG is not set: the servers report each call, the clients only
    /// warnings.
    pub(crate) fn default_log_filter(&self) -> &'static str {
        match self.command {
            PreparedCommand::Serve(_) | PreparedCommand::Simulate(_) => "info",
            PreparedCommand::CaseExtract(_)
            | PreparedCommand::CaseCancel(_)
            | PreparedCommand::CaseState(_)
            | PreparedCommand::Watch(_)
            | PreparedCommand::Bench(_)
            | PreparedCommand::Health(_) => "warn",
        }
    }

    /// The runtime the command runs on: tokio's multi-thread runtime, as `#[tokio::main]`
    /// builds it, with `serve`'s threads counted by `--worker-threads` and named after the
    /// gateway, so an operator can tell them in `top -H`.
    pub(crate) fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(threads) = self.worker_threads {
            builder
                .worker_threads(threads.get())
                .thread_name(WORKER_THREAD_NAME);
        }
        builder.enable_all().build()
    }

    /// Starts exporting spans when `serve` has an OTLP endpoint, on `runtime`; before logging
    /// starts, as the log's subscriber takes the exporter's layer.
    pub(crate) fn start_exporting(
        &self,
        runtime: &tokio::runtime::Runtime,
    ) -> Result<Option<taskgate::otel::Exporting>, Ending> {
        let serve::SpanExport::On {
            endpoint,
            protocol,
            sampling,
        } = &self.span_export
        else {
            return Ok(None);
        };
        let _entered = runtime.enter();
        taskgate::otel::start(endpoint, *protocol, *sampling)
            .map(Some)
            .map_err(|error| ending(Err((Exit::Usage, error.into()))))
    }

    /// Logs, once the log is set up, where spans go, or why they do not go to the endpoint
    /// given.
    pub(crate) fn log_span_export(&self, exporting: Option<&taskgate::otel::Exporting>) {
        if let Some(exporting) = exporting {
            exporting.log_started();
        } else if let serve::SpanExport::TurnedOff { endpoint, by } = &self.span_export {
            tracing::warn!(
                target: taskgate::otel::LOG_TARGET,
                %endpoint,
                "spans are not exported: {by} turns export off whatever the OTLP endpoint"
            );
        }
    }

    /// Runs the command and says how it ended.
    pub(crate) async fn run(self) -> Ending {
        let outcome = match self.command {
            PreparedCommand::Serve(serve) => serve.run().await,
            PreparedCommand::Simulate(args) => simulate::simulate(args).await,
            PreparedCommand::CaseExtract(args) => watch::case_extract(args).await,
            PreparedCommand::CaseCancel(args) => case_cancel::case_cancel(args).await,
            PreparedCommand::CaseState(args) => case_state::case_state(args).await,
            PreparedCommand::Watch(args) => watch::watch(args).await,
            PreparedCommand::Bench(args) => bench::bench(args).await,
            PreparedCommand::Health(args) => health::health(args).await,
        };
        ending(outcome)
    }
}

/// The exit code and message of an outcome. The error is printed with its chain joined by ": ",
/// each cause once (see [`error_chain`]).
fn ending(outcome: Outcome) -> Ending {
    let (exit, error) = match outcome {
        Ok(exit) => (exit, None),
        Err((exit, error)) => (exit, Some(format!("error: {}", error_chain(&error)))),
    };
    Ending {
        code: ExitCode::from(match exit {
            Exit::Success => 0,
            Exit::CallFailed => 1,
            Exit::Usage => 2,
            Exit::FollowingStopped => 3,
        }),
        error,
    }
}

/// An error and its causes joined by ": ", as `{:#}` joins them, but each cause once. Our own
/// errors say only what they add, but some of the crates' errors also print their source
/// (hyper-util's `tcp connect error` does), which would then be printed twice: `tcp connect
/// error: tcp connect error: Connection refused`. A cause that the text so far already ends
/// with is left out.
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn usage(error: anyhow::Error) -> (Exit, anyhow::Error) {
    (Exit::Usage, error)
}

/// The range of a client command's `--timeout`: a call's deadline, and the connect timeout.
const CALL_TIMEOUT: Bounds<Duration> = Bounds {
    setting: "--timeout",
    min: Duration::from_millis(1),
    max: Duration::from_secs(60 * 60),
    below: "a call needs some time to be answered, for example 5s",
    above: "the gateway caps every controller call at --upstream-timeout, at most 1h",
};

/// The gateway's endpoint, checked without connecting: an `http://` or `https://` URL with a
/// host (tonic would also take a Unix socket path or a bare name, and fail only when
/// connecting, as if the gateway were down). `timeout`, checked against [`CALL_TIMEOUT`], bounds
/// the connect and each call.
fn gateway_endpoint(gateway: &str, timeout: Duration) -> anyhow::Result<Endpoint> {
    let uri = gateway
        .parse::<tonic::codegen::http::Uri>()
        .ok()
        .filter(|uri| matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some())
        .with_context(|| {
            format!(
                "invalid --gateway '{}': it must be http://HOST:PORT or https://HOST:PORT, for \
                 example http://127.0.0.1:50051",
                redact_url(gateway)
            )
        })?;
    // The port as written: `Uri` takes any digits for one and then has none, so a connection
    // would go to the scheme's default port instead.
    let host_and_port = uri.authority().map_or("", |authority| {
        let host_and_port = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, rest)| rest);
        host_and_port
            .rsplit_once(']')
            .map_or(host_and_port, |(_, rest)| rest)
    });
    if let Some((_, port)) = host_and_port.rsplit_once(':') {
        let refused = match port.parse::<u16>() {
            Ok(0) => Some("port 0 cannot be connected to".to_owned()),
            Ok(_) if port.starts_with('+') => Some(format!("'{port}' is not a port")),
            Ok(_) => None,
            Err(_) if port.is_empty() => Some("its port is empty".to_owned()),
            Err(_) => Some(format!("'{port}' is not a port (1-65535)")),
        };
        if let Some(refused) = refused {
            anyhow::bail!(
                "invalid --gateway '{}': {refused}; give the gateway's port ({} by default)",
                redact_url(gateway),
                taskgate::config::defaults::LISTEN.port()
            );
        }
    }
    // Every call goes to its method's path at the gateway's root: a path here would be dropped.
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() || gateway.contains('#') {
        anyhow::bail!(
            "invalid --gateway '{}': a gateway's address has no path, query or fragment; give \
             http://HOST:PORT or https://HOST:PORT",
            redact_url(gateway)
        );
    }
    let timeout = CALL_TIMEOUT.check(timeout)?;
    let https = uri.scheme_str() == Some("https");
    let mut endpoint = Endpoint::from(uri);
    if https {
        // The system's roots, or the ones SSL_CERT_FILE or SSL_CERT_DIR name instead. The
        // handshake has a limit of its own: the connect timeout ends with the TCP connect.
        let tls = ClientTlsConfig::new().with_native_roots().timeout(timeout);
        endpoint = endpoint
            .tls_config(tls)
            .context("cannot set up TLS for --gateway")?;
    }
    Ok(endpoint.connect_timeout(timeout).timeout(timeout))
}

/// Opens one HTTP/2 connection to the gateway.
async fn connect(endpoint: &Endpoint, gateway: &str) -> anyhow::Result<Channel> {
    endpoint.connect().await.map_err(|error| {
        let hint = connect_hint(&error);
        let error = anyhow::Error::new(error).context(format!(
            "cannot connect to the gateway at {}",
            named(gateway, endpoint)
        ));
        match hint {
            Some(hint) => anyhow::anyhow!("{}; {hint}", error_chain(&error)),
            None => error,
        }
    })
}

/// What to do about a failed connect, where its cause tells: nothing listens at the address,
/// or the gateway there answered a TLS handshake in plaintext.
fn connect_hint(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let plaintext = |error: &(dyn std::error::Error + 'static)| {
        matches!(
            error.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))
        )
    };
    const PLAINTEXT: &str =
        "it did not answer TLS: a gateway without --tls-cert serves plaintext, at http://";
    const REFUSED: &str = "is a gateway running there? --gateway gives its address";
    let mut cause = Some(error);
    while let Some(error) = cause {
        if plaintext(error) {
            return Some(PLAINTEXT);
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Some(REFUSED);
            }
            if io.get_ref().is_some_and(|inner| plaintext(inner)) {
                return Some(PLAINTEXT);
            }
        }
        cause = error.source();
    }
    None
}

/// `gateway` as a connect error names it, with the port it went to when the URL gives none: a
/// URL without one goes to its scheme's port, never to the gateway's.
fn named(gateway: &str, endpoint: &Endpoint) -> String {
    let uri = endpoint.uri();
    let url = redact_url(gateway);
    if uri.port_u16().is_some() {
        return url.into_owned();
    }
    let port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    format!(
        "{url} (no port given, so port {port}; a gateway listens on {} unless told otherwise)",
        taskgate::config::defaults::LISTEN.port()
    )
}

/// The `authorization` value for `token`. The error names the flag, never the token.
fn bearer_token(token: &str) -> anyhow::Result<AsciiMetadataValue> {
    // The library's own cause ("failed to parse metadata value") would only say this again, vaguely.
    format!("Bearer {token}")
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid --token: it must be printable ASCII"))
}

/// Binds `address`, given by `flag`: the error names the flag, since the gateway's own other
/// listener may be what holds the address.
async fn bind(flag: &str, address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} ({flag})"))
}

/// A duration flag's value, read by humantime ("10s", "1m 30s", "500ms"); clap names the flag
/// and the value in front of humantime's reason.
fn duration(text: &str) -> Result<Duration, humantime::DurationError> {
    text.parse::<humantime::Duration>().map(Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        command().debug_assert();
    }

    /// Issue 20, item 10: `tcp connect error: tcp connect error: Connection refused`.
    #[test]
    fn each_cause_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error: {0}")]
        struct Repeats(#[source] std::io::Error);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = anyhow::Error::new(Repeats(refused)).context("cannot connect to the gateway");
        assert_eq!(
            error_chain(&error),
            "cannot connect to the gateway: tcp connect error: connection refused"
        );
        let nested = anyhow::anyhow!("cause").context("context").context("outer");
        assert_eq!(error_chain(&nested), "outer: context: cause");
    }

    /// A URL without a port goes to its scheme's port, and the connect error says which.
    #[test]
    fn a_connect_error_names_the_port_a_url_without_one_went_to() {
        let named = |gateway: &str| {
            named(
                gateway,
                &gateway_endpoint(gateway, Duration::from_secs(1)).unwrap(),
            )
        };
        assert_eq!(named("http://127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(
            named("http://gateway.local"),
            "http://gateway.local (no port given, so port 80; a gateway listens on 50051 unless \
             told otherwise)"
        );
        assert_eq!(
            named("https://user:secret@gateway.local/"),
            "https://user:***@gateway.local/ (no port given, so port 443; a gateway listens on \
             50051 unless told otherwise)"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            duration("ten").map_err(|error| error.to_string()),
            Err("expected number at 0".to_owned())
        );
    }
}
