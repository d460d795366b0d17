//! The `taskgate` command line: `serve`, `simulate`, `case-extract` and `bench`.
//!
//! Clap types stay raw; they are turned into checked `config` types before any port is bound.
//! Every flag can also be set with a `TASKGATE_…` environment variable.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic_types::{StatusExt, pb};

mod bench;
mod file;

use bench::BenchArgs;
use file::ServeFile;

use crate::auth::TokenFile;
use crate::codec::WireFormat;
use crate::config::{
    AccessLog, Http1Flags, Http1Limits, defaults, parse_cors_origin, parse_upstream_url, redact_url,
};
use crate::fault;
use crate::log::LogFormat;
use crate::nofile;
use crate::proto::task_service_client::TaskServiceClient;
use crate::proto::{CaseExtractRequest, FaultCode, TASK_FAULT_TYPE_URL, TaskFault};
use crate::request_id::HEADER as REQUEST_ID_HEADER;
use crate::server::Config;
use crate::simulator::{self, Simulator, layout::Layout};
use crate::tls::{ServerTls, UpstreamTls};
use crate::{connection, upstream};

const EXIT_STATUS: &str = "\
EXIT STATUS:
    0  success (for serve and simulate: a clean shutdown on SIGINT or SIGTERM; for bench: the
       run completed, even if some calls failed)
    1  the call returned an error status, the gateway cannot be reached, or the server failed
       while running
    2  a usage or configuration error (bad flag, bad file, address already in use)";

/// taskgate: a gRPC gateway to the AutoStore task interface.
///
/// `serve` runs the gateway, `simulate` runs a simulated controller, `case-extract` calls a
/// running gateway, and `bench` puts a running gateway under load and reports its latency. Logs go to stderr; set their level with RUST_LOG (for example
/// RUST_LOG=taskgate=debug).
#[derive(Debug, Parser)]
#[command(name = "taskgate", version, after_help = EXIT_STATUS)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,

    /// The log format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors.
    #[arg(long, global = true, env = "TASKGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// What clap parsed, kept to tell a value the user gave from a default, which a config file
    /// may replace.
    #[arg(skip)]
    matches: ArgMatches,
}

