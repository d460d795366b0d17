//! What one connection is doing, and what its driver does about it: pure, with time passed in,
//! so that every rule reads (and is tested) as a line of a table. `connection` does the I/O:
//! its taps apply these transitions under the connection's lock, and wake the driver only when
//! a transition says so.

use tokio::time::Instant;

use super::ConnectionLimits;

/// What an HTTP/2 client sends first (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What one connection is doing; [`next_step`] decides from it. Each transition returns whether
/// the driver must be woken at once; otherwise it reads the state when its deadline comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct State {
    /// The handshake timeout counts from here.
    pub(super) accepted_at: Instant,
    /// It has sent an HTTP/2 preface or a complete first request head.
    identified: bool,
    /// Requests whose response has not ended, including those still receiving their body.
    open: usize,
    /// Of those, requests whose body has fully arrived: the ones shutdown waits for.
    arrived: usize,
    /// Of those, requests whose whole answer is ready and waits only for its peer to take it:
    /// they leave the connection idle, or a peer that never reads (an HTTP/2 window of 0) would
    /// hold it for good.
    answered: usize,
    /// Since when the bytes of a request head (or preface) have been arriving with no request
    /// open.
    head_since: Option<Instant>,
    /// Since when an HTTP/1.1 request's body has been on its way (from its complete head). Only
    /// HTTP/1.1, which has one request at a time: an HTTP/2 body late past the same limit ends
    /// its own stream (`RequestBody`), not the connection with the other streams on it.
    body_since: Option<Instant>,
    /// Since when no request has been open, but for answered ones.
    idle_since: Instant,
    /// Shutdown has begun and GOAWAY was sent: from now on every change wakes the driver.
    pub(super) draining: bool,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Serve on, and look again at the instant (`None`: only when woken).
    LookAgainAt(Option<Instant>),
    /// Send GOAWAY (close an idle HTTP/1.1 connection) for this reason, and drop the connection
    /// after the linger.
    GoAway(Ending),
    /// Drop the connection now, for this reason.
    Drop(Ending),
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// The peer closed it, or the protocol ended it.
    Closed,
    /// It did not identify its protocol in time.
    HandshakeTimeout,
    /// A later HTTP/1.1 request head did not arrive in time.
    HeaderTimeout,
    /// An HTTP/1.1 request body did not arrive in time.
    BodyTimeout,
    /// It had no open request for the idle timeout.
    Idle,
    /// Shutdown closed it once nothing worth waiting for was left.
    Shutdown,
}

/// What the bytes read so far tell of a connection's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// This many bytes of the HTTP/2 preface have arrived, and nothing else.
    Preface(usize),
    /// HTTP/1.1: bytes with no request open are the start of a head.
    Http1,
    /// HTTP/2: bytes between requests are pings and settings, never a head.
    Http2,
}

// === impl State ===

impl State {
    /// A connection accepted at `accepted_at`.
    pub(super) fn new(accepted_at: Instant) -> Self {
        State {
            accepted_at,
            identified: false,
            open: 0,
            arrived: 0,
            answered: 0,
            head_since: None,
            body_since: None,
            idle_since: accepted_at,
            draining: false,
        }
    }

    /// The HTTP/2 preface has fully arrived: the connection is identified.
    pub(super) fn preface_read(&mut self) -> bool {
        self.identified = true;
        self.head_since = None;
        true
    }

    /// Other bytes were read at `now`: with no request open, a head is on its way.
    pub(super) fn bytes_read(&mut self, now: Instant) -> bool {
        if self.open > 0 || self.head_since.is_some() {
            return false;
        }
        self.head_since = Some(now);
        // Before identification the handshake deadline already times the head.
        self.identified || self.draining
    }

    /// A request's head is complete; `http1_body_since` is when, for an HTTP/1.1 request whose
    /// body is still to come. The driver times a head or the handshake only until now: it is
    /// woken if this identified the connection or an HTTP/1.1 body is to be timed, and otherwise
    /// finds out at its deadline.
    pub(super) fn request_started(&mut self, http1_body_since: Option<Instant>) -> bool {
        let identifies = !self.identified;
        self.identified = true;
        self.open += 1;
        self.head_since = None;
        self.body_since = http1_body_since;
        identifies || http1_body_since.is_some() || self.draining
    }

    /// A request's body has fully arrived: from now on the request is worth waiting for.
    pub(super) fn body_arrived(&mut self) -> bool {
        self.arrived += 1;
        self.body_since = None;
        self.draining
    }

    /// A request's whole answer is ready at `now`: only its peer's reading is left.
    pub(super) fn request_answered(&mut self, now: Instant) -> bool {
        self.answered += 1;
        self.idle_since = self.idle_since.max(now);
        self.draining
    }

