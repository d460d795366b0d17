//! Test fixtures: a gateway on an ephemeral loopback port, the embedded simulator, and a scripted
//! fake controller that records what it receives.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::Url;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_types::StatusExt;

use taskgate::auth::TokenFile;
use taskgate::config::{Http1Limits, LogPublisherAddress, defaults, parse_upstream_url};
use taskgate::proto::task_service_client::TaskServiceClient;
use taskgate::proto::{
    CaseCancelRequest, CaseExtractRequest, CaseExtractResponse, CaseGetStateRequest,
    CaseGetStateResponse, TASK_FAULT_TYPE_URL, TaskFault,
};
use taskgate::server::Config as GatewayConfig;
use taskgate::server::{Listeners, ServeError};
use taskgate::shutdown::Hangups;
use taskgate::simulator::{self, Simulator, layout::Layout};
use taskgate::tls::ServerTls;

/// A running gateway and a client connected to it. Dropping it begins shutdown.
pub(crate) struct Gateway {
    /// A client on its own connection, made before the test starts (over TLS when the gateway
    /// serves TLS).
    pub(crate) client: TaskServiceClient<Channel>,
    pub(crate) address: SocketAddr,
    /// How `client` reaches the gateway, for tests that need more connections.
    endpoint: Endpoint,
    /// The `/metrics` URL, when the builder asked for metrics.
    metrics_url: Option<String>,
    /// How long `serve` may drain, so `join` knows how long is too long.
    shutdown_grace: Duration,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServeError>>,
    /// The auth tokens file: the gateway reads it again on SIGHUP, so it lives as long.
    _token_file: Option<TestFile>,
}

impl Gateway {
    /// A gateway on 127.0.0.1 and an ephemeral port, in front of the simulator with its default
    /// layout unless the builder says otherwise.
    pub(crate) fn builder() -> GatewayBuilder {
        GatewayBuilder {
            upstream: Upstream::Simulator(Layout::default_layout()),
            settings: Vec::new(),
            tls: None,
            auth_tokens: None,
            metrics: false,
            log_publisher: None,
        }
    }

    /// The `/metrics` URL; the builder must have asked for [`GatewayBuilder::metrics`].
    pub(crate) fn metrics_url(&self) -> &str {
        self.metrics_url
            .as_deref()
            .expect("no metrics endpoint: build the gateway with .metrics()")
    }

    /// Calls CaseExtract with an optional deadline.
    pub(crate) async fn case_extract(
        &self,
        port_id: u32,
        bin_id: u32,
        deadline: Option<Duration>,
    ) -> Result<(), tonic::Status> {
        let mut request = tonic::Request::new(CaseExtractRequest {
            port_id,
            bin_id,
            ..Default::default()
        });
        if let Some(deadline) = deadline {
            request.set_timeout(deadline);
        }
        self.client.clone().case_extract(request).await.map(|_| ())
    }

    /// Calls CaseCancel, with no deadline.
    pub(crate) async fn case_cancel(&self, port_id: u32, bin_id: u32) -> Result<(), tonic::Status> {
        let request = CaseCancelRequest {
            port_id,
            bin_id,
            ..Default::default()
        };
        self.client.clone().case_cancel(request).await.map(|_| ())
    }

    /// Calls CaseGetState, with no deadline.
    pub(crate) async fn case_get_state(
        &self,
        port_id: u32,
    ) -> Result<CaseGetStateResponse, tonic::Status> {
        let request = CaseGetStateRequest { port_id };
        let response = self.client.clone().case_get_state(request).await;
        response.map(tonic::Response::into_inner)
    }

    /// A fresh connection to the gateway, for clients of its other services.
    pub(crate) async fn client_channel(&self) -> Channel {
        self.endpoint.connect().await.unwrap()
    }

    /// Starts a CaseExtract call in the background, with no deadline.
    pub(crate) fn spawn_case_extract(
        &self,
        port_id: u32,
        bin_id: u32,
    ) -> JoinHandle<Result<(), tonic::Status>> {
        let mut client = self.client.clone();
        tokio::spawn(async move {
            client
                .case_extract(CaseExtractRequest {
                    port_id,
                    bin_id,
                    ..Default::default()
                })
                .await
                .map(|_| ())
        })
    }

