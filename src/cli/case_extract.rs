//! `taskgate case-extract`: one CaseExtract call on a running gateway, its outcome printed for
//! operators.

use taskgate::proto::CaseExtractRequest;

use super::Outcome;
use super::task_call::{Client, PortAndBinArgs};

pub(super) async fn case_extract(args: PortAndBinArgs) -> Outcome {
    let message_of = |port_id, bin_id| CaseExtractRequest { port_id, bin_id };
    let rpc = |mut client: Client, request| async move { client.case_extract(request).await };
    let accepted = "the controller accepted the case extraction";
    args.call("case_extract", message_of, rpc, accepted).await
}
