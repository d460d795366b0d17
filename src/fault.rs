//! The fault table: every known controller fault code with its vendor name, meaning, gRPC code and
//! retry policy.
//!
//! This table is the single source of truth for faults. The proto enum `taskgate.v1.FaultCode`,
//! its comments and the README's error table are checked against it by tests; `status` reads the
//! gRPC code and whether to send a `RetryInfo` from it, and the simulator names the faults it
//! answers by its constants. This module does no I/O.

use tonic::Code;

/// One known controller fault: a row of [`FAULTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The controller's numeric code, as sent in `<fault><code>`.
    pub code: u32,
    /// The vendor's symbolic name, spelling kept (`FULLFILLS`) so integrators can search for it.
    pub name: &'static str,
    /// What the fault means, in the vendor's words where the vendor gave any.
    pub meaning: &'static str,
    /// The gRPC status code a caller receives for this fault.
    pub grpc_code: Code,
    /// What a caller may do about it; also whether the status carries a `RetryInfo`.
    pub retry: Retry,
}

/// What a caller should do after a fault: the table's retry column. One value decides both what
/// the docs advise and whether the status carries a `google.rpc.RetryInfo`, so the two cannot
/// disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The controller certainly did not start the action, so retrying is safe: the status
    /// carries a `RetryInfo` with the delay to wait.
    AfterDelay,
    /// The request itself is wrong; the same request fails again.
    FixRequest,
    /// An id names nothing the controller knows.
    CheckIds,
    /// The port is not in a state that allows the action.
    AfterPortChange,
    /// A 1xxx code the gateway does not know: what the controller did is unknown.
    Report,
    /// A code outside the documented range: the controller's own internal error.
    ContactSupport,
}

/// How a raw fault code from the controller is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// A code listed in [`FAULTS`].
    Known(&'static Fault),
    /// A code in the documented 1000–1999 range that this table does not list.
    Unknown(u32),
    /// A code outside 1000–1999: the vendor calls these the controller's internal errors.
    OutOfRange(u32),
}

/// Declares each fault once: a constant named after the vendor's name (so code outside this
/// table names a fault, never its number), and its row in [`FAULTS`], in the order written. The
/// `http` crate declares its `StatusCode` constants and their reasons the same way.
macro_rules! fault_table {
    ($($name:ident = $code:literal, $grpc_code:ident, $retry:ident, $meaning:literal;)*) => {
        $(
            #[doc = concat!("Fault ", $code, ": ", $meaning)]
            pub const $name: Fault = Fault {
                code: $code,
                name: stringify!($name),
                meaning: $meaning,
                grpc_code: Code::$grpc_code,
                retry: Retry::$retry,
            };
        )*

        /// Every known fault, ordered by code.
        pub const FAULTS: &[Fault] = &[$($name),*];
    };
}

fault_table! {
    PORT_IS_NOT_AVAILABLE = 1000, NotFound, CheckIds,
        "The specified port does not exist.";
    PORT_IS_CLOSING = 1001, FailedPrecondition, AfterPortChange,
        "The specified port is closing.";
    PORT_IS_ALREADY_OPEN = 1002, FailedPrecondition, AfterPortChange,
        "The specified port is already open.";
    MISSING_PARAMETER_PORT_ID = 1003, InvalidArgument, FixRequest,
        "The mandatory parameter port_id is missing.";
    INVALID_PARAMETER_PORT_ID = 1004, InvalidArgument, FixRequest,
        "The parameter port_id is invalid (bad format or out of range).";
    INVALID_PARAMETER_CONTENT = 1006, InvalidArgument, FixRequest,
        "The parameter content is invalid (bad format or out of range).";
    INVALID_PARAMETER_CATEGORY = 1007, InvalidArgument, FixRequest,
        "The parameter category is invalid (bad format or out of range).";
    INVALID_PARAMETER_REQ_TIME = 1008, InvalidArgument, FixRequest,
        "The parameter req_time is invalid (bad format or out of range).";
    PORT_IS_NOT_OPEN = 1009, FailedPrecondition, AfterPortChange,
        "The specified port is not open.";
    INVALID_PARAMETER_BIN_ID = 1010, InvalidArgument, FixRequest,
        "The parameter bin_id is invalid (bad format or out of range).";
    BIN_DOES_NOT_EXIST = 1011, NotFound, CheckIds,
        "The specified bin does not exist.";
    INVALID_PARAMETER_TASK_ID = 1012, InvalidArgument, FixRequest,
        "The parameter task_id is invalid (bad format or out of range).";
    INVALID_PARAMETER_TASKGROUP_ID = 1013, InvalidArgument, FixRequest,
        "The parameter taskgroup_id is invalid (bad format or out of range).";
    INVALID_PARAMETER_SHIPMENT = 1014, InvalidArgument, FixRequest,
        "The parameter shipment is invalid (bad format or out of range).";
    NO_TASKS_OR_BINS_FULFILLS_PORT_SELECT = 1015, FailedPrecondition, AfterPortChange,
        "No tasks or bins satisfy the port's select requirements.";
    NO_READY_BINS_FULLFILLS_PORT_SELECT = 1016, FailedPrecondition, AfterPortChange,
        "No ready bins satisfy the port's select requirements.";
    TASK_DOES_NOT_EXIST = 1017, NotFound, CheckIds,
        "The specified task does not exist.";
    TASKGROUP_DOES_NOT_EXIST = 1018, NotFound, CheckIds,
        "The specified task group does not exist.";
    TASKGROUP_IS_SELECTED_BY_ANOTHER_PORT = 1019, FailedPrecondition, AfterPortChange,
        "The task group is selected by another port.";
    CONFLICTS_WITH_PREV_OPENBIN = 1020, FailedPrecondition, AfterPortChange,
        "This openbin conflicts with an earlier openbin that has not been closed yet.";
    CONFLICTS_WITH_SELECTED_SHIPMENT = 1021, FailedPrecondition, AfterPortChange,
        "The request conflicts with the port's selected shipment.";
    PORT_IS_NOT_AUTOCASE = 1087, FailedPrecondition, AfterPortChange,
        "The Port specified is not an AutoCase port.";
    PORT_NOT_IN_APPROPRIATE_MODE = 1099, FailedPrecondition, AfterPortChange,
        "Port is not in the appropriate mode (open).";
    // A new action arrived while the previous one still runs: the one fault where the controller
    // certainly did nothing, so a retry is safe.
    PREVIOUS_ACTION_NOT_COMPLETED = 1148, Unavailable, AfterDelay,
        "New action cannot be started until the previous action has been completed.";
    BIN_NOT_SELECTED_FOR_PORT = 1149, FailedPrecondition, AfterPortChange,
        "The specified bin is not selected for the specified port, the requested operation is therefore invalid.";
}