    /// Whether `serve` is still running.
    pub(crate) fn is_serving(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Signals shutdown and returns how `serve` ended; see [`Gateway::join`].
    pub(crate) async fn stop(mut self) -> Result<(), ServeError> {
        self.begin_shutdown();
        self.join().await
    }

    /// Signals shutdown without waiting.
    pub(crate) fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits for `serve` to return after `begin_shutdown`; fails the test if it has not returned
    /// within the shutdown grace and [`PROMPTLY`] more.
    pub(crate) async fn join(self) -> Result<(), ServeError> {
        let limit = self.shutdown_grace + PROMPTLY;
        within(limit, "serve did not return after shutdown", self.handle)
            .await
            .unwrap()
    }
}

/// Settings for [`Gateway::builder`].
pub(crate) struct GatewayBuilder {
    upstream: Upstream,
    /// Changes to the default configuration, applied in order.
    settings: Vec<Setting>,
    /// The gateway's TLS, and the client's to reach it.
    tls: Option<(ServerTls, ClientTlsConfig)>,
    auth_tokens: Option<Vec<String>>,
    metrics: bool,
    /// The Log Publisher to read case events from; none unless a test asks, so a gateway does
    /// not knock on 127.0.0.1:44001.
    log_publisher: Option<SocketAddr>,
}

/// One change a test makes to the gateway's configuration.
type Setting = Box<dyn FnOnce(&mut GatewayConfig)>;

/// The controller a gateway calls.
enum Upstream {
    /// The simulator with this layout, started with the gateway.
    Simulator(Layout),
    /// A controller (usually a [`FakeUpstream`]) already running at this URL.
    Url(Url),
}

impl GatewayBuilder {
    /// Calls the controller at `url` instead of the simulator.
    pub(crate) fn upstream(mut self, url: &Url) -> Self {
        self.upstream = Upstream::Url(url.clone());
        self
    }

    /// Calls a simulator with `layout`.
    pub(crate) fn simulator(mut self, layout: Layout) -> Self {
        self.upstream = Upstream::Simulator(layout);
        self
    }

    /// Changes the configuration, which starts with the documented defaults.
    pub(crate) fn config(mut self, change: impl FnOnce(&mut GatewayConfig) + 'static) -> Self {
        self.settings.push(Box::new(change));
        self
    }

    /// Serves gRPC over TLS with `server`; the gateway's client connects with `client`.
    pub(crate) fn tls(mut self, server: ServerTls, client: ClientTlsConfig) -> Self {
        self.tls = Some((server, client));
        self
    }

    /// Requires one of `tokens` on task calls, read from a token file as the binary reads it.
    /// The gateway's client sends none.
    pub(crate) fn auth_tokens(mut self, tokens: &[&str]) -> Self {
        self.auth_tokens = Some(tokens.iter().map(|token| (*token).to_owned()).collect());
        self
    }

    /// Reads case events from the Log Publisher at `address`.
    pub(crate) fn log_publisher(mut self, address: SocketAddr) -> Self {
        self.log_publisher = Some(address);
        self
    }

    /// Serves `/metrics` too, on an ephemeral port of its own.
    pub(crate) fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Binds the listeners, spawns `serve` and connects the client.
    pub(crate) async fn start(self) -> Gateway {
        let upstream_url = match self.upstream {
            Upstream::Simulator(layout) => start_simulator(layout).await,
            Upstream::Url(url) => url,
        };
        let mut config = GatewayConfig::with_upstream(upstream_url);
        config.log_publisher = self.log_publisher.map(|address| LogPublisherAddress {
            host: address.ip().to_string(),
            port: address.port(),
            tls: false,
        });
        let token_file = self.auth_tokens.map(|tokens| {
            let token_file = TestFile::new("auth", "tokens", &(tokens.join("\n") + "\n"));
            config.auth_tokens = Some(TokenFile::load(&token_file).unwrap());
            token_file
        });
        for change in self.settings {
            change(&mut config);
        }
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = grpc.local_addr().unwrap();
        let metrics = if self.metrics {
            Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let metrics_url = metrics
            .as_ref()
            .map(|listener| format!("http://{}/metrics", listener.local_addr().unwrap()));
        let endpoint = match self.tls {
            Some((server, client)) => {
                config.tls = Some(server);
                endpoint(format!("https://{address}"))
                    .tls_config(client)
                    .unwrap()
            }
            None => endpoint(format!("http://{address}")),
        };
        let shutdown_grace = config.shutdown_grace;
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let listeners = Listeners { grpc, metrics };
        let stop = async {
            let _ = shutdown_rx.await;
        };
        let handle = tokio::spawn(taskgate::server::serve(
            listeners,
            config,
            stop,
            Hangups::catch(),
        ));
        // The listener is already bound, so connecting needs no wait.
        let client = TaskServiceClient::new(endpoint.connect().await.unwrap());
        Gateway {
            client,
            address,
            endpoint,
            metrics_url,
            shutdown_grace,
            shutdown: Some(shutdown),
            handle,
            _token_file: token_file,
        }
    }
}

/// The longest a test waits for one call or HTTP request to be answered: far beyond any answer
/// on a loaded machine, so reaching it means the answer never came.
pub(crate) const CALL_LIMIT: Duration = Duration::from_secs(30);

/// A gRPC endpoint at `uri` that gives up connecting, and each call, after [`CALL_LIMIT`]. The
/// limit stays in the client: no `grpc-timeout` is sent, so the gateway sees no deadline.
pub(crate) fn endpoint(uri: String) -> Endpoint {
    Endpoint::from_shared(uri)
        .unwrap()
        .connect_timeout(CALL_LIMIT)
        .timeout(CALL_LIMIT)
}

/// A plain HTTP client that gives up on a request after [`CALL_LIMIT`].
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CALL_LIMIT)
        .build()
        .unwrap()
}

