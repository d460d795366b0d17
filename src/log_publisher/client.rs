//! The gateway's Log Publisher client, the I/O edge of this module: one TCP (or TLS) connection
//! whose `AC` segments feed every open watch ([`Watches`]).
//!
//! It reads lines with [`LineSplitter`] and parses them with [`parse_segment`]. Other segments
//! are counted and skipped; a malformed `AC` line or an over-long line is counted and logged at
//! most once a minute, never fatal. When the connection ends or fails, every open watch ends
//! with LOG_PUBLISHER_UNAVAILABLE and the client reconnects after an exponential backoff with
//! jitter, so a restarted controller is not met by every gateway at the same instant.
//!
//! A Log Publisher sends nothing while nothing happens, so silence is not a failure; a peer that
//! vanishes without closing is found by TCP keep-alive.
//!
//! When spans are exported, each connection (attempt) is a span of its own, from the connect to
//! the end of the connection: a reconnect is a new span, marked
//! `taskgate.log_publisher.reconnect`, and one that failed has an error status with the cause.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::lines::{DEFAULT_MAX_LINE_BYTES, LineError, LineSplitter};
use super::segment::{Segment, parse_segment};
use crate::accept::LogEvery;
use crate::config::LogPublisherAddress;
use crate::watch::{ReceivedEvent, Watches};

/// The first pause before reconnecting.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause: a Log Publisher that is back is found at most this late.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A connection that lasted this long was a working one: the next pause starts again from
/// [`FIRST_BACKOFF`]. One that ends sooner (a publisher that accepts and hangs up) backs off.
const STABLE_CONNECTION: Duration = Duration::from_secs(5);
/// How long the TCP connect and the TLS handshake may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive probes find a Log Publisher host that vanished without closing in about 25 s.
const KEEPALIVE_TIME: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// At most one log line a minute about a repeating problem (failed connects, bad lines), with
/// the count of those not logged.
const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Bytes read at a time.
const READ_CHUNK: usize = 8 * 1024;

/// Where and how the client connects.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The Log Publisher's address.
    pub(crate) address: LogPublisherAddress,
    /// The TLS configuration when `address.tls`.
    pub(crate) tls: Option<Arc<ClientConfig>>,
}

/// Keeps the feed connected for as long as the gateway runs; never returns. Cancelled by
/// dropping (aborting) it.
pub(crate) async fn run(target: Target, watches: Watches) {
    let mut backoff = FIRST_BACKOFF;
    let mut failure_log = LogEvery::every(REPEAT_LOG_INTERVAL);
    let mut connected_before = false;
    loop {
        // Held, not entered, for the connection's life: a span of its own, which the log never
        // shows.
        let span = connection_span(&target.address, connected_before);
        let cause = match connect(&target).await {
            Ok(stream) => {
                if connected_before {
                    watches.metrics().publisher_reconnected();
                }
                connected_before = true;
                watches.metrics().publisher_connected(true);
                watches.connected();
                tracing::info!(address = %target.address, "Log Publisher connected; case events are streamed to watchers");
                let started = Instant::now();
                let cause = read(stream, &watches).await;
                watches.metrics().publisher_connected(false);
                if started.elapsed() >= STABLE_CONNECTION {
                    backoff = FIRST_BACKOFF;
                }
                tracing::warn!(address = %target.address, %cause, "Log Publisher connection lost; open watches end with UNAVAILABLE; reconnecting");
                cause
            }
            Err(cause) => {
                watches.metrics().publisher_connect_failed();
                if let Some(suppressed) = failure_log.ready(Instant::now()) {
                    tracing::warn!(address = %target.address, %cause, suppressed, "cannot connect to the Log Publisher; watches are refused until it connects (logged once a minute)");
                }
                cause
            }
        };
        span.record("otel.status_code", "error");
        span.record("otel.status_description", cause.as_str());
        // Ended here, before the pause: the pause is not the connection's.
        drop(span);
        watches.lost(&cause);
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The span of one connection to the Log Publisher, when spans are exported.
fn connection_span(address: &LogPublisherAddress, reconnect: bool) -> tracing::Span {
    if !crate::otel::exporting() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: crate::otel::SPAN_TARGET,
        "log_publisher.connection",
        otel.kind = "client",
        server.address = %address.host,
        server.port = i64::from(address.port),
        taskgate.log_publisher.reconnect = reconnect,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    )
}

/// A connected stream, TLS or not.
trait Connection: AsyncRead + Unpin + Send {}
impl<T: AsyncRead + Unpin + Send> Connection for T {}

async fn connect(target: &Target) -> Result<Box<dyn Connection>, String> {
    let attempt = async {
        let address = &target.address;
        let tcp = TcpStream::connect((address.host.as_str(), address.port))
            .await
            .map_err(|error| format!("cannot connect to {address}: {error}"))?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_TIME)
            .with_interval(KEEPALIVE_INTERVAL);
        if let Err(error) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
            tracing::debug!(cause = %error, "cannot set TCP keep-alive on the Log Publisher connection");
        }
        let Some(tls) = &target.tls else {
            return Ok(Box::new(tcp) as Box<dyn Connection>);
        };
        let server_name = ServerName::try_from(address.host.clone())
            .map_err(|error| format!("'{}' is not a TLS server name: {error}", address.host))?;
        let stream = TlsConnector::from(Arc::clone(tls))
            .connect(server_name, tcp)
            .await
            .map_err(|error| format!("TLS handshake with {address} failed: {error}"))?;
        Ok(Box::new(stream) as Box<dyn Connection>)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "connecting to {} took longer than {}",
                target.address,
                humantime::format_duration(CONNECT_TIMEOUT)
            ))
        })
}

