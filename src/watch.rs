//! Case-event watches: the one Log Publisher feed fanned out to every open WatchCaseEvents
//! stream.
//!
//! The feed (`log_publisher::client`) publishes each AutoCase event once, into a broadcast ring
//! of `--watch-buffer` entries that every watch reads at its own pace. Publishing never waits for
//! a watcher: one that falls a whole ring behind has missed events, and its stream ends with
//! WATCH_LAGGED the next time it is read, while the others carry on. When the feed loses its
//! connection, every open watch ends with LOG_PUBLISHER_UNAVAILABLE (events may be missed until
//! it reconnects), and new watches are refused until it is back.
//!
//! No I/O and no gRPC here: the service turns a `Subscription` into a stream, and `status`
//! turns a `WatchEnd` into the caller's status.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::domain::CaseEvent;
use crate::metrics::{CaseEventMetrics, GaugeGuard, Metrics};

/// The limits on watches, fixed at startup.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How many watches may be open at once over all connections.
    pub max_watches: NonZeroUsize,
    /// How many events a watcher may fall behind before its stream ends with WATCH_LAGGED.
    pub buffer: NonZeroUsize,
}

/// Every open watch and the feed that serves them; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Watches {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: Settings,
    /// Where the feed reads from, as messages name it.
    source: String,
    feed: Mutex<Feed>,
    /// Open watches, checked against `settings.max_watches`.
    open: AtomicUsize,
    metrics: Metrics,
}

/// The state of the feed, which decides what a new watch gets.
#[derive(Debug)]
enum Feed {
    /// Connected: events go out through this ring.
    Connected(broadcast::Sender<Item>),
    /// Not connected (yet, or any more), for this reason.
    Disconnected(Arc<str>),
    /// The gateway is shutting down: no watch starts any more.
    ShutDown,
}

/// What goes round the ring.
#[derive(Debug, Clone)]
enum Item {
    Event(Arc<ReceivedEvent>),
    /// The feed lost its connection, for this reason.
    Lost(Arc<str>),
    ShuttingDown,
}

/// An AutoCase event as the gateway received it.
#[derive(Debug)]
pub(crate) struct ReceivedEvent {
    /// What the segment says.
    pub(crate) event: CaseEvent,
    /// The segment as received, without its CRLF.
    pub(crate) segment: String,
    /// When the gateway read it: the Log Publisher sends no time of its own.
    pub(crate) received_at: SystemTime,
}

/// Why a watch ended, or was not started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WatchEnd {
    /// The Log Publisher is not connected, or the connection was lost; events may be missed.
    Unavailable {
        /// The Log Publisher's address.
        source: String,
        /// Why it is not connected.
        cause: String,
    },
    /// The watcher fell `buffer` events behind.
    Lagged {
        /// The per-watcher buffer, in events.
        buffer: usize,
    },
    /// `limit` watches are already open.
    TooMany {
        /// `--max-watches`.
        limit: usize,
    },
    /// The gateway is shutting down.
    ShuttingDown,
    /// The gateway runs without a Log Publisher.
    Disabled,
    /// The caller's deadline passed.
    DeadlineReached {
        /// The caller's deadline, from `grpc-timeout`.
        deadline: std::time::Duration,
    },
}

/// One open watch: the events of some ports, or of all, from when it was opened.
#[derive(Debug)]
pub(crate) struct Subscription {
    receiver: broadcast::Receiver<Item>,
    /// The ports asked for, sorted; empty for every port.
    ports: Vec<u32>,
    shared: Arc<Shared>,
    _open: OpenWatch,
}

/// Counts a watch as open until it is dropped, however the stream ends.
#[derive(Debug)]
struct OpenWatch {
    shared: Arc<Shared>,
    _gauge: GaugeGuard,
}

// === impl Watches ===

impl Watches {
    /// No watches yet, and a feed from `source` that has not connected.
    pub(crate) fn new(settings: Settings, source: String, metrics: Metrics) -> Self {
        Watches {
            shared: Arc::new(Shared {
                settings,
                feed: Mutex::new(Feed::Disconnected(Arc::from("it has not connected yet"))),
                source,
                open: AtomicUsize::new(0),
                metrics,
            }),
        }
    }

    /// The series the feed records itself in.
    pub(crate) fn metrics(&self) -> &CaseEventMetrics {
        self.shared.metrics.case_events()
    }

