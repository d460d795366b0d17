//! The port state machine: what a port is, and what `case_extract`, `case_cancel` and
//! `case_getstate` do to it.
//!
//! Pure code: time is passed in as `now`. A case operation is a timeline worked out from when it
//! started (and when it was cancelled), so no timer task is needed and tests control time
//! exactly. The same timeline answers `case_getstate` and gives the events the Log Publisher
//! publishes ([`PortTable::take_events`]), so the two cannot disagree. Time never runs backwards
//! for the table: a change at a `now` earlier than one already seen is made at that one.
//!
//! ## What the simulator assumes
//!
//! The vendor documents the faults `case_extract` answers but neither their order nor those of
//! `case_cancel` and `case_getstate`, nor the AutoCase sequence diagrams. Everything below
//! marked inferred is a choice, made to be easy to correct against a real controller:
//!
//! - `case_extract` checks, in order: the port exists (`PORT_IS_NOT_AVAILABLE`), is an AutoCase
//!   port (`PORT_IS_NOT_AUTOCASE`), is OPEN (`PORT_NOT_IN_APPROPRIATE_MODE`), has the bin
//!   selected (`BIN_NOT_SELECTED_FOR_PORT`), and runs no case operation
//!   (`PREVIOUS_ACTION_NOT_COMPLETED`) (task-interface.md §4.5; the order is inferred). It then
//!   runs EREQ, ERSO and ECMP, one step time apart.
//! - `case_cancel` (inferred) checks the same first three, then that the port runs a case
//!   operation on that very bin, else `BIN_NOT_SELECTED_FOR_PORT`: the vendor's text for it, "the
//!   requested operation is therefore invalid", fits a cancel of nothing best of the known
//!   faults. Cancelling an operation that has completed is the same fault, not a silent success,
//!   so a caller who raced ECMP learns the case did come out.
//! - A cancel (inferred, as the issue asks) signals `CR` and then NOOP at once, keeping the bin:
//!   `AC,4,101337,CR` then `AC,4,101337,NOOP`, and `case_getstate` answers NOOP with that bin
//!   until the next operation. The vendor calls `CR` "a signal to the WMS", which may rather
//!   mean a port asking the WMS to cancel; the sequence diagrams that would say were not readable.
//! - `case_getstate` (inferred) checks that the port exists and is an AutoCase port, in any mode:
//!   reading a state changes nothing. A port that has never run an operation answers NOOP with
//!   no bin.
//! - Insertion (IREQ…ICMP) is never simulated: no method starts one.
//!
//! The gateway relies on these rules when it repeats a `request_id` whose first call's outcome
//! was unknown (`idempotency::judge`): an accepted `case_extract` shows its bin in EREQ, ERSO or
//! ECMP from the moment it is accepted, an accepted `case_cancel` shows NOOP with its bin. A
//! test there runs this table to keep the two in step.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::domain::{CaseEvent, CaseSignal, CaseState};
use crate::fault;

/// How many events wait for [`PortTable::take_events`] at most. Beyond it the oldest are
/// dropped, which only happens when nothing publishes them (no Log Publisher listener), so the
/// table's memory stays bounded however long the simulator runs.
pub const MAX_WAITING_EVENTS: usize = 1024;

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
    /// The latest `now` a change was made at. Time never runs backwards for the table, so the
    /// events it has handed out stay in the past of every later change.
    latest: Option<Instant>,
    /// Events that have happened and wait to be taken, oldest first.
    events: VecDeque<TimedCaseEvent>,
}

/// A case event and when it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedCaseEvent {
    /// When the port's state changed (or it signalled `CR`): a time the step timeline gives,
    /// not when the event was taken.
    pub at: Instant,
    /// What changed.
    pub event: CaseEvent,
}

#[derive(Debug)]
struct Port {
    settings: PortSettings,
    /// The last case operation, kept after it ends so its final state can be reported.
    case_operation: Option<CaseOperation>,
    /// How many entries of the operation's timeline have been moved to the table's events.
    published: usize,
}

