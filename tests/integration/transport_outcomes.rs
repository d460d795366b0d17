//! Every transport outcome against a scripted fake controller.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tonic::Code;
use tonic_types::StatusExt;

use taskgate::proto::{CaseGetStateResponse, CaseState, FaultCode, TaskFault};

use crate::support::{
    CALL_LIMIT, FakeUpstream, Gateway, Script, Seen, error_info, error_info_count, metadata,
    task_fault, unused_address, within,
};

/// Checks a gateway error of CaseExtract (port 4, bin 101337) exactly; see [`check_error_of`].
fn check_gateway_error(status: &tonic::Status, code: Code, reason: &str, extra: &[(&str, &str)]) {
    let call = [
        ("method", "case_extract"),
        ("portId", "4"),
        ("binId", "101337"),
    ];
    check_error_of(status, &call, code, reason, extra);
}

/// Checks a gateway error of the call described by `call` (its ErrorInfo metadata) exactly:
/// gRPC code, ErrorInfo domain/reason/metadata, no TaskFault, and a message naming the call.
fn check_error_of(
    status: &tonic::Status,
    call: &[(&str, &str)],
    code: Code,
    reason: &str,
    extra: &[(&str, &str)],
) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_info_count(status), 1);
    let error_info = error_info(status);
    assert_eq!(error_info.domain, "taskgate");
    assert_eq!(error_info.reason, reason);
    let mut expected = metadata(call);
    expected.extend(metadata(extra));
    assert_eq!(error_info.metadata, expected);
    assert_eq!(task_fault(status), None);
    let what = match call {
        [(_, method), (_, port), (_, bin)] => format!("{method} port {port} bin {bin}: "),
        [(_, method), (_, port)] => format!("{method} port {port}: "),
        other => panic!("not a call's metadata: {other:?}"),
    };
    assert!(status.message().starts_with(&what), "{}", status.message());
}

async fn call_through(script: Script) -> (tonic::Status, FakeUpstream) {
    let mut upstream = FakeUpstream::start(script).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
    // Whatever happened, the gateway sent exactly one request: a POST is never retried.
    assert_eq!(upstream.requests_so_far(), 1);
    (status, upstream)
}

#[tokio::test]
async fn the_controller_receives_the_documented_xml() {
    let mut upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    gateway.case_extract(4, 101337, None).await.unwrap();
    let Seen::Request {
        request_line,
        headers,
        body,
    } = upstream.next().await
    else {
        panic!("expected a request");
    };
    assert_eq!(request_line, "POST /api/v2/task HTTP/1.1");
    assert_eq!(headers["content-type"], "application/xml");
    // `Host` names the controller as its URL does, port included.
    let port = upstream.url.port().unwrap();
    assert_eq!(headers["host"], format!("127.0.0.1:{port}"));
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "<?xml version=\"1.0\"?>\n<methodcall>\n  <name>case_extract</name>\n  <params>\n    \
         <port_id>4</port_id>\n    <bin_id>101337</bin_id>\n  </params>\n</methodcall>\n"
    );
}

/// CaseGetState sends `case_getstate` with the port alone, and reads the data of the reply.
#[tokio::test]
async fn case_get_state_sends_the_port_and_reads_the_reply() {
    let reply = "<response><params><port_id>4</port_id><bin_id>101337</bin_id>\
                 <case_state>ERSO</case_state></params></response>";
    let mut upstream = FakeUpstream::start(Script::ok_xml(reply)).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let response = gateway.case_get_state(4).await.unwrap();
    assert_eq!(
        response,
        CaseGetStateResponse {
            port_id: 4,
            bin_id: Some(101337),
            state: CaseState::ExtractionReadyToSend as i32,
            raw_state: "ERSO".to_owned(),
        }
    );
    let Seen::Request { body, .. } = upstream.next().await else {
        panic!("expected a request");
    };
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "<?xml version=\"1.0\"?>\n<methodcall>\n  <name>case_getstate</name>\n  <params>\n    \
         <port_id>4</port_id>\n  </params>\n</methodcall>\n"
    );
}

