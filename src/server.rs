//! Wiring: a bound listener, a config and a shutdown future become a running gateway, with
//! health and reflection beside the task service.
//!
//! The binary, the tests and `serve --simulator` all start the gateway through [`serve`], so
//! what the tests exercise is what runs in production.
//!
//! The gRPC port has its own accept loop rather than tonic's `serve_with_incoming_shutdown`, so
//! that each connection can be limited and watched (`connection`): tonic's loop has no
//! handshake, idle or connection limit, and at shutdown waits for every connection, idle or
//! not, to close.

use std::future::Future;
use std::num::NonZeroU32;
use std::time::Duration;

use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tonic::codegen::http::{HeaderName, HeaderValue, Method};
use tonic::service::Routes;
use tonic_web::GrpcWebLayer;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::accept::Acceptor;
use crate::auth::{self, Authenticator};
use crate::call::CallLayer;
use crate::connection::{self, Admission, Connections, RequestKind};
use crate::console::{self, ConsoleLayer, Timeouts};
use crate::health::{Health, WatchLimit};
use crate::log_publisher::client::{self as log_publisher_client, Target};
use crate::metrics::Metrics;
use crate::nofile::{self, FdBudget};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::task_service_server::TaskServiceServer;
use crate::service::TaskGateway;
use crate::shutdown::Hangups;
use crate::upstream::Upstream;
use crate::watch::Watches;

/// The largest request message accepted, by every service: every task-interface request is a
/// few integers, and a health or reflection request a name, so anything bigger is a mistake or
/// an attack, refused before it is decoded.
const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// HTTP/2 pings find dead client connections (a pulled cable, a crashed pod) that TCP alone would
/// keep for hours.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How much request data a client may send on each stream before the gateway has read it, and
/// on a connection before [`PER_STREAM_WINDOW`] is added: HTTP/2's own default (RFC 9113, section
/// 6.9.2), where hyper's is 1 MiB of memory a client can fill on every connection. A request
/// message is at most [`MAX_REQUEST_BYTES`], so a call waits for a window update only when the
/// connection's window is full of other calls' largest messages.
const HTTP2_WINDOW: u32 = 65_535;
/// What each stream `--max-concurrent-streams` allows adds to a connection's window. h2 sends
/// GOAWAY (`ENHANCE_YOUR_CALM`, "too_many_data_frames") once the small DATA frames it holds
/// unread count for more than half the connection's window, each as 256 bytes less its payload.
/// A client that starts every call it may at once, each sending its message in a frame of its
/// own (tonic's clients then end the stream with an empty frame, which h2 does not count), has
/// up to one such frame per stream waiting before the stream's task reads it; this leaves room
/// for two, on top of HTTP/2's default.
const PER_STREAM_WINDOW: u32 = 1024;
/// How much of a stream's response may wait for the client's flow-control window: hyper's
/// default is 400 KiB a stream, 100 MiB for a connection of 256 streams that stop reading.
/// Every response message is far smaller (a watch event is some 40 bytes), so a stream that
/// reads keeps up.
const HTTP2_MAX_SEND_BUFFER: usize = 64 * 1024;
/// TCP keep-alive, for peers that do not answer HTTP/2 pings.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Requests under this path are calls, which the shutdown log counts apart from other streams
/// (a test checks it against the service's name)...
const TASK_SERVICE_PATH: &str = "/taskgate.v1.TaskService/";
/// ...except this one, a watch, which shutdown ends rather than waits for.
const WATCH_CASE_EVENTS_PATH: &str = "/taskgate.v1.TaskService/WatchCaseEvents";
/// Answered with one message, as the task calls and the console's files are; health Watch
/// streams its answers.
const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
/// Reflection's services (v1 and v1alpha), whose one method answers each request of its stream.
const REFLECTION_PATH: &str = "/grpc.reflection.";

/// The sockets the gateway serves on, bound before `serve` so that binding errors surface at
/// startup and tests can use ephemeral ports.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC: the task service, health and reflection.
    pub grpc: TcpListener,
    /// The Prometheus endpoint, if one was asked for.
    pub metrics: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Self {
        Listeners {
            grpc,
            metrics: None,
        }
    }
}

