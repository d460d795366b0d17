//! Prometheus metrics: what the gateway counts, and the `/metrics` endpoint that exposes them.
//!
//! Every label has a small, fixed set of values: no port or bin ids, and fault codes only as the
//! codes in the fault table (others are `unknown` or `out_of_range`), so a misbehaving controller
//! cannot grow the series without bound.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use crate::fault::{self, FaultClass};

/// The gateway's metrics; cheap to clone, shared by the service, health and the endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    /// Every metric below, for encoding.
    registry: Arc<Registry>,
    calls: Family<CallLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    call_duration: Family<MethodLabels, CallHistogram>,
    upstream_duration: Family<MethodLabels, Histogram>,
    in_flight: Gauge,
    health_serving: Gauge,
    health_watches: Gauge,
    health_watches_refused: Counter,
    connections: ConnectionFamilies,
    case_events: CaseEventMetrics,
    idempotency: IdempotencyMetrics,
}

/// The series of the idempotency store (`request_id` on CaseExtract and CaseCancel).
#[derive(Debug, Clone, Default)]
pub(crate) struct IdempotencyMetrics {
    hits: Counter,
    replays: Counter,
    resolved: Family<ResolvedLabels, Counter>,
    evictions: Family<StateLabels, Counter>,
    refusals: Counter,
    entries: Family<StateLabels, Gauge>,
}

