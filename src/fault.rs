//! The fault table: every known controller fault code with its vendor name, meaning, gRPC code and
//! retry advice.
//!
//! This table is the single source of truth for faults. The proto enum `taskgate.v1.FaultCode`,
//! its comments and the README's error table are checked against it by tests, and `status` reads
//! the gRPC code from it. This module does no I/O.

use tonic::Code;

/// One known controller fault.
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

/// The code a controller returns when a new action arrives while the previous one still runs.
/// It is the one fault where the controller certainly did nothing, so a retry is safe.
pub const PREVIOUS_ACTION_NOT_COMPLETED: u32 = 1148;

/// Every known fault, ordered by code.
pub const FAULTS: &[Fault] = &[
    fault(
        1000,
        "PORT_IS_NOT_AVAILABLE",
        "The specified port does not exist.",
        Code::NotFound,
    ),
    fault(
        1001,
        "PORT_IS_CLOSING",
        "The specified port is closing.",
        Code::FailedPrecondition,
    ),
    fault(
        1002,
        "PORT_IS_ALREADY_OPEN",
        "The specified port is already open.",
        Code::FailedPrecondition,
    ),
    fault(
        1003,
        "MISSING_PARAMETER_PORT_ID",
        "The mandatory parameter port_id is missing.",
        Code::InvalidArgument,
    ),
    fault(
        1004,
        "INVALID_PARAMETER_PORT_ID",
        "The parameter port_id is invalid (bad format or out of range).",
        Code::InvalidArgument,
    ),
    fault(
        1006,
        "INVALID_PARAMETER_CONTENT",
        "The parameter content is invalid (bad format or out of range).",
        Code::InvalidArgument,
    ),
    fault(
        1007,
        "INVALID_PARAMETER_CATEGORY",
        "The parameter category is invalid (bad format or out of range).",
        Code::InvalidArgument,
    ),
    fault(
        1008,
        "INVALID_PARAMETER_REQ_TIME",
        "The parameter req_time is invalid (bad format or out of range).",
        Code::InvalidArgument,
    ),
    fault(
        1009,
        "PORT_IS_NOT_OPEN",
        "The specified port is not open.",
        Code::FailedPrecondition,
    ),
    fault(
        1010,
        "INVALID_PARAMETER_BIN_ID",
        "The parameter bin_id is invalid (bad format or out of range).",
        Code::InvalidArgument,
    ),
    fault(
        1011,
        "BIN_DOES_NOT_EXIST",
        "The specified bin does not exist.",
        Code::NotFound,
    ),
    fault(
        1012,
        "INVALID_PARAMETER_TASK_ID",
        "The parameter task_id is invalid (bad format or out of range).",
        Code::InvalidArgument,
    ),
    fault(
        1013,
        "INVALID_PARAMETER_TASKGROUP_ID",
        "The parameter taskgroup_id is invalid (bad format or out of range).",
        Code::InvalidArgument,
    ),
    fault(
        1014,
        "INVALID_PARAMETER_SHIPMENT",
        "The parameter shipment is invalid (bad format or out of range).",
        Code::InvalidArgument,
    ),
    fault(
        1015,
        "NO_TASKS_OR_BINS_FULFILLS_PORT_SELECT",
        "No tasks or bins satisfy the port's select requirements.",
        Code::FailedPrecondition,
    ),
    fault(
        1016,
        "NO_READY_BINS_FULLFILLS_PORT_SELECT",
        "No ready bins satisfy the port's select requirements.",
        Code::FailedPrecondition,
    ),
    fault(
        1017,
        "TASK_DOES_NOT_EXIST",
        "The specified task does not exist.",
        Code::NotFound,
    ),
    fault(
        1018,
        "TASKGROUP_DOES_NOT_EXIST",
        "The specified task group does not exist.",
        Code::NotFound,
    ),
    fault(
        1019,
        "TASKGROUP_IS_SELECTED_BY_ANOTHER_PORT",
        "The task group is selected by another port.",
        Code::FailedPrecondition,
    ),
    fault(
        1020,
        "CONFLICTS_WITH_PREV_OPENBIN",
        "This openbin conflicts with an earlier openbin that has not been closed yet.",
        Code::FailedPrecondition,
    ),
    fault(
        1021,
        "CONFLICTS_WITH_SELECTED_SHIPMENT",
        "The request conflicts with the port's selected shipment.",
        Code::FailedPrecondition,
    ),
    fault(
        1087,
        "PORT_IS_NOT_AUTOCASE",
        "The Port specified is not an AutoCase port.",
        Code::FailedPrecondition,
    ),
    fault(
        1099,
        "PORT_NOT_IN_APPROPRIATE_MODE",
        "Port is not in the appropriate mode (open).",
        Code::FailedPrecondition,
    ),
    fault(
        PREVIOUS_ACTION_NOT_COMPLETED,
        "PREVIOUS_ACTION_NOT_COMPLETED",
        "New action cannot be started until the previous action has been completed.",
        Code::Unavailable,
    ),
    fault(
        1149,
        "BIN_NOT_SELECTED_FOR_PORT",
        "The specified bin is not selected for the specified port, the requested operation is therefore invalid.",
        Code::FailedPrecondition,
    ),
];

