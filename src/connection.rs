//! Accepted connections, watched from accept to close, for every listener (the gRPC port,
//! `/metrics` and the simulator).
//!
//! Hyper speaks the protocol; this module decides when a connection has had long enough:
//!
//! - **Handshake**: a new connection must identify itself (TLS, then an HTTP/2 preface or a
//!   complete first HTTP/1.1 request head) within the handshake timeout, or it is closed at
//!   once, the way linkerd2-proxy's protocol detection gives up.
//! - **Request heads**: a later HTTP/1.1 head must be complete within the header-read timeout
//!   of its first byte (slowloris).
//! - **Idle**: a connection without an open request for the idle timeout is closed gracefully
//!   (GOAWAY on HTTP/2).
//! - **Capacity**: beyond the connection limit a new connection is closed as soon as it is
//!   accepted, before it costs more than a descriptor.
//! - **Shutdown**: every connection gets GOAWAY at once. A request holds the drain only once its
//!   body has fully arrived (a real call, or a response stream being sent); a connection with
//!   nothing else (idle, a partial head, a body that never comes) is closed after a short
//!   linger that lets the GOAWAY out.
//!
//! It learns what happens on a connection from two taps: `WatchedIo` sees the bytes read and
//! `Tracked` sees requests start and their bodies end; both record it in the connection's
//! `Activity`. Calls are the hot path, so a call only updates counters: the driver is woken
//! for what needs an answer at once (a protocol identified, an HTTP/1.1 head starting, anything
//! during shutdown), and otherwise reads the counters when its deadline comes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
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
pub(crate) struct Census {
    /// Calls (task-service requests) whose request has fully arrived and whose response has not
    /// ended.
    calls: AtomicUsize,
    /// Other requests in the same state: health Watch and reflection streams.
    streams: AtomicUsize,
    /// Connections closed at shutdown with no request open.
    closed_idle: AtomicUsize,
    /// Connections closed at shutdown with only a partial request (a head or body that had not
    /// fully arrived).
    closed_partial: AtomicUsize,
}

/// A snapshot of a [`Census`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CensusCounts {
    /// See [`Census`].
    pub(crate) calls: usize,
    /// See [`Census`].
    pub(crate) streams: usize,
    /// See [`Census`].
    pub(crate) closed_idle: usize,
    /// See [`Census`].
    pub(crate) closed_partial: usize,
}

/// Whether a request is a call (the task service) or another stream; only for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    /// A task-service call.
    Call,
    /// Health, reflection, anything else.
    Stream,
}

/// What one connection is doing, shared by its taps and its driver.
#[derive(Debug)]
pub(crate) struct Activity {
    census: Arc<Census>,
    /// Requests whose response has not ended, including those still receiving their body.
    open: AtomicUsize,
    /// Of those, requests whose body has fully arrived: the ones shutdown waits for.
    working: AtomicUsize,
    /// Requests started so far; a change tells the driver the connection was just busy.
    started: AtomicU64,
    /// The connection has said which protocol it speaks (an HTTP/2 preface or a first request).
    identified: AtomicBool,
    /// It speaks HTTP/2, where bytes between requests are pings and settings, not a head.
    http2: AtomicBool,
    /// Bytes arrived while no request was open: the next HTTP/1.1 request head is on its way.
    head_arriving: AtomicBool,
    /// When the last request ended, in nanoseconds since `started_at`.
    last_end: AtomicU64,
    /// The time `last_end` counts from.
    started_at: Instant,
    /// Shutdown has begun: from now on every change wakes the driver.
    draining: AtomicBool,
    /// Set with a wake-up of the driver; the driver clears it when it looks.
    signalled: AtomicBool,
    /// The driver's waker.
    driver: AtomicWaker,
}

/// The socket of one connection, with a tap on what is read from it.
#[derive(Debug)]
pub(crate) struct WatchedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    /// How many bytes of the HTTP/2 preface have matched so far, until identification.
    preface_matched: usize,
}

/// The service of one connection, with a tap on each request's start, body and end.
#[derive(Debug, Clone)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// Requests whose path starts with this are calls; the rest are streams.
    call_path_prefix: &'static str,
    /// Put in every request, so `tonic::Request::remote_addr` works as under tonic's server.
    connect_info: TcpConnectInfo,
}