/// CORS for gRPC-Web from browser pages on other origins. With no origins configured there is no
/// layer at all: no CORS headers are sent, so browsers refuse cross-origin calls, and calls do
/// not pay for the `Vary` header the layer would add to every response.
fn cors_layer(allow_origins: &[HeaderValue]) -> Option<CorsLayer> {
    const ALLOW_HEADERS: [&str; 9] = [
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "authorization",
        "x-request-id",
        "grpc-accept-encoding",
        // W3C trace context, which a traced page sends with every call.
        "traceparent",
        "tracestate",
    ];
    const EXPOSE_HEADERS: [&str; 4] = [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "x-request-id",
    ];
    if allow_origins.is_empty() {
        return None;
    }
    let origin = if allow_origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(allow_origins.iter().cloned())
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::POST])
            .allow_headers(ALLOW_HEADERS.map(HeaderName::from_static))
            .expose_headers(EXPOSE_HEADERS.map(HeaderName::from_static))
            .max_age(Duration::from_secs(24 * 60 * 60)),
    )
}

/// Aborts a background task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

mod config;
mod metrics_endpoint;

pub use config::Config;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting makes no sense (for example, a zero health interval).
    #[error("invalid configuration")]
    Config(#[source] crate::config::ConfigError),
    /// The HTTP client for the controller could not be built (for example, no TLS roots).
    #[error("cannot build the controller client")]
    Client(#[source] crate::upstream::ClientError),
    /// The reflection service could not read the descriptor set that `build.rs` wrote.
    #[error("cannot build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
}

/// Serves the gateway on `listener` until `shutdown` resolves, then closes idle connections and
/// lets calls in flight finish for at most `config.shutdown_grace`. Each of `hangups` reloads
/// the token file: the caller catches them before binding the listeners, so that a reload sent
/// as soon as a port accepts is applied once the gateway is ready rather than lost.
pub async fn serve(
    listeners: impl Into<Listeners>,
    config: Config,
    shutdown: impl Future<Output = ()>,
    hangups: Hangups,
) -> Result<(), ServeError> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
    } = listeners.into();
    // The CLI checks too, but library callers build configs by hand, and a zero interval would
    // panic the health probe.
    config.validate().map_err(ServeError::Config)?;
    let mut upstream = Upstream::new(&config.upstream).map_err(ServeError::Client)?;
    // Set when the shutdown grace runs out: calls still waiting for the controller stop
    // waiting and answer so, rather than end with their connection as if nothing was sent.
    let (grace_ran_out, stop_waiting) = tokio::sync::watch::channel(None);
    upstream.stop_waiting_on(stop_waiting);
    let metrics = Metrics::new();
    // Stops the metrics endpoint when the gateway stops, however `serve` returns.
    let metrics_listener_given = metrics_listener.is_some();
    let _metrics_endpoint = metrics_listener.map(|metrics_listener| {
        if let Ok(address) = metrics_listener.local_addr() {
            tracing::info!(url = %format!("http://{address}{}", metrics_endpoint::METRICS_PATH), "metrics listening");
        }
        let endpoint = metrics_endpoint::serve(
            metrics_listener,
            config.metrics_limits,
            metrics.clone(),
            std::future::pending(),
        );
        AbortOnDrop(tokio::spawn(endpoint).abort_handle())
    });
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Any peer may call health and reflection too, and tonic's own limit is 4 MiB a message.
    let health_service = health_service.max_decoding_message_size(MAX_REQUEST_BYTES);
    let health = Health::start(
        reporter,
        &config.upstream,
        config.health_interval,
        metrics.clone(),
    )
    .await;
    // Health's descriptors too, so that generic tools (grpcurl) can call it without its proto.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServeError::Reflection)?
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(ServeError::Reflection)?
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let task_upstream_url = upstream.url().clone();
    let watches = config
        .log_publisher
        .as_ref()
        .map(|address| Watches::new(config.watches, address.to_string(), metrics.clone()));
    // Stops the feed when the gateway stops, however `serve` returns (a `JoinSet` aborts its
    // tasks when dropped).
    let mut feed = tokio::task::JoinSet::new();
    if let (Some(address), Some(watches)) = (&config.log_publisher, &watches) {
        let target = Target {
            address: address.clone(),
            tls: address
                .tls
                .then(|| config.upstream.tls.stream_config())
                .transpose()
                .map_err(|error| ServeError::Client(crate::upstream::ClientError::Tls(error)))?,
        };
        feed.spawn(log_publisher_client::run(target, watches.clone()));
    }
    let service = TaskGateway::new(upstream, &config.upstream, watches.clone(), &metrics);
    let task_service = TaskServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    let (authenticator, reloads) = match config.auth_tokens.clone() {
        Some(token_file) => {
            tracing::info!(file = %token_file.path().display(), tokens = token_file.len(), "task calls need a bearer token; SIGHUP or a change of the file reloads it");
            let authenticator = Authenticator::new(token_file);
            let on_sighup = auth::reload_on_sighup(hangups, authenticator.clone());
            let on_change = auth::reload_on_change(authenticator.clone());
            let reloader = tokio::spawn(async move {
                tokio::join!(on_sighup, on_change);
            });
            (Some(authenticator), reloader)
        }
        None => (
            None,
            tokio::spawn(hangups.handle(|| {
                tracing::info!("received SIGHUP; nothing to reload without --auth-tokens-file")
            })),
        ),
    };
    let _reloads = AbortOnDrop(reloads.abort_handle());
    let task_service = auth::Guarded::new(task_service, authenticator);
    let health_service = WatchLimit::new(
        health_service,
        config.max_health_watches.get(),
        metrics.clone(),
    );
    let routes = Routes::new(task_service)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare();
    let console = config.console.as_ref().map(|console| {
        ConsoleLayer::new(
            console,
            config.auth_tokens.is_some(),
            Timeouts {
                upstream: config.upstream.timeout,
                idempotency_window: config.upstream.idempotency_window,
            },
        )
    });
    // The first layer is the outermost, as with tonic's `Server::layer`.
    let service = ServiceBuilder::new()
        // The page and its files, same-origin and not calls: no CORS, metrics or access line.
        .option_layer(console)
        .option_layer(cors_layer(&config.cors_allow_origins))
        // gRPC-Web arrives over HTTP/1.1 from browsers, on the same port as gRPC.
        .layer(GrpcWebLayer::new())
        // Outside auth and the protocol checks: a call they refuse is logged and counted too.
        .layer(CallLayer::new(
            metrics.clone(),
            config.access_log,
            grace_ran_out.subscribe(),
        ))
        .layer(crate::protocol::ProtocolLayer)
        .service(routes);
    let controller_connections =
        crate::config::controller_connections(config.upstream.max_in_flight).get();
    let max_connections = config.connections.max_connections.unwrap_or_else(|| {
        nofile::default_max_connections(
            nofile::soft_limit(),
            controller_connections,
            metrics_connections(&config, metrics_listener_given),
        )
    });
    FdBudget {
        max_connections: max_connections.get(),
        controller_connections,
        metrics_connections: metrics_connections(&config, metrics_listener_given),
    }
    .warn_if_short(nofile::soft_limit());
    let limits = config.connections.limits();
    let streams = connection::StreamExecutor::default();
    let mut builder = connection::builder(streams.clone());
    builder
        .http2()
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(config.connections.max_concurrent_streams.get())
        .initial_stream_window_size(HTTP2_WINDOW)
        .initial_connection_window_size(connection_window(
            config.connections.max_concurrent_streams,
        ))
        .max_send_buf_size(HTTP2_MAX_SEND_BUFFER);
    let tls = config.tls.as_ref().map(crate::tls::ServerTls::acceptor);
    let mut acceptor = Acceptor::new(listener, metrics.listener("grpc"));
    let local = acceptor.local_addr().ok();
    // Logged last, once everything above is in place: tests and operators may act on it.
    if let Some(address) = local {
        let tls = match &config.tls {
            None => "off",
            Some(tls) if tls.requires_client_certificates() => "on, client certificates required",
            Some(_) => "on",
        };
        let log_publisher = config
            .log_publisher
            .as_ref()
            .map_or_else(|| "off".to_owned(), ToString::to_string);
        let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
        let console = match (&config.console, &config.tls) {
            (None, _) => "off".to_owned(),
            (Some(_), None) => format!("http://{address}/"),
            (Some(_), Some(_)) => format!("https://{address}/"),
        };
        let upstream_proxy = config
            .upstream
            .proxy
            .as_ref()
            .map(|proxy| tracing::field::display(crate::config::shown_proxy(proxy)));
        tracing::info!(%address, upstream = %task_upstream_url, upstream_proxy, %log_publisher, tls, %console, max_connections, worker_threads, "gateway listening");
    }
    let mut connections = Connections::new(limits, max_connections.get(), metrics.listener("grpc"));
    // Each connection's task, so that those the grace leaves running end when `serve` returns.
    let mut connection_tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = acceptor.accept() => accepted,
            // Reaps ended connections, which the set would otherwise keep until `serve` returns.
            Some(ended) = connection_tasks.join_next() => {
                // A bug, not anything a peer did: that connection is gone, the gateway goes on.
                if let Err(error) = ended
                    && error.is_panic()
                {
                    tracing::error!(%error, "a connection's task panicked");
                }
                continue;
            }
        };
        let Some(admission) = connections.admit(peer) else {
            drop(stream);
            continue;
        };
        let service = admission.track(service.clone(), request_kind, local);
        connection_tasks.spawn(serve_grpc_connection(
            builder.clone(),
            stream,
            tls.clone(),
            service,
            admission,
        ));
    }
    let stopping = tokio::time::Instant::now();
    // Closing the listener first makes the kernel refuse new connections at once, rather than
    // queue them until their deadline.
    drop(acceptor);
    // Health flips first, so load balancers stop sending calls before the drain.
    health.shut_down().await;
    // Watches never end on their own: ended now, their callers hear why rather than wait out
    // the grace.
    if let Some(watches) = &watches {
        watches.shut_down();
    }
    connections.begin_shutdown();
    let census = connections.census.counts();
    tracing::info!(
        grace = %humantime::format_duration(config.shutdown_grace),
        calls = census.calls,
        watches = census.watches,
        streams = census.streams,
        "no longer accepting calls; idle connections and partial requests are closed, calls and streams in flight may finish"
    );
    // The end of the grace is kept for the calls it cuts off: to answer them, and to send
    // their spans.
    let kept = CUT_OFF_RESERVE.min(config.shutdown_grace / 4);
    let drained =
        tokio::time::timeout(config.shutdown_grace - kept, connections.all_closed()).await;
    let census = connections.census.counts();
    let left = || config.shutdown_grace.saturating_sub(stopping.elapsed());
    if drained.is_err() {
        tracing::warn!(
            calls = census.calls,
            watches = census.watches,
            streams = census.streams,
            "shutdown grace ran out; calls waiting for the controller are answered SHUTDOWN_GRACE_RAN_OUT, and what is still running then ends with the process"
        );
        grace_ran_out.send_replace(Some(config.shutdown_grace));
        // Half of what is left at most, for the answers to be written; the rest is the
        // export's.
        let _ = tokio::time::timeout(left() / 2, connections.all_closed()).await;
    }
    // Ends whatever the grace left running, and waits a little for it to end, so that the
    // spans of the calls cut off end before the export queue closes rather than after.
    connection_tasks.abort_all();
    let reaping = async { while connection_tasks.join_next().await.is_some() {} };
    // Half of what is left at most, so the export keeps the rest.
    let _ = tokio::time::timeout(ABORTED_CONNECTIONS_WAIT.min(left() / 2), reaping).await;
    // An HTTP/2 call's handler runs in a stream task of its own, which ends once it sees its
    // connection gone.
    streams
        .all_ended(ABORTED_CONNECTIONS_WAIT.min(left() / 2))
        .await;
    // The Log Publisher connection's span ends with it, before the export stops.
    feed.abort_all();
    let feed_ended = async { while feed.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(ABORTED_CONNECTIONS_WAIT.min(left() / 2), feed_ended).await;
    // The spans of the calls just ended, in what is left of the grace: a collector that does
    // not answer must not hold the exit.
    crate::otel::flush(left()).await;
    tracing::info!(
        closed_idle = census.closed_idle,
        closed_partial = census.closed_partial,
        "gateway stopped"
    );
    Ok(())
}

