//! `taskgate bench`: a load generator for a running gateway, used as ghz or h2load are for gRPC.
//!
//! Workers share a few HTTP/2 connections and call CaseExtract back to back. Each worker keeps its
//! own latency histogram and status counts, merged once the run is over, so a call takes no lock
//! and allocates nothing beyond what tonic needs: the generator shares the machine with the
//! gateway it measures, and every cycle it spends is one the gateway does not get.

use std::error::Error as _;
use std::fmt;
use std::num::{NonZeroU64, NonZeroUsize};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::output;
use super::{
    CALL_TIMEOUT, Exit, Outcome, bearer_token, connect, duration, gateway_endpoint, usage,
};
use taskgate::config::{Bounds, redact_url};
use taskgate::fault;
use taskgate::proto::CaseExtractRequest;
use taskgate::proto::task_service_client::TaskServiceClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const BENCH_HELP: &str = "\
OUTPUT:
    A report on stdout: calls and calls/s over the measured window, latency (mean, p50, p90,
    p99, p99.9, max; every measured call, whatever its status) and a count per gRPC status
    code. With --json, one JSON object instead:
      {\"gateway\":…,\"connections\":…,\"concurrency\":…,\"calls\":…,\"duration_s\":…,
       \"calls_per_s\":…,\"latency_us\":{\"mean\":…,\"p50\":…,\"p90\":…,\"p99\":…,
       \"p99_9\":…,\"max\":…},\"codes\":{\"OK\":…,…}}
    latency_us is null when no call was measured. Live progress goes to stderr when it is a
    terminal. Ctrl-C ends the run early: calls in flight finish and the report covers what was
    measured.

NOTE:
    The simulated controller answers a repeated case_extract on a port with fault 1148
    (UNAVAILABLE) until its case operation completes, so against the simulator most calls fail
    fast. Measure throughput against a real controller or a fast stand-in.

EXIT STATUS:
    0  the run completed, even if some calls failed (the status line counts them)
    1  the gateway cannot be reached, or a connection to it does not answer a health check
       within --timeout; nothing was measured
    2  a usage error (bad flag value, a --gateway that is not http:// or https://); nothing was
       sent";

/// The header a call's deadline travels in (tonic keeps its own constant private).
const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// How often the progress line is refreshed.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

// The ranges of the settings, far wider than any run needs: a longer time would overflow the
// clock when added to it, and more tasks or connections would exhaust memory or descriptors
// before the gateway is measured.
const HOUR: Duration = Duration::from_secs(60 * 60);
const CONNECTIONS: Bounds<NonZeroUsize> = Bounds {
    setting: "--connections",
    min: NonZeroUsize::MIN,
    max: NonZeroUsize::new(10_000).unwrap(),
    below: "a run needs a connection",
    above: "each connection takes a file descriptor here and on the gateway",
};
const CONCURRENCY: Bounds<NonZeroUsize> = Bounds {
    setting: "--concurrency",
    min: NonZeroUsize::MIN,
    max: NonZeroUsize::new(100_000).unwrap(),
    below: "a run needs a call in flight",
    above: "each call in flight is a task here and a slot on the gateway (--max-in-flight is at \
            most 100000)",
};
const CALLS: Bounds<NonZeroU64> = Bounds {
    setting: "--calls",
    min: NonZeroU64::MIN,
    max: NonZeroU64::MAX,
    below: "a run must measure a call",
    above: "a count beyond 2^64 cannot be kept",
};
const DURATION: Bounds<Duration> = Bounds {
    setting: "--duration",
    min: Duration::from_millis(1),
    max: Duration::from_secs(24 * 60 * 60),
    below: "a run must measure for some time, for example 10s",
    above: "a run that long is a soak test; use --calls or several runs",
};
const WARMUP: Bounds<Duration> = Bounds {
    setting: "--warmup",
    min: Duration::ZERO,
    max: HOUR,
    below: "a warm-up cannot be negative",
    above: "connections and caches are warm long before",
};

#[derive(Debug, Args)]
#[command(after_help = BENCH_HELP)]
pub(super) struct BenchArgs {
    /// The gateway's address: http://HOST:PORT, or https://HOST:PORT for one serving TLS.
    #[arg(
        long,
        env = "TASKGATE_BENCH_GATEWAY",
        default_value = "http://127.0.0.1:50051"
    )]
    gateway: String,

    /// How many HTTP/2 connections to open (1 to 10000); the workers are spread over them in
    /// turn.
    #[arg(
        long,
        env = "TASKGATE_BENCH_CONNECTIONS",
        value_name = "C",
        default_value = "1"
    )]
    connections: u64,

    /// How many calls to keep in flight: one worker each, calling back to back. At least
    /// --connections, at most 100000.
    #[arg(
        long,
        env = "TASKGATE_BENCH_CONCURRENCY",
        value_name = "N",
        default_value = "50"
    )]
    concurrency: u64,

    /// How long to measure, after the warm-up, for example 10s or 2m; 1ms to 1day.
    #[arg(long, env = "TASKGATE_BENCH_DURATION", default_value = "10s", value_parser = duration)]
    duration: Duration,

    /// Measure exactly this many calls in total, after the warm-up, instead of --duration.
    #[arg(
        long,
        env = "TASKGATE_BENCH_CALLS",
        value_name = "N",
        conflicts_with = "duration"
    )]
    calls: Option<u64>,

    /// The port to call. The default is the simulator's AutoCase port with a selected bin.
    #[arg(
        long,
        env = "TASKGATE_BENCH_PORT",
        default_value_t = 4,
        conflicts_with = "ports"
    )]
    port: u32,

    /// The bin to call for.
    #[arg(
        long,
        env = "TASKGATE_BENCH_BIN",
        default_value_t = 101337,
        conflicts_with = "bins"
    )]
    bin: u32,

    /// Call every port from A to B, in turn (a single number is one port). Not checked against
    /// 1-2000: the gateway's own validation may be what is measured.
    #[arg(long, env = "TASKGATE_BENCH_PORTS", value_name = "A-B")]
    ports: Option<String>,

    /// Call every bin from A to B: each (port, bin) pair in turn, the port changing fastest. Not
    /// checked against 1-4000000.
    #[arg(long, env = "TASKGATE_BENCH_BINS", value_name = "A-B")]
    bins: Option<String>,

    /// How long to call before measuring, so connections and caches are warm; these calls are
    /// made but not counted. 0s for none; at most 1h.
    #[arg(long, env = "TASKGATE_BENCH_WARMUP", default_value = "1s", value_parser = duration)]
    warmup: Duration,

    /// Each call's deadline, sent to the gateway as grpc-timeout; also the connect timeout. 1ms
    /// to 1h.
    #[arg(long, env = "TASKGATE_BENCH_TIMEOUT", default_value = "5s", value_parser = duration)]
    timeout: Duration,

    /// The bearer token to send, when the gateway requires one. Prefer the environment variable:
    /// a command-line argument is visible to other users in the process list.
    #[arg(long, env = "TASKGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Print the report as one JSON object, and no progress.
    #[arg(long, env = "TASKGATE_BENCH_JSON")]
    json: bool,
}

