//! Issue 8's connection limits, HTTP/1.1 limits, protocol rules and shutdown, shown against the
//! real `taskgate` binary (`serve --simulator`, `simulate`) with its limits given as flags: the
//! in-process tests in `connections`, `http1_limits` and `protocol` call the same code through
//! `serve`, but not the flags, the process or its log. Loopback and ephemeral ports only; the
//! addresses come from the binary's "listening" lines.
//!
//! "Closed after the timeout" is shown by waiting (at most [`PROMPTLY`]) for the close and then
//! checking that at least the limit had passed since the connection was made; "closed at once"
//! by a limit of [`PROMPTLY`] in a process whose time limits are far longer ([`NEVER`]).

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

use taskgate::proto::task_service_client::TaskServiceClient;
use taskgate::proto::{CaseExtractRequest, CaseGetStateRequest, WatchCaseEventsRequest};
use taskgate::simulator::log_publisher;

use crate::cli::{TaskgateProcess, start_simulate};
use crate::support::{
    FakeUpstream, GET_METRICS, GOAWAY, HTTP2_PREFACE_AND_SETTINGS, PROMPTLY,
    SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS, Script,
    assert_grpc_over_http1_gets_400, case_extract_stream, case_extract_with_grpc_timeout, endpoint,
    error_info, frames, health_watch, http_client, idle_and_partial_connections, read_response,
    read_until_closed, scrape_line, served_http2_client, server_settings, setting,
    silent_http2_client, task_call_head, within,
};

/// The limits every `serve` here starts with (a test may change some): short, so that each shows
/// within a second.
const SMALL_LIMITS: [(&str, &str); 9] = [
    ("--handshake-timeout", SHORT),
    ("--idle-timeout", IDLE),
    ("--max-connections", "3"),
    ("--max-concurrent-streams", "4"),
    ("--max-health-watches", "2"),
    ("--metrics-header-read-timeout", SHORT),
    ("--metrics-idle-timeout", IDLE),
    ("--metrics-body-read-timeout", SHORT),
    ("--metrics-max-connections", "2"),
];

/// The handshake, header-read and body-read timeouts.
const SHORT: &str = "300ms";
/// The idle timeouts.
const IDLE: &str = "500ms";

/// For a time limit that must not fire while a test sets up what it is about (connections held
/// to fill a cap, a client that stays until SIGTERM): far beyond any bound a test waits.
const NEVER: &str = "60s";

/// How soon "answered at once" must be: well below the 5 s the gateway used to hold a non-gRPC
/// HTTP/1.1 request before its 400, and far above a loopback answer on a loaded machine.
const AT_ONCE: Duration = Duration::from_secs(2);

/// A running `taskgate serve --simulator` with [`SMALL_LIMITS`] and `/metrics`.
struct Serve {
    process: TaskgateProcess,
    /// The gRPC port, as `host:port`.
    address: String,
    metrics_url: String,
    /// The `/metrics` port, as `host:port`.
    metrics_address: String,
}

impl Serve {
    /// Scrapes `/metrics` until each line of `expected` is there; see [`scrape_line`].
    async fn scrape_lines(&self, expected: &[&str]) {
        for line in expected {
            scrape_line(&self.metrics_url, line).await;
        }
    }

    /// A gRPC connection to the gateway.
    async fn channel(&self) -> Channel {
        endpoint(self.process.gateway.clone())
            .connect()
            .await
            .unwrap()
    }
}

/// Starts `serve --simulator` with [`SMALL_LIMITS`], each flag in `changes` replacing its value
/// there or added, and `/metrics` on an ephemeral port.
async fn serve(changes: &[(&str, &str)]) -> Serve {
    let mut flags = SMALL_LIMITS.to_vec();
    for &(flag, value) in changes {
        match flags.iter_mut().find(|(known, _)| *known == flag) {
            Some(setting) => setting.1 = value,
            None => flags.push((flag, value)),
        }
    }
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend(flags.iter().flat_map(|&(flag, value)| [flag, value]));
    let process = TaskgateProcess::start(&args).await;
    let address = process.gateway.trim_start_matches("http://").to_owned();
    let metrics_url = process.metrics_url();
    let metrics_address = metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    Serve {
        process,
        address,
        metrics_url,
        metrics_address,
    }
}

