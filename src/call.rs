//! One tower layer around every request, outside auth and the protocol checks, so a call refused
//! anywhere is seen like any other: its request ID (the caller's `x-request-id`, or a fresh one,
//! returned in the response), the tracing span around everything done for it, and, for the task
//! service's calls, the in-flight gauge, the metrics and the access line.
//!
//! The handler knows what only it can know (the port and bin, how the controller answered) and
//! leaves it in the request's [`CallScope`]; the layer reads it when the response is ready, or,
//! for a server-streaming RPC, when its stream ends: a stream's outcome is in its trailers. A
//! new RPC gets all of this by being in the proto: the methods come from the descriptor set.
//!
//! Trace context comes in here too ([`crate::otel`]). When spans are exported, each call also
//! gets a server span beside its log span, a child of the caller's `traceparent`, with the RPC
//! attributes of the semantic conventions and the call's facts; its ids go into the access line
//! and the latency histogram's exemplar. When they are not, a caller's valid `traceparent` is
//! only read: its trace id goes into the access line, and the call's future carries its context, which the
//! controller POST passes on unchanged. A call without one pays for one header lookup.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use hyper::body::{Frame, SizeHint};
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanId, TraceContextExt as _, TraceId};
use prost::Message as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::codegen::http::{HeaderMap, HeaderName, Request, Response};
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::AccessLog;
use crate::fault::FaultClass;
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
    /// Whether spans are exported, fixed when the layer is made.
    exporting: bool,
    /// The shutdown grace once it has run out, when the server cuts off what is left.
    grace_ran_out: watch::Receiver<Option<Duration>>,
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
    /// Counts calls in `metrics` and writes the access lines `access_log` asks for; a call
    /// dropped once `grace_ran_out` holds the shutdown grace is recorded as cut off by it.
    pub(crate) fn new(
        metrics: Metrics,
        access_log: AccessLog,
        grace_ran_out: watch::Receiver<Option<Duration>>,
    ) -> Self {
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
                exporting: crate::otel::exporting(),
                grace_ran_out,
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
        // At debug level: at info a call's lines (its access line, a refusal's warning) have
        // the request ID as a field of their own, and formatting this span's fields for every
        // call cost about half as much as the whole access line (docs/performance.md).
        let span = tracing::debug_span!(
            "call",
            request_id = %request_id,
            path = %PlainStr(request.uri().path())
        );
        let caller = crate::otel::caller_context(request.headers());
        let (otel_span, trace, caller) = if self.shared.exporting {
            let path = request.uri().path();
            let known = known_path(&self.shared, path);
            let (otel_span, trace) = server_span(&request, known, &request_id, caller, &span);
            (Some(otel_span), Some(trace), None)
        } else {
            let trace = caller.as_ref().map(|caller| {
                let span = caller.span();
                TraceIds {
                    trace_id: span.span_context().trace_id(),
                    span_id: None,
                    sampled: false,
                }
            });
            (None, trace, caller)
        };
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
        // A call to health or reflection, or to no method at all, still has its code on its span.
        let mut other_span = UnansweredSpan(method.is_none().then(|| otel_span.clone()).flatten());
        let mut unanswered = Unanswered(method.map(|method| {
            let notes = Arc::new(OnceLock::new());
            request.extensions_mut().insert(CallScope {
                request_id: request_id.clone(),
                notes: Arc::clone(&notes),
            });
            let peer = request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr);
            let server_span = otel_span.clone();
            // Only a streaming call keeps its log span past its future.
            let stream_span = shared.methods[method].streaming.then(|| span.clone());
            Finish {
                _in_flight: shared.metrics.call_started(),
                shared,
                method,
                notes,
                started,
                request_id,
                peer,
                trace,
                server_span,
                stream_span,
            }
        }));
        // The clone that was made ready is the one to call; keep a fresh clone for next time.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Taken in as they are: rebound inside, each would be held twice.
        let future = async move {
            let response = inner.call(request).await;
            let finish = unanswered.0.take();
            let mut response = response?;
            if let Some(mut finish) = finish {
                let status = status_in(response.headers());
                // A stream that started ends later, with its trailers; an error ends it now.
                if finish.streaming() && status.is_none() {
                    // The stream ends outside this future: its lines keep the call's span, and
                    // its server span ends with it.
                    let server_span = finish.server_span.clone();
                    let span = finish
                        .stream_span
                        .take()
                        .unwrap_or_else(tracing::Span::current);
                    response = response.map(|body| {
                        tonic::body::Body::new(StreamBody {
                            inner: body,
                            finish: Some(finish),
                            span,
                            server_span,
                        })
                    });
                } else {
                    finish.finished(status);
                }
            } else if let Some(span) = other_span.0.take() {
                match status_in(response.headers()) {
                    Some(status) => record_status(&span, Some(&status), false),
                    None => {
                        response = response.map(|body| {
                            tonic::body::Body::new(StatusBody {
                                inner: body,
                                span: Some(span),
                            })
                        });
                    }
                }
            }
            response.headers_mut().insert(REQUEST_ID, value);
            Ok(response)
        };
        // Without export, the caller's context rides with the call for the controller POST;
        // exported, the server span's own context is current whenever it is entered.
        let future = match (otel_span, caller) {
            (None, None) => Either::Left(future.instrument(span)),
            (None, Some(caller)) => {
                Either::Right(Either::Left(future.instrument(span).with_context(caller)))
            }
            (Some(otel_span), _) => {
                Either::Right(Either::Right(future.instrument(otel_span).instrument(span)))
            }
        };
        Box::pin(future)
    }
}

