//! Wiring: a bound listener, a config and a shutdown future become a running gateway, with
//! health and reflection beside the task service.
//!
//! The binary, the tests and `serve --simulator` all start the gateway through [`serve`], so
//! what the tests exercise is what runs in production.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tonic::codegen::http::{HeaderName, HeaderValue, Method};
use tonic::service::Interceptor as _;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_web::GrpcWebLayer;
use tower::util::option_layer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{self, Authenticator};
use crate::config::GatewayConfig;
use crate::health::Health;
use crate::metrics::{METRICS_PATH, Metrics};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::task_service_server::TaskServiceServer;
use crate::request_id::RequestIdLayer;
use crate::service::TaskGateway;
use crate::upstream::Upstream;

/// The largest request message accepted: every task-interface request is a few integers, so
/// anything bigger is a mistake or an attack, refused before it is decoded.
const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// HTTP/2 pings find dead client connections (a pulled cable, a crashed pod) that TCP alone would
/// keep for hours.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive, for peers that do not answer HTTP/2 pings.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The sockets the gateway serves on, bound before `serve` so that binding errors surface at
/// startup and tests can use ephemeral ports.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC: the task service, health and reflection.
    pub grpc: TcpListener,
    /// The Prometheus endpoint, if one was asked for.
    pub metrics: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Self {
        Listeners {
            grpc,
            metrics: None,
        }
    }
}

/// CORS for gRPC-Web from browser pages on other origins. With no origins configured there is no
/// layer at all: no CORS headers are sent, so browsers refuse cross-origin calls, and calls do
/// not pay for the `Vary` header the layer would add to every response.
fn cors_layer(allow_origins: &[HeaderValue]) -> Option<CorsLayer> {
    const ALLOW_HEADERS: [&str; 7] = [
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "authorization",
        "x-request-id",
        "grpc-accept-encoding",
    ];
    const EXPOSE_HEADERS: [&str; 4] = [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "x-request-id",
    ];
    if allow_origins.is_empty() {
        return None;
    }
    let origin = if allow_origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(allow_origins.iter().cloned())
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::POST])
            .allow_headers(ALLOW_HEADERS.map(HeaderName::from_static))
            .expose_headers(EXPOSE_HEADERS.map(HeaderName::from_static))
            .max_age(Duration::from_secs(24 * 60 * 60)),
    )
}

/// Aborts a background task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting makes no sense (for example, a zero health interval).
    #[error("invalid configuration: {0}")]
    Config(#[source] crate::config::ConfigError),
    /// The HTTP client for the controller could not be built (for example, no TLS roots).
    #[error("cannot build the controller client: {0}")]
    Client(#[source] crate::upstream::ClientError),
    /// The reflection service could not read the descriptor set that `build.rs` wrote.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The TLS settings were refused by the server.
    #[error("cannot set up TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[source] tonic::transport::Error),
}

/// Serves the gateway on `listener` until `shutdown` resolves, then lets in-flight calls finish
/// for at most `config.shutdown_grace`.
pub async fn serve(
    listeners: impl Into<Listeners>,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
    } = listeners.into();
    // The CLI checks too, but library callers build configs by hand, and a zero interval would
    // panic the health probe.
    config.validate().map_err(ServeError::Config)?;
    let upstream = Upstream::new(&config).map_err(ServeError::Client)?;
    let metrics = Metrics::new();
    // Stops the metrics endpoint when the gateway stops, however `serve` returns.
    let _metrics_endpoint = metrics_listener.map(|metrics_listener| {
        if let Ok(address) = metrics_listener.local_addr() {
            tracing::info!(url = %format!("http://{address}{METRICS_PATH}"), "metrics listening");
        }
        let endpoint =
            crate::metrics::serve(metrics_listener, metrics.clone(), std::future::pending());
        AbortOnDrop(tokio::spawn(endpoint).abort_handle())
    });
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::start(
        reporter,
        upstream.url(),
        config.health_interval,
        metrics.clone(),
    )
    .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServeError::Reflection)?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;
    let task_upstream_url = upstream.url().clone();
    let service = TaskGateway::new(upstream, &config, metrics);
    let task_service = TaskServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    // Without a token file every caller is let through; the interceptor is there either way so
    // the service has one type.
    let (authenticator, hangups) = match config.auth_tokens.clone() {
        Some(token_file) => {
            tracing::info!(file = %token_file.path().display(), tokens = token_file.len(), "task calls need a bearer token; SIGHUP reloads the file");
            let authenticator = Authenticator::new(token_file);
            let reloader = tokio::spawn(auth::reload_on_sighup(authenticator.clone()));
            (Some(authenticator), reloader)
        }
        None => (
            None,
            tokio::spawn(crate::shutdown::hangups(|| {
                tracing::info!("received SIGHUP; nothing to reload without --auth-tokens-file")
            })),
        ),
    };
    // SIGHUP is caught before "gateway listening" is logged, so one sent after it never ends
    // the process.
    let _hangups = AbortOnDrop(hangups.abort_handle());
    let task_service = tonic::service::interceptor::InterceptedService::new(
        task_service,
        move |request: tonic::Request<()>| match &authenticator {
            Some(authenticator) => authenticator.clone().call(request),
            None => Ok(request),
        },
    );
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.config()).map_err(ServeError::Tls)?;
    }
    // Logged last, once everything above is in place: tests and operators may act on it.
    if let Ok(address) = listener.local_addr() {
        let tls = match &config.tls {
            None => "off",
            Some(tls) if tls.requires_client_certificates() => "on, client certificates required",
            Some(_) => "on",
        };
        tracing::info!(%address, upstream = %task_upstream_url, tls, "gateway listening");
    }
    // `serve_with_incoming_shutdown` ignores the builder's TCP settings, so set them here.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    let (draining_tx, draining_rx) = oneshot::channel();
    let server = builder
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        // gRPC-Web arrives over HTTP/1.1 from browsers, on the same port as gRPC.
        .accept_http1(true)
        .layer(option_layer(cors_layer(&config.cors_allow_origins)))
        .layer(RequestIdLayer)
        .layer(GrpcWebLayer::new())
        .layer(crate::protocol::ProtocolLayer)
        .add_service(task_service)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, async {
            shutdown.await;
            // Health flips first, so load balancers stop sending calls before the drain.
            health.shut_down().await;
            let _ = draining_tx.send(());
        });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result.map_err(ServeError::Transport)?,
        _ = draining_rx => {
            tracing::info!(
                grace = %humantime::format_duration(config.shutdown_grace),
                "no longer accepting calls; waiting for calls in flight"
            );
            match tokio::time::timeout(config.shutdown_grace, server).await {
                Ok(result) => result.map_err(ServeError::Transport)?,
                Err(_) => tracing::warn!("shutdown grace ran out; calls still in flight end with the process"),
            }
        }
    }
    tracing::info!("gateway stopped");
    Ok(())
}
