//! Request IDs: a tower layer that takes the caller's `x-request-id` (or makes one), puts it in the
//! request's extensions and in a tracing span around the whole call, and returns it in the
//! response metadata, on errors too.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument as _;

/// The header carrying the request ID, both ways and towards the controller.
pub(crate) const HEADER: &str = crate::proto::REQUEST_ID_HEADER;

/// [`HEADER`] as a header name, made once: a `&str` name is parsed and checked on every use.
const HEADER_NAME: HeaderName = HeaderName::from_static(HEADER);

/// The longest caller-supplied ID we keep; a longer one is replaced, not truncated, so that two
/// different IDs never end up the same.
const MAX_LEN: usize = 128;

/// One call's request ID: the caller's, when it is printable ASCII of at most 128 bytes, or a
/// fresh UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestId(HeaderValue);

/// Adds [`RequestId`] handling to a service.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RequestIdLayer;

/// The service [`RequestIdLayer`] wraps around another.
#[derive(Debug, Clone)]
pub(crate) struct RequestIdService<S> {
    inner: S,
}

// === impl RequestId ===

impl RequestId {
    /// Keeps `caller`'s ID when it is usable, else makes a new one.
    pub(crate) fn from_caller(caller: Option<&HeaderValue>) -> Self {
        match caller {
            Some(value) if is_usable(value.as_bytes()) => RequestId(value.clone()),
            _ => RequestId::new(),
        }
    }

    /// A fresh random ID.
    pub(crate) fn new() -> Self {
        let mut text = [0_u8; uuid::fmt::Hyphenated::LENGTH];
        // Written straight into a buffer: `to_string` would go through `core::fmt`.
        let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        // A UUID's text is ASCII hex and dashes, always a valid header value.
        RequestId(HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("invalid")))
    }

    /// The ID as a header value.
    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// The ID as text.
    pub(crate) fn as_str(&self) -> &str {
        // Only printable ASCII is ever stored, so this cannot fail.
        self.0.to_str().unwrap_or_default()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

fn is_usable(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(|byte| byte.is_ascii_graphic())
}

// === impl RequestIdLayer ===

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

// === impl RequestIdService ===

impl<S, B, ResponseBody> Service<Request<B>> for RequestIdService<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let request_id = RequestId::from_caller(request.headers().get(&HEADER_NAME));
        // Services read the ID from the extensions; the caller's header, if any, stays as sent.
        request.extensions_mut().insert(request_id.clone());
        let span =
            tracing::info_span!("call", request_id = %request_id, path = %request.uri().path());
        // The clone that was made ready is the one to call; keep a fresh clone for next time.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let mut response = inner.call(request).await?;
                // A fresh ID in every response would churn HPACK's dynamic table for nothing: no
                // later response repeats it. Marked sensitive, it is sent as a literal never
                // indexed, which is what h2 offers for a value that is never repeated.
                let mut value = request_id.header_value().clone();
                value.set_sensitive(true);
                response.headers_mut().insert(HEADER_NAME, value);
                Ok(response)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(caller: &str, kept: bool) {
        let value = HeaderValue::from_str(caller).unwrap();
        let request_id = RequestId::from_caller(Some(&value));
        assert_eq!(request_id.as_str() == caller, kept, "{caller:?}");
    }

    #[test]
    fn usable_caller_ids_are_kept_and_others_replaced() {
        check("abc-123", true);
        check(&"x".repeat(128), true);
        check(&"x".repeat(129), false);
        check("has space", false);
        check("", false);
        check("tab\there", false);
    }

    #[test]
    fn fresh_ids_are_uuids() {
        let request_id = RequestId::from_caller(None);
        assert_eq!(request_id.as_str().len(), 36);
        assert_ne!(request_id, RequestId::new());
    }
}