/// How long shutdown waits for the connections the grace left running to end once aborted:
/// an aborted task ends at its next poll, so this bounds only a runtime too busy to poll it.
const ABORTED_CONNECTIONS_WAIT: Duration = Duration::from_secs(1);

/// The most of the shutdown grace kept for the calls it cuts off, to answer them and send
/// their spans; a quarter of the grace when that is less.
const CUT_OFF_RESERVE: Duration = Duration::from_secs(1);

/// One gRPC connection: TCP settings, the TLS handshake within the handshake timeout, then HTTP.
async fn serve_grpc_connection<S>(
    builder: auto::Builder<connection::StreamExecutor>,
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    service: connection::Tracked<S>,
    mut admission: Admission,
) where
    connection::Tracked<S>: Clone,
    S: tower::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    set_tcp_options(&stream);
    match tls {
        None => admission.serve(&builder, stream, service).await,
        Some(tls) => match admission.within_handshake(tls.accept(stream)).await {
            Some(Ok(stream)) => admission.serve(&builder, stream, service).await,
            Some(Err(error)) => tracing::debug!(cause = %error, "TLS handshake failed"),
            None => {}
        },
    }
}

/// Nodelay, since every gRPC message is a small write that must go out at once; keep-alive for
/// peers that vanish without a word. Failures only cost latency or a late close, so they are
/// logged, not fatal.
fn set_tcp_options(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let outcome = stream
        .set_nodelay(true)
        .and_then(|()| socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive));
    if let Err(error) = outcome {
        tracing::debug!(cause = %error, "cannot set TCP options on a connection");
    }
}

