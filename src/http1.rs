//! A small HTTP/1.1 server loop, shared by the simulated controller and the metrics endpoint:
//! accept until shutdown, one task per connection, one handler per request.
//!
//! Both face whatever can reach their port, so every connection is limited (see `connection`):
//! a request head must arrive within the header-read timeout, a body within the body-read
//! timeout and its size cap, an idle keep-alive connection is closed after the idle timeout, and
//! beyond the connection limit new connections are closed at once. The handler sees a request
//! only once its whole body has arrived.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tonic::body::Body;

use crate::accept::Acceptor;
use crate::codec::DEFAULT_MAX_BODY_BYTES;
use crate::config::Http1Limits;
use crate::connection::{self, ConnectionLimits, Connections};
use crate::metrics::ListenerMetrics;

/// Serves `handler` on `listener` until `shutdown` resolves. The listener's name in `metrics`
/// labels the log lines.
///
/// At shutdown the loop stops accepting and tells open connections to close once their request
/// is answered; it does not wait for them: neither user keeps state worth draining.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    limits: Http1Limits,
    metrics: ListenerMetrics,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Bytes>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let connection_limits = ConnectionLimits {
        // A new connection identifies itself with its first request head.
        handshake_timeout: limits.header_read_timeout,
        header_read_timeout: limits.header_read_timeout,
        idle_timeout: limits.idle_timeout,
    };
    let mut acceptor = Acceptor::new(listener, metrics.clone());
    let local = acceptor.local_addr().ok();
    let mut connections =
        Connections::new(connection_limits, limits.max_connections.get(), metrics);
    let builder = connection::builder().http1_only();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = acceptor.accept() => accepted,
        };
        let Some(mut admission) = connections.admit(peer) else {
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let metrics = admission.metrics.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let handler = handler.clone();
            let metrics = metrics.clone();
            async move {
                Ok::<_, Infallible>(match read_body(request, limits, &metrics, peer).await {
                    Ok(request) => handler(request, peer).await,
                    Err(refusal) => refusal,
                })
            }
        });
        let service = admission.track(service, "/", local);
        let builder = builder.clone();
        tokio::spawn(async move {
            connection::serve(&builder, stream, service, &mut admission).await;
        });
    }
    connections.begin_shutdown();
}

/// Reads the whole body within the body-read timeout and the size cap; a refusal closes the
/// connection, since the rest of the body may still be on its way.
async fn read_body(
    request: Request<Body>,
    limits: Http1Limits,
    metrics: &ListenerMetrics,
    peer: SocketAddr,
) -> Result<Request<Bytes>, Response<Full<Bytes>>> {
    let (parts, body) = request.into_parts();
    let collected = tokio::time::timeout(
        limits.body_read_timeout,
        Limited::new(body, DEFAULT_MAX_BODY_BYTES).collect(),
    )
    .await;
    let refusal = match collected {
        Ok(Ok(collected)) => return Ok(Request::from_parts(parts, collected.to_bytes())),
        Err(_) => {
            metrics.connection_closed("body_timeout");
            tracing::debug!(listener = metrics.listener(), %peer, "request body not received within the body-read timeout; connection closed");
            plain(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(limits.body_read_timeout)
                ),
            )
        }
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {DEFAULT_MAX_BODY_BYTES} bytes"),
        ),
        Ok(Err(error)) => plain(
            StatusCode::BAD_REQUEST,
            format!("could not read the body: {error}"),
        ),
    };
    let mut refusal = refusal;
    refusal
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    Err(refusal)
}

/// A plain-text response, for reasons and errors.
pub(crate) fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
