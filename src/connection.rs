//! Accepted connections, watched from accept to close, for every listener (the gRPC port,
//! `/metrics` and the simulator).
//!
//! Hyper speaks the protocol and keeps the limits it has options for: HTTP/2 keep-alive pings,
//! concurrent streams, header sizes and reset floods (`builder`, `server.rs`). This module keeps
//! the limits no library has:
//!
//! - **Capacity**: beyond the connection limit a new connection is closed as soon as it is
//!   accepted, before it costs more than a descriptor (a semaphore, as in mini-redis).
//! - **Handshake**: a new connection must identify itself (TLS, then an HTTP/2 preface or a
//!   complete first HTTP/1.1 request head) within the handshake timeout of accept, or it is
//!   closed, the way linkerd2-proxy's protocol detection gives up.
//! - **Request heads**: a later HTTP/1.1 head must be complete within the header-read timeout
//!   of its first byte (slowloris). Hyper's `header_read_timeout` starts when a kept-alive
//!   connection goes idle, so it would close idle connections at the header-read timeout rather
//!   than the idle one.
//! - **Request bodies**: on the gRPC port every request body must have arrived within the
//!   body-read timeout of its head (the router's listeners answer 408 from a middleware
//!   instead). An HTTP/1.1 connection carries one request at a time, so it is closed. An HTTP/2
//!   stream is ended on its own: its body fails with `DEADLINE_EXCEEDED`, which tonic sends as
//!   the call's status, and the connection serves its other streams on. Tonic reads a unary
//!   or server-streaming call's body to its end before it calls the handler, so a body that
//!   never ends would hold its stream, and the connection, which is never idle while a stream
//!   is open. No task RPC streams its requests; reflection's stream, which does, gets the same
//!   limit.
//! - **Idle**: a connection without an open request for the idle timeout gets GOAWAY (an idle
//!   HTTP/1.1 connection is closed). Hyper and hyper-util have no idle timeout for servers. A
//!   request whose whole answer is ready (one message, a file) counts as ended: hyper sends it
//!   only as its peer makes room, so a peer that never reads would otherwise hold the
//!   connection for good.
//! - **Shutdown**: every connection gets GOAWAY at once. A request holds the drain only once its
//!   body has fully arrived; a connection with nothing else (idle, a partial head, a body that
//!   never comes) is closed after a short linger. hyper-util's `GracefulShutdown` waits for every
//!   connection, so a silent peer could hold it for the whole grace.
//! - **Responses nothing polls**: a response whose peer has stopped reading is never polled
//!   again, so a watch that has ended could not end its stream; its handler can have the HTTP/2
//!   stream reset, or the HTTP/1.1 connection closed, instead (`stream_task`).
//!
//! Each connection has one `State` behind a `std::sync::Mutex`, written by two taps (the bytes
//! read from the socket, and each request's start, body and end) and read by the connection's
//! driver; the transitions and the driver's decisions are pure, in `state`. Calls are the hot
//! path, so a call only updates the state: the driver is woken through a `Notify` only when it
//! must act at once (the protocol identified, an HTTP/1.1 head or body starting, anything during
//! shutdown), and otherwise reads the state when its deadline comes.

use std::future::Future;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::io::InspectReader;
use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;

use crate::accept::LogEvery;
use crate::config::{ConfigError, defaults, limits};
use crate::metrics::{GaugeGuard, ListenerMetrics};

mod state;
mod stream_task;

use state::{Ending, Protocol, State, Step, next_step};
use stream_task::{EndSignal, until_ended};
pub(crate) use stream_task::{ResponseEnd, StreamExecutor, end_stream_when};

/// After GOAWAY, how long a connection with nothing in flight is still served before it is
/// dropped: enough for the frame to be written and a live client to close first, short enough
/// that an unresponsive client cannot hold shutdown.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The gRPC port's connection limits, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How long a new connection may take to identify itself: TLS, then the HTTP/2 preface or
    /// a complete first HTTP/1.1 request head (also the limit on later HTTP/1.1 heads).
    pub handshake_timeout: Duration,
    /// How long a connection may stay without an open call or stream before it is closed
    /// (with GOAWAY on HTTP/2).
    pub idle_timeout: Duration,
    /// How many connections may be open at once; more are closed as soon as accepted.
    /// `None`: sized from the open-file limit at startup (see `nofile`).
    pub max_connections: Option<NonZeroUsize>,
    /// How many streams (calls) one HTTP/2 connection may have open at once.
    pub max_concurrent_streams: NonZeroU32,
}

