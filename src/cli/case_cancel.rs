//! `taskgate case-cancel`: one CaseCancel call on a running gateway, its outcome printed for
//! operators as `case-extract` prints its own.

use taskgate::proto::CaseCancelRequest;

use super::Outcome;
use super::task_call::{Client, PortAndBinArgs, end_command};

pub(super) async fn case_cancel(args: PortAndBinArgs) -> Outcome {
    let message_of = |port_id, bin_id, request_id| CaseCancelRequest {
        port_id,
        bin_id,
        request_id,
    };
    let rpc = |mut client: Client, request| async move { client.case_cancel(request).await };
    end_command(
        args.call(
            "case_cancel",
            message_of,
            rpc,
            "the controller accepted the cancel",
        )
        .await?,
    )
}
