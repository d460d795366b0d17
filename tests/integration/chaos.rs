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
//! `cargo test` runs [`CI_CALLS`] calls of a debug build; `scripts/chaos [CALLS] [SEED]` runs a
//! release build and more calls (the long mode, 100,000 by default) through
//! `TASKGATE_CHAOS_CALLS` and `TASKGATE_CHAOS_SEED`.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Code;

use taskgate::fault::{self, FAULTS};
use taskgate::proto::CaseExtractRequest;
use taskgate::proto::task_service_client::TaskServiceClient;

use crate::cli::TaskgateProcess;
use tonic_types::StatusExt as _;

use crate::support::{CALL_LIMIT, PROMPTLY, read_request, within};

/// Calls in the run `cargo test` makes: enough to meet every behaviour many times at every
/// concurrency, in well under a minute of a debug build on two cores.
const CI_CALLS: usize = 3_000;
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
/// so the bound is 1 s, which still catches a call the gateway forgot or held too long.
const ANSWER_SLACK: Duration = if cfg!(debug_assertions) {
    Duration::from_secs(1)
} else {
    Duration::from_millis(100)
};

/// How much later than the gateway's time limit a reply may complete and still win the race
/// with the timer on a loaded machine; between the two, either outcome is correct.
const TIMER_SLACK: Duration = Duration::from_millis(200);
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
    let controller = ChaosController::start(plan.clone()).await;
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

// === the plan ===

/// Every call's deadline and what the controller does with it, drawn from one seed.
struct Plan {
    calls: Vec<Planned>,
}

#[derive(Debug)]
struct Planned {
    deadline: Option<Duration>,
    behaviour: Behaviour,
}

/// What the chaos controller does with one request.
#[derive(Debug, Clone)]
enum Behaviour {
    /// A whole reply, possibly slow or odd in its framing.
    Reply(Reply),
    /// Close the connection (FIN) once the request has arrived, before any reply.
    CloseBeforeHead,
    /// Reset the connection (RST) once the request has arrived, before any reply.
    ResetBeforeHead,
    /// A 200 head and half its body, then a reset.
    ResetAfterHead,
    /// A 200 head announcing more body than comes, then a close: the reply is cut short.
    Truncate { framing: Framing },
    /// Bytes that are not an HTTP response at all, then a close.
    NotHttp { seed: u64 },
    /// A head with two different Content-Length values.
    TwoContentLengths,
    /// Never answer; wait for the gateway to give up and close.
    Hang,
}

/// A whole reply.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    body: Body,
    framing: Framing,
    pacing: Pacing,
}

#[derive(Debug, Clone, Copy)]
enum Body {
    Success,
    Fault(u32),
    /// Bytes that are not a task-interface response, drawn from this seed.
    Garbage(u64),
    /// A success reply padded past `--max-response-bytes`.
    Oversized,
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    ContentLength,
    Chunked,
    /// Both `Transfer-Encoding: chunked` and a `Content-Length`; RFC 9112 §6.1 says to read it
    /// as chunked.
    Conflicting,
}

#[derive(Debug, Clone, Copy)]
enum Pacing {
    AtOnce,
    /// Wait, then send the reply.
    Delay(Duration),
    /// Send the head a few bytes at a time, this long apart.
    SlowHead(Duration),
    /// Send the body a few bytes at a time, this long apart.
    Drip(Duration),
    /// Send this many 1xx interim replies first.
    Informational(usize),
}

/// Bytes per piece of a slow head or a drip-fed body.
const PIECE: usize = 16;

impl Plan {
    fn draw(seed: u64, calls: usize) -> Plan {
        let mut random = SplitMix64(seed);
        let calls = (0..calls)
            .map(|_| Planned {
                deadline: DEADLINES[random.below(DEADLINES.len())],
                behaviour: Behaviour::draw(&mut random),
            })
            .collect();
        Plan { calls }
    }
}

