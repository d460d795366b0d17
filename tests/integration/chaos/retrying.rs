//! Issue 21, part 4: the chaos run with a client that retries as docs/clients.md says. Each
//! logical call is a CaseExtract of its own bin with a fresh `request_id`, and for half of them
//! a CaseCancel of that bin afterwards with a `request_id` of its own. Each is kept across the
//! published policy's retries (UNAVAILABLE only) and across up to [`MAX_REPEATS`] explicit
//! repeats while the outcome is unknown.
//!
//! The controller keeps a ledger and runs each port on a clock, as a controller does: an
//! extraction it starts shows EREQ, then ERSO, one step each (a step drawn per logical call from
//! [`STEPS`]), then ECMP, and the port accepts a new extraction once it is in ECMP, so a resend
//! that lands after ECMP would start a second one. A cancel of a running extraction puts the port
//! in NOOP keeping the bin; a cancel that finds no running extraction of its bin gets fault 1149,
//! as the simulator answers (src/simulator/port.rs). [`MOVES_ON_AFTER`] an extraction started,
//! the port moves on (the bin is closed): NOOP with no bin. `case_getstate` answers truthfully
//! from that clock. Each POST, by its attempt number and the seed, is acted on (answered at once,
//! too late for its deadline, or not at all: the connection dropped once it is read), or refused
//! without acting (dropped once read, 1148, another fault of the table, 503), or delivered late;
//! each port read likewise (answered at once or too late, 1148, dropped once read, 503).
//!
//! Some first POSTs are delivered late: the controller reads one and holds it, acting on
//! nothing, until a repeat has read the port and sent the call again (or [`HOLD_LIMIT`] has
//! passed), and acts on it just before the resend, as a POST delayed in the network would
//! arrive. The read saw no operation, so the repeat rightly sent the call again, and the resend
//! finds the late POST's extraction running.
//!
//! The property: the controller never receives a POST for a `request_id` it has already
//! accepted (acted on), but in the one race no gateway can see: a resend meeting a first POST
//! delivered late, acted on after the port read that caused the resend. So it never acts twice
//! (an extraction started twice, or a cancel applied twice). And every final answer agrees with
//! what it did: OK only if it acted; an answer that says it did not (a fault it sent, or
//! UNAVAILABLE once the policy gave up) only if it did not; an unknown outcome
//! (REQUEST_OUTCOME_UNKNOWN, UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, or a status marked
//! `requestOutcome: unknown`) either way, except after a truthful port read showed the call
//! accepted: the gateway must resolve what it can.
//!
//! Two limits keep the run to what a gateway can see. Only first POSTs are delivered late: a
//! resend held past a further read would arrive after the extraction the late first POST
//! started had completed, and start another (README, "request_id", the caveat of a first POST
//! that arrives late). And one caller drives a port at a time: another caller's extraction and
//! cancel on the same port within the belief window could make it show "not acted on".
//!
//! The gateway trusts a port showing "not acted on" only within `NOT_ACTED_BELIEVED_FOR` (10 s,
//! src/idempotency.rs) of the first call being sent; the port moves on just later than that, so
//! a read in time never sees a port that moved on. The first [`TOO_LATE_CALLS`] logical calls
//! make their first repeat after [`TOO_LATE_PAUSE`], when the port has moved on and shows what
//! it shows when nothing was done: a gateway that believed it would extract a second time. The
//! next [`SLOW_CALLS`] make a first attempt the controller acts on and answers only after the
//! gateway gave up, a second after it was sent, and read the port [`SLOW_READ_AFTER`] its send:
//! after the port moved on, but within the window counted from the call's ending, so a gateway
//! timing the window from the ending would extract a second time.
//!
//! The gateway does not send `request_id` to the controller; it forwards `x-request-id`, which
//! the client sets to `retry-e{call}` (CaseExtract) or `retry-c{call}` (CaseCancel) for every
//! attempt of a logical call, so the controller attributes each request (and each
//! `case_getstate` of a repeat) to its `request_id`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Code;
use tonic_types::StatusExt as _;

use taskgate::bench_api::NOT_ACTED_BELIEVED_FOR;
use taskgate::fault::{self, FAULTS, grpc_code_name};
use taskgate::gateway_error::{OUTCOME_UNKNOWN, REQUEST_OUTCOME_KEY};
use taskgate::proto::{CaseCancelRequest, CaseExtractRequest};

use super::Client;
use super::controller::{act, send_body};
use super::plan::{Behaviour, Body, Framing, Pacing, Reply, SplitMix64};
use crate::retry_contract::PublishedPolicy;
use crate::support::{CALL_LIMIT, within};

