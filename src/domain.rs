//! Facts about the AutoStore domain that both sides of the wire apply: the task interface's
//! rules for parameter values, and the AutoCase states with their vendor codes.
//!
//! The gateway refuses a call that breaks the ranges before calling the controller (`service`),
//! the simulator answers such a call with the controller's faults, and a simulator layout may
//! only name ports and bins inside them. The AutoCase states are read from Log Publisher `AC`
//! segments and `case_getstate` replies, and produced by the simulator. They are facts about the
//! domain, not about how messages are encoded, so they live here rather than in `codec` or
//! `log_publisher`. This module does no I/O.

use std::ops::RangeInclusive;

/// Valid `port_id` values on every task-interface method.
pub const PORT_ID_RANGE: RangeInclusive<u32> = 1..=2000;

/// Valid `bin_id` values on every task-interface method.
pub const BIN_ID_RANGE: RangeInclusive<u32> = 1..=4_000_000;

/// An AutoCase state of a port, as the Log Publisher `AC` segment and `case_getstate` report it.
/// Each variant is named after its vendor code (task-interface.md §3.3).
///
/// Extraction runs EREQ → ERSO → ECMP; insertion runs IREQ → IRTR → ICRC → ICIN → ICMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaseState {
    /// `NOOP`: no ongoing case operation.
    Noop,
    /// `EREQ`: case extract requested.
    Ereq,
    /// `ERSO`: ready to send the case out.
    Erso,
    /// `ECMP`: case extract completed.
    Ecmp,
    /// `IREQ`: case insert requested.
    Ireq,
    /// `IRTR`: ready to receive the case.
    Irtr,
    /// `ICRC`: case received.
    Icrc,
    /// `ICIN`: case inserted.
    Icin,
    /// `ICMP`: case insert completed.
    Icmp,
}

/// What an `AC` segment reports about a port's case operation: a new state, or the
/// cancel-request signal `CR`, which the vendor documents as "not a state change, only a signal
/// to the WMS".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaseSignal {
    /// The port's case operation is now in this state.
    State(CaseState),
    /// `CR`: a request to cancel the case operation; the port's state is unchanged by it.
    CancelRequest,
}

/// One change of a port's case operation: what an `AC` segment carries, and what the simulator
/// publishes as its ports run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaseEvent {
    /// The port, 1–2000.
    pub port_id: u32,
    /// The bin of the case operation, when the segment names one.
    pub bin_id: Option<u32>,
    /// The new state, or the cancel request.
    pub signal: CaseSignal,
}

// === impl CaseState ===

impl CaseState {
    /// Every state, in the vendor's order: NOOP, then extraction, then insertion.
    pub const ALL: [CaseState; 9] = [
        CaseState::Noop,
        CaseState::Ereq,
        CaseState::Erso,
        CaseState::Ecmp,
        CaseState::Ireq,
        CaseState::Irtr,
        CaseState::Icrc,
        CaseState::Icin,
        CaseState::Icmp,
    ];

    /// The vendor code, as sent on the wire.
    pub fn code(self) -> &'static str {
        match self {
            CaseState::Noop => "NOOP",
            CaseState::Ereq => "EREQ",
            CaseState::Erso => "ERSO",
            CaseState::Ecmp => "ECMP",
            CaseState::Ireq => "IREQ",
            CaseState::Irtr => "IRTR",
            CaseState::Icrc => "ICRC",
            CaseState::Icin => "ICIN",
            CaseState::Icmp => "ICMP",
        }
    }

    /// The state a vendor code names, matched exactly: codes are upper case on the wire, so
    /// anything else is not a code we know, and is never guessed at.
    pub fn from_code(code: &str) -> Option<CaseState> {
        CaseState::ALL
            .into_iter()
            .find(|case_state| case_state.code() == code)
    }

    /// Whether a case operation is still running, so a new one must wait
    /// (`PREVIOUS_ACTION_NOT_COMPLETED`) and a cancel has something to cancel. NOOP and the two
    /// completed states leave the port free (task-interface.md §4.5, step 6; inferred).
    pub fn is_busy(self) -> bool {
        match self {
            CaseState::Ereq
            | CaseState::Erso
            | CaseState::Ireq
            | CaseState::Irtr
            | CaseState::Icrc
            | CaseState::Icin => true,
            CaseState::Noop | CaseState::Ecmp | CaseState::Icmp => false,
        }
    }
}

// === impl CaseSignal ===

impl CaseSignal {
    /// The vendor code of the cancel-request signal.
    pub const CANCEL_REQUEST_CODE: &str = "CR";

    /// The vendor code, as sent in an `AC` segment.
    pub fn code(self) -> &'static str {
        match self {
            CaseSignal::State(case_state) => case_state.code(),
            CaseSignal::CancelRequest => CaseSignal::CANCEL_REQUEST_CODE,
        }
    }

    /// The signal a vendor code names: a state's code or `CR`, matched exactly.
    pub fn from_code(code: &str) -> Option<CaseSignal> {
        if code == CaseSignal::CANCEL_REQUEST_CODE {
            return Some(CaseSignal::CancelRequest);
        }
        CaseState::from_code(code).map(CaseSignal::State)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_as_its_state() {
        for case_state in CaseState::ALL {
            assert_eq!(CaseState::from_code(case_state.code()), Some(case_state));
            assert_eq!(
                CaseSignal::from_code(case_state.code()),
                Some(CaseSignal::State(case_state))
            );
        }
        assert_eq!(CaseSignal::from_code("CR"), Some(CaseSignal::CancelRequest));
        assert_eq!(CaseSignal::CancelRequest.code(), "CR");
    }

    #[test]
    fn other_codes_are_not_guessed_at() {
        for code in [
            "", "ereq", "Ereq", " EREQ", "EREQ ", "EREQ\r", "CR ", "cr", "ECMPX", "ÉREQ",
        ] {
            assert_eq!(CaseSignal::from_code(code), None, "{code:?}");
        }
        assert_eq!(
            CaseState::from_code("CR"),
            None,
            "CR is a signal, not a state"
        );
    }

    #[test]
    fn only_unfinished_operations_are_busy() {
        let busy: Vec<&str> = CaseState::ALL
            .into_iter()
            .filter(|case_state| case_state.is_busy())
            .map(CaseState::code)
            .collect();
        assert_eq!(busy, ["EREQ", "ERSO", "IREQ", "IRTR", "ICRC", "ICIN"]);
    }
}