/// How many entries the idempotency store holds, by state: set by the store under the lock it
/// takes anyway whenever it changes, so a call takes no other lock for them.
#[derive(Debug, Clone, Default)]
pub(crate) struct EntryGauges {
    in_flight: Gauge,
    answered: Gauge,
    unknown: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResolvedLabels {
    outcome: &'static str,
}

/// The series of WatchCaseEvents and of the Log Publisher feed behind it.
#[derive(Debug, Clone, Default)]
pub(crate) struct CaseEventMetrics {
    watches_open: Gauge,
    watches_refused: Counter,
    watches_lagged: Counter,
    events: Family<StateLabels, Counter>,
    publisher_connected: Gauge,
    publisher_reconnects: Counter,
    publisher_connect_failures: Counter,
    publisher_lines: Family<LineLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LineLabels {
    kind: &'static str,
}

/// The connection series of every listener, one label value per listener.
#[derive(Debug, Clone, Default)]
struct ConnectionFamilies {
    open: Family<ListenerLabels, Gauge>,
    refused: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    accept_errors: Family<AcceptErrorLabels, Counter>,
}

/// The connection counters of one listener (`grpc`, `metrics`, or the simulator's, which are
/// counted but not exposed anywhere).
#[derive(Debug, Clone)]
pub(crate) struct ListenerMetrics {
    listener: &'static str,
    /// This listener's series of the gauge, looked up once.
    open: Gauge,
    families: ConnectionFamilies,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcceptErrorLabels {
    listener: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    method: &'static str,
    fault_code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

/// The log's drop counter, read when the metrics are encoded: the log module counts drops
/// itself, outside any call.
#[derive(Debug)]
struct DroppedLogLines;

/// The span exporter's drop counters, read when the metrics are encoded.
#[derive(Debug)]
struct DroppedSpans;

/// A call's latency histogram: with the trace of the latest exported call in each bucket as its
/// exemplar when spans are exported, else plain (one lock per observation, not two).
#[derive(Debug, Clone)]
enum CallHistogram {
    Plain(Histogram),
    Traced(HistogramWithExemplars<TraceLabels>),
}

/// An exemplar's labels: the trace and the server span of the call it stands for.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TraceLabels {
    trace_id: String,
    span_id: String,
}

/// One method's series, each looked up in its family on first use and kept: a family lookup
/// hashes the labels and takes a lock, on every call otherwise. Series still appear only once
/// they have a value, as before.
#[derive(Debug, Clone)]
pub(crate) struct MethodMetrics {
    method: &'static str,
    metrics: Metrics,
    series: Arc<MethodSeries>,
}

#[derive(Debug, Default)]
struct MethodSeries {
    /// One counter per gRPC code, indexed by the code's number.
    calls: [OnceLock<Counter>; fault::GRPC_CODE_COUNT],
    call_duration: OnceLock<CallHistogram>,
    upstream_duration: OnceLock<Histogram>,
}

/// Decrements a gauge when dropped: a call that ends, however it ends (a cancelled call
/// included), or a stream that closes.
#[derive(Debug)]
pub(crate) struct GaugeGuard {
    gauge: Gauge,
}

// === impl Metrics ===

impl Metrics {
    /// A fresh set of metrics, all zero.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("taskgate");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("calls", "Calls by method and gRPC code", calls.clone());
        let faults = Family::<FaultLabels, Counter>::default();
        registry.register(
            "controller_faults",
            "Controller faults by method and fault code (unknown or out_of_range for codes not in the fault table)",
            faults.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Controller calls that produced no usable reply, by kind",
            upstream_errors.clone(),
        );
        let call_duration = Family::<MethodLabels, CallHistogram>::new_with_constructor(
            if crate::otel::exporting() {
                traced_latency_histogram as fn() -> CallHistogram
            } else {
                plain_latency_histogram
            },
        );
        registry.register_with_unit(
            "call_duration",
            "Total time of a call in the gateway",
            Unit::Seconds,
            call_duration.clone(),
        );
        let upstream_duration = Family::<MethodLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "upstream_request_duration",
            "Time from sending a method call to the controller to its reply or failure",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "calls_in_flight",
            "Calls being handled now",
            in_flight.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stderr was not read fast enough",
            DroppedLogLines,
        );
        registry.register(
            "spans_dropped",
            "Spans that never reached the OTLP collector, by reason: queue_full (the export queue was full), after_shutdown (the span ended after export stopped), export_failed (the collector did not take them) or unsent_at_exit (still queued or being sent when the shutdown grace ran out)",
            DroppedSpans,
        );
        let health_serving = Gauge::default();
        registry.register(
            "health_serving",
            "1 while health reports SERVING (the controller is reachable), else 0",
            health_serving.clone(),
        );
        let health_watches = Gauge::default();
        registry.register(
            "health_watches_open",
            "Open grpc.health.v1 Watch streams",
            health_watches.clone(),
        );
        let health_watches_refused = Counter::default();
        registry.register(
            "health_watches_refused",
            "Watch calls refused with RESOURCE_EXHAUSTED because --max-health-watches were open",
            health_watches_refused.clone(),
        );
        let connections = ConnectionFamilies::default();
        registry.register(
            "connections_open",
            "Open connections by listener",
            connections.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed as soon as they were accepted, by listener and reason",
            connections.refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the gateway closed because a time limit ran out, by listener and reason",
            connections.closed.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts by listener and kind (fd_limit: out of file descriptors)",
            connections.accept_errors.clone(),
        );
        let case_events = CaseEventMetrics::default();
        case_events.register(&mut registry);
        let idempotency = IdempotencyMetrics::default();
        idempotency.register(&mut registry);
        Metrics {
            registry: Arc::new(registry),
            calls,
            faults,
            upstream_errors,
            call_duration,
            upstream_duration,
            in_flight,
            health_serving,
            health_watches,
            health_watches_refused,
            connections,
            case_events,
            idempotency,
        }
    }

    /// The connection counters of the listener called `listener`.
    pub(crate) fn listener(&self, listener: &'static str) -> ListenerMetrics {
        ListenerMetrics::in_families(listener, self.connections.clone())
    }

    /// Counts an open health Watch stream until the guard is dropped.
    pub(crate) fn health_watch_opened(&self) -> GaugeGuard {
        self.health_watches.inc();
        GaugeGuard {
            gauge: self.health_watches.clone(),
        }
    }

    /// Records a Watch call refused because too many were open.
    pub(crate) fn health_watch_refused(&self) {
        self.health_watches_refused.inc();
    }

