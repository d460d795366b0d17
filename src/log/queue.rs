//! The log queue: formatted lines are copied into one bounded byte buffer, which a thread of its
//! own swaps out and writes to stderr in batches.
//!
//! Why not a channel of lines (tracing-appender's `non_blocking`, used before): each line was a
//! `Vec` allocated on the call's thread and freed on the writer's. Under load those frees overflow
//! the writer thread's malloc cache and take the lock of the workers' arenas, which cost a futex
//! call on every other call and a context switch on every fourth (counted with `perf stat` at 128
//! calls in flight). Here only bytes cross threads, into two buffers that are reused.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// The shared end of the queue: every thread that logs appends to it through a [`QueueWriter`].
#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when the first line lands in an empty buffer, and when the queue closes.
    ready: Condvar,
    /// Lines dropped because the buffer was full.
    dropped: AtomicU64,
    /// The most bytes the buffer holds.
    limit: usize,
}

/// What waits for the writer thread.
#[derive(Debug)]
struct Pending {
    lines: Vec<u8>,
    /// Set once on exit: the writer writes what is left and stops.
    closing: bool,
}

/// Appends whole lines to the queue; cloned into every place that logs.
#[derive(Debug, Clone)]
pub(super) struct QueueWriter(Arc<Shared>);

/// The writer thread, and what ends it.
#[derive(Debug)]
pub(super) struct QueueThread {
    shared: Arc<Shared>,
    /// Receives once the thread has written everything and stopped.
    done: std::sync::mpsc::Receiver<()>,
}

/// How the writer thread paces and reports.
pub(super) struct WriterSettings {
    /// The most bytes that may wait; a line that does not fit is dropped and counted.
    pub(super) limit: usize,
    /// After writing a batch the thread waits this long before taking the next, so that under load
    /// lines pile up instead of each call waking it.
    pub(super) interval: Duration,
    /// Called on the writer thread with the lines dropped since the last report and the total,
    /// before the next batch is written. It may log: the queue's lock is not held.
    pub(super) report_drops: fn(u64, u64),
}

/// Starts the writer thread, named `name`, writing batches to `out`.
pub(super) fn start(
    name: &str,
    settings: WriterSettings,
    out: impl Write + Send + 'static,
) -> std::io::Result<(QueueWriter, QueueThread)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            // Capacity is only address space until lines are written into it.
            lines: Vec::with_capacity(settings.limit),
            closing: false,
        }),
        ready: Condvar::new(),
        dropped: AtomicU64::new(0),
        limit: settings.limit,
    });
    let (done_tx, done) = std::sync::mpsc::channel();
    let thread_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            write_batches(&thread_shared, &settings, out);
            let _ = done_tx.send(());
        })?;
    Ok((
        QueueWriter(Arc::clone(&shared)),
        QueueThread { shared, done },
    ))
}

// === impl Shared ===

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding the lock; if something did, the bytes are still whole lines.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl QueueWriter ===

