//! The controller client: one pooled HTTP client that POSTs a method call, reads the reply with a
//! size cap, and sorts every transport outcome into an [`UpstreamError`].
//!
//! It never retries a request that may have reached the controller: only a failed connect (nothing
//! sent) is tried once more. The whole call runs inside the caller's future, so dropping that
//! future (a cancelled RPC) drops the HTTP request and closes its connection.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use reqwest::{StatusCode, Url};

use crate::codec::{self, DecodeError, MethodCall, Reply, WireFormat};
use crate::config::GatewayConfig;
use crate::request_id::{self, RequestId};

/// Idle pooled connections are closed after this long, before the shortest common server
/// keep-alive (5 s for Apache and Node, 130 s for Kestrel), so a request is never written onto a
/// connection the controller is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// A client for one controller's task interface.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    /// Pooled and cheap to clone; shared by every call.
    client: reqwest::Client,
    /// The task-interface endpoint every method call is POSTed to.
    url: Url,
    /// Replies longer than this are refused without being read further.
    max_response_bytes: usize,
    /// XML (documented) or JSON, for requests and replies alike.
    format: WireFormat,
}

/// A controller call that did not produce a reply we can trust.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The connection could not be made, twice: nothing was sent.
    #[error("cannot connect to the controller: {}", error_chain(.0))]
    Unreachable(#[source] reqwest::Error),
    /// The connection failed after the request may have been sent.
    #[error("the connection to the controller failed: {}", error_chain(.0))]
    ConnectionLost(#[source] reqwest::Error),
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
    pub(crate) fn new(config: &GatewayConfig) -> Result<Self, reqwest::Error> {
        let client = config
            .upstream_tls
            .apply(reqwest::Client::builder())
            .user_agent(concat!("taskgate/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // A redirect would replay a POST somewhere we were not pointed at.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Upstream {
            client,
            url: config.upstream_url.clone(),
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
        let body = Bytes::from(self.format.encode_method_call(method_call));
        tokio::time::timeout(time_limit, self.post(body, request_id))
            .await
            .map_err(|_| UpstreamError::Timeout { limit: time_limit })?
    }

    async fn post(&self, body: Bytes, request_id: &RequestId) -> Result<Reply, UpstreamError> {
        let response = match self.send(body.clone(), request_id).await {
            Err(error) if error.is_connect() => {
                tracing::debug!(cause = %error_chain(&error), "connect failed; trying once more");
                self.send(body, request_id).await
            }
            result => result,
        }
        .map_err(|error| {
            if error.is_connect() {
                UpstreamError::Unreachable(error)
            } else {
                UpstreamError::ConnectionLost(error)
            }
        })?;

        let status = response.status();
        let charset = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(codec::charset_of)
            .map(str::to_owned);
        let body = read_capped(response, self.max_response_bytes).await;
        if !status.is_success() {
            // A fault is the controller's answer whatever status carries it; anything else under
            // a non-2xx status is not a reply we can act on.
            return match body.map(|body| self.format.decode_reply(&body, charset.as_deref())) {
                Ok(Ok(Reply::Fault(code))) => Ok(Reply::Fault(code)),
                _ => Err(UpstreamError::HttpStatus { status }),
            };
        }
        self.format
            .decode_reply(&body?, charset.as_deref())
            .map_err(UpstreamError::BadResponse)
    }

    async fn send(
        &self,
        body: Bytes,
        request_id: &RequestId,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.client
            .post(self.url.clone())
            .header(request_id::HEADER, request_id.header_value().clone())
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static(self.format.content_type()),
            )
            .header(ACCEPT, HeaderValue::from_static(self.format.accept()))
            .body(body)
            .send()
            .await
    }
}

/// Reads the body chunk by chunk and stops as soon as it passes `limit`, so a huge or endless
/// reply never costs more than `limit` bytes of memory.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, UpstreamError> {
    let too_large = UpstreamError::ResponseTooLarge { limit };
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(UpstreamError::ConnectionLost)?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error and its causes on one line, for messages: reqwest's and the TLS libraries' own
/// messages alone ("error sending request") do not say what went wrong.
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