/// Asserts that at least `limit` (a flag's value, `300ms`) had passed since `since` when the
/// server closed the connection: the limit closed it, not a refusal or an error.
fn assert_closed_after(since: Instant, limit: &str) {
    let waited = since.elapsed();
    let at_least = humantime::parse_duration(limit).unwrap();
    assert!(
        waited >= at_least,
        "closed after {waited:?}, before its limit of {limit}"
    );
}

/// Connects to `address`, sends `sent` and waits for the server to close the connection, which
/// must happen within [`PROMPTLY`] but not before `limit` has passed since connecting (the
/// limits count from accept). Returns what the server sent.
async fn closed_by_limit(address: &str, sent: &[u8], limit: &str) -> Vec<u8> {
    let connected = Instant::now();
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(sent).await.unwrap();
    let received = read_until_closed(&mut stream).await;
    assert_closed_after(connected, limit);
    received
}

/// A connection to the HTTP/1.1 listener at `address` whose `request` was answered with
/// `status` (`HTTP/1.1 200`), so that it holds one of the listener's slots; kept alive.
async fn answered_connection(address: &str, request: &[u8], status: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let response = read_response(&mut stream).await;
    assert!(response.starts_with(status), "{response}");
    stream
}

/// Opens a new connection to `address`, which must be closed at once and unanswered.
async fn assert_refused(address: &str) {
    let mut refused = TcpStream::connect(address).await.unwrap();
    let received = read_until_closed(&mut refused).await;
    assert!(
        received.is_empty(),
        "a refused connection was answered: {received:?}"
    );
}

/// Issue 8, finding 1: a gRPC connection that never sends the HTTP/2 preface, or one byte of it,
/// is closed once `--handshake-timeout` has passed, and counted.
#[tokio::test]
async fn grpc_connections_without_a_preface_are_closed_after_the_handshake_timeout() {
    let serve = serve(&[]).await;
    for sent in [&b""[..], b"P"] {
        closed_by_limit(&serve.address, sent, SHORT).await;
    }
    serve
        .scrape_lines(&[
            "taskgate_connections_closed_total{listener=\"grpc\",reason=\"handshake_timeout\"} 2",
        ])
        .await;
}

/// Issue 8, finding 1: an HTTP/2 connection with no call gets GOAWAY and is closed once
/// `--idle-timeout` has passed, and counted.
#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_after_the_idle_timeout() {
    let serve = serve(&[]).await;
    let received = closed_by_limit(&serve.address, HTTP2_PREFACE_AND_SETTINGS, IDLE).await;
    let types: Vec<u8> = frames(&received).iter().map(|(kind, _)| *kind).collect();
    assert!(types.contains(&GOAWAY), "no GOAWAY among frames {types:?}");
    serve
        .scrape_lines(&["taskgate_connections_closed_total{listener=\"grpc\",reason=\"idle\"} 1"])
        .await;
}

/// Issue 8, finding 1: beyond `--max-connections` a new connection is closed at once, unanswered,
/// and counted. The time limits are [`NEVER`], so nothing else can close it within [`PROMPTLY`].
#[tokio::test]
async fn grpc_connections_beyond_max_connections_are_closed_at_once() {
    let serve = serve(&[("--handshake-timeout", NEVER), ("--idle-timeout", NEVER)]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(served_http2_client(&serve.address).await);
    }
    assert_refused(&serve.address).await;
    serve
        .scrape_lines(&[
            "taskgate_connections_refused_total{listener=\"grpc\",reason=\"max_connections\"} 1",
            "taskgate_connections_open{listener=\"grpc\"} 3",
        ])
        .await;
}

