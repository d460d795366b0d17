//! Criterion benches of the pure work on every call's path: encoding the method call, decoding
//! the reply, and mapping an outcome to the caller's status. Run with `cargo bench`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use taskgate::bench_api;
use taskgate::codec::{Call, Reply, WireFormat};
use taskgate::config::defaults;

fn encode(c: &mut Criterion) {
    let case_extract = Call {
        method: "case_extract",
        params: &[("port_id", 4), ("bin_id", 101337)],
    };
    c.bench_function("encode case_extract", |b| {
        b.iter(|| WireFormat::Xml.encode_call(black_box(&case_extract)))
    });
}

fn decode(c: &mut Criterion) {
    // The replies exactly as the simulator sends them.
    let replies = [
        (
            "success",
            WireFormat::Xml.encode_reply(&Reply::empty_success()),
        ),
        ("fault", WireFormat::Xml.encode_reply(&Reply::Fault(1148))),
    ];
    let mut group = c.benchmark_group("decode");
    for (name, body) in &replies {
        group.bench_function(*name, |b| {
            b.iter(|| WireFormat::Xml.decode_reply(black_box(body), None))
        });
    }
    group.finish();
}

fn status(c: &mut Criterion) {
    let mut group = c.benchmark_group("status");
    group.bench_function("fault 1148", |b| {
        b.iter(|| bench_api::fault_status(black_box(1148)))
    });
    group.bench_function("unknown fault", |b| {
        b.iter(|| bench_api::fault_status(black_box(1005)))
    });
    group.bench_function("upstream timeout", |b| {
        b.iter(|| bench_api::upstream_timeout_status(black_box(defaults::UPSTREAM_TIMEOUT)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: these are for spotting regressions of several percent, not for fine print.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = encode, decode, status
}
criterion_main!(benches);
