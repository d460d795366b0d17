//! One tower layer around every request, outside auth and the protocol checks, so a call refused
//! anywhere is seen like any other: its request ID (the caller's `x-request-id`, or a fresh one,
//! returned in the response), the tracing span around everything done for it, and, for the task
//! service's calls, the in-flight gauge, the metrics and the access line.
//!
//! The handler knows what only it can know (the port and bin, how the controller answered) and
//! leaves it in the request's [`CallScope`]; the layer reads it when the response is ready, or,
//! for a server-streaming RPC, when its stream ends: a stream's outcome is in its trailers. A
//! new RPC gets all of this by being in the proto: the methods come from the descriptor set.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use prost::Message as _;
use tokio::time::Instant;
use tonic::codegen::http::{HeaderMap, HeaderName, Request, Response};
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::config::AccessLog;
use crate::metrics::{GaugeGuard, MethodMetrics, Metrics};
use crate::proto::task_service_server::SERVICE_NAME;
use crate::request_id::{self, RequestId};

/// [`request_id::HEADER`] as a header name, made once: a `&str` name is parsed and checked on
/// every use.
const REQUEST_ID: HeaderName = HeaderName::from_static(request_id::HEADER);

/// Where a gRPC response that ends at once (every error) carries its code.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The target of access lines, so they can be filtered on their own
/// (`RUST_LOG=taskgate::access=info`).
const ACCESS_TARGET: &str = "taskgate::access";

/// Adds [`CallService`] around a service.
#[derive(Debug, Clone)]
pub(crate) struct CallLayer {
    shared: Arc<Shared>,
}

/// The service [`CallLayer`] wraps around another.
#[derive(Debug, Clone)]
pub(crate) struct CallService<S> {
    inner: S,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    metrics: Metrics,
    access_log: AccessLog,
    /// The task service's methods, with their metrics series.
    methods: Vec<Method>,
}

/// One RPC of the task service.
#[derive(Debug)]
struct Method {
    /// `/taskgate.v1.TaskService/CaseExtract`.
    path: String,
    /// `case_extract`: the name in metrics and access lines.
    name: &'static str,
    /// Whether the server streams its response, so the call ends with the stream.
    streaming: bool,
    metrics: MethodMetrics,
}

/// What a task-service handler finds in its request's extensions: the call's request ID, and
/// where to leave what the access line and the metrics need from it.
#[derive(Debug, Clone)]
pub(crate) struct CallScope {
    /// The call's request ID.
    pub(crate) request_id: RequestId,
    notes: Arc<OnceLock<CallNotes>>,
}

/// What only the handler knows about a call.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallNotes {
    /// The port the call was for.
    pub(crate) port_id: Option<u32>,
    /// The bin the call was for.
    pub(crate) bin_id: Option<u32>,
    /// The fault code the controller answered, if it did.
    pub(crate) fault_code: Option<u32>,
    /// How long the controller took, when it was called.
    pub(crate) upstream_time: Option<Duration>,
    /// Why the controller's reply was unusable, as a fixed word, if it was.
    pub(crate) upstream_error: Option<&'static str>,
    /// The message's `request_id` field, the idempotency key, when the call sent one: not the
    /// call's `x-request-id`.
    pub(crate) idempotency_key: Option<uuid::Uuid>,
    /// How a repeat of an earlier call was answered without calling the controller again, as
    /// the `taskgate-replayed` header says it.
    pub(crate) replayed: Option<&'static str>,
}

// === impl CallLayer ===

impl CallLayer {
    /// Counts calls in `metrics` and writes the access lines `access_log` asks for.
    pub(crate) fn new(metrics: Metrics, access_log: AccessLog) -> Self {
        let methods = task_methods()
            .iter()
            .map(|method| Method {
                path: method.path.clone(),
                name: method.name,
                streaming: method.streaming,
                metrics: metrics.method(method.name),
            })
            .collect();
        CallLayer {
            shared: Arc::new(Shared {
                metrics,
                access_log,
                methods,
            }),
        }
    }
}

impl<S> Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// A task-service method as the descriptor set declares it.
#[derive(Debug, PartialEq, Eq)]
struct Declared {
    /// `/taskgate.v1.TaskService/CaseExtract`.
    path: String,
    /// `case_extract`.
    name: &'static str,
    /// Whether the server streams its response.
    streaming: bool,
}

