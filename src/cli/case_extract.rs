//! `taskgate case-extract`: one CaseExtract call on a running gateway, its outcome printed for
//! operators.

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use prost::Message as _;
use tonic_types::{StatusExt, pb};

use taskgate::fault;
use taskgate::proto::task_service_client::TaskServiceClient;
use taskgate::proto::{
    CaseExtractRequest, FaultCode, REQUEST_ID_HEADER, TASK_FAULT_TYPE_URL, TaskFault,
};

use super::{Exit, Outcome, bearer_token, connect, duration, gateway_endpoint, usage};

#[derive(Debug, Args)]
pub(super) struct CaseExtractArgs {
    /// The AutoCase port, 1-2000.
    #[arg(long, env = "TASKGATE_PORT")]
    port: u32,

    /// The bin to extract the case from, 1-4000000; it must be the port's selected bin.
    #[arg(long, env = "TASKGATE_BIN")]
    bin: u32,

    /// The gateway's address.
    #[arg(
        long,
        env = "TASKGATE_GATEWAY",
        default_value = "http://127.0.0.1:50051"
    )]
    gateway: String,

    /// The bearer token to send, when the gateway requires one. Prefer the environment variable:
    /// a command-line argument is visible to other users in the process list.
    #[arg(long, env = "TASKGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// The x-request-id to send, to find this call in the gateway's and controller's logs;
    /// default: one the gateway makes.
    #[arg(long, env = "TASKGATE_REQUEST_ID")]
    request_id: Option<String>,

    /// The call's deadline, sent to the gateway as grpc-timeout.
    #[arg(long, env = "TASKGATE_TIMEOUT", default_value = "5s", value_parser = duration)]
    timeout: Duration,
}

pub(super) async fn case_extract(args: CaseExtractArgs) -> Outcome {
    let endpoint = gateway_endpoint(&args.gateway, args.timeout).map_err(usage)?;
    let call_failed = |error: anyhow::Error| (Exit::CallFailed, error);
    let channel = connect(&endpoint, &args.gateway)
        .await
        .map_err(call_failed)?;
    let mut request = tonic::Request::new(CaseExtractRequest {
        port_id: args.port,
        bin_id: args.bin,
    });
    if let Some(token) = &args.token {
        let value = bearer_token(token).map_err(usage)?;
        request.metadata_mut().insert("authorization", value);
    }
    if let Some(request_id) = &args.request_id {
        let value = request_id
            .parse()
            .with_context(|| format!("invalid --request-id '{request_id}'"))
            .map_err(usage)?;
        request.metadata_mut().insert(REQUEST_ID_HEADER, value);
    }
    let what = format!("case_extract port {} bin {}", args.port, args.bin);
    let request_id_of = |metadata: &tonic::metadata::MetadataMap| {
        metadata
            .get(REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("none")
            .to_owned()
    };
    match TaskServiceClient::new(channel).case_extract(request).await {
        Ok(response) => {
            println!("ok: {what}: the controller accepted the case extraction");
            println!("  request id: {}", request_id_of(response.metadata()));
            Ok(Exit::Success)
        }
        Err(status) => {
            println!("{}", describe_status(&what, &status));
            println!("  request id: {}", request_id_of(status.metadata()));
            Ok(Exit::CallFailed)
        }
    }
}

/// Renders an error status for operators: gRPC code, fault, meaning, retry advice, message.
fn describe_status(what: &str, status: &tonic::Status) -> String {
    let mut lines = vec![format!(
        "failed: {what}: {}",
        fault::grpc_code_name(status.code())
    )];
    if let Some(task_fault) = task_fault(status) {
        let fault_class = fault::classify(task_fault.raw_code);
        let name = match FaultCode::try_from(task_fault.code) {
            Ok(FaultCode::Unspecified) | Err(_) => fault_class.reason(),
            Ok(fault_code) => fault_code.as_str_name().trim_start_matches("FAULT_CODE_"),
        };
        lines.push(format!("  fault:   {} {name}", task_fault.raw_code));
        lines.push(format!("  meaning: {}", fault_class.meaning()));
    } else if let Some(error_info) = status.get_details_error_info() {
        lines.push(format!(
            "  reason:  {} ({})",
            error_info.reason, error_info.domain
        ));
    }
    if let Some(bad_request) = status.get_details_bad_request() {
        for violation in bad_request.field_violations {
            lines.push(format!(
                "  field:   {}: {}",
                violation.field, violation.description
            ));
        }
    }
    match status
        .get_details_retry_info()
        .and_then(|retry_info| retry_info.retry_delay)
    {
        Some(delay) => lines.push(format!(
            "  retry:   safe after {}",
            humantime::format_duration(delay)
        )),
        None => lines.push("  retry:   not advised".to_owned()),
    }
    lines.push(format!("  message: {}", status.message()));
    lines.join("\n")
}

fn task_fault(status: &tonic::Status) -> Option<TaskFault> {
    let rpc_status = pb::Status::decode(status.details()).ok()?;
    rpc_status
        .details
        .iter()
        .find(|any| any.type_url == TASK_FAULT_TYPE_URL)
        .and_then(|any| TaskFault::decode(any.value.as_slice()).ok())
}
