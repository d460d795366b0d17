//! The idempotency store (AIP-155): what the gateway remembers about each `request_id` sent on
//! CaseExtract and CaseCancel, so that a repeat is never POSTed twice.
//!
//! Pure logic: time is passed in as `now`, and the only waiting is on a `watch` channel the
//! service awaits. An entry is keyed by the request_id alone and remembers the method, port and
//! bin it came with (a repeat with other ones is refused), and where the call stands:
//!
//! - in flight: one call holds its [`Lease`]; a repeat waits for it;
//! - answered: OK, or a fault the controller sent; a repeat gets the same answer;
//! - unknown: the call ended where the controller may have acted (connection lost, timeout, a
//!   5xx, a reply the gateway cannot read, or the caller went away mid-call); a repeat takes the
//!   lease and reads the port before doing anything.
//!
//! An answer where the controller certainly started nothing (unreachable, 503 or 429, fault
//! 1148, a deadline too short) is not kept: the entry is dropped, so a repeat calls again.
//! Except after a resend: a lease that resolved an unknown outcome and sent the call again
//! (the port showed no operation) cannot tell its own "nothing sent" from the first call's,
//! which may still reach the controller after the port was read. Such an ending, or the fault
//! the controller sends when an earlier call already acted (1148 for `case_extract`, 1149 for
//! `case_cancel`), keeps the entry unknown: see [`resent_ending`].
//!
//! Entries live for the window from the answer (or unknown outcome) of their last call, and at
//! most `max_entries` are kept. An entry in flight never expires and is never evicted: the table
//! may hold one more entry per call in flight (at most `--max-in-flight`, which the config
//! checks keep below `--idempotency-max-entries`). A repeat waiting for a call in flight is
//! given its ending through the lease's channel, so evicting the entry the moment the call
//! ends cannot make the repeat call again. When full, the oldest answered entry is evicted; an
//! unknown one only when no answered one is left, as a repeat of an evicted unknown id is sent
//! without reading the port first (the oldest, counted apart: the bound on memory wins, and
//! `/metrics` shows it happened). A repeat that was told of an unknown ending and finds its
//! entry gone reads the port all the same.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::CaseState;

/// The two methods that take a `request_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// `case_extract`.
    CaseExtract,
    /// `case_cancel`.
    CaseCancel,
}

/// What `case_getstate` shows about a call whose outcome was unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The controller accepted the call: its answer was OK.
    Accepted,
    /// The controller did not act on it: send it again.
    NotActed,
    /// The state does not tell.
    Unclear,
}

