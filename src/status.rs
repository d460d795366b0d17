//! The only place a `tonic::Status` is built: gRPC code, message, `ErrorInfo`, `TaskFault`,
//! `RetryInfo` and `BadRequest`, decided by one exhaustive `match` per error type so that a new
//! variant does not compile until it is mapped. A gateway error's code, reason and `RetryInfo`
//! come from its row in [`crate::gateway_error`], a fault's from [`crate::fault`].

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use prost_types::Any;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_types::{BadRequest, ErrorInfo, FieldViolation, RetryInfo, pb};

use uuid::Uuid;

use crate::domain::CaseState;
use crate::fault::{self, FaultClass};
use crate::gateway_error::{self, GatewayError, WATCH_METHOD};
use crate::idempotency::{self, Params};
use crate::proto::{FaultCode, TASK_FAULT_TYPE_URL, TaskFault};
use crate::upstream::UpstreamError;
use crate::watch::WatchEnd;

/// The `ErrorInfo` domain of faults the controller reported.
pub(crate) const CONTROLLER_DOMAIN: &str = fault::DOMAIN;
/// The `ErrorInfo` domain of errors the gateway itself detected.
pub(crate) const GATEWAY_DOMAIN: &str = gateway_error::DOMAIN;

/// The most field violations one `BadRequest` lists; the rest are counted. Each costs about
/// 100 bytes of response headers (its text is in `grpc-message` and again, base64-encoded, in
/// `grpc-status-details-bin`), and clients refuse headers past 8 or 16 KiB: a `WatchCaseEvents`
/// request of 4 KiB can name a thousand bad ports.
const MAX_VIOLATIONS_SHOWN: usize = 10;

/// The longest message a status carries, in bytes. Its text goes in `grpc-message`
/// (percent-encoded, up to three times as long) and again in `grpc-status-details-bin`, and
/// clients refuse response headers past 8 or 16 KiB. Every message the gateway writes is far
/// shorter: only text a peer sent could reach it, and that is cut short where it is quoted.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Which call failed: named in every message and in every `ErrorInfo`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallContext {
    /// The task-interface method, for example `case_extract`.
    pub(crate) method: &'static str,
    /// The port the call was for.
    pub(crate) port_id: u32,
    /// The bin the call was for, on methods that take one (`case_getstate` does not).
    pub(crate) bin_id: Option<u32>,
    /// The `request_id` whose unknown outcome this call reads the port after, if it does.
    pub(crate) reading_after: Option<Uuid>,
}

/// Everything that can end a call without success.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The request broke the documented ranges; the controller was not called.
    InvalidArgument(Vec<Violation>),
    /// The caller's deadline leaves no time to call the controller.
    DeadlineTooShort {
        /// What was left of the caller's deadline (from `grpc-timeout`) when the controller
        /// was to be called.
        deadline: Duration,
    },
    /// Too many calls are in flight; this one was shed before doing anything.
    Overloaded,
    /// The controller answered with a fault code.
    Fault(u32),
    /// The controller could not be asked, or its answer could not be read.
    Upstream(UpstreamError),
    /// The `request_id` was first sent with other parameters.
    RequestIdReused {
        /// The key.
        request_id: Uuid,
        /// What it was first sent with.
        first: Params,
    },
    /// The first call with the `request_id` was still in flight when this repeat's time ran out.
    RequestInProgress {
        /// The key.
        request_id: Uuid,
    },
    /// The first call with the `request_id` may have been acted on, and the port's state does
    /// not tell whether it was.
    OutcomeUnknown {
        /// The key.
        request_id: Uuid,
        /// The bin `case_getstate` named, if any.
        bin_id: Option<u32>,
        /// The state it showed.
        case_state: CaseState,
        /// How long after the first call was sent the port was read, when that was too long for a
        /// state showing the call not acted on to be believed.
        too_late: Option<Duration>,
    },
    /// Reading the port after an unknown outcome failed; the status is that of `case_getstate`,
    /// marked as reading after an unknown outcome.
    ReadingThePort {
        /// The key.
        request_id: Uuid,
        /// How `case_getstate` failed.
        error: Box<CallError>,
    },
    /// A new `request_id` while every remembered one is in flight or unknown; nothing was sent.
    IdempotencyTableFull {
        /// The key.
        request_id: Uuid,
        /// `--idempotency-max-entries`.
        max_entries: usize,
        /// `--idempotency-window`.
        window: Duration,
    },
    /// After an unknown outcome the port showed the call not acted on, so it was sent again,
    /// and that ended in `resend`, a failure.
    /// The port read may have come before the first call reached the controller, so whether
    /// the first call was acted on is still unknown.
    ResendInconclusive {
        /// The key.
        request_id: Uuid,
        /// The bin `case_getstate` named before the resend, if any.
        bin_id: Option<u32>,
        /// The state it showed.
        case_state: CaseState,
        /// How the resend ended.
        resend: Box<CallError>,
    },
}

/// One request field outside its documented range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    /// The proto field name.
    pub(crate) field: &'static str,
    /// What is wrong, with the value and the range.
    pub(crate) description: String,
}

