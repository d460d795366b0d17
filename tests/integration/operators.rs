//! The real binary as a careless operator runs it (issue 8): a password in the controller URL is
//! never printed, whichever way it comes in, and a setting the runtime cannot take is refused
//! with exit 2 and its range instead of a panic or a gateway that fails every call, and so is a
//! token file that is not a regular file.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::cli::{BIN, assert_exit};
use crate::support::{TestFile, test_folder, unused_address, within};

/// The password every case below puts in a URL; no output may contain it.
const PASSWORD: &str = "S3cr3t-pw";

/// Runs `taskgate ARGS…` with `env`, asserts its exit code and that neither stdout nor stderr
/// holds [`PASSWORD`] (no case has a reason to print it); returns stdout and stderr.
async fn run_with_env(args: &[&str], env: &[(&str, &str)], expected_exit: i32) -> (String, String) {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TASKGATE_UPSTREAM")
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .expect("taskgate did not exit within 60 s")
        .unwrap();
    assert_exit(&output, args, expected_exit);
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(
            !text.contains(PASSWORD),
            "taskgate {args:?} {env:?} printed the password on {name}:\n{text}"
        );
    }
    (stdout, stderr)
}

/// Issue 8, finding 5: the flag, the environment variable, the config file, `--print-config`, a
/// URL refused for another reason, a TOML error quoting the line, a later conflict and
/// `case-extract --gateway` all keep the password out of every byte they print. The gateway
/// never starts with such a URL, so no log line or metric label can carry one.
#[tokio::test]
async fn a_password_in_a_url_is_never_printed() {
    let url = format!("http://op:{PASSWORD}@127.0.0.1:9/api/v2/task");
    let refused = "error: invalid --upstream: upstream URL 'http://op:***@127.0.0.1:9/api/v2/task' \
                   has credentials, which are never sent: the task interface takes none; remove \
                   them\n";
    let folder = test_folder("operators-password");
    let config = folder.join("taskgate.toml");
    std::fs::write(&config, format!("upstream = \"{url}\"\n")).unwrap();
    let config = config.to_str().unwrap();

    for (args, env) in [
        (vec!["serve", "--upstream", &url], vec![]),
        (vec!["serve", "--upstream", &url, "--print-config"], vec![]),
        (vec!["serve"], vec![("TASKGATE_UPSTREAM", url.as_str())]),
        (vec!["serve", "--config", config], vec![]),
        (vec!["serve", "--config", config, "--print-config"], vec![]),
        (
            vec!["serve", "--log-format", "json", "--upstream", &url],
            vec![],
        ),
    ] {
        let (stdout, stderr) = run_with_env(&args, &env, 2).await;
        assert_eq!(stderr, refused, "{args:?} {env:?}");
        assert_eq!(stdout, "", "{args:?} {env:?}");
    }

    let bad_port = format!("http://op:{PASSWORD}@127.0.0.1:99999/api/v2/task");
    let (_, stderr) = run_with_env(&["serve", "--upstream", &bad_port], &[], 2).await;
    assert_eq!(
        stderr,
        "error: invalid --upstream: upstream URL 'http://op:***@127.0.0.1:99999/api/v2/task' is \
         not a valid URL: invalid port number\n"
    );
    let no_scheme = format!("op:{PASSWORD}@127.0.0.1:44000");
    let (_, stderr) = run_with_env(&["serve", "--upstream", &no_scheme], &[], 2).await;
    assert_eq!(
        stderr,
        "error: invalid --upstream: upstream URL 'op:***@127.0.0.1:44000' must start with \
         http:// or https://\n"
    );

    let broken = folder.join("broken.toml");
    std::fs::write(&broken, format!("upstream = \"{url}\" junk\n")).unwrap();
    let broken = broken.to_str().unwrap();
    let (_, stderr) = run_with_env(&["serve", "--config", broken], &[], 2).await;
    // The caret points at column 58 of the line as written, password and all.
    assert_eq!(
        stderr,
        format!(
            "error: invalid config file {broken}: TOML parse error at line 1, column 58\n  |\n\
             1 | upstream = \"http://op:***@127.0.0.1:9/api/v2/task\" junk\n  |{}^\n\
             unexpected key or value, expected newline, `#`\n\n",
            " ".repeat(58)
        )
    );

    // A later check fails, with the URL in the environment: still nothing of it is printed.
    let (_, stderr) = run_with_env(
        &["serve", "--simulator"],
        &[("TASKGATE_UPSTREAM", url.as_str())],
        2,
    )
    .await;
    assert_eq!(
        stderr,
        "error: --upstream and --simulator cannot both be given: the simulator is the upstream\n"
    );

    let gateway = format!("http://op:{PASSWORD}@{}", unused_address().await);
    let args = [
        "case-extract",
        "--gateway",
        &gateway,
        "--port",
        "4",
        "--bin",
        "1",
    ];
    let (_, stderr) = run_with_env(&args, &[], 1).await;
    let shown = gateway.replace(PASSWORD, "***");
    assert!(
        stderr.starts_with(&format!(
            "error: cannot connect to the gateway at {shown}: "
        )),
        "{stderr}"
    );
}