    /// Counts a call as in flight until the guard is dropped.
    pub(crate) fn call_started(&self) -> GaugeGuard {
        self.in_flight.inc();
        GaugeGuard {
            gauge: self.in_flight.clone(),
        }
    }

    /// The metrics of one method, for the service to keep.
    pub(crate) fn method(&self, method: &'static str) -> MethodMetrics {
        MethodMetrics {
            method,
            metrics: self.clone(),
            series: Arc::default(),
        }
    }

    /// Records a fault the controller answered.
    pub(crate) fn fault(&self, method: &'static str, raw_code: u32) {
        let fault_code = match fault::classify(raw_code) {
            FaultClass::Known(known) => known.code.to_string(),
            FaultClass::Unknown(_) => "unknown".to_owned(),
            FaultClass::OutOfRange(_) => "out_of_range".to_owned(),
        };
        self.faults
            .get_or_create(&FaultLabels { method, fault_code })
            .inc();
    }

    /// Records a controller call that produced no usable reply; `kind` is a fixed word.
    pub(crate) fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels { kind })
            .inc();
    }

    /// The series of case-event watches and the Log Publisher feed.
    pub(crate) fn case_events(&self) -> &CaseEventMetrics {
        &self.case_events
    }

    /// The series of the idempotency store.
    pub(crate) fn idempotency(&self) -> &IdempotencyMetrics {
        &self.idempotency
    }

    /// Records the health state.
    pub(crate) fn health(&self, serving: bool) {
        self.health_serving.set(i64::from(serving));
    }

    /// The metrics in the Prometheus/OpenMetrics text format.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

// === impl IdempotencyMetrics ===

impl IdempotencyMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "idempotency_hits",
            "CaseExtract and CaseCancel calls whose request_id was already remembered",
            self.hits.clone(),
        );
        registry.register(
            "idempotency_replays",
            "Repeats answered from the idempotency store without calling the controller",
            self.replays.clone(),
        );
        registry.register(
            "idempotency_resolved",
            "Repeats after an unknown outcome, by what case_getstate showed: accepted, not_acted (sent again), unresolved, read_failed",
            self.resolved.clone(),
        );
        registry.register(
            "idempotency_evictions",
            "Remembered request_ids forgotten before their window because --idempotency-max-entries were kept, by state: fault, or ok (a repeat of an evicted ok is sent again, and may act twice; one in flight or unknown is never forgotten)",
            self.evictions.clone(),
        );
        registry.register(
            "idempotency_refusals",
            "New request_ids refused (IDEMPOTENCY_TABLE_FULL) because every one of --idempotency-max-entries was in flight or unknown",
            self.refusals.clone(),
        );
        registry.register(
            "idempotency_entries",
            "Remembered request_ids, by state: in_flight, answered, or unknown (never evicted: a table filling with them ends in IDEMPOTENCY_TABLE_FULL); as of the last CaseExtract or CaseCancel",
            self.entries.clone(),
        );
    }

    /// The gauges of the store's entries, for the store to set.
    pub(crate) fn entry_gauges(&self) -> EntryGauges {
        let gauge = |state| self.entries.get_or_create(&StateLabels { state }).clone();
        EntryGauges {
            in_flight: gauge("in_flight"),
            answered: gauge("answered"),
            unknown: gauge("unknown"),
        }
    }

    /// Counts a call whose `request_id` was already remembered.
    pub(crate) fn hit(&self) {
        self.hits.inc();
    }

    /// Counts a repeat answered from the store.
    pub(crate) fn replayed(&self) {
        self.replays.inc();
    }

    /// Counts a repeat after an unknown outcome; `outcome` is a fixed word.
    pub(crate) fn resolved(&self, outcome: &'static str) {
        self.resolved
            .get_or_create(&ResolvedLabels { outcome })
            .inc();
    }

    /// Counts answered `faults` and `oks` evicted to make room.
    pub(crate) fn evicted(&self, faults: usize, oks: usize) {
        for (state, evicted) in [("fault", faults), ("ok", oks)] {
            if evicted > 0 {
                self.evictions
                    .get_or_create(&StateLabels { state })
                    .inc_by(evicted as u64);
            }
        }
    }

    /// Counts a new `request_id` refused because the table was full of entries in flight or
    /// unknown.
    pub(crate) fn refused(&self) {
        self.refusals.inc();
    }
}

