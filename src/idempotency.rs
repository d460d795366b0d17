//! The idempotency store (AIP-155): what the gateway remembers about each `request_id` sent on
//! CaseExtract and CaseCancel, so that a repeat of a call the controller may have acted on is not
//! POSTed again unless the port shows it was not.
//!
//! Pure logic: time is passed in as `now`, and the only waiting is on a `watch` channel the
//! service awaits. An entry is keyed by the request_id alone and remembers the method, port and
//! bin it came with (a repeat with other ones is refused), and where the call stands:
//!
//! - in flight: one call holds its `Lease`; a repeat waits for it;
//! - answered: OK, or a fault the controller sent; a repeat gets the same answer;
//! - unknown: the call ended where the controller may have acted (connection lost, timeout, a
//!   5xx, a reply the gateway cannot read, or the caller went away once the call was being
//!   sent); a repeat takes the lease and reads the port before doing anything. The entry keeps
//!   when the first call that may have acted was claimed, just before it was sent: a port
//!   showing the call not acted on proves it only shortly after (`NOT_ACTED_BELIEVED_FOR`).
//!
//! An answer where the controller certainly started nothing (unreachable, 503 or 429, fault
//! 1148, a deadline too short, or the caller went away before the call was sent) is not kept: the entry is dropped, so a repeat calls again.
//! Except after a resend: a lease that resolved an unknown outcome and sent the call again
//! (the port showed no operation) cannot tell its own failure from the first call's outcome,
//! which may still reach the controller after the port was read. Every ending of a resend but
//! OK keeps the entry unknown: see `resent_ending`.
//!
//! Entries live for the window from the answer (or unknown outcome) of their last call, and at
//! most `max_entries` are kept. An entry in flight never expires and is never evicted. An
//! unknown one is never evicted (forgotten, a repeat of it would be sent without reading the
//! port first, and could extract twice), but it does expire, the window after its call ended,
//! like an answered one: a repeat after that is sent like a new call, as the window promises. When full, the oldest answered fault is evicted, and only
//! when none is left the oldest answered OK: forgetting an OK lets a repeat of that id be sent
//! like a new call, which acts a second time, so the caller is told to size the table to keep
//! OKs and alert on their eviction. Answered entries are kept in their own ordered indexes, so
//! finding the one to evict never looks at an entry in flight or unknown. When none is left (every entry in flight or unknown), a new `request_id` is refused before anything is
//! sent (`Claim::Full`). A repeat waiting for a call in flight is given its ending through the
//! lease's channel, so evicting the entry the moment the call ends cannot make the repeat call
//! again. A repeat that was told of an unknown ending and finds its entry gone reads the port
//! all the same.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::domain::CaseState;
use crate::metrics::EntryGauges;

/// Reads an idempotency key (a message's `request_id`, the CLI's `--idempotency-key`): none when
/// empty, else a UUID in its hyphenated form, in either case, other than the nil UUID (a
/// client's unset default, which would make unrelated calls repeats of each other).
pub fn parse_key(text: &str) -> Result<Option<Uuid>, KeyError> {
    if text.is_empty() {
        return Ok(None);
    }
    let parsed = (text.len() == uuid::fmt::Hyphenated::LENGTH)
        .then(|| Uuid::try_parse(text).ok())
        .flatten();
    match parsed {
        Some(uuid) if uuid.is_nil() => Err(KeyError::Nil),
        Some(uuid) => Ok(Some(uuid)),
        None => Err(KeyError::NotAUuid),
    }
}

/// Why [`parse_key`] refused a key; its text follows the key in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The nil UUID.
    #[error("is the nil UUID; send a fresh random one for each call")]
    Nil,
    /// Not a UUID in its hyphenated form.
    #[error("is not a UUID in its hyphenated form, as 123e4567-e89b-12d3-a456-426614174000")]
    NotAUuid,
}

/// The two methods that take a `request_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// `case_extract`.
    CaseExtract,
    /// `case_cancel`.
    CaseCancel,
}

/// How long after the first call whose outcome is unknown was sent a port that shows the call
/// not acted on is believed, so that the call is sent again. Timed from the send, not from the
/// unknown ending: after a timeout the controller may have accepted the call at any moment
/// since it was sent, up to `--upstream-timeout` (as much as an hour) before the ending.
/// Inferred, not documented by the vendor: for the port to show "not acted on" although the
/// first call was accepted, that call's whole operation must have run (a robot fetching the bin
/// and presenting it, or a cancel applied) and another operation must have moved the port on
/// again, all between the send and the read. A robot's trip on a real grid takes longer than
/// 10 s; the simulator, with its default step of 2 s, runs an extraction in 4 s, so there only
/// another caller running and cancelling an operation on the same port within those seconds
/// could move it on. A read later than this tells nothing, so a repeat after a call that timed
/// out at a long `--upstream-timeout` is never sent again.
pub(crate) const NOT_ACTED_BELIEVED_FOR: Duration = Duration::from_secs(10);

/// What `case_getstate` shows about a call whose outcome was unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The controller accepted the call: its answer was OK.
    Accepted,
    /// The controller did not act on it: send it again.
    NotActed,
    /// The state does not tell.
    Unclear,
    /// The state would say the controller did not act on it, but the port was read this long
    /// after the call was sent, more than [`NOT_ACTED_BELIEVED_FOR`]: it may have moved on.
    TooLate(Duration),
}