/// A call's server span, under `caller`'s context when the caller sent one, and the ids the
/// access line and the exemplar name it by. It is a span of its own beside the call's log span
/// (`parent`), for the OpenTelemetry layer alone (`otel::SPAN_TARGET`): its attributes are not
/// log fields.
fn server_span<B>(
    request: &Request<B>,
    known: Option<&str>,
    request_id: &RequestId,
    caller: Option<opentelemetry::Context>,
    parent: &tracing::Span,
) -> (tracing::Span, TraceIds) {
    let (name, service, method) = rpc_name(known);
    let connection = request.extensions().get::<TcpConnectInfo>();
    let local = connection.and_then(TcpConnectInfo::local_addr);
    let peer = connection.and_then(TcpConnectInfo::remote_addr);
    let empty = tracing::field::Empty;
    let span = tracing::info_span!(
        target: crate::otel::SPAN_TARGET,
        parent: parent,
        "server",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        server.address = local.map(|local| tracing::field::display(local.ip())),
        server.port = local.map(|local| i64::from(local.port())),
        client.address = peer.map(|peer| tracing::field::display(peer.ip())),
        client.port = peer.map(|peer| i64::from(peer.port())),
        taskgate.request_id = %request_id,
        rpc.grpc.status_code = empty,
        taskgate.port_id = empty,
        taskgate.bin_id = empty,
        taskgate.fault.code = empty,
        taskgate.fault.name = empty,
        taskgate.upstream_error = empty,
        taskgate.watch.events = empty,
        taskgate.watch.end = empty,
        error.type = empty,
        otel.status_code = empty,
        otel.status_description = empty,
    );
    if let Some(caller) = caller {
        let _ = span.set_parent(caller);
    }
    let context = span.context();
    let otel_span = context.span();
    let span_context = otel_span.span_context();
    let trace = TraceIds {
        trace_id: span_context.trace_id(),
        span_id: Some(span_context.span_id()),
        sampled: span_context.is_sampled(),
    };
    (span, trace)
}

