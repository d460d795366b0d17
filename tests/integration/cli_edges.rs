//! Issue 20: the real binary at its edges, as a newcomer and a hostile peer met it: a closed
//! stdout, `bench` against gateways that are not there or do not answer, settings outside their
//! range, and the messages that were not true.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;

use crate::cli::{BIN, TaskgateProcess, run};
use crate::support::{
    FakeUpstream, Gateway, PROMPTLY, Script, TestFile, silent_peer, unused_address, within,
};

/// The longest a test waits for a `taskgate` process to exit.
const PROCESS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `taskgate ARGS…` with its stdout closed before it writes anything (its reader dropped at
/// once, as `| true` does); returns its exit code and stderr.
async fn with_stdout_closed(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    let mut child_stderr = child.stderr.take().unwrap();
    let read = child_stderr.read_to_string(&mut stderr);
    within(PROCESS_WAIT, "taskgate's stderr did not close", read)
        .await
        .unwrap();
    let status = within(PROCESS_WAIT, "taskgate did not exit", child.wait())
        .await
        .unwrap();
    (status.code(), stderr)
}

/// Item 5: `case-state … | true`, `bench` and `serve --print-config` with stdout closed exited
/// 101 with a backtrace.
/// A closed stdout ends the output and nothing else: the exit code is the call's.
#[tokio::test]
async fn a_closed_stdout_is_not_a_panic_and_keeps_the_exit_code() {
    let gateway = Gateway::builder().start().await;
    let address = format!("http://{}", gateway.address);
    let case_state = ["case-state", "--gateway", &address, "--port", "4"];
    assert_eq!(
        with_stdout_closed(&case_state).await,
        (Some(0), String::new())
    );
    // Port 1 is not an AutoCase port: the call fails, and still says so with its exit code.
    let refused = ["case-state", "--gateway", &address, "--port", "1"];
    assert_eq!(with_stdout_closed(&refused).await, (Some(1), String::new()));
    let bench = [
        "bench",
        "--gateway",
        &address,
        "--calls",
        "5",
        "--warmup",
        "0s",
        "--concurrency",
        "1",
    ];
    assert_eq!(with_stdout_closed(&bench).await, (Some(0), String::new()));
    // Commands that print without calling anything: the settings, and clap's help and version.
    for printing in [
        &["serve", "--print-config"][..],
        &["--help"],
        &["serve", "--help"],
        &["--version"],
    ] {
        assert_eq!(
            with_stdout_closed(printing).await,
            (Some(0), String::new()),
            "taskgate {}",
            printing.join(" ")
        );
    }
}

/// Item 5: `taskgate watch | head -n 1` exited 101 at the next event after `head` had gone.
/// It stops there and exits 0, as on Ctrl-C.
#[tokio::test]
async fn watch_stops_quietly_when_its_reader_goes() {
    let layout = TestFile::new(
        "closed-stdout",
        "layout.toml",
        "step_time = \"50ms\"\n[[port]]\nid = 4\nautocase = true\nmode = \"OPEN\"\nselected_bin = 101337\n",
    );
    let serve = TaskgateProcess::start(&["--simulator-config", layout.to_str().unwrap()]).await;
    let gateway = serve.gateway.clone();
    let mut watch = Command::new(BIN)
        .args(["watch", "--gateway", &gateway, "--port", "4"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut watch_stderr = BufReader::new(watch.stderr.take().unwrap()).lines();
    // Printed once the stream is open, so the events below come after it.
    let opened = within(PROCESS_WAIT, "watch did not open", watch_stderr.next_line())
        .await
        .unwrap();
    assert_eq!(
        opened.as_deref(),
        Some("watch port 4: one line per event; stop with Ctrl-C")
    );
    drop(watch.stdout.take());
    run(
        &[
            "case-extract",
            "--gateway",
            &gateway,
            "--port",
            "4",
            "--bin",
            "101337",
        ],
        0,
    )
    .await;
    let status = within(PROCESS_WAIT, "watch did not stop", watch.wait())
        .await
        .unwrap();
    let mut rest = String::new();
    while let Some(line) = watch_stderr.next_line().await.unwrap() {
        rest.push_str(&line);
        rest.push('\n');
    }
    assert_eq!((status.code(), rest.as_str()), (Some(0), ""));
    serve.signal("TERM").await;
    let (code, log) = serve.finish().await;
    assert_eq!(code, Some(0), "{log}");
}

/// Item 7: a gateway address bench cannot use is a usage error, before any connect.
#[tokio::test]
async fn bench_refuses_a_gateway_that_is_not_an_http_url() {
    for gateway in [
        "notaurl",
        "ftp://127.0.0.1:50051",
        "unix:///tmp/taskgate.sock",
    ] {
        let (stdout, stderr) = run(&["bench", "--gateway", gateway, "--calls", "1"], 2).await;
        assert_eq!(stdout, "");
        assert_eq!(
            stderr,
            format!(
                "error: invalid --gateway '{gateway}': it must be http://HOST:PORT or \
                 https://HOST:PORT, for example http://127.0.0.1:50051\n"
            )
        );
    }
}

/// Item 7: a "gateway" that accepts connections and never answers, or accepts and closes them,
/// gave exit 0 and `CANCELLED 10`. It cannot be reached as a gateway: exit 1 before any load.
#[tokio::test]
async fn bench_exits_1_when_the_gateway_accepts_but_never_answers() {
    let (silent_address, held) = silent_peer().await;
    let args = [
        "bench",
        "--gateway",
        &silent_address,
        "--calls",
        "10",
        "--timeout",
        "500ms",
    ];
    let (stdout, stderr) = run(&args, 1).await;
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!(
            "error: cannot connect to the gateway at {silent_address}: it accepted the \
             connection but did not answer a health check within 500ms (--timeout)\n"
        )
    );
    held.abort();

    let closing = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closing_address = format!("http://{}", closing.local_addr().unwrap());
    let closer = tokio::spawn(async move {
        while let Ok((stream, _)) = closing.accept().await {
            drop(stream);
        }
    });
    let args = ["bench", "--gateway", &closing_address, "--calls", "10"];
    let (stdout, stderr) = run(&args, 1).await;
    assert_eq!(stdout, "");
    let prefix = format!("error: cannot connect to the gateway at {closing_address}: ");
    assert!(stderr.starts_with(&prefix), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    closer.abort();
}

/// Item 9: each setting out of its range, or in a form not documented, is refused at startup
/// with exit 2 and the range or the forms accepted.
#[tokio::test]
async fn settings_out_of_range_are_refused_with_their_range() {
    let refused = [
        (
            &["serve", "--max-concurrent-streams", "4294967295"][..],
            "error: invalid configuration: --max-concurrent-streams 4294967295 is out of range \
             1-100000: each open stream holds flow-control windows and buffers on its \
             connection, and a client that needs more streams can open another connection\n",
        ),
        // Beyond the setting's type, the message is the same, with the real range (clap's own
        // said "not in 0..=4294967295").
        (
            &["serve", "--max-concurrent-streams", "4294967296"],
            "error: invalid configuration: --max-concurrent-streams 4294967296 is out of range \
             1-100000: each open stream holds flow-control windows and buffers on its \
             connection, and a client that needs more streams can open another connection\n",
        ),
        (
            &["serve", "--max-in-flight", "18446744073709551615"],
            "error: invalid configuration: --max-in-flight 18446744073709551615 is out of range \
             1-100000: each call in flight may hold a connection and a file descriptor to the \
             controller, which serves far fewer calls at once\n",
        ),
        (
            &["simulate", "--max-connections", "18446744073709551615"],
            "error: invalid configuration: --max-connections 18446744073709551615 is out of \
             range 1-1000000: each connection takes a file descriptor, and no open-file limit \
             allows that many\n",
        ),
        (
            &["bench", "--concurrency", "4294967296"],
            "error: --concurrency 4294967296 is out of range 1-100000: each call in flight is a \
             task here and a slot on the gateway (--max-in-flight is at most 100000)\n",
        ),
        (
            &["serve", "--worker-threads", "0"],
            "error: invalid configuration: --worker-threads 0 is out of range 1-1024: calls need \
             a thread to run on\n",
        ),
        (
            &["serve", "--max-in-flight", "0"],
            "error: invalid configuration: --max-in-flight 0 is out of range 1-100000: at least \
             one call must be allowed\n",
        ),
        (
            &["serve", "--watch-buffer", "0"],
            "error: invalid configuration: --watch-buffer 0 is out of range 16-1048576: a burst \
             of a few extractions would cut every watcher off\n",
        ),
        (
            &["serve", "--log-publisher", "tcp://127.0.0.1:1"],
            "error: --log-publisher 'tcp://127.0.0.1:1' must be HOST:PORT (for example \
             10.0.0.5:44001), tls://HOST:PORT or off\n",
        ),
        (
            &["serve", "--upstream", "http://127.0.0.1:0/api/v2/task"],
            "error: invalid --upstream: upstream URL 'http://127.0.0.1:0/api/v2/task' is not a \
             valid URL: port 0 cannot be connected to; give the controller's port (44000 by \
             default)\n",
        ),
        (
            &["simulate", "--max-connections", "0"],
            "error: invalid configuration: --max-connections 0 is out of range 1-1000000: at \
             least one connection must be allowed\n",
        ),
    ];
    for (args, expected) in refused {
        let (stdout, stderr) = run(args, 2).await;
        assert_eq!(
            (stdout.as_str(), stderr.as_str()),
            ("", expected),
            "{args:?}"
        );
    }
}

/// Item 9: the calling commands checked `--timeout` and the token only after connecting, so with
/// no gateway there they exited 1, as if the gateway were down, not 2.
#[tokio::test]
async fn client_arguments_are_checked_before_connecting() {
    let nowhere = format!("http://{}", unused_address().await);
    let cases = [
        (
            &[
                "case-state",
                "--gateway",
                &nowhere,
                "--port",
                "4",
                "--timeout",
                "0s",
            ][..],
            "error: --timeout 0s is out of range 1ms-1h: a call needs some time to be answered, \
             for example 5s\n",
        ),
        (
            &[
                "case-extract",
                "--gateway",
                &nowhere,
                "--port",
                "4",
                "--bin",
                "1",
                "--token",
                "line\nbreak",
            ],
            "error: invalid --token: it must be printable ASCII\n",
        ),
        (
            &[
                "case-extract",
                "--gateway",
                &nowhere,
                "--port",
                "4",
                "--bin",
                "1",
                "--wait",
                "--wait-timeout",
                "0s",
            ],
            "error: --wait-timeout 0s is out of range 1ms-1day: following needs some time, for \
             example 30s\n",
        ),
        (
            &["watch", "--gateway", "notaurl"],
            "error: invalid --gateway 'notaurl': it must be http://HOST:PORT or \
             https://HOST:PORT, for example http://127.0.0.1:50051\n",
        ),
        (
            &[
                "case-state",
                "--gateway",
                "http://127.0.0.1:0",
                "--port",
                "4",
            ],
            "error: invalid --gateway 'http://127.0.0.1:0': port 0 cannot be connected to; give \
             the gateway's port (50051 by default)\n",
        ),
        // A port out of range, or none after the colon, was dropped by the URI parser, and the
        // call went to port 80.
        (
            &[
                "case-state",
                "--gateway",
                "http://u:p@127.0.0.1:99999",
                "--port",
                "4",
            ],
            "error: invalid --gateway 'http://u:***@127.0.0.1:99999': '99999' is not a port \
             (1-65535); give the gateway's port (50051 by default)\n",
        ),
        (
            &["case-state", "--gateway", "http://[::1]:", "--port", "4"],
            "error: invalid --gateway 'http://[::1]:': its port is empty; give the gateway's \
             port (50051 by default)\n",
        ),
        (
            &["watch", "--gateway", "http://127.0.0.1:50051/#port-4"],
            "error: invalid --gateway 'http://127.0.0.1:50051/#port-4': a gateway's address has \
             no path, query or fragment; give http://HOST:PORT or https://HOST:PORT\n",
        ),
        // The path was dropped: calls went to the root of the host.
        (
            &["watch", "--gateway", "http://127.0.0.1:50051/taskgate"],
            "error: invalid --gateway 'http://127.0.0.1:50051/taskgate': a gateway's address has \
             no path, query or fragment; give http://HOST:PORT or https://HOST:PORT\n",
        ),
    ];
    for (args, expected) in cases {
        let (stdout, stderr) = run(args, 2).await;
        assert_eq!(
            (stdout.as_str(), stderr.as_str()),
            ("", expected),
            "{args:?}"
        );
    }
}

/// Item 10: `tcp connect error: tcp connect error: Connection refused`; each cause once.
#[tokio::test]
async fn a_refused_connection_names_its_cause_once() {
    let nowhere = format!("http://{}", unused_address().await);
    let (stdout, stderr) = run(&["case-state", "--gateway", &nowhere, "--port", "4"], 1).await;
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!(
            "error: cannot connect to the gateway at {nowhere}: transport error: tcp connect \
             error: Connection refused (os error 111); is a gateway running there? --gateway \
             gives its address\n"
        )
    );
}

/// `https://` to a gateway that serves plaintext: TLS's own words ("corrupt message of type
/// InvalidContentType") do not say that the scheme is wrong, so the error does.
#[tokio::test]
async fn https_to_a_plaintext_gateway_says_to_use_http() {
    let gateway = Gateway::builder().start().await;
    let url = format!("https://{}", gateway.address);
    let (stdout, stderr) = run(&["case-state", "--gateway", &url, "--port", "4"], 1).await;
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with(&format!("error: cannot connect to the gateway at {url}: "))
            && stderr.ends_with(
                "; it did not answer TLS: a gateway without --tls-cert serves plaintext, at \
                 http://\n"
            ),
        "{stderr}"
    );
}

/// A watch that fails while `case-extract --wait` follows an accepted extraction (here, the
/// gateway shutting down) is reported as following stopped, not as the extraction failing with
/// retry advice: a second `case-extract` would be a second extraction.
#[tokio::test]
async fn a_watch_that_fails_while_following_says_the_case_may_still_be_running() {
    let layout = TestFile::new(
        "wait-fails",
        "layout.toml",
        "step_time = \"1h\"\n[[port]]\nid = 4\nautocase = true\nmode = \"OPEN\"\nselected_bin = 101337\n",
    );
    let mut serve = TaskgateProcess::start(&["--simulator-config", layout.to_str().unwrap()]).await;
    let gateway = serve.gateway.clone();
    let args = [
        "case-extract",
        "--gateway",
        &gateway,
        "--port",
        "4",
        "--bin",
        "101337",
        "--wait",
    ];
    let stop_once_accepted = async {
        serve.wait_for_line("method=\"case_extract\"").await;
        serve.signal("TERM").await;
    };
    let ((stdout, stderr), ()) = within(PROCESS_WAIT, "case-extract --wait did not end", async {
        tokio::join!(run(&args, 3), stop_once_accepted)
    })
    .await;
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|line| !line.starts_with("  request id: "))
        // Whether the EREQ came before the shutdown varies.
        .filter(|line| !line.starts_with(|first: char| first.is_ascii_digit()))
        .collect();
    assert_eq!(
        lines,
        [
            "ok: case_extract port 4 bin 101337: the controller accepted the case extraction; \
             following it",
            "stopped following: case_extract port 4 bin 101337: the watch failed: UNAVAILABLE: \
             WatchCaseEvents: the gateway is shutting down; watch again once it is back, or \
             through another instance",
            "  the controller accepted the extraction; the case may still be running",
            "  follow it: taskgate watch --port 4, or taskgate case-state --port 4",
        ],
        "{stdout}"
    );
    assert_eq!(stderr, "");
    let (code, log) = within(PROMPTLY * 12, "serve did not stop", serve.finish()).await;
    assert_eq!(code, Some(0), "{log}");
}

