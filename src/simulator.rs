//! The simulated controller: an HTTP server that speaks the task interface, with per-port state,
//! so every `case_extract`, `case_cancel` and `case_getstate` outcome can be produced for real
//! without an AutoStore. What it assumes where the vendor is silent is listed in [`port`].
//!
//! It is the other side of the wire, so it shares only `codec`, `fault` and `domain` with the
//! gateway and never imports the gateway's service or upstream client.

pub mod http;
pub mod layout;
pub mod log_publisher;
pub mod port;

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::codec::{self, CaseStateReply, MethodCall, Reply};
use crate::domain::{BIN_ID_RANGE, PORT_ID_RANGE};
use crate::fault;
use layout::Layout;
use port::PortTable;

/// The methods the simulator implements; others are answered with HTTP 501.
pub const METHODS: &[&str] = &["case_extract", "case_cancel", "case_getstate"];

/// A handle on the simulated controller's state: cheap to clone, shared by every connection.
#[derive(Debug, Clone)]
pub struct Simulator {
    /// The port table behind a std mutex: it is held only for a few non-async lines and never
    /// across an `.await`, so an async mutex would add cost and nothing else.
    ports: Arc<Mutex<PortTable>>,
    /// Woken after every method call, which may have started or cancelled a case operation, so
    /// the Log Publisher looks at the table again.
    changed: Arc<Notify>,
}

/// What the simulator makes of one method call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A reply for the caller: success or a fault.
    Reply(Reply),
    /// The method is not one the simulator implements.
    NotImplemented(String),
}

// === impl Simulator ===