/// The `x-request-id` prefix of the retrying client's calls.
const PREFIX: &str = "retry-";
/// Logical calls in flight at once.
const CONCURRENCY: usize = 32;
/// Every attempt's deadline.
const DEADLINE: Duration = Duration::from_millis(500);
/// How late a delayed reply comes: well past [`DEADLINE`], so the gateway has given up.
const LATE: Duration = Duration::from_millis(800);
/// The longest a late POST is held waiting for the resend a port read causes.
const HOLD_LIMIT: Duration = Duration::from_secs(2);
/// The published backoff (`initialBackoff` 1 s, `backoffMultiplier` 2) scaled down 50 times so
/// the run stays short: the backoff changes when a retry is sent, not whether.
const INITIAL_BACKOFF: Duration = Duration::from_millis(20);
/// The ports a logical call's port is drawn from, by its index: the documented range.
const PORTS: usize = 2000;
/// How long EREQ, then ERSO, last, drawn per logical call: a repeat right after a dropped
/// connection reads EREQ or ERSO, one after a deadline of [`DEADLINE`] mostly ECMP.
const STEPS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
];
/// How long after an extraction started its port moves on (the bin closed, NOOP with no bin):
/// later than [`NOT_ACTED_BELIEVED_FOR`], which is what the gateway infers a port does, and
/// earlier than [`SLOW_READ_AFTER`].
const MOVES_ON_AFTER: Duration = NOT_ACTED_BELIEVED_FOR.saturating_add(Duration::from_millis(200));
/// How long a too-late caller waits after an unknown outcome before its first repeat: the port
/// has moved on by then.
const TOO_LATE_PAUSE: Duration = MOVES_ON_AFTER.saturating_add(Duration::from_secs(1));
/// The first logical calls, which repeat after [`TOO_LATE_PAUSE`]; started first, so that their
/// wait runs beside the others.
const TOO_LATE_CALLS: usize = 24;
/// The logical calls after the too-late ones whose first attempt is answered late, with a
/// longer deadline; started early too.
const SLOW_CALLS: usize = 16;
/// The deadline of a slow call's first attempt: the gateway gives up at `--upstream-timeout`,
/// well after the send.
const SLOW_DEADLINE: Duration = Duration::from_secs(3);
/// How late the controller answers a slow call's first attempt: after [`SLOW_DEADLINE`].
const SLOW_LATE: Duration = Duration::from_millis(3500);
/// When, after its first attempt was sent, a slow call makes its first repeat: after the port
/// moved on, less than [`NOT_ACTED_BELIEVED_FOR`] after the gateway gave up.
const SLOW_READ_AFTER: Duration = NOT_ACTED_BELIEVED_FOR.saturating_add(Duration::from_millis(500));
/// The pauses other repeats make first, drawn per repeat.
const PAUSES: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(400),
];
/// The explicit repeats a client makes at most while the outcome stays unknown.
const MAX_REPEATS: usize = 3;
/// The pauses between an extraction's answer and the cancel of its bin, drawn per logical call:
/// the cancel finds the extraction running, completed, or never started.
const CANCEL_PAUSES: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_secs(1),
];

/// The two methods that take a `request_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Op {
    Extract,
    Cancel,
}

impl Op {
    /// Its letter in `x-request-id`.
    fn letter(self) -> char {
        match self {
            Op::Extract => 'e',
            Op::Cancel => 'c',
        }
    }
}

/// The logical call and method an `x-request-id` of the retrying client names.
pub(super) fn attribute(x_request_id: &str) -> Option<(usize, Op)> {
    let rest = x_request_id.strip_prefix(PREFIX)?;
    let op = [Op::Extract, Op::Cancel]
        .into_iter()
        .find(|op| rest.starts_with(op.letter()))?;
    Some((rest[1..].parse().ok()?, op))
}

/// What the controller does with one `case_extract` or `case_cancel` POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Acts on it as the port allows and answers at once.
    Act,
    /// Acts on it, then drops the connection before any reply.
    ActThenDrop,
    /// Acts on it, then answers after the gateway has given up.
    ActThenLate,
    /// Acts on it, then answers after a slow call's deadline ([`SLOW_LATE`]).
    ActThenSlow,
    /// Reads it and drops the connection without acting on it, as a controller that fails
    /// before it starts anything.
    DropIgnored,
    /// Fault 1148: the previous action is not completed.
    Busy,
    /// Another fault the table lists.
    Fault(u32),
    /// HTTP 503.
    Unavailable,
    /// Delivered late: held until the resend a port read causes, then acted on just before it.
    Held,
}

impl Fate {
    /// The fate of the `attempt`-th POST (from 0) of `op` of logical call `call`: a function of
    /// the seed, so a failure reproduces whatever the scheduling.
    fn draw(seed: u64, call: usize, op: Op, attempt: usize) -> Fate {
        let mut random = SplitMix64(mix(seed, call, op as u64, attempt));
        match random.below(11) {
            0..=3 => Fate::Act,
            4 => Fate::ActThenDrop,
            5 => Fate::ActThenLate,
            6 => Fate::DropIgnored,
            7 => Fate::Busy,
            8 => Fate::Fault(FAULTS[random.below(FAULTS.len())].code),
            9 => Fate::Unavailable,
            _ => Fate::Held,
        }
    }