/// What a request on the gRPC port is, by its path.
fn request_kind(path: &str) -> RequestKind {
    if path == WATCH_CASE_EVENTS_PATH {
        RequestKind::Watch
    } else if path.starts_with(TASK_SERVICE_PATH) {
        RequestKind::Call
    } else if path == HEALTH_CHECK_PATH
        || path == console::PAGE_PATH
        || path.starts_with(console::FILES_PATH)
        || console::REDIRECTED_PATHS.contains(&path)
    {
        RequestKind::Other
    } else if path.starts_with(REFLECTION_PATH) {
        RequestKind::Exchange
    } else {
        RequestKind::Stream
    }
}

/// Connections to `/metrics`, when it is served.
fn metrics_connections(config: &Config, metrics_served: bool) -> usize {
    if metrics_served {
        config.metrics_limits.max_connections.get()
    } else {
        0
    }
}

/// A connection's flow-control window: HTTP/2's default, and [`PER_STREAM_WINDOW`] for each
/// stream it may have open. At most 100,000 streams keep it far below HTTP/2's largest window.
fn connection_window(max_concurrent_streams: NonZeroU32) -> u32 {
    /// HTTP/2's largest window (RFC 9113, section 6.9.1); h2 panics on a larger one.
    const MAX_WINDOW: u32 = (1 << 31) - 1;
    max_concurrent_streams
        .get()
        .saturating_mul(PER_STREAM_WINDOW)
        .saturating_add(HTTP2_WINDOW)
        .min(MAX_WINDOW)
}

