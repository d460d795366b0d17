//! `serve`'s settings end to end: what a command line gives, the defaults behind it, and the
//! README's flag table checked against the one declaration.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::FromArgMatches as _;

use super::*;
use crate::cli::{Cli, Command, command};

/// Parses `serve` arguments (no file, no environment) into what was given.
fn given(args: &[&str]) -> ServeSettings {
    let matches = command()
        .try_get_matches_from(["taskgate", "serve"].iter().chain(args))
        .unwrap();
    let Command::Serve(serve_args) = Cli::from_arg_matches(&matches).unwrap().command else {
        panic!("not serve");
    };
    serve_args.settings
}

fn check_combination(args: &[&str], expected_error: Option<&str>) {
    let outcome = check_combinations(&given(args)).map_err(|error| error.to_string());
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

#[test]
fn nothing_given_is_nothing_set_and_the_defaults_are_the_librarys() {
    assert_eq!(given(&[]), ServeSettings::default());
    let effective = given(&[]).or(&ServeSettings::defaults()).unwrap();
    let config = resolve(&effective).unwrap();
    let library = Config::with_upstream(parse_upstream_url(defaults::UPSTREAM).unwrap());
    assert_eq!(format!("{config:?}"), format!("{library:?}"));
}

#[test]
fn a_flag_is_a_value_and_simulator_is_a_switch() {
    let settings = given(&["--upstream-timeout", "1m 30s", "--simulator"]);
    assert_eq!(settings.upstream_timeout, Some(Duration::from_secs(90)));
    assert_eq!(settings.simulator, Some(true));
    assert_eq!(
        given(&["--cors-allow-origin", "https://a.example,https://b.example"]).cors_allow_origin,
        Some(vec![
            "https://a.example".to_owned(),
            "https://b.example".to_owned()
        ])
    );
}

/// One row of the README's `serve` table: flags, environment variables and the default, if the
/// row gives one in backticks (`off` or `from nofile` mean none).
#[derive(Debug, PartialEq)]
struct Row {
    flags: Vec<String>,
    env: Vec<String>,
    default: Option<String>,
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(ToOwned::to_owned)
        .collect()
}

fn readme_rows() -> Vec<Row> {
    let readme = include_str!("../../../README.md");
    let table = readme
        .split("| Flag (`serve`) | Environment | Default | Meaning |")
        .nth(1)
        .expect("the README has no serve flag table");
    table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let default = cells[2].trim();
            Row {
                flags: backticked(cells[0]),
                env: backticked(cells[1]),
                default: (default.starts_with('`') && default.ends_with('`'))
                    .then(|| default.trim_matches('`').to_owned()),
            }
        })
        .collect()
}

/// The README's flag table is checked against the one declaration: every setting of `serve` is
/// a row, with its environment variable and its default as `--help` and `--print-config` show
/// them, and every row is a setting.
#[test]
fn the_readme_flag_table_matches_the_settings() {
    let mut command = command();
    command.build();
    let serve = command.find_subcommand("serve").unwrap();
    let defaults = ServeSettings::defaults().given().unwrap();
    let mut actual = BTreeMap::new();
    for arg in serve.get_arguments() {
        let id = arg.get_id().as_str();
        if ["config", "print_config", "help", "version"].contains(&id) {
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap());
        let env = arg.get_env().map(|env| env.to_string_lossy().into_owned());
        // A switch that is off by default is documented as "off", like a setting with none.
        let default = defaults
            .get(id)
            .filter(|value| value.as_bool() != Some(false))
            .map(shown_value);
        actual.insert(flag, (env, default));
    }
    let mut documented = BTreeMap::new();
    for row in readme_rows() {
        assert_eq!(row.flags.len(), row.env.len(), "{row:?}");
        for (flag, env) in row.flags.iter().zip(&row.env) {
            documented.insert(flag.clone(), (Some(env.clone()), row.default.clone()));
        }
    }
    assert_eq!(documented, actual);
}
