//! Accepting connections on every listener (gRPC, `/metrics`, the simulator) without spinning
//! and without flooding the log.
//!
//! When the process runs out of file descriptors, `accept` fails at once and keeps failing while
//! the connection waits in the kernel's backlog: a loop that simply retries burns a core. So a
//! failed accept sleeps, longer each time up to a bound, is counted, and is logged at most once
//! per [`LOG_INTERVAL`] with the number of failures since the last line.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::metrics::ListenerMetrics;

/// The first pause after a failed accept: long enough to stop a spin, short enough that a brief
/// shortage costs nothing noticeable.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// The longest pause: a connection waiting in the backlog is picked up at most this late once
/// descriptors are free again.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per interval for a repeating condition (accept errors, refusals).
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A listener whose accept errors are survived, counted and logged once per interval.
#[derive(Debug)]
pub(crate) struct Acceptor {
    listener: TcpListener,
    /// Counts accept errors under this listener's name.
    metrics: ListenerMetrics,
    /// The pause before the next retry; zero after a success.
    backoff: Duration,
    /// Keeps a persistent failure to one log line per interval.
    error_log: LogEvery,
}

/// Lets a repeating event through to the log once per interval ([`LOG_INTERVAL`] by default),
/// counting the rest.
#[derive(Debug)]
pub(crate) struct LogEvery {
    interval: Duration,
    last_logged: Option<Instant>,
    /// Events since the last line that were not logged.
    suppressed: u64,
}

// === impl Acceptor ===

impl Acceptor {
    /// Wraps `listener`; errors are counted in `metrics`.
    pub(crate) fn new(listener: TcpListener, metrics: ListenerMetrics) -> Self {
        Acceptor {
            listener,
            metrics,
            backoff: Duration::ZERO,
            error_log: LogEvery::default(),
        }
    }

    /// The next connection. Never fails: errors are paused on and retried.
    pub(crate) async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = Duration::ZERO;
                    return accepted;
                }
                // The peer gave up before we took its connection; nothing is wrong here.
                Err(error) if peer_gave_up(&error) => continue,
                Err(error) => {
                    let kind = error_kind(&error);
                    self.metrics.accept_error(kind);
                    if let Some(suppressed) = self.error_log.ready(Instant::now()) {
                        tracing::warn!(
                            listener = self.metrics.listener(),
                            cause = %error,
                            kind,
                            suppressed,
                            "cannot accept connections; pausing before retrying (logged once per 10s)"
                        );
                    }
                    self.backoff = (self.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                    tokio::time::sleep(self.backoff).await;
                }
            }
        }
    }

    /// The address the listener is bound to, for log lines.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Errors about one connection that the peer already abandoned; the next accept works.
fn peer_gave_up(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// The metric label for an accept error: running out of descriptors is the one an operator
/// can fix (raise `nofile`, lower the connection limits), so it has its own.
fn error_kind(error: &io::Error) -> &'static str {
    let fd_limit = [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE]
        .iter()
        .any(|errno| error.raw_os_error() == Some(errno.raw_os_error()));
    if fd_limit { "fd_limit" } else { "other" }
}

// === impl LogEvery ===

impl Default for LogEvery {
    fn default() -> Self {
        LogEvery::every(LOG_INTERVAL)
    }
}

impl LogEvery {
    /// At most one line per `interval`.
    pub(crate) fn every(interval: Duration) -> Self {
        LogEvery {
            interval,
            last_logged: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed)` when a line may be logged at `now` (with the count of events not
    /// logged since the last one); `None` when this event is only counted.
    pub(crate) fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_event_is_logged_once_per_interval() {
        let start = Instant::now();
        let mut log = LogEvery::default();
        assert_eq!(log.ready(start), Some(0));
        assert_eq!(log.ready(start), None);
        assert_eq!(log.ready(start + LOG_INTERVAL / 2), None);
        assert_eq!(log.ready(start + LOG_INTERVAL), Some(2));
        assert_eq!(log.ready(start + LOG_INTERVAL), None);
    }

    #[test]
    fn running_out_of_descriptors_has_its_own_kind() {
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let enfile = io::Error::from_raw_os_error(rustix::io::Errno::NFILE.raw_os_error());
        let enomem = io::Error::from_raw_os_error(rustix::io::Errno::NOMEM.raw_os_error());
        assert_eq!(error_kind(&emfile), "fd_limit");
        assert_eq!(error_kind(&enfile), "fd_limit");
        assert_eq!(error_kind(&enomem), "other");
    }
}