/// What a port in `case_state` with `bin_id`, read after a call of `params` whose outcome was
/// unknown, says about that call.
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
pub(crate) fn judge(params: Params, bin_id: Option<u32>, case_state: CaseState) -> Verdict {
    let this_bin = bin_id == Some(params.bin_id);
    match (params.method, case_state) {
        (Method::CaseExtract, CaseState::Ereq | CaseState::Erso) if this_bin => Verdict::Accepted,
        (Method::CaseExtract, CaseState::Noop) if !this_bin => Verdict::NotActed,
        (Method::CaseCancel, CaseState::Noop) if this_bin => Verdict::Accepted,
        (Method::CaseCancel, CaseState::Ereq | CaseState::Erso) if this_bin => Verdict::NotActed,
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

/// The fault the controller answers `method` with when an earlier call already acted on the
/// port: 1148 (previous action not completed) for `case_extract`, 1149 (bin not selected,
/// as after a cancel) for `case_cancel`.
fn already_acted_fault(method: Method) -> u32 {
    match method {
        Method::CaseExtract => 1148,
        Method::CaseCancel => 1149,
    }
}

/// How the store records `ending` of a call of `method` sent again after the port showed no
/// operation. The port read may be stale: the first call, timed out at the gateway, may still
/// reach the controller after it. So "nothing sent" (this call's, not the first's), or the fault
/// meaning an earlier call already acted, leaves the outcome unknown: forgetting the id, or
/// keeping that fault as the answer, could make a retry act a second time.
pub(crate) fn resent_ending(method: Method, ending: Ending) -> Ending {
    match ending {
        Ending::NothingSent => Ending::Unknown,
        Ending::Answered(Answer::Fault(code)) if code == already_acted_fault(method) => {
            Ending::Unknown
        }
        other => other,
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
    /// An answer is this call's answer too; after any other ending, claim again, with
    /// `unknown` set if it was [`Ending::Unknown`].
    Wait(watch::Receiver<Option<Ending>>),
    /// An earlier call got this answer.
    Replay(Answer),
    /// The id was first sent with these other parameters.
    Reused(Params),
}

/// The right to call the controller for one `request_id`, until [`Lease::end`]. Dropped
/// without ending (the caller went away mid-call), the outcome is unknown: the POST may have
/// been sent.
#[derive(Debug)]
pub(crate) struct Lease {
    store: Store,
    key: u128,
    serial: u64,
    /// Whether the lease resolves an unknown outcome: its call is a resend.
    resolving: bool,
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
    /// The keys by serial, oldest first: what expires and what is evicted first. Entries in
    /// flight keep the serial of their claim, and are skipped.
    order: BTreeMap<u64, u128>,
    next_serial: u64,
}

/// What the store remembers about one `request_id`.
#[derive(Debug)]
struct Entry {
    /// Its place in `order`: renewed when a call ends, so `order` is by `since`.
    serial: u64,
    /// When its last call ended, or, while in flight, when it was claimed.
    since: Instant,
    params: Params,
    state: State,
}

#[derive(Debug)]
enum State {
    InFlight(watch::Receiver<Option<Ending>>),
    Answered(Answer),
    Unknown,
}

/// What [`Store::claim`] did besides answering, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counts {
    /// Whether the id was already remembered (a repeat).
    pub(crate) hit: bool,
    /// How many answered entries were evicted to make room.
    pub(crate) evicted: usize,
    /// How many entries with an unknown outcome were evicted to make room: a repeat of one is
    /// sent without reading the port first.
    pub(crate) evicted_unknown: usize,
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
    /// Remembers ids for `window` after their call ended, at most `max_entries` of them.
    pub(crate) fn new(window: Duration, max_entries: NonZeroUsize) -> Self {
        Store {
            inner: Arc::new(Mutex::new(Inner {
                window,
                max_entries,
                entries: HashMap::new(),
                order: BTreeMap::new(),
                next_serial: 0,
            })),
        }
    }

    /// What a call of `params` with `request_id` does at `now`. `unknown` says the caller was
    /// told an earlier call with it ended with an unknown outcome: if the entry has gone since,
    /// the call still reads the port first.
    pub(crate) fn claim(
        &self,
        request_id: u128,
        params: Params,
        unknown: bool,
        now: Instant,
    ) -> (Claim, Counts) {
        let mut inner = self.lock();
        inner.expire(now);
        let mut counts = Counts::default();
        if let Some(entry) = inner.entries.get_mut(&request_id) {
            counts.hit = true;
            if entry.params != params {
                return (Claim::Reused(entry.params), counts);
            }
            let claim = match &entry.state {
                State::InFlight(receiver) => Claim::Wait(receiver.clone()),
                State::Answered(answer) => Claim::Replay(*answer),
                State::Unknown => {
                    let (sender, receiver) = watch::channel(None);
                    entry.state = State::InFlight(receiver);
                    Claim::Resolve(self.lease(request_id, entry.serial, true, sender))
                }
            };
            return (claim, counts);
        }
        (counts.evicted, counts.evicted_unknown) = inner.make_room();
        let serial = inner.next_serial;
        inner.next_serial += 1;
        let (sender, receiver) = watch::channel(None);
        inner.entries.insert(
            request_id,
            Entry {
                serial,
                since: now,
                params,
                state: State::InFlight(receiver),
            },
        );
        inner.order.insert(serial, request_id);
        let lease = self.lease(request_id, serial, unknown, sender);
        let claim = if unknown {
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
        resolving: bool,
        sender: watch::Sender<Option<Ending>>,
    ) -> Lease {
        Lease {
            store: self.clone(),
            key,
            serial,
            resolving,
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
    /// Forgets every entry not in flight whose last call ended a window ago or more.
    fn expire(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (&serial, key) in &self.order {
            let Some(entry) = self.entries.get(key) else {
                expired.push((serial, *key));
                continue;
            };
            if matches!(entry.state, State::InFlight(_)) {
                continue;
            }
            if now.saturating_duration_since(entry.since) < self.window {
                break;
            }
            expired.push((serial, *key));
        }
        for (serial, key) in expired {
            self.order.remove(&serial);
            self.entries.remove(&key);
        }
    }

    /// Evicts the oldest answered entries, then the oldest unknown ones, never one in flight,
    /// until one more fits; returns how many of each.
    fn make_room(&mut self) -> (usize, usize) {
        let (mut answered, mut unknown) = (0, 0);
        while self.entries.len() >= self.max_entries.get() {
            let oldest = |wanted: fn(&State) -> bool| {
                self.order.iter().find_map(|(&serial, key)| {
                    let entry = self.entries.get(key)?;
                    wanted(&entry.state).then_some((serial, *key))
                })
            };
            let (serial, key) =
                if let Some(found) = oldest(|state| matches!(state, State::Answered(_))) {
                    answered += 1;
                    found
                } else if let Some(found) = oldest(|state| matches!(state, State::Unknown)) {
                    unknown += 1;
                    found
                } else {
                    break;
                };
            self.order.remove(&serial);
            self.entries.remove(&key);
        }
        (answered, unknown)
    }

    /// Records how the lease `serial` on `key` ended at `now`, unless its entry has gone.
    fn end(&mut self, key: u128, serial: u64, ending: Ending, now: Instant) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if entry.serial != serial {
            return;
        }
        self.order.remove(&serial);
        let state = match ending {
            Ending::Answered(answer) => State::Answered(answer),
            Ending::Unknown => State::Unknown,
            Ending::NothingSent => {
                self.entries.remove(&key);
                return;
            }
        };
        entry.state = state;
        entry.since = now;
        entry.serial = self.next_serial;
        self.order.insert(self.next_serial, key);
        self.next_serial += 1;
    }
}

// === impl Lease ===

impl Lease {
    /// Records how the call ended at `now`, as [`resent_ending`] has it when the call was sent
    /// again after an unknown outcome; returns what was recorded. Repeats waiting on it then
    /// claim again.
    pub(crate) fn end(mut self, ending: Ending, now: Instant) -> Ending {
        self.ended = true;
        let mut inner = self.store.lock();
        let ending = match inner.entries.get(&self.key) {
            Some(entry) if self.resolving => resent_ending(entry.params.method, ending),
            _ => ending,
        };
        inner.end(self.key, self.serial, ending, now);
        drop(inner);
        self.in_flight.send_replace(Some(ending));
        ending
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.ended {
            let now = Instant::now();
            self.store
                .lock()
                .end(self.key, self.serial, Ending::Unknown, now);
            self.in_flight.send_replace(Some(Ending::Unknown));
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
        Store::new(WINDOW, NonZeroUsize::new(max_entries).unwrap())
    }

    fn lease(claim: Claim) -> Lease {
        match claim {
            Claim::Call(lease) | Claim::Resolve(lease) => lease,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    #[test]
    fn a_repeat_after_an_answer_gets_it_and_nothing_is_called_twice() {
        let store = store(10);
        let now = Instant::now();
        let (claim, counts) = store.claim(1, EXTRACT, false, now);
        assert!(!counts.hit);
        lease(claim).end(Ending::Answered(Answer::Fault(1149)), now);
        let (claim, counts) = store.claim(1, EXTRACT, false, now + Duration::from_secs(1));
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
        let _first = lease(store.claim(1, EXTRACT, false, now).0);
        let other_bin = Params {
            bin_id: 7,
            ..EXTRACT
        };
        let cancel = Params {
            method: Method::CaseCancel,
            ..EXTRACT
        };
        for params in [other_bin, cancel] {
            let (claim, _) = store.claim(1, params, false, now);
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
        let first = lease(store.claim(1, EXTRACT, false, now).0);
        let Claim::Wait(mut receiver) = store.claim(1, EXTRACT, false, now).0 else {
            panic!("expected to wait");
        };
        first.end(Ending::Answered(Answer::Ok), now);
        let ending = *receiver.wait_for(Option::is_some).await.unwrap();
        assert_eq!(ending, Some(Ending::Answered(Answer::Ok)));
        assert!(matches!(
            store.claim(1, EXTRACT, false, now).0,
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
        let first = lease(store.claim(1, EXTRACT, false, now).0);
        let Claim::Wait(mut receiver) = store.claim(1, EXTRACT, false, now).0 else {
            panic!("expected to wait");
        };
        let _other = lease(store.claim(2, EXTRACT, false, now).0);
        first.end(Ending::Answered(Answer::Fault(1149)), now);
        let (claim, counts) = store.claim(3, EXTRACT, false, now);
        let _third = lease(claim);
        assert_eq!(counts.evicted, 1, "1 was evicted");
        let ending = *receiver.wait_for(Option::is_some).await.unwrap();
        assert_eq!(ending, Some(Ending::Answered(Answer::Fault(1149))));
    }

    /// A repeat that waited for a call ending with an unknown outcome reads the port first,
    /// even when the entry has gone by the time it claims again.
    #[tokio::test]
    async fn a_repeat_told_of_an_unknown_outcome_reads_the_port_though_the_entry_is_gone() {
        let store = store(2);
        let now = Instant::now();
        let first = lease(store.claim(1, EXTRACT, false, now).0);
        let Claim::Wait(mut receiver) = store.claim(1, EXTRACT, false, now).0 else {
            panic!("expected to wait");
        };
        drop(first);
        let ending = *receiver.wait_for(Option::is_some).await.unwrap();
        assert_eq!(ending, Some(Ending::Unknown));
        let _two = lease(store.claim(2, EXTRACT, false, now).0);
        let (claim, counts) = store.claim(3, EXTRACT, false, now);
        let _three = lease(claim);
        assert_eq!(counts.evicted_unknown, 1, "1 was evicted");
        let (claim, _) = store.claim(1, EXTRACT, true, now);
        assert!(matches!(claim, Claim::Resolve(_)), "{claim:?}");
    }

    /// Evicting an unknown entry makes a later repeat send without reading the port; evicting
    /// an answered one only makes it call again after a definite answer. So answered go first.
    #[test]
    fn when_full_answered_entries_are_evicted_before_unknown_ones() {
        let store = store(2);
        let now = Instant::now();
        drop(lease(store.claim(1, EXTRACT, false, now).0));
        let later = now + Duration::from_secs(1);
        lease(store.claim(2, EXTRACT, false, later).0).end(Ending::Answered(Answer::Ok), later);
        let (claim, counts) = store.claim(3, EXTRACT, false, later);
        lease(claim).end(Ending::Unknown, later);
        assert_eq!((counts.evicted, counts.evicted_unknown), (1, 0));
        let (claim, _) = store.claim(1, EXTRACT, false, later);
        assert!(matches!(claim, Claim::Resolve(_)), "1 is kept: {claim:?}");
        drop(claim);
        let (_, counts) = store.claim(4, EXTRACT, false, later);
        assert_eq!(
            (counts.evicted, counts.evicted_unknown),
            (0, 1),
            "only unknown ones left"
        );
    }

    #[test]
    fn after_an_unknown_outcome_one_repeat_resolves_and_the_next_waits() {
        let store = store(10);
        let now = Instant::now();
        drop(lease(store.claim(1, EXTRACT, false, now).0));
        let resolving = store.claim(1, EXTRACT, false, now).0;
        assert!(matches!(resolving, Claim::Resolve(_)), "{resolving:?}");
        assert!(matches!(
            store.claim(1, EXTRACT, false, now).0,
            Claim::Wait(_)
        ));
        lease(resolving).end(Ending::Unknown, now);
        assert!(matches!(
            store.claim(1, EXTRACT, false, now).0,
            Claim::Resolve(_)
        ));
    }

    /// The first call timed out at the gateway but is still on its way to the controller; a
    /// repeat read NOOP and sent it again; the controller handled the first call, so the resend
    /// got 1148 (or ended with nothing sent). The id must stay unknown: forgotten, a retry would
    /// POST again, as a new call, and extract a second time.
    #[test]
    fn a_resend_that_sent_nothing_or_met_an_earlier_call_keeps_the_outcome_unknown() {
        let cancel = Params {
            method: Method::CaseCancel,
            ..EXTRACT
        };
        let cases = [
            (EXTRACT, Ending::NothingSent),
            (EXTRACT, Ending::Answered(Answer::Fault(1148))),
            (cancel, Ending::NothingSent),
            (cancel, Ending::Answered(Answer::Fault(1149))),
        ];
        for (params, ending) in cases {
            let store = store(10);
            let now = Instant::now();
            drop(lease(store.claim(1, params, false, now).0));
            let resolving = lease(store.claim(1, params, false, now).0);
            assert_eq!(resolving.end(ending, now), Ending::Unknown, "{params:?}");
            let (claim, counts) = store.claim(1, params, false, now);
            assert!(counts.hit, "{params:?} {ending:?}: the id is kept");
            assert!(
                matches!(claim, Claim::Resolve(_)),
                "{params:?} {ending:?}: {claim:?}"
            );
        }
    }

    #[test]
    fn a_resend_answered_otherwise_is_kept_as_answered() {
        let store = store(10);
        let now = Instant::now();
        drop(lease(store.claim(1, EXTRACT, false, now).0));
        let resolving = lease(store.claim(1, EXTRACT, false, now).0);
        let answered = Ending::Answered(Answer::Fault(1149));
        assert_eq!(resolving.end(answered, now), answered);
        assert!(matches!(
            store.claim(1, EXTRACT, false, now).0,
            Claim::Replay(Answer::Fault(1149))
        ));
    }

    #[test]
    fn nothing_sent_forgets_the_id() {
        let store = store(10);
        let now = Instant::now();
        lease(store.claim(1, EXTRACT, false, now).0).end(Ending::NothingSent, now);
        assert_eq!(store.len(), 0);
        let (claim, counts) = store.claim(1, EXTRACT, false, now);
        assert!(matches!(claim, Claim::Call(_)), "{claim:?}");
        assert!(!counts.hit);
    }

    #[test]
    fn an_id_is_forgotten_once_the_window_from_its_answer_has_passed() {
        let store = store(10);
        let now = Instant::now();
        lease(store.claim(1, EXTRACT, false, now).0).end(Ending::Answered(Answer::Ok), now);
        let just_before = now + WINDOW - Duration::from_millis(1);
        assert!(matches!(
            store.claim(1, EXTRACT, false, just_before).0,
            Claim::Replay(_)
        ));
        assert!(matches!(
            store.claim(1, EXTRACT, false, now + WINDOW).0,
            Claim::Call(_)
        ));
    }

    #[test]
    fn when_full_the_oldest_settled_entry_is_evicted_never_one_in_flight() {
        let store = store(2);
        let now = Instant::now();
        let _in_flight = lease(store.claim(1, EXTRACT, false, now).0);
        lease(store.claim(2, EXTRACT, false, now).0).end(Ending::Answered(Answer::Ok), now);
        let (claim, counts) = store.claim(3, EXTRACT, false, now);
        assert_eq!(counts.evicted, 1);
        let _third = lease(claim);
        assert_eq!(store.len(), 2);
        assert!(
            matches!(store.claim(1, EXTRACT, false, now).0, Claim::Wait(_)),
            "1 is kept"
        );
        // Every entry is in flight now: the table grows past its bound rather than forget one.
        let (claim, counts) = store.claim(2, EXTRACT, false, now);
        assert!(matches!(claim, Claim::Call(_)), "2 was evicted: {claim:?}");
        assert_eq!(counts.evicted, 0);
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn a_call_in_flight_never_expires_and_the_window_counts_from_its_answer() {
        let store = store(10);
        let now = Instant::now();
        let first = lease(store.claim(1, EXTRACT, false, now).0);
        let answered = now + WINDOW * 2;
        assert!(matches!(
            store.claim(1, EXTRACT, false, answered).0,
            Claim::Wait(_)
        ));
        first.end(Ending::Answered(Answer::Ok), answered);
        let just_before = answered + WINDOW - Duration::from_millis(1);
        assert!(matches!(
            store.claim(1, EXTRACT, false, just_before).0,
            Claim::Replay(Answer::Ok)
        ));
        assert!(matches!(
            store.claim(1, EXTRACT, false, answered + WINDOW).0,
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
        for (params, bin_id, case_state, verdict) in cases {
            assert_eq!(
                judge(params, bin_id, case_state),
                verdict,
                "{params:?} {bin_id:?} {case_state:?}"
            );
        }
    }

    /// The most memory one entry takes in the store's two maps, in bytes, at worst: a hash table
    /// entry and a control byte, at a load as low as 7/16 (hashbrown fills to 7/8, then doubles),
    /// plus an order-map item in B-tree nodes at worst half full. Measured with `size_of` by a test
    /// that also pins the number the README states.
    const WORST_CASE_ENTRY_BYTES: usize = {
        let table = (size_of::<(u128, Entry)>() + 1) * 16 / 7;
        let order = size_of::<(u64, u128)>() * 2;
        table + order
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
            judge(params, bin_id, case_state)
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

    /// The README states the worst-case memory of the default `--idempotency-max-entries`.
    #[test]
    fn the_memory_of_an_entry_is_what_the_readme_states() {
        assert_eq!(WORST_CASE_ENTRY_BYTES, 249);
        let readme = include_str!("../README.md");
        assert!(readme.contains("at most 249 bytes each"), "README");
        let default = crate::config::defaults::IDEMPOTENCY_MAX_ENTRIES.get();
        let mib = (default * WORST_CASE_ENTRY_BYTES) as f64 / f64::from(1 << 20);
        assert!(
            readme.contains(&format!("{mib:.1} MiB")),
            "README: {mib:.1} MiB"
        );
    }
}
