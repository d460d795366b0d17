//! What an idempotency entry costs in memory, measured: the README's figures of "at most N bytes
//! each" for `--idempotency-max-entries` (an entry in flight) and of the part in the hash map and
//! the ordered index (an answered entry) are bounds computed from `size_of` and a count of the
//! watch channel's allocation, and this checks them against the process's resident memory,
//! malloc's own overhead included. Its own test binary, so that no other test allocates meanwhile.

use std::num::NonZeroUsize;

use taskgate::bench_api::{idempotency_store_answered, idempotency_store_in_flight};

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

/// The bound the README states for an entry whose call ended, from "(N in the hash map and the
/// ordered index".
fn stated_bytes_per_ended_entry() -> usize {
    let readme = include_str!("../README.md");
    let (before, _) = readme
        .split_once(" in the hash map and the\nordered index")
        .expect("the README states the bytes per ended idempotency entry");
    let number = before.rsplit('(').next().unwrap_or_default();
    number.parse().expect("a number of bytes")
}

/// How many bytes of resident memory each of the `ENTRIES` entries `make` holds took, which are
/// kept until the end of the test so that freed memory is not reused by the next measurement.
fn per_entry<T>(make: impl FnOnce(NonZeroUsize) -> T) -> (usize, T) {
    let before = resident_bytes();
    let store = make(NonZeroUsize::new(ENTRIES).expect("ENTRIES is not 0"));
    let after = resident_bytes();
    (after.saturating_sub(before) / ENTRIES, store)
}

/// Checks `per_entry` bytes of `what` against the `stated` bound.
fn check(what: &str, per_entry: usize, stated: usize) {
    println!("{what}: {per_entry} bytes of resident memory (stated: at most {stated})");
    assert!(
        per_entry <= stated,
        "{what} takes {per_entry} bytes of resident memory, more than the {stated} the README states"
    );
    // Measured, not vacuous: the entries did take memory.
    assert!(
        per_entry > stated / 4,
        "{what}: {per_entry} bytes per entry: nothing was measured"
    );
}

/// One test, measuring in turn and keeping both stores: a second test in this binary would run
/// in parallel, and its allocations would count in this one's resident memory.
#[test]
fn an_entry_takes_no_more_memory_than_the_readme_states() {
    let (answered, _answered_store) = per_entry(idempotency_store_answered);
    let (in_flight, _in_flight_store) = per_entry(idempotency_store_in_flight);
    check(
        "an answered entry",
        answered,
        stated_bytes_per_ended_entry(),
    );
    check("an entry in flight", in_flight, stated_bytes_per_entry());
}
