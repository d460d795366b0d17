//! WatchCaseEvents end to end (issue 10): the simulator's Log Publisher for the AutoCase flows
//! (extraction, cancel, a publisher that goes away and comes back), and a scripted publisher for
//! what the simulator never sends (garbage, over-long lines, a flood for 1,000 watchers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::codec::Streaming;
use tonic::transport::Endpoint;
use url::Url;

use taskgate::config::{Http1Limits, defaults, parse_upstream_url};
use taskgate::proto::case_event::Change;
use taskgate::proto::task_service_client::TaskServiceClient;
use taskgate::proto::{CaseEvent, CaseState, WatchCaseEventsRequest};
use taskgate::simulator::{self, Simulator, layout::Layout};

use crate::support::{
    Gateway, GatewayBuilder, PROMPTLY, error_info, scrape_at_least, scrape_line, task_call_head,
    within,
};

/// The simulated controller: its task interface, and its Log Publisher, which a test may stop
/// and start again on the same address.
struct SimulatedController {
    url: Url,
    simulator: Simulator,
    log_publisher: SocketAddr,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl SimulatedController {
    /// The default layout (port 4: AutoCase, OPEN, bin 101337 selected), each state lasting
    /// `step_time`.
    async fn start(step_time: Duration) -> Self {
        let layout = Layout {
            step_time,
            ..Layout::default_layout()
        };
        let simulator = Simulator::new(&layout);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(simulator::http::serve(
            listener,
            simulator.clone(),
            Http1Limits::with_max_connections(defaults::SIMULATOR_MAX_CONNECTIONS),
            std::future::pending(),
        ));
        let log_publisher = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut controller = SimulatedController {
            url: parse_upstream_url(&format!("http://{address}{}", simulator::http::TASK_PATH))
                .unwrap(),
            simulator,
            log_publisher: log_publisher.local_addr().unwrap(),
            running: None,
        };
        controller.publish_on(log_publisher);
        controller
    }

    fn publish_on(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(simulator::log_publisher::serve(
            listener,
            self.simulator.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        self.running = Some((stop, task));
    }

    /// Stops the Log Publisher: its listener and every connection close.
    async fn stop_log_publisher(&mut self) {
        let (stop, task) = self
            .running
            .take()
            .expect("the Log Publisher is not running");
        stop.send(()).unwrap();
        within(PROMPTLY, "the Log Publisher did not stop", task)
            .await
            .unwrap();
    }

    /// Starts the Log Publisher again, on the address it had.
    async fn restart_log_publisher(&mut self) {
        let listener = TcpListener::bind(self.log_publisher).await.unwrap();
        self.publish_on(listener);
    }

    async fn gateway(&self) -> Gateway {
        Gateway::builder()
            .upstream(&self.url)
            .log_publisher(self.log_publisher)
            .metrics()
            .start()
            .await
    }
}

/// Opens a watch of `port_ids` once the gateway's feed is connected: until then a watch is
/// refused with UNAVAILABLE, which is retried for at most [`PROMPTLY`].
pub(crate) async fn watch(
    client: &TaskServiceClient<tonic::transport::Channel>,
    port_ids: &[u32],
) -> Streaming<CaseEvent> {
    within(PROMPTLY, "the feed did not connect", async {
        loop {
            let request = WatchCaseEventsRequest {
                port_ids: port_ids.to_vec(),
            };
            match client.clone().watch_case_events(request).await {
                Ok(response) => return response.into_inner(),
                Err(status) if status.code() == Code::Unavailable => {
                    assert_eq!(error_info(&status).reason, "LOG_PUBLISHER_UNAVAILABLE");
                    tokio::task::yield_now().await;
                }
                Err(status) => panic!("the watch was refused: {status:?}"),
            }
        }
    })
    .await
}

/// The next event, which must come within [`PROMPTLY`].
pub(crate) async fn next_event(events: &mut Streaming<CaseEvent>) -> CaseEvent {
    within(PROMPTLY, "no event", events.message())
        .await
        .unwrap()
        .expect("the stream ended")
}

/// How the stream ends, which must be within `limit`.
async fn end_of(events: &mut Streaming<CaseEvent>, limit: Duration) -> tonic::Status {
    within(limit, "the stream did not end", async {
        loop {
            match events.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without an error"),
                Err(status) => return status,
            }
        }
    })
    .await
}

fn state(state: CaseState) -> Option<Change> {
    Some(Change::State(state as i32))
}

#[tokio::test]
async fn an_extraction_is_watched_from_request_to_completion() {
    let controller = SimulatedController::start(Duration::from_millis(50)).await;
    let gateway = controller.gateway().await;
    let mut events = watch(&gateway.client, &[4]).await;
    let before = SystemTime::now();
    gateway.case_extract(4, 101337, None).await.unwrap();
    for (expected, code) in [
        (CaseState::ExtractionRequested, "EREQ"),
        (CaseState::ExtractionReadyToSend, "ERSO"),
        (CaseState::ExtractionCompleted, "ECMP"),
    ] {
        let event = next_event(&mut events).await;
        assert_eq!(event.port_id, 4);
        assert_eq!(event.bin_id, Some(101337));
        assert_eq!(event.change, state(expected));
        assert_eq!(event.raw_state, code);
        assert_eq!(event.segment, format!("AC,4,101337,{code}"));
        let received_at = SystemTime::try_from(event.received_at.unwrap()).unwrap();
        assert!(received_at >= before, "{received_at:?} before {before:?}");
    }
    let read = gateway.case_get_state(4).await.unwrap();
    assert_eq!(read.state, CaseState::ExtractionCompleted as i32);
    scrape_line(
        gateway.metrics_url(),
        "taskgate_case_events_total{state=\"ECMP\"} 1",
    )
    .await;
    scrape_line(gateway.metrics_url(), "taskgate_case_watches_open 1").await;
}

#[tokio::test]
async fn a_cancel_is_watched_as_cr_then_noop_and_case_get_state_agrees() {
    // Long steps: the cancel comes while the extraction is still requested.
    let controller = SimulatedController::start(Duration::from_secs(60)).await;
    let gateway = controller.gateway().await;
    let mut events = watch(&gateway.client, &[]).await;
    gateway.case_extract(4, 101337, None).await.unwrap();
    let requested = next_event(&mut events).await;
    assert_eq!(requested.change, state(CaseState::ExtractionRequested));
    gateway.case_cancel(4, 101337).await.unwrap();
    let cancel = next_event(&mut events).await;
    assert_eq!(
        (
            cancel.change,
            cancel.raw_state.as_str(),
            cancel.segment.as_str()
        ),
        (Some(Change::CancelRequest(true)), "CR", "AC,4,101337,CR")
    );
    let noop = next_event(&mut events).await;
    assert_eq!(
        (noop.change, noop.bin_id, noop.segment.as_str()),
        (
            state(CaseState::NoOperation),
            Some(101337),
            "AC,4,101337,NOOP"
        )
    );
    let read = gateway.case_get_state(4).await.unwrap();
    assert_eq!(
        (read.state, read.bin_id, read.raw_state.as_str()),
        (CaseState::NoOperation as i32, Some(101337), "NOOP")
    );
}

#[tokio::test]
async fn a_lost_publisher_ends_every_watch_within_a_second_and_watches_resume_after_it_returns() {
    let mut controller = SimulatedController::start(Duration::from_millis(50)).await;
    let gateway = controller.gateway().await;
    let mut port_4 = watch(&gateway.client, &[4]).await;
    let mut every_port = watch(&gateway.client, &[]).await;
    controller.stop_log_publisher().await;
    for events in [&mut port_4, &mut every_port] {
        let status = end_of(events, Duration::from_secs(1)).await;
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let info = error_info(&status);
        assert_eq!(info.reason, "LOG_PUBLISHER_UNAVAILABLE");
        assert_eq!(info.domain, "taskgate");
        assert_eq!(info.metadata["method"], "WatchCaseEvents");
        assert_eq!(
            info.metadata["logPublisher"],
            controller.log_publisher.to_string()
        );
        assert_eq!(
            status.message(),
            format!(
                "WatchCaseEvents: the Log Publisher at {} is not connected (the Log Publisher \
                 closed the connection); events may have been missed: watch again, then read \
                 the state with CaseGetState",
                controller.log_publisher
            )
        );
    }
    scrape_line(gateway.metrics_url(), "taskgate_log_publisher_connected 0").await;
    scrape_at_least(
        gateway.metrics_url(),
        "taskgate_calls_total{method=\"watch_case_events\",code=\"UNAVAILABLE\"}",
        2.0,
    )
    .await;
    // Task calls do not depend on the Log Publisher.
    gateway.case_extract(4, 101337, None).await.unwrap();

    controller.restart_log_publisher().await;
    let mut resumed = within(
        Duration::from_secs(15),
        "no watch after the publisher came back",
        watch(&gateway.client, &[4]),
    )
    .await;
    scrape_at_least(
        gateway.metrics_url(),
        "taskgate_log_publisher_reconnects_total",
        1.0,
    )
    .await;
    // The first extraction has completed; a new one is watched from its start.
    within(PROMPTLY, "the port stayed busy", async {
        while gateway.case_extract(4, 101337, None).await.is_err() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // The simulator may first publish the end of the extraction made while it was away.
    within(PROMPTLY, "the new extraction was not seen", async {
        while next_event(&mut resumed).await.change != state(CaseState::ExtractionRequested) {}
    })
    .await;
}

/// A gateway (with metrics, as `build` adds to it) whose Log Publisher is the test: its
/// connection, to write lines into.
async fn with_scripted_publisher(
    build: impl FnOnce(GatewayBuilder) -> GatewayBuilder,
) -> (Gateway, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let builder = Gateway::builder()
        .log_publisher(listener.local_addr().unwrap())
        .metrics();
    let gateway = build(builder).start().await;
    let (publisher, _) = within(PROMPTLY, "the gateway did not connect", listener.accept())
        .await
        .unwrap();
    (gateway, publisher)
}

#[tokio::test]
async fn garbage_malformed_and_over_long_lines_are_skipped_and_counted() {
    let (gateway, mut publisher) = with_scripted_publisher(|config| config).await;
    let mut events = watch(&gateway.client, &[]).await;
    let mut script = Vec::new();
    script.extend_from_slice(b"garbage\r\n\xff\xfe\x00binary\r\n\r\nBD,101337,330,AC\r\n");
    script.extend_from_slice(b"AC,4,101337\r\nAC,9999,1,EREQ\r\nAC,4,101337,XXXX\r\n");
    script.extend_from_slice(&[b'A'; 5000]);
    script.extend_from_slice(b"\r\nAC,4,101337,EREQ\r\n");
    // Dripped a few bytes at a time: lines are whole however the bytes arrive.
    for chunk in script.chunks(7) {
        publisher.write_all(chunk).await.unwrap();
    }
    let event = next_event(&mut events).await;
    assert_eq!(event.segment, "AC,4,101337,EREQ");
    let metrics_url = gateway.metrics_url();
    for (kind, count) in [
        ("autocase", 1),
        ("other", 4),
        ("malformed", 3),
        ("too_long", 1),
    ] {
        scrape_line(
            metrics_url,
            &format!("taskgate_log_publisher_lines_total{{kind=\"{kind}\"}} {count}"),
        )
        .await;
    }
    // The connection survived all of it.
    publisher.write_all(b"AC,4,101337,ERSO\r\n").await.unwrap();
    assert_eq!(next_event(&mut events).await.raw_state, "ERSO");
    scrape_line(metrics_url, "taskgate_log_publisher_connected 1").await;
}

/// 1,000 watchers on four connections all see every event in order while a watcher that never
/// reads is cut off: the feed never waits for it. Events go out in batches, each once every
/// watcher has the one before, so a fast watcher is never more than a batch behind.
#[tokio::test]
async fn a_thousand_watchers_see_every_event_and_one_that_never_reads_is_cut_off() {
    const WATCHERS: usize = 1000;
    const CONNECTIONS: usize = 4;
    const BATCHES: u32 = 8;
    const BATCH: u32 = 20;
    const BUFFER: usize = 64;
    let (gateway, mut publisher) = with_scripted_publisher(|builder| {
        builder.config(|config| config.watches.buffer = BUFFER.try_into().unwrap())
    })
    .await;
    // A window of 1 KiB, which the never-reading watcher never opens again: the gateway can
    // then send it only a few events before they pile up in its buffer.
    let mut never_reads = watch_through_a_small_window(&gateway).await;
    let received = Arc::new(Semaphore::new(0));
    let mut watchers = Vec::with_capacity(WATCHERS);
    for connection in 0..CONNECTIONS {
        let client = TaskServiceClient::new(gateway.client_channel().await);
        for _ in 0..WATCHERS / CONNECTIONS {
            let mut events = watch(&client, &[]).await;
            let received = Arc::clone(&received);
            watchers.push(tokio::spawn(async move {
                let mut bins = Vec::new();
                while bins.len() < (BATCHES * BATCH) as usize {
                    let event = events.message().await.unwrap().unwrap();
                    bins.push(event.bin_id.unwrap());
                    received.add_permits(1);
                }
                (connection, bins)
            }));
        }
    }
    let mut bin_id = 0;
    for batch in 0..BATCHES {
        let mut lines = String::new();
        for _ in 0..BATCH {
            bin_id += 1;
            lines.push_str(&format!("AC,4,{bin_id},EREQ\r\n"));
        }
        publisher.write_all(lines.as_bytes()).await.unwrap();
        let batch_permits = u32::try_from(WATCHERS).unwrap() * BATCH;
        within(
            Duration::from_secs(60),
            &format!("batch {batch} did not reach every watcher"),
            received.acquire_many(batch_permits),
        )
        .await
        .unwrap()
        .forget();
    }
    let expected: Vec<u32> = (1..=BATCHES * BATCH).collect();
    for watcher in watchers {
        let (connection, bins) = watcher.await.unwrap();
        assert_eq!(bins, expected, "a watcher on connection {connection}");
    }
    // The watcher that never read fell a buffer behind while the gateway held events it had no
    // window to send (its buffer grows only while nothing takes from it), so its end could not
    // go out: its stream was reset once it had made no headway for a moment, which freed its
    // slot. Once every watch has closed, it reads what was on its way, then the reset.
    scrape_line(gateway.metrics_url(), "taskgate_case_watches_open 0").await;
    let status = end_of(&mut never_reads, PROMPTLY).await;
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    scrape_line(
        gateway.metrics_url(),
        "taskgate_case_watches_lagged_total 1",
    )
    .await;
}

/// Writes `count` AutoCase lines for port 4 in one write (some 15 bytes a line). The gateway
/// publishes the events of each read (up to 8 KiB) without yielding, and, the test's runtime
/// having one thread, no watch's stream runs between them: a few hundred lines come over
/// loopback in one read, so a watcher whose buffer is smaller than that falls a buffer behind
/// however fast its client reads. Were they read in pieces smaller than the buffer, the watcher
/// could keep up, and a test that expects it to lag would fail, never pass wrongly.
async fn flood_port_4(publisher: &mut TcpStream, count: u32) {
    let lines: String = (1..=count)
        .map(|bin_id| format!("AC,4,{bin_id},EREQ\r\n"))
        .collect();
    publisher.write_all(lines.as_bytes()).await.unwrap();
}

/// Issue 20, item 8: a flood of one port's events ends a watcher of every port that cannot keep
/// up with WATCH_LAGGED, and never a watcher of another port, however far behind the flood
/// leaves it.
#[tokio::test]
async fn a_flood_of_one_port_ends_a_watcher_of_every_port_but_not_one_of_a_quiet_port() {
    let (gateway, mut publisher) = with_scripted_publisher(|builder| {
        builder.config(|config| config.watches.buffer = 16.try_into().unwrap())
    })
    .await;
    let mut every_port = watch(&gateway.client, &[]).await;
    let mut quiet_port = watch(&gateway.client, &[5]).await;
    flood_port_4(&mut publisher, 20 * 16).await;
    let status = end_of(&mut every_port, PROMPTLY).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(error_info(&status).reason, "WATCH_LAGGED");
    assert_eq!(
        status.message(),
        "WatchCaseEvents: the stream fell more than 16 events behind (--watch-buffer) and was \
         ended; events were missed: watch again, then read the state with CaseGetState"
    );
    publisher.write_all(b"AC,5,7,ERSO\r\n").await.unwrap();
    assert_eq!(next_event(&mut quiet_port).await.segment, "AC,5,7,ERSO");
    scrape_line(
        gateway.metrics_url(),
        "taskgate_case_watches_lagged_total 1",
    )
    .await;
}

/// Opens a watch of every port over raw HTTP/2 whose stream window is `window` bytes and is
/// never opened again, once the gateway's feed is connected: it sees bytes arrive, but takes no
/// more than the window, as a client that has stopped reading.
async fn watch_with_a_window_never_opened(address: SocketAddr, window: u32) -> h2::RecvStream {
    let tcp = TcpStream::connect(address).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    within(PROMPTLY, "the feed did not connect", async {
        loop {
            let request = task_call_head(address, "WatchCaseEvents");
            let mut client = client.clone().ready().await.unwrap();
            let (response, mut request_body) = client.send_request(request, false).unwrap();
            // An empty WatchCaseEventsRequest: every port.
            let message = bytes::Bytes::from_static(&[0, 0, 0, 0, 0]);
            request_body.send_data(message, true).unwrap();
            let response = response.await.unwrap();
            // A refusal is trailers only: grpc-status in the head.
            match response.headers().get("grpc-message") {
                None => return response.into_body(),
                Some(message) => assert!(
                    message.to_str().unwrap().contains("not connected"),
                    "{message:?}"
                ),
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// Issue 20, item 1: a watcher that has stopped reading (its window full, so nothing polls its
/// stream) is reset once it falls a buffer behind, and its `--max-watches` slot is free again.
#[tokio::test]
async fn a_watcher_that_never_reads_is_reset_a_buffer_behind_and_its_slot_is_freed() {
    const WINDOW: usize = 256;
    let (gateway, mut publisher) = with_scripted_publisher(|builder| {
        builder.config(|config| {
            config.watches.buffer = 16.try_into().unwrap();
            config.watches.max_watches = 1.try_into().unwrap();
        })
    })
    .await;
    let mut never_reads = watch_with_a_window_never_opened(gateway.address, WINDOW as u32).await;
    // Fewer events than the buffer, more bytes than the window: the window is full.
    flood_port_4(&mut publisher, 8).await;
    let mut received = 0;
    within(PROMPTLY, "the window was not filled", async {
        while received < WINDOW {
            received += never_reads.data().await.unwrap().unwrap().len();
        }
    })
    .await;
    // Two more. hyper asks a body for its next chunk before it waits for room to send it (hyper
    // 1.12's `PipeToSendStream`), so the stream, idle on its empty buffer, takes these two and
    // hyper holds them, with no window to send them in: from now on nothing polls the stream,
    // and its end can reach the client only as a reset. The scrape orders this: the events are
    // published before they are counted, and the stream's task, woken then, runs before the
    // scrape's answer reaches this single-threaded runtime. Were these two to come with the
    // hundred below, the stream would take its end itself and queue its status behind bytes the
    // client never reads: its slot would be freed, but it would never be reset.
    flood_port_4(&mut publisher, 2).await;
    scrape_line(
        gateway.metrics_url(),
        "taskgate_case_events_total{state=\"EREQ\"} 10",
    )
    .await;
    // Far more than the buffer, none of which can be sent.
    flood_port_4(&mut publisher, 100).await;
    let replacement = within(PROMPTLY, "the slot was not freed", async {
        loop {
            let request = WatchCaseEventsRequest::default();
            match gateway.client.clone().watch_case_events(request).await {
                Ok(response) => return response.into_inner(),
                Err(status) => assert_eq!(error_info(&status).reason, "TOO_MANY_WATCHES"),
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    scrape_line(
        gateway.metrics_url(),
        "taskgate_case_watches_lagged_total 1",
    )
    .await;
    scrape_line(gateway.metrics_url(), "taskgate_case_watches_open 1").await;
    let reset = within(PROMPTLY, "the stream was not reset", async {
        loop {
            match never_reads.data().await {
                Some(Ok(_)) => {}
                Some(Err(error)) => return error,
                None => panic!("the stream ended without a reset"),
            }
        }
    })
    .await;
    assert_eq!(reset.reason(), Some(h2::Reason::CANCEL), "{reset}");
    drop(replacement);
}

/// A watch of every port through a client whose stream window is 1 KiB, once the feed is
/// connected: its client makes room for little more than a dozen events at a time.
async fn watch_through_a_small_window(gateway: &Gateway) -> Streaming<CaseEvent> {
    let small_window = Endpoint::from_shared(format!("http://{}", gateway.address))
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    watch(&TaskServiceClient::new(small_window), &[]).await
}

/// Reads `events` to their end, one event a millisecond: the bin ids seen, then the status.
async fn read_slowly(events: &mut Streaming<CaseEvent>) -> (Vec<u32>, tonic::Status) {
    within(Duration::from_secs(60), "no end", async {
        let mut bins = Vec::new();
        loop {
            match events.message().await {
                Ok(Some(event)) => bins.push(event.bin_id.unwrap()),
                Ok(None) => panic!("the stream ended without an error"),
                Err(status) => return (bins, status),
            }
            // Pacing a reader that keeps reading, slowly: not a wait for anything.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
}

/// Issue 20, item 1, review: a watch that ends while its client still reads, however slowly,
/// is not reset: its client gets every event that was waiting for it, then the status that says
/// why it ended. Here 3,000 events wait when the Log Publisher goes away, and the client reads
/// one a millisecond through a 1 KiB window, for some 3 s: far longer than a client that has
/// stopped reading is given.
#[tokio::test]
async fn a_slow_reader_gets_every_waiting_event_then_the_status_when_the_publisher_goes() {
    const EVENTS: u32 = 3000;
    let (gateway, mut publisher) = with_scripted_publisher(|builder| {
        builder.config(|config| config.watches.buffer = 4096.try_into().unwrap())
    })
    .await;
    let mut slow = watch_through_a_small_window(&gateway).await;
    flood_port_4(&mut publisher, EVENTS).await;
    scrape_line(
        gateway.metrics_url(),
        &format!("taskgate_case_events_total{{state=\"EREQ\"}} {EVENTS}"),
    )
    .await;
    drop(publisher);
    scrape_line(gateway.metrics_url(), "taskgate_log_publisher_connected 0").await;
    let (bins, status) = read_slowly(&mut slow).await;
    let expected: Vec<u32> = (1..=EVENTS).collect();
    assert_eq!(bins.len(), expected.len(), "{status:?}");
    assert_eq!(bins, expected);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).reason, "LOG_PUBLISHER_UNAVAILABLE");
}

/// At shutdown too, a watcher that still reads gets every event that was waiting, then
/// SHUTTING_DOWN; the drain waits for it (for at most the grace), and then for nothing.
#[tokio::test]
async fn at_shutdown_a_slow_reader_gets_every_waiting_event_then_shutting_down() {
    const EVENTS: u32 = 1000;
    let (mut gateway, mut publisher) = with_scripted_publisher(|builder| {
        builder.config(|config| {
            config.watches.buffer = 4096.try_into().unwrap();
            config.shutdown_grace = Duration::from_secs(60);
        })
    })
    .await;
    let mut slow = watch_through_a_small_window(&gateway).await;
    flood_port_4(&mut publisher, EVENTS).await;
    scrape_line(
        gateway.metrics_url(),
        &format!("taskgate_case_events_total{{state=\"EREQ\"}} {EVENTS}"),
    )
    .await;
    gateway.begin_shutdown();
    let (bins, status) = read_slowly(&mut slow).await;
    let expected: Vec<u32> = (1..=EVENTS).collect();
    assert_eq!(bins.len(), expected.len(), "{status:?}");
    assert_eq!(bins, expected);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).reason, "SHUTTING_DOWN");
    within(PROMPTLY, "serve waited", gateway.join())
        .await
        .unwrap();
}

/// Issue 20, item 1, over gRPC-Web: a watcher on HTTP/1.1 whose socket stays full (it has
/// stopped reading) does not hold the drain either: its connection is closed.
#[tokio::test]
async fn shutdown_closes_a_grpc_web_watch_that_never_reads() {
    // Some 11 MB of events, far more than the sockets' buffers and hyper's can hold: the rest
    // waits in the watch's buffer.
    const EVENTS: u32 = 200_000;
    let (gateway, mut publisher) = with_scripted_publisher(|builder| {
        builder.config(|config| {
            config.watches.buffer = 1_048_576.try_into().unwrap();
            config.shutdown_grace = Duration::from_secs(60);
        })
    })
    .await;
    // Once one watch is accepted, the feed is connected.
    drop(watch(&gateway.client, &[]).await);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut never_reads = socket.connect(gateway.address).await.unwrap();
    let request = "POST /taskgate.v1.TaskService/WatchCaseEvents HTTP/1.1\r\nHost: gateway\r\n\
                   Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\
                   Content-Length: 5\r\n\r\n\x00\x00\x00\x00\x00";
    never_reads.write_all(request.as_bytes()).await.unwrap();
    scrape_line(gateway.metrics_url(), "taskgate_case_watches_open 1").await;
    flood_port_4(&mut publisher, EVENTS).await;
    scrape_line(
        gateway.metrics_url(),
        &format!("taskgate_case_events_total{{state=\"EREQ\"}} {EVENTS}"),
    )
    .await;
    within(PROMPTLY, "serve waited for the watch", gateway.stop())
        .await
        .unwrap();
}

/// Asserts that a watch of `port_ids` is refused with `code`, `reason` and `message`.
async fn assert_refused(
    gateway: &Gateway,
    port_ids: Vec<u32>,
    code: Code,
    reason: &str,
    message: &str,
) {
    let status = gateway
        .client
        .clone()
        .watch_case_events(WatchCaseEventsRequest { port_ids })
        .await
        .unwrap_err();
    assert_eq!(
        (
            status.code(),
            error_info(&status).reason.as_str(),
            status.message()
        ),
        (code, reason, message)
    );
}

#[tokio::test]
async fn watches_are_refused_with_the_documented_statuses() {
    let gateway = Gateway::builder().start().await;
    assert_refused(
        &gateway,
        Vec::new(),
        Code::FailedPrecondition,
        "LOG_PUBLISHER_DISABLED",
        "WatchCaseEvents: the gateway runs without a Log Publisher (--log-publisher off), so it \
         has no case events; read states with CaseGetState",
    )
    .await;
    assert_refused(
        &gateway,
        vec![4, 0, 2001],
        Code::InvalidArgument,
        "INVALID_PARAMETER",
        "WatchCaseEvents: port_ids 0 is out of range 1-2000; port_ids 2001 is out of range 1-2000",
    )
    .await;

    // One watch allowed.
    let controller = SimulatedController::start(Duration::from_millis(50)).await;
    let gateway = Gateway::builder()
        .upstream(&controller.url)
        .log_publisher(controller.log_publisher)
        .config(|config| config.watches.max_watches = 1.try_into().unwrap())
        .start()
        .await;
    let mut open = watch(&gateway.client, &[]).await;
    assert_refused(
        &gateway,
        Vec::new(),
        Code::ResourceExhausted,
        "TOO_MANY_WATCHES",
        "WatchCaseEvents: 1 watches are already open (--max-watches); retry once one has closed",
    )
    .await;
    drop(open);
    open = watch(&gateway.client, &[]).await;
    drop(open);

    // The caller's deadline ends the stream.
    let mut events = within(PROMPTLY, "no watch", async {
        loop {
            let mut request = tonic::Request::new(WatchCaseEventsRequest::default());
            request.set_timeout(Duration::from_millis(300));
            if let Ok(response) = gateway.client.clone().watch_case_events(request).await {
                return response.into_inner();
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let status = end_of(&mut events, PROMPTLY).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(error_info(&status).reason, "DEADLINE_REACHED");
    assert_eq!(
        status.message(),
        "WatchCaseEvents: the caller's deadline of 300ms has passed"
    );
}

#[tokio::test]
async fn shutdown_ends_open_watches_at_once_instead_of_waiting_out_the_grace() {
    let controller = SimulatedController::start(Duration::from_millis(50)).await;
    let mut gateway = Gateway::builder()
        .upstream(&controller.url)
        .log_publisher(controller.log_publisher)
        .config(|config| config.shutdown_grace = Duration::from_secs(120))
        .start()
        .await;
    let mut events = watch(&gateway.client, &[]).await;
    gateway.begin_shutdown();
    let status = end_of(&mut events, PROMPTLY).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).reason, "SHUTTING_DOWN");
    drop(events);
    within(PROMPTLY, "serve waited for the watch", gateway.join())
        .await
        .unwrap();
}