/// What a port in `case_state` with `bin_id`, read `elapsed` after a call of `params` whose
/// outcome is unknown was sent, says about that call.
///
/// Inferred, not documented by the vendor (task-interface.md §4.5 lists the states, not the
/// transitions; the simulator's `port` module makes the same assumptions, so this holds against
/// it):
/// - an accepted `case_extract` puts the port in EREQ, then ERSO, then ECMP, naming its bin;
///   ECMP stays until the next operation. Only EREQ or ERSO of this bin prove it accepted: ECMP
///   of this bin looks the same as an earlier extraction of the same bin that completed before
///   this call (task-interface.md §4.5 step 6; the simulator's port keeps the bin selected in
///   ECMP), so it is unclear. A port in NOOP naming another bin, or none, did not accept it.
///   NOOP naming this very bin is unclear: an extraction of it may have been accepted and then
///   cancelled.
/// - an accepted `case_cancel` puts the port in NOOP keeping the bin (after the `CR` signal);
///   EREQ or ERSO of this bin means the cancel was not applied, so it is sent again. ECMP (the
///   operation finished, so a cancel would have been refused) and any other bin are unclear.
///   A known gap: EREQ or ERSO of this bin can also be a new extraction of the same bin that
///   someone started after our cancel was applied; the resend then cancels that other
///   caller's extraction. The port does not name who started an operation, so the two look
///   the same; within [`NOT_ACTED_BELIEVED_FOR`] of the send, a cancel applied and a new
///   extraction of the same bin started is taken to be the rarer case.
/// - "not acted on" holds only for [`NOT_ACTED_BELIEVED_FOR`] after the call was sent.
pub(crate) fn judge(
    params: Params,
    bin_id: Option<u32>,
    case_state: CaseState,
    elapsed: Duration,
) -> Verdict {
    let this_bin = bin_id == Some(params.bin_id);
    let not_acted = if elapsed <= NOT_ACTED_BELIEVED_FOR {
        Verdict::NotActed
    } else {
        Verdict::TooLate(elapsed)
    };
    match (params.method, case_state) {
        (Method::CaseExtract, CaseState::Ereq | CaseState::Erso) if this_bin => Verdict::Accepted,
        (Method::CaseExtract, CaseState::Noop) if !this_bin => not_acted,
        (Method::CaseCancel, CaseState::Noop) if this_bin => Verdict::Accepted,
        (Method::CaseCancel, CaseState::Ereq | CaseState::Erso) if this_bin => not_acted,
        _ => Verdict::Unclear,
    }
}

/// What a request asks for: a repeat must ask for the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    /// The method called.
    pub(crate) method: Method,
    /// The port.
    pub(crate) port_id: u32,
    /// The bin.
    pub(crate) bin_id: u32,
}

/// A definite answer, kept for repeats: small and `Copy`, so that an entry holds nothing on
/// the heap. The status is built again from it, as the first call's was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The controller accepted the call.
    Ok,
    /// The controller answered this fault code.
    Fault(u32),
}

/// How a call that holds a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The controller answered; repeats get the same answer.
    Answered(Answer),
    /// The controller certainly started nothing; a repeat may call again.
    NothingSent,
    /// The controller may have acted; a repeat reads the port first.
    Unknown,
}

/// How the store records `ending` of a call sent again after the port showed it not acted on.
/// The port read may be stale: the first call, timed out at the gateway, may still reach the
/// controller after it. So any ending but OK leaves the outcome unknown: "nothing sent" is this
/// call's, not the first's; a fault may be the one an earlier call causes (1148 on
/// `case_extract`, 1149 on `case_cancel`) or one the first call's state caused; forgetting the
/// id, or keeping a fault as the answer, could make a retry act a second time.
pub(crate) fn resent_ending(ending: Ending) -> Ending {
    match ending {
        Ending::Answered(Answer::Ok) => ending,
        Ending::Answered(Answer::Fault(_)) | Ending::NothingSent | Ending::Unknown => {
            Ending::Unknown
        }
    }
}

/// What a call with a `request_id` does next.
#[derive(Debug)]
pub(crate) enum Claim {
    /// No call with this id is remembered: call the controller, then end the lease.
    Call(Lease),
    /// An earlier call's outcome is unknown: read the port, then end the lease.
    Resolve(Lease),
    /// An earlier call is in flight: wait for its ending to be sent (`wait_for(Option::is_some)`).
    /// An answer is this call's answer too; after any other ending, claim again, with `unknown`
    /// set to `sent` if it was [`Ending::Unknown`].
    Wait {
        /// Where the call in flight sends its ending.
        ending: watch::Receiver<Option<Ending>>,
        /// When the earliest call that may have acted was sent: the one in flight, or one
        /// before it whose outcome it is resolving.
        sent: Instant,
    },
    /// An earlier call got this answer.
    Replay(Answer),
    /// The id was first sent with these other parameters.
    Reused(Params),
    /// The id is new and every entry is in flight or unknown: it is refused, as forgetting one
    /// could make the controller act twice.
    Full {
        /// How many entries are kept at most.
        max_entries: NonZeroUsize,
        /// How long an entry is kept after its call ended.
        window: Duration,
    },
}

/// The right to call the controller for one `request_id`, until [`Lease::end`]. Dropped
/// without ending (the caller went away), the outcome is unknown once [`Lease::sending`] was
/// called, as the POST may have been sent; before that, nothing was sent.
#[derive(Debug)]
pub(crate) struct Lease {
    store: Store,
    key: u128,
    serial: u64,
    /// When it was claimed, just before its call could be sent.
    claimed: Instant,
    /// When the first call whose outcome this lease resolves was sent: its call is a resend.
    resolving: Option<Instant>,
    /// Whether its call to the controller has begun.
    sending: bool,
    /// Sends how the call ended to every repeat waiting on it.
    in_flight: watch::Sender<Option<Ending>>,
    ended: bool,
}