/// The controller's wire format, as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum UpstreamFormat {
    /// `<methodcall>…</methodcall>`, Content-Type application/xml.
    Xml,
    /// `{"method":…,"params":{…}}`, Content-Type application/json.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC gateway in front of a controller (or the embedded simulator).
    Serve(Box<ServeArgs>),
    /// Run the simulated controller alone, speaking the task interface over HTTP.
    Simulate(SimulateArgs),
    /// Call CaseExtract on a running gateway and print the outcome.
    CaseExtract(CaseExtractArgs),
    /// Put a running gateway under load with CaseExtract calls and report calls/s, latency
    /// percentiles and a count per gRPC status code.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The address to serve gRPC on, for example 0.0.0.0:50051.
    #[arg(long, env = "TASKGATE_LISTEN", default_value = defaults::LISTEN)]
    listen: SocketAddr,

    /// The controller's task-interface URL (http or https).
    #[arg(long, env = "TASKGATE_UPSTREAM", default_value = defaults::UPSTREAM)]
    upstream: String,

    /// The longest to wait for one controller reply, for example 10s or 500ms; a caller's
    /// shorter gRPC deadline wins. 10ms to 1h: calls are never sent with less than 10ms left.
    #[arg(long, env = "TASKGATE_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    upstream_timeout: Duration,

    /// The delay put in RetryInfo when a retry is safe (fault 1148, controller unreachable);
    /// 0s to 1h.
    #[arg(long, env = "TASKGATE_RETRY_DELAY", default_value = "1s", value_parser = parse_duration)]
    retry_delay: Duration,

    /// The largest controller reply to read, in bytes; 1024 to 67108864 (64 MiB).
    #[arg(long, env = "TASKGATE_MAX_RESPONSE_BYTES", default_value_t = defaults::MAX_RESPONSE_BYTES)]
    max_response_bytes: NonZeroUsize,

    /// How long calls in flight may take to finish after SIGINT or SIGTERM; 0s to 1h.
    #[arg(long, env = "TASKGATE_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,

    /// How often to probe the controller with a TCP connect for the health service (nothing is
    /// ever POSTed); 10ms to 1h.
    #[arg(long, env = "TASKGATE_HEALTH_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    health_interval: Duration,

    /// How many CaseExtract calls may be in flight at once; more are refused at once with
    /// RESOURCE_EXHAUSTED (reason OVERLOADED). Health and reflection are not counted. 1 to
    /// 100000.
    #[arg(long, env = "TASKGATE_MAX_IN_FLIGHT", default_value_t = defaults::MAX_IN_FLIGHT)]
    max_in_flight: NonZeroUsize,

    /// How long a new gRPC connection may take to identify itself (TLS handshake, then the
    /// HTTP/2 preface or a complete first HTTP/1.1 request head) before it is closed; also the
    /// limit on later HTTP/1.1 request heads.
    #[arg(long, env = "TASKGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,

    /// How long a gRPC connection may stay without an open call or stream before it is closed
    /// (GOAWAY on HTTP/2), for example 5m.
    #[arg(long, env = "TASKGATE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    idle_timeout: Duration,

    /// How many gRPC connections may be open at once; more are closed as soon as they are
    /// accepted. Default: the open-file limit (nofile) less --max-in-flight + 1 controller
    /// connections, --metrics-max-connections (when metrics are served) and 64 in reserve, at
    /// least 16 and at most 65536.
    #[arg(long, env = "TASKGATE_MAX_CONNECTIONS")]
    max_connections: Option<NonZeroUsize>,

    /// How many streams (calls) one HTTP/2 connection may have open at once; clients queue the
    /// rest.
    #[arg(long, env = "TASKGATE_MAX_CONCURRENT_STREAMS", default_value_t = defaults::MAX_CONCURRENT_STREAMS)]
    max_concurrent_streams: NonZeroU32,

    /// How many health Watch streams may be open at once over all connections; more are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TASKGATE_MAX_HEALTH_WATCHES", default_value_t = defaults::MAX_HEALTH_WATCHES)]
    max_health_watches: NonZeroUsize,

    /// How long a request head to /metrics may take, from accept or from its first byte.
    #[arg(long, env = "TASKGATE_METRICS_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    metrics_header_read_timeout: Duration,

    /// How long a kept-alive connection to /metrics may wait for its next request.
    #[arg(long, env = "TASKGATE_METRICS_IDLE_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    metrics_idle_timeout: Duration,

    /// How long a request body to /metrics may take once its head has arrived.
    #[arg(long, env = "TASKGATE_METRICS_BODY_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    metrics_body_read_timeout: Duration,

    /// How many connections to /metrics may be open at once; more are closed as soon as they
    /// are accepted.
    #[arg(long, env = "TASKGATE_METRICS_MAX_CONNECTIONS", default_value_t = defaults::METRICS_MAX_CONNECTIONS)]
    metrics_max_connections: NonZeroUsize,

    /// How to speak to the controller: `xml` (the documented format) or `json`.
    #[arg(long, env = "TASKGATE_UPSTREAM_FORMAT", value_enum, default_value_t = UpstreamFormat::Xml)]
    upstream_format: UpstreamFormat,

    /// A file of bearer tokens, one per line (# starts a comment): task calls then need
    /// `authorization: Bearer <token>`. Health and reflection stay open. SIGHUP reloads the file.
    #[arg(long, env = "TASKGATE_AUTH_TOKENS_FILE")]
    auth_tokens_file: Option<PathBuf>,

    /// Serve gRPC over TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "TASKGATE_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "TASKGATE_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// Require client certificates signed by this PEM CA (mutual TLS; needs --tls-cert).
    #[arg(long, env = "TASKGATE_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,

    /// Trust only this PEM CA for an https:// controller (default: the system's roots).
    #[arg(long, env = "TASKGATE_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,

    /// Present this PEM client certificate to an https:// controller (needs
    /// --upstream-client-key).
    #[arg(long, env = "TASKGATE_UPSTREAM_CLIENT_CERT")]
    upstream_client_cert: Option<PathBuf>,

    /// The PEM private key of --upstream-client-cert.
    #[arg(long, env = "TASKGATE_UPSTREAM_CLIENT_KEY")]
    upstream_client_key: Option<PathBuf>,

    /// Browser origins allowed to call over gRPC-Web, comma-separated (for example
    /// `https://ops.example.com`), or * for any; off by default, so only same-origin pages can
    /// call.
    #[arg(long, env = "TASKGATE_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    cors_allow_origin: Vec<String>,

    /// Which calls write an access line: `all`, `errors` (every call that did not end OK) or
    /// `off`.
    #[arg(long, env = "TASKGATE_ACCESS_LOG", value_enum, default_value_t = AccessLog::All)]
    access_log: AccessLog,

    /// Serve Prometheus metrics at http://ADDRESS/metrics, for example 127.0.0.1:9464; off unless
    /// given.
    #[arg(long, env = "TASKGATE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// Start the embedded simulated controller on an ephemeral loopback port and use it as the
    /// upstream.
    #[arg(long, env = "TASKGATE_SIMULATOR")]
    simulator: bool,

    /// A TOML port layout for the embedded simulator (see `taskgate simulate --help`); default:
    /// the built-in layout.
    #[arg(long, env = "TASKGATE_SIMULATOR_CONFIG")]
    simulator_config: Option<PathBuf>,

    /// A TOML file with any of these settings, keyed by flag name with underscores (for example
    /// upstream_timeout = "10s"). Flags and environment variables win over the file.
    #[arg(long, env = "TASKGATE_CONFIG")]
    config: Option<PathBuf>,

    /// Print the effective configuration (flags > environment > file > defaults) as TOML and exit.
    #[arg(long)]
    print_config: bool,

    /// Whether `upstream` came from the config file, which conflicts with --simulator as a flag
    /// value would.
    #[arg(skip)]
    upstream_from_file: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
