//! The HTTP/1.1 listeners (`/metrics` and the simulator) under slow and greedy peers (issue 8):
//! header-read, idle and body-read timeouts, the connection cap, and the 405's `Allow`.

use std::num::NonZeroUsize;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use taskgate::config::{Http1Limits, defaults};
use taskgate::simulator::{self, Simulator, layout::Layout};

use crate::support::{
    FakeUpstream, GET_METRICS, Gateway, Script, http_client, read_response, read_until_closed,
    scrape_line,
};

const SHORT: Duration = Duration::from_millis(200);

/// A gateway whose metrics endpoint has `limits`; returns its metrics URL and address.
async fn metrics_endpoint(limits: Http1Limits) -> (Gateway, String, String) {
    let gateway = Gateway::builder()
        .upstream(&FakeUpstream::start(Script::Hang).await.url)
        .config(move |config| config.metrics_limits = limits)
        .metrics()
        .start()
        .await;
    let metrics_url = gateway.metrics_url().to_owned();
    let address = metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    (gateway, metrics_url, address)
}

/// A simulator with `limits`; returns its address.
async fn simulator_with(limits: Http1Limits) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(simulator::http::serve(
        listener,
        Simulator::new(&Layout::default_layout()),
        limits,
        std::future::pending(),
    ));
    address
}

fn limits() -> Http1Limits {
    Http1Limits::with_max_connections(defaults::METRICS_MAX_CONNECTIONS)
}

#[tokio::test]
async fn request_heads_that_never_complete_are_closed_after_the_header_read_timeout() {
    let (_gateway, metrics_url, address) = metrics_endpoint(Http1Limits {
        header_read_timeout: SHORT,
        ..limits()
    })
    .await;
    // The first head (a new connection trickling bytes).
    let mut first = TcpStream::connect(&address).await.unwrap();
    first
        .write_all(b"GET /metrics HTTP/1.1\r\nHo")
        .await
        .unwrap();
    read_until_closed(&mut first).await;
    // A later head on a kept-alive connection.
    let mut later = TcpStream::connect(&address).await.unwrap();
    later.write_all(GET_METRICS).await.unwrap();
    assert!(read_response(&mut later).await.starts_with("HTTP/1.1 200"));
    later.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    read_until_closed(&mut later).await;
    scrape_line(
        &metrics_url,
        "taskgate_connections_closed_total{listener=\"metrics\",reason=\"handshake_timeout\"} 1",
    )
    .await;
    scrape_line(
        &metrics_url,
        "taskgate_connections_closed_total{listener=\"metrics\",reason=\"header_timeout\"} 1",
    )
    .await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let (_gateway, metrics_url, address) = metrics_endpoint(Http1Limits {
        idle_timeout: SHORT,
        ..limits()
    })
    .await;
    let mut stream = TcpStream::connect(&address).await.unwrap();
    stream.write_all(GET_METRICS).await.unwrap();
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    read_until_closed(&mut stream).await;
    scrape_line(
        &metrics_url,
        "taskgate_connections_closed_total{listener=\"metrics\",reason=\"idle\"} 1",
    )
    .await;
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408_and_the_connection_is_closed() {
    let address = simulator_with(Http1Limits {
        body_read_timeout: SHORT,
        ..limits()
    })
    .await;
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let head = "POST /api/v2/task HTTP/1.1\r\nHost: controller\r\n\
                Content-Type: application/xml\r\nContent-Length: 100\r\n\r\n<methodcall>";
    stream.write_all(head.as_bytes()).await.unwrap();
    let response = String::from_utf8(read_until_closed(&mut stream).await).unwrap();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response.contains("the request body did not arrive within 200ms"),
        "{response}"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let address = simulator_with(Http1Limits::with_max_connections(NonZeroUsize::MIN)).await;
    let _held = TcpStream::connect(&address).await.unwrap();
    let mut refused = TcpStream::connect(&address).await.unwrap();
    assert!(read_until_closed(&mut refused).await.is_empty());

    let (_gateway, metrics_url, address) =
        metrics_endpoint(Http1Limits::with_max_connections(NonZeroUsize::MIN)).await;
    let held = TcpStream::connect(&address).await.unwrap();
    let mut refused = TcpStream::connect(&address).await.unwrap();
    assert!(read_until_closed(&mut refused).await.is_empty());
    // Once the held connection is gone, its slot serves the scrape that shows the refusal.
    drop(held);
    scrape_line(
        &metrics_url,
        "taskgate_connections_refused_total{listener=\"metrics\",reason=\"max_connections\"} 1",
    )
    .await;
}

#[tokio::test]
async fn the_metrics_405_names_the_allowed_methods() {
    let (_gateway, metrics_url, _) = metrics_endpoint(limits()).await;
    let response = http_client().post(&metrics_url).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, HEAD");
}
