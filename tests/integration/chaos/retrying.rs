//! Issue 21, part 4: the chaos run with a client that retries as docs/clients.md says. Each
//! logical call is a CaseExtract of its own bin with a fresh `request_id`, kept across the
//! published policy's retries (UNAVAILABLE only) and across one explicit repeat after an
//! outcome that may have been acted on (UNKNOWN, DEADLINE_EXCEEDED). The controller keeps a
//! ledger of what it accepted, answers `case_getstate` truthfully from it, and the test asserts
//! that it never acts twice for one `request_id`, that no extraction it accepted is POSTed
//! again, and that every final answer agrees with it.
//!
//! Some POSTs are delivered late: the controller reads one and holds it, acting on nothing,
//! until the gateway has given up on it and a repeat has read the port (or [`HOLD_LIMIT`] has
//! passed), and only then acts on it, as a POST delayed in the network would arrive. The port
//! read saw no operation, so the repeat sends the call again, and the resend and the late POST
//! meet at the controller, which accepts whichever comes first and refuses the other. A POST
//! arriving after the late one was accepted is that race, which the gateway cannot see, so it is
//! not counted against it; the final answer must still agree.
//!
//! The gateway does not send `request_id` to the controller; it forwards `x-request-id`, which
//! the client sets to `retry-{call}` for every attempt of a logical call, so the controller
//! attributes each POST (and each `case_getstate` of a repeat) to its logical call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tonic::Code;
use tonic_types::StatusExt as _;

use taskgate::fault::{FAULTS, grpc_code_name};
use taskgate::proto::CaseExtractRequest;

use super::Client;
use super::controller::{act, send_body};
use super::plan::{Behaviour, Body, Framing, Pacing, Reply, SplitMix64};
use crate::retry_contract::PublishedPolicy;
use crate::support::{CALL_LIMIT, within};

/// The `x-request-id` prefix of the retrying client's calls.
pub(super) const PREFIX: &str = "retry-";
/// Logical calls in flight at once.
const CONCURRENCY: usize = 32;
/// Every attempt's deadline.
const DEADLINE: Duration = Duration::from_millis(500);
/// How late a delayed reply comes: well past [`DEADLINE`], so the gateway has given up.
const LATE: Duration = Duration::from_millis(800);
/// The longest a late POST is held waiting for a repeat to read the port.
const HOLD_LIMIT: Duration = Duration::from_secs(2);
/// The published backoff (`initialBackoff` 1 s, `backoffMultiplier` 2) scaled down 50 times so
/// the run stays short: the backoff changes when a retry is sent, not whether.
const INITIAL_BACKOFF: Duration = Duration::from_millis(20);
/// The ports a logical call's port is drawn from, by its index: the documented range.
const PORTS: usize = 2000;

/// What the controller does with one `case_extract` POST of a logical call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Accepts the extraction and answers OK.
    Accept,
    /// Accepts the extraction, then drops the connection before any reply.
    AcceptThenDrop,
    /// Accepts the extraction, then answers after the gateway has given up.
    AcceptThenLate,
    /// Reads the POST and drops the connection without acting on it, as a controller that
    /// fails before it starts the extraction.
    DropIgnored,
    /// Fault 1148: the previous action is not completed.
    Busy,
    /// Another fault the table lists.
    Fault(u32),
    /// HTTP 503.
    Unavailable,
    /// Delivered late: held until a repeat has read the port, then accepted unless the
    /// controller accepted another POST of the call meanwhile.
    Late,
}

impl Fate {
    /// The fate of the `attempt`-th POST (from 0) of logical call `call`: a function of the
    /// seed, so a failure reproduces whatever the scheduling.
    fn draw(seed: u64, call: usize, attempt: usize) -> Fate {
        let mut random = SplitMix64(seed ^ ((call as u64) << 8 | attempt as u64).wrapping_mul(31));
        match random.below(11) {
            0..=2 => Fate::Accept,
            3 => Fate::AcceptThenDrop,
            4 => Fate::AcceptThenLate,
            5 => Fate::DropIgnored,
            6 | 7 => Fate::Busy,
            8 => Fate::Fault(FAULTS[random.below(FAULTS.len())].code),
            9 => Fate::Unavailable,
            _ => Fate::Late,
        }
    }

    fn accepts(self) -> bool {
        matches!(
            self,
            Fate::Accept | Fate::AcceptThenDrop | Fate::AcceptThenLate
        )
    }

