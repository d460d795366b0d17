//! Upstream connection hygiene (issue 11, item 4): a reply with conflicting framing, a reply cut
//! short, and any reply the gateway did not read to its end never leave their connection in the
//! pool, so the next call goes out on a fresh connection.
//!
//! Each test scripts the fake controller to send one such reply to the first request and then
//! keep that connection open (unless the case is a close), answering every later request well. A
//! gateway that reused the poisoned connection would still get a good answer to its second call,
//! but on the same connection, which `connections_so_far` shows.

use std::time::Duration;

use tonic::Code;

use crate::support::{FakeUpstream, Gateway, Script, error_info};

/// The good reply every call after the first gets.
const OK: &str = "<response><params/></response>";

/// What the first call got: its outcome, for the test to pin.
type Outcome = Result<(), tonic::Status>;

/// Makes one call against a fake whose first reply is `first` (closing after it if `close`),
/// then a second call, which must succeed on a connection of its own; returns the first call's
/// outcome.
async fn first_then_fresh_connection(first: &[u8], close: bool, timeout: Duration) -> Outcome {
    let mut upstream = FakeUpstream::start(Script::first_raw(first, close, OK)).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(move |config| config.upstream.timeout = timeout)
        .start()
        .await;
    let outcome = gateway.case_extract(4, 101337, None).await;
    assert_eq!(upstream.requests_so_far(), 1, "the first call: {outcome:?}");
    assert_eq!(upstream.connections_so_far(), 1);
    gateway.case_extract(4, 101337, None).await.unwrap();
    assert_eq!(upstream.requests_so_far(), 1);
    assert_eq!(
        upstream.connections_so_far(),
        2,
        "the second call went out on the first call's connection"
    );
    outcome
}

/// Asserts that `outcome` failed with `code` and the ErrorInfo reason `reason`.
fn assert_failed(outcome: &Outcome, code: Code, reason: &str) {
    let status = outcome.as_ref().unwrap_err();
    assert_eq!((status.code(), &*error_info(status).reason), (code, reason));
}

/// A reply head with `status` and `framing` (its length or transfer-coding headers), then `body`.
fn reply(status: &str, framing: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n{framing}\r\n\r\n{body}")
        .into_bytes()
}

/// RFC 9112 §6.1: Transfer-Encoding overrides Content-Length, so the chunked body is the reply
/// and the call succeeds; but such a reply may be a response-splitting attempt, so where the next
/// reply on that connection begins is not to be trusted. hyper keeps the connection alive.
#[tokio::test]
async fn a_reply_with_both_transfer_encoding_and_content_length_closes_its_connection() {
    let chunked = format!("{:x}\r\n{OK}\r\n0\r\n\r\n", OK.len());
    let framing = "Transfer-Encoding: chunked\r\nContent-Length: 7";
    let first = reply("200 OK", framing, &chunked);
    first_then_fresh_connection(&first, false, LIMIT)
        .await
        .unwrap();
}

/// A body shorter than its Content-Length, then the connection closed.
#[tokio::test]
async fn a_reply_cut_short_is_connection_lost_and_the_next_call_connects_again() {
    let outcome = first_then_fresh_connection(&cut_short(), true, LIMIT).await;
    assert_failed(&outcome, Code::Unavailable, "UPSTREAM_CONNECTION_LOST");
}

/// A body shorter than its Content-Length on a connection kept open: the gateway gives up at its
/// upstream timeout, with the rest of the reply still to come on that connection.
#[tokio::test]
async fn a_reply_stalled_mid_body_times_out_and_the_next_call_connects_again() {
    let timeout = Duration::from_millis(200);
    let outcome = first_then_fresh_connection(&cut_short(), false, timeout).await;
    assert_failed(&outcome, Code::DeadlineExceeded, "UPSTREAM_TIMEOUT");
}

/// A Content-Length beyond `--max-response-bytes` (64 KiB by default): refused before a byte of
/// the body is read, so all of it is still on the connection.
#[tokio::test]
async fn a_reply_announced_too_large_is_refused_unread_and_the_next_call_connects_again() {
    let first = reply("200 OK", "Content-Length: 70000", &" ".repeat(70_000));
    let outcome = first_then_fresh_connection(&first, false, LIMIT).await;
    assert_failed(&outcome, Code::Internal, "UPSTREAM_RESPONSE_TOO_LARGE");
}

/// A chunked body that passes `--max-response-bytes` part way: the gateway stops reading it
/// there, with the rest (and the last chunk) still on the connection.
#[tokio::test]
async fn a_chunked_reply_past_the_cap_is_cut_off_and_the_next_call_connects_again() {
    let chunks = format!("{:x}\r\n{}\r\n", 4096, " ".repeat(4096)).repeat(20);
    let first = reply(
        "200 OK",
        "Transfer-Encoding: chunked",
        &(chunks + "0\r\n\r\n"),
    );
    let outcome = first_then_fresh_connection(&first, false, LIMIT).await;
    assert_failed(&outcome, Code::Internal, "UPSTREAM_RESPONSE_TOO_LARGE");
}

/// An HTTP error status whose body is beyond the cap: the gateway answers from the status alone
/// and does not read the body.
#[tokio::test]
async fn an_error_status_with_an_unread_body_is_the_http_error_and_the_next_call_connects_again() {
    let first = reply("500 Oops", "Content-Length: 70000", &"x".repeat(70_000));
    let outcome = first_then_fresh_connection(&first, false, LIMIT).await;
    assert_failed(&outcome, Code::Unavailable, "UPSTREAM_HTTP_ERROR");
}

/// The good reply's head and its first half, but a Content-Length for all of it.
fn cut_short() -> Vec<u8> {
    let length = format!("Content-Length: {}", OK.len());
    reply("200 OK", &length, &OK[..OK.len() / 2])
}

/// The upstream timeout of the tests that do not time out: the documented default, far beyond
/// any loopback reply.
const LIMIT: Duration = taskgate::config::defaults::UPSTREAM_TIMEOUT;
