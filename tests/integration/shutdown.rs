//! Graceful shutdown: stop accepting, finish calls in flight, bounded by the grace period.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tonic::Code;

use crate::support::{FakeUpstream, Gateway, Script};

#[tokio::test]
async fn a_call_in_flight_completes_after_shutdown_begins() {
    let release = Arc::new(Notify::new());
    let mut upstream = FakeUpstream::start(Script::RespondWhen {
        release: release.clone(),
        body: b"<response><params/></response>".to_vec(),
    })
    .await;
    let mut gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let call = gateway.spawn_case_extract(4, 101337);
    upstream.next_request_body().await;
    gateway.begin_shutdown();
    release.notify_one();
    call.await.unwrap().unwrap();
    gateway.join().await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_waiting_when_the_grace_runs_out() {
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let mut gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(|config| config.shutdown_grace = Duration::from_millis(100))
        .start()
        .await;
    let call = gateway.spawn_case_extract(4, 101337);
    upstream.next_request_body().await;
    gateway.begin_shutdown();
    // The upstream never answers, so `serve` can only return because the grace ran out; the
    // call itself ends with the process (here, with the test).
    gateway.join().await.unwrap();
    assert!(!call.is_finished());
    call.abort();
}

#[tokio::test]
async fn a_gateway_with_no_calls_stops_at_once() {
    let upstream = FakeUpstream::start(Script::Hang).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn new_calls_are_refused_after_shutdown() {
    let upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let address = gateway.address;
    gateway.stop().await.unwrap();
    let connected = taskgate::proto::task_service_client::TaskServiceClient::connect(format!(
        "http://{address}"
    ))
    .await;
    if let Ok(mut client) = connected {
        let status = client
            .case_extract(taskgate::proto::CaseExtractRequest {
                port_id: 4,
                bin_id: 101337,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
}