/// The head of a call to `method` of TaskService at `address`, as a raw HTTP/2 client sends
/// it; the test sends the message on the stream.
pub(crate) fn task_call_head(
    address: impl std::fmt::Display,
    method: &str,
) -> tonic::codegen::http::Request<()> {
    tonic::codegen::http::Request::post(format!(
        "http://{address}/taskgate.v1.TaskService/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap()
}

/// Awaits `future`, failing the test with "`what_failed` within `limit`" if it takes longer.
pub(crate) async fn within<T>(
    limit: Duration,
    what_failed: &str,
    future: impl Future<Output = T>,
) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what_failed} within {limit:?}"))
}

/// Starts the simulator with `layout` and returns its task-interface URL.
pub(crate) async fn start_simulator(layout: Layout) -> Url {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(simulator::http::serve(
        listener,
        Simulator::new(&layout),
        Http1Limits::with_max_connections(defaults::SIMULATOR_MAX_CONNECTIONS),
        std::future::pending(),
    ));
    parse_upstream_url(&format!("http://{address}{}", simulator::http::TASK_PATH)).unwrap()
}

/// A fresh folder for a test's files, removed with everything in it when this is dropped.
#[derive(Debug)]
pub(crate) struct TestFolder(TempDir);

impl Deref for TestFolder {
    type Target = Path;

    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TestFolder {
    fn as_ref(&self) -> &Path {
        self
    }
}

/// A fresh folder for this test's files, its name starting with `name` so that it can be found
/// while the test runs.
pub(crate) fn test_folder(name: &str) -> TestFolder {
    let folder = tempfile::Builder::new()
        .prefix(&format!("taskgate-test-{name}-"))
        .tempdir()
        .unwrap();
    TestFolder(folder)
}

/// A file holding `text` in a fresh folder; both are removed when this is dropped.
#[derive(Debug)]
pub(crate) struct TestFile {
    path: PathBuf,
    /// Keeps the folder, and so the file, until the test is done with it.
    _folder: TestFolder,
}

impl TestFile {
    /// Writes `text` to `file_name` in a fresh folder named after `folder_name`.
    pub(crate) fn new(folder_name: &str, file_name: &str, text: &str) -> TestFile {
        let folder = test_folder(folder_name);
        let path = folder.join(file_name);
        std::fs::write(&path, text).unwrap();
        TestFile {
            path,
            _folder: folder,
        }
    }
}

impl Deref for TestFile {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TestFile {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// A loopback address where nothing listens: bound, read, then released.
///
/// Its port is outside the kernel's ephemeral range. A port from that range, once released,
/// may be handed to the next bind to port 0 or outgoing connection, of this process or of a
/// gateway under test: one that took a just-released `--listen` port for its embedded simulator
/// then failed with "Address already in use".
pub(crate) async fn unused_address() -> SocketAddr {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut ends = range.split_whitespace().map(|end| end.parse::<u16>().ok());
            Some((ends.next()??, ends.next()??))
        })
        .unwrap_or((32768, 60999));
    // Below the range, or above it where the range starts too low to leave room below.
    let outside = if ephemeral.0 >= 2048 {
        1024..ephemeral.0
    } else {
        ephemeral.1.saturating_add(1)..u16::MAX
    };
    if outside.len() >= 1024 {
        for _ in 0..1000 {
            let port = fastrand::u16(outside.clone());
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)).await {
                return listener.local_addr().unwrap();
            }
        }
    }
    // A host whose whole port space is ephemeral: a released port is all there is.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A peer that accepts every connection and holds it open, never reading nor writing: a gateway
/// or collector that never answers. Its `http://` URL, and the task holding the connections,
/// which closes them when aborted.
pub(crate) async fn silent_peer() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    (url, held)
}