/// Issue 8, finding 3: `--max-concurrent-streams` is in the SETTINGS the server sends, and Watch
/// streams beyond `--max-health-watches` get RESOURCE_EXHAUSTED and are counted. (The idle
/// timeout is [`NEVER`]: the Watch connection is idle until its first Watch.)
#[tokio::test]
async fn streams_per_connection_and_watch_streams_are_limited() {
    let serve = serve(&[("--idle-timeout", NEVER)]).await;
    let mut stream = silent_http2_client(&serve.address).await;
    let settings = server_settings(&mut stream).await;
    assert_eq!(setting(&settings, SETTINGS_MAX_CONCURRENT_STREAMS), Some(4));

    let health = HealthClient::new(serve.channel().await);
    let _first = health_watch(&health).await.unwrap();
    let _second = health_watch(&health).await.unwrap();
    let status = health_watch(&health).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(error_info(&status).reason, "TOO_MANY_WATCHES");
    serve
        .scrape_lines(&[
            "taskgate_health_watches_open 2",
            "taskgate_health_watches_refused_total 1",
        ])
        .await;
}

/// Issue 20, item 6: what a connection can make the gateway hold is bounded. An HTTP/2 client
/// may send 64 KiB (HTTP/2's default window) of request data per stream before the gateway reads
/// it, not hyper's 1 MiB; an HTTP/1.1 head over 16 KiB is answered 431 rather than buffered up
/// to hyper's 400 KiB.
#[tokio::test]
async fn a_connection_can_make_the_gateway_hold_little_memory() {
    let serve = serve(&[]).await;
    let mut stream = silent_http2_client(&serve.address).await;
    let settings = server_settings(&mut stream).await;
    assert_eq!(
        setting(&settings, SETTINGS_INITIAL_WINDOW_SIZE),
        Some(65_535)
    );

    let mut stream = TcpStream::connect(&serve.address).await.unwrap();
    let filler = "a".repeat(20 * 1024);
    let head = format!(
        "POST /taskgate.v1.TaskService/CaseGetState HTTP/1.1\r\nHost: gateway\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Filler: {filler}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let received = read_until_closed(&mut stream).await;
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("HTTP/1.1 431"), "{received}");
}

/// Issue 8, finding 8: an HTTP/1.1 POST of `application/grpc` (which needs HTTP/2) on the gRPC
/// port is answered 400 at once, whether its body has arrived or never will.
#[tokio::test]
async fn grpc_over_http1_is_answered_400_at_once() {
    let serve = serve(&[]).await;
    assert_grpc_over_http1_gets_400(serve.address.as_str(), AT_ONCE).await;
}

/// Issue 20, item 2: a gRPC-Web request whose body stops after one byte is closed once
/// `--handshake-timeout` has passed since its head, and counted; the connections it held are
/// free again, so a new client is served, not refused at `--max-connections` (3, all of them
/// held by these).
#[tokio::test]
async fn grpc_web_bodies_that_never_arrive_are_closed_after_the_handshake_timeout() {
    // Idle [`NEVER`]: only the body's limit may close these connections.
    let serve = serve(&[("--idle-timeout", NEVER)]).await;
    let head = "POST /taskgate.v1.TaskService/CaseGetState HTTP/1.1\r\nHost: gateway\r\n\
                Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\
                Content-Length: 12\r\n\r\n\x00";
    let mut stuck = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(&serve.address).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stuck.push((Instant::now(), stream));
    }
    for (sent, stream) in &mut stuck {
        let received = read_until_closed(stream).await;
        assert_closed_after(*sent, SHORT);
        assert!(
            received.is_empty(),
            "{}",
            String::from_utf8_lossy(&received)
        );
    }
    let mut client = TaskServiceClient::new(serve.channel().await);
    let request = CaseGetStateRequest { port_id: 4 };
    within(
        PROMPTLY,
        "CaseGetState was not answered",
        client.case_get_state(request),
    )
    .await
    .unwrap();
    serve
        .scrape_lines(&[
            "taskgate_connections_closed_total{listener=\"grpc\",reason=\"body_timeout\"} 3",
        ])
        .await;
}