/// The lowest and highest code the vendor allows the interface to return; anything else is an
/// internal controller error that "should not be exposed to the WMS".
pub const DOCUMENTED_RANGE: std::ops::RangeInclusive<u32> = 1000..=1999;

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

// === impl Fault ===

impl Fault {
    /// What a caller should do about this fault, for the docs and the CLI.
    pub fn retry_advice(&self) -> &'static str {
        retry_advice(self.grpc_code)
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
}

const fn fault(code: u32, name: &'static str, meaning: &'static str, grpc_code: Code) -> Fault {
    Fault {
        code,
        name,
        meaning,
        grpc_code,
    }
}

fn retry_advice(grpc_code: Code) -> &'static str {
    match grpc_code {
        Code::Unavailable => {
            "retry after the RetryInfo delay; the controller did not start the action"
        }
        Code::InvalidArgument => "do not retry; fix the request",
        Code::NotFound => "do not retry; check the port, bin or task id",
        _ => "do not retry until the port's state changes",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FaultCode;

    fn check(code: u32, expected_reason: &str, expected_grpc: Code) {
        let fault_class = classify(code);
        assert_eq!(fault_class.code(), code);
        assert_eq!(fault_class.reason(), expected_reason, "reason of {code}");
        assert_eq!(
            fault_class.grpc_code(),
            expected_grpc,
            "gRPC code of {code}"
        );
    }

    #[test]
    fn every_code_maps_to_the_specified_grpc_code() {
        for code in [1000, 1011, 1017, 1018] {
            check(code, known(code).unwrap().name, Code::NotFound);
        }
        for code in [1003, 1004, 1006, 1007, 1008, 1010, 1012, 1013, 1014] {
            check(code, known(code).unwrap().name, Code::InvalidArgument);
        }
        check(1148, "PREVIOUS_ACTION_NOT_COMPLETED", Code::Unavailable);
        for code in [
            1001, 1002, 1009, 1015, 1016, 1019, 1020, 1021, 1087, 1099, 1149,
        ] {
            check(code, known(code).unwrap().name, Code::FailedPrecondition);
        }
        assert_eq!(
            FAULTS.len(),
            4 + 9 + 1 + 11,
            "a fault was added without a mapping test"
        );
    }

    #[test]
    fn unknown_and_out_of_range_codes() {
        check(1005, "UNKNOWN_FAULT", Code::Unknown);
        check(1999, "UNKNOWN_FAULT", Code::Unknown);
        check(999, "CONTROLLER_INTERNAL_ERROR", Code::Internal);
        check(2000, "CONTROLLER_INTERNAL_ERROR", Code::Internal);
        check(0, "CONTROLLER_INTERNAL_ERROR", Code::Internal);
        check(u32::MAX, "CONTROLLER_INTERNAL_ERROR", Code::Internal);
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
