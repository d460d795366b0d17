//! Logging off the call path: a call formats its line into a bounded queue and goes on; a
//! dedicated thread writes the queue to stderr in batches.
//!
//! A log reader that stops reading (a stuck log shipper, a container runtime in blocking log mode)
//! must never make a call wait: when the queue is full a line is dropped, never waited for. Drops
//! are counted (`taskgate_log_lines_dropped_total`) and reported in one line once writing
//! resumes. On exit the queue is flushed, for at most the time the caller allows.

use std::io::{BufWriter, IsTerminal, Write};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// How many formatted lines may wait for the writer thread. At a few hundred bytes a line this
/// caps the queue near 2 MiB, and it absorbs a reader that pauses for a fraction of a second at
/// tens of thousands of calls a second.
const QUEUE_LINES: usize = 8192;

/// The writer thread collects lines in a buffer this large and writes it with one `write(2)`, so
/// a busy gateway does not make a system call per line.
const BATCH_BYTES: usize = 64 * 1024;

/// The lines dropped so far, once logging is set up.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the writer thread running; [`LogGuard::flush_within`] drains it on exit.
#[derive(Debug)]
pub struct LogGuard {
    worker: WorkerGuard,
}

/// Installs the global subscriber: `RUST_LOG` if set, else `default_filter`, formatted as
/// `format` and written to stderr by a dedicated thread.
pub fn init(format: LogFormat, default_filter: &str) -> LogGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("taskgate-log")
        .finish(DropReporter {
            inner: BufWriter::with_capacity(BATCH_BYTES, std::io::stderr()),
            reported: 0,
        });
    // Set once per process; a second `init` (only ever in tests) keeps the first counter.
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // `try_init` so that a process that already has a subscriber keeps it rather than panicking.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
    LogGuard { worker }
}

/// How many log lines were dropped because the queue was full; 0 before [`init`].
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

// === impl LogGuard ===

impl LogGuard {
    /// Writes out what is queued, waiting at most `bound`: a reader that never reads again must
    /// not keep the process from exiting.
    pub fn flush_within(self, bound: Duration) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // Dropping the guard is what flushes, and it can block on a stalled stderr, so it happens
        // on a thread of its own that the process does not wait for past `bound`.
        let flusher = std::thread::Builder::new()
            .name("taskgate-log-flush".to_owned())
            .spawn(move || {
                drop(self.worker);
                let _ = done_tx.send(());
            });
        if flusher.is_ok() {
            let _ = done_rx.recv_timeout(bound);
        }
    }
}

/// The writer thread's end of the queue: reports drops in one line before the first line written
/// after them.
struct DropReporter<W> {
    inner: W,
    /// The drop count already reported.
    reported: u64,
}

impl<W: Write> Write for DropReporter<W> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let dropped = dropped_lines();
        if dropped > self.reported {
            let newly_dropped = dropped - self.reported;
            self.reported = dropped;
            // Goes through the queue like any line, so it is formatted like the rest; this thread
            // is not inside the subscriber here, so logging from it cannot deadlock.
            tracing::warn!(
                target: "taskgate::log",
                dropped = newly_dropped,
                total_dropped = dropped,
                "log lines were dropped because stderr was not read fast enough"
            );
        }
        self.inner.write(line)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_pass_through_in_order_and_are_written_on_flush() {
        let mut reporter = DropReporter {
            inner: BufWriter::new(Vec::new()),
            reported: 0,
        };
        reporter.write_all(b"one\n").unwrap();
        reporter.write_all(b"two\n").unwrap();
        assert!(
            reporter.inner.get_ref().is_empty(),
            "written before a flush"
        );
        reporter.flush().unwrap();
        assert_eq!(reporter.inner.get_ref().as_slice(), b"one\ntwo\n");
    }
}