/// Issue 20, item 2 (review): an HTTP/2 call whose request body never ends (a whole
/// CaseGetState message, then no END_STREAM) is ended with DEADLINE_EXCEEDED once
/// `--handshake-timeout` has passed since its head, and counted. Its connection is then idle
/// and closed as any other, so with `--max-connections 1` a new client is served.
#[tokio::test]
async fn an_http2_request_body_that_never_ends_is_ended_after_the_handshake_timeout() {
    let serve = serve(&[("--max-connections", "1")]).await;
    let tcp = TcpStream::connect(&serve.address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = task_call_head(&serve.address, "CaseGetState");
    let sent = Instant::now();
    let (response, mut request_body) = client.send_request(request, false).unwrap();
    // CaseGetStateRequest { port_id: 4 }, whole, and the stream left open.
    let message = bytes::Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 4]);
    request_body.send_data(message, false).unwrap();
    let response = within(PROMPTLY, "the call was not answered", response)
        .await
        .unwrap();
    assert_closed_after(sent, SHORT);
    // An error before any message is trailers only: the status is in the head.
    let status = tonic::Status::from_header_map(response.headers()).unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.message(),
        "the request body did not arrive within 300ms"
    );
    // The client keeps its handles, and so its connection: only the gateway may close it.
    let held = (client, request_body, response);
    // Closed by the gateway with GOAWAY: h2 may report that as an error or as the end.
    let _ = within(PROMPTLY, "the idle connection was not closed", connection)
        .await
        .unwrap();
    drop(held);
    // The gateway frees the slot once it has seen the close.
    serve
        .scrape_lines(&[
            "taskgate_connections_closed_total{listener=\"grpc\",reason=\"idle\"} 1",
            "taskgate_connections_open{listener=\"grpc\"} 0",
        ])
        .await;
    let mut client = TaskServiceClient::new(serve.channel().await);
    let request = CaseGetStateRequest { port_id: 4 };
    within(
        PROMPTLY,
        "CaseGetState was not answered",
        client.case_get_state(request),
    )
    .await
    .unwrap();
    serve
        .scrape_lines(&[
            "taskgate_calls_total{method=\"case_get_state\",code=\"DEADLINE_EXCEEDED\"} 1",
        ])
        .await;
}

/// Issue 20, item 3: WatchCaseEvents naming 500 bad ports is answered INVALID_ARGUMENT in
/// response headers that a client accepting at most 8 KiB of them can read: the first ten
/// violations, then a count of the rest.
#[tokio::test]
async fn many_bad_port_ids_get_a_reply_a_client_with_8_kib_of_headers_can_read() {
    let serve = serve(&[]).await;
    let channel = endpoint(serve.process.gateway.clone())
        .http2_max_header_list_size(8 * 1024)
        .connect()
        .await
        .unwrap();
    let request = WatchCaseEventsRequest {
        port_ids: (2001..2501).collect(),
    };
    let mut client = TaskServiceClient::new(channel);
    let status = within(
        PROMPTLY,
        "WatchCaseEvents was not answered",
        client.watch_case_events(request),
    )
    .await
    .unwrap_err();
    let listed: Vec<String> = (2001..2011)
        .map(|port_id| format!("port_ids {port_id} is out of range 1-2000"))
        .chain(["and 490 more".to_owned()])
        .collect();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            format!("WatchCaseEvents: {}", listed.join("; ")).as_str()
        ),
        "{status:?}"
    );
    let violations = status.get_details_bad_request().unwrap().field_violations;
    let descriptions: Vec<&str> = violations
        .iter()
        .map(|violation| violation.description.as_str())
        .collect();
    assert_eq!(descriptions, listed);
}