/// What the fake controller does with each request.
#[derive(Clone)]
pub(crate) enum Script {
    /// Answer with this status, content type and body.
    Respond {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// Answer like `Respond`, but only once `release` is notified.
    RespondWhen { release: Arc<Notify>, body: Vec<u8> },
    /// Answer like `ok_xml` with `Connection: close`, then close the connection.
    RespondAndClose { body: Vec<u8> },
    /// Answer like `ok_xml`, announcing nothing, then close the connection: a controller whose
    /// keep-alive timeout ends as soon as it has answered.
    RespondThenHangUp { body: Vec<u8> },
    /// Never answer; record when the gateway closes the connection.
    Hang,
    /// Close the connection as soon as the request has arrived.
    Drop,
    /// Answer a connection's first request like `ok_xml`, keeping it open, and close it as
    /// soon as its second request has arrived: a kept-alive connection lost under a POST.
    DropSecond { body: Vec<u8> },
    /// Send a chunked body that never ends; record when the gateway stops reading.
    Endless,
    /// Answer the first request of all with `first`, written as it is, then close that
    /// connection if `close` or else answer every later request on it with `leftover`, also as
    /// it is; answer every request on any other connection like `ok_xml(then)`.
    Poisoned {
        first: Vec<u8>,
        close: bool,
        leftover: Vec<u8>,
        then: Vec<u8>,
        /// Whether `first` has been sent, shared by every connection.
        sent: Arc<AtomicBool>,
    },
    /// Answer the requests of all connections in turn, each with the next of these like
    /// `ok_xml`, or, for `None` or once they have run out, by closing the connection.
    Sequence(Arc<std::sync::Mutex<VecDeque<Option<String>>>>),
}

impl Script {
    /// HTTP 200 with an XML body.
    pub(crate) fn ok_xml(body: &str) -> Script {
        Script::Respond {
            status: 200,
            content_type: "application/xml",
            body: body.as_bytes().to_vec(),
        }
    }

    /// See [`Script::Sequence`].
    pub(crate) fn sequence(replies: &[Option<&str>]) -> Script {
        let replies = replies.iter().map(|reply| reply.map(str::to_owned));
        Script::Sequence(Arc::new(std::sync::Mutex::new(replies.collect())))
    }

