//! The deployment files in `deploy/` agree with the binary: the example config and the
//! Kubernetes ConfigMap's start it, and the systemd unit and the Deployment wait out its
//! shutdown grace (issue 25). `scripts/deploy-check` runs the
//! real tools on them (systemd-analyze, hadolint, kubernetes-validate).

use std::time::Duration;

use taskgate::config::defaults;
use taskgate::proto::LIVENESS_SERVICE;

use crate::cli::run;
use crate::tls::Pki;

const UNIT: &str = include_str!("../../deploy/systemd/taskgate.service");
const EXAMPLE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/taskgate.toml");
const CONFIG_MAP: &str = include_str!("../../deploy/kubernetes/configmap.yaml");
const DEPLOYMENT: &str = include_str!("../../deploy/kubernetes/deployment.yaml");
const SECRET: &str = include_str!("../../deploy/kubernetes/secret.yaml");
const CONTAINERFILE: &str = include_str!("../../Containerfile");
/// Where the Deployment mounts the Secret, which the ConfigMap's paths name.
const SECRET_FOLDER: &str = "/etc/taskgate/secret/";

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
    let example_grace = shutdown_grace(&std::fs::read_to_string(EXAMPLE_CONFIG).unwrap());
    assert!(stop_timeout > defaults::SHUTDOWN_GRACE.max(example_grace));
}

/// The ConfigMap's `taskgate.toml`, as the pod reads it.
fn config_map_toml() -> String {
    let mut lines = CONFIG_MAP
        .lines()
        .skip_while(|line| *line != "  taskgate.toml: |")
        .skip(1);
    let mut toml = String::new();
    for line in lines.by_ref() {
        let Some(line) = line
            .strip_prefix("    ")
            .or((line.is_empty()).then_some(""))
        else {
            break;
        };
        toml.push_str(line);
        toml.push('\n');
    }
    assert!(!toml.is_empty(), "no taskgate.toml in the ConfigMap");
    toml
}

/// The ConfigMap's config starts the gateway once the Secret's files are where it says (here,
/// in a test folder rather than the mount): the files it names are the Secret's keys.
#[tokio::test]
async fn the_config_maps_config_is_accepted_with_the_secrets_files() {
    let toml = config_map_toml();
    let pki = Pki::new("deploy");
    let folder = pki.path("");
    for key in ["tokens", "controller-ca.pem"] {
        assert!(
            toml.contains(&format!("\"{SECRET_FOLDER}{key}\"")),
            "{key}:\n{toml}"
        );
        assert!(
            SECRET.contains(&format!("\n  {key}: |\n")),
            "the Secret has no {key}"
        );
    }
    std::fs::write(folder.join("tokens"), "a-token\n").unwrap();
    std::fs::copy(pki.path("ca.pem"), folder.join("controller-ca.pem")).unwrap();
    let config = folder.join("taskgate.toml");
    std::fs::write(
        &config,
        toml.replace(SECRET_FOLDER, folder.to_str().unwrap()),
    )
    .unwrap();
    let args = [
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--print-config",
    ];
    let (stdout, _) = run(&args, 0).await;
    assert!(stdout.contains("listen = \"0.0.0.0:50051\"\n"), "{stdout}");
    assert!(
        stdout.contains("metrics_listen = \"0.0.0.0:9464\"\n"),
        "{stdout}"
    );
}

/// The Secret's token file as shipped is refused: applied without replacing its placeholder,
/// the gateway stops at startup (exit 2) rather than accept a token everyone can read here.
#[tokio::test]
async fn the_secrets_placeholder_token_is_refused() {
    let (_, after) = SECRET.split_once("\n  tokens: |\n").unwrap();
    let tokens: String = after
        .lines()
        .take_while(|line| line.starts_with("    "))
        .map(|line| format!("{}\n", &line[4..]))
        .collect();
    let file = crate::support::TestFile::new("deploy-secret", "tokens", &tokens);
    let args = [
        "serve",
        "--auth-tokens-file",
        file.to_str().unwrap(),
        "--print-config",
    ];
    let (_, stderr) = run(&args, 2).await;
    assert!(
        stderr.contains("line 2: a token must be printable ASCII without spaces"),
        "{stderr}"
    );
}

/// The Deployment reads the ConfigMap where it mounts it, mounts the Secret where the config
/// looks, and lets the kubelet's SIGKILL come only after its preStop pause and the config's
/// shutdown grace.
#[test]
fn the_deployment_mounts_what_the_config_names_and_waits_out_its_grace() {
    assert!(
        DEPLOYMENT
            .contains("args: [\"serve\", \"--config\", \"/etc/taskgate/config/taskgate.toml\"]")
    );
    assert!(DEPLOYMENT.contains("mountPath: /etc/taskgate/config\n"));
    assert!(DEPLOYMENT.contains(&format!(
        "mountPath: {}\n",
        SECRET_FOLDER.trim_end_matches('/')
    )));
    let termination_grace = DEPLOYMENT
        .lines()
        .find_map(|line| line.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .unwrap()
        .parse::<u64>()
        .unwrap();
    // SIGTERM comes only after the preStop pause, within the same termination grace.
    let pause = yaml_block(DEPLOYMENT, "preStop:")
        .iter()
        .find_map(|line| line.trim().strip_prefix("seconds: "))
        .expect("the Deployment's preStop sleeps")
        .parse::<u64>()
        .unwrap();
    let grace = shutdown_grace(&config_map_toml());
    assert!(
        Duration::from_secs(termination_grace)
            > Duration::from_secs(pause) + grace.max(defaults::SHUTDOWN_GRACE)
    );
}

/// The image's HEALTHCHECK and the Deployment's liveness probe ask for the health name that
/// does not follow the controller, so that no controller outage restarts the gateway.
#[test]
fn what_restarts_the_gateway_asks_for_liveness() {
    let healthcheck = CONTAINERFILE
        .split_once("HEALTHCHECK ")
        .expect("the Containerfile has a HEALTHCHECK")
        .1;
    assert!(
        healthcheck.contains(&format!(
            "\"health\", \"--service\", \"{LIVENESS_SERVICE}\""
        )),
        "{healthcheck}"
    );
    assert!(
        yaml_block(DEPLOYMENT, "livenessProbe:")
            .contains(&format!("service: {LIVENESS_SERVICE}").as_str()),
        "{DEPLOYMENT}"
    );
}

/// The lines nested under the one YAML line that is `key` (trimmed), their indentation kept.
fn yaml_block<'a>(yaml: &'a str, key: &str) -> Vec<&'a str> {
    let mut lines = yaml.lines().skip_while(|line| line.trim() != key);
    let head = lines.next().unwrap_or_else(|| panic!("no {key} in {yaml}"));
    let indent = |line: &str| line.len() - line.trim_start().len();
    lines
        .take_while(|line| indent(line) > indent(head))
        .map(str::trim)
        .collect()
}

/// The `shutdown_grace` a config file's text sets.
fn shutdown_grace(toml: &str) -> Duration {
    toml.lines()
        .find_map(|line| line.strip_prefix("shutdown_grace = "))
        .unwrap()
        .trim_matches('"')
        .parse::<humantime::Duration>()
        .unwrap()
        .into()
}
