//! Request IDs: caller → controller header → response metadata, on success and on errors.

use tonic::metadata::MetadataMap;

use taskgate::proto::CaseExtractRequest;

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
