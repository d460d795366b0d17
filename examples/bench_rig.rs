//! The benchmark rig behind `scripts/bench`: measures three servers side by side in one run on
//! loopback, in front of the same fast controller stand-in where they call one:
//!
//! - **the gateway** (`taskgate serve`), with its access log read by a thread as a log shipper
//!   would, metrics served and its default limits: what is deployed;
//! - **the naive card stack** (`bench_rig naive`): a tonic handler that formats the
//!   `case_extract` method call with `format!` and POSTs it with one `reqwest::Client`, and
//!   nothing else. The yardstick the gateway's bar is set against: the card's stack at its most
//!   naive;
//! - **the naive stack with the parts issue 19 requires** (`bench_rig required`): the naive
//!   stack, plus the access line through tracing-subscriber and tracing-appender and the codec
//!   (the encoder writes the call, quick-xml reads the reply). What any gateway that keeps those
//!   costs at the least, for reference: the bar is judged against the naive stack;
//! - **a bare tonic server** (`bench_rig bare`) that implements `TaskService` as a no-op: what the
//!   gRPC stack alone costs on this machine, for reference.
//!
//! `bench_rig --help` lists its command lines. Besides the measurement itself: `naive`,
//! `required` and `bare` run those servers as child processes of the rig; `stand-in [--slow]`
//! serves the stand-in alone (`--slow`: after 250 ms), for profiling by hand; `soak` is the long
//! run behind `scripts/soak`; `idle` measures the memory each idle connection holds.
//!
//! `--taskgate` is the binary whose `bench` command drives the load; `--gateway-bin` (default:
//! the same) is the binary whose `serve` is measured, so an older build can be compared with the
//! same load generator. Load comes from `taskgate bench --json`; instructions per call from
//! callgrind, when `valgrind` is on the PATH, as the difference between two runs of different
//! lengths (so start-up and warm-up cancel out), every thread counted.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark that cannot run should stop loudly.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tonic::{Status, transport::Server};

use taskgate::codec::{Call, Reply, WireFormat};
use taskgate::proto::task_service_server::{TaskService, TaskServiceServer};

// In a folder of its own, so Cargo does not take it for an example of its own.
#[path = "bench_rig/idle.rs"]
mod idle;
#[path = "bench_rig/soak.rs"]
mod soak;
use taskgate::proto::{
    CaseCancelRequest, CaseCancelResponse, CaseExtractRequest, CaseExtractResponse,
    CaseGetStateRequest, CaseGetStateResponse,
};

/// What the stand-in answers to every POST: the task interface's success reply.
const SUCCESS: &[u8] = b"<?xml version=\"1.0\"?><response><params/></response>";
/// How long the slow stand-in takes to answer, so that calls pile up in the gateway.
const SLOW_REPLY: Duration = Duration::from_millis(250);
/// The port and bin every benchmark call uses; the stand-in does not look at them.
const PORT_AND_BIN: [&str; 4] = ["--port", "4", "--bin", "101337"];
/// The gateway's bar at 128 in flight: the least calls/s, and the most p99, it may have as a
/// multiple of the naive stack's.
const MIN_CALLS_PER_S_VS_NAIVE: f64 = 0.9;
const MAX_P99_VS_NAIVE: f64 = 1.2;
/// The gateway's bar at 1,024 in flight: the most peak RSS, in MiB.
const MAX_PEAK_RSS_MIB: f64 = 64.0;

/// Fresh processes of each server whose peak RSS is taken, the median judged: glibc's arenas
/// fragment differently from one process to the next, which moves one process's peak by up to
/// 5 MiB with the same build and load.
const RSS_RUNS: usize = 3;

/// Every command line the rig takes, for `--help`.
const USAGE: &str = "\
usage: bench_rig --taskgate PATH [--gateway-bin PATH] [--duration SECS] [--smoke] [--keep-profiles DIR]
       bench_rig naive --upstream URL
       bench_rig required --upstream URL
       bench_rig bare
       bench_rig stand-in [--slow]
       bench_rig soak --taskgate PATH [--calls N] [--duration D] [--sample D] [--warmup D] [--plot PNG]
       bench_rig idle --taskgate PATH [--connections N] [--rounds N]
";

/// Ends the rig on a command line it cannot take: the fault and the usage on stderr, exit 2, as
/// a command-line tool does (a panic would add a backtrace that says nothing about the cause).
fn usage_error(message: &str) -> ! {
    eprintln!("bench_rig: {message}\n{USAGE}");
    std::process::exit(2)
}