/// The lowest and highest code the vendor allows the interface to return; anything else is an
/// internal controller error that "should not be exposed to the WMS".
pub const DOCUMENTED_RANGE: std::ops::RangeInclusive<u32> = 1000..=1999;

/// The `ErrorInfo` domain of faults the controller reported; its metadata `faultCode` is the
/// code.
pub const DOMAIN: &str = "autostore.task";

/// Classifies a raw fault code from the controller.
pub fn classify(code: u32) -> FaultClass {
    match FAULTS.binary_search_by_key(&code, |fault| fault.code) {
        Ok(index) => FaultClass::Known(&FAULTS[index]),
        Err(_) if DOCUMENTED_RANGE.contains(&code) => FaultClass::Unknown(code),
        Err(_) => FaultClass::OutOfRange(code),
    }
}

/// Looks up a known fault by code.
pub fn known(code: u32) -> Option<&'static Fault> {
    match classify(code) {
        FaultClass::Known(fault) => Some(fault),
        FaultClass::Unknown(_) | FaultClass::OutOfRange(_) => None,
    }
}

/// How many status codes gRPC defines: 0 (`OK`) to 16 (`UNAUTHENTICATED`), so a code's number
/// can index a table of this size.
pub const GRPC_CODE_COUNT: usize = 17;

/// The canonical gRPC name of a code, as every gRPC library prints it.
pub fn grpc_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// === impl Retry ===

impl Retry {
    /// What a caller should do, as the README's error table and the proto's comments say it.
    pub fn advice(self) -> &'static str {
        match self {
            Retry::AfterDelay => {
                "retry after the RetryInfo delay; the controller did not start the action"
            }
            Retry::FixRequest => "do not retry; fix the request",
            Retry::CheckIds => "do not retry; check the port, bin or task id",
            Retry::AfterPortChange => "do not retry until the port's state changes",
            Retry::Report => "do not retry; report it",
            Retry::ContactSupport => "do not retry; contact AutoStore support",
        }
    }

    /// Whether the controller may have acted on the call. A fault it sent from the vendor's list
    /// means it refused the action; after any other code, what it did is unknown.
    pub fn controller_may_have_acted(self) -> bool {
        match self {
            Retry::AfterDelay | Retry::FixRequest | Retry::CheckIds | Retry::AfterPortChange => {
                false
            }
            Retry::Report | Retry::ContactSupport => true,
        }
    }

    /// Whether the gateway keeps the fault as the answer to its call's `request_id`, for a
    /// repeat to get again: a refusal that a retry would not change. After 1148 the controller
    /// started nothing, so a repeat calls again; after a code outside the vendor's list what it
    /// did is unknown, so a repeat reads the port first.
    pub fn kept_for_repeats(self) -> bool {
        !self.has_retry_info() && !self.controller_may_have_acted()
    }

    /// Whether the status tells the caller how long to wait, in a `google.rpc.RetryInfo`.
    pub fn has_retry_info(self) -> bool {
        match self {
            Retry::AfterDelay => true,
            Retry::FixRequest
            | Retry::CheckIds
            | Retry::AfterPortChange
            | Retry::Report
            | Retry::ContactSupport => false,
        }
    }
}

// === impl FaultClass ===