/// A `case_getstate` reply without a state, with a state the gateway does not know, or about
/// another port is refused, never turned into a guess (issue 10).
#[tokio::test]
async fn case_get_state_replies_that_cannot_be_trusted_are_bad_responses() {
    let cases = [
        (
            "<port_id>4</port_id><bin_id>101337</bin_id>",
            "<params> has no <case_state>",
        ),
        (
            "<port_id>4</port_id><case_state>EXTR</case_state>",
            "<case_state> holds 'EXTR', not one of NOOP, EREQ, ERSO, ECMP, IREQ, IRTR, ICRC, \
             ICIN or ICMP",
        ),
        (
            "<port_id>5</port_id><bin_id>101337</bin_id><case_state>ERSO</case_state>",
            "<port_id> holds 5, but the call asked about port 4",
        ),
    ];
    for (params, cause) in cases {
        let reply = format!("<response><params>{params}</params></response>");
        let upstream = FakeUpstream::start(Script::ok_xml(&reply)).await;
        let gateway = Gateway::builder().upstream(&upstream.url).start().await;
        let status = gateway.case_get_state(4).await.unwrap_err();
        let call = [("method", "case_getstate"), ("portId", "4")];
        check_error_of(&status, &call, Code::Internal, "UPSTREAM_BAD_RESPONSE", &[]);
        assert_eq!(
            status.message(),
            format!(
                "case_getstate port 4: the controller's reply is not a valid response: {cause}"
            )
        );
    }
}

