//! The simulated controller's Log Publisher: a TCP listener that streams every case event as an
//! `AC` segment line, as a controller's Log Publisher (port 44001) does (task-interface.md §3.3a).
//!
//! Like the real one it sends readable text, one CRLF-terminated segment per line, and reads
//! nothing but the end of a client's stream: a client that closes its connection frees its slot
//! at once, not at the next event's failed write. A client that stays connected but stops
//! reading is disconnected once it is `CLIENT_BUFFER` events behind, counted while a write to
//! it waits, so it cannot hold its slot either. So that clients learn to skip segments they do
//! not read, a `BD` bin definition (`BD,bin_id,330,AC`: an AutoCase bin, 330 mm) goes out
//! before every extraction's `EREQ`; what a controller really sends around an extraction is not
//! documented, so this is inferred.
//!
//! Events come from the port table's timeline ([`Simulator::take_events`]), the same one
//! `case_getstate` answers from, so a watcher and a reader never disagree.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut as _, Bytes, BytesMut};
use socket2::SockRef;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio::task::JoinSet;

use super::Simulator;
use crate::accept::Acceptor;
use crate::domain::{CaseEvent, CaseSignal, CaseState};
use crate::log_publisher::segment::encode_autocase;
use crate::metrics::ListenerMetrics;

/// How many clients may be connected at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// How many events a client may fall behind (published, and not yet taken by its socket)
/// before it is disconnected, as a real publisher drops a reader that does not keep up rather
/// than buffer without end.
const CLIENT_BUFFER: usize = 4096;

/// The kernel's send buffer for each client. Left to autotuning it grows to megabytes, which a
/// client that stops reading would have the kernel hold for it, and which would hide for
/// a hundred thousand events that the client is behind; this holds a few hundred events.
const CLIENT_SEND_BUFFER: usize = 16 * 1024;

/// Publishes the simulator's case events on `listener` until `shutdown` resolves. Every client
/// connection ends when this returns (or is dropped), as when a controller's Log Publisher stops.
pub async fn serve(
    listener: TcpListener,
    simulator: Simulator,
    shutdown: impl Future<Output = ()>,
) {
    let (lines, _) = broadcast::channel::<Bytes>(CLIENT_BUFFER);
    let mut acceptor = Acceptor::new(
        listener,
        ListenerMetrics::unregistered("simulator_log_publisher"),
    );
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Owned here, so dropping this future closes every client connection with it.
    let mut clients = JoinSet::new();
    let publisher = publish(simulator, lines.clone());
    tokio::pin!(shutdown, publisher);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            () = &mut publisher => break,
            accepted = acceptor.accept() => accepted,
            // Reaps finished clients, so the set does not grow with every connection ever made.
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, limit = MAX_CONNECTIONS, "simulator Log Publisher refused a connection: too many clients");
            continue;
        };
        tracing::info!(%peer, "simulator Log Publisher client connected");
        clients.spawn(feed(stream, peer, lines.subscribe(), slot));
    }
}

/// Takes the port table's events as they happen and sends each as its lines.
async fn publish(simulator: Simulator, lines: broadcast::Sender<Bytes>) {
    loop {
        let (events, next_at) = simulator.take_events();
        for timed in events {
            // No receivers is not an error: events nobody watches are simply not seen.
            let _ = lines.send(segment_lines(&timed.event));
        }
        match next_at {
            Some(at) => tokio::select! {
                () = simulator.changed() => {}
                () = tokio::time::sleep_until(at) => {}
            },
            None => simulator.changed().await,
        }
    }
}

/// The lines one event is published as: its `AC` segment, after a `BD` segment for the bin when
/// an extraction starts.
fn segment_lines(event: &CaseEvent) -> Bytes {
    let mut lines = BytesMut::new();
    if let (CaseSignal::State(CaseState::Ereq), Some(bin_id)) = (event.signal, event.bin_id) {
        lines.put_slice(format!("BD,{bin_id},330,AC\r\n").as_bytes());
    }
    lines.put_slice(encode_autocase(event).as_bytes());
    lines.put_slice(b"\r\n");
    lines.freeze()
}

/// Writes every published line to one client until it goes away or falls too far behind.
async fn feed(
    mut stream: TcpStream,
    peer: SocketAddr,
    mut lines: broadcast::Receiver<Bytes>,
    _slot: OwnedSemaphorePermit,
) {
    if let Err(error) = SockRef::from(&stream).set_send_buffer_size(CLIENT_SEND_BUFFER) {
        tracing::debug!(%peer, cause = %error, "simulator Log Publisher kept the default send buffer");
    }
    let (mut reader, mut writer) = stream.split();
    // Whatever a client sends is read and ignored, so that its end of stream is seen.
    let mut ignored = [0_u8; 512];
    // What is being written, and the events published since, which wait behind it: new events
    // are taken and a client's end is seen while a write waits for its socket.
    let mut writing = Bytes::new();
    let mut behind = VecDeque::new();
    loop {
        tokio::select! {
            received = lines.recv() => match received {
                Ok(line) if writing.is_empty() => writing = line,
                Ok(_) if behind.len() == CLIENT_BUFFER => {
                    tracing::warn!(%peer, behind = CLIENT_BUFFER, "simulator Log Publisher dropped a client that fell behind");
                    return;
                }
                Ok(line) => behind.push_back(line),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(%peer, missed, "simulator Log Publisher dropped a client that fell behind");
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            read = reader.read(&mut ignored) => match read {
                Ok(1..) => {}
                Ok(0) => {
                    tracing::info!(%peer, "simulator Log Publisher client closed its connection");
                    return;
                }
                Err(error) => {
                    tracing::info!(%peer, cause = %error, "simulator Log Publisher client went away");
                    return;
                }
            },
            // One write per poll, which takes from `writing` only what it wrote, so losing the
            // race to another branch loses nothing.
            written = writer.write_buf(&mut writing), if !writing.is_empty() => match written {
                Ok(1..) if writing.is_empty() => writing = behind.pop_front().unwrap_or_default(),
                Ok(1..) => {}
                Ok(0) => {
                    tracing::info!(%peer, "simulator Log Publisher client went away");
                    return;
                }
                Err(error) => {
                    tracing::info!(%peer, cause = %error, "simulator Log Publisher client went away");
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extraction_starts_with_a_bin_definition() {
        let event = |signal| CaseEvent {
            port_id: 4,
            bin_id: Some(101337),
            signal,
        };
        assert_eq!(
            segment_lines(&event(CaseSignal::State(CaseState::Ereq))),
            "BD,101337,330,AC\r\nAC,4,101337,EREQ\r\n"
        );
        assert_eq!(
            segment_lines(&event(CaseSignal::State(CaseState::Erso))),
            "AC,4,101337,ERSO\r\n"
        );
        assert_eq!(
            segment_lines(&event(CaseSignal::CancelRequest)),
            "AC,4,101337,CR\r\n"
        );
    }
}