    /// Opens a watch of `ports` (every port when empty), or says why not.
    pub(crate) fn subscribe(&self, mut ports: Vec<u32>) -> Result<Subscription, WatchEnd> {
        let limit = self.shared.settings.max_watches.get();
        // Counted first, so that concurrent watches cannot together pass the limit.
        let open = OpenWatch {
            shared: Arc::clone(&self.shared),
            _gauge: self.metrics().watch_opened(),
        };
        if self.shared.open.fetch_add(1, Ordering::Relaxed) >= limit {
            self.metrics().watch_refused();
            return Err(WatchEnd::TooMany { limit });
        }
        let receiver = match &*self.shared.lock() {
            Feed::Connected(sender) => sender.subscribe(),
            Feed::Disconnected(cause) => return Err(self.shared.unavailable(cause)),
            Feed::ShutDown => return Err(WatchEnd::ShuttingDown),
        };
        ports.sort_unstable();
        ports.dedup();
        Ok(Subscription {
            receiver,
            ports,
            shared: Arc::clone(&self.shared),
            _open: open,
        })
    }

    /// The feed connected: watches may start.
    pub(crate) fn connected(&self) {
        let mut feed = self.shared.lock();
        if !matches!(*feed, Feed::ShutDown) {
            let (sender, _) = broadcast::channel(self.shared.settings.buffer.get());
            *feed = Feed::Connected(sender);
        }
    }

    /// Hands an event to every open watch, without waiting for any.
    pub(crate) fn publish(&self, event: ReceivedEvent) {
        self.metrics().event(event.event.signal.code());
        if let Feed::Connected(sender) = &*self.shared.lock() {
            // No receivers is not an error: nobody is watching.
            let _ = sender.send(Item::Event(Arc::new(event)));
        }
    }

    /// The feed lost its connection (or could not make one) for `cause`: every open watch ends,
    /// and new ones are refused until [`Watches::connected`].
    pub(crate) fn lost(&self, cause: &str) {
        let mut feed = self.shared.lock();
        if matches!(*feed, Feed::ShutDown) {
            return;
        }
        let cause: Arc<str> = Arc::from(cause);
        if let Feed::Connected(sender) = &*feed {
            let _ = sender.send(Item::Lost(Arc::clone(&cause)));
        }
        *feed = Feed::Disconnected(cause);
    }

    /// The gateway is shutting down: every open watch ends, so the drain does not wait for
    /// streams that would never end on their own, and no new one starts.
    pub(crate) fn shut_down(&self) {
        let mut feed = self.shared.lock();
        if let Feed::Connected(sender) = &*feed {
            let _ = sender.send(Item::ShuttingDown);
        }
        *feed = Feed::ShutDown;
    }
}

// === impl Shared ===

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Feed> {
        // The feed state is replaced in one assignment, so a panic elsewhere never leaves it
        // half made: the poison can be ignored.
        self.feed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unavailable(&self, cause: &str) -> WatchEnd {
        WatchEnd::Unavailable {
            source: self.source.clone(),
            cause: cause.to_owned(),
        }
    }
}

// === impl Subscription ===

impl Subscription {
    /// The next event of the watched ports, or why the watch has ended. After an end, the
    /// subscription is spent: the caller ends the stream.
    pub(crate) async fn next(&mut self) -> Result<Arc<ReceivedEvent>, WatchEnd> {
        loop {
            match self.receiver.recv().await {
                Ok(Item::Event(received)) => {
                    if self.ports.is_empty()
                        || self.ports.binary_search(&received.event.port_id).is_ok()
                    {
                        return Ok(received);
                    }
                }
                Ok(Item::Lost(cause)) => return Err(self.shared.unavailable(&cause)),
                Ok(Item::ShuttingDown) => return Err(WatchEnd::ShuttingDown),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.shared.metrics.case_events().watch_lagged();
                    return Err(WatchEnd::Lagged {
                        buffer: self.shared.settings.buffer.get(),
                    });
                }
                // Every sender is replaced only after its last item went out, so this is a
                // feed that went away without saying why.
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(self.shared.unavailable("the feed stopped"));
                }
            }
        }
    }
}