LAYOUT FILE (TOML):
    step_time = \"2s\"        # how long EREQ and ERSO each last (default 2s)
    [[port]]
    id = 4                  # 1-2000
    autocase = true         # an AutoCase port?
    mode = \"OPEN\"           # CLOSED, OPEN, AUTO, INSERT, SWAP, MOVE, SEQUENCE, DISABLED,
                            # MULTIPORT_PUPPET or RUNOUT
    selected_bin = 101337   # optional: the bin the last openbin selected

DEFAULT LAYOUT (no --config):
    port 1: not AutoCase, OPEN
    port 2: AutoCase, CLOSED
    port 3: AutoCase, OPEN, no selected bin
    port 4: AutoCase, OPEN, selected bin 101337
    every other port: unknown (fault 1000)")]
struct SimulateArgs {
    /// The address to serve the task interface on (path /api/v2/task).
    #[arg(long, env = "TASKGATE_SIMULATOR_LISTEN", default_value = defaults::SIMULATOR_LISTEN)]
    listen: SocketAddr,

    /// A TOML port layout; default: the built-in layout.
    #[arg(long, env = "TASKGATE_SIMULATOR_CONFIG")]
    config: Option<PathBuf>,

    /// How long a request head may take, from accept or from its first byte.
    #[arg(long, env = "TASKGATE_SIMULATOR_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: Duration,

    /// How long a kept-alive connection may wait for its next request.
    #[arg(long, env = "TASKGATE_SIMULATOR_IDLE_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    idle_timeout: Duration,

    /// How long a request body may take once its head has arrived.
    #[arg(long, env = "TASKGATE_SIMULATOR_BODY_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    body_read_timeout: Duration,

    /// How many connections may be open at once; more are closed as soon as they are accepted
    /// (and logged).
    #[arg(long, env = "TASKGATE_SIMULATOR_MAX_CONNECTIONS", default_value_t = defaults::SIMULATOR_MAX_CONNECTIONS)]
    max_connections: NonZeroUsize,
}

#[derive(Debug, Args)]
struct CaseExtractArgs {
    /// The AutoCase port, 1-2000.
    #[arg(long, env = "TASKGATE_PORT")]
    port: u32,

    /// The bin to extract the case from, 1-4000000; it must be the port's selected bin.
    #[arg(long, env = "TASKGATE_BIN")]
    bin: u32,

    /// The gateway's address.
    #[arg(
        long,
        env = "TASKGATE_GATEWAY",
        default_value = "http://127.0.0.1:50051"
    )]
    gateway: String,

    /// The bearer token to send, when the gateway requires one. Prefer the environment variable:
    /// a command-line argument is visible to other users in the process list.
    #[arg(long, env = "TASKGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// The x-request-id to send, to find this call in the gateway's and controller's logs;
    /// default: one the gateway makes.
    #[arg(long, env = "TASKGATE_REQUEST_ID")]
    request_id: Option<String>,

    /// The call's deadline, sent to the gateway as grpc-timeout.
    #[arg(long, env = "TASKGATE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
}