struct Options {
    taskgate: PathBuf,
    gateway_bin: PathBuf,
    duration: Duration,
    warmup: Duration,
    smoke: bool,
    /// Where callgrind's output files are kept for `callgrind_annotate`; removed when `None`.
    keep_profiles: Option<PathBuf>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("naive") => return run_naive(&args[1..], Needs::Nothing),
        Some("required") => return run_naive(&args[1..], Needs::LogAndCodec),
        Some("bare") => return serve_until_terminated(Reference::Bare),
        Some("stand-in") => return run_stand_in(&args[1..]),
        Some("soak") => return soak::run(&args[1..]),
        Some("idle") => return idle::run(&args[1..]),
        Some("--help" | "-h") => return print!("{USAGE}"),
        _ => {}
    }
    let options = parse_options(&args);
    let fast = start_stand_in(Duration::ZERO);
    let slow = start_stand_in(SLOW_REPLY);
    let report = measure(&options, fast, slow);
    print!("{}", report.table(&options));
}
fn parse_options(args: &[String]) -> Options {
    let mut taskgate = None;
    let mut gateway_bin = None;
    let mut duration = None;
    let mut smoke = false;
    let mut keep_profiles = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage_error(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--taskgate" => taskgate = Some(PathBuf::from(value())),
            "--gateway-bin" => gateway_bin = Some(PathBuf::from(value())),
            "--duration" => {
                let text = value();
                let seconds: f64 = text.parse().unwrap_or_else(|_| {
                    usage_error(&format!("--duration '{text}' is not a number of seconds"))
                });
                duration = Some(Duration::from_secs_f64(seconds));
            }
            "--smoke" => smoke = true,
            "--keep-profiles" => keep_profiles = Some(PathBuf::from(value())),
            other => usage_error(&format!("unknown argument '{other}'")),
        }
    }
    let taskgate = taskgate.unwrap_or_else(|| usage_error("--taskgate is required"));
    let (default_duration, warmup) = if smoke {
        (Duration::from_millis(500), Duration::from_millis(200))
    } else {
        (Duration::from_secs(10), Duration::from_secs(1))
    };
    Options {
        gateway_bin: gateway_bin.unwrap_or_else(|| taskgate.clone()),
        taskgate,
        duration: duration.unwrap_or(default_duration),
        warmup,
        smoke,
        keep_profiles,
    }
}

/// One `taskgate bench --json` result, the fields this rig uses.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    calls_per_s: f64,
    mean_latency_us: f64,
    p99_us: f64,
    ok_calls: u64,
    calls: u64,
}

struct Report {
    /// 1 in flight, on one connection.
    idle: Rounds,
    /// 128 in flight, on 8 connections: where the bar is judged.
    busy: Rounds,
    /// Instructions per call of the gateway, the naive stack with the required parts and the
    /// naive stack, when valgrind is installed.
    instructions: Option<[f64; 3]>,
    /// Peak RSS at 1,024 in flight of each fresh process, gateway and naive stack, in run
    /// order: the bar is the gateway's median, the naive stack's shows what the crates alone
    /// hold at that load.
    peak_rss_kib: [Vec<u64>; 2],
    /// The runs that measured it, gateway's and naive stack's.
    rss_runs: [Vec<Run>; 2],
}

/// The servers each round runs, in the table's order.
#[derive(Clone, Copy)]
enum UnderTest {
    Gateway,
    Required,
    Naive,
    Bare,
}

impl UnderTest {
    /// Every server, in the table's order and the order of a round's turns.
    const ALL: [UnderTest; 4] = [
        UnderTest::Gateway,
        UnderTest::Required,
        UnderTest::Naive,
        UnderTest::Bare,
    ];

    /// Its name in the table's header and in warnings.
    fn name(self) -> &'static str {
        match self {
            UnderTest::Gateway => "gateway",
            UnderTest::Required => "naive+log+codec",
            UnderTest::Naive => "naive stack",
            UnderTest::Bare => "bare tonic",
        }
    }
}

/// Each server's runs at one load, one per round, in round order: a round's runs are side by
/// side in time, so their ratios are the fair comparison.
#[derive(Default)]
struct Rounds {
    /// Indexed by [`UnderTest`].
    runs: [Vec<Run>; 4],
    round_length: Duration,
}

