//! Every task call is counted and logged by one layer, whatever refused it: a call refused for its
//! token, for a malformed grpc-timeout or for the size of its message is in the metrics and the
//! access log like one the controller answered.

use tonic::Code;
use tonic::metadata::MetadataValue;

use taskgate::proto::CaseExtractRequest;

use crate::cli::TaskgateProcess;
use crate::support::{Gateway, scrape_line};

fn request() -> tonic::Request<CaseExtractRequest> {
    tonic::Request::new(CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    })
}

#[tokio::test]
async fn refused_calls_are_counted() {
    let gateway = Gateway::builder()
        .auth_tokens(&["right-token"])
        .metrics()
        .start()
        .await;
    let metrics_url = gateway.metrics_url();
    let mut client = gateway.client.clone();

    let refused = client.case_extract(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    let mut malformed = request();
    malformed.metadata_mut().insert(
        "authorization",
        MetadataValue::from_static("Bearer right-token"),
    );
    malformed
        .metadata_mut()
        .insert("grpc-timeout", MetadataValue::from_static("abc"));
    let refused = client.case_extract(malformed).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    for expected in [
        "taskgate_calls_total{method=\"case_extract\",code=\"UNAUTHENTICATED\"} 1",
        "taskgate_calls_total{method=\"case_extract\",code=\"INVALID_ARGUMENT\"} 1",
        "taskgate_calls_in_flight 0",
    ] {
        scrape_line(metrics_url, expected).await;
    }
}

/// The real binary: the access line of a call refused for its token has the code, the request
/// ID and the error, and no port or bin (the message was never read).
#[tokio::test]
async fn a_call_refused_for_its_token_writes_an_access_line() {
    let path = crate::auth::token_file("access", "right-token\n");
    let serve = TaskgateProcess::start(&["--auth-tokens-file", path.to_str().unwrap()]).await;
    let mut client =
        taskgate::proto::task_service_client::TaskServiceClient::connect(serve.gateway.clone())
            .await
            .unwrap();
    let mut call = request();
    call.metadata_mut()
        .insert("x-request-id", MetadataValue::from_static("refused-1"));
    let refused = client.case_extract(call).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    serve.signal("TERM").await;
    let (code, log) = serve.finish().await;
    assert_eq!(code, Some(0), "{log}");
    let line = log
        .lines()
        .find(|line| line.contains("taskgate::access") && line.contains("request_id=refused-1"))
        .unwrap_or_else(|| panic!("no access line for the refused call:\n{log}"));
    let (_, fields) = line.split_once("taskgate::access: ").unwrap();
    let fields = fields.split(" total_ms=").next().unwrap();
    assert_eq!(
        fields,
        "call method=\"case_extract\" grpc_code=\"UNAUTHENTICATED\""
    );
    assert!(
        line.ends_with(&format!(
            "request_id=refused-1 peer={} error=\"{}\"",
            line.split(" peer=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap(),
            refused.message()
        )),
        "{line}"
    );
}

/// A call its caller gives up on while the controller still has it is counted and logged too,
/// as CANCELLED: the README promises one access line and one count per task call, whatever
/// ended it.
#[tokio::test]
async fn a_call_its_caller_gives_up_on_is_counted_as_cancelled() {
    let mut upstream = crate::support::FakeUpstream::start(crate::support::Script::Hang).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .metrics()
        .start()
        .await;
    let mut client = gateway.client.clone();
    let call = tokio::spawn(async move { client.case_extract(request()).await });
    // The POST has reached the controller: the call is in the gateway, waiting.
    crate::support::within(
        crate::support::PROMPTLY,
        "the controller to receive the POST",
        upstream.next_request_body(),
    )
    .await;
    call.abort();
    for expected in [
        "taskgate_calls_total{method=\"case_extract\",code=\"CANCELLED\"} 1",
        "taskgate_calls_in_flight 0",
    ] {
        scrape_line(gateway.metrics_url(), expected).await;
    }
}
