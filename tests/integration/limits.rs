//! Overload: beyond `max_in_flight` calls are shed at once, and cancelled calls free their slot.

use std::num::NonZeroUsize;

use tonic::Code;

use crate::support::{FakeUpstream, Gateway, Script, error_info};

#[tokio::test]
async fn calls_beyond_the_limit_are_shed_with_overloaded() {
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(|config| config.upstream.max_in_flight = NonZeroUsize::new(2).unwrap())
        .start()
        .await;
    let first = gateway.spawn_case_extract(4, 101337);
    let second = gateway.spawn_case_extract(4, 101337);
    upstream.next_request_body().await;
    upstream.next_request_body().await;

    let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let error_info = error_info(&status);
    assert_eq!(error_info.reason, "OVERLOADED");
    assert_eq!(error_info.domain, "taskgate");
    assert_eq!(upstream.requests_so_far(), 0);

    // Cancelled calls give their slots back.
    first.abort();
    second.abort();
    upstream.expect_closed().await;
    upstream.expect_closed().await;
    let third = gateway.spawn_case_extract(4, 101337);
    upstream.next_request_body().await;
    third.abort();
}

/// A request with a big unknown field: valid protobuf, but far beyond any task request.
#[derive(Clone, PartialEq, prost::Message)]
struct Oversized {
    #[prost(bytes = "vec", tag = "99")]
    padding: Vec<u8>,
}

#[tokio::test]
async fn oversized_requests_are_refused_before_decoding() {
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let mut grpc = tonic::client::Grpc::new(gateway.client_channel().await);
    grpc.ready().await.unwrap();
    let codec =
        tonic_prost::ProstCodec::<Oversized, taskgate::proto::CaseExtractResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/taskgate.v1.TaskService/CaseExtract",
    );
    let request = tonic::Request::new(Oversized {
        padding: vec![0; 8 * 1024],
    });
    let status = grpc.unary(request, path, codec).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(upstream.requests_so_far(), 0);
}