/// Writes `text` as a config file in a fresh folder named for `name`, removed when the file is
/// dropped.
fn config_file(name: &str, text: &str) -> TestFile {
    TestFile::new(&format!("operators-{name}"), "taskgate.toml", text)
}

/// Runs `serve` with `args` and `env` and asserts it exits 2 with exactly `expected` on stderr.
/// Were a value let through, the gateway would start on an ephemeral port and the bounded wait
/// would fail the test.
async fn check_refused(args: &[&str], env: &[(&str, &str)], expected: &str) {
    let args = [&["serve", "--simulator", "--listen", "127.0.0.1:0"], args].concat();
    let (stdout, stderr) = run_with_env(&args, env, 2).await;
    assert_eq!(stderr, expected, "{args:?} {env:?}");
    assert_eq!(stdout, "", "{args:?} {env:?}");
}

/// Issue 8, findings 7 and 8: every numeric setting is checked against its range, from the flag,
/// the environment and the file, before anything starts. `--max-in-flight` of 2^61 used to panic
/// in tokio's semaphore (exit 101), and `--upstream-timeout 1ns` started a gateway that failed
/// every call.
#[tokio::test]
async fn settings_out_of_range_exit_2_with_the_range_and_the_reason() {
    let too_many = "error: invalid configuration: --max-in-flight 2305843009213693952 is out of \
                    range 1-100000: each call in flight may hold a connection and a file \
                    descriptor to the controller, which serves far fewer calls at once\n";
    let file = config_file("max-in-flight", "max_in_flight = 2305843009213693952\n");
    check_refused(&["--max-in-flight", "2305843009213693952"], &[], too_many).await;
    check_refused(
        &[],
        &[("TASKGATE_MAX_IN_FLIGHT", "2305843009213693952")],
        too_many,
    )
    .await;
    check_refused(&["--config", file.to_str().unwrap()], &[], too_many).await;
    check_refused(
        &["--upstream-timeout", "1ns"],
        &[],
        "error: invalid configuration: --upstream-timeout 1ns is out of range 10ms-1h: the \
         gateway never calls the controller with less than 10ms left, so a shorter timeout would \
         fail every call\n",
    )
    .await;
    check_refused(
        &["--health-interval", "0s"],
        &[],
        "error: invalid configuration: --health-interval 0s is out of range 10ms-1h: the probe \
         opens a TCP connection to the controller every interval\n",
    )
    .await;
    check_refused(
        &["--max-response-bytes", "18446744073709551615"],
        &[],
        "error: invalid configuration: --max-response-bytes 18446744073709551615 is out of range \
         1024-67108864: each reply is held in memory while it is read, once for every call in \
         flight\n",
    )
    .await;
    check_refused(
        &["--shutdown-grace", "500000000000y"],
        &[],
        "error: invalid configuration: --shutdown-grace 500000000000years is out of range 0s-1h: \
         service managers kill a process long before (systemd after 90s, Kubernetes after 30s \
         by default)\n",
    )
    .await;
    check_refused(
        &["--retry-delay", "2h"],
        &[],
        "error: invalid configuration: --retry-delay 2h is out of range 0s-1h: a caller told to \
         wait that long would rather give up\n",
    )
    .await;
}

/// Issue 8, finding 7: a token file that is not a regular file is refused at once with what it
/// is; a FIFO used to hang startup with no output, and /dev/zero would be read until memory ran
/// out.
#[tokio::test]
async fn a_token_file_that_is_not_a_regular_file_is_refused() {
    let folder = test_folder("operators-not-a-file");
    let fifo = folder.join("tokens.fifo");
    let _ = std::fs::remove_file(&fifo);
    let mkfifo = Command::new("mkfifo").arg(&fifo).status();
    let made = within(Duration::from_secs(60), "mkfifo did not exit", mkfifo)
        .await
        .unwrap();
    assert!(made.success());
    let folder_text = folder.to_str().unwrap();
    let fifo_text = fifo.to_str().unwrap();
    for (path, kind) in [
        (fifo_text, "a FIFO"),
        (folder_text, "a directory"),
        ("/dev/zero", "a character device"),
    ] {
        check_refused(
            &["--auth-tokens-file", path],
            &[],
            &format!(
                "error: cannot read auth tokens file {path}: it is {kind}, not a regular file\n"
            ),
        )
        .await;
    }
}