// === impl EntryGauges ===

impl EntryGauges {
    /// Sets how many entries are in flight, answered and unknown.
    pub(crate) fn set(&self, in_flight: usize, answered: usize, unknown: usize) {
        for (gauge, count) in [
            (&self.in_flight, in_flight),
            (&self.answered, answered),
            (&self.unknown, unknown),
        ] {
            gauge.set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// How many entries are in flight, answered and unknown.
    #[cfg(test)]
    pub(crate) fn get(&self) -> [i64; 3] {
        [&self.in_flight, &self.answered, &self.unknown].map(Gauge::get)
    }
}

// === impl CaseEventMetrics ===

impl CaseEventMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "case_watches_open",
            "Open WatchCaseEvents streams",
            self.watches_open.clone(),
        );
        registry.register(
            "case_watches_refused",
            "WatchCaseEvents calls refused with RESOURCE_EXHAUSTED because --max-watches were open",
            self.watches_refused.clone(),
        );
        registry.register(
            "case_watches_lagged",
            "WatchCaseEvents streams ended with RESOURCE_EXHAUSTED (WATCH_LAGGED) because their caller read too slowly",
            self.watches_lagged.clone(),
        );
        registry.register(
            "case_events",
            "AutoCase events received from the Log Publisher, by state code (CR for the cancel request)",
            self.events.clone(),
        );
        registry.register(
            "log_publisher_connected",
            "1 while the gateway is connected to the Log Publisher, else 0",
            self.publisher_connected.clone(),
        );
        registry.register(
            "log_publisher_reconnects",
            "Connections made to the Log Publisher after the first (each follows a lost connection)",
            self.publisher_reconnects.clone(),
        );
        registry.register(
            "log_publisher_connect_failures",
            "Failed attempts to connect to the Log Publisher",
            self.publisher_connect_failures.clone(),
        );
        registry.register(
            "log_publisher_lines",
            "Lines read from the Log Publisher, by kind: autocase (an AC segment), other (skipped), malformed (an AC segment that does not parse), too_long",
            self.publisher_lines.clone(),
        );
    }

    /// Counts an open watch until the guard is dropped.
    pub(crate) fn watch_opened(&self) -> GaugeGuard {
        self.watches_open.inc();
        GaugeGuard {
            gauge: self.watches_open.clone(),
        }
    }

    /// Records a watch refused because too many were open.
    pub(crate) fn watch_refused(&self) {
        self.watches_refused.inc();
    }

    /// Records a watch ended because its caller fell behind.
    pub(crate) fn watch_lagged(&self) {
        self.watches_lagged.inc();
    }

    /// Records an AutoCase event; `state` is its vendor code.
    pub(crate) fn event(&self, state: &'static str) {
        self.events.get_or_create(&StateLabels { state }).inc();
    }

    /// Records whether the Log Publisher is connected.
    pub(crate) fn publisher_connected(&self, connected: bool) {
        self.publisher_connected.set(i64::from(connected));
    }

    /// Records a connection made after a lost or failed one.
    pub(crate) fn publisher_reconnected(&self) {
        self.publisher_reconnects.inc();
    }

    /// Records a failed connection attempt.
    pub(crate) fn publisher_connect_failed(&self) {
        self.publisher_connect_failures.inc();
    }

    /// Records a line read from the Log Publisher; `kind` is a fixed word.
    pub(crate) fn publisher_line(&self, kind: &'static str) {
        self.publisher_lines
            .get_or_create(&LineLabels { kind })
            .inc();
    }
}

// === impl MethodMetrics ===

