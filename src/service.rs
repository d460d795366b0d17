//! The `TaskService` implementation: validate the request, work out the time limit, call the
//! controller, and hand every outcome to `status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use tonic::{Request, Response, Status};

use crate::codec::{BIN_ID_RANGE, Call, PORT_ID_RANGE, Reply};
use crate::config::AccessLog;
use crate::log::{PlainAddr, PlainLine};
use crate::metrics::{MethodMetrics, Metrics};
use crate::proto::task_service_server::TaskService;
use crate::proto::{CaseExtractRequest, CaseExtractResponse};
use crate::protocol::{GRPC_TIMEOUT, parse_grpc_timeout};
use crate::request_id::RequestId;
use crate::status::{self, CallContext, CallError, RetryPolicy, Violation};
use crate::upstream::{self, Upstream};

/// The gateway's `TaskService`: cheap to clone, shared by every connection.
#[derive(Debug, Clone)]
pub(crate) struct TaskGateway {
    /// The controller client; its pool is shared by every call.
    upstream: Upstream,
    /// The cap on one controller call, whatever the caller's deadline.
    upstream_timeout: Duration,
    /// What goes into `RetryInfo`.
    retry: RetryPolicy,
    /// One permit per call allowed in flight; a call that finds none is shed at once, because
    /// queueing would only make every caller's deadline expire together.
    in_flight: Arc<Semaphore>,
    /// Where every call is counted.
    metrics: Metrics,
    /// CaseExtract's own series, looked up once.
    case_extract_metrics: MethodMetrics,
    /// Which calls write an access line.
    access_log: AccessLog,
}

// === impl TaskGateway ===

impl TaskGateway {
    /// A service that calls `upstream` with the limits in `settings`.
    pub(crate) fn new(
        upstream: Upstream,
        settings: &upstream::Settings,
        access_log: AccessLog,
        metrics: Metrics,
    ) -> Self {
        TaskGateway {
            upstream,
            upstream_timeout: settings.timeout,
            retry: RetryPolicy {
                delay: settings.retry_delay,
            },
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.get())),
            case_extract_metrics: metrics.method("case_extract"),
            metrics,
            access_log,
        }
    }

    /// Calls the controller; also returns how long the controller took, when it was called.
    async fn call(
        &self,
        context: &CallContext,
        call: Call<'_>,
        request_id: &RequestId,
        caller_deadline: Option<Duration>,
    ) -> (Option<Duration>, Result<(), CallError>) {
        let Some(time_limit) = time_limit(caller_deadline, self.upstream_timeout) else {
            let deadline = caller_deadline.unwrap_or_default();
            return (None, Err(CallError::DeadlineTooShort { deadline }));
        };
        tracing::debug!(
            method = context.method,
            time_limit_ms = time_limit.as_millis() as u64,
            "calling the controller"
        );
        let started = Instant::now();
        let reply = self.upstream.call(&call, request_id, time_limit).await;
        let outcome = match reply {
            Ok(Reply::Success(_)) => Ok(()),
            Ok(Reply::Fault(code)) => Err(CallError::Fault(code)),
            Err(upstream_error) => Err(CallError::Upstream(upstream_error)),
        };
        (Some(started.elapsed()), outcome)
    }
}