/// What the gateway puts in `RetryInfo` when it tells a caller that a retry is safe.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    /// The delay a caller should wait before retrying.
    pub(crate) delay: Duration,
}

/// Turns a failed call into the status the caller receives.
pub(crate) fn status(context: &CallContext, error: &CallError, retry: RetryPolicy) -> Status {
    match error {
        CallError::InvalidArgument(violations) => invalid_argument(context, violations),
        CallError::DeadlineTooShort { deadline } => gateway_error(
            context,
            &gateway_error::DEADLINE_TOO_SHORT,
            format!(
                "{} left of the caller's deadline leaves less than {} to call the controller, \
                 after the gateway's margin; nothing was sent",
                // What was left when the controller was to be called (a repeat's read of the
                // port may have taken some), to the microsecond: nanoseconds say nothing here.
                humantime::format_duration(Duration::from_micros(deadline.as_micros() as u64)),
                humantime::format_duration(crate::config::limits::MIN_UPSTREAM_TIME)
            ),
            Extra::None,
            retry,
        ),
        CallError::Overloaded => gateway_error(
            context,
            &gateway_error::OVERLOADED,
            "too many calls in flight; the controller was not called".to_owned(),
            Extra::None,
            retry,
        ),
        CallError::Fault(code) => controller_fault(context, fault::classify(*code), retry),
        CallError::Upstream(upstream_error) => upstream(context, upstream_error, retry),
        CallError::RequestIdReused { request_id, first } => gateway_error(
            context,
            &gateway_error::REQUEST_ID_REUSED,
            format!(
                "request_id {request_id} was first sent with {} port {} bin {}; send a fresh \
                 request_id for each new call",
                first.method.name(),
                first.port_id,
                first.bin_id
            ),
            Extra::RequestId(*request_id, None),
            retry,
        ),
        CallError::RequestInProgress { request_id } => gateway_error(
            context,
            &gateway_error::REQUEST_IN_PROGRESS,
            format!(
                "the first call with request_id {request_id} was still in flight when this \
                 call's deadline ran out; repeat it with the same request_id to get that call's \
                 answer"
            ),
            Extra::RequestId(*request_id, None),
            retry,
        ),
        CallError::OutcomeUnknown {
            request_id,
            bin_id,
            case_state,
            too_late,
        } => {
            let seen = match bin_id {
                Some(bin_id) => format!("{} with bin {bin_id}", case_state.code()),
                None => format!("{} with no bin", case_state.code()),
            };
            let why = match too_late {
                None => "which does not tell whether it was".to_owned(),
                Some(elapsed) => format!(
                    "read {} after that call was sent, too long after (more \
                     than {}) to prove it was not: the port may have moved on since",
                    humantime::format_duration(round_to_millis(*elapsed)),
                    humantime::format_duration(idempotency::NOT_ACTED_BELIEVED_FOR)
                ),
            };
            gateway_error(
                context,
                &gateway_error::REQUEST_OUTCOME_UNKNOWN,
                format!(
                    "the first call with request_id {request_id} may have been acted on, and \
                     case_getstate shows the port in {seen}, {why}; nothing was sent: read the \
                     port with CaseGetState and decide"
                ),
                Extra::RequestId(*request_id, Some(case_state.code())),
                retry,
            )
        }
        CallError::ResendInconclusive {
            request_id,
            bin_id,
            case_state,
            resend,
        } => {
            let seen = match bin_id {
                Some(bin_id) => format!("{} with bin {bin_id}", case_state.code()),
                None => format!("{} with no bin", case_state.code()),
            };
            let resend = status(context, resend, retry);
            // The resend's message names the same call: say it once.
            let prefix = format!("{}: ", describe(context));
            let resend = resend.message();
            let resend = resend.strip_prefix(&prefix).unwrap_or(resend);
            gateway_error(
                context,
                &gateway_error::REQUEST_OUTCOME_UNKNOWN,
                format!(
                    "the first call with request_id {request_id} may have been acted on; \
                     case_getstate showed the port in {seen}, so it was sent again, and that \
                     ended: {resend}; the first call may have reached the controller after the \
                     port was read: read the port with CaseGetState and decide"
                ),
                Extra::RequestId(*request_id, Some(case_state.code())),
                retry,
            )
        }
        CallError::ReadingThePort { request_id, error } => {
            let reading = CallContext {
                method: "case_getstate",
                port_id: context.port_id,
                bin_id: None,
                reading_after: Some(*request_id),
            };
            status(&reading, error, retry)
        }
        CallError::IdempotencyTableFull {
            request_id,
            max_entries,
            window,
        } => gateway_error(
            context,
            &gateway_error::IDEMPOTENCY_TABLE_FULL,
            format!(
                "request_id {request_id} is new, and all {max_entries} remembered request_ids \
                 (--idempotency-max-entries) are in flight or have an unknown outcome, which are \
                 kept for --idempotency-window ({}) after their call ended; nothing was sent: \
                 retry later, with backoff",
                humantime::format_duration(*window)
            ),
            Extra::RequestId(*request_id, None),
            retry,
        ),
    }
}