impl Behaviour {
    fn draw(random: &mut SplitMix64) -> Behaviour {
        let framing = [Framing::ContentLength, Framing::Chunked][random.below(2)];
        let reply = |body, pacing| {
            Behaviour::Reply(Reply {
                status: 200,
                body,
                framing,
                pacing,
            })
        };
        let millis =
            |random: &mut SplitMix64, most: u64| Duration::from_millis(random.next() % (most + 1));
        match random.below(16) {
            0 | 1 => reply(Body::Success, Pacing::AtOnce),
            // Every fault the table lists, an unlisted 1xxx code and one outside the range.
            2..=4 => {
                let code = match random.below(FAULTS.len() + 2) {
                    index if index < FAULTS.len() => FAULTS[index].code,
                    index if index == FAULTS.len() => 1005,
                    _ => 2_000 + (random.next() % 100_000) as u32,
                };
                // A fault is the controller's answer whatever HTTP status carries it.
                let status = [200, 400, 500][random.below(3)];
                Behaviour::Reply(Reply {
                    status,
                    body: Body::Fault(code),
                    framing,
                    pacing: Pacing::AtOnce,
                })
            }
            5 => {
                let status = [400, 404, 429, 500, 502, 503][random.below(6)];
                let body =
                    [Body::Success, Body::Garbage(random.next()), Body::Oversized][random.below(3)];
                Behaviour::Reply(Reply {
                    status,
                    body,
                    framing,
                    pacing: Pacing::AtOnce,
                })
            }
            6 => reply(Body::Success, Pacing::Delay(millis(random, 1_500))),
            7 => reply(Body::Success, Pacing::SlowHead(millis(random, 40))),
            8 => reply(Body::Success, Pacing::Drip(millis(random, 200))),
            9 => reply(Body::Success, Pacing::Informational(1 + random.below(500))),
            10 => Behaviour::Reply(Reply {
                status: 200,
                body: Body::Success,
                framing: Framing::Conflicting,
                pacing: Pacing::AtOnce,
            }),
            11 => reply(Body::Garbage(random.next()), Pacing::AtOnce),
            12 => reply(Body::Oversized, Pacing::AtOnce),
            13 => [
                Behaviour::CloseBeforeHead,
                Behaviour::ResetBeforeHead,
                Behaviour::ResetAfterHead,
                Behaviour::Truncate { framing },
            ][random.below(4)]
            .clone(),
            14 => [
                Behaviour::NotHttp {
                    seed: random.next(),
                },
                Behaviour::TwoContentLengths,
            ][random.below(2)]
            .clone(),
            _ => Behaviour::Hang,
        }
    }

    /// A name for the outcome table: the behaviour without its parameters.
    fn name(&self) -> String {
        match self {
            Behaviour::Reply(reply) => {
                let body = match reply.body {
                    Body::Success => "success".to_owned(),
                    Body::Fault(code) => match fault::classify(code) {
                        fault::FaultClass::Known(_) => format!("fault {code}"),
                        fault::FaultClass::Unknown(_) => "fault, unlisted 1xxx".to_owned(),
                        fault::FaultClass::OutOfRange(_) => "fault, out of range".to_owned(),
                    },
                    Body::Garbage(_) => "garbage body".to_owned(),
                    Body::Oversized => "oversized body".to_owned(),
                };
                let status = match reply.status {
                    200 => String::new(),
                    status => format!(" under HTTP {status}"),
                };
                let odd = match (reply.framing, reply.pacing) {
                    (Framing::Conflicting, _) => ", conflicting framing",
                    (_, Pacing::AtOnce) => "",
                    (_, Pacing::Delay(_)) => ", delayed",
                    (_, Pacing::SlowHead(_)) => ", slow head",
                    (_, Pacing::Drip(_)) => ", drip-fed body",
                    (_, Pacing::Informational(_)) => ", after a 1xx flood",
                };
                format!("{body}{status}{odd}")
            }
            Behaviour::CloseBeforeHead => "close before the head".to_owned(),
            Behaviour::ResetBeforeHead => "reset before the head".to_owned(),
            Behaviour::ResetAfterHead => "reset after the head".to_owned(),
            Behaviour::Truncate { .. } => "truncated body".to_owned(),
            Behaviour::NotHttp { .. } => "garbage instead of HTTP".to_owned(),
            Behaviour::TwoContentLengths => "two Content-Lengths".to_owned(),
            Behaviour::Hang => "no answer".to_owned(),
        }
    }

    /// The earliest the whole reply can have arrived after the request, or `None` if it never
    /// does.
    fn ready_after(&self) -> Option<Duration> {
        match self {
            Behaviour::Hang => None,
            Behaviour::Reply(reply) => Some(match reply.pacing {
                Pacing::AtOnce | Pacing::Informational(_) => Duration::ZERO,
                Pacing::Delay(delay) => delay,
                Pacing::SlowHead(gap) => gap * pieces(&reply.head()),
                Pacing::Drip(gap) => gap * pieces(&reply.body()),
            }),
            _ => Some(Duration::ZERO),
        }
    }

