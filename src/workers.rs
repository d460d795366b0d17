//! The threads that run the gateway's connections, each on a current-thread runtime of its own:
//! a connection and its HTTP/2 streams stay on one thread from accept to close, and no task is
//! ever handed to another thread. Controller connections are the one `reqwest::Client`'s, shared
//! by every worker: each is driven on the worker that opened it (hyper spawns its task there).
//!
//! tokio's multi-thread scheduler shares one run queue between its threads and steals work
//! across them: at 128 calls in flight on two cores, its second worker cost more CPU per call
//! than it gained. Connections spread over independent runtimes use the second core without
//! handing anything over (docs/performance.md, "Sixth session").
//!
//! Worker 0 is the runtime `server::serve` runs on, which also accepts connections and runs
//! health, metrics and the Log Publisher feed; the others are threads started here.

use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The name of the threads started here (Linux keeps 15 bytes of a thread's name).
pub(crate) const THREAD_NAME: &str = "taskgate-worker";

/// The runtimes connections run on. Dropping it stops the threads started here, and with them
/// every task still running on them.
#[derive(Debug)]
pub(crate) struct Workers {
    /// Worker 0's runtime first, then one per thread.
    handles: Vec<Handle>,
    /// Connections each worker runs now.
    load: Arc<[AtomicUsize]>,
    /// Dropped, each ends its thread's runtime.
    _stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Worker 0 is the current runtime; `count - 1` threads are started beside it.
    pub(crate) fn start(count: NonZeroUsize) -> std::io::Result<Workers> {
        let mut handles = vec![Handle::current()];
        let mut stops = Vec::with_capacity(count.get() - 1);
        for _ in 1..count.get() {
            let (stop, stopped) = oneshot::channel::<()>();
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(THREAD_NAME.to_owned())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            if started.send(Ok(runtime.handle().clone())).is_ok() {
                                // A sent stop or a dropped sender both end it.
                                let _ = runtime.block_on(stopped);
                            }
                            // Tasks still running end here; nothing waits for blocking work
                            // (a DNS lookup) the process is about to leave behind.
                            runtime.shutdown_background();
                        }
                        Err(error) => {
                            let _ = started.send(Err(error));
                        }
                    }
                })?;
            handles.push(handle.recv().map_err(std::io::Error::other)??);
            stops.push(stop);
        }
        Ok(Workers {
            load: handles.iter().map(|_| AtomicUsize::new(0)).collect(),
            handles,
            _stops: stops,
        })
    }

    /// How many workers there are.
    pub(crate) fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `connection` on the worker with the fewest connections (the lowest-numbered one of
    /// those), which spreads connections in turn while they last alike.
    pub(crate) fn spawn(&self, connection: impl Future<Output = ()> + Send + 'static) {
        let index = least_loaded(&self.load);
        self.load[index].fetch_add(1, Ordering::Relaxed);
        let running = Running {
            load: Arc::clone(&self.load),
            index,
        };
        self.handles[index].spawn(async move {
            connection.await;
            drop(running);
        });
    }
}

/// The index of the smallest count, the first of equals.
fn least_loaded(load: &[AtomicUsize]) -> usize {
    let mut best = 0;
    let mut fewest = usize::MAX;
    for (index, count) in load.iter().enumerate() {
        let count = count.load(Ordering::Relaxed);
        if count < fewest {
            (best, fewest) = (index, count);
        }
    }
    best
}

/// A connection counted on its worker until its task ends or is dropped.
struct Running {
    load: Arc<[AtomicUsize]>,
    index: usize,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.load[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_least_loaded_worker_is_the_first_of_equals() {
        let load = |counts: &[usize]| -> Vec<AtomicUsize> {
            counts
                .iter()
                .map(|&count| AtomicUsize::new(count))
                .collect()
        };
        assert_eq!(least_loaded(&load(&[0])), 0);
        assert_eq!(least_loaded(&load(&[0, 0, 0])), 0);
        assert_eq!(least_loaded(&load(&[1, 0, 0])), 1);
        assert_eq!(least_loaded(&load(&[1, 1, 0])), 2);
        assert_eq!(least_loaded(&load(&[3, 1, 2])), 1);
    }

    /// Connections spread evenly over the workers, each worker a thread of its own (worker 0
    /// the caller's), and each leaves the count when it ends.
    #[tokio::test]
    async fn connections_spread_over_the_workers_and_leave_their_count() {
        let workers = Workers::start(NonZeroUsize::new(3).unwrap()).unwrap();
        assert_eq!(workers.count(), 3);
        let (ran, mut ran_on) = tokio::sync::mpsc::unbounded_channel();
        let mut ends = Vec::new();
        for _ in 0..6 {
            let (end, ended) = oneshot::channel::<()>();
            ends.push(end);
            let ran = ran.clone();
            workers.spawn(async move {
                let thread = std::thread::current();
                ran.send((thread.id(), thread.name().map(str::to_owned)))
                    .unwrap();
                let _ = ended.await;
            });
        }
        let mut per_thread = std::collections::HashMap::new();
        for _ in 0..6 {
            let next = tokio::time::timeout(Duration::from_secs(10), ran_on.recv());
            *per_thread.entry(next.await.unwrap().unwrap()).or_insert(0) += 1;
        }
        let main_thread = std::thread::current();
        let main_thread = (main_thread.id(), main_thread.name().map(str::to_owned));
        assert_eq!(per_thread.remove(&main_thread), Some(2));
        let others: Vec<_> = per_thread.into_iter().collect();
        assert_eq!(others.len(), 2, "{others:?}");
        for ((_, name), count) in others {
            assert_eq!((name.as_deref(), count), (Some(THREAD_NAME), 2));
        }
        let counts = |workers: &Workers| -> Vec<usize> {
            workers
                .load
                .iter()
                .map(|count| count.load(Ordering::Relaxed))
                .collect()
        };
        assert_eq!(counts(&workers), [2, 2, 2]);
        drop(ends);
        // Each task drops its count as it ends, on its own thread; wait for it, bounded.
        tokio::time::timeout(Duration::from_secs(10), async {
            while counts(&workers) != [0, 0, 0] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }
}