/// Runs the benchmark and prints its report.
pub(super) async fn bench(args: BenchArgs) -> Outcome {
    let plan = Plan::from_args(args).map_err(usage)?;
    let unreachable = |error: anyhow::Error| (Exit::CallFailed, error);
    let mut channels = Vec::with_capacity(plan.connections);
    // Every connection is made, and answers, before any load, so an unreachable gateway costs no
    // partial run.
    for _ in 0..plan.connections {
        let channel = connect(&plan.endpoint, &plan.gateway)
            .await
            .map_err(unreachable)?;
        probe(&channel, plan.timeout)
            .await
            .with_context(|| format!("cannot connect to the gateway at {}", plan.gateway))
            .map_err(unreachable)?;
        channels.push(channel);
    }
    let internal = |error: anyhow::Error| (Exit::CallFailed, error);
    let report = measure(&plan, &channels).await.map_err(internal)?;
    let printed = if plan.json {
        output::line(report.to_json())
    } else {
        output::text(report.to_text())
    };
    output::exit_after(printed, Exit::Success)
}

/// Checks that the gateway behind `channel` answers: a TCP connect and an HTTP/2 preface
/// succeed even when nothing there speaks gRPC, and the run would then count every call as
/// CANCELLED or UNAVAILABLE. The check is a health Check, which moves nothing; any status the
/// server sends back (UNIMPLEMENTED from a server without health, say) is an answer. A status
/// made on this side has a source: the transport error or the timeout.
async fn probe(channel: &Channel, timeout: Duration) -> anyhow::Result<()> {
    let mut health = HealthClient::new(channel.clone());
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match health.check(request).await {
        Ok(_) => Ok(()),
        Err(status) if status.source().is_none() => Ok(()),
        Err(status) if status.code() == Code::Cancelled => Err(anyhow::anyhow!(
            "it accepted the connection but did not answer a health check within {} (--timeout)",
            humantime::format_duration(timeout)
        )),
        Err(status) => Err(anyhow::anyhow!(
            "it accepted the connection but ended it without answering a health check: {}",
            status.message()
        )),
    }
}

/// The checked settings of one run. Not `Debug`: it holds the token.
struct Plan {
    gateway: String,
    endpoint: Endpoint,
    connections: usize,
    concurrency: usize,
    window: Window,
    targets: Targets,
    warmup: Duration,
    /// Each call's deadline, and how long the gateway has to answer the first.
    timeout: Duration,
    /// The grpc-timeout value every call carries, encoded once.
    grpc_timeout: AsciiMetadataValue,
    /// `Bearer <token>`, encoded once; never printed.
    authorization: Option<AsciiMetadataValue>,
    json: bool,
}

/// What ends the measured part of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    /// This long after the warm-up.
    Duration(Duration),
    /// This many measured calls in total.
    Calls(u64),
}

/// Inclusive ids, from `--ports A-B` or `--bins A-B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IdRange {
    first: u32,
    last: u32,
}

