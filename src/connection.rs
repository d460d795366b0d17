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
//! - **Idle**: a connection without an open request for the idle timeout gets GOAWAY (an idle
//!   HTTP/1.1 connection is closed). Hyper and hyper-util have no idle timeout for servers.
//! - **Shutdown**: every connection gets GOAWAY at once. A request holds the drain only once its
//!   body has fully arrived; a connection with nothing else (idle, a partial head, a body that
//!   never comes) is closed after a short linger. hyper-util's `GracefulShutdown` waits for every
//!   connection, so a silent peer could hold it for the whole grace.
//!
//! Each connection has one `State` behind a `std::sync::Mutex`, written by two taps (the bytes
//! read from the socket, and each request's start, body and end) and read by the connection's
//! driver, which decides with `next_step`, a pure function of the state, the time and the
//! limits. Calls are the hot path, so a call only updates the state: the driver is woken through
//! a `Notify` only when it must act at once (the protocol identified, an HTTP/1.1 head starting,
//! anything during shutdown), and otherwise reads the state when its deadline comes.

use std::future::Future;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::io::InspectReader;
use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;

use crate::accept::LogEvery;
use crate::config::{ConfigError, defaults, limits};
use crate::metrics::{GaugeGuard, ListenerMetrics};

/// After GOAWAY, how long a connection with nothing in flight is still served before it is
/// dropped: enough for the frame to be written and a live client to close first, short enough
/// that an unresponsive client cannot hold shutdown.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

/// What an HTTP/2 client sends first (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    /// How long a connection may stay without an open request before it is closed.
    pub(crate) idle_timeout: Duration,
}

/// What a listener's connections are doing, summed, for the shutdown log.
#[derive(Debug, Default)]
pub(crate) struct Census(Mutex<CensusCounts>);

/// A snapshot of a [`Census`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CensusCounts {
    /// Calls (task-service requests) whose request has fully arrived and whose response has not
    /// ended.
    pub(crate) calls: usize,
    /// Other requests in the same state: health Watch and reflection streams.
    pub(crate) streams: usize,
    /// Connections closed at shutdown with no request open.
    pub(crate) closed_idle: usize,
    /// Connections closed at shutdown with only a partial request (a head or body that had not
    /// fully arrived).
    pub(crate) closed_partial: usize,
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

/// What one connection is doing; [`next_step`] decides from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    /// The handshake timeout counts from here.
    accepted_at: Instant,
    /// It has sent an HTTP/2 preface or a complete first request head.
    identified: bool,
    /// Requests whose response has not ended, including those still receiving their body.
    open: usize,
    /// Of those, requests whose body has fully arrived: the ones shutdown waits for.
    arrived: usize,
    /// Since when the bytes of a request head (or preface) have been arriving with no request
    /// open.
    head_since: Option<Instant>,
    /// Since when no request has been open.
    idle_since: Instant,
    /// Shutdown has begun and GOAWAY was sent: from now on every change wakes the driver.
    draining: bool,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Serve on, and look again at the instant (`None`: only when woken).
    LookAgainAt(Option<Instant>),
    /// Send GOAWAY (close an idle HTTP/1.1 connection) for this reason, and drop the connection
    /// after the linger.
    GoAway(Ending),
    /// Drop the connection now, for this reason.
    Drop(Ending),
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The peer closed it, or the protocol ended it.
    Closed,
    /// It did not identify its protocol in time.
    HandshakeTimeout,
    /// A later HTTP/1.1 request head did not arrive in time.
    HeaderTimeout,
    /// It had no open request for the idle timeout.
    Idle,
    /// Shutdown closed it once nothing worth waiting for was left.
    Shutdown,
}

/// What a connection's reads tell of it (called through tokio-util's `InspectReader`).
#[derive(Debug)]
struct SocketTap {
    connection: Arc<Connection>,
    protocol: Protocol,
}

