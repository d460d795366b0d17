//! The controller client: one pooled HTTP client that POSTs a method call, reads the reply with a
//! size cap, and sorts every transport outcome into an `UpstreamError`.
//!
//! It never retries a request that may have reached the controller: only a failed connect, or a
//! kept-alive connection whose first write failed with nothing sent, is tried once more. A pooled
//! connection the controller closed is found before it is used. The whole call, connection I/O
//! included, runs inside the caller's future, so dropping that future (a cancelled RPC) drops the
//! HTTP request and closes its connection.
//!
//! Connections are kept alive in a small pool of our own, and the HTTP/1.1 exchange on them is
//! `http1`'s, made for the one request the gateway sends (see there for why not hyper's client).

pub(crate) mod http1;

use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::{StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tower::ServiceExt as _;
use url::Url;

pub(crate) use self::http1::TransportError;
use self::http1::{Answer, BodyError, Connection, ExchangeError, Io, RequestHead};
use crate::codec::{Call, DecodeError, Reply, WireFormat};
use crate::config::{ConfigError, defaults, limits, refuse_credentials};
use crate::request_id::RequestId;
use crate::tls::UpstreamTls;

/// Idle pooled connections are not used after this long, before the shortest common server
/// keep-alive (5 s for Apache and Node, 130 s for Kestrel), so a request is not written onto a
/// connection the controller is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Sent on every call, so the controller's logs can tell the gateway from other clients.
const USER_AGENT: &str = concat!("taskgate/", env!("CARGO_PKG_VERSION"));

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
    /// Makes the TCP connections. Nothing here follows a redirect, which would replay a POST
    /// somewhere we were not pointed at.
    connector: HttpConnector,
    /// TLS over them, with the name the controller's certificate must have, for https://.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// Idle keep-alive connections, each worker's apart.
    pool: Arc<Pool>,
    /// The task-interface endpoint every method call is POSTed to.
    url: Url,
    /// `url` without its fragment, where new connections go.
    target: Uri,
    /// Every request's head up to its length, made once.
    head: RequestHead,
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
    /// The host of an https:// URL cannot be a certificate's name.
    #[error("upstream URL '{url}' has a host that cannot be checked against a TLS certificate")]
    ServerName {
        /// The URL.
        url: String,
    },
}

