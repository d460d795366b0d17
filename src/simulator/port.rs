//! The port state machine: what a port is, and what `case_extract` does to it.
//!
//! Pure code: time is passed in as `now`, and the case state is worked out from when the case
//! operation started, so no timer task is needed and tests control time exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::domain::CaseState;
use crate::fault;

/// A port mode, as the vendor names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PortMode {
    /// Closed.
    Closed,
    /// Open for picking or receiving goods; the only mode `case_extract` accepts.
    Open,
    /// Open and opening bins automatically (deprecated).
    Auto,
    /// Open for bin insertion.
    Insert,
    /// Exchanging bins between grids.
    Swap,
    /// Not used (deprecated).
    Move,
    /// Delivering a defined task-group sequence.
    Sequence,
    /// Disabled (MultiPort).
    Disabled,
    /// Driven by a MultiPort.
    MultiportPuppet,
    /// No more task groups will be planned.
    Runout,
}

/// How one port is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSettings {
    /// The port id, 1–2000.
    pub id: u32,
    /// Whether the port is an AutoCase port (port type `AC`).
    pub autocase: bool,
    /// The port's mode.
    pub mode: PortMode,
    /// The bin the last `openbin` selected, if any.
    pub selected_bin: Option<u32>,
}

/// Every port the simulated controller knows, and what each is doing.
#[derive(Debug)]
pub struct PortTable {
    /// Ports by id; a port not in here does not exist (`PORT_IS_NOT_AVAILABLE`).
    ports: BTreeMap<u32, Port>,
    /// How long each case state lasts before the next.
    step_time: Duration,
}

#[derive(Debug)]
struct Port {
    settings: PortSettings,
    /// The last case extraction, kept after it completes so its final state can be reported.
    case_operation: Option<CaseOperation>,
}

#[derive(Debug, Clone, Copy)]
struct CaseOperation {
    bin_id: u32,
    started: Instant,
}

// === impl PortTable ===

impl PortTable {
    /// A table of `ports`, each case state lasting `step_time`.
    pub fn new(ports: &[PortSettings], step_time: Duration) -> Self {
        let ports = ports
            .iter()
            .map(|settings| {
                let port = Port {
                    settings: settings.clone(),
                    case_operation: None,
                };
                (settings.id, port)
            })
            .collect();
        PortTable { ports, step_time }
    }

    /// Starts a case extraction, or returns the fault code the controller would answer.
    /// The checks run in the order the controller is assumed to run them (task-interface.md §4.5).
    pub fn case_extract(&mut self, port_id: u32, bin_id: u32, now: Instant) -> Result<(), u32> {
        let step_time = self.step_time;
        let port = self
            .ports
            .get_mut(&port_id)
            .ok_or(fault::PORT_IS_NOT_AVAILABLE.code)?;
        if !port.settings.autocase {
            return Err(fault::PORT_IS_NOT_AUTOCASE.code);
        }
        if port.settings.mode != PortMode::Open {
            return Err(fault::PORT_NOT_IN_APPROPRIATE_MODE.code);
        }
        if port.settings.selected_bin != Some(bin_id) {
            return Err(fault::BIN_NOT_SELECTED_FOR_PORT.code);
        }
        if port.case_state(now, step_time).1.is_busy() {
            return Err(fault::PREVIOUS_ACTION_NOT_COMPLETED.code);
        }
        port.case_operation = Some(CaseOperation {
            bin_id,
            started: now,
        });
        Ok(())
    }

    /// The port's case state at `now` and the bin it concerns, or `None` for an unknown port.
    pub fn case_state(&self, port_id: u32, now: Instant) -> Option<(Option<u32>, CaseState)> {
        let port = self.ports.get(&port_id)?;
        Some(port.case_state(now, self.step_time))
    }
}

// === impl Port ===

impl Port {
    fn case_state(&self, now: Instant, step_time: Duration) -> (Option<u32>, CaseState) {
        let Some(operation) = self.case_operation else {
            return (None, CaseState::Noop);
        };
        let elapsed = now.saturating_duration_since(operation.started);
        let case_state = if elapsed < step_time {
            CaseState::Ereq
        } else if elapsed < step_time.saturating_mul(2) {
            CaseState::Erso
        } else {
            CaseState::Ecmp
        };
        (Some(operation.bin_id), case_state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: Duration = Duration::from_secs(2);

    fn table() -> PortTable {
        let port = |id, autocase, mode, selected_bin| PortSettings {
            id,
            autocase,
            mode,
            selected_bin,
        };
        PortTable::new(
            &[
                port(1, false, PortMode::Open, Some(7)),
                port(2, true, PortMode::Closed, Some(7)),
                port(3, true, PortMode::Open, None),
                port(4, true, PortMode::Open, Some(101337)),
                port(5, true, PortMode::Insert, Some(7)),
            ],
            STEP,
        )
    }

    #[test]
    fn checks_run_in_order() {
        let now = Instant::now();
        let check = |port_id, bin_id, expected: Result<(), u32>| {
            assert_eq!(
                table().case_extract(port_id, bin_id, now),
                expected,
                "port {port_id}"
            );
        };
        check(9, 7, Err(1000));
        check(1, 7, Err(1087));
        check(2, 7, Err(1099));
        check(5, 7, Err(1099));
        check(3, 7, Err(1149));
        check(4, 7, Err(1149));
        check(4, 101337, Ok(()));
    }

    #[test]
    fn extraction_runs_ereq_erso_ecmp_then_frees_the_port() {
        let mut table = table();
        let start = Instant::now();
        assert_eq!(table.case_state(4, start), Some((None, CaseState::Noop)));
        assert_eq!(table.case_extract(4, 101337, start), Ok(()));
        let at = |offset: Duration| table.case_state(4, start + offset).map(|state| state.1);
        assert_eq!(at(Duration::ZERO), Some(CaseState::Ereq));
        assert_eq!(at(STEP - Duration::from_millis(1)), Some(CaseState::Ereq));
        assert_eq!(at(STEP), Some(CaseState::Erso));
        assert_eq!(
            at(STEP * 2 - Duration::from_millis(1)),
            Some(CaseState::Erso)
        );
        assert_eq!(at(STEP * 2), Some(CaseState::Ecmp));

        assert_eq!(table.case_extract(4, 101337, start), Err(1148));
        assert_eq!(table.case_extract(4, 101337, start + STEP), Err(1148));
        assert_eq!(table.case_extract(4, 101337, start + STEP * 2), Ok(()));
        assert_eq!(
            table.case_state(4, start + STEP * 2),
            Some((Some(101337), CaseState::Ereq))
        );
    }

    #[test]
    fn a_busy_port_still_reports_earlier_faults_first() {
        let mut table = table();
        let now = Instant::now();
        assert_eq!(table.case_extract(4, 101337, now), Ok(()));
        assert_eq!(table.case_extract(4, 5, now), Err(1149));
    }

    #[test]
    fn unknown_port_has_no_state() {
        assert_eq!(table().case_state(1999, Instant::now()), None);
    }
}