#[cfg(test)]
mod tests {
    use crate::config::defaults;
    use crate::proto::task_service_server::SERVICE_NAME;

    use super::*;

    #[test]
    fn calls_and_watches_are_told_apart_by_their_paths() {
        assert_eq!(TASK_SERVICE_PATH, format!("/{SERVICE_NAME}/"));
        assert_eq!(
            WATCH_CASE_EVENTS_PATH,
            format!("/{SERVICE_NAME}/WatchCaseEvents")
        );
        assert_eq!(
            HEALTH_CHECK_PATH,
            format!(
                "/{}/Check",
                <tonic_health::pb::health_server::HealthServer<
                    tonic_health::server::HealthService,
                > as tonic::server::NamedService>::NAME
            )
        );
        assert_eq!(request_kind(HEALTH_CHECK_PATH), RequestKind::Other);
        assert_eq!(
            request_kind("/grpc.health.v1.Health/Watch"),
            RequestKind::Stream
        );
        assert_eq!(request_kind(console::CONFIG_PATH), RequestKind::Other);
        for reflection in [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(request_kind(reflection), RequestKind::Exchange);
        }
    }

    /// Every stream a connection may have open can wait with two small DATA frames unread
    /// before h2 counts the connection as a flood: half the window, at 256 bytes a frame.
    #[test]
    fn a_connection_window_holds_two_small_frames_of_every_stream() {
        for streams in [1, 16, 100, 256, 1000, 100_000] {
            let window = connection_window(NonZeroU32::new(streams).unwrap());
            assert!(window >= HTTP2_WINDOW, "{streams}: {window}");
            assert!(window / 2 >= streams * 2 * 256, "{streams}: {window}");
        }
        assert_eq!(connection_window(defaults::MAX_CONCURRENT_STREAMS), 327_679);
        assert_eq!(connection_window(NonZeroU32::MAX), (1 << 31) - 1);
    }