/// What the socket tap knows of the connection's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// This many bytes of the HTTP/2 preface have arrived, and nothing else.
    Preface(usize),
    /// HTTP/1.1: bytes with no request open are the start of a head.
    Http1,
    /// HTTP/2: bytes between requests are pings and settings; the tap has nothing more to do.
    Http2,
}

/// The service of one connection, with a tap on each request's start, body and end.
#[derive(Debug, Clone)]
pub(crate) struct Tracked<S> {
    inner: S,
    connection: Arc<Connection>,
    /// Requests whose path starts with this are calls; the rest are streams.
    call_path_prefix: &'static str,
    /// Put in every request, so `tonic::Request::remote_addr` works as under tonic's server.
    connect_info: TcpConnectInfo,
}

/// One request, shared by its body tap and its guard.
#[derive(Debug)]
struct TrackedRequest {
    connection: Arc<Connection>,
    /// A call or another stream, for the census.
    is_call: bool,
    /// Locked before the connection's state, never after it, so the two taps agree on whether
    /// the request was counted as arrived.
    stage: Mutex<Stage>,
}

/// Where a request is, in the order it gets there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

/// A request body that reports when it has fully arrived.
#[derive(Debug)]
struct RequestBody {
    inner: Incoming,
    request: Arc<TrackedRequest>,
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
        if let Some(max_connections) = self.max_connections {
            limits::MAX_CONNECTIONS.check(max_connections)?;
        }
        Ok(())
    }

    /// The time limits each gRPC connection is watched with.
    pub(crate) fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            handshake_timeout: self.handshake_timeout,
            // Later HTTP/1.1 heads (gRPC-Web on a kept-alive connection) get as long as the
            // first.
            header_read_timeout: self.handshake_timeout,
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
    /// Puts the request tap around `service`; `local` is the listener's address.
    pub(crate) fn track<S>(
        &self,
        service: S,
        call_path_prefix: &'static str,
        local: Option<SocketAddr>,
    ) -> Tracked<S> {
        Tracked {
            inner: service,
            connection: Arc::clone(&self.connection),
            call_path_prefix,
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
        mut self,
        builder: &auto::Builder<TokioExecutor>,
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
                                connection.census.update(|counts| {
                                    if state.is_partial() {
                                        counts.closed_partial += 1;
                                    } else {
                                        counts.closed_idle += 1;
                                    }
                                });
                            }
                            served.as_mut().graceful_shutdown();
                            closing = Some((now + CLOSE_LINGER, ending));
                            continue;
                        }
                    }
                }
            };
            tokio::select! {
                result = served.as_mut() => {
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
        *lock(&self.0)
    }

    fn update(&self, update: impl FnOnce(&mut CensusCounts)) {
        update(&mut lock(&self.0));
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

// === impl State ===

impl State {
    fn new(accepted_at: Instant) -> Self {
        State {
            accepted_at,
            identified: false,
            open: 0,
            arrived: 0,
            head_since: None,
            idle_since: accepted_at,
            draining: false,
        }
    }

    /// Closed now, the connection would cut a request short (a head, or a body, still on its
    /// way).
    fn is_partial(&self) -> bool {
        self.open > 0 || self.head_since.is_some()
    }
}

/// The driver's decisions, one rule per line, apart from the I/O so that they read as a table
/// (and are tested as one).
fn next_step(state: &State, now: Instant, limits: &ConnectionLimits) -> Step {
    let at_or_before = |deadline: Instant, ending| {
        if now >= deadline {
            Step::Drop(ending)
        } else {
            Step::LookAgainAt(Some(deadline))
        }
    };
    if state.draining {
        // Every change wakes the driver now, so it has no deadline of its own.
        return if state.arrived > 0 {
            Step::LookAgainAt(None)
        } else {
            Step::GoAway(Ending::Shutdown)
        };
    }
    if !state.identified {
        return at_or_before(
            state.accepted_at + limits.handshake_timeout,
            Ending::HandshakeTimeout,
        );
    }
    if state.open > 0 {
        // Request ends do not wake the driver: it looks again when the connection could have
        // been idle for the whole idle timeout at the earliest.
        return Step::LookAgainAt(Some(now + limits.idle_timeout));
    }
    if let Some(head_since) = state.head_since {
        return at_or_before(
            head_since + limits.header_read_timeout,
            Ending::HeaderTimeout,
        );
    }
    match at_or_before(state.idle_since + limits.idle_timeout, Ending::Idle) {
        Step::Drop(ending) => Step::GoAway(ending),
        step => step,
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
        let http2 = self.protocol == Protocol::Http2;
        self.connection.update(|state| {
            if http2 {
                state.identified = true;
                state.head_since = None;
                return true;
            }
            if state.open > 0 || state.head_since.is_some() {
                return false;
            }
            state.head_since = Some(Instant::now());
            // Before identification the handshake deadline already times the head.
            state.identified || state.draining
        });
    }
}

impl Protocol {
    /// What the protocol is known to be once `bytes` have also been read. A first difference
    /// from the HTTP/2 preface means HTTP/1.1, identified later by its first complete head.
    fn after(self, bytes: &[u8]) -> Protocol {
        let Protocol::Preface(matched) = self else {
            return self;
        };
        let expected = &HTTP2_PREFACE[matched..];
        let length = bytes.len().min(expected.len());
        if bytes[..length] != expected[..length] {
            Protocol::Http1
        } else if matched + length == HTTP2_PREFACE.len() {
            Protocol::Http2
        } else {
            Protocol::Preface(matched + length)
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
        self.connection.update(|state| {
            state.open += 1;
            state.head_since = None;
            // The driver stops timing the handshake; a later head was timed only until now.
            let identifies = !state.identified;
            state.identified = true;
            identifies || state.draining
        });
        let tracked = Arc::new(TrackedRequest {
            connection: Arc::clone(&self.connection),
            is_call: request.uri().path().starts_with(self.call_path_prefix),
            stage: Mutex::new(Stage::Receiving),
        });
        let guard = RequestGuard(Arc::clone(&tracked));
        let (mut parts, body) = request.into_parts();
        if body.is_end_stream() {
            tracked.body_arrived();
        }
        parts.extensions.insert(self.connect_info.clone());
        let body = Body::new(RequestBody {
            inner: body,
            request: tracked,
        });
        let response = self.inner.call(Request::from_parts(parts, body));
        Box::pin(async move {
            let response = response.await.map_err(Into::into)?;
            Ok(response.map(|body| Holding::new(body, guard)))
        })
    }
}

// === impl TrackedRequest ===

impl TrackedRequest {
    /// Moves the request on to `next` (never back), updating the counts it leaves and enters.
    fn advance(&self, next: Stage) {
        let mut stage = lock(&self.stage);
        if *stage >= next {
            return;
        }
        let (leaves, enters) = (*stage == Stage::Arrived, next == Stage::Arrived);
        *stage = next;
        let ended_at = (next == Stage::Ended).then(Instant::now);
        self.connection.update(|state| {
            state.arrived = state.arrived + usize::from(enters) - usize::from(leaves);
            if let Some(ended_at) = ended_at {
                state.open -= 1;
                state.idle_since = ended_at;
            }
            state.draining
        });
        self.connection.census.update(|counts| {
            let counter = if self.is_call {
                &mut counts.calls
            } else {
                &mut counts.streams
            };
            *counter = *counter + usize::from(enters) - usize::from(leaves);
        });
    }

    /// The body has fully arrived: from now on the request is worth waiting for.
    fn body_arrived(&self) {
        self.advance(Stage::Arrived);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.advance(Stage::Ended);
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // The end, not the last frame: asking h2 whether a frame was the last takes a lock, and
        // tonic reads every body to its end (a one-message call too, for its trailers).
        if let Poll::Ready(None) = polled {
            self.request.body_arrived();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

/// A hyper connection builder with the timer that HTTP/2 keep-alive needs. Hyper's defaults
/// bound header sizes (HTTP/1.1 buffer, HTTP/2 header list) and reset floods (pending-accept and
/// local-error resets); HTTP/1.1 head timeouts are this module's (see the module doc).
pub(crate) fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    const LIMITS: ConnectionLimits = ConnectionLimits {
        handshake_timeout: Duration::from_secs(10),
        header_read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
    };

    /// The step for a connection accepted at `t0`, set up by `setup`, at `t0 + at` seconds.
    fn check(
        setup: impl FnOnce(&mut State, Instant),
        at: u64,
        expected: impl FnOnce(Instant) -> Step,
    ) {
        let t0 = Instant::now();
        let mut state = State::new(t0);
        setup(&mut state, t0);
        let now = t0 + secs(at);
        assert_eq!(
            next_step(&state, now, &LIMITS),
            expected(t0),
            "{state:?} at {at}s"
        );
    }

    fn identified(state: &mut State, _: Instant) {
        state.identified = true;
    }

    #[test]
    fn the_steps_of_a_connection() {
        use Step::{Drop, GoAway, LookAgainAt};
        let at = |seconds: u64| move |t0: Instant| LookAgainAt(Some(t0 + secs(seconds)));
        // Before identification only the handshake deadline counts, a partial head or not.
        check(|_, _| {}, 0, at(10));
        check(|state, t0| state.head_since = Some(t0 + secs(1)), 9, at(10));
        check(|_, _| {}, 10, |_| Drop(Ending::HandshakeTimeout));
        // Identified and idle: GOAWAY once the idle timeout has passed since the last request.
        check(identified, 0, at(60));
        check(identified, 60, |_| GoAway(Ending::Idle));
        check(
            |state, t0| {
                identified(state, t0);
                state.idle_since = t0 + secs(30);
            },
            60,
            at(90),
        );
        // A request open: look again one idle timeout later, whatever the older deadlines.
        check(
            |state, t0| {
                identified(state, t0);
                state.open = 1;
            },
            100,
            at(160),
        );
        // A later head: dropped once the header-read timeout has passed since its first byte.
        let head_at_50 = |state: &mut State, t0: Instant| {
            identified(state, t0);
            state.head_since = Some(t0 + secs(50));
        };
        check(head_at_50, 52, at(55));
        check(head_at_50, 55, |_| Drop(Ending::HeaderTimeout));
        // Draining: held while a request has fully arrived, GOAWAY at once otherwise, whatever
        // the protocol or the other limits.
        let draining = |arrived: usize| {
            move |state: &mut State, _: Instant| {
                state.draining = true;
                state.open = 2;
                state.arrived = arrived;
            }
        };
        check(draining(1), 0, |_| LookAgainAt(None));
        check(draining(0), 0, |_| GoAway(Ending::Shutdown));
        check(draining(0), 1000, |_| GoAway(Ending::Shutdown));
    }

    #[test]
    fn the_http2_preface_identifies_http2_and_its_first_difference_http1() {
        use Protocol::{Http1, Http2, Preface};
        let cases: [(Protocol, &[u8], Protocol); 6] = [
            (Preface(0), b"P", Preface(1)),
            (Preface(1), b"RI * HTTP/2.0\r\n", Preface(16)),
            (Preface(16), b"\r\nSM\r\n\r\n\0\0\x04", Http2),
            (Preface(0), b"POST / HTTP/1.1\r\n", Http1),
            (Preface(3), b"X", Http1),
            (Http1, HTTP2_PREFACE, Http1),
        ];
        for (before, bytes, after) in cases {
            assert_eq!(before.after(bytes), after, "{before:?} then {bytes:?}");
        }
    }

    #[test]
    fn a_connection_closed_at_shutdown_is_partial_with_a_request_or_head_on_its_way() {
        let t0 = Instant::now();
        let idle = State::new(t0);
        assert!(!idle.is_partial());
        assert!(State { open: 1, ..idle }.is_partial());
        assert!(
            State {
                head_since: Some(t0),
                ..idle
            }
            .is_partial()
        );
    }
}
