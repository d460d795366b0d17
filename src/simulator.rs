//! The simulated controller: an HTTP server that speaks the task interface, with per-port state,
//! so every `case_extract` outcome can be produced for real without an AutoStore.
//!
//! It is the other side of the wire, so it shares only `codec`, `fault` and `domain` with the
//! gateway and never imports the gateway's service or upstream client.

pub mod http;
pub mod layout;
pub mod port;

use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

use crate::codec::{self, MethodCall, Reply};
use crate::domain::{BIN_ID_RANGE, PORT_ID_RANGE};
use crate::fault;
use layout::Layout;
use port::PortTable;

/// The methods the simulator implements; others are answered with HTTP 501.
pub const METHODS: &[&str] = &["case_extract"];

/// A handle on the simulated controller's state: cheap to clone, shared by every connection.
#[derive(Debug, Clone)]
pub struct Simulator {
    /// The port table behind a std mutex: it is held only for a few non-async lines and never
    /// across an `.await`, so an async mutex would add cost and nothing else.
    ports: Arc<Mutex<PortTable>>,
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
        }
    }

    /// Applies one method call at the current time.
    pub fn handle(&self, method_call: &MethodCall) -> Outcome {
        // A panic while the lock was held cannot leave the table half-updated: every change is
        // one assignment, so the data is still consistent and the poison can be ignored.
        let mut ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        apply(&mut ports, method_call, Instant::now())
    }
}

/// Applies one method call to the port table at `now`.
pub fn apply(ports: &mut PortTable, method_call: &MethodCall, now: Instant) -> Outcome {
    match method_call.name.as_str() {
        "case_extract" => Outcome::Reply(case_extract(ports, method_call, now)),
        other => Outcome::NotImplemented(other.to_owned()),
    }
}

fn case_extract(ports: &mut PortTable, method_call: &MethodCall, now: Instant) -> Reply {
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
    let checked =
        integer_param(method_call, "port_id", &PORT_ID_RANGE, PORT_ID_FAULTS).and_then(|port_id| {
            let bin_id = integer_param(method_call, "bin_id", &BIN_ID_RANGE, BIN_ID_FAULTS)?;
            ports.case_extract(port_id, bin_id, now)
        });
    match checked {
        Ok(()) => Reply::empty_success(),
        Err(code) => Reply::Fault(code),
    }
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

    #[test]
    fn other_methods_are_not_implemented() {
        check(
            "<methodcall><name>openport</name><params/></methodcall>",
            Outcome::NotImplemented("openport".to_owned()),
        );
    }
}