/// The time limits of every connection on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionLimits {
    /// From accept to an HTTP/2 preface or a complete first HTTP/1.1 request head (TLS
    /// included).
    pub(crate) handshake_timeout: Duration,
    /// From the first byte of a later HTTP/1.1 request head to its end.
    pub(crate) header_read_timeout: Duration,
    /// From a request's head to the end of its body, after which an HTTP/1.1 connection is
    /// closed and an HTTP/2 stream ended. `None` where the service times bodies itself (the
    /// router answers 408).
    pub(crate) body_read_timeout: Option<Duration>,
    /// How long a connection may stay without an open request before it is closed.
    pub(crate) idle_timeout: Duration,
}

/// What a listener's connections are doing, summed, for the shutdown log. Plain counters: every
/// call moves two of them, from whichever worker runs it, and only the log reads them, so a
/// lock shared by the whole listener would be contention on the call path for nothing.
#[derive(Debug, Default)]
pub(crate) struct Census {
    calls: AtomicUsize,
    watches: AtomicUsize,
    streams: AtomicUsize,
    closed_idle: AtomicUsize,
    closed_partial: AtomicUsize,
}

/// A snapshot of a [`Census`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CensusCounts {
    /// Calls (task-service requests) whose request has fully arrived and whose response has not
    /// ended.
    pub(crate) calls: usize,
    /// WatchCaseEvents streams in the same state: shutdown ends them, so they never hold the
    /// drain as calls do.
    pub(crate) watches: usize,
    /// Other requests in the same state: health Watch and Check, reflection, the console's
    /// files, and any other path.
    pub(crate) streams: usize,
    /// Connections closed at shutdown with no request open.
    pub(crate) closed_idle: usize,
    /// Connections closed at shutdown with only a partial request (a head or body that had not
    /// fully arrived).
    pub(crate) closed_partial: usize,
}

/// What a request is, for the census and the idle timeout: a listener tells them apart by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    /// A task call; on the router's listeners (metrics, the simulator), every request.
    Call,
    /// A case-event watch.
    Watch,
    /// Another stream of answers: health Watch, and any path no other kind names.
    Stream,
    /// A stream that answers each of its requests and ends with them: reflection. Its answers
    /// are ready once its requests have ended (or their time ran out). Counted with the streams.
    Exchange,
    /// Answered whole at once: health Check, the console's files. Counted with the streams.
    Other,
}

/// One listener's connections: the limit on how many are open, what they are doing, and the
/// shutdown signal they all follow.
#[derive(Debug)]
pub(crate) struct Connections {
    limits: ConnectionLimits,
    metrics: ListenerMetrics,
    pub(crate) census: Arc<Census>,
    /// One permit per connection that may be open.
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// Refusals come in floods; one line per interval.
    refusal_log: LogEvery,
    /// `true` once shutdown has begun. Every admitted connection holds a receiver until it
    /// closes, so the sender also tells when all have closed.
    draining: watch::Sender<bool>,
}

/// What an admitted connection holds until it closes.
#[derive(Debug)]
pub(crate) struct Admission {
    _slot: OwnedSemaphorePermit,
    _open: GaugeGuard,
    draining: watch::Receiver<bool>,
    connection: Arc<Connection>,
    limits: ConnectionLimits,
    metrics: ListenerMetrics,
    peer: SocketAddr,
}

/// One connection's state, shared by its taps and its driver.
#[derive(Debug)]
struct Connection {
    state: Mutex<State>,
    /// Wakes the driver when it must act before its deadline.
    wake: Notify,
    census: Arc<Census>,
}

/// What a connection's reads tell of it (called through tokio-util's `InspectReader`).
#[derive(Debug)]
struct SocketTap {
    connection: Arc<Connection>,
    protocol: Protocol,
}

/// The service of one connection, with a tap on each request's start, body and end.
#[derive(Debug, Clone)]
pub(crate) struct Tracked<S> {
    inner: S,
    connection: Arc<Connection>,
    /// What a request with this path is.
    kind_of: fn(&str) -> RequestKind,
    /// The limit on an HTTP/2 request's body, which its stream enforces.
    body_read_timeout: Option<Duration>,
    /// Put in every request, so `tonic::Request::remote_addr` works as under tonic's server.
    connect_info: TcpConnectInfo,
}