// === impl ServeArgs ===

impl ServeArgs {
    /// The metrics endpoint's limits, from their four flags.
    fn metrics_limits(&self) -> Http1Limits {
        Http1Limits {
            header_read_timeout: self.metrics_header_read_timeout,
            idle_timeout: self.metrics_idle_timeout,
            body_read_timeout: self.metrics_body_read_timeout,
            max_connections: self.metrics_max_connections,
        }
    }
}

// === impl SimulateArgs ===

impl SimulateArgs {
    /// The simulator's listener limits, from their four flags.
    fn limits(&self) -> Http1Limits {
        Http1Limits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            body_read_timeout: self.body_read_timeout,
            max_connections: self.max_connections,
        }
    }
}

/// How a command ended, as an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Success,
    CallFailed,
    Usage,
}

// === impl Cli ===

impl Cli {
    /// Parses the process's arguments; on a usage error prints it and exits 2, as clap does.
    pub fn parse_args() -> Cli {
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
        cli.matches = matches;
        cli
    }

    /// The log format: the flag or environment variable, else `serve`'s config file, else text.
    /// A config file that cannot be read is ignored here; `run` reports it.
    pub fn log_format(&self) -> LogFormat {
        if given_by_user(&self.matches, "log_format") {
            return self.log_format;
        }
        let config_file = match &self.command {
            Command::Serve(args) => args.config.as_deref(),
            Command::Simulate(_) | Command::CaseExtract(_) | Command::Bench(_) => None,
        };
        config_file
            .and_then(|path| ServeFile::load(path).ok())
            .and_then(|file| file.log_format)
            .unwrap_or(self.log_format)
    }

    /// The log level when RUST_LOG is not set: the servers report each call, the clients only
    /// warnings.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Serve(_) | Command::Simulate(_) => "info",
            Command::CaseExtract(_) | Command::Bench(_) => "warn",
        }
    }
}

/// How a command ended.
#[derive(Debug)]
pub struct Ending {
    /// The process exit code.
    pub code: ExitCode,
    /// What to print on stderr, after the log is flushed, when the command failed.
    pub error: Option<String>,
    /// How long the log may take to flush: a server's shutdown grace, so that a stalled log
    /// reader cannot hold the exit past it.
    pub log_flush_bound: Duration,
}

/// Runs the parsed command and says how it ended.
pub async fn run(cli: Cli) -> Ending {
    let log_format = cli.log_format();
    let serve_matches = cli
        .matches
        .subcommand_matches("serve")
        .cloned()
        .unwrap_or_default();
    // A server's own grace once its settings are known; the default for the other commands.
    let mut log_flush_bound = defaults::SHUTDOWN_GRACE;
    let result = match cli.command {
        Command::Serve(args) => {
            serve(*args, &serve_matches, log_format, &mut log_flush_bound).await
        }
        Command::Simulate(args) => simulate(args).await,
        Command::CaseExtract(args) => case_extract(args).await,
        Command::Bench(args) => bench::bench(args).await,
    };
    let (exit, error) = match result {
        Ok(exit) => (exit, None),
        Err((exit, error)) => (exit, Some(format!("error: {error:#}"))),
    };
    Ending {
        code: ExitCode::from(match exit {
            Exit::Success => 0,
            Exit::CallFailed => 1,
            Exit::Usage => 2,
        }),
        error,
        log_flush_bound,
    }
}

type Outcome = Result<Exit, (Exit, anyhow::Error)>;

fn usage(error: anyhow::Error) -> (Exit, anyhow::Error) {
    (Exit::Usage, error)
}

