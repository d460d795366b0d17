//! The Prometheus endpoint: `GET /metrics` as an axum router, served within the HTTP/1.1
//! listeners' limits. Here, in the wiring, rather than in `metrics`, which the listeners
//! themselves count into: `metrics` stays below `router` and `accept`.

use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::config::Http1Limits;
use crate::metrics::Metrics;
use crate::router::{self, Endpoint};

/// The path the metrics are served on.
pub(super) const METRICS_PATH: &str = "/metrics";

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub(super) async fn serve(
    listener: TcpListener,
    limits: Http1Limits,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    const ENDPOINT: Endpoint = Endpoint {
        path: METRICS_PATH,
        pointer: "metrics are at",
        allow: "GET, HEAD",
    };
    let listener_metrics = metrics.listener("metrics");
    let router = ENDPOINT.router(get(encoded)).with_state(metrics);
    router::serve(listener, limits, listener_metrics, router, shutdown).await;
}

/// The answer to a scrape: every metric in the OpenMetrics text format.
async fn encoded(State(metrics): State<Metrics>) -> Response {
    let content_type =
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
    ([(CONTENT_TYPE, content_type)], metrics.encode()).into_response()
}