/// Reads lines until the connection ends; returns why it did.
async fn read(mut stream: Box<dyn Connection>, watches: &Watches) -> String {
    let mut splitter = LineSplitter::new(DEFAULT_MAX_LINE_BYTES);
    let mut buffer = BytesMut::with_capacity(READ_CHUNK);
    let mut bad_lines = LogEvery::every(REPEAT_LOG_INTERVAL);
    loop {
        buffer.reserve(READ_CHUNK);
        match stream.read_buf(&mut buffer).await {
            Ok(0) => return "the Log Publisher closed the connection".to_owned(),
            Ok(_) => {}
            Err(error) => return format!("reading from the Log Publisher failed: {error}"),
        }
        let received_at = SystemTime::now();
        while let Some(line) = splitter.next_line(&mut buffer) {
            handle_line(line, received_at, watches, &mut bad_lines);
        }
    }
}

/// Publishes, skips or counts one line.
fn handle_line(
    line: Result<bytes::Bytes, LineError>,
    received_at: SystemTime,
    watches: &Watches,
    bad_lines: &mut LogEvery,
) {
    let metrics = watches.metrics();
    let problem = match line.map(|line| parse_segment(&line)) {
        Ok(Ok(Segment::AutoCase { event, raw })) => {
            metrics.publisher_line("autocase");
            watches.publish(ReceivedEvent {
                event,
                segment: raw,
                received_at,
            });
            return;
        }
        Ok(Ok(Segment::Other { .. })) => {
            metrics.publisher_line("other");
            return;
        }
        Ok(Err(malformed)) => {
            metrics.publisher_line("malformed");
            malformed.to_string()
        }
        Err(too_long) => {
            metrics.publisher_line("too_long");
            too_long.to_string()
        }
    };
    if let Some(suppressed) = bad_lines.ready(Instant::now()) {
        tracing::warn!(%problem, suppressed, "skipped a Log Publisher line (logged once a minute; counted in taskgate_log_publisher_lines_total)");
    }
}

/// `backoff` scaled by a random factor in [0.5, 1), so gateways that lost the same publisher do
/// not all come back at once.
fn jittered(backoff: Duration) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    // Each `RandomState` is seeded afresh: random enough for jitter, without a dependency.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let fraction = 0.5 + (random >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
    backoff.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_all_of_the_backoff() {
        for _ in 0..1000 {
            let pause = jittered(Duration::from_secs(10));
            assert!(
                (Duration::from_secs(5)..Duration::from_secs(10)).contains(&pause),
                "{pause:?}"
            );
        }
    }
}
