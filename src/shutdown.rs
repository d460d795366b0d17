//! Process signals: one future that resolves when the process is asked to stop (SIGINT or
//! SIGTERM) and says which, and a listener that keeps SIGHUP from ever stopping it.

use std::future::Future;

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

/// Listens for SIGHUP now, and returns the future that calls `on_hangup` for each one.
///
/// SIGHUP's default action ends the process, yet operators send it to ask for a reload (log
/// rotation scripts, `systemctl reload`), so the servers always catch it, with or without
/// something to reload. Listening starts before this returns, and tokio never restores the
/// default action, so from then on no SIGHUP can end the process, even once the future is
/// dropped.
pub fn hangups(
    mut on_hangup: impl FnMut() + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let mut hangups = match hangups {
                Ok(hangups) => hangups,
                Err(error) => {
                    tracing::warn!(cause = %error, "cannot listen for SIGHUP; one would end the process");
                    return;
                }
            };
            while hangups.recv().await.is_some() {
                on_hangup();
            }
        }
        // Other platforms have no SIGHUP.
        #[cfg(not(unix))]
        drop(on_hangup);
    }
}