/// Makes three calls one after another against `script`, each of which must succeed and be
/// sent exactly once; returns how many connections carried them.
async fn connections_for_three_good_calls(script: Script) -> usize {
    let mut upstream = FakeUpstream::start(script).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    for _ in 0..3 {
        let outcome = gateway.case_extract(4, 101337, None).await;
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    assert_eq!(upstream.requests_so_far(), 3);
    upstream.connections_so_far()
}

/// Keep-alive is on: the pool keeps up to `--max-in-flight` idle connections for 4 s, so calls
/// one after another do not each cost the controller a connect.
#[tokio::test]
async fn calls_one_after_another_share_one_kept_alive_connection() {
    let script = Script::ok_xml("<response><params/></response>");
    assert_eq!(connections_for_three_good_calls(script).await, 1);
}

/// A controller that closes each connection after its reply (`Connection: close`) costs no call
/// its answer and no POST a second send.
#[tokio::test]
async fn a_controller_that_closes_each_connection_answers_every_call() {
    let script = Script::RespondAndClose {
        body: b"<response><params/></response>".to_vec(),
    };
    connections_for_three_good_calls(script).await;
}

/// A controller that closes a kept-alive connection without saying so, as when its keep-alive
/// timeout ends, costs no call its answer and no POST a second send.
#[tokio::test]
async fn a_controller_that_hangs_up_on_idle_connections_answers_every_call() {
    let script = Script::RespondThenHangUp {
        body: b"<response><params/></response>".to_vec(),
    };
    connections_for_three_good_calls(script).await;
}

#[tokio::test]
async fn invalid_arguments_never_reach_the_controller() {
    let mut upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let status = gateway.case_extract(0, 101337, None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // A valid call afterwards is the first request the controller sees.
    gateway.case_extract(4, 101337, None).await.unwrap();
    let body = upstream.next_request_body().await;
    assert!(
        String::from_utf8(body)
            .unwrap()
            .contains("<port_id>4</port_id>")
    );
    assert_eq!(upstream.requests_so_far(), 0);
}

#[tokio::test]
async fn a_latin1_fault_reply_is_read() {
    let body = b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?>\r\n<response>\r\n<fault><code> 1087 </code></fault>\r\n</response>\r\n";
    let (status, _) = call_through(Script::Respond {
        status: 200,
        content_type: "text/xml; charset=ISO-8859-1",
        body: body.to_vec(),
    })
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        task_fault(&status),
        Some(TaskFault {
            code: FaultCode::PortIsNotAutocase as i32,
            raw_code: 1087,
            method: "case_extract".to_owned()
        })
    );
}

#[tokio::test]
async fn unknown_and_out_of_range_fault_codes() {
    let (status, _) = call_through(Script::ok_xml(
        "<response><fault><code>1500</code></fault></response>",
    ))
    .await;
    assert_eq!(status.code(), Code::Unknown);
    assert_eq!(error_info(&status).reason, "UNKNOWN_FAULT");
    assert_eq!(
        task_fault(&status).unwrap().code,
        FaultCode::Unspecified as i32
    );
    assert_eq!(task_fault(&status).unwrap().raw_code, 1500);

    let (status, _) = call_through(Script::ok_xml(
        "<response><fault><code>9001</code></fault></response>",
    ))
    .await;
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(error_info(&status).reason, "CONTROLLER_INTERNAL_ERROR");
    assert_eq!(error_info(&status).domain, "autostore.task");
    assert_eq!(task_fault(&status).unwrap().raw_code, 9001);
}

/// A 500 without a fault: the controller may have acted before it failed, so the caller gets a
/// code no retry policy retries, and no `RetryInfo`.
#[tokio::test]
async fn http_500_is_unknown_without_retry_info() {
    let (status, _) = call_through(Script::Respond {
        status: 500,
        content_type: "text/html",
        body: b"<html><body>Internal Server Error</body></html>".to_vec(),
    })
    .await;
    check_gateway_error(
        &status,
        Code::Unknown,
        "UPSTREAM_HTTP_ERROR",
        &[("httpStatus", "500")],
    );
    assert_eq!(
        status.message(),
        "case_extract port 4 bin 101337: the controller answered HTTP 500 Internal Server Error"
    );
    assert!(status.get_details_retry_info().is_none());
}

/// 503 and 429: the controller declined the request, so a retry is safe after the delay.
#[tokio::test]
async fn http_503_and_429_are_unavailable_with_retry_info_and_404_is_internal() {
    for (http_status, text) in [
        (503, "503 Service Unavailable"),
        (429, "429 Too Many Requests"),
    ] {
        let (status, _) = call_through(Script::Respond {
            status: http_status,
            content_type: "text/plain",
            body: b"slow down".to_vec(),
        })
        .await;
        check_gateway_error(
            &status,
            Code::Unavailable,
            "UPSTREAM_HTTP_ERROR",
            &[("httpStatus", &http_status.to_string())],
        );
        assert_eq!(
            status.message(),
            format!("case_extract port 4 bin 101337: the controller answered HTTP {text}")
        );
        let retry_info = status.get_details_retry_info().unwrap();
        assert_eq!(retry_info.retry_delay, Some(Duration::from_secs(1)));
    }
    let (status, _) = call_through(Script::Respond {
        status: 404,
        content_type: "text/plain",
        body: Vec::new(),
    })
    .await;
    check_gateway_error(
        &status,
        Code::Internal,
        "UPSTREAM_HTTP_ERROR",
        &[("httpStatus", "404")],
    );
    assert!(status.get_details_retry_info().is_none());
}

/// A 503 or 429 whose body is a success reply is not a request the controller declined: the
/// body says it acted. It must not be UNAVAILABLE, which a retry policy would send again.
#[tokio::test]
async fn a_success_under_a_declining_status_may_have_acted() {
    for (http_status, code, text) in [
        (503, Code::Unknown, "503 Service Unavailable"),
        (429, Code::Internal, "429 Too Many Requests"),
    ] {
        let (status, _) = call_through(Script::Respond {
            status: http_status,
            content_type: "application/xml",
            body: b"<response><params/></response>".to_vec(),
        })
        .await;
        check_gateway_error(
            &status,
            code,
            "UPSTREAM_HTTP_ERROR",
            &[("httpStatus", &http_status.to_string())],
        );
        assert_eq!(
            status.message(),
            format!(
                "case_extract port 4 bin 101337: the controller answered HTTP {text} with a \
                 success reply in its body"
            )
        );
        assert!(status.get_details_retry_info().is_none());
    }
}

#[tokio::test]
async fn a_fault_under_an_error_status_is_still_the_fault() {
    let (status, _) = call_through(Script::Respond {
        status: 500,
        content_type: "application/xml",
        body: b"<response><fault><code>1148</code></fault></response>".to_vec(),
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(error_info(&status).reason, "PREVIOUS_ACTION_NOT_COMPLETED");
}

#[tokio::test]
async fn a_non_xml_body_is_a_bad_response() {
    let (status, _) = call_through(Script::ok_xml("Service is starting, please wait")).await;
    check_gateway_error(&status, Code::Internal, "UPSTREAM_BAD_RESPONSE", &[]);
    assert!(
        status.message().contains("not a valid response"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_doctype_is_a_bad_response_and_never_expanded() {
    let body = "<?xml version=\"1.0\"?><!DOCTYPE response [<!ENTITY code \"1148\">]>\
                <response><fault><code>&code;</code></fault></response>";
    let (status, _) = call_through(Script::ok_xml(body)).await;
    check_gateway_error(&status, Code::Internal, "UPSTREAM_BAD_RESPONSE", &[]);
    assert!(status.message().contains("DOCTYPE"), "{}", status.message());
}

#[tokio::test]
async fn an_oversized_body_is_refused() {
    let body = format!(
        "<response><params>{}</params></response>",
        " ".repeat(70_000)
    );
    let (status, _) = call_through(Script::ok_xml(&body)).await;
    check_gateway_error(&status, Code::Internal, "UPSTREAM_RESPONSE_TOO_LARGE", &[]);
}

#[tokio::test]
async fn an_endless_body_is_cut_off_at_the_cap_and_the_connection_closed() {
    let (status, mut upstream) = call_through(Script::Endless).await;
    check_gateway_error(&status, Code::Internal, "UPSTREAM_RESPONSE_TOO_LARGE", &[]);
    upstream.expect_closed().await;
}

#[tokio::test]
async fn a_dropped_connection_is_unknown_without_retry_info() {
    let (status, _) = call_through(Script::Drop).await;
    check_gateway_error(&status, Code::Unknown, "UPSTREAM_CONNECTION_LOST", &[]);
    assert!(status.get_details_retry_info().is_none());
}

/// A kept-alive connection lost once the POST was written: the one place below the gateway where
/// a request could be sent again (hyper's pool resends only on a reused connection, and only a
/// request it never began to write). This one was written, so it is not sent again and the
/// caller hears that the controller may have acted.
#[tokio::test]
async fn a_kept_alive_connection_lost_under_a_post_sends_it_once() {
    let script = Script::DropSecond {
        body: b"<response><params/></response>".to_vec(),
    };
    let mut upstream = FakeUpstream::start(script).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    gateway.case_extract(4, 101337, None).await.unwrap();
    let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
    check_gateway_error(&status, Code::Unknown, "UPSTREAM_CONNECTION_LOST", &[]);
    assert!(status.get_details_retry_info().is_none());
    assert_eq!(upstream.requests_so_far(), 2);
    assert_eq!(
        upstream.connections_so_far(),
        1,
        "the second POST went out on a new connection"
    );
}

#[tokio::test]
async fn an_upstream_that_is_not_listening_is_unreachable_with_retry_info() {
    let address = unused_address().await;
    let url =
        taskgate::config::parse_upstream_url(&format!("http://{address}/api/v2/task")).unwrap();
    let gateway = Gateway::builder().upstream(&url).start().await;
    let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
    check_gateway_error(&status, Code::Unavailable, "UPSTREAM_UNREACHABLE", &[]);
    let retry_info = status.get_details_retry_info().unwrap();
    assert_eq!(retry_info.retry_delay, Some(Duration::from_secs(1)));
}

#[tokio::test]
async fn the_callers_deadline_cancels_the_upstream_request() {
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let status = gateway
        .case_extract(4, 101337, Some(Duration::from_secs(1)))
        .await
        .unwrap_err();
    // 1 s less the 100 ms margin, which leaves tonic's own timer (CANCELLED) well behind ours.
    check_gateway_error(
        &status,
        Code::DeadlineExceeded,
        "UPSTREAM_TIMEOUT",
        &[("timeoutMs", "900")],
    );
    upstream.next_request_body().await;
    upstream.expect_closed().await;
}

#[tokio::test]
async fn the_upstream_timeout_caps_calls_without_a_deadline() {
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(|config| config.upstream.timeout = Duration::from_millis(200))
        .start()
        .await;
    let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
    check_gateway_error(
        &status,
        Code::DeadlineExceeded,
        "UPSTREAM_TIMEOUT",
        &[("timeoutMs", "200")],
    );
    upstream.next_request_body().await;
    upstream.expect_closed().await;
}

#[tokio::test]
async fn a_caller_that_goes_away_cancels_the_upstream_request() {
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let call = gateway.spawn_case_extract(4, 101337);
    upstream.next_request_body().await;
    call.abort();
    upstream.expect_closed().await;
}

/// A reply head that does not end within hyper's read buffer (about 400 KiB) is refused there:
/// a controller cannot make the gateway buffer an endless head.
#[tokio::test]
async fn an_endless_reply_head_is_connection_lost() {
    let mut head = b"HTTP/1.1 200 OK\r\nX-Padding: ".to_vec();
    head.extend("a".repeat(1024 * 1024).as_bytes());
    let (status, _) = call_through(Script::poisoned(&head, false, &[], "")).await;
    check_gateway_error(&status, Code::Unknown, "UPSTREAM_CONNECTION_LOST", &[]);
    assert!(
        status.message().ends_with("message head is too large"),
        "{}",
        status.message()
    );
}

/// A connect the pool finishes for no call, because its call took a connection that came back
/// first, is given up after `--upstream-timeout` like a call's own: a controller slow to accept
/// connections cannot make the gateway's descriptors pile up in half-open connects.
#[tokio::test]
async fn a_connect_no_call_waits_for_is_given_up_after_the_upstream_timeout() {
    const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
    let release = Arc::new(Notify::new());
    let mut controller = FakeUpstream::start_accepting_until_a_request(Script::RespondWhen {
        release: release.clone(),
        body: b"<response><params/></response>".to_vec(),
    })
    .await;
    let address = controller.address();
    let gateway = Gateway::builder()
        .upstream(&controller.url)
        .config(|config| {
            config.upstream.timeout = UPSTREAM_TIMEOUT;
            // One probe, at start: later ones would be connects of their own to this controller.
            config.health_interval = Duration::from_secs(60 * 60);
        })
        .start()
        .await;
    // The health probe's connection, accepted before the calls' one.
    controller.expect_accepted(1).await;

    let first = gateway.spawn_case_extract(4, 101337);
    controller.next_request_body().await;
    // Fills the accept queue: the next connect to the controller hangs, its SYNs dropped.
    let _queued = within(
        CALL_LIMIT,
        "the connect that fills the accept queue did not complete",
        tokio::net::TcpStream::connect(address),
    )
    .await
    .unwrap();
    // The second call finds the one connection busy, so it starts a connect...
    let second = gateway.spawn_case_extract(4, 101337);
    let started = wait_for(
        || half_open_connects_to(address) == 1,
        "the second call's connect",
    )
    .await;
    // ...and takes the first call's connection when that one's reply is read.
    release.notify_one();
    controller.next_request_body().await;
    release.notify_one();
    for call in [first, second] {
        let outcome = tokio::time::timeout(CALL_LIMIT, call)
            .await
            .unwrap()
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    // Both answered within milliseconds of the release, far inside the 3 s the connect has.
    assert_eq!(
        half_open_connects_to(address),
        1,
        "both calls answered, the connect goes on for the pool"
    );
    let given_up = wait_for(
        || half_open_connects_to(address) == 0,
        "the connect to be given up",
    )
    .await;
    let lasted = given_up - started;
    // Given up by the timeout, not by the kernel: its SYN retries last about two minutes
    // (`tcp_syn_retries` 6), and without the timeout `wait_for` gives up first.
    assert!(
        lasted >= UPSTREAM_TIMEOUT - Duration::from_millis(500) && lasted < 2 * UPSTREAM_TIMEOUT,
        "given up after {lasted:?}"
    );
}

/// Loopback connects to `address` still in SYN-SENT, from `/proc/net/tcp`.
fn half_open_connects_to(address: std::net::SocketAddr) -> usize {
    const SYN_SENT: &str = "02";
    let remote = format!("0100007F:{:04X}", address.port());
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&SYN_SENT)
        })
        .count()
}

/// Waits, for at most 20 s, until `condition` holds; returns when it was first seen to.
async fn wait_for(condition: impl Fn() -> bool, what: &str) -> tokio::time::Instant {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if condition() {
            return tokio::time::Instant::now();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 20 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
