//! The README's command-line examples, run as written against the real binary (issue 20, item
//! 10: "the README examples run in CI where they can").
//!
//! Every `$ cargo run --release -- ARGS` line of a `sh` block runs as `taskgate ARGS` against a
//! `serve --simulator` on an ephemeral port, which `TASKGATE_GATEWAY` and
//! `TASKGATE_BENCH_GATEWAY` point the command at, so the arguments are the README's own. What
//! it prints must be the lines under it, but for what differs on every run: request ids, the
//! time an event was received, and `bench`'s measured figures (its labels, targets and settings
//! are compared).
//!
//! Not run here, and why: the first block's `serve --simulator` and `scripts/test` (this test
//! starts the former itself; the latter runs this test); the `grpcurl` lines (grpcurl is not a
//! dependency; reflection and health are tested through their clients in `health`); `bench
//! --calls 20000 … --json` (a load test; its schema is pinned in `bench`); the config file and
//! layout examples (the first names files that only a deployment has); `scripts/chaos`,
//! `scripts/soak` and `scripts/fuzz` (minutes each, and nightly for fuzzing).

use std::process::Stdio;

use tokio::process::Command;

use crate::cli::{BIN, TaskgateProcess};
use crate::support::{TestFile, within};

/// `taskgate` without the `TASKGATE_*` variables of the environment running the tests: a
/// developer's `TASKGATE_TOKEN` or `TASKGATE_PORT` would change what the README's commands do.
fn taskgate() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TASKGATE_") {
            command.env_remove(name);
        }
    }
    command
}

/// `serve --simulator` on an ephemeral port with `extra_args`, started as [`taskgate`] is.
async fn serve(extra_args: &[&str]) -> TaskgateProcess {
    let args = [
        &["serve", "--simulator", "--listen", "127.0.0.1:0"],
        extra_args,
    ]
    .concat();
    TaskgateProcess::start_serving(TaskgateProcess::spawn_command(taskgate().args(args))).await
}

/// How README commands start.
const PROMPT: &str = "$ cargo run --release -- ";

/// The gateway address the README's commands use by default.
const README_GATEWAY: &str = "http://127.0.0.1:50051";

/// The longest one example may take: `bench --duration 5s` is the slowest.
const EXAMPLE_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// One `$ …` line of the README and the lines printed under it.
#[derive(Debug)]
struct Example {
    args: Vec<String>,
    expected: Vec<String>,
}

/// Every `$ cargo run --release -- …` example in the README's `sh` blocks, in order.
fn examples(readme: &str) -> Vec<Example> {
    let mut examples: Vec<Example> = Vec::new();
    let mut in_sh_block = false;
    // The example whose output the next lines are, until the next command or the block's end.
    let mut current: Option<usize> = None;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh_block = !in_sh_block && line == "```sh";
            current = None;
            continue;
        }
        if !in_sh_block {
            continue;
        }
        if let Some(command) = line.strip_prefix(PROMPT) {
            let command = command.split(" #").next().unwrap_or(command);
            examples.push(Example {
                args: command.split_whitespace().map(str::to_owned).collect(),
                expected: Vec::new(),
            });
            current = Some(examples.len() - 1);
        } else if line.starts_with("$ ") {
            current = None;
        } else if let Some(index) = current {
            examples[index].expected.push(line.to_owned());
        }
    }
    for example in &mut examples {
        while example.expected.last().is_some_and(String::is_empty) {
            example.expected.pop();
        }
    }
    examples
}

/// `lines` with what differs on every run replaced by a placeholder.
fn comparable(lines: &[String], gateway: &str) -> Vec<String> {
    lines
        .iter()
        .map(|line| {
            let line = line.replace(gateway, README_GATEWAY);
            if line.starts_with("  request id: ") {
                return "  request id: <id>".to_owned();
            }
            if line.starts_with(|first: char| first.is_ascii_digit())
                && let Some((_, event)) = line.split_once(' ')
            {
                return format!("<time> {event}");
            }
            for label in ["calls:", "latency:", "status:"] {
                if line.starts_with(label) {
                    return format!("{label} <measured>");
                }
            }
            line
        })
        .collect()
}

/// The exit code the README's output implies.
fn expected_exit(example: &Example) -> i32 {
    match example.expected.last().map(String::as_str) {
        _ if example.args[0] == "bench" => 0,
        Some(last) if last.starts_with("  follow it: ") => 3,
        _ => match example.expected.first().map(String::as_str) {
            Some(first) if first.starts_with("failed: ") => 1,
            _ => 0,
        },
    }
}

/// A layout of port 4 whose case steps last `step_time`.
fn layout(name: &str, step_time: &str) -> TestFile {
    TestFile::new(
        name,
        "layout.toml",
        &format!(
            "step_time = \"{step_time}\"\n[[port]]\nid = 4\nautocase = true\nmode = \"OPEN\"\n\
             selected_bin = 101337\n"
        ),
    )
}

#[tokio::test]
async fn the_readme_command_line_examples_print_what_it_shows() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let examples = examples(&readme);
    let commands: Vec<String> = examples
        .iter()
        .map(|example| example.args.join(" "))
        .collect();
    // A new example is run once it is listed here, and one that went is noticed.
    assert_eq!(
        commands,
        [
            "case-extract --port 4 --bin 101337",
            "case-extract --port 4 --bin 101337",
            "case-state --port 4",
            "case-cancel --port 4 --bin 101337",
            "case-state --port 4",
            "case-extract --port 4 --bin 101337 --wait",
            "case-extract --port 4 --bin 101337 --wait --wait-timeout 1s",
            "bench --duration 5s",
            "bench --calls 20000 --connections 2 --concurrency 64 --json",
        ]
    );
    // The calls follow one case, whose steps outlast the examples; `--wait` follows one to its
    // end, and `bench` needs a gateway of its own.
    let slow_layout = layout("readme-slow", "1h");
    let quick_layout = layout("readme-quick", "50ms");
    let slow = serve(&["--simulator-config", slow_layout.to_str().unwrap()]).await;
    let quick = serve(&["--simulator-config", quick_layout.to_str().unwrap()]).await;
    let bench = serve(&[]).await;
    for example in examples
        .iter()
        .filter(|example| !example.args.contains(&"--json".to_owned()))
    {
        let gateway = match example.args.as_slice() {
            [command, ..] if command == "bench" => &bench.gateway,
            args if args.iter().any(|arg| arg == "--wait")
                && !args.iter().any(|arg| arg == "--wait-timeout") =>
            {
                &quick.gateway
            }
            _ => &slow.gateway,
        };
        let output = taskgate()
            .args(&example.args)
            .env("TASKGATE_GATEWAY", gateway)
            .env("TASKGATE_BENCH_GATEWAY", gateway)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output();
        let output = within(EXAMPLE_WAIT, "a README example did not finish", output)
            .await
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        let printed: Vec<String> = stdout.lines().map(str::to_owned).collect();
        assert_eq!(
            (output.status.code(), comparable(&printed, gateway)),
            (
                Some(expected_exit(example)),
                comparable(&example.expected, README_GATEWAY)
            ),
            "taskgate {}\nstderr:\n{}",
            example.args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for process in [slow, quick, bench] {
        process.signal("TERM").await;
        let (code, log) = process.finish().await;
        assert_eq!(code, Some(0), "{log}");
    }
}
