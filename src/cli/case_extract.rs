//! `taskgate case-extract`: one CaseExtract call on a running gateway, its outcome printed for
//! operators (`--wait`, which follows the case afterwards, is in `watch`).

use taskgate::proto::CaseExtractRequest;

use super::Outcome;
use super::task_call::{Asked, Client, PortAndBinArgs, end_command};

pub(super) async fn case_extract(args: PortAndBinArgs) -> Outcome {
    end_command(ask(&args, "the controller accepted the case extraction").await?)
}

/// Asks for the extraction and prints the outcome; a success prints `accepted`.
pub(super) async fn ask(args: &PortAndBinArgs, accepted: &str) -> Asked {
    let message_of = |port_id, bin_id, request_id| CaseExtractRequest {
        port_id,
        bin_id,
        request_id,
    };
    let rpc = |mut client: Client, request| async move { client.case_extract(request).await };
    args.call("case_extract", message_of, rpc, accepted).await
}
