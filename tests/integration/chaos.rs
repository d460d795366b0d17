//! Issue 11, item 3: a chaos controller. The real `taskgate serve` binary calls a controller that,
//! per request, does one of many things a broken or hostile controller does: succeed, answer
//! every fault code (from the fault table itself), delay, reset the connection before or after
//! the reply head, cut the reply short, send garbage, an oversized or drip-fed body, conflicting
//! framing headers, a slow head or a flood of 1xx replies, or never answer. Calls come with mixed
//! deadlines, in rounds of 1 to 256 in flight.
//!
//! The plan is drawn up front from one seed, so a failure reproduces with the same seed; every
//! call carries its index in `x-request-id`, which the gateway forwards, so the controller knows
//! which planned behaviour a request gets and the test knows what the controller did. The test
//! asserts: every call is answered no later than its deadline + 100 ms, with the documented status
//! for what the controller did (README, "Errors for clients"); every request reached the
//! controller once, unless the gateway's time ran out before it was sent; the gateway's RSS and open file descriptors return to where they were
//! after the warm-up; no panic is logged; SIGTERM then exits 0.
//!
//! Between the run and SIGTERM, a client that retries as docs/clients.md says makes one logical
//! call per [`RETRYING_SHARE`] calls ([`retrying`]) against ports that run on a clock: the
//! controller never acts twice for one `request_id`, and every final answer agrees with what it
//! did.
//!
//! `cargo test` runs [`CI_CALLS`] calls of a debug build (`scripts/test` runs this test on its
//! own, after the rest: see [`ANSWER_SLACK`]); `scripts/chaos [CALLS] [SEED]` runs a release
//! build and more calls (the long mode, 100,000 by default) through `TASKGATE_CHAOS_CALLS` and
//! `TASKGATE_CHAOS_SEED`.

mod controller;
mod plan;
mod retrying;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tonic::Code;
use tonic_types::StatusExt as _;

use taskgate::fault;
use taskgate::proto::CaseExtractRequest;
use taskgate::proto::task_service_client::TaskServiceClient;

use crate::cli::TaskgateProcess;
use crate::support::{CALL_LIMIT, PROMPTLY, within};
use controller::ChaosController;
use plan::{Plan, Planned, SplitMix64};

/// Calls in the run `cargo test` makes: enough to meet every behaviour many times at every
/// concurrency, in well under a minute of a debug build on two cores.
const CI_CALLS: usize = 3_000;
/// The retrying client's run makes one logical call per this many calls of the first run.
const RETRYING_SHARE: usize = 10;
/// The seed when `TASKGATE_CHAOS_SEED` does not name one.
const DEFAULT_SEED: u64 = 11;

/// `--upstream-timeout`: the time limit of calls without a deadline.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(1);
/// `--max-response-bytes`, the smallest allowed, so an oversized reply stays small.
const MAX_RESPONSE_BYTES: usize = 1024;
/// The deadlines calls carry (`None`: no `grpc-timeout`, so the upstream timeout applies).
const DEADLINES: [Option<Duration>; 5] = [
    None,
    Some(Duration::from_millis(250)),
    Some(Duration::from_millis(500)),
    Some(Duration::from_secs(1)),
    Some(Duration::from_secs(3)),
];
/// The bound: every call is answered by its deadline (the upstream timeout when it has
/// none) plus this, measured by the caller. `scripts/chaos` runs a release build, held to the
/// issue's 100 ms. `cargo test` runs a debug build, which does several times the work per call,
/// in a test process that is itself a debug build on the same two cores, often beside other
/// builds: there a round of 128 calls has been seen answered up to 440 ms late by this measure,
/// and, at a load average of 10 on two cores, 256 calls up to 1.1 s late, so the bound is 2 s,
/// which still catches a call the gateway forgot or held too long. Other tests running beside it
/// count as such load: on an idle machine the latest of 256 calls came 0.28 s late with this
/// test alone and 0.5 s late beside the rest of the suite, so `scripts/test` runs it on its own.
const ANSWER_SLACK: Duration = if cfg!(debug_assertions) {
    Duration::from_secs(2)
} else {
    Duration::from_millis(100)
};

