//! Distributed tracing (issue 22): the real binary exporting to an OTLP trace receiver served
//! here, with opentelemetry-proto's service; and the caller's trace context passed to the
//! controller when nothing is exported.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;

use taskgate::proto::CaseExtractRequest;
use taskgate::proto::task_service_client::TaskServiceClient;

use tonic::transport::{Identity, ServerTlsConfig};

use crate::cli::{TaskgateProcess, config_file, print_config};
use crate::support::{self, FakeUpstream, Gateway, Script, Seen, silent_peer, within};
use crate::tls::Pki;

/// The caller's trace and span, as a WMS service would send them.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

/// The longest a test waits for spans to arrive: the exporter sends within about a second.
const SPAN_WAIT: Duration = Duration::from_secs(30);

/// An OTLP trace receiver on an ephemeral loopback port, handing over every span it receives.
struct Receiver {
    endpoint: String,
    spans: mpsc::UnboundedReceiver<Span>,
    /// Spans already taken off the channel.
    seen: Vec<Span>,
    /// The resource attributes of every export, each kept before its spans are handed over.
    resources: Arc<Mutex<Vec<Vec<KeyValue>>>>,
    /// The instrumentation scope (name, version, schema URL) of every export's spans.
    scopes: Arc<Mutex<Vec<(String, String, String)>>>,
}

struct Collect {
    spans: mpsc::UnboundedSender<Span>,
    resources: Arc<Mutex<Vec<Vec<KeyValue>>>>,
    scopes: Arc<Mutex<Vec<(String, String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Collect {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.collect(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collect {
    /// Keeps an export's resources and scopes, and hands over its spans.
    fn collect(&self, request: ExportTraceServiceRequest) {
        for resource_spans in request.resource_spans {
            let resource = resource_spans.resource.unwrap_or_default().attributes;
            self.resources.lock().unwrap().push(resource);
            for scope_spans in &resource_spans.scope_spans {
                let scope = scope_spans.scope.clone().unwrap_or_default();
                self.scopes.lock().unwrap().push((
                    scope.name,
                    scope.version,
                    scope_spans.schema_url.clone(),
                ));
            }
            let spans = resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans);
            for span in spans {
                let _ = self.spans.send(span);
            }
        }
    }

    /// Answers an OTLP/HTTP request: a protobuf export POSTed to `/v1/traces`, as the
    /// specification has it; anything else is refused, so a test sees it fail.
    fn answer_http(&self, request: &Request<Bytes>) -> hyper::Response<Full<Bytes>> {
        let content_type = request.headers().get(CONTENT_TYPE);
        let decoded = ExportTraceServiceRequest::decode(request.body().clone());
        let proper = request.method() == hyper::Method::POST
            && request.uri().path() == "/v1/traces"
            && content_type.is_some_and(|value| value == "application/x-protobuf");
        let (status, body) = match decoded {
            Ok(export) if proper => {
                self.collect(export);
                let answer = ExportTraceServiceResponse::default().encode_to_vec();
                (hyper::StatusCode::OK, Bytes::from(answer))
            }
            _ => (hyper::StatusCode::BAD_REQUEST, Bytes::new()),
        };
        hyper::Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))
            .unwrap()
    }
}

impl Receiver {
    async fn start() -> Receiver {
        Receiver::serve(None).await
    }

    /// A receiver served over TLS with `pki`'s certificate for localhost.
    async fn start_tls(pki: &Pki) -> Receiver {
        let identity = Identity::from_pem(pki.read("server.pem"), pki.read("server.key"));
        Receiver::serve(Some(ServerTlsConfig::new().identity(identity))).await
    }

    async fn serve(tls: Option<ServerTlsConfig>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let endpoint = match tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let (sender, spans) = mpsc::unbounded_channel();
        let resources = Arc::default();
        let scopes = Arc::default();
        let collect = Collect {
            spans: sender,
            resources: Arc::clone(&resources),
            scopes: Arc::clone(&scopes),
        };
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).unwrap();
        }
        tokio::spawn(
            server
                .add_service(TraceServiceServer::new(collect))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Receiver {
            endpoint,
            spans,
            seen: Vec::new(),
            resources,
            scopes,
        }
    }

    /// A receiver of OTLP over HTTP (protobuf) at `/v1/traces`, over TLS with `pki`'s
    /// certificate for localhost when given; its endpoint is the base URL.
    async fn start_http(tls: Option<&Pki>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let endpoint = match tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let acceptor = tls.map(|pki| {
            let certificates = CertificateDer::pem_file_iter(pki.path("server.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
            let config = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certificates, key)
                .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let (sender, spans) = mpsc::unbounded_channel();
        let resources = Arc::default();
        let scopes = Arc::default();
        let collect = Arc::new(Collect {
            spans: sender,
            resources: Arc::clone(&resources),
            scopes: Arc::clone(&scopes),
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let collect = Arc::clone(&collect);
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let collect = Arc::clone(&collect);
                    async move {
                        let (head, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let request = Request::from_parts(head, body);
                        Ok::<_, hyper::Error>(collect.answer_http(&request))
                    }
                });
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let io = hyper_util::rt::TokioIo::new(stream);
                                let _ = http.serve_connection(io, service).await;
                            }
                        }
                        None => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = http.serve_connection(io, service).await;
                        }
                    }
                });
            }
        });
        Receiver {
            endpoint,
            spans,
            seen: Vec::new(),
            resources,
            scopes,
        }
    }

    /// Each resource attribute received so far, as `key=value` text.
    fn resource_attributes(&self) -> Vec<String> {
        let resources = self.resources.lock().unwrap();
        let attributes = resources.iter().flatten();
        attributes
            .map(|attribute| {
                let value = match attribute
                    .value
                    .as_ref()
                    .and_then(|value| value.value.as_ref())
                {
                    Some(Value::StringValue(text)) => text.clone(),
                    other => format!("{other:?}"),
                };
                format!("{}={value}", attribute.key)
            })
            .collect()
    }

    /// The first span received that `matches`, waiting for it within [`SPAN_WAIT`].
    async fn span(&mut self, what: &str, matches: impl Fn(&Span) -> bool) -> Span {
        if let Some(span) = self.seen.iter().find(|span| matches(span)) {
            return span.clone();
        }
        let wait = async {
            loop {
                let span = self.spans.recv().await.unwrap();
                self.seen.push(span.clone());
                if matches(&span) {
                    return span;
                }
            }
        };
        within(SPAN_WAIT, &format!("no {what} span was exported"), wait).await
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// An attribute's value as text: a string as it is, an integer in decimal (`IntValue`, as the
/// conventions type ports, status codes and counts), a boolean as `true` or `false`; other
/// types are refused.
fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|attribute| attribute.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        Value::StringValue(text) => text.clone(),
        Value::IntValue(number) => number.to_string(),
        Value::BoolValue(flag) => flag.to_string(),
        other => panic!("{key} has an unexpected type: {other:?}"),
    })
}

