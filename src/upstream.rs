//! The controller client: one pooled HTTP client that POSTs a method call, reads the reply with a
//! size cap, and sorts every transport outcome into an `UpstreamError`.
//!
//! It never retries a request that may have reached the controller: only a failed connect, or a
//! kept-alive connection found closed before the request was written (nothing sent either way),
//! is tried once more. The whole call, connection I/O included, runs inside the caller's future,
//! so dropping that future (a cancelled RPC) drops the HTTP request and closes its connection.
//!
//! Connections are hyper's HTTP/1.1 client connections in a small pool of our own rather than
//! hyper-util's pooled client: measured with callgrind, that pool's bookkeeping (a hashed,
//! locked map per call) and the task that drives each connection cost ~8k instructions and a
//! task wake-up per call, about 7 % of the gateway's whole cost.

use std::future::Future as _;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue,
    TRANSFER_ENCODING, USER_AGENT,
};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::ServiceExt as _;
use url::Url;

use crate::codec::{self, Call, DecodeError, Reply, WireFormat};
use crate::config::{ConfigError, defaults, limits, refuse_credentials};
use crate::request_id::{self, RequestId};
use crate::tls::UpstreamTls;

/// Idle pooled connections are not used after this long, before the shortest common server
/// keep-alive (5 s for Apache and Node, 130 s for Kestrel), so a request is not written onto a
/// connection the controller is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The request ID header, named once rather than parsed from text on every call.
const REQUEST_ID: HeaderName = HeaderName::from_static(request_id::HEADER);

/// Sent on every call, so the controller's logs can tell the gateway from other clients.
const USER_AGENT_VALUE: HeaderValue =
    HeaderValue::from_static(concat!("taskgate/", env!("CARGO_PKG_VERSION")));

/// How the gateway calls the controller: where, in which format, and within which limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The controller's task-interface URL, for example `http://10.0.0.5:44000/api/v2/task`.
    pub url: Url,
    /// Whether the controller is spoken to in XML (documented) or JSON.
    pub format: WireFormat,
    /// The longest the gateway waits for one controller reply, whatever the caller's deadline.
    pub timeout: Duration,
    /// The delay put in `RetryInfo` when a retry is safe (fault 1148, controller unreachable).
    pub retry_delay: Duration,
    /// The largest controller reply body the gateway reads before giving up on it.
    pub max_response_bytes: NonZeroUsize,
    /// How many task calls may be in flight at once, each holding at most one controller
    /// connection; more are refused with RESOURCE_EXHAUSTED rather than queued.
    pub max_in_flight: NonZeroUsize,
    /// HTTPS to the controller: its CA and a client certificate, when they are not the defaults.
    pub tls: UpstreamTls,
}

/// A client for one controller's task interface.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    /// Makes new connections: TCP, and TLS for an https:// URL.
    connector: HttpsConnector<HttpConnector>,
    /// Idle keep-alive connections, shared by every call. Nothing here follows a redirect,
    /// which would replay a POST somewhere we were not pointed at.
    pool: Arc<Pool>,
    /// The task-interface endpoint every method call is POSTed to.
    url: Url,
    /// `url` without its fragment, where new connections go.
    target: Uri,
    /// `url`'s path and query, the request target of every call (HTTP/1.1's origin form),
    /// parsed once so a call only clones it.
    path: Uri,
    /// Host, User-Agent, Content-Type and Accept, made once: a call clones them and adds its
    /// length and request ID, instead of hashing six header names on every call.
    headers: HeaderMap,
    /// Replies longer than this are refused without being read further.
    max_response_bytes: usize,
    /// XML (documented) or JSON, for requests and replies alike.
    format: WireFormat,
}

/// Why the controller client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The upstream URL does not make an HTTP request target.
    #[error("upstream URL '{url}' is not a valid HTTP request target: {reason}")]
    Target {
        /// The URL.
        url: String,
        /// What the HTTP library said.
        reason: String,
    },
    /// The TLS configuration cannot be built (for example, the system has no roots).
    #[error("cannot set up TLS to the controller")]
    Tls(#[source] rustls::Error),
}

/// Why a connection to the controller could not be made (TCP connect or TLS handshake).
pub(crate) type ConnectError = Box<dyn std::error::Error + Send + Sync>;

/// A connection failure while sending the request or reading the reply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    /// Sending the request or reading the reply head failed.
    #[error(transparent)]
    Request(hyper::Error),
    /// Reading the reply body failed.
    #[error(transparent)]
    Body(hyper::Error),
}