// === impl OpenWatch ===

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CaseSignal, CaseState};

    fn watches(max_watches: usize, buffer: usize) -> Watches {
        let settings = Settings {
            max_watches: NonZeroUsize::new(max_watches).unwrap(),
            buffer: NonZeroUsize::new(buffer).unwrap(),
        };
        Watches::new(settings, "127.0.0.1:44001".to_owned(), Metrics::new())
    }

    fn event(port_id: u32, case_state: CaseState) -> ReceivedEvent {
        let event = CaseEvent {
            port_id,
            bin_id: Some(7),
            signal: CaseSignal::State(case_state),
        };
        ReceivedEvent {
            segment: crate::log_publisher::segment::encode_autocase(&event),
            event,
            received_at: SystemTime::UNIX_EPOCH,
        }
    }

    async fn next_segment(subscription: &mut Subscription) -> Result<String, WatchEnd> {
        subscription
            .next()
            .await
            .map(|received| received.segment.clone())
    }

    #[tokio::test]
    async fn a_watch_sees_its_ports_events_in_order() {
        let watches = watches(10, 16);
        watches.connected();
        let mut all = watches.subscribe(Vec::new()).unwrap();
        let mut port_4 = watches.subscribe(vec![4, 4]).unwrap();
        watches.publish(event(5, CaseState::Ereq));
        watches.publish(event(4, CaseState::Ereq));
        watches.publish(event(4, CaseState::Erso));
        assert_eq!(next_segment(&mut all).await.unwrap(), "AC,5,7,EREQ");
        assert_eq!(next_segment(&mut all).await.unwrap(), "AC,4,7,EREQ");
        assert_eq!(next_segment(&mut port_4).await.unwrap(), "AC,4,7,EREQ");
        assert_eq!(next_segment(&mut port_4).await.unwrap(), "AC,4,7,ERSO");
    }

    #[tokio::test]
    async fn no_watch_starts_without_a_connection() {
        let watches = watches(10, 16);
        let unavailable = WatchEnd::Unavailable {
            source: "127.0.0.1:44001".to_owned(),
            cause: "it has not connected yet".to_owned(),
        };
        assert_eq!(watches.subscribe(Vec::new()).unwrap_err(), unavailable);
        watches.connected();
        assert!(watches.subscribe(Vec::new()).is_ok());
    }

    #[tokio::test]
    async fn a_lost_connection_ends_every_watch_after_the_events_before_it() {
        let watches = watches(10, 16);
        watches.connected();
        let mut first = watches.subscribe(Vec::new()).unwrap();
        let mut second = watches.subscribe(vec![4]).unwrap();
        watches.publish(event(4, CaseState::Ereq));
        watches.lost("connection reset by peer");
        let lost = WatchEnd::Unavailable {
            source: "127.0.0.1:44001".to_owned(),
            cause: "connection reset by peer".to_owned(),
        };
        for subscription in [&mut first, &mut second] {
            assert_eq!(next_segment(subscription).await.unwrap(), "AC,4,7,EREQ");
            assert_eq!(next_segment(subscription).await, Err(lost.clone()));
        }
        assert_eq!(watches.subscribe(Vec::new()).unwrap_err(), lost);
        watches.connected();
        let mut after = watches.subscribe(Vec::new()).unwrap();
        watches.publish(event(4, CaseState::Ecmp));
        assert_eq!(next_segment(&mut after).await.unwrap(), "AC,4,7,ECMP");
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_ended_and_the_others_are_not() {
        let watches = watches(10, 16);
        watches.connected();
        let mut slow = watches.subscribe(Vec::new()).unwrap();
        let mut fast = watches.subscribe(Vec::new()).unwrap();
        for round in 0..40 {
            watches.publish(event(4, CaseState::Ereq));
            assert!(next_segment(&mut fast).await.is_ok(), "round {round}");
        }
        assert_eq!(
            next_segment(&mut slow).await,
            Err(WatchEnd::Lagged { buffer: 16 })
        );
        watches.publish(event(4, CaseState::Erso));
        assert_eq!(next_segment(&mut fast).await.unwrap(), "AC,4,7,ERSO");
        let exposed = watches.shared.metrics.encode();
        assert!(
            exposed.contains("taskgate_case_watches_lagged_total 1\n"),
            "{exposed}"
        );
    }

    #[tokio::test]
    async fn watches_beyond_the_limit_are_refused_until_one_closes() {
        let watches = watches(2, 16);
        watches.connected();
        let first = watches.subscribe(Vec::new()).unwrap();
        let _second = watches.subscribe(Vec::new()).unwrap();
        assert_eq!(
            watches.subscribe(Vec::new()).unwrap_err(),
            WatchEnd::TooMany { limit: 2 }
        );
        drop(first);
        let _third = watches.subscribe(Vec::new()).unwrap();
        let exposed = watches.shared.metrics.encode();
        assert!(
            exposed.contains("taskgate_case_watches_refused_total 1\n"),
            "{exposed}"
        );
        assert!(
            exposed.contains("taskgate_case_watches_open 2\n"),
            "{exposed}"
        );
    }

    #[tokio::test]
    async fn shutdown_ends_every_watch_and_refuses_new_ones() {
        let watches = watches(10, 16);
        watches.connected();
        let mut open = watches.subscribe(Vec::new()).unwrap();
        watches.shut_down();
        watches.connected();
        assert_eq!(next_segment(&mut open).await, Err(WatchEnd::ShuttingDown));
        assert_eq!(
            watches.subscribe(Vec::new()).unwrap_err(),
            WatchEnd::ShuttingDown
        );
    }
}