/// Item 10: when `--wait-timeout` ran out, `case-extract --wait` printed `failed: …
/// DEADLINE_EXCEEDED … retry: not advised`, though the extraction was accepted and running.
#[tokio::test]
async fn a_wait_that_runs_out_says_the_case_may_still_be_running() {
    let layout = TestFile::new(
        "wait-timeout",
        "layout.toml",
        "step_time = \"1h\"\n[[port]]\nid = 4\nautocase = true\nmode = \"OPEN\"\nselected_bin = 101337\n",
    );
    let serve = TaskgateProcess::start(&["--simulator-config", layout.to_str().unwrap()]).await;
    let args = [
        "case-extract",
        "--gateway",
        &serve.gateway,
        "--port",
        "4",
        "--bin",
        "101337",
        "--wait",
        "--wait-timeout",
        "1s",
    ];
    let (stdout, stderr) = within(
        PROCESS_WAIT,
        "case-extract --wait did not end",
        run(&args, 3),
    )
    .await;
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|line| !line.starts_with("  request id: "))
        // An event line starts with the time it was received, which varies.
        .map(|line| match line.split_once(" port 4 ") {
            Some((time, rest)) if time.starts_with(|first: char| first.is_ascii_digit()) => rest,
            _ => line,
        })
        .collect();
    assert_eq!(
        lines,
        [
            "ok: case_extract port 4 bin 101337: the controller accepted the case extraction; \
             following it",
            "bin 101337 EREQ (EXTRACTION_REQUESTED)",
            "stopped following: case_extract port 4 bin 101337: --wait-timeout 1s ran out \
             before the case ended",
            "  the controller accepted the extraction; the case may still be running",
            "  follow it: taskgate watch --port 4, or taskgate case-state --port 4",
        ],
        "{stdout}"
    );
    assert_eq!(stderr, "");
    let (stdout, _) = run(
        &["case-state", "--gateway", &serve.gateway, "--port", "4"],
        0,
    )
    .await;
    assert!(
        stdout.starts_with("ok: case_getstate port 4: state EREQ (EXTRACTION_REQUESTED)"),
        "{stdout}"
    );
    serve.signal("TERM").await;
    let (code, log) = within(PROMPTLY * 12, "serve did not stop", serve.finish()).await;
    assert_eq!(code, Some(0), "{log}");
}

