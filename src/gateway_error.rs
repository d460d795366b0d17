//! The gateway-error table: every error the gateway itself detects on a call, with its
//! `ErrorInfo` reason, gRPC code, when it happens, whether the controller may have acted, and
//! what a caller may do.
//!
//! This table is the single source of truth for gateway errors, as [`crate::fault`] is for
//! controller faults: `status` reads the gRPC code, the reason and whether to send a `RetryInfo`
//! from it, and the README's "Gateway errors" table is checked against it by a test. The retry
//! contract lives here: `UNAVAILABLE` only where the controller started nothing, and a
//! `RetryInfo` only there. This module does no I/O.

use tonic::Code;

/// One error the gateway itself detects: a row of the README's "Gateway errors" table, which a
/// test checks against [`GATEWAY_ERRORS`]. A status of this row takes its code, its reason and
/// whether it carries a `RetryInfo` from here, so the README and the statuses cannot disagree.
#[derive(Debug)]
pub struct GatewayError {
    /// The `ErrorInfo` reason.
    pub reason: &'static str,
    /// The gRPC status code.
    pub code: Code,
    /// When a caller receives it, as the README says it.
    pub when: &'static str,
    /// Whether the gateway had taken the call's `request_id` (found it new, or held its call)
    /// when it answered this; refusals before that (auth, the in-flight limit, the message's
    /// checks) say nothing of the key. An answer after it, to a repeat, not marked
    /// `requestOutcome: unknown` nor replayed, says the gateway held no unknown outcome for the
    /// key: it took the call as new.
    pub key_claimed: bool,
    /// Whether the controller may have acted, and what a caller may do.
    pub retry: GatewayRetry,
}

