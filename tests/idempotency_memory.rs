//! What an idempotency entry costs in memory, measured: the README's figure of "at most N bytes
//! each" for `--idempotency-max-entries` is a bound computed from `size_of` and a count of the
//! watch channel's allocation, and this checks it against the process's resident memory, malloc's
//! own overhead included. Its own test binary, so that no other test allocates meanwhile.

use std::num::NonZeroUsize;

use taskgate::bench_api::idempotency_store_in_flight;

/// Enough entries that a page's rounding or the first allocations of the test are lost in the
/// total: about 60 MB at the stated bound.
const ENTRIES: usize = 100_000;

/// The process's resident memory, in bytes, from /proc (Linux, the platform the gateway is
/// tested on).
fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kib: usize = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("VmRSS in kB");
    kib * 1024
}

/// The bound the README states, from "at most N bytes each".
fn stated_bytes_per_entry() -> usize {
    let readme = include_str!("../README.md");
    let (_, after) = readme
        .split_once("are kept, at most ")
        .expect("the README states the bytes per idempotency entry");
    let (number, _) = after
        .split_once(" bytes each")
        .expect("the README states the bytes per idempotency entry");
    number.parse().expect("a number of bytes")
}

#[test]
fn an_entry_in_flight_takes_no_more_memory_than_the_readme_states() {
    let stated = stated_bytes_per_entry();
    let before = resident_bytes();
    let store = idempotency_store_in_flight(NonZeroUsize::new(ENTRIES).unwrap());
    let after = resident_bytes();
    let per_entry = after.saturating_sub(before) / ENTRIES;
    println!("an entry in flight: {per_entry} bytes of resident memory (stated: at most {stated})");
    assert!(
        per_entry <= stated,
        "an entry in flight takes {per_entry} bytes of resident memory, more than the {stated} the README states"
    );
    // Measured, not vacuous: the entries did take memory.
    assert!(
        per_entry > stated / 4,
        "{per_entry} bytes per entry: nothing was measured"
    );
    drop(store);
}
