//! The real binary at and around its file-descriptor limit, and what its shutdown log says held
//! it (issue 8). The limit is set with the shell's `ulimit` before `exec`, as a service manager
//! would set it.

use tokio::net::TcpStream;
use tokio::process::Command;

use crate::cli::{BIN, TaskgateProcess};
use crate::support::{FakeUpstream, PROMPTLY, Script, scrape_at_least, served_http2_client};

/// Runs `taskgate ARGS` under `ulimit ULIMIT_ARGS` (for example `-n 64`).
fn spawn_with_ulimit(ulimit_args: &str, args: &[&str]) -> TaskgateProcess {
    TaskgateProcess::spawn_command(
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit {ulimit_args} && exec \"$0\" \"$@\""))
            .arg(BIN)
            .args(args),
    )
}

#[tokio::test]
async fn a_low_soft_limit_is_raised_to_the_hard_limit() {
    let mut serve = spawn_with_ulimit(
        "-Sn 256",
        &["serve", "--simulator", "--listen", "127.0.0.1:0"],
    );
    let line = serve
        .wait_for_line("raised the open-file limit (nofile)")
        .await;
    assert!(line.contains("from=256"), "{line}");
}

/// With `nofile` at 64 (soft and hard), 80 idle connections exhaust it: the accept loop pauses
/// instead of spinning, logs once, counts the failures, and serves again once they close.
#[tokio::test]
async fn at_the_fd_limit_accept_backs_off_logs_once_and_recovers() {
    let mut serve = TaskgateProcess::start_serving(spawn_with_ulimit(
        "-n 64",
        &[
            "serve",
            "--simulator",
            "--listen",
            "127.0.0.1:0",
            "--max-in-flight",
            "4",
            "--max-connections",
            "1000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    ))
    .await;
    assert!(
        serve.log.lines().any(
            |line| line.contains("the open-file limit (nofile) is below")
                && line.contains("nofile=64")
        ),
        "no warning about nofile:\n{}",
        serve.log
    );
    let metrics_url = serve.metrics_url();
    let address = serve.gateway.trim_start_matches("http://").to_owned();
    let mut connections = Vec::new();
    for _ in 0..80 {
        connections.push(TcpStream::connect(&address).await.unwrap());
    }
    let line = tokio::time::timeout(PROMPTLY, serve.wait_for_line("cannot accept connections"))
        .await
        .expect("no accept error logged");
    assert!(line.contains("fd_limit"), "{line}");
    drop(connections);

    // Served again: metrics (on a descriptor of their own) count the failures.
    scrape_at_least(
        &metrics_url,
        "taskgate_accept_errors_total{listener=\"grpc\",kind=\"fd_limit\"}",
        1.0,
    )
    .await;
    // And new connections are accepted and served again.
    served_http2_client(&address).await;
    serve.signal("TERM").await;
    let (code, log) = serve.finish().await;
    assert_eq!(code, Some(0), "{log}");
    let logged = log
        .lines()
        .filter(|line| line.contains("cannot accept connections") && line.contains("grpc"))
        .count();
    // Once per 10 s, not once per failure: a spinning loop would log thousands of lines.
    assert!(logged <= 2, "{logged} lines:\n{log}");
}

/// At SIGTERM an idle connection is closed at once and a call in flight holds the grace; when
/// the grace runs out the log says what held it.
#[tokio::test]
async fn the_shutdown_log_says_what_held_the_grace() {
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let serve =
        TaskgateProcess::start_with_upstream(upstream.url.as_str(), &["--shutdown-grace", "300ms"])
            .await;
    let mut client =
        taskgate::proto::task_service_client::TaskServiceClient::connect(serve.gateway.clone())
            .await
            .unwrap();
    let call = tokio::spawn(async move {
        client
            .case_extract(taskgate::proto::CaseExtractRequest {
                port_id: 4,
                bin_id: 101337,
                ..Default::default()
            })
            .await
    });
    upstream.next_request_body().await;
    // Served, so it is one of the gateway's connections when SIGTERM arrives.
    let _idle = served_http2_client(serve.gateway.trim_start_matches("http://")).await;
    serve.signal("TERM").await;
    let (code, log) = tokio::time::timeout(PROMPTLY, serve.finish())
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{log}");
    let line = |needle: &str| {
        log.lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{log}"))
            .to_owned()
    };
    let draining = line("no longer accepting calls");
    assert!(
        draining.contains("calls=1") && draining.contains("streams=0"),
        "{draining}"
    );
    let ran_out = line("shutdown grace ran out");
    assert!(
        ran_out.contains("calls=1") && ran_out.contains("streams=0"),
        "{ran_out}"
    );
    let stopped = line("gateway stopped");
    assert!(stopped.contains("closed_idle=1"), "{stopped}");
    call.abort();
}
