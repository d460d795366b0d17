//! Serves an axum [`Router`] (the simulator's task interface, `/metrics`) on a listener, within
//! every connection limit.
//!
//! axum does the HTTP work: routing, a 404 from the router's fallback, a 405 from the route's
//! method fallback (both set up by [`Endpoint`]), and the size cap through [`DefaultBodyLimit`].
//! Not `axum::serve`: it has no connection cap and no header-read or idle timeout, so the router
//! is accepted through `accept` and served through `connection`, as the gRPC port is.
//! The body-read timeout is a middleware, so a handler sees a request only once its whole body
//! has arrived.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::{ALLOW, CONNECTION, HeaderValue};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::{Extension, RequestExt as _};
use http_body_util::{BodyExt as _, LengthLimitError};
use tokio::net::TcpListener;
use tower::Layer as _;

use crate::accept::Acceptor;
use crate::codec::DEFAULT_MAX_BODY_BYTES;
use crate::config::Http1Limits;
use crate::connection::{self, ConnectionLimits, Connections, RequestKind};
use crate::metrics::ListenerMetrics;

/// The address a request came from, in every request's extensions: handlers take it as
/// `Extension(Peer(peer))`, for their log lines.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// The one endpoint a listener serves, and how it refuses everything else: a 405 (with `Allow`)
/// for another method, a 404 for another path, each with a plain-text reason.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Endpoint {
    /// Where it is served, for example `/metrics`.
    pub(crate) path: &'static str,
    /// How a 404's reason points at it, before the path: `metrics are at`.
    pub(crate) pointer: &'static str,
    /// The methods it takes, as a 405's `Allow` header lists them: `GET, HEAD`. A 405's reason
    /// suggests the first. Kept as written, rather than axum's own spelling of the header.
    pub(crate) allow: &'static str,
}

/// What the body-read middleware needs: its time limit, and where to count a body that missed it.
#[derive(Debug, Clone)]
struct BodyRead {
    timeout: Duration,
    metrics: ListenerMetrics,
}

/// Serves `router` on `listener` until `shutdown` resolves. The listener's name in `metrics`
/// labels the log lines.
///
/// At shutdown the loop stops accepting and tells open connections to close once their request
/// is answered; it does not wait for them: neither user keeps state worth draining.
pub(crate) async fn serve(
    listener: TcpListener,
    limits: Http1Limits,
    metrics: ListenerMetrics,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let body_read = BodyRead {
        timeout: limits.body_read_timeout,
        metrics: metrics.clone(),
    };
    // The last layer added runs first: the body limit is in place before the body is read.
    let router = router
        .layer(middleware::from_fn_with_state(body_read, read_body))
        .layer(DefaultBodyLimit::max(DEFAULT_MAX_BODY_BYTES));
    let connection_limits = ConnectionLimits {
        // A new connection identifies itself with its first request head.
        handshake_timeout: limits.header_read_timeout,
        header_read_timeout: limits.header_read_timeout,
        // `read_body` answers a late body with a 408 and closes the connection.
        body_read_timeout: None,
        idle_timeout: limits.idle_timeout,
    };
    let mut acceptor = Acceptor::new(listener, metrics.clone());
    let local = acceptor.local_addr().ok();
    let mut connections =
        Connections::new(connection_limits, limits.max_connections.get(), metrics);
    let builder = connection::builder(connection::StreamExecutor::default()).http1_only();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = acceptor.accept() => accepted,
        };
        let Some(admission) = connections.admit(peer) else {
            drop(stream);
            continue;
        };
        let service = Extension(Peer(peer)).layer(router.clone());
        let service = admission.track(service, |_| RequestKind::Call, local);
        let builder = builder.clone();
        tokio::spawn(async move { admission.serve(&builder, stream, service).await });
    }
    connections.begin_shutdown();
}

// === impl Endpoint ===

impl Endpoint {
    /// A router serving `methods` at the endpoint's path, refusing other methods and paths.
    pub(crate) fn router<S>(self, methods: MethodRouter<S>) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let methods = methods.fallback(move |method: Method| async move {
            let suggested = self.allow.split(',').next().unwrap_or(self.allow);
            let reason = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} is not allowed; use {suggested}"),
            );
            ([(ALLOW, HeaderValue::from_static(self.allow))], reason).into_response()
        });
        Router::new()
            .route(self.path, methods)
            .fallback(move |uri: Uri| async move {
                let (pointer, path) = (self.pointer, self.path);
                plain(
                    StatusCode::NOT_FOUND,
                    format!("no endpoint at '{}'; {pointer} {path}", uri.path()),
                )
            })
    }
}

/// A plain-text response, for reasons and errors.
pub(crate) fn plain(status: StatusCode, text: String) -> Response {
    // A `String` body is sent as `text/plain; charset=utf-8`.
    (status, text + "\n").into_response()
}

/// Reads the whole body within the body-read timeout and the size cap before the request goes
/// on; a refusal closes the connection, since the rest of the body may still be on its way.
async fn read_body(
    State(body_read): State<BodyRead>,
    Extension(Peer(peer)): Extension<Peer>,
    request: Request,
    next: Next,
) -> Response {
    // The cap is the one `DefaultBodyLimit` put on the request.
    let (parts, body) = request.with_limited_body().into_parts();
    let refusal = match tokio::time::timeout(body_read.timeout, body.collect()).await {
        Ok(Ok(collected)) => {
            let body = Body::from(collected.to_bytes());
            return next.run(Request::from_parts(parts, body)).await;
        }
        Err(_) => {
            let metrics = &body_read.metrics;
            metrics.connection_closed("body_timeout");
            tracing::debug!(listener = metrics.listener(), %peer, "request body not received within the body-read timeout; connection closed");
            plain(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(body_read.timeout)
                ),
            )
        }
        Ok(Err(error)) => match error.into_inner() {
            error if error.is::<LengthLimitError>() => plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {DEFAULT_MAX_BODY_BYTES} bytes"),
            ),
            error => plain(
                StatusCode::BAD_REQUEST,
                format!("could not read the body: {error}"),
            ),
        },
    };
    ([(CONNECTION, HeaderValue::from_static("close"))], refusal).into_response()
}