/// The idempotency store: cheap to clone, shared by every call.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    window: Duration,
    max_entries: NonZeroUsize,
    entries: HashMap<u128, Entry>,
    /// The answered entries with a fault, by serial, oldest first: what expires, and what is
    /// evicted first.
    faults: BTreeMap<u64, u128>,
    /// The answered entries with OK, by serial, oldest first: what expires, and what is
    /// evicted once no fault is left.
    oks: BTreeMap<u64, u128>,
    /// The entries with an unknown outcome, by serial, oldest first: what expires, never
    /// evicted. Entries in flight are in no index: they neither expire nor are evicted.
    unknown: BTreeMap<u64, u128>,
    next_serial: u64,
    gauges: EntryGauges,
}

/// What the store remembers about one `request_id`.
#[derive(Debug)]
struct Entry {
    /// Its place in its index: renewed when a call ends, so each index is by `since`.
    serial: u64,
    /// When its last call ended, or, while in flight, when the earliest call that may have
    /// acted was sent: this one, claimed just before it is sent, or the first one whose
    /// outcome it resolves.
    since: Instant,
    params: Params,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Where its lease sends the ending.
    InFlight(watch::Receiver<Option<Ending>>),
    Answered(Answer),
    /// When the first call that may have acted was sent: repeats that could not settle it keep
    /// that time, so a port read is judged by how long ago that call may have been accepted.
    Unknown(Instant),
}

/// What [`Store::claim`] did besides answering, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counts {
    /// Whether the id was already remembered (a repeat).
    pub(crate) hit: bool,
    /// How many answered faults were evicted to make room.
    pub(crate) evicted_faults: usize,
    /// How many answered OKs were evicted to make room: a repeat of one is sent again.
    pub(crate) evicted_oks: usize,
}

// === impl Method ===

impl Method {
    /// The task-interface method, as messages name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Method::CaseExtract => "case_extract",
            Method::CaseCancel => "case_cancel",
        }
    }
}

// === impl Store ===

impl Store {
    /// Remembers ids for `window` after their call ended, at most `max_entries` of them, and
    /// keeps `gauges` counting them by state.
    pub(crate) fn new(window: Duration, max_entries: NonZeroUsize, gauges: EntryGauges) -> Self {
        Store {
            inner: Arc::new(Mutex::new(Inner {
                window,
                max_entries,
                entries: HashMap::new(),
                faults: BTreeMap::new(),
                oks: BTreeMap::new(),
                unknown: BTreeMap::new(),
                next_serial: 0,
                gauges,
            })),
        }
    }

    /// What a call of `params` with `request_id` does at `now`. `unknown` says the caller was
    /// told an earlier call with it ended with an unknown outcome, and when that call was sent
    /// ([`Claim::Wait`]): if the entry has gone since, the call still reads the port first.
    pub(crate) fn claim(
        &self,
        request_id: u128,
        params: Params,
        unknown: Option<Instant>,
        now: Instant,
    ) -> (Claim, Counts) {
        let mut inner = self.lock();
        let claimed = self.claim_in(&mut inner, request_id, params, unknown, now);
        inner.publish();
        claimed
    }

    /// [`Store::claim`], holding the table.
    fn claim_in(
        &self,
        inner: &mut Inner,
        request_id: u128,
        params: Params,
        unknown: Option<Instant>,
        now: Instant,
    ) -> (Claim, Counts) {
        inner.expire(now);
        let mut counts = Counts::default();
        if let Some(entry) = inner.entries.get_mut(&request_id) {
            counts.hit = true;
            if entry.params != params {
                return (Claim::Reused(entry.params), counts);
            }
            let claim = match &entry.state {
                State::InFlight(receiver) => Claim::Wait {
                    ending: receiver.clone(),
                    sent: entry.since,
                },
                State::Answered(answer) => Claim::Replay(*answer),
                State::Unknown(sent) => {
                    let sent = *sent;
                    let (sender, receiver) = watch::channel(None);
                    entry.state = State::InFlight(receiver);
                    entry.since = sent;
                    let serial = entry.serial;
                    inner.unknown.remove(&serial);
                    Claim::Resolve(self.lease(request_id, serial, now, Some(sent), sender))
                }
            };
            return (claim, counts);
        }
        (counts.evicted_faults, counts.evicted_oks) = inner.make_room();
        if inner.entries.len() >= inner.max_entries.get() {
            let full = Claim::Full {
                max_entries: inner.max_entries,
                window: inner.window,
            };
            return (full, counts);
        }
        let serial = inner.next_serial;
        inner.next_serial += 1;
        let (sender, receiver) = watch::channel(None);
        inner.entries.insert(
            request_id,
            Entry {
                serial,
                since: unknown.unwrap_or(now),
                params,
                state: State::InFlight(receiver),
            },
        );
        let lease = self.lease(request_id, serial, now, unknown, sender);
        let claim = if unknown.is_some() {
            Claim::Resolve(lease)
        } else {
            Claim::Call(lease)
        };
        (claim, counts)
    }

    /// How many ids are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }

    fn lease(
        &self,
        key: u128,
        serial: u64,
        claimed: Instant,
        resolving: Option<Instant>,
        sender: watch::Sender<Option<Ending>>,
    ) -> Lease {
        Lease {
            store: self.clone(),
            key,
            serial,
            claimed,
            resolving,
            sending: false,
            in_flight: sender,
            ended: false,
        }
    }

