//! Wiring: a bound listener, a config and a shutdown future become a running gateway.
//!
//! The binary, the tests and `serve --simulator` all start the gateway through [`serve`], so
//! what the tests exercise is what runs in production.

use std::future::Future;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::config::GatewayConfig;
use crate::proto::task_service_server::TaskServiceServer;
use crate::service::TaskGateway;
use crate::upstream::Upstream;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP client for the controller could not be built (for example, no TLS roots).
    #[error("cannot build the controller client: {0}")]
    Client(#[source] reqwest::Error),
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[source] tonic::transport::Error),
}

/// Serves the gateway on `listener` until `shutdown` resolves, then lets in-flight calls finish
/// for at most `config.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let upstream = Upstream::new(&config).map_err(ServeError::Client)?;
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, upstream = %upstream.url(), "gateway listening");
    }
    let service = TaskGateway::new(upstream, config.upstream_timeout, config.retry_delay);
    // `serve_with_incoming_shutdown` ignores the builder's TCP settings, so set them here.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (draining_tx, draining_rx) = oneshot::channel();
    let server = Server::builder()
        .add_service(TaskServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
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
