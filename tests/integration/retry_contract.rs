//! The retry contract on the real binary: a client that retries exactly as the published gRPC
//! service config says never makes the controller see a POST twice when it may have acted on the
//! first, and does retry what the controller declined.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use taskgate::fault::grpc_code_name;
use taskgate::proto::CaseExtractRequest;
use taskgate::proto::task_service_client::TaskServiceClient;

use crate::cli::TaskgateProcess;
use crate::support::{FakeUpstream, Script, error_info, within};

/// Long enough for every attempt of one call against a fake controller on loopback.
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// The retry policy of the service config that README.md publishes, which docs/clients.md must
/// publish word for word.
pub(crate) struct PublishedPolicy {
    pub(crate) max_attempts: u64,
    pub(crate) retryable_status_codes: Vec<String>,
}

impl PublishedPolicy {
    pub(crate) fn read() -> PublishedPolicy {
        let root = env!("CARGO_MANIFEST_DIR");
        let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
        let clients = std::fs::read_to_string(format!("{root}/docs/clients.md")).unwrap();
        let config = service_config(&readme, "### Retry contract");
        assert_eq!(
            service_config(&clients, "## Which errors to retry"),
            config,
            "docs/clients.md publishes another service config than README.md"
        );
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        let [method_config] = config["methodConfig"].as_array().unwrap().as_slice() else {
            panic!("the published service config has more than one methodConfig");
        };
        assert_eq!(
            method_config["name"],
            serde_json::json!([{ "service": "taskgate.v1.TaskService" }])
        );
        let retry_policy = &method_config["retryPolicy"];
        PublishedPolicy {
            max_attempts: retry_policy["maxAttempts"].as_u64().unwrap(),
            retryable_status_codes: retry_policy["retryableStatusCodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|code| code.as_str().unwrap().to_owned())
                .collect(),
        }
    }

    /// Calls CaseExtract (port 4, bin 101337) as a gRPC client with this retry policy would:
    /// again while the status is retryable, up to `maxAttempts` calls in all. The backoff is
    /// left out: it changes when a retry is sent, not whether.
    async fn case_extract(&self, gateway: &str) -> tonic::Status {
        let mut client = TaskServiceClient::connect(gateway.to_owned())
            .await
            .unwrap();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let request = CaseExtractRequest {
                port_id: 4,
                bin_id: 101337,
                ..Default::default()
            };
            let status = client.case_extract(request).await.unwrap_err();
            let retryable = self
                .retryable_status_codes
                .iter()
                .any(|name| name == grpc_code_name(status.code()));
            if !retryable || attempts == self.max_attempts {
                return status;
            }
        }
    }
}

/// The first ```json block after `heading` in `markdown`.
fn service_config(markdown: &str, heading: &str) -> String {
    let (_, section) = markdown
        .split_once(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no {heading:?} heading"));
    let (_, block) = section.split_once("```json\n").unwrap();
    let (config, _) = block.split_once("```").unwrap();
    config.to_owned()
}

/// The issue's five-POST case: the controller reads the POST and drops the connection, so it
/// may have started the extraction. The client hears UNKNOWN, which the policy does not retry.
#[tokio::test]
async fn the_published_policy_sends_one_post_when_the_controller_may_have_acted() {
    let policy = PublishedPolicy::read();
    assert_eq!(policy.retryable_status_codes, ["UNAVAILABLE"]);
    let mut upstream = FakeUpstream::start(Script::Drop).await;
    let gateway = TaskgateProcess::start_with_upstream(upstream.url.as_str(), &[]).await;
    let status = within(
        CALL_LIMIT,
        "the call did not end",
        policy.case_extract(&gateway.gateway),
    )
    .await;
    assert_eq!(
        upstream.requests_so_far(),
        1,
        "the controller saw a second POST"
    );
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert_eq!(error_info(&status).reason, "UPSTREAM_CONNECTION_LOST");
    assert_eq!(
        status.message(),
        "case_extract port 4 bin 101337: the connection to the controller failed: connection \
         closed before message completed"
    );
    assert!(status.get_details_retry_info().is_none());
}

/// HTTP 503: the controller declined, so the same policy retries, up to its `maxAttempts`.
#[tokio::test]
async fn the_published_policy_retries_what_the_controller_declined() {
    let policy = PublishedPolicy::read();
    let mut upstream = FakeUpstream::start(Script::Respond {
        status: 503,
        content_type: "text/plain",
        body: b"busy".to_vec(),
    })
    .await;
    let gateway = TaskgateProcess::start_with_upstream(upstream.url.as_str(), &[]).await;
    let status = within(
        CALL_LIMIT,
        "the call did not end",
        policy.case_extract(&gateway.gateway),
    )
    .await;
    assert_eq!(upstream.requests_so_far() as u64, policy.max_attempts);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).reason, "UPSTREAM_HTTP_ERROR");
    assert_eq!(
        status.message(),
        "case_extract port 4 bin 101337: the controller answered HTTP 503 Service Unavailable"
    );
    let retry_info = status.get_details_retry_info().unwrap();
    assert_eq!(retry_info.retry_delay, Some(Duration::from_secs(1)));
}

/// gRPC's built-in retry (grpc-core, grpc-go) ignores `RetryInfo` and waits only as long as the
/// `grpc-retry-pushback-ms` trailer says: a 1148 carries both, the trailer jittered up to half the
/// delay again, so a caller using the published policy waits at least `--retry-delay` before its
/// retry, whichever it reads.
#[tokio::test]
async fn a_retryable_status_carries_its_delay_as_the_pushback_trailer_too() {
    let fault = "<response><fault><code>1148</code></fault></response>";
    let upstream = FakeUpstream::start(Script::ok_xml(fault)).await;
    let gateway =
        TaskgateProcess::start_with_upstream(upstream.url.as_str(), &["--retry-delay", "2500ms"])
            .await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let request = CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    };
    let status = within(
        CALL_LIMIT,
        "the call did not end",
        client.case_extract(request),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let retry_info = status.get_details_retry_info().unwrap();
    assert_eq!(retry_info.retry_delay, Some(Duration::from_millis(2500)));
    let pushback = status.metadata().get("grpc-retry-pushback-ms");
    let millis: u64 = pushback.unwrap().to_str().unwrap().parse().unwrap();
    assert!((2500..3750).contains(&millis), "{:?}", status.metadata());
}