/// Whether the controller may have acted on a call that failed with `error`, as its row in the
/// gateway-error table says.
pub(crate) fn may_have_acted(error: &UpstreamError) -> bool {
    upstream_row(error).0.retry.controller_may_have_acted()
}

/// The status of a health Watch refused because `limit` Watch streams are already open. Health
/// needs no token, so without a cap anyone could hold memory with open streams.
pub(crate) fn health_watches_exhausted(limit: usize) -> Status {
    let mut metadata = HashMap::new();
    metadata.insert("limit".to_owned(), limit.to_string());
    let details = vec![error_info(
        gateway_error::TOO_MANY_HEALTH_WATCHES.reason,
        GATEWAY_DOMAIN,
        metadata,
    )];
    build(
        gateway_error::TOO_MANY_HEALTH_WATCHES.code,
        format!(
            "{limit} health Watch streams are already open (--max-health-watches); use Check, or retry once a Watch has closed"
        ),
        details,
        None,
    )
}

/// The status a WatchCaseEvents stream ends with, or is refused with.
pub(crate) fn watch_ended(end: &WatchEnd, retry: RetryPolicy) -> Status {
    let mut metadata = HashMap::from([("method".to_owned(), WATCH_METHOD.to_owned())]);
    let mut retry_after = None;
    let (code, reason, text) = match end {
        WatchEnd::Unavailable { source, cause } => {
            metadata.insert("logPublisher".to_owned(), source.clone());
            retry_after = Some(retry.delay);
            (
                Code::Unavailable,
                "LOG_PUBLISHER_UNAVAILABLE",
                format!(
                    "the Log Publisher at {source} is not connected ({cause}); events may have \
                     been missed: watch again, then read the state with CaseGetState"
                ),
            )
        }
        WatchEnd::Lagged { buffer } => {
            metadata.insert("buffer".to_owned(), buffer.to_string());
            (
                Code::ResourceExhausted,
                "WATCH_LAGGED",
                format!(
                    "the stream fell more than {buffer} events behind (--watch-buffer) and was \
                     ended; events were missed: watch again, then read the state with CaseGetState"
                ),
            )
        }
        WatchEnd::TooMany { limit } => {
            metadata.insert("limit".to_owned(), limit.to_string());
            (
                Code::ResourceExhausted,
                "TOO_MANY_WATCHES",
                format!(
                    "{limit} watches are already open (--max-watches); retry once one has closed"
                ),
            )
        }
        WatchEnd::ShuttingDown => (
            Code::Unavailable,
            "SHUTTING_DOWN",
            "the gateway is shutting down; watch again once it is back, or through another \
             instance"
                .to_owned(),
        ),
        WatchEnd::Disabled => (
            Code::FailedPrecondition,
            "LOG_PUBLISHER_DISABLED",
            "the gateway runs without a Log Publisher (--log-publisher off), so it has no case \
             events; read states with CaseGetState"
                .to_owned(),
        ),
        WatchEnd::DeadlineReached { deadline } => (
            Code::DeadlineExceeded,
            "DEADLINE_REACHED",
            format!(
                "the caller's deadline of {} has passed",
                humantime::format_duration(*deadline)
            ),
        ),
    };
    let details = vec![error_info(reason, GATEWAY_DOMAIN, metadata)];
    build(
        code,
        format!("{WATCH_METHOD}: {text}"),
        details,
        retry_after,
    )
}

/// The status of a WatchCaseEvents call whose port filter breaks the documented range. It names
/// no port in its `ErrorInfo`: the filter is a list.
pub(crate) fn watch_invalid_ports(violations: &[Violation]) -> Status {
    let metadata = HashMap::from([("method".to_owned(), WATCH_METHOD.to_owned())]);
    bad_request(WATCH_METHOD.to_owned(), metadata, violations)
}

/// The status of a task call without a valid bearer token. It names no token, and no call
/// context: the request body is not read before the caller is authenticated.
pub(crate) fn unauthenticated() -> Status {
    let details = vec![error_info(
        gateway_error::UNAUTHENTICATED.reason,
        GATEWAY_DOMAIN,
        HashMap::new(),
    )];
    build(
        gateway_error::UNAUTHENTICATED.code,
        "a valid 'authorization: Bearer <token>' header is required".to_owned(),
        details,
        None,
    )
}

/// The status of a call whose `grpc-timeout` header breaks the gRPC spec; `value` is the header
/// as the message may quote it.
pub(crate) fn malformed_grpc_timeout(value: &str) -> Status {
    let metadata = HashMap::from([("header".to_owned(), "grpc-timeout".to_owned())]);
    build(
        Code::InvalidArgument,
        format!(
            "malformed grpc-timeout header '{value}': expected 1 to 8 digits and a unit (H, M, \
             S, m, u or n), for example 500m"
        ),
        vec![error_info(
            "MALFORMED_GRPC_TIMEOUT",
            GATEWAY_DOMAIN,
            metadata,
        )],
        None,
    )
}