/// The (port, bin) pairs a run cycles through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Targets {
    ports: IdRange,
    bins: IdRange,
}

/// What one worker measured, or all of them once merged.
#[derive(Debug, Clone)]
struct Tally {
    /// Latency in microseconds.
    latency: Histogram<u64>,
    /// Calls by gRPC code number.
    codes: [u64; fault::GRPC_CODE_COUNT],
}

/// The outcome of a run, ready to render.
#[derive(Debug)]
struct Report {
    gateway: String,
    connections: usize,
    concurrency: usize,
    window: Window,
    warmup: Duration,
    targets: Targets,
    /// From the end of the warm-up to the last measured call's reply.
    measured: Duration,
    interrupted: bool,
    tally: Tally,
}

/// What the workers share: settings read on every call, and the counters they advance. Not
/// `Debug`: it holds the token.
struct Shared {
    targets: Targets,
    grpc_timeout: AsciiMetadataValue,
    authorization: Option<AsciiMetadataValue>,
    /// Calls that start before this are warm-up: made, not recorded.
    measure_from: Instant,
    /// The --calls limit, if any.
    calls: Option<u64>,
    /// The index of the next call of the whole run, which picks its port and bin.
    next_call: AtomicU64,
    /// Measured calls started so far, for --calls.
    claimed: AtomicU64,
    /// Measured calls answered so far, for the progress line.
    recorded: AtomicU64,
    /// Set when the window has passed or the user pressed Ctrl-C.
    stop: AtomicBool,
}

// === impl Plan ===

impl Plan {
    /// Checks every setting; nothing here touches the network.
    fn from_args(args: BenchArgs) -> anyhow::Result<Plan> {
        let connections = CONNECTIONS.check_count(args.connections)?.get();
        let concurrency = CONCURRENCY.check_count(args.concurrency)?.get();
        if concurrency < connections {
            anyhow::bail!(
                "--concurrency {concurrency} is less than --connections {connections}: each \
                 connection needs at least one call in flight; raise --concurrency or lower \
                 --connections"
            );
        }
        let window = match args.calls {
            Some(calls) => Window::Calls(CALLS.check_count(calls)?.get()),
            None => Window::Duration(DURATION.check(args.duration)?),
        };
        WARMUP.check(args.warmup)?;
        CALL_TIMEOUT.check(args.timeout)?;
        let targets = Targets {
            ports: id_range("ports", args.ports.as_deref(), args.port)?,
            bins: id_range("bins", args.bins.as_deref(), args.bin)?,
        };
        let authorization = args.token.as_deref().map(bearer_token).transpose()?;
        Ok(Plan {
            endpoint: gateway_endpoint(&args.gateway, args.timeout)?,
            // Shown in the report and in errors, never with a password in it.
            gateway: redact_url(&args.gateway).into_owned(),
            connections,
            concurrency,
            window,
            targets,
            warmup: args.warmup,
            timeout: args.timeout,
            grpc_timeout: grpc_timeout(args.timeout)?,
            authorization,
            json: args.json,
        })
    }
}

/// The range from `--{flag} A-B` when given, else the single id `one`.
fn id_range(flag: &str, range: Option<&str>, one: u32) -> anyhow::Result<IdRange> {
    match range {
        Some(text) => IdRange::parse(text)
            .map_err(|reason| anyhow::anyhow!("invalid --{flag} '{text}': {reason}")),
        None => Ok(IdRange {
            first: one,
            last: one,
        }),
    }
}

/// The grpc-timeout header value for `timeout`, encoded as tonic encodes it.
fn grpc_timeout(timeout: Duration) -> anyhow::Result<AsciiMetadataValue> {
    let mut request = tonic::Request::new(());
    request.set_timeout(timeout);
    request
        .metadata()
        .get(GRPC_TIMEOUT_HEADER)
        .cloned()
        .with_context(|| format!("cannot encode --timeout {timeout:?} as grpc-timeout"))
}

// === impl IdRange ===

impl IdRange {
    /// Parses `A-B` (or `A`, one id); the message says what is wrong, not which flag.
    fn parse(text: &str) -> Result<IdRange, String> {
        let id = |part: &str| {
            part.trim().parse::<u32>().map_err(|_| {
                format!(
                    "'{}' is not a whole number from 0 to {}; write A-B, for example 1-4",
                    part.trim(),
                    u32::MAX
                )
            })
        };
        let (first, last) = match text.split_once('-') {
            Some((first, last)) => (id(first)?, id(last)?),
            None => {
                let only = id(text)?;
                (only, only)
            }
        };
        if first > last {
            return Err(format!("the start {first} is greater than the end {last}"));
        }
        Ok(IdRange { first, last })
    }

    /// How many ids the range holds, 1 to 2^32.
    fn len(self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// The id at `index` counted from the first, wrapping around at the end.
    fn nth(self, index: u64) -> u32 {
        // The remainder is below `len`, so it fits the u32 range it is added into.
        self.first + (index % self.len()) as u32
    }
}

impl fmt::Display for IdRange {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(formatter, "{}", self.first)
        } else {
            write!(formatter, "{}-{}", self.first, self.last)
        }
    }
}

