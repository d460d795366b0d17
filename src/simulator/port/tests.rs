//! Unit tests of the port state machine: method calls at given times in, faults, states and
//! events out.

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

// === case_cancel, case_getstate and events (issue 10) ===

const NOT_SELECTED: u32 = fault::BIN_NOT_SELECTED_FOR_PORT.code;

fn at(start: Instant, steps: u32, millis: u64) -> Instant {
    start + STEP * steps + Duration::from_millis(millis)
}

/// An event at `at` on port 4, bin 101337, as the Log Publisher would publish it.
fn event_on_4(at: Instant, signal: CaseSignal) -> TimedCaseEvent {
    TimedCaseEvent {
        at,
        event: CaseEvent {
            port_id: 4,
            bin_id: Some(101337),
            signal,
        },
    }
}

fn reached(case_state: CaseState) -> CaseSignal {
    CaseSignal::State(case_state)
}

#[test]
fn cancel_checks_run_in_order() {
    let now = Instant::now();
    let check = |port_id, bin_id, expected: Result<(), u32>| {
        let mut table = table();
        assert_eq!(table.case_extract(4, 101337, now), Ok(()));
        assert_eq!(
            table.case_cancel(port_id, bin_id, now),
            expected,
            "port {port_id}"
        );
    };
    check(9, 7, Err(fault::PORT_IS_NOT_AVAILABLE.code));
    check(1, 7, Err(fault::PORT_IS_NOT_AUTOCASE.code));
    check(2, 7, Err(fault::PORT_NOT_IN_APPROPRIATE_MODE.code));
    check(5, 7, Err(fault::PORT_NOT_IN_APPROPRIATE_MODE.code));
    check(3, 7, Err(NOT_SELECTED));
    check(4, 7, Err(NOT_SELECTED));
    check(4, 101337, Ok(()));
    // Nothing running: nothing to cancel.
    assert_eq!(table().case_cancel(4, 101337, now), Err(NOT_SELECTED));
}

#[test]
fn a_cancel_mid_way_signals_cr_then_noop_and_frees_the_port() {
    let mut table = table();
    let start = Instant::now();
    assert_eq!(table.case_extract(4, 101337, start), Ok(()));
    let cancel = at(start, 1, 500);
    assert_eq!(table.case_cancel(4, 101337, cancel), Ok(()));
    assert_eq!(
        table.case_getstate(4, cancel),
        Ok((Some(101337), CaseState::Noop))
    );
    // The ECMP the extraction would have reached never comes.
    assert_eq!(
        table.case_getstate(4, at(start, 5, 0)),
        Ok((Some(101337), CaseState::Noop))
    );
    assert_eq!(
        table.take_events(at(start, 5, 0)),
        [
            event_on_4(start, reached(CaseState::Ereq)),
            event_on_4(at(start, 1, 0), reached(CaseState::Erso)),
            event_on_4(cancel, CaseSignal::CancelRequest),
            event_on_4(cancel, reached(CaseState::Noop)),
        ]
    );
    assert_eq!(table.next_event_at(), None);
    assert_eq!(table.case_cancel(4, 101337, cancel), Err(NOT_SELECTED));
    // The port is free at once for the next case.
    assert_eq!(table.case_extract(4, 101337, cancel), Ok(()));
    assert_eq!(
        table.case_getstate(4, cancel),
        Ok((Some(101337), CaseState::Ereq))
    );
}

#[test]
fn a_cancel_at_the_first_instant_still_reports_ereq_first() {
    let mut table = table();
    let start = Instant::now();
    assert_eq!(table.case_extract(4, 101337, start), Ok(()));
    assert_eq!(table.case_cancel(4, 101337, start), Ok(()));
    let signals: Vec<CaseSignal> = table
        .take_events(start)
        .into_iter()
        .map(|timed| timed.event.signal)
        .collect();
    assert_eq!(
        signals,
        [
            reached(CaseState::Ereq),
            CaseSignal::CancelRequest,
            reached(CaseState::Noop)
        ]
    );
}

#[test]
fn a_completed_case_cannot_be_cancelled() {
    let mut table = table();
    let start = Instant::now();
    assert_eq!(table.case_extract(4, 101337, start), Ok(()));
    let last_busy_instant = at(start, 2, 0) - Duration::from_nanos(1);
    assert_eq!(
        table.case_cancel(4, 101337, at(start, 2, 0)),
        Err(NOT_SELECTED)
    );
    assert_eq!(
        table.case_getstate(4, at(start, 2, 0)),
        Ok((Some(101337), CaseState::Ecmp))
    );
    // Time never runs backwards for the table: a later call with an earlier `now` is taken
    // at the latest time seen, so it does not cancel what has completed.
    assert_eq!(
        table.case_cancel(4, 101337, last_busy_instant),
        Err(NOT_SELECTED)
    );
}

#[test]
fn getstate_checks_the_port_only() {
    let now = Instant::now();
    let table = table();
    assert_eq!(
        table.case_getstate(9, now),
        Err(fault::PORT_IS_NOT_AVAILABLE.code)
    );
    assert_eq!(
        table.case_getstate(1, now),
        Err(fault::PORT_IS_NOT_AUTOCASE.code)
    );
    // Any mode: reading changes nothing.
    assert_eq!(table.case_getstate(2, now), Ok((None, CaseState::Noop)));
    assert_eq!(table.case_getstate(5, now), Ok((None, CaseState::Noop)));
    assert_eq!(table.case_getstate(3, now), Ok((None, CaseState::Noop)));
}

