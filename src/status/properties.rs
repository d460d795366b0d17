//! Property tests of the status mapping (issue 11): any fault code, and every kind of upstream
//! error with any values, maps to exactly one documented status: the gRPC code, the message, one
//! `ErrorInfo` with the documented reason, domain and metadata, a `TaskFault` for a controller
//! fault, a `RetryInfo` exactly when the fault table (or the README's gateway table) says so,
//! and no other detail. The expectations are written out from the tables, not from `status`.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use tonic_types::StatusExt;

use super::*;
use crate::codec::DecodeError;

/// Cases per property; each builds and decodes one status in microseconds.
const CASES: u32 = 256;

/// What the documentation promises for one status.
#[derive(Debug)]
struct Documented {
    code: Code,
    reason: &'static str,
    domain: &'static str,
    /// Metadata besides `method`, `portId` and `binId`.
    extra_metadata: Vec<(&'static str, String)>,
    task_fault: Option<TaskFault>,
    retry_delay: Option<Duration>,
    message: String,
}

/// Fault codes: any `u32`, weighted towards the documented range, its edges and the table's
/// own codes.
fn fault_code() -> impl Strategy<Value = u32> {
    let known: Vec<u32> = fault::FAULTS.iter().map(|fault| fault.code).collect();
    prop_oneof![
        any::<u32>(),
        900_u32..2100,
        prop::sample::select(known),
        prop::sample::select(vec![0, 999, 1000, 1005, 1999, 2000, u32::MAX]),
    ]
}

fn context() -> impl Strategy<Value = CallContext> {
    (
        prop::sample::select(vec!["case_extract", "case_cancel", "case_getstate"]),
        any::<u32>(),
        // `case_getstate` names no bin.
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(method, port_id, bin_id)| CallContext {
            method,
            port_id,
            bin_id,
            reading_after: None,
        })
}

/// How the README's messages name a call: `method port P bin B`, or without a bin.
fn call_named(context: &CallContext) -> String {
    match context.bin_id {
        Some(bin_id) => format!("{} port {} bin {bin_id}", context.method, context.port_id),
        None => format!("{} port {}", context.method, context.port_id),
    }
}

fn retry_policy() -> impl Strategy<Value = RetryPolicy> {
    (0_u64..3_600_000).prop_map(|millis| RetryPolicy {
        delay: Duration::from_millis(millis),
    })
}

/// The fault table's row for `code`, read as the README reads it: a listed code keeps its row;
/// an unlisted 1000–1999 code is `UNKNOWN_FAULT`, UNKNOWN; anything else
/// `CONTROLLER_INTERNAL_ERROR`, INTERNAL; only `Retry::AfterDelay` carries a `RetryInfo`.
fn documented_fault(context: &CallContext, code: u32, retry: RetryPolicy) -> Documented {
    let row = fault::FAULTS.iter().find(|fault| fault.code == code);
    let (grpc_code, reason, meaning, after_delay) = match row {
        Some(row) => (
            row.grpc_code,
            row.name,
            row.meaning,
            row.retry == fault::Retry::AfterDelay,
        ),
        None if (1000..=1999).contains(&code) => (
            Code::Unknown,
            "UNKNOWN_FAULT",
            "A fault code this gateway does not know.",
            false,
        ),
        None => (
            Code::Internal,
            "CONTROLLER_INTERNAL_ERROR",
            "An internal controller error outside the documented 1000-1999 range; contact AutoStore support.",
            false,
        ),
    };
    let fault_code = row
        .and_then(|row| FaultCode::from_str_name(&format!("FAULT_CODE_{}", row.name)))
        .unwrap_or(FaultCode::Unspecified);
    Documented {
        code: grpc_code,
        reason,
        domain: CONTROLLER_DOMAIN,
        extra_metadata: vec![("faultCode", code.to_string())],
        task_fault: Some(TaskFault {
            code: fault_code as i32,
            raw_code: code,
            method: context.method.to_owned(),
        }),
        retry_delay: after_delay.then_some(retry.delay),
        message: format!(
            "{}: controller fault {code} {reason}: {}",
            call_named(context),
            meaning.trim_end_matches('.')
        ),
    }
}

/// An upstream error, as generated: `UpstreamError` may hold an `io::Error`, which cannot be
/// cloned, so the error itself is built per case.
#[derive(Debug, Clone)]
enum Kind {
    Unreachable(String),
    ConnectionLost(String),
    Timeout(Duration),
    /// The status, whether the body was a success reply, and whether it came through a proxy
    /// to an http:// controller.
    HttpStatus(u16, bool, bool),
    BadResponse(DecodeError),
    ResponseTooLarge(usize),
}

fn kind() -> impl Strategy<Value = Kind> {
    let decode_error = prop::sample::select(vec![
        DecodeError::Empty,
        DecodeError::Doctype,
        DecodeError::TooDeep,
        DecodeError::ParamsAndFault,
        DecodeError::UnknownEntity("e".to_owned()),
        DecodeError::UnexpectedRoot {
            expected: "response",
            found: "html".to_owned(),
        },
    ]);
    prop_oneof![
        "[a-z ]{0,20}".prop_map(Kind::Unreachable),
        "[a-z ]{0,20}".prop_map(Kind::ConnectionLost),
        (0_u64..10_000_000).prop_map(|millis| Kind::Timeout(Duration::from_millis(millis))),
        (100_u16..1000, any::<bool>(), any::<bool>())
            .prop_map(|(code, success, proxied)| Kind::HttpStatus(code, success, proxied)),
        // The statuses whose code differs from their neighbours'.
        (
            prop::sample::select(vec![429, 499, 500, 502, 503, 504, 599, 600]),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(code, success, proxied)| Kind::HttpStatus(code, success, proxied)),
        decode_error.prop_map(Kind::BadResponse),
        any::<usize>().prop_map(Kind::ResponseTooLarge),
    ]
}

fn upstream_error(kind: &Kind) -> UpstreamError {
    match kind {
        Kind::Unreachable(message) => UpstreamError::Unreachable {
            error: Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                message.clone(),
            )),
            proxied: false,
        },
        Kind::ConnectionLost(message) => UpstreamError::ConnectionLost(Box::new(
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, message.clone()),
        )),
        Kind::Timeout(limit) => UpstreamError::Timeout { limit: *limit },
        Kind::HttpStatus(code, success, proxied) => UpstreamError::HttpStatus {
            status: hyper::StatusCode::from_u16(*code).expect("100-999 is a valid status"),
            success: *success,
            proxied: *proxied,
        },
        Kind::BadResponse(error) => UpstreamError::BadResponse(error.clone()),
        Kind::ResponseTooLarge(limit) => UpstreamError::ResponseTooLarge { limit: *limit },
    }
}