/// Issue 20, item 3: a controller reply whose text the message would quote at length (a 60 KB
/// element name) is answered INTERNAL with the name cut short, readable by a client accepting at
/// most 8 KiB of response headers.
#[tokio::test]
async fn a_controller_reply_quoted_in_an_error_is_cut_short() {
    let body = format!("<{0}/>trailing", "r".repeat(60_000));
    let controller = FakeUpstream::start(Script::ok_xml(&body)).await;
    let gateway = TaskgateProcess::start_with_upstream(controller.url.as_str(), &[]).await;
    let channel = endpoint(gateway.gateway.clone())
        .http2_max_header_list_size(8 * 1024)
        .connect()
        .await
        .unwrap();
    let request = CaseGetStateRequest { port_id: 4 };
    let status = within(
        PROMPTLY,
        "CaseGetState was not answered",
        TaskServiceClient::new(channel).case_get_state(request),
    )
    .await
    .unwrap_err();
    let name = format!("{}…", "r".repeat(40));
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::Internal,
            format!(
                "case_getstate port 4: the controller's reply is not a valid response: \
                 unexpected content outside the root element <{name}>"
            )
            .as_str()
        ),
        "{status:?}"
    );
}

/// Issue 8, finding 1, on `/metrics`: a first request head that never completes, a later one on
/// a kept-alive connection, and a body that never comes (408) are each closed once their limit
/// has passed, and counted by reason.
#[tokio::test]
async fn metrics_closes_slow_heads_and_missing_bodies_and_counts_them() {
    let serve = serve(&[]).await;
    let address = &serve.metrics_address;
    closed_by_limit(address, b"GET /metrics HTTP/1.1\r\nHo", SHORT).await;

    let mut later = answered_connection(address, GET_METRICS, "HTTP/1.1 200").await;
    let started = Instant::now();
    later.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    read_until_closed(&mut later).await;
    assert_closed_after(started, SHORT);

    let no_body = b"POST /metrics HTTP/1.1\r\nHost: metrics\r\nContent-Length: 100\r\n\r\nx";
    assert_408(&closed_by_limit(address, no_body, SHORT).await);

    serve
        .scrape_lines(&[
            "taskgate_connections_closed_total{listener=\"metrics\",reason=\"handshake_timeout\"} 1",
            "taskgate_connections_closed_total{listener=\"metrics\",reason=\"header_timeout\"} 1",
            "taskgate_connections_closed_total{listener=\"metrics\",reason=\"body_timeout\"} 1",
        ])
        .await;
}