fn measure(options: &Options, fast: SocketAddr, slow: SocketAddr) -> Report {
    let upstream = format!("http://{fast}/api/v2/task");
    let targets = UnderTest::ALL.map(|server| Target::start(server, options, &upstream, None));
    let idle = rounds(options, &targets, [1, 1]);
    let busy = rounds(options, &targets, [128, 8]);
    for target in targets {
        target.stop();
    }

    let instructions = which("valgrind").then(|| {
        [UnderTest::Gateway, UnderTest::Required, UnderTest::Naive].map(|server| {
            instructions_per_call(options, server, |out| {
                Target::start(server, options, &upstream, Some(out))
            })
        })
    });

    let slow_upstream = format!("http://{slow}/api/v2/task");
    let peak_rss = |target: Target| {
        let run = bench(options, &target, 1024, 16, Length::Duration);
        let peak = proc_status_kib(target.child.id(), "VmHWM:");
        target.stop();
        (peak, run)
    };
    let mut peak_rss_kib = [Vec::new(), Vec::new()];
    let mut rss_runs = [Vec::new(), Vec::new()];
    // In turn, as the rounds are, so that a slow spell of the machine meets both servers.
    for _ in 0..if options.smoke { 1 } else { RSS_RUNS } {
        let targets = [
            Target::gateway(&options.gateway_bin, &slow_upstream, None),
            Target::naive(&slow_upstream, None),
        ];
        for (index, target) in targets.into_iter().enumerate() {
            let (peak, run) = peak_rss(target);
            peak_rss_kib[index].push(peak);
            rss_runs[index].push(run);
        }
    }
    Report {
        idle,
        busy,
        instructions,
        peak_rss_kib,
        rss_runs,
    }
}

/// `in_flight` calls on `connections` connections, in rounds that each run every server in turn
/// (each round starting with the next), after one warm-up run of each: a machine that slows
/// down for a while (a shared VM does, by a third at times) slows every side of a round alike,
/// and the medians leave out the round it did not.
fn rounds(
    options: &Options,
    targets: &[Target; 4],
    [in_flight, connections]: [usize; 2],
) -> Rounds {
    let rounds: u32 = if options.smoke { 1 } else { 5 };
    let run = |target: &Target, length: Duration| {
        bench(
            options,
            target,
            in_flight,
            connections,
            Length::Round(length),
        )
    };
    for target in targets {
        run(target, options.warmup);
    }
    let mut result = Rounds {
        round_length: options.duration / rounds,
        ..Rounds::default()
    };
    // Each round starts with the next server, so none always runs first (on a cold stand-in
    // connection pool).
    for round in 0..rounds as usize {
        for turn in 0..targets.len() {
            let index = (round + turn) % targets.len();
            let length = result.round_length;
            result.runs[index].push(run(&targets[index], length));
        }
    }
    result
}

impl Rounds {
    /// The median of `measure` over each server's runs, in the table's order.
    fn medians(&self, measure: fn(&Run) -> f64) -> [f64; 4] {
        self.runs
            .each_ref()
            .map(|runs| median(runs.iter().map(measure).collect()))
    }

    /// `server`'s `measure` over `other`'s, round by round.
    fn ratios(&self, server: UnderTest, other: UnderTest, measure: fn(&Run) -> f64) -> Vec<f64> {
        self.runs[server as usize]
            .iter()
            .zip(&self.runs[other as usize])
            .map(|(server, other)| ratio(measure(server), measure(other)))
            .collect()
    }
}