/// Item 10: `serve --help` said `--max-in-flight` counts CaseExtract calls; every task call
/// takes a slot (one semaphore on the unary path all three share), as the README says.
#[tokio::test]
async fn serve_help_says_max_in_flight_counts_every_task_call() {
    let (stdout, _) = run(&["serve", "--help"], 0).await;
    let help = stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains(
            "How many task calls (CaseExtract, CaseCancel and CaseGetState together) may be in \
             flight at once"
        ),
        "{stdout}"
    );
}

/// Item 10: a stream cut by the gateway's end printed `request id: none`; a reply without a
/// request id has no such line.
#[tokio::test]
async fn a_cut_stream_prints_no_request_id_line() {
    let serve = TaskgateProcess::start(&[]).await;
    let mut watch = Command::new(BIN)
        .args(["watch", "--gateway", &serve.gateway, "--port", "4"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut watch_stderr = BufReader::new(watch.stderr.take().unwrap()).lines();
    let opened = within(PROCESS_WAIT, "watch did not open", watch_stderr.next_line())
        .await
        .unwrap();
    assert_eq!(
        opened.as_deref(),
        Some("watch port 4: one line per event; stop with Ctrl-C")
    );
    // Gone at once, without a status: the stream is cut.
    serve.signal("KILL").await;
    let mut stdout = String::new();
    let mut watch_stdout = watch.stdout.take().unwrap();
    within(
        PROCESS_WAIT,
        "watch's stdout did not close",
        watch_stdout.read_to_string(&mut stdout),
    )
    .await
    .unwrap();
    let status = within(PROCESS_WAIT, "watch did not stop", watch.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("failed: watch port 4: "), "{stdout}");
    assert!(!stdout.contains("request id"), "{stdout}");
    let (code, _) = serve.finish().await;
    assert_eq!(code, None, "killed");
}

/// Item 5: a stdout that fails otherwise than by its reader going (a full disk) is an error,
/// named once; not a panic. It never changes an exit code that says what a command did: an
/// extraction the controller accepted is 0 (a 1 would have a script send it again), and one
/// accepted but followed no further is 3; a read, whose output is its result, is 1.
#[tokio::test]
async fn a_full_stdout_is_an_error_that_keeps_what_the_command_did() {
    let layout = TestFile::new(
        "full-stdout",
        "layout.toml",
        "step_time = \"1h\"\n[[port]]\nid = 4\nautocase = true\nmode = \"OPEN\"\nselected_bin = 101337\n\
         [[port]]\nid = 5\nautocase = true\nmode = \"OPEN\"\nselected_bin = 101338\n",
    );
    let serve = TaskgateProcess::start(&["--simulator-config", layout.to_str().unwrap()]).await;
    let to_full_stdout = |args: &[&str]| {
        let gateway = ["--gateway", serve.gateway.as_str()];
        to_full_stdout(
            args.iter()
                .chain(&gateway)
                .map(|arg| arg.to_string())
                .collect(),
        )
    };
    let full = "error: cannot write to stdout: No space left on device (os error 28)";
    assert_eq!(
        to_full_stdout(&["case-state", "--port", "4"]).await,
        (Some(1), format!("{full}\n"))
    );
    // What the command did is on stderr instead, so that nobody sends it again.
    assert_eq!(
        to_full_stdout(&["case-extract", "--port", "4", "--bin", "101337"]).await,
        (
            Some(0),
            format!(
                "{full}; not printed there:\nok: case_extract port 4 bin 101337: the controller \
                 accepted the case extraction\n"
            )
        )
    );
    // Followed no further, and said so on stderr, the events between included.
    let wait = ["--wait", "--wait-timeout", "1s"];
    let (code, stderr) = to_full_stdout(
        &[
            &["case-extract", "--port", "5", "--bin", "101338"][..],
            &wait,
        ]
        .concat(),
    )
    .await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "{full}; not printed there:\nok: case_extract port 5 bin 101338: the controller \
             accepted the case extraction; following it\n"
        )) && stderr.contains(" port 5 bin 101338 EREQ (EXTRACTION_REQUESTED)\n")
            && stderr.ends_with(
                "stopped following: case_extract port 5 bin 101338: --wait-timeout 1s ran out \
                 before the case ended\n\
                 \x20 the controller accepted the extraction; the case may still be running\n\
                 \x20 follow it: taskgate watch --port 5, or taskgate case-state --port 5\n"
            ),
        "{stderr}"
    );
    // Each extraction was accepted: the port shows it.
    for port in ["4", "5"] {
        let (stdout, _) = run(
            &["case-state", "--gateway", &serve.gateway, "--port", port],
            0,
        )
        .await;
        assert!(
            stdout.contains("state EREQ (EXTRACTION_REQUESTED)"),
            "{stdout}"
        );
    }
    // A cancel the controller accepted is 0 the same way.
    assert_eq!(
        to_full_stdout(&["case-cancel", "--port", "4", "--bin", "101337"]).await,
        (
            Some(0),
            format!(
                "{full}; not printed there:\nok: case_cancel port 4 bin 101337: the controller \
                 accepted the cancel\n"
            )
        )
    );
    serve.signal("TERM").await;
    let (code, log) = within(PROMPTLY * 12, "serve did not stop", serve.finish()).await;
    assert_eq!(code, Some(0), "{log}");
}

