//! Span export off the call path: a span that ends is put in a bounded queue without waiting
//! (or dropped and counted when the queue is full), and a task of its own sends the queue to
//! the collector in batches.
//!
//! The SDK's `BatchSpanProcessor` does the same on a thread of its own, but keeps its drop count
//! to itself; this one counts what it drops for `/metrics`, never retries (a retry holds the
//! queue while new spans are dropped), and logs the collector's failures at most once a minute.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::Context;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{
    Protocol, RetryPolicy, SpanExporter, WithExportConfig as _, WithHttpConfig as _,
    WithTonicConfig as _,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter as _, SpanProcessor};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::ClientTlsConfig;
use url::Url;

use super::OtlpProtocol;

/// How many ended spans may wait for export: about a second of a busy gateway's calls (two
/// spans each). A queued span is a `SpanData` (352 bytes) and its attributes (56 bytes each,
/// in a vector with room to spare, plus their text): about 1.5 KiB for a server span's fifteen
/// or so, under 1 KiB for a client span's eight; so 8 to 12 MiB when full, more only with long
/// request ids or fault messages.
const QUEUE_SPANS: usize = 8192;

/// The most spans sent in one export request.
const MAX_BATCH: usize = 512;

/// How long the first span of a batch waits for others before the batch is sent.
const BATCH_DELAY: Duration = Duration::from_secs(1);

/// How long one export may take before its spans are given up on. A collector that takes
/// longer fills the queue meanwhile, and new spans are dropped; calls are not slowed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one log line a minute about a failing collector, with the count of failures since.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Spans dropped because the queue was full.
static DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);

/// Spans that ended after export stopped, at shutdown.
static DROPPED_AFTER_SHUTDOWN: AtomicU64 = AtomicU64::new(0);

/// Spans dropped because the collector did not take them.
static DROPPED_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);

/// Spans still queued or being sent when the shutdown grace ran out.
static DROPPED_UNSENT_AT_EXIT: AtomicU64 = AtomicU64::new(0);

/// Spans the queue took that are not yet exported nor counted as dropped: what is lost, and
/// counted, when the export task is stopped before it sends them. Signed: a span that ends while
/// the count is taken at exit may take its own back from zero.
static PENDING: AtomicI64 = AtomicI64::new(0);

/// What stops the export task, once it runs.
static CONTROL: Mutex<Option<Control>> = Mutex::new(None);

#[derive(Debug)]
struct Control {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The collector's failures, logged at most once per [`ERROR_LOG_INTERVAL`].
#[derive(Debug, Default)]
struct Failures {
    last_logged: Option<Instant>,
    /// Failures since the last line that were not logged.
    suppressed: u64,
    /// Whether a failure was logged since the last recovery was: a recovery is logged only
    /// then, so a flapping collector makes two lines a minute at most.
    warned: bool,
}

impl Failures {
    /// Notes an export that succeeded: `Some(suppressed)` when it is the first since a logged
    /// failure, which is worth a line of its own.
    fn recovered(&mut self) -> Option<u64> {
        std::mem::take(&mut self.warned).then(|| std::mem::take(&mut self.suppressed))
    }

