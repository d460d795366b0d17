//! `taskgate serve`: the gateway, in front of a controller or the embedded simulator.
//!
//! Its settings come from flags, environment variables and a `--config` file, merged once before
//! logging starts ([`ServeArgs::prepare`]), then turned into the library's checked
//! [`Config`](taskgate::server::Config), every file read and every value checked, before any port
//! is bound.

use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use taskgate::auth::TokenFile;
use taskgate::config::{
    Bounds, Http1Limits, LogPublisherAddress, SettingValue, defaults, limits, parse_cors_origin,
    parse_upstream_proxy, parse_upstream_url,
};
use taskgate::console;
use taskgate::log::LogFormat;
use taskgate::nofile;
use taskgate::server::{Config, Listeners};
use taskgate::shutdown::{Hangups, Stop};
use taskgate::simulator::{self, Simulator};
use taskgate::tls::{ServerTls, UpstreamTls};

use super::simulate::load_layout;
use super::{Exit, Outcome, bind, output, usage};

mod settings;

use settings::ServeSettings;

#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    #[command(flatten)]
    settings: ServeSettings,

    /// A TOML file with any of these settings, keyed by flag name with underscores (for example
    /// upstream_timeout = "10s"). Flags and environment variables win over the file.
    #[arg(long, env = "TASKGATE_CONFIG")]
    config: Option<PathBuf>,

    /// Print the effective configuration (flags > environment > file > defaults) as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// `serve` with its settings merged: flags and environment over the config file. Defaults are
/// not in yet, so what a user gave can still be told from what nobody did.
#[derive(Debug)]
pub(super) struct Serve {
    given: ServeSettings,
    print_config: bool,
    /// The standard variable the OTLP endpoint came from, when it did, to name in its error.
    otlp_endpoint_variable: Option<&'static str>,
}

/// What `serve` does with spans, from its settings and the standard variables.
#[derive(Debug)]
pub(super) enum SpanExport {
    /// No OTLP endpoint was given.
    Off,
    /// An endpoint was given, and a standard variable (named here) turned export off.
    TurnedOff {
        endpoint: url::Url,
        by: &'static str,
    },
    /// Spans go to `endpoint` in `protocol`, sampled by `sampling`.
    On {
        endpoint: url::Url,
        protocol: taskgate::otel::OtlpProtocol,
        sampling: taskgate::otel::Sampling,
    },
}

// === impl ServeArgs ===

impl ServeArgs {
    /// Reads the config file, if any, and merges the flags and environment (and the global
    /// `log_format`) over it.
    pub(super) fn prepare(self, log_format: Option<LogFormat>) -> anyhow::Result<Serve> {
        let mut given = self.settings;
        given.log_format = log_format;
        let mut otlp_endpoint_variable = None;
        // The standard variables are environment variables like ours: they win over the file.
        if given.otlp_endpoint.is_none()
            && let Some((variable, endpoint)) = taskgate::otel::endpoint_from_environment()
        {
            given.otlp_endpoint = Some(endpoint);
            otlp_endpoint_variable = Some(variable);
        }
        if let Some(path) = &self.config {
            given = given.or(&ServeSettings::load(path)?)?;
        }
        Ok(Serve {
            given,
            print_config: self.print_config,
            otlp_endpoint_variable,
        })
    }
}

// === impl Serve ===

impl Serve {
    /// How many threads the runtime `serve` runs on has: `--worker-threads`, else one per core,
    /// checked against its range. The runtime is built before `run`, so this is checked first.
    pub(super) fn worker_threads(&self) -> anyhow::Result<NonZeroUsize> {
        let threads = match self.given.worker_threads {
            Some(threads) => limits::WORKER_THREADS
                .check_count(threads)
                .context("invalid configuration")?,
            None => defaults::worker_threads(),
        };
        Ok(threads)
    }

    /// The OTLP endpoint given by flag, environment or file, checked, with the sampler the
    /// standard variables choose. `--print-config` exports nothing.
    pub(super) fn span_export(&self) -> anyhow::Result<SpanExport> {
        let endpoint = self
            .given
            .otlp_endpoint
            .as_deref()
            .map(taskgate::otel::parse_endpoint)
            .transpose()
            .with_context(|| {
                format!(
                    "invalid {}",
                    self.otlp_endpoint_variable.unwrap_or("--otlp-endpoint")
                )
            })?;
        let Some(endpoint) = endpoint else {
            return Ok(SpanExport::Off);
        };
        let checked = || -> Result<_, taskgate::otel::OtlpError> {
            let turned_off_by = taskgate::otel::export_turned_off_by()?;
            let protocol = taskgate::otel::OtlpProtocol::from_environment()?;
            taskgate::otel::check_headers()?;
            let sampling = taskgate::otel::Sampling::from_environment()?;
            let for_traces_alone = self.otlp_endpoint_variable
                == Some(taskgate::otel::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT);
            let endpoint = protocol.traces_url(&endpoint, for_traces_alone);
            Ok(match turned_off_by {
                _ if self.print_config => SpanExport::Off,
                Some(by) => SpanExport::TurnedOff { endpoint, by },
                None => SpanExport::On {
                    endpoint,
                    protocol,
                    sampling,
                },
            })
        };
        checked().context("invalid configuration")
    }

