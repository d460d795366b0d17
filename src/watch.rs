//! Case-event watches: the one Log Publisher feed fanned out to every open WatchCaseEvents
//! stream.
//!
//! The feed (`log_publisher::client`) hands each AutoCase event to the watches of its port and
//! to those of every port, each into an inbox of at most `--watch-buffer` events that its
//! stream empties at its own pace. Publishing never waits for a watcher: one whose inbox is full
//! when an event comes has fallen a whole buffer behind, and the feed ends it there and then with
//! WATCH_LAGGED, whether or not anything still reads its stream, while the others carry on. An
//! inbox holds only the events of the ports its watch asked for, so a watcher of a quiet port
//! never lags for other ports' events. When the feed loses its connection, every open watch ends
//! with LOG_PUBLISHER_UNAVAILABLE after the events already in its inbox (events may be missed
//! until it reconnects), and new watches are refused until it is back.
//!
//! No I/O and no gRPC here: the service turns a `Subscription` into a stream, and `status`
//! turns a `WatchEnd` into the caller's status. A watch that ends also says so through
//! `Subscription::ending`, and then counts each event its stream takes after that, so that
//! its stream can be ended when its client has stopped reading and nothing polls it, and only
//! then (`connection::end_stream_when`).

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio::sync::{Notify, watch};

use crate::connection::ResponseEnd;
use crate::domain::CaseEvent;
use crate::metrics::{CaseEventMetrics, GaugeGuard, Metrics};

/// The most an emptied inbox keeps allocated (in events): a watcher that keeps up needs a
/// handful, and 10,000 watches that each once took a burst do not keep `--watch-buffer` apiece.
const IDLE_INBOX_CAPACITY: usize = 16;

/// The limits on watches, fixed at startup.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How many watches may be open at once over all connections.
    pub max_watches: NonZeroUsize,
    /// How many events of its ports a watcher may fall behind before its stream ends with
    /// WATCH_LAGGED.
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
    /// Names the next watch in the feed's index.
    next_id: AtomicU64,
    metrics: Metrics,
}

/// The state of the feed, which decides what a new watch gets.
#[derive(Debug)]
enum Feed {
    /// Connected: events go to these inboxes.
    Connected(Inboxes),
    /// Not connected (yet, or any more), for this reason.
    Disconnected(Arc<str>),
    /// The gateway is shutting down: no watch starts any more.
    ShutDown,
}

/// The inboxes of the open watches, by the ports they watch, so that an event costs only the
/// watches that asked for it.
#[derive(Debug, Default)]
struct Inboxes {
    /// Watches of every port.
    every_port: HashMap<u64, Arc<Inbox>>,
    /// Watches of some ports, under each port they watch.
    by_port: HashMap<u32, HashMap<u64, Arc<Inbox>>>,
}

/// One watch's events on their way to its stream.
#[derive(Debug)]
struct Inbox {
    /// The ports watched, sorted; empty for every port.
    ports: Vec<u32>,
    state: Mutex<InboxState>,
    /// Wakes the stream when an event or the end has arrived.
    arrived: Notify,
    /// For whatever sends its stream: `Some` once the watch has ended, counting the events
    /// taken since; dropped with the watch.
    ending: watch::Sender<ResponseEnd>,
}

#[derive(Debug)]
struct InboxState {
    /// At most `--watch-buffer`.
    events: VecDeque<Arc<ReceivedEvent>>,
    /// Why the watch ends, once the events before it have been taken.
    end: Option<WatchEnd>,
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
    /// Its name in the feed's index, which it leaves when dropped.
    id: u64,
    inbox: Arc<Inbox>,
    shared: Arc<Shared>,
    /// The stream's span and what it carried, when spans are exported.
    traced: Option<TracedWatch>,
    _open: OpenWatch,
}

