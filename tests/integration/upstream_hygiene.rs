//! Upstream connection hygiene (issues 11 and 19): whatever the controller sends in reply to one
//! call (conflicting framing, a reply cut short, stalled, too large, or an error status with a
//! body nobody reads), the next call reads its own reply, and every call's POST reaches the
//! controller exactly once.
//!
//! Each test scripts the fake controller to answer the first request with a poisoned reply and,
//! on that same connection, to follow it with leftover bytes that form a different, wrong reply:
//! a fault 1148. Every request on any other connection gets the good reply. A gateway that read
//! the leftover as the second call's reply would answer that call UNAVAILABLE with the fault,
//! whichever connection it was sent on and however the client frames the first reply.

use std::time::Duration;

use tonic::Code;

use crate::support::{FakeUpstream, Gateway, Script, error_info};

/// The good reply, to any request not on the poisoned connection.
const OK: &str = "<response><params/></response>";

/// What the first call got: its outcome, for the test to pin.
type Outcome = Result<(), tonic::Status>;

/// A whole reply the second call must never read: fault 1148, which a client would retry.
fn wrong_reply() -> Vec<u8> {
    let fault = "<response><fault><code>1148</code></fault></response>";
    reply("200 OK", &format!("Content-Length: {}", fault.len()), fault)
}

/// Makes one call against a fake whose first reply is `first` (the connection closed after it
/// if `close`, else answering any later request on it with `leftover`), then a second call,
/// which must get its own reply; checks that each call's POST arrived exactly once and returns
/// the first call's outcome.
async fn second_call_gets_its_own_reply(
    first: &[u8],
    close: bool,
    leftover: &[u8],
    timeout: Duration,
) -> Outcome {
    let script = Script::poisoned(first, close, leftover, OK);
    let mut upstream = FakeUpstream::start(script).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(move |config| config.upstream.timeout = timeout)
        .start()
        .await;
    let outcome = gateway.case_extract(4, 101337, None).await;
    assert_eq!(upstream.requests_so_far(), 1, "the first call: {outcome:?}");
    let second = gateway.case_extract(4, 101337, None).await;
    assert!(second.is_ok(), "the second call: {second:?}");
    assert_eq!(upstream.requests_so_far(), 1, "the second call's POSTs");
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

/// `first`, then the wrong reply right behind it on the connection.
fn followed_by_wrong_reply(mut first: Vec<u8>) -> Vec<u8> {
    first.extend(wrong_reply());
    first
}

/// RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, so the chunked body is the reply
/// and the call succeeds. Such a reply may be a response-splitting attempt: here a second reply
/// follows the chunked one at once, and the second call must not read it.
#[tokio::test]
async fn a_reply_with_both_transfer_encoding_and_content_length_is_read_as_chunked_alone() {
    let chunked = format!("{:x}\r\n{OK}\r\n0\r\n\r\n", OK.len());
    let framing = "Transfer-Encoding: chunked\r\nContent-Length: 7";
    let first = followed_by_wrong_reply(reply("200 OK", framing, &chunked));
    second_call_gets_its_own_reply(&first, false, &wrong_reply(), LIMIT)
        .await
        .unwrap();
}

/// Two Content-Lengths that disagree: where the body ends cannot be known, so the reply is not
/// read at all, and neither is what follows it.
#[tokio::test]
async fn a_reply_with_two_different_content_lengths_is_connection_lost() {
    let framing = format!("Content-Length: {}\r\nContent-Length: 5", OK.len());
    let first = followed_by_wrong_reply(reply("200 OK", &framing, OK));
    let outcome = second_call_gets_its_own_reply(&first, false, &wrong_reply(), LIMIT).await;
    assert_failed(&outcome, Code::Unknown, "UPSTREAM_CONNECTION_LOST");
}

/// A body shorter than its Content-Length, then the connection closed: nothing can follow.
#[tokio::test]
async fn a_reply_cut_short_is_connection_lost() {
    let outcome = second_call_gets_its_own_reply(&cut_short(), true, &[], LIMIT).await;
    assert_failed(&outcome, Code::Unknown, "UPSTREAM_CONNECTION_LOST");
}

/// A body shorter than its Content-Length on a connection kept open: the gateway gives up at its
/// upstream timeout. The rest of that body, then the wrong reply, would answer a next request
/// on that connection.
#[tokio::test]
async fn a_reply_stalled_mid_body_times_out() {
    let timeout = Duration::from_millis(200);
    let rest = followed_by_wrong_reply(OK.as_bytes()[OK.len() / 2..].to_vec());
    let outcome = second_call_gets_its_own_reply(&cut_short(), false, &rest, timeout).await;
    assert_failed(&outcome, Code::DeadlineExceeded, "UPSTREAM_TIMEOUT");
}

/// A Content-Length beyond `--max-response-bytes` (64 KiB by default): refused before a byte of
/// the body is read, so all of it, and the wrong reply after it, are still on the connection.
#[tokio::test]
async fn a_reply_announced_too_large_is_refused_unread() {
    let first = reply("200 OK", "Content-Length: 70000", &" ".repeat(70_000));
    let first = followed_by_wrong_reply(first);
    let outcome = second_call_gets_its_own_reply(&first, false, &wrong_reply(), LIMIT).await;
    assert_failed(&outcome, Code::Internal, "UPSTREAM_RESPONSE_TOO_LARGE");
}

/// A chunked body that passes `--max-response-bytes` part way: the gateway stops reading it
/// there, with the rest, the last chunk and the wrong reply still on the connection.
#[tokio::test]
async fn a_chunked_reply_past_the_cap_is_cut_off() {
    let chunks = format!("{:x}\r\n{}\r\n", 4096, " ".repeat(4096)).repeat(20);
    let framing = "Transfer-Encoding: chunked";
    let first = followed_by_wrong_reply(reply("200 OK", framing, &(chunks + "0\r\n\r\n")));
    let outcome = second_call_gets_its_own_reply(&first, false, &wrong_reply(), LIMIT).await;
    assert_failed(&outcome, Code::Internal, "UPSTREAM_RESPONSE_TOO_LARGE");
}

/// An HTTP error status whose body is beyond the cap: the gateway answers from the status alone
/// and does not read the body.
#[tokio::test]
async fn an_error_status_with_an_unread_body_is_the_http_error() {
    let first = reply("500 Oops", "Content-Length: 70000", &"x".repeat(70_000));
    let first = followed_by_wrong_reply(first);
    let outcome = second_call_gets_its_own_reply(&first, false, &wrong_reply(), LIMIT).await;
    assert_failed(&outcome, Code::Unknown, "UPSTREAM_HTTP_ERROR");
}

/// The good reply's head and its first half, but a Content-Length for all of it.
fn cut_short() -> Vec<u8> {
    let length = format!("Content-Length: {}", OK.len());
    reply("200 OK", &length, &OK[..OK.len() / 2])
}

/// The upstream timeout of the tests that do not time out: the documented default, far beyond
/// any loopback reply.
const LIMIT: Duration = taskgate::config::defaults::UPSTREAM_TIMEOUT;