/// Asserts that `response` is the 408 for a body that missed a body-read timeout of [`SHORT`].
fn assert_408(response: &[u8]) {
    let response = String::from_utf8_lossy(response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    let reason = format!("the request body did not arrive within {SHORT}");
    assert!(response.contains(&reason), "{response}");
}

/// Issue 8, findings 1 and 8, on `/metrics`: beyond `--metrics-max-connections` a new connection
/// is closed at once and counted; a 405 names the allowed methods. The connections that fill the
/// cap read the count and the 405 themselves, so no slot has to come free first.
#[tokio::test]
async fn metrics_closes_connections_beyond_its_cap_at_once_and_its_405_has_allow() {
    let serve = serve(&[
        ("--metrics-header-read-timeout", NEVER),
        ("--metrics-idle-timeout", NEVER),
    ])
    .await;
    let address = &serve.metrics_address;
    let mut first = answered_connection(address, GET_METRICS, "HTTP/1.1 200").await;
    let mut second = answered_connection(address, GET_METRICS, "HTTP/1.1 200").await;
    assert_refused(address).await;

    first.write_all(GET_METRICS).await.unwrap();
    let metrics = read_response(&mut first).await;
    let refusals =
        "taskgate_connections_refused_total{listener=\"metrics\",reason=\"max_connections\"} 1";
    assert!(
        metrics.lines().any(|line| line == refusals),
        "{refusals} missing from:\n{metrics}"
    );

    second
        .write_all(b"POST /metrics HTTP/1.1\r\nHost: metrics\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(&mut second).await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(response.contains("\r\nallow: GET, HEAD\r\n"), "{response}");
}

/// Issue 8, finding 1, on `simulate` with its own flags: a request head that never completes is
/// closed after `--header-read-timeout`; a body that never comes gets 408 after
/// `--body-read-timeout`.
#[tokio::test]
async fn simulate_closes_slow_heads_and_missing_bodies() {
    let (_simulate, url) =
        start_simulate(&["--header-read-timeout", SHORT, "--body-read-timeout", SHORT]).await;
    let address = simulator_address(&url);
    closed_by_limit(&address, b"POST /api/v2/task HTTP/1.1\r\nHo", SHORT).await;
    let no_body = "POST /api/v2/task HTTP/1.1\r\nHost: controller\r\n\
                   Content-Type: application/xml\r\nContent-Length: 100\r\n\r\n<methodcall>";
    assert_408(&closed_by_limit(&address, no_body.as_bytes(), SHORT).await);
}

/// Issue 8, finding 1, on `simulate`: beyond `--max-connections` a new connection is closed at
/// once, and the refusal is logged (the simulator has no metrics).
#[tokio::test]
async fn simulate_closes_connections_beyond_its_cap_at_once_and_logs_it() {
    let (mut simulate, url) = start_simulate(&[
        "--max-connections",
        "2",
        "--header-read-timeout",
        NEVER,
        "--idle-timeout",
        NEVER,
    ])
    .await;
    let address = simulator_address(&url);
    // Answered (a 404 for another path), so each holds a slot.
    let request = b"GET / HTTP/1.1\r\nHost: controller\r\n\r\n";
    let _first = answered_connection(&address, request, "HTTP/1.1 404").await;
    let _second = answered_connection(&address, request, "HTTP/1.1 404").await;
    assert_refused(&address).await;
    let line = within(
        PROMPTLY,
        "the simulator did not log the refusal",
        simulate.wait_for_line("connection refused: the connection limit is reached"),
    )
    .await;
    assert!(line.contains("max_connections=2"), "{line}");
}

/// Issue 20, item 4: clients of `simulate`'s Log Publisher that connect and close free their
/// slots at once, not at the next event: after more of them than it has slots have come and
/// gone, with no case event in between, a new client is admitted and gets the next event.
#[tokio::test]
async fn simulate_log_publisher_frees_the_slots_of_clients_that_closed() {
    let (mut simulate, url) = start_simulate(&["--log-publisher-listen", "127.0.0.1:0"]).await;
    // Logged before the task interface's "listening" line, which `start_simulate` waited for.
    let address = simulate
        .log
        .lines()
        .find(|line| line.contains("simulated Log Publisher listening"))
        .and_then(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("address="))
        })
        .unwrap()
        .to_owned();
    for _ in 0..log_publisher::MAX_CONNECTIONS + 8 {
        let client = TcpStream::connect(&address).await.unwrap();
        simulate
            .wait_for_line("simulator Log Publisher client connected")
            .await;
        drop(client);
        simulate
            .wait_for_line("simulator Log Publisher client closed its connection")
            .await;
    }
    let mut client = TcpStream::connect(&address).await.unwrap();
    simulate
        .wait_for_line("simulator Log Publisher client connected")
        .await;
    let case_extract = "<?xml version=\"1.0\"?><methodcall><name>case_extract</name><params>\
                        <port_id>4</port_id><bin_id>101337</bin_id></params></methodcall>";
    let reply = http_client()
        .post(&url)
        .header("content-type", "application/xml")
        .body(case_extract)
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success(), "{reply:?}");
    let mut received = Vec::new();
    within(PROMPTLY, "no EREQ line reached the new client", async {
        while !String::from_utf8_lossy(&received).contains("AC,4,101337,EREQ\r\n") {
            let mut buffer = [0_u8; 256];
            let read = client.read(&mut buffer).await.unwrap();
            assert_ne!(read, 0, "the new client was closed");
            received.extend_from_slice(&buffer[..read]);
        }
    })
    .await;
}

