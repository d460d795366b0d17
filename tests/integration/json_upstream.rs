//! `--upstream-format json`: the same calls and the same error model over the JSON variant.

use tonic::Code;

use taskgate::codec::WireFormat;
use taskgate::server::Config as GatewayConfig;

use crate::support::{FakeUpstream, Gateway, Script, Seen, error_info, task_fault};

fn json_format(config: &mut GatewayConfig) {
    config.upstream.format = WireFormat::Json;
}

fn json(body: &str) -> Script {
    Script::Respond {
        status: 200,
        content_type: "application/json",
        body: body.as_bytes().to_vec(),
    }
}

#[tokio::test]
async fn every_simulator_outcome_over_json() {
    let gateway = Gateway::builder().config(json_format).start().await;
    gateway.case_extract(4, 101337, None).await.unwrap();
    for (port_id, code, raw_code) in [
        (4, Code::Unavailable, 1148),
        (1, Code::FailedPrecondition, 1087),
        (2, Code::FailedPrecondition, 1099),
        (3, Code::FailedPrecondition, 1149),
        (5, Code::NotFound, 1000),
    ] {
        let status = gateway
            .case_extract(port_id, 101337, None)
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(task_fault(&status).unwrap().raw_code, raw_code);
        assert_eq!(error_info(&status).domain, "autostore.task");
    }
}

#[tokio::test]
async fn the_controller_receives_the_documented_json() {
    let mut upstream = FakeUpstream::start(json(r#"{"response":{"params":{}}}"#)).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(json_format)
        .start()
        .await;
    gateway.case_extract(4, 101337, None).await.unwrap();
    let Seen::Request { headers, body, .. } = upstream.next().await else {
        panic!("expected a request");
    };
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"method":"case_extract","params":{"port_id":4,"bin_id":101337}}"#
    );
}

#[tokio::test]
async fn other_json_is_a_bad_response_and_size_is_capped() {
    for (script, reason) in [
        (json(r#"{"status":"ok"}"#), "UPSTREAM_BAD_RESPONSE"),
        (
            json("<response><params/></response>"),
            "UPSTREAM_BAD_RESPONSE",
        ),
        (
            json(&format!(
                r#"{{"params":{{"pad":"{}"}}}}"#,
                "x".repeat(70_000)
            )),
            "UPSTREAM_RESPONSE_TOO_LARGE",
        ),
    ] {
        let upstream = FakeUpstream::start(script).await;
        let gateway = Gateway::builder()
            .upstream(&upstream.url)
            .config(json_format)
            .start()
            .await;
        let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(error_info(&status).reason, reason);
    }
}