/// The status of a call that sent a second request message to a method that takes one. INTERNAL,
/// as grpc-java and grpc-go answer it.
pub(crate) fn second_request_message(path: &str) -> Status {
    let metadata = HashMap::from([("method".to_owned(), path.to_owned())]);
    build(
        Code::Internal,
        format!("{path} takes one request message, and a second one arrived"),
        vec![error_info(
            "TOO_MANY_REQUEST_MESSAGES",
            GATEWAY_DOMAIN,
            metadata,
        )],
        None,
    )
}

/// Metadata a gateway error may add to the call's.
enum Extra {
    None,
    HttpStatus(u16),
    TimeoutMs(u128),
    /// The shutdown grace that ran out.
    Grace(Duration),
    /// The idempotency key, and the case state a repeat saw.
    RequestId(Uuid, Option<&'static str>),
}

fn upstream(context: &CallContext, error: &UpstreamError, retry: RetryPolicy) -> Status {
    let (row, extra) = upstream_row(error);
    gateway_error(context, row, error.to_string(), extra, retry)
}

fn upstream_row(error: &UpstreamError) -> (&'static GatewayError, Extra) {
    match error {
        UpstreamError::Unreachable { .. } => (&gateway_error::UPSTREAM_UNREACHABLE, Extra::None),
        UpstreamError::ConnectionLost(_) => (&gateway_error::UPSTREAM_CONNECTION_LOST, Extra::None),
        UpstreamError::Timeout { limit } => (
            &gateway_error::UPSTREAM_TIMEOUT,
            Extra::TimeoutMs(limit.as_millis()),
        ),
        UpstreamError::HttpStatus {
            status,
            success,
            proxied,
        } => {
            let row = match status.as_u16() {
                // A success reply says the controller acted, whatever the status says; and a
                // proxy may decline after it passed the request on.
                429 | 503 if !success && !proxied => &gateway_error::UPSTREAM_HTTP_DECLINED,
                429 | 503 if *proxied => &gateway_error::UPSTREAM_HTTP_SERVER_ERROR,
                _ if status.is_server_error() => &gateway_error::UPSTREAM_HTTP_SERVER_ERROR,
                _ => &gateway_error::UPSTREAM_HTTP_OTHER,
            };
            (row, Extra::HttpStatus(status.as_u16()))
        }
        UpstreamError::BadResponse(_) => (&gateway_error::UPSTREAM_BAD_RESPONSE, Extra::None),
        UpstreamError::ResponseTooLarge { .. } => {
            (&gateway_error::UPSTREAM_RESPONSE_TOO_LARGE, Extra::None)
        }
        UpstreamError::GraceRanOut { grace } => {
            (&gateway_error::SHUTDOWN_GRACE_RAN_OUT, Extra::Grace(*grace))
        }
    }
}

fn gateway_error(
    context: &CallContext,
    row: &GatewayError,
    text: String,
    extra: Extra,
    retry: RetryPolicy,
) -> Status {
    let mut metadata = context_metadata(context);
    match extra {
        Extra::None => {}
        Extra::HttpStatus(http_status) => {
            metadata.insert("httpStatus".to_owned(), http_status.to_string());
        }
        Extra::TimeoutMs(millis) => {
            metadata.insert("timeoutMs".to_owned(), millis.to_string());
        }
        Extra::Grace(grace) => {
            metadata.insert(
                "grace".to_owned(),
                humantime::format_duration(grace).to_string(),
            );
        }
        Extra::RequestId(request_id, case_state) => {
            metadata.insert("requestId".to_owned(), request_id.to_string());
            if let Some(case_state) = case_state {
                metadata.insert("caseState".to_owned(), case_state.to_owned());
            }
        }
    }
    let details = vec![error_info(row.reason, GATEWAY_DOMAIN, metadata)];
    let retry_after = row.retry.has_retry_info().then_some(retry.delay);
    build(
        row.code,
        format!("{}: {text}", describe(context)),
        details,
        retry_after,
    )
}

fn controller_fault(context: &CallContext, fault_class: FaultClass, retry: RetryPolicy) -> Status {
    let raw_code = fault_class.code();
    let mut metadata = context_metadata(context);
    metadata.insert("faultCode".to_owned(), raw_code.to_string());
    let task_fault = TaskFault {
        code: i32::try_from(raw_code)
            .ok()
            .and_then(|value| FaultCode::try_from(value).ok())
            .unwrap_or(FaultCode::Unspecified) as i32,
        raw_code,
        method: context.method.to_owned(),
    };
    let details = vec![
        error_info(fault_class.reason(), CONTROLLER_DOMAIN, metadata),
        Any {
            type_url: TASK_FAULT_TYPE_URL.to_owned(),
            value: task_fault.encode_to_vec(),
        },
    ];
    let retry_after = fault_class.retry().has_retry_info().then_some(retry.delay);
    let message = format!(
        "{}: controller fault {raw_code} {}: {}",
        describe(context),
        fault_class.reason(),
        fault_class.meaning().trim_end_matches('.'),
    );
    build(fault_class.grpc_code(), message, details, retry_after)
}

fn invalid_argument(context: &CallContext, violations: &[Violation]) -> Status {
    bad_request(describe(context), context_metadata(context), violations)
}

/// INVALID_ARGUMENT with a `BadRequest` of `violations`; `subject` starts the message. Only the
/// first [`MAX_VIOLATIONS_SHOWN`] are listed, then a count of the rest, in the message and as a
/// last violation.
fn bad_request(
    subject: String,
    mut metadata: HashMap<String, String>,
    violations: &[Violation],
) -> Status {
    if let Some(first) = violations.first() {
        metadata.insert("field".to_owned(), first.field.to_owned());
    }
    let shown = &violations[..violations.len().min(MAX_VIOLATIONS_SHOWN)];
    let mut field_violations: Vec<FieldViolation> = shown
        .iter()
        .map(|violation| FieldViolation::new(violation.field, &violation.description))
        .collect();
    if let Some(first_unshown) = violations.get(shown.len()) {
        let rest = format!("and {} more", violations.len() - shown.len());
        field_violations.push(FieldViolation::new(first_unshown.field, rest));
    }
    let descriptions: Vec<&str> = field_violations
        .iter()
        .map(|violation| violation.description.as_str())
        .collect();
    let message = format!("{subject}: {}", descriptions.join("; "));
    let details = vec![
        error_info(
            gateway_error::INVALID_PARAMETER.reason,
            GATEWAY_DOMAIN,
            metadata,
        ),
        Any {
            type_url: BadRequest::TYPE_URL.to_owned(),
            value: pb::BadRequest::from(BadRequest::new(field_violations)).encode_to_vec(),
        },
    ];
    build(
        gateway_error::INVALID_PARAMETER.code,
        message,
        details,
        None,
    )
}

fn describe(context: &CallContext) -> String {
    let call = match context.bin_id {
        Some(bin_id) => format!("{} port {} bin {bin_id}", context.method, context.port_id),
        None => format!("{} port {}", context.method, context.port_id),
    };
    match context.reading_after {
        Some(request_id) => {
            format!("{call}, reading the port after the unknown outcome of request_id {request_id}")
        }
        None => call,
    }
}

fn context_metadata(context: &CallContext) -> HashMap<String, String> {
    let mut metadata = HashMap::from([
        ("method".to_owned(), context.method.to_owned()),
        ("portId".to_owned(), context.port_id.to_string()),
    ]);
    if let Some(bin_id) = context.bin_id {
        metadata.insert("binId".to_owned(), bin_id.to_string());
    }
    if let Some(request_id) = context.reading_after {
        metadata.insert("requestId".to_owned(), request_id.to_string());
        metadata.insert(
            gateway_error::REQUEST_OUTCOME_KEY.to_owned(),
            gateway_error::OUTCOME_UNKNOWN.to_owned(),
        );
    }
    metadata
}

/// `elapsed` to whole milliseconds, as a message states it.
fn round_to_millis(elapsed: Duration) -> Duration {
    Duration::from_millis(elapsed.as_millis() as u64)
}

fn error_info(reason: &str, domain: &str, metadata: HashMap<String, String>) -> Any {
    Any {
        type_url: ErrorInfo::TYPE_URL.to_owned(),
        value: pb::ErrorInfo::from(ErrorInfo::new(reason, domain, metadata)).encode_to_vec(),
    }
}

/// The trailer gRPC's own retry reads for the delay before the next attempt (gRFC A6,
/// "pushback"): grpc-core and grpc-go honour it, and ignore `RetryInfo`.
const RETRY_PUSHBACK_TRAILER: &str = "grpc-retry-pushback-ms";

/// The pushback trailer's value for `delay`: the delay times a factor drawn in [1, 1.5), per
/// status. gRPC's built-in retry waits exactly what the trailer says, with no jitter of its own,
/// so every client turned away by one outage would otherwise come back in the same millisecond;
/// `RetryInfo` keeps the delay itself, the minimum.
fn pushback_millis(delay: Duration) -> u64 {
    let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    let spread = millis / 2;
    let jitter = if spread == 0 {
        0
    } else {
        fastrand::u64(..spread)
    };
    millis.saturating_add(jitter)
}

/// Encodes the `google.rpc.Status` by hand: tonic-types builds only the standard details, and
/// every fault also carries our own `TaskFault`. With `retry_after`, the status says a retry is
/// safe after that delay twice, in one place so the two cannot disagree: as `RetryInfo`, for
/// callers that read the details, and as the pushback trailer, jittered above it
/// ([`pushback_millis`]), for gRPC's built-in retry.
fn build(
    code: Code,
    mut message: String,
    mut details: Vec<Any>,
    retry_after: Option<Duration>,
) -> Status {
    if message.len() > MAX_MESSAGE_BYTES {
        let ellipsis = '…';
        let mut cut = MAX_MESSAGE_BYTES - ellipsis.len_utf8();
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push(ellipsis);
    }
    if let Some(delay) = retry_after {
        details.push(Any {
            type_url: RetryInfo::TYPE_URL.to_owned(),
            value: pb::RetryInfo::from(RetryInfo::new(Some(delay))).encode_to_vec(),
        });
    }
    let rpc_status = pb::Status {
        code: code as i32,
        message: message.clone(),
        details,
    };
    let mut status = Status::with_details(code, message, rpc_status.encode_to_vec().into());
    if let Some(delay) = retry_after {
        status.metadata_mut().insert(
            RETRY_PUSHBACK_TRAILER,
            MetadataValue::from(pushback_millis(delay)),
        );
    }
    status
}

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    const CONTEXT: CallContext = CallContext {
        method: "case_extract",
        port_id: 4,
        bin_id: Some(101337),
        reading_after: None,
    };
    const RETRY: RetryPolicy = RetryPolicy {
        delay: Duration::from_millis(1500),
    };