#[tonic::async_trait]
impl TaskService for TaskGateway {
    async fn case_extract(
        &self,
        request: Request<CaseExtractRequest>,
    ) -> Result<Response<CaseExtractResponse>, Status> {
        let started = Instant::now();
        let _in_flight = self.metrics.call_started();
        let caller_deadline = caller_deadline(&request);
        // The request-ID layer always sets one; a default only covers a server built without it.
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .cloned()
            .unwrap_or_default();
        let peer = request.remote_addr();
        let CaseExtractRequest { port_id, bin_id } = request.into_inner();
        let context = CallContext {
            method: "case_extract",
            port_id,
            bin_id,
        };
        // Held until the call ends; dropped with the future if the caller goes away.
        let permit = self.in_flight.try_acquire();
        let (upstream_time, outcome) = match (permit, validate_case_extract(port_id, bin_id)) {
            (Err(_), _) => (None, Err(CallError::Overloaded)),
            (Ok(_permit), Ok(())) => {
                let call = Call {
                    method: context.method,
                    params: &[("port_id", port_id), ("bin_id", bin_id)],
                };
                self.call(&context, call, &request_id, caller_deadline)
                    .await
            }
            (Ok(_), Err(violations)) => (None, Err(CallError::InvalidArgument(violations))),
        };
        if let Some(upstream_time) = upstream_time {
            self.case_extract_metrics.upstream_finished(upstream_time);
        }
        let fault_code = match &outcome {
            Err(CallError::Fault(code)) => {
                self.metrics.fault(context.method, *code);
                Some(*code)
            }
            Err(CallError::Upstream(upstream_error)) => {
                self.metrics.upstream_error(upstream_error.kind());
                None
            }
            Ok(())
            | Err(
                CallError::InvalidArgument(_)
                | CallError::DeadlineTooShort { .. }
                | CallError::Overloaded,
            ) => None,
        };
        let result = outcome
            .map(|()| Response::new(CaseExtractResponse {}))
            .map_err(|call_error| status::status(&context, &call_error, self.retry));
        let access = AccessRecord {
            context: &context,
            code: result
                .as_ref()
                .map_or_else(Status::code, |_| tonic::Code::Ok),
            fault_code,
            upstream_time,
            total_time: started.elapsed(),
            request_id: &request_id,
            peer,
        };
        if self.access_log.records(access.code) {
            access.log(result.as_ref().err().map(Status::message));
        }
        self.case_extract_metrics
            .call_finished(access.code, access.total_time);
        result
    }
}

/// What the access log records about one call.
struct AccessRecord<'a> {
    context: &'a CallContext,
    code: tonic::Code,
    fault_code: Option<u32>,
    upstream_time: Option<Duration>,
    total_time: Duration,
    request_id: &'a RequestId,
    peer: Option<SocketAddr>,
}

/// The target of access lines, so they can be filtered on their own
/// (`RUST_LOG=taskgate::access=info`).
const ACCESS_TARGET: &str = "taskgate::access";

