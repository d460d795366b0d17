//! The real `taskgate` binary: output and exit codes.

use std::process::{Output, Stdio};
use std::time::Duration;

use taskgate::proto::CaseExtractRequest;
use taskgate::proto::task_service_client::TaskServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{Gateway, PROMPTLY, TestFile, unused_address, within};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_taskgate");

async fn taskgate(args: &[&str]) -> Output {
    let output = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output();
    within(PROCESS_WAIT, "taskgate did not exit", output)
        .await
        .unwrap()
}

/// Asserts the exit code, printing the command's output when it differs.
pub(crate) fn assert_exit(output: &Output, args: &[&str], expected: i32) {
    assert_eq!(
        output.status.code(),
        Some(expected),
        "taskgate {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `taskgate ARGS…`, asserts its exit code and returns its stdout and stderr.
pub(crate) async fn run(args: &[&str], expected_exit: i32) -> (String, String) {
    let output = taskgate(args).await;
    assert_exit(&output, args, expected_exit);
    (
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn case_extract_prints_success_then_the_1148_fault() {
    let gateway = Gateway::builder().start().await;
    let address = format!("http://{}", gateway.address);
    let args = |request_id| {
        [
            "case-extract",
            "--gateway",
            &address,
            "--port",
            "4",
            "--bin",
            "101337",
            "--request-id",
            request_id,
        ]
    };
    let (stdout, _) = run(&args("cli-1"), 0).await;
    assert_eq!(
        stdout,
        "ok: case_extract port 4 bin 101337: the controller accepted the case extraction\n\
         \x20 request id: cli-1\n"
    );
    let (stdout, _) = run(&args("cli-2"), 1).await;
    assert_eq!(
        stdout,
        "failed: case_extract port 4 bin 101337: UNAVAILABLE\n\
         \x20 fault:   1148 PREVIOUS_ACTION_NOT_COMPLETED\n\
         \x20 meaning: New action cannot be started until the previous action has been completed.\n\
         \x20 retry:   safe after 1s\n\
         \x20 message: case_extract port 4 bin 101337: controller fault 1148 \
         PREVIOUS_ACTION_NOT_COMPLETED: New action cannot be started until the previous action \
         has been completed\n\
         \x20 request id: cli-2\n"
    );
}

/// A port or bin the gateway would refuse is a usage error, found before connecting: the same
/// whether or not a gateway is there.
#[tokio::test]
async fn a_port_or_bin_out_of_range_is_a_usage_error_before_connecting() {
    let address = format!("http://{}", unused_address().await);
    for (port, bin, flag, value, range) in [
        ("0", "1", "--port <PORT>", "0", "1 to 2000"),
        ("x", "1", "--port <PORT>", "x", "1 to 2000"),
        (
            "50051",
            "1",
            "--port <PORT>",
            "50051",
            "1 to 2000; --port is an AutoStore port's id, and the gateway's address goes in \
             --gateway",
        ),
        ("4", "0", "--bin <BIN>", "0", "1 to 4000000"),
        ("4", "4000001", "--bin <BIN>", "4000001", "1 to 4000000"),
        ("4", "x", "--bin <BIN>", "x", "1 to 4000000"),
    ] {
        let (stdout, stderr) = case_extract(&address, port, bin, 2).await;
        assert_eq!(stdout, "");
        assert_eq!(
            stderr.lines().next(),
            Some(
                format!(
                    "error: invalid value '{value}' for '{flag}': it must be a whole number from \
                     {range}"
                )
                .as_str()
            ),
            "{stderr}"
        );
    }
    let args = ["case-state", "--gateway", &address, "--port", "2001"];
    let (_, stderr) = run(&args, 2).await;
    assert!(
        stderr.starts_with("error: invalid value '2001' for '--port <PORT>'"),
        "{stderr}"
    );
    let args = ["watch", "--gateway", &address, "--port", "4,2001"];
    let (_, stderr) = run(&args, 2).await;
    assert!(
        stderr.starts_with("error: invalid value '2001' for '--port <PORTS>'"),
        "{stderr}"
    );
}

#[tokio::test]
async fn case_extract_without_a_gateway_fails_with_exit_1() {
    let address = format!("http://{}", unused_address().await);
    let (_, stderr) = case_extract(&address, "4", "1", 1).await;
    assert!(stderr.contains("cannot connect to the gateway"), "{stderr}");
}

/// A `RUST_LOG` that is not a filter is replaced by the default level, and the log says so
/// first, rather than leave an operator wondering why their filter does nothing.
#[tokio::test]
async fn an_invalid_rust_log_is_named_before_the_default_is_used() {
    use std::os::unix::ffi::OsStrExt as _;

    let address = format!("http://{}", unused_address().await);
    let args = ["case-state", "--gateway", &address, "--port", "4"];
    let not_utf8 = std::ffi::OsStr::from_bytes(b"info,\xff");
    for (value, named) in [
        (
            std::ffi::OsStr::new("info,["),
            "RUST_LOG=\"info,[\" is not a valid filter (invalid filter directive)",
        ),
        (not_utf8, "RUST_LOG=\"info,\\xFF\" is not UTF-8"),
    ] {
        let output = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", value)
            .stdin(Stdio::null())
            .output();
        let output = within(PROCESS_WAIT, "taskgate did not exit", output)
            .await
            .unwrap();
        assert_exit(&output, &args, 1);
        let stderr = String::from_utf8(output.stderr).unwrap();
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.ends_with(&format!(
                "WARN taskgate::log: {named}; logging with the default \"warn\" instead"
            )),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn usage_and_configuration_errors_exit_2() {
    let (_, stderr) = run(&["serve", "--upstream", "ftp://controller/x"], 2).await;
    assert!(stderr.contains("invalid --upstream: upstream URL 'ftp://controller/x' must start with http:// or https://"), "{stderr}");
    let (_, stderr) = run(&["serve", "--upstream-timeout", "soon"], 2).await;
    assert_eq!(
        stderr,
        "error: invalid value 'soon' for '--upstream-timeout <UPSTREAM_TIMEOUT>': expected number \
         at 0\n\nFor more information, try '--help'.\n"
    );
    let (_, stderr) = run(&["serve", "--upstream-timeout", "0s"], 2).await;
    assert!(
        stderr.contains("--upstream-timeout 0s is out of range 10ms-1h"),
        "{stderr}"
    );
    let (_, stderr) = run(&["serve", "--worker-threads", "2000"], 2).await;
    assert!(
        stderr.ends_with(
            "invalid configuration: --worker-threads 2000 is out of range 1-1024: threads beyond \
             the machine's cores only take turns on them\n"
        ),
        "{stderr}"
    );
    let (_, stderr) = run(&["simulate", "--config", "/nonexistent/layout.toml"], 2).await;
    assert!(
        stderr.contains("cannot read layout file /nonexistent/layout.toml"),
        "{stderr}"
    );
    run(&["case-extract", "--port", "4"], 2).await;
    // An x-request-id the gateway would replace with its own, so that the logs would not carry
    // the one asked for, is refused before connecting (no gateway listens here).
    for request_id in ["has space", &"x".repeat(129)] {
        let args = [
            "case-state",
            "--gateway",
            "http://127.0.0.1:1",
            "--port",
            "4",
            "--request-id",
            request_id,
        ];
        let (_, stderr) = run(&args, 2).await;
        assert_eq!(
            stderr,
            format!(
                "error: invalid value '{request_id}' for '--request-id <REQUEST_ID>': it must be \
                 1-128 visible ASCII characters (no spaces), the only IDs the gateway keeps for \
                 its logs\n\nFor more information, try '--help'.\n"
            )
        );
    }
    run(&["case-cancel", "--port", "4"], 2).await;
    run(&["case-state"], 2).await;
    run(&["no-such-command"], 2).await;
}

/// `serve` runs calls on `--worker-threads` threads of tokio's runtime, one per core unless told
/// otherwise, named so that an operator can tell them in `top -H`, and says how many it has.
#[tokio::test]
async fn serve_runs_on_its_worker_threads() {
    let cores = std::thread::available_parallelism().unwrap().get();
    for (args, expected) in [
        (&[][..], cores),
        (&["--worker-threads", "1"][..], 1),
        (&["--worker-threads", "3"][..], 3),
    ] {
        let serve = TaskgateProcess::start(args).await;
        let pid = serve.child.id().unwrap();
        let thread_names = || -> Vec<String> {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .map(|task| {
                    let comm = task.unwrap().path().join("comm");
                    std::fs::read_to_string(comm)
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                })
                .collect()
        };
        let named = |threads: &[String], name: &str| {
            threads.iter().filter(|thread| *thread == name).count()
        };
        // Each of tokio's threads names itself once it runs, which may be after the runtime was
        // built and the gateway logged that it listens; no event says when, so /proc is read
        // again until they have (tokio's blocking threads take the same name, so there may be
        // more than the workers).
        let named_in_time = async {
            loop {
                let threads = thread_names();
                if named(&threads, "taskgate-worker") >= expected {
                    return threads;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let what = format!("{args:?}: fewer than {expected} threads named taskgate-worker");
        let threads = within(PROMPTLY, &what, named_in_time).await;
        assert_eq!(
            named(&threads, "tokio-rt-worker"),
            0,
            "{args:?}: {threads:?}"
        );
        assert!(
            serve.log.contains(&format!("worker_threads={expected}")),
            "{}",
            serve.log
        );
        serve.signal("TERM").await;
        let (code, rest) = serve.finish().await;
        assert_eq!(code, Some(0), "{rest}");
    }
}

/// Issue 9, item 5: each cause is printed once, and exactly (ripgrep's style): a missing file, a
/// bad value in the config file, a bad layout and a port in use each give one line of context
/// and the cause, nothing twice.
#[tokio::test]
async fn errors_print_each_cause_once() {
    let (_, stderr) = run(
        &[
            "serve",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ],
        2,
    )
    .await;
    assert_eq!(
        stderr,
        "error: cannot read --tls-cert /nonexistent/cert.pem: No such file or directory (os \
         error 2)\n"
    );

    let config = config_file("bad-type", "\nmax_in_flight = \"many\"\n");
    let config = config.to_str().unwrap();
    let (_, stderr) = run(&["serve", "--config", config], 2).await;
    let expected = toml_error(
        &format!("invalid config file {config}"),
        (2, 17),
        "max_in_flight = \"many\"",
        "invalid type: string \"many\", expected u64",
    );
    assert_eq!(stderr, expected);

    let layout = config_file("bad-layout", "step_time = \"soon\"\n");
    let layout = layout.to_str().unwrap();
    let (_, stderr) = run(
        &["simulate", "--listen", "127.0.0.1:0", "--config", layout],
        2,
    )
    .await;
    let expected = toml_error(
        &format!("invalid layout file {layout}"),
        (1, 13),
        "step_time = \"soon\"",
        "invalid value: string \"soon\", expected a duration",
    );
    assert_eq!(stderr, expected);

    // The port stays taken while the gateway tries it.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let (_, stderr) = run(&["serve", "--listen", &address], 2).await;
    assert_eq!(
        without_nofile_raise(&stderr),
        format!(
            "error: cannot listen on {address} (--listen): Address already in use (os error 98)\n"
        )
    );
    // The flag is named: the address may be held by the gateway's own other listener.
    let args = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &address,
    ];
    let (_, stderr) = run(&args, 2).await;
    assert_eq!(
        without_nofile_raise(&stderr),
        format!(
            "error: cannot listen on {address} (--metrics-listen): Address already in use (os \
             error 98)\n"
        )
    );
}

/// `serve`'s stderr without its line saying it raised the soft open-file limit: that line is
/// there only where the soft limit starts below the hard one, as in many login shells (1024
/// under a far higher hard limit), and says nothing about the error.
fn without_nofile_raise(stderr: &str) -> String {
    stderr
        .split_inclusive('\n')
        .filter(|line| !line.contains("raised the open-file limit (nofile)"))
        .collect()
}

/// The stderr of a TOML file refused at `(line, column)` of `text`, whose value is a quoted
/// string, as the toml crate draws it under the CLI's context.
fn toml_error(context: &str, (line, column): (usize, usize), text: &str, reason: &str) -> String {
    let value = text.len() - (column - 1);
    format!(
        "error: {context}: TOML parse error at line {line}, column {column}\n  |\n{line} | \
         {text}\n  |{}{}\n{reason}\n\n",
        " ".repeat(column),
        "^".repeat(value)
    )
}

#[tokio::test]
async fn a_bad_layout_file_names_the_file_and_line() {
    let directory = crate::support::test_folder("layout");
    let path = directory.join("bad-layout.toml");
    std::fs::write(
        &path,
        "[[port]]\nid = 4\nautocase = true\nmode = \"OPENED\"\n",
    )
    .unwrap();
    let path_text = path.to_str().unwrap();
    let (_, stderr) = run(
        &["simulate", "--listen", "127.0.0.1:0", "--config", path_text],
        2,
    )
    .await;
    std::fs::remove_file(&path).unwrap();
    assert!(
        stderr.contains(&format!("invalid layout file {path_text}")),
        "{stderr}"
    );
    assert!(stderr.contains("line 4"), "{stderr}");
    assert!(stderr.contains("OPENED"), "{stderr}");
}

#[tokio::test]
async fn help_documents_exit_codes_and_environment_variables() {
    let (stdout, _) = run(&["--help"], 0).await;
    assert!(stdout.contains("EXIT STATUS"), "{stdout}");
    let (stdout, _) = run(&["serve", "--help"], 0).await;
    assert!(stdout.contains("TASKGATE_UPSTREAM_TIMEOUT"), "{stdout}");
}

/// Runs `taskgate case-extract` against `gateway`.
async fn case_extract(
    gateway: &str,
    port: &str,
    bin: &str,
    expected_exit: i32,
) -> (String, String) {
    let args = [
        "case-extract",
        "--gateway",
        gateway,
        "--port",
        port,
        "--bin",
        bin,
    ];
    run(&args, expected_exit).await
}

/// Issue 25: `taskgate --version` names the version and the commit the binary was built from,
/// as git names HEAD, so that an operator can tell which build runs; `TASKGATE_GIT_COMMIT` when
/// set (a build from a copy of the source, such as a container's); else `unknown`.
#[tokio::test]
async fn version_names_the_commit() {
    let source = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(source)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8(output.stdout).unwrap().trim().to_owned())
    };
    let checkout = git(&["rev-parse", "--show-toplevel"]).is_some_and(|toplevel| {
        std::fs::canonicalize(toplevel).unwrap() == std::fs::canonicalize(source).unwrap()
    });
    // Cargo runs the build script with the same environment as the tests.
    let commit = match std::env::var("TASKGATE_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_owned(),
        _ if checkout => git(&["rev-parse", "--short", "HEAD"]).unwrap(),
        _ => "unknown".to_owned(),
    };
    let (stdout, _) = run(&["--version"], 0).await;
    assert_eq!(
        stdout,
        format!("taskgate {} (commit {commit})\n", env!("CARGO_PKG_VERSION"))
    );
}

/// The longest a test waits for a `taskgate` process to log a line or to exit.
const PROCESS_WAIT: Duration = Duration::from_secs(60);

/// A `taskgate` child process (`serve` or `simulate`), read through its log on stderr.
pub(crate) struct TaskgateProcess {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    /// Every log line read so far.
    pub(crate) log: String,
    /// The gRPC URL it listens on.
    pub(crate) gateway: String,
}

impl TaskgateProcess {
    /// Starts `serve --simulator` on an ephemeral loopback port with `extra_args`, and waits for
    /// its "gateway listening" line.
    pub(crate) async fn start(extra_args: &[&str]) -> TaskgateProcess {
        TaskgateProcess::start_serving(TaskgateProcess::spawn(
            &[
                &["serve", "--simulator", "--listen", "127.0.0.1:0"],
                extra_args,
            ]
            .concat(),
        ))
        .await
    }

    /// Starts `serve --upstream URL` on an ephemeral loopback port with `extra_args`, and waits
    /// for its "gateway listening" line.
    pub(crate) async fn start_with_upstream(url: &str, extra_args: &[&str]) -> TaskgateProcess {
        TaskgateProcess::start_serving(TaskgateProcess::spawn(
            &[
                &["serve", "--upstream", url, "--listen", "127.0.0.1:0"],
                extra_args,
            ]
            .concat(),
        ))
        .await
    }

    /// Waits for the "gateway listening" line of a `serve` process and notes its URL.
    pub(crate) async fn start_serving(mut process: TaskgateProcess) -> TaskgateProcess {
        let line = process.wait_for_line("gateway listening address=").await;
        let (_, rest) = line.split_once("gateway listening address=").unwrap();
        process.gateway = format!("http://{}", rest.split_whitespace().next().unwrap());
        process
    }

    /// Starts `taskgate` with `args`, reading its log.
    pub(crate) fn spawn(args: &[&str]) -> TaskgateProcess {
        TaskgateProcess::spawn_command(Command::new(BIN).args(args))
    }

    /// Starts `command` (which runs `taskgate`), reading its log.
    pub(crate) fn spawn_command(command: &mut Command) -> TaskgateProcess {
        // The simulator logs each request at debug level; the tests follow a request id into it.
        // A test that sets a filter of its own keeps it.
        if !command
            .as_std()
            .get_envs()
            .any(|(name, _)| name == "RUST_LOG")
        {
            command.env("RUST_LOG", "info,taskgate::simulator=debug");
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        TaskgateProcess {
            child,
            lines,
            log: String::new(),
            gateway: String::new(),
        }
    }

    /// The `/metrics` URL of a `serve` process started with `--metrics-listen`, from its
    /// "metrics listening" line (logged before "gateway listening").
    pub(crate) fn metrics_url(&self) -> String {
        self.log
            .lines()
            .filter(|line| line.contains("metrics listening"))
            .find_map(|line| {
                line.split_whitespace()
                    .find_map(|field| field.strip_prefix("url="))
            })
            .unwrap_or_else(|| panic!("no metrics line in:\n{}", self.log))
            .trim_matches('"')
            .to_owned()
    }

    /// Reads log lines until one contains `needle`, and returns it.
    /// Fails the test when no such line comes within [`PROCESS_WAIT`].
    pub(crate) async fn wait_for_line(&mut self, needle: &str) -> String {
        let waited_until = tokio::time::Instant::now() + PROCESS_WAIT;
        loop {
            let line = tokio::time::timeout_at(waited_until, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} within {PROCESS_WAIT:?}:\n{}", self.log))
                .unwrap()
                .unwrap_or_else(|| {
                    panic!("taskgate exited before logging {needle:?}:\n{}", self.log)
                });
            self.log.push_str(&line);
            self.log.push('\n');
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Waits until `address` accepts a TCP connection, as a supervisor that waits for the port
    /// does, polling every millisecond; the connection is closed at once. Fails the test when
    /// the process exits first, or when nothing accepts within [`PROCESS_WAIT`].
    pub(crate) async fn wait_until_accepting(&mut self, address: std::net::SocketAddr) {
        let waited_until = tokio::time::Instant::now() + PROCESS_WAIT;
        while tokio::net::TcpStream::connect(address).await.is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "taskgate exited ({status}) before {address} accepted:\n{}",
                    self.log
                );
            }
            assert!(
                tokio::time::Instant::now() < waited_until,
                "{address} did not accept within {PROCESS_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The process id, to read its RSS and open files from /proc.
    pub(crate) fn pid(&self) -> u32 {
        // Only `finish` waits for the process, and it takes `self`.
        self.child.id().expect("the process was already waited for")
    }

    /// Sends a signal, by name, as `kill -NAME` does.
    pub(crate) async fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap().to_string();
        let kill = Command::new("kill")
            .args([format!("-{name}"), pid])
            .status();
        let status = within(PROCESS_WAIT, "kill did not exit", kill)
            .await
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code and the whole log.
    /// Fails the test when it has not exited within [`PROCESS_WAIT`].
    pub(crate) async fn finish(self) -> (Option<i32>, String) {
        self.finish_within(PROCESS_WAIT).await
    }

    /// Waits for the process to exit without reading its log meanwhile, then reads the rest of
    /// the log; returns its exit code and the whole log. Fails the test when it has not exited
    /// within `bound`.
    pub(crate) async fn finish_within(mut self, bound: Duration) -> (Option<i32>, String) {
        let status = tokio::time::timeout(bound, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("taskgate still running after {bound:?}:\n{}", self.log))
            .unwrap();
        let rest = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                self.log.push_str(&line);
                self.log.push('\n');
            }
        };
        within(PROCESS_WAIT, "taskgate's stderr did not close", rest).await;
        (status.code(), self.log)
    }
}

/// The simulator `serve --simulator` embeds takes as many connections as the gateway may hold to
/// it, `2 × --max-in-flight + 1`: with the default cap instead, a gateway allowed more calls in
/// flight would have some of its connections refused, and their calls' outcomes made unknown.
#[tokio::test]
async fn the_embedded_simulator_takes_as_many_connections_as_the_gateway_may_hold() {
    let mut serve = TaskgateProcess::start(&["--max-in-flight", "1"]).await;
    let simulator = serve
        .log
        .lines()
        .find(|line| line.contains("embedded simulated controller started"))
        .and_then(|line| line.split_once("url=http://"))
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(address, _)| address.to_owned())
        .unwrap_or_else(|| panic!("no simulator address in:\n{}", serve.log));
    // Twice the 3 connections allowed (the gateway holds at most its health probe's): at least
    // three are refused.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(tokio::net::TcpStream::connect(&simulator).await.unwrap());
    }
    let refused = serve
        .wait_for_line("connection refused: the connection limit is reached")
        .await;
    assert!(refused.contains("listener=\"simulator\""), "{refused}");
    assert!(refused.contains("max_connections=3"), "{refused}");
    drop(held);
}

/// README's first command, for real: `serve --simulator`, a call, SIGTERM, exit 0.
#[tokio::test]
async fn serve_with_the_simulator_answers_calls_and_exits_0_on_sigterm() {
    let serve = TaskgateProcess::start(&[]).await;
    assert!(
        serve.log.contains("embedded simulated controller started"),
        "{}",
        serve.log
    );
    let call = [
        "case-extract",
        "--gateway",
        &serve.gateway,
        "--port",
        "4",
        "--bin",
        "101337",
        "--request-id",
        "e2e-1",
    ];
    run(&call, 0).await;
    case_extract(&serve.gateway, "1", "101337", 1).await;

    serve.signal("TERM").await;
    let (code, rest) = serve.finish().await;
    assert_eq!(code, Some(0));
    assert!(rest.contains("received SIGTERM"), "{rest}");
    assert!(rest.contains("gateway stopped"), "{rest}");
    // The access line of the first call, and the simulator's line for it, carry its request id.
    let access_line = rest
        .lines()
        .find(|line| line.contains("taskgate::access") && line.contains("request_id=e2e-1"))
        .unwrap_or_else(|| panic!("no access line with the request id in:\n{rest}"));
    for field in [
        "port_id=4",
        "bin_id=101337",
        "grpc_code=\"OK\"",
        "upstream_ms=",
        "total_ms=",
        "peer=127.0.0.1:",
    ] {
        assert!(
            access_line.contains(field),
            "{field} missing from {access_line}"
        );
    }
    assert!(
        rest.lines()
            .any(|line| line.contains("simulator answered success")
                && line.contains("request_id=e2e-1")),
        "the simulator did not log the request id:\n{rest}"
    );
}

/// `case-cancel` and `case-state` print their outcome as `case-extract` does, with the same exit
/// codes, and the gateway's access line of each names its method, port and bin (issue 10).
#[tokio::test]
async fn case_cancel_and_case_state_print_their_outcome_and_are_logged() {
    let serve = TaskgateProcess::start(&[]).await;
    let gateway = serve.gateway.as_str();
    let call = |command: &'static str, port_and_bin: &[&'static str], request_id: &'static str| {
        let mut args = vec![command, "--gateway", gateway, "--request-id", request_id];
        args.extend_from_slice(port_and_bin);
        args
    };
    let cancel = ["--port", "4", "--bin", "101337"];
    let (stdout, _) = run(&call("case-cancel", &cancel, "cancel-1"), 1).await;
    let not_selected = "The specified bin is not selected for the specified port, the requested \
                        operation is therefore invalid";
    assert_eq!(
        stdout,
        format!(
            "failed: case_cancel port 4 bin 101337: FAILED_PRECONDITION\n\
             \x20 fault:   1149 BIN_NOT_SELECTED_FOR_PORT\n\
             \x20 meaning: {not_selected}.\n\
             \x20 retry:   do not retry until the port's state changes\n\
             \x20 message: case_cancel port 4 bin 101337: controller fault 1149 \
             BIN_NOT_SELECTED_FOR_PORT: {not_selected}\n\
             \x20 request id: cancel-1\n"
        )
    );
    case_extract(gateway, "4", "101337", 0).await;
    let (stdout, _) = run(&call("case-cancel", &cancel, "cancel-2"), 0).await;
    assert_eq!(
        stdout,
        "ok: case_cancel port 4 bin 101337: the controller accepted the cancel\n\
         \x20 request id: cancel-2\n"
    );
    let (stdout, _) = run(&call("case-state", &["--port", "4"], "state-1"), 0).await;
    assert_eq!(
        stdout,
        "ok: case_getstate port 4: state NOOP (NO_OPERATION), bin 101337\n\
         \x20 request id: state-1\n"
    );
    let (stdout, _) = run(&call("case-state", &["--port", "3"], "state-2"), 0).await;
    assert_eq!(
        stdout,
        "ok: case_getstate port 3: state NOOP (NO_OPERATION), no bin\n\
         \x20 request id: state-2\n"
    );
    let (stdout, _) = run(&call("case-state", &["--port", "1"], "state-3"), 1).await;
    assert_eq!(
        stdout,
        "failed: case_getstate port 1: FAILED_PRECONDITION\n\
         \x20 fault:   1087 PORT_IS_NOT_AUTOCASE\n\
         \x20 meaning: The Port specified is not an AutoCase port.\n\
         \x20 retry:   do not retry until the port's state changes\n\
         \x20 message: case_getstate port 1: controller fault 1087 PORT_IS_NOT_AUTOCASE: The \
         Port specified is not an AutoCase port\n\
         \x20 request id: state-3\n"
    );

    serve.signal("TERM").await;
    let (code, log) = serve.finish().await;
    assert_eq!(code, Some(0), "{log}");
    // The call layer learns the RPCs from the descriptor set: the metric and log name of
    // CaseGetState is `case_get_state`, its task-interface method `case_getstate`.
    for (request_id, expected) in [
        (
            "cancel-1",
            "method=\"case_cancel\" port_id=4 bin_id=101337 grpc_code=\"FAILED_PRECONDITION\" \
             fault_code=1149",
        ),
        (
            "cancel-2",
            "method=\"case_cancel\" port_id=4 bin_id=101337 grpc_code=\"OK\"",
        ),
        (
            "state-1",
            "method=\"case_get_state\" port_id=4 grpc_code=\"OK\"",
        ),
        (
            "state-3",
            "method=\"case_get_state\" port_id=1 grpc_code=\"FAILED_PRECONDITION\" \
             fault_code=1087",
        ),
    ] {
        let needle = format!("request_id={request_id} ");
        let line = log
            .lines()
            .find(|line| line.contains("taskgate::access") && line.contains(&needle))
            .unwrap_or_else(|| panic!("no access line for {request_id}:\n{log}"));
        let (_, fields) = line.split_once("taskgate::access: call ").unwrap();
        let (fields, _) = fields.split_once(" upstream_ms=").unwrap();
        assert_eq!(fields, expected, "{line}");
    }
}

/// `--access-log errors` writes the line of a call that failed and not of one that succeeded;
/// `off` writes none.
#[tokio::test]
async fn access_log_filters_calls_by_outcome() {
    for (mode, expected) in [("errors", vec!["port_id=1 "]), ("off", vec![])] {
        let serve = TaskgateProcess::start(&["--access-log", mode]).await;
        case_extract(&serve.gateway, "4", "101337", 0).await;
        // Port 1 is not an AutoCase port: fault 1087.
        case_extract(&serve.gateway, "1", "101337", 1).await;
        serve.signal("TERM").await;
        let (code, log) = serve.finish().await;
        assert_eq!(code, Some(0), "{log}");
        let access_lines: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("taskgate::access"))
            .collect();
        assert_eq!(
            access_lines.len(),
            expected.len(),
            "--access-log {mode}:\n{log}"
        );
        for (line, needle) in access_lines.iter().zip(expected) {
            assert!(line.contains(needle), "--access-log {mode}: {line}");
            assert!(line.contains("grpc_code=\"FAILED_PRECONDITION\""), "{line}");
        }
    }
}

/// A log reader that stops reading must not stop the gateway: stderr is a pipe that is never read
/// while calls are made until lines are dropped, far more than the pipe and the log's buffer hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_never_stalls_calls_or_shutdown() {
    let mut serve =
        TaskgateProcess::start(&["--metrics-listen", "127.0.0.1:0", "--shutdown-grace", "2s"])
            .await;
    let metrics_url = serve.metrics_url();
    // Port 1 is not an AutoCase port: every call gets fault 1087, whatever came before.
    let fault_1087 = CaseExtractRequest {
        port_id: 1,
        bin_id: 101337,
        ..Default::default()
    };
    call_until_log_lines_drop(&serve.gateway, &metrics_url, fault_1087, "1087").await;

    // Reading resumes, so the drops are reported; SIGTERM then still ends the process cleanly,
    // and its last lines are written.
    let notice = "log lines were dropped because stderr was not read fast enough";
    let bound = Duration::from_secs(60);
    tokio::time::timeout(bound, serve.wait_for_line(notice))
        .await
        .expect("the drops were never reported");
    serve.signal("TERM").await;
    let (code, rest) = tokio::time::timeout(bound, serve.finish())
        .await
        .expect("the gateway did not exit after SIGTERM");
    assert_eq!(code, Some(0), "{rest}");
    assert!(rest.contains("gateway stopped"), "{rest}");
}

/// Makes calls to `gateway`, with its stderr unread, until its `/metrics` at `metrics_url` counts
/// dropped log lines: the pipe and the log's buffer are then full, and every line more is dropped.
/// Each call must fail with a message that contains `expected`, answered by the gateway or its
/// controller. Fails the test if the calls stall, or no line is dropped within two minutes.
pub(crate) async fn call_until_log_lines_drop(
    gateway: &str,
    metrics_url: &str,
    request: CaseExtractRequest,
    expected: &'static str,
) {
    const CALLERS: usize = 16;
    const CALLS_PER_CALLER: usize = 64;
    let channel = tonic::transport::Channel::from_shared(gateway.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let calls_until_dropped = async {
        while log_lines_dropped(metrics_url).await == 0 {
            let calls = (0..CALLERS).map(|_| {
                let mut client = TaskServiceClient::new(channel.clone());
                let request = request.clone();
                tokio::spawn(async move {
                    for _ in 0..CALLS_PER_CALLER {
                        let status = client.case_extract(request.clone()).await.unwrap_err();
                        assert!(status.message().contains(expected), "{status:?}");
                    }
                })
            });
            futures_join_all(calls).await;
        }
    };
    within(
        Duration::from_secs(120),
        "calls stalled behind the log, or no log line was dropped,",
        calls_until_dropped,
    )
    .await;
}

/// The `taskgate_log_lines_dropped_total` the `/metrics` at `metrics_url` reports.
async fn log_lines_dropped(metrics_url: &str) -> u64 {
    let metrics = crate::support::http_client()
        .get(metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("taskgate_log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("no dropped-lines counter in:\n{metrics}"))
        .parse()
        .unwrap()
}

/// Waits for every task, failing on the first that panicked.
async fn futures_join_all(tasks: impl Iterator<Item = tokio::task::JoinHandle<()>>) {
    for task in tasks.collect::<Vec<_>>() {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn sighup_reloads_the_auth_tokens() {
    let path = crate::auth::token_file("sighup", "old-token\n");
    let mut serve = TaskgateProcess::start(&["--auth-tokens-file", path.to_str().unwrap()]).await;
    let gateway = serve.gateway.clone();
    let with_token = |token: &'static str| extract_at_port_1(&gateway, token);
    // Port 1 is not an AutoCase port: fault 1087 proves the call got past authentication.
    assert!(
        with_token("old-token")
            .await
            .contains("PORT_IS_NOT_AUTOCASE")
    );
    assert!(with_token("new-token").await.contains("UNAUTHENTICATED"));

    std::fs::write(&path, "new-token\n").unwrap();
    serve.signal("HUP").await;
    serve.wait_for_line("reloaded auth tokens").await;
    assert!(
        with_token("new-token")
            .await
            .contains("PORT_IS_NOT_AUTOCASE")
    );
    assert!(with_token("old-token").await.contains("UNAUTHENTICATED"));

    // A broken file keeps the tokens in force.
    std::fs::write(&path, "bad token\n").unwrap();
    serve.signal("HUP").await;
    serve.wait_for_line("auth tokens not reloaded").await;
    assert!(
        with_token("new-token")
            .await
            .contains("PORT_IS_NOT_AUTOCASE")
    );

    serve.signal("TERM").await;
    let (code, log) = serve.finish().await;
    assert_eq!(code, Some(0));
    for token in ["old-token", "new-token"] {
        assert!(!log.contains(token), "a token leaked into the log:\n{log}");
    }
}

/// Writes a config file in a fresh folder, removed when the file is dropped.
pub(crate) fn config_file(name: &str, text: &str) -> TestFile {
    TestFile::new(&format!("config-{name}"), "taskgate.toml", text)
}

pub(crate) async fn print_config(
    args: &[&str],
    env: &[(&str, &str)],
    expected_exit: i32,
) -> (String, String) {
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .args(args)
        .arg("--print-config")
        .env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = within(PROCESS_WAIT, "taskgate did not exit", command.output())
        .await
        .unwrap();
    assert_exit(&output, args, expected_exit);
    (
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Issue 22: `--print-config` writes an endpoint taken from `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
/// as the base URL a config file needs over http/protobuf (where the file's endpoint gets
/// `/v1/traces` after its path), and refuses one that no base URL gives rather than print a file
/// that would send spans elsewhere.
#[tokio::test]
async fn print_config_writes_a_traces_endpoint_as_a_file_reads_it() {
    let env = |traces_url| {
        [
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces_url),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]
    };
    let (stdout, _) = print_config(
        &["--simulator"],
        &env("http://collector:4318/otlp/v1/traces"),
        0,
    )
    .await;
    assert!(
        stdout.contains("\notlp_endpoint = \"http://collector:4318/otlp\"\n"),
        "{stdout}"
    );
    let (stdout, stderr) =
        print_config(&["--simulator"], &env("http://collector:4318/custom"), 2).await;
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "error: --print-config cannot write OTEL_EXPORTER_OTLP_TRACES_ENDPOINT \
         'http://collector:4318/custom' as a config file's otlp_endpoint: over http/protobuf the \
         file's endpoint gets /v1/traces after its path (less a trailing /), and no path gives \
         '/custom'; keep this endpoint in OTEL_EXPORTER_OTLP_TRACES_ENDPOINT\n"
    );
    // Over gRPC no path is added, so the variable's endpoint is the file's as it is.
    let (stdout, _) = print_config(
        &["--simulator"],
        &[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://collector:4317/custom",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
        0,
    )
    .await;
    assert!(
        stdout.contains("\notlp_endpoint = \"http://collector:4317/custom\"\n"),
        "{stdout}"
    );
}

#[tokio::test]
async fn flags_beat_environment_beats_file_beats_defaults() {
    let path = config_file(
        "precedence",
        "listen = \"127.0.0.1:6000\"\nupstream_timeout = \"3s\"\nretry_delay = \"2s\"\n\
         max_in_flight = 7\nupstream_format = \"json\"\nauth_tokens_file = \"tokens\"\n",
    );
    // --print-config checks every file it names, so the token file must exist.
    std::fs::write(path.parent().unwrap().join("tokens"), "a-token\n").unwrap();
    let path_text = path.to_str().unwrap();
    let (stdout, _) = print_config(
        &["--config", path_text, "--upstream-timeout", "5s"],
        &[
            ("TASKGATE_RETRY_DELAY", "4s"),
            ("TASKGATE_UPSTREAM_TIMEOUT", "9s"),
        ],
        0,
    )
    .await;
    let tokens = path.parent().unwrap().join("tokens");
    for line in [
        "listen = \"127.0.0.1:6000\"".to_owned(),
        "upstream_timeout = \"5s\"".to_owned(),
        "retry_delay = \"4s\"".to_owned(),
        "max_in_flight = 7".to_owned(),
        "upstream_format = \"json\"".to_owned(),
        "shutdown_grace = \"10s\"".to_owned(),
        "log_format = \"text\"".to_owned(),
        format!("auth_tokens_file = \"{}\"", tokens.display()),
    ] {
        assert!(
            stdout.lines().any(|actual| actual == line),
            "{line} missing from:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn config_file_errors_name_the_file_key_and_line() {
    let path = config_file(
        "typo",
        "listen = \"127.0.0.1:6000\"\nupstream_timeot = \"3s\"\n",
    );
    let path_text = path.to_str().unwrap();
    let (_, stderr) = print_config(&["--config", path_text], &[], 2).await;
    assert!(
        stderr.contains(&format!("invalid config file {path_text}")),
        "{stderr}"
    );
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("upstream_timeot"), "{stderr}");

    let path = config_file("value", "\nmax_in_flight = -1\n");
    let (_, stderr) = print_config(&["--config", path.to_str().unwrap()], &[], 2).await;
    assert!(
        stderr.contains("line 2") && stderr.contains("max_in_flight"),
        "{stderr}"
    );

    // Issue 20, item 9: zero is out of the range, from the file as from a flag.
    let path = config_file("zero", "\nmax_in_flight = 0\n");
    let (_, stderr) = print_config(&["--config", path.to_str().unwrap()], &[], 2).await;
    assert_eq!(
        stderr,
        "error: invalid configuration: --max-in-flight 0 is out of range 1-100000: at least one \
         call must be allowed\n"
    );
    // Beyond the setting's type too, with the real range (the file's parser said "expected u32").
    let path = config_file("wide", "\nmax_concurrent_streams = 4294967296\n");
    let (_, stderr) = print_config(&["--config", path.to_str().unwrap()], &[], 2).await;
    assert_eq!(
        stderr,
        "error: invalid configuration: --max-concurrent-streams 4294967296 is out of range \
         1-100000: each open stream holds flow-control windows and buffers on its connection, \
         and a client that needs more streams can open another connection\n"
    );

    let path = config_file(
        "conflict",
        "simulator = true\nupstream = \"http://c:44000/api/v2/task\"\n",
    );
    let (_, stderr) = print_config(&["--config", path.to_str().unwrap()], &[], 2).await;
    assert!(
        stderr.contains("--upstream and --simulator cannot both be given"),
        "{stderr}"
    );

    let (_, stderr) = print_config(&["--config", "/nonexistent/taskgate.toml"], &[], 2).await;
    assert!(
        stderr.contains("cannot read config file /nonexistent/taskgate.toml"),
        "{stderr}"
    );
}

/// Starts `taskgate simulate` on an ephemeral port with `extra_args`; returns it and its
/// task-interface URL.
pub(crate) async fn start_simulate(extra_args: &[&str]) -> (TaskgateProcess, String) {
    let mut simulate =
        TaskgateProcess::spawn(&[&["simulate", "--listen", "127.0.0.1:0"], extra_args].concat());
    let line = simulate
        .wait_for_line("simulated controller listening")
        .await;
    assert!(line.contains("ports=4"), "{line}");
    let url = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("url="))
        .unwrap()
        .to_owned();
    (simulate, url)
}

/// POSTs `case_extract` port 4 bin 101337 to a simulator and returns its reply.
async fn simulator_case_extract(url: &str) -> String {
    let body = "<?xml version=\"1.0\"?><methodcall><name>case_extract</name><params>\
                <port_id>4</port_id><bin_id>101337</bin_id></params></methodcall>";
    let reply = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/xml")
        .body(body)
        .timeout(PROCESS_WAIT)
        .send()
        .await
        .unwrap();
    reply.text().await.unwrap()
}

#[tokio::test]
async fn simulate_serves_the_task_interface_and_exits_0_on_sigint() {
    let (simulate, url) = start_simulate(&[]).await;
    let reply = simulator_case_extract(&url).await;
    assert!(reply.contains("<params/>"), "{reply}");
    simulate.signal("INT").await;
    let (code, log) = simulate.finish().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("received SIGINT"), "{log}");
}

/// Issue 8, finding 4: SIGHUP, which log rotation and `systemctl reload` send, never ends `serve`
/// (with or without auth) or `simulate`: each logs it, still answers, and exits 0 on SIGTERM.
#[tokio::test]
async fn sighup_never_ends_serve_or_simulate() {
    let tokens = crate::auth::token_file("sighup-stays-up", "a-token\n");
    let with_auth = ["--auth-tokens-file", tokens.to_str().unwrap()];
    for (args, logged) in [
        (
            &[][..],
            "received SIGHUP; nothing to reload without --auth-tokens-file",
        ),
        (
            &with_auth[..],
            "received SIGHUP; reloaded auth tokens tokens=1",
        ),
    ] {
        let mut serve = TaskgateProcess::start(args).await;
        serve.signal("HUP").await;
        serve.wait_for_line(logged).await;
        // Port 1 is not an AutoCase port: fault 1087 proves the call reached the controller.
        let stdout = extract_at_port_1(&serve.gateway, "a-token").await;
        assert!(
            stdout.contains("PORT_IS_NOT_AUTOCASE"),
            "{args:?}: {stdout}"
        );
        serve.signal("TERM").await;
        let (code, log) = serve.finish().await;
        assert_eq!(code, Some(0), "{args:?}:\n{log}");
    }

    let (mut simulate, url) = start_simulate(&[]).await;
    simulate.signal("HUP").await;
    simulate
        .wait_for_line("received SIGHUP; the simulator has nothing to reload")
        .await;
    let reply = simulator_case_extract(&url).await;
    assert!(reply.contains("<params/>"), "{reply}");
    simulate.signal("TERM").await;
    let (code, log) = simulate.finish().await;
    assert_eq!(code, Some(0), "{log}");
}

/// The CLI's `case-extract` at port 1 (not an AutoCase port, so fault 1087 once the call is
/// through) with bearer `token`; its stdout.
async fn extract_at_port_1(gateway: &str, token: &str) -> String {
    let args = [
        "case-extract",
        "--gateway",
        gateway,
        "--port",
        "1",
        "--bin",
        "1",
    ];
    let output = Command::new(BIN)
        .args(args)
        .env("TASKGATE_TOKEN", token)
        .env_remove("RUST_LOG")
        .output();
    let output = within(PROCESS_WAIT, "taskgate did not exit", output)
        .await
        .unwrap();
    String::from_utf8(output.stdout).unwrap()
}

/// A SIGHUP that comes before the command has even read its settings' last source (here right
/// after the first log line, which an OTLP endpoint makes come before anything is bound) never
/// ends the process: SIGHUP is caught from the first thing `main` does. Many times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_before_the_gateway_is_set_up_never_kills() {
    for attempt in 0..10 {
        let collector = format!("http://{}", unused_address().await);
        let mut serve = TaskgateProcess::spawn(&[
            "serve",
            "--simulator",
            "--listen",
            "127.0.0.1:0",
            "--otlp-endpoint",
            &collector,
        ]);
        // Logged as soon as logging starts, before `serve` has begun.
        serve.wait_for_line("exporting spans over OTLP").await;
        serve.signal("HUP").await;
        let serve = TaskgateProcess::start_serving(serve).await;
        serve.signal("TERM").await;
        let (code, log) = serve.finish().await;
        assert_eq!(code, Some(0), "attempt {attempt}:\n{log}");
    }
}

/// Issue 25: a supervisor that waits for the port and then reloads (`systemctl reload` as soon
/// as the port accepts) never kills the gateway, which it did in one run of two: SIGHUP is
/// caught from before any port is bound, and a reload that comes before the gateway is ready is
/// applied once it is. The token file changes between the start and the SIGHUP, so a lost
/// reload would show as the new token refused. Many times over, since one try may miss the
/// moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_as_soon_as_the_port_accepts_is_applied_rather_than_kills() {
    let tokens = crate::auth::token_file("sighup-at-once", "old-token\n");
    for attempt in 0..20 {
        std::fs::write(&tokens, "old-token\n").unwrap();
        let address = unused_address().await;
        let listen = address.to_string();
        let mut serve = TaskgateProcess::spawn(&[
            "serve",
            "--simulator",
            "--listen",
            &listen,
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
        ]);
        serve.wait_until_accepting(address).await;
        std::fs::write(&tokens, "new-token\n").unwrap();
        serve.signal("HUP").await;
        let mut serve = TaskgateProcess::start_serving(serve).await;
        let reloaded = "received SIGHUP; reloaded auth tokens tokens=1";
        if !serve.log.contains(reloaded) {
            serve.wait_for_line(reloaded).await;
        }
        let stdout = extract_at_port_1(&serve.gateway, "new-token").await;
        // Port 1 is not an AutoCase port: fault 1087 proves the call passed auth.
        assert!(
            stdout.contains("PORT_IS_NOT_AUTOCASE"),
            "attempt {attempt}: {stdout}\n{}",
            serve.log
        );
        serve.signal("TERM").await;
        let (code, log) = serve.finish().await;
        assert_eq!(code, Some(0), "attempt {attempt}:\n{log}");
    }
}

/// `case-extract --port 4 --bin 101337 --wait` on `gateway`, which must exit with
/// `expected_exit`; what it printed.
async fn case_extract_wait(gateway: &str, expected_exit: i32) -> String {
    let args = [
        "case-extract",
        "--gateway",
        gateway,
        "--port",
        "4",
        "--bin",
        "101337",
        "--wait",
    ];
    run(&args, expected_exit).await.0
}

/// The event lines a command printed, without the time each starts with (it varies).
fn event_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|line| line.starts_with(|first: char| first.is_ascii_digit()))
        .map(|line| line.split_once(' ').unwrap().1.to_owned())
        .collect()
}

/// `watch` prints each event of the port as it comes, and `case-extract --wait` follows its
/// extraction to ECMP, against `serve --simulator` with its own Log Publisher (issue 10).
#[tokio::test]
async fn watch_and_case_extract_wait_follow_an_extraction_to_its_end() {
    let layout = TestFile::new(
        "watch-cli",
        "layout.toml",
        "step_time = \"50ms\"\n[[port]]\nid = 4\nautocase = true\nmode = \"OPEN\"\nselected_bin = 101337\n",
    );
    let layout_path = layout.to_str().unwrap();
    let serve = TaskgateProcess::start(&["--simulator-config", layout_path]).await;
    let gateway = serve.gateway.as_str();
    let mut watch = Command::new(BIN)
        .args(["watch", "--gateway", gateway, "--port", "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut watch_stderr = BufReader::new(watch.stderr.take().unwrap()).lines();
    // Printed once the stream is open, so the extraction below cannot come before it.
    let opened = within(PROCESS_WAIT, "watch did not open", watch_stderr.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(opened, "watch port 4: one line per event; stop with Ctrl-C");
    let mut watch_stdout = BufReader::new(watch.stdout.take().unwrap()).lines();

    let stdout = case_extract_wait(gateway, 0).await;
    let expected = [
        "port 4 bin 101337 EREQ (EXTRACTION_REQUESTED)",
        "port 4 bin 101337 ERSO (EXTRACTION_READY_TO_SEND)",
        "port 4 bin 101337 ECMP (EXTRACTION_COMPLETED)",
    ];
    assert_eq!(event_lines(&stdout), expected, "{stdout}");
    assert!(
        stdout.starts_with(
            "ok: case_extract port 4 bin 101337: the controller accepted the case extraction; \
             following it\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("ok: case_extract port 4 bin 101337: the case is out (ECMP)\n"),
        "{stdout}"
    );
    let mut watched = String::new();
    for _ in expected {
        let line = within(
            PROCESS_WAIT,
            "watch printed no line",
            watch_stdout.next_line(),
        )
        .await
        .unwrap()
        .unwrap();
        watched.push_str(&line);
        watched.push('\n');
    }
    assert_eq!(event_lines(&watched), expected, "{watched}");
    let watch_pid = watch.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &watch_pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = within(PROCESS_WAIT, "watch did not stop", watch.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "watch did not exit 0 on SIGTERM");
    serve.signal("TERM").await;
    let (code, log) = serve.finish().await;
    assert_eq!(code, Some(0), "{log}");
}

/// Without a Log Publisher, `case-extract --wait` cannot follow, so it asks for nothing.
#[tokio::test]
async fn case_extract_wait_asks_for_nothing_when_it_cannot_follow() {
    let serve = TaskgateProcess::start(&["--log-publisher", "off"]).await;
    let gateway = serve.gateway.as_str();
    let stdout = case_extract_wait(gateway, 1).await;
    assert!(
        stdout.starts_with(
            "failed: watch port 4 before case_extract, which was not sent: \
             FAILED_PRECONDITION\n\
             \x20 reason:  LOG_PUBLISHER_DISABLED (taskgate)\n"
        ),
        "{stdout}"
    );
    let (stdout, _) = run(&["case-state", "--gateway", gateway, "--port", "4"], 0).await;
    assert!(
        stdout.starts_with("ok: case_getstate port 4: state NOOP (NO_OPERATION), no bin\n"),
        "{stdout}"
    );
}