    fn task_fault(status: &Status) -> Option<TaskFault> {
        let rpc_status = pb::Status::decode(status.details()).unwrap();
        rpc_status
            .details
            .iter()
            .find(|any| any.type_url == TASK_FAULT_TYPE_URL)
            .map(|any| TaskFault::decode(any.value.as_slice()).unwrap())
    }

    fn check_fault(raw_code: u32, code: Code, reason: &str, fault_code: FaultCode) {
        let status = status(&CONTEXT, &CallError::Fault(raw_code), RETRY);
        assert_eq!(
            status.get_details_retry_info().is_some(),
            fault::classify(raw_code).retry().has_retry_info(),
            "RetryInfo of {raw_code}"
        );
        assert_eq!(status.code(), code, "{raw_code}");
        let error_info = status.get_details_error_info().unwrap();
        assert_eq!(error_info.reason, reason);
        assert_eq!(error_info.domain, CONTROLLER_DOMAIN);
        assert_eq!(error_info.metadata["faultCode"], raw_code.to_string());
        assert_eq!(error_info.metadata["portId"], "4");
        assert_eq!(error_info.metadata["binId"], "101337");
        assert_eq!(error_info.metadata["method"], "case_extract");
        assert_eq!(
            task_fault(&status),
            Some(TaskFault {
                code: fault_code as i32,
                raw_code,
                method: "case_extract".to_owned()
            })
        );
    }

