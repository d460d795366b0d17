//! `taskgate health`: the gateway's own gRPC health check (`grpc.health.v1.Health/Check`, for the
//! whole server or the service `--service` names), for probes that have no grpc_health_probe at
//! hand, as a container's `HEALTHCHECK`.
//!
//! It prints one line and exits 0 only when the gateway answers SERVING, so that a probe needs
//! nothing but the exit code.

use std::time::Duration;

use clap::Args;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use taskgate::config::redact_url;
use taskgate::fault;

use super::{Exit, Outcome, connect, duration, gateway_endpoint, output, usage};

#[derive(Debug, Args)]
pub(super) struct HealthArgs {
    /// The gateway's address: http://HOST:PORT, or https://HOST:PORT for one serving TLS.
    /// Health needs no token.
    #[arg(
        long,
        env = "TASKGATE_GATEWAY",
        default_value = "http://127.0.0.1:50051"
    )]
    gateway: String,

    /// How long the connection and the check may take together, for example 2s.
    #[arg(long, env = "TASKGATE_TIMEOUT", default_value = "5s", value_parser = duration)]
    timeout: Duration,

    /// The service whose health is asked: "" (the default, the whole server) and
    /// "taskgate.v1.TaskService" are NOT_SERVING while the controller cannot be reached;
    /// "liveness" is SERVING whatever the controller does, for a probe that restarts the gateway
    /// (a container's HEALTHCHECK). All three fail once shutdown has begun; any other name is
    /// NOT_FOUND.
    #[arg(long, default_value = "")]
    service: String,
}

/// Asks the gateway for the health of `--service` (`""`, the whole server, by default): exit 0
/// when SERVING, 1 for any other answer, an error status (NOT_FOUND for a name the gateway does
/// not report), or a gateway that cannot be reached within `--timeout`.
pub(super) async fn health(args: HealthArgs) -> Outcome {
    let endpoint = gateway_endpoint(&args.gateway, args.timeout).map_err(usage)?;
    let what = match args.service.as_str() {
        "" => format!("health {}", redact_url(&args.gateway)),
        service => format!("health {} {service:?}", redact_url(&args.gateway)),
    };
    // The connect is bounded by the endpoint's connect timeout, the call by its timeout.
    let channel = connect(&endpoint, &args.gateway)
        .await
        .map_err(|error| (Exit::CallFailed, error))?;
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: args.service,
    });
    request.set_timeout(args.timeout);
    let (line, exit) = match HealthClient::new(channel).check(request).await {
        Ok(response) => match response.into_inner().status() {
            ServingStatus::Serving => (format!("ok: {what}: SERVING"), Exit::Success),
            ServingStatus::NotServing => (
                format!(
                    "failed: {what}: NOT_SERVING: the gateway cannot reach its controller (or \
                     its --upstream-proxy), or is shutting down"
                ),
                Exit::CallFailed,
            ),
            other => (
                format!("failed: {what}: {}", other.as_str_name()),
                Exit::CallFailed,
            ),
        },
        Err(status) => (
            format!(
                "failed: {what}: {}: {}",
                fault::grpc_code_name(status.code()),
                status.message()
            ),
            Exit::CallFailed,
        ),
    };
    output::exit_after(output::line(line), exit)
}