/// An integer attribute's value; `None` if it is missing or not an integer.
fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    let value = span
        .attributes
        .iter()
        .find(|attribute| attribute.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    match value {
        Value::IntValue(number) => Some(*number),
        _ => None,
    }
}

fn request(port_id: u32, traceparent: Option<&str>) -> tonic::Request<CaseExtractRequest> {
    let mut request = tonic::Request::new(CaseExtractRequest {
        port_id,
        bin_id: 101337,
        ..Default::default()
    });
    if let Some(traceparent) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        request
            .metadata_mut()
            .insert("tracestate", "wms=order-7".parse().unwrap());
    }
    request
}

/// A call that sends a `traceparent` is a server span under the caller's span, the controller
/// POST a client span under that, and the controller (the simulator, which logs what it
/// received at debug level) is called with the client span's id in the same trace. The access
/// line names the trace and the server span.
#[tokio::test]
async fn a_traced_call_continues_the_callers_trace_to_the_controller() {
    let mut receiver = Receiver::start().await;
    let mut gateway = TaskgateProcess::start(&[
        "--otlp-endpoint",
        &receiver.endpoint,
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    client
        .case_extract(request(4, Some(&traceparent)))
        .await
        .unwrap();

    let server = receiver
        .span("server", |span| span.kind == SpanKind::Server as i32)
        .await;
    assert_eq!(server.name, "taskgate.v1.TaskService/CaseExtract");
    assert_eq!(hex(&server.trace_id), TRACE_ID);
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN_ID);
    assert_eq!(server.trace_state, "wms=order-7");
    for (key, value) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "taskgate.v1.TaskService"),
        ("rpc.method", "CaseExtract"),
        ("server.address", "127.0.0.1"),
    ] {
        assert_eq!(attribute(&server, key).as_deref(), Some(value), "{key}");
    }
    let server_port: i64 = gateway.gateway.rsplit(':').next().unwrap().parse().unwrap();
    for (key, value) in [
        ("rpc.grpc.status_code", 0),
        ("server.port", server_port),
        ("taskgate.port_id", 4),
        ("taskgate.bin_id", 101337),
    ] {
        assert_eq!(int_attribute(&server, key), Some(value), "{key}");
    }
    assert!(
        attribute(&server, "taskgate.request_id").is_some(),
        "{server:?}"
    );
    assert_eq!(
        attribute(&server, "client.address").as_deref(),
        Some("127.0.0.1")
    );
    assert!(
        int_attribute(&server, "client.port").is_some(),
        "{server:?}"
    );
    let scope = receiver.scopes.lock().unwrap().clone();
    assert!(
        scope.contains(&(
            "taskgate".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
            "https://opentelemetry.io/schemas/1.27.0".to_owned()
        )),
        "{scope:?}"
    );

    let server_span_id = hex(&server.span_id);
    let client = receiver
        .span("client", |span| span.kind == SpanKind::Client as i32)
        .await;
    assert_eq!(client.name, "POST");
    assert_eq!(hex(&client.trace_id), TRACE_ID);
    assert_eq!(hex(&client.parent_span_id), server_span_id);
    assert_eq!(
        attribute(&client, "http.request.method").as_deref(),
        Some("POST")
    );
    assert_eq!(
        int_attribute(&client, "http.response.status_code"),
        Some(200)
    );
    assert!(
        int_attribute(&client, "server.port").is_some(),
        "{client:?}"
    );
    assert_eq!(
        attribute(&client, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    let url = attribute(&client, "url.full").unwrap();
    assert!(url.ends_with("/api/v2/task"), "{url}");

    let expected = format!("traceparent=\"00-{TRACE_ID}-{}-01\"", hex(&client.span_id));
    let received = gateway
        .wait_for_line("simulator received trace context")
        .await;
    assert!(received.contains(" DEBUG "), "{received}");
    assert!(received.contains(&expected), "{received}");
    assert!(
        received.contains("tracestate=\"wms=order-7\""),
        "{received}"
    );
    let access = gateway.wait_for_line("taskgate::access").await;
    assert!(
        access.contains(&format!("trace_id={TRACE_ID} span_id={server_span_id}")),
        "{access}"
    );
    // The call's latency bucket points at its trace.
    let exemplar = format!("# {{trace_id=\"{TRACE_ID}\",span_id=\"{server_span_id}\"}}");
    let metrics = support::http_client()
        .get(gateway.metrics_url())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let bucket = metrics
        .lines()
        .find(|line| line.contains(&exemplar))
        .unwrap_or_else(|| panic!("no exemplar {exemplar} in:\n{metrics}"));
    assert!(
        bucket.starts_with("taskgate_call_duration_seconds_bucket{"),
        "{bucket}"
    );
    gateway.signal("TERM").await;
    let (code, _) = gateway.finish().await;
    assert_eq!(code, Some(0));
}

/// A call the controller answered with a fault has the fault on its span and an error status,
/// and a call without a `traceparent` starts a trace of its own: the default sampler is on for
/// a root.
#[tokio::test]
async fn a_fault_calls_span_carries_the_fault_and_an_error_status() {
    let mut receiver = Receiver::start().await;
    let gateway = TaskgateProcess::start(&["--otlp-endpoint", &receiver.endpoint]).await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    // Port 1 is not an AutoCase port: fault 1087.
    let status = client.case_extract(request(1, None)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    let server = receiver
        .span("server", |span| span.kind == SpanKind::Server as i32)
        .await;
    assert!(server.parent_span_id.is_empty(), "{server:?}");
    let resource = receiver.resource_attributes();
    for expected in [
        "service.name=taskgate".to_owned(),
        format!("service.version={}", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(resource.contains(&expected), "{resource:?}");
    }
    assert_eq!(int_attribute(&server, "taskgate.fault.code"), Some(1087));
    assert_eq!(
        attribute(&server, "taskgate.fault.name").as_deref(),
        Some("PORT_IS_NOT_AUTOCASE")
    );
    assert_eq!(int_attribute(&server, "rpc.grpc.status_code"), Some(9));
    let span_status = server.status.unwrap();
    assert_eq!(span_status.code, StatusCode::Error as i32);
    assert_eq!(span_status.message, status.message());
}

/// A collector that accepts connections and never answers does not slow calls down, and
/// SIGTERM still ends the process within the grace (plus the process's own exit bound).
#[tokio::test]
async fn a_collector_that_never_answers_slows_nothing_and_shutdown_keeps_its_grace() {
    let (endpoint, _held) = silent_peer().await;
    let gateway =
        TaskgateProcess::start(&["--otlp-endpoint", &endpoint, "--shutdown-grace", "2s"]).await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    // Calls go on for several batch delays, so that batches are in flight to the hung
    // collector while calls are made, and each is bounded far below the export's 10 s timeout
    // (generous for a debug build: a call to the simulator takes milliseconds), so that a call
    // that waited for the exporter would fail here.
    // Paced, so that the log fits in the pipe this test reads only at the end and its last
    // lines are not dropped.
    let calling = tokio::time::Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    let mut round = 0;
    while calling.elapsed() < Duration::from_secs(3) {
        pace.tick().await;
        round += 1;
        let call = client.case_extract(request(4, Some(&traceparent)));
        let answered = within(Duration::from_secs(2), "a call was held up", call).await;
        // Later calls find the port busy with the first case: a fault, still an answer.
        if let Err(status) = answered {
            assert!(
                support::task_fault(&status).is_some(),
                "call {round}: {status:?}"
            );
        }
    }
    gateway.signal("TERM").await;
    // The grace, and the same few seconds any exit is given.
    // The grace, the log's exit bound, and slack for a busy debug build: an export that
    // overran the grace by a second or more would fail here.
    let (code, log) = gateway.finish_within(Duration::from_secs(2 + 2)).await;
    assert_eq!(code, Some(0), "{log}");
    // The spans the hung collector never took are counted in the last word on them.
    let unsent = log
        .lines()
        .find(|line| line.contains("spans were not all exported within what the shutdown grace"))
        .and_then(|line| line.split("unsent=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse::<u64>().ok());
    assert!(unsent.is_some_and(|unsent| unsent > 0), "{log}");
}

/// A call still in flight when the shutdown grace runs out is cut off, and its spans still
/// reach the collector: the end of the grace is kept for them. The exit keeps the grace.
#[tokio::test]
async fn the_spans_of_a_call_the_grace_cut_off_are_still_exported() {
    let mut receiver = Receiver::start().await;
    let mut upstream = FakeUpstream::start(Script::Hang).await;
    let gateway = TaskgateProcess::start_with_upstream(
        upstream.url.as_str(),
        &[
            "--otlp-endpoint",
            &receiver.endpoint,
            "--upstream-timeout",
            "60s",
            // Long enough for the whole second kept for the export.
            "--shutdown-grace",
            "4s",
        ],
    )
    .await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    let call =
        tokio::spawn(async move { client.case_extract(request(4, Some(&traceparent))).await });
    within(
        Duration::from_secs(30),
        "the POST reaching the controller",
        upstream.next_request_body(),
    )
    .await;
    gateway.signal("TERM").await;
    let (code, log) = gateway.finish_within(Duration::from_secs(4 + 5)).await;
    assert_eq!(code, Some(0), "{log}");
    let cut_off = within(Duration::from_secs(10), "the cut-off call's end", call)
        .await
        .unwrap();
    assert!(cut_off.is_err(), "{cut_off:?}");
    let server = receiver
        .span("the cut-off call's server span", |span| {
            span.kind == SpanKind::Server as i32 && hex(&span.trace_id) == TRACE_ID
        })
        .await;
    let client_span = receiver
        .span("its POST's client span", |span| {
            span.kind == SpanKind::Client as i32 && span.parent_span_id == server.span_id
        })
        .await;
    assert_eq!(hex(&client_span.trace_id), TRACE_ID);
    // Both say what happened: the grace stopped the wait, and the call was answered so.
    assert_eq!(
        attribute(&client_span, "error.type").as_deref(),
        Some("shutdown")
    );
    assert_eq!(int_attribute(&server, "rpc.grpc.status_code"), Some(2));
    assert_eq!(
        attribute(&server, "taskgate.upstream_error").as_deref(),
        Some("shutdown")
    );
    assert!(log.contains("shutdown grace ran out"), "{log}");
}

/// Without export, a caller's trace context still reaches the controller, unchanged: the
/// controller's own spans join the caller's trace.
#[tokio::test]
async fn without_export_the_callers_context_reaches_the_controller_unchanged() {
    let mut upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    gateway
        .client
        .clone()
        .case_extract(request(4, Some(&traceparent)))
        .await
        .unwrap();
    let Seen::Request { headers, .. } = upstream.next().await else {
        panic!("expected a request");
    };
    assert_eq!(headers.get("traceparent"), Some(&traceparent));
    assert_eq!(
        headers.get("tracestate").map(String::as_str),
        Some("wms=order-7")
    );

    // A call without one sends none, and neither does one whose traceparent is malformed.
    for traceparent in [None, Some("00-not-a-trace-01")] {
        let mut call = request(4, None);
        if let Some(traceparent) = traceparent {
            call.metadata_mut()
                .insert("traceparent", traceparent.parse().unwrap());
        }
        gateway.client.clone().case_extract(call).await.unwrap();
        let Seen::Request { headers, .. } = upstream.next().await else {
            panic!("expected a request");
        };
        assert_eq!(headers.get("traceparent"), None, "{traceparent:?}");
    }
}

/// The collector is chosen as every setting is: the flag over the standard variable, which, as
/// an environment variable, wins over the config file; a bad one stops the gateway at startup.
#[tokio::test]
async fn the_flag_beats_the_standard_variable_which_beats_the_file() {
    let file = config_file("otlp", "otlp_endpoint = \"http://file.example:4317\"\n");
    let config = file.to_str().unwrap();
    let variable = [(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://variable.example:4317",
    )];
    let printed = |stdout: &str| {
        stdout
            .lines()
            .find(|line| line.starts_with("otlp_endpoint"))
            .map(str::to_owned)
    };
    let (stdout, _) = print_config(&["--config", config], &[], 0).await;
    assert_eq!(
        printed(&stdout).as_deref(),
        Some("otlp_endpoint = \"http://file.example:4317\"")
    );
    let (stdout, _) = print_config(&["--config", config], &variable, 0).await;
    assert_eq!(
        printed(&stdout).as_deref(),
        Some("otlp_endpoint = \"http://variable.example:4317\"")
    );
    let flag = [
        "--config",
        config,
        "--otlp-endpoint",
        "http://flag.example:4317",
    ];
    let (stdout, _) = print_config(&flag, &variable, 0).await;
    assert_eq!(
        printed(&stdout).as_deref(),
        Some("otlp_endpoint = \"http://flag.example:4317\"")
    );
    let json = [("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")];
    let (_, stderr) = print_config(&flag, &json, 2).await;
    assert_eq!(
        stderr.trim_end(),
        "error: invalid configuration: OTEL_EXPORTER_OTLP_PROTOCOL=http/json: spans are exported \
         with grpc or http/protobuf only"
    );
    for (variables, refusal) in [
        (
            [("OTEL_TRACES_SAMPLER", "xray")],
            "OTEL_TRACES_SAMPLER=xray: not a supported sampler (always_on, always_off, \
             traceidratio, parentbased_always_on, parentbased_always_off, \
             parentbased_traceidratio)",
        ),
        (
            [("OTEL_TRACES_SAMPLER_ARG", "5")],
            "OTEL_TRACES_SAMPLER_ARG=5: the ratio of traces to sample must be a number from 0 \
             to 1",
        ),
        (
            [("OTEL_TRACES_EXPORTER", "zipkin")],
            "OTEL_TRACES_EXPORTER=zipkin: only otlp (or none, to export nothing) is supported",
        ),
        (
            [("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s3cret%0A")],
            "OTEL_EXPORTER_OTLP_HEADERS: entry 1 ('api-key') has a value that is not a valid \
             header value once percent-decoded; values are not shown",
        ),
    ] {
        let mut variables = variables.to_vec();
        if variables[0].0 == "OTEL_TRACES_SAMPLER_ARG" {
            variables.push(("OTEL_TRACES_SAMPLER", "traceidratio"));
        }
        let (_, stderr) = print_config(&flag, &variables, 2).await;
        assert_eq!(
            stderr.trim_end(),
            format!("error: invalid configuration: {refusal}")
        );
    }
    let (_, stderr) = print_config(&["--otlp-endpoint", "collector:4317"], &[], 2).await;
    assert_eq!(
        stderr.trim_end(),
        "error: invalid --otlp-endpoint: OTLP endpoint 'collector:4317' is not an http:// or \
         https:// URL (for example http://127.0.0.1:4317): its scheme is neither http nor https"
    );
    // An endpoint from a standard variable is refused under that variable's name.
    let (_, stderr) = print_config(&[], &[(OTEL_ENDPOINT, "collector:4317")], 2).await;
    assert_eq!(
        stderr.trim_end(),
        "error: invalid OTEL_EXPORTER_OTLP_ENDPOINT: OTLP endpoint 'collector:4317' is not an \
         http:// or https:// URL (for example http://127.0.0.1:4317): its scheme is neither http \
         nor https"
    );
}

/// Every server span has a bounded name and a gRPC code: health checks are named after their
/// method, and a path the gateway does not serve, as a scanner sends, is `_OTHER`.
#[tokio::test]
async fn every_server_span_has_a_known_name_and_a_code() {
    let mut receiver = Receiver::start().await;
    let gateway = TaskgateProcess::start(&["--otlp-endpoint", &receiver.endpoint]).await;
    let channel = tonic::transport::Endpoint::from_shared(gateway.gateway.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(CaseExtractRequest::default()),
            tonic::codegen::http::uri::PathAndQuery::from_static("/scanner.Probe/wp-login.php"),
            tonic_prost::ProstCodec::<CaseExtractRequest, CaseExtractRequest>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    let health = receiver
        .span("health", |span| span.name == "grpc.health.v1.Health/Check")
        .await;
    assert_eq!(attribute(&health, "rpc.method").as_deref(), Some("Check"));
    assert_eq!(int_attribute(&health, "rpc.grpc.status_code"), Some(0));
    let other = receiver.span("unknown", |span| span.name == "_OTHER").await;
    assert_eq!(attribute(&other, "rpc.method").as_deref(), Some("_OTHER"));
    assert_eq!(attribute(&other, "rpc.service"), None);
    assert_eq!(int_attribute(&other, "rpc.grpc.status_code"), Some(12));
    assert!(
        receiver
            .seen
            .iter()
            .all(|span| !span.name.contains("wp-login")),
        "{:?}",
        receiver.seen
    );
}

/// A controller's non-2xx reply fails the client span, as the HTTP conventions have it: an
/// error status, and `error.type` the status code.
#[tokio::test]
async fn a_non_2xx_reply_fails_the_client_span_with_its_status_code() {
    let mut receiver = Receiver::start().await;
    let upstream = FakeUpstream::start(Script::Respond {
        status: 500,
        content_type: "text/plain",
        body: b"internal error".to_vec(),
    })
    .await;
    let gateway = TaskgateProcess::start_with_upstream(
        upstream.url.as_str(),
        &["--otlp-endpoint", &receiver.endpoint],
    )
    .await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    client
        .case_extract(request(4, Some(&traceparent)))
        .await
        .unwrap_err();
    // The call's POST, not the health probe's.
    let span = receiver
        .span("client", |span| {
            span.kind == SpanKind::Client as i32 && hex(&span.trace_id) == TRACE_ID
        })
        .await;
    assert_eq!(int_attribute(&span, "http.response.status_code"), Some(500));
    assert_eq!(attribute(&span, "error.type").as_deref(), Some("500"));
    assert_eq!(attribute(&span, "http.request.resend_count"), None);
    assert_eq!(span.status.unwrap().code, StatusCode::Error as i32);
}

/// Exported, a gRPC-Web call's trace context is continued like a gRPC call's: the controller
/// is called in the page's trace, under the gateway's client span.
#[tokio::test]
async fn a_grpc_web_call_is_traced_to_the_controller() {
    let mut receiver = Receiver::start().await;
    let mut upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = TaskgateProcess::start_with_upstream(
        upstream.url.as_str(),
        &["--otlp-endpoint", &receiver.endpoint],
    )
    .await;
    let message = prost::Message::encode_to_vec(&request(4, None).into_inner());
    let mut body = vec![0];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(message);
    let response = support::http_client()
        .post(format!(
            "{}/taskgate.v1.TaskService/CaseExtract",
            gateway.gateway
        ))
        .header("content-type", "application/grpc-web+proto")
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let client = receiver
        .span("client", |span| {
            span.kind == SpanKind::Client as i32 && hex(&span.trace_id) == TRACE_ID
        })
        .await;
    // The health probe's POSTs come first, in traces of their own.
    let sent = loop {
        let Seen::Request { headers, .. } = upstream.next().await else {
            panic!("expected a request");
        };
        let traceparent = headers.get("traceparent").cloned().unwrap_or_default();
        if traceparent.contains(TRACE_ID) {
            break traceparent;
        }
    };
    assert_eq!(sent, format!("00-{TRACE_ID}-{}-01", hex(&client.span_id)));
}

/// A collector served over TLS is trusted through the system's roots, which `SSL_CERT_FILE`
/// names here as an operator would for a private CA.
#[tokio::test]
async fn spans_reach_an_https_collector_trusted_by_the_system_roots() {
    let pki = Pki::new("otlp");
    let mut receiver = Receiver::start_tls(&pki).await;
    let mut command = tokio::process::Command::new(crate::cli::BIN);
    command
        .args(["serve", "--simulator", "--listen", "127.0.0.1:0"])
        .args(["--otlp-endpoint", &receiver.endpoint])
        .env("SSL_CERT_FILE", pki.path("ca.pem"));
    let gateway =
        TaskgateProcess::start_serving(TaskgateProcess::spawn_command(&mut command)).await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    client
        .case_extract(request(4, Some(&traceparent)))
        .await
        .unwrap();
    let server = receiver
        .span("server", |span| span.kind == SpanKind::Server as i32)
        .await;
    assert_eq!(hex(&server.trace_id), TRACE_ID);
    gateway.signal("TERM").await;
    let (code, _) = gateway.finish().await;
    assert_eq!(code, Some(0));
}

/// With `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`, spans are POSTed to the collector's
/// `/v1/traces` under the endpoint given, or to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is.
#[tokio::test]
async fn spans_reach_a_collector_over_http() {
    for traces_variable in [false, true] {
        let mut receiver = Receiver::start_http(None).await;
        let mut command = tokio::process::Command::new(crate::cli::BIN);
        command
            .args(["serve", "--simulator", "--listen", "127.0.0.1:0"])
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
        let traces_url = format!("{}/v1/traces", receiver.endpoint);
        if traces_variable {
            command.env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &traces_url);
        } else {
            command.args(["--otlp-endpoint", &receiver.endpoint]);
        }
        let gateway =
            TaskgateProcess::start_serving(TaskgateProcess::spawn_command(&mut command)).await;
        let started =
            format!("exporting spans over OTLP endpoint={traces_url} protocol=http/protobuf");
        assert!(gateway.log.contains(&started), "{started}\n{}", gateway.log);
        let mut client = TaskServiceClient::connect(gateway.gateway.clone())
            .await
            .unwrap();
        let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
        client
            .case_extract(request(4, Some(&traceparent)))
            .await
            .unwrap();
        let server = receiver
            .span("server", |span| span.kind == SpanKind::Server as i32)
            .await;
        assert_eq!(hex(&server.trace_id), TRACE_ID);
        let upstream = receiver
            .span("client", |span| span.kind == SpanKind::Client as i32)
            .await;
        assert_eq!(upstream.parent_span_id, server.span_id);
        gateway.signal("TERM").await;
        let (code, log) = gateway.finish().await;
        assert_eq!(code, Some(0), "{log}");
    }
}

/// Over HTTP too, an https:// collector is trusted by the system's roots, which
/// `SSL_CERT_FILE` replaces here with the test CA.
#[tokio::test]
async fn spans_reach_an_https_collector_over_http() {
    let pki = Pki::new("otlp-http");
    let mut receiver = Receiver::start_http(Some(&pki)).await;
    let mut command = tokio::process::Command::new(crate::cli::BIN);
    command
        .args(["serve", "--simulator", "--listen", "127.0.0.1:0"])
        .args(["--otlp-endpoint", &receiver.endpoint])
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("SSL_CERT_FILE", pki.path("ca.pem"));
    let gateway =
        TaskgateProcess::start_serving(TaskgateProcess::spawn_command(&mut command)).await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    client
        .case_extract(request(4, Some(&traceparent)))
        .await
        .unwrap();
    let server = receiver
        .span("server", |span| span.kind == SpanKind::Server as i32)
        .await;
    assert_eq!(hex(&server.trace_id), TRACE_ID);
    gateway.signal("TERM").await;
    let (code, log) = gateway.finish().await;
    assert_eq!(code, Some(0), "{log}");
}

/// A failed connect is tried once more, and each try is a client span of its own under the
/// call's server span: both fail as `unreachable`, the second marked as a resend.
#[tokio::test]
async fn each_try_at_an_unreachable_controller_is_a_client_span() {
    let mut receiver = Receiver::start().await;
    let upstream = format!("http://{}/api/v2/task", support::unused_address().await);
    let gateway =
        TaskgateProcess::start_with_upstream(&upstream, &["--otlp-endpoint", &receiver.endpoint])
            .await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    let status = client
        .case_extract(request(4, Some(&traceparent)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let server = receiver
        .span("server", |span| {
            span.kind == SpanKind::Server as i32 && hex(&span.trace_id) == TRACE_ID
        })
        .await;
    let attempt = |resend: Option<i64>| {
        let parent = server.span_id.clone();
        move |span: &Span| {
            span.kind == SpanKind::Client as i32
                && span.parent_span_id == parent
                && int_attribute(span, "http.request.resend_count") == resend
        }
    };
    let first = receiver.span("first try", attempt(None)).await;
    let second = receiver.span("second try", attempt(Some(1))).await;
    assert_ne!(first.span_id, second.span_id);
    for span in [first, second] {
        assert_eq!(
            attribute(&span, "error.type").as_deref(),
            Some("unreachable")
        );
        assert_eq!(span.status.unwrap().code, StatusCode::Error as i32);
    }
    gateway.signal("TERM").await;
    let (code, log) = gateway.finish().await;
    assert_eq!(code, Some(0), "{log}");
}

/// The Log Publisher connection that lasts until shutdown is in a trace too: its span ends
/// before export stops, without an error.
#[tokio::test]
async fn the_log_publisher_connection_open_at_shutdown_is_exported() {
    let mut receiver = Receiver::start().await;
    let mut gateway = TaskgateProcess::start(&["--otlp-endpoint", &receiver.endpoint]).await;
    // Logged before or after the "listening" line the start waited for.
    let connected = "Log Publisher connected; case events are streamed";
    if !gateway.log.contains(connected) {
        gateway.wait_for_line(connected).await;
    }
    gateway.signal("TERM").await;
    let (code, log) = gateway.finish().await;
    assert_eq!(code, Some(0), "{log}");
    let span = receiver
        .span("Log Publisher connection", |span| {
            span.name == "log_publisher.connection"
        })
        .await;
    assert_eq!(
        attribute(&span, "taskgate.log_publisher.reconnect").as_deref(),
        Some("false")
    );
    let status = span.status.unwrap_or_default();
    assert_ne!(status.code, StatusCode::Error as i32, "{status:?}");
}

/// A caller that did not sample its trace is followed: its call exports no span, and the
/// controller still gets the trace context, unsampled, so the trace stays whole downstream.
#[tokio::test]
async fn an_unsampled_callers_call_exports_nothing_and_passes_the_context_on() {
    const UNSAMPLED_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    let mut receiver = Receiver::start().await;
    let mut gateway = TaskgateProcess::start(&["--otlp-endpoint", &receiver.endpoint]).await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let unsampled = format!("00-{UNSAMPLED_TRACE}-{CALLER_SPAN_ID}-00");
    client
        .case_extract(request(4, Some(&unsampled)))
        .await
        .unwrap();
    let forwarded = gateway
        .wait_for_line(&format!("traceparent=\"00-{UNSAMPLED_TRACE}-"))
        .await;
    assert!(forwarded.contains("-00\""), "{forwarded}");
    // A sampled call after it: its spans arrive after any the first call would have made.
    let sampled = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    // The port is busy with the first case now: a fault, and still a traced call.
    let _ = client.case_extract(request(4, Some(&sampled))).await;
    receiver
        .span("the sampled call's server span", |span| {
            span.kind == SpanKind::Server as i32 && hex(&span.trace_id) == TRACE_ID
        })
        .await;
    let leaked: Vec<&Span> = receiver
        .seen
        .iter()
        .filter(|span| hex(&span.trace_id) == UNSAMPLED_TRACE)
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
}

/// A WatchCaseEvents stream is one span, from the call to the stream's end: it says how many
/// events the stream carried and how it ended.
#[tokio::test]
async fn a_watch_is_one_span_for_its_streams_life() {
    let mut receiver = Receiver::start().await;
    let mut gateway = TaskgateProcess::start(&["--otlp-endpoint", &receiver.endpoint]).await;
    let client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let mut events = crate::watch::watch(&client, &[4]).await;
    client.clone().case_extract(request(4, None)).await.unwrap();
    crate::watch::next_event(&mut events).await;
    // The caller goes away.
    drop(events);
    let span = receiver
        .span("watch", |span| {
            span.name == "taskgate.v1.TaskService/WatchCaseEvents"
                && attribute(span, "taskgate.watch.events").is_some()
        })
        .await;
    assert_eq!(span.kind, SpanKind::Server as i32);
    let events = int_attribute(&span, "taskgate.watch.events").unwrap();
    assert!(events >= 1, "{span:?}");
    assert_eq!(
        attribute(&span, "taskgate.watch.end").as_deref(),
        Some("stream_closed")
    );
    assert_eq!(
        int_attribute(&span, "rpc.grpc.status_code"),
        Some(1),
        "CANCELLED"
    );
    // The span lasts as long as the stream: it ends after the extraction made during it.
    let extraction = receiver
        .span("extraction", |span| {
            span.name == "taskgate.v1.TaskService/CaseExtract"
        })
        .await;
    assert!(
        span.end_time_unix_nano > extraction.end_time_unix_nano,
        "{span:?}\n{extraction:?}"
    );
    // Its access line, written as the stream ends, names that span.
    let access = gateway.wait_for_line("method=\"watch_case_events\"").await;
    assert!(
        access.contains(&format!(" span_id={} ", hex(&span.span_id))),
        "{access}"
    );
}

/// A watch that ends at its caller's deadline says so on its span, not that its caller went
/// away.
#[tokio::test]
async fn a_watch_ended_by_its_deadline_says_so_on_its_span() {
    let mut receiver = Receiver::start().await;
    let gateway = TaskgateProcess::start(&["--otlp-endpoint", &receiver.endpoint]).await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let mut request =
        tonic::Request::new(taskgate::proto::WatchCaseEventsRequest { port_ids: vec![4] });
    request.set_timeout(Duration::from_millis(500));
    let mut events = client
        .watch_case_events(request)
        .await
        .unwrap()
        .into_inner();
    let ended = within(Duration::from_secs(30), "the watch's deadline", async {
        loop {
            match events.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the watch ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    let span = receiver
        .span("watch", |span| {
            span.name == "taskgate.v1.TaskService/WatchCaseEvents"
                && attribute(span, "taskgate.watch.end").is_some()
        })
        .await;
    assert_eq!(
        attribute(&span, "taskgate.watch.end").as_deref(),
        Some("deadline_reached")
    );
    assert_eq!(int_attribute(&span, "rpc.grpc.status_code"), Some(4));
}

/// Each connection to the Log Publisher is a span of its own: one that ends has an error
/// status with its cause, and the next is marked as a reconnect.
#[tokio::test]
async fn log_publisher_connections_and_reconnects_are_spans() {
    let mut receiver = Receiver::start().await;
    // A Log Publisher that hangs up on every connection at once.
    let publisher = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let publisher_address = publisher.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = publisher.accept().await {
            drop(stream);
        }
    });
    let upstream = format!("http://{}/api/v2/task", support::unused_address().await);
    let _gateway = TaskgateProcess::start_with_upstream(
        &upstream,
        &[
            "--otlp-endpoint",
            &receiver.endpoint,
            "--log-publisher",
            &publisher_address.to_string(),
        ],
    )
    .await;
    let is_connection = |reconnect: &'static str| {
        move |span: &Span| {
            span.name == "log_publisher.connection"
                && attribute(span, "taskgate.log_publisher.reconnect").as_deref() == Some(reconnect)
        }
    };
    let first = receiver
        .span("first connection", is_connection("false"))
        .await;
    let again = receiver.span("reconnection", is_connection("true")).await;
    for span in [first, again] {
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(
            int_attribute(&span, "server.port"),
            Some(i64::from(publisher_address.port()))
        );
        let status = span.status.unwrap();
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "the Log Publisher closed the connection");
    }
}

/// A collector that refuses every export costs spans, not calls: they are counted as dropped
/// on /metrics, and the failure is logged once, not once per export.
#[tokio::test]
async fn spans_a_collector_refuses_are_counted_and_logged_once_a_minute() {
    for protocol in ["grpc", "http/protobuf"] {
        let endpoint = format!("http://{}", support::unused_address().await);
        let mut command = tokio::process::Command::new(crate::cli::BIN);
        command
            .args(["serve", "--simulator", "--listen", "127.0.0.1:0"])
            .args([
                "--otlp-endpoint",
                &endpoint,
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol);
        let gateway =
            TaskgateProcess::start_serving(TaskgateProcess::spawn_command(&mut command)).await;
        let mut client = TaskServiceClient::connect(gateway.gateway.clone())
            .await
            .unwrap();
        let metrics_url = gateway.metrics_url();
        let dropped = "taskgate_spans_dropped_total{reason=\"export_failed\"}";
        for exports in 1..=2 {
            let _ = client.case_extract(request(4, None)).await;
            // Each call's two spans (server and client) go in a batch of their own, a second
            // after they end, once the previous batch has failed.
            support::scrape_at_least(&metrics_url, dropped, f64::from(exports * 2)).await;
        }
        gateway.signal("TERM").await;
        let (code, log) = gateway.finish().await;
        assert_eq!(code, Some(0));
        let warnings: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("cannot export spans to the OTLP collector"))
            .collect();
        assert_eq!(warnings.len(), 1, "{protocol}: {log}");
        // The cause is the transport's, over HTTP too, where the exporter says only "network
        // error".
        assert!(
            warnings[0].contains("Connection refused"),
            "{protocol}: {}",
            warnings[0]
        );
    }
}

/// A call refused before its handler (here for its missing token) is traced like any other:
/// its span has its code, and, the caller being at fault, no error status.
#[tokio::test]
async fn a_call_refused_before_its_handler_is_traced_too() {
    let mut receiver = Receiver::start().await;
    let tokens = support::TestFile::new("otlp-tokens", "tokens", "secret-token\n");
    let gateway = TaskgateProcess::start(&[
        "--otlp-endpoint",
        &receiver.endpoint,
        "--auth-tokens-file",
        tokens.to_str().unwrap(),
    ])
    .await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    let status = client
        .case_extract(request(4, Some(&traceparent)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let server = receiver
        .span("server", |span| span.kind == SpanKind::Server as i32)
        .await;
    assert_eq!(hex(&server.trace_id), TRACE_ID);
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN_ID);
    assert_eq!(int_attribute(&server, "rpc.grpc.status_code"), Some(16));
    let span_status = server.status.unwrap_or_default();
    assert_eq!(
        span_status.code,
        StatusCode::Unset as i32,
        "{span_status:?}"
    );
}

/// The standard variables work as in every OpenTelemetry SDK: the service name and resource
/// attributes are the operator's, and a sampler that keeps no trace the gateway starts still
/// follows a caller that sampled its own.
#[tokio::test]
async fn the_standard_variables_name_the_service_and_choose_the_sampler() {
    let mut receiver = Receiver::start().await;
    let mut command = tokio::process::Command::new(crate::cli::BIN);
    command
        .args(["serve", "--simulator", "--listen", "127.0.0.1:0"])
        .args(["--otlp-endpoint", &receiver.endpoint])
        .env("OTEL_SERVICE_NAME", "wms-gateway")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", "0");
    let gateway =
        TaskgateProcess::start_serving(TaskgateProcess::spawn_command(&mut command)).await;
    assert!(
        gateway.log.contains("exporting spans over OTLP endpoint="),
        "{}",
        gateway.log
    );
    assert!(
        gateway
            .log
            .contains("sampler=parentbased_traceidratio ratio=0"),
        "{}",
        gateway.log
    );
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    // Started here: not sampled at a ratio of 0.
    client.case_get_state(state_request()).await.unwrap();
    // Sampled by its caller: followed.
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    client
        .case_extract(request(4, Some(&traceparent)))
        .await
        .unwrap();
    receiver
        .span("server", |span| span.kind == SpanKind::Server as i32)
        .await;
    // Spans leave in the order they ended: had the first call's been sampled, they would have
    // arrived by now.
    let traces: Vec<String> = receiver
        .seen
        .iter()
        .map(|span| hex(&span.trace_id))
        .collect();
    assert!(traces.iter().all(|trace| trace == TRACE_ID), "{traces:?}");
    let resource = receiver.resource_attributes();
    for expected in ["service.name=wms-gateway", "deployment.environment=test"] {
        assert!(resource.contains(&expected.to_owned()), "{resource:?}");
    }
    gateway.signal("TERM").await;
    let _ = gateway.finish().await;
}

/// `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` turn export off whatever the
/// endpoint, as in every SDK: no exporter starts and no span leaves.
#[tokio::test]
async fn the_standard_variables_can_turn_export_off() {
    for variable in [
        ("OTEL_SDK_DISABLED", "true"),
        // Enum values are read without regard to case, as the specification has it.
        ("OTEL_TRACES_EXPORTER", "None"),
    ] {
        let mut command = tokio::process::Command::new(crate::cli::BIN);
        command
            .args(["serve", "--simulator", "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env(OTEL_ENDPOINT, "http://127.0.0.1:4317")
            .env(variable.0, variable.1);
        let gateway =
            TaskgateProcess::start_serving(TaskgateProcess::spawn_command(&mut command)).await;
        assert!(
            !gateway.log.contains("exporting spans over OTLP"),
            "{variable:?}: {}",
            gateway.log
        );
        // The endpoint given is not silently ignored: the log says what turned export off.
        let turned_off = if variable.0 == "OTEL_SDK_DISABLED" {
            "OTEL_SDK_DISABLED=true"
        } else {
            "OTEL_TRACES_EXPORTER=none"
        };
        let expected = format!(
            "WARN taskgate::otel: spans are not exported: {turned_off} turns export off whatever \
             the OTLP endpoint endpoint=http://127.0.0.1:4317/"
        );
        assert!(
            gateway.log.contains(&expected),
            "{expected}\n{}",
            gateway.log
        );
        // Without export, the latency histogram carries no exemplars, so a traced call leaves
        // none.
        let mut client = TaskServiceClient::connect(gateway.gateway.clone())
            .await
            .unwrap();
        let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
        client
            .case_extract(request(4, Some(&traceparent)))
            .await
            .unwrap();
        let metrics = support::http_client()
            .get(gateway.metrics_url())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains("taskgate_call_duration_seconds_bucket"),
            "{metrics}"
        );
        assert!(!metrics.contains("trace_id="), "{variable:?}: {metrics}");
        gateway.signal("TERM").await;
        let _ = gateway.finish().await;
    }
}

const OTEL_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

fn state_request() -> tonic::Request<taskgate::proto::CaseGetStateRequest> {
    tonic::Request::new(taskgate::proto::CaseGetStateRequest { port_id: 4 })
}
