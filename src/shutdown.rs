//! Process signals: one future that resolves when the process is asked to stop (SIGINT or
//! SIGTERM) and says which, and [`Hangups`], which keeps SIGHUP from ever stopping it.

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

/// SIGHUPs, caught from the moment this is made.
///
/// SIGHUP's default action ends the process, yet operators send it to ask for a reload (log
/// rotation scripts, `systemctl reload`), so the servers always catch it, with or without
/// something to reload. They make this before binding any port, since a supervisor may reload
/// as soon as a port accepts, and the gateway has a good deal to set up before it can act on a
/// reload: tokio never restores the default action, so from then on no SIGHUP can end the
/// process, and one that comes before [`Hangups::handle`] runs is kept (several as one) and
/// handled then, not lost.
#[derive(Debug)]
pub struct Hangups {
    /// `None` when SIGHUP could not be caught (or on platforms without it), which
    /// [`Hangups::catch`] has logged.
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

/// Makes SIGHUP harmless from now on, before anything else is set up: the first thing `main`
/// does, so that a reload sent as soon as the process is started (a unit's `ExecReload` right
/// after `systemctl start`) never meets SIGHUP's default action, which ends the process.
///
/// tokio's handler, once installed, stays for the process's life; a throwaway runtime installs it
/// here, before the command's own runtime exists. Until [`Hangups::catch`] a SIGHUP is only noted
/// and dropped: nothing has been read yet that it could reload.
pub fn survive_hangups() {
    #[cfg(unix)]
    {
        let installed = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|error| error.to_string())
            .and_then(|runtime| {
                runtime.block_on(async {
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                        .map(drop)
                        .map_err(|error| error.to_string())
                })
            });
        if let Err(error) = installed {
            // Logging is not set up yet; `Hangups::catch` tries again and logs.
            eprintln!(
                "taskgate: cannot catch SIGHUP yet ({error}); one sent now would end the process"
            );
        }
    }
}

// === impl Hangups ===

impl Hangups {
    /// Catches SIGHUP from now on. Must be called within the tokio runtime.
    pub fn catch() -> Hangups {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::hangup()) {
                Ok(signal) => Hangups {
                    signal: Some(signal),
                },
                Err(error) => {
                    tracing::warn!(cause = %error, "cannot listen for SIGHUP; one would end the process");
                    Hangups { signal: None }
                }
            }
        }
        #[cfg(not(unix))]
        Hangups {}
    }

    /// Calls `on_hangup` for each SIGHUP from now on, and at once for those that came since
    /// [`Hangups::catch`]. Never returns while SIGHUP is caught.
    pub async fn handle(self, mut on_hangup: impl FnMut()) {
        #[cfg(unix)]
        if let Some(mut signal) = self.signal {
            while signal.recv().await.is_some() {
                on_hangup();
            }
        }
        // Other platforms have no SIGHUP.
        #[cfg(not(unix))]
        drop(on_hangup);
    }
}