    /// What the controller sends for a POST of this fate that it acted on with `result`.
    fn answer(self, result: Result<(), u32>) -> Behaviour {
        let body = match result {
            Ok(()) => Body::Success,
            Err(code) => Body::Fault(code),
        };
        match self {
            Fate::ActThenDrop => Behaviour::CloseBeforeHead,
            Fate::ActThenLate => reply(200, body, Pacing::Delay(LATE)),
            Fate::ActThenSlow => reply(200, body, Pacing::Delay(SLOW_LATE)),
            _ => reply(200, body, Pacing::AtOnce),
        }
    }

    /// What the controller sends for a POST of this fate that it does not act on.
    fn refusal(self) -> Behaviour {
        match self {
            Fate::DropIgnored => Behaviour::CloseBeforeHead,
            Fate::Fault(code) => reply(200, Body::Fault(code), Pacing::AtOnce),
            // A body that is not a success reply: with one, a 503 would say it acted.
            Fate::Unavailable => reply(503, Body::Garbage(0), Pacing::AtOnce),
            _ => reply(200, Body::Fault(BUSY), Pacing::AtOnce),
        }
    }
}

/// What the controller does with one `case_getstate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFate {
    Truthful,
    /// The true state, after the gateway has given up.
    TruthfulLate,
    Busy,
    Dropped,
    Unavailable,
}

impl ReadFate {
    fn draw(seed: u64, call: usize, op: Op, read: usize) -> ReadFate {
        let mut random = SplitMix64(mix(seed, call, 4 + op as u64, read));
        match random.below(10) {
            0..=5 => ReadFate::Truthful,
            6 => ReadFate::TruthfulLate,
            7 => ReadFate::Busy,
            8 => ReadFate::Dropped,
            _ => ReadFate::Unavailable,
        }
    }
}

const BUSY: u32 = fault::PREVIOUS_ACTION_NOT_COMPLETED.code;

fn reply(status: u16, body: Body, pacing: Pacing) -> Behaviour {
    Behaviour::Reply(Reply {
        status,
        body,
        framing: Framing::ContentLength,
        pacing,
    })
}

/// One random stream per seed, logical call, kind (POSTs: 0 extract, 1 cancel; 3 the client's
/// draws; reads: 4 extract, 5 cancel) and index.
fn mix(seed: u64, call: usize, kind: u64, index: usize) -> u64 {
    seed ^ ((call as u64) << 12 | kind << 8 | index as u64).wrapping_mul(0x9E37_79B9)
}

fn port_of(call: usize) -> u32 {
    1 + (call % PORTS) as u32
}

fn bin_of(call: usize) -> u32 {
    1 + call as u32
}

/// Whether `op` of logical call `call` is a slow one ([`SLOW_CALLS`]).
fn is_slow(call: usize, op: Op) -> bool {
    op == Op::Extract && (TOO_LATE_CALLS..TOO_LATE_CALLS + SLOW_CALLS).contains(&call)
}

fn step_of(seed: u64, call: usize) -> Duration {
    STEPS[SplitMix64(mix(seed, call, 3, 0)).below(STEPS.len())]
}

/// An extraction the controller started on a port, and where it stands.
#[derive(Debug, Clone, Copy)]
struct Extraction {
    bin: u32,
    started: Instant,
    step: Duration,
    cancelled: bool,
}

/// The case states a port read shows, in the order the summary counts them.
const SHOWN: [&str; 4] = ["EREQ", "ERSO", "ECMP", "NOOP"];

impl Extraction {
    /// The bin the port names at `now`, and its state as an index into [`SHOWN`].
    fn state(&self, now: Instant) -> (Option<u32>, usize) {
        let age = now.saturating_duration_since(self.started);
        if age >= MOVES_ON_AFTER {
            (None, 3)
        } else if self.cancelled {
            (Some(self.bin), 3)
        } else if age < self.step {
            (Some(self.bin), 0)
        } else if age < self.step * 2 {
            (Some(self.bin), 1)
        } else {
            (Some(self.bin), 2)
        }
    }

    /// Whether it is in EREQ or ERSO at `now`: a new extraction gets 1148, a cancel applies.
    fn running(&self, now: Instant) -> bool {
        matches!(self.state(now).1, 0 | 1)
    }
}

