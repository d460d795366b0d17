//! One future that resolves when the process is asked to stop (SIGINT or SIGTERM), and says which.

/// Resolves on the first SIGINT or SIGTERM and logs which arrived.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT; shutting down"),
                    _ = terminate.recv() => tracing::info!("received SIGTERM; shutting down"),
                }
                return;
            }
            Err(error) => {
                tracing::warn!(cause = %error, "cannot listen for SIGTERM; only SIGINT stops the server");
            }
        }
    }
    match tokio::signal::ctrl_c().await {
        Ok(()) => tracing::info!("received SIGINT; shutting down"),
        Err(error) => {
            // Without any signal handler the process can only be killed; wait forever rather than
            // shutting down at once.
            tracing::warn!(cause = %error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    }
}