#[test]
fn getstate_follows_the_extraction() {
    let mut table = table();
    let start = Instant::now();
    assert_eq!(table.case_extract(4, 101337, start), Ok(()));
    for (steps, millis, expected) in [
        (0, 0, CaseState::Ereq),
        (0, 1999, CaseState::Ereq),
        (1, 0, CaseState::Erso),
        (1, 1999, CaseState::Erso),
        (2, 0, CaseState::Ecmp),
        (100, 0, CaseState::Ecmp),
    ] {
        let now = at(start, steps, millis);
        assert_eq!(table.case_getstate(4, now), Ok((Some(101337), expected)));
        assert_eq!(table.case_state(4, now), Some((Some(101337), expected)));
    }
}

#[test]
fn events_come_as_states_are_reached_and_only_once() {
    let mut table = table();
    let start = Instant::now();
    assert_eq!(table.take_events(start), []);
    assert_eq!(table.next_event_at(), None);
    assert_eq!(table.case_extract(4, 101337, start), Ok(()));
    assert_eq!(table.next_event_at(), Some(start));
    assert_eq!(
        table.take_events(start),
        [event_on_4(start, reached(CaseState::Ereq))]
    );
    assert_eq!(table.take_events(start), []);
    assert_eq!(table.next_event_at(), Some(at(start, 1, 0)));
    assert_eq!(table.take_events(at(start, 0, 1999)), []);
    assert_eq!(
        table.take_events(at(start, 1, 0)),
        [event_on_4(at(start, 1, 0), reached(CaseState::Erso))]
    );
    assert_eq!(table.next_event_at(), Some(at(start, 2, 0)));
    // Taken late, an event keeps the time it happened.
    assert_eq!(
        table.take_events(at(start, 9, 0)),
        [event_on_4(at(start, 2, 0), reached(CaseState::Ecmp))]
    );
    assert_eq!(table.next_event_at(), None);
}

#[test]
fn events_of_a_finished_case_survive_the_next_one_starting() {
    let mut table = table();
    let start = Instant::now();
    assert_eq!(table.case_extract(4, 101337, start), Ok(()));
    let again = at(start, 2, 0);
    assert_eq!(table.case_extract(4, 101337, again), Ok(()));
    // Waiting events make the next event time now, or earlier.
    assert_eq!(table.next_event_at(), Some(start));
    assert_eq!(
        table.take_events(again),
        [
            event_on_4(start, reached(CaseState::Ereq)),
            event_on_4(at(start, 1, 0), reached(CaseState::Erso)),
            event_on_4(again, reached(CaseState::Ecmp)),
            event_on_4(again, reached(CaseState::Ereq)),
        ]
    );
}

#[test]
fn events_of_several_ports_come_in_time_order() {
    let open = |id, bin| PortSettings {
        id,
        autocase: true,
        mode: PortMode::Open,
        selected_bin: Some(bin),
    };
    let mut table = PortTable::new(&[open(6, 42), open(4, 101337)], STEP);
    let start = Instant::now();
    let later = at(start, 0, 500);
    assert_eq!(table.case_extract(4, 101337, start), Ok(()));
    assert_eq!(table.case_extract(6, 42, later), Ok(()));
    let order: Vec<(u32, CaseSignal)> = table
        .take_events(at(start, 3, 0))
        .into_iter()
        .map(|timed| (timed.event.port_id, timed.event.signal))
        .collect();
    assert_eq!(
        order,
        [
            (4, reached(CaseState::Ereq)),
            (6, reached(CaseState::Ereq)),
            (4, reached(CaseState::Erso)),
            (6, reached(CaseState::Erso)),
            (4, reached(CaseState::Ecmp)),
            (6, reached(CaseState::Ecmp)),
        ]
    );
}

#[test]
fn waiting_events_are_bounded_when_nobody_takes_them() {
    let mut table = table();
    let start = Instant::now();
    let mut now = start;
    for _ in 0..MAX_WAITING_EVENTS {
        assert_eq!(table.case_extract(4, 101337, now), Ok(()));
        now += STEP * 2;
    }
    let events = table.take_events(now);
    assert_eq!(events.len(), MAX_WAITING_EVENTS);
    assert_eq!(
        events.last(),
        Some(&event_on_4(now, reached(CaseState::Ecmp)))
    );
}

#[test]
fn a_step_time_too_long_to_reach_never_panics() {
    let mut table = PortTable::new(
        &[PortSettings {
            id: 4,
            autocase: true,
            mode: PortMode::Open,
            selected_bin: Some(101337),
        }],
        Duration::MAX,
    );
    let start = Instant::now();
    assert_eq!(table.case_extract(4, 101337, start), Ok(()));
    assert_eq!(
        table.case_getstate(4, at(start, 1000, 0)),
        Ok((Some(101337), CaseState::Ereq))
    );
    assert_eq!(table.take_events(start).len(), 1);
    // ERSO's time cannot be written as an Instant, so no wake-up is asked for.
    assert_eq!(table.next_event_at(), None);
    assert_eq!(table.case_cancel(4, 101337, at(start, 1000, 0)), Ok(()));
    assert_eq!(table.take_events(at(start, 1000, 0)).len(), 2);
}