/// The controller's record of what it did for the retrying client's logical calls.
pub(super) struct Ledger {
    seed: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Per logical call and method (so per `request_id`): what arrived and what was done.
    records: HashMap<(usize, Op), Record>,
    /// Per port: the extraction it last started.
    ports: HashMap<u32, Extraction>,
    /// First POSTs delivered late, waiting for the next POST of their `request_id` after a
    /// port read.
    held: Vec<Held>,
    next_held: u64,
    /// Port reads answered truthfully, by the state shown ([`SHOWN`]).
    shown: [usize; 4],
    /// Port reads answered truthfully after the port had moved on.
    moved_on: usize,
    /// Port reads refused, dropped or answered too late.
    reads_failed: usize,
}

/// What the controller did for one `request_id`.
#[derive(Default, Clone, Copy)]
struct Record {
    posts: usize,
    /// Port reads of repeats.
    reads: usize,
    /// Extractions started, or cancels applied: more than one is the failure this test hunts.
    acted: usize,
    /// Faults the controller sent because of the port's state (1148 to an extraction while one
    /// runs, 1149 to a cancel that finds nothing running).
    refused_by_state: usize,
    /// POSTs that arrived after a port read of the logical call: the gateway's resends.
    after_read: usize,
    /// POSTs delivered late, acted on after a repeat had read the port.
    late_after_read: usize,
    /// Whether a POST delivered late was the one acted on.
    accepted_late: bool,
    /// Port reads made before it was acted on.
    reads_before_acceptance: usize,
    /// POSTs that arrived once it had been acted on: resends meeting a late first POST.
    after_acceptance: usize,
    /// POSTs that arrived once it had been acted on, and that race does not explain: the
    /// failure this test hunts.
    unexplained: usize,
    /// Whether the last truthful port read showed the call accepted (an extraction's EREQ or
    /// ERSO of its bin, a cancel's NOOP keeping its bin).
    read_accepted: bool,
}

struct Held {
    id: u64,
    call: usize,
    op: Op,
    release: oneshot::Sender<Behaviour>,
}

impl Ledger {
    /// An empty ledger; each request's fate is drawn from `seed`.
    pub(super) fn new(seed: u64) -> Ledger {
        Ledger {
            seed,
            inner: Mutex::default(),
        }
    }

    /// Answers a request of `op` of logical call `call`, with `body` its task-interface request.
    pub(super) async fn serve(
        &self,
        stream: &mut TcpStream,
        (call, op): (usize, Op),
        body: &[u8],
    ) -> std::io::Result<()> {
        let reads_the_port = body.windows(13).any(|window| window == b"case_getstate");
        // Decided under the lock, done after it.
        let next = {
            let mut inner = self.inner.lock().unwrap();
            if reads_the_port {
                inner.read(self.seed, call, op)
            } else {
                inner.post(self.seed, call, op)
            }
        };
        match next {
            Next::Act(behaviour) => act(stream, &behaviour).await,
            Next::State { body, late } => {
                if late {
                    tokio::time::sleep(LATE).await;
                }
                send_body(stream, body.as_bytes()).await
            }
            Next::Held { id, mut release } => {
                let behaviour = match tokio::time::timeout(HOLD_LIMIT, &mut release).await {
                    Ok(Ok(behaviour)) => behaviour,
                    _ => self.release_at_limit(id, &mut release),
                };
                act(stream, &behaviour).await
            }
        }
    }

    /// Acts on held POST `id` that no resend released within [`HOLD_LIMIT`]; one may have
    /// released it meanwhile.
    fn release_at_limit(&self, id: u64, release: &mut oneshot::Receiver<Behaviour>) -> Behaviour {
        let mut inner = self.inner.lock().unwrap();
        match inner.held.iter().position(|held| held.id == id) {
            Some(index) => {
                let held = inner.held.swap_remove(index);
                let result = inner.act(self.seed, held.call, held.op, true);
                Fate::Act.answer(result)
            }
            None => release.try_recv().expect("a resend released it"),
        }
    }

    /// What the controller did for `op` of logical call `call`.
    fn record(&self, call: usize, op: Op) -> Record {
        let inner = self.inner.lock().unwrap();
        inner.records.get(&(call, op)).copied().unwrap_or_default()
    }
}