/// A command whose outcome is unknown, with a stdout that cannot be written: its idempotency
/// key, the one way to repeat it safely, is on stderr with the error rather than lost.
#[tokio::test]
async fn a_full_stdout_does_not_lose_the_key_of_an_unknown_outcome() {
    let upstream = crate::support::FakeUpstream::start(crate::support::Script::Drop).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let address = format!("http://{}", gateway.address);
    let key = "3f6c2a1e-8b4d-4c5e-9f0a-1b2c3d4e5f6a";
    let args = [
        "case-extract",
        "--gateway",
        &address,
        "--port",
        "4",
        "--bin",
        "101337",
    ];
    let args = [&args[..], &["--idempotency-key", key]].concat();
    let (code, stderr) = to_full_stdout(args.iter().map(|arg| arg.to_string()).collect()).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(
            "error: cannot write to stdout: No space left on device (os error 28); not printed \
             there:\nfailed: case_extract port 4 bin 101337: UNKNOWN\n"
        ) && stderr.ends_with(&format!(
            "\n  idempotency key: {key} (repeat with --idempotency-key {key})\n"
        )),
        "{stderr}"
    );
}

/// Runs taskgate with `args` and a stdout that cannot be written (`/dev/full`): its exit code
/// and its stderr, without the `request id:` lines.
async fn to_full_stdout(args: Vec<String>) -> (Option<i32>, String) {
    let output = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output();
    let output = within(PROCESS_WAIT, "taskgate did not exit", output)
        .await
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    (output.status.code(), without_request_ids(&stderr))
}