async fn serve(
    mut args: ServeArgs,
    matches: &ArgMatches,
    log_format: LogFormat,
    log_flush_bound: &mut Duration,
) -> Outcome {
    if let Some(path) = args.config.clone() {
        let file = ServeFile::load(&path).map_err(usage)?;
        apply_file(&mut args, matches, file);
    }
    check_combinations(&args, matches).map_err(usage)?;
    let mut config = Config {
        upstream: upstream::Settings {
            url: parse_upstream_url(&args.upstream)
                .context("invalid --upstream")
                .map_err(usage)?,
            timeout: args.upstream_timeout,
            retry_delay: args.retry_delay,
            max_response_bytes: args.max_response_bytes,
            max_in_flight: args.max_in_flight,
            format: match args.upstream_format {
                UpstreamFormat::Xml => WireFormat::Xml,
                UpstreamFormat::Json => WireFormat::Json,
            },
            tls: UpstreamTls::load(
                args.upstream_ca.as_deref(),
                args.upstream_client_cert.as_deref(),
                args.upstream_client_key.as_deref(),
            )
            .map_err(|error| usage(error.into()))?,
        },
        shutdown_grace: args.shutdown_grace,
        health_interval: args.health_interval,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(
                ServerTls::load(cert, key, args.tls_client_ca.as_deref())
                    .map_err(|error| usage(error.into()))?,
            ),
            // `check_combinations` has made sure the two come together.
            _ => None,
        },
        cors_allow_origins: args
            .cors_allow_origin
            .iter()
            .map(|origin| parse_cors_origin(origin))
            .collect::<Result<_, _>>()
            .context("invalid --cors-allow-origin")
            .map_err(usage)?,
        access_log: args.access_log,
        connections: connection::Settings {
            handshake_timeout: args.handshake_timeout,
            idle_timeout: args.idle_timeout,
            max_connections: args.max_connections,
            max_concurrent_streams: args.max_concurrent_streams,
        },
        max_health_watches: args.max_health_watches,
        metrics_limits: args.metrics_limits(),
        auth_tokens: match &args.auth_tokens_file {
            Some(path) => Some(TokenFile::load(path).map_err(|error| usage(error.into()))?),
            None => None,
        },
    };
    config
        .validate()
        .context("invalid configuration")
        .map_err(usage)?;
    *log_flush_bound = config.shutdown_grace;
    // Printed only once every file has been read and every value checked, so what is printed
    // is a configuration that starts.
    if args.print_config {
        let mut effective = ServeFile::from(&args);
        effective.log_format = Some(log_format);
        print!("{}", effective.to_toml());
        return Ok(Exit::Success);
    }
    if args.simulator {
        let layout = load_layout(args.simulator_config.as_deref()).map_err(usage)?;
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(usage)?;
        let address = listener
            .local_addr()
            .context("cannot read the simulator's address")
            .map_err(usage)?;
        config.upstream.url =
            parse_upstream_url(&format!("http://{address}{}", simulator::http::TASK_PATH))
                .context("cannot build the simulator's URL")
                .map_err(usage)?;
        tracing::info!(url = %config.upstream.url, "embedded simulated controller started; the gateway calls it instead of a real controller");
        // The simulator lives as long as the process; it stops when the runtime does.
        tokio::spawn(simulator::http::serve(
            listener,
            Simulator::new(&layout),
            Http1Limits::with_max_connections(defaults::SIMULATOR_MAX_CONNECTIONS),
            std::future::pending(),
        ));
    }
    nofile::log_raise(nofile::raise_soft_limit());
    let listener = bind(args.listen).await.map_err(usage)?;
    let metrics = match args.metrics_listen {
        Some(address) => Some(bind(address).await.map_err(usage)?),
        None => None,
    };
    let listeners = crate::server::Listeners {
        grpc: listener,
        metrics,
    };
    crate::server::serve(listeners, config, crate::shutdown::signal())
        .await
        .map_err(|error| (Exit::CallFailed, error.into()))?;
    Ok(Exit::Success)
}