impl Inner {
    /// Records a POST of `op` of logical call `call` and decides what to do with it.
    fn post(&mut self, seed: u64, call: usize, op: Op) -> Next {
        let record = self.records.entry((call, op)).or_default();
        let attempt = record.posts;
        record.posts += 1;
        if record.reads > 0 {
            record.after_read += 1;
            self.release_held(seed, call, op);
        }
        let record = self.records.entry((call, op)).or_default();
        if record.acted > 0 {
            record.after_acceptance += 1;
            // The race no gateway can see: a late first POST acted on after the port read
            // that caused this resend. Any other POST after the acceptance was sent by a
            // gateway that had been told the call was accepted, or could have been.
            let explained = record.accepted_late && record.reads == record.reads_before_acceptance;
            record.unexplained += usize::from(!explained);
        }
        let fate = match Fate::draw(seed, call, op, attempt) {
            _ if attempt == 0 && is_slow(call, op) => Fate::ActThenSlow,
            // Only a first POST is delivered late. A resend held in turn would arrive only
            // after the next port read, when the extraction the late first POST started may
            // have completed, and start another: the gateway rightly sent it (the read showed
            // nothing had arrived), and no gateway could see that coming.
            Fate::Held if attempt > 0 => Fate::Act,
            fate => fate,
        };
        match fate {
            Fate::Act | Fate::ActThenDrop | Fate::ActThenLate | Fate::ActThenSlow => {
                let result = self.act(seed, call, op, false);
                Next::Act(fate.answer(result))
            }
            Fate::Held => {
                let (release, receiver) = oneshot::channel();
                let id = self.next_held;
                self.next_held += 1;
                self.held.push(Held {
                    id,
                    call,
                    op,
                    release,
                });
                Next::Held {
                    id,
                    release: receiver,
                }
            }
            _ => Next::Act(fate.refusal()),
        }
    }

    /// Acts on the POST of `op` of logical call `call` held until now: it was delivered late,
    /// after the port read that saw no operation and just before the resend that read caused,
    /// the order that gives the gateway the most trouble.
    fn release_held(&mut self, seed: u64, call: usize, op: Op) {
        let Some(index) = self
            .held
            .iter()
            .position(|held| (held.call, held.op) == (call, op))
        else {
            return;
        };
        let held = self.held.swap_remove(index);
        let result = self.act(seed, call, op, true);
        self.records.entry((call, op)).or_default().late_after_read += 1;
        // The held POST's connection may be gone already; then only the ledger sees it.
        let _ = held.release.send(Fate::Act.answer(result));
    }

    /// Does what `op` of logical call `call` asks, if the port allows it now; else the fault
    /// the port's state causes. `late` says the POST was delivered late.
    fn act(&mut self, seed: u64, call: usize, op: Op, late: bool) -> Result<(), u32> {
        let (port, bin, now) = (port_of(call), bin_of(call), Instant::now());
        let extraction = self.ports.get_mut(&port);
        let record = self.records.entry((call, op)).or_default();
        let result = match (op, extraction) {
            (Op::Extract, Some(running)) if running.running(now) => Err(BUSY),
            (Op::Extract, _) => {
                let extraction = Extraction {
                    bin,
                    started: now,
                    step: step_of(seed, call),
                    cancelled: false,
                };
                self.ports.insert(port, extraction);
                Ok(())
            }
            (Op::Cancel, Some(running)) if running.bin == bin && running.running(now) => {
                running.cancelled = true;
                Ok(())
            }
            (Op::Cancel, _) => Err(fault::BIN_NOT_SELECTED_FOR_PORT.code),
        };
        match result {
            Ok(()) => {
                if record.acted == 0 {
                    record.accepted_late = late;
                    record.reads_before_acceptance = record.reads;
                }
                record.acted += 1;
            }
            Err(_) => record.refused_by_state += 1,
        }
        result
    }

    /// Answers a port read of a repeat of `op` of logical call `call` as its fate says.
    fn read(&mut self, seed: u64, call: usize, op: Op) -> Next {
        let record = self.records.entry((call, op)).or_default();
        let fate = ReadFate::draw(seed, call, op, record.reads);
        record.reads += 1;
        let (port, now) = (port_of(call), Instant::now());
        let (bin, shown) = match self.ports.get(&port) {
            Some(extraction) => extraction.state(now),
            None => (None, 3),
        };
        let moved_on = self.ports.get(&port).is_some_and(|extraction| {
            now.saturating_duration_since(extraction.started) >= MOVES_ON_AFTER
        });
        let accepted = match op {
            Op::Extract => matches!(shown, 0 | 1),
            Op::Cancel => shown == 3,
        } && bin == Some(bin_of(call));
        if fate == ReadFate::Truthful {
            self.records.entry((call, op)).or_default().read_accepted = accepted;
        }
        let bin = bin.map(|bin| format!("<bin_id>{bin}</bin_id>"));
        let body = format!(
            "<response><params><port_id>{port}</port_id>{}<case_state>{}</case_state></params>\
             </response>",
            bin.unwrap_or_default(),
            SHOWN[shown]
        );
        let next = match fate {
            ReadFate::Truthful => {
                self.shown[shown] += 1;
                self.moved_on += usize::from(moved_on);
                Next::State { body, late: false }
            }
            ReadFate::TruthfulLate => Next::State { body, late: true },
            ReadFate::Busy => Next::Act(Fate::Busy.refusal()),
            ReadFate::Dropped => Next::Act(Fate::DropIgnored.refusal()),
            ReadFate::Unavailable => Next::Act(Fate::Unavailable.refusal()),
        };
        if fate != ReadFate::Truthful {
            self.reads_failed += 1;
        }
        next
    }
}