    /// The README's worst case for a busy connection follows from the settings it rests on: the
    /// idle cost, the connection window, the stream limit, the send buffer and the defaults.
    #[test]
    fn the_readme_states_what_a_busy_connection_can_hold() {
        const KIB: usize = 1024;
        const MIB: f64 = 1024.0 * 1024.0;
        const GIB: f64 = MIB * 1024.0;
        // A stream's request headers (85 KiB in memory for 471 one- to three-character fields,
        // the most the 16 KiB header list allows) and tonic's 8 KiB decode buffer, rounded up.
        const STREAM: usize = 96 * KIB;
        // tonic's encoder yields chunks of about 32 KiB (its default yield threshold).
        const TONIC_CHUNK: usize = 32 * KIB;
        let window = (HTTP2_WINDOW as usize).div_ceil(KIB) * KIB;
        let watch = HTTP2_MAX_SEND_BUFFER + 2 * TONIC_CHUNK;
        let idle = nofile::CONNECTION_COST;
        let streams = defaults::MAX_CONCURRENT_STREAMS.get() as usize;
        // Each stream's share of the connection's window is paid for once per stream.
        let per_stream = STREAM + PER_STREAM_WINDOW as usize;
        let busy = |streams: usize| idle + window + streams * per_stream;
        let watches = defaults::MAX_WATCHES.get() + defaults::MAX_HEALTH_WATCHES.get();
        let connections = nofile::MAX_DEFAULT_MAX_CONNECTIONS;
        let expected = [
            format!(
                "and the next chunk waits beside it: about {} KiB",
                watch / KIB
            ),
            format!(
                "at most **{} KiB + {} KiB + `--max-concurrent-streams` × {} KiB, {:.1} MiB with \
                 {streams} streams**",
                idle / KIB,
                window / KIB,
                per_stream / KIB,
                busy(streams) as f64 / MIB,
            ),
            format!(
                "adds up to {} KiB (above), over all connections at most `--max-watches` + \
                 `--max-health-watches` of them ({:.1} GiB with the defaults)",
                watch / KIB,
                (watches * watch) as f64 / GIB
            ),
            format!(
                "budget `--max-connections` × ({} KiB + `--max-concurrent-streams` × {} KiB)",
                (idle + window) / KIB,
                per_stream / KIB
            ),
            format!(
                "with `--max-concurrent-streams 16`, a connection's worst case is {:.1} MiB, \
                 {:.1} GiB for 6,553 connections",
                busy(16) as f64 / MIB,
                (connections * busy(16)) as f64 / GIB
            ),
            format!(
                "within {} MiB (that would be {} connections)",
                nofile::CONNECTIONS_MEMORY_BUDGET / (1024 * KIB),
                nofile::CONNECTIONS_MEMORY_BUDGET / busy(streams)
            ),
        ];
        assert_eq!(connections, 6553, "the README names 6,553 connections");
        let readme = include_str!("../README.md")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for sentence in expected {
            assert!(
                readme.contains(&sentence),
                "README.md does not say: {sentence}"
            );
        }
    }
}