    /// The log format given by flag, environment or file, if any.
    pub(super) fn log_format(&self) -> Option<LogFormat> {
        self.given.log_format
    }

    /// Checks the settings, then prints them or serves until SIGINT or SIGTERM.
    pub(super) async fn run(self) -> Outcome {
        // Before anything is read or bound: a SIGTERM sent as soon as a port accepts must drain,
        // not kill, and a SIGHUP then must reload the token file read below, not kill either.
        let stop = Stop::catch();
        let hangups = Hangups::catch();
        check_combinations(&self.given).map_err(usage)?;
        let effective = self.given.or(&ServeSettings::defaults()).map_err(usage)?;
        let mut config = resolve(&effective).map_err(usage)?;
        config
            .validate()
            .context("invalid configuration")
            .map_err(usage)?;
        let simulator = effective.simulator == Some(true);
        let console = effective.console.unwrap_or(simulator);
        // Printed only once every file has been read and every value checked, so what is printed
        // is a configuration that starts.
        if self.print_config {
            let mut shown = effective;
            shown.console = Some(console);
            if self.otlp_endpoint_variable
                == Some(taskgate::otel::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
            {
                shown.otlp_endpoint = shown
                    .otlp_endpoint
                    .as_deref()
                    .map(otlp_endpoint_for_file)
                    .transpose()
                    .map_err(usage)?;
            }
            if simulator {
                // The simulator's addresses are not known until it listens.
                shown.upstream = None;
                shown.log_publisher = None;
            }
            let shown = toml::to_string(&shown).map_err(|error| usage(error.into()))?;
            return output::exit_after(output::text(shown), Exit::Success);
        }
        let layout = if simulator {
            Some(load_layout(effective.simulator_config.as_deref()).map_err(usage)?)
        } else {
            None
        };
        if console {
            // `check_combinations` has made sure that a console without a simulator has ports.
            let ports = match (&effective.console_ports, &layout) {
                (Some(ports), _) => ports.clone(),
                (None, Some(layout)) => layout.ports.iter().map(|port| port.id).collect(),
                (None, None) => Vec::new(),
            };
            config.console = Some(
                console::Settings::new(ports)
                    .context("invalid configuration")
                    .map_err(usage)?,
            );
            // The README asks for a token file wherever the console is more than a test bench's.
            if layout.is_none() && config.auth_tokens.is_none() {
                tracing::warn!(
                    "the console is on without --auth-tokens-file: anyone whose browser reaches \
                     this port can move a robot through it (README, Console)"
                );
            }
        }
        if let Some(layout) = &layout {
            start_simulator(&Simulator::new(layout), &mut config)
                .await
                .map_err(usage)?;
        }
        nofile::log_raise(nofile::raise_soft_limit());
        let listen = effective.listen.unwrap_or(defaults::LISTEN);
        let grpc = bind("--listen", listen).await.map_err(usage)?;
        let metrics = match effective.metrics_listen {
            Some(address) => Some(bind("--metrics-listen", address).await.map_err(usage)?),
            None => None,
        };
        let stop = stop.first_then_repeats(config.shutdown_grace);
        taskgate::server::serve(Listeners { grpc, metrics }, config, stop, hangups)
            .await
            .map_err(|error| (Exit::CallFailed, error.into()))?;
        Ok(Exit::Success)
    }
}

/// Starts the embedded simulator on ephemeral loopback ports and points `config` at it: its task
/// interface, and its Log Publisher unless the gateway runs without one. It lives as long as the
/// process, and stops when the runtime does.
async fn start_simulator(simulator: &Simulator, config: &mut Config) -> anyhow::Result<()> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = bind("--simulator", loopback).await?;
    let address = listener
        .local_addr()
        .context("cannot read the simulator's address")?;
    config.upstream.url =
        parse_upstream_url(&format!("http://{address}{}", simulator::http::TASK_PATH))
            .context("cannot build the simulator's URL")?;
    tracing::info!(url = %config.upstream.url, "embedded simulated controller started; the gateway calls it instead of a real controller");
    // As many connections as this gateway may hold to it: refusing one would make a call's
    // outcome unknown where a real controller would have answered.
    let max_connections = taskgate::config::controller_connections(config.upstream.max_in_flight);
    tokio::spawn(simulator::http::serve(
        listener,
        simulator.clone(),
        Http1Limits::with_max_connections(max_connections),
        std::future::pending(),
    ));
    if config.log_publisher.is_none() {
        return Ok(());
    }
    let listener = bind("--simulator", loopback).await?;
    let address = listener
        .local_addr()
        .context("cannot read the simulator's Log Publisher address")?;
    config.log_publisher = Some(LogPublisherAddress {
        host: address.ip().to_string(),
        port: address.port(),
        tls: false,
    });
    tokio::spawn(simulator::log_publisher::serve(
        listener,
        simulator.clone(),
        std::future::pending(),
    ));
    Ok(())
}