/// A request's progress, shared by its body tap and its guard.
#[derive(Debug)]
struct RequestProgress {
    activity: Arc<Activity>,
    kind: RequestKind,
    /// `RECEIVING`, then `WORKING` once the body has fully arrived, then `ENDED`.
    state: AtomicU8,
}

const RECEIVING: u8 = 0;
const WORKING: u8 = 1;
const ENDED: u8 = 2;

/// Marks a request ended when dropped: with its response body, or with its response future if
/// the request was cancelled first.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<RequestProgress>);

/// A request body that reports when it has fully arrived.
#[derive(Debug)]
struct RequestBody {
    inner: Incoming,
    progress: Arc<RequestProgress>,
}

/// A response body that holds something (a request's guard, a permit) until it is dropped:
/// when the response has been sent, or its stream reset.
#[derive(Debug)]
pub(crate) struct Holding<T, B = Body> {
    inner: B,
    _held: T,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The peer closed it, or the protocol ended it.
    Closed,
    /// It did not identify its protocol in time.
    HandshakeTimeout,
    /// A later HTTP/1.1 request head did not arrive in time.
    HeaderTimeout,
    /// It had no open request for the idle timeout.
    Idle,
    /// Shutdown closed it with nothing worth waiting for.
    Shutdown,
}

/// One listener's connections: the limit on how many are open, what they are doing, and the
/// shutdown signal they all follow.
#[derive(Debug)]
pub(crate) struct Connections {
    pub(crate) limits: ConnectionLimits,
    pub(crate) metrics: ListenerMetrics,
    pub(crate) census: Arc<Census>,
    /// One permit per connection that may be open.
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// Refusals come in floods; one line per interval.
    refusal_log: LogEvery,
    /// Every connection holds a receiver until it closes, so `closed` tells when all have.
    open_connections: watch::Sender<()>,
    /// The connections open now, to tell each when shutdown begins.
    live: Arc<Mutex<Live>>,
}

/// The [`Activity`] of every open connection of a listener.
#[derive(Debug, Default)]
struct Live {
    next_id: u64,
    activities: HashMap<u64, Arc<Activity>>,
    shutdown_begun: bool,
}

/// Takes a connection out of [`Live`] when it closes.
#[derive(Debug)]
struct LiveEntry {
    live: Arc<Mutex<Live>>,
    id: u64,
}

/// What an admitted connection holds until it closes.
#[derive(Debug)]
pub(crate) struct Admission {
    _slot: OwnedSemaphorePermit,
    _open: GaugeGuard,
    _counted: watch::Receiver<()>,
    _live: LiveEntry,
    /// When the connection was accepted; the handshake timeout counts from here.
    pub(crate) accepted_at: Instant,
    activity: Arc<Activity>,
    limits: ConnectionLimits,
    /// The listener's counters, for the connection's ending.
    pub(crate) metrics: ListenerMetrics,
    peer: SocketAddr,
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
            open_connections: watch::Sender::new(()),
            live: Arc::default(),
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
        let activity = Arc::new(Activity::new(Arc::clone(&self.census), accepted_at));
        let id = {
            let mut live = lock(&self.live);
            let id = live.next_id;
            live.next_id += 1;
            if live.shutdown_begun {
                activity.draining.store(true, Ordering::SeqCst);
            }
            live.activities.insert(id, Arc::clone(&activity));
            id
        };
        Some(Admission {
            _slot: slot,
            _open: self.metrics.connection_opened(),
            _counted: self.open_connections.subscribe(),
            _live: LiveEntry {
                live: Arc::clone(&self.live),
                id,
            },
            accepted_at,
            activity,
            limits: self.limits,
            metrics: self.metrics.clone(),
            peer,
        })
    }

    /// Tells every connection that shutdown has begun.
    pub(crate) fn begin_shutdown(&self) {
        let mut live = lock(&self.live);
        live.shutdown_begun = true;
        for activity in live.activities.values() {
            activity.draining.store(true, Ordering::SeqCst);
            activity.signal();
        }
    }

    /// Resolves once every admitted connection has closed.
    pub(crate) async fn all_closed(&self) {
        self.open_connections.closed().await;
    }
}

