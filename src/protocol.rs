//! gRPC protocol rules that tonic leaves unchecked, enforced by one tower layer in front of every
//! service, so no handler has to think about them:
//!
//! - a malformed `grpc-timeout` is refused with INVALID_ARGUMENT. tonic reads it as "no
//!   deadline", which would let a caller that meant to bound its call wait for as long as the
//!   gateway likes;
//! - a method that takes one request message refuses a second with INTERNAL, as grpc-java and
//!   grpc-go do. tonic reads the first and drops the rest, answering OK to a call that was not
//!   the one the caller meant.
//!
//! Both answers are made before any handler runs: tonic reads a unary call's whole body (to find
//! its trailers) before calling the handler, and the second message fails that read.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Either, Ready, ready as answer};
use hyper::body::Frame;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, HeaderName, Request, Response, Uri};
use tonic::server::NamedService;
use tower::{Layer, Service};

use crate::proto::task_service_server::SERVICE_NAME;

/// The header a caller's deadline travels in.
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// [`GRPC_TIMEOUT`] as a header name, made once: a `&str` name is parsed and checked on every
/// lookup.
pub(crate) const GRPC_TIMEOUT_NAME: HeaderName = HeaderName::from_static(GRPC_TIMEOUT);

/// The services every method of which takes exactly one request message (unary or server
/// streaming); reflection streams requests, so it is not here. A test checks the task service's
/// methods against the proto.
const ONE_MESSAGE_SERVICES: [&str; 2] = [
    SERVICE_NAME,
    <tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> as NamedService>::NAME,
];

/// Adds the checks to a service.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProtocolLayer;

/// The service [`ProtocolLayer`] wraps around another.
#[derive(Debug, Clone)]
pub(crate) struct ProtocolService<S> {
    inner: S,
}

// === impl ProtocolLayer ===

impl<S> Layer<S> for ProtocolLayer {
    type Service = ProtocolService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ProtocolService { inner }
    }
}

// === impl ProtocolService ===

impl<S, ResponseBody> Service<Request<Body>> for ProtocolService<S>
where
    S: Service<Request<Body>, Response = Response<ResponseBody>>,
    ResponseBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if let Err(status) = check_grpc_timeout(request.headers()) {
            tracing::debug!(message = status.message(), "refused a call");
            return Either::Left(answer(Ok(status.into_http())));
        }
        let request = if takes_one_message(request.uri().path()) {
            // A clone of the URI counts a reference; the path is only read for an error.
            let uri = request.uri().clone();
            request.map(|body| Body::new(OneMessage::new(body, uri)))
        } else {
            request
        };
        Either::Right(self.inner.call(request))
    }
}

/// Refuses a `grpc-timeout` that does not follow the spec.
fn check_grpc_timeout(headers: &HeaderMap) -> Result<(), Status> {
    match headers.get(&GRPC_TIMEOUT_NAME) {
        Some(value) if value.to_str().ok().and_then(parse_grpc_timeout).is_none() => Err(
            crate::status::malformed_grpc_timeout(&crate::codec::shown(value.as_bytes())),
        ),
        _ => Ok(()),
    }
}

/// Parses a `grpc-timeout` value. The gRPC over HTTP/2 spec: `TimeoutValue TimeoutUnit`, the
/// value "positive integer as ASCII string of at most 8 digits" and the unit one of `H`, `M`,
/// `S`, `m`, `u`, `n`. A value of 0 is taken as a deadline already past, as tonic and grpc-go
/// take it; a sign, a fraction, a ninth digit or another unit is malformed.
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at_checked(split)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Whether the method at `path` (`/package.Service/Method`) takes exactly one request message.
fn takes_one_message(path: &str) -> bool {
    ONE_MESSAGE_SERVICES.iter().any(|service| {
        path.strip_prefix('/')
            .and_then(|rest| rest.strip_prefix(service))
            .is_some_and(|method| method.starts_with('/'))
    })
}

/// A request body that passes through the first gRPC message and fails at the first byte of a
/// second one.
struct OneMessage {
    inner: Body,
    /// The request's URI, whose path names the method in the message.
    uri: Uri,
    framing: Framing,
}

/// Where the body is in gRPC's length-prefixed framing: a 5-byte header (a compression flag and
/// a big-endian length), then that many bytes of message.
#[derive(Debug, Default)]
struct Framing {
    /// Messages whose first byte has been seen.
    messages: u32,
    /// How much of the current header has been seen, 0 to 4.
    header_seen: usize,
    /// The current header's length bytes.
    length: [u8; 4],
    /// The bytes of the current message still to come.
    message_left: u64,
}

// === impl OneMessage ===