impl MethodMetrics {
    /// Records a finished call; `trace` is its exported trace and server span, the exemplar of
    /// its latency bucket.
    pub(crate) fn call_finished(
        &self,
        code: tonic::Code,
        total_time: Duration,
        trace: Option<(TraceId, SpanId)>,
    ) {
        let family = &self.metrics.calls;
        let labels = || CallLabels {
            method: self.method,
            code: fault::grpc_code_name(code),
        };
        let counter = usize::try_from(i32::from(code))
            .ok()
            .and_then(|index| self.series.calls.get(index));
        match counter {
            Some(counter) => {
                counter
                    .get_or_init(|| family.get_or_create(&labels()).clone())
                    .inc();
            }
            // Only a code outside gRPC's own list, which tonic never produces.
            None => {
                family.get_or_create(&labels()).inc();
            }
        }
        self.series
            .call_duration
            .get_or_init(|| {
                self.metrics
                    .call_duration
                    .get_or_create(&MethodLabels {
                        method: self.method,
                    })
                    .clone()
            })
            .observe(total_time.as_secs_f64(), trace);
    }

    /// Records how long the controller took, whatever the outcome.
    pub(crate) fn upstream_finished(&self, upstream_time: Duration) {
        self.series
            .upstream_duration
            .get_or_init(|| self.histogram(&self.metrics.upstream_duration))
            .observe(upstream_time.as_secs_f64());
    }

