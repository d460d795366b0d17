//! Logging off the call path: tracing-subscriber's fmt layer formats each event (text or JSON)
//! and hands the line to tracing-appender's non-blocking writer, whose own thread writes it to
//! stderr.
//!
//! A log reader that stops reading (a stuck log shipper, a container runtime in blocking log mode)
//! must never make a call wait: the writer is lossy, so once `BUFFERED_LINES` lines wait, a new
//! line is dropped, never waited for. Drops are counted by the writer's `ErrorCounter`
//! (`taskgate_log_lines_dropped_total`) and reported in a warning by a thread of their own. On
//! exit what is buffered is written out for at most [`EXIT_FLUSH_BOUND`], since a reader that
//! never reads again must not keep the process from exiting.
//!
//! When spans are exported ([`crate::otel`]), the OpenTelemetry layer sits beside the fmt layer,
//! each with a filter of its own: `RUST_LOG` decides what is logged, never what is traced, and
//! the spans made for tracing are never in a log line.
//! Without export the subscriber is what it always was, with one filter for everything.

use std::env::VarError;
use std::io::BufWriter;
use std::sync::OnceLock;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::Subscriber;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::{FilterExt as _, Targets, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::layer::Filter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// How long the exit waits for buffered lines (and the command's error) to reach stderr. A reader
/// that keeps up takes milliseconds; one that has stopped would hold the exit for ever, and
/// `WorkerGuard`'s own drop for up to 1.1 s. With the half second a connection may linger after
/// GOAWAY, it keeps an exit with nothing in flight within the 1 s the README promises.
pub const EXIT_FLUSH_BOUND: Duration = Duration::from_millis(250);

/// How many formatted lines may wait for the writer thread before new ones are dropped: a reader
/// that pauses for a fraction of a second at tens of thousands of calls a second loses nothing,
/// and at a few hundred bytes a line this holds a few MiB at most.
const BUFFERED_LINES: usize = 8192;

/// The writer thread's buffer in front of stderr: a few hundred lines of a busy gateway per write.
const STDERR_BUFFER_BYTES: usize = 64 * 1024;

/// How often the reporter thread looks at the drop count: drops are reported at most this late,
/// and a reader that stays stalled sees at most one warning in each such interval.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// The writer's drop counter, once logging is set up.
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

/// Keeps the writer thread and the drop reporter running; [`LogGuard::close`] ends both on exit.
#[derive(Debug)]
pub struct LogGuard {
    /// Dropping it writes out what is buffered and stops the writer thread; it may wait.
    worker: WorkerGuard,
    /// `None` if its thread could not be started: drops are then only counted.
    reporter: Option<DropReporter>,
}

/// The thread that logs a warning when lines were dropped, and what stops it.
#[derive(Debug)]
struct DropReporter {
    /// Dropped to make the thread report one last time and end.
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// Installs the global subscriber: `RUST_LOG` if set, else `default_filter`, formatted as
/// `format` and written to stderr by tracing-appender's lossy writer thread; and, when spans are
/// `exported`, the layer that turns the gateway's spans into OpenTelemetry spans.
pub fn init(
    format: LogFormat,
    default_filter: &str,
    exported: Option<&crate::otel::Exporting>,
) -> LogGuard {
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("taskgate-log")
        // The writer thread takes every line waiting, then flushes: buffered, a busy gateway's
        // lines leave in one write each time rather than one write (and one system call) each.
        .finish(BufWriter::with_capacity(
            STDERR_BUFFER_BYTES,
            std::io::stderr(),
        ));
    let dropped = writer.error_counter();
    // Set once per process; a second `init` (only ever in tests) keeps the first writer's count.
    let _ = DROPPED.set(dropped.clone());
    let (directives, refused) = directives(default_filter);
    // `try_init` so that a process that already has a subscriber keeps it rather than panicking.
    let _ = match exported {
        None => tracing_subscriber::registry()
            .with(filter(&directives))
            .with(format_layer(format, writer))
            .try_init(),
        Some(exported) => tracing_subscriber::registry()
            .with(format_layer(format, writer).with_filter(
                log_filter(&directives).and(filter_fn(|metadata| !is_traced(metadata))),
            ))
            .with(exported.layer().with_filter(filter_fn(is_traced)))
            .try_init(),
    };
    if let Some(refused) = refused {
        tracing::warn!(
            target: "taskgate::log",
            "{refused}; logging with the default {default_filter:?} instead"
        );
    }
    let reporter = DropReporter::start(dropped)
        .inspect_err(|error| {
            tracing::warn!(
                target: "taskgate::log",
                %error,
                "cannot start the thread that reports dropped log lines; they are only counted"
            );
        })
        .ok();
    LogGuard { worker, reporter }
}

/// How many log lines were dropped because the writer's buffer was full; 0 before [`init`].
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |dropped| {
        u64::try_from(dropped.dropped_lines()).unwrap_or(u64::MAX)
    })
}