/// One request, shared by its body tap and its guard.
#[derive(Debug)]
struct TrackedRequest {
    connection: Arc<Connection>,
    /// For the census.
    kind: RequestKind,
    /// Held while the connection's state and the census are updated, and locked before the
    /// state, never after it, so the two taps agree on whether the request was counted as
    /// arrived or answered.
    progress: Mutex<Progress>,
}

/// How far a request has come.
#[derive(Debug)]
struct Progress {
    stage: Stage,
    /// Its whole answer is ready and waits only for its peer to take it.
    answered: bool,
    /// The timer that marks a reflection stream answered at its body's deadline, until its body
    /// has arrived or it has ended.
    timer: Option<AbortHandle>,
}

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its body is still arriving.
    Receiving,
    /// Its body has fully arrived; its response has not ended.
    Arrived,
    /// Its response has ended, or it was cancelled.
    Ended,
}

/// Ends a request when dropped: with its response body, or with its response future if the
/// request was cancelled first.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<TrackedRequest>);

/// A request body that reports when it has fully arrived, and fails once an HTTP/2 body has
/// taken too long.
#[derive(Debug)]
struct RequestBody {
    inner: Incoming,
    request: Arc<TrackedRequest>,
    /// `None` for HTTP/1.1, whose connection's driver times the body, and once it has fired.
    deadline: Option<BodyDeadline>,
}

/// When an HTTP/2 request's body must have arrived.
#[derive(Debug)]
struct BodyDeadline {
    at: Instant,
    /// For the status.
    timeout: Duration,
    /// Armed only once the body is waited for: most bodies have arrived by their first poll, and
    /// a timer for each would cost a call an allocation and the timer wheel an entry.
    timer: Option<Pin<Box<Sleep>>>,
}

/// A response body that holds something (a request's guard, a permit) until it is dropped:
/// when the response has been sent, or its stream reset.
#[derive(Debug)]
pub(crate) struct Holding<T, B = Body> {
    inner: B,
    _held: T,
}

// === impl Settings ===

impl Default for Settings {
    /// The documented defaults.
    fn default() -> Self {
        Settings {
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_connections: None,
            max_concurrent_streams: defaults::MAX_CONCURRENT_STREAMS,
        }
    }
}

impl Settings {
    /// Checks the limits whose types allow values a gateway cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        limits::HANDSHAKE_TIMEOUT.check(self.handshake_timeout)?;
        limits::IDLE_TIMEOUT.check(self.idle_timeout)?;
        limits::MAX_CONCURRENT_STREAMS.check(self.max_concurrent_streams)?;
        if let Some(max_connections) = self.max_connections {
            limits::MAX_CONNECTIONS.check(max_connections)?;
        }
        Ok(())
    }

    /// The time limits each gRPC connection is watched with.
    pub(crate) fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            handshake_timeout: self.handshake_timeout,
            // Later HTTP/1.1 heads (gRPC-Web on a kept-alive connection), and the body after
            // each head, get as long as the first head.
            header_read_timeout: self.handshake_timeout,
            body_read_timeout: Some(self.handshake_timeout),
            idle_timeout: self.idle_timeout,
        }
    }
}

// === impl Connections ===

impl Connections {
    /// Connections for one listener, at most `max_connections` open at once.
    pub(crate) fn new(
        limits: ConnectionLimits,
        max_connections: usize,
        metrics: ListenerMetrics,
    ) -> Self {
        // The semaphore's own bound is far beyond any descriptor limit; config checks it too.
        let max_connections = max_connections.min(Semaphore::MAX_PERMITS);
        Connections {
            limits,
            metrics,
            census: Arc::default(),
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            refusal_log: LogEvery::default(),
            draining: watch::Sender::new(false),
        }
    }