/// The middle value (the upper middle of an even count).
/// Sizes in KiB as MiB, to one decimal, separated by spaces.
fn mib_list(sizes_kib: &[u64]) -> String {
    sizes_kib
        .iter()
        .map(|&kib| format!("{:.1}", kib as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `part / whole`, or 0 when `whole` is 0 (a run with no call measured), so the table still
/// prints.
fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

/// The instructions one CaseExtract costs the server `start` runs under callgrind, at 1 in
/// flight, every thread counted: the difference between a long and a short run, so that start-up
/// and warm-up cancel out.
fn instructions_per_call(
    options: &Options,
    server: UnderTest,
    start: impl Fn(&Path) -> Target,
) -> f64 {
    let name = server.name().replace([' ', '+'], "-");
    let (short, long) = if options.smoke { (20, 60) } else { (500, 2500) };
    let total = |calls: u64| {
        let folder = options
            .keep_profiles
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let out = folder.join(format!("callgrind.{name}.{calls}-calls.out"));
        let target = start(&out);
        bench(options, &target, 1, 1, Length::Calls(calls));
        target.stop();
        let total = callgrind_total(&out);
        if options.keep_profiles.is_none() {
            let _ = std::fs::remove_file(&out);
        }
        total
    };
    (total(long) - total(short)) as f64 / (long - short) as f64
}

/// How long one `taskgate bench` runs.
enum Length {
    /// `--duration`, after `--warmup`.
    Duration,
    /// Exactly this many calls, no warm-up (for instruction counts).
    Calls(u64),
    /// This long, no warm-up (a round).
    Round(Duration),
}

fn bench(
    options: &Options,
    target: &Target,
    in_flight: usize,
    connections: usize,
    length: Length,
) -> Run {
    let mut command = Command::new(&options.taskgate);
    command
        .args(["bench", "--json", "--gateway", &target.url])
        .args(["--concurrency", &in_flight.to_string()])
        .args(["--connections", &connections.to_string()])
        .args(PORT_AND_BIN)
        // Under valgrind a call is ~50 times slower; the default deadline would cut it short.
        .args(["--timeout", "60s"]);
    match length {
        Length::Duration => command.args([
            "--duration",
            &format!("{}ms", options.duration.as_millis()),
            "--warmup",
            &format!("{}ms", options.warmup.as_millis()),
        ]),
        Length::Calls(calls) => command.args(["--calls", &calls.to_string(), "--warmup", "0s"]),
        Length::Round(length) => command.args([
            "--duration",
            &format!("{}ms", length.as_millis()),
            "--warmup",
            "0s",
        ]),
    };
    let output = command.stderr(Stdio::inherit()).output().unwrap();
    assert!(
        output.status.success(),
        "taskgate bench against {} failed: {}",
        target.name,
        output.status
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "taskgate bench printed no JSON ({error}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    let number = |value: &serde_json::Value| value.as_f64().unwrap_or_default();
    Run {
        calls_per_s: number(&json["calls_per_s"]),
        mean_latency_us: number(&json["latency_us"]["mean"]),
        p99_us: number(&json["latency_us"]["p99"]),
        ok_calls: json["codes"]["OK"].as_u64().unwrap_or_default(),
        calls: json["calls"].as_u64().unwrap_or_default(),
    }
}

/// A server under test, in a child process.
struct Target {
    name: &'static str,
    url: String,
    child: Child,
}

impl Target {
    /// `server`, calling the controller at `upstream`, under callgrind when `callgrind_out` is
    /// given.
    fn start(
        server: UnderTest,
        options: &Options,
        upstream: &str,
        callgrind_out: Option<&Path>,
    ) -> Target {
        match server {
            UnderTest::Gateway => Target::gateway(&options.gateway_bin, upstream, callgrind_out),
            UnderTest::Required => {
                Target::rig_server(server, &["required", "--upstream", upstream], callgrind_out)
            }
            UnderTest::Naive => Target::naive(upstream, callgrind_out),
            UnderTest::Bare => Target::rig_server(server, &["bare"], callgrind_out),
        }
    }

    /// `taskgate serve` as deployed: its default access log, read by a thread as a log shipper
    /// would, metrics served, and its default limits.
    fn gateway(binary: &Path, upstream: &str, callgrind_out: Option<&Path>) -> Target {
        let mut command = under_callgrind(binary, callgrind_out);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--upstream", upstream])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("TASKGATE_LOG_FORMAT", "text");
        let (child, line) = spawn_until(command, Pipe::Stderr, "gateway listening address=");
        let address = line
            .split("gateway listening address=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .to_owned();
        Target {
            name: UnderTest::Gateway.name(),
            url: format!("http://{address}"),
            child,
        }
    }

    /// This program's `naive` command, calling `upstream`.
    fn naive(upstream: &str, callgrind_out: Option<&Path>) -> Target {
        Target::rig_server(
            UnderTest::Naive,
            &["naive", "--upstream", upstream],
            callgrind_out,
        )
    }

    /// One of this program's own servers, which prints `listening ADDRESS` once it listens.
    fn rig_server(server: UnderTest, args: &[&str], callgrind_out: Option<&Path>) -> Target {
        let name = server.name();
        let mut command = under_callgrind(&std::env::current_exe().unwrap(), callgrind_out);
        // The gateway's level, whatever the caller's: `required` logs what the gateway logs.
        command.args(args).env("RUST_LOG", "info");
        let (child, line) = spawn_until(command, Pipe::Stdout, "listening ");
        Target {
            name,
            url: format!("http://{}", line.trim_start_matches("listening ").trim()),
            child,
        }
    }

    /// SIGTERM, then wait: every server exits cleanly, which is when callgrind writes its counts.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "could not signal {}", self.name);
        self.child.wait().unwrap();
    }
}

fn under_callgrind(binary: &Path, out: Option<&Path>) -> Command {
    match out {
        None => Command::new(binary),
        Some(out) => {
            let mut command = Command::new("valgrind");
            command
                .arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(binary);
            command
        }
    }
}

/// Where a server prints the line that says it listens.
enum Pipe {
    /// The rig's own servers; their stderr (the access lines of `required`) is read too.
    Stdout,
    /// The gateway, whose log is on stderr.
    Stderr,
}

/// Starts `command` and reads `pipe` until a line containing `needle`; a thread then keeps
/// reading each pipe, as a log shipper would, so the child never blocks on one.
fn spawn_until(mut command: Command, pipe: Pipe, needle: &str) -> (Child, String) {
    let (stdout, stderr) = match pipe {
        Pipe::Stdout => (Stdio::piped(), Stdio::piped()),
        Pipe::Stderr => (Stdio::null(), Stdio::piped()),
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    let reader: Box<dyn Read + Send> = match pipe {
        Pipe::Stdout => {
            let mut log = BufReader::new(child.stderr.take().unwrap());
            std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
            Box::new(child.stdout.take().unwrap())
        }
        Pipe::Stderr => Box::new(child.stderr.take().unwrap()),
    };
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader.read_line(&mut line).unwrap();
        assert!(read > 0, "{command:?} exited before printing {needle:?}");
        if line.contains(needle) {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    (child, line)
}

/// The stand-in controller: every POST gets the success reply, after `delay`. It runs on one
/// thread of its own (a current-thread runtime), as an event-loop server like nginx would, so it
/// takes as little as it can of the CPU the servers and the load share: a real controller is on
/// another machine.
fn start_stand_in(delay: Duration) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            serve_stand_in(tokio::net::TcpListener::from_std(listener).unwrap(), delay).await;
        });
    });
    address
}

async fn serve_stand_in(listener: tokio::net::TcpListener, delay: Duration) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request: Request<_>| async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let mut response = Response::new(Full::new(Bytes::from_static(SUCCESS)));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/xml"),
                );
                Ok::<_, Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `stand-in [--slow]`: the stand-in alone, answering at once or after [`SLOW_REPLY`].