/// The fmt layer for `format`, writing to `writer`: tracing-subscriber's full text format or its
/// JSON format with the current span, both with RFC 3339 UTC times to the microsecond.
///
/// Text is never styled, on a terminal either: tracing-subscriber's `ansi` feature is left out of
/// the build because, even with styles off, it sends every field name and level through its
/// styling code, 3 % of the instructions of a whole call (docs/performance.md).
fn format_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_timer(LineTime);
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().with_current_span(true).boxed(),
    }
}

/// The time a log line starts with: RFC 3339 in UTC to the microsecond
/// (`2026-12-08T01:29:42.003483Z`), the text tracing-subscriber's own `SystemTime` writes,
/// written by humantime, which fills one byte buffer where the other sends each of its seven
/// numbers through `core::fmt`: 1.3k fewer instructions a call, 0.8 % (docs/performance.md).
#[derive(Debug, Clone, Copy)]
struct LineTime;

/// The first second humantime cannot write (the year 10000): it refuses it, and panics on a time
/// before 1970.
const HUMANTIME_END: u64 = 253_402_300_800;

impl FormatTime for LineTime {
    fn format_time(&self, writer: &mut Writer<'_>) -> std::fmt::Result {
        let now = SystemTime::now();
        match now.duration_since(UNIX_EPOCH) {
            Ok(since) if since.as_secs() < HUMANTIME_END => {
                write!(writer, "{}", humantime::format_rfc3339_micros(now))
            }
            // A clock set outside those years: written as the library writes it.
            _ => tracing_subscriber::fmt::time::SystemTime.format_time(writer),
        }
    }
}

/// The filter of `directives`. Directives of targets and levels only (all but the rarest) become
/// a [`Targets`] filter, which decides once per call site; `EnvFilter`, needed only for span and
/// field directives (`[span{field=value}]`), also looks each span up under a lock every time a
/// call's future is polled.
fn filter(directives: &str) -> Box<dyn Layer<Registry> + Send + Sync> {
    match directives.parse::<Targets>() {
        Ok(targets) => Box::new(targets),
        Err(_) => Box::new(EnvFilter::new(directives)),
    }
}

/// The same directives as [`filter`], as a filter of the fmt layer alone.
fn log_filter<S>(directives: &str) -> Box<dyn Filter<S> + Send + Sync>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    match directives.parse::<Targets>() {
        Ok(targets) => Box::new(targets),
        Err(_) => Box::new(EnvFilter::new(directives)),
    }
}

/// What is traced: the spans made for tracing alone ([`crate::otel::SPAN_TARGET`]), whatever
/// `RUST_LOG` says; the log never shows them, and no event is traced (events are log lines,
/// which the log has).
fn is_traced(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.is_span() && metadata.target() == crate::otel::SPAN_TARGET
}

/// `RUST_LOG` if it is set and valid, else `default_filter`; and, when `RUST_LOG` is set but not
/// taken, why not, for the log to say rather than leave a typo unseen.
fn directives(default_filter: &str) -> (String, Option<String>) {
    let refused = match std::env::var("RUST_LOG") {
        Err(VarError::NotPresent) => None,
        Err(VarError::NotUnicode(value)) => Some(format!("RUST_LOG={value:?} is not UTF-8")),
        Ok(value) => match EnvFilter::try_new(&value) {
            Ok(_) => return (value, None),
            Err(error) => Some(format!(
                "RUST_LOG={value:?} is not a valid filter ({error})"
            )),
        },
    };
    (default_filter.to_owned(), refused)
}

// === impl LogGuard ===

impl LogGuard {
    /// Writes out the lines still buffered, then `last_line` (the command's error) straight to
    /// stderr, waiting at most [`EXIT_FLUSH_BOUND`]. The writing happens on a thread of its own,
    /// left behind if stderr is not read: the process exits anyway.
    pub fn close(self, last_line: Option<String>) {
        let (done_tx, done) = mpsc::channel();
        let closing = std::thread::Builder::new()
            .name("taskgate-log-exit".to_owned())
            .spawn(move || {
                if let Some(reporter) = self.reporter {
                    reporter.stop();
                }
                drop(self.worker);
                if let Some(line) = last_line {
                    eprintln!("{line}");
                }
                let _ = done_tx.send(());
            });
        // Without the thread nothing is written: writing here could wait for ever.
        if closing.is_ok() {
            let _ = done.recv_timeout(EXIT_FLUSH_BOUND);
        }
    }
}

// === impl DropReporter ===

impl DropReporter {
    /// Starts the thread that reports `dropped` every [`DROP_REPORT_INTERVAL`] it has grown.
    fn start(dropped: ErrorCounter) -> std::io::Result<DropReporter> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("taskgate-log-drops".to_owned())
            .spawn(move || {
                let mut reported = 0;
                loop {
                    let stopping = !matches!(
                        stopped.recv_timeout(DROP_REPORT_INTERVAL),
                        Err(RecvTimeoutError::Timeout)
                    );
                    let total_dropped = dropped.dropped_lines();
                    if total_dropped > reported {
                        report_drops(total_dropped - reported, total_dropped);
                        reported = total_dropped;
                    }
                    if stopping {
                        break;
                    }
                }
            })?;
        Ok(DropReporter { stop, thread })
    }

    /// Makes the thread report what was dropped since its last report, and waits for it to end;
    /// it never blocks, as it only logs through the lossy writer.
    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// Logs that lines were dropped. The line goes through the same lossy writer, so while the