/// `text` without its `request id:` lines, whose IDs are fresh each time.
fn without_request_ids(text: &str) -> String {
    text.lines()
        .filter(|line| !line.starts_with("  request id: "))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// The CLI's `--timeout` is the call's deadline at the gateway too: against a controller that
/// never answers, the gateway answers UPSTREAM_TIMEOUT within it (the controller may have
/// acted, so the idempotency key is printed to repeat the call with), rather than the CLI
/// giving up first with a bare CANCELLED that names neither.
#[tokio::test]
async fn a_call_timing_out_at_the_controller_prints_the_key_to_repeat_it_with() {
    let upstream = crate::support::FakeUpstream::start(crate::support::Script::Hang).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let address = format!("http://{}", gateway.address);
    let key = "0b8f3e52-7d1c-4a5e-9f60-2c4d8e1a3b7f";
    let (stdout, _) = run(
        &[
            "case-extract",
            "--gateway",
            &address,
            "--port",
            "4",
            "--bin",
            "101337",
            "--timeout",
            "1s",
            "--request-id",
            "cli-timeout",
            "--idempotency-key",
            key,
        ],
        1,
    )
    .await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some("failed: case_extract port 4 bin 101337: DEADLINE_EXCEEDED"),
        "{stdout}"
    );
    assert!(stdout.contains("UPSTREAM_TIMEOUT"), "{stdout}");
    assert!(stdout.contains("  request id: cli-timeout\n"), "{stdout}");
    assert_eq!(
        lines.last().copied(),
        Some(format!("  idempotency key: {key} (repeat with --idempotency-key {key})").as_str()),
        "{stdout}"
    );
}