/// The paths of the services beside the task service, whose spans are named after their
/// method like the task service's.
const OTHER_SERVICE_PATHS: [&str; 4] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// `path`, when it names a method the gateway serves: a span is named only after one of those,
/// so that a scanner's paths do not make a new span name each.
fn known_path<'a>(shared: &Shared, path: &'a str) -> Option<&'a str> {
    let known = shared.methods.iter().any(|method| method.path == path)
        || OTHER_SERVICE_PATHS.contains(&path);
    known.then_some(path)
}

/// The span name, `rpc.service` and `rpc.method` of a call to `known`, a path the gateway
/// serves: `taskgate.v1.TaskService/CaseExtract`, `taskgate.v1.TaskService`, `CaseExtract`;
/// for any other path, `_OTHER` and no service, borrowed from RPC conventions later than the
/// schema the spans name (1.27 leaves an unknown method to the instrumentation).
fn rpc_name(known: Option<&str>) -> (&str, Option<&str>, &str) {
    let named = known.and_then(|path| {
        let name = path.strip_prefix('/')?;
        let (service, method) = name.split_once('/')?;
        Some((name, Some(service), method))
    });
    named.unwrap_or((OTHER, None, OTHER))
}

/// The RPC conventions' name for a method the server does not know.
const OTHER: &str = "_OTHER";

/// The ids that tie a call's log line and metrics to its trace.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TraceIds {
    /// The trace: the caller's, or a new one when the call started it.
    pub(crate) trace_id: TraceId,
    /// The gateway's server span, when spans are exported.
    pub(crate) span_id: Option<SpanId>,
    /// Whether the trace is exported, so an exemplar can point at it.
    pub(crate) sampled: bool,
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
    /// The trace the call is part of, when spans are exported or the caller named one.
    trace: Option<TraceIds>,
    /// The server span, when spans are exported: it gets the call's facts when it ends.
    server_span: Option<tracing::Span>,
    /// The call's log span, for a server-streaming call, whose stream ends outside its future.
    stream_span: Option<tracing::Span>,
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
            let cut_off = finish.shared.grace_ran_out.borrow().is_some();
            let why = if cut_off {
                "cut off when the shutdown grace ran out, before the reply"
            } else {
                "the caller went away before the reply"
            };
            finish.finished(Some(tonic::Status::cancelled(why)));
        }
    }
}

/// The server span of a call to health, reflection or no method at all, until its response
/// has begun: dropped before then, the span still gets its code, `CANCELLED`.
struct UnansweredSpan(Option<tracing::Span>);

impl Drop for UnansweredSpan {
    fn drop(&mut self) {
        if let Some(span) = self.0.take() {
            let cancelled = tonic::Status::cancelled("the caller went away before the reply");
            record_status(&span, Some(&cancelled), false);
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
        if let Some(span) = &self.server_span {
            record_outcome(span, &notes, status.as_ref());
        }
        let shared = &self.shared;
        let code = status.as_ref().map_or(tonic::Code::Ok, tonic::Status::code);
        let total_time = self.started.elapsed();
        if let Some(upstream_time) = notes.upstream_time {
            method.metrics.upstream_finished(upstream_time);
        }
        if let Some(fault_code) = notes.fault_code {
            shared.metrics.fault(method.name, fault_code);
        }
        if let Some(kind) = notes.upstream_error {
            shared.metrics.upstream_error(kind);
        }
        if shared.access_log.records(code) {
            let access = AccessRecord {
                method: method.name,
                notes: &notes,
                code,
                total_time,
                request_id: &self.request_id,
                peer: self.peer,
                trace: self.trace,
            };
            access.log(status.as_ref().map(tonic::Status::message));
        }
        // Only a trace that is exported is worth pointing at.
        let exemplar = self
            .trace
            .filter(|trace| trace.sampled)
            .and_then(|trace| Some((trace.trace_id, trace.span_id?)));
        method.metrics.call_finished(code, total_time, exemplar);
    }
}

/// The body of a server-streaming response, which reports its call when the stream ends: with
/// the status in its trailers, or CANCELLED when it is dropped before them (the caller went
/// away, or stopped reading and its stream was reset: `connection::end_stream_when`).
struct StreamBody {
    inner: tonic::body::Body,
    finish: Option<Finish>,
    /// The call's log span.
    span: tracing::Span,
    /// The call's server span, when spans are exported: entered as the stream ends, so that it
    /// ends then too.
    server_span: Option<tracing::Span>,
}

impl hyper::body::Body for StreamBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(context);
        if let Some(status) = stream_end(&polled)
            && let Some(finish) = self.finish.take()
        {
            let _entered = self.span.enter();
            let _traced = self.server_span.as_ref().map(tracing::Span::enter);
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
            let _traced = self.server_span.as_ref().map(tracing::Span::enter);
            finish.finished(Some(tonic::Status::cancelled(
                "the stream ended before its status: the caller went away, or stopped reading",
            )));
        }
    }
}