/// A controller call that did not produce a reply we can trust. Its message is the one callers
/// read, so it says the cause itself, which is therefore not also a `source`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The connection could not be made, twice: nothing was sent.
    #[error("cannot connect to the controller: {}", error_chain(&**.0))]
    Unreachable(ConnectError),
    /// The connection failed after the request may have been sent.
    #[error("the connection to the controller failed: {}", error_chain(.0))]
    ConnectionLost(TransportError),
    /// No complete reply arrived within the time limit.
    #[error("the controller did not answer within {}", humantime::format_duration(*.limit))]
    Timeout {
        /// The limit that ran out.
        limit: Duration,
    },
    /// A non-2xx HTTP status without a fault in the body.
    #[error("the controller answered HTTP {status}")]
    HttpStatus {
        /// The status the controller sent.
        status: StatusCode,
    },
    /// A 2xx reply whose body is not a task-interface response.
    #[error("the controller's reply is not a valid response: {0}")]
    BadResponse(DecodeError),
    /// The reply body is longer than the configured cap.
    #[error("the controller's reply is larger than {limit} bytes")]
    ResponseTooLarge {
        /// The cap in bytes.
        limit: usize,
    },
}

// === impl Settings ===

impl Settings {
    /// The documented defaults, pointed at `url`.
    pub fn new(url: Url) -> Self {
        Settings {
            url,
            format: WireFormat::Xml,
            timeout: defaults::UPSTREAM_TIMEOUT,
            retry_delay: defaults::RETRY_DELAY,
            max_response_bytes: defaults::MAX_RESPONSE_BYTES,
            max_in_flight: defaults::MAX_IN_FLIGHT,
            tls: UpstreamTls::default(),
        }
    }

    /// Checks the settings whose types allow values the gateway cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // `parse_upstream_url` refuses credentials, but library callers may build a `Url` by
        // hand, and every log line that names the upstream prints it whole.
        refuse_credentials(&self.url)?;
        limits::UPSTREAM_TIMEOUT.check(self.timeout)?;
        limits::RETRY_DELAY.check(self.retry_delay)?;
        limits::MAX_IN_FLIGHT.check(self.max_in_flight)?;
        limits::MAX_RESPONSE_BYTES.check(self.max_response_bytes)?;
        Ok(())
    }
}

// === impl UpstreamError ===

impl UpstreamError {
    /// A fixed word for the kind of failure, for metrics labels.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable(_) => "unreachable",
            UpstreamError::ConnectionLost(_) => "connection_lost",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::HttpStatus { .. } => "http_status",
            UpstreamError::BadResponse(_) => "bad_response",
            UpstreamError::ResponseTooLarge { .. } => "response_too_large",
        }
    }
}

// === impl Upstream ===

impl Upstream {
    /// Builds the shared client for the configured controller.
    pub(crate) fn new(settings: &Settings) -> Result<Self, ClientError> {
        let url = settings.url.clone();
        let invalid = |reason: String| ClientError::Target {
            url: url.to_string(),
            reason,
        };
        let target = Uri::try_from(&url[..url::Position::AfterQuery])
            .map_err(|error| invalid(error.to_string()))?;
        let path = Uri::try_from(&url[url::Position::BeforePath..url::Position::AfterQuery])
            .map_err(|error| invalid(error.to_string()))?;
        let host = HeaderValue::from_str(&url[url::Position::BeforeHost..url::Position::AfterPort])
            .map_err(|error| invalid(error.to_string()))?;
        let tls = settings
            .tls
            .client_config(url.scheme() == "https")
            .map_err(ClientError::Tls)?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        // The TLS layer above takes https:// URLs; this layer only makes the TCP connection.
        http.enforce_http(false);
        Ok(Upstream {
            connector: HttpsConnector::from((http, tls)),
            pool: Arc::new(Pool {
                idle: Mutex::new(Vec::new()),
                max_idle: settings.max_in_flight.get(),
            }),
            url,
            target,
            path,
            headers: header_template([
                (HOST, host),
                (USER_AGENT, USER_AGENT_VALUE),
                (
                    CONTENT_TYPE,
                    HeaderValue::from_static(settings.format.content_type()),
                ),
                (ACCEPT, HeaderValue::from_static(settings.format.accept())),
            ]),
            max_response_bytes: settings.max_response_bytes.get(),
            format: settings.format,
        })
    }

    /// The endpoint this client calls.
    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    /// POSTs `call` and returns the controller's reply, giving up after `time_limit`.
    pub(crate) async fn call(
        &self,
        call: &Call<'_>,
        request_id: &RequestId,
        time_limit: Duration,
    ) -> Result<Reply, UpstreamError> {
        tokio::time::timeout(time_limit, self.post(call, request_id))
            .await
            .map_err(|_| UpstreamError::Timeout { limit: time_limit })?
    }