/// The task service's methods, read once from the descriptor set that `build.rs` wrote, so that
/// a new RPC is counted and logged by being in the proto.
fn task_methods() -> &'static [Declared] {
    static METHODS: OnceLock<Vec<Declared>> = OnceLock::new();
    METHODS.get_or_init(|| {
        let Ok(files) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        else {
            return Vec::new();
        };
        let mut methods = Vec::new();
        for file in &files.file {
            for service in &file.service {
                if format!("{}.{}", file.package(), service.name()) != SERVICE_NAME {
                    continue;
                }
                for method in &service.method {
                    // Once per process, for a handful of names.
                    let name: &'static str = Box::leak(snake_case(method.name()).into_boxed_str());
                    methods.push(Declared {
                        path: format!("/{SERVICE_NAME}/{}", method.name()),
                        name,
                        streaming: method.server_streaming(),
                    });
                }
            }
        }
        methods
    })
}

/// `CaseGetState` → `case_get_state`.
fn snake_case(name: &str) -> String {
    let mut snake = String::with_capacity(name.len() + 4);
    for (index, character) in name.chars().enumerate() {
        if character.is_ascii_uppercase() {
            if index > 0 {
                snake.push('_');
            }
            snake.push(character.to_ascii_lowercase());
        } else {
            snake.push(character);
        }
    }
    snake
}

// === impl CallService ===

impl<S, B> Service<Request<B>> for CallService<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
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
        let started = Instant::now();
        let request_id = RequestId::from_caller(request.headers().get(&REQUEST_ID));
        let span = tracing::info_span!(
            "call",
            request_id = %request_id,
            path = %PlainStr(request.uri().path())
        );
        let shared = Arc::clone(&self.shared);
        let method = shared
            .methods
            .iter()
            .position(|method| method.path == request.uri().path());
        // A fresh ID in every response would churn HPACK's dynamic table for nothing: no later
        // response repeats it. Marked sensitive, it is sent as a literal never indexed, which is
        // what h2 offers for a value that is never repeated.
        let mut value = request_id.header_value().clone();
        value.set_sensitive(true);
        let unanswered = Unanswered(method.map(|method| {
            let notes = Arc::new(OnceLock::new());
            request.extensions_mut().insert(CallScope {
                request_id: request_id.clone(),
                notes: Arc::clone(&notes),
            });
            let peer = request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr);
            Finish {
                _in_flight: shared.metrics.call_started(),
                shared,
                method,
                notes,
                started,
                request_id,
                peer,
            }
        }));
        // The clone that was made ready is the one to call; keep a fresh clone for next time.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let mut unanswered = unanswered;
                let response = inner.call(request).await;
                let finish = unanswered.0.take();
                let mut response = response?;
                if let Some(finish) = finish {
                    let status = status_in(response.headers());
                    // A stream that started ends later, with its trailers; an error ends it now.
                    if finish.streaming() && status.is_none() {
                        // The stream ends outside this future: its lines keep the call's span.
                        let span = tracing::Span::current();
                        response = response.map(|body| {
                            tonic::body::Body::new(StreamBody {
                                inner: body,
                                finish: Some(finish),
                                span,
                            })
                        });
                    } else {
                        finish.finished(status);
                    }
                }
                response.headers_mut().insert(REQUEST_ID, value);
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// A `&str` displayed with one write: `str`'s own `Display` pads to a width, which costs more.
struct PlainStr<'a>(&'a str);

impl std::fmt::Display for PlainStr<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.0)
    }
}

/// The status in a response's headers or trailers, if they carry one. An error ends a unary
/// response at once, its code in the headers; a success sends its code in the trailers, after
/// the message, and a stream ends with its code in the trailers.
fn status_in(headers: &HeaderMap) -> Option<tonic::Status> {
    headers
        .contains_key(&GRPC_STATUS)
        .then(|| tonic::Status::from_header_map(headers))
        .flatten()
}

/// What the layer needs to count a task-service call and write its access line once it ends.
struct Finish {
    shared: Arc<Shared>,
    /// Its index in `shared.methods`.
    method: usize,
    notes: Arc<OnceLock<CallNotes>>,
    started: Instant,
    request_id: RequestId,
    peer: Option<SocketAddr>,
    /// The call is in flight until this is dropped.
    _in_flight: GaugeGuard,
}

/// A task call's [`Finish`] until its response has begun: dropped before then (the caller went
/// away, or its deadline ended the call on this side), the call is still logged and counted,
/// as `CANCELLED`.
struct Unanswered(Option<Finish>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(finish) = self.0.take() {
            finish.finished(Some(tonic::Status::cancelled(
                "the caller went away before the reply",
            )));
        }
    }
}

