//! `bench_rig soak`: the soak behind `scripts/soak` (issue 11, item 5). The gateway runs in front
//! of the fast stand-in while `taskgate bench` drives calls through it in back-to-back windows of
//! `--sample` seconds; after each window the gateway's RSS and open file descriptors are read
//! from /proc and the window's p99 comes from the bench's JSON. It stops after `--calls` calls or
//! `--duration`, whichever comes first, prints the table, draws it (`--plot`), and fails unless:
//!
//! - **RSS does not drift**: the median RSS of the last three samples is less than 5 % above the
//!   median of the first three after the warm-up (`--warmup`);
//! - **p99 stays flat**: the median p99 of the last three windows is at most twice the median of
//!   the first three after the warm-up.
//!
//! Medians of three (fewer when the run has fewer than six windows after the warm-up), because
//! one sample of either wanders with the allocator and the machine: a 30 s run has seen a single
//! RSS sample 4.9 % above the first while the medians differed by 2 %.

use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;
use tokio::time::Instant;

use super::{Length, Options, Target, bench, start_stand_in, usage_error};

/// Calls in flight during the soak, over [`CONNECTIONS`] connections: a steady, moderate load.
const IN_FLIGHT: usize = 64;
const CONNECTIONS: usize = 4;
/// The largest RSS growth after the warm-up that still counts as no drift.
const MAX_RSS_DRIFT: f64 = 0.05;
/// How much higher the late p99 may be than the early one and still count as flat.
const MAX_P99_RATIO: f64 = 2.0;

struct SoakOptions {
    taskgate: PathBuf,
    calls: u64,
    duration: Duration,
    sample: Duration,
    warmup: Duration,
    plot: Option<PathBuf>,
}

/// One window of the soak, and the gateway's state at its end.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Since the soak began, at the end of the window.
    at: Duration,
    /// Calls so far, this window included.
    calls: u64,
    calls_per_s: f64,
    p99_ms: f64,
    rss_kib: u64,
    fds: usize,
}

/// Runs the soak and exits 1 when RSS drifted or p99 rose.
pub(super) fn run(args: &[String]) {
    let options = parse(args);
    let stand_in = start_stand_in(Duration::ZERO);
    let upstream = format!("http://{stand_in}/api/v2/task");
    let gateway = Target::gateway(&options.taskgate, &upstream, None);
    let pid = gateway.child.id();
    let window = Options {
        taskgate: options.taskgate.clone(),
        gateway_bin: options.taskgate.clone(),
        duration: options.sample,
        warmup: Duration::ZERO,
        smoke: false,
        keep_profiles: None,
    };
    let until = match (options.calls, options.duration) {
        (u64::MAX, duration) => humantime::format_duration(duration).to_string(),
        (calls, Duration::MAX) => format!("{calls} calls"),
        (calls, duration) => format!("{calls} calls or {}", humantime::format_duration(duration)),
    };
    println!(
        "soak: until {until}, {IN_FLIGHT} in flight over {CONNECTIONS} connections, a sample \
         every {}, warm-up {}",
        humantime::format_duration(options.sample),
        humantime::format_duration(options.warmup),
    );
    println!("| t (s) | calls | calls/s | p99 (ms) | RSS (MiB) | fds |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut calls = 0;
    while calls < options.calls && started.elapsed() < options.duration {
        let run = bench(&window, &gateway, IN_FLIGHT, CONNECTIONS, Length::Duration);
        calls += run.calls;
        let sample = Sample {
            at: started.elapsed(),
            calls,
            calls_per_s: run.calls_per_s,
            p99_ms: run.p99_us / 1000.0,
            rss_kib: super::proc_status_kib(pid, "VmRSS:"),
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .count(),
        };
        println!(
            "| {:.0} | {} | {:.0} | {:.2} | {:.1} | {} |",
            sample.at.as_secs_f64(),
            sample.calls,
            sample.calls_per_s,
            sample.p99_ms,
            sample.rss_kib as f64 / 1024.0,
            sample.fds
        );
        samples.push(sample);
    }
    gateway.stop();

    let settled: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|sample| sample.at > options.warmup)
        .collect();
    assert!(
        settled.len() >= 2,
        "soak: only {} samples after the warm-up; run longer or sample more often",
        settled.len()
    );
    let edge = (settled.len() / 2).min(3);
    let (early, late) = (&settled[..edge], &settled[settled.len() - edge..]);
    let rss_mib = |sample: &Sample| sample.rss_kib as f64 / 1024.0;
    let early_rss = median(early.iter().map(rss_mib));
    let late_rss = median(late.iter().map(rss_mib));
    let peak_rss = settled.iter().map(rss_mib).fold(0.0, f64::max);
    let drift = (late_rss - early_rss) / early_rss;
    let early_p99 = median(early.iter().map(|sample| sample.p99_ms));
    let late_p99 = median(late.iter().map(|sample| sample.p99_ms));
    let p99_ratio = late_p99 / early_p99;
    println!(
        "\nsoak: {calls} calls in {:.0} s; after the warm-up, medians of {edge} samples: RSS \
         {early_rss:.2} MiB -> {late_rss:.2} MiB (peak {peak_rss:.2}): drift {:+.1} % (limit \
         {:.0} %); p99 {early_p99:.2} ms -> {late_p99:.2} ms: x{p99_ratio:.2} (limit \
         x{MAX_P99_RATIO:.0})",
        started.elapsed().as_secs_f64(),
        drift * 100.0,
        MAX_RSS_DRIFT * 100.0,
    );
    if let Some(plot) = &options.plot {
        draw(&samples, options.warmup, plot);
        println!("soak: plot written to {}", plot.display());
    }
    let drifted = drift >= MAX_RSS_DRIFT;
    let rose = p99_ratio > MAX_P99_RATIO;
    if drifted || rose {
        println!(
            "soak: FAILED:{}{}",
            if drifted { " RSS drifted" } else { "" },
            if rose { " p99 rose" } else { "" }
        );
        std::process::exit(1);
    }
    println!("soak: ok");
}