#[derive(Debug, Clone, Copy)]
struct CaseOperation {
    bin_id: u32,
    started: Instant,
    /// How long after the start a `case_cancel` arrived, if one did.
    cancelled_after: Option<Duration>,
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
                    published: 0,
                };
                (settings.id, port)
            })
            .collect();
        PortTable {
            ports,
            step_time,
            latest: None,
            events: VecDeque::new(),
        }
    }

    /// Starts a case extraction, or returns the fault code the controller would answer.
    /// The checks run in the order the controller is assumed to run them (see the module docs).
    pub fn case_extract(&mut self, port_id: u32, bin_id: u32, now: Instant) -> Result<(), u32> {
        let now = self.advance(now);
        let step_time = self.step_time;
        let port = self.open_autocase_port(port_id)?;
        if port.settings.selected_bin != Some(bin_id) {
            return Err(fault::BIN_NOT_SELECTED_FOR_PORT.code);
        }
        if port.case_state(now, step_time).1.is_busy() {
            return Err(fault::PREVIOUS_ACTION_NOT_COMPLETED.code);
        }
        // `advance` has published the whole timeline of the operation this replaces: it is
        // not busy, so its last entry is in the past.
        port.case_operation = Some(CaseOperation {
            bin_id,
            started: now,
            cancelled_after: None,
        });
        port.published = 0;
        Ok(())
    }

    /// Cancels the case operation running on `bin_id` at the port, or returns the fault code
    /// the controller would answer (see the module docs for the inferred checks).
    pub fn case_cancel(&mut self, port_id: u32, bin_id: u32, now: Instant) -> Result<(), u32> {
        let now = self.advance(now);
        let step_time = self.step_time;
        let port = self.open_autocase_port(port_id)?;
        let busy = port.case_state(now, step_time).1.is_busy();
        match &mut port.case_operation {
            Some(operation) if busy && operation.bin_id == bin_id => {
                operation.cancelled_after = Some(now.saturating_duration_since(operation.started));
                Ok(())
            }
            Some(_) | None => Err(fault::BIN_NOT_SELECTED_FOR_PORT.code),
        }
    }

    /// What `case_getstate` answers at `now`: the port's case state and the bin it concerns, or
    /// the fault code the controller would answer.
    pub fn case_getstate(
        &self,
        port_id: u32,
        now: Instant,
    ) -> Result<(Option<u32>, CaseState), u32> {
        let port = self
            .ports
            .get(&port_id)
            .ok_or(fault::PORT_IS_NOT_AVAILABLE.code)?;
        port.check_autocase()?;
        Ok(port.case_state(now, self.step_time))
    }

    /// The port's case state at `now` and the bin it concerns, or `None` for an unknown port.
    pub fn case_state(&self, port_id: u32, now: Instant) -> Option<(Option<u32>, CaseState)> {
        let port = self.ports.get(&port_id)?;
        Some(port.case_state(now, self.step_time))
    }

    /// Every event that has happened by `now` and not been taken yet, in the order they
    /// happened, a port's `CR` before its NOOP: what the Log Publisher publishes.
    pub fn take_events(&mut self, now: Instant) -> Vec<TimedCaseEvent> {
        self.advance(now);
        self.events.drain(..).collect()
    }

    /// When [`PortTable::take_events`] next has something to return, if ever without another
    /// call: the time to sleep until, then take. A time in the past means now.
    pub fn next_event_at(&self) -> Option<Instant> {
        let waiting = self.events.front().map(|timed| timed.at);
        let upcoming = self.ports.values().filter_map(|port| {
            let operation = port.case_operation?;
            let (offset, _) = operation.timeline(self.step_time).nth(port.published)?;
            operation.started.checked_add(offset)
        });
        waiting.into_iter().chain(upcoming).min()
    }

    /// Moves the timeline entries that have happened by `now` to the waiting events, and
    /// returns `now`, or the latest time already seen if `now` is earlier.
    fn advance(&mut self, now: Instant) -> Instant {
        let now = self.latest.map_or(now, |latest| latest.max(now));
        self.latest = Some(now);
        let mut happened = Vec::new();
        for port in self.ports.values_mut() {
            let Some(operation) = port.case_operation else {
                continue;
            };
            let elapsed = now.saturating_duration_since(operation.started);
            let due = operation
                .timeline(self.step_time)
                .skip(port.published)
                .take_while(|(offset, _)| *offset <= elapsed);
            for (offset, signal) in due {
                port.published += 1;
                happened.push(TimedCaseEvent {
                    // An offset within `elapsed` ends at or before `now`, so this never overflows.
                    at: operation.started.checked_add(offset).unwrap_or(now),
                    event: CaseEvent {
                        port_id: port.settings.id,
                        bin_id: Some(operation.bin_id),
                        signal,
                    },
                });
            }
        }
        // Stable, so one port's CR stays before its NOOP at the same instant.
        happened.sort_by_key(|timed| (timed.at, timed.event.port_id));
        for timed in happened {
            if self.events.len() == MAX_WAITING_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(timed);
        }
        now
    }

    /// The port, if it exists, is an AutoCase port and is OPEN; else the fault for the first
    /// check that fails, in that order.
    fn open_autocase_port(&mut self, port_id: u32) -> Result<&mut Port, u32> {
        let port = self
            .ports
            .get_mut(&port_id)
            .ok_or(fault::PORT_IS_NOT_AVAILABLE.code)?;
        port.check_autocase()?;
        if port.settings.mode != PortMode::Open {
            return Err(fault::PORT_NOT_IN_APPROPRIATE_MODE.code);
        }
        Ok(port)
    }
}

