//! The benchmark rig behind `scripts/bench`: measures, side by side in one run on loopback, the
//! gateway in front of a fast controller stand-in and a bare tonic server that implements
//! `TaskService` as a no-op (the ceiling of this gRPC stack on this machine).
//!
//! ```text
//! bench_rig --taskgate PATH [--gateway-bin PATH] [--duration SECS] [--smoke] [--keep-profiles DIR]
//! bench_rig bare      # internal: the bare tonic server, run as a child process
//! bench_rig stand-in  # the fast stand-in alone, for profiling the gateway by hand
//! bench_rig soak --taskgate PATH [--calls N] [--duration D] [--sample D] [--warmup D] [--plot PNG]
//! ```
//!
//! `--taskgate` is the binary whose `bench` command drives the load; `--gateway-bin` (default:
//! the same) is the binary whose `serve` is measured, so an older build can be compared with the
//! same load generator. Load comes from `taskgate bench --json`; instructions per call from
//! callgrind, when `valgrind` is on the PATH, as the difference between two runs of different
//! lengths (so start-up and warm-up cancel out), every thread counted.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark that cannot run should stop loudly.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tonic::{Status, transport::Server};

use taskgate::proto::task_service_server::{TaskService, TaskServiceServer};

// In a folder of its own, so Cargo does not take it for an example of its own.
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
        Some("bare") => return run_bare(),
        Some("stand-in") => return run_stand_in(),
        Some("soak") => return soak::run(&args[1..]),
        _ => {}
    }
    let options = parse_options(&args);
    let fast = start_stand_in(Duration::ZERO);
    let slow = start_stand_in(SLOW_REPLY);
    let report = measure(&options, &fast, slow.address);
    print!("{}", report.table(&options));
}

fn parse_options(args: &[String]) -> Options {
    let usage = "usage: bench_rig --taskgate PATH [--gateway-bin PATH] [--duration SECS] [--smoke] \
                 [--keep-profiles DIR]";
    let mut taskgate = None;
    let mut gateway_bin = None;
    let mut duration = None;
    let mut smoke = false;
    let mut keep_profiles = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{arg} needs a value; {usage}"))
        };
        match arg.as_str() {
            "--taskgate" => taskgate = Some(PathBuf::from(value())),
            "--gateway-bin" => gateway_bin = Some(PathBuf::from(value())),
            "--duration" => {
                let text = value();
                let seconds: f64 = text
                    .parse()
                    .unwrap_or_else(|_| panic!("--duration '{text}' is not a number of seconds"));
                duration = Some(Duration::from_secs_f64(seconds));
            }
            "--smoke" => smoke = true,
            "--keep-profiles" => keep_profiles = Some(PathBuf::from(value())),
            other => panic!("unknown argument '{other}'; {usage}"),
        }
    }
    let taskgate = taskgate.unwrap_or_else(|| panic!("--taskgate is required; {usage}"));
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

#[derive(Debug, Default)]
struct Report {
    /// 1 in flight: medians over rounds that alternate the two servers.
    idle: Rounds,
    /// 128 in flight: medians over rounds that alternate the two servers.
    busy: Rounds,
    stand_in_round_trip_us: f64,
    /// Instructions per call, gateway and bare, when valgrind is installed.
    instructions: Option<(f64, f64)>,
    peak_rss_kib: u64,
    rss_run: Run,
}

/// Load in rounds: the median calls/s of each side, the median of the rounds' ratios, and the
/// median CPU per call of each process.
#[derive(Debug, Default)]
struct Rounds {
    gateway: Run,
    bare: Run,
    ratios: Vec<f64>,
    round_length: Duration,
    cpu: CpuSplit,
}

/// CPU time, in µs per call or in seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    user: f64,
    system: f64,
}

/// Who spends the CPU of a call, in µs per call: on a machine where every process shares the same
/// cores, calls/s under load follow the sum.
#[derive(Debug, Default)]
struct CpuSplit {
    gateway: Cpu,
    stand_in: Cpu,
    gateway_load: Cpu,
    bare: Cpu,
    bare_load: Cpu,
}

