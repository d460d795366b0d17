//! The simulated controller's HTTP edge: accept connections, decode the method call, apply it,
//! encode the reply. Bad requests get a plain-text reason and a 4xx/5xx status; the task
//! interface's own replies (success and faults) are HTTP 200.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::{METHODS, Outcome, Simulator};
use crate::codec::{self, Reply, WireFormat};
use crate::config::Http1Limits;
use crate::http1::{self, plain};
use crate::metrics::ListenerMetrics;

/// The path the task interface is served on, as on a real controller.
pub const TASK_PATH: &str = "/api/v2/task";

/// The header a gateway sends its call's request ID in, logged with each request so one ID finds
/// a call on both sides. The simulator names it itself rather than importing the gateway's layer:
/// it is the other side of the wire (the real binary's test follows an ID into its log).
const REQUEST_ID_HEADER: &str = "x-request-id";

/// Serves the task interface on `listener` until `shutdown` resolves, within `limits`. The
/// simulator has no metrics endpoint: connections refused or closed by a limit are logged.
pub async fn serve(
    listener: TcpListener,
    simulator: Simulator,
    limits: Http1Limits,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |request, peer| {
        let simulator = simulator.clone();
        async move { handle(&simulator, request, peer) }
    };
    let metrics = ListenerMetrics::unregistered("simulator");
    http1::serve(listener, limits, metrics, handler, shutdown).await;
}

fn handle(
    simulator: &Simulator,
    request: Request<Bytes>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if request.uri().path() != TASK_PATH {
        return plain(
            StatusCode::NOT_FOUND,
            format!(
                "no endpoint at '{}'; the task interface is at {TASK_PATH}",
                request.uri().path()
            ),
        );
    }
    if request.method() != Method::POST {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {} is not allowed; use POST", request.method()),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let charset = content_type
        .as_deref()
        .and_then(codec::charset_of)
        .map(str::to_owned);
    // The reply is written in the format the call came in.
    let format = WireFormat::from_content_type(content_type.as_deref());
    let body = request.into_body();
    let method_call = match format.decode_method_call(&body, charset.as_deref()) {
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
            let mut response = Response::new(Full::new(Bytes::from(format.encode_reply(&reply))));
            let content_type = match format {
                WireFormat::Xml => "application/xml; charset=utf-8",
                WireFormat::Json => "application/json",
            };
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
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