    /// The table, even if a thread panicked holding it. A change may take several statements
    /// (`Inner::end`, `expire`), but none of them can panic between the first and the last (map
    /// inserts and removes, arithmetic on a `u64` serial that cannot overflow in practice), so
    /// the table is never left half made.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

// === impl Inner ===

impl Inner {
    /// Sets the gauges of entries by state from the indexes: an entry in none is in flight.
    fn publish(&self) {
        let answered = self.faults.len() + self.oks.len();
        let unknown = self.unknown.len();
        let in_flight = self.entries.len().saturating_sub(answered + unknown);
        self.gauges.set(in_flight, answered, unknown);
    }

    /// Forgets every entry not in flight whose last call ended a window ago or more: the
    /// oldest of each index, until one is younger.
    fn expire(&mut self, now: Instant) {
        let window = self.window;
        for index in [&mut self.faults, &mut self.oks, &mut self.unknown] {
            while let Some(entry) = index.first_entry() {
                let key = *entry.get();
                let young = self
                    .entries
                    .get(&key)
                    .is_some_and(|kept| now.saturating_duration_since(kept.since) < window);
                if young {
                    break;
                }
                entry.remove();
                self.entries.remove(&key);
            }
        }
    }

    /// Evicts the oldest answered faults, then the oldest answered OKs, never one in flight or
    /// unknown, until one more fits or none is left; returns how many faults and OKs.
    fn make_room(&mut self) -> (usize, usize) {
        let mut evicted = (0, 0);
        while self.entries.len() >= self.max_entries.get() {
            if let Some((_, key)) = self.faults.pop_first() {
                self.entries.remove(&key);
                evicted.0 += 1;
            } else if let Some((_, key)) = self.oks.pop_first() {
                self.entries.remove(&key);
                evicted.1 += 1;
            } else {
                break;
            }
        }
        evicted
    }

    /// Records how the lease `serial` on `key` ended at `now`, unless its entry has gone; an
    /// unknown ending keeps `sent`, when the earliest call that may have acted was sent.
    fn end(&mut self, key: u128, serial: u64, sent: Instant, ending: Ending, now: Instant) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if entry.serial != serial {
            return;
        }
        let (state, index) = match ending {
            Ending::Answered(Answer::Ok) => (State::Answered(Answer::Ok), &mut self.oks),
            Ending::Answered(fault) => (State::Answered(fault), &mut self.faults),
            Ending::Unknown => (State::Unknown(sent), &mut self.unknown),
            Ending::NothingSent => {
                self.entries.remove(&key);
                self.publish();
                return;
            }
        };
        entry.state = state;
        entry.since = now;
        entry.serial = self.next_serial;
        index.insert(self.next_serial, key);
        self.next_serial += 1;
        self.publish();
    }
}

// === impl Lease ===

impl Lease {
    /// When the first call whose outcome this lease resolves was sent, if it resolves one.
    pub(crate) fn unknown_since(&self) -> Option<Instant> {
        self.resolving
    }

    /// Marks the call to the controller as begun: dropped from now on, the lease leaves the
    /// outcome unknown rather than forget the id.
    pub(crate) fn sending(&mut self) {
        self.sending = true;
    }

    /// When the earliest call that may have acted was sent: the one this lease resolves, or
    /// else its own, sent just after its claim.
    fn sent(&self) -> Instant {
        self.resolving.unwrap_or(self.claimed)
    }