impl FaultClass {
    /// The raw code as the controller sent it.
    pub fn code(&self) -> u32 {
        match self {
            FaultClass::Known(fault) => fault.code,
            FaultClass::Unknown(code) | FaultClass::OutOfRange(code) => *code,
        }
    }

    /// The `ErrorInfo` reason: the vendor name, or a fixed word for codes we do not know.
    pub fn reason(&self) -> &'static str {
        match self {
            FaultClass::Known(fault) => fault.name,
            FaultClass::Unknown(_) => "UNKNOWN_FAULT",
            FaultClass::OutOfRange(_) => "CONTROLLER_INTERNAL_ERROR",
        }
    }

    /// A one-sentence meaning for messages.
    pub fn meaning(&self) -> &'static str {
        match self {
            FaultClass::Known(fault) => fault.meaning,
            FaultClass::Unknown(_) => "A fault code this gateway does not know.",
            FaultClass::OutOfRange(_) => {
                "An internal controller error outside the documented 1000-1999 range; contact AutoStore support."
            }
        }
    }

    /// The gRPC status code a caller receives.
    pub fn grpc_code(&self) -> Code {
        match self {
            FaultClass::Known(fault) => fault.grpc_code,
            FaultClass::Unknown(_) => Code::Unknown,
            FaultClass::OutOfRange(_) => Code::Internal,
        }
    }

    /// What a caller may do about it.
    pub fn retry(&self) -> Retry {
        match self {
            FaultClass::Known(fault) => fault.retry,
            FaultClass::Unknown(_) => Retry::Report,
            FaultClass::OutOfRange(_) => Retry::ContactSupport,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FaultCode;

    fn check(code: u32, expected_reason: &str, expected_grpc: Code, expected_retry: Retry) {
        let fault_class = classify(code);
        assert_eq!(fault_class.code(), code);
        assert_eq!(fault_class.reason(), expected_reason, "reason of {code}");
        assert_eq!(
            fault_class.grpc_code(),
            expected_grpc,
            "gRPC code of {code}"
        );
        assert_eq!(fault_class.retry(), expected_retry, "retry of {code}");
    }

    fn check_known(codes: &[u32], expected_grpc: Code, expected_retry: Retry) {
        for &code in codes {
            let name = known(code).unwrap().name;
            check(code, name, expected_grpc, expected_retry);
        }
    }

    #[test]
    fn every_code_maps_to_the_specified_grpc_code_and_retry() {
        check_known(&[1000, 1011, 1017, 1018], Code::NotFound, Retry::CheckIds);
        check_known(
            &[1003, 1004, 1006, 1007, 1008, 1010, 1012, 1013, 1014],
            Code::InvalidArgument,
            Retry::FixRequest,
        );
        check(
            1148,
            "PREVIOUS_ACTION_NOT_COMPLETED",
            Code::Unavailable,
            Retry::AfterDelay,
        );
        check_known(
            &[
                1001, 1002, 1009, 1015, 1016, 1019, 1020, 1021, 1087, 1099, 1149,
            ],
            Code::FailedPrecondition,
            Retry::AfterPortChange,
        );
        assert_eq!(
            FAULTS.len(),
            4 + 9 + 1 + 11,
            "a fault was added without a mapping test"
        );
    }

    #[test]
    fn only_a_retry_after_the_delay_carries_retry_info() {
        assert!(Retry::AfterDelay.has_retry_info());
        for retry in [
            Retry::FixRequest,
            Retry::CheckIds,
            Retry::AfterPortChange,
            Retry::Report,
            Retry::ContactSupport,
        ] {
            assert!(!retry.has_retry_info(), "{retry:?}");
        }
    }

    #[test]
    fn unknown_and_out_of_range_codes() {
        check(1005, "UNKNOWN_FAULT", Code::Unknown, Retry::Report);
        check(1999, "UNKNOWN_FAULT", Code::Unknown, Retry::Report);
        for code in [999, 2000, 0, u32::MAX] {
            check(
                code,
                "CONTROLLER_INTERNAL_ERROR",
                Code::Internal,
                Retry::ContactSupport,
            );
        }
    }

    #[test]
    fn table_is_sorted_so_binary_search_finds_every_row() {
        assert!(FAULTS.windows(2).all(|pair| pair[0].code < pair[1].code));
        for fault in FAULTS {
            assert_eq!(known(fault.code), Some(fault));
        }
    }

    #[test]
    fn table_matches_the_proto_enum_both_ways() {
        for fault in FAULTS {
            let proto_name = format!("FAULT_CODE_{}", fault.name);
            let fault_code = FaultCode::from_str_name(&proto_name)
                .unwrap_or_else(|| panic!("{proto_name} is missing from the proto"));
            assert_eq!(fault_code as i32, fault.code as i32, "{proto_name}");
        }
        for value in 1..=2000 {
            if let Ok(fault_code) = FaultCode::try_from(value) {
                let row = known(value as u32).unwrap_or_else(|| {
                    panic!(
                        "{} is in the proto but not in FAULTS",
                        fault_code.as_str_name()
                    )
                });
                assert_eq!(format!("FAULT_CODE_{}", row.name), fault_code.as_str_name());
            }
        }
    }
}