fn measure(options: &Options, fast: &StandIn, slow: SocketAddr) -> Report {
    // On an idle machine, before the servers start, as since the first session: measured between
    // the rounds instead, right after load, the same exchange took 16-17 µs, not 45-85 µs (this
    // VM wakes a thread on an idle CPU slowly), and the latency bound would move with it.
    let mut report = Report {
        stand_in_round_trip_us: round_trip_us(fast.address, if options.smoke { 200 } else { 5000 }),
        ..Report::default()
    };
    let upstream = format!("http://{}/api/v2/task", fast.address);
    let gateway = Target::gateway(&options.gateway_bin, &upstream, None);
    let bare = Target::bare(None);
    report.idle = rounds(options, [&gateway, &bare], fast, [1, 1]);
    report.busy = rounds(options, [&gateway, &bare], fast, [128, 8]);
    gateway.stop();
    bare.stop();

    if which("valgrind") {
        let (short, long) = if options.smoke { (20, 60) } else { (500, 2500) };
        let per_call = |name: &str, start: &dyn Fn(&Path) -> Target| {
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
        };
        let gateway_instructions = per_call("gateway", &|out| {
            Target::gateway(&options.gateway_bin, &upstream, Some(out))
        });
        let bare_instructions = per_call("bare", &|out| Target::bare(Some(out)));
        report.instructions = Some((gateway_instructions, bare_instructions));
    }

    let slow_upstream = format!("http://{slow}/api/v2/task");
    let gateway = Target::gateway(&options.gateway_bin, &slow_upstream, None);
    report.rss_run = bench(options, &gateway, 1024, 16, Length::Duration);
    report.peak_rss_kib = proc_status_kib(gateway.child.id(), "VmHWM:");
    gateway.stop();
    report
}

/// `in_flight` calls on `connections` connections, in rounds that alternate the gateway and the
/// bare server, each after one warm-up run: a machine that slows down for a while (a shared VM
/// does, by a third at times) slows both sides of a round alike, and the medians leave out the
/// round it did not. Each run has no warm-up of its own, so every call it counts is one the CPU
/// measured around it was spent on: the server's process and the stand-in's thread from /proc,
/// the load generator as a child this process waited for (its start included, a few ms).
fn rounds(
    options: &Options,
    [gateway, bare]: [&Target; 2],
    stand_in: &StandIn,
    [in_flight, connections]: [usize; 2],
) -> Rounds {
    let rounds: u32 = if options.smoke { 1 } else { 5 };
    let round_length = options.duration / rounds;
    let run = |target: &Target, length: Duration| {
        load_run(options, target, stand_in, [in_flight, connections], length)
    };
    run(gateway, options.warmup);
    run(bare, options.warmup);
    let (mut gateway_runs, mut bare_runs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        gateway_runs.push(run(gateway, round_length));
        bare_runs.push(run(bare, round_length));
    }
    let ratios = gateway_runs
        .iter()
        .zip(&bare_runs)
        .map(|(gateway, bare)| {
            gateway.run.calls_per_s / bare.run.calls_per_s.max(f64::MIN_POSITIVE)
        })
        .collect();
    let median_cpu = |runs: &[LoadRun], pick: fn(&LoadRun) -> Cpu| {
        let cpus: Vec<Cpu> = runs.iter().map(pick).collect();
        Cpu {
            user: median_by(cpus.clone(), |cpu| cpu.user).user,
            system: median_by(cpus, |cpu| cpu.system).system,
        }
    };
    Rounds {
        cpu: CpuSplit {
            gateway: median_cpu(&gateway_runs, |run| run.server),
            stand_in: median_cpu(&gateway_runs, |run| run.stand_in),
            gateway_load: median_cpu(&gateway_runs, |run| run.load),
            bare: median_cpu(&bare_runs, |run| run.server),
            bare_load: median_cpu(&bare_runs, |run| run.load),
        },
        gateway: median_by(gateway_runs, |run| run.run.calls_per_s).run,
        bare: median_by(bare_runs, |run| run.run.calls_per_s).run,
        ratios,
        round_length,
    }
}