// === impl Targets ===

impl Targets {
    /// The (port, bin) of call `index`: every pair in turn, the port changing fastest so that
    /// calls in a row go to different ports.
    fn call(self, index: u64) -> (u32, u32) {
        let port_count = self.ports.len();
        (
            self.ports.nth(index % port_count),
            self.bins.nth(index / port_count),
        )
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = |range: IdRange, one: &'static str, many: &'static str| {
            if range.len() == 1 { one } else { many }
        };
        write!(
            formatter,
            "{} {}, {} {}",
            word(self.ports, "port", "ports"),
            self.ports,
            word(self.bins, "bin", "bins"),
            self.bins
        )?;
        let pairs = u128::from(self.ports.len()) * u128::from(self.bins.len());
        if pairs > 1 {
            write!(formatter, " ({pairs} pairs in turn)")?;
        }
        Ok(())
    }
}

// === impl Tally ===

impl Tally {
    /// An empty tally whose histogram grows as larger latencies arrive, so a worker starts small
    /// however long --timeout is.
    fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            latency: Histogram::new(3).context("cannot create a latency histogram")?,
            codes: [0; fault::GRPC_CODE_COUNT],
        })
    }

    fn record(&mut self, code: Code, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // `record` grows the histogram to fit; clamping, which `saturating_record` does at once,
        // is only for the value no histogram can index.
        if self.latency.record(micros).is_err() {
            self.latency.saturating_record(micros);
        }
        self.codes[code as usize] += 1;
    }

    fn merge(&mut self, other: &Tally) -> anyhow::Result<()> {
        self.latency
            .add(&other.latency)
            .context("cannot merge latency histograms")?;
        for (total, count) in self.codes.iter_mut().zip(other.codes) {
            *total += count;
        }
        Ok(())
    }

    fn calls(&self) -> u64 {
        self.latency.len()
    }

    /// The codes seen, in gRPC code order, with their counts.
    fn codes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.codes
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(number, count)| {
                // `number` indexes GRPC_CODE_COUNT entries, so it is a gRPC code number.
                (fault::grpc_code_name(Code::from_i32(number as i32)), *count)
            })
    }
}

// === impl Report ===

impl Report {
    fn calls_per_second(&self) -> f64 {
        let seconds = self.measured.as_secs_f64();
        if seconds > 0.0 {
            self.tally.calls() as f64 / seconds
        } else {
            0.0
        }
    }

    /// The report for people, aligned.
    fn to_text(&self) -> String {
        let window = match self.window {
            Window::Duration(duration) => humantime::format_duration(duration).to_string(),
            Window::Calls(calls) => format!("{calls} calls"),
        };
        let warmup = if self.warmup.is_zero() {
            "no warm-up".to_owned()
        } else {
            format!("after {} warm-up", humantime::format_duration(self.warmup))
        };
        let interrupted = if self.interrupted {
            " (interrupted)"
        } else {
            ""
        };
        let histogram = &self.tally.latency;
        let latency = if histogram.is_empty() {
            "none: no call was measured".to_owned()
        } else {
            format!(
                "mean {}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                format_micros(histogram.mean()),
                format_micros(histogram.value_at_quantile(0.5) as f64),
                format_micros(histogram.value_at_quantile(0.9) as f64),
                format_micros(histogram.value_at_quantile(0.99) as f64),
                format_micros(histogram.value_at_quantile(0.999) as f64),
                format_micros(histogram.max() as f64),
            )
        };
        let codes: Vec<String> = self
            .tally
            .codes()
            .map(|(name, count)| format!("{name} {count}"))
            .collect();
        let status = if codes.is_empty() {
            "none".to_owned()
        } else {
            codes.join(", ")
        };
        format!(
            "taskgate bench: {}, {} connection(s), {} in flight, {window} ({warmup})\n\
             targets:    {}\n\
             calls:      {} in {:.2}s, {:.1} calls/s{interrupted}\n\
             latency:    {latency}\n\
             status:     {status}\n",
            self.gateway,
            self.connections,
            self.concurrency,
            self.targets,
            self.tally.calls(),
            self.measured.as_secs_f64(),
            self.calls_per_second(),
        )
    }

    /// The report for scripts; the key names are a contract.
    fn to_json(&self) -> serde_json::Value {
        let histogram = &self.tally.latency;
        let latency = if histogram.is_empty() {
            serde_json::Value::Null
        } else {
            json!({
                "mean": round(histogram.mean(), 1),
                "p50": histogram.value_at_quantile(0.5),
                "p90": histogram.value_at_quantile(0.9),
                "p99": histogram.value_at_quantile(0.99),
                "p99_9": histogram.value_at_quantile(0.999),
                "max": histogram.max(),
            })
        };
        let codes: serde_json::Map<String, serde_json::Value> = self
            .tally
            .codes()
            .map(|(name, count)| (name.to_owned(), count.into()))
            .collect();
        json!({
            "gateway": self.gateway,
            "connections": self.connections,
            "concurrency": self.concurrency,
            "calls": self.tally.calls(),
            "duration_s": round(self.measured.as_secs_f64(), 3),
            "calls_per_s": round(self.calls_per_second(), 1),
            "latency_us": latency,
            "codes": codes,
        })
    }
}