    /// Records how the call ended at `now`, as [`resent_ending`] has it when the call was sent
    /// again after an unknown outcome; returns what was recorded. Repeats waiting on it then
    /// claim again.
    pub(crate) fn end(mut self, ending: Ending, now: Instant) -> Ending {
        self.ended = true;
        let mut inner = self.store.lock();
        let ending = match self.resolving {
            Some(_) => resent_ending(ending),
            None => ending,
        };
        inner.end(self.key, self.serial, self.sent(), ending, now);
        drop(inner);
        self.in_flight.send_replace(Some(ending));
        ending
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.ended {
            let ending = match (self.sending, self.resolving) {
                (false, None) => Ending::NothingSent,
                (true, _) | (false, Some(_)) => Ending::Unknown,
            };
            let now = Instant::now();
            self.store
                .lock()
                .end(self.key, self.serial, self.sent(), ending, now);
            self.in_flight.send_replace(Some(ending));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(600);
    const EXTRACT: Params = Params {
        method: Method::CaseExtract,
        port_id: 4,
        bin_id: 101337,
    };

    fn store(max_entries: usize) -> Store {
        Store::new(
            WINDOW,
            NonZeroUsize::new(max_entries).unwrap(),
            EntryGauges::default(),
        )
    }

    fn lease(claim: Claim) -> Lease {
        match claim {
            Claim::Call(lease) | Claim::Resolve(lease) => lease,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    /// The lease of `claim`, its call begun.
    fn sent(claim: Claim) -> Lease {
        let mut lease = lease(claim);
        lease.sending();
        lease
    }

    /// The gauges follow each entry from in flight to answered or unknown, and out when the
    /// window has passed.
    #[test]
    fn the_gauges_count_entries_by_state() {
        let gauges = EntryGauges::default();
        let store = Store::new(WINDOW, NonZeroUsize::new(10).unwrap(), gauges.clone());
        let now = Instant::now();
        let ok = lease(store.claim(1, EXTRACT, None, now).0);
        let unknown = sent(store.claim(2, EXTRACT, None, now).0);
        let _in_flight = lease(store.claim(3, EXTRACT, None, now).0);
        let nothing_sent = lease(store.claim(4, EXTRACT, None, now).0);
        assert_eq!(gauges.get(), [4, 0, 0]);
        ok.end(Ending::Answered(Answer::Ok), now);
        assert_eq!(gauges.get(), [3, 1, 0]);
        drop(unknown);
        assert_eq!(gauges.get(), [2, 1, 1]);
        nothing_sent.end(Ending::NothingSent, now);
        assert_eq!(gauges.get(), [1, 1, 1]);
        let later = Instant::now() + WINDOW + Duration::from_secs(1);
        let _new = lease(store.claim(5, EXTRACT, None, later).0);
        assert_eq!(gauges.get(), [2, 0, 0]);
    }

    #[test]
    fn a_repeat_after_an_answer_gets_it_and_nothing_is_called_twice() {
        let store = store(10);
        let now = Instant::now();
        let (claim, counts) = store.claim(1, EXTRACT, None, now);
        assert!(!counts.hit);
        lease(claim).end(Ending::Answered(Answer::Fault(1149)), now);
        let (claim, counts) = store.claim(1, EXTRACT, None, now + Duration::from_secs(1));
        assert!(counts.hit);
        assert!(
            matches!(claim, Claim::Replay(Answer::Fault(1149))),
            "{claim:?}"
        );
    }

    #[test]
    fn the_same_id_with_other_parameters_or_method_is_refused() {
        let store = store(10);
        let now = Instant::now();
        let _first = lease(store.claim(1, EXTRACT, None, now).0);
        let other_bin = Params {
            bin_id: 7,
            ..EXTRACT
        };
        let cancel = Params {
            method: Method::CaseCancel,
            ..EXTRACT
        };
        for params in [other_bin, cancel] {
            let (claim, _) = store.claim(1, params, None, now);
            assert!(
                matches!(claim, Claim::Reused(first) if first == EXTRACT),
                "{claim:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_repeat_in_flight_waits_for_the_first_call_and_then_replays_it() {
        let store = store(10);
        let now = Instant::now();
        let first = lease(store.claim(1, EXTRACT, None, now).0);
        let Claim::Wait {
            ending: mut receiver,
            ..
        } = store.claim(1, EXTRACT, None, now).0
        else {
            panic!("expected to wait");
        };
        first.end(Ending::Answered(Answer::Ok), now);
        let ending = *receiver.wait_for(Option::is_some).await.unwrap();
        assert_eq!(ending, Some(Ending::Answered(Answer::Ok)));
        assert!(matches!(
            store.claim(1, EXTRACT, None, now).0,
            Claim::Replay(Answer::Ok)
        ));
    }

    /// The first call's entry is evicted the moment it ends (the table is full of calls in
    /// flight): a repeat that waited for it is still given its answer, so it never calls the
    /// controller a second time.
    #[tokio::test]
    async fn a_waiting_repeat_gets_the_answer_even_if_the_entry_is_evicted_at_once() {
        let store = store(2);
        let now = Instant::now();
        let first = lease(store.claim(1, EXTRACT, None, now).0);
        let Claim::Wait {
            ending: mut receiver,
            ..
        } = store.claim(1, EXTRACT, None, now).0
        else {
            panic!("expected to wait");
        };
        let _other = lease(store.claim(2, EXTRACT, None, now).0);
        first.end(Ending::Answered(Answer::Fault(1149)), now);
        let (claim, counts) = store.claim(3, EXTRACT, None, now);
        let _third = lease(claim);
        assert_eq!(counts.evicted_faults, 1, "1 was evicted");
        let ending = *receiver.wait_for(Option::is_some).await.unwrap();
        assert_eq!(ending, Some(Ending::Answered(Answer::Fault(1149))));
    }

    /// A repeat that waited for a call ending with an unknown outcome reads the port first,
    /// even when the entry has gone by the time it claims again, and judges it by when that
    /// call was sent.
    #[tokio::test]
    async fn a_repeat_told_of_an_unknown_outcome_reads_the_port_though_the_entry_is_gone() {
        let store = store(2);
        let now = Instant::now();
        let first = sent(store.claim(1, EXTRACT, None, now).0);
        let Claim::Wait {
            ending: mut receiver,
            sent,
        } = store
            .claim(1, EXTRACT, None, now + Duration::from_secs(1))
            .0
        else {
            panic!("expected to wait");
        };
        assert_eq!(sent, now);
        drop(first);
        let ending = *receiver.wait_for(Option::is_some).await.unwrap();
        assert_eq!(ending, Some(Ending::Unknown));
        let gone = now + WINDOW * 2;
        let (claim, counts) = store.claim(1, EXTRACT, Some(sent), gone);
        assert!(!counts.hit, "the entry expired");
        let claim = lease(claim);
        assert_eq!(claim.unknown_since(), Some(now));
    }

    /// A caller that goes away before its call to the controller began sent nothing: the id is
    /// forgotten, and a repeat calls at once rather than read the port first. Once the call
    /// began, going away leaves the outcome unknown.
    #[tokio::test]
    async fn a_lease_dropped_before_its_call_began_forgets_the_id() {
        let store = store(10);
        let now = Instant::now();
        let first = lease(store.claim(1, EXTRACT, None, now).0);
        let Claim::Wait {
            ending: mut receiver,
            ..
        } = store.claim(1, EXTRACT, None, now).0
        else {
            panic!("expected to wait");
        };
        drop(first);
        let ending = *receiver.wait_for(Option::is_some).await.unwrap();
        assert_eq!(ending, Some(Ending::NothingSent));
        assert_eq!(store.len(), 0);
        let (claim, counts) = store.claim(1, EXTRACT, None, now);
        assert!(!counts.hit);
        drop(sent(claim));
        let (claim, counts) = store.claim(1, EXTRACT, None, now);
        assert!(counts.hit);
        assert!(matches!(claim, Claim::Resolve(_)), "{claim:?}");
    }

    /// An evicted OK lets a repeat of that id be sent like a new call, which acts a second
    /// time; an evicted fault only makes the controller answer it again. So every answered
    /// fault goes before any answered OK, however much older the OK, and each is counted by
    /// its state.
    #[test]
    fn answered_faults_are_evicted_before_answered_oks() {
        let store = store(3);
        let now = Instant::now();
        lease(store.claim(1, EXTRACT, None, now).0).end(Ending::Answered(Answer::Ok), now);
        let later = now + Duration::from_secs(1);
        for id in [2, 3] {
            let fault = Ending::Answered(Answer::Fault(1149));
            lease(store.claim(id, EXTRACT, None, later).0).end(fault, later);
        }
        for id in [4, 5] {
            let (claim, counts) = store.claim(id, EXTRACT, None, later);
            assert_eq!((counts.evicted_faults, counts.evicted_oks), (1, 0), "{id}");
            lease(claim).end(Ending::Answered(Answer::Ok), later);
        }
        assert!(matches!(
            store.claim(1, EXTRACT, None, later).0,
            Claim::Replay(Answer::Ok)
        ));
        let (claim, counts) = store.claim(6, EXTRACT, None, later);
        assert_eq!((counts.evicted_faults, counts.evicted_oks), (0, 1));
        let _sixth = lease(claim);
        assert!(
            matches!(store.claim(1, EXTRACT, None, later).0, Claim::Call(_)),
            "the oldest OK went last"
        );
    }

    /// Forgetting an entry whose outcome is unknown would make a later repeat send without
    /// reading the port: when only such entries and calls in flight are left, a new id is
    /// refused instead, before anything is sent, and the unknown one still reads the port.
    #[test]
    fn an_unknown_entry_is_never_evicted_and_a_new_id_is_refused_instead() {
        let store = store(2);
        let now = Instant::now();
        drop(sent(store.claim(1, EXTRACT, None, now).0));
        let later = now + Duration::from_secs(1);
        lease(store.claim(2, EXTRACT, None, later).0).end(Ending::Answered(Answer::Ok), later);
        let (claim, counts) = store.claim(3, EXTRACT, None, later);
        assert_eq!(counts.evicted_oks, 1, "the answered one goes first");
        let _third = lease(claim);
        let (claim, counts) = store.claim(4, EXTRACT, None, later);
        assert!(matches!(claim, Claim::Full { .. }), "{claim:?}");
        assert_eq!(counts.evicted_oks, 0);
        assert_eq!(store.len(), 2);
        let (claim, _) = store.claim(1, EXTRACT, None, later);
        assert!(matches!(claim, Claim::Resolve(_)), "1 is kept: {claim:?}");
    }

    #[test]
    fn after_an_unknown_outcome_one_repeat_resolves_and_the_next_waits() {
        let store = store(10);
        let now = Instant::now();
        drop(sent(store.claim(1, EXTRACT, None, now).0));
        let resolving = store.claim(1, EXTRACT, None, now).0;
        assert!(matches!(resolving, Claim::Resolve(_)), "{resolving:?}");
        assert!(matches!(
            store.claim(1, EXTRACT, None, now).0,
            Claim::Wait { .. }
        ));
        lease(resolving).end(Ending::Unknown, now);
        assert!(matches!(
            store.claim(1, EXTRACT, None, now).0,
            Claim::Resolve(_)
        ));
    }

    /// The first call timed out at the gateway but is still on its way to the controller; a
    /// repeat read NOOP and sent it again; the controller handled the first call, so the resend
    /// got a fault (1148, or one the first call's state causes), was cut off, or ended with
    /// nothing sent. The id must stay unknown: forgotten, or answered with that fault, a retry
    /// could POST again and extract a second time. Only OK settles it.
    #[test]
    fn a_resend_that_ends_other_than_ok_keeps_the_outcome_unknown() {
        let cancel = Params {
            method: Method::CaseCancel,
            ..EXTRACT
        };
        let endings = [
            Ending::NothingSent,
            Ending::Unknown,
            Ending::Answered(Answer::Fault(1148)),
            Ending::Answered(Answer::Fault(1149)),
            Ending::Answered(Answer::Fault(1099)),
        ];
        for params in [EXTRACT, cancel] {
            for ending in endings {
                let store = store(10);
                let now = Instant::now();
                drop(sent(store.claim(1, params, None, now).0));
                let resolving = lease(store.claim(1, params, None, now).0);
                assert_eq!(resolving.end(ending, now), Ending::Unknown, "{params:?}");
                let (claim, counts) = store.claim(1, params, None, now);
                assert!(counts.hit, "{params:?} {ending:?}: the id is kept");
                assert!(
                    matches!(claim, Claim::Resolve(_)),
                    "{params:?} {ending:?}: {claim:?}"
                );
            }
            let store = store(10);
            let now = Instant::now();
            drop(sent(store.claim(1, params, None, now).0));
            let resolving = lease(store.claim(1, params, None, now).0);
            let ok = Ending::Answered(Answer::Ok);
            assert_eq!(resolving.end(ok, now), ok);
            assert!(matches!(
                store.claim(1, params, None, now).0,
                Claim::Replay(Answer::Ok)
            ));
        }
    }

    /// The lease of a repeat after an unknown outcome says when the call whose outcome is
    /// unknown was sent, not when it ended: after a timeout the controller may have accepted it
    /// at any moment since the send, as much as `--upstream-timeout` before the ending, so the
    /// port's state is judged by how long ago the send was.
    #[test]
    fn a_resolving_lease_knows_when_the_unknown_call_was_sent() {
        let store = store(10);
        let now = Instant::now();
        let first = sent(store.claim(1, EXTRACT, None, now).0);
        assert_eq!(first.unknown_since(), None);
        let timed_out = now + Duration::from_secs(3600);
        first.end(Ending::Unknown, timed_out);
        let later = timed_out + Duration::from_secs(1);
        let resolving = lease(store.claim(1, EXTRACT, None, later).0);
        assert_eq!(resolving.unknown_since(), Some(now));
        // A repeat that could not settle it (the port read failed, or did not tell, or a resend
        // failed) keeps the first send: the first call may still have acted back then.
        resolving.end(Ending::Unknown, later);
        let (claim, _) = store.claim(1, EXTRACT, None, later + Duration::from_secs(1));
        assert_eq!(lease(claim).unknown_since(), Some(now));
    }

    #[test]
    fn nothing_sent_forgets_the_id() {
        let store = store(10);
        let now = Instant::now();
        lease(store.claim(1, EXTRACT, None, now).0).end(Ending::NothingSent, now);
        assert_eq!(store.len(), 0);
        let (claim, counts) = store.claim(1, EXTRACT, None, now);
        assert!(matches!(claim, Claim::Call(_)), "{claim:?}");
        assert!(!counts.hit);
    }

    #[test]
    fn an_id_is_forgotten_once_the_window_from_its_answer_has_passed() {
        let store = store(10);
        let now = Instant::now();
        lease(store.claim(1, EXTRACT, None, now).0).end(Ending::Answered(Answer::Ok), now);
        let just_before = now + WINDOW - Duration::from_millis(1);
        assert!(matches!(
            store.claim(1, EXTRACT, None, just_before).0,
            Claim::Replay(_)
        ));
        assert!(matches!(
            store.claim(1, EXTRACT, None, now + WINDOW).0,
            Claim::Call(_)
        ));
    }

    #[test]
    fn when_full_the_oldest_settled_entry_is_evicted_never_one_in_flight() {
        let store = store(2);
        let now = Instant::now();
        let _in_flight = lease(store.claim(1, EXTRACT, None, now).0);
        lease(store.claim(2, EXTRACT, None, now).0).end(Ending::Answered(Answer::Ok), now);
        let (claim, counts) = store.claim(3, EXTRACT, None, now);
        assert_eq!(counts.evicted_oks, 1);
        let _third = lease(claim);
        assert_eq!(store.len(), 2);
        assert!(
            matches!(store.claim(1, EXTRACT, None, now).0, Claim::Wait { .. }),
            "1 is kept"
        );
        // Every entry is in flight now: a new id is refused rather than forget one.
        let (claim, counts) = store.claim(2, EXTRACT, None, now);
        assert!(
            matches!(claim, Claim::Full { .. }),
            "2 was evicted: {claim:?}"
        );
        assert_eq!(counts.evicted_oks, 0);
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn a_call_in_flight_never_expires_and_the_window_counts_from_its_answer() {
        let store = store(10);
        let now = Instant::now();
        let first = lease(store.claim(1, EXTRACT, None, now).0);
        let answered = now + WINDOW * 2;
        assert!(matches!(
            store.claim(1, EXTRACT, None, answered).0,
            Claim::Wait { .. }
        ));
        first.end(Ending::Answered(Answer::Ok), answered);
        let just_before = answered + WINDOW - Duration::from_millis(1);
        assert!(matches!(
            store.claim(1, EXTRACT, None, just_before).0,
            Claim::Replay(Answer::Ok)
        ));
        assert!(matches!(
            store.claim(1, EXTRACT, None, answered + WINDOW).0,
            Claim::Call(_)
        ));
    }

    #[test]
    fn what_the_port_shows_after_an_unknown_outcome() {
        let cancel = Params {
            method: Method::CaseCancel,
            ..EXTRACT
        };
        let this = Some(EXTRACT.bin_id);
        let other = Some(7);
        let cases = [
            (EXTRACT, this, CaseState::Ereq, Verdict::Accepted),
            (EXTRACT, this, CaseState::Erso, Verdict::Accepted),
            (EXTRACT, this, CaseState::Ecmp, Verdict::Unclear),
            (EXTRACT, None, CaseState::Noop, Verdict::NotActed),
            (EXTRACT, other, CaseState::Noop, Verdict::NotActed),
            (EXTRACT, this, CaseState::Noop, Verdict::Unclear),
            (EXTRACT, other, CaseState::Ereq, Verdict::Unclear),
            (EXTRACT, this, CaseState::Ireq, Verdict::Unclear),
            (cancel, this, CaseState::Noop, Verdict::Accepted),
            (cancel, this, CaseState::Ereq, Verdict::NotActed),
            (cancel, this, CaseState::Erso, Verdict::NotActed),
            (cancel, this, CaseState::Ecmp, Verdict::Unclear),
            (cancel, None, CaseState::Noop, Verdict::Unclear),
            (cancel, other, CaseState::Noop, Verdict::Unclear),
        ];
        let long_after = NOT_ACTED_BELIEVED_FOR + Duration::from_millis(1);
        for (params, bin_id, case_state, verdict) in cases {
            for elapsed in [Duration::ZERO, NOT_ACTED_BELIEVED_FOR] {
                assert_eq!(
                    judge(params, bin_id, case_state, elapsed),
                    verdict,
                    "{params:?} {bin_id:?} {case_state:?}"
                );
            }
            // Long after the first call was sent, it may have been accepted, run and
            // been followed by another operation: "not acted on" is no longer believed.
            let late = match verdict {
                Verdict::NotActed => Verdict::TooLate(long_after),
                other => other,
            };
            assert_eq!(
                judge(params, bin_id, case_state, long_after),
                late,
                "{params:?} {bin_id:?} {case_state:?} late"
            );
        }
    }

    /// What `watch::channel` allocates for an entry in flight (its shared state, one
    /// allocation; cloning a receiver allocates nothing): 360 bytes with tokio 1.54 and this
    /// crate's tokio features, counted by a global allocator that adds up the sizes asked for
    /// around one `watch::channel::<Option<Ending>>(None)`. The type is private to tokio, so
    /// `size_of` cannot reach it. `tests/idempotency_memory.rs` checks the sum against resident
    /// memory, malloc's overhead included: an entry in flight measures 474 bytes there (this
    /// channel, malloc's header, and the hash table at the load of 100,000 entries).
    const WATCH_CHANNEL_BYTES: usize = 360;

    /// The most memory one entry takes, in bytes, at worst: in the store's hash map an entry and
    /// a control byte, at a load as low as 7/16 (hashbrown fills to 7/8, then doubles), plus,
    /// once its call ended, an item of one ordered index in B-tree nodes at worst half full,
    /// measured with `size_of`; and, while in flight, its watch channel (an entry has either,
    /// never both, so the sum is a bound). A test pins the number the README states.
    const WORST_CASE_ENTRY_BYTES: usize = {
        let table = (size_of::<(u128, Entry)>() + 1) * 16 / 7;
        let order = size_of::<(u64, u128)>() * 2;
        table + order + WATCH_CHANNEL_BYTES
    };

    /// The simulator makes the inference true: what its port shows after it accepted a call
    /// judges it accepted, whenever the port is read; what it shows when it has not judges it
    /// not acted on.
    #[test]
    fn the_simulator_makes_the_inference_true() {
        use crate::simulator::port::{PortMode, PortSettings, PortTable};
        let step = Duration::from_secs(2);
        let port = PortSettings {
            id: 4,
            autocase: true,
            mode: PortMode::Open,
            selected_bin: Some(EXTRACT.bin_id),
        };
        let cancel = Params {
            method: Method::CaseCancel,
            ..EXTRACT
        };
        let judge_at = |table: &PortTable, params: Params, at: Instant| {
            let (bin_id, case_state) = table.case_state(4, at).unwrap();
            judge(params, bin_id, case_state, Duration::ZERO)
        };
        let later = [Duration::ZERO, step / 2, step, step * 2, step * 100];
        let start = Instant::now();
        let mut table = PortTable::new(std::slice::from_ref(&port), step);
        assert_eq!(judge_at(&table, EXTRACT, start), Verdict::NotActed);
        table.case_extract(4, EXTRACT.bin_id, start).unwrap();
        for offset in [Duration::ZERO, step / 2, step + step / 2] {
            assert_eq!(judge_at(&table, EXTRACT, start + offset), Verdict::Accepted);
        }
        // Once the extraction completed the port shows ECMP with the bin until the next
        // operation: what a call never accepted sees after an earlier extraction of the same
        // bin completed. So ECMP does not prove this call was accepted.
        for offset in [step * 2, step * 100] {
            let at = start + offset;
            let shown = table.case_state(4, at).unwrap();
            assert_eq!(shown, (Some(EXTRACT.bin_id), CaseState::Ecmp));
            assert_eq!(judge_at(&table, EXTRACT, at), Verdict::Unclear);
        }
        let mut table = PortTable::new(&[port], step);
        table.case_extract(4, EXTRACT.bin_id, start).unwrap();
        let cancelled = start + step / 2;
        assert_eq!(judge_at(&table, cancel, cancelled), Verdict::NotActed);
        table.case_cancel(4, EXTRACT.bin_id, cancelled).unwrap();
        for offset in later {
            assert_eq!(
                judge_at(&table, cancel, cancelled + offset),
                Verdict::Accepted
            );
        }
    }

    /// The README states the bound within which "not acted on" is believed.
    #[test]
    fn the_readme_states_how_long_not_acted_is_believed() {
        let readme = include_str!("../README.md");
        let seconds = NOT_ACTED_BELIEVED_FOR.as_secs();
        let stated = format!("within {seconds} s of the first call being sent");
        assert!(readme.contains(&stated), "README: {stated}");
    }

    /// The README states the worst-case memory of the default `--idempotency-max-entries`.
    #[test]
    fn the_memory_of_an_entry_is_what_the_readme_states() {
        assert_eq!(WORST_CASE_ENTRY_BYTES, 609);
        let readme = include_str!("../README.md");
        assert!(readme.contains("at most 609 bytes each"), "README");
        let default = crate::config::defaults::IDEMPOTENCY_MAX_ENTRIES.get();
        let mib = (default * WORST_CASE_ENTRY_BYTES) as f64 / f64::from(1 << 20);
        assert!(
            readme.contains(&format!("{mib:.1} MiB")),
            "README: {mib:.1} MiB"
        );
    }
}
