//! The controller client: one pooled HTTP client that POSTs a method call, reads the reply with a
//! size cap, and sorts every transport outcome into an [`UpstreamError`].
//!
//! It never retries a request that may have reached the controller: only a failed connect (nothing
//! sent) is tried once more. The whole call runs inside the caller's future, so dropping that
//! future (a cancelled RPC) drops the HTTP request and closes its connection.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue, USER_AGENT,
};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use url::Url;

use crate::codec::{self, DecodeError, MethodCall, Reply, WireFormat};
use crate::config::GatewayConfig;
use crate::request_id::{self, RequestId};

/// Idle pooled connections are closed after this long, before the shortest common server
/// keep-alive (5 s for Apache and Node, 130 s for Kestrel), so a request is never written onto a
/// connection the controller is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The request ID header, named once rather than parsed from text on every call.
const REQUEST_ID: HeaderName = HeaderName::from_static(request_id::HEADER);

/// Sent on every call, so the controller's logs can tell the gateway from other clients.
const USER_AGENT_VALUE: HeaderValue =
    HeaderValue::from_static(concat!("taskgate/", env!("CARGO_PKG_VERSION")));

/// A client for one controller's task interface.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    /// Pooled and cheap to clone; shared by every call. It never follows a redirect, which
    /// would replay a POST somewhere we were not pointed at.
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The task-interface endpoint every method call is POSTed to.
    url: Url,
    /// `url` as a request target, parsed once so a call only clones it.
    target: Uri,
    /// The Host header for `url`, made once rather than by the client on every call.
    host: HeaderValue,
    /// The Content-Type of `format`'s requests.
    content_type: HeaderValue,
    /// The Accept header for `format`'s replies.
    accept: HeaderValue,
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
    #[error("cannot set up TLS to the controller: {0}")]
    Tls(#[source] rustls::Error),
}

/// A connection failure while sending the request or reading the reply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    /// Sending the request or reading the reply head failed.
    #[error(transparent)]
    Request(hyper_util::client::legacy::Error),
    /// Reading the reply body failed.
    #[error(transparent)]
    Body(hyper::Error),
}

/// A controller call that did not produce a reply we can trust.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The connection could not be made, twice: nothing was sent.
    #[error("cannot connect to the controller: {}", error_chain(.0))]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    /// The connection failed after the request may have been sent.
    #[error("the connection to the controller failed: {}", error_chain(.0))]
    ConnectionLost(#[source] TransportError),
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
    BadResponse(#[source] DecodeError),
    /// The reply body is longer than the configured cap.
    #[error("the controller's reply is larger than {limit} bytes")]
    ResponseTooLarge {
        /// The cap in bytes.
        limit: usize,
    },
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
    pub(crate) fn new(config: &GatewayConfig) -> Result<Self, ClientError> {
        let url = config.upstream_url.clone();
        let invalid = |reason: String| ClientError::Target {
            url: url.to_string(),
            reason,
        };
        let target = Uri::try_from(&url[..url::Position::AfterQuery])
            .map_err(|error| invalid(error.to_string()))?;
        let host = HeaderValue::from_str(&url[url::Position::BeforeHost..url::Position::AfterPort])
            .map_err(|error| invalid(error.to_string()))?;
        let tls = config
            .upstream_tls
            .client_config(url.scheme() == "https")
            .map_err(ClientError::Tls)?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        // The TLS layer above takes https:// URLs; this layer only makes the TCP connection.
        http.enforce_http(false);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(HttpsConnector::from((http, tls)));
        Ok(Upstream {
            client,
            url,
            target,
            host,
            content_type: HeaderValue::from_static(config.upstream_format.content_type()),
            accept: HeaderValue::from_static(config.upstream_format.accept()),
            max_response_bytes: config.max_response_bytes.get(),
            format: config.upstream_format,
        })
    }

    /// The endpoint this client calls.
    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    /// POSTs `method_call` and returns the controller's reply, giving up after `time_limit`.
    pub(crate) async fn call(
        &self,
        method_call: &MethodCall,
        request_id: &RequestId,
        time_limit: Duration,
    ) -> Result<Reply, UpstreamError> {
        tokio::time::timeout(time_limit, self.post(method_call, request_id))
            .await
            .map_err(|_| UpstreamError::Timeout { limit: time_limit })?
    }

    async fn post(
        &self,
        method_call: &MethodCall,
        request_id: &RequestId,
    ) -> Result<Reply, UpstreamError> {
        let response = match self
            .client
            .request(self.request(method_call, request_id))
            .await
        {
            Err(error) if error.is_connect() => {
                tracing::debug!(cause = %error_chain(&error), "connect failed; trying once more");
                // Encoding again is cheaper than keeping a copy of every body for a rare retry.
                self.client
                    .request(self.request(method_call, request_id))
                    .await
            }
            result => result,
        }
        .map_err(|error| {
            if error.is_connect() {
                UpstreamError::Unreachable(error)
            } else {
                UpstreamError::ConnectionLost(TransportError::Request(error))
            }
        })?;

        let (head, body) = response.into_parts();
        let charset = head
            .headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(codec::charset_of);
        let body = read_capped(body, self.max_response_bytes).await;
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

    /// The POST of `method_call`: every header but the request ID and the length was made once.
    fn request(&self, method_call: &MethodCall, request_id: &RequestId) -> Request<Full<Bytes>> {
        let body = self.format.encode_method_call(method_call);
        let length = HeaderValue::from(body.len());
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.target.clone();
        let headers = request.headers_mut();
        headers.reserve(6);
        headers.insert(HOST, self.host.clone());
        headers.insert(USER_AGENT, USER_AGENT_VALUE);
        headers.insert(CONTENT_TYPE, self.content_type.clone());
        headers.insert(ACCEPT, self.accept.clone());
        headers.insert(CONTENT_LENGTH, length);
        headers.insert(REQUEST_ID, request_id.header_value().clone());
        request
    }
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
