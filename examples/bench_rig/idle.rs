//! `bench_rig idle`: what one idle gRPC connection costs the gateway in memory (issue 20, item 6),
//! the figure the default `--max-connections` is sized by.
//!
//! ```text
//! bench_rig idle --taskgate PATH [--connections N] [--rounds N]
//! ```
//!
//! It starts `taskgate serve --simulator` with time limits far beyond the run, opens 100
//! connections to warm it up, reads its RSS, opens `--connections` more (default 2,000), reads
//! the RSS again and prints the difference per connection. Each connection is an HTTP/2 client
//! at rest: it sends the preface and SETTINGS, acknowledges the server's SETTINGS and then says
//! nothing, as a client between calls does. Then it closes them all, waits until the gateway has
//! closed its side (its descriptor count is back) and reads the RSS once more: memory the
//! allocator kept rather than gave back. It does this `--rounds` times (default 4): the first
//! round touches only part of each connection's buffers, later ones reuse freed memory whose
//! pages are then touched in full, so the figure settles at what a connection allocates.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;

use super::{Pipe, proc_status_kib, spawn_until};

/// Connections opened before the first reading, so that what every connection shares
/// (allocator arenas, the runtime's first tasks) is not counted per connection.
const WARM_UP: usize = 100;
/// How long the gateway is given to settle before each reading: it handles the last
/// connections' SETTINGS acknowledgements after they were sent.
const SETTLE: Duration = Duration::from_secs(1);
/// What an HTTP/2 client sends first, then an empty SETTINGS frame.
const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// A SETTINGS frame with the ACK flag.
const SETTINGS_ACK: &[u8] = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00";

pub(super) fn run(args: &[String]) {
    let usage = "usage: bench_rig idle --taskgate PATH [--connections N] [--rounds N]";
    let mut taskgate = None;
    let mut connections: usize = 2_000;
    let mut rounds: usize = 4;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            let text = args
                .next()
                .unwrap_or_else(|| panic!("{arg} needs a value; {usage}"));
            text.clone()
        };
        match arg.as_str() {
            "--taskgate" => taskgate = Some(PathBuf::from(value())),
            "--connections" => connections = count(arg, &value()),
            "--rounds" => rounds = count(arg, &value()),
            other => panic!("unknown argument '{other}'; {usage}"),
        }
    }
    let taskgate = taskgate.unwrap_or_else(|| panic!("--taskgate is required; {usage}"));
    let mut command = Command::new(taskgate);
    command
        .env("RUST_LOG", "info")
        .args(["serve", "--simulator", "--listen", "127.0.0.1:0"])
        .args(["--handshake-timeout", "1h", "--idle-timeout", "1h"])
        .args([
            "--max-connections",
            &(WARM_UP + connections + 1).to_string(),
        ]);
    let (mut gateway, line) = spawn_until(command, Pipe::Stderr, "gateway listening");
    let address = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("address="))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let pid = gateway.id();
    let rss = || {
        std::thread::sleep(SETTLE);
        proc_status_kib(pid, "VmRSS:")
    };
    let descriptors = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let resting_descriptors = descriptors();
    let open =
        |count: usize| -> Vec<TcpStream> { (0..count).map(|_| idle_client(&address)).collect() };
    let close = |clients: Vec<TcpStream>| {
        drop(clients);
        let waited_until = Instant::now() + Duration::from_secs(30);
        while descriptors() > resting_descriptors {
            assert!(
                Instant::now() < waited_until,
                "the gateway did not close its side of the connections"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let warm = open(WARM_UP);
    let before = rss();
    println!(
        "| round | RSS with {WARM_UP} open (KiB) | with {connections} more open | per connection (KiB) | after all closed |"
    );
    println!("|---|---|---|---|---|");
    // Every round after the first opens the warm-up connections again too.
    let mut warm = Some(warm);
    for round in 1..=rounds {
        let mut clients = warm.take().unwrap_or_else(|| open(WARM_UP));
        clients.extend(open(connections));
        let with_open = rss();
        close(clients);
        let after_close = rss();
        let per_connection = with_open.saturating_sub(before) as f64 / connections as f64;
        println!("| {round} | {before} | {with_open} | {per_connection:.1} | {after_close} |");
    }
    gateway.kill().unwrap();
    gateway.wait().unwrap();
}

fn count(flag: &str, text: &str) -> usize {
    text.parse()
        .unwrap_or_else(|_| panic!("{flag} '{text}' is not a count"))
}

/// An HTTP/2 client at rest: preface and SETTINGS sent, the server's SETTINGS read and
/// acknowledged.
fn idle_client(address: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.write_all(PREFACE_AND_SETTINGS).unwrap();
    let mut received = Vec::new();
    while !has_settings(&received) {
        let mut buffer = [0_u8; 256];
        let read = stream.read(&mut buffer).unwrap();
        assert!(
            read > 0,
            "the gateway closed a connection during its handshake"
        );
        received.extend_from_slice(&buffer[..read]);
    }
    stream.write_all(SETTINGS_ACK).unwrap();
    stream
}

/// Whether `bytes`, the start of what the server sent, hold a whole SETTINGS frame without ACK.
fn has_settings(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes.len() < 9 + length {
            return false;
        }
        if bytes[3] == 0x4 && bytes[4] & 0x1 == 0 {
            return true;
        }
        bytes = &bytes[9 + length..];
    }
    false
}
