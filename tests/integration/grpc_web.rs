//! gRPC-Web over HTTP/1.1 on the gRPC port, and CORS for browser pages on other origins.

use base64::Engine as _;
use prost::Message;
use reqwest::header::{HeaderMap, HeaderValue};

use taskgate::proto::{CaseExtractRequest, TASK_FAULT_TYPE_URL, TaskFault};

use crate::support::{FakeUpstream, Gateway, Script, Seen, http_client};

const PATH: &str = "/taskgate.v1.TaskService/CaseExtract";

/// The body of a gRPC-Web call: one uncompressed data frame.
fn frame(request: &CaseExtractRequest) -> Vec<u8> {
    let message = request.encode_to_vec();
    let mut body = vec![0];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(message);
    body
}

/// The grpc-status and grpc-status-details-bin of a gRPC-Web reply, from the headers of a
/// trailers-only reply or from the trailer frame at the end of the body.
fn status_of(headers: &HeaderMap, body: &[u8]) -> (String, Option<String>) {
    if let Some(status) = headers.get("grpc-status") {
        let details = headers
            .get("grpc-status-details-bin")
            .map(|value| value.to_str().unwrap().to_owned());
        return (status.to_str().unwrap().to_owned(), details);
    }
    let mut rest = body;
    while rest.len() >= 5 {
        let length = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let (payload, next) = rest[5..].split_at(length);
        if rest[0] & 0x80 != 0 {
            let trailers = String::from_utf8(payload.to_vec()).unwrap();
            let field = |name: &str| {
                trailers.lines().find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| value.trim().to_owned())
                })
            };
            return (
                field("grpc-status").unwrap(),
                field("grpc-status-details-bin"),
            );
        }
        rest = next;
    }
    panic!("no grpc-status in the reply");
}

async fn call(gateway: &Gateway, port_id: u32) -> (String, Option<String>) {
    let response = http_client()
        .post(format!("http://{}{PATH}", gateway.address))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(frame(&CaseExtractRequest {
            port_id,
            bin_id: 101337,
            ..Default::default()
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/grpc-web+proto"
    );
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    status_of(&headers, &body)
}

#[tokio::test]
async fn case_extract_over_grpc_web_with_typed_faults() {
    let gateway = Gateway::builder().start().await;
    assert_eq!(call(&gateway, 4).await, ("0".to_owned(), None));

    let (status, details) = call(&gateway, 2).await;
    assert_eq!(status, "9"); // FAILED_PRECONDITION
    let details = details.expect("no grpc-status-details-bin");
    let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(details.trim_end_matches('='))
        .unwrap();
    let rpc_status = tonic_types::pb::Status::decode(decoded.as_slice()).unwrap();
    let task_fault = rpc_status
        .details
        .iter()
        .find(|any| any.type_url == TASK_FAULT_TYPE_URL)
        .map(|any| TaskFault::decode(any.value.as_slice()).unwrap())
        .unwrap();
    assert_eq!(task_fault.raw_code, 1099);
}

async fn preflight(gateway: &Gateway, origin: &str) -> HeaderMap {
    preflight_for(gateway, origin, "content-type,x-grpc-web").await
}

/// The preflight a browser sends before a call from `origin` with `request_headers`.
async fn preflight_for(gateway: &Gateway, origin: &str, request_headers: &str) -> HeaderMap {
    http_client()
        .request(
            reqwest::Method::OPTIONS,
            format!("http://{}{PATH}", gateway.address),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", request_headers)
        .send()
        .await
        .unwrap()
        .headers()
        .clone()
}

#[tokio::test]
async fn cors_is_off_unless_an_origin_is_allowed() {
    let gateway = Gateway::builder().start().await;
    let headers = preflight(&gateway, "https://ops.example.com").await;
    assert!(
        headers.get("access-control-allow-origin").is_none(),
        "{headers:?}"
    );

    let gateway = Gateway::builder()
        .config(|config| {
            config.cors_allow_origins = vec![HeaderValue::from_static("https://ops.example.com")];
        })
        .start()
        .await;
    let headers = preflight(&gateway, "https://ops.example.com").await;
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://ops.example.com"
    );
    let allowed = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("x-grpc-web"), "{allowed}");
    let headers = preflight(&gateway, "https://elsewhere.example.com").await;
    assert!(
        headers.get("access-control-allow-origin").is_none(),
        "{headers:?}"
    );
}

/// A page that traces its calls sends W3C trace context with each one: the preflight allows
/// `traceparent` and `tracestate` (Chromium refused the call before, issue 22).
#[tokio::test]
async fn a_traced_page_may_send_trace_context() {
    let gateway = Gateway::builder()
        .config(|config| {
            config.cors_allow_origins = vec![HeaderValue::from_static("https://ops.example.com")];
        })
        .start()
        .await;
    let headers = preflight_for(
        &gateway,
        "https://ops.example.com",
        "content-type,x-grpc-web,traceparent,tracestate",
    )
    .await;
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://ops.example.com"
    );
    let allowed: Vec<&str> = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .split(',')
        .map(str::trim)
        .collect();
    for header in ["content-type", "x-grpc-web", "traceparent", "tracestate"] {
        assert!(allowed.contains(&header), "{header} not in {allowed:?}");
    }
}

/// A browser page's trace context, sent over gRPC-Web, reaches the controller in the same
/// trace, as it does over gRPC.
#[tokio::test]
async fn a_grpc_web_calls_trace_context_reaches_the_controller() {
    let mut upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = http_client()
        .post(format!("http://{}{PATH}", gateway.address))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("traceparent", traceparent)
        .header("tracestate", "page=checkout")
        .body(frame(&CaseExtractRequest {
            port_id: 4,
            bin_id: 101337,
            ..Default::default()
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let Seen::Request { headers, .. } = upstream.next().await else {
        panic!("expected a request");
    };
    assert_eq!(
        headers.get("traceparent").map(String::as_str),
        Some(traceparent)
    );
    assert_eq!(
        headers.get("tracestate").map(String::as_str),
        Some("page=checkout")
    );
}
