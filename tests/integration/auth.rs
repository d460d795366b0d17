//! Bearer tokens: task calls need one; health stays open; no token's text ever shows in what a
//! caller or the log sees.

use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use taskgate::auth::TokenFile;
use taskgate::proto::CaseExtractRequest;
use taskgate::proto::task_service_client::TaskServiceClient;

use crate::cli::TaskgateProcess;
use crate::support::{CALL_LIMIT, Gateway, TestFile, endpoint, error_info, within};

/// The token the gateway takes.
const RIGHT_TOKEN: &str = "right-4f1c9e";
/// A token it does not take. Both are unlike any other text, so finding one means it leaked.
const WRONG_TOKEN: &str = "wrong-8b27d3";

/// Writes a token file in a fresh temporary folder, removed when the file is dropped.
pub(crate) fn token_file(name: &str, text: &str) -> TestFile {
    TestFile::new(&format!("auth-{name}"), "tokens", text)
}

/// `authorization` headers the gateway refuses; each holds a token or part of one.
fn refused_authorizations() -> [Option<String>; 4] {
    [
        None,
        Some(format!("Bearer {WRONG_TOKEN}")),
        Some(format!("Basic {RIGHT_TOKEN}")),
        Some(format!("Bearer {RIGHT_TOKEN}{WRONG_TOKEN}")),
    ]
}

fn call(authorization: Option<&str>) -> tonic::Request<CaseExtractRequest> {
    let mut request = tonic::Request::new(CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    });
    if let Some(authorization) = authorization {
        request
            .metadata_mut()
            .insert("authorization", authorization.parse().unwrap());
    }
    request
}

/// Makes one call with each of [`refused_authorizations`]; checks that each is refused with
/// UNAUTHENTICATED and returns the statuses.
async fn refused_calls(client: &mut TaskServiceClient<Channel>) -> Vec<tonic::Status> {
    let mut statuses = Vec::new();
    for authorization in refused_authorizations() {
        let status = client
            .case_extract(call(authorization.as_deref()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{authorization:?}");
        statuses.push(status);
    }
    statuses
}

/// Everything a caller receives with a refusal, as text: the message, every metadata value and
/// the details (ErrorInfo's metadata is UTF-8 inside them).
fn what_the_caller_sees(status: &tonic::Status) -> String {
    let metadata = status.metadata().clone().into_headers();
    let mut seen = status.message().to_owned();
    for (name, value) in &metadata {
        seen.push_str(&format!(
            "\n{name}: {}",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    seen.push('\n');
    seen.push_str(&String::from_utf8_lossy(status.details()));
    seen
}

#[tokio::test]
async fn task_calls_need_a_valid_bearer_token_and_health_stays_open() {
    let gateway = Gateway::builder().auth_tokens(&[RIGHT_TOKEN]).start().await;
    let mut client = gateway.client.clone();

    for status in refused_calls(&mut client).await {
        let error_info = error_info(&status);
        assert_eq!(error_info.reason, "UNAUTHENTICATED");
        assert_eq!(error_info.domain, "taskgate");
        assert!(status.metadata().get("x-request-id").is_some());
        let seen = what_the_caller_sees(&status);
        for token in [RIGHT_TOKEN, WRONG_TOKEN] {
            assert!(
                !seen.contains(token),
                "{token} sent back to the caller:\n{seen}"
            );
        }
    }
    client
        .case_extract(call(Some(&format!("Bearer {RIGHT_TOKEN}"))))
        .await
        .unwrap();

    let health = HealthClient::new(gateway.client_channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
}

/// The real binary's whole log, after refused calls and an accepted one, holds neither token.
#[tokio::test]
async fn no_token_shows_in_the_log() {
    let tokens = token_file("log", &format!("{RIGHT_TOKEN}\n"));
    let serve = TaskgateProcess::start(&["--auth-tokens-file", tokens.to_str().unwrap()]).await;
    let channel = endpoint(serve.gateway.clone()).connect().await.unwrap();
    let mut client = TaskServiceClient::new(channel);
    refused_calls(&mut client).await;
    let mut accepted = call(Some(&format!("Bearer {RIGHT_TOKEN}")));
    accepted
        .metadata_mut()
        .insert("x-request-id", "auth-accepted".parse().unwrap());
    client.case_extract(accepted).await.unwrap();

    serve.signal("TERM").await;
    let (code, log) = serve.finish().await;
    assert_eq!(code, Some(0), "{log}");
    // The log holds the calls' lines, so a token in any of them would be found.
    assert!(log.contains("request_id=auth-accepted"), "{log}");
    for token in [RIGHT_TOKEN, WRONG_TOKEN] {
        assert!(!log.contains(token), "{token} in the log:\n{log}");
    }
}

#[test]
fn token_file_errors_name_the_file_and_line_but_not_the_token() {
    let path = token_file("bad", "good-token\nbad token\n");
    let message = TokenFile::load(&path).unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("line 2"), "{message}");
    assert!(!message.contains("bad token"), "{message}");
    assert!(!message.contains("good-token"), "{message}");

    let path = token_file("empty", "# nobody\n");
    let message = TokenFile::load(&path).unwrap_err().to_string();
    assert!(message.contains("has no tokens"), "{message}");
}

/// Issue 25: a token file replaced as Kubernetes replaces a mounted Secret's (a new file moved
/// into place) is reloaded without SIGHUP, which Kubernetes never sends: the new token is taken
/// and the old one refused, within a bounded wait.
#[tokio::test]
async fn a_replaced_token_file_is_reloaded_without_sighup() {
    let tokens = token_file("replaced", &format!("{RIGHT_TOKEN}\n"));
    let path = tokens.to_path_buf();
    let gateway = Gateway::builder()
        .config(move |config| config.auth_tokens = Some(TokenFile::load(&path).unwrap()))
        .start()
        .await;
    let mut client = gateway.client.clone();
    let mut code = async |token: &str| match client
        .case_extract(call(Some(&format!("Bearer {token}"))))
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    assert_ne!(code(RIGHT_TOKEN).await, Code::Unauthenticated);
    assert_eq!(code(WRONG_TOKEN).await, Code::Unauthenticated);

    let next = tokens.with_file_name("tokens.next");
    std::fs::write(&next, format!("{WRONG_TOKEN}\n")).unwrap();
    std::fs::rename(&next, &tokens).unwrap();
    let reloaded = async {
        while code(WRONG_TOKEN).await == Code::Unauthenticated {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    within(
        CALL_LIMIT,
        "the replaced token file was not reloaded",
        reloaded,
    )
    .await;
    assert_eq!(code(RIGHT_TOKEN).await, Code::Unauthenticated);
}