    fn behaviour(self) -> Behaviour {
        let reply = |status, body, pacing| {
            Behaviour::Reply(Reply {
                status,
                body,
                framing: Framing::ContentLength,
                pacing,
            })
        };
        match self {
            Fate::Accept | Fate::Late => reply(200, Body::Success, Pacing::AtOnce),
            Fate::AcceptThenDrop | Fate::DropIgnored => Behaviour::CloseBeforeHead,
            Fate::AcceptThenLate => reply(200, Body::Success, Pacing::Delay(LATE)),
            Fate::Busy => reply(200, Body::Fault(1148), Pacing::AtOnce),
            Fate::Fault(code) => reply(200, Body::Fault(code), Pacing::AtOnce),
            Fate::Unavailable => reply(503, Body::Success, Pacing::AtOnce),
        }
    }
}

/// The controller's record of what it did for the retrying client's logical calls.
#[derive(Default)]
pub(super) struct Ledger {
    seed: u64,
    inner: Mutex<Inner>,
    /// Notified on every `case_getstate`, which releases the late POSTs waiting for one.
    port_read: Notify,
}

#[derive(Default)]
struct Inner {
    /// Per logical call: the `case_extract` POSTs that arrived, and how many were accepted.
    calls: HashMap<usize, Record>,
    /// Per port: the bin of the extraction it last accepted.
    ports: HashMap<u32, u32>,
}

#[derive(Default, Clone, Copy)]
struct Record {
    posts: usize,
    accepted: usize,
    /// POSTs that arrived after one had been accepted: what must never happen, unless the
    /// accepted one was delivered late.
    after_accepted: usize,
    /// Whether the accepted POST was one delivered late.
    late_accepted: bool,
    /// POSTs delivered late after a repeat had read the port.
    late_after_read: usize,
    reads: usize,
}

fn port_of(call: usize) -> u32 {
    1 + (call % PORTS) as u32
}

fn bin_of(call: usize) -> u32 {
    1 + call as u32
}

impl Ledger {
    /// An empty ledger; each POST's fate is drawn from `seed`.
    pub(super) fn new(seed: u64) -> Ledger {
        Ledger {
            seed,
            inner: Mutex::default(),
            port_read: Notify::new(),
        }
    }

    /// Answers a request of logical call `call`, with `body` its task-interface request.
    pub(super) async fn serve(
        &self,
        stream: &mut TcpStream,
        call: usize,
        body: &[u8],
    ) -> std::io::Result<()> {
        let (port, bin) = (port_of(call), bin_of(call));
        let reads_the_port = body.windows(13).any(|window| window == b"case_getstate");
        // Decided under the lock, done after it: a behaviour for a POST, the port's state for
        // a read, or a hold for a POST delivered late.
        let next = {
            let mut inner = self.inner.lock().unwrap();
            if reads_the_port {
                inner.calls.entry(call).or_default().reads += 1;
                self.port_read.notify_waiters();
                // The port as the idempotency inference reads it (src/idempotency.rs): EREQ of
                // the bin it accepted last, NOOP without a bin if it accepted none.
                let params = match inner.ports.get(&port) {
                    Some(bin) => format!("<bin_id>{bin}</bin_id><case_state>EREQ</case_state>"),
                    None => "<case_state>NOOP</case_state>".to_owned(),
                };
                Next::State(format!(
                    "<response><params><port_id>{port}</port_id>{params}</params></response>"
                ))
            } else {
                inner.extract(self.seed, call, port, bin)
            }
        };
        match next {
            Next::Act(behaviour) => act(stream, &behaviour).await,
            Next::State(state) => send_body(stream, state.as_bytes()).await,
            Next::Late { reads } => {
                let behaviour = self.deliver_late(call, port, bin, reads).await;
                act(stream, &behaviour).await
            }
        }
    }

    /// Holds a late POST of `call`, which arrived after `reads_before` port reads, until a
    /// repeat has read the port again, or [`HOLD_LIMIT`], then acts on it.
    async fn deliver_late(
        &self,
        call: usize,
        port: u32,
        bin: u32,
        reads_before: usize,
    ) -> Behaviour {
        let released = async {
            loop {
                let read = self.port_read.notified();
                tokio::pin!(read);
                read.as_mut().enable();
                if self.record(call).reads > reads_before {
                    return;
                }
                read.await;
            }
        };
        let _ = tokio::time::timeout(HOLD_LIMIT, released).await;
        let mut inner = self.inner.lock().unwrap();
        let record = inner.calls.entry(call).or_default();
        if record.reads > reads_before {
            record.late_after_read += 1;
        }
        if record.accepted > 0 {
            return Fate::Busy.behaviour();
        }
        record.accepted += 1;
        record.late_accepted = true;
        inner.ports.insert(port, bin);
        Fate::Late.behaviour()
    }