/// How much later than the gateway's time limit a reply may complete and still win the race
/// with the timer on a loaded machine; between the two, either outcome is correct. In the debug
/// build, with 256 calls in flight beside other builds (load average 7.5 on two cores), a reply
/// planned 201 ms past the limit has been seen to win: the timer's task waited for CPU as long
/// as the answers do, so the bound is 1 s, and the release build's run
/// (`scripts/chaos`) keeps 200 ms. A timer the gateway forgot still fails the test: calls never
/// answered, and replies planned 1 s or more past the limit (delays go up to 1.5 s), must end
/// `UPSTREAM_TIMEOUT`.
const TIMER_SLACK: Duration = if cfg!(debug_assertions) {
    Duration::from_secs(1)
} else {
    Duration::from_millis(200)
};
/// How many calls are in flight in a round, drawn for each round.
const CONCURRENCY: [usize; 6] = [1, 4, 16, 64, 128, 256];
/// Calls each worker makes in a round: enough for the concurrency to matter.
const CALLS_PER_WORKER: usize = 6;
/// The gRPC connections the calls are spread over, so that 256 in flight stay within the
/// gateway's 256 streams per connection.
const CONNECTIONS: usize = 8;

/// A gRPC client whose calls carry their deadline to the gateway but do not enforce it.
type Client = TaskServiceClient<HttpClient>;
type HttpClient = hyper_util::client::legacy::Client<HttpConnector, tonic::body::Body>;

/// The success reply.
const SUCCESS: &[u8] = b"<response><params/></response>";

#[tokio::test(flavor = "multi_thread")]
async fn chaos_controller_every_call_is_answered_in_time_with_its_documented_status() {
    let calls = std::env::var("TASKGATE_CHAOS_CALLS")
        .map(|calls| {
            calls
                .parse()
                .expect("TASKGATE_CHAOS_CALLS is a number of calls")
        })
        .unwrap_or(CI_CALLS);
    let seed = std::env::var("TASKGATE_CHAOS_SEED")
        .map(|seed| seed.parse().expect("TASKGATE_CHAOS_SEED is a number"))
        .unwrap_or(DEFAULT_SEED);
    // Printed first, so a failure anywhere below names the seed that reproduces it.
    println!("chaos: {calls} calls, seed {seed} (TASKGATE_CHAOS_CALLS, TASKGATE_CHAOS_SEED)");
    // One round at each concurrency, the highest included.
    let warmup: usize = CONCURRENCY
        .iter()
        .map(|level| level * CALLS_PER_WORKER)
        .sum();
    let plan = Arc::new(Plan::draw(seed, warmup + calls));
    let controller = ChaosController::start(plan.clone(), retrying::Ledger::new(seed)).await;
    let serve = TaskgateProcess::start_serving(TaskgateProcess::spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &controller.url,
        "--upstream-timeout",
        &humantime::format_duration(UPSTREAM_TIMEOUT).to_string(),
        "--max-response-bytes",
        &MAX_RESPONSE_BYTES.to_string(),
        // No probe connections come and go while descriptors are counted.
        "--health-interval",
        "1h",
        // 100,000 access lines would only fill the pipe this test reads at the end.
        "--access-log",
        "off",
    ]))
    .await;
    let clients: Vec<Client> = (0..CONNECTIONS)
        .map(|_| deadline_blind_client(&serve.gateway))
        .collect();
    let pid = serve.pid();

    // The warm-up is the same mix at every concurrency: the allocator's arenas and the pools
    // reach the size the run needs at its peak, so the run that follows shows growth, not first
    // use.
    let mut tally = Tally::default();
    let mut levels = CONCURRENCY.iter().copied();
    let each_level = || levels.next().unwrap();
    run_calls(&plan, 0..warmup, &clients, each_level, &mut tally).await;
    tally.assert_no_failures(seed);
    let before = settle(&controller, &clients[0], pid).await;
    tally.assert_each_reached_once(&controller, 0..warmup, seed);
    tally = Tally::default();
    let started = Instant::now();
    let mut random = SplitMix64(seed);
    let drawn = || CONCURRENCY[random.below(CONCURRENCY.len())];
    run_calls(&plan, warmup..warmup + calls, &clients, drawn, &mut tally).await;
    let took = started.elapsed();
    let after = settle(&controller, &clients[0], pid).await;
    tally.assert_no_failures(seed);
    let unsent = tally.assert_each_reached_once(&controller, warmup..warmup + calls, seed);

    println!("{}", tally.table(calls, took));
    println!("calls the gateway gave up on before their request was sent: {unsent}");
    println!(
        "gateway after warm-up: {} KiB RSS, {} fds; after the run: {} KiB RSS, {} fds",
        before.rss_kib, before.fds, after.rss_kib, after.fds
    );
    assert_eq!(
        after.fds, before.fds,
        "seed {seed}: the gateway's open file descriptors did not return to their level"
    );
    // glibc's malloc keeps freed memory in its arenas and trims it only now and then, so RSS
    // after the same mix wanders by a few percent either way; a leak of one allocation per call
    // (100,000 calls in the long mode) would show as megabytes.
    let rss_limit = before.rss_kib + before.rss_kib / 10 + 2048;
    assert!(
        after.rss_kib <= rss_limit,
        "seed {seed}: RSS grew from {} KiB to {} KiB (limit {rss_limit} KiB)",
        before.rss_kib,
        after.rss_kib
    );

    // Then the same controller and gateway, with a client that retries as published.
    let logical_calls = calls / RETRYING_SHARE;
    let started = Instant::now();
    let results = retrying::run(seed, logical_calls, &clients).await;
    let took = started.elapsed();
    settle(&controller, &clients[0], pid).await;
    let summary = retrying::judge(&controller.ledger, &results);
    summary.assert_no_failures(seed);
    println!("{}", summary.line(took));

    serve.signal("TERM").await;
    let (code, log) = serve.finish().await;
    assert!(!log.contains("panicked"), "seed {seed}: a panic:\n{log}");
    assert_eq!(
        code,
        Some(0),
        "seed {seed}: exit code after SIGTERM:\n{log}"
    );
}