/// A latency for people: three significant digits, in us, ms or s. The limits sit half a unit
/// of the last digit below each power of ten, so that 9999 us reads 10.0ms, not 10.00ms.
fn format_micros(micros: f64) -> String {
    let (value, unit) = if micros < 999.5 {
        return format!("{micros:.0}us");
    } else if micros < 999_500.0 {
        (micros / 1_000.0, "ms")
    } else {
        (micros / 1_000_000.0, "s")
    };
    let decimals = if value < 9.995 {
        2
    } else if value < 99.95 {
        1
    } else {
        0
    };
    format!("{value:.decimals$}{unit}")
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10_f64.powi(decimals);
    (value * scale).round() / scale
}

// === impl Shared ===

impl Shared {
    fn request(&self, port_id: u32, bin_id: u32) -> tonic::Request<CaseExtractRequest> {
        let mut request = tonic::Request::new(CaseExtractRequest {
            port_id,
            bin_id,
            ..Default::default()
        });
        let metadata = request.metadata_mut();
        metadata.insert(GRPC_TIMEOUT_HEADER, self.grpc_timeout.clone());
        if let Some(authorization) = &self.authorization {
            metadata.insert("authorization", authorization.clone());
        }
        request
    }
}

/// Runs the workers until the window closes, then merges what they measured.
async fn measure(plan: &Plan, channels: &[Channel]) -> anyhow::Result<Report> {
    let empty = Tally::new()?;
    let started = Instant::now();
    let measure_from = started + plan.warmup;
    let shared = Arc::new(Shared {
        targets: plan.targets,
        grpc_timeout: plan.grpc_timeout.clone(),
        authorization: plan.authorization.clone(),
        measure_from,
        calls: match plan.window {
            Window::Calls(calls) => Some(calls),
            Window::Duration(_) => None,
        },
        next_call: AtomicU64::new(0),
        claimed: AtomicU64::new(0),
        recorded: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let mut workers = JoinSet::new();
    for channel in channels.iter().cycle().take(plan.concurrency) {
        let client = TaskServiceClient::new(channel.clone());
        workers.spawn(work(client, Arc::clone(&shared), empty.clone()));
    }
    let progress = Progress::new(plan, started);
    let window_end = match plan.window {
        Window::Duration(duration) => Some(measure_from + duration),
        Window::Calls(_) => None,
    };
    let mut window_closed = pin!(async move {
        match window_end {
            Some(end) => tokio::time::sleep_until(end).await,
            None => std::future::pending().await,
        }
    });
    let mut interrupt = pin!(taskgate::shutdown::signal());
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    let mut interrupted = false;
    let mut total = empty;
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(tally) => total.merge(&tally.context("a bench worker failed")?)?,
                None => break,
            },
            () = &mut window_closed, if !shared.stop.load(Ordering::Relaxed) => {
                shared.stop.store(true, Ordering::Relaxed);
            }
            () = &mut interrupt, if !interrupted => {
                interrupted = true;
                shared.stop.store(true, Ordering::Relaxed);
            }
            _ = ticker.tick(), if progress.is_visible() => {
                progress.update(shared.recorded.load(Ordering::Relaxed));
            }
        }
    }
    progress.finish();
    Ok(Report {
        gateway: plan.gateway.clone(),
        connections: plan.connections,
        concurrency: plan.concurrency,
        window: plan.window,
        warmup: plan.warmup,
        targets: plan.targets,
        measured: Instant::now().saturating_duration_since(measure_from),
        interrupted,
        tally: total,
    })
}

/// One worker: call, record, repeat, until the window closes or the calls are used up.
async fn work(
    mut client: TaskServiceClient<Channel>,
    shared: Arc<Shared>,
    mut tally: Tally,
) -> Tally {
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let measured = started >= shared.measure_from;
        if measured
            && let Some(calls) = shared.calls
            && shared.claimed.fetch_add(1, Ordering::Relaxed) >= calls
        {
            break;
        }
        let (port_id, bin_id) = shared
            .targets
            .call(shared.next_call.fetch_add(1, Ordering::Relaxed));
        let code = match client.case_extract(shared.request(port_id, bin_id)).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        if measured {
            tally.record(code, started.elapsed());
            shared.recorded.fetch_add(1, Ordering::Relaxed);
        }
    }
    tally
}

/// The live progress line on stderr, hidden unless stderr is a terminal and the report is text.
struct Progress {
    bar: ProgressBar,
    visible: bool,
    started: Instant,
    warmup: Duration,
    window: Window,
}

// === impl Progress ===