/// What the controller does next with a request of the retrying client.
enum Next {
    /// Acts on a request so.
    Act(Behaviour),
    /// Answers a port read with this body, after [`LATE`] if `late`.
    State { body: String, late: bool },
    /// Holds a POST delivered late until it is released.
    Held {
        id: u64,
        release: oneshot::Receiver<Behaviour>,
    },
}

/// How a logical call ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Final {
    Ok,
    /// An answer that says the controller did not act: a fault it sent, or UNAVAILABLE once the
    /// policy gave up.
    NotActed,
    /// The outcome is still unknown after the explicit repeats: allowed, and counted.
    Unknown,
}

/// One logical call's end.
pub(super) struct Ended {
    call: usize,
    op: Op,
    outcome: Final,
    repeats: usize,
    /// Whether its first repeat came after the port moved on ([`TOO_LATE_PAUSE`], [`SLOW_READ_AFTER`]).
    too_late: bool,
}

/// What the retrying run saw.
#[derive(Debug, Default)]
pub(super) struct Summary {
    extracts: usize,
    cancels: usize,
    posts: usize,
    resends: usize,
    late: usize,
    reads: usize,
    shown: [usize; 4],
    moved_on: usize,
    reads_failed: usize,
    too_late: usize,
    started: usize,
    applied: usize,
    refused_by_state: usize,
    ok: usize,
    ok_after_repeat: usize,
    not_acted: usize,
    unknown: usize,
    /// POSTs after the controller had accepted their `request_id`: resends meeting a late first
    /// POST.
    after_acceptance: usize,
    failures: Vec<String>,
}

impl Summary {
    /// One line, printed once the run has passed; docs/robustness.md quotes it.
    pub(super) fn line(&self, took: Duration) -> String {
        format!(
            "chaos, retrying client: {} CaseExtract and {} CaseCancel logical calls, {} POSTs \
             ({} after a port read, {} delivered late, {} after their request_id was accepted, \
             each a resend meeting a late first POST), {} case_getstate (EREQ {}, ERSO {}, \
             ECMP {}, NOOP {}, {} after the port moved on; failed {}), {} repeats too late to \
             believe NOOP; {} extractions started, {} cancels applied, {} refused by the port's \
             state; OK {} ({} after a repeat), did not act {}, unknown {}; no request_id acted \
             on twice, every answer agrees with the controller ({:.1} s)",
            self.extracts,
            self.cancels,
            self.posts,
            self.resends,
            self.late,
            self.after_acceptance,
            self.reads,
            self.shown[0],
            self.shown[1],
            self.shown[2],
            self.shown[3],
            self.moved_on,
            self.reads_failed,
            self.too_late,
            self.started,
            self.applied,
            self.refused_by_state,
            self.ok,
            self.ok_after_repeat,
            self.not_acted,
            self.unknown,
            took.as_secs_f64()
        )
    }

    pub(super) fn assert_no_failures(&self, seed: u64) {
        let shown: Vec<&str> = self.failures.iter().take(20).map(String::as_str).collect();
        assert!(
            self.failures.is_empty(),
            "seed {seed}: {} logical calls failed; the first {}:\n{}",
            self.failures.len(),
            shown.len(),
            shown.join("\n")
        );
        if self.extracts < 100 {
            return;
        }
        // Each path the run is meant to exercise happened, or the run proves less than it says.
        let paths = [
            (
                "a POST delivered late after a repeat read the port",
                self.late,
            ),
            ("a resend after a port read", self.resends),
            ("a resend meeting a late first POST", self.after_acceptance),
            ("a port read showing EREQ", self.shown[0]),
            ("a port read showing ERSO", self.shown[1]),
            ("a port read showing ECMP", self.shown[2]),
            ("a port read showing NOOP", self.shown[3]),
            ("a port read after the port moved on", self.moved_on),
            ("a port read refused, dropped or late", self.reads_failed),
            ("a repeat too late to believe NOOP", self.too_late),
            ("a cancel applied", self.applied),
            ("a fault caused by the port's state", self.refused_by_state),
            ("an OK after a repeat", self.ok_after_repeat),
            ("an answer that the controller did not act", self.not_acted),
            ("an outcome left unknown", self.unknown),
        ];
        for (path, count) in paths {
            assert!(count > 0, "seed {seed}: never {path}");
        }
    }
}