/// One load run and the CPU per call each process spent around it.
struct LoadRun {
    run: Run,
    server: Cpu,
    stand_in: Cpu,
    load: Cpu,
}

fn load_run(
    options: &Options,
    target: &Target,
    stand_in: &StandIn,
    [in_flight, connections]: [usize; 2],
    length: Duration,
) -> LoadRun {
    let server = Path::new("/proc").join(target.child.id().to_string());
    let before = (
        cpu_time(&server),
        cpu_time(&stand_in.thread),
        children_cpu_time(),
    );
    let run = bench(
        options,
        target,
        in_flight,
        connections,
        Length::Round(length),
    );
    let per_call = |before: Cpu, after: Cpu| Cpu {
        user: (after.user - before.user) * 1e6 / run.calls.max(1) as f64,
        system: (after.system - before.system) * 1e6 / run.calls.max(1) as f64,
    };
    LoadRun {
        server: per_call(before.0, cpu_time(&server)),
        stand_in: per_call(before.1, cpu_time(&stand_in.thread)),
        load: per_call(before.2, children_cpu_time()),
        run,
    }
}

/// The middle item by `key` (the upper middle of an even count).
fn median_by<T>(mut items: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    items.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = items.len() / 2;
    items.swap_remove(middle)
}

/// The user and system time in `folder`/stat: a process's (`/proc/PID`) or a thread's.
fn cpu_time(folder: &Path) -> Cpu {
    stat_seconds(folder, 11)
}

/// The user and system time of this process's children that it has waited for.
fn children_cpu_time() -> Cpu {
    stat_seconds(Path::new("/proc/self"), 13)
}