impl Finish {
    fn streaming(&self) -> bool {
        self.shared.methods[self.method].streaming
    }

    /// Counts the call, which ended with `status` (`None`: OK), and writes its access line.
    fn finished(self, status: Option<tonic::Status>) {
        let notes = Arc::try_unwrap(self.notes)
            .map(OnceLock::into_inner)
            .unwrap_or_else(|notes| notes.get().cloned())
            .unwrap_or_default();
        let method = &self.shared.methods[self.method];
        self.shared.finished(
            method,
            &notes,
            status,
            self.started,
            &self.request_id,
            self.peer,
        );
    }
}

/// The body of a server-streaming response, which reports its call when the stream ends: with
/// the status in its trailers, or CANCELLED when it is dropped before them (the caller went
/// away, or stopped reading and its stream was reset: `connection::end_stream_when`).
struct StreamBody {
    inner: tonic::body::Body,
    finish: Option<Finish>,
    span: tracing::Span,
}

impl hyper::body::Body for StreamBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(context);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(status_in),
            Poll::Ready(Some(Err(status))) => Some(Some(status.clone())),
            // The end without trailers: nothing said it failed.
            Poll::Ready(None) => Some(None),
            Poll::Pending => None,
        };
        if let Some(status) = ended
            && let Some(finish) = self.finish.take()
        {
            let _entered = self.span.enter();
            finish.finished(status);
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

impl Drop for StreamBody {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            let _entered = self.span.enter();
            finish.finished(Some(tonic::Status::cancelled(
                "the stream ended before its status: the caller went away, or stopped reading",
            )));
        }
    }
}

// === impl Shared ===

impl Shared {
    /// Counts a task-service call that ended with `status` (`None`: OK) and writes its access
    /// line.
    fn finished(
        &self,
        method: &Method,
        notes: &CallNotes,
        status: Option<tonic::Status>,
        started: Instant,
        request_id: &RequestId,
        peer: Option<SocketAddr>,
    ) {
        let code = status.as_ref().map_or(tonic::Code::Ok, tonic::Status::code);
        let total_time = started.elapsed();
        if let Some(upstream_time) = notes.upstream_time {
            method.metrics.upstream_finished(upstream_time);
        }
        if let Some(fault_code) = notes.fault_code {
            self.metrics.fault(method.name, fault_code);
        }
        if let Some(kind) = notes.upstream_error {
            self.metrics.upstream_error(kind);
        }
        if self.access_log.records(code) {
            let access = AccessRecord {
                method: method.name,
                notes,
                code,
                total_time,
                request_id,
                peer,
            };
            access.log(status.as_ref().map(tonic::Status::message));
        }
        method.metrics.call_finished(code, total_time);
    }
}

// === impl CallScope ===

impl CallScope {
    /// Leaves what the handler learned for the access line and the metrics; the first notes
    /// left are kept.
    pub(crate) fn note(&self, notes: CallNotes) {
        let _ = self.notes.set(notes);
    }
}

impl Default for CallScope {
    /// For a handler called without the layer (in tests): a fresh ID, notes nobody reads.
    fn default() -> Self {
        CallScope {
            request_id: RequestId::new(),
            notes: Arc::default(),
        }
    }
}

/// What the access log records about one call.
struct AccessRecord<'a> {
    method: &'static str,
    notes: &'a CallNotes,
    code: tonic::Code,
    total_time: Duration,
    request_id: &'a RequestId,
    peer: Option<SocketAddr>,
}

