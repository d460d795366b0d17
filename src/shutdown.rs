//! Process signals: [`Stop`], SIGINT and SIGTERM, which ask the process to stop, and
//! [`Hangups`], which keeps SIGHUP from ever stopping it.

use std::future::Future;
use std::time::Duration;

/// Listens for SIGINT and SIGTERM now, and returns the future that resolves on the first of
/// them and logs which arrived.
///
/// Listening starts before this returns, not when the future is first polled: a supervisor may
/// send SIGTERM as soon as the gateway's port accepts, and one that came before the future was
/// polled would otherwise meet the default action and kill the process without its drain.
/// Must be called within the tokio runtime.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let mut stop = Stop::catch();
    async move { stop.first().await }
}

/// SIGINT and SIGTERM, caught from the moment this is made, for the same reason as [`signal`]'s.
#[derive(Debug)]
pub struct Stop {
    /// An error when SIGINT could not be caught, which [`Stop::first`] logs.
    #[cfg(unix)]
    interrupt: std::io::Result<tokio::signal::unix::Signal>,
    /// An error when SIGTERM could not be caught, which [`Stop::first`] logs.
    #[cfg(unix)]
    terminate: std::io::Result<tokio::signal::unix::Signal>,
}

// === impl Stop ===

impl Stop {
    /// Catches SIGINT and SIGTERM from now on. Must be called within the tokio runtime.
    pub fn catch() -> Stop {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Stop {
                interrupt: signal(SignalKind::interrupt()),
                terminate: signal(SignalKind::terminate()),
            }
        }
        #[cfg(not(unix))]
        Stop {}
    }

    /// Resolves on the first SIGINT or SIGTERM and logs which, to stop a server that drains for
    /// at most `grace`; from then on logs each later one, so that an operator who repeats one
    /// (`kill` run twice, `docker stop` after `kill`) can tell it came and that it changes
    /// nothing: the drain goes on, within `grace`.
    pub async fn first_then_repeats(mut self, grace: Duration) {
        self.first().await;
        // Spawned, not awaited: this future resolving is what starts the drain. The task ends
        // with the runtime, so it keeps nothing running after the drain.
        tokio::spawn(self.log_repeats(grace));
    }

    /// Resolves on the first SIGINT or SIGTERM and logs which.
    async fn first(&mut self) {
        #[cfg(unix)]
        match (&mut self.interrupt, &mut self.terminate) {
            (Ok(interrupt), Ok(terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => tracing::info!("received SIGINT; shutting down"),
                    _ = terminate.recv() => tracing::info!("received SIGTERM; shutting down"),
                }
            }
            (Ok(interrupt), Err(error)) => {
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

    /// Logs each SIGINT or SIGTERM from now on, once [`Stop::first`] has resolved. Never
    /// returns while one of them is caught.
    ///
    /// At info, as the first is: nothing is wrong and nothing needs doing, and an alert on
    /// warnings must not fire because an operator pressed Ctrl-C twice.
    async fn log_repeats(self, grace: Duration) {
        let grace = humantime::format_duration(grace);
        #[cfg(unix)]
        let mut stop = self;
        loop {
            #[cfg(unix)]
            let name = tokio::select! {
                Some(()) = received(&mut stop.interrupt) => "SIGINT",
                Some(()) = received(&mut stop.terminate) => "SIGTERM",
                else => return,
            };
            #[cfg(not(unix))]
            let name = match tokio::signal::ctrl_c().await {
                Ok(()) => "SIGINT",
                Err(_) => return,
            };
            tracing::info!(%grace, "received {name} while already shutting down; the drain goes on, bounded by --shutdown-grace");
        }
    }
}

/// The next delivery of `signal`, or `None` once it can bring none (never caught, or its
/// driver gone).
#[cfg(unix)]
async fn received(signal: &mut std::io::Result<tokio::signal::unix::Signal>) -> Option<()> {
    signal.as_mut().ok()?.recv().await
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
