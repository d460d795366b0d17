//! The deployment files in `deploy/` agree with the binary: the example config starts it, and
//! the systemd unit waits out its shutdown grace (issue 25). `scripts/deploy-check` runs the
//! real tools on them (systemd-analyze, hadolint, kubernetes-validate).

use std::time::Duration;

use taskgate::config::defaults;

use crate::cli::run;

const UNIT: &str = include_str!("../../deploy/systemd/taskgate.service");
const EXAMPLE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/taskgate.toml");

/// The value of `key=` in the unit, which must be set once.
fn unit_setting(key: &str) -> &'static str {
    let prefix = format!("{key}=");
    let mut values = UNIT.lines().filter_map(|line| line.strip_prefix(&prefix));
    let value = values
        .next()
        .unwrap_or_else(|| panic!("the unit sets no {key}"));
    assert_eq!(values.next(), None, "the unit sets {key} twice");
    value
}

/// `--print-config` reads and checks the whole file (every value, every file it names) and
/// prints only a configuration that starts.
#[tokio::test]
async fn the_example_config_is_accepted_as_written() {
    let (stdout, stderr) = run(&["serve", "--config", EXAMPLE_CONFIG, "--print-config"], 0).await;
    assert_eq!(stderr, "");
    for line in [
        "listen = \"0.0.0.0:50051\"",
        "upstream = \"http://autostore-controller:44000/api/v2/task\"",
        "metrics_listen = \"0.0.0.0:9464\"",
        "shutdown_grace = \"10s\"",
        "log_format = \"json\"",
    ] {
        assert!(
            stdout.lines().any(|printed| printed == line),
            "{line}:\n{stdout}"
        );
    }
}

/// systemd sends SIGKILL when `TimeoutStopSec` runs out: it must be longer than the grace the
/// gateway gives calls in flight after SIGTERM, by default and in the example config the unit
/// reads.
#[test]
fn the_unit_waits_out_the_shutdown_grace_of_the_config_it_reads() {
    assert_eq!(
        unit_setting("ExecStart"),
        "/usr/local/bin/taskgate serve --config /etc/taskgate/taskgate.toml"
    );
    assert_eq!(unit_setting("KillSignal"), "SIGTERM");
    let stop_timeout: Duration = unit_setting("TimeoutStopSec")
        .parse::<humantime::Duration>()
        .unwrap()
        .into();
    let example = std::fs::read_to_string(EXAMPLE_CONFIG).unwrap();
    let example_grace: Duration = example
        .lines()
        .find_map(|line| line.strip_prefix("shutdown_grace = "))
        .unwrap()
        .trim_matches('"')
        .parse::<humantime::Duration>()
        .unwrap()
        .into();
    assert!(stop_timeout > defaults::SHUTDOWN_GRACE.max(example_grace));
}