fn parse(args: &[String]) -> SoakOptions {
    let mut options = SoakOptions {
        taskgate: PathBuf::new(),
        calls: u64::MAX,
        duration: Duration::MAX,
        sample: Duration::from_secs(10),
        warmup: Duration::from_secs(30),
        plot: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage_error(&format!("{arg} needs a value")));
        let duration = || {
            humantime::parse_duration(value).unwrap_or_else(|error| {
                usage_error(&format!("{arg} '{value}' is not a duration: {error}"))
            })
        };
        match arg.as_str() {
            "--taskgate" => options.taskgate = PathBuf::from(value),
            "--calls" => {
                options.calls = value
                    .parse()
                    .unwrap_or_else(|_| usage_error(&format!("--calls '{value}' is not a number")));
            }
            "--duration" => options.duration = duration(),
            "--sample" => options.sample = duration(),
            "--warmup" => options.warmup = duration(),
            "--plot" => options.plot = Some(PathBuf::from(value)),
            other => usage_error(&format!("unknown argument '{other}'")),
        }
    }
    if options.taskgate.as_os_str().is_empty() {
        usage_error("--taskgate is required");
    }
    options
}

/// Reads one measure from a sample, for one panel of the plot.
type Measure = fn(&Sample) -> f64;

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Three panels over time, top to bottom: RSS, p99 and open descriptors, each from zero to its
/// largest value; the warm-up is shaded grey. No text: plotters draws text only with a font
/// library, which is not worth its build time here; docs/soak.md says what the panels show.
fn draw(samples: &[Sample], warmup: Duration, path: &Path) {
    const SIZE: (u32, u32) = (900, 600);
    let mut pixels = vec![0_u8; (SIZE.0 * SIZE.1 * 3) as usize];
    let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let end = samples.last().map_or(1.0, |sample| sample.at.as_secs_f64());
    let series: [(Measure, RGBColor); 3] = [
        (|sample| sample.rss_kib as f64 / 1024.0, BLUE),
        (|sample| sample.p99_ms, RED),
        (|sample| sample.fds as f64, GREEN),
    ];
    for (panel, (value, color)) in root.split_evenly((3, 1)).iter().zip(series) {
        let top = samples.iter().map(value).fold(0.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .margin(8)
            .build_cartesian_2d(0.0..end, 0.0..top.max(f64::MIN_POSITIVE))
            .unwrap();
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, 0.0), (warmup.as_secs_f64().min(end), top)],
                RGBColor(230, 230, 230).filled(),
            )))
            .unwrap();
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, 0.0), (end, 0.0), (end, top), (0.0, top), (0.0, 0.0)],
                BLACK,
            )))
            .unwrap();
        let points = samples
            .iter()
            .map(|sample| (sample.at.as_secs_f64(), value(sample)));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .unwrap();
    }
    root.present().unwrap();
    drop(root);
    let file = std::fs::File::create(path)
        .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&pixels).unwrap();
}