/// Two clock-tick fields of a stat file, from `field` (0 = the state, the field after the
/// command's name, which may hold spaces and parentheses), in seconds.
fn stat_seconds(folder: &Path, field: usize) -> Cpu {
    let stat = std::fs::read_to_string(folder.join("stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let seconds = |index: usize| fields[index].parse::<f64>().unwrap() / ticks;
    Cpu {
        user: seconds(field),
        system: seconds(field + 1),
    }
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
    /// `taskgate serve` with its default access log, read by a thread as a log shipper would.
    fn gateway(binary: &Path, upstream: &str, callgrind_out: Option<&Path>) -> Target {
        let mut command = under_callgrind(binary, callgrind_out);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--upstream", upstream])
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
            name: "the gateway",
            url: format!("http://{address}"),
            child,
        }
    }

    /// This program's `bare` command.
    fn bare(callgrind_out: Option<&Path>) -> Target {
        let mut command = under_callgrind(&std::env::current_exe().unwrap(), callgrind_out);
        command.arg("bare");
        let (child, line) = spawn_until(command, Pipe::Stdout, "bare listening ");
        Target {
            name: "the bare server",
            url: format!(
                "http://{}",
                line.trim_start_matches("bare listening ").trim()
            ),
            child,
        }
    }

    /// SIGTERM, then wait: both servers exit cleanly, which is when callgrind writes its counts.
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

enum Pipe {
    Stdout,
    Stderr,
}

/// Starts `command` and reads `pipe` until a line containing `needle`; a thread then keeps
/// reading the pipe, so the child never blocks on it.
fn spawn_until(mut command: Command, pipe: Pipe, needle: &str) -> (Child, String) {
    let (stdout, stderr) = match pipe {
        Pipe::Stdout => (Stdio::piped(), Stdio::null()),
        Pipe::Stderr => (Stdio::null(), Stdio::piped()),
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    let reader: Box<dyn Read + Send> = match pipe {
        Pipe::Stdout => Box::new(child.stdout.take().unwrap()),
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

/// The mean time of a minimal HTTP/1.1 POST and its reply on one kept-alive connection: what one
/// controller hop costs at the least.
fn round_trip_us(stand_in: SocketAddr, round_trips: u32) -> f64 {
    let mut stream = TcpStream::connect(stand_in).unwrap();
    stream.set_nodelay(true).unwrap();
    let body = b"<?xml version=\"1.0\"?>\n<methodcall/>\n";
    let request = format!(
        "POST /api/v2/task HTTP/1.1\r\nhost: {stand_in}\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{}",
        body.len(),
        String::from_utf8_lossy(body)
    );
    let mut buffer = vec![0; 4096];
    let mut exchange = || {
        stream.write_all(request.as_bytes()).unwrap();
        let mut received = 0;
        // The reply is small and fixed: done once its body has arrived.
        while !buffer[..received].ends_with(SUCCESS) {
            let read = stream.read(&mut buffer[received..]).unwrap();
            assert!(read > 0, "the stand-in closed the connection");
            received += read;
        }
    };
    for _ in 0..round_trips / 10 {
        exchange();
    }
    let started = tokio::time::Instant::now();
    for _ in 0..round_trips {
        exchange();
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(round_trips)
}

/// The stand-in controller: every POST gets the success reply, after `delay`. It runs on one
/// thread of its own (a current-thread runtime), as an event-loop server like nginx would, so it
/// takes as little as it can of the CPU the gateway and the load share: a real controller is on
/// another machine.
fn start_stand_in(delay: Duration) -> StandIn {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    let (thread_tx, thread_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // "PID/task/TID": where this thread's CPU time is, for the CPU split.
        let thread = std::fs::read_link("/proc/thread-self").unwrap();
        thread_tx.send(Path::new("/proc").join(thread)).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            serve_stand_in(tokio::net::TcpListener::from_std(listener).unwrap(), delay).await;
        });
    });
    StandIn {
        address,
        thread: thread_rx.recv().unwrap(),
    }
}

/// A running stand-in: where it listens, and its thread's folder under /proc.
struct StandIn {
    address: SocketAddr,
    thread: PathBuf,
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

fn run_stand_in() {
    let stand_in = start_stand_in(Duration::ZERO);
    println!("stand-in listening http://{}/api/v2/task", stand_in.address);
    loop {
        std::thread::park();
    }
}

/// `TaskService` doing nothing: what tonic alone costs per call.
struct NoOp;

#[tonic::async_trait]
impl TaskService for NoOp {
    async fn case_extract(
        &self,
        _request: tonic::Request<CaseExtractRequest>,
    ) -> Result<tonic::Response<CaseExtractResponse>, Status> {
        Ok(tonic::Response::new(CaseExtractResponse {}))
    }

    // The bench calls only CaseExtract; the other RPCs do nothing as well.
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

fn run_bare() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("bare listening {}", listener.local_addr().unwrap());
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        Server::builder()
            .add_service(TaskServiceServer::new(NoOp))
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

impl CpuSplit {
    /// Who spent what, and the calls/s two cores would give if the CPU were the only limit.
    fn lines(&self) -> String {
        let show = |cpu: Cpu| format!("{:.1} + {:.1}", cpu.user, cpu.system);
        let total = |parts: &[Cpu]| parts.iter().map(|cpu| cpu.user + cpu.system).sum::<f64>();
        let gateway_total = total(&[self.gateway, self.stand_in, self.gateway_load]);
        let bare_total = total(&[self.bare, self.bare_load]);
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let ratio = if gateway_total > 0.0 {
            bare_total / gateway_total
        } else {
            0.0
        };
        format!(
            "CPU per call at 128 in flight, user + system µs: gateway {}, stand-in {}, load \
             generator {} = {gateway_total:.1}; bare {}, load generator {} = {bare_total:.1}\n\
             at {cores} cores' worth of CPU that is {:.0} vs {:.0} calls/s, a ratio of {ratio:.2}\n",
            show(self.gateway),
            show(self.stand_in),
            show(self.gateway_load),
            show(self.bare),
            show(self.bare_load),
            cores * 1e6 / gateway_total.max(f64::MIN_POSITIVE),
            cores * 1e6 / bare_total.max(f64::MIN_POSITIVE),
        )
    }
}

impl Report {
    fn table(&self, options: &Options) -> String {
        let ratio = |gateway: f64, bare: f64| if bare > 0.0 { gateway / bare } else { 0.0 };
        let verdict = |pass: bool| if pass { "yes" } else { "NO" };
        let mut out = String::new();
        let mut row = |what: &str, gateway: &str, bare: &str, ratio: &str, goal: &str| {
            out.push_str(&format!(
                "| {what:<34} | {gateway:>12} | {bare:>12} | {ratio:>7} | {goal:<28} |\n"
            ));
        };
        row("measure", "gateway", "bare tonic", "ratio", "goal (met?)");
        row("---", "---:", "---:", "---:", "---");
        let throughput = median_by(self.busy.ratios.clone(), |ratio| *ratio);
        row(
            "calls/s, 1 in flight",
            &format!("{:.0}", self.idle.gateway.calls_per_s),
            &format!("{:.0}", self.idle.bare.calls_per_s),
            &format!("{:.2}", median_by(self.idle.ratios.clone(), |ratio| *ratio)),
            "",
        );
        row(
            "calls/s, 128 in flight",
            &format!("{:.0}", self.busy.gateway.calls_per_s),
            &format!("{:.0}", self.busy.bare.calls_per_s),
            &format!("{throughput:.2}"),
            &format!(">= 0.50 ({})", verdict(throughput >= 0.5)),
        );
        let latency_bound = (self.idle.bare.mean_latency_us + self.stand_in_round_trip_us) * 1.3;
        row(
            "mean latency, 1 in flight (µs)",
            &format!("{:.1}", self.idle.gateway.mean_latency_us),
            &format!("{:.1}", self.idle.bare.mean_latency_us),
            &format!(
                "{:.2}",
                ratio(
                    self.idle.gateway.mean_latency_us,
                    self.idle.bare.mean_latency_us
                )
            ),
            &format!(
                "<= {latency_bound:.1} ({})",
                verdict(self.idle.gateway.mean_latency_us <= latency_bound)
            ),
        );
        match self.instructions {
            Some((gateway, bare)) => {
                let instructions = ratio(gateway, bare);
                row(
                    "instructions per call (callgrind)",
                    &format!("{gateway:.0}"),
                    &format!("{bare:.0}"),
                    &format!("{instructions:.2}"),
                    &format!("<= 1.80 ({})", verdict(instructions <= 1.8)),
                );
            }
            None => row(
                "instructions per call (callgrind)",
                "-",
                "-",
                "-",
                "valgrind not installed",
            ),
        }
        let rss_mib = self.peak_rss_kib as f64 / 1024.0;
        row(
            "peak RSS, 1024 in flight (MiB)",
            &format!("{rss_mib:.1}"),
            "-",
            "-",
            &format!("<= 64 ({})", verdict(rss_mib <= 64.0)),
        );
        let list = |ratios: &[f64]| {
            ratios
                .iter()
                .map(|ratio| format!("{ratio:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut notes = format!(
            "\n1 and 128 in flight: {} round{} of {} per side, alternating, after a {} warm-up run \
             of each; ratios are the medians of the rounds' (1 in flight: {}; 128: {})\n\
             stand-in round trip (HTTP/1.1 POST on loopback, idle machine): {:.1} µs; \
             RSS: {} at 1024 in flight against a stand-in that answers after {}\n",
            self.busy.ratios.len(),
            if self.busy.ratios.len() == 1 { "" } else { "s" },
            humantime::format_duration(self.busy.round_length),
            humantime::format_duration(options.warmup),
            list(&self.idle.ratios),
            list(&self.busy.ratios),
            self.stand_in_round_trip_us,
            humantime::format_duration(options.duration),
            humantime::format_duration(SLOW_REPLY),
        );
        notes.push_str(&self.busy.cpu.lines());
        for (name, run) in [
            ("gateway, 1 in flight", self.idle.gateway),
            ("gateway, 128 in flight", self.busy.gateway),
            ("gateway, 1024 in flight, slow stand-in", self.rss_run),
        ] {
            if run.ok_calls != run.calls {
                notes.push_str(&format!(
                    "warning: {name}: only {} of {} calls were OK\n",
                    run.ok_calls, run.calls
                ));
            }
        }
        out + &notes
    }
}