/// The README's gateway error table, row by row.
fn documented_upstream(
    context: &CallContext,
    kind: &Kind,
    error: &UpstreamError,
    retry: RetryPolicy,
) -> Documented {
    let (code, reason, extra_metadata, retry_delay) = match kind {
        Kind::Unreachable(_) => (
            Code::Unavailable,
            "UPSTREAM_UNREACHABLE",
            vec![],
            Some(retry.delay),
        ),
        Kind::ConnectionLost(_) => (Code::Unknown, "UPSTREAM_CONNECTION_LOST", vec![], None),
        Kind::Timeout(limit) => (
            Code::DeadlineExceeded,
            "UPSTREAM_TIMEOUT",
            vec![("timeoutMs", limit.as_millis().to_string())],
            None,
        ),
        Kind::HttpStatus(http_status, success, proxied) => {
            // 503 and 429: the controller declined, so UNAVAILABLE with the delay, unless the
            // body is a success reply or a proxy may have sent it (then it may have acted, as
            // after any other 5xx: UNKNOWN); 600-999 are "others", like 4xx.
            let (code, retry_delay) = match http_status {
                429 | 503 if !success && !proxied => (Code::Unavailable, Some(retry.delay)),
                429 | 503 if *proxied => (Code::Unknown, None),
                500..=599 => (Code::Unknown, None),
                _ => (Code::Internal, None),
            };
            (
                code,
                "UPSTREAM_HTTP_ERROR",
                vec![("httpStatus", http_status.to_string())],
                retry_delay,
            )
        }
        Kind::BadResponse(_) => (Code::Internal, "UPSTREAM_BAD_RESPONSE", vec![], None),
        Kind::ResponseTooLarge(_) => (Code::Internal, "UPSTREAM_RESPONSE_TOO_LARGE", vec![], None),
    };
    Documented {
        code,
        reason,
        domain: GATEWAY_DOMAIN,
        extra_metadata,
        task_fault: None,
        retry_delay,
        message: format!("{}: {error}", call_named(context)),
    }
}

