//! `taskgate case-state`: one CaseGetState call on a running gateway, the port's case state
//! printed for operators, errors as `case-extract` prints them.

use clap::Args;

use taskgate::proto::{CaseGetStateRequest, CaseGetStateResponse};

use super::Outcome;
use super::task_call::{self, Client, GatewayArgs};

#[derive(Debug, Args)]
pub(super) struct CaseStateArgs {
    /// The AutoCase port, 1-2000.
    #[arg(long, env = "TASKGATE_PORT", value_parser = task_call::port_id)]
    port: u32,

    #[command(flatten)]
    gateway: GatewayArgs,
}

pub(super) async fn case_state(args: CaseStateArgs) -> Outcome {
    let what = format!("case_getstate port {}", args.port);
    let message = CaseGetStateRequest { port_id: args.port };
    task_call::read(
        &args.gateway,
        &what,
        message,
        |mut client: Client, request| async move { client.case_get_state(request).await },
        summary,
    )
    .await
}

/// `state ERSO (EXTRACTION_READY_TO_SEND), bin 101337`: the vendor's code first, as the
/// controller's and the Log Publisher's logs write it, then the contract's name for it.
fn summary(response: CaseGetStateResponse) -> String {
    let name = response.state().as_str_name();
    let name = name.trim_start_matches("CASE_STATE_");
    let bin = match response.bin_id {
        Some(bin_id) => format!("bin {bin_id}"),
        None => "no bin".to_owned(),
    };
    format!("state {} ({name}), {bin}", response.raw_state)
}