    /// The documented outcome when the reply arrives in time (README, "Errors for clients").
    fn expected(&self) -> Outcome {
        let gateway = Outcome::error;
        let lost = gateway(Code::Unavailable, "UPSTREAM_CONNECTION_LOST");
        match self {
            Behaviour::Reply(reply) => {
                let fault = |code| {
                    let class = fault::classify(code);
                    Outcome::error(class.grpc_code(), class.reason())
                };
                match (reply.status, reply.body) {
                    (200, Body::Success) => Outcome::Ok,
                    (_, Body::Fault(code)) => fault(code),
                    (200, Body::Garbage(_)) => gateway(Code::Internal, "UPSTREAM_BAD_RESPONSE"),
                    (200, Body::Oversized) => {
                        gateway(Code::Internal, "UPSTREAM_RESPONSE_TOO_LARGE")
                    }
                    (429 | 500.., _) => gateway(Code::Unavailable, "UPSTREAM_HTTP_ERROR"),
                    (_, _) => gateway(Code::Internal, "UPSTREAM_HTTP_ERROR"),
                }
            }
            Behaviour::CloseBeforeHead
            | Behaviour::ResetBeforeHead
            | Behaviour::ResetAfterHead
            | Behaviour::Truncate { .. }
            | Behaviour::NotHttp { .. }
            | Behaviour::TwoContentLengths => lost,
            Behaviour::Hang => gateway(Code::DeadlineExceeded, "UPSTREAM_TIMEOUT"),
        }
    }
}

/// How many [`PIECE`]s `bytes` is sent in.
fn pieces(bytes: &[u8]) -> u32 {
    bytes.len().div_ceil(PIECE) as u32
}

impl Reply {
    fn body(&self) -> Vec<u8> {
        match self.body {
            Body::Success => SUCCESS.to_vec(),
            Body::Fault(code) => {
                format!("<response><fault><code>{code}</code></fault></response>").into_bytes()
            }
            Body::Garbage(seed) => garbage(seed),
            Body::Oversized => {
                let padding = " ".repeat(MAX_RESPONSE_BYTES);
                format!("<response><params/>{padding}</response>").into_bytes()
            }
        }
    }

    /// The framed body: as it is, or as one chunk and the last chunk.
    fn framed_body(&self) -> Vec<u8> {
        let body = self.body();
        match self.framing {
            Framing::ContentLength => body,
            Framing::Chunked | Framing::Conflicting => chunked(&body),
        }
    }

    fn head(&self) -> Vec<u8> {
        let body = self.body();
        let framing = match self.framing {
            Framing::ContentLength => format!("Content-Length: {}", body.len()),
            Framing::Chunked => "Transfer-Encoding: chunked".to_owned(),
            Framing::Conflicting => format!(
                "Transfer-Encoding: chunked\r\nContent-Length: {}",
                body.len()
            ),
        };
        format!(
            "HTTP/1.1 {} Chaos\r\nContent-Type: application/xml\r\n{framing}\r\n\r\n",
            self.status
        )
        .into_bytes()
    }
}

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut framed = format!("{:x}\r\n", body.len()).into_bytes();
    framed.extend_from_slice(body);
    framed.extend_from_slice(b"\r\n0\r\n\r\n");
    framed
}

/// Up to 512 bytes that are neither a task-interface response nor an HTTP response: the first
/// byte is not `<`, `{` or `H`, whatever follows.
fn garbage(seed: u64) -> Vec<u8> {
    let mut random = SplitMix64(seed);
    let mut bytes = vec![0x16];
    bytes.extend((0..random.below(512)).map(|_| random.next() as u8));
    bytes
}

/// Sebastiano Vigna's SplitMix64: a tiny, seedable generator, enough to draw a plan.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`.
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

// === the chaos controller ===

/// The chaos controller: a raw TCP server that does to each request what the plan says for the
/// request id it carries.
struct ChaosController {
    url: String,
    /// How many times each planned call's request arrived.
    arrivals: Arc<Vec<AtomicU8>>,
    /// Connections open now, on the controller's side.
    open: watch::Receiver<usize>,
    /// Bumped to make every connection waiting for its next request close, as a controller
    /// closes idle keep-alive connections.
    close_idle: watch::Sender<u64>,
}

impl ChaosController {
    async fn start(plan: Arc<Plan>) -> ChaosController {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let arrivals: Arc<Vec<AtomicU8>> =
            Arc::new(plan.calls.iter().map(|_| AtomicU8::new(0)).collect());
        let (open_tx, open) = watch::channel(0);
        let open_tx = Arc::new(open_tx);
        let (close_idle, close_idle_rx) = watch::channel(0);
        let (accepted_arrivals, accepted_open) = (arrivals.clone(), open_tx);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let connection = OpenConnection::new(accepted_open.clone());
                tokio::spawn(serve_connection(
                    stream,
                    plan.clone(),
                    accepted_arrivals.clone(),
                    close_idle_rx.clone(),
                    connection,
                ));
            }
        });
        ChaosController {
            url: format!("http://{address}/api/v2/task"),
            arrivals,
            open,
            close_idle,
        }
    }
}