    /// Takes a slot for a connection from `peer`; `None` (counted, and logged once per interval)
    /// when every slot is taken, and the caller closes the connection at once.
    pub(crate) fn admit(&mut self, peer: SocketAddr) -> Option<Admission> {
        let accepted_at = Instant::now();
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.metrics.connection_refused("max_connections");
            if let Some(suppressed) = self.refusal_log.ready(accepted_at) {
                tracing::warn!(
                    listener = self.metrics.listener(),
                    %peer,
                    max_connections = self.max_connections,
                    suppressed,
                    "connection refused: the connection limit is reached (logged once per 10s)"
                );
            }
            return None;
        };
        let connection = Connection {
            state: Mutex::new(State::new(accepted_at)),
            wake: Notify::new(),
            census: Arc::clone(&self.census),
        };
        Some(Admission {
            _slot: slot,
            _open: self.metrics.connection_opened(),
            draining: self.draining.subscribe(),
            connection: Arc::new(connection),
            limits: self.limits,
            metrics: self.metrics.clone(),
            peer,
        })
    }

    /// Tells every connection that shutdown has begun.
    pub(crate) fn begin_shutdown(&self) {
        self.draining.send_replace(true);
    }

    /// Resolves once every admitted connection has closed.
    pub(crate) async fn all_closed(&self) {
        self.draining.closed().await;
    }
}

// === impl Admission ===

impl Admission {
    /// Puts the request tap around `service`, which counts each request as `kind_of` its path
    /// says; `local` is the listener's address.
    pub(crate) fn track<S>(
        &self,
        service: S,
        kind_of: fn(&str) -> RequestKind,
        local: Option<SocketAddr>,
    ) -> Tracked<S> {
        Tracked {
            inner: service,
            connection: Arc::clone(&self.connection),
            kind_of,
            body_read_timeout: self.limits.body_read_timeout,
            connect_info: TcpConnectInfo {
                local_addr: local,
                remote_addr: Some(self.peer),
            },
        }
    }

    /// Runs a step of the handshake before HTTP (TLS) within the handshake timeout; gives up
    /// at once when shutdown begins. `None` when it gave up.
    pub(crate) async fn within_handshake<T>(
        &mut self,
        handshake: impl Future<Output = T>,
    ) -> Option<T> {
        let deadline = self.accepted_at() + self.limits.handshake_timeout;
        let ending = tokio::select! {
            output = handshake => return Some(output),
            () = tokio::time::sleep_until(deadline) => Ending::HandshakeTimeout,
            _ = self.draining.wait_for(|draining| *draining) => Ending::Shutdown,
        };
        self.record(ending);
        None
    }

    /// Serves `io` with `service` on `builder` until the peer closes it, a limit closes it, or
    /// shutdown closes it; counts a close by a time limit.
    pub(crate) async fn serve<I, S, ResBody>(
        self,
        builder: &auto::Builder<StreamExecutor>,
        io: I,
        service: Tracked<S>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: tower::Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        ResBody: HttpBody<Data = Bytes> + Unpin + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        // HTTP/1.1 requests are served in this task, so a handler may leave its end signal here.
        stream_task::with_end_signal(self.drive(builder, io, service)).await;
    }

    /// [`Admission::serve`], within its task's place for an end signal.
    async fn drive<I, S, ResBody>(
        mut self,
        builder: &auto::Builder<StreamExecutor>,
        io: I,
        service: Tracked<S>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: tower::Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        ResBody: HttpBody<Data = Bytes> + Unpin + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let connection = Arc::clone(&self.connection);
        let mut socket_tap = SocketTap {
            connection: Arc::clone(&connection),
            protocol: Protocol::Preface(0),
        };
        let io = InspectReader::new(io, move |bytes: &[u8]| socket_tap.bytes_read(bytes));
        let io = TokioIo::new(io);
        let served = builder.serve_connection(io, TowerToHyperService::new(service));
        tokio::pin!(served);
        let mut end_signal = EndSignal::default();
        let mut draining = false;
        // A request held the drain, so the close is not one of an idle or partial connection.
        let mut held_drain = false;
        // GOAWAY was sent for this reason; the connection is dropped at the instant.
        let mut closing: Option<(Instant, Ending)> = None;
        let ending = loop {
            let look_again_at = match closing {
                Some((until, _)) => Some(until),
                None => {
                    let now = Instant::now();
                    let state = *connection.lock();
                    match next_step(&state, now, &self.limits) {
                        Step::LookAgainAt(at) => {
                            held_drain |= state.draining;
                            at
                        }
                        Step::Drop(ending) => break ending,
                        Step::GoAway(ending) => {
                            if ending == Ending::Shutdown && !held_drain {
                                connection.census.closed(state.is_partial());
                            }
                            served.as_mut().graceful_shutdown();
                            closing = Some((now + CLOSE_LINGER, ending));
                            continue;
                        }
                    }
                }
            };
            tokio::select! {
                served = until_ended(served.as_mut(), &mut end_signal) => {
                    let Some(result) = served else {
                        tracing::debug!(peer = %self.peer, "a response told to end could not be sent; closing its connection");
                        break Ending::Closed;
                    };
                    if let Err(error) = result {
                        tracing::debug!(cause = %error, peer = %self.peer, "connection ended with an error");
                    }
                    break closing.map_or(Ending::Closed, |(_, ending)| ending);
                }
                () = connection.wake.notified() => {}
                () = sleep_until(look_again_at) => {
                    if let Some((_, ending)) = closing {
                        break ending;
                    }
                }
                // An error means the listener is gone without a shutdown: drained all the same.
                _ = self.draining.wait_for(|draining| *draining), if !draining => {
                    draining = true;
                    connection.lock().draining = true;
                    served.as_mut().graceful_shutdown();
                }
            }
        };
        self.record(ending);
    }