/// The `host:port` of a simulator's task-interface URL.
fn simulator_address(url: &str) -> String {
    let address = url.trim_start_matches("http://");
    address.split('/').next().unwrap().to_owned()
}

/// Issue 8, finding 8: a malformed `grpc-timeout` gets INVALID_ARGUMENT and a second request
/// message on CaseExtract gets INTERNAL, both before the controller is called; a well-formed
/// call on the same connection still reaches it.
#[tokio::test]
async fn malformed_grpc_timeout_and_a_second_message_are_refused() {
    // The connection is idle between calls; the idle timeout must not end it mid-test.
    let serve = serve(&[("--idle-timeout", NEVER)]).await;
    let channel = serve.channel().await;
    let client = TaskServiceClient::new(channel.clone());

    let status = case_extract_with_grpc_timeout(&client, "1.5S")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(error_info(&status).reason, "MALFORMED_GRPC_TIMEOUT");

    let request = CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    };
    let status = case_extract_stream(channel, vec![request.clone(), request])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(error_info(&status).reason, "TOO_MANY_REQUEST_MESSAGES");

    case_extract_with_grpc_timeout(&client, "5S").await.unwrap();

    serve.process.signal("TERM").await;
    let (code, log) = serve.process.finish().await;
    assert_eq!(code, Some(0), "{log}");
    // The simulator logs each request it answers: only the well-formed call reached it.
    let answered = log
        .lines()
        .filter(|line| line.contains("simulator answered"))
        .count();
    assert_eq!(answered, 1, "{log}");
}

/// Issue 8, finding 6: at SIGTERM an idle HTTP/2 client, a partial HTTP/1.1 head and a gRPC-Web
/// request whose body never arrives are closed at once: the process exits 0 well within a 30 s
/// `--shutdown-grace`, and its log says what it closed and that no call held it.
#[tokio::test]
async fn sigterm_closes_idle_and_partial_connections_without_waiting_for_the_grace() {
    let serve = serve(&[
        ("--handshake-timeout", NEVER),
        ("--idle-timeout", NEVER),
        ("--shutdown-grace", "30s"),
    ])
    .await;
    let mut connections = idle_and_partial_connections(serve.address.as_str()).await;
    // All three are the gateway's connections (the partial head's has no other sign of it).
    serve
        .scrape_lines(&["taskgate_connections_open{listener=\"grpc\"} 3"])
        .await;

    serve.process.signal("TERM").await;
    let (code, log) = within(
        PROMPTLY,
        "taskgate did not exit after SIGTERM (the grace is 30s)",
        serve.process.finish(),
    )
    .await;
    assert_eq!(code, Some(0), "{log}");
    let line = |needle: &str| {
        log.lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{log}"))
    };
    let draining = line("no longer accepting calls");
    assert!(
        draining.contains("calls=0") && draining.contains("streams=0"),
        "{draining}"
    );
    let stopped = line("gateway stopped");
    let closed = |field: &str| -> usize {
        stopped
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(field))
            .unwrap_or_else(|| panic!("no {field} in {stopped}"))
            .parse()
            .unwrap()
    };
    let (idle_count, partial_count) = (closed("closed_idle="), closed("closed_partial="));
    // The HTTP/2 client is idle; the partial first head and the gRPC-Web request whose body
    // never came are partial.
    assert_eq!((idle_count, partial_count), (1, 2), "{stopped}");
    assert!(!log.contains("shutdown grace ran out"), "{log}");
    for stream in &mut connections {
        read_until_closed(stream).await;
    }
}
