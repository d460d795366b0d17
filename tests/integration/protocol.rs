//! gRPC rules tonic leaves unchecked (issue 8, finding 8): a malformed `grpc-timeout` and a
//! second request message on a one-message method are refused before the controller is called.

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

use taskgate::proto::CaseExtractRequest;

use crate::support::{
    CASE_EXTRACT, FakeUpstream, Gateway, Script, case_extract_stream,
    case_extract_with_grpc_timeout, error_info,
};

/// The longest any call here may take: each is answered at once or fails the test.
const CALL_WAIT: Duration = Duration::from_secs(10);

fn request() -> CaseExtractRequest {
    CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    }
}

/// A gateway in front of a fake controller that answers every call with success.
async fn gateway() -> (Gateway, FakeUpstream) {
    let upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    (gateway, upstream)
}

/// tonic reads a malformed grpc-timeout as no deadline at all; the gateway refuses it, naming the
/// header and the value, and never calls the controller.
#[tokio::test]
async fn a_malformed_grpc_timeout_is_invalid_argument() {
    let (gateway, mut upstream) = gateway().await;
    for value in ["abc", "-5S", "1.5S", "123456789S", "5s", "+5S", "S"] {
        let status = case_extract_with_grpc_timeout(&gateway.client, value)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{value}");
        assert_eq!(
            status.message(),
            format!(
                "malformed grpc-timeout header '{value}': expected 1 to 8 digits and a unit (H, \
                 M, S, m, u or n), for example 500m"
            )
        );
        let error_info = error_info(&status);
        assert_eq!(error_info.reason, "MALFORMED_GRPC_TIMEOUT");
        assert_eq!(error_info.domain, "taskgate");
        assert!(status.metadata().get("x-request-id").is_some());
    }
    assert_eq!(upstream.requests_so_far(), 0);

    // The same rule holds for health, which needs no token.
    let mut check = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    check
        .metadata_mut()
        .insert("grpc-timeout", "1.5S".parse().unwrap());
    let mut health = HealthClient::new(gateway.client_channel().await);
    let status = tokio::time::timeout(CALL_WAIT, health.check(check))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Well-formed values still work, up to the spec's eight digits.
    for value in ["5S", "99999999m"] {
        case_extract_with_grpc_timeout(&gateway.client, value)
            .await
            .unwrap();
    }
    assert_eq!(upstream.requests_so_far(), 2);
}

/// A unary call with two request messages was answered OK; now it is refused with INTERNAL, as
/// grpc-java and grpc-go refuse it, and the controller is not called. One message over the same
/// raw path still works, and reflection, which streams requests, still takes several.
#[tokio::test]
async fn a_second_request_message_on_a_unary_call_is_internal() {
    let (gateway, mut upstream) = gateway().await;
    let status = case_extract_stream(gateway.client_channel().await, vec![request(), request()])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(
        status.message(),
        "/taskgate.v1.TaskService/CaseExtract takes one request message, and a second one arrived"
    );
    let error_info = error_info(&status);
    assert_eq!(error_info.reason, "TOO_MANY_REQUEST_MESSAGES");
    assert_eq!(error_info.metadata["method"], CASE_EXTRACT);
    assert_eq!(upstream.requests_so_far(), 0);

    case_extract_stream(gateway.client_channel().await, vec![request()])
        .await
        .unwrap();
    assert_eq!(upstream.requests_so_far(), 1);

    let list_services = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(gateway.client_channel().await);
    let mut responses = tokio::time::timeout(
        CALL_WAIT,
        reflection.server_reflection_info(tokio_stream::iter([list_services(), list_services()])),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    for _ in 0..2 {
        let response = tokio::time::timeout(CALL_WAIT, responses.message()).await;
        assert!(response.unwrap().unwrap().is_some());
    }
}