fn run_stand_in(args: &[String]) {
    let delay = match args {
        [] => Duration::ZERO,
        [slow] if slow == "--slow" => SLOW_REPLY,
        other => usage_error(&format!("stand-in takes only --slow, not {other:?}")),
    };
    let stand_in = start_stand_in(delay);
    println!("stand-in listening http://{stand_in}/api/v2/task");
    loop {
        std::thread::park();
    }
}

/// The servers that measure the gateway's stack at its least. The bench calls only
/// CaseExtract, so the other RPCs do nothing in all of them.
enum Reference {
    /// A no-op: what tonic alone costs per call.
    Bare,
    /// The card's stack at its most naive: CaseExtract formats the method call and POSTs it with
    /// one shared `reqwest::Client`, and answers OK when the reply is 2xx. No validation, no
    /// limits: what any gateway built from tonic and reqwest costs at the least. It logs nothing
    /// unless it [`Needs::LogAndCodec`], the two parts issue 19 requires of the gateway.
    Naive {
        client: reqwest::Client,
        upstream: String,
        needs: Needs,
    },
}

/// What the naive stack does beyond POSTing.
#[derive(Clone, Copy)]
enum Needs {
    /// Nothing: `format!`, POST, OK on 2xx.
    Nothing,
    /// The parts issue 19 requires of the gateway, done as the gateway does them: the method
    /// call written by the codec's encoder and the reply read by its quick-xml parser (item 4),
    /// and an access line with the gateway's fields through the gateway's own
    /// tracing-subscriber and tracing-appender set-up, to stderr (item 3). No validation,
    /// limits, metrics or request ids beyond the access line's.
    LogAndCodec,
}

#[tonic::async_trait]
impl TaskService for Reference {
    async fn case_extract(
        &self,
        request: tonic::Request<CaseExtractRequest>,
    ) -> Result<tonic::Response<CaseExtractResponse>, Status> {
        match self {
            Reference::Bare => Ok(tonic::Response::new(CaseExtractResponse {})),
            Reference::Naive {
                client,
                upstream,
                needs: Needs::Nothing,
            } => post_case_extract(client, upstream, request.into_inner()).await,
            Reference::Naive {
                client,
                upstream,
                needs: Needs::LogAndCodec,
            } => case_extract_as_required(client, upstream, request).await,
        }
    }