/// Whether a polled response body has ended, and how: `Some(status)` once its trailers, an error
/// or its end came (`None` inside when it ended without trailers: nothing said it failed), `None`
/// while it goes on.
fn stream_end(
    polled: &Poll<Option<Result<Frame<Bytes>, tonic::Status>>>,
) -> Option<Option<tonic::Status>> {
    match polled {
        Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(status_in),
        Poll::Ready(Some(Err(status))) => Some(Some(status.clone())),
        Poll::Ready(None) => Some(None),
        Poll::Pending => None,
    }
}

/// The body of a response to a call outside the task service (health, reflection, an unknown
/// method) that did not end in its headers: its server span gets the code in its trailers, and
/// ends with it.
struct StatusBody {
    inner: tonic::body::Body,
    /// Until the code is recorded.
    span: Option<tracing::Span>,
}

impl hyper::body::Body for StatusBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(context);
        if let Some(status) = stream_end(&polled)
            && let Some(span) = self.span.take()
        {
            record_status(&span, status.as_ref(), false);
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

impl Drop for StatusBody {
    fn drop(&mut self) {
        if let Some(span) = self.span.take() {
            let cancelled = tonic::Status::cancelled("the stream ended before its status");
            record_status(&span, Some(&cancelled), false);
        }
    }
}

/// Puts what the call came to on its server span: the gRPC code, the port, bin and fault, and
/// an error status for a fault or a server-side failure. The RPC conventions leave a server
/// span's status unset for the codes that blame the caller; a fault is the controller's answer,
/// so a call that met one is marked failed whatever its code.
fn record_outcome(span: &tracing::Span, notes: &CallNotes, status: Option<&tonic::Status>) {
    record_status(span, status, notes.fault_code.is_some());
    // As signed integers: tracing-opentelemetry records unsigned ones as text.
    span.record("taskgate.port_id", notes.port_id.map(i64::from));
    span.record("taskgate.bin_id", notes.bin_id.map(i64::from));
    if let Some(fault_code) = notes.fault_code {
        let name = match crate::fault::classify(fault_code) {
            FaultClass::Known(fault) => fault.name,
            FaultClass::Unknown(_) => "unknown",
            FaultClass::OutOfRange(_) => "out_of_range",
        };
        span.record("taskgate.fault.code", i64::from(fault_code));
        span.record("taskgate.fault.name", name);
    }
    span.record("taskgate.upstream_error", notes.upstream_error);
}

/// Puts a call's gRPC code on its server span, with an error status for the codes that blame
/// the server, or for any code when the call `failed` for another reason (a fault).
fn record_status(span: &tracing::Span, status: Option<&tonic::Status>, failed: bool) {
    let code = status.map_or(tonic::Code::Ok, tonic::Status::code);
    span.record("rpc.grpc.status_code", i32::from(code));
    let server_failure = matches!(
        code,
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    );
    if let Some(status) = status
        && (server_failure || failed)
    {
        span.record("error.type", crate::fault::grpc_code_name(code));
        span.record("otel.status_code", "error");
        span.record("otel.status_description", status.message());
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
    trace: Option<TraceIds>,
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
            trace_id = self.trace.map(|trace| tracing::field::display(trace.trace_id)),
            span_id = self
                .trace
                .and_then(|trace| trace.span_id)
                .map(tracing::field::display),
            idempotency_key = self.notes.idempotency_key.map(tracing::field::display),
            replayed = self.notes.replayed,
            peer = self.peer.map(tracing::field::display),
            error = error_message,
            "call"
        );
    }
}