impl AccessRecord<'_> {
    /// Writes the one access-log line of a call: straight to the log queue when lines are plain
    /// text (the line every call writes, so it skips tracing's visitors), else as an event.
    fn log(&self, error_message: Option<&str>) {
        if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            return;
        }
        if !crate::log::write_plain(ACCESS_TARGET, |line| self.write_fields(line, error_message)) {
            self.event(error_message);
        }
    }

    /// The access line as a tracing event: the one declaration of its fields for every format.
    fn event(&self, error_message: Option<&str>) {
        tracing::info!(
            target: ACCESS_TARGET,
            method = self.context.method,
            port_id = self.context.port_id,
            bin_id = self.context.bin_id,
            grpc_code = crate::fault::grpc_code_name(self.code),
            fault_code = self.fault_code,
            upstream_ms = self.upstream_time.map(milliseconds),
            total_ms = milliseconds(self.total_time),
            request_id = %self.request_id,
            peer = self.peer.map(|peer| tracing::field::display(PlainAddr(peer))),
            error = error_message,
            "call"
        );
    }

    /// The fields of [`AccessRecord::event`], in its order, for a plain text line; a test checks
    /// that both write the same line.
    fn write_fields(&self, line: &mut PlainLine<'_>, error_message: Option<&str>) {
        line.message("call");
        line.str("method", self.context.method);
        line.u64("port_id", self.context.port_id.into());
        line.u64("bin_id", self.context.bin_id.into());
        line.str("grpc_code", crate::fault::grpc_code_name(self.code));
        if let Some(fault_code) = self.fault_code {
            line.u64("fault_code", fault_code.into());
        }
        if let Some(upstream_time) = self.upstream_time {
            line.f64("upstream_ms", milliseconds(upstream_time));
        }
        line.f64("total_ms", milliseconds(self.total_time));
        line.display("request_id", self.request_id.as_str());
        if let Some(peer) = self.peer {
            line.socket_addr("peer", peer);
        }
        if let Some(error) = error_message {
            line.str("error", error);
        }
    }
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Checks `case_extract`'s documented ranges, reporting every field that is out of range.
pub(crate) fn validate_case_extract(port_id: u32, bin_id: u32) -> Result<(), Vec<Violation>> {
    let violations: Vec<Violation> = [
        check_range("port_id", port_id, &PORT_ID_RANGE),
        check_range("bin_id", bin_id, &BIN_ID_RANGE),
    ]
    .into_iter()
    .flatten()
    .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

fn check_range(
    field: &'static str,
    value: u32,
    range: &std::ops::RangeInclusive<u32>,
) -> Option<Violation> {
    (!range.contains(&value)).then(|| Violation {
        field,
        description: format!(
            "{field} {value} is out of range {}-{}",
            range.start(),
            range.end()
        ),
    })
}

/// The caller's deadline from the `grpc-timeout` header, if it sent one; `protocol` has refused
/// a malformed one before the call gets here.
fn caller_deadline<T>(request: &Request<T>) -> Option<Duration> {
    // Made once: a `&str` name is parsed and checked on every lookup.
    const NAME: tonic::codegen::http::HeaderName =
        tonic::codegen::http::HeaderName::from_static(GRPC_TIMEOUT);
    AsRef::<tonic::codegen::http::HeaderMap>::as_ref(request.metadata())
        .get(&NAME)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// The longest the gateway may wait for the controller: the smaller of the caller's deadline,
/// less a margin so the caller receives our DEADLINE_EXCEEDED before its own clock runs out, and
/// the upstream timeout. `None` when the deadline leaves too little time for any controller to
/// answer, so the caller hears that at once instead of racing tonic's own deadline timer (which
/// answers CANCELLED, not DEADLINE_EXCEEDED).
pub(crate) fn time_limit(
    caller_deadline: Option<Duration>,
    upstream_timeout: Duration,
) -> Option<Duration> {
    const MAX_MARGIN: Duration = Duration::from_millis(100);
    // `--upstream-timeout` is never below this, so only a caller's deadline can be too short.
    const MIN_UPSTREAM_TIME: Duration = crate::config::limits::MIN_UPSTREAM_TIME;
    let Some(deadline) = caller_deadline else {
        return Some(upstream_timeout);
    };
    let margin = (deadline / 10).min(MAX_MARGIN);
    let limit = deadline.saturating_sub(margin).min(upstream_timeout);
    (limit >= MIN_UPSTREAM_TIME).then_some(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The access line written straight to the queue is, byte for byte, the line the event
    /// writes, for every shape of record: with and without a fault, an upstream time, a peer
    /// (IPv4 and IPv6) and an error that needs escaping.
    #[test]
    fn the_plain_access_line_is_the_events_line() {
        let context = CallContext {
            method: "case_extract",
            port_id: 4,
            bin_id: 101_337,
        };
        let request_id = RequestId::new();
        let records = [
            (
                tonic::Code::Ok,
                None,
                Some(Duration::from_micros(2_226)),
                Some("127.0.0.1:4711"),
                None,
            ),
            (
                tonic::Code::Unavailable,
                Some(1148),
                Some(Duration::from_nanos(1_234_567)),
                Some("10.20.30.255:65535"),
                Some("port 4 is busy"),
            ),
            (
                tonic::Code::InvalidArgument,
                None,
                None,
                Some("[::1]:50051"),
                Some("bad \"bin\"\n\ttab"),
            ),
            (tonic::Code::DeadlineExceeded, None, None, None, Some("")),
            (
                tonic::Code::Internal,
                Some(0),
                Some(Duration::ZERO),
                None,
                Some("grüße"),
            ),
        ];
        for (code, fault_code, upstream_time, peer, error) in records {
            let peer = peer.map(|peer| peer.parse().unwrap());
            let record = AccessRecord {
                context: &context,
                code,
                fault_code,
                upstream_time,
                total_time: Duration::from_secs_f64(0.002_281_54),
                request_id: &request_id,
                peer,
            };
            let (events, direct) = crate::log::plain_lines_without_time(|| {
                let span = tracing::info_span!("call", request_id = %request_id, path = "/x");
                let _entered = span.enter();
                record.event(error);
                crate::log::plain_line_for_test(ACCESS_TARGET, |line| {
                    record.write_fields(line, error);
                })
            });
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(direct, events);
        }
    }

    fn check_valid(port_id: u32, bin_id: u32, expected_fields: &[&str]) {
        let fields: Vec<&str> = match validate_case_extract(port_id, bin_id) {
            Ok(()) => Vec::new(),
            Err(violations) => violations.iter().map(|violation| violation.field).collect(),
        };
        assert_eq!(fields, expected_fields, "port {port_id} bin {bin_id}");
    }

    #[test]
    fn case_extract_bounds_are_inclusive() {
        check_valid(1, 1, &[]);
        check_valid(2000, 4_000_000, &[]);
        check_valid(0, 1, &["port_id"]);
        check_valid(2001, 1, &["port_id"]);
        check_valid(1, 0, &["bin_id"]);
        check_valid(1, 4_000_001, &["bin_id"]);
        check_valid(0, 0, &["port_id", "bin_id"]);
        check_valid(u32::MAX, u32::MAX, &["port_id", "bin_id"]);
    }

    #[test]
    fn violation_names_the_value_and_the_range() {
        let violations = validate_case_extract(2001, 5).unwrap_err();
        assert_eq!(
            violations[0].description,
            "port_id 2001 is out of range 1-2000"
        );
    }

    /// Through the real server, tonic's own deadline timer races this refusal, so the handler is
    /// called directly here. The upstream URL is never contacted: if it were, the code would be
    /// UNAVAILABLE, not DEADLINE_EXCEEDED.
    #[tokio::test]
    async fn a_deadline_too_short_to_call_is_refused_without_calling_the_controller() {
        let url = crate::config::parse_upstream_url("http://127.0.0.1:9/api/v2/task").unwrap();
        let settings = upstream::Settings::new(url);
        let upstream = Upstream::new(&settings).unwrap();
        let gateway = TaskGateway::new(upstream, &settings, AccessLog::All, Metrics::new());
        let mut request = Request::new(CaseExtractRequest {
            port_id: 4,
            bin_id: 101337,
        });
        request
            .metadata_mut()
            .insert("grpc-timeout", "5m".parse().unwrap());
        let status = gateway.case_extract(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "case_extract port 4 bin 101337: the caller's deadline of 5ms leaves no time to call \
             the controller"
        );
    }

    #[test]
    fn time_limits() {
        let ms = Duration::from_millis;
        let upstream_timeout = Duration::from_secs(10);
        assert_eq!(time_limit(None, upstream_timeout), Some(upstream_timeout));
        assert_eq!(time_limit(Some(ms(500)), upstream_timeout), Some(ms(450)));
        assert_eq!(time_limit(Some(ms(5000)), upstream_timeout), Some(ms(4900)));
        assert_eq!(
            time_limit(Some(ms(60_000)), upstream_timeout),
            Some(upstream_timeout)
        );
        assert_eq!(
            time_limit(Some(ms(12)), upstream_timeout),
            Some(ms(12) - ms(12) / 10)
        );
        assert_eq!(time_limit(Some(ms(11)), upstream_timeout), None);
        assert_eq!(time_limit(Some(ms(1)), upstream_timeout), None);
        assert_eq!(time_limit(Some(Duration::ZERO), upstream_timeout), None);
    }
}
