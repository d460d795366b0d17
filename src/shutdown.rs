//! Process signals: one future that resolves when the process is asked to stop (SIGINT or
//! SIGTERM) and says which, and a listener that keeps SIGHUP from ever stopping it.

use std::future::Future;

/// Listens for SIGINT and SIGTERM now, and returns the future that resolves on the first of
/// them and logs which arrived.
///
/// Listening starts before this returns, not when the future is first polled: a supervisor may
/// send SIGTERM as soon as the gateway's port accepts, and one that came before the future was
/// polled would otherwise meet the default action and kill the process without its drain.
/// Must be called within the tokio runtime.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    async move {
        #[cfg(unix)]
        match signals {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => tracing::info!("received SIGINT; shutting down"),
                    _ = terminate.recv() => tracing::info!("received SIGTERM; shutting down"),
                }
            }
            (Ok(mut interrupt), Err(error)) => {
                tracing::warn!(cause = %error, "cannot listen for SIGTERM; only SIGINT stops the server");
                interrupt.recv().await;
                tracing::info!("received SIGINT; shutting down");
            }
            (Err(error), _) => {
                // Without a SIGINT handler, waiting forever is safer than shutting down at once.
                tracing::warn!(cause = %error, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("received SIGINT; shutting down"),
            Err(error) => {
                tracing::warn!(cause = %error, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
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