    fn accepted_at(&self) -> Instant {
        self.connection.lock().accepted_at
    }

    /// Counts a connection closed by a time limit, and logs it at debug level.
    fn record(&self, ending: Ending) {
        let reason = match ending {
            Ending::Closed | Ending::Shutdown => return,
            Ending::HandshakeTimeout => "handshake_timeout",
            Ending::HeaderTimeout => "header_timeout",
            Ending::BodyTimeout => "body_timeout",
            Ending::Idle => "idle",
        };
        self.metrics.connection_closed(reason);
        let peer = self.peer;
        tracing::debug!(listener = self.metrics.listener(), %peer, reason, "connection closed by a time limit");
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

// === impl Census ===

impl Census {
    /// The counts now.
    pub(crate) fn counts(&self) -> CensusCounts {
        let count = |counter: &AtomicUsize| counter.load(Ordering::Relaxed);
        CensusCounts {
            calls: count(&self.calls),
            watches: count(&self.watches),
            streams: count(&self.streams),
            closed_idle: count(&self.closed_idle),
            closed_partial: count(&self.closed_partial),
        }
    }

    /// The count of requests of `kind` whose request has arrived and not ended.
    fn arrived(&self, kind: RequestKind) -> &AtomicUsize {
        match kind {
            RequestKind::Call => &self.calls,
            RequestKind::Watch => &self.watches,
            RequestKind::Stream | RequestKind::Exchange | RequestKind::Other => &self.streams,
        }
    }

    /// Counts a connection that shutdown closed without a request holding it.
    fn closed(&self, partial: bool) {
        let counter = if partial {
            &self.closed_partial
        } else {
            &self.closed_idle
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Locks `mutex`: every update leaves what it guards whole, so it stays usable whatever
/// panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// === impl Connection ===

impl Connection {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Applies `update` to the state, and wakes the driver if it says so.
    fn update(&self, update: impl FnOnce(&mut State) -> bool) {
        let wake = update(&mut self.lock());
        if wake {
            self.wake.notify_one();
        }
    }
}

// === impl SocketTap ===

impl SocketTap {
    /// Called with the bytes of every read.
    fn bytes_read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.protocol == Protocol::Http2 {
            return;
        }
        self.protocol = self.protocol.after(bytes);
        if self.protocol == Protocol::Http2 {
            self.connection.update(State::preface_read);
        } else {
            let now = Instant::now();
            self.connection.update(|state| state.bytes_read(now));
        }
    }
}

// === impl Tracked ===

impl<S, ResBody> tower::Service<Request<Incoming>> for Tracked<S>
where
    S: tower::Service<Request<Body>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    /// The service's own body: wrapping it in another box would cost an allocation a call.
    type Response = Response<Holding<RequestGuard, ResBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let body_since = (!body.is_end_stream()).then(Instant::now);
        let http2 = parts.version >= Version::HTTP_2;
        let http1_body_since = body_since.filter(|_| !http2);
        let deadline = match (body_since, self.body_read_timeout) {
            (Some(since), Some(timeout)) if http2 => Some(BodyDeadline {
                at: since + timeout,
                timeout,
                timer: None,
            }),
            _ => None,
        };
        self.connection
            .update(|state| state.request_started(http1_body_since));
        let tracked = Arc::new(TrackedRequest {
            connection: Arc::clone(&self.connection),
            kind: (self.kind_of)(parts.uri.path()),
            progress: Mutex::new(Progress {
                stage: Stage::Receiving,
                answered: false,
                timer: None,
            }),
        });
        let guard = RequestGuard(Arc::clone(&tracked));
        if body.is_end_stream() {
            tracked.body_arrived();
        } else if tracked.kind == RequestKind::Exchange
            && let Some(deadline) = &deadline
        {
            // tonic-reflection reads a stream's next request only once its last answer has been
            // taken, so a client that never reads stops its body being polled: neither the
            // body's end nor its deadline would then be seen. A timer of its own marks the
            // answers whole at the deadline whatever the body does; it ends with the body or
            // the request, so a peer that opens and resets streams leaves no timers behind.
            tracked.answered_at(deadline.at);
        }
        parts.extensions.insert(self.connect_info.clone());
        let body = Body::new(RequestBody {
            inner: body,
            request: tracked,
            deadline,
        });
        // A combinator, not an `async` block, which would hold the inner future twice.
        Box::pin(
            self.inner
                .call(Request::from_parts(parts, body))
                .map(move |response| {
                    let response = response.map_err(Into::into)?;
                    if guard.0.kind.answers_once() {
                        guard.0.answered();
                    }
                    Ok(response.map(|body| Holding::new(body, guard)))
                }),
        )
    }
}

// === impl RequestKind ===

impl RequestKind {
    /// Whether its response is whole once it starts (one message, a file), so that only its
    /// peer's reading is left: a peer that never reads must not keep its connection from the
    /// idle timeout with it.
    fn answers_once(self) -> bool {
        matches!(self, RequestKind::Call | RequestKind::Other)
    }
}

// === impl Progress ===

impl Progress {
    /// Ends the timer of [`TrackedRequest::answered_at`], if it is still running.
    fn stop_timer(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
    }
}

// === impl TrackedRequest ===

impl TrackedRequest {
    /// Its whole answer is ready: the connection is no busier for it than if it had ended.
    fn answered(&self) {
        self.answered_in(&mut lock(&self.progress));
    }

    /// [`TrackedRequest::answered`], `progress` being held.
    fn answered_in(&self, progress: &mut Progress) {
        if progress.stage != Stage::Ended && !progress.answered {
            progress.answered = true;
            let now = Instant::now();
            self.connection.update(|state| state.request_answered(now));
        }
    }

    /// Marks its answer whole at `at`, from a timer of its own that ends once its body has
    /// arrived or it has ended, whichever comes first.
    fn answered_at(self: &Arc<Self>, at: Instant) {
        let request = Arc::downgrade(self);
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(request) = request.upgrade() {
                request.answered();
            }
        });
        lock(&self.progress).timer = Some(timer.abort_handle());
    }