    /// A request ended at `now` (its response sent, or the request cancelled), after its body
    /// had arrived or not, and its answer was ready or not.
    pub(super) fn request_ended(
        &mut self,
        had_arrived: bool,
        had_answered: bool,
        now: Instant,
    ) -> bool {
        self.open -= 1;
        self.arrived -= usize::from(had_arrived);
        self.answered -= usize::from(had_answered);
        // An HTTP/1.1 connection has one request at a time: its body is no longer awaited.
        self.body_since = None;
        // Concurrent streams read the clock before they take the lock, so not in order.
        self.idle_since = self.idle_since.max(now);
        self.draining
    }

    /// Closed now, the connection would cut a request short (a head, or a body, still on its
    /// way).
    pub(super) fn is_partial(&self) -> bool {
        self.open > 0 || self.head_since.is_some()
    }
}

/// The driver's decisions, one rule per line.
pub(super) fn next_step(state: &State, now: Instant, limits: &ConnectionLimits) -> Step {
    let at_or_before = |deadline: Instant, ending| {
        if now >= deadline {
            Step::Drop(ending)
        } else {
            Step::LookAgainAt(Some(deadline))
        }
    };
    if state.draining {
        // Every change wakes the driver now, so it has no deadline of its own.
        return if state.arrived > 0 {
            Step::LookAgainAt(None)
        } else {
            Step::GoAway(Ending::Shutdown)
        };
    }
    if !state.identified {
        return at_or_before(
            state.accepted_at + limits.handshake_timeout,
            Ending::HandshakeTimeout,
        );
    }
    if let (Some(body_since), Some(body_read_timeout)) =
        (state.body_since, limits.body_read_timeout)
    {
        return at_or_before(body_since + body_read_timeout, Ending::BodyTimeout);
    }
    if state.open > state.answered {
        // Request ends do not wake the driver: it looks again when the connection could have
        // been idle for the whole idle timeout at the earliest.
        return Step::LookAgainAt(Some(now + limits.idle_timeout));
    }
    if let Some(head_since) = state.head_since {
        return at_or_before(
            head_since + limits.header_read_timeout,
            Ending::HeaderTimeout,
        );
    }
    match at_or_before(state.idle_since + limits.idle_timeout, Ending::Idle) {
        Step::Drop(ending) => Step::GoAway(ending),
        step => step,
    }
}

// === impl Protocol ===