impl AccessRecord<'_> {
    /// Logs the one access line of a call: a single event, so the fmt layer writes it in text
    /// and JSON alike.
    fn log(&self, error_message: Option<&str>) {
        tracing::info!(
            target: ACCESS_TARGET,
            method = self.method,
            port_id = self.notes.port_id,
            bin_id = self.notes.bin_id,
            grpc_code = crate::fault::grpc_code_name(self.code),
            fault_code = self.notes.fault_code,
            upstream_ms = self.notes.upstream_time.map(milliseconds),
            total_ms = milliseconds(self.total_time),
            request_id = %self.request_id,
            idempotency_key = self.notes.idempotency_key.map(tracing::field::display),
            replayed = self.notes.replayed,
            peer = self.peer.map(tracing::field::display),
            error = error_message,
            "call"
        );
    }
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogFormat;

    #[test]
    fn every_task_method_is_found_in_the_descriptor_set() {
        let methods = task_methods();
        let declared = |path: &str, name, streaming| Declared {
            path: format!("/taskgate.v1.TaskService/{path}"),
            name,
            streaming,
        };
        assert!(
            methods.contains(&declared("CaseExtract", "case_extract", false)),
            "{methods:?}"
        );
        assert!(
            methods.contains(&declared("WatchCaseEvents", "watch_case_events", true)),
            "{methods:?}"
        );
    }

    #[test]
    fn names_are_snake_case() {
        assert_eq!(snake_case("CaseExtract"), "case_extract");
        assert_eq!(snake_case("CaseGetState"), "case_get_state");
        assert_eq!(snake_case("Watch"), "watch");
    }

    /// The access line is one event with the same fields in both formats, in the order a reader
    /// expects, for each shape of record: a success with its upstream time and an IPv4 peer, and
    /// a call refused before its message was read, with no port, bin or peer and an error that
    /// needs escaping.
    #[test]
    fn the_access_line_has_its_fields_in_text_and_json() {
        let request_id = RequestId::new();
        let id = request_id.as_str();
        let total_time = Duration::from_micros(2_281);
        // The digits `Debug` writes, as the text format does; JSON compares the number itself.
        let total_ms = milliseconds(total_time);
        let upstream_ms = milliseconds(Duration::from_micros(2_226));
        let ok = CallNotes {
            port_id: Some(4),
            bin_id: Some(4007),
            fault_code: Some(1148),
            upstream_time: Some(Duration::from_micros(2_226)),
            upstream_error: None,
            idempotency_key: Some(uuid::Uuid::from_u128(
                0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
            )),
            replayed: Some("stored"),
        };
        let refused = CallNotes::default();
        let records = [
            (
                &ok,
                tonic::Code::Unavailable,
                Some("127.0.0.1:4711"),
                Some("port 4 is busy"),
                format!(
                    "method=\"case_extract\" port_id=4 bin_id=4007 grpc_code=\"UNAVAILABLE\" \
                     fault_code=1148 upstream_ms={upstream_ms:?} total_ms={total_ms:?} request_id={id} \
                     idempotency_key=01234567-89ab-cdef-0123-456789abcdef replayed=\"stored\" \
                     peer=127.0.0.1:4711 error=\"port 4 is busy\""
                ),
                serde_json::json!({
                    "message": "call", "method": "case_extract", "port_id": 4, "bin_id": 4007,
                    "grpc_code": "UNAVAILABLE", "fault_code": 1148, "upstream_ms": upstream_ms,
                    "total_ms": total_ms, "request_id": id,
                    "idempotency_key": "01234567-89ab-cdef-0123-456789abcdef",
                    "replayed": "stored", "peer": "127.0.0.1:4711",
                    "error": "port 4 is busy",
                }),
            ),
            (
                &refused,
                tonic::Code::Unauthenticated,
                None,
                Some("bad \"token\"\n"),
                format!(
                    "method=\"case_extract\" grpc_code=\"UNAUTHENTICATED\" total_ms={total_ms:?} \
                     request_id={id} error=\"bad \\\"token\\\"\\n\""
                ),
                serde_json::json!({
                    "message": "call", "method": "case_extract", "grpc_code": "UNAUTHENTICATED",
                    "total_ms": total_ms, "request_id": id, "error": "bad \"token\"\n",
                }),
            ),
        ];
        for (notes, code, peer, error, text_fields, json_fields) in records {
            let record = AccessRecord {
                method: "case_extract",
                notes,
                code,
                total_time,
                request_id: &request_id,
                peer: peer.map(|peer| peer.parse().unwrap()),
            };
            let text = crate::log::lines_for_test(LogFormat::Text, || record.log(error));
            assert_eq!(text.len(), 1, "{text:?}");
            let (_, after_time) = text[0].split_once(' ').unwrap();
            assert_eq!(
                after_time,
                format!(" INFO taskgate::access: call {text_fields}")
            );
            let json = crate::log::lines_for_test(LogFormat::Json, || record.log(error));
            assert_eq!(json.len(), 1, "{json:?}");
            let object: serde_json::Value = serde_json::from_str(&json[0]).unwrap();
            assert_eq!(object["level"], "INFO", "{object}");
            assert_eq!(object["target"], ACCESS_TARGET, "{object}");
            assert_eq!(object["fields"], json_fields, "{object}");
        }
    }
}
