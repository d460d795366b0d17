//! Graceful shutdown: stop accepting, finish calls in flight, bounded by the grace period; and the
//! real binary's exit, bounded whatever its log reader does.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use taskgate::proto::task_service_client::TaskServiceClient;
use taskgate::proto::{
    CaseCancelRequest, CaseExtractRequest, CaseExtractResponse, WatchCaseEventsRequest,
};

use crate::cli::{TaskgateProcess, call_until_log_lines_drop};
use crate::support::{
    FakeUpstream, Gateway, PROMPTLY, Script, endpoint, error_info, scrape_line, within,
};

/// A CaseExtract sent through `gateway`, once `upstream` holds it: the task that answers it.
async fn extract_held_by(
    upstream: &mut FakeUpstream,
    gateway: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<CaseExtractResponse>, tonic::Status>> {
    let mut client = TaskServiceClient::new(endpoint(gateway.to_owned()).connect_lazy());
    let held = tokio::spawn(async move {
        client
            .case_extract(CaseExtractRequest {
                port_id: 4,
                bin_id: 101337,
                ..Default::default()
            })
            .await
    });
    upstream.next_request_body().await;
    held
}

/// Waits until `gateway` has begun shutting down: it ends health Watch streams only then, after
/// it has closed its listener.
async fn until_shutdown_began(watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) {
    let ended = async {
        // The stream ends cleanly, or with its connection; either way shutdown has begun.
        while let Ok(Some(_status)) = watch.message().await {}
    };
    within(
        PROMPTLY,
        "the health Watch stream did not end at shutdown",
        ended,
    )
    .await;
}

/// linkerd's `h2_exercise_goaways_connections`: shutdown begins while a call waits for the
/// controller; the gateway refuses new connections, yet the call completes OK, and only then
/// does `serve` return.
#[tokio::test]
async fn a_call_in_flight_completes_after_shutdown_begins() {
    let release = Arc::new(Notify::new());
    let mut upstream = FakeUpstream::start(Script::RespondWhen {
        release: release.clone(),
        body: b"<response><params/></response>".to_vec(),
    })
    .await;
    let mut gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(|config| config.shutdown_grace = Duration::from_secs(60))
        .start()
        .await;
    let mut watch = HealthClient::new(gateway.client_channel().await)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let call = gateway.spawn_case_extract(4, 101337);
    upstream.next_request_body().await;

    gateway.begin_shutdown();
    until_shutdown_began(&mut watch).await;
    assert_refused(gateway.address).await;
    assert!(gateway.is_serving(), "serve returned with a call in flight");

    release.notify_one();
    within(PROMPTLY, "the call in flight did not complete", call)
        .await
        .unwrap()
        .unwrap();
    gateway.join().await.unwrap();
}

/// A call still waiting for the controller when the grace runs out is answered, with a code no
/// retry policy retries and the reason that says the controller may have acted, rather than
/// left with a broken connection, which clients read as UNAVAILABLE and retry.
#[tokio::test]
async fn a_call_the_grace_cuts_off_is_answered_as_maybe_acted_on() {
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let mut gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(|config| config.shutdown_grace = Duration::from_secs(2))
        .start()
        .await;
    let call = gateway.spawn_case_extract(4, 101337);
    upstream.next_request_body().await;
    gateway.begin_shutdown();
    // The upstream never answers, so `serve` can only return because the grace ran out.
    gateway.join().await.unwrap();
    let status = within(PROMPTLY, "the cut-off call was not answered", call)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert_eq!(
        status.message(),
        "case_extract port 4 bin 101337: the gateway is shutting down and its grace of 2s \
         (--shutdown-grace) ran out before the controller answered"
    );
    let info = error_info(&status);
    assert_eq!(info.reason, "SHUTDOWN_GRACE_RAN_OUT");
    assert_eq!(info.metadata["grace"], "2s");
    // The POST was cut off with the call.
    upstream.expect_closed().await;
}

/// With nothing in flight, the gateway's own idle client connection does not hold the 60 s grace.
#[tokio::test]
async fn a_gateway_with_no_calls_stops_at_once() {
    let upstream = FakeUpstream::start(Script::Hang).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(|config| config.shutdown_grace = Duration::from_secs(60))
        .start()
        .await;
    let status = gateway.case_extract(4, 0, None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    within(
        PROMPTLY,
        "an idle gateway did not stop at once",
        gateway.stop(),
    )
    .await
    .unwrap();
}

/// Once `serve` has returned, its port is closed: a new connection is refused at once rather
/// than queued until the caller's deadline.
#[tokio::test]
async fn new_connections_are_refused_after_shutdown() {
    let upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let address = gateway.address;
    gateway.stop().await.unwrap();
    assert_refused(address).await;
}

/// Asserts that connecting to `address` is refused.
async fn assert_refused(address: SocketAddr) {
    let error = TcpStream::connect(address)
        .await
        .expect_err("a connection was accepted after shutdown began");
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
}

/// Issue 19, item 6: with nothing in flight, SIGTERM ends the real binary well before its 30 s
/// grace even though nobody reads its stderr and its log is full: the exit's log flush is bounded
/// on its own, not by the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nothing_in_flight_exits_at_once_while_stderr_is_never_read() {
    let serve =
        TaskgateProcess::start(&["--metrics-listen", "127.0.0.1:0", "--shutdown-grace", "30s"])
            .await;
    // Port 1 is not an AutoCase port: every call gets fault 1087.
    let fault_1087 = CaseExtractRequest {
        port_id: 1,
        bin_id: 101337,
        ..Default::default()
    };
    call_until_log_lines_drop(&serve.gateway, &serve.metrics_url(), fault_1087, "1087").await;
    serve.signal("TERM").await;
    let (code, log) = serve.finish_within(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{log}");
}

/// Issue 19, item 6: a call held at a controller that never answers keeps the real binary for
/// its grace and no longer, though nobody reads its stderr and its log is full. Waiting for the
/// log as long again (as before the fix) would take 16 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_call_in_flight_exits_after_the_grace_while_stderr_is_never_read() {
    const GRACE: Duration = Duration::from_secs(8);
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let serve = TaskgateProcess::start_with_upstream(
        upstream.url.as_str(),
        &["--metrics-listen", "127.0.0.1:0", "--shutdown-grace", "8s"],
    )
    .await;
    // Bin 0 is refused before the controller is called.
    let refused = CaseExtractRequest {
        port_id: 4,
        bin_id: 0,
        ..Default::default()
    };
    call_until_log_lines_drop(&serve.gateway, &serve.metrics_url(), refused, "bin_id").await;
    let held = extract_held_by(&mut upstream, &serve.gateway).await;
    serve.signal("TERM").await;
    let (code, log) = serve.finish_within(GRACE + Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "{log}");
    // It was answered before the process ended: the controller may have acted.
    let ended = within(PROMPTLY, "the held call did not end", held)
        .await
        .unwrap();
    let status = ended.unwrap_err();
    assert_eq!(
        error_info(&status).reason,
        "SHUTDOWN_GRACE_RAN_OUT",
        "{status:?}"
    );
}

/// Issue 20, items 1 and 10: a watcher that has stopped reading (its window full, its buffer not)
/// does not hold SIGTERM's drain: the real binary exits at once, not after its 30 s grace, and
/// its log counts the watch as a watch, not as a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_watcher_that_never_reads_exits_at_once() {
    // Events of 15 extractions, each cancelled at once: EREQ, CR, NOOP.
    const CYCLES: usize = 15;
    let serve =
        TaskgateProcess::start(&["--metrics-listen", "127.0.0.1:0", "--shutdown-grace", "30s"])
            .await;
    let tiny_window = endpoint(serve.gateway.clone())
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let watch_request = || WatchCaseEventsRequest { port_ids: vec![4] };
    let _never_reads = within(PROMPTLY, "the feed did not connect", async {
        let mut client = TaskServiceClient::new(tiny_window);
        loop {
            match client.watch_case_events(watch_request()).await {
                Ok(response) => return response.into_inner(),
                Err(status) => assert_eq!(
                    error_info(&status).reason,
                    "LOG_PUBLISHER_UNAVAILABLE",
                    "{status:?}"
                ),
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut client = TaskServiceClient::new(endpoint(serve.gateway.clone()).connect_lazy());
    for _ in 0..CYCLES {
        let (port_id, bin_id) = (4, 101337);
        client
            .case_extract(CaseExtractRequest {
                port_id,
                bin_id,
                ..Default::default()
            })
            .await
            .unwrap();
        client
            .case_cancel(CaseCancelRequest {
                port_id,
                bin_id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Published to the watch: more than its window holds, fewer than its buffer.
    let metrics_url = serve.metrics_url();
    let noop = format!("taskgate_case_events_total{{state=\"NOOP\"}} {CYCLES}");
    scrape_line(&metrics_url, &noop).await;
    serve.signal("TERM").await;
    let (code, log) = serve.finish_within(Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "{log}");
    let draining = log
        .lines()
        .find(|line| line.contains("no longer accepting calls"))
        .unwrap_or_else(|| panic!("no drain line in:\n{log}"));
    assert!(
        draining.contains("calls=0 watches=1 streams=0"),
        "{draining}"
    );
    assert!(!log.contains("shutdown grace ran out"), "{log}");
}

/// A supervisor may send SIGTERM the moment the gateway says it listens: the signal is caught
/// from before the port is bound, so the process drains and exits 0 rather than dying by the
/// signal's default action (which it did, now and then, when SIGTERM beat the first poll of the
/// shutdown future). Many times over, since one try may miss the moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_as_soon_as_the_gateway_listens_drains_rather_than_kills() {
    for attempt in 0..20 {
        let serve = TaskgateProcess::start(&[]).await;
        serve.signal("TERM").await;
        let (code, log) = serve.finish_within(Duration::from_secs(10)).await;
        assert_eq!(code, Some(0), "attempt {attempt}: {log}");
    }
}

/// An operator or a supervisor may repeat SIGTERM (`kill` run twice, `docker stop` after `kill`),
/// or press Ctrl-C after it: each signal after the first is logged, saying the gateway is
/// already shutting down, and changes nothing: the call in flight is still answered, and the
/// process exits once it has been, within the grace and a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_sigterm_is_logged_and_the_drain_goes_on() {
    const GRACE: Duration = Duration::from_secs(30);
    let release = Arc::new(Notify::new());
    let mut upstream = FakeUpstream::start(Script::RespondWhen {
        release: release.clone(),
        body: b"<response><params/></response>".to_vec(),
    })
    .await;
    let mut serve =
        TaskgateProcess::start_with_upstream(upstream.url.as_str(), &["--shutdown-grace", "30s"])
            .await;
    let held = extract_held_by(&mut upstream, &serve.gateway).await;
    serve.signal("TERM").await;
    serve.wait_for_line("no longer accepting calls").await;
    for (signal, name) in [("TERM", "SIGTERM"), ("INT", "SIGINT")] {
        serve.signal(signal).await;
        let repeated = serve.wait_for_line(&format!("received {name} while")).await;
        assert!(
            repeated.ends_with(&format!(
                " INFO taskgate::shutdown: received {name} while already shutting down; the \
                 drain goes on, bounded by --shutdown-grace grace=30s"
            )),
            "{repeated}"
        );
    }
    release.notify_one();
    within(PROMPTLY, "the held call did not end", held)
        .await
        .unwrap()
        .unwrap();
    let (code, log) = serve.finish_within(GRACE + Duration::from_secs(1)).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("shutdown grace ran out"), "{log}");
}