/// `case-extract --wait` follows the extraction it asked for: what an earlier operation on the
/// same bin signals before the new one's first state, EREQ (its ERSO and ECMP, or its cancel,
/// just before the controller accepted the new one), is not taken as the new case's end.
#[tokio::test]
async fn a_wait_does_not_take_an_earlier_operations_end_for_its_own() {
    let cancelled = [
        "bin 101337 EREQ (EXTRACTION_REQUESTED)",
        "bin 101337 CR (CANCEL_REQUEST)",
        "bin 101337 NOOP (NO_OPERATION)",
        "failed: case_extract port 4 bin 101337: the extraction was cancelled (NOOP)",
    ];
    let completed = [
        "bin 101337 EREQ (EXTRACTION_REQUESTED)",
        "bin 101337 ERSO (EXTRACTION_READY_TO_SEND)",
        "bin 101337 ECMP (EXTRACTION_COMPLETED)",
        "ok: case_extract port 4 bin 101337: the case is out (ECMP)",
    ];
    for (lines, exit, expected) in [
        (
            "AC,4,101337,ECMP\r\nAC,4,101337,EREQ\r\nAC,4,101337,CR\r\nAC,4,101337,NOOP\r\n",
            1,
            &cancelled,
        ),
        (
            "AC,4,101337,CR\r\nAC,4,101337,NOOP\r\nAC,4,101337,EREQ\r\nAC,4,101337,ERSO\r\n\
             AC,4,101337,ECMP\r\n",
            0,
            &completed,
        ),
        (
            "AC,4,101337,ERSO\r\nAC,4,101337,ECMP\r\nAC,4,101337,EREQ\r\nAC,4,101337,ERSO\r\n\
             AC,4,101337,ECMP\r\n",
            0,
            &completed,
        ),
    ] {
        let stdout = wait_while_publishing(lines, &[], exit).await;
        let printed: Vec<&str> = stdout
            .lines()
            .filter(|line| !line.starts_with("  request id: "))
            .map(|line| match line.split_once(" port 4 ") {
                Some((time, rest)) if time.starts_with(|first: char| first.is_ascii_digit()) => {
                    rest
                }
                _ => line,
            })
            .collect();
        let mut wanted = vec![
            "ok: case_extract port 4 bin 101337: the controller accepted the case extraction; \
             following it",
        ];
        wanted.extend(expected);
        assert_eq!(printed, wanted, "{lines:?}");
    }
}