/// Runs the planned calls `range` in rounds, each with as many in flight as `concurrency` says,
/// and checks each answer.
async fn run_calls(
    plan: &Arc<Plan>,
    range: std::ops::Range<usize>,
    clients: &[Client],
    mut concurrency: impl FnMut() -> usize,
    tally: &mut Tally,
) {
    // Every call runs and is judged, so that a failure report shows how many calls failed and
    // how, not only the first.
    let mut next = range.start;
    while next < range.end {
        let concurrency = concurrency();
        let end = (next + concurrency * CALLS_PER_WORKER).min(range.end);
        let cursor = Arc::new(AtomicUsize::new(next));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let mut workers = Vec::new();
        for worker in 0..concurrency {
            let client = clients[worker % clients.len()].clone();
            let (plan, cursor, answers) = (plan.clone(), cursor.clone(), answers.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let index = cursor.fetch_add(1, Ordering::SeqCst);
                    if index >= end {
                        return;
                    }
                    let answer = call(client.clone(), index, plan.calls[index].deadline).await;
                    answers.lock().unwrap().push((index, answer));
                }
            }));
        }
        for worker in workers {
            worker.await.unwrap();
        }
        let answers = std::mem::take(&mut *answers.lock().unwrap());
        for (index, answer) in answers {
            let planned = &plan.calls[index];
            if let Err(failure) = check(planned, &answer) {
                tally.failures.push(format!(
                    "call {index} ({:?}, deadline {:?}, {concurrency} in flight): {failure}; got \
                     {:?} after {:?}",
                    planned.behaviour, planned.deadline, answer.outcome, answer.elapsed
                ));
            }
            tally.add(index, planned.behaviour.name(), &answer.outcome);
        }
        next = end;
    }
}

/// One call's answer, as the test saw it.
#[derive(Debug)]
struct Answer {
    outcome: Outcome,
    elapsed: Duration,
}

/// A call's outcome: OK, or the gRPC code (its canonical name, so outcomes sort) and ErrorInfo
/// reason.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    Error(&'static str, String),
}