/// Milliseconds to the microsecond: `5.902`, where the nanoseconds would print as
/// `5.902997999999999`, digits no reader needs from a clock of this precision.
fn milliseconds(duration: Duration) -> f64 {
    // Prints the microseconds' own digits for any duration under 31 years: the quotient is
    // correctly rounded, and printed as the shortest decimal that reads back to it.
    duration.as_micros() as f64 / 1000.0
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

    /// A span is named after a method the gateway serves, and anything else is `_OTHER`: a
    /// scanner's paths cannot make span names without bound.
    #[test]
    fn spans_are_named_after_known_methods_only() {
        let layer = CallLayer::new(Metrics::new(), AccessLog::default(), watch::channel(None).1);
        let named = |path| rpc_name(known_path(&layer.shared, path));
        assert_eq!(
            named("/taskgate.v1.TaskService/CaseExtract"),
            (
                "taskgate.v1.TaskService/CaseExtract",
                Some("taskgate.v1.TaskService"),
                "CaseExtract"
            )
        );
        assert_eq!(
            named("/grpc.health.v1.Health/Check"),
            (
                "grpc.health.v1.Health/Check",
                Some("grpc.health.v1.Health"),
                "Check"
            )
        );
        for unknown in [
            "/taskgate.v1.TaskService/Nope",
            "/wp-login.php",
            "/",
            "/a/b/c",
        ] {
            assert_eq!(named(unknown), ("_OTHER", None, "_OTHER"), "{unknown}");
        }
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
        let total_time = Duration::from_nanos(2_281_640);
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
                     fault_code=1148 upstream_ms=2.226 total_ms=2.281 request_id={id} \
                     trace_id=0af7651916cd43dd8448eb211c80319c span_id=b7ad6b7169203331 \
                     idempotency_key=01234567-89ab-cdef-0123-456789abcdef replayed=\"stored\" \
                     peer=127.0.0.1:4711 error=\"port 4 is busy\""
                ),
                serde_json::json!({
                    "message": "call", "method": "case_extract", "port_id": 4, "bin_id": 4007,
                    "grpc_code": "UNAVAILABLE", "fault_code": 1148, "upstream_ms": 2.226,
                    "total_ms": 2.281, "request_id": id,
                    "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331",
                    "idempotency_key": "01234567-89ab-cdef-0123-456789abcdef",
                    "replayed": "stored", "peer": "127.0.0.1:4711",
                    "error": "port 4 is busy",
                }),
                Some(TraceIds {
                    trace_id: TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
                    span_id: Some(SpanId::from_hex("b7ad6b7169203331").unwrap()),
                    sampled: true,
                }),
            ),
            (
                &refused,
                tonic::Code::Unauthenticated,
                None,
                Some("bad \"token\"\n"),
                format!(
                    "method=\"case_extract\" grpc_code=\"UNAUTHENTICATED\" total_ms=2.281 \
                     request_id={id} error=\"bad \\\"token\\\"\\n\""
                ),
                serde_json::json!({
                    "message": "call", "method": "case_extract", "grpc_code": "UNAUTHENTICATED",
                    "total_ms": 2.281, "request_id": id, "error": "bad \"token\"\n",
                }),
                None,
            ),
        ];
        for (notes, code, peer, error, text_fields, json_fields, trace) in records {
            let record = AccessRecord {
                method: "case_extract",
                notes,
                code,
                total_time,
                request_id: &request_id,
                peer: peer.map(|peer| peer.parse().unwrap()),
                trace,
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