impl OneMessage {
    fn new(inner: Body, uri: Uri) -> Self {
        OneMessage {
            inner,
            uri,
            framing: Framing::default(),
        }
    }
}

impl hyper::body::Body for OneMessage {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(context));
        if let Some(data) = frame
            .as_ref()
            .and_then(|frame| frame.as_ref().ok()?.data_ref())
            && this.framing.feed(data) > 1
        {
            return Poll::Ready(Some(Err(crate::status::second_request_message(
                this.uri.path(),
            ))));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

// === impl Framing ===

impl Framing {
    /// Follows the framing through `data`; returns how many messages have begun so far.
    fn feed(&mut self, mut data: &[u8]) -> u32 {
        while let Some((&byte, rest)) = data.split_first() {
            if self.message_left > 0 {
                let skipped = data
                    .len()
                    .min(usize::try_from(self.message_left).unwrap_or(usize::MAX));
                self.message_left -= skipped as u64;
                data = &data[skipped..];
                continue;
            }
            match self.header_seen {
                0 => self.messages = self.messages.saturating_add(1),
                seen => self.length[seen - 1] = byte,
            }
            self.header_seen += 1;
            if self.header_seen == 5 {
                self.message_left = u64::from(u32::from_be_bytes(self.length));
                self.header_seen = 0;
            }
            data = rest;
        }
        self.messages
    }
}

#[cfg(test)]
mod tests {
    use tonic::codegen::http::HeaderValue;

    use super::*;
    use crate::codec::shown;

    #[test]
    fn grpc_timeout_values() {
        let check = |value: &str, expected: Option<Duration>| {
            assert_eq!(parse_grpc_timeout(value), expected, "{value}");
        };
        check("1S", Some(Duration::from_secs(1)));
        check("250m", Some(Duration::from_millis(250)));
        check("2H", Some(Duration::from_secs(7200)));
        check("3M", Some(Duration::from_secs(180)));
        check("99999999u", Some(Duration::from_micros(99_999_999)));
        check("99999999H", Some(Duration::from_secs(99_999_999 * 3600)));
        check("5n", Some(Duration::from_nanos(5)));
        check("0m", Some(Duration::ZERO));
        check("123456789S", None);
        check("S", None);
        check("", None);
        check("10", None);
        check("-5S", None);
        check("+5S", None);
        check("1.5S", None);
        check("abc", None);
        check("1x", None);
        check("1s", None);
        check("1é", None);
    }

    #[test]
    fn values_are_quoted_escaped_and_short() {
        let check = |value: &[u8], expected: &str| {
            assert_eq!(
                shown(HeaderValue::from_bytes(value).unwrap().as_bytes()),
                expected
            );
        };
        check(b"abc", "abc");
        check(b"1\xff", "1\\xff");
        check(&[b'9'; 40], &format!("{}…", "9".repeat(32)));
    }

    #[test]
    fn methods_that_take_one_message() {
        assert!(takes_one_message("/taskgate.v1.TaskService/CaseExtract"));
        assert!(takes_one_message("/grpc.health.v1.Health/Watch"));
        assert!(!takes_one_message(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!takes_one_message("/taskgate.v1.TaskServiceX/CaseExtract"));
        assert!(!takes_one_message("/taskgate.v1.TaskService"));
    }

    /// [`ONE_MESSAGE_SERVICES`] is only right while no task method streams its requests.
    #[test]
    fn no_task_method_streams_requests() {
        use prost::Message as _;
        let descriptors =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let methods: Vec<_> = descriptors
            .file
            .iter()
            .filter(|file| file.package() == "taskgate.v1")
            .flat_map(|file| &file.service)
            .flat_map(|service| &service.method)
            .collect();
        assert!(!methods.is_empty());
        for method in methods {
            assert!(!method.client_streaming(), "{}", method.name());
        }
    }

    #[test]
    fn framing_counts_messages_across_chunks() {
        let check = |chunks: &[&[u8]], expected: u32| {
            let mut framing = Framing::default();
            let counts: Vec<u32> = chunks.iter().map(|chunk| framing.feed(chunk)).collect();
            assert_eq!(counts.last().copied(), Some(expected), "{chunks:?}");
        };
        let message: &[u8] = &[0, 0, 0, 0, 2, 8, 4];
        check(&[message], 1);
        check(&[&message[..3], &message[3..]], 1);
        check(&[message, &[0]], 2);
        check(&[&[message, message].concat()], 2);
        check(&[&[0, 0, 0, 0, 0]], 1);
        check(&[&[0, 0, 0, 0, 0, 0]], 2);
        check(&[&[0, 0, 0, 1, 0], &[7; 200], &[7; 56]], 1);
        check(&[&[0, 0, 0, 1, 0], &[7; 256], &[0]], 2);
    }
}