/// Runs `calls` logical calls, `CONCURRENCY` at a time, over `clients`.
pub(super) async fn run(seed: u64, calls: usize, clients: &[Client]) -> Vec<Ended> {
    let policy = Arc::new(PublishedPolicy::read());
    let cursor = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    // One caller drives a port at a time, as one WMS does: in the long mode calls PORTS apart
    // share a port, and one's cancel must not move the other's port on (the gateway cannot tell
    // that from its own call's; README, "request_id").
    let ports: Arc<Vec<tokio::sync::Mutex<()>>> =
        Arc::new((0..PORTS.min(calls)).map(|_| Default::default()).collect());
    let mut workers = Vec::new();
    for worker in 0..CONCURRENCY {
        let client = clients[worker % clients.len()].clone();
        let (policy, cursor, results) = (policy.clone(), cursor.clone(), results.clone());
        let ports = ports.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let call = cursor.fetch_add(1, Ordering::SeqCst);
                if call >= calls {
                    return;
                }
                let _port = ports[call % PORTS].lock().await;
                let mut ended = vec![
                    within(
                        CALL_LIMIT,
                        "a logical CaseExtract did not end",
                        logical_call(seed, &policy, client.clone(), call, Op::Extract),
                    )
                    .await,
                ];
                let mut random = SplitMix64(mix(seed, call, 3, 1));
                if random.below(2) == 0 {
                    tokio::time::sleep(CANCEL_PAUSES[random.below(CANCEL_PAUSES.len())]).await;
                    let cancel = logical_call(seed, &policy, client.clone(), call, Op::Cancel);
                    ended
                        .push(within(CALL_LIMIT, "a logical CaseCancel did not end", cancel).await);
                }
                results.lock().unwrap().extend(ended);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    std::mem::take(&mut *results.lock().unwrap())
}

/// Checks every logical call's final answer against the ledger. Only final once the controller
/// has closed every connection, since a POST may be read after its call was answered.
pub(super) fn judge(ledger: &Ledger, results: &[Ended]) -> Summary {
    let mut summary = Summary::default();
    {
        let inner = ledger.inner.lock().unwrap();
        summary.shown = inner.shown;
        summary.moved_on = inner.moved_on;
        summary.reads_failed = inner.reads_failed;
    }
    for ended in results {
        let Ended {
            call,
            op,
            outcome,
            repeats,
            too_late,
        } = *ended;
        let record = ledger.record(call, op);
        summary.posts += record.posts;
        summary.reads += record.reads;
        summary.resends += record.after_read;
        summary.late += record.late_after_read;
        summary.refused_by_state += record.refused_by_state;
        summary.too_late += usize::from(too_late);
        let (name, acted) = match op {
            Op::Extract => {
                summary.extracts += 1;
                summary.started += record.acted;
                ("CaseExtract", "started the extraction")
            }
            Op::Cancel => {
                summary.cancels += 1;
                summary.applied += record.acted;
                ("CaseCancel", "applied the cancel")
            }
        };
        summary.after_acceptance += record.after_acceptance;
        if record.acted > 1 {
            summary.failures.push(format!(
                "call {call}: for one {name} request_id the controller {acted} {} times",
                record.acted
            ));
        }
        if record.unexplained > 0 {
            summary.failures.push(format!(
                "call {call}: the controller received {} POSTs of one {name} request_id after \
                 it had accepted it, not explained by a late first POST ({} POSTs, {} reads)",
                record.unexplained, record.posts, record.reads
            ));
        }
        let agrees = match outcome {
            Final::Ok => record.acted == 1,
            Final::NotActed => record.acted == 0,
            Final::Unknown => true,
        };
        if !agrees {
            summary.failures.push(format!(
                "call {call}: {name} answered {outcome:?} after {repeats} repeats, but the \
                 controller {acted} {} times ({} POSTs)",
                record.acted, record.posts
            ));
        }
        // The gateway answers what a truthful read told it: an unknown ending after one that
        // showed the call accepted is a gateway giving up on what it could resolve.
        if outcome == Final::Unknown && record.read_accepted {
            summary.failures.push(format!(
                "call {call}: {name} answered Unknown after {repeats} repeats, though the last \
                 truthful port read showed it accepted"
            ));
        }
        match outcome {
            Final::Ok => {
                summary.ok += 1;
                summary.ok_after_repeat += usize::from(repeats > 0);
            }
            Final::NotActed => summary.not_acted += 1,
            Final::Unknown => summary.unknown += 1,
        }
    }
    summary
}

/// One logical call: a fresh `request_id`, the published policy, and while the outcome is
/// unknown, up to [`MAX_REPEATS`] explicit repeats with the same `request_id`, each after a
/// pause.
async fn logical_call(
    seed: u64,
    policy: &PublishedPolicy,
    client: Client,
    call: usize,
    op: Op,
) -> Ended {
    // A UUID of its own per logical call and method (version 4 and variant bits set).
    let request_id = format!("00000000-0000-4000-800{}-{call:012x}", op as u8);
    let mut random = SplitMix64(mix(seed, call, 3, 2 + op as usize));
    let sent = Instant::now();
    let deadline = if is_slow(call, op) {
        SLOW_DEADLINE
    } else {
        DEADLINE
    };
    let mut answer = policy_call(policy, client.clone(), call, op, &request_id, deadline).await;
    let (mut repeats, mut too_late) = (0, false);
    while classify(&answer) == Final::Unknown && repeats < MAX_REPEATS {
        let resume = if repeats == 0 && op == Op::Extract && call < TOO_LATE_CALLS {
            too_late = true;
            Instant::now() + TOO_LATE_PAUSE
        } else if repeats == 0 && is_slow(call, op) {
            too_late = true;
            sent + SLOW_READ_AFTER
        } else {
            Instant::now() + PAUSES[random.below(PAUSES.len())]
        };
        tokio::time::sleep_until(resume).await;
        answer = policy_call(policy, client.clone(), call, op, &request_id, DEADLINE).await;
        repeats += 1;
    }
    Ended {
        call,
        op,
        outcome: classify(&answer),
        repeats,
        too_late,
    }
}

/// The gateway's answer, as the published policy leaves it: retried while UNAVAILABLE, with
/// jittered exponential backoff, up to `maxAttempts` attempts.
async fn policy_call(
    policy: &PublishedPolicy,
    mut client: Client,
    call: usize,
    op: Op,
    request_id: &str,
    deadline: Duration,
) -> Result<(), tonic::Status> {
    let mut backoff = INITIAL_BACKOFF;
    let mut jitter = SplitMix64(call as u64);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (port_id, bin_id, request_id) = (port_of(call), bin_of(call), request_id.to_owned());
        let answer = match op {
            Op::Extract => {
                let message = CaseExtractRequest {
                    port_id,
                    bin_id,
                    request_id,
                };
                client
                    .case_extract(request(call, op, message, deadline))
                    .await
                    .map(drop)
            }
            Op::Cancel => {
                let message = CaseCancelRequest {
                    port_id,
                    bin_id,
                    request_id,
                };
                client
                    .case_cancel(request(call, op, message, deadline))
                    .await
                    .map(drop)
            }
        };
        let Err(status) = answer else {
            return Ok(());
        };
        let retryable = policy
            .retryable_status_codes
            .iter()
            .any(|name| name == grpc_code_name(status.code()));
        if !retryable || attempts == policy.max_attempts {
            return Err(status);
        }
        let millis = backoff.as_millis() as usize + 1;
        tokio::time::sleep(Duration::from_millis(jitter.below(millis) as u64)).await;
        backoff *= 2;
    }
}