/// Checks `status` against `documented`, detail by detail, and that it has no other detail.
fn check(
    status: &Status,
    context: &CallContext,
    documented: &Documented,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(status.code(), documented.code);
    prop_assert_eq!(status.message(), documented.message.as_str());
    let rpc_status = pb::Status::decode(status.details()).unwrap();
    prop_assert_eq!(rpc_status.code, documented.code as i32);
    prop_assert_eq!(&rpc_status.message, &documented.message);
    let count = |type_url: &str| {
        rpc_status
            .details
            .iter()
            .filter(|any| any.type_url == type_url)
            .count()
    };
    let error_infos = count(ErrorInfo::TYPE_URL);
    let task_faults = count(TASK_FAULT_TYPE_URL);
    let retry_infos = count(RetryInfo::TYPE_URL);
    prop_assert_eq!(error_infos, 1, "exactly one ErrorInfo");
    prop_assert_eq!(task_faults, usize::from(documented.task_fault.is_some()));
    prop_assert_eq!(retry_infos, usize::from(documented.retry_delay.is_some()));
    let pushback = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .map(|millis| millis.to_str().unwrap().parse::<u128>().unwrap());
    prop_assert_eq!(pushback.is_some(), documented.retry_delay.is_some());
    if let (Some(pushback), Some(delay)) = (pushback, documented.retry_delay) {
        let floor = delay.as_millis();
        prop_assert!(
            floor <= pushback && (pushback < floor * 3 / 2 || pushback == floor),
            "the pushback trailer, {pushback} ms, lies in [RetryInfo, 1.5 RetryInfo) of {floor} ms"
        );
    }
    prop_assert_eq!(
        rpc_status.details.len(),
        error_infos + task_faults + retry_infos,
        "no other detail"
    );

    let error_info = status.get_details_error_info().unwrap();
    prop_assert_eq!(error_info.reason.as_str(), documented.reason);
    prop_assert_eq!(error_info.domain.as_str(), documented.domain);
    let mut metadata: HashMap<String, String> = HashMap::from([
        ("method".to_owned(), context.method.to_owned()),
        ("portId".to_owned(), context.port_id.to_string()),
    ]);
    if let Some(bin_id) = context.bin_id {
        metadata.insert("binId".to_owned(), bin_id.to_string());
    }
    for (key, value) in &documented.extra_metadata {
        metadata.insert((*key).to_owned(), value.clone());
    }
    prop_assert_eq!(&error_info.metadata, &metadata);

    let task_fault = rpc_status
        .details
        .iter()
        .find(|any| any.type_url == TASK_FAULT_TYPE_URL)
        .map(|any| TaskFault::decode(any.value.as_slice()).unwrap());
    prop_assert_eq!(&task_fault, &documented.task_fault);
    let retry_delay = status
        .get_details_retry_info()
        .and_then(|retry_info| retry_info.retry_delay);
    prop_assert_eq!(retry_delay, documented.retry_delay);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn every_fault_code_has_its_documented_status(
        code in fault_code(),
        context in context(),
        retry in retry_policy(),
    ) {
        let status = status(&context, &CallError::Fault(code), retry);
        check(&status, &context, &documented_fault(&context, code, retry))?;
    }

    #[test]
    fn every_upstream_error_has_its_documented_status(
        kind in kind(),
        context in context(),
        retry in retry_policy(),
    ) {
        let error = upstream_error(&kind);
        let documented = documented_upstream(&context, &kind, &error, retry);
        let status = status(&context, &CallError::Upstream(error), retry);
        check(&status, &context, &documented)?;
    }
}
