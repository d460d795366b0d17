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
//! at rest: it sends the preface and SETTINGS, acknowledges the server's SETTINGS, waits for the
//! answer to a PING and then says nothing, as a client between calls does. Then it closes them
//! all, waits until the gateway has closed its side of each and reads the RSS once more: memory
//! the allocator kept rather than gave back. It does this `--rounds` times (default 4): the
//! first round touches only part of each connection's buffers, later ones reuse freed memory
//! whose pages are then touched in full, so the figure rises towards what a connection
//! allocates.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::Command;

use super::{Pipe, proc_status_kib, spawn_until, usage_error};

/// Connections opened before the first reading, so that what every connection shares
/// (allocator arenas, the runtime's first tasks) is not counted per connection.
const WARM_UP: usize = 100;
/// What an HTTP/2 client sends first, then an empty SETTINGS frame.
const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// A SETTINGS frame with the ACK flag, then a PING: the gateway answers the PING only once it
/// has handled everything before it, so its answer means the connection is at rest.
const SETTINGS_ACK_AND_PING: &[u8] =
    b"\x00\x00\x00\x04\x01\x00\x00\x00\x00\x00\x00\x08\x06\x00\x00\x00\x00\x00idle-rig";
/// HTTP/2 frame types.
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;

pub(super) fn run(args: &[String]) {
    let mut taskgate = None;
    let mut connections: usize = 2_000;
    let mut rounds: usize = 4;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage_error(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--taskgate" => taskgate = Some(PathBuf::from(value())),
            "--connections" => connections = count(arg, value()),
            "--rounds" => rounds = count(arg, value()),
            other => usage_error(&format!("unknown argument '{other}'")),
        }
    }
    let taskgate = taskgate.unwrap_or_else(|| usage_error("--taskgate is required"));
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
    let rss = || proc_status_kib(pid, "VmRSS:");
    let open =
        |count: usize| -> Vec<TcpStream> { (0..count).map(|_| idle_client(&address)).collect() };
    // Each client says it is done and waits for the gateway to close its side, which it does
    // once it has dropped the connection.
    let close = |clients: Vec<TcpStream>| {
        for mut client in clients {
            client.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            // A reset counts as closed too.
            let _ = client.read_to_end(&mut rest);
        }
    };

    // Every round after the first opens the warm-up connections again too.
    let mut warm = Some(open(WARM_UP));
    let before = rss();
    println!(
        "| round | RSS with {WARM_UP} open (KiB) | with {connections} more open | per connection (KiB) | after all closed |"
    );
    println!("|---|---|---|---|---|");
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
        .unwrap_or_else(|_| usage_error(&format!("{flag} '{text}' is not a count")))
}

/// An HTTP/2 client at rest: preface and SETTINGS sent, the server's SETTINGS read and
/// acknowledged, and a PING answered.
fn idle_client(address: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.write_all(PREFACE_AND_SETTINGS).unwrap();
    read_until_frame(&mut stream, SETTINGS, 0);
    stream.write_all(SETTINGS_ACK_AND_PING).unwrap();
    read_until_frame(&mut stream, PING, 0x1);
    stream
}

/// Reads frames until one of type `kind` whose flags are `flags` (0: no ACK, 1: ACK).
fn read_until_frame(stream: &mut TcpStream, kind: u8, flags: u8) {
    loop {
        let mut header = [0_u8; 9];
        stream
            .read_exact(&mut header)
            .expect("the gateway closed a connection during its handshake");
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0_u8; length];
        stream.read_exact(&mut payload).unwrap();
        if header[3] == kind && header[4] & 0x1 == flags {
            return;
        }
    }
}