/// A repeated key's extraction may have ended before `--wait` began to follow it, and then no
/// event of it comes: the wait says so at once, rather than leave the operator waiting for an
/// end that was already missed.
#[tokio::test]
async fn a_wait_on_a_repeated_key_says_its_end_may_have_passed() {
    let key = "3f6c2a1e-8b4d-4c5e-9f0a-1b2c3d4e5f6a";
    let repeated = ["--idempotency-key", key, "--wait-timeout", "1s"];
    let stdout = wait_while_publishing("", &repeated, 3).await;
    let printed: String = stdout
        .lines()
        .filter(|line| !line.starts_with("  request id: "))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(
        printed,
        "ok: case_extract port 4 bin 101337: the controller accepted the case extraction; \
         following it\n\
         \x20 note: this key's extraction may have ended before following began; if no event \
         comes, read the port: taskgate case-state --port 4\n\
         stopped following: case_extract port 4 bin 101337: --wait-timeout 1s ran out before \
         the case ended\n\
         \x20 the controller accepted the extraction; the case may still be running\n\
         \x20 follow it: taskgate watch --port 4, or taskgate case-state --port 4\n"
    );
}

/// Runs `case-extract --port 4 --bin 101337 --wait` with `extra` arguments against a gateway
/// whose Log Publisher writes `lines` once the controller has seen the call; its stdout, once
/// it exited `exit`.
async fn wait_while_publishing(lines: &str, extra: &[&str], exit: i32) -> String {
    let mut controller = FakeUpstream::start(Script::ok_xml(
        "<?xml version=\"1.0\"?><response><params/></response>",
    ))
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = Gateway::builder()
        .upstream(&controller.url)
        .log_publisher(listener.local_addr().unwrap())
        .start()
        .await;
    let (mut publisher, _) = within(PROMPTLY, "the gateway did not connect", listener.accept())
        .await
        .unwrap();
    let address = format!("http://{}", gateway.address);
    let args = [
        "case-extract",
        "--gateway",
        &address,
        "--port",
        "4",
        "--bin",
        "101337",
        "--wait",
    ]
    .iter()
    .chain(extra)
    .copied()
    .collect::<Vec<_>>();
    // The CLI opens its watch before it asks, so once the controller sees the call, every line
    // published from then on reaches the CLI.
    let publish = async {
        controller.next_request_body().await;
        publisher.write_all(lines.as_bytes()).await.unwrap();
    };
    let ((stdout, _), ()) = within(PROCESS_WAIT, "case-extract --wait did not end", async {
        tokio::join!(run(&args, exit), publish)
    })
    .await;
    stdout
}

