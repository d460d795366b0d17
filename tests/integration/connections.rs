//! The gRPC port under hostile and careless peers (issue 8): connections that never identify
//! themselves, idle ones, too many of them, too many streams and Watch streams, non-gRPC
//! HTTP/1.1, and shutdown with idle connections and partial requests.

use std::future::Future;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    FakeUpstream, GOAWAY, Gateway, GatewayBuilder, PROMPTLY, SETTINGS_MAX_CONCURRENT_STREAMS,
    Script, assert_grpc_over_http1_gets_400, endpoint, frames, health_watch,
    idle_and_partial_connections, read_until_closed, scrape_at_least, scrape_line,
    served_http2_client, server_settings, setting, silent_http2_client, task_call_head, within,
};

/// A gateway in front of a controller that never answers.
async fn gateway() -> GatewayBuilder {
    Gateway::builder().upstream(&FakeUpstream::start(Script::Hang).await.url)
}

#[tokio::test]
async fn a_connection_that_never_sends_a_whole_preface_is_closed_after_the_handshake_timeout() {
    let gateway = gateway()
        .await
        .config(|config| config.connections.handshake_timeout = Duration::from_millis(200))
        .metrics()
        .start()
        .await;
    let metrics_url = gateway.metrics_url();
    for sent in [
        &b""[..],
        b"P",
        b"PRI * HTTP/2.0\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\n",
    ] {
        let mut stream = TcpStream::connect(gateway.address).await.unwrap();
        stream.write_all(sent).await.unwrap();
        read_until_closed(&mut stream).await;
    }
    scrape_line(
        metrics_url,
        "taskgate_connections_closed_total{listener=\"grpc\",reason=\"handshake_timeout\"} 4",
    )
    .await;
    // A client that identifies itself in time is served as before: bin 0 is refused by the
    // service itself, not by the connection.
    let status = gateway.case_extract(4, 0, None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_and_is_closed_after_the_idle_timeout() {
    let gateway = gateway()
        .await
        .config(|config| config.connections.idle_timeout = Duration::from_millis(200))
        .metrics()
        .start()
        .await;
    let mut stream = silent_http2_client(gateway.address).await;
    let received = read_until_closed(&mut stream).await;
    let types: Vec<u8> = frames(&received).iter().map(|(kind, _)| *kind).collect();
    assert!(types.contains(&GOAWAY), "no GOAWAY among frames {types:?}");
    // The test's own client connection, idle too, may be counted as well.
    scrape_at_least(
        gateway.metrics_url(),
        "taskgate_connections_closed_total{listener=\"grpc\",reason=\"idle\"}",
        1.0,
    )
    .await;
}

/// A client that never reads (an HTTP/2 window of 0) cannot hold its connection with a call
/// whose answer is ready: the answer waits only for the client, so the connection is idle, and
/// is closed at the idle timeout like one with nothing open. Health Check needs no token.
#[tokio::test]
async fn a_client_that_never_takes_its_answer_is_closed_after_the_idle_timeout() {
    // Its headers come; its message never can.
    never_reading_is_closed_for_idle(|never_reads| async move {
        HealthClient::new(never_reads)
            .check(HealthCheckRequest::default())
            .await
    })
    .await;
}

/// The same for reflection, which needs no token either: once its requests have ended, or
/// their time to arrive has run out, its answers are whole, and a client that never reads them
/// does not hold its connection. With many requests, reflection stops reading them once its
/// answers back up, so their end is never seen: the time limit must still come.
#[tokio::test]
async fn a_reflection_client_that_never_reads_is_closed_after_the_idle_timeout() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    for requests in [1, 10] {
        never_reading_is_closed_for_idle(|never_reads| async move {
            let list_services = ServerReflectionRequest {
                message_request: Some(MessageRequest::ListServices(String::new())),
                ..Default::default()
            };
            let requests = futures_util::stream::iter(vec![list_services; requests]);
            let mut answers = ServerReflectionClient::new(never_reads)
                .server_reflection_info(requests)
                .await?
                .into_inner();
            answers.message().await
        })
        .await;
    }
}

/// Makes `call` on a connection whose client never reads (an HTTP/2 window of 0), to a gateway
/// with an idle timeout of 200 ms and a request body time limit of 500 ms (the gRPC port's is
/// `--handshake-timeout`), and checks that the call fails because the gateway closed that
/// connection as idle.
async fn never_reading_is_closed_for_idle<Call, Answer>(call: impl FnOnce(Channel) -> Call)
where
    Call: Future<Output = Result<Answer, tonic::Status>>,
    Answer: std::fmt::Debug,
{
    let gateway = gateway()
        .await
        .config(|config| {
            config.connections.idle_timeout = Duration::from_millis(200);
            config.connections.handshake_timeout = Duration::from_millis(500);
        })
        .metrics()
        .start()
        .await;
    let never_reads = endpoint(format!("http://{}", gateway.address))
        .initial_stream_window_size(0)
        .connect()
        .await
        .unwrap();
    within(PROMPTLY, "the connection was not closed", call(never_reads))
        .await
        .unwrap_err();
    scrape_at_least(
        gateway.metrics_url(),
        "taskgate_connections_closed_total{listener=\"grpc\",reason=\"idle\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn max_concurrent_streams_is_sent_in_the_servers_settings() {
    let gateway = gateway()
        .await
        .config(|config| config.connections.max_concurrent_streams = NonZeroU32::new(7).unwrap())
        .start()
        .await;
    let mut stream = silent_http2_client(gateway.address).await;
    let settings = server_settings(&mut stream).await;
    let max_concurrent_streams = setting(&settings, SETTINGS_MAX_CONCURRENT_STREAMS);
    assert_eq!(max_concurrent_streams, Some(7));
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once_and_counted() {
    let gateway = gateway()
        .await
        .config(|config| config.connections.max_connections = NonZeroUsize::new(2))
        .metrics()
        .start()
        .await;
    let metrics_url = gateway.metrics_url();
    // The gateway's own client holds one connection; one more fills the limit.
    let status = gateway.case_extract(4, 0, None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let second = silent_http2_client(gateway.address).await;
    let mut refused = TcpStream::connect(gateway.address).await.unwrap();
    let received = read_until_closed(&mut refused).await;
    assert!(
        received.is_empty(),
        "a refused connection was answered: {received:?}"
    );
    scrape_line(
        metrics_url,
        "taskgate_connections_refused_total{listener=\"grpc\",reason=\"max_connections\"} 1",
    )
    .await;
    scrape_line(
        metrics_url,
        "taskgate_connections_open{listener=\"grpc\"} 2",
    )
    .await;
    // A closed connection gives its slot back.
    drop(second);
    scrape_line(
        metrics_url,
        "taskgate_connections_open{listener=\"grpc\"} 1",
    )
    .await;
    // A connection in the freed slot is served.
    served_http2_client(gateway.address).await;
}

#[tokio::test]
async fn health_watch_streams_beyond_the_cap_are_refused_and_their_slots_come_back() {
    let gateway = gateway()
        .await
        .config(|config| config.max_health_watches = NonZeroUsize::new(2).unwrap())
        .metrics()
        .start()
        .await;
    let metrics_url = gateway.metrics_url();
    let health = HealthClient::new(gateway.client_channel().await);
    let first = health_watch(&health).await.unwrap();
    let second = health_watch(&health).await.unwrap();
    let status = health_watch(&health).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "2 health Watch streams are already open (--max-health-watches); use Check, or retry once a Watch has closed"
    );
    assert_eq!(
        crate::support::error_info(&status).reason,
        "TOO_MANY_WATCHES"
    );
    // Check is never limited.
    health
        .clone()
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    scrape_line(metrics_url, "taskgate_health_watches_open 2").await;
    scrape_line(metrics_url, "taskgate_health_watches_refused_total 1").await;
    // Closed streams give back their slots, and what they held.
    drop(first);
    drop(second);
    scrape_line(metrics_url, "taskgate_health_watches_open 0").await;
    health_watch(&health).await.unwrap();
}

#[tokio::test]
async fn non_grpc_http1_on_the_grpc_port_is_answered_at_once() {
    let gateway = gateway().await.start().await;
    assert_grpc_over_http1_gets_400(gateway.address, PROMPTLY).await;
}

/// Shutdown with nothing in flight but connections that never close on their own: an idle
/// HTTP/2 client that does not even answer pings, a partial HTTP/1.1 head, and a gRPC-Web
/// request whose body never arrives. None may hold the 60 s grace.
#[tokio::test]
async fn idle_connections_and_partial_requests_do_not_hold_shutdown() {
    let mut gateway = gateway()
        .await
        .config(|config| config.shutdown_grace = Duration::from_secs(60))
        .start()
        .await;
    let mut connections = idle_and_partial_connections(gateway.address).await;

    gateway.begin_shutdown();
    within(
        PROMPTLY,
        "shutdown waited for connections with nothing in flight",
        gateway.join(),
    )
    .await
    .unwrap();
    for stream in &mut connections {
        read_until_closed(stream).await;
    }
}

/// A CaseExtract request on `client`'s connection to `gateway`, its stream left open.
fn case_extract_request(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    gateway: std::net::SocketAddr,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    client
        .send_request(task_call_head(gateway, "CaseExtract"), false)
        .unwrap()
}

/// CaseExtractRequest { port_id: 4, bin_id: 101337 }, without its gRPC prefix.
const CASE_EXTRACT_MESSAGE: &[u8] = &[0x08, 4, 0x10, 0xD9, 0xBD, 0x06];

/// Waits for a call's answer and checks that it ended OK, on a connection the gateway kept.
async fn answered_ok(response: h2::client::ResponseFuture) {
    let response = within(PROMPTLY, "a call was not answered", response)
        .await
        .expect("the gateway kept the connection");
    let mut body = response.into_body();
    while let Some(chunk) = within(PROMPTLY, "a call's answer did not come", body.data()).await {
        let chunk = chunk.expect("the answer arrived whole");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = within(PROMPTLY, "a call's trailers did not come", body.trailers())
        .await
        .expect("the gateway kept the connection")
        .expect("the call ended with trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{trailers:?}");
}

/// An HTTP/2 connection to a gateway in front of a controller that answers every call OK, ready
/// to send requests, and the task driving it.
async fn h2_connection_to_an_ok_gateway() -> (
    Gateway,
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let tcp = TcpStream::connect(gateway.address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let client = within(
        PROMPTLY,
        "the server's settings did not come",
        client.ready(),
    )
    .await
    .unwrap();
    // The fake controller lives as long as its listener task, which the runtime keeps.
    (gateway, client, connection)
}

/// A client may start every call a connection allows at once, each sending its message in small
/// DATA frames before ending its stream, and every call is answered: h2's defence against floods
/// of tiny frames never takes such a client for one (README, "Limits"). All the frames arrive
/// before any call's task has read one, as the gateway runs on this test's one thread.
#[tokio::test]
async fn every_call_a_connection_allows_may_start_at_once_in_small_frames() {
    const CALLS: u32 = 256;
    assert_eq!(
        taskgate::config::defaults::MAX_CONCURRENT_STREAMS.get(),
        CALLS,
        "the default stream limit"
    );
    let (gateway, mut client, connection) = h2_connection_to_an_ok_gateway().await;
    let mut calls = Vec::new();
    for _ in 0..CALLS {
        let (response, mut body) = case_extract_request(&mut client, gateway.address);
        // The gRPC prefix and the message in a DATA frame each, as a client writing them apart
        // sends them, neither ending the stream.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 6]), false)
            .unwrap();
        body.send_data(bytes::Bytes::from_static(CASE_EXTRACT_MESSAGE), false)
            .unwrap();
        calls.push((response, body));
    }
    let mut responses = Vec::new();
    for (response, mut body) in calls {
        body.send_data(bytes::Bytes::new(), true).unwrap();
        responses.push(response);
    }
    for response in responses {
        answered_ok(response).await;
    }
    assert!(
        !connection.is_finished(),
        "the gateway closed the connection"
    );
}

/// Calls that end their stream with an empty DATA frame after another empty one, as some
/// clients and proxies do, keep their connection however many there are: h2 before 0.4.21
/// closed it after the hundredth empty frame that did not end a stream.
#[tokio::test]
async fn calls_ending_with_two_empty_frames_keep_their_connection() {
    let (gateway, mut client, connection) = h2_connection_to_an_ok_gateway().await;
    for _ in 0..150 {
        let (response, mut body) = case_extract_request(&mut client, gateway.address);
        let mut message = vec![0, 0, 0, 0, 6];
        message.extend_from_slice(CASE_EXTRACT_MESSAGE);
        body.send_data(message.into(), false).unwrap();
        body.send_data(bytes::Bytes::new(), false).unwrap();
        body.send_data(bytes::Bytes::new(), true).unwrap();
        answered_ok(response).await;
        client = within(PROMPTLY, "the connection took no new call", client.ready())
            .await
            .expect("the gateway kept the connection");
    }
    assert!(
        !connection.is_finished(),
        "the gateway closed the connection"
    );
}