    async fn case_cancel(
        &self,
        _request: tonic::Request<CaseCancelRequest>,
    ) -> Result<tonic::Response<CaseCancelResponse>, Status> {
        Ok(tonic::Response::new(CaseCancelResponse {}))
    }

    async fn case_get_state(
        &self,
        _request: tonic::Request<CaseGetStateRequest>,
    ) -> Result<tonic::Response<CaseGetStateResponse>, Status> {
        Ok(tonic::Response::new(CaseGetStateResponse::default()))
    }

    type WatchCaseEventsStream = tokio_stream::Empty<Result<taskgate::proto::CaseEvent, Status>>;

    async fn watch_case_events(
        &self,
        _request: tonic::Request<taskgate::proto::WatchCaseEventsRequest>,
    ) -> Result<tonic::Response<Self::WatchCaseEventsStream>, Status> {
        Ok(tonic::Response::new(tokio_stream::empty()))
    }
}

/// The naive stack's whole CaseExtract: `format!`, POST, OK on 2xx.
async fn post_case_extract(
    client: &reqwest::Client,
    upstream: &str,
    CaseExtractRequest {
        port_id, bin_id, ..
    }: CaseExtractRequest,
) -> Result<tonic::Response<CaseExtractResponse>, Status> {
    let method_call = format!(
        "<?xml version=\"1.0\"?>\n<methodcall>\n  <name>case_extract</name>\n  <params>\n    \
         <port_id>{port_id}</port_id>\n    <bin_id>{bin_id}</bin_id>\n  </params>\n\
         </methodcall>\n"
    );
    let unavailable = |error: reqwest::Error| Status::unavailable(error.to_string());
    let reply = client
        .post(upstream)
        .header(reqwest::header::CONTENT_TYPE, "application/xml")
        .body(method_call)
        .send()
        .await
        .map_err(unavailable)?;
    let status = reply.status();
    // Read to its end, as a handler that parsed the reply would: only then can the connection
    // go back to reqwest's pool.
    reply.bytes().await.map_err(unavailable)?;
    if status.is_success() {
        Ok(tonic::Response::new(CaseExtractResponse {}))
    } else {
        Err(Status::unavailable(format!(
            "the controller answered {status}"
        )))
    }
}

/// `naive` and `required`: the naive stack, with what it `needs`.
fn run_naive(args: &[String], needs: Needs) {
    let upstream = match args {
        [flag, upstream] if flag == "--upstream" => upstream.clone(),
        _ => usage_error("naive and required take --upstream URL and nothing else"),
    };
    // Kept until the server ends, so that the last access lines are written.
    let _log = matches!(needs, Needs::LogAndCodec)
        .then(|| taskgate::log::init(taskgate::log::LogFormat::Text, "info", None));
    // reqwest's defaults but one: no proxy from the environment, so the calls stay on loopback,
    // as the gateway's do.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    serve_until_terminated(Reference::Naive {
        client,
        upstream,
        needs,
    });
}

/// The naive stack's CaseExtract with the two parts issue 19 requires ([`Needs::LogAndCodec`]):
/// the codec writes the call and reads the reply, and one access line with the gateway's fields.
async fn case_extract_as_required(
    client: &reqwest::Client,
    upstream: &str,
    request: tonic::Request<CaseExtractRequest>,
) -> Result<tonic::Response<CaseExtractResponse>, Status> {
    let started = Instant::now();
    let peer = request.remote_addr();
    let CaseExtractRequest {
        port_id, bin_id, ..
    } = request.into_inner();
    let request_id = uuid::Uuid::new_v4();
    let format = WireFormat::Xml;
    let method_call = format.encode_call(&Call {
        method: "case_extract",
        params: &[("port_id", port_id), ("bin_id", bin_id)],
    });
    let unavailable = |error: reqwest::Error| Status::unavailable(error.to_string());
    let posted = Instant::now();
    let answer = async {
        let reply = client
            .post(upstream)
            .header(reqwest::header::CONTENT_TYPE, format.content_type())
            .body(method_call)
            .send()
            .await
            .map_err(unavailable)?;
        let body = reply.bytes().await.map_err(unavailable)?;
        match format.decode_reply(&body, None) {
            Ok(Reply::Success(_)) => Ok(tonic::Response::new(CaseExtractResponse {})),
            Ok(Reply::Fault(code)) => Err(Status::failed_precondition(format!("fault {code}"))),
            Err(error) => Err(Status::unknown(error.to_string())),
        }
    }
    .await;
    let upstream_time = posted.elapsed();
    let milliseconds = |time: Duration| time.as_micros() as f64 / 1000.0;
    let code = answer
        .as_ref()
        .map_or_else(Status::code, |_| tonic::Code::Ok);
    tracing::info!(
        target: "taskgate::access",
        method = "case_extract",
        port_id,
        bin_id,
        grpc_code = taskgate::fault::grpc_code_name(code),
        fault_code = None::<u32>,
        upstream_ms = milliseconds(upstream_time),
        total_ms = milliseconds(started.elapsed()),
        request_id = %request_id,
        peer = peer.map(tracing::field::display),
        "call"
    );
    answer
}