/// Whether the user gave `id` on the command line or in the environment, which beats the file.
fn given_by_user(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Fills every setting the user did not give with the file's value, if it has one.
fn apply_file(args: &mut ServeArgs, matches: &ArgMatches, file: ServeFile) {
    args.upstream_from_file = file.upstream.is_some() && !given_by_user(matches, "upstream");
    macro_rules! take {
        ($($field:ident),* $(,)?) => {$(
            if !given_by_user(matches, stringify!($field)) {
                if let Some(value) = file.$field {
                    args.$field = value.into();
                }
            }
        )*};
    }
    take!(
        listen,
        upstream,
        upstream_timeout,
        upstream_format,
        retry_delay,
        max_response_bytes,
        shutdown_grace,
        health_interval,
        max_in_flight,
        access_log,
        simulator,
        handshake_timeout,
        idle_timeout,
        max_concurrent_streams,
        max_health_watches,
        metrics_header_read_timeout,
        metrics_idle_timeout,
        metrics_body_read_timeout,
        metrics_max_connections,
    );
    macro_rules! take_optional {
        ($($field:ident),* $(,)?) => {$(
            if !given_by_user(matches, stringify!($field)) && file.$field.is_some() {
                args.$field = file.$field;
            }
        )*};
    }
    take_optional!(
        auth_tokens_file,
        tls_cert,
        tls_key,
        tls_client_ca,
        upstream_ca,
        upstream_client_cert,
        upstream_client_key,
        metrics_listen,
        simulator_config,
        max_connections,
    );
    if !given_by_user(matches, "cors_allow_origin")
        && let Some(origins) = file.cors_allow_origin
    {
        args.cors_allow_origin = origins;
    }
}

/// Settings that only make sense together, checked once flags, environment and file are merged.
fn check_combinations(args: &ServeArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let upstream_given = given_by_user(matches, "upstream") || args.upstream_from_file;
    if args.simulator && upstream_given {
        anyhow::bail!(
            "--upstream and --simulator cannot both be given: the simulator is the upstream"
        );
    }
    if args.simulator_config.is_some() && !args.simulator {
        anyhow::bail!("--simulator-config needs --simulator");
    }
    match (&args.tls_cert, &args.tls_key) {
        (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key"),
        (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert"),
        _ => {}
    }
    if args.tls_client_ca.is_some() && args.tls_cert.is_none() {
        anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key");
    }
    Ok(())
}

impl From<&ServeArgs> for ServeFile {
    fn from(args: &ServeArgs) -> Self {
        ServeFile {
            listen: Some(args.listen),
            upstream: (!args.simulator).then(|| args.upstream.clone()),
            upstream_timeout: Some(args.upstream_timeout),
            upstream_format: Some(args.upstream_format),
            retry_delay: Some(args.retry_delay),
            max_response_bytes: Some(args.max_response_bytes),
            shutdown_grace: Some(args.shutdown_grace),
            health_interval: Some(args.health_interval),
            max_in_flight: Some(args.max_in_flight),
            auth_tokens_file: args.auth_tokens_file.clone(),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            tls_client_ca: args.tls_client_ca.clone(),
            upstream_ca: args.upstream_ca.clone(),
            upstream_client_cert: args.upstream_client_cert.clone(),
            upstream_client_key: args.upstream_client_key.clone(),
            metrics_listen: args.metrics_listen,
            cors_allow_origin: (!args.cors_allow_origin.is_empty())
                .then(|| args.cors_allow_origin.clone()),
            log_format: None,
            access_log: Some(args.access_log),
            simulator: Some(args.simulator),
            simulator_config: args.simulator_config.clone(),
            handshake_timeout: Some(args.handshake_timeout),
            idle_timeout: Some(args.idle_timeout),
            max_connections: args.max_connections,
            max_concurrent_streams: Some(args.max_concurrent_streams),
            max_health_watches: Some(args.max_health_watches),
            metrics_header_read_timeout: Some(args.metrics_header_read_timeout),
            metrics_idle_timeout: Some(args.metrics_idle_timeout),
            metrics_body_read_timeout: Some(args.metrics_body_read_timeout),
            metrics_max_connections: Some(args.metrics_max_connections),
        }
    }
}

async fn simulate(args: SimulateArgs) -> Outcome {
    let layout = load_layout(args.config.as_deref()).map_err(usage)?;
    let limits = args.limits();
    limits
        .validate(Http1Flags::SIMULATE)
        .context("invalid configuration")
        .map_err(usage)?;
    nofile::log_raise(nofile::raise_soft_limit());
    let listener = bind(args.listen).await.map_err(usage)?;
    let address = listener.local_addr().unwrap_or(args.listen);
    // Caught before "listening" is logged, so a SIGHUP sent after it never ends the process.
    tokio::spawn(crate::shutdown::hangups(|| {
        tracing::info!("received SIGHUP; the simulator has nothing to reload")
    }));
    tracing::info!(
        url = %format!("http://{address}{}", simulator::http::TASK_PATH),
        ports = layout.ports.len(),
        step_time = %humantime::format_duration(layout.step_time),
        "simulated controller listening"
    );
    simulator::http::serve(
        listener,
        Simulator::new(&layout),
        limits,
        crate::shutdown::signal(),
    )
    .await;
    Ok(Exit::Success)
}

async fn case_extract(args: CaseExtractArgs) -> Outcome {
    let endpoint = gateway_endpoint(&args.gateway, args.timeout).map_err(usage)?;
    let call_failed = |error: anyhow::Error| (Exit::CallFailed, error);
    let channel = connect(&endpoint, &args.gateway)
        .await
        .map_err(call_failed)?;
    let mut request = tonic::Request::new(CaseExtractRequest {
        port_id: args.port,
        bin_id: args.bin,
    });
    if let Some(token) = &args.token {
        let value = bearer_token(token).map_err(usage)?;
        request.metadata_mut().insert("authorization", value);
    }
    if let Some(request_id) = &args.request_id {
        let value = request_id
            .parse()
            .with_context(|| format!("invalid --request-id '{request_id}'"))
            .map_err(usage)?;
        request.metadata_mut().insert(REQUEST_ID_HEADER, value);
    }
    let what = format!("case_extract port {} bin {}", args.port, args.bin);
    let request_id_of = |metadata: &tonic::metadata::MetadataMap| {
        metadata
            .get(REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("none")
            .to_owned()
    };
    match TaskServiceClient::new(channel).case_extract(request).await {
        Ok(response) => {
            println!("ok: {what}: the controller accepted the case extraction");
            println!("  request id: {}", request_id_of(response.metadata()));
            Ok(Exit::Success)
        }
        Err(status) => {
            println!("{}", describe_status(&what, &status));
            println!("  request id: {}", request_id_of(status.metadata()));
            Ok(Exit::CallFailed)
        }
    }
}

/// The gateway's endpoint, checked without connecting; `timeout` bounds the connect and each
/// call.
fn gateway_endpoint(gateway: &str, timeout: Duration) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(gateway.to_owned())
        .with_context(|| format!("invalid --gateway '{}'", redact_url(gateway)))?;
    Ok(endpoint.connect_timeout(timeout).timeout(timeout))
}

/// Opens one HTTP/2 connection to the gateway.
async fn connect(endpoint: &Endpoint, gateway: &str) -> anyhow::Result<Channel> {
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to the gateway at {}", redact_url(gateway)))
}

/// The `authorization` value for `token`. The error names the flag, never the token.
fn bearer_token(token: &str) -> anyhow::Result<AsciiMetadataValue> {
    format!("Bearer {token}")
        .parse()
        .context("invalid --token: it must be printable ASCII")
}

/// Renders an error status for operators: gRPC code, fault, meaning, retry advice, message.
fn describe_status(what: &str, status: &tonic::Status) -> String {
    let mut lines = vec![format!(
        "failed: {what}: {}",
        fault::grpc_code_name(status.code())
    )];
    if let Some(task_fault) = task_fault(status) {
        let fault_class = fault::classify(task_fault.raw_code);
        let name = match FaultCode::try_from(task_fault.code) {
            Ok(FaultCode::Unspecified) | Err(_) => fault_class.reason(),
            Ok(fault_code) => fault_code.as_str_name().trim_start_matches("FAULT_CODE_"),
        };
        lines.push(format!("  fault:   {} {name}", task_fault.raw_code));
        lines.push(format!("  meaning: {}", fault_class.meaning()));
    } else if let Some(error_info) = status.get_details_error_info() {
        lines.push(format!(
            "  reason:  {} ({})",
            error_info.reason, error_info.domain
        ));
    }
    if let Some(bad_request) = status.get_details_bad_request() {
        for violation in bad_request.field_violations {
            lines.push(format!(
                "  field:   {}: {}",
                violation.field, violation.description
            ));
        }
    }
    match status
        .get_details_retry_info()
        .and_then(|retry_info| retry_info.retry_delay)
    {
        Some(delay) => lines.push(format!(
            "  retry:   safe after {}",
            humantime::format_duration(delay)
        )),
        None => lines.push("  retry:   not advised".to_owned()),
    }
    lines.push(format!("  message: {}", status.message()));
    lines.join("\n")
}

fn task_fault(status: &tonic::Status) -> Option<TaskFault> {
    let rpc_status = pb::Status::decode(status.details()).ok()?;
    rpc_status
        .details
        .iter()
        .find(|any| any.type_url == TASK_FAULT_TYPE_URL)
        .and_then(|any| TaskFault::decode(any.value.as_slice()).ok())
}

fn load_layout(path: Option<&Path>) -> anyhow::Result<Layout> {
    let Some(path) = path else {
        return Ok(Layout::default_layout());
    };
    let text = crate::regular_file::read_to_string(path)
        .with_context(|| format!("cannot read layout file {}", path.display()))?;
    Layout::from_toml(&text).with_context(|| format!("invalid layout file {}", path.display()))
}

async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|error| format!("'{text}' is not a duration such as 10s or 500ms: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(
            parse_duration("ten")
                .unwrap_err()
                .contains("'ten' is not a duration")
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults_match_the_config_defaults() {
        let Cli {
            command: Command::Serve(args),
            ..
        } = Cli::try_parse_from(["taskgate", "serve"]).unwrap()
        else {
            panic!("not serve");
        };
        let config = Config::with_upstream(parse_upstream_url(&args.upstream).unwrap());
        assert_eq!(args.upstream, defaults::UPSTREAM);
        assert_eq!(args.listen.to_string(), defaults::LISTEN);
        assert_eq!(args.upstream_timeout, config.upstream.timeout);
        assert_eq!(args.retry_delay, config.upstream.retry_delay);
        assert_eq!(args.shutdown_grace, config.shutdown_grace);
        assert_eq!(args.health_interval, config.health_interval);
        assert_eq!(args.max_in_flight, config.upstream.max_in_flight);
        assert_eq!(args.upstream_format, UpstreamFormat::Xml);
        assert_eq!(config.upstream.format, WireFormat::Xml);
        assert_eq!(args.max_response_bytes, config.upstream.max_response_bytes);
        assert_eq!(args.access_log, config.access_log);
        assert_eq!(args.handshake_timeout, config.connections.handshake_timeout);
        assert_eq!(args.idle_timeout, config.connections.idle_timeout);
        assert_eq!(args.max_connections, config.connections.max_connections);
        assert_eq!(
            args.max_concurrent_streams,
            config.connections.max_concurrent_streams
        );
        assert_eq!(args.max_health_watches, config.max_health_watches);
        assert_eq!(args.metrics_limits(), config.metrics_limits);
    }

    #[test]
    fn simulate_defaults_match_the_config_defaults() {
        let Cli {
            command: Command::Simulate(args),
            ..
        } = Cli::try_parse_from(["taskgate", "simulate"]).unwrap()
        else {
            panic!("not simulate");
        };
        assert_eq!(
            args.limits(),
            Http1Limits::with_max_connections(defaults::SIMULATOR_MAX_CONNECTIONS)
        );
    }

    /// Parses `serve` arguments and checks their combinations, without any file.
    fn check_combination(args: &[&str], expected_error: Option<&str>) {
        let matches = Cli::command()
            .try_get_matches_from(["taskgate", "serve"].iter().chain(args))
            .unwrap();
        let Command::Serve(serve_args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("not serve");
        };
        let serve_matches = matches.subcommand_matches("serve").unwrap();
        let outcome =
            check_combinations(&serve_args, serve_matches).map_err(|error| error.to_string());
        assert_eq!(outcome.err().as_deref(), expected_error, "{args:?}");
    }

    #[test]
    fn settings_that_need_each_other() {
        check_combination(&["--simulator"], None);
        check_combination(
            &["--simulator-config", "x.toml"],
            Some("--simulator-config needs --simulator"),
        );
        check_combination(
            &["--simulator", "--upstream", "http://c/api/v2/task"],
            Some("--upstream and --simulator cannot both be given: the simulator is the upstream"),
        );
        check_combination(&["--tls-cert", "c.pem"], Some("--tls-cert needs --tls-key"));
        check_combination(&["--tls-key", "k.pem"], Some("--tls-key needs --tls-cert"));
        check_combination(
            &["--tls-client-ca", "ca.pem"],
            Some("--tls-client-ca needs --tls-cert and --tls-key"),
        );
        check_combination(&["--tls-cert", "c.pem", "--tls-key", "k.pem"], None);
    }
}