/// The `otlp_endpoint` a config file needs to send spans where `traces_url`, taken from
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, sends them: over http/protobuf a file's endpoint is a
/// base URL, which gets `/v1/traces` after its path, while the variable's is used as it is.
fn otlp_endpoint_for_file(traces_url: &str) -> anyhow::Result<String> {
    let variable = taskgate::otel::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
    let url = taskgate::otel::parse_endpoint(traces_url)
        .with_context(|| format!("invalid {variable}"))?;
    let protocol =
        taskgate::otel::OtlpProtocol::from_environment().context("invalid configuration")?;
    match protocol.base_url(&url) {
        Some(base) => Ok(base.to_string()),
        None => anyhow::bail!(
            "--print-config cannot write {variable} '{url}' as a config file's otlp_endpoint: \
             over {protocol} the file's endpoint gets /v1/traces after its path (less a trailing \
             /), and no path gives '{path}'; keep this endpoint in {variable}",
            path = url.path()
        ),
    }
}

/// Settings that only make sense together, checked on what was given (flags, environment and
/// file), before defaults fill the rest.
fn check_combinations(given: &ServeSettings) -> anyhow::Result<()> {
    let simulator = given.simulator == Some(true);
    if simulator && given.upstream_proxy.is_some() {
        anyhow::bail!(
            "--upstream-proxy and --simulator cannot both be given: the simulator is reached on \
             loopback"
        );
    }
    if simulator && given.upstream.is_some() {
        anyhow::bail!(
            "--upstream and --simulator cannot both be given: the simulator is the upstream"
        );
    }
    if simulator
        && given
            .log_publisher
            .as_deref()
            .is_some_and(|value| value != "off")
    {
        anyhow::bail!(
            "--log-publisher and --simulator cannot both be given: the simulator's Log Publisher \
             is used (--log-publisher off runs without one)"
        );
    }
    if given.simulator_config.is_some() && !simulator {
        anyhow::bail!("--simulator-config needs --simulator");
    }
    let console = given.console.unwrap_or(simulator);
    if given.console_ports.is_some() && !console {
        anyhow::bail!("--console-ports needs --console");
    }
    if console && !simulator && given.console_ports.is_none() {
        anyhow::bail!(
            "--console needs --console-ports, the ports to show (for example --console-ports \
             1,2,3,4); with --simulator they are its layout's"
        );
    }
    match (&given.tls_cert, &given.tls_key) {
        (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key"),
        (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert"),
        _ => {}
    }
    if given.tls_client_ca.is_some() && given.tls_cert.is_none() {
        anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key");
    }
    Ok(())
}

/// The library's configuration from the effective settings: each setting goes to the subsystem
/// that owns it, and every file is read and checked here.
fn resolve(settings: &ServeSettings) -> anyhow::Result<Config> {
    let upstream = settings.upstream.as_deref().unwrap_or(defaults::UPSTREAM);
    let mut config =
        Config::with_upstream(parse_upstream_url(upstream).context("invalid --upstream")?);
    if let Some(proxy) = &settings.upstream_proxy {
        config.upstream.proxy = Some(parse_upstream_proxy(proxy)?);
    }
    set(&mut config.upstream.timeout, settings.upstream_timeout);
    set(&mut config.upstream.retry_delay, settings.retry_delay);
    set(
        &mut config.upstream.max_response_bytes,
        count(limits::MAX_RESPONSE_BYTES, settings.max_response_bytes)?,
    );
    set(
        &mut config.upstream.max_in_flight,
        count(limits::MAX_IN_FLIGHT, settings.max_in_flight)?,
    );
    set(
        &mut config.upstream.idempotency_window,
        settings.idempotency_window,
    );
    set(
        &mut config.upstream.idempotency_max_entries,
        count(
            limits::IDEMPOTENCY_MAX_ENTRIES,
            settings.idempotency_max_entries,
        )?,
    );
    set(
        &mut config.upstream.format,
        settings.upstream_format.map(Into::into),
    );
    set(&mut config.shutdown_grace, settings.shutdown_grace);
    set(&mut config.health_interval, settings.health_interval);
    set(
        &mut config.max_health_watches,
        count(limits::MAX_HEALTH_WATCHES, settings.max_health_watches)?,
    );
    set(
        &mut config.watches.max_watches,
        count(limits::MAX_WATCHES, settings.max_watches)?,
    );
    set(
        &mut config.watches.buffer,
        count(limits::WATCH_BUFFER, settings.watch_buffer)?,
    );
    if let Some(value) = &settings.log_publisher {
        config.log_publisher = LogPublisherAddress::parse(value)?;
    }
    set(&mut config.access_log, settings.access_log);
    let connections = &mut config.connections;
    set(
        &mut connections.handshake_timeout,
        settings.handshake_timeout,
    );
    set(&mut connections.idle_timeout, settings.idle_timeout);
    connections.max_connections = count(limits::MAX_CONNECTIONS, settings.max_connections)?;
    set(
        &mut connections.max_concurrent_streams,
        count(
            limits::MAX_CONCURRENT_STREAMS,
            settings.max_concurrent_streams,
        )?,
    );
    let metrics = &mut config.metrics_limits;
    set(
        &mut metrics.header_read_timeout,
        settings.metrics_header_read_timeout,
    );
    set(&mut metrics.idle_timeout, settings.metrics_idle_timeout);
    set(
        &mut metrics.body_read_timeout,
        settings.metrics_body_read_timeout,
    );
    let metrics_max_connections = Bounds {
        setting: "--metrics-max-connections",
        ..limits::MAX_CONNECTIONS
    };
    set(
        &mut metrics.max_connections,
        count(metrics_max_connections, settings.metrics_max_connections)?,
    );
    // `check_combinations` has made sure that a key comes with its certificate.
    if let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) {
        config.tls = Some(ServerTls::load(
            cert,
            key,
            settings.tls_client_ca.as_deref(),
        )?);
    }
    config.upstream.tls = UpstreamTls::load(
        settings.upstream_ca.as_deref(),
        settings.upstream_client_cert.as_deref(),
        settings.upstream_client_key.as_deref(),
    )?;
    config.cors_allow_origins = settings
        .cors_allow_origin
        .iter()
        .flatten()
        .map(|origin| parse_cors_origin(origin))
        .collect::<Result<_, _>>()
        .context("invalid --cors-allow-origin")?;
    if let Some(path) = &settings.auth_tokens_file {
        config.auth_tokens = Some(TokenFile::load(path)?);
    }
    Ok(config)
}

/// A count given as a plain number, checked against `bounds`: zero gets the range's message, as
/// any other value out of it does.
fn count<Checked>(bounds: Bounds<Checked>, given: Option<u64>) -> anyhow::Result<Option<Checked>>
where
    Checked: SettingValue + TryFrom<NonZeroU64>,
{
    given
        .map(|count| bounds.check_count(count))
        .transpose()
        .context("invalid configuration")
}

/// Replaces a library default with a value the user gave.
fn set<T>(slot: &mut T, given: Option<T>) {
    if let Some(value) = given {
        *slot = value;
    }
}

/// `command` with `serve`'s defaults shown in the help of each flag that has one, and of the
/// global `--log-format`, from [`ServeSettings::defaults`]: clap's own `default_value` would
/// fill the value in, and a default must not hide the config file's value.
pub(super) fn show_defaults(command: clap::Command) -> clap::Command {
    let Ok(defaults) = ServeSettings::defaults().given() else {
        return command;
    };
    let command = command.mut_subcommand("serve", |serve| show_in_help(serve, &defaults));
    show_in_help(command, &defaults)
}

fn show_in_help(
    mut command: clap::Command,
    defaults: &serde_json::Map<String, serde_json::Value>,
) -> clap::Command {
    for (id, value) in defaults {
        if command
            .get_arguments()
            .any(|arg| arg.get_id() == id.as_str())
        {
            command = command.mut_arg(id, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {}]", shown_value(value)))
            });
        }
    }
    command
}

/// A setting's value as a user writes it on the command line: strings unquoted.
fn shown_value(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