    /// `Some(suppressed)` when a failure may be logged now, else counts it as suppressed.
    fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(last) if now.duration_since(last) < ERROR_LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                self.warned = true;
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// The span processor that queues ended spans for the export task.
#[derive(Debug)]
pub(super) struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
}

/// Spans that never reached the collector, by why: `queue_full`, `after_shutdown`,
/// `export_failed` and `unsent_at_exit`.
pub(crate) fn dropped_spans() -> [(&'static str, u64); 4] {
    [
        ("queue_full", DROPPED_QUEUE_FULL.load(Ordering::Relaxed)),
        (
            "after_shutdown",
            DROPPED_AFTER_SHUTDOWN.load(Ordering::Relaxed),
        ),
        (
            "export_failed",
            DROPPED_EXPORT_FAILED.load(Ordering::Relaxed),
        ),
        (
            "unsent_at_exit",
            DROPPED_UNSENT_AT_EXIT.load(Ordering::Relaxed),
        ),
    ]
}

/// The cause of the last HTTP request the exporter's client failed to complete, which the
/// exporter itself reports only as "network error".
type LastCause = Arc<Mutex<Option<String>>>;

/// Where the export task sends batches, and what names its failures.
#[derive(Debug)]
pub(super) struct Collector {
    exporter: SpanExporter,
    /// The collector's endpoint, for log lines.
    endpoint: String,
    /// The HTTP client's last transport failure, over OTLP/HTTP.
    last_cause: Option<LastCause>,
}

impl Collector {
    /// What an export's failure says: [`cause`], and over HTTP the transport's own cause that
    /// the exporter left out.
    fn cause(&self, error: OTelSdkError) -> String {
        let cause = cause(error);
        let transport = self.last_cause.as_ref().and_then(|last| {
            last.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        });
        match transport {
            Some(transport) => format!("{cause}: {transport}"),
            None => cause,
        }
    }
}

/// reqwest as the OTLP/HTTP exporter's client, keeping the cause of a request that failed.
#[derive(Debug)]
struct KeepingCause {
    client: reqwest::Client,
    last_cause: LastCause,
}

#[async_trait::async_trait]
impl HttpClient for KeepingCause {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let sent = self.client.send_bytes(request).await;
        if let Err(error) = &sent {
            *self
                .last_cause
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(crate::error_chain::error_chain(&**error));
        }
        sent
    }
}

/// The OTLP exporter for `endpoint` in `protocol` (over TLS trusting the system's roots for an
/// `https://` one), sending `resource` with every batch, and where an HTTP one keeps the cause of
/// its last transport failure; it connects when the first batch is sent, and reads
/// `OTEL_EXPORTER_OTLP_HEADERS` itself. Fails with what is wrong.
pub(super) fn collector(
    endpoint: &Url,
    protocol: OtlpProtocol,
    resource: &Resource,
) -> Result<Collector, String> {
    let mut last_cause = None;
    let mut exporter = match protocol {
        OtlpProtocol::Grpc => {
            let mut builder = SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.as_str());
            if endpoint.scheme() == "https" {
                // Left alone, the exporter would trust no root at all.
                builder = builder.with_tls_config(ClientTlsConfig::new().with_native_roots());
            }
            builder
                .with_timeout(EXPORT_TIMEOUT)
                .with_retry_policy(RetryPolicy::disabled())
                .build()
        }
        OtlpProtocol::HttpProtobuf => {
            // As the controller's client: no proxy from the environment, no redirect.
            let client = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|error| format!("cannot build its HTTP client: {error}"))?;
            let kept = LastCause::default();
            last_cause = Some(Arc::clone(&kept));
            SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint.as_str())
                .with_protocol(Protocol::HttpBinary)
                .with_http_client(KeepingCause {
                    client,
                    last_cause: kept,
                })
                .with_timeout(EXPORT_TIMEOUT)
                .with_retry_policy(RetryPolicy::disabled())
                .build()
        }
    }
    .map_err(|error| error.to_string())?;
    // Given here: the provider hands it to its processors, and this one's exporter has moved
    // to the export task by then.
    exporter.set_resource(resource);
    Ok(Collector {
        exporter,
        endpoint: endpoint.to_string(),
        last_cause,
    })
}

/// Sends what is queued, waiting at most `within`, and stops the export task; what it could
/// not send by then is counted as `unsent_at_exit`.
pub(super) async fn flush(within: Duration) {
    let control = CONTROL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let Some(Control { stop, mut task }) = control else {
        return;
    };
    let _ = stop.send(true);
    if tokio::time::timeout(within, &mut task).await.is_err() {
        task.abort();
        // Aborted, the task has dropped its queue and batch by the time it is awaited.
        let _ = task.await;
        let unsent = u64::try_from(PENDING.swap(0, Ordering::Relaxed)).unwrap_or(0);
        DROPPED_UNSENT_AT_EXIT.fetch_add(unsent, Ordering::Relaxed);
        tracing::warn!(
            target: super::LOG_TARGET,
            unsent,
            within = %humantime::format_duration(within),
            "spans were not all exported within what the shutdown grace left for them"
        );
    }
}

// === impl QueueProcessor ===

impl QueueProcessor {
    /// Starts the export task on the current runtime, sending to `collector`.
    pub(super) fn start(collector: Collector) -> QueueProcessor {
        let (queue, receiver) = mpsc::channel(QUEUE_SPANS);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(receiver, collector, stopped));
        *CONTROL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Control { stop, task });
        QueueProcessor { queue }
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _context: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        // Counted before it is queued, so the export task never takes away what is not yet
        // added.
        PENDING.fetch_add(1, Ordering::Relaxed);
        // Never waits: a full queue (or a stopped task) drops the span.
        let dropped = match self.queue.try_send(span) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => &DROPPED_QUEUE_FULL,
            Err(TrySendError::Closed(_)) => &DROPPED_AFTER_SHUTDOWN,
        };
        PENDING.fetch_sub(1, Ordering::Relaxed);
        dropped.fetch_add(1, Ordering::Relaxed);
    }

    // The task sends what is queued within a second; shutdown flushes through `flush`.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Sends batches of queued spans until stopped; then sends what is left and returns.
async fn run(
    mut queue: mpsc::Receiver<SpanData>,
    collector: Collector,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut failures = Failures::default();
    let mut stopping = false;
    while !stopping {
        tokio::select! {
            _ = stop.changed() => stopping = true,
            received = queue.recv_many(&mut batch, MAX_BATCH) => stopping = received == 0,
        }
        // The first span waits a little for others, so that a busy gateway sends few requests.
        let deadline = Instant::now() + BATCH_DELAY;
        while !stopping && batch.len() < MAX_BATCH {
            let room = MAX_BATCH - batch.len();
            tokio::select! {
                _ = stop.changed() => stopping = true,
                () = tokio::time::sleep_until(deadline) => break,
                received = queue.recv_many(&mut batch, room) => stopping = received == 0,
            }
        }
        if !batch.is_empty() {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
            send(&collector, full, &mut failures).await;
        }
    }
    // Stopping: what is still queued goes now, without waiting for more.
    queue.close();
    while let Ok(span) = queue.try_recv() {
        batch.push(span);
        if batch.len() == MAX_BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
            send(&collector, full, &mut failures).await;
        }
    }
    if !batch.is_empty() {
        send(&collector, batch, &mut failures).await;
    }
    let _ = collector.exporter.shutdown();
}