impl Simulator {
    /// A simulator with the ports of `layout`, all idle.
    pub fn new(layout: &Layout) -> Self {
        Simulator {
            ports: Arc::new(Mutex::new(PortTable::new(&layout.ports, layout.step_time))),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Applies one method call at the current time.
    pub fn handle(&self, method_call: &MethodCall) -> Outcome {
        let outcome = apply(&mut self.lock(), method_call, Instant::now());
        self.changed.notify_one();
        outcome
    }

    /// The case events that have happened by now and not been taken yet, and when the next one
    /// is due, if any is.
    pub fn take_events(&self) -> (Vec<port::TimedCaseEvent>, Option<Instant>) {
        let mut ports = self.lock();
        let events = ports.take_events(Instant::now());
        (events, ports.next_event_at())
    }

    /// Resolves after the next method call (at once if one came since the last wait).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PortTable> {
        // A panic while the lock was held leaves the table usable: an operation starts or is
        // cancelled in one assignment, and at worst an event on its way to the waiting list is
        // lost. So the poison can be ignored.
        self.ports.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Applies one method call to the port table at `now`.
pub fn apply(ports: &mut PortTable, method_call: &MethodCall, now: Instant) -> Outcome {
    let reply = match method_call.name.as_str() {
        "case_extract" => port_and_bin(method_call)
            .and_then(|(port_id, bin_id)| ports.case_extract(port_id, bin_id, now))
            .map(|()| Reply::empty_success()),
        // The same parameters as case_extract (task-interface.md §3.2).
        "case_cancel" => port_and_bin(method_call)
            .and_then(|(port_id, bin_id)| ports.case_cancel(port_id, bin_id, now))
            .map(|()| Reply::empty_success()),
        "case_getstate" => integer_param(method_call, "port_id", &PORT_ID_RANGE, PORT_ID_FAULTS)
            .and_then(|port_id| {
                let (bin_id, case_state) = ports.case_getstate(port_id, now)?;
                let case_state_reply = CaseStateReply {
                    port_id,
                    bin_id,
                    case_state,
                };
                Ok(case_state_reply.to_reply())
            }),
        other => return Outcome::NotImplemented(other.to_owned()),
    };
    Outcome::Reply(reply.unwrap_or_else(Reply::Fault))
}

const PORT_ID_FAULTS: ParamFaults = ParamFaults {
    missing: fault::MISSING_PARAMETER_PORT_ID.code,
    invalid: fault::INVALID_PARAMETER_PORT_ID.code,
};

// The vendor lists no "missing bin_id" code; INVALID_PARAMETER_BIN_ID is the closest
// (task-interface.md §4.5).
const BIN_ID_FAULTS: ParamFaults = ParamFaults {
    missing: fault::INVALID_PARAMETER_BIN_ID.code,
    invalid: fault::INVALID_PARAMETER_BIN_ID.code,
};

/// Reads `port_id` then `bin_id`, as `case_extract` and `case_cancel` take them, or returns the
/// fault for the first that is wrong.
fn port_and_bin(method_call: &MethodCall) -> Result<(u32, u32), u32> {
    let port_id = integer_param(method_call, "port_id", &PORT_ID_RANGE, PORT_ID_FAULTS)?;
    let bin_id = integer_param(method_call, "bin_id", &BIN_ID_RANGE, BIN_ID_FAULTS)?;
    Ok((port_id, bin_id))
}

/// The fault codes for a parameter that is missing, and for one that is repeated, not an
/// integer or out of range.
#[derive(Debug, Clone, Copy)]
struct ParamFaults {
    missing: u32,
    invalid: u32,
}

/// Reads a mandatory integer parameter, or returns the fault the controller would answer.
fn integer_param(
    method_call: &MethodCall,
    name: &str,
    range: &std::ops::RangeInclusive<u32>,
    faults: ParamFaults,
) -> Result<u32, u32> {
    let mut params = method_call.params_named(name);
    let param = params.next().ok_or(faults.missing)?;
    if params.next().is_some() {
        return Err(faults.invalid);
    }
    codec::parse_integer(param)
        .ok()
        .filter(|value| range.contains(value))
        .ok_or(faults.invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::WireFormat;
    use crate::domain::CaseState;

    fn check(body: &str, expected: Outcome) {
        let mut ports = PortTable::new(&Layout::default_layout().ports, layout::DEFAULT_STEP_TIME);
        let method_call = WireFormat::Xml
            .decode_method_call(body.as_bytes(), None)
            .unwrap();
        assert_eq!(
            apply(&mut ports, &method_call, Instant::now()),
            expected,
            "{body}"
        );
    }

    fn call(params: &str) -> String {
        format!("<methodcall><name>case_extract</name><params>{params}</params></methodcall>")
    }

    fn fault(code: u32) -> Outcome {
        Outcome::Reply(Reply::Fault(code))
    }

    #[test]
    fn parameters_are_checked_before_the_port() {
        check(&call("<bin_id>1</bin_id>"), fault(1003));
        check(&call("<port_id>x</port_id><bin_id>1</bin_id>"), fault(1004));
        check(&call("<port_id>0</port_id><bin_id>1</bin_id>"), fault(1004));
        check(
            &call("<port_id>2001</port_id><bin_id>1</bin_id>"),
            fault(1004),
        );
        check(
            &call("<port_id>4</port_id><port_id>4</port_id><bin_id>1</bin_id>"),
            fault(1004),
        );
        check(&call("<port_id>4</port_id>"), fault(1010));
        check(
            &call("<port_id>4</port_id><bin_id>4000001</bin_id>"),
            fault(1010),
        );
        check(&call("<port_id>4</port_id><bin_id></bin_id>"), fault(1010));
        // V2 no longer accepts wrapper elements inside <params>.
        check(
            &call("<wrap><port_id>4</port_id><bin_id>101337</bin_id></wrap>"),
            fault(1003),
        );
    }

    /// The vendor's ranges "1-2000" and "1 and 4000000" are read with both ends included
    /// (task-interface.md §3.1): the ends pass the parameter checks and reach the port's.
    #[test]
    fn the_range_ends_are_valid_parameters() {
        check(
            &call("<port_id>2000</port_id><bin_id>1</bin_id>"),
            fault(1000),
        );
        check(
            &call("<port_id>1</port_id><bin_id>4000000</bin_id>"),
            fault(1087),
        );
        check(
            &named(
                "case_cancel",
                "<port_id>2000</port_id><bin_id>4000000</bin_id>",
            ),
            fault(1000),
        );
        check(
            &named("case_getstate", "<port_id>2000</port_id>"),
            fault(1000),
        );
    }

    #[test]
    fn the_default_layout_produces_every_port_fault() {
        check(&call("<port_id>9</port_id><bin_id>1</bin_id>"), fault(1000));
        check(&call("<port_id>1</port_id><bin_id>1</bin_id>"), fault(1087));
        check(&call("<port_id>2</port_id><bin_id>1</bin_id>"), fault(1099));
        check(&call("<port_id>3</port_id><bin_id>1</bin_id>"), fault(1149));
        check(&call("<port_id>4</port_id><bin_id>1</bin_id>"), fault(1149));
        check(
            &call(" <port_id> 4 </port_id>\n<bin_id>101337</bin_id> "),
            Outcome::Reply(Reply::empty_success()),
        );
    }

    fn named(method: &str, params: &str) -> String {
        format!("<methodcall><name>{method}</name><params>{params}</params></methodcall>")
    }

    fn case_state(port_id: u32, bin_id: Option<u32>, case_state: CaseState) -> Outcome {
        let case_state_reply = CaseStateReply {
            port_id,
            bin_id,
            case_state,
        };
        Outcome::Reply(case_state_reply.to_reply())
    }

    #[test]
    fn case_cancel_checks_parameters_as_case_extract_does() {
        for (params, code) in [
            ("<bin_id>1</bin_id>", 1003),
            ("<port_id>0</port_id><bin_id>1</bin_id>", 1004),
            ("<port_id>4</port_id>", 1010),
            ("<port_id>4</port_id><bin_id>4000001</bin_id>", 1010),
            ("<port_id>9</port_id><bin_id>1</bin_id>", 1000),
            ("<port_id>1</port_id><bin_id>1</bin_id>", 1087),
            ("<port_id>2</port_id><bin_id>1</bin_id>", 1099),
            // Nothing is running on the default layout's port 4.
            ("<port_id>4</port_id><bin_id>101337</bin_id>", 1149),
        ] {
            check(&named("case_cancel", params), fault(code));
        }
    }

    #[test]
    fn case_getstate_answers_with_data() {
        check(&named("case_getstate", ""), fault(1003));
        check(
            &named("case_getstate", "<port_id>2001</port_id>"),
            fault(1004),
        );
        check(&named("case_getstate", "<port_id>9</port_id>"), fault(1000));
        check(&named("case_getstate", "<port_id>1</port_id>"), fault(1087));
        check(
            &named("case_getstate", "<port_id>2</port_id>"),
            case_state(2, None, CaseState::Noop),
        );
        // A bin_id is not a parameter of case_getstate; like any other, it is ignored.
        check(
            &named("case_getstate", "<port_id>4</port_id><bin_id>5</bin_id>"),
            case_state(4, None, CaseState::Noop),
        );
    }

    #[test]
    fn extract_getstate_cancel_on_one_table() {
        let mut ports = PortTable::new(&Layout::default_layout().ports, layout::DEFAULT_STEP_TIME);
        let start = Instant::now();
        let mut call = |method: &str, params: &str, now| {
            let method_call = WireFormat::Xml
                .decode_method_call(named(method, params).as_bytes(), None)
                .unwrap();
            apply(&mut ports, &method_call, now)
        };
        let port_and_bin = "<port_id>4</port_id><bin_id>101337</bin_id>";
        let success = Outcome::Reply(Reply::empty_success());
        assert_eq!(call("case_extract", port_and_bin, start), success);
        let erso = start + layout::DEFAULT_STEP_TIME;
        assert_eq!(
            call("case_getstate", "<port_id>4</port_id>", erso),
            case_state(4, Some(101337), CaseState::Erso)
        );
        assert_eq!(call("case_cancel", port_and_bin, erso), success);
        assert_eq!(
            call("case_getstate", "<port_id>4</port_id>", erso),
            case_state(4, Some(101337), CaseState::Noop)
        );
        assert_eq!(call("case_cancel", port_and_bin, erso), fault(1149));
    }

    #[test]
    fn other_methods_are_not_implemented() {
        check(
            "<methodcall><name>openport</name><params/></methodcall>",
            Outcome::NotImplemented("openport".to_owned()),
        );
    }
}