/// Counts a connection as open while it lives.
struct OpenConnection(Arc<watch::Sender<usize>>);

impl OpenConnection {
    fn new(open: Arc<watch::Sender<usize>>) -> OpenConnection {
        open.send_modify(|open| *open += 1);
        OpenConnection(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.send_modify(|open| *open -= 1);
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    plan: Arc<Plan>,
    arrivals: Arc<Vec<AtomicU8>>,
    mut close_idle: watch::Receiver<u64>,
    _open: OpenConnection,
) {
    let _ = stream.set_nodelay(true);
    close_idle.mark_unchanged();
    let mut buffer = Vec::new();
    loop {
        let request = tokio::select! {
            request = read_request(&mut stream, &mut buffer) => request,
            _ = close_idle.changed() => return,
        };
        let Some((_, headers, _)) = request else {
            return;
        };
        let index = headers
            .get("x-request-id")
            .and_then(|id| id.strip_prefix("chaos-"))
            .and_then(|index| index.parse::<usize>().ok());
        let behaviour = match index {
            Some(index) => {
                arrivals[index].fetch_add(1, Ordering::SeqCst);
                plan.calls[index].behaviour.clone()
            }
            // The test's own calls between the runs.
            None => Behaviour::Reply(Reply {
                status: 200,
                body: Body::Success,
                framing: Framing::ContentLength,
                pacing: Pacing::AtOnce,
            }),
        };
        if act(&mut stream, &behaviour).await.is_err() {
            return;
        }
    }
}

/// Does `behaviour` to the request that just arrived; an error means the connection is done.
async fn act(stream: &mut TcpStream, behaviour: &Behaviour) -> std::io::Result<()> {
    let done = Err(std::io::ErrorKind::ConnectionAborted.into());
    match behaviour {
        Behaviour::Reply(reply) => send_reply(stream, reply).await,
        Behaviour::CloseBeforeHead => done,
        Behaviour::ResetBeforeHead => {
            reset(stream);
            done
        }
        Behaviour::ResetAfterHead => {
            let reply = b"HTTP/1.1 200 Chaos\r\nContent-Length: 30\r\n\r\n<response><par";
            stream.write_all(reply).await?;
            stream.flush().await?;
            reset(stream);
            done
        }
        Behaviour::Truncate { framing } => {
            let whole = Reply {
                status: 200,
                body: Body::Success,
                framing: *framing,
                pacing: Pacing::AtOnce,
            };
            let mut bytes = whole.head();
            let body = whole.framed_body();
            bytes.extend_from_slice(&body[..body.len() / 2]);
            stream.write_all(&bytes).await?;
            done
        }
        Behaviour::NotHttp { seed } => {
            stream.write_all(&garbage(*seed)).await?;
            done
        }
        Behaviour::TwoContentLengths => {
            let head = format!(
                "HTTP/1.1 200 Chaos\r\nContent-Length: {}\r\nContent-Length: 5\r\n\r\n",
                SUCCESS.len()
            );
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(SUCCESS).await?;
            done
        }
        Behaviour::Hang => {
            // Returns once the gateway gives up and closes the connection.
            let _ = read_request(stream, &mut Vec::new()).await;
            done
        }
    }
}

async fn send_reply(stream: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    let (head, body) = (reply.head(), reply.framed_body());
    match reply.pacing {
        Pacing::AtOnce => {}
        Pacing::Delay(delay) => tokio::time::sleep(delay).await,
        Pacing::Informational(count) => {
            let interim = ["100 Continue", "102 Processing", "103 Early Hints"];
            let mut flood = String::new();
            for index in 0..count {
                let _ = write!(flood, "HTTP/1.1 {}\r\n\r\n", interim[index % interim.len()]);
            }
            stream.write_all(flood.as_bytes()).await?;
        }
        Pacing::SlowHead(gap) => {
            for piece in head.chunks(PIECE) {
                stream.write_all(piece).await?;
                tokio::time::sleep(gap).await;
            }
            return stream.write_all(&body).await;
        }
        Pacing::Drip(gap) => {
            stream.write_all(&head).await?;
            for piece in body.chunks(PIECE) {
                tokio::time::sleep(gap).await;
                stream.write_all(piece).await?;
            }
            return Ok(());
        }
    }
    stream.write_all(&head).await?;
    stream.write_all(&body).await
}

/// Makes the connection's close a reset (RST) rather than a FIN.
fn reset(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
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
    };
    client.case_extract(request).await.unwrap();
    Sample {
        rss_kib: rss_kib(pid),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
    }
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