/// What a watch's span records when the watch ends: the call's server span (made in `call`,
/// which declares these fields), lasting as long as its stream.
#[derive(Debug)]
struct TracedWatch {
    span: tracing::Span,
    /// Events handed to the stream.
    events: u64,
    /// Why the watch ended, as a fixed word, once it has.
    end: Option<&'static str>,
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
                next_id: AtomicU64::new(0),
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
        ports.sort_unstable();
        ports.dedup();
        let inbox = Arc::new(Inbox {
            ports,
            state: Mutex::new(InboxState {
                events: VecDeque::new(),
                end: None,
            }),
            arrived: Notify::new(),
            ending: watch::Sender::new(None),
        });
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        match &mut *self.shared.lock() {
            Feed::Connected(inboxes) => inboxes.insert(id, &inbox),
            Feed::Disconnected(cause) => return Err(self.shared.unavailable(cause)),
            Feed::ShutDown => return Err(WatchEnd::ShuttingDown),
        }
        // Subscribed from the handler, inside the call's span.
        let traced = crate::otel::exporting().then(|| TracedWatch {
            span: tracing::Span::current(),
            events: 0,
            end: None,
        });
        Ok(Subscription {
            id,
            inbox,
            shared: Arc::clone(&self.shared),
            traced,
            _open: open,
        })
    }

    /// The feed connected: watches may start.
    pub(crate) fn connected(&self) {
        let mut feed = self.shared.lock();
        // Watches opened on an earlier connection have been ended already.
        if let Feed::Disconnected(_) = *feed {
            *feed = Feed::Connected(Inboxes::default());
        }
    }

    /// Hands an event to every open watch of its port, without waiting for any; a watch whose
    /// inbox is full has lagged, and is ended here. Called by the feed alone, one event after
    /// the other.
    pub(crate) fn publish(&self, event: ReceivedEvent) {
        self.metrics().event(event.event.signal.code());
        let port_id = event.event.port_id;
        // The inboxes are filled (and their streams woken) after the feed's lock is released,
        // so that watches opening and closing do not wait for thousands of them. Order holds
        // all the same: this is the only publisher, so each inbox gets its ports' events in the
        // order they came, and a watch opened after this list was made never sees this event.
        let recipients: Vec<(u64, Arc<Inbox>)> = match &*self.shared.lock() {
            Feed::Connected(inboxes) => inboxes
                .of_port(port_id)
                .map(|(id, inbox)| (*id, Arc::clone(inbox)))
                .collect(),
            Feed::Disconnected(_) | Feed::ShutDown => return,
        };
        let event = Arc::new(event);
        let buffer = self.shared.settings.buffer.get();
        let lagged: Vec<(u64, Arc<Inbox>)> = recipients
            .into_iter()
            .filter(|(_, inbox)| !inbox.deliver(&event, buffer))
            .collect();
        if lagged.is_empty() {
            return;
        }
        let mut feed = self.shared.lock();
        for (id, inbox) in lagged {
            self.metrics().watch_lagged();
            // A feed lost or shut down since has let go of every inbox already.
            if let Feed::Connected(inboxes) = &mut *feed {
                inboxes.remove(id, &inbox);
            }
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
        if let Feed::Connected(inboxes) = &*feed {
            inboxes.end_all(&self.shared.unavailable(&cause));
        }
        *feed = Feed::Disconnected(cause);
    }

    /// The gateway is shutting down: every open watch ends, so the drain does not wait for
    /// streams that would never end on their own, and no new one starts.
    pub(crate) fn shut_down(&self) {
        let mut feed = self.shared.lock();
        if let Feed::Connected(inboxes) = &*feed {
            inboxes.end_all(&WatchEnd::ShuttingDown);
        }
        *feed = Feed::ShutDown;
    }
}

// === impl Shared ===

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Feed> {
        lock(&self.feed)
    }

    fn unavailable(&self, cause: &str) -> WatchEnd {
        WatchEnd::Unavailable {
            source: self.source.clone(),
            cause: cause.to_owned(),
        }
    }
}

/// Locks `mutex`: what the feed and the inboxes guard is replaced or pushed in one step, so a
/// panic elsewhere never leaves it half made, and the poison can be ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// === impl Inboxes ===

impl Inboxes {
    fn insert(&mut self, id: u64, inbox: &Arc<Inbox>) {
        if inbox.ports.is_empty() {
            self.every_port.insert(id, Arc::clone(inbox));
        }
        for port_id in &inbox.ports {
            let watches = self.by_port.entry(*port_id).or_default();
            watches.insert(id, Arc::clone(inbox));
        }
    }

    fn remove(&mut self, id: u64, inbox: &Inbox) {
        if inbox.ports.is_empty() {
            self.every_port.remove(&id);
        }
        for port_id in &inbox.ports {
            if let Some(watches) = self.by_port.get_mut(port_id) {
                watches.remove(&id);
                if watches.is_empty() {
                    self.by_port.remove(port_id);
                }
            }
        }
    }