/// What a caller may do after a gateway error, and whether the controller may have acted: the
/// two questions a retry policy must answer. Only a status whose controller started nothing
/// carries a `RetryInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayRetry {
    /// The controller started nothing, and a retry may succeed: the status carries a
    /// `RetryInfo` with the delay to wait.
    AfterDelay,
    /// The controller started nothing; the same call fails again unless the caller does this.
    NotActed(&'static str),
    /// The POST may have reached the controller and been acted on; the caller should do this.
    /// A repeat with the same `request_id`, to the gateway process that holds it, is settled
    /// there: it reads the port before it sends again (README, Idempotency).
    MayHaveActed(&'static str),
    /// The POST may have reached the controller and been acted on, and a repeat with the same
    /// `request_id` cannot settle it: the process that holds the key is stopping, such a repeat
    /// has already failed to, or its read of the port would go to the same wrong URL. The
    /// caller should do this.
    Unsettled(&'static str),
    /// The controller may have acted, and a repeat with the same `request_id` gets the first
    /// call's answer (within `--idempotency-window`, from the same gateway process): the one
    /// advice on which the operator console offers its Repeat button.
    RepeatSameKey,
}

/// What every WatchCaseEvents error names as its `method` in `ErrorInfo`: it calls no
/// task-interface method. Its statuses are not in [`GATEWAY_ERRORS`].
pub const WATCH_METHOD: &str = "WatchCaseEvents";

/// What the README advises after an error whose POST may have been acted on, where a repeat with
/// the same `request_id` is not the advice (the `MayHaveActed` rows).
const READ_THE_PORT_FIRST: &str = "no; read the port with `CaseGetState` first";

/// `port_id` or `bin_id` out of range.
pub const INVALID_PARAMETER: GatewayError = GatewayError {
    reason: "INVALID_PARAMETER",
    code: Code::InvalidArgument,
    when: "`port_id` outside 1–2000, `bin_id` outside 1–4000000, or a `request_id` that is not \
           a UUID in its hyphenated form or is the nil UUID; a `google.rpc.BadRequest` names each \
           field and range (at most ten, then a last one `and N more` counts the \
           rest, as the message does, so the reply stays within any client's header limit); the \
           controller was not called",
    key_claimed: false,
    retry: GatewayRetry::NotActed("no; fix the request"),
};
/// A `request_id` the gateway remembers, sent with other parameters.
pub const REQUEST_ID_REUSED: GatewayError = GatewayError {
    reason: "REQUEST_ID_REUSED",
    code: Code::InvalidArgument,
    when: "a `request_id` the gateway remembers (for `--idempotency-window` after its call \
           ended) came on another method, or with another `port_id` or `bin_id`; metadata \
           `requestId`; the controller was not called",
    key_claimed: false,
    retry: GatewayRetry::NotActed("no; send a fresh `request_id` for each new call"),
};
/// A repeat that waited for the first call with its `request_id` until its time ran out.
pub const REQUEST_IN_PROGRESS: GatewayError = GatewayError {
    reason: "REQUEST_IN_PROGRESS",
    code: Code::DeadlineExceeded,
    when: "a repeat of a `request_id` waited for its first call, still in flight, for the \
           smaller of its own deadline (less a margin of 10 %, at most 100 ms) and \
           `--upstream-timeout`; a first call that is itself a repeat reading the port, then \
           sending again, can take twice that; metadata `requestId`",
    key_claimed: true,
    retry: GatewayRetry::RepeatSameKey,
};
/// A repeat after an unknown outcome, and a port state, or a resend, that does not tell what
/// happened.
pub const REQUEST_OUTCOME_UNKNOWN: GatewayError = GatewayError {
    reason: "REQUEST_OUTCOME_UNKNOWN",
    code: Code::FailedPrecondition,
    when: "a repeat of a `request_id` whose first call may have been acted on (a row of this table \
           with \"yes\" in the next column), and `case_getstate` shows the port in a state \
           that neither proves the first call was accepted nor that it was not, or that would \
           show it not acted on but was read too long after the first call was sent (nothing \
           was sent); or showed it not acted on, and the call sent again ended other than OK \
           (nothing sent, a fault such as 1148 on CaseExtract or 1149 on CaseCancel, or an \
           unknown outcome again), as when the first call reached the controller after the port \
           was read; the message names the state and bin, and how long ago or how a resend \
           ended, metadata `requestId`, `caseState`",
    key_claimed: true,
    retry: GatewayRetry::Unsettled(
        "no, not even with the same `request_id`: read the port with `CaseGetState` and decide",
    ),
};
/// A new `request_id` while every remembered one is in flight or has an unknown outcome.
pub const IDEMPOTENCY_TABLE_FULL: GatewayError = GatewayError {
    reason: "IDEMPOTENCY_TABLE_FULL",
    code: Code::ResourceExhausted,
    when: "a new `request_id` came while all `--idempotency-max-entries` remembered ones were in \
           flight or had an unknown outcome, which are never forgotten before \
           `--idempotency-window` has passed (forgotten, a repeat would be sent without reading \
           the port); metadata `requestId`; the controller was not called",
    key_claimed: true,
    retry: GatewayRetry::NotActed(
        "later, with backoff, once entries have expired; or raise `--idempotency-max-entries`",
    ),
};
/// No connection to the controller could be made.
pub const UPSTREAM_UNREACHABLE: GatewayError = GatewayError {
    reason: "UPSTREAM_UNREACHABLE",
    code: Code::Unavailable,
    when: "the connection to the controller could not be made: refused, DNS failed, no \
           address of the controller's name answered within its share of \
           `--upstream-timeout`, the controller's TLS certificate was not trusted, or \
           `--upstream-proxy` refused the connection or its tunnel (tried twice); nothing was \
           sent",
    key_claimed: true,
    retry: GatewayRetry::AfterDelay,
};
/// The connection failed once the request may have been sent.
pub const UPSTREAM_CONNECTION_LOST: GatewayError = GatewayError {
    reason: "UPSTREAM_CONNECTION_LOST",
    code: Code::Unknown,
    when: "the connection failed after the request may have been sent: closed or reset before \
           or during the reply, a reply cut short, or bytes that are not an HTTP/1.1 reply \
           (garbage, two different `Content-Length`s)",
    key_claimed: true,
    retry: GatewayRetry::MayHaveActed(READ_THE_PORT_FIRST),
};
/// HTTP 503 or 429: by HTTP's definition of them, the request was not processed.
pub const UPSTREAM_HTTP_DECLINED: GatewayError = GatewayError {
    reason: "UPSTREAM_HTTP_ERROR",
    code: Code::Unavailable,
    when: "HTTP 503 or 429 without a fault or a success reply in the body: the controller \
           declined the request (as HTTP defines these statuses; the vendor does not document \
           them), unless it came through `--upstream-proxy` (next row); metadata `httpStatus`",
    key_claimed: true,
    retry: GatewayRetry::AfterDelay,
};
/// Any other 5xx: the controller, or a proxy before it, failed while handling the request.
pub const UPSTREAM_HTTP_SERVER_ERROR: GatewayError = GatewayError {
    reason: "UPSTREAM_HTTP_ERROR",
    code: Code::Unknown,
    when: "HTTP 500, 502, 504 or any other 5xx without a fault in the body, 503 included when \
           the body is a success reply (the controller says it acted), and 503 or 429 through \
           `--upstream-proxy` (a proxy may send one after it passed the request on): the \
           request may have been acted on before it failed; metadata `httpStatus`",
    key_claimed: true,
    retry: GatewayRetry::MayHaveActed(READ_THE_PORT_FIRST),
};
/// Any other non-2xx status: not what the task interface answers.
pub const UPSTREAM_HTTP_OTHER: GatewayError = GatewayError {
    reason: "UPSTREAM_HTTP_ERROR",
    code: Code::Internal,
    when: "any other non-2xx status without a fault in the body (`101`, `404`, `407`, 429 \
           with a success reply, …); metadata `httpStatus`",
    key_claimed: true,
    retry: GatewayRetry::Unsettled(
        "no, not even with the same `request_id`: check the controller URL and what answers \
         there, then read the port with `CaseGetState`",
    ),
};
/// No complete reply within the time limit.
pub const UPSTREAM_TIMEOUT: GatewayError = GatewayError {
    reason: "UPSTREAM_TIMEOUT",
    code: Code::DeadlineExceeded,
    when: "no reply within the smaller of your deadline (less a margin of 10 %, at most \
           100 ms) and `--upstream-timeout`; metadata `timeoutMs`",
    key_claimed: true,
    retry: GatewayRetry::MayHaveActed(READ_THE_PORT_FIRST),
};
/// A call still waiting for the controller when the shutdown grace ran out.
pub const SHUTDOWN_GRACE_RAN_OUT: GatewayError = GatewayError {
    reason: "SHUTDOWN_GRACE_RAN_OUT",
    code: Code::Unknown,
    when: "after SIGINT or SIGTERM, the call was still waiting for the controller when \
           `--shutdown-grace` ran out (less its last second, kept for answering): the gateway \
           stopped waiting, answered this and exited; the POST may have been sent; metadata \
           `grace`",
    key_claimed: true,
    retry: GatewayRetry::Unsettled(
        "no, not even with the same `request_id`: read the port with `CaseGetState` first",
    ),
};
/// A task call without a valid bearer token.
pub const UNAUTHENTICATED: GatewayError = GatewayError {
    reason: "UNAUTHENTICATED",
    code: Code::Unauthenticated,
    when: "auth is on and the call has no valid bearer token",
    key_claimed: false,
    retry: GatewayRetry::NotActed("with a valid token"),
};
/// Shed at the in-flight limit.
pub const OVERLOADED: GatewayError = GatewayError {
    reason: "OVERLOADED",
    code: Code::ResourceExhausted,
    when: "more than `--max-in-flight` task calls were in flight; this one was shed at once and \
           the controller was not called",
    key_claimed: false,
    retry: GatewayRetry::NotActed("yes, with backoff"),
};
/// A health Watch past `--max-health-watches`.
pub const TOO_MANY_HEALTH_WATCHES: GatewayError = GatewayError {
    reason: "TOO_MANY_WATCHES",
    code: Code::ResourceExhausted,
    when: "a health `Watch` while `--max-health-watches` are open (metadata `limit` only: it is \
           not a task call)",
    key_claimed: false,
    retry: GatewayRetry::NotActed("once a Watch has closed; or use `Check`"),
};
/// A deadline too short to call the controller at all.
pub const DEADLINE_TOO_SHORT: GatewayError = GatewayError {
    reason: "DEADLINE_TOO_SHORT",
    code: Code::DeadlineExceeded,
    when: "your deadline leaves less than 10 ms to call the controller; nothing was sent",
    key_claimed: true,
    retry: GatewayRetry::NotActed("with a longer deadline"),
};
/// A 2xx reply that is not a task-interface response.
pub const UPSTREAM_BAD_RESPONSE: GatewayError = GatewayError {
    reason: "UPSTREAM_BAD_RESPONSE",
    code: Code::Internal,
    when: "the reply is not a task-interface response (not XML, another root, a DOCTYPE, a \
           non-integer code, …); for CaseGetState also a reply without `port_id` or \
           `case_state`, with a state the gateway does not know, or about another port than \
           asked (never guessed at)",
    key_claimed: true,
    retry: GatewayRetry::MayHaveActed(READ_THE_PORT_FIRST),
};
/// A reply past `--max-response-bytes`.
pub const UPSTREAM_RESPONSE_TOO_LARGE: GatewayError = GatewayError {
    reason: "UPSTREAM_RESPONSE_TOO_LARGE",
    code: Code::Internal,
    when: "the reply is larger than `--max-response-bytes` (default 64 KiB)",
    key_claimed: true,
    retry: GatewayRetry::MayHaveActed(READ_THE_PORT_FIRST),
};

/// The `ErrorInfo` domain of errors the gateway itself detected.
pub const DOMAIN: &str = "taskgate";

/// The `ErrorInfo` metadata key, with value [`OUTCOME_UNKNOWN`], of a status that is not about
/// the call's own POST but about reading the port after the unknown outcome of an earlier call
/// with its `request_id` (metadata `requestId`): whatever the status's code and row, that
/// earlier call may have acted.
pub const REQUEST_OUTCOME_KEY: &str = "requestOutcome";
/// The value of [`REQUEST_OUTCOME_KEY`].
pub const OUTCOME_UNKNOWN: &str = "unknown";

/// The row of this table a status with ErrorInfo `reason` (domain [`DOMAIN`]) and `code` came
/// from: a reason alone is not enough, as `UPSTREAM_HTTP_ERROR` has three rows.
pub fn find(reason: &str, code: Code) -> Option<&'static GatewayError> {
    GATEWAY_ERRORS
        .iter()
        .copied()
        .find(|row| row.reason == reason && row.code == code)
}

/// Every gateway error of a call, in the README's order.
pub const GATEWAY_ERRORS: &[&GatewayError] = &[
    &INVALID_PARAMETER,
    &REQUEST_ID_REUSED,
    &REQUEST_IN_PROGRESS,
    &REQUEST_OUTCOME_UNKNOWN,
    &IDEMPOTENCY_TABLE_FULL,
    &UPSTREAM_UNREACHABLE,
    &UPSTREAM_CONNECTION_LOST,
    &UPSTREAM_HTTP_DECLINED,
    &UPSTREAM_HTTP_SERVER_ERROR,
    &UPSTREAM_HTTP_OTHER,
    &UPSTREAM_TIMEOUT,
    &SHUTDOWN_GRACE_RAN_OUT,
    &UNAUTHENTICATED,
    &OVERLOADED,
    &TOO_MANY_HEALTH_WATCHES,
    &DEADLINE_TOO_SHORT,
    &UPSTREAM_BAD_RESPONSE,
    &UPSTREAM_RESPONSE_TOO_LARGE,
];

// === impl GatewayRetry ===

impl GatewayRetry {
    /// What a caller may do, as the README's "Retry?" column says it.
    pub fn advice(self) -> &'static str {
        match self {
            GatewayRetry::AfterDelay => "yes, after the `RetryInfo` delay",
            GatewayRetry::NotActed(advice)
            | GatewayRetry::MayHaveActed(advice)
            | GatewayRetry::Unsettled(advice) => advice,
            GatewayRetry::RepeatSameKey => {
                "yes, with the same `request_id`: it gets the first call's answer"
            }
        }
    }

    /// Whether the advice is a repeat with the same `request_id`.
    pub fn repeat_same_key(self) -> bool {
        self == GatewayRetry::RepeatSameKey
    }

    /// Whether the controller may have acted on the call.
    pub fn controller_may_have_acted(self) -> bool {
        match self {
            GatewayRetry::AfterDelay | GatewayRetry::NotActed(_) => false,
            GatewayRetry::MayHaveActed(_)
            | GatewayRetry::Unsettled(_)
            | GatewayRetry::RepeatSameKey => true,
        }
    }

    /// Whether a repeat with the same `request_id` cannot settle what the call did.
    pub fn unsettled(self) -> bool {
        matches!(self, GatewayRetry::Unsettled(_))
    }

    /// Whether the status tells the caller how long to wait, in a `google.rpc.RetryInfo`.
    pub fn has_retry_info(self) -> bool {
        match self {
            GatewayRetry::AfterDelay => true,
            GatewayRetry::NotActed(_)
            | GatewayRetry::MayHaveActed(_)
            | GatewayRetry::Unsettled(_)
            | GatewayRetry::RepeatSameKey => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{FAULTS, FaultClass, classify};

    /// A row offers a repeat with the same `request_id` exactly where its README advice says so,
    /// and only where the controller may have acted (else a repeat is just a new call).
    #[test]
    fn a_same_key_repeat_is_offered_where_the_advice_says_so() {
        for row in GATEWAY_ERRORS {
            let advised = row
                .retry
                .advice()
                .contains("yes, with the same `request_id`");
            assert_eq!(row.retry.repeat_same_key(), advised, "{row:?}");
            assert!(
                !row.retry.repeat_same_key() || row.retry.controller_may_have_acted(),
                "{row:?}"
            );
        }
        assert!(GATEWAY_ERRORS.iter().any(|row| row.retry.repeat_same_key()));
    }

    /// A row says in its advice, as the README shows it, that a repeat with the same
    /// `request_id` cannot settle it exactly where it is `Unsettled`; and wherever the controller
    /// may have acted and that repeat is not the advice, the advice is to read the port first.
    #[test]
    fn the_advice_says_where_a_repeat_with_the_key_cannot_settle_it() {
        for row in GATEWAY_ERRORS {
            let advice = row.retry.advice();
            assert_eq!(
                row.retry.unsettled(),
                advice.contains("not even with the same `request_id`"),
                "{row:?}"
            );
            if row.retry.controller_may_have_acted() && !row.retry.repeat_same_key() {
                assert!(
                    advice.contains("read the port with `CaseGetState`"),
                    "{row:?}"
                );
            }
        }
        assert!(GATEWAY_ERRORS.iter().any(|row| row.retry.unsettled()));
    }

    /// The retry contract: a standard retry policy retries UNAVAILABLE and nothing else, so
    /// UNAVAILABLE is sent exactly where the controller started nothing and a retry is advised,
    /// with the delay; wherever the controller may have acted, the code is one no standard
    /// policy retries, and there is no `RetryInfo`.
    #[test]
    fn only_what_the_controller_did_not_act_on_is_unavailable() {
        for row in GATEWAY_ERRORS {
            let unavailable = row.code == Code::Unavailable;
            assert_eq!(unavailable, row.retry.has_retry_info(), "{row:?}");
            if row.retry.controller_may_have_acted() {
                assert!(!row.retry.has_retry_info(), "{row:?}");
                // FAILED_PRECONDITION: a repeat after an unknown outcome that the port's state
                // does not settle; no standard policy retries it, and the caller must decide.
                assert!(
                    [
                        Code::Unknown,
                        Code::DeadlineExceeded,
                        Code::Internal,
                        Code::FailedPrecondition
                    ]
                    .contains(&row.code),
                    "{row:?}"
                );
            }
        }
        let known = FAULTS.iter().map(FaultClass::Known);
        for fault_class in known.chain([classify(1005), classify(2000)]) {
            let retry = fault_class.retry();
            let unavailable = fault_class.grpc_code() == Code::Unavailable;
            assert_eq!(unavailable, retry.has_retry_info(), "{fault_class:?}");
            assert!(
                !(retry.has_retry_info() && retry.controller_may_have_acted()),
                "{fault_class:?}"
            );
        }
    }
}
