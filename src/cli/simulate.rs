//! `taskgate simulate`: the simulated controller alone, speaking the task interface over HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;

use taskgate::config::{Bounds, ConfigError, Http1Flags, Http1Limits, defaults, limits};
use taskgate::nofile;
use taskgate::shutdown::Hangups;
use taskgate::simulator::{self, Simulator, layout::Layout};

use super::{Exit, Outcome, bind, usage};

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
pub(super) struct SimulateArgs {
    /// The address to serve the task interface on (path /api/v2/task).
    #[arg(long, env = "TASKGATE_SIMULATOR_LISTEN", default_value_t = defaults::SIMULATOR_LISTEN)]
    listen: SocketAddr,

    /// Also publish case events as a Log Publisher on this address, for example 127.0.0.1:44001
    /// (a controller's port, where `serve` looks by default): an `AC` segment per state
    /// change, and a `BD` segment before each extraction. Off unless given.
    #[arg(long, env = "TASKGATE_SIMULATOR_LOG_PUBLISHER_LISTEN")]
    log_publisher_listen: Option<SocketAddr>,

    /// A TOML port layout; default: the built-in layout.
    #[arg(long, env = "TASKGATE_SIMULATOR_CONFIG")]
    config: Option<PathBuf>,

    /// How long a request head may take, from accept or from its first byte.
    #[arg(long, env = "TASKGATE_SIMULATOR_HEADER_READ_TIMEOUT", default_value_t = defaults::HEADER_READ_TIMEOUT.into())]
    header_read_timeout: humantime::Duration,

    /// How long a kept-alive connection may wait for its next request.
    #[arg(long, env = "TASKGATE_SIMULATOR_IDLE_TIMEOUT", default_value_t = defaults::HTTP1_IDLE_TIMEOUT.into())]
    idle_timeout: humantime::Duration,

    /// How long a request body may take once its head has arrived.
    #[arg(long, env = "TASKGATE_SIMULATOR_BODY_READ_TIMEOUT", default_value_t = defaults::BODY_READ_TIMEOUT.into())]
    body_read_timeout: humantime::Duration,

    /// How many connections may be open at once; more are closed as soon as they are accepted
    /// (and logged). 1 to 1000000.
    #[arg(long, env = "TASKGATE_SIMULATOR_MAX_CONNECTIONS", default_value_t = defaults::SIMULATOR_MAX_CONNECTIONS.get() as u64)]
    max_connections: u64,
}

// === impl SimulateArgs ===

impl SimulateArgs {
    /// The simulator's listener limits, from their four flags, checked.
    fn limits(&self) -> Result<Http1Limits, ConfigError> {
        let max_connections = Bounds {
            setting: "--max-connections",
            ..limits::MAX_CONNECTIONS
        }
        .check_count(self.max_connections)?;
        let limits = Http1Limits {
            header_read_timeout: self.header_read_timeout.into(),
            idle_timeout: self.idle_timeout.into(),
            body_read_timeout: self.body_read_timeout.into(),
            max_connections,
        };
        limits.validate(Http1Flags::SIMULATE)?;
        Ok(limits)
    }
}

pub(super) async fn simulate(args: SimulateArgs) -> Outcome {
    // Before any port is bound, so that a signal sent as soon as one accepts never ends the
    // process without its drain, and a SIGHUP never ends it at all.
    let stop = taskgate::shutdown::signal();
    tokio::spawn(
        Hangups::catch()
            .handle(|| tracing::info!("received SIGHUP; the simulator has nothing to reload")),
    );
    let layout = load_layout(args.config.as_deref()).map_err(usage)?;
    let limits = args
        .limits()
        .context("invalid configuration")
        .map_err(usage)?;
    nofile::log_raise(nofile::raise_soft_limit());
    let listener = bind("--listen", args.listen).await.map_err(usage)?;
    let address = listener.local_addr().unwrap_or(args.listen);
    let simulator = Simulator::new(&layout);
    if let Some(listen) = args.log_publisher_listen {
        let log_publisher = bind("--log-publisher-listen", listen)
            .await
            .map_err(usage)?;
        let address = log_publisher.local_addr().unwrap_or(listen);
        tracing::info!(%address, "simulated Log Publisher listening");
        // It stops with the process, after the task interface below.
        tokio::spawn(simulator::log_publisher::serve(
            log_publisher,
            simulator.clone(),
            std::future::pending(),
        ));
    }
    tracing::info!(
        url = %format!("http://{address}{}", simulator::http::TASK_PATH),
        ports = layout.ports.len(),
        step_time = %humantime::format_duration(layout.step_time),
        "simulated controller listening"
    );
    simulator::http::serve(listener, simulator, limits, stop).await;
    Ok(Exit::Success)
}

/// The layout in `path`, or the built-in one; `serve --simulator` reads its layout here too.
pub(super) fn load_layout(path: Option<&Path>) -> anyhow::Result<Layout> {
    let Some(path) = path else {
        return Ok(Layout::default_layout());
    };
    let text = taskgate::regular_file::read_to_string(path)
        .with_context(|| format!("cannot read layout file {}", path.display()))?;
    Layout::from_toml(&text).with_context(|| format!("invalid layout file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn the_defaults_are_the_documented_limits() {
        let Cli {
            command: Command::Simulate(args),
            ..
        } = Cli::try_parse_from(["taskgate", "simulate"]).unwrap()
        else {
            panic!("not simulate");
        };
        assert_eq!(
            args.limits().unwrap(),
            Http1Limits::with_max_connections(defaults::SIMULATOR_MAX_CONNECTIONS)
        );
        assert_eq!(args.listen, defaults::SIMULATOR_LISTEN);
    }
}