impl QueueWriter {
    /// Appends `line` if it fits, else counts it as dropped. Never waits for the writer thread.
    pub(super) fn push(&self, line: &[u8]) {
        let shared = &*self.0;
        let mut pending = shared.lock();
        if pending.lines.len() + line.len() > shared.limit {
            drop(pending);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = pending.lines.is_empty();
        pending.lines.extend_from_slice(line);
        drop(pending);
        // Once per batch: later lines find the buffer non-empty and the thread already told.
        if was_empty {
            shared.ready.notify_one();
        }
    }

    /// How many lines were dropped because the queue was full.
    pub(super) fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = &'a QueueWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Each `write` is one whole line: tracing-subscriber formats an event into a buffer and writes
/// it with one `write_all`.
impl Write for &QueueWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// === impl QueueThread ===

impl QueueThread {
    /// Closes the queue and waits at most `bound` for the thread to write what is queued: a
    /// reader that never reads again must not keep the process from exiting.
    pub(super) fn close_within(self, bound: Duration) {
        self.shared.lock().closing = true;
        self.shared.ready.notify_one();
        let _ = self.done.recv_timeout(bound);
    }
}

/// The writer thread: takes the whole buffer at once, writes it with one `write_all`, waits
/// `interval`, until the queue closes and nothing is left.
fn write_batches(shared: &Shared, settings: &WriterSettings, mut out: impl Write) {
    let mut batch = Vec::with_capacity(settings.limit);
    let mut reported = 0;
    loop {
        let closing = {
            let mut pending = shared.lock();
            while pending.lines.is_empty() && !pending.closing {
                pending = shared
                    .ready
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            std::mem::swap(&mut pending.lines, &mut batch);
            pending.closing
        };
        let dropped = shared.dropped.load(Ordering::Relaxed);
        if dropped > reported {
            (settings.report_drops)(dropped - reported, dropped);
            reported = dropped;
        }
        // A failed write loses this batch; there is nowhere else to say so.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if closing {
            if shared.lock().lines.is_empty() {
                return;
            }
        } else {
            pace(settings.interval);
        }
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "paces the writer thread so lines batch up; nothing waits on this sleep"
)]
fn pace(interval: Duration) {
    std::thread::sleep(interval);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the writer thread wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A reader that never reads: every write blocks until the test lets go.
    struct Stalled(Arc<(Mutex<bool>, Condvar)>);

    impl Write for Stalled {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let (released, wake) = &*self.0;
            let mut released = released.lock().unwrap();
            while !*released {
                released = wake.wait(released).unwrap();
            }
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const BOUND: Duration = Duration::from_secs(10);

    fn settings(limit: usize) -> WriterSettings {
        WriterSettings {
            limit,
            interval: Duration::from_millis(1),
            report_drops: |_, _| {},
        }
    }

    #[test]
    fn lines_are_written_in_order_and_all_of_them_on_close() {
        let sink = Sink::default();
        let (writer, thread) = start("test-log", settings(1 << 20), sink.clone()).unwrap();
        let expected: Vec<u8> = (0..10_000)
            .flat_map(|line| format!("line {line}\n").into_bytes())
            .collect();
        for line in expected.split_inclusive(|&byte| byte == b'\n') {
            writer.push(line);
        }
        thread.close_within(BOUND);
        assert_eq!(*sink.0.lock().unwrap(), expected);
        assert_eq!(writer.dropped(), 0);
    }

    #[test]
    fn a_line_that_does_not_fit_is_dropped_and_counted_and_never_waited_for() {
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (writer, thread) =
            start("test-log", settings(10), Stalled(Arc::clone(&release))).unwrap();
        // The first line may already be with the stalled writer; the queue then holds 10 bytes.
        for _ in 0..5 {
            writer.push(b"12345\n");
        }
        let dropped = writer.dropped();
        assert!((3..=4).contains(&dropped), "{dropped} dropped");
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        thread.close_within(BOUND);
    }

    #[test]
    fn drops_are_reported_before_the_next_batch() {
        static REPORTED: Mutex<Vec<(u64, u64, usize)>> = Mutex::new(Vec::new());
        static WRITTEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());
        struct Global;
        impl Write for Global {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                WRITTEN.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (writer, thread) = start(
            "test-log",
            WriterSettings {
                limit: 8,
                interval: Duration::from_millis(1),
                report_drops: |newly, total| {
                    let written = WRITTEN.lock().unwrap().len();
                    REPORTED.lock().unwrap().push((newly, total, written));
                },
            },
            Global,
        )
        .unwrap();
        // Filled without waking the writer, so the next line finds the queue full.
        writer.0.lock().lines.extend_from_slice(b"1234567\n");
        writer.push(b"refused\n");
        thread.close_within(BOUND);
        assert_eq!(*REPORTED.lock().unwrap(), [(1, 1, 0)]);
        assert_eq!(*WRITTEN.lock().unwrap(), b"1234567\n");
    }

    #[test]
    fn closing_waits_no_longer_than_its_bound_for_a_stalled_reader() {
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (writer, thread) =
            start("test-log", settings(1024), Stalled(Arc::clone(&release))).unwrap();
        writer.push(b"stuck\n");
        let (returned_tx, returned) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            thread.close_within(Duration::from_millis(50));
            let _ = returned_tx.send(());
        });
        let outcome = returned.recv_timeout(BOUND);
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        assert!(
            outcome.is_ok(),
            "close_within waited for a reader that never reads"
        );
    }
}
