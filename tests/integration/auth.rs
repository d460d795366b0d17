//! Bearer tokens: task calls need one; health stays open; a token never shows in an error.

use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use taskgate::auth::TokenFile;
use taskgate::proto::CaseExtractRequest;

use crate::support::{Gateway, TestFile, error_info};

/// Writes a token file in a fresh temporary folder, removed when the file is dropped.
pub(crate) fn token_file(name: &str, text: &str) -> TestFile {
    TestFile::new(&format!("auth-{name}"), "tokens", text)
}

fn call(authorization: Option<&str>) -> tonic::Request<CaseExtractRequest> {
    let mut request = tonic::Request::new(CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
    });
    if let Some(authorization) = authorization {
        request
            .metadata_mut()
            .insert("authorization", authorization.parse().unwrap());
    }
    request
}

#[tokio::test]
async fn task_calls_need_a_valid_bearer_token_and_health_stays_open() {
    let gateway = Gateway::builder()
        .auth_tokens(&["right-token"])
        .start()
        .await;
    let mut client = gateway.client.clone();

    for authorization in [None, Some("Bearer wrong-token"), Some("Basic right-token")] {
        let status = client.case_extract(call(authorization)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{authorization:?}");
        let error_info = error_info(&status);
        assert_eq!(error_info.reason, "UNAUTHENTICATED");
        assert_eq!(error_info.domain, "taskgate");
        assert!(!status.message().contains("token-"), "{}", status.message());
        assert!(status.metadata().get("x-request-id").is_some());
    }
    client
        .case_extract(call(Some("Bearer right-token")))
        .await
        .unwrap();

    let health = HealthClient::new(gateway.client_channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
}

#[test]
fn token_file_errors_name_the_file_and_line_but_not_the_token() {
    let path = token_file("bad", "good-token\nbad token\n");
    let message = TokenFile::load(&path).unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("line 2"), "{message}");
    assert!(!message.contains("bad token"), "{message}");

    let path = token_file("empty", "# nobody\n");
    let message = TokenFile::load(&path).unwrap_err().to_string();
    assert!(message.contains("has no tokens"), "{message}");
}