    /// The inboxes an event of `port_id` goes to, each once.
    fn of_port(&self, port_id: u32) -> impl Iterator<Item = (&u64, &Arc<Inbox>)> {
        let of_port = self.by_port.get(&port_id).into_iter().flatten();
        self.every_port.iter().chain(of_port)
    }

    /// Ends every watch with `end`, after the events already in its inbox.
    fn end_all(&self, end: &WatchEnd) {
        let by_port = self.by_port.values().flatten();
        // A watch of several ports is met more than once; only its first end counts.
        for (_, inbox) in self.every_port.iter().chain(by_port) {
            inbox.end(end.clone());
        }
    }
}

// === impl Inbox ===

impl Inbox {
    /// Queues `event`; `false` when the inbox already held `buffer` events: the watch has
    /// lagged and is ended at once, its queued events dropped (a gap follows them anyway).
    fn deliver(&self, event: &Arc<ReceivedEvent>, buffer: usize) -> bool {
        let mut state = lock(&self.state);
        if state.end.is_some() {
            return true;
        }
        let delivered = state.events.len() < buffer;
        if delivered {
            state.events.push_back(Arc::clone(event));
        } else {
            state.events = VecDeque::new();
            state.end = Some(WatchEnd::Lagged { buffer });
            self.ending.send_replace(Some(0));
        }
        drop(state);
        self.arrived.notify_one();
        delivered
    }

    /// Ends the watch with `end` after the events already queued, unless it has ended already.
    fn end(&self, end: WatchEnd) {
        let mut state = lock(&self.state);
        if state.end.is_none() {
            state.end = Some(end);
            self.ending.send_replace(Some(0));
            drop(state);
            self.arrived.notify_one();
        }
    }

    /// The next event, or the end once every event before it has been taken; `None` while
    /// there is neither.
    fn take(&self) -> Option<Result<Arc<ReceivedEvent>, WatchEnd>> {
        let mut state = lock(&self.state);
        match state.events.pop_front() {
            Some(event) => {
                if state.end.is_some() {
                    // Its client still reads: its stream is not ended while this goes on.
                    self.ending
                        .send_modify(|taken| *taken = taken.map(|taken| taken + 1));
                }
                Some(Ok(event))
            }
            None => {
                // A burst grows the inbox up to `--watch-buffer`; an emptied one gives that
                // back, so open watches hold memory only for events still waiting.
                if state.events.capacity() > IDLE_INBOX_CAPACITY {
                    state.events.shrink_to(IDLE_INBOX_CAPACITY);
                }
                state.end.clone().map(Err)
            }
        }
    }
}

// === impl Subscription ===

impl Subscription {
    /// The next event of the watched ports, or why the watch has ended. After an end, the
    /// subscription is spent: the caller ends the stream.
    pub(crate) async fn next(&mut self) -> Result<Arc<ReceivedEvent>, WatchEnd> {
        loop {
            if let Some(next) = self.inbox.take() {
                if let Some(traced) = &mut self.traced {
                    match &next {
                        Ok(_) => traced.events += 1,
                        Err(end) => traced.end = Some(end.kind()),
                    }
                }
                return next;
            }
            // One reader: an event that arrives between `take` and here leaves a permit, so
            // this returns at once.
            self.inbox.arrived.notified().await;
        }
    }

    /// Notes, for the watch's span, that its stream ended for `end`, a reason from outside the
    /// watch (the caller's deadline); an end the watch itself gave is kept.
    pub(crate) fn ended(&mut self, end: &WatchEnd) {
        if let Some(traced) = &mut self.traced {
            traced.end.get_or_insert(end.kind());
        }
    }

    /// `Some` once the watch has ended (lagged, lost its feed, or shut down), whether or not
    /// its events have been taken, then counting the events taken since; its sender is
    /// dropped with the subscription.
    pub(crate) fn ending(&self) -> watch::Receiver<ResponseEnd> {
        self.inbox.ending.subscribe()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Feed::Connected(inboxes) = &mut *self.shared.lock() {
            inboxes.remove(self.id, &self.inbox);
        }
        if let Some(traced) = &self.traced {
            let events = i64::try_from(traced.events).unwrap_or(i64::MAX);
            traced.span.record("taskgate.watch.events", events);
            // Not ended by the watch: the caller went away, or its stream was cut.
            let end = traced.end.unwrap_or("stream_closed");
            traced.span.record("taskgate.watch.end", end);
        }
    }
}