impl Outcome {
    fn error(code: Code, reason: &str) -> Outcome {
        Outcome::Error(fault::grpc_code_name(code), reason.to_owned())
    }
}

/// A client of the gateway at `url`, on one HTTP/2 connection of its own, that sends each call's
/// deadline as `grpc-timeout` but never gives up itself. tonic's `Channel` ends a call at its
/// deadline on the client's side, so through it a late gateway would look like a punctual one.
fn deadline_blind_client(url: &str) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    TaskServiceClient::with_origin(http, url.parse().unwrap())
}

/// Calls CaseExtract with the call's index as its request id.
async fn call(mut client: Client, index: usize, deadline: Option<Duration>) -> Answer {
    let mut request = tonic::Request::new(CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", request_id(index).parse().unwrap());
    if let Some(deadline) = deadline {
        request.set_timeout(deadline);
    }
    let started = Instant::now();
    // Not the deadline: a bound far beyond it, so that a call never answered fails the test.
    let answer = within(
        CALL_LIMIT,
        "a call was not answered",
        client.case_extract(request),
    );
    let outcome = match answer.await {
        Ok(_) => Outcome::Ok,
        // Judged by `check`, with the call's plan at hand; a status without details (tonic's own
        // deadline) shows its message instead of a reason.
        Err(status) => match status.get_details_error_info() {
            Some(error_info) => Outcome::error(status.code(), &error_info.reason),
            None => Outcome::error(
                status.code(),
                &format!("no ErrorInfo: {}", status.message()),
            ),
        },
    };
    Answer {
        outcome,
        elapsed: started.elapsed(),
    }
}

fn request_id(index: usize) -> String {
    format!("chaos-{index}")
}

/// Checks an answer against what the controller was planned to do.
fn check(planned: &Planned, answer: &Answer) -> Result<(), String> {
    let deadline = planned.deadline.unwrap_or(UPSTREAM_TIMEOUT);
    if answer.elapsed > deadline + ANSWER_SLACK {
        return Err(format!("answered later than {:?}", deadline + ANSWER_SLACK));
    }
    let limit = time_limit(planned.deadline);
    let timeout = Outcome::error(Code::DeadlineExceeded, "UPSTREAM_TIMEOUT");
    let expected = match planned.behaviour.ready_after() {
        // The reply cannot be complete before the gateway gives up on it.
        None => timeout.clone(),
        Some(ready) if ready >= limit + TIMER_SLACK => timeout.clone(),
        Some(_) => planned.behaviour.expected(),
    };
    // A reply planned in time may still lose the race with the timer on a loaded machine; the
    // gateway can only have given up once its time limit had passed.
    let timed_out_fairly = answer.outcome == timeout && answer.elapsed >= limit;
    if answer.outcome == expected || timed_out_fairly {
        Ok(())
    } else {
        Err(format!("expected {expected:?}"))
    }
}

/// The gateway's time limit for the controller, as the README documents it (`UPSTREAM_TIMEOUT`):
/// the caller's deadline less a margin of 10 %, at most 100 ms, and at most the upstream timeout.
fn time_limit(deadline: Option<Duration>) -> Duration {
    match deadline {
        None => UPSTREAM_TIMEOUT,
        Some(deadline) => {
            let margin = (deadline / 10).min(Duration::from_millis(100));
            (deadline - margin).min(UPSTREAM_TIMEOUT)
        }
    }
}

// === settling and sampling ===

/// The gateway's memory and descriptors.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    fds: usize,
}

/// Brings the gateway to the same state after any run: the controller closes every idle
/// keep-alive connection (as controllers do), one call then finds the gateway's pooled
/// connections closed, drops them all and leaves exactly one in the pool; then samples.
async fn settle(controller: &ChaosController, client: &Client, pid: u32) -> Sample {
    controller.close_idle.send_modify(|round| *round += 1);
    let mut open = controller.open.clone();
    within(
        PROMPTLY,
        "the controller's connections did not close",
        open.wait_for(|open| *open == 0),
    )
    .await
    .unwrap();
    let mut client = client.clone();
    let request = CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    };
    client.case_extract(request).await.unwrap();
    Sample {
        rss_kib: rss_kib(pid),
        fds: open_fds(pid),
    }
}

