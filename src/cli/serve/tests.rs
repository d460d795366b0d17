//! `serve`'s settings end to end: what a command line gives, the defaults behind it, and the
//! README's flag table checked against the one declaration.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::FromArgMatches as _;
use taskgate::domain::PORT_ID_RANGE;

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

/// The console is on with the simulator, which gives it its layout's ports; elsewhere it needs
/// its ports, and ports need a console.
#[test]
fn the_console_needs_ports_unless_the_simulator_gives_them() {
    check_combination(&["--simulator"], None);
    check_combination(&["--simulator", "--console=false"], None);
    check_combination(&["--simulator", "--console-ports", "4"], None);
    check_combination(&["--console", "--console-ports", "1,4"], None);
    check_combination(
        &["--console"],
        Some(
            "--console needs --console-ports, the ports to show (for example --console-ports \
             1,2,3,4); with --simulator they are its layout's",
        ),
    );
    check_combination(
        &["--console-ports", "4"],
        Some("--console-ports needs --console"),
    );
    check_combination(
        &["--simulator", "--console=false", "--console-ports", "4"],
        Some("--console-ports needs --console"),
    );
    assert_eq!(
        given(&["--console-ports", "3,1,2000"]).console_ports,
        Some(vec![3, 1, 2000])
    );
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
    meaning: String,
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
                meaning: cells[3].trim_end_matches(" |").to_owned(),
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

/// Every range `serve` checks, by flag, as `--help`, the README and the error messages show its
/// two ends.
fn checked_ranges() -> BTreeMap<String, (String, String)> {
    fn ends<T: SettingValue>(bounds: Bounds<T>) -> (String, String) {
        (bounds.min.show(), bounds.max.show())
    }
    let mut ranges = BTreeMap::new();
    for bounds in [
        limits::UPSTREAM_TIMEOUT,
        limits::RETRY_DELAY,
        limits::SHUTDOWN_GRACE,
        limits::HEALTH_INTERVAL,
        limits::HANDSHAKE_TIMEOUT,
        limits::IDLE_TIMEOUT,
        limits::IDEMPOTENCY_WINDOW,
    ] {
        ranges.insert(bounds.setting.to_owned(), ends(bounds));
    }
    for flag in [
        "--metrics-header-read-timeout",
        "--metrics-idle-timeout",
        "--metrics-body-read-timeout",
    ] {
        ranges.insert(flag.to_owned(), ends(limits::HTTP1_TIMEOUT));
    }
    for bounds in [
        limits::MAX_RESPONSE_BYTES,
        limits::MAX_IN_FLIGHT,
        limits::IDEMPOTENCY_MAX_ENTRIES,
        limits::MAX_CONNECTIONS,
        limits::MAX_HEALTH_WATCHES,
        limits::MAX_WATCHES,
        limits::WATCH_BUFFER,
        limits::WORKER_THREADS,
    ] {
        ranges.insert(bounds.setting.to_owned(), ends(bounds));
    }
    ranges.insert(
        "--metrics-max-connections".to_owned(),
        ends(limits::MAX_CONNECTIONS),
    );
    let streams = limits::MAX_CONCURRENT_STREAMS;
    ranges.insert(streams.setting.to_owned(), ends(streams));
    ranges.insert(
        "--console-ports".to_owned(),
        (
            PORT_ID_RANGE.start().to_string(),
            PORT_ID_RANGE.end().to_string(),
        ),
    );
    ranges
}

/// One end of a range as written in prose (`1d`, `10ms`, `100000`), in the form the error
/// messages give it (`1day`, `10ms`, `100000`).
fn range_end(written: &str) -> String {
    let written = written.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    match written.parse::<u64>() {
        Ok(count) => count.to_string(),
        Err(_) => humantime::parse_duration(written)
            .map(|duration| humantime::format_duration(duration).to_string())
            .unwrap_or_else(|error| panic!("{written:?} is not a range's end: {error}")),
    }
}

/// The ranges in `text` written `A<separator>B`, A and B starting with a digit.
fn written_ranges(text: &str, separator: &str) -> Vec<(String, String)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let starts_with_digit = |word: &str| {
        word.trim_start_matches('(')
            .starts_with(|c: char| c.is_ascii_digit())
    };
    let mut ranges = Vec::new();
    for (index, word) in words.iter().enumerate() {
        if separator == " to " {
            if *word == "to"
                && index > 0
                && index + 1 < words.len()
                && starts_with_digit(words[index - 1])
                && starts_with_digit(words[index + 1])
            {
                ranges.push((range_end(words[index - 1]), range_end(words[index + 1])));
            }
        } else if let Some((low, high)) = word.split_once(separator)
            && starts_with_digit(low)
            && starts_with_digit(high)
        {
            ranges.push((range_end(low), range_end(high)));
        }
    }
    ranges
}

/// The ranges `--help` and the README's flag table give are the ones checked at startup
/// (`config::limits`): each bounded flag states its range once in each, and no other flag
/// states one.
#[test]
fn the_help_and_the_readme_give_the_ranges_that_are_checked() {
    let expected: BTreeMap<String, Vec<(String, String)>> = checked_ranges()
        .into_iter()
        .map(|(flag, range)| (flag, vec![range]))
        .collect();
    let mut command = command();
    command.build();
    let serve = command.find_subcommand("serve").unwrap();
    let mut in_help = BTreeMap::new();
    for arg in serve.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let ranges = written_ranges(&help, " to ");
        if !ranges.is_empty() {
            in_help.insert(format!("--{long}"), ranges);
        }
    }
    assert_eq!(in_help, expected, "serve --help");
    let mut in_readme = BTreeMap::new();
    for row in readme_rows() {
        let ranges = written_ranges(&row.meaning, "–");
        if !ranges.is_empty() {
            for flag in row.flags {
                in_readme.insert(flag, ranges.clone());
            }
        }
    }
    assert_eq!(in_readme, expected, "README.md's serve flag table");
}