    async fn post(&self, call: &Call<'_>, request_id: &RequestId) -> Result<Reply, UpstreamError> {
        let request = self.request(call, request_id);
        let (mut connection, exchange) = match self.pool.take() {
            Some(mut connection) => match connection.exchange(request).await {
                // A kept-alive connection the controller closed before the request was written:
                // nothing was sent, so a new connection may carry it.
                Exchange::NotSent(request, error) => {
                    tracing::debug!(cause = %error_chain(&error), "pooled connection closed; using a new one");
                    self.exchange_on_new(request).await?
                }
                exchange => (connection, exchange),
            },
            None => self.exchange_on_new(request).await?,
        };
        let (head, body) = match exchange {
            Exchange::Answered(response) => response.into_parts(),
            Exchange::NotSent(_, error) | Exchange::Failed(error) => {
                return Err(UpstreamError::ConnectionLost(TransportError::Request(
                    error,
                )));
            }
        };
        let charset = head
            .headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(codec::charset_of);
        // RFC 9112 §6.1: Transfer-Encoding overrides Content-Length, so such a reply is read as
        // the former says; but having both may be a response-splitting attempt, so where the
        // next reply on this connection begins is not to be trusted. (hyper keeps it alive.)
        let framing_conflicts = head.headers.contains_key(TRANSFER_ENCODING)
            && head.headers.contains_key(CONTENT_LENGTH);
        let body = connection.read_capped(body, self.max_response_bytes).await;
        if body.is_ok() && !framing_conflicts {
            // Read to its end, so the connection can carry the next call.
            self.pool.put(connection);
        }
        if !head.status.is_success() {
            // A fault is the controller's answer whatever status carries it; anything else under
            // a non-2xx status is not a reply we can act on.
            return match body.map(|body| self.format.decode_reply(&body, charset)) {
                Ok(Ok(Reply::Fault(code))) => Ok(Reply::Fault(code)),
                _ => Err(UpstreamError::HttpStatus {
                    status: head.status,
                }),
            };
        }
        self.format
            .decode_reply(&body?, charset)
            .map_err(UpstreamError::BadResponse)
    }

    /// Sends `request` on a new connection.
    async fn exchange_on_new(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<(Connection, Exchange), UpstreamError> {
        let mut connection = self.connect().await?;
        let exchange = connection.exchange(request).await;
        Ok((connection, exchange))
    }

    /// A new connection; a failed connect is tried once more, since nothing was sent.
    async fn connect(&self) -> Result<Connection, UpstreamError> {
        match self.connect_once().await {
            Err(error) => {
                tracing::debug!(cause = %error_chain(&*error), "connect failed; trying once more");
                self.connect_once().await
            }
            connected => connected,
        }
        .map_err(UpstreamError::Unreachable)
    }

    async fn connect_once(&self) -> Result<Connection, ConnectError> {
        let stream = self.connector.clone().oneshot(self.target.clone()).await?;
        let (sender, driver) = http1::handshake(stream).await?;
        Ok(Connection {
            sender,
            driver: Some(Box::pin(driver)),
        })
    }

    /// The POST of `method_call`: every header but the request ID and the length was made once.
    fn request(&self, call: &Call<'_>, request_id: &RequestId) -> Request<Full<Bytes>> {
        let body = self.format.encode_call(call);
        let length = content_length(body.len());
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.path.clone();
        let headers = request.headers_mut();
        *headers = self.headers.clone();
        // The template holds both already: replacing a value costs less than adding a header.
        if let Some(value) = headers.get_mut(CONTENT_LENGTH) {
            *value = length;
        }
        if let Some(value) = headers.get_mut(REQUEST_ID) {
            *value = request_id.header_value().clone();
        }
        request
    }
}

/// A header map with `fixed`, then the two headers each call sets, in the order they are sent.
fn header_template(fixed: [(HeaderName, HeaderValue); 4]) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(fixed.len() + 2);
    headers.extend(fixed);
    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    headers.insert(REQUEST_ID, HeaderValue::from_static("-"));
    headers
}

/// `Content-Length: length`. The lengths method calls have are made once: a header value made
/// from a number is an allocation, a clone of one made before is not.
fn content_length(length: usize) -> HeaderValue {
    const CACHED: usize = 1024;
    static LENGTHS: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    if length >= CACHED {
        return HeaderValue::from(length);
    }
    LENGTHS.get_or_init(|| (0..CACHED).map(HeaderValue::from).collect())[length].clone()
}

/// Reads the body frame by frame and stops as soon as it passes `limit`, so a huge or endless
/// reply never costs more than `limit` bytes of memory. Dropping a body that is not read to its
/// end closes the connection instead of returning it to the pool.
async fn read_capped(mut body: Incoming, limit: usize) -> Result<Vec<u8>, UpstreamError> {
    let too_large = UpstreamError::ResponseTooLarge { limit };
    // The Content-Length, when the controller sent one.
    let announced = body.size_hint().lower();
    if announced > limit as u64 {
        return Err(too_large);
    }
    let mut bytes = Vec::with_capacity(announced as usize);
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|error| UpstreamError::ConnectionLost(TransportError::Body(error)))?;
        if let Ok(chunk) = frame.into_data() {
            if bytes.len() + chunk.len() > limit {
                return Err(too_large);
            }
            bytes.extend_from_slice(&chunk);
        }
    }
    Ok(bytes)
}