/// Why a connection to the controller could not be made (TCP connect or TLS handshake).
pub(crate) type ConnectError = Box<dyn std::error::Error + Send + Sync>;

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
    /// Builds the shared client for the configured controller, for calls on `workers` worker
    /// threads.
    pub(crate) fn new(settings: &Settings, workers: usize) -> Result<Self, ClientError> {
        let url = settings.url.clone();
        let invalid = |reason: String| ClientError::Target {
            url: url.to_string(),
            reason,
        };
        let target = Uri::try_from(&url[..url::Position::AfterQuery])
            .map_err(|error| invalid(error.to_string()))?;
        // Checked as a request target, so that it cannot end the request line early.
        let path = Uri::try_from(&url[url::Position::BeforePath..url::Position::AfterQuery])
            .map_err(|error| invalid(error.to_string()))?;
        let host = hyper::header::HeaderValue::from_str(
            &url[url::Position::BeforeHost..url::Position::AfterPort],
        )
        .map_err(|error| invalid(error.to_string()))?;
        let tls = match url.scheme() {
            "https" => {
                let config = settings.tls.client_config().map_err(ClientError::Tls)?;
                let name = server_name(&url).ok_or_else(|| ClientError::ServerName {
                    url: url.to_string(),
                })?;
                Some((config, name))
            }
            _ => None,
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // TLS is added above this layer, which only makes the TCP connection.
        connector.enforce_http(false);
        Ok(Upstream {
            connector,
            tls,
            pool: Arc::new(Pool::new(workers, settings.max_in_flight.get())),
            head: RequestHead::new(
                &path.to_string(),
                host.to_str().map_err(|error| invalid(error.to_string()))?,
                USER_AGENT,
                settings.format.content_type(),
                settings.format.accept(),
            ),
            url,
            target,
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
        let body = self.format.encode_call(call);
        let request_id = request_id.header_value().as_bytes();
        let limit = self.max_response_bytes;
        let (mut connection, pooled) = match self.pool.take() {
            Some(connection) => (connection, true),
            None => (self.pool.owned(self.connect_boxed().await?), false),
        };
        let mut answer = connection
            .io
            .exchange(&self.head, request_id, &body, limit)
            .await;
        if let (true, Err(ExchangeError::NotSent(error))) = (pooled, &answer) {
            // A kept-alive connection the controller closed: nothing was sent, so a new
            // connection may carry the request.
            tracing::debug!(cause = %error, "pooled connection closed; using a new one");
            drop(answer);
            connection = self.pool.owned(self.connect_boxed().await?);
            answer = connection
                .io
                .exchange(&self.head, request_id, &body, limit)
                .await;
        }
        let answer = answer.map_err(|error| {
            UpstreamError::ConnectionLost(match error {
                ExchangeError::NotSent(error) => TransportError::Io(error),
                ExchangeError::Failed(error) => error,
            })
        })?;
        let reusable = answer.reusable;
        let reply = self.reply(answer);
        if reusable {
            self.pool.put(connection);
        }
        reply
    }

    /// What the controller answered, from a reply read to its end (or refused for its size).
    fn reply(&self, answer: Answer<'_>) -> Result<Reply, UpstreamError> {
        let limit = self.max_response_bytes;
        if !answer.status.is_success() {
            // A fault is the controller's answer whatever status carries it; anything else under
            // a non-2xx status is not a reply we can act on.
            return match answer
                .body
                .map(|body| self.format.decode_reply(body, answer.charset))
            {
                Ok(Ok(Reply::Fault(code))) => Ok(Reply::Fault(code)),
                _ => Err(UpstreamError::HttpStatus {
                    status: answer.status,
                }),
            };
        }
        let body = answer.body.map_err(|error| match error {
            BodyError::TooLarge => UpstreamError::ResponseTooLarge { limit },
            BodyError::Transport(error) => UpstreamError::ConnectionLost(error),
        })?;
        self.format
            .decode_reply(body, answer.charset)
            .map_err(UpstreamError::BadResponse)
    }

    /// [`Upstream::connect`] on the heap: its TLS handshake state is over a kilobyte, which every
    /// call's future would otherwise carry (and copy) for a connect it rarely makes.
    fn connect_boxed(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Connection, UpstreamError>> + Send + '_>> {
        Box::pin(self.connect())
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
        let stream = self
            .connector
            .clone()
            .oneshot(self.target.clone())
            .await?
            .into_inner();
        let io = match &self.tls {
            None => Io::Tcp(stream),
            Some((config, name)) => Io::Tls(Box::new(
                TlsConnector::from(Arc::clone(config))
                    .connect(name.clone(), stream)
                    .await
                    .map_err(TlsHandshake)?,
            )),
        };
        Ok(Connection::new(io))
    }
}

/// The name an https:// controller's certificate must have: its URL's host.
fn server_name(url: &Url) -> Option<ServerName<'static>> {
    match url.host()? {
        url::Host::Domain(domain) => ServerName::try_from(domain.to_owned()).ok(),
        url::Host::Ipv4(address) => Some(ServerName::from(std::net::IpAddr::V4(address))),
        url::Host::Ipv6(address) => Some(ServerName::from(std::net::IpAddr::V6(address))),
    }
}

/// Why a TLS handshake with the controller failed.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed")]
struct TlsHandshake(#[source] std::io::Error);

/// Idle controller connections, each worker's apart.
///
/// A connection's I/O is driven by the runtime of the worker that opened it, so a call takes
/// one of its own worker's first, and a connection goes back to its owner's list after each
/// call. When its worker has none, a call takes another worker's rather than open one: at low
/// load most lists are empty or stale, and a new connection costs the controller a connect (and,
/// over TLS, a handshake); that call's I/O events then pass through the owner's thread. A
/// connection is opened only when no worker has an idle one, so, as with a single list, no more
/// are open than calls may be in flight.
#[derive(Debug)]
struct Pool {
    /// Per worker, most recently used last.
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// More idle connections than calls can be in flight would never be used.
    max_idle: usize,
}

#[derive(Debug)]
struct Idle {
    connection: Owned,
    since: Instant,
}

/// A controller connection and the worker whose runtime drives its I/O.
#[derive(Debug)]
struct Owned {
    io: Connection,
    owner: usize,
}

// === impl Pool ===

impl Pool {
    fn new(workers: usize, max_idle: usize) -> Pool {
        Pool {
            idle: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
            max_idle,
        }
    }

    /// An idle connection that is still open: this worker's most recently used, else another
    /// worker's.
    fn take(&self) -> Option<Owned> {
        let here = self.here();
        let workers = self.idle.len();
        (0..workers).find_map(|offset| self.take_from((here + offset) % workers))
    }

    /// The most recently used of `worker`'s idle connections that is still open, if any. The
    /// lock is held only to pop: checking a connection polls it, and dropping one closes its
    /// socket.
    fn take_from(&self, worker: usize) -> Option<Owned> {
        let idle = &self.idle[worker];
        loop {
            let Idle {
                mut connection,
                since,
            } = lock(idle).pop()?;
            if since.elapsed() >= POOL_IDLE_TIMEOUT {
                // The most recently used is too old, so all are; closed outside the lock.
                let stale = std::mem::take(&mut *lock(idle));
                drop(stale);
                return None;
            }
            if connection.io.is_open() {
                return Some(connection);
            }
        }
    }

    /// `io`, just opened on this worker.
    fn owned(&self, io: Connection) -> Owned {
        Owned {
            io,
            owner: self.here(),
        }
    }

    /// Keeps `connection`, which ended a clean exchange, on its owner's list for a next call
    /// unless enough are idle; connections idle for too long go first. Whether the controller
    /// closed it is checked when it is taken, which is soon enough and saves a poll per call.
    fn put(&self, mut connection: Owned) {
        connection.io.shrink_buffers();
        let stale: Vec<Idle> = {
            let mut idle = lock(&self.idle[connection.owner]);
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

    /// This worker's index among the lists.
    fn here(&self) -> usize {
        0
    }
}

fn lock(idle: &Mutex<Vec<Idle>>) -> std::sync::MutexGuard<'_, Vec<Idle>> {
    // The list stays consistent whatever panicked while holding it.
    idle.lock().unwrap_or_else(PoisonError::into_inner)
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
