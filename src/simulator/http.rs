//! The simulated controller's HTTP edge: an axum router with the task interface's one route,
//! whose handler decodes the method call, applies it and encodes the reply. Bad requests get a
//! plain-text reason and a 4xx/5xx status; the task interface's own replies (success and faults)
//! are HTTP 200.

use std::future::Future;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::net::TcpListener;

use super::{METHODS, Outcome, Simulator};
use crate::codec::{self, DecodeError, MethodCall, Reply, WireFormat};
use crate::config::Http1Limits;
use crate::metrics::ListenerMetrics;
use crate::router::{self, Endpoint, Peer, plain};

/// The path the task interface is served on, as on a real controller.
pub const TASK_PATH: &str = "/api/v2/task";

/// The header a gateway sends its call's request ID in, logged with each request so one ID finds
/// a call on both sides. The simulator names it itself rather than importing the gateway's layer:
/// it is the other side of the wire (the real binary's test follows an ID into its log).
const REQUEST_ID_HEADER: &str = "x-request-id";

/// The W3C trace-context header a gateway sends with a traced call, logged at debug level so a
/// test (or an operator) can see which span the controller was called from.
const TRACEPARENT_HEADER: &str = "traceparent";

/// The vendor trace state that may come with it.
const TRACESTATE_HEADER: &str = "tracestate";

/// Serves the task interface on `listener` until `shutdown` resolves, within `limits`. The
/// simulator has no metrics endpoint: connections refused or closed by a limit are logged.
pub async fn serve(
    listener: TcpListener,
    simulator: Simulator,
    limits: Http1Limits,
    shutdown: impl Future<Output = ()>,
) {
    const TASK_INTERFACE: Endpoint = Endpoint {
        path: TASK_PATH,
        pointer: "the task interface is at",
        allow: "POST",
    };
    let router = TASK_INTERFACE.router(post(handle)).with_state(simulator);
    let metrics = ListenerMetrics::unregistered("simulator");
    router::serve(listener, limits, metrics, router, shutdown).await;
}

/// A request's method call, decoded from its body in the format and charset its Content-Type
/// names, with the format its reply is written in: the call's own. Pure, so the fuzzer reaches
/// it (`fuzz_api`).
///
/// Stricter than the codec, which reads replies with or without a declaration: the vendor
/// requires a request to begin with one (task-interface.md §1.2), so a call that works here
/// works on a controller too.
pub(crate) fn decode_request(
    content_type: Option<&str>,
    body: &[u8],
) -> (WireFormat, Result<MethodCall, DecodeError>) {
    let format = WireFormat::from_content_type(content_type);
    if format == WireFormat::Xml && !begins_with_declaration(body) {
        let missing = DecodeError::Malformed {
            position: 0,
            reason: "the body does not begin with an XML declaration (<?xml version=\"1.0\"?>), \
                     which the task interface requires"
                .to_owned(),
        };
        return (format, Err(missing));
    }
    let charset = content_type.and_then(codec::charset_of);
    (format, format.decode_method_call(body, charset))
}

/// Whether `body`, after a UTF-8 byte-order mark, starts with `<?xml` and whitespace: a
/// declaration, not a processing instruction such as `<?xml-stylesheet?>`. The codec then
/// checks what it says.
fn begins_with_declaration(body: &[u8]) -> bool {
    let (body, _) = codec::strip_bom(body);
    body.strip_prefix(b"<?xml")
        .and_then(<[u8]>::first)
        .is_some_and(|byte| matches!(byte, b' ' | b'\t' | b'\r' | b'\n'))
}

/// The Content-Type a reply in `format` is sent with.
pub(crate) fn reply_content_type(format: WireFormat) -> &'static str {
    match format {
        WireFormat::Xml => "application/xml; charset=utf-8",
        WireFormat::Json => "application/json",
    }
}

async fn handle(
    State(simulator): State<Simulator>,
    peer: Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Extension(Peer(peer)) = peer;
    let request_id = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    if let Some(traceparent) = headers.get(TRACEPARENT_HEADER) {
        let visible =
            |value: &HeaderValue| value.to_str().unwrap_or("(not visible ASCII)").to_owned();
        let tracestate = headers.get(TRACESTATE_HEADER).map(visible);
        tracing::debug!(%peer, %request_id, traceparent = visible(traceparent), tracestate, "simulator received trace context");
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    let (format, decoded) = decode_request(content_type, &body);
    let method_call = match decoded {
        Ok(method_call) => method_call,
        Err(error) => {
            tracing::info!(%peer, %request_id, cause = %error, "simulator refused a malformed method call");
            return plain(
                StatusCode::BAD_REQUEST,
                format!("malformed method call: {error}"),
            );
        }
    };
    match simulator.handle(&method_call) {
        Outcome::Reply(reply) => {
            match &reply {
                Reply::Success(_) => {
                    tracing::debug!(%peer, %request_id, method = %method_call.name, "simulator answered success")
                }
                Reply::Fault(code) => {
                    tracing::debug!(%peer, %request_id, method = %method_call.name, fault_code = code, "simulator answered a fault")
                }
            }
            (
                [(
                    CONTENT_TYPE,
                    HeaderValue::from_static(reply_content_type(format)),
                )],
                format.encode_reply(&reply),
            )
                .into_response()
        }
        Outcome::NotImplemented(name) => plain(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "method '{name}' is not implemented by the simulator (it implements: {})",
                METHODS.join(", ")
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALL: &str = "<methodcall><name>case_getstate</name><params><port_id>4</port_id>\
                        </params></methodcall>";

    /// The vendor requires a request to begin with an XML declaration (task-interface.md
    /// §1.2, verified), so a call without one, which a controller may refuse, is refused here
    /// rather than working against the simulator only.
    #[test]
    fn an_xml_request_must_begin_with_a_declaration() {
        let refused = |body: &[u8]| match decode_request(Some("application/xml"), body).1 {
            Ok(method_call) => panic!("accepted {method_call:?}"),
            Err(error) => error.to_string(),
        };
        let expected = "malformed XML at byte 0: the body does not begin with an XML declaration \
                        (<?xml version=\"1.0\"?>), which the task interface requires";
        assert_eq!(refused(CALL.as_bytes()), expected);
        assert_eq!(
            refused(format!("<?xml-stylesheet?>{CALL}").as_bytes()),
            expected
        );
        assert_eq!(refused(format!("<!-- c -->{CALL}").as_bytes()), expected);
        for declaration in [
            "<?xml version=\"1.0\"?>",
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n",
            "\u{FEFF}<?xml version='1.0' encoding='ISO-8859-1'?>",
        ] {
            let body = format!("{declaration}{CALL}");
            let (_, decoded) = decode_request(Some("text/xml"), body.as_bytes());
            assert_eq!(
                decoded.map(|call| call.name),
                Ok("case_getstate".to_owned()),
                "{body}"
            );
        }
        // JSON has no declaration.
        let json = br#"{"method":"case_getstate","params":{"port_id":4}}"#;
        assert!(decode_request(Some("application/json"), json).1.is_ok());
    }
}