    /// See [`Script::Poisoned`].
    pub(crate) fn poisoned(first: &[u8], close: bool, leftover: &[u8], then: &str) -> Script {
        Script::Poisoned {
            first: first.to_vec(),
            close,
            leftover: leftover.to_vec(),
            then: then.as_bytes().to_vec(),
            sent: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What the fake controller saw.
#[derive(Debug)]
pub(crate) enum Seen {
    /// A complete request: the request line, lower-cased headers and body.
    Request {
        request_line: String,
        headers: HashMap<String, String>,
        body: Vec<u8>,
    },
    /// The gateway closed a connection while the fake was waiting or writing.
    Closed,
}

/// A fake controller on an ephemeral loopback port.
pub(crate) struct FakeUpstream {
    pub(crate) url: Url,
    seen: mpsc::UnboundedReceiver<Seen>,
    /// Events `requests_so_far` took off the channel but did not count, kept for `next`.
    backlog: VecDeque<Seen>,
    /// Connections that carried at least one request (the health probe's carry none).
    connections: watch::Receiver<usize>,
    /// Connections accepted, the health probe's included.
    accepted: watch::Receiver<usize>,
    address: SocketAddr,
}

/// Which connections a [`FakeUpstream`] accepts.
enum Accepting {
    /// Every one, for as long as it runs.
    All,
    /// None once a connection has carried a request; it goes on listening.
    UntilARequest,
}

impl FakeUpstream {
    /// Starts a fake that applies `script` to every request.
    pub(crate) async fn start(script: Script) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        FakeUpstream::serve(listener, script, Accepting::All)
    }

    /// Starts a fake like [`FakeUpstream::start`] that accepts no more connections once one has
    /// carried a request, and listens on: one more connect then fills its accept queue, and the
    /// kernel drops the SYNs of later ones, as for a controller too busy to accept. Its listen
    /// backlog is 0 from the start, so connects made at the same moment before then can lose a
    /// SYN and wait about a second for its retry.
    pub(crate) async fn start_accepting_until_a_request(script: Script) -> FakeUpstream {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("a TCP socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("an ephemeral loopback port");
        socket.listen(0).expect("listening");
        socket.set_nonblocking(true).expect("a non-blocking socket");
        let listener = TcpListener::from_std(socket.into()).expect("a tokio listener");
        FakeUpstream::serve(listener, script, Accepting::UntilARequest)
    }

    fn serve(listener: TcpListener, script: Script, accepting: Accepting) -> FakeUpstream {
        let until_a_request = matches!(accepting, Accepting::UntilARequest);
        let address = listener.local_addr().unwrap();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (connections_tx, connections) = watch::channel(0);
        let connections_tx = Arc::new(connections_tx);
        let (accepted_tx, accepted) = watch::channel(0);
        let mut carried = connections.clone();
        tokio::spawn(async move {
            loop {
                let carried_one = async {
                    let _ = carried.wait_for(|&count| count > 0).await;
                };
                let stream = tokio::select! {
                    // First: a connect that arrives after a request must stay in the queue.
                    biased;
                    () = carried_one, if until_a_request => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => return,
                    },
                };
                accepted_tx.send_modify(|count| *count += 1);
                tokio::spawn(serve_connection(
                    stream,
                    script.clone(),
                    seen_tx.clone(),
                    connections_tx.clone(),
                ));
            }
            // Listening on, accepting nothing: a closed port would refuse the connects.
            let _listening = listener;
            std::future::pending::<()>().await;
        });
        let url = parse_upstream_url(&format!("http://{address}/api/v2/task")).unwrap();
        FakeUpstream {
            url,
            seen,
            backlog: VecDeque::new(),
            connections,
            accepted,
            address,
        }
    }

    /// The fake's loopback address.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// The next thing the fake saw; fails the test if nothing comes within 10 s.
    pub(crate) async fn next(&mut self) -> Seen {
        if let Some(seen) = self.backlog.pop_front() {
            return seen;
        }
        tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
            .await
            .expect("the fake controller saw nothing within 10 s")
            .expect("the fake controller stopped")
    }

    /// The next request's body.
    pub(crate) async fn next_request_body(&mut self) -> Vec<u8> {
        match self.next().await {
            Seen::Request { body, .. } => body,
            Seen::Closed => panic!("expected a request, saw a closed connection"),
        }
    }

    /// Waits until the gateway closes a connection to the fake; fails the test if it has not
    /// within [`CALL_LIMIT`].
    pub(crate) async fn expect_closed(&mut self) {
        let closed = async { while let Seen::Request { .. } = self.next().await {} };
        within(
            CALL_LIMIT,
            "the gateway did not close a connection to the fake controller",
            closed,
        )
        .await;
    }

    /// How many connections carried a request so far.
    pub(crate) fn connections_so_far(&self) -> usize {
        *self.connections.borrow()
    }

    /// Waits until the fake has accepted `count` connections, the health probe's included;
    /// fails the test if it has not within [`CALL_LIMIT`].
    pub(crate) async fn expect_accepted(&mut self, count: usize) {
        let accepted = self.accepted.wait_for(|&accepted| accepted >= count);
        within(
            CALL_LIMIT,
            "the fake controller accepted too few connections",
            accepted,
        )
        .await
        .expect("the fake controller stopped");
    }

    /// The task-interface method (`<name>`) of every request that arrived so far, in order,
    /// without waiting.
    pub(crate) fn methods_so_far(&mut self) -> Vec<String> {
        let mut methods = Vec::new();
        let mut seen = std::mem::take(&mut self.backlog);
        while let Ok(event) = self.seen.try_recv() {
            seen.push_back(event);
        }
        for event in seen {
            match event {
                Seen::Request { body, .. } => {
                    let body = String::from_utf8_lossy(&body);
                    let name = body
                        .split_once("<name>")
                        .and_then(|(_, rest)| rest.split_once("</name>"))
                        .map_or("?", |(name, _)| name);
                    methods.push(name.to_owned());
                }
                Seen::Closed => self.backlog.push_back(event),
            }
        }
        methods
    }

    /// How many requests arrived so far, without waiting.
    pub(crate) fn requests_so_far(&mut self) -> usize {
        let mut count = 0;
        while let Ok(seen) = self.seen.try_recv() {
            match seen {
                Seen::Request { .. } => count += 1,
                Seen::Closed => self.backlog.push_back(seen),
            }
        }
        count
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    script: Script,
    seen: mpsc::UnboundedSender<Seen>,
    connections: Arc<watch::Sender<usize>>,
) {
    let mut buffer = Vec::new();
    // Whether this connection carried `Script::Poisoned`'s first reply.
    let mut poisoned = false;
    for request in 0.. {
        let Some((request_line, headers, body)) = read_request(&mut stream, &mut buffer).await
        else {
            return;
        };
        if request == 0 {
            connections.send_modify(|count| *count += 1);
        }
        let _ = seen.send(Seen::Request {
            request_line,
            headers,
            body,
        });
        match &script {
            Script::Respond {
                status,
                content_type,
                body,
            } => {
                if write_response(&mut stream, *status, content_type, body)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Script::RespondAndClose { body } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body).await;
                return;
            }
            Script::RespondThenHangUp { body } => {
                let _ = write_response(&mut stream, 200, "application/xml", body).await;
                return;
            }
            Script::RespondWhen { release, body } => {
                release.notified().await;
                if write_response(&mut stream, 200, "application/xml", body)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Script::Hang => {
                let mut byte = [0_u8; 1];
                // Returns 0 (EOF) or an error once the gateway drops the connection.
                let _ = stream.read(&mut byte).await;
                let _ = seen.send(Seen::Closed);
                return;
            }
            Script::Drop => return,
            Script::DropSecond { body } => {
                let answered = request == 0
                    && write_response(&mut stream, 200, "application/xml", body)
                        .await
                        .is_ok();
                if !answered {
                    return;
                }
            }
            Script::Endless => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nTransfer-Encoding: chunked\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 4096, "x".repeat(4096));
                while stream.write_all(chunk.as_bytes()).await.is_ok() {}
                let _ = seen.send(Seen::Closed);
                return;
            }
            Script::Poisoned {
                first,
                close,
                leftover,
                then,
                sent,
            } => {
                let raw = if poisoned {
                    Some(leftover)
                } else if !sent.swap(true, Ordering::SeqCst) {
                    poisoned = true;
                    Some(first)
                } else {
                    None
                };
                let written = match raw {
                    // The gateway may close it before reading it all; that is for the test to
                    // see. Only the poisoned connection gets here, so `close` is about it.
                    Some(raw) => stream.write_all(raw).await.is_ok() && !*close,
                    None => write_response(&mut stream, 200, "application/xml", then)
                        .await
                        .is_ok(),
                };
                if !written {
                    return;
                }
            }
            Script::Sequence(replies) => {
                let reply = replies.lock().unwrap().pop_front().flatten();
                let Some(body) = reply else {
                    return;
                };
                if write_response(&mut stream, 200, "application/xml", body.as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Reads one HTTP/1.1 request with a Content-Length body; `None` when the peer closes first.
/// `buffer` keeps what arrived past the request, for the next one on the connection.
pub(crate) async fn read_request(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> Option<(String, HashMap<String, String>, Vec<u8>)> {
    let header_end = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0_u8; 4096];
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?.to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    buffer.drain(..header_end + 4);
    while buffer.len() < length {
        let mut chunk = [0_u8; 4096];
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    let body = buffer.drain(..length).collect();
    Some((request_line, headers, body))
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} Scripted\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await
}

/// The ErrorInfo of a status, which every error must carry.
pub(crate) fn error_info(status: &tonic::Status) -> tonic_types::ErrorInfo {
    status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
}

/// The TaskFault of a status, if it has one.
pub(crate) fn task_fault(status: &tonic::Status) -> Option<TaskFault> {
    use prost::Message;
    let rpc_status = tonic_types::pb::Status::decode(status.details()).unwrap();
    let faults: Vec<TaskFault> = rpc_status
        .details
        .iter()
        .filter(|any| any.type_url == TASK_FAULT_TYPE_URL)
        .map(|any| TaskFault::decode(any.value.as_slice()).unwrap())
        .collect();
    assert!(faults.len() <= 1, "more than one TaskFault: {faults:?}");
    faults.into_iter().next()
}

/// How many ErrorInfo details a status carries (the contract says exactly one).
pub(crate) fn error_info_count(status: &tonic::Status) -> usize {
    use prost::Message;
    let rpc_status = tonic_types::pb::Status::decode(status.details()).unwrap();
    rpc_status
        .details
        .iter()
        .filter(|any| any.type_url == tonic_types::ErrorInfo::TYPE_URL)
        .count()
}

/// Builds an ErrorInfo metadata map from pairs.
pub(crate) fn metadata(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

/// Scrapes `metrics_url` until a line equals `expected`; fails the test if none does within
/// [`SCRAPE_LIMIT`]. Metrics follow events on other tasks (a connection closing), so one scrape
/// may be early.
pub(crate) async fn scrape_line(metrics_url: &str, expected: &str) {
    scrape_until(metrics_url, expected, |value| value == expected).await;
}

/// Scrapes `metrics_url` until the series `series` (name and labels) has a value of at least
/// `at_least`; fails the test if it does not within [`SCRAPE_LIMIT`].
pub(crate) async fn scrape_at_least(metrics_url: &str, series: &str, at_least: f64) {
    let what = format!("{series} >= {at_least}");
    scrape_until(metrics_url, &what, |line| {
        line.strip_prefix(series)
            .and_then(|value| value.trim().parse::<f64>().ok())
            .is_some_and(|value| value >= at_least)
    })
    .await;
}

/// How long a scrape waits for its line: a bound for a test that fails, not a wait a passing test
/// makes. A flood of 200,000 events on a loaded machine has been seen to take longer than 5 s to
/// be counted.
const SCRAPE_LIMIT: Duration = Duration::from_secs(30);

async fn scrape_until(metrics_url: &str, what: &str, matches: impl Fn(&str) -> bool) {
    let http_client = http_client();
    let mut last = String::new();
    let found = tokio::time::timeout(SCRAPE_LIMIT, async {
        loop {
            if let Ok(response) = http_client.get(metrics_url).send().await
                && let Ok(text) = response.text().await
            {
                if text.lines().any(&matches) {
                    return;
                }
                last = text;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(found.is_ok(), "{what} missing from:\n{last}");
}

/// Generous bound on "closed at once" and "closed after a 200 ms limit".
pub(crate) const PROMPTLY: Duration = Duration::from_secs(5);

/// Reads until the server closes the connection, which must happen within [`PROMPTLY`]; returns
/// what it sent.
pub(crate) async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(PROMPTLY, async {
        let mut buffer = [0_u8; 4096];
        // A reset counts as closed too.
        while let Ok(read @ 1..) = stream.read(&mut buffer).await {
            received.extend_from_slice(&buffer[..read]);
        }
    })
    .await
    .expect("the server did not close the connection");
    received
}

/// What an HTTP/2 client sends first, then an empty SETTINGS frame.
pub(crate) const HTTP2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// HTTP/2 frame types.
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const SETTINGS: u8 = 0x4;

/// The HTTP/2 frames in `bytes` as (type, payload), after the server's part of the handshake.
pub(crate) fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let end = (9 + length).min(bytes.len());
        frames.push((bytes[3], bytes[9..end].to_vec()));
        bytes = &bytes[end..];
    }
    frames
}

/// An HTTP/2 connection to `address` that has sent its preface and settings and then says
/// nothing, not even a ping or settings acknowledgement.
pub(crate) async fn silent_http2_client(address: impl tokio::net::ToSocketAddrs) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(HTTP2_PREFACE_AND_SETTINGS).await.unwrap();
    stream
}

/// Reads from an HTTP/2 connection until the server's SETTINGS frame, which must come within
/// [`PROMPTLY`]; returns its payload.
pub(crate) async fn server_settings(stream: &mut TcpStream) -> Vec<u8> {
    read_until(stream, "the server's SETTINGS", |received| {
        frames(received)
            .into_iter()
            .find_map(|(kind, payload)| (kind == SETTINGS).then_some(payload))
    })
    .await
}

/// A [`silent_http2_client`] the server has accepted and served: its SETTINGS have arrived.
pub(crate) async fn served_http2_client(address: impl tokio::net::ToSocketAddrs) -> TcpStream {
    let mut stream = silent_http2_client(address).await;
    server_settings(&mut stream).await;
    stream
}

/// HTTP/2 setting ids (RFC 9113, section 6.5.2).
pub(crate) const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub(crate) const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// The setting `id` in a SETTINGS payload, if the server sent it.
pub(crate) fn setting(settings: &[u8], id: u16) -> Option<u32> {
    // Each setting is a 16-bit id and a 32-bit value.
    settings.chunks(6).find_map(|setting| {
        (setting[..2] == id.to_be_bytes())
            .then(|| u32::from_be_bytes(setting[2..6].try_into().unwrap()))
    })
}

/// A whole `GET /metrics` request, as an HTTP/1.1 client keeping its connection alive sends it.
pub(crate) const GET_METRICS: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n";

/// Reads one HTTP/1.1 response with a Content-Length body, which must come within
/// [`PROMPTLY`]; returns it, head and body.
pub(crate) async fn read_response(stream: &mut TcpStream) -> String {
    read_until(stream, "a whole response", |received| {
        let text = String::from_utf8_lossy(received);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|length| length.parse().ok())
            .unwrap_or(0);
        (body.len() >= length).then(|| text.clone().into_owned())
    })
    .await
}

/// Reads from `stream` until `complete` finds `what` in everything received so far, and returns
/// what it found; fails the test if the server closes first or `what` has not come within
/// [`PROMPTLY`].
async fn read_until<T>(
    stream: &mut TcpStream,
    what: &str,
    complete: impl Fn(&[u8]) -> Option<T>,
) -> T {
    let mut received = Vec::new();
    within(PROMPTLY, &format!("{what} did not arrive"), async {
        loop {
            let mut buffer = [0_u8; 4096];
            let read = stream.read(&mut buffer).await.unwrap();
            assert_ne!(read, 0, "closed before {what}");
            received.extend_from_slice(&buffer[..read]);
            if let Some(found) = complete(&received) {
                return found;
            }
        }
    })
    .await
}

/// CaseExtract's gRPC path.
pub(crate) const CASE_EXTRACT: &str = "/taskgate.v1.TaskService/CaseExtract";

/// Calls CaseExtract (port 4, bin 101337) with `grpc-timeout: value`, set as raw metadata; the
/// answer must come within [`PROMPTLY`].
pub(crate) async fn case_extract_with_grpc_timeout(
    client: &TaskServiceClient<Channel>,
    value: &str,
) -> Result<(), tonic::Status> {
    let mut call = tonic::Request::new(CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    });
    call.metadata_mut()
        .insert("grpc-timeout", value.parse().unwrap());
    let mut client = client.clone();
    let answer = client.case_extract(call);
    within(PROMPTLY, "CaseExtract was not answered", answer)
        .await
        .map(|_| ())
}

/// Sends `messages` to CaseExtract on `channel` as a client stream, which a well-behaved client
/// never does; the answer must come within [`PROMPTLY`].
pub(crate) async fn case_extract_stream(
    channel: Channel,
    messages: Vec<CaseExtractRequest>,
) -> Result<CaseExtractResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<CaseExtractRequest, CaseExtractResponse>::default();
    let call = grpc.client_streaming(
        tonic::Request::new(tokio_stream::iter(messages)),
        tonic::codegen::http::uri::PathAndQuery::from_static(CASE_EXTRACT),
        codec,
    );
    within(PROMPTLY, "CaseExtract (streamed) was not answered", call)
        .await
        .map(|response| response.into_inner())
}

/// Sends HTTP/1.1 POSTs of `application/grpc` (which needs HTTP/2) to the gRPC port at `address`,
/// one with its whole body and one whose body never comes, and asserts that each is answered 400
/// within `limit`.
pub(crate) async fn assert_grpc_over_http1_gets_400(
    address: impl tokio::net::ToSocketAddrs + Copy,
    limit: Duration,
) {
    for body in [&b"\x00\x00\x00\x00\x00"[..], b""] {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let head = "POST /taskgate.v1.TaskService/CaseExtract HTTP/1.1\r\nHost: gateway\r\n\
                    Content-Type: application/grpc\r\nContent-Length: 5\r\n\r\n";
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        assert_reply_begins(&mut stream, b"HTTP/1.1 400", limit).await;
    }
}

/// Reads as many bytes as `expected` has, which must come within `limit`, and asserts that they
/// are `expected`.
async fn assert_reply_begins(stream: &mut TcpStream, expected: &[u8], limit: Duration) {
    let mut received = vec![0_u8; expected.len()];
    let what = format!("{:?} did not arrive", String::from_utf8_lossy(expected));
    within(limit, &what, stream.read_exact(&mut received))
        .await
        .unwrap();
    assert_eq!(received, expected, "{}", String::from_utf8_lossy(&received));
}

/// Connections to the gRPC port at `address` with nothing in flight that never close on their
/// own: an HTTP/2 client the server has served that then says nothing (not even answering
/// pings), a partial first HTTP/1.1 head, and a gRPC-Web request whose body never arrives (its
/// 100 Continue shows it reached the service).
pub(crate) async fn idle_and_partial_connections(
    address: impl tokio::net::ToSocketAddrs + Copy,
) -> [TcpStream; 3] {
    let idle = served_http2_client(address).await;
    let mut partial_head = TcpStream::connect(address).await.unwrap();
    partial_head
        .write_all(b"POST /taskgate.v1.TaskService/CaseExtract HTTP/1.1\r\nHost: g")
        .await
        .unwrap();
    let mut partial_body = TcpStream::connect(address).await.unwrap();
    let head = "POST /taskgate.v1.TaskService/CaseExtract HTTP/1.1\r\nHost: gateway\r\n\
                Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\
                Content-Length: 100\r\nExpect: 100-continue\r\n\r\n";
    partial_body.write_all(head.as_bytes()).await.unwrap();
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    assert_reply_begins(&mut partial_body, interim, PROMPTLY).await;
    partial_body.write_all(b"\x00\x00\x00").await.unwrap();
    [idle, partial_head, partial_body]
}

/// Opens a health `Watch` of the whole server on `health`'s connection; the answer (its response
/// head, or a refusal) must come within [`PROMPTLY`].
pub(crate) async fn health_watch(
    health: &HealthClient<Channel>,
) -> Result<tonic::Response<tonic::Streaming<HealthCheckResponse>>, tonic::Status> {
    let mut health = health.clone();
    let request = HealthCheckRequest {
        service: String::new(),
    };
    within(
        PROMPTLY,
        "the Watch was not answered",
        health.watch(request),
    )
    .await
}

/// A connection counted as open while it lives (the fake controller's from its first request).
pub(crate) struct OpenConnection(Arc<watch::Sender<usize>>);

impl OpenConnection {
    pub(crate) fn new(open: Arc<watch::Sender<usize>>) -> OpenConnection {
        open.send_modify(|open| *open += 1);
        OpenConnection(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.send_modify(|open| *open -= 1);
    }
}