/// A gateway that accepts connections and never answers: the call ends at `--timeout` with a
/// status tonic makes on this side, `CANCELLED` with "Timeout expired", which named neither the
/// gateway nor the flag. CaseExtract may have reached it, so the key is printed.
#[tokio::test]
async fn a_gateway_that_never_answers_is_named_with_the_timeout() {
    let (silent_address, held) = silent_peer().await;
    let common = [
        "--gateway",
        &silent_address,
        "--port",
        "4",
        "--timeout",
        "200ms",
    ];
    let (stdout, _) = run(&[&["case-state"][..], &common[..]].concat(), 1).await;
    assert_eq!(
        stdout,
        "failed: case_getstate port 4: CANCELLED\n\
         \x20 retry:   safe: a read moves nothing, though it fails again while the cause lasts\n\
         \x20 message: the gateway did not answer within --timeout\n"
    );
    let key = "0b6a4f0e-6c1b-4c53-9a8e-3d2f1e0c9b7a";
    let extract = [
        &["case-extract", "--bin", "101337", "--idempotency-key", key][..],
        &common[..],
    ]
    .concat();
    let (stdout, _) = run(&extract, 1).await;
    assert_eq!(
        stdout,
        format!(
            "failed: case_extract port 4 bin 101337: CANCELLED\n\
             \x20 retry:   only as a repeat with the idempotency key below, to the same gateway \
             process (not restarted since) within its --idempotency-window; to any other it is \
             a new call, so read the port first\n\
             \x20 message: the gateway did not answer within --timeout\n\
             \x20 idempotency key: {key} (repeat with --idempotency-key {key})\n"
        )
    );
    held.abort();
}
