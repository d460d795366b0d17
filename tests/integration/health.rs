//! Health (`grpc.health.v1`) and reflection, as standard clients see them.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::Streaming;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use taskgate::config::parse_upstream_url;
use taskgate::server::Config as GatewayConfig;
use taskgate::shutdown::Hangups;

use crate::support::{CALL_LIMIT, Gateway, PROMPTLY, within};

const TASK_SERVICE: &str = "taskgate.v1.TaskService";

/// A stand-in controller: a listener that accepts and closes connections, which is all the
/// health probe ever does.
async fn controller_at(address: &str) -> TcpListener {
    TcpListener::bind(address).await.unwrap()
}

fn accept_forever(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    })
}

async fn watch(channel: Channel, service: &str) -> Streaming<HealthCheckResponse> {
    HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Reads the Watch stream until it reports `expected`; fails the test if it has not within
/// [`CALL_LIMIT`].
async fn wait_for(stream: &mut Streaming<HealthCheckResponse>, expected: ServingStatus) {
    let reported = async {
        loop {
            let message = stream
                .message()
                .await
                .unwrap()
                .expect("the Watch stream ended");
            if message.status() == expected {
                return;
            }
        }
    };
    let what_failed = format!("health Watch did not report {expected:?}");
    within(CALL_LIMIT, &what_failed, reported).await;
}

async fn check(channel: Channel, service: &str) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

#[tokio::test]
async fn health_follows_the_controller_and_flips_at_shutdown() {
    let listener = controller_at("127.0.0.1:0").await;
    let address = listener.local_addr().unwrap().to_string();
    let controller = accept_forever(listener);
    let url = parse_upstream_url(&format!("http://{address}/api/v2/task")).unwrap();
    let mut gateway = Gateway::builder()
        .upstream(&url)
        .config(|config| config.health_interval = Duration::from_millis(20))
        .start()
        .await;
    let channel = gateway.client_channel().await;

    let mut task_service = watch(channel.clone(), TASK_SERVICE).await;
    wait_for(&mut task_service, ServingStatus::Serving).await;
    assert_eq!(check(channel.clone(), "").await, ServingStatus::Serving);

    controller.abort();
    let _ = controller.await;
    wait_for(&mut task_service, ServingStatus::NotServing).await;
    assert_eq!(check(channel.clone(), "").await, ServingStatus::NotServing);

    let controller = accept_forever(controller_at(&address).await);
    wait_for(&mut task_service, ServingStatus::Serving).await;

    let mut server = watch(channel.clone(), "").await;
    wait_for(&mut server, ServingStatus::Serving).await;
    gateway.begin_shutdown();
    wait_for(&mut server, ServingStatus::NotServing).await;
    wait_for(&mut task_service, ServingStatus::NotServing).await;
    // Watch streams end at shutdown, so they do not hold up the drain.
    let end = within(PROMPTLY, "the Watch stream did not end", server.message()).await;
    assert!(end.unwrap().is_none());
    gateway.join().await.unwrap();
    controller.abort();
}

#[tokio::test]
async fn health_is_not_serving_while_the_controller_was_never_reached() {
    let address = crate::support::unused_address().await;
    let url = parse_upstream_url(&format!("http://{address}/api/v2/task")).unwrap();
    let gateway = Gateway::builder()
        .upstream(&url)
        .config(|config| config.health_interval = Duration::from_millis(20))
        .start()
        .await;
    let channel = gateway.client_channel().await;
    let mut stream = watch(channel.clone(), TASK_SERVICE).await;
    wait_for(&mut stream, ServingStatus::NotServing).await;
    assert_eq!(check(channel, "").await, ServingStatus::NotServing);
}

/// Issue 25: `taskgate health`, a container's HEALTHCHECK, exits 0 only when the gateway is
/// SERVING, and says in one line why not otherwise; `--service liveness` does not follow the
/// controller.
#[tokio::test]
async fn the_health_command_exits_0_only_when_the_gateway_is_serving() {
    let controller = controller_at("127.0.0.1:0").await;
    let address = controller.local_addr().unwrap();
    let controller = accept_forever(controller);
    let url = parse_upstream_url(&format!("http://{address}/api/v2/task")).unwrap();
    let serving = Gateway::builder()
        .upstream(&url)
        .config(|config| config.health_interval = Duration::from_millis(20))
        .start()
        .await;
    let mut stream = watch(serving.client_channel().await, "").await;
    wait_for(&mut stream, ServingStatus::Serving).await;
    let gateway = format!("http://{}", serving.address);
    let (stdout, stderr) = crate::cli::run(&["health", "--gateway", &gateway], 0).await;
    assert_eq!(stdout, format!("ok: health {gateway}: SERVING\n"));
    assert_eq!(stderr, "");
    controller.abort();

    let unreached = crate::support::unused_address().await;
    let url = parse_upstream_url(&format!("http://{unreached}/api/v2/task")).unwrap();
    let not_serving = Gateway::builder()
        .upstream(&url)
        .config(|config| config.health_interval = Duration::from_millis(20))
        .start()
        .await;
    let gateway = format!("http://{}", not_serving.address);
    let (stdout, _) = crate::cli::run(&["health", "--gateway", &gateway], 1).await;
    assert_eq!(
        stdout,
        format!(
            "failed: health {gateway}: NOT_SERVING: the gateway cannot reach its controller (or \
             its --upstream-proxy), or is shutting down\n"
        )
    );
    // What a container's HEALTHCHECK asks: the process serves, whatever the controller does.
    let (stdout, stderr) = crate::cli::run(
        &["health", "--gateway", &gateway, "--service", "liveness"],
        0,
    )
    .await;
    assert_eq!(
        stdout,
        format!("ok: health {gateway} \"liveness\": SERVING\n")
    );
    assert_eq!(stderr, "");
    let (stdout, _) = crate::cli::run(
        &["health", "--gateway", &gateway, "--service", "livenes"],
        1,
    )
    .await;
    assert_eq!(
        stdout,
        format!("failed: health {gateway} \"livenes\": NOT_FOUND: service not registered\n")
    );

    let nobody = format!("http://{}", crate::support::unused_address().await);
    let (stdout, stderr) = crate::cli::run(&["health", "--gateway", &nobody], 1).await;
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with(&format!(
            "error: cannot connect to the gateway at {nobody}: "
        )) && stderr.contains("Connection refused"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let (_, stderr) = crate::cli::run(&["health", "--gateway", "ftp://gateway"], 2).await;
    assert!(
        stderr.starts_with("error: invalid --gateway 'ftp://gateway'"),
        "{stderr}"
    );
}

/// Issue 25: a liveness probe asks for `liveness`, which is SERVING while the controller cannot
/// be reached (so that a controller outage restarts no gateway), and whose Watch ends when
/// shutdown begins, as every health Watch does, so that it does not hold up the drain.
#[tokio::test]
async fn liveness_is_serving_whatever_the_controller_does_until_shutdown() {
    let address = crate::support::unused_address().await;
    let url = parse_upstream_url(&format!("http://{address}/api/v2/task")).unwrap();
    let mut gateway = Gateway::builder()
        .upstream(&url)
        .config(|config| config.health_interval = Duration::from_millis(20))
        .start()
        .await;
    let channel = gateway.client_channel().await;
    let mut server = watch(channel.clone(), "").await;
    wait_for(&mut server, ServingStatus::NotServing).await;
    assert_eq!(
        check(channel.clone(), "liveness").await,
        ServingStatus::Serving
    );
    let mut liveness = watch(channel.clone(), "liveness").await;
    wait_for(&mut liveness, ServingStatus::Serving).await;
    gateway.begin_shutdown();
    let ended = async {
        while let Some(message) = liveness.message().await.unwrap() {
            assert_eq!(message.status(), ServingStatus::Serving);
        }
    };
    within(
        PROMPTLY,
        "the liveness Watch did not end at shutdown",
        ended,
    )
    .await;
    gateway.join().await.unwrap();
}

/// Sends one reflection request on `channel` and returns its answer.
async fn reflect(channel: Channel, message_request: MessageRequest) -> MessageResponse {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message_request),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = within(CALL_LIMIT, "no reflection response", responses.message())
        .await
        .unwrap()
        .unwrap();
    response.message_response.unwrap()
}

#[tokio::test]
async fn reflection_lists_the_task_service() {
    let gateway = Gateway::builder().start().await;
    let channel = gateway.client_channel().await;
    let response = reflect(channel, MessageRequest::ListServices(String::new())).await;
    let MessageResponse::ListServicesResponse(list) = response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    assert!(names.contains(&TASK_SERVICE.to_owned()), "{names:?}");
}

/// Issue 20, item 10: `grpc.health.v1.Health` was "symbol not found", so generic tools could not
/// call it as the README suggests. It is listed, and its file describes Check and Watch.
#[tokio::test]
async fn reflection_resolves_the_health_service() {
    use prost::Message as _;
    const HEALTH: &str = "grpc.health.v1.Health";
    let gateway = Gateway::builder().start().await;
    let channel = gateway.client_channel().await;
    let response = reflect(channel.clone(), MessageRequest::ListServices(String::new())).await;
    let MessageResponse::ListServicesResponse(list) = response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    assert!(names.contains(&HEALTH.to_owned()), "{names:?}");
    let request = MessageRequest::FileContainingSymbol(HEALTH.to_owned());
    let response = reflect(channel, request).await;
    let MessageResponse::FileDescriptorResponse(files) = response else {
        panic!("no file descriptor for {HEALTH}: {response:?}");
    };
    let methods: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .flat_map(|file| file.service)
        .filter(|service| service.name() == "Health")
        .flat_map(|service| service.method)
        .map(|method| method.name().to_owned())
        .collect();
    assert_eq!(methods, ["Check", "Watch"]);
}

/// Generic tools (grpcurl `describe`) see every RPC of the task service, the new ones of issue
/// 10 included.
#[tokio::test]
async fn reflection_describes_every_task_rpc() {
    use prost::Message as _;
    let gateway = Gateway::builder().start().await;
    let channel = gateway.client_channel().await;
    let request = MessageRequest::FileContainingSymbol(TASK_SERVICE.to_owned());
    let MessageResponse::FileDescriptorResponse(files) = reflect(channel, request).await else {
        panic!("no file descriptor for {TASK_SERVICE}");
    };
    let methods: Vec<(String, String, String)> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .flat_map(|file| file.service)
        .filter(|service| service.name() == "TaskService")
        .flat_map(|service| service.method)
        .map(|method| {
            let name = method.name().to_owned();
            (
                name,
                method.input_type().to_owned(),
                method.output_type().to_owned(),
            )
        })
        .collect();
    let mut expected: Vec<(String, String, String)> = ["CaseExtract", "CaseCancel", "CaseGetState"]
        .map(|name| {
            let message = |suffix| format!(".taskgate.v1.{name}{suffix}");
            (name.to_owned(), message("Request"), message("Response"))
        })
        .into();
    expected.push((
        "WatchCaseEvents".to_owned(),
        ".taskgate.v1.WatchCaseEventsRequest".to_owned(),
        ".taskgate.v1.CaseEvent".to_owned(),
    ));
    assert_eq!(methods, expected);
}

#[tokio::test]
async fn serve_refuses_a_zero_health_interval_instead_of_panicking() {
    let url = parse_upstream_url("http://127.0.0.1:9/api/v2/task").unwrap();
    let mut config = GatewayConfig::with_upstream(url);
    config.health_interval = Duration::ZERO;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serve = taskgate::server::serve(listener, config, std::future::pending(), Hangups::catch());
    let outcome = within(PROMPTLY, "serve did not refuse the configuration", serve).await;
    // Each cause is said once: by the error, then by its source, as `{:#}` prints the chain.
    let message = format!("{:#}", anyhow::Error::from(outcome.unwrap_err()));
    assert_eq!(
        message,
        "invalid configuration: --health-interval 0s is out of range 10ms-1h: the probe opens a \
         TCP connection to the controller every interval"
    );
}
