//! The `TaskService` implementation: validate the request, work out the time limit, call the
//! controller, and hand every outcome to `status`. The request ID, the span, the metrics and the
//! access line are the call layer's (`call`); a handler only leaves it what it learned.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use tonic::{Request, Response, Status};

use crate::call::{CallNotes, CallScope};
use crate::codec::{Call, Reply};
use crate::domain::{BIN_ID_RANGE, PORT_ID_RANGE};
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
}

// === impl TaskGateway ===

impl TaskGateway {
    /// A service that calls `upstream` with the limits in `settings`.
    pub(crate) fn new(upstream: Upstream, settings: &upstream::Settings) -> Self {
        TaskGateway {
            upstream,
            upstream_timeout: settings.timeout,
            retry: RetryPolicy {
                delay: settings.retry_delay,
            },
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.get())),
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
        let caller_deadline = caller_deadline(&request);
        // The call layer always sets one; a default only covers a server built without it.
        let scope = request
            .extensions()
            .get::<CallScope>()
            .cloned()
            .unwrap_or_default();
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
                self.call(&context, call, &scope.request_id, caller_deadline)
                    .await
            }
            (Ok(_), Err(violations)) => (None, Err(CallError::InvalidArgument(violations))),
        };
        scope.note(CallNotes {
            port_id: Some(port_id),
            bin_id: Some(bin_id),
            fault_code: match &outcome {
                Err(CallError::Fault(code)) => Some(*code),
                _ => None,
            },
            upstream_time,
            upstream_error: match &outcome {
                Err(CallError::Upstream(upstream_error)) => Some(upstream_error.kind()),
                _ => None,
            },
        });
        outcome
            .map(|()| Response::new(CaseExtractResponse {}))
            .map_err(|call_error| status::status(&context, &call_error, self.retry))
    }
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
        let gateway = TaskGateway::new(upstream, &settings);
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