/// `message` with the `x-request-id` of `op` of logical call `call`, and the attempt's
/// `deadline`.
fn request<T>(call: usize, op: Op, message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "x-request-id",
        format!("{PREFIX}{}{call}", op.letter()).parse().unwrap(),
    );
    request.set_timeout(deadline);
    request
}

/// What an answer says the controller did (README, "Gateway errors"; docs/clients.md). A status
/// without the gateway's ErrorInfo was made on the way (tonic's own grpc-timeout timer answers
/// CANCELLED when a loaded machine is slower than the gateway's margin, a client deadline gives
/// DEADLINE_EXCEEDED): the POST may have gone, so its outcome is unknown too.
fn classify(answer: &Result<(), tonic::Status>) -> Final {
    let Err(status) = answer else {
        return Final::Ok;
    };
    let Some(error_info) = status.get_details_error_info() else {
        return Final::Unknown;
    };
    let marked = error_info
        .metadata
        .get(REQUEST_OUTCOME_KEY)
        .is_some_and(|value| value == OUTCOME_UNKNOWN);
    let may_have_acted = matches!(
        status.code(),
        Code::Unknown | Code::DeadlineExceeded | Code::Internal
    );
    if marked || may_have_acted || error_info.reason == "REQUEST_OUTCOME_UNKNOWN" {
        Final::Unknown
    } else {
        Final::NotActed
    }
}

/// docs/robustness.md quotes the line the run prints, in the format it prints it.
#[test]
fn the_summary_line_is_the_one_docs_robustness_md_quotes() {
    let docs = include_str!("../../../docs/robustness.md");
    let summary = Summary {
        extracts: 300,
        cancels: 146,
        posts: 601,
        resends: 63,
        late: 19,
        reads: 572,
        shown: [27, 18, 168, 144],
        moved_on: 55,
        reads_failed: 215,
        too_late: 22,
        started: 250,
        applied: 39,
        refused_by_state: 85,
        ok: 220,
        ok_after_repeat: 62,
        not_acted: 103,
        unknown: 123,
        after_acceptance: 19,
        failures: Vec::new(),
    };
    let line = summary.line(Duration::from_millis(14_800));
    assert!(
        docs.contains(&format!("```text\n{line}\n```")),
        "docs/robustness.md does not quote {line:?}"
    );
}