/// One keep-alive HTTP/1.1 connection to the controller. Its I/O is driven by whichever call
/// holds it, inside that call's future, so no task of its own is woken per call, and dropping
/// the call drops the connection.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended.
    driver: Option<Pin<Box<Driver>>>,
}

type Driver = http1::Connection<MaybeHttpsStream<TokioIo<TcpStream>>, Full<Bytes>>;

/// How sending a request ended.
enum Exchange {
    /// The reply head arrived.
    Answered(hyper::Response<Incoming>),
    /// The connection was gone before the request was written; it may be sent elsewhere.
    NotSent(Request<Full<Bytes>>, hyper::Error),
    /// The connection failed after the request may have been written.
    Failed(hyper::Error),
}

/// Idle connections, most recently used last.
#[derive(Debug)]
struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// More idle connections than calls can be in flight would never be used.
    max_idle: usize,
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    since: Instant,
}

// === impl Connection ===

impl Connection {
    /// Sends `request` and waits for the reply head.
    async fn exchange(&mut self, request: Request<Full<Bytes>>) -> Exchange {
        let sender = &mut self.sender;
        let send = async move {
            if let Err(error) = sender.ready().await {
                return Exchange::NotSent(request, error);
            }
            match sender.try_send_request(request).await {
                Ok(response) => Exchange::Answered(response),
                Err(mut error) => match error.take_message() {
                    Some(request) => Exchange::NotSent(request, error.into_error()),
                    None => Exchange::Failed(error.into_error()),
                },
            }
        };
        drive(&mut self.driver, send).await
    }

    /// Reads the reply body, capped at `limit`.
    async fn read_capped(
        &mut self,
        body: Incoming,
        limit: usize,
    ) -> Result<Vec<u8>, UpstreamError> {
        drive(&mut self.driver, read_capped(body, limit)).await
    }

    /// Whether the connection can carry another request: polled once, a connection the
    /// controller has closed notices it.
    fn is_open(&mut self) -> bool {
        let Some(driver) = &mut self.driver else {
            return false;
        };
        match driver
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Pending => !self.sender.is_closed(),
            Poll::Ready(_) => {
                self.driver = None;
                false
            }
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Connection")
            .field("open", &self.driver.is_some())
            .finish()
    }
}

/// Runs `work` while driving the connection's I/O. Once the connection ends its driver is
/// dropped, which hands every request still waiting back with an error, so `work` ends too.
async fn drive<T>(
    driver: &mut Option<Pin<Box<Driver>>>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|context| {
        if let Poll::Ready(output) = work.as_mut().poll(context) {
            return Poll::Ready(output);
        }
        if let Some(running) = driver
            && running.as_mut().poll(context).is_ready()
        {
            *driver = None;
            return work.as_mut().poll(context);
        }
        Poll::Pending
    })
    .await
}

// === impl Pool ===

impl Pool {
    /// The most recently used idle connection that is still open, if any. The lock is held only
    /// to pop: checking a connection polls it, and dropping one closes its socket.
    fn take(&self) -> Option<Connection> {
        loop {
            let Idle {
                mut connection,
                since,
            } = self.lock().pop()?;
            if since.elapsed() >= POOL_IDLE_TIMEOUT {
                // The most recently used is too old, so all are.
                drop(std::mem::take(&mut *self.lock()));
                return None;
            }
            if connection.is_open() {
                return Some(connection);
            }
        }
    }

    /// Keeps `connection` for the next call, unless it has ended or enough are idle; connections
    /// idle for too long go first. Whether the controller closed it is checked when it is taken,
    /// which is soon enough and saves a poll per call.
    fn put(&self, connection: Connection) {
        if connection.driver.is_none() || connection.sender.is_closed() {
            return;
        }
        let stale: Vec<Idle> = {
            let mut idle = self.lock();
            let stale = idle
                .iter()
                .take_while(|entry| entry.since.elapsed() >= POOL_IDLE_TIMEOUT)
                .count();
            let stale = idle.drain(..stale).collect();
            if idle.len() < self.max_idle {
                idle.push(Idle {
                    connection,
                    since: Instant::now(),
                });
            }
            stale
        };
        // Closed outside the lock.
        drop(stale);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The list stays consistent whatever panicked while holding it.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An error and its causes on one line, for messages: the HTTP and TLS libraries' own messages
/// alone ("client error (Connect)") do not say what went wrong.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