    #[test]
    fn every_known_fault_carries_its_table_row() {
        for row in fault::FAULTS {
            let fault_code = FaultCode::from_str_name(&format!("FAULT_CODE_{}", row.name)).unwrap();
            check_fault(row.code, row.grpc_code, row.name, fault_code);
        }
    }

    #[test]
    fn unknown_and_out_of_range_faults() {
        check_fault(1005, Code::Unknown, "UNKNOWN_FAULT", FaultCode::Unspecified);
        check_fault(
            2001,
            Code::Internal,
            "CONTROLLER_INTERNAL_ERROR",
            FaultCode::Unspecified,
        );
        check_fault(
            7,
            Code::Internal,
            "CONTROLLER_INTERNAL_ERROR",
            FaultCode::Unspecified,
        );
    }

    #[test]
    fn fault_1148_is_unavailable_with_retry_info() {
        let status = status(&CONTEXT, &CallError::Fault(1148), RETRY);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "case_extract port 4 bin 101337: controller fault 1148 PREVIOUS_ACTION_NOT_COMPLETED: \
             New action cannot be started until the previous action has been completed"
        );
        let retry_info = status.get_details_retry_info().unwrap();
        assert_eq!(retry_info.retry_delay, Some(Duration::from_millis(1500)));
    }

    /// Clients pushed back by one outage come back spread over half the delay again, never
    /// sooner than `RetryInfo` says.
    #[test]
    fn the_pushback_trailer_is_jittered_above_retry_info() {
        let pushbacks: Vec<u64> = (0..200)
            .map(|_| {
                let status = status(&CONTEXT, &CallError::Fault(1148), RETRY);
                let retry_info = status.get_details_retry_info().unwrap();
                assert_eq!(retry_info.retry_delay, Some(Duration::from_millis(1500)));
                let trailer = status.metadata().get(RETRY_PUSHBACK_TRAILER).unwrap();
                trailer.to_str().unwrap().parse().unwrap()
            })
            .collect();
        assert!(
            pushbacks.iter().all(|millis| (1500..2250).contains(millis)),
            "{pushbacks:?}"
        );
        let distinct: std::collections::HashSet<_> = pushbacks.iter().collect();
        assert!(distinct.len() > 100, "{pushbacks:?}");
    }

    #[test]
    fn a_call_without_a_bin_names_none() {
        let context = CallContext {
            method: "case_getstate",
            port_id: 1,
            bin_id: None,
            reading_after: None,
        };
        let status = status(&context, &CallError::Fault(1087), RETRY);
        assert_eq!(
            status.message(),
            "case_getstate port 1: controller fault 1087 PORT_IS_NOT_AUTOCASE: The Port \
             specified is not an AutoCase port"
        );
        let expected = [
            ("faultCode", "1087"),
            ("method", "case_getstate"),
            ("portId", "1"),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned()));
        assert_eq!(
            status.get_details_error_info().unwrap().metadata,
            HashMap::from(expected)
        );
    }

    #[test]
    fn other_faults_have_no_retry_info() {
        let status = status(&CONTEXT, &CallError::Fault(1149), RETRY);
        assert!(status.get_details_retry_info().is_none());
    }

    #[test]
    fn invalid_arguments_carry_bad_request() {
        let violations = vec![Violation {
            field: "port_id",
            description: "port_id 0 is out of range 1-2000".to_owned(),
        }];
        let status = status(&CONTEXT, &CallError::InvalidArgument(violations), RETRY);
        assert_eq!(status.code(), Code::InvalidArgument);
        let error_info = status.get_details_error_info().unwrap();
        assert_eq!(error_info.reason, "INVALID_PARAMETER");
        assert_eq!(error_info.domain, GATEWAY_DOMAIN);
        let bad_request = status.get_details_bad_request().unwrap();
        assert_eq!(bad_request.field_violations[0].field, "port_id");
        assert_eq!(task_fault(&status), None);
    }

    #[test]
    fn a_bad_request_lists_the_first_violations_and_counts_the_rest() {
        let violations: Vec<Violation> = (2001..2013)
            .map(|port_id| Violation {
                field: "port_ids",
                description: format!("port_ids {port_id} is out of range 1-2000"),
            })
            .collect();
        let status = watch_invalid_ports(&violations);
        let listed: Vec<String> = (2001..2011)
            .map(|port_id| format!("port_ids {port_id} is out of range 1-2000"))
            .chain(["and 2 more".to_owned()])
            .collect();
        assert_eq!(
            status.message(),
            format!("WatchCaseEvents: {}", listed.join("; "))
        );
        let bad_request = status.get_details_bad_request().unwrap();
        let described: Vec<(&str, &str)> = bad_request
            .field_violations
            .iter()
            .map(|violation| (violation.field.as_str(), violation.description.as_str()))
            .collect();
        let expected: Vec<(&str, &str)> = listed
            .iter()
            .map(|text| ("port_ids", text.as_str()))
            .collect();
        assert_eq!(described, expected);
    }

    #[test]
    fn a_message_is_cut_short_past_1_kib() {
        let long = "é".repeat(2000);
        let status = second_request_message(&long);
        assert_eq!(status.message().len(), MAX_MESSAGE_BYTES - 1);
        assert!(status.message().ends_with("éé…"), "{}", status.message());
        let rpc_status = pb::Status::decode(status.details()).unwrap();
        assert_eq!(rpc_status.message, status.message());
    }

    const REQUEST_ID: Uuid = Uuid::from_u128(0x9f1c2b3a_4d5e_4f60_8a7b_1c2d3e4f5a6b);

    /// A repeat after an unknown outcome whose port read fails keeps the read's code (retrying
    /// it only reads the port again), but says, in the message and in `ErrorInfo`, that the
    /// earlier call's outcome is unknown: a client must not take `UNAVAILABLE` here for "did
    /// not act".
    #[test]
    fn a_failed_port_read_after_an_unknown_outcome_is_marked() {
        let unreachable = UpstreamError::Unreachable {
            error: "connection refused".into(),
            proxied: false,
        };
        let error = CallError::ReadingThePort {
            request_id: REQUEST_ID,
            error: Box::new(CallError::Upstream(unreachable)),
        };
        let status = status(&CONTEXT, &error, RETRY);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "case_getstate port 4, reading the port after the unknown outcome of request_id \
             9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b: cannot connect to the controller: connection \
             refused"
        );
        let error_info = status.get_details_error_info().unwrap();
        assert_eq!(error_info.reason, "UPSTREAM_UNREACHABLE");
        assert_eq!(error_info.metadata["method"], "case_getstate");
        assert_eq!(
            error_info.metadata["requestId"],
            "9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b"
        );
        assert_eq!(error_info.metadata["requestOutcome"], "unknown");
        assert!(status.get_details_retry_info().is_some());
        let fault = CallError::ReadingThePort {
            request_id: REQUEST_ID,
            error: Box::new(CallError::Fault(1087)),
        };
        let faulted = super::status(&CONTEXT, &fault, RETRY);
        let error_info = faulted.get_details_error_info().unwrap();
        assert_eq!(error_info.metadata["requestOutcome"], "unknown");
        assert!(
            faulted.message().starts_with(
                "case_getstate port 4, reading the port after the unknown outcome of request_id \
                 9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b: controller fault 1087 "
            ),
            "{}",
            faulted.message()
        );
    }

    /// A port that would show the call not acted on, read too long after the call was sent,
    /// proves nothing: the message says what was seen and how long ago.
    #[test]
    fn a_port_read_too_late_is_named_with_the_time_passed() {
        let error = CallError::OutcomeUnknown {
            request_id: REQUEST_ID,
            bin_id: None,
            case_state: CaseState::Noop,
            too_late: Some(Duration::from_micros(12_345_678)),
        };
        let status = status(&CONTEXT, &error, RETRY);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "case_extract port 4 bin 101337: the first call with request_id \
             9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b may have been acted on, and case_getstate \
             shows the port in NOOP with no bin, read 12s 345ms after that call was sent, too \
             long after (more than 10s) to prove it was not: the port may have moved on since; \
             nothing was sent: read the port with CaseGetState and decide"
        );
        let error_info = status.get_details_error_info().unwrap();
        assert_eq!(error_info.reason, "REQUEST_OUTCOME_UNKNOWN");
        assert_eq!(error_info.metadata["caseState"], "NOOP");
    }

    #[test]
    fn a_full_idempotency_table_refuses_a_new_id_before_sending() {
        let error = CallError::IdempotencyTableFull {
            request_id: REQUEST_ID,
            max_entries: 65536,
            window: Duration::from_secs(600),
        };
        let status = status(&CONTEXT, &error, RETRY);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "case_extract port 4 bin 101337: request_id 9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b is \
             new, and all 65536 remembered request_ids (--idempotency-max-entries) are in flight \
             or have an unknown outcome, which are kept for --idempotency-window (10m) after \
             their call ended; nothing was sent: retry later, with backoff"
        );
        let error_info = status.get_details_error_info().unwrap();
        assert_eq!(error_info.reason, "IDEMPOTENCY_TABLE_FULL");
        assert_eq!(
            error_info.metadata["requestId"],
            "9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b"
        );
        assert!(status.get_details_retry_info().is_none());
    }

    #[test]
    fn overload_is_resource_exhausted() {
        let status = status(&CONTEXT, &CallError::Overloaded, RETRY);
        assert_eq!(status.code(), Code::ResourceExhausted);
        let error_info = status.get_details_error_info().unwrap();
        assert_eq!(error_info.reason, "OVERLOADED");
        assert_eq!(error_info.domain, GATEWAY_DOMAIN);
        assert!(status.get_details_retry_info().is_none());
    }

    #[test]
    fn upstream_errors() {
        let check = |upstream_error: UpstreamError, code: Code, reason: &str| {
            let status = status(&CONTEXT, &CallError::Upstream(upstream_error), RETRY);
            assert_eq!(status.code(), code, "{reason}");
            let error_info = status.get_details_error_info().unwrap();
            assert_eq!(error_info.reason, reason);
            assert_eq!(error_info.domain, GATEWAY_DOMAIN);
            status
        };
        let http = |code: u16| UpstreamError::HttpStatus {
            status: hyper::StatusCode::from_u16(code).unwrap(),
            success: false,
            proxied: false,
        };
        // The controller may have acted: a code no standard retry policy retries, no RetryInfo.
        for http_status in [500, 502, 504, 599] {
            let status = check(http(http_status), Code::Unknown, "UPSTREAM_HTTP_ERROR");
            assert_eq!(
                status.get_details_error_info().unwrap().metadata["httpStatus"],
                http_status.to_string()
            );
            assert!(status.get_details_retry_info().is_none(), "{http_status}");
        }
        // The controller declined: UNAVAILABLE, with the delay to wait.
        for http_status in [503, 429] {
            let status = check(http(http_status), Code::Unavailable, "UPSTREAM_HTTP_ERROR");
            let retry_info = status.get_details_retry_info().unwrap();
            assert_eq!(retry_info.retry_delay, Some(Duration::from_millis(1500)));
        }
        // Through --upstream-proxy to an http:// controller, a 503 or 429 may be the proxy's,
        // sent after it passed the request on: the controller may have acted.
        for http_status in [503, 429] {
            let proxied = UpstreamError::HttpStatus {
                status: hyper::StatusCode::from_u16(http_status).unwrap(),
                success: false,
                proxied: true,
            };
            let status = check(proxied, Code::Unknown, "UPSTREAM_HTTP_ERROR");
            assert!(status.get_details_retry_info().is_none(), "{http_status}");
            assert_eq!(
                status.message(),
                format!(
                    "case_extract port 4 bin 101337: --upstream-proxy, or the controller behind \
                     it, answered HTTP {}",
                    hyper::StatusCode::from_u16(http_status).unwrap()
                )
            );
        }
        check(http(404), Code::Internal, "UPSTREAM_HTTP_ERROR");
        check(http(302), Code::Internal, "UPSTREAM_HTTP_ERROR");
        let status = check(
            UpstreamError::ConnectionLost("connection closed before message completed".into()),
            Code::Unknown,
            "UPSTREAM_CONNECTION_LOST",
        );
        assert_eq!(
            status.message(),
            "case_extract port 4 bin 101337: the connection to the controller failed: connection \
             closed before message completed"
        );
        assert!(status.get_details_retry_info().is_none());
        check(
            UpstreamError::Timeout {
                limit: Duration::from_millis(250),
            },
            Code::DeadlineExceeded,
            "UPSTREAM_TIMEOUT",
        );
        check(
            UpstreamError::ResponseTooLarge { limit: 10 },
            Code::Internal,
            "UPSTREAM_RESPONSE_TOO_LARGE",
        );
        check(
            UpstreamError::BadResponse(crate::codec::DecodeError::Doctype),
            Code::Internal,
            "UPSTREAM_BAD_RESPONSE",
        );
    }
}