    fn histogram(&self, family: &Family<MethodLabels, Histogram>) -> Histogram {
        family
            .get_or_create(&MethodLabels {
                method: self.method,
            })
            .clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

// === impl ListenerMetrics ===

impl ListenerMetrics {
    /// Counters for a listener whose metrics are not served (the simulator): the counts only
    /// back the log lines.
    pub(crate) fn unregistered(listener: &'static str) -> Self {
        ListenerMetrics::in_families(listener, ConnectionFamilies::default())
    }

    fn in_families(listener: &'static str, families: ConnectionFamilies) -> Self {
        let open = families
            .open
            .get_or_create(&ListenerLabels { listener })
            .clone();
        ListenerMetrics {
            listener,
            open,
            families,
        }
    }

    /// The listener's name, as its label value.
    pub(crate) fn listener(&self) -> &'static str {
        self.listener
    }

    /// Counts a connection as open until the guard is dropped.
    pub(crate) fn connection_opened(&self) -> GaugeGuard {
        self.open.inc();
        GaugeGuard {
            gauge: self.open.clone(),
        }
    }

    /// Records a connection closed as soon as it was accepted; `reason` is a fixed word.
    pub(crate) fn connection_refused(&self, reason: &'static str) {
        let listener = self.listener;
        self.families
            .refused
            .get_or_create(&ConnectionLabels { listener, reason })
            .inc();
    }

    /// Records a connection the gateway closed because a limit ran out; `reason` is a fixed word.
    pub(crate) fn connection_closed(&self, reason: &'static str) {
        let listener = self.listener;
        self.families
            .closed
            .get_or_create(&ConnectionLabels { listener, reason })
            .inc();
    }

    /// Records a failed accept; `kind` is a fixed word.
    pub(crate) fn accept_error(&self, kind: &'static str) {
        let listener = self.listener;
        self.families
            .accept_errors
            .get_or_create(&AcceptErrorLabels { listener, kind })
            .inc();
    }
}

impl TypedMetric for DroppedLogLines {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for DroppedLogLines {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&crate::log::dropped_lines(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl TypedMetric for DroppedSpans {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for DroppedSpans {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (reason, dropped) in crate::otel::dropped_spans() {
            encoder
                .encode_family(&[("reason", reason)])?
                .encode_counter::<NoLabelSet, _, u64>(&dropped, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

// === impl CallHistogram ===

impl CallHistogram {
    fn observe(&self, seconds: f64, trace: Option<(TraceId, SpanId)>) {
        match self {
            CallHistogram::Plain(histogram) => histogram.observe(seconds),
            CallHistogram::Traced(histogram) => histogram.observe(
                seconds,
                trace.map(|(trace_id, span_id)| TraceLabels {
                    trace_id: trace_id.to_string(),
                    span_id: span_id.to_string(),
                }),
                None,
            ),
        }
    }
}

impl TypedMetric for CallHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for CallHistogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self {
            CallHistogram::Plain(histogram) => histogram.encode(encoder),
            CallHistogram::Traced(histogram) => histogram.encode(encoder),
        }
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn plain_latency_histogram() -> CallHistogram {
    CallHistogram::Plain(latency_histogram())
}

fn traced_latency_histogram() -> CallHistogram {
    CallHistogram::Traced(HistogramWithExemplars::new(latency_buckets()))
}

/// Buckets from 1 ms to about 33 s, doubling: controller calls take milliseconds when all is well
/// and up to the upstream timeout when not.
fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With spans exported, a call's latency bucket names the trace of the latest sampled call
    /// in it, in the OpenMetrics exemplar syntax; a call without one leaves it as it was.
    #[test]
    fn latency_buckets_carry_the_trace_as_an_exemplar() {
        let family = Family::<MethodLabels, CallHistogram>::new_with_constructor(
            traced_latency_histogram as fn() -> CallHistogram,
        );
        let mut registry = Registry::with_prefix("taskgate");
        registry.register_with_unit(
            "call_duration",
            "Total time of a call in the gateway",
            Unit::Seconds,
            family.clone(),
        );
        let histogram = family.get_or_create(&MethodLabels {
            method: "case_extract",
        });
        let trace_id = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap();
        let span_id = SpanId::from_hex("b7ad6b7169203331").unwrap();
        histogram.observe(0.0015, Some((trace_id, span_id)));
        histogram.observe(0.0150, None);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let expected = "taskgate_call_duration_seconds_bucket{le=\"0.002\",method=\"case_extract\"} 1 \
                        # {trace_id=\"0af7651916cd43dd8448eb211c80319c\",span_id=\"b7ad6b7169203331\"} 0.0015";
        assert!(text.contains(expected), "{text}");
        assert_eq!(text.matches(" # {").count(), 1, "{text}");
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        let case_extract = metrics.method("case_extract");
        assert!(
            !metrics.encode().contains("taskgate_calls_total{"),
            "a series before any call"
        );
        case_extract.call_finished(tonic::Code::Ok, Duration::from_millis(3), None);
        metrics.fault("case_extract", 1148);
        metrics.fault("case_extract", 1500);
        metrics.fault("case_extract", 77);
        metrics.upstream_error("timeout");
        case_extract.upstream_finished(Duration::from_millis(2));
        case_extract.call_finished(tonic::Code::Unavailable, Duration::from_millis(3), None);
        case_extract.call_finished(tonic::Code::Unavailable, Duration::from_millis(3), None);
        let guard = metrics.call_started();
        metrics.health(true);
        let text = metrics.encode();
        for line in [
            "taskgate_calls_total{method=\"case_extract\",code=\"OK\"} 1",
            "taskgate_calls_total{method=\"case_extract\",code=\"UNAVAILABLE\"} 2",
            "taskgate_controller_faults_total{method=\"case_extract\",fault_code=\"1148\"} 1",
            "taskgate_controller_faults_total{method=\"case_extract\",fault_code=\"unknown\"} 1",
            "taskgate_controller_faults_total{method=\"case_extract\",fault_code=\"out_of_range\"} 1",
            "taskgate_upstream_errors_total{kind=\"timeout\"} 1",
            "taskgate_call_duration_seconds_count{method=\"case_extract\"} 3",
            "taskgate_upstream_request_duration_seconds_count{method=\"case_extract\"} 1",
            "taskgate_calls_in_flight 1",
            "taskgate_health_serving 1",
            "taskgate_log_lines_dropped_total 0",
        ] {
            assert!(
                text.lines().any(|actual| actual == line),
                "{line} missing from:\n{text}"
            );
        }
        drop(guard);
        assert!(
            metrics
                .encode()
                .lines()
                .any(|line| line == "taskgate_calls_in_flight 0")
        );
    }
}