impl Progress {
    fn new(plan: &Plan, started: Instant) -> Progress {
        use std::io::IsTerminal as _;
        let visible = !plan.json && std::io::stderr().is_terminal();
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Progress {
            bar: ProgressBar::with_draw_target(None, target)
                .with_style(ProgressStyle::default_spinner()),
            visible,
            started,
            warmup: plan.warmup,
            window: plan.window,
        }
    }

    fn is_visible(&self) -> bool {
        self.visible
    }

    fn update(&self, recorded: u64) {
        let since_start = self.started.elapsed();
        self.bar.set_message(progress_line(
            self.window,
            self.warmup,
            since_start,
            recorded,
        ));
        // A new message alone does not turn the spinner, which shows the run is alive.
        self.bar.tick();
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The progress message `since_start` into a run: the warm-up, or the measured calls so far.
fn progress_line(window: Window, warmup: Duration, since_start: Duration, recorded: u64) -> String {
    let Some(measuring) = since_start.checked_sub(warmup) else {
        return format!(
            "warm-up: {:.1}s of {}",
            since_start.as_secs_f64(),
            humantime::format_duration(warmup)
        );
    };
    let seconds = measuring.as_secs_f64();
    let rate = if seconds > 0.0 {
        recorded as f64 / seconds
    } else {
        0.0
    };
    match window {
        Window::Duration(duration) => format!(
            "measuring: {recorded} calls, {rate:.1} calls/s, {seconds:.1}s of {}",
            humantime::format_duration(duration)
        ),
        Window::Calls(calls) => {
            format!("measuring: {recorded}/{calls} calls, {rate:.1} calls/s, {seconds:.1}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn range(first: u32, last: u32) -> IdRange {
        IdRange { first, last }
    }

    #[test]
    fn ranges_parse_and_name_the_problem() {
        assert_eq!(IdRange::parse("1-4"), Ok(range(1, 4)));
        assert_eq!(IdRange::parse("7"), Ok(range(7, 7)));
        assert_eq!(IdRange::parse(" 3 - 3 "), Ok(range(3, 3)));
        assert_eq!(
            IdRange::parse("0-4294967295"),
            Ok(range(0, u32::MAX)),
            "the gateway's own range check may be what is measured"
        );
        assert_eq!(
            IdRange::parse("9-3"),
            Err("the start 9 is greater than the end 3".to_owned())
        );
        assert_eq!(
            IdRange::parse("1-x"),
            Err(
                "'x' is not a whole number from 0 to 4294967295; write A-B, for example 1-4"
                    .to_owned()
            )
        );
        assert_eq!(
            IdRange::parse("4294967296"),
            Err(
                "'4294967296' is not a whole number from 0 to 4294967295; write A-B, for \
                 example 1-4"
                    .to_owned()
            )
        );
        assert!(IdRange::parse("").is_err());
        assert!(IdRange::parse("1-2-3").is_err());
    }

    #[test]
    fn ranges_count_and_wrap() {
        assert_eq!(range(5, 5).len(), 1);
        assert_eq!(range(0, u32::MAX).len(), 1 << 32);
        assert_eq!(range(0, u32::MAX).nth(u64::MAX), u32::MAX);
        let three = range(10, 12);
        let ids: Vec<u32> = (0..7).map(|index| three.nth(index)).collect();
        assert_eq!(ids, [10, 11, 12, 10, 11, 12, 10]);
    }

    #[test]
    fn calls_cycle_through_every_pair_the_port_changing_fastest() {
        let targets = Targets {
            ports: range(1, 2),
            bins: range(100, 102),
        };
        let pairs: Vec<(u32, u32)> = (0..7).map(|index| targets.call(index)).collect();
        assert_eq!(
            pairs,
            [
                (1, 100),
                (2, 100),
                (1, 101),
                (2, 101),
                (1, 102),
                (2, 102),
                (1, 100)
            ]
        );
        let widest = Targets {
            ports: range(0, u32::MAX),
            bins: range(0, u32::MAX),
        };
        assert_eq!(widest.call(u64::MAX), (u32::MAX, u32::MAX));
        assert_eq!(
            widest.to_string(),
            "ports 0-4294967295, bins 0-4294967295 (18446744073709551616 pairs in turn)"
        );
    }

    /// Parses `bench` arguments into a plan, or the usage error's text.
    fn plan(args: &[&str]) -> Result<Plan, String> {
        let cli = super::super::Cli::try_parse_from(["taskgate", "bench"].iter().chain(args))
            .map_err(|error| error.to_string())?;
        let super::super::Command::Bench(bench_args) = cli.command else {
            panic!("not bench");
        };
        Plan::from_args(bench_args).map_err(|error| format!("{error:#}"))
    }

    #[test]
    fn the_defaults_call_the_simulators_autocase_port() {
        let plan = plan(&[]).unwrap();
        assert_eq!(plan.gateway, "http://127.0.0.1:50051");
        assert_eq!(plan.connections, 1);
        assert_eq!(plan.concurrency, 50);
        assert_eq!(plan.window, Window::Duration(Duration::from_secs(10)));
        assert_eq!(plan.warmup, Duration::from_secs(1));
        assert_eq!(plan.targets.call(0), (4, 101337));
        assert_eq!(plan.targets.to_string(), "port 4, bin 101337");
        assert_eq!(plan.grpc_timeout, "5000000u");
        assert!(plan.authorization.is_none());
        assert!(!plan.json);
    }

    #[test]
    fn flags_become_a_plan() {
        let plan = plan(&[
            "--calls",
            "40",
            "--ports",
            "1-2",
            "--bin",
            "7",
            "--timeout",
            "250ms",
            "--token",
            "secret",
            "--json",
        ])
        .unwrap();
        assert_eq!(plan.window, Window::Calls(40));
        assert_eq!(
            plan.targets.to_string(),
            "ports 1-2, bin 7 (2 pairs in turn)"
        );
        assert_eq!(plan.grpc_timeout, "250000u");
        assert_eq!(plan.authorization.unwrap(), "Bearer secret");
        assert!(plan.json);
    }

    #[test]
    fn bad_settings_are_usage_errors_that_name_the_value() {
        let error = |args: &[&str]| plan(args).err().unwrap();
        assert_eq!(
            error(&["--ports", "9-3"]),
            "invalid --ports '9-3': the start 9 is greater than the end 3"
        );
        assert_eq!(
            error(&["--bins", "two"]),
            "invalid --bins 'two': 'two' is not a whole number from 0 to 4294967295; write A-B, \
             for example 1-4"
        );
        assert_eq!(
            error(&["--connections", "4", "--concurrency", "3"]),
            "--concurrency 3 is less than --connections 4: each connection needs at least one \
             call in flight; raise --concurrency or lower --connections"
        );
        assert_eq!(
            error(&["--duration", "0s"]),
            "--duration 0s is out of range 1ms-1day: a run must measure for some time, for \
             example 10s"
        );
        assert_eq!(
            error(&["--timeout", "0s"]),
            "--timeout 0s is out of range 1ms-1h: a call needs some time to be answered, for \
             example 5s"
        );
        // Each of these used to overflow the clock (a panic) or exhaust memory.
        assert_eq!(
            error(&["--warmup", "500000000000y"]),
            "--warmup 500000000000years is out of range 0s-1h: connections and caches are warm \
             long before"
        );
        assert_eq!(
            error(&["--duration", "25h"]),
            "--duration 1day 1h is out of range 1ms-1day: a run that long is a soak test; use \
             --calls or several runs"
        );
        assert!(error(&["--timeout", "2h"]).starts_with("--timeout 2h is out of range 1ms-1h"));
        assert!(
            error(&["--concurrency", "100001", "--connections", "1"])
                .starts_with("--concurrency 100001 is out of range 1-100000")
        );
        assert!(
            error(&["--connections", "10001", "--concurrency", "20000"])
                .starts_with("--connections 10001 is out of range 1-10000")
        );
        assert_eq!(
            error(&["--token", "not\nascii"]),
            "invalid --token: it must be printable ASCII"
        );
        // Issue 20, item 7: these were tried as addresses, and exited 1 as if the gateway were
        // down.
        for gateway in [
            "not a url",
            "notaurl",
            "ftp://127.0.0.1:50051",
            "unix:///run/taskgate.sock",
            "http://",
        ] {
            assert_eq!(
                error(&["--gateway", gateway]),
                format!(
                    "invalid --gateway '{gateway}': it must be http://HOST:PORT or \
                     https://HOST:PORT, for example http://127.0.0.1:50051"
                )
            );
        }
        for conflicting in [
            &["--calls", "5", "--duration", "2s"][..],
            &["--port", "1", "--ports", "1-2"],
            &["--bin", "1", "--bins", "1-2"],
        ] {
            assert!(
                error(conflicting).contains("cannot be used with"),
                "{conflicting:?}"
            );
        }
        // Issue 20, item 9: zero gets the range's message, as any other value out of it does.
        assert_eq!(
            error(&["--calls", "0"]),
            "--calls 0 is out of range 1-18446744073709551615: a run must measure a call"
        );
        assert_eq!(
            error(&["--concurrency", "0"]),
            "--concurrency 0 is out of range 1-100000: a run needs a call in flight"
        );
        assert_eq!(
            error(&["--connections", "0"]),
            "--connections 0 is out of range 1-10000: a run needs a connection"
        );
    }

    /// A tally of `(code, latency in microseconds)` calls.
    fn tally(calls: &[(Code, u64)]) -> Tally {
        let mut tally = Tally::new().unwrap();
        for (code, micros) in calls {
            tally.record(*code, Duration::from_micros(*micros));
        }
        tally
    }

    #[test]
    fn tallies_merge_counts_and_latencies() {
        let mut total = tally(&[(Code::Ok, 1_000), (Code::Unavailable, 3_000)]);
        let other = tally(&[
            (Code::Ok, 2_000),
            (Code::FailedPrecondition, 30_000_000),
            (Code::Unauthenticated, 1),
        ]);
        total.merge(&other).unwrap();
        assert_eq!(total.calls(), 5);
        assert_eq!(
            total.codes().collect::<Vec<_>>(),
            [
                ("OK", 2),
                ("FAILED_PRECONDITION", 1),
                ("UNAVAILABLE", 1),
                ("UNAUTHENTICATED", 1)
            ]
        );
        assert_eq!(total.latency.min(), 1);
        // Three significant digits: the histogram grew to hold 30 s without losing the tail.
        let max = total.latency.max();
        assert!((30_000_000..=30_030_000).contains(&max), "{max}");
    }

    fn report(window: Window, warmup: Duration, tally: Tally) -> Report {
        Report {
            gateway: "http://127.0.0.1:50051".to_owned(),
            connections: 2,
            concurrency: 8,
            window,
            warmup,
            targets: Targets {
                ports: range(4, 4),
                bins: range(101337, 101337),
            },
            measured: Duration::from_millis(2_500),
            interrupted: false,
            tally,
        }
    }

    /// A 10 s run after a 1 s warm-up, of which 2.5 s were measured: 98 calls OK at 1 ms to
    /// 98 ms, two FAILED_PRECONDITION at 150 ms and 2 s.
    fn hundred_calls_report() -> Report {
        let mut calls: Vec<(Code, u64)> = (1..=98).map(|ms| (Code::Ok, ms * 1_000)).collect();
        calls.push((Code::FailedPrecondition, 150_000));
        calls.push((Code::FailedPrecondition, 2_000_000));
        report(
            Window::Duration(Duration::from_secs(10)),
            Duration::from_secs(1),
            tally(&calls),
        )
    }

    #[test]
    fn the_text_report_is_aligned_and_complete() {
        let text = hundred_calls_report().to_text();
        assert_eq!(
            text,
            "taskgate bench: http://127.0.0.1:50051, 2 connection(s), 8 in flight, 10s (after 1s \
             warm-up)\n\
             targets:    port 4, bin 101337\n\
             calls:      100 in 2.50s, 40.0 calls/s\n\
             latency:    mean 70.0ms  p50 50.0ms  p90 90.0ms  p99 150ms  p99.9 2.00s  max 2.00s\n\
             status:     OK 98, FAILED_PRECONDITION 2\n"
        );
    }

    #[test]
    fn a_report_without_calls_says_so() {
        let mut report = report(Window::Calls(40), Duration::ZERO, tally(&[]));
        report.interrupted = true;
        assert_eq!(
            report.to_text(),
            "taskgate bench: http://127.0.0.1:50051, 2 connection(s), 8 in flight, 40 calls (no \
             warm-up)\n\
             targets:    port 4, bin 101337\n\
             calls:      0 in 2.50s, 0.0 calls/s (interrupted)\n\
             latency:    none: no call was measured\n\
             status:     none\n"
        );
        assert_eq!(
            report.to_json().to_string(),
            r#"{"gateway":"http://127.0.0.1:50051","connections":2,"concurrency":8,"calls":0,"duration_s":2.5,"calls_per_s":0.0,"latency_us":null,"codes":{}}"#
        );
    }

    #[test]
    fn the_json_report_keeps_the_schema() {
        let json = hundred_calls_report().to_json();
        assert_eq!(
            json.to_string(),
            r#"{"gateway":"http://127.0.0.1:50051","connections":2,"concurrency":8,"calls":100,"duration_s":2.5,"calls_per_s":40.0,"latency_us":{"mean":70017.2,"p50":50015,"p90":90047,"p99":150015,"p99_9":2000895,"max":2000895},"codes":{"OK":98,"FAILED_PRECONDITION":2}}"#
        );
    }

    #[test]
    fn latencies_read_with_three_significant_digits() {
        assert_eq!(format_micros(0.0), "0us");
        assert_eq!(format_micros(850.4), "850us");
        assert_eq!(format_micros(999.6), "1.00ms");
        assert_eq!(format_micros(9_999.0), "10.0ms");
        assert_eq!(format_micros(99_960.0), "100ms");
        assert_eq!(format_micros(999_700.0), "1.00s");
        assert_eq!(format_micros(4_050.2), "4.05ms");
        assert_eq!(format_micros(12_100.0), "12.1ms");
        assert_eq!(format_micros(123_456.0), "123ms");
        assert_eq!(format_micros(2_345_678.0), "2.35s");
        assert_eq!(format_micros(45_000_000.0), "45.0s");
    }

    #[test]
    fn progress_shows_the_warm_up_then_the_measured_calls() {
        let second = Duration::from_secs(1);
        let duration = Window::Duration(Duration::from_secs(10));
        assert_eq!(
            progress_line(duration, second, Duration::from_millis(400), 0),
            "warm-up: 0.4s of 1s"
        );
        assert_eq!(
            progress_line(duration, second, Duration::from_secs(3), 500),
            "measuring: 500 calls, 250.0 calls/s, 2.0s of 10s"
        );
        assert_eq!(
            progress_line(Window::Calls(40), Duration::ZERO, Duration::ZERO, 0),
            "measuring: 0/40 calls, 0.0 calls/s, 0.0s"
        );
    }
}