    /// What the controller did for logical call `call`.
    fn record(&self, call: usize) -> Record {
        let inner = self.inner.lock().unwrap();
        inner.calls.get(&call).copied().unwrap_or_default()
    }
}

impl Inner {
    /// Records a `case_extract` POST of logical call `call` and decides its fate.
    fn extract(&mut self, seed: u64, call: usize, port: u32, bin: u32) -> Next {
        let record = self.calls.entry(call).or_default();
        let attempt = record.posts;
        record.posts += 1;
        if record.accepted > 0 {
            // A real controller refuses it while the extraction runs.
            record.after_accepted += 1;
            return Next::Act(Fate::Busy.behaviour());
        }
        let fate = Fate::draw(seed, call, attempt);
        if fate == Fate::Late {
            let reads = record.reads;
            return Next::Late { reads };
        }
        if fate.accepts() {
            record.accepted += 1;
            self.ports.insert(port, bin);
        }
        Next::Act(fate.behaviour())
    }
}

/// What the controller does next with a request of the retrying client.
enum Next {
    /// Acts on a POST so.
    Act(Behaviour),
    /// Answers a port read with this body.
    State(String),
    /// Holds a POST delivered late; `reads` port reads had been made when it arrived.
    Late { reads: usize },
}

/// How a logical call ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Final {
    Ok,
    /// A definite failure: the controller declined or faulted every attempt.
    Failed,
    /// The outcome is still unknown after the explicit repeat: allowed, and counted.
    Unresolved,
}

/// One logical call's end: its final answer, and whether the explicit repeat was made.
pub(super) struct Ended {
    call: usize,
    outcome: Final,
    repeated: bool,
}

/// What the retrying run saw.
#[derive(Debug, Default)]
pub(super) struct Summary {
    calls: usize,
    posts: usize,
    reads: usize,
    late: usize,
    ok: usize,
    ok_after_repeat: usize,
    failed: usize,
    unresolved: usize,
    failures: Vec<String>,
}

impl Summary {
    /// One line, printed once the run has passed; docs/robustness.md quotes it.
    pub(super) fn line(&self, took: Duration) -> String {
        format!(
            "chaos, retrying client: {} logical calls, {} case_extract POSTs ({} delivered late, \
             after a repeat read the port), {} case_getstate; OK {} ({} after the repeat), failed \
             {}, unresolved {}; no extraction acted on twice, every answer agrees with the \
             controller ({:.1} s)",
            self.calls,
            self.posts,
            self.late,
            self.reads,
            self.ok,
            self.ok_after_repeat,
            self.failed,
            self.unresolved,
            took.as_secs_f64()
        )
    }

    pub(super) fn assert_no_failures(&self, seed: u64) {
        assert!(
            self.calls < 100 || self.late > 0,
            "seed {seed}: no POST was delivered late after a repeat read the port"
        );
        let shown: Vec<&str> = self.failures.iter().take(20).map(String::as_str).collect();
        assert!(
            self.failures.is_empty(),
            "seed {seed}: {} logical calls failed; the first {}:\n{}",
            self.failures.len(),
            shown.len(),
            shown.join("\n")
        );
    }
}