// === impl WatchEnd ===

impl WatchEnd {
    /// A fixed word for how a watch ended, for its span.
    fn kind(&self) -> &'static str {
        match self {
            WatchEnd::Unavailable { .. } => "log_publisher_unavailable",
            WatchEnd::Lagged { .. } => "lagged",
            WatchEnd::TooMany { .. } => "too_many_watches",
            WatchEnd::ShuttingDown => "shutting_down",
            WatchEnd::Disabled => "disabled",
            WatchEnd::DeadlineReached { .. } => "deadline_reached",
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
    async fn an_inbox_emptied_after_a_burst_gives_its_memory_back() {
        let watches = watches(10, 1024);
        watches.connected();
        let mut all = watches.subscribe(Vec::new()).unwrap();
        for _ in 0..1000 {
            watches.publish(event(4, CaseState::Ereq));
        }
        assert!(all.inbox.state.lock().unwrap().events.capacity() >= 1000);
        for _ in 0..1000 {
            next_segment(&mut all).await.unwrap();
        }
        assert!(all.inbox.take().is_none());
        let capacity = all.inbox.state.lock().unwrap().events.capacity();
        assert!(capacity <= IDLE_INBOX_CAPACITY, "{capacity}");
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
    async fn a_watcher_of_a_quiet_port_never_lags_for_other_ports_events() {
        let watches = watches(10, 16);
        watches.connected();
        let mut quiet = watches.subscribe(vec![5]).unwrap();
        for _ in 0..100 {
            watches.publish(event(4, CaseState::Ereq));
        }
        watches.publish(event(5, CaseState::Ereq));
        assert_eq!(next_segment(&mut quiet).await.unwrap(), "AC,5,7,EREQ");
        let exposed = watches.shared.metrics.encode();
        assert!(
            exposed.contains("taskgate_case_watches_lagged_total 0\n"),
            "{exposed}"
        );
    }

    /// What sends the stream learns that the watch has ended though nothing has read it, and
    /// only then.
    #[tokio::test]
    async fn a_watch_says_it_has_ended_without_being_read() {
        let watches = watches(10, 16);
        watches.connected();
        let mut lagging = watches.subscribe(Vec::new()).unwrap();
        let lagged = lagging.ending();
        let shut_down = watches.subscribe(vec![5]).unwrap();
        let shutting_down = shut_down.ending();
        for _ in 0..16 {
            watches.publish(event(4, CaseState::Ereq));
        }
        assert_eq!(*lagged.borrow(), None);
        watches.publish(event(4, CaseState::Ereq));
        assert_eq!(*lagged.borrow(), Some(0));
        assert_eq!(*shutting_down.borrow(), None);
        watches.shut_down();
        assert_eq!(*shutting_down.borrow(), Some(0));
        assert_eq!(
            next_segment(&mut lagging).await,
            Err(WatchEnd::Lagged { buffer: 16 })
        );
    }

    /// A watch that has ended counts each event its stream still takes, which tells what sends
    /// the stream that its client still reads.
    #[tokio::test]
    async fn an_ended_watch_counts_the_events_taken_after_its_end() {
        let watches = watches(10, 16);
        watches.connected();
        let mut draining = watches.subscribe(Vec::new()).unwrap();
        let ending = draining.ending();
        watches.publish(event(4, CaseState::Ereq));
        next_segment(&mut draining).await.unwrap();
        watches.publish(event(4, CaseState::Erso));
        watches.publish(event(4, CaseState::Ecmp));
        watches.lost("connection reset by peer");
        assert_eq!(*ending.borrow(), Some(0));
        for taken in 1..=2 {
            next_segment(&mut draining).await.unwrap();
            assert_eq!(*ending.borrow(), Some(taken));
        }
        assert!(next_segment(&mut draining).await.is_err());
        assert_eq!(*ending.borrow(), Some(2));
    }

    /// The README's memory figures count 56 bytes for an event (then its two reference counts
    /// and its segment's bytes).
    #[test]
    fn an_event_is_no_bigger_than_the_readme_counts() {
        let size = size_of::<ReceivedEvent>();
        assert!(size <= 56, "{size}");
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
