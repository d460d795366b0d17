//! Health: the standard `grpc.health.v1.Health` service for `""` and `taskgate.v1.TaskService`,
//! driven by a periodic TCP connect probe of the controller.
//!
//! The probe only opens and closes a TCP connection; it never POSTs anything, because any request
//! to the task interface could move a robot. Both names report NOT_SERVING until the first probe
//! succeeds, while the controller cannot be reached, and from the moment shutdown begins. A third
//! name, [`LIVENESS_SERVICE`], is for liveness probes: it does not follow the controller.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use url::Url;

use crate::connection::Holding;
use crate::metrics::Metrics;
use crate::proto::LIVENESS_SERVICE;
use crate::proto::task_service_server::SERVICE_NAME;

/// The service names health is reported for: the whole server and the task service.
const SERVICE_NAMES: [&str; 2] = ["", SERVICE_NAME];

/// Reports the gateway's health and runs the controller probe.
#[derive(Debug)]
pub(crate) struct Health {
    /// Where the statuses live; the health service reads them.
    reporter: HealthReporter,
    /// Stops the probe when shutdown begins or when this is dropped, so nothing flips the status
    /// back to SERVING while the gateway drains.
    probe: AbortHandle,
    /// Mirrors the state in the `taskgate_health_serving` gauge.
    metrics: Metrics,
}

/// Caps the open health Watch streams: health needs no token, and every open stream holds
/// memory, so without a cap anyone who can connect could hold as much as they like. Over the
/// cap a Watch is answered RESOURCE_EXHAUSTED at once; Check is never limited.
#[derive(Debug, Clone)]
pub(crate) struct WatchLimit<S> {
    inner: S,
    /// One permit per Watch stream that may be open; a stream holds its permit until its
    /// response body is dropped.
    permits: Arc<Semaphore>,
    limit: usize,
    metrics: Metrics,
}

/// The path of the health Watch method.
const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

// === impl Health ===

impl Health {
    /// Reports NOT_SERVING and starts probing the controller every `interval`: the next hop of
    /// its calls, which is `--upstream-proxy` when there is one.
    pub(crate) async fn start(
        reporter: HealthReporter,
        upstream: &crate::upstream::Settings,
        interval: Duration,
        metrics: Metrics,
    ) -> Self {
        set_all(&reporter, ServingStatus::NotServing).await;
        reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        metrics.health(false);
        let target = match &upstream.proxy {
            Some(proxy) => Target {
                what: "upstream proxy",
                address: probe_target(proxy),
            },
            None => Target {
                what: "controller",
                address: probe_target(&upstream.url),
            },
        };
        let probe = tokio::spawn(probe_loop(
            reporter.clone(),
            target,
            interval,
            metrics.clone(),
        ))
        .abort_handle();
        Health {
            reporter,
            probe,
            metrics,
        }
    }

    /// Stops the probe, reports NOT_SERVING, then ends every Watch stream so that open watchers
    /// do not hold up the drain of calls in flight.
    pub(crate) async fn shut_down(&self) {
        self.probe.abort();
        set_all(&self.reporter, ServingStatus::NotServing).await;
        self.metrics.health(false);
        let mut reporter = self.reporter.clone();
        for name in SERVICE_NAMES.into_iter().chain([LIVENESS_SERVICE]) {
            reporter.clear_service_status(name).await;
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

// === impl WatchLimit ===

impl<S> WatchLimit<S> {
    /// Lets at most `limit` Watch streams through `inner` at once.
    pub(crate) fn new(inner: S, limit: usize, metrics: Metrics) -> Self {
        WatchLimit {
            inner,
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            metrics,
        }
    }
}

impl<S: NamedService> NamedService for WatchLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for WatchLimit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return Box::pin(self.inner.call(request));
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            self.metrics.health_watch_refused();
            let status = crate::status::health_watches_exhausted(self.limit);
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let open = self.metrics.health_watch_opened();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Body::new(Holding::new(body, (permit, open)))))
        })
    }
}

/// The host and port the probe connects to: the upstream URL's, with the scheme's default port.
fn probe_target(upstream_url: &Url) -> (String, u16) {
    let host = upstream_url.host_str().unwrap_or_default();
    // `Url` keeps IPv6 hosts in brackets, which a socket address lookup does not take.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = upstream_url.port_or_known_default().unwrap_or(80);
    (host, port)
}

/// What the health probe connects to, and what the log calls it.
struct Target {
    /// `controller`, or `upstream proxy`: a proxy that accepts connections says nothing of the
    /// controller behind it, and the log says which was probed.
    what: &'static str,
    address: (String, u16),
}

async fn probe_loop(
    reporter: HealthReporter,
    target: Target,
    interval: Duration,
    metrics: Metrics,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reachable = None;
    loop {
        ticker.tick().await;
        let (host, port) = (target.address.0.as_str(), target.address.1);
        let outcome = tokio::time::timeout(interval, TcpStream::connect((host, port))).await;
        let now_reachable = matches!(outcome, Ok(Ok(_)));
        if reachable != Some(now_reachable) {
            let what = target.what;
            match &outcome {
                Ok(Ok(_)) => {
                    tracing::info!(host = %host, port, "{what} reachable; health SERVING")
                }
                Ok(Err(error)) => {
                    tracing::warn!(host = %host, port, cause = %error, "{what} unreachable; health NOT_SERVING")
                }
                Err(_) => {
                    tracing::warn!(host = %host, port, "{what} connect timed out; health NOT_SERVING")
                }
            }
            let status = if now_reachable {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(&reporter, status).await;
            metrics.health(now_reachable);
            reachable = Some(now_reachable);
        }
    }
}

async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_targets() {
        let check = |url: &str, host: &str, port: u16| {
            let url = Url::parse(url).unwrap();
            assert_eq!(probe_target(&url), (host.to_owned(), port), "{url}");
        };
        check("http://127.0.0.1:44000/api/v2/task", "127.0.0.1", 44000);
        check("http://controller/api/v2/task", "controller", 80);
        check("https://controller/api/v2/task", "controller", 443);
        check("http://[::1]:44000/api/v2/task", "::1", 44000);
    }
}
