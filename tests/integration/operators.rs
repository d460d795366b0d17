//! The real binary as a careless operator runs it (issue 8): a password in the controller URL is
//! never printed, whichever way it comes in.

use std::process::Stdio;

use tokio::process::Command;

use crate::cli::{BIN, assert_exit};
use crate::support::{test_folder, unused_address};

/// The password every case below puts in a URL; no output may contain it.
const PASSWORD: &str = "S3cr3t-pw";

/// Runs `taskgate ARGS…` with `env`, asserts its exit code and that neither stdout nor stderr
/// holds [`PASSWORD`]; returns stdout and stderr.
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