/// reader is still stalled it may be dropped in turn: it is then counted, and reported with the
/// next.
fn report_drops(newly_dropped: usize, total_dropped: usize) {
    tracing::warn!(
        target: "taskgate::log",
        dropped = newly_dropped,
        total_dropped,
        "log lines were dropped because stderr was not read fast enough"
    );
}

/// For tests elsewhere: the lines `format` writes for the events `record` logs.
#[cfg(test)]
pub(crate) fn lines_for_test(format: LogFormat, record: impl FnOnce()) -> Vec<String> {
    let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let buffer = buffer.clone();
        move || tests::SharedBuffer(buffer.clone())
    };
    let subscriber = tracing_subscriber::registry().with(format_layer(format, writer));
    tracing::subscriber::with_default(subscriber, record);
    let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    text.lines().map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    pub(super) struct SharedBuffer(pub(super) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(bytes)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A line's time is the text tracing-subscriber's own timer writes: RFC 3339 in UTC to the
    /// microsecond, in both formats.
    #[test]
    fn lines_carry_the_librarys_time_text() {
        let shape = |time: &str| {
            time.len() == 27
                && time.bytes().enumerate().all(|(at, byte)| match at {
                    4 | 7 => byte == b'-',
                    10 => byte == b'T',
                    13 | 16 => byte == b':',
                    19 => byte == b'.',
                    26 => byte == b'Z',
                    _ => byte.is_ascii_digit(),
                })
        };
        let written = |timer: &dyn FormatTime| {
            let mut text = String::new();
            timer.format_time(&mut Writer::new(&mut text)).unwrap();
            text
        };
        // The two clocks are read apart, so a second may turn between them: read both again.
        let reads: Vec<(String, String)> = (0..3)
            .map(|_| {
                let ours = written(&LineTime);
                (ours, written(&tracing_subscriber::fmt::time::SystemTime))
            })
            .collect();
        let (ours, theirs) = reads
            .iter()
            .find(|(ours, theirs)| ours.get(..19) == theirs.get(..19))
            .unwrap_or_else(|| panic!("not the same second three times: {reads:?}"));
        assert!(shape(ours) && shape(theirs), "{ours} {theirs}");
        let read = humantime::parse_rfc3339(ours).unwrap();
        // Either way round: the wall clock may have been set back meanwhile.
        let apart = SystemTime::now()
            .duration_since(read)
            .unwrap_or_else(|earlier| earlier.duration());
        assert!(apart < Duration::from_secs(60), "{ours}");

        let text = lines_for_test(LogFormat::Text, || tracing::info!("x"));
        assert!(shape(text[0].split_once(' ').unwrap().0), "{text:?}");
        let json = lines_for_test(LogFormat::Json, || tracing::info!("x"));
        let object: serde_json::Value = serde_json::from_str(&json[0]).unwrap();
        assert!(shape(object["timestamp"].as_str().unwrap()), "{object}");
    }

    /// For target-and-level directives, the cheaper filter decides as `EnvFilter` does.
    #[test]
    fn targets_filter_as_env_filter_does() {
        fn decisions(filter: Box<dyn Layer<Registry> + Send + Sync>) -> Vec<bool> {
            let subscriber = tracing_subscriber::registry().with(filter);
            tracing::subscriber::with_default(subscriber, || {
                vec![
                    tracing::enabled!(target: "taskgate::access", Level::INFO),
                    tracing::enabled!(target: "taskgate::access", Level::DEBUG),
                    tracing::enabled!(target: "taskgate::simulator", Level::DEBUG),
                    tracing::enabled!(target: "taskgate::simulator::http", Level::TRACE),
                    tracing::enabled!(target: "taskgate", Level::TRACE),
                    tracing::enabled!(target: "hyper::proto::h1", Level::DEBUG),
                    tracing::enabled!(target: "h2", Level::WARN),
                    tracing::enabled!(target: "taskgatex", Level::INFO),
                ]
            })
        }
        for directives in [
            "info",
            "warn,taskgate::access=info",
            "info,taskgate::simulator=debug",
            "taskgate",
            "taskgate=trace,hyper=off",
            "off",
            "error,taskgate::simulator::http=trace",
            "DEBUG",
        ] {
            let targets: Targets = directives.parse().unwrap();
            assert_eq!(
                decisions(Box::new(targets)),
                decisions(Box::new(EnvFilter::new(directives))),
                "{directives}"
            );
        }
        assert!(
            "info,[call{request_id=x}]=debug"
                .parse::<Targets>()
                .is_err()
        );
    }
}