/// Exports one batch; its spans are counted as dropped if the collector does not take them.
async fn send(collector: &Collector, batch: Vec<SpanData>, failures: &mut Failures) {
    let endpoint = collector.endpoint.as_str();
    let spans = batch.len() as u64;
    let exported = tokio::time::timeout(EXPORT_TIMEOUT, collector.exporter.export(batch)).await;
    PENDING.fetch_sub(spans as i64, Ordering::Relaxed);
    let cause = match exported {
        Ok(Ok(())) => {
            if let Some(suppressed) = failures.recovered() {
                tracing::info!(
                    target: super::LOG_TARGET,
                    endpoint,
                    suppressed,
                    "exporting spans to the OTLP collector again (suppressed: failures since the last warning that were not logged)"
                );
            }
            return;
        }
        Ok(Err(error)) => collector.cause(error),
        Err(_) => format!(
            "the collector did not answer within {}",
            humantime::format_duration(EXPORT_TIMEOUT)
        ),
    };
    DROPPED_EXPORT_FAILED.fetch_add(spans, Ordering::Relaxed);
    if let Some(suppressed) = failures.ready(Instant::now()) {
        tracing::warn!(
            target: super::LOG_TARGET,
            endpoint,
            %cause,
            spans,
            suppressed,
            "cannot export spans to the OTLP collector; they are dropped and counted in taskgate_spans_dropped_total (logged once a minute)"
        );
    }
}

/// What an export failure says, once: without the SDK's "Operation failed" wrapping, and with a
/// cause tonic's layers repeat ("tcp connect error: tcp connect error: …") named once.
fn cause(error: OTelSdkError) -> String {
    let text = match error {
        OTelSdkError::InternalFailure(text) => text,
        other => other.to_string(),
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in text.split(": ") {
        if parts.last() != Some(&part) {
            parts.push(part);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_failure_names_its_cause_once() {
        let error = OTelSdkError::InternalFailure(
            "TonicTracesClient export failed with gRPC code: Unavailable: transport error: tcp \
             connect error: tcp connect error: Connection refused (os error 111)"
                .to_owned(),
        );
        assert_eq!(
            cause(error),
            "TonicTracesClient export failed with gRPC code: Unavailable: transport error: tcp \
             connect error: Connection refused (os error 111)"
        );
        assert_eq!(
            cause(OTelSdkError::AlreadyShutdown),
            "Shutdown already invoked"
        );
    }

    fn span_data() -> SpanData {
        use opentelemetry::trace::{
            SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(1),
                SpanId::from(1),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "span".into(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            end_time: std::time::SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    /// A span that finds the queue full is dropped and counted at once: ending a span never
    /// waits for the export task.
    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (queue, _receiver) = mpsc::channel(2);
        let processor = QueueProcessor { queue };
        let before = DROPPED_QUEUE_FULL.load(Ordering::Relaxed);
        for _ in 0..5 {
            processor.on_end(span_data());
        }
        assert_eq!(DROPPED_QUEUE_FULL.load(Ordering::Relaxed) - before, 3);
    }

    /// A span that ends once export has stopped, at shutdown, is counted as such. (Whether it
    /// is also counted as a full queue cannot be seen here: the test above adds to that count
    /// at the same time; only this test adds to this one.)
    #[test]
    fn a_span_ending_after_shutdown_is_counted_as_such() {
        let (queue, receiver) = mpsc::channel(2);
        drop(receiver);
        let processor = QueueProcessor { queue };
        let late = DROPPED_AFTER_SHUTDOWN.load(Ordering::Relaxed);
        processor.on_end(span_data());
        assert_eq!(DROPPED_AFTER_SHUTDOWN.load(Ordering::Relaxed) - late, 1);
    }

    /// The collector's failures are logged once per interval, with the count of those that
    /// were not, and its recovery once.
    #[test]
    fn failures_are_logged_once_a_minute_with_the_rest_counted() {
        let start = Instant::now();
        let mut failures = Failures::default();
        assert_eq!(failures.ready(start), Some(0));
        assert_eq!(failures.ready(start + Duration::from_secs(1)), None);
        assert_eq!(failures.ready(start + Duration::from_secs(59)), None);
        assert_eq!(failures.ready(start + Duration::from_secs(60)), Some(2));
        assert_eq!(failures.ready(start + Duration::from_secs(61)), None);
        // The first success after a logged failure says so, with the failures not logged;
        // a failure and recovery within the same minute again are not logged.
        assert_eq!(failures.recovered(), Some(1));
        assert_eq!(failures.recovered(), None);
        assert_eq!(failures.ready(start + Duration::from_secs(62)), None);
        assert_eq!(failures.recovered(), None);
        assert_eq!(failures.ready(start + Duration::from_secs(120)), Some(1));
    }
}
