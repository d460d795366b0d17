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

/// A reflection request for the list of services, padded far beyond any real one.
#[derive(Clone, PartialEq, prost::Message)]
struct PaddedListServices {
    #[prost(string, tag = "7")]
    list_services: String,
    #[prost(bytes = "vec", tag = "99")]
    padding: Vec<u8>,
}

/// Health and reflection take requests from any peer too, and each stream of theirs holds its
/// message while it arrives: the 4 KiB limit, and the README's budget of a stream, hold for
/// them as for the task service (tonic's own limit is 4 MiB).
#[tokio::test]
async fn oversized_health_and_reflection_requests_are_refused_before_decoding() {
    let gateway = Gateway::builder().start().await;
    let mut grpc = tonic::client::Grpc::new(gateway.client_channel().await);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(Oversized {
                padding: vec![0; 8 * 1024],
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
            tonic_prost::ProstCodec::<Oversized, tonic_health::pb::HealthCheckResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // Reflection ends its stream at a message it cannot read, without a status of its own: the
    // request is not answered.
    for path in [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        let request = PaddedListServices {
            // Not empty, which prost would leave out: reflection reads the field's presence.
            list_services: "*".to_owned(),
            padding: vec![0; 8 * 1024],
        };
        grpc.ready().await.unwrap();
        let answer = grpc
            .streaming(
                tonic::Request::new(futures_util::stream::iter([request])),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<PaddedListServices, Oversized>::default(),
            )
            .await
            .unwrap()
            .into_inner()
            .message()
            .await;
        assert!(matches!(answer, Ok(None)), "{path}: {answer:?}");
    }
}