    /// The body has fully arrived: from now on the request is worth waiting for.
    fn body_arrived(&self) {
        let mut progress = lock(&self.progress);
        if progress.stage == Stage::Receiving {
            progress.stage = Stage::Arrived;
            self.connection.update(State::body_arrived);
            self.connection
                .census
                .arrived(self.kind)
                .fetch_add(1, Ordering::Relaxed);
            if self.kind == RequestKind::Exchange {
                self.answered_in(&mut progress);
                progress.stop_timer();
            }
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let request = &self.0;
        let mut progress = lock(&request.progress);
        let had_arrived = progress.stage == Stage::Arrived;
        let had_answered = progress.answered;
        progress.stage = Stage::Ended;
        progress.stop_timer();
        let now = Instant::now();
        request
            .connection
            .update(|state| state.request_ended(had_arrived, had_answered, now));
        if had_arrived {
            request
                .connection
                .census
                .arrived(request.kind)
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            // The end, not the last frame: asking h2 whether a frame was the last takes a lock,
            // and tonic reads every body to its end (a one-message call too, for its trailers).
            Poll::Ready(None) => {
                this.request.body_arrived();
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => match this.deadline.as_mut().map(|deadline| deadline.poll(cx)) {
                Some(Poll::Ready(status)) => {
                    this.deadline = None;
                    // No more requests: an exchange's answers are whole.
                    if this.request.kind == RequestKind::Exchange {
                        this.request.answered();
                    }
                    Poll::Ready(Some(Err(status.into())))
                }
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl BodyDeadline ===

impl BodyDeadline {
    /// Ready with the status the call ends with once the deadline has passed; until then the
    /// timer wakes `cx`.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<tonic::Status> {
        let at = self.at;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        ready!(timer.as_mut().poll(cx));
        // Not CANCELLED: tonic reads a request body's CANCELLED as its end.
        Poll::Ready(tonic::Status::deadline_exceeded(format!(
            "the request body did not arrive within {}",
            humantime::format_duration(self.timeout)
        )))
    }
}

// === impl Holding ===

impl<T, B> Holding<T, B> {
    /// `inner`, holding `held` until dropped.
    pub(crate) fn new(inner: B, held: T) -> Self {
        Holding { inner, _held: held }
    }
}

impl<T: Unpin, B: HttpBody<Data = Bytes> + Unpin> HttpBody for Holding<T, B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The largest HTTP/1.1 read buffer, and so the largest request head: hyper's default is about
/// 400 KiB, which a connection sending a head slowly could hold until its header-read timeout.
/// 16 KiB is the HTTP/2 header list limit; a larger head is answered 431.
const HTTP1_MAX_BUFFER: usize = 16 * 1024;

/// A hyper connection builder with the timer that HTTP/2 keep-alive needs, whose HTTP/2 streams
/// a handler can end ([`end_stream_when`]). Hyper's defaults bound the HTTP/2 header list and
/// reset floods (pending-accept and local-error resets); the HTTP/1.1 buffer is bounded here,
/// and HTTP/1.1 head timeouts are this module's (see the module doc).
pub(crate) fn builder(executor: StreamExecutor) -> auto::Builder<StreamExecutor> {
    let mut builder = auto::Builder::new(executor);
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(HTTP1_MAX_BUFFER);
    builder.http2().timer(TokioTimer::new());
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose answer is marked whole only after it ended (a reflection stream's timer
    /// firing late) leaves the connection's count of answered requests as it was: a request
    /// opened later still keeps the connection busy.
    #[test]
    fn an_answer_marked_after_its_request_ended_is_not_counted() {
        let t0 = Instant::now();
        let request = started_exchange(t0);
        let connection = Arc::clone(&request.connection);
        drop(RequestGuard(Arc::clone(&request)));
        request.answered();
        connection.update(|state| state.request_started(None));
        let limits = ConnectionLimits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Some(Duration::from_secs(5)),
            idle_timeout: Duration::from_secs(60),
        };
        let now = t0 + Duration::from_secs(100);
        assert_eq!(
            next_step(&connection.lock(), now, &limits),
            Step::LookAgainAt(Some(now + limits.idle_timeout))
        );
    }

    /// A reflection stream's timer ends once its body has arrived, or with its request if that
    /// ends first, rather than at its deadline: a peer that opens and resets streams leaves no
    /// task behind.
    #[tokio::test]
    async fn a_reflection_streams_timer_ends_with_its_body_or_its_request() {
        check_timer_ends("its body arrived", |guard| {
            guard.0.body_arrived();
            Some(guard)
        })
        .await;
        check_timer_ends("it ended", |guard| {
            drop(guard);
            None
        })
        .await;
    }

    /// Starts the timer of a reflection stream whose deadline is an hour away, does `end` to the
    /// request (which returns its guard if the request goes on), and checks that the timer's
    /// task is gone within a few seconds, on a runtime that runs nothing else.
    async fn check_timer_ends(what: &str, end: impl FnOnce(RequestGuard) -> Option<RequestGuard>) {
        let tasks = tokio::runtime::Handle::current().metrics();
        let request = started_exchange(Instant::now());
        request.answered_at(Instant::now() + Duration::from_secs(3600));
        assert_eq!(tasks.num_alive_tasks(), 1, "no timer was started");
        let _going_on = end(RequestGuard(Arc::clone(&request)));
        let timer_gone = async {
            while tasks.num_alive_tasks() > 0 {
                tokio::task::yield_now().await;
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(5), timer_gone).await;
        assert!(ended.is_ok(), "the timer still runs after {what}");
    }

    /// A reflection stream just started, alone on a connection accepted at `t0`.
    fn started_exchange(t0: Instant) -> Arc<TrackedRequest> {
        let connection = Arc::new(Connection {
            state: Mutex::new(State::new(t0)),
            wake: Notify::new(),
            census: Arc::default(),
        });
        connection.update(|state| state.request_started(None));
        Arc::new(TrackedRequest {
            connection,
            kind: RequestKind::Exchange,
            progress: Mutex::new(Progress {
                stage: Stage::Receiving,
                answered: false,
                timer: None,
            }),
        })
    }
}