/// The gateway's open descriptors, less sockets the controller has already closed (TCP
/// CLOSE_WAIT). The call above drops every pooled connection it finds closed, but one whose close
/// the runtime has not yet seen passes for open and ends the search, leaving the older ones in
/// the pool until they are next looked at (at the latest after the pool's 4 s idle limit): on
/// their way out, not leaked. A leaked descriptor of any other kind still counts.
fn open_fds(pid: u32) -> usize {
    const CLOSE_WAIT: &str = "08";
    let closing: std::collections::HashSet<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields.get(3) == Some(&CLOSE_WAIT))
                        .then(|| fields.get(9).map(|inode| (*inode).to_owned()))?
                })
                .collect::<Vec<_>>()
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter(|entry| {
            let target = entry
                .as_ref()
                .ok()
                .and_then(|entry| std::fs::read_link(entry.path()).ok());
            let inode = target.as_ref().and_then(|target| {
                target
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')
                    .map(str::to_owned)
            });
            inode.is_none_or(|inode| !closing.contains(&inode))
        })
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap()
}

// === the outcome table ===

/// Outcomes per behaviour, and the calls whose answer was wrong or late.
#[derive(Default)]
struct Tally {
    counts: BTreeMap<String, BTreeMap<Outcome, usize>>,
    failures: Vec<String>,
    /// The calls answered UPSTREAM_TIMEOUT, which may never have reached the controller.
    timed_out: HashSet<usize>,
}

impl Tally {
    /// Asserts that each call in `range` reached the controller at most once (the gateway never
    /// sends a request twice) and that one that never did was answered UPSTREAM_TIMEOUT: its
    /// time ran out while the gateway was still connecting, as happens in a burst of 256 new
    /// connections. Returns how many never did. Only final once the controller has closed every
    /// connection ([`settle`]), since a request may be read after its call has been answered.
    fn assert_each_reached_once(
        &self,
        controller: &ChaosController,
        range: std::ops::Range<usize>,
        seed: u64,
    ) -> usize {
        let mut unsent = 0;
        for index in range {
            match controller.arrivals[index].load(Ordering::SeqCst) {
                1 => {}
                0 if self.timed_out.contains(&index) => unsent += 1,
                arrivals => panic!(
                    "seed {seed}: call {index} reached the controller {arrivals} times; \
                     answered UPSTREAM_TIMEOUT: {}",
                    self.timed_out.contains(&index)
                ),
            }
        }
        unsent
    }

    fn assert_no_failures(&self, seed: u64) {
        let shown: Vec<&str> = self.failures.iter().take(20).map(String::as_str).collect();
        assert!(
            self.failures.is_empty(),
            "seed {seed}: {} calls failed; the first {}:\n{}",
            self.failures.len(),
            shown.len(),
            shown.join("\n")
        );
    }

    fn add(&mut self, index: usize, behaviour: String, outcome: &Outcome) {
        if *outcome == Outcome::error(Code::DeadlineExceeded, "UPSTREAM_TIMEOUT") {
            self.timed_out.insert(index);
        }
        *self
            .counts
            .entry(behaviour)
            .or_default()
            .entry(outcome.clone())
            .or_default() += 1;
    }

    fn table(&self, calls: usize, took: Duration) -> String {
        let mut table = format!(
            "chaos: {calls} calls in {:.1} s, every one answered in time with its documented \
             status\n| controller did | calls | outcomes |\n|---|---:|---|\n",
            took.as_secs_f64()
        );
        for (behaviour, outcomes) in &self.counts {
            let total: usize = outcomes.values().sum();
            let outcomes: Vec<String> = outcomes
                .iter()
                .map(|(outcome, count)| match outcome {
                    Outcome::Ok => format!("OK {count}"),
                    Outcome::Error(code, reason) => format!("{code} {reason} {count}"),
                })
                .collect();
            let _ = writeln!(table, "| {behaviour} | {total} | {} |", outcomes.join(", "));
        }
        table
    }
}
