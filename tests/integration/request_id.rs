//! Request IDs: caller → controller header → response metadata, on success and on errors.

use tonic::metadata::MetadataMap;

use taskgate::proto::CaseExtractRequest;

use crate::cli::{BIN, TaskgateProcess};
use crate::support::{FakeUpstream, Gateway, Script, Seen};

fn request_with_id(request_id: Option<&str>) -> tonic::Request<CaseExtractRequest> {
    let mut request = tonic::Request::new(CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    });
    if let Some(request_id) = request_id {
        request
            .metadata_mut()
            .insert("x-request-id", request_id.parse().unwrap());
    }
    request
}

fn returned_id(metadata: &MetadataMap) -> String {
    metadata
        .get("x-request-id")
        .expect("no x-request-id in the response metadata")
        .to_str()
        .unwrap()
        .to_owned()
}

async fn id_seen_by_controller(upstream: &mut FakeUpstream) -> String {
    match upstream.next().await {
        Seen::Request { headers, .. } => headers["x-request-id"].clone(),
        Seen::Closed => panic!("expected a request"),
    }
}

#[tokio::test]
async fn the_callers_id_reaches_the_controller_and_comes_back() {
    let mut upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let response = gateway
        .client
        .clone()
        .case_extract(request_with_id(Some("order-7/pick-3")))
        .await
        .unwrap();
    assert_eq!(returned_id(response.metadata()), "order-7/pick-3");
    assert_eq!(id_seen_by_controller(&mut upstream).await, "order-7/pick-3");
}

#[tokio::test]
async fn errors_carry_the_id_too() {
    let mut upstream = FakeUpstream::start(Script::ok_xml(
        "<response><fault><code>1149</code></fault></response>",
    ))
    .await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let status = gateway
        .client
        .clone()
        .case_extract(request_with_id(Some("abc")))
        .await
        .unwrap_err();
    assert_eq!(returned_id(status.metadata()), "abc");
    assert_eq!(id_seen_by_controller(&mut upstream).await, "abc");

    // Refused before the controller is called, and still identified.
    let mut invalid = request_with_id(Some("def"));
    invalid.get_mut().port_id = 0;
    let status = gateway
        .client
        .clone()
        .case_extract(invalid)
        .await
        .unwrap_err();
    assert_eq!(returned_id(status.metadata()), "def");
}

#[tokio::test]
async fn a_missing_or_unusable_id_is_replaced_by_a_fresh_one() {
    let mut upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let too_long = "x".repeat(129);
    for caller_id in [None, Some(too_long.as_str())] {
        let response = gateway
            .client
            .clone()
            .case_extract(request_with_id(caller_id))
            .await
            .unwrap();
        let request_id = returned_id(response.metadata());
        assert_eq!(request_id.len(), 36, "{request_id}");
        assert_eq!(id_seen_by_controller(&mut upstream).await, request_id);
    }
}

/// The request ID in a log line's `call{request_id=…}` span, if it is in one.
fn span_request_id(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once(" call{request_id=")?;
    rest.split([' ', '}']).next()
}

/// With the gateway's own debug lines on, every line of a call sits in its `call` span and so
/// carries its request ID: the debug line of the controller call, the access line, and a
/// watch's access line, which is written as its stream ends, outside the call's future.
#[tokio::test]
async fn at_debug_level_every_line_of_a_call_carries_its_request_id() {
    let mut gateway = TaskgateProcess::start_serving(TaskgateProcess::spawn_command(
        tokio::process::Command::new(BIN)
            .args(["serve", "--simulator", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info,taskgate=debug"),
    ))
    .await;
    let client =
        taskgate::proto::task_service_client::TaskServiceClient::connect(gateway.gateway.clone())
            .await
            .unwrap();
    client
        .clone()
        .case_extract(request_with_id(Some("rid-debug-1")))
        .await
        .unwrap();
    let calling = gateway.wait_for_line("calling the controller").await;
    assert_eq!(span_request_id(&calling), Some("rid-debug-1"), "{calling}");
    let access = gateway.wait_for_line("taskgate::access").await;
    assert_eq!(span_request_id(&access), Some("rid-debug-1"), "{access}");
    assert!(access.contains(" request_id=rid-debug-1 "), "{access}");

    drop(crate::watch::watch(&client, &[4]).await);
    let watched = gateway.wait_for_line("method=\"watch_case_events\"").await;
    let watch_id = span_request_id(&watched).unwrap_or_else(|| panic!("no span: {watched}"));
    assert!(
        watched.contains(&format!(" request_id={watch_id} ")),
        "{watched}"
    );
}