impl Protocol {
    /// What the protocol is known to be once `bytes` have also been read. A first difference
    /// from the HTTP/2 preface means HTTP/1.1, identified later by its first complete head.
    pub(super) fn after(self, bytes: &[u8]) -> Protocol {
        let Protocol::Preface(matched) = self else {
            return self;
        };
        let expected = &HTTP2_PREFACE[matched..];
        let length = bytes.len().min(expected.len());
        if bytes[..length] != expected[..length] {
            Protocol::Http1
        } else if matched + length == HTTP2_PREFACE.len() {
            Protocol::Http2
        } else {
            Protocol::Preface(matched + length)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const LIMITS: ConnectionLimits = ConnectionLimits {
        handshake_timeout: Duration::from_secs(10),
        header_read_timeout: Duration::from_secs(5),
        body_read_timeout: Some(Duration::from_secs(5)),
        idle_timeout: Duration::from_secs(60),
    };

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    /// The step for a connection accepted at `t0`, set up by `setup`, at `t0 + at` seconds.
    fn check(
        setup: impl FnOnce(&mut State, Instant),
        at: u64,
        expected: impl FnOnce(Instant) -> Step,
    ) {
        let t0 = Instant::now();
        let mut state = State::new(t0);
        setup(&mut state, t0);
        let now = t0 + secs(at);
        assert_eq!(
            next_step(&state, now, &LIMITS),
            expected(t0),
            "{state:?} at {at}s"
        );
    }

    fn identified(state: &mut State, _: Instant) {
        state.preface_read();
    }

    #[test]
    fn the_steps_of_a_connection() {
        use Step::{Drop, GoAway, LookAgainAt};
        let at = |seconds: u64| move |t0: Instant| LookAgainAt(Some(t0 + secs(seconds)));
        // Before identification only the handshake deadline counts, a partial head or not.
        check(|_, _| {}, 0, at(10));
        check(|state, t0| _ = state.bytes_read(t0 + secs(1)), 9, at(10));
        check(|_, _| {}, 10, |_| Drop(Ending::HandshakeTimeout));
        // Identified and idle: GOAWAY once the idle timeout has passed since the last request.
        check(identified, 0, at(60));
        check(identified, 60, |_| GoAway(Ending::Idle));
        let ended_at_30 = |state: &mut State, t0: Instant| {
            state.request_started(None);
            state.request_ended(false, false, t0 + secs(30));
        };
        check(ended_at_30, 60, at(90));
        // A request open: look again one idle timeout later, whatever the older deadlines.
        check(|state, _| _ = state.request_started(None), 100, at(160));
        // A request whose whole answer is ready waits only for its peer to read: the connection
        // is idle from then, unless another request is open.
        let answered_at_30 = |state: &mut State, t0: Instant| {
            identified(state, t0);
            state.request_started(None);
            state.body_arrived();
            state.request_answered(t0 + secs(30));
        };
        check(answered_at_30, 60, at(90));
        check(answered_at_30, 90, |_| GoAway(Ending::Idle));
        let and_another_open = |state: &mut State, t0: Instant| {
            answered_at_30(state, t0);
            state.request_started(None);
        };
        check(and_another_open, 100, at(160));
        // An answered request that ends no longer counts as answered: a request opened after it
        // keeps the connection busy.
        let ended_then_another_open = |state: &mut State, t0: Instant| {
            answered_at_30(state, t0);
            state.request_ended(true, true, t0 + secs(40));
            state.request_started(None);
        };
        check(ended_then_another_open, 100, at(160));
        // An HTTP/1.1 body: dropped once the body-read timeout has passed since its head, open
        // requests or not; once it has arrived, the request is an open one like any other.
        let body_from_20 = |state: &mut State, t0: Instant| {
            state.request_started(Some(t0 + secs(20)));
        };
        check(body_from_20, 21, at(25));
        check(body_from_20, 25, |_| Drop(Ending::BodyTimeout));
        let body_arrived = |state: &mut State, t0: Instant| {
            body_from_20(state, t0);
            state.body_arrived();
        };
        check(body_arrived, 25, at(85));
        // A later head: dropped once the header-read timeout has passed since its first byte.
        let head_at_50 = |state: &mut State, t0: Instant| {
            identified(state, t0);
            state.bytes_read(t0 + secs(50));
        };
        check(head_at_50, 52, at(55));
        check(head_at_50, 55, |_| Drop(Ending::HeaderTimeout));
        // Draining: held while a request has fully arrived, GOAWAY at once otherwise, whatever
        // the protocol or the other limits.
        let draining = |arrived: bool| {
            move |state: &mut State, _: Instant| {
                state.request_started(None);
                state.request_started(None);
                if arrived {
                    state.body_arrived();
                }
                state.draining = true;
            }
        };
        check(draining(true), 0, |_| LookAgainAt(None));
        check(draining(false), 0, |_| GoAway(Ending::Shutdown));
        check(draining(false), 1000, |_| GoAway(Ending::Shutdown));
    }

    #[test]
    fn calls_wake_the_driver_only_to_identify_the_connection_time_an_http1_body_or_drain() {
        let t0 = Instant::now();
        let mut state = State::new(t0);
        assert!(state.request_started(None), "the first request identifies");
        assert!(!state.body_arrived());
        assert!(!state.request_ended(true, false, t0));
        assert!(!state.request_started(None));
        assert!(!state.bytes_read(t0), "a body's bytes are no head");
        assert!(
            state.request_started(Some(t0)),
            "an HTTP/1.1 body is timed from now"
        );
        state.draining = true;
        assert!(state.body_arrived());
        assert!(state.request_ended(true, false, t0));
    }

    #[test]
    fn a_head_wakes_the_driver_once_the_connection_is_identified() {
        let t0 = Instant::now();
        let mut state = State::new(t0);
        assert!(
            !state.bytes_read(t0),
            "the handshake deadline times the first head"
        );
        assert!(state.request_started(None));
        state.request_ended(false, false, t0);
        assert!(state.bytes_read(t0));
        assert!(!state.bytes_read(t0), "only its first bytes");
    }

    #[test]
    fn the_http2_preface_identifies_http2_and_its_first_difference_http1() {
        use Protocol::{Http1, Http2, Preface};
        let cases: [(Protocol, &[u8], Protocol); 6] = [
            (Preface(0), b"P", Preface(1)),
            (Preface(1), b"RI * HTTP/2.0\r\n", Preface(16)),
            (Preface(16), b"\r\nSM\r\n\r\n\0\0\x04", Http2),
            (Preface(0), b"POST / HTTP/1.1\r\n", Http1),
            (Preface(3), b"X", Http1),
            (Http1, HTTP2_PREFACE, Http1),
        ];
        for (before, bytes, after) in cases {
            assert_eq!(before.after(bytes), after, "{before:?} then {bytes:?}");
        }
    }

    #[test]
    fn a_connection_closed_at_shutdown_is_partial_with_a_request_or_head_on_its_way() {
        let t0 = Instant::now();
        let idle = State::new(t0);
        assert!(!idle.is_partial());
        let mut open = idle;
        open.request_started(None);
        assert!(open.is_partial());
        let mut head = idle;
        head.bytes_read(t0);
        assert!(head.is_partial());
    }
}