/// Runs `calls` logical calls, `CONCURRENCY` at a time, over `clients`.
pub(super) async fn run(calls: usize, clients: &[Client]) -> Vec<Ended> {
    let policy = Arc::new(PublishedPolicy::read());
    let cursor = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for worker in 0..CONCURRENCY {
        let client = clients[worker % clients.len()].clone();
        let (policy, cursor, results) = (policy.clone(), cursor.clone(), results.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let call = cursor.fetch_add(1, Ordering::SeqCst);
                if call >= calls {
                    return;
                }
                let (outcome, repeated) = within(
                    CALL_LIMIT,
                    "a logical call did not end",
                    logical_call(&policy, client.clone(), call),
                )
                .await;
                results.lock().unwrap().push(Ended {
                    call,
                    outcome,
                    repeated,
                });
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
    let mut summary = Summary {
        calls: results.len(),
        ..Summary::default()
    };
    for &Ended {
        call,
        outcome,
        repeated,
    } in results
    {
        let record = ledger.record(call);
        summary.posts += record.posts;
        summary.reads += record.reads;
        summary.late += record.late_after_read;
        if record.accepted > 1 {
            summary.failures.push(format!(
                "call {call}: the controller acted {} times",
                record.accepted
            ));
        }
        if record.after_accepted > 0 && !record.late_accepted {
            summary.failures.push(format!(
                "call {call}: {} case_extract POSTs after the controller had accepted one",
                record.after_accepted
            ));
        }
        let agrees = match outcome {
            Final::Ok => record.accepted == 1,
            Final::Failed => record.accepted == 0,
            Final::Unresolved => record.accepted <= 1,
        };
        if !agrees {
            summary.failures.push(format!(
                "call {call}: answered {outcome:?} (explicit repeat: {repeated}), but the \
                 controller accepted {} of {} POSTs",
                record.accepted, record.posts
            ));
        }
        match outcome {
            Final::Ok => {
                summary.ok += 1;
                summary.ok_after_repeat += usize::from(repeated);
            }
            Final::Failed => summary.failed += 1,
            Final::Unresolved => summary.unresolved += 1,
        }
    }
    summary
}

/// One logical call: a fresh `request_id`, the published policy, and after an outcome that may
/// have been acted on, one explicit repeat with the same `request_id`. Returns the final answer
/// and whether the repeat was made.
async fn logical_call(policy: &PublishedPolicy, client: Client, call: usize) -> (Final, bool) {
    // A UUID of its own per logical call (version 4 and variant bits set, the call in the rest).
    let request_id = format!("00000000-0000-4000-8000-{call:012x}");
    let first = policy_call(policy, client.clone(), call, &request_id).await;
    if !may_have_acted(&first) {
        return (classify(&first), false);
    }
    let repeat = policy_call(policy, client, call, &request_id).await;
    (classify(&repeat), true)
}

/// The gateway's answer, as the published policy leaves it: retried while UNAVAILABLE, with
/// jittered exponential backoff, up to `maxAttempts` attempts.
async fn policy_call(
    policy: &PublishedPolicy,
    mut client: Client,
    call: usize,
    request_id: &str,
) -> Result<(), tonic::Status> {
    let mut backoff = INITIAL_BACKOFF;
    let mut jitter = SplitMix64(call as u64);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut request = tonic::Request::new(CaseExtractRequest {
            port_id: port_of(call),
            bin_id: bin_of(call),
            request_id: request_id.to_owned(),
        });
        request
            .metadata_mut()
            .insert("x-request-id", format!("{PREFIX}{call}").parse().unwrap());
        request.set_timeout(DEADLINE);
        let status = match client.case_extract(request).await {
            Ok(_) => return Ok(()),
            Err(status) => status,
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

/// The answers after which the controller may have acted (README, "Gateway errors", and
/// docs/clients.md): a repeat with the same `request_id` is how the client learns the outcome.
/// A fault the controller sent is never among them, whatever its code.
const MAY_HAVE_ACTED: [(Code, &str); 4] = [
    (Code::Unknown, "UPSTREAM_CONNECTION_LOST"),
    (Code::Unknown, "UPSTREAM_HTTP_ERROR"),
    (Code::DeadlineExceeded, "UPSTREAM_TIMEOUT"),
    (Code::DeadlineExceeded, "REQUEST_IN_PROGRESS"),
];

/// A status without the gateway's ErrorInfo was made on the way (tonic's own grpc-timeout
/// timer answers CANCELLED when a loaded machine is slower than the gateway's margin, a client
/// deadline gives DEADLINE_EXCEEDED): the POST may have gone, so it counts as acted on too.
fn may_have_acted(answer: &Result<(), tonic::Status>) -> bool {
    answer.as_ref().is_err_and(|status| {
        let Some(error_info) = status.get_details_error_info() else {
            return true;
        };
        MAY_HAVE_ACTED.contains(&(status.code(), error_info.reason.as_str()))
    })
}

fn classify(answer: &Result<(), tonic::Status>) -> Final {
    match answer {
        Ok(()) => Final::Ok,
        Err(status) => {
            let unresolved = status.code() == Code::FailedPrecondition
                && status
                    .get_details_error_info()
                    .is_some_and(|error_info| error_info.reason == "REQUEST_OUTCOME_UNKNOWN");
            if unresolved || may_have_acted(answer) {
                Final::Unresolved
            } else {
                Final::Failed
            }
        }
    }
}

/// docs/robustness.md quotes the line the run prints, in the format it prints it.
#[test]
fn the_summary_line_is_the_one_docs_robustness_md_quotes() {
    let docs = include_str!("../../../docs/robustness.md");
    let summary = Summary {
        calls: 300,
        posts: 489,
        late: 49,
        reads: 166,
        ok: 182,
        ok_after_repeat: 83,
        failed: 35,
        unresolved: 83,
        failures: Vec::new(),
    };
    let line = summary.line(Duration::from_millis(1_900));
    assert!(
        docs.contains(&format!("```text\n{line}\n```")),
        "docs/robustness.md does not quote {line:?}"
    );
}