fn lock(live: &Mutex<Live>) -> std::sync::MutexGuard<'_, Live> {
    // The map stays consistent whatever panicked while holding it.
    live.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        lock(&self.live).activities.remove(&self.id);
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
            activity: Arc::clone(&self.activity),
            call_path_prefix,
            connect_info: TcpConnectInfo {
                local_addr: local,
                remote_addr: Some(self.peer),
            },
        }
    }

    /// Runs a step of the handshake before HTTP (TLS) within the handshake timeout; gives up
    /// at once when shutdown begins. The error is the ending, already recorded.
    pub(crate) async fn within_handshake<T>(
        &mut self,
        handshake: impl Future<Output = T>,
    ) -> Result<T, Ending> {
        let deadline = self.accepted_at + self.limits.handshake_timeout;
        let ending = tokio::select! {
            output = handshake => return Ok(output),
            () = tokio::time::sleep_until(deadline) => Ending::HandshakeTimeout,
            () = self.activity.until_draining() => Ending::Shutdown,
        };
        self.record(ending);
        Err(ending)
    }

    /// Counts a connection closed by a time limit, and logs it at debug level.
    pub(crate) fn record(&self, ending: Ending) {
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

// === impl Census ===

impl Census {
    /// The counts now.
    pub(crate) fn counts(&self) -> CensusCounts {
        CensusCounts {
            calls: self.calls.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
            closed_idle: self.closed_idle.load(Ordering::Relaxed),
            closed_partial: self.closed_partial.load(Ordering::Relaxed),
        }
    }

    fn working(&self, kind: RequestKind) -> &AtomicUsize {
        match kind {
            RequestKind::Call => &self.calls,
            RequestKind::Stream => &self.streams,
        }
    }
}

// === impl Activity ===

impl Activity {
    fn new(census: Arc<Census>, started_at: Instant) -> Self {
        Activity {
            census,
            open: AtomicUsize::new(0),
            working: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            identified: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            head_arriving: AtomicBool::new(false),
            last_end: AtomicU64::new(0),
            started_at,
            draining: AtomicBool::new(false),
            signalled: AtomicBool::new(false),
            driver: AtomicWaker::new(),
        }
    }

    /// Wakes the driver.
    fn signal(&self) {
        self.signalled.store(true, Ordering::SeqCst);
        self.driver.wake();
    }

    /// Resolves once [`Activity::signal`] has been called since the driver last looked.
    fn signalled(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.driver.register(cx.waker());
            if self.signalled.swap(false, Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Resolves once shutdown has begun.
    async fn until_draining(&self) {
        while !self.draining.load(Ordering::SeqCst) {
            self.signalled().await;
        }
    }

    /// When the last request ended; `started_at` if none has.
    fn last_end(&self) -> Instant {
        self.started_at + Duration::from_nanos(self.last_end.load(Ordering::SeqCst))
    }

    fn request_started(self: &Arc<Self>, kind: RequestKind) -> Arc<RequestProgress> {
        self.open.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        let head_was_arriving = self.head_arriving.swap(false, Ordering::SeqCst);
        let was_identified = self.identified.swap(true, Ordering::SeqCst);
        // The driver times a head or the handshake only until the request starts; otherwise a
        // call costs it nothing: it reads the counters when its deadline comes.
        if head_was_arriving || !was_identified || self.draining.load(Ordering::SeqCst) {
            self.signal();
        }
        Arc::new(RequestProgress {
            activity: Arc::clone(self),
            kind,
            state: AtomicU8::new(RECEIVING),
        })
    }

    /// Called by the socket tap for every read that returned bytes.
    fn bytes_read(&self, preface_matched: &mut usize, bytes: &[u8]) {
        if !self.identified.load(Ordering::Relaxed) {
            // Compare what has arrived with the HTTP/2 preface; the first difference means
            // HTTP/1.1, identified later by its first complete request head.
            let matched = *preface_matched;
            let expected = &HTTP2_PREFACE[matched.min(HTTP2_PREFACE.len())..];
            let length = bytes.len().min(expected.len());
            if bytes[..length] == expected[..length] && matched < HTTP2_PREFACE.len() {
                *preface_matched = matched + length;
                if *preface_matched == HTTP2_PREFACE.len() {
                    self.head_arriving.store(false, Ordering::SeqCst);
                    self.http2.store(true, Ordering::SeqCst);
                    self.identified.store(true, Ordering::SeqCst);
                    self.signal();
                    return;
                }
            } else {
                // Never matches again: a mismatch is permanent.
                *preface_matched = usize::MAX;
            }
            // Part of a preface or of a first head: a partial request, should shutdown come now.
            // The handshake timeout times it; no need to wake the driver.
            self.head_arriving.store(true, Ordering::SeqCst);
            return;
        }
        if !self.http2.load(Ordering::Relaxed)
            && self.open.load(Ordering::SeqCst) == 0
            && !self.head_arriving.swap(true, Ordering::SeqCst)
        {
            self.signal();
        }
    }
}

// === impl RequestProgress ===

impl RequestProgress {
    /// The body has fully arrived: from now on the request is worth waiting for.
    fn body_complete(&self) {
        if self
            .state
            .compare_exchange(RECEIVING, WORKING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.activity.working.fetch_add(1, Ordering::SeqCst);
            self.activity
                .census
                .working(self.kind)
                .fetch_add(1, Ordering::SeqCst);
            if self.activity.draining.load(Ordering::SeqCst) {
                self.activity.signal();
            }
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let progress = &self.0;
        let activity = &progress.activity;
        if progress.state.swap(ENDED, Ordering::SeqCst) == WORKING {
            activity.working.fetch_sub(1, Ordering::SeqCst);
            activity
                .census
                .working(progress.kind)
                .fetch_sub(1, Ordering::SeqCst);
        }
        let since_start = Instant::now().saturating_duration_since(activity.started_at);
        let since_start = u64::try_from(since_start.as_nanos()).unwrap_or(u64::MAX);
        activity.last_end.fetch_max(since_start, Ordering::SeqCst);
        activity.open.fetch_sub(1, Ordering::SeqCst);
        if activity.draining.load(Ordering::SeqCst) {
            activity.signal();
        }
    }
}

// === impl WatchedIo ===

impl<T> WatchedIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        WatchedIo {
            inner,
            activity,
            preface_matched: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.activity.bytes_read(&mut this.preface_matched, read);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
        let kind = if request.uri().path().starts_with(self.call_path_prefix) {
            RequestKind::Call
        } else {
            RequestKind::Stream
        };
        let progress = self.activity.request_started(kind);
        let guard = RequestGuard(Arc::clone(&progress));
        let (mut parts, body) = request.into_parts();
        if body.is_end_stream() {
            progress.body_complete();
        }
        parts.extensions.insert(self.connect_info.clone());
        let body = Body::new(RequestBody {
            inner: body,
            progress,
        });
        let response = self.inner.call(Request::from_parts(parts, body));
        Box::pin(async move {
            let response = response.await.map_err(Into::into)?;
            Ok(response.map(|body| Holding::new(body, guard)))
        })
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
            self.progress.body_complete();
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

// === serving one connection ===

/// A hyper connection builder with the timer that HTTP/2 keep-alive needs. HTTP/1.1 head
/// timeouts are this module's (hyper's own starts counting when the connection goes idle, so it
/// cannot tell an idle keep-alive connection from a slow head).
pub(crate) fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Serves `io` with `service` on `builder` until the peer closes it, a limit closes it, or
/// shutdown closes it; counts a close by a time limit.
pub(crate) async fn serve<I, S, ResBody>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: Tracked<S>,
    admission: &mut Admission,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let activity = Arc::clone(&admission.activity);
    let io = TokioIo::new(WatchedIo::new(io, Arc::clone(&activity)));
    let connection = builder.serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(connection);
    let mut driver = Driver::new(admission.accepted_at, admission.limits);
    let ending = loop {
        if !driver.draining && activity.draining.load(Ordering::SeqCst) {
            driver.draining = true;
            connection.as_mut().graceful_shutdown();
        }
        let deadline = match driver.next_step(&activity) {
            Step::Wait(deadline) => deadline,
            Step::GoAway(ending) => {
                connection.as_mut().graceful_shutdown();
                driver.closing = Some((Instant::now() + CLOSE_LINGER, ending));
                continue;
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(cause = %error, peer = %admission.peer, "connection ended with an error");
                }
                break driver.closing.map_or(Ending::Closed, |(_, ending)| ending);
            }
            () = activity.signalled() => {}
            () = sleep_until(deadline) => {
                if let Some(ending) = driver.deadline_passed() {
                    break ending;
                }
            }
        }
    };
    admission.record(ending);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The timing decisions of one connection, apart from the I/O so they read as one table.
#[derive(Debug)]
struct Driver {
    limits: ConnectionLimits,
    accepted_at: Instant,
    /// `started` as last seen: a change means the connection was just busy.
    last_started: u64,
    /// Since when no request has been open.
    idle_since: Instant,
    /// Since when the bytes of a request head have been arriving.
    head_since: Option<Instant>,
    /// Shutdown has begun (GOAWAY sent).
    draining: bool,
    /// A request held the connection open during shutdown, so its close is not counted as one
    /// of an idle or partial connection.
    held_shutdown: bool,
    /// GOAWAY was sent for this reason; the connection is dropped at the instant.
    closing: Option<(Instant, Ending)>,
    /// What happens when the pending deadline passes.
    on_deadline: OnDeadline,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Serve until the deadline (none: until something changes).
    Wait(Option<Instant>),
    /// Send GOAWAY (or close an idle HTTP/1.1 connection) for this reason, then linger.
    GoAway(Ending),
}

/// What the pending deadline means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDeadline {
    /// Nothing: look again.
    Recheck,
    /// Drop the connection now, for this reason.
    Drop(Ending),
}

impl Driver {
    fn new(accepted_at: Instant, limits: ConnectionLimits) -> Self {
        Driver {
            limits,
            accepted_at,
            last_started: 0,
            idle_since: accepted_at,
            head_since: None,
            draining: false,
            held_shutdown: false,
            closing: None,
            on_deadline: OnDeadline::Recheck,
        }
    }

    fn next_step(&mut self, activity: &Activity) -> Step {
        let now = Instant::now();
        let started = activity.started.load(Ordering::SeqCst);
        let open = activity.open.load(Ordering::SeqCst) > 0;
        if started != self.last_started || open {
            self.last_started = started;
            self.head_since = None;
        }
        // Requests do not wake the driver: the connection has been idle since the last one
        // ended (or since it was accepted).
        self.idle_since = self.idle_since.max(activity.last_end());
        self.on_deadline = OnDeadline::Recheck;
        if let Some((until, ending)) = self.closing {
            self.on_deadline = OnDeadline::Drop(ending);
            return Step::Wait(Some(until));
        }
        if self.draining {
            if activity.working.load(Ordering::SeqCst) > 0 {
                self.held_shutdown = true;
                return Step::Wait(None);
            }
            if !self.held_shutdown {
                let partial = open || activity.head_arriving.load(Ordering::SeqCst);
                let census = &activity.census;
                let counter = if partial {
                    &census.closed_partial
                } else {
                    &census.closed_idle
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            return Step::GoAway(Ending::Shutdown);
        }
        if !activity.identified.load(Ordering::SeqCst) {
            self.on_deadline = OnDeadline::Drop(Ending::HandshakeTimeout);
            return Step::Wait(Some(self.accepted_at + self.limits.handshake_timeout));
        }
        if open {
            // Looked at again then; the request may well have ended by that time.
            return Step::Wait(Some(now + self.limits.idle_timeout));
        }
        if activity.head_arriving.load(Ordering::SeqCst) {
            let since = *self.head_since.get_or_insert(now);
            self.on_deadline = OnDeadline::Drop(Ending::HeaderTimeout);
            return Step::Wait(Some(since + self.limits.header_read_timeout));
        }
        let deadline = self.idle_since + self.limits.idle_timeout;
        if now >= deadline {
            return Step::GoAway(Ending::Idle);
        }
        Step::Wait(Some(deadline))
    }

    /// The pending deadline passed: `Some` when the connection is to be dropped now.
    fn deadline_passed(&self) -> Option<Ending> {
        match self.on_deadline {
            OnDeadline::Recheck => None,
            OnDeadline::Drop(ending) => Some(ending),
        }
    }
}