// === impl Port ===

impl Port {
    /// Every AutoCase method's second check, after the port exists.
    fn check_autocase(&self) -> Result<(), u32> {
        if self.settings.autocase {
            Ok(())
        } else {
            Err(fault::PORT_IS_NOT_AUTOCASE.code)
        }
    }

    fn case_state(&self, now: Instant, step_time: Duration) -> (Option<u32>, CaseState) {
        let Some(operation) = self.case_operation else {
            return (None, CaseState::Noop);
        };
        let elapsed = now.saturating_duration_since(operation.started);
        // The last state reached; the timeline starts with EREQ at offset zero.
        let case_state = operation
            .timeline(step_time)
            .take_while(|(offset, _)| *offset <= elapsed)
            .fold(CaseState::Ereq, |case_state, (_, signal)| match signal {
                CaseSignal::State(reached) => reached,
                CaseSignal::CancelRequest => case_state,
            });
        (Some(operation.bin_id), case_state)
    }
}

// === impl CaseOperation ===

impl CaseOperation {
    /// Everything the operation signals, in order, each with how long after the start it
    /// happens: EREQ, ERSO and ECMP one step apart; once cancelled, the states reached by then
    /// and `CR` and NOOP at the cancel.
    fn timeline(self, step_time: Duration) -> impl Iterator<Item = (Duration, CaseSignal)> {
        let extraction = [
            (Duration::ZERO, CaseState::Ereq),
            (step_time, CaseState::Erso),
            (step_time.saturating_mul(2), CaseState::Ecmp),
        ];
        let cancelled_after = self.cancelled_after;
        let reached = extraction
            .into_iter()
            .filter(move |(offset, _)| cancelled_after.is_none_or(|cancel| *offset <= cancel))
            .map(|(offset, case_state)| (offset, CaseSignal::State(case_state)));
        let cancel = cancelled_after.into_iter().flat_map(|cancel| {
            [
                (cancel, CaseSignal::CancelRequest),
                (cancel, CaseSignal::State(CaseState::Noop)),
            ]
        });
        reached.chain(cancel)
    }
}

#[cfg(test)]
mod tests;
