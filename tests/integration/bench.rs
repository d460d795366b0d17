//! `taskgate bench`, the real binary, against a gateway in front of the simulator.
//!
//! No test asserts a duration or a throughput: the machine is shared, so only counts, codes and
//! the shape of the report are pinned.

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use crate::cli::{BIN, assert_exit, run};
use crate::support::{Gateway, unused_address};

/// Long enough for any of these runs on a loaded machine; a hang fails instead of blocking.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// Runs `taskgate bench --gateway GATEWAY ARGS…` with a few workers, expecting exit 0.
async fn bench(gateway: &Gateway, args: &[&str]) -> String {
    let address = format!("http://{}", gateway.address);
    let args = [
        &["bench", "--gateway", &address, "--concurrency", "4"],
        args,
    ]
    .concat();
    let (stdout, _) = tokio::time::timeout(RUN_LIMIT, run(&args, 0))
        .await
        .expect("taskgate bench did not finish");
    stdout
}

/// The `--json` report: exactly one JSON object on stdout.
async fn bench_json(gateway: &Gateway, args: &[&str]) -> Value {
    let stdout = bench(gateway, &[args, &["--json"]].concat()).await;
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    serde_json::from_str(&stdout).unwrap()
}

fn codes(report: &Value) -> Vec<(String, u64)> {
    report["codes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, count)| (name.clone(), count.as_u64().unwrap()))
        .collect()
}

#[tokio::test]
async fn a_json_report_counts_exactly_the_calls_asked_for() {
    let gateway = Gateway::builder().start().await;
    let report = bench_json(&gateway, &["--calls", "40", "--warmup", "0s"]).await;
    let keys: Vec<&str> = report
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "gateway",
            "connections",
            "concurrency",
            "calls",
            "duration_s",
            "calls_per_s",
            "latency_us",
            "codes"
        ]
    );
    let latency_keys: Vec<&str> = report["latency_us"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(latency_keys, ["mean", "p50", "p90", "p99", "p99_9", "max"]);
    assert_eq!(report["gateway"], format!("http://{}", gateway.address));
    assert_eq!(report["connections"], 1);
    assert_eq!(report["concurrency"], 4);
    assert_eq!(report["calls"], 40);
    let codes = codes(&report);
    assert_eq!(codes.iter().map(|(_, count)| count).sum::<u64>(), 40);
    // Port 4 takes the first call; the others find its case operation still running (1148),
    // unless a machine so busy that the 40 calls outlast the simulated case lets one more in.
    let [(ok, accepted), (unavailable, busy)] = codes.as_slice() else {
        panic!("{codes:?}");
    };
    assert_eq!((ok.as_str(), unavailable.as_str()), ("OK", "UNAVAILABLE"));
    assert!((1..=2).contains(accepted), "{codes:?}");
    assert_eq!(accepted + busy, 40);
}

#[tokio::test]
async fn ports_that_refuse_case_extract_show_as_failed_precondition() {
    let gateway = Gateway::builder().start().await;
    let stdout = bench(
        &gateway,
        &[
            "--calls",
            "10",
            "--warmup",
            "0s",
            "--connections",
            "2",
            "--ports",
            "1-2",
            "--bins",
            "101337-101337",
        ],
    )
    .await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert_eq!(
        lines[0],
        format!(
            "taskgate bench: http://{}, 2 connection(s), 4 in flight, 10 calls (no warm-up)",
            gateway.address
        )
    );
    assert_eq!(
        lines[1],
        "targets:    ports 1-2, bin 101337 (2 pairs in turn)"
    );
    assert!(lines[2].starts_with("calls:      10 in "), "{stdout}");
    assert!(lines[3].starts_with("latency:    mean "), "{stdout}");
    // Port 1 is not an AutoCase port (1087), port 2 is closed (1099).
    assert_eq!(lines[4], "status:     FAILED_PRECONDITION 10");
}

#[tokio::test]
async fn calls_go_to_every_port_in_turn() {
    let gateway = Gateway::builder().start().await;
    let report = bench_json(
        &gateway,
        &["--calls", "8", "--warmup", "0s", "--ports", "2-5"],
    )
    .await;
    // Two calls per port: 2 closed and 3 without a selected bin refuse (FAILED_PRECONDITION),
    // 4 accepts one and is then busy (UNAVAILABLE), 5 does not exist (NOT_FOUND).
    assert_eq!(
        codes(&report),
        [
            ("OK".to_owned(), 1),
            ("NOT_FOUND".to_owned(), 2),
            ("FAILED_PRECONDITION".to_owned(), 4),
            ("UNAVAILABLE".to_owned(), 1)
        ]
    );
}

#[tokio::test]
async fn a_timed_run_finishes_and_counts_its_calls() {
    let gateway = Gateway::builder().start().await;
    let report = bench_json(&gateway, &["--duration", "1s", "--warmup", "200ms"]).await;
    let calls = report["calls"].as_u64().unwrap();
    assert!(calls > 0, "{report}");
    assert_eq!(
        codes(&report).iter().map(|(_, count)| count).sum::<u64>(),
        calls
    );
}

#[tokio::test]
async fn the_token_is_sent_and_never_printed() {
    let gateway = Gateway::builder()
        .auth_tokens(&["bench-token"])
        .start()
        .await;
    let address = format!("http://{}", gateway.address);
    let args = [
        "bench",
        "--gateway",
        &address,
        "--calls",
        "5",
        "--warmup",
        "0s",
        "--ports",
        "1",
    ];
    let output = tokio::time::timeout(
        RUN_LIMIT,
        Command::new(BIN)
            .args(args)
            .env("TASKGATE_TOKEN", "bench-token")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_exit(&output, &args, 0);
    let Output { stdout, stderr, .. } = output;
    let (stdout, stderr) = (
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    );
    // Fault 1087 for port 1 proves each call got past authentication.
    assert!(
        stdout.contains("status:     FAILED_PRECONDITION 5\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("bench-token") && !stderr.contains("bench-token"));
}

#[tokio::test]
async fn an_unreachable_gateway_exits_1_before_any_load() {
    let address = format!("http://{}", unused_address().await);
    let (stdout, stderr) = run(&["bench", "--gateway", &address, "--calls", "5"], 1).await;
    assert_eq!(stdout, "");
    let prefix = format!("error: cannot connect to the gateway at {address}: ");
    assert!(stderr.starts_with(&prefix), "{stderr}");
    assert!(
        stderr.trim_end().ends_with(
            "Connection refused (os error 111); is a gateway running there? --gateway gives \
                 its address"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn a_bad_range_is_a_usage_error_found_before_connecting() {
    let address = format!("http://{}", unused_address().await);
    let (stdout, stderr) = run(&["bench", "--gateway", &address, "--ports", "9-3"], 2).await;
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "error: invalid --ports '9-3': the start 9 is greater than the end 3\n"
    );
}

#[tokio::test]
async fn help_documents_the_exit_codes_and_environment_variables() {
    let (stdout, _) = run(&["bench", "--help"], 0).await;
    for needle in [
        "EXIT STATUS",
        "the gateway cannot be reached",
        "TASKGATE_BENCH_CONCURRENCY",
        "TASKGATE_TOKEN",
        "\"p99_9\"",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
}
