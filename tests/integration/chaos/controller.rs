//! The chaos controller: a raw TCP server that does to each request what the plan says for the
//! call its `x-request-id` names, and counts the requests that arrive; a request of the retrying
//! client (`x-request-id` `retry-e{call}` or `retry-c{call}`) goes to the ledger instead.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::SUCCESS;
use super::plan::{Behaviour, Body, Framing, PIECE, Pacing, Plan, Reply, garbage};
use super::retrying::{self, Ledger};
use crate::support::{OpenConnection, read_request};

/// The chaos controller: a raw TCP server that does to each request what the plan says for the
/// request id it carries.
pub(super) struct ChaosController {
    pub(super) url: String,
    /// How many times each planned call's request arrived.
    pub(super) arrivals: Arc<Vec<AtomicU8>>,
    /// What the controller did for the retrying client's logical calls.
    pub(super) ledger: Arc<Ledger>,
    /// Connections open now, on the controller's side.
    pub(super) open: watch::Receiver<usize>,
    /// Bumped to make every connection waiting for its next request close, as a controller
    /// closes idle keep-alive connections.
    pub(super) close_idle: watch::Sender<u64>,
}

impl ChaosController {
    pub(super) async fn start(plan: Arc<Plan>, ledger: Ledger) -> ChaosController {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let arrivals: Arc<Vec<AtomicU8>> =
            Arc::new(plan.calls.iter().map(|_| AtomicU8::new(0)).collect());
        let (open_tx, open) = watch::channel(0);
        let open_tx = Arc::new(open_tx);
        let (close_idle, close_idle_rx) = watch::channel(0);
        let ledger = Arc::new(ledger);
        let (accepted_arrivals, accepted_open) = (arrivals.clone(), open_tx);
        let accepted_ledger = ledger.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let connection = OpenConnection::new(accepted_open.clone());
                tokio::spawn(serve_connection(
                    stream,
                    plan.clone(),
                    accepted_arrivals.clone(),
                    accepted_ledger.clone(),
                    close_idle_rx.clone(),
                    connection,
                ));
            }
        });
        ChaosController {
            url: format!("http://{address}/api/v2/task"),
            arrivals,
            ledger,
            open,
            close_idle,
        }
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    plan: Arc<Plan>,
    arrivals: Arc<Vec<AtomicU8>>,
    ledger: Arc<Ledger>,
    mut close_idle: watch::Receiver<u64>,
    _open: OpenConnection,
) {
    let _ = stream.set_nodelay(true);
    close_idle.mark_unchanged();
    let mut buffer = Vec::new();
    loop {
        let request = tokio::select! {
            request = read_request(&mut stream, &mut buffer) => request,
            _ = close_idle.changed() => return,
        };
        let Some((_, headers, body)) = request else {
            return;
        };
        let retrying = headers
            .get("x-request-id")
            .and_then(|id| retrying::attribute(id));
        if let Some(request) = retrying {
            if ledger.serve(&mut stream, request, &body).await.is_err() {
                return;
            }
            continue;
        }
        let index = headers
            .get("x-request-id")
            .and_then(|id| id.strip_prefix("chaos-"))
            .and_then(|index| index.parse::<usize>().ok());
        let behaviour = match index {
            Some(index) => {
                arrivals[index].fetch_add(1, Ordering::SeqCst);
                plan.calls[index].behaviour.clone()
            }
            // The test's own calls between the runs.
            None => Behaviour::Reply(Reply {
                status: 200,
                body: Body::Success,
                framing: Framing::ContentLength,
                pacing: Pacing::AtOnce,
            }),
        };
        if act(&mut stream, &behaviour).await.is_err() {
            return;
        }
    }
}

/// Answers the request that just arrived with a success reply carrying `body`.
pub(super) async fn send_body(stream: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 Chaos\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await
}

/// Does `behaviour` to the request that just arrived; an error means the connection is done.
pub(super) async fn act(stream: &mut TcpStream, behaviour: &Behaviour) -> std::io::Result<()> {
    let done = Err(std::io::ErrorKind::ConnectionAborted.into());
    match behaviour {
        Behaviour::Reply(reply) => send_reply(stream, reply).await,
        Behaviour::CloseBeforeHead => done,
        Behaviour::ResetBeforeHead => {
            reset(stream);
            done
        }
        Behaviour::ResetAfterHead => {
            let reply = b"HTTP/1.1 200 Chaos\r\nContent-Length: 30\r\n\r\n<response><par";
            stream.write_all(reply).await?;
            stream.flush().await?;
            reset(stream);
            done
        }
        Behaviour::Truncate { framing } => {
            let whole = Reply {
                status: 200,
                body: Body::Success,
                framing: *framing,
                pacing: Pacing::AtOnce,
            };
            let mut bytes = whole.head();
            let body = whole.framed_body();
            bytes.extend_from_slice(&body[..body.len() / 2]);
            stream.write_all(&bytes).await?;
            done
        }
        Behaviour::NotHttp { seed } => {
            stream.write_all(&garbage(*seed)).await?;
            done
        }
        Behaviour::TwoContentLengths => {
            let head = format!(
                "HTTP/1.1 200 Chaos\r\nContent-Length: {}\r\nContent-Length: 5\r\n\r\n",
                SUCCESS.len()
            );
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(SUCCESS).await?;
            done
        }
        Behaviour::Hang => {
            // Returns once the gateway gives up and closes the connection.
            let _ = read_request(stream, &mut Vec::new()).await;
            done
        }
    }
}

async fn send_reply(stream: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    let (head, body) = (reply.head(), reply.framed_body());
    match reply.pacing {
        Pacing::AtOnce => {}
        Pacing::Delay(delay) => tokio::time::sleep(delay).await,
        Pacing::Informational(count) => {
            let interim = ["100 Continue", "102 Processing", "103 Early Hints"];
            let mut flood = String::new();
            for index in 0..count {
                let _ = write!(flood, "HTTP/1.1 {}\r\n\r\n", interim[index % interim.len()]);
            }
            stream.write_all(flood.as_bytes()).await?;
        }
        Pacing::SlowHead(gap) => {
            for piece in head.chunks(PIECE) {
                stream.write_all(piece).await?;
                tokio::time::sleep(gap).await;
            }
            return stream.write_all(&body).await;
        }
        Pacing::Drip(gap) => {
            stream.write_all(&head).await?;
            for piece in body.chunks(PIECE) {
                tokio::time::sleep(gap).await;
                stream.write_all(piece).await?;
            }
            return Ok(());
        }
    }
    stream.write_all(&head).await?;
    stream.write_all(&body).await
}

/// Makes the connection's close a reset (RST) rather than a FIN.
fn reset(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}