/// Serves `service` on a free loopback port, with tokio's default multi-thread runtime and
/// tonic's default settings, until SIGTERM. Prints `listening ADDRESS` first, for the rig.
fn serve_until_terminated(service: impl TaskService) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening {}", listener.local_addr().unwrap());
        // `serve_with_incoming_shutdown` ignores the builder's TCP settings: this is the
        // `tcp_nodelay` tonic's `serve` would set by default.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        Server::builder()
            .add_service(TaskServiceServer::new(service))
            .serve_with_incoming_shutdown(incoming, async move {
                terminate.recv().await;
            })
            .await
            .unwrap();
    });
}

/// The total instruction count callgrind wrote, every thread included.
fn callgrind_total(out: &Path) -> u64 {
    let text = std::fs::read_to_string(out)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", out.display()));
    text.lines()
        .find_map(|line| {
            line.strip_prefix("summary:")
                .or_else(|| line.strip_prefix("totals:"))
        })
        .and_then(|count| count.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no instruction total in {}", out.display()))
}

/// A size in KiB from /proc/PID/status: `VmHWM:` (peak RSS) or `VmRSS:` (RSS now).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_default()
}

fn which(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

impl Report {
    fn table(&self, options: &Options) -> String {
        // A smoke run's few calls show that the rig runs, not whether the bar is met: judging
        // them printed `(NO)` inside passing CI runs.
        let verdict = |pass: bool| match (options.smoke, pass) {
            (true, _) => "not judged at smoke size",
            (false, true) => "yes",
            (false, false) => "NO",
        };
        let calls_per_s: fn(&Run) -> f64 = |run| run.calls_per_s;
        let p99_us: fn(&Run) -> f64 = |run| run.p99_us;
        let mean_latency_us: fn(&Run) -> f64 = |run| run.mean_latency_us;
        let throughput_ratios = self
            .busy
            .ratios(UnderTest::Gateway, UnderTest::Naive, calls_per_s);
        let p99_ratios = self
            .busy
            .ratios(UnderTest::Gateway, UnderTest::Naive, p99_us);
        let throughput = median(throughput_ratios.clone());
        let p99 = median(p99_ratios.clone());

        let mut out = String::new();
        let mut row = |what: &str, cells: [&str; 7], bar: &str| {
            let [
                gateway,
                required,
                naive,
                bare,
                vs_naive,
                required_vs_naive,
                vs_bare,
            ] = cells;
            out.push_str(&format!(
                "| {what:<33} | {gateway:>9} | {required:>15} | {naive:>11} | {bare:>10} | \
                 {vs_naive:>13} | {required_vs_naive:>21} | {vs_bare:>12} | {bar:<22} |\n"
            ));
        };
        let [gateway, required, naive, bare] = UnderTest::ALL.map(UnderTest::name);
        let header = [
            gateway,
            required,
            naive,
            bare,
            "gateway/naive",
            "naive+log+codec/naive",
            "gateway/bare",
        ];
        row("measure", header, "bar (met?)");
        row("---", ["---:"; 7], "---");
        let throughput_bar = format!(
            ">= {MIN_CALLS_PER_S_VS_NAIVE:.2}× naive ({})",
            verdict(throughput >= MIN_CALLS_PER_S_VS_NAIVE)
        );
        let p99_bar = format!(
            "<= {MAX_P99_VS_NAIVE:.2}× naive ({})",
            verdict(p99 <= MAX_P99_VS_NAIVE)
        );
        for (what, rounds, measure, bar) in [
            (
                "calls/s, 128 in flight",
                &self.busy,
                calls_per_s,
                &throughput_bar[..],
            ),
            ("p99, 128 in flight (µs)", &self.busy, p99_us, &p99_bar),
            ("calls/s, 1 in flight", &self.idle, calls_per_s, ""),
            (
                "mean latency, 1 in flight (µs)",
                &self.idle,
                mean_latency_us,
                "",
            ),
        ] {
            let [gateway, required, naive, bare] =
                rounds.medians(measure).map(|value| format!("{value:.0}"));
            let [vs_naive, required_vs_naive, vs_bare] = [
                (UnderTest::Gateway, UnderTest::Naive),
                (UnderTest::Required, UnderTest::Naive),
                (UnderTest::Gateway, UnderTest::Bare),
            ]
            .map(|(server, other)| format!("{:.2}", median(rounds.ratios(server, other, measure))));
            let cells = [
                &gateway[..],
                &required,
                &naive,
                &bare,
                &vs_naive,
                &required_vs_naive,
                &vs_bare,
            ];
            row(what, cells, bar);
        }
        let instructions = "instructions per call (callgrind)";
        match self.instructions {
            Some([gateway, required, naive]) => {
                let [vs_naive, required_vs_naive] =
                    [gateway, required].map(|count| format!("{:.2}", ratio(count, naive)));
                let [gateway, required, naive] =
                    [gateway, required, naive].map(|count| format!("{count:.0}"));
                let cells = [
                    &gateway[..],
                    &required,
                    &naive,
                    "-",
                    &vs_naive,
                    &required_vs_naive,
                    "-",
                ];
                row(instructions, cells, "");
            }
            None => row(instructions, ["-"; 7], "valgrind not installed"),
        }
        let [rss_mib, naive_rss_mib] = self
            .peak_rss_kib
            .each_ref()
            .map(|peaks| median(peaks.iter().map(|&kib| kib as f64 / 1024.0).collect()));
        let rss_bar = format!(
            "<= {MAX_PEAK_RSS_MIB:.0} ({})",
            verdict(rss_mib <= MAX_PEAK_RSS_MIB)
        );
        row(
            "peak RSS, 1024 in flight (MiB)",
            [
                &format!("{rss_mib:.1}"),
                "-",
                &format!("{naive_rss_mib:.1}"),
                "-",
                &format!("{:.2}", ratio(rss_mib, naive_rss_mib)),
                "-",
                "-",
            ],
            &rss_bar,
        );

        let list = |ratios: &[f64]| {
            ratios
                .iter()
                .map(|ratio| format!("{ratio:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let rounds = self.busy.runs[UnderTest::Gateway as usize].len();
        let mut notes = format!(
            "\n1 and 128 in flight: {rounds} round{} of {} per server (gateway, naive+log+codec, \
             naive stack, bare tonic in turn), after a {} warm-up run of each; values are medians \
             over the rounds, ratios the medians of the rounds' ratios (at 128 in flight, against \
             the naive stack: the gateway's calls/s {}, p99 {}; naive+log+codec's calls/s {}, \
             p99 {})\n\
             RSS: the median of {} fresh gateway{} and as many fresh naive stacks, each after {} \
             at 1024 in flight against a stand-in that answers after {} (MiB, in run order: \
             gateway {}; naive stack {})\n",
            if rounds == 1 { "" } else { "s" },
            humantime::format_duration(self.busy.round_length),
            humantime::format_duration(options.warmup),
            list(&throughput_ratios),
            list(&p99_ratios),
            list(
                &self
                    .busy
                    .ratios(UnderTest::Required, UnderTest::Naive, calls_per_s)
            ),
            list(
                &self
                    .busy
                    .ratios(UnderTest::Required, UnderTest::Naive, p99_us)
            ),
            self.peak_rss_kib[0].len(),
            if self.peak_rss_kib[0].len() == 1 {
                ""
            } else {
                "s"
            },
            humantime::format_duration(options.duration),
            humantime::format_duration(SLOW_REPLY),
            mib_list(&self.peak_rss_kib[0]),
            mib_list(&self.peak_rss_kib[1]),
        );
        let mut warn_unless_ok = |server: &str, in_flight: u32, runs: &[Run]| {
            for run in runs.iter().filter(|run| run.ok_calls != run.calls) {
                notes.push_str(&format!(
                    "warning: {server}, {in_flight} in flight: only {} of {} calls were OK\n",
                    run.ok_calls, run.calls
                ));
            }
        };
        for (rounds, in_flight) in [(&self.idle, 1), (&self.busy, 128)] {
            for (server, runs) in UnderTest::ALL.iter().zip(&rounds.runs) {
                warn_unless_ok(server.name(), in_flight, runs);
            }
        }
        let [gateway_runs, naive_runs] = &self.rss_runs;
        warn_unless_ok("gateway", 1024, gateway_runs);
        warn_unless_ok("naive stack", 1024, naive_runs);
        out + &notes
    }
}
