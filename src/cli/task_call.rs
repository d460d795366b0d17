//! One `TaskService` call from the command line, shared by `case-extract`, `case-cancel`,
//! `case-state` and `watch`: the flags that say how to reach the gateway, the request's
//! metadata, and the outcome printed for operators (the same lines and exit codes whichever RPC
//! it was).

use std::future::Future;
use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use prost::Message as _;
use tonic::transport::Channel;
use tonic_types::{StatusExt, pb};

use taskgate::domain::{BIN_ID_RANGE, PORT_ID_RANGE};
use taskgate::proto::task_service_client::TaskServiceClient;
use taskgate::proto::{
    FaultCode, IDEMPOTENCY_KEY_HEADER, REPLAYED_HEADER, REQUEST_ID_HEADER, TASK_FAULT_TYPE_URL,
    TaskFault,
};
use taskgate::{fault, gateway_error};

use super::output::{self, Printed, Unwritten};
use super::{Exit, Outcome, bearer_token, connect, duration, gateway_endpoint, usage};

/// How to reach the gateway, and what every call sends besides its message.
#[derive(Debug, Args)]
pub(super) struct GatewayArgs {
    /// The gateway's address: http://HOST:PORT, or https://HOST:PORT for one serving TLS.
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

    /// The x-request-id to send, to find this call in the gateway's and controller's logs: 1-128
    /// visible ASCII characters; default: one the gateway makes.
    #[arg(long, env = "TASKGATE_REQUEST_ID", value_parser = request_id)]
    request_id: Option<String>,

    /// The call's deadline, sent to the gateway as grpc-timeout; for `watch`, only the time to
    /// connect and open the stream.
    #[arg(long, env = "TASKGATE_TIMEOUT", default_value = "5s", value_parser = duration)]
    timeout: Duration,
}

/// The flags of a command on a port and a bin (`case-extract`, `case-cancel`): the two take the
/// same parameters, with the same ranges.
#[derive(Debug, Args)]
pub(super) struct PortAndBinArgs {
    /// The AutoCase port, 1-2000.
    #[arg(long, env = "TASKGATE_PORT", value_parser = port_id)]
    port: u32,

    /// The bin, 1-4000000: for case-extract the port's selected bin, for case-cancel the bin of
    /// the case operation running at the port.
    #[arg(long, env = "TASKGATE_BIN", value_parser = bin_id)]
    bin: u32,

    /// The message's request_id, the idempotency key (a UUID; not the x-request-id): give the
    /// one a failed call printed with "repeat with" to repeat that call: within its
    /// --idempotency-window the same gateway process answers it from the first call's answer
    /// or from the port, and sends it again only if the port shows the first was not acted on
    /// (README, Idempotency). Default: a fresh UUID for each invocation.
    #[arg(long, env = "TASKGATE_IDEMPOTENCY_KEY", value_parser = idempotency_key)]
    idempotency_key: Option<String>,

    #[command(flatten)]
    gateway: GatewayArgs,
}

/// Checks `--port` against the task interface's port ids, as the gateway would, so that a port
/// it would refuse is a usage error found before connecting.
pub(super) fn port_id(text: &str) -> Result<u32, String> {
    id_in(text, &PORT_ID_RANGE).map_err(|error| match text.parse::<u32>() {
        // Most likely the gateway's own port, such as 50051.
        Ok(port) if port > *PORT_ID_RANGE.end() => format!(
            "{error}; --port is an AutoStore port's id, and the gateway's address goes in \
             --gateway"
        ),
        _ => error,
    })
}

/// Checks `--bin` against the task interface's bin ids, as the gateway would.
fn bin_id(text: &str) -> Result<u32, String> {
    id_in(text, &BIN_ID_RANGE)
}

fn id_in(text: &str, range: &RangeInclusive<u32>) -> Result<u32, String> {
    let (min, max) = (range.start(), range.end());
    match text.parse::<u32>() {
        Ok(id) if range.contains(&id) => Ok(id),
        _ => Err(format!("it must be a whole number from {min} to {max}")),
    }
}

/// Checks `--idempotency-key` as the gateway checks `request_id`, so that a key it would refuse
/// is a usage error found before connecting.
fn idempotency_key(text: &str) -> Result<String, String> {
    match taskgate::idempotency::parse_key(text) {
        Ok(Some(_)) => Ok(text.to_owned()),
        Ok(None) => Err("it is empty; leave the flag out for a fresh key".to_owned()),
        Err(error) => Err(format!("it {error}")),
    }
}

/// Checks `--request-id` as the gateway checks an `x-request-id`: it keeps only a usable one and
/// replaces any other with its own, so the logs would not carry the ID asked for.
fn request_id(text: &str) -> Result<String, String> {
    if taskgate::request_id::is_usable(text.as_bytes()) {
        Ok(text.to_owned())
    } else {
        Err(
            "it must be 1-128 visible ASCII characters (no spaces), the only IDs the gateway \
             keeps for its logs"
                .to_owned(),
        )
    }
}

/// The client the calling commands use.
pub(super) type Client = TaskServiceClient<Channel>;

// === impl PortAndBinArgs ===

impl PortAndBinArgs {
    /// The port and the bin given.
    pub(super) fn port_and_bin(&self) -> (u32, u32) {
        (self.port, self.bin)
    }

    /// Whether the call repeats a key given with `--idempotency-key`: its operation may have
    /// begun before this invocation.
    pub(super) fn repeats_a_key(&self) -> bool {
        self.idempotency_key.is_some()
    }

    /// How to reach the gateway.
    pub(super) fn gateway(&self) -> &GatewayArgs {
        &self.gateway
    }

    /// Calls `method` (its task-interface name, for the printed lines) with the message
    /// `message_of` makes from the port, bin and idempotency key, through `rpc`; a success
    /// prints `accepted`. A failure whose outcome is unknown also prints the key, with "repeat
    /// with" where a repeat with it is the advice; so does every failure of a call given
    /// `--idempotency-key`: the operator repeating with it keeps seeing it. Gives the exit code
    /// of what the controller did, and the outcome as printed, for the caller to end with
    /// ([`end_command`]) or to go on printing after.
    pub(super) async fn call<Message, Reply, Answer>(
        &self,
        method: &str,
        message_of: impl FnOnce(u32, u32, String) -> Message,
        rpc: impl FnOnce(Client, tonic::Request<Message>) -> Answer,
        accepted: &str,
    ) -> Asked
    where
        Answer: Future<Output = Result<tonic::Response<Reply>, tonic::Status>>,
    {
        let what = format!("{method} port {} bin {}", self.port, self.bin);
        let key = self
            .idempotency_key
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let message = message_of(self.port, self.bin, key.clone());
        let (client, mut request) = open(&self.gateway, message).await?;
        // Sent as the clients send it, so that a proxy routing repeats on it sees the CLI's too.
        let routed = key
            .parse()
            .with_context(|| format!("invalid --idempotency-key '{key}'"))
            .map_err(usage)?;
        request
            .metadata_mut()
            .insert(IDEMPOTENCY_KEY_HEADER, routed);
        // The gateway then answers within it (UPSTREAM_TIMEOUT, which may have acted, so the key
        // is printed) before this side gives up with a bare CANCELLED.
        request.set_timeout(self.gateway.timeout);
        let (exit, lines) = match rpc(client, request).await {
            Ok(response) => {
                let metadata = response.metadata();
                let lines = [
                    Some(format!("ok: {what}: {accepted}")),
                    replayed_line(metadata),
                    request_id_line(metadata),
                ];
                (
                    Exit::Success,
                    lines.into_iter().flatten().collect::<Vec<_>>(),
                )
            }
            Err(status) => {
                let metadata = status.metadata();
                let given = self.idempotency_key.is_some();
                let kind = if given {
                    CallKind::Repeat
                } else {
                    CallKind::Command
                };
                let lines = [
                    Some(describe_status(&what, &status, kind)),
                    replayed_line(metadata),
                    request_id_line(metadata),
                    key_line(&status, &key, given),
                ];
                (Exit::CallFailed, lines.into_iter().flatten().collect())
            }
        };
        let text = lines
            .iter()
            .map(|line| format!("{line}\n"))
            .collect::<String>();
        let printed = output::text(&text);
        Ok((exit, Told { text, printed }))
    }
}

/// Whether the controller may have acted on a failed call, so that a repeat needs the
/// idempotency key. Only the gateway-error table (for an ErrorInfo of the gateway) or the fault
/// table (for one of the controller) can say it certainly did not; a status without either came
/// from the client or a proxy, perhaps after the request was sent (a connection broken
/// mid-call), so the key is printed.
fn outcome_unknown(status: &tonic::Status) -> bool {
    marked_unknown(status) || row_of(status).is_none_or(|row| row.may_have_acted)
}

/// Whether the gateway marked the status `requestOutcome: unknown`: it followed an attempt
/// that may have acted, whatever its own row says.
fn marked_unknown(status: &tonic::Status) -> bool {
    status.get_details_error_info().is_some_and(|error_info| {
        error_info
            .metadata
            .get(gateway_error::REQUEST_OUTCOME_KEY)
            .is_some_and(|value| value == gateway_error::OUTCOME_UNKNOWN)
    })
}

/// What the gateway-error or fault table says of a status.
struct Row {
    /// Whether the controller may have acted on the call.
    may_have_acted: bool,
    /// Whether its advice is to wait for the `RetryInfo` delay.
    after_delay: bool,
    /// Whether a repeat with the same key cannot settle what the call did.
    unsettled: bool,
    /// Whether the gateway had taken the call's key when it answered.
    key_claimed: bool,
    /// Whether the gateway keeps the answer for the key, so that a repeat gets it again.
    kept_for_repeats: bool,
    /// The advice, as the README's tables give it.
    advice: &'static str,
}

/// The table row behind the status's `ErrorInfo`, if it has one. A watch's statuses are in
/// neither table (their messages say what to do), and one shares its reason with health's.
fn row_of(status: &tonic::Status) -> Option<Row> {
    let error_info = status.get_details_error_info()?;
    match error_info.domain.as_str() {
        gateway_error::DOMAIN
            if error_info.metadata.get("method").map(String::as_str)
                != Some(gateway_error::WATCH_METHOD) =>
        {
            let row = gateway_error::find(&error_info.reason, status.code())?;
            Some(Row {
                may_have_acted: row.retry.controller_may_have_acted(),
                after_delay: row.retry.has_retry_info(),
                unsettled: row.retry.unsettled(),
                key_claimed: row.key_claimed,
                kept_for_repeats: false,
                advice: row.retry.advice(),
            })
        }
        fault::DOMAIN => {
            let retry =
                fault::classify(error_info.metadata.get("faultCode")?.parse().ok()?).retry();
            Some(Row {
                may_have_acted: retry.controller_may_have_acted(),
                after_delay: retry.has_retry_info(),
                unsettled: false,
                // A fault is the controller's answer, sent after the key was taken.
                key_claimed: true,
                kept_for_repeats: retry.kept_for_repeats(),
                advice: retry.advice(),
            })
        }
        _ => None,
    }
}

/// Sends the read `message` with `rpc` and prints the outcome: `ok: {what}: ` and what `summary`
/// makes of the reply, or the error status described for operators; then the request ID. A call
/// the gateway answered with an error exits 1, like one that could not be made.
pub(super) async fn read<Message, Reply, Answer>(
    args: &GatewayArgs,
    what: &str,
    message: Message,
    rpc: impl FnOnce(Client, tonic::Request<Message>) -> Answer,
    summary: impl FnOnce(Reply) -> String,
) -> Outcome
where
    Answer: Future<Output = Result<tonic::Response<Reply>, tonic::Status>>,
{
    let (client, mut request) = open(args, message).await?;
    request.set_timeout(args.timeout);
    match rpc(client, request).await {
        Ok(response) => {
            let (metadata, reply, _) = response.into_parts();
            let printed = output::line(format_args!("ok: {what}: {}", summary(reply)))
                .and_then(|()| request_id_line(&metadata).map_or(Ok(()), output::line));
            output::exit_after(printed, Exit::Success)
        }
        Err(status) => output::exit_after(print_failure(what, &status), Exit::CallFailed),
    }
}

/// Checks every argument, then connects to the gateway and makes the request for `message`,
/// with the token and request ID given; the caller sets its deadline. An argument that cannot
/// be sent is a usage error found before connecting, whether or not a gateway is there.
pub(super) async fn open<Message>(
    args: &GatewayArgs,
    message: Message,
) -> Result<(Client, tonic::Request<Message>), (Exit, anyhow::Error)> {
    let endpoint = gateway_endpoint(&args.gateway, args.timeout).map_err(usage)?;
    let mut request = tonic::Request::new(message);
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
    let channel = connect(&endpoint, &args.gateway)
        .await
        .map_err(|error| (Exit::CallFailed, error))?;
    Ok((TaskServiceClient::new(channel), request))
}

/// How a command sent to the controller ended: its exit code and its outcome as printed, for
/// the caller to end with ([`end_command`]) or to go on printing after; or an error before it
/// was answered.
pub(super) type Asked = Result<(Exit, Told), (Exit, anyhow::Error)>;

/// A command's outcome as printed: its lines, and whether stdout took them.
#[derive(Debug)]
pub(super) struct Told {
    /// The lines, each with its newline.
    text: String,
    /// Whether they were written.
    pub(super) printed: Printed,
}

impl Told {
    /// Prints `line` after what was told, while stdout takes it; it is kept either way, for
    /// [`end_command`] to give on stderr if stdout failed.
    pub(super) fn line(&mut self, line: impl std::fmt::Display) {
        let line = format!("{line}\n");
        if self.printed.is_ok() {
            self.printed = output::text(&line);
        }
        self.text.push_str(&line);
    }
}

/// Ends a command with `exit` once its outcome is printed. Lines stdout could not take go to
/// stderr with the error, with the same exit code: they say what the controller did, and the
/// key that repeats the call safely.
pub(super) fn end_command((exit, told): (Exit, Told)) -> Outcome {
    match told.printed {
        Err(Unwritten::Failed(error)) => Err((
            exit,
            anyhow::anyhow!(
                "cannot write to stdout: {error}; not printed there:\n{}",
                told.text.trim_end()
            ),
        )),
        Ok(()) | Err(Unwritten::ReaderGone) => Ok(exit),
    }
}

/// What a failed call may have done, which decides the retry advice printed for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    /// Reads state and moves nothing, so it is always safe to send again.
    Read,
    /// May move a robot: sent again only where the gateway says it is safe.
    Command,
    /// A command given its idempotency key, which may repeat an earlier call that acted.
    Repeat,
}

/// Prints a failed read for operators: the status described, then the request ID.
pub(super) fn print_failure(what: &str, status: &tonic::Status) -> Printed {
    output::line(describe_status(what, status, CallKind::Read))?;
    request_id_line(status.metadata()).map_or(Ok(()), output::line)
}

/// The line that says how the gateway answered a repeated idempotency key without calling the
/// controller's method again, when it did.
fn replayed_line(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let how = match metadata
        .get(REPLAYED_HEADER)
        .and_then(|value| value.to_str().ok())?
    {
        "stored" => "the first call's answer; the controller was not called again",
        "resolved" => "the port showed the first call accepted; it was not sent again",
        _ => return None,
    };
    Some(format!("  replayed: {how}"))
}

/// The line of the request ID the gateway returned; a reply without one (a stream the
/// connection cut, an error made on this side) has none.
fn request_id_line(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let request_id = metadata
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())?;
    Some(format!("  request id: {request_id}"))
}

/// Renders an error status for operators: gRPC code, fault, meaning, retry advice, message.
fn describe_status(what: &str, status: &tonic::Status, kind: CallKind) -> String {
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
    lines.push(format!("  retry:   {}", retry_advice(status, kind)));
    if timed_out_here(status) {
        lines.push("  message: the gateway did not answer within --timeout".to_owned());
    } else {
        lines.push(format!("  message: {}", status.message()));
    }
    lines.join("\n")
}

/// The retry line: the delay the gateway gave, else the advice of the status's table row, in
/// this CLI's terms. A command whose outcome is unknown is repeated only with its key, printed
/// below it, where the gateway can settle that repeat (`offers_key_repeat`); otherwise its
/// row's advice. A read moves nothing, so it is safe to repeat unless its row says the call
/// fails again as it is.
fn retry_advice(status: &tonic::Status, kind: CallKind) -> String {
    let row = row_of(status);
    let delay = status
        .get_details_retry_info()
        .and_then(|retry_info| retry_info.retry_delay);
    let command = matches!(kind, CallKind::Command | CallKind::Repeat);
    match (kind, row, delay) {
        _ if command && offers_key_repeat(status) => KEY_ADVICE.to_owned(),
        (_, Some(row), _) if command && row.may_have_acted => in_cli_terms(row.advice),
        // Had the gateway held an earlier call's unknown outcome for the key, it would have read
        // the port first and marked a failure of that (`marked_unknown`), or replayed a kept
        // answer: it took the call as new (restarted, another process, past its window), and
        // any retry it invites would be a new call too.
        (CallKind::Repeat, Some(row), _)
            if row.key_claimed && !marked_unknown(status) && !replayed(status) =>
        {
            REPEAT_REFUSED_ADVICE.to_owned()
        }
        (_, _, Some(delay)) => format!("safe after {}", humantime::format_duration(delay)),
        (_, Some(row), None) if !row.may_have_acted && !row.after_delay => in_cli_terms(row.advice),
        // A row whose advice is the delay, sent without one (a command's status that neither
        // table knows has an unknown outcome, and is offered the key's repeat above).
        (CallKind::Command | CallKind::Repeat, _, None) => {
            "safe: the controller started nothing".to_owned()
        }
        (CallKind::Read, _, _) => READ_ADVICE.to_owned(),
    }
}

/// The advice after a refusal of a call given its key, which the gateway answered as a new call.
const REPEAT_REFUSED_ADVICE: &str = "not at once: the gateway held no unknown outcome for this \
     key and took the call as new; if an earlier call used the key, it may have acted (after \
     1148, it may be what the controller is busy with): read the port with case-state first";

/// Whether the gateway answered from what it kept for the call's key.
fn replayed(status: &tonic::Status) -> bool {
    status.metadata().get(REPLAYED_HEADER).is_some()
}

/// The line that prints a failed command's idempotency key `key` (`given` with
/// `--idempotency-key`), if it is printed: "repeat with" exactly where the retry line offers
/// that repeat; where its row says such a repeat cannot settle the outcome, that it cannot; for
/// a refusal the gateway keeps as the key's answer, that a repeat gets it again.
fn key_line(status: &tonic::Status, key: &str, given: bool) -> Option<String> {
    let row = row_of(status);
    if offers_key_repeat(status) {
        Some(format!(
            "  idempotency key: {key} (repeat with --idempotency-key {key})"
        ))
    } else if row.as_ref().is_some_and(|row| row.unsettled) {
        Some(format!(
            "  idempotency key: {key} (a repeat with it cannot settle this: read the port first)"
        ))
    } else if given && row.is_some_and(|row| row.kept_for_repeats) {
        Some(format!(
            "  idempotency key: {key} (the same gateway process answers a repeat with it the \
             same way within its --idempotency-window; for a new attempt leave \
             --idempotency-key out)"
        ))
    } else if outcome_unknown(status) || given {
        Some(format!("  idempotency key: {key}"))
    } else {
        None
    }
}

/// Whether a command's failure is best followed by a repeat with its idempotency key: its
/// outcome is unknown, and the gateway that holds the key settles a repeat by reading the port
/// first (README, Idempotency), which its row does not rule out (`GatewayRetry::Unsettled`).
fn offers_key_repeat(status: &tonic::Status) -> bool {
    outcome_unknown(status) && !row_of(status).is_some_and(|row| row.unsettled)
}

/// The advice for a read whose row has nothing better.
const READ_ADVICE: &str = "safe: a read moves nothing, though it fails again while the cause lasts";

/// The advice for a command whose repeat with its key the gateway can settle.
const KEY_ADVICE: &str = "only as a repeat with the idempotency key below, to the same gateway \
     process (not restarted since) within its --idempotency-window; to any other it is a new \
     call, so read the port first";

/// A table's advice as this CLI says it: its `request_id` is `--idempotency-key` here, its
/// `CaseGetState` is `case-state`, and the README's code spans are plain text.
fn in_cli_terms(advice: &str) -> String {
    advice
        .replace("`request_id`", "--idempotency-key")
        .replace("`CaseGetState`", "case-state")
        .replace('`', "")
}

/// Whether the status is the one tonic makes on this side when `--timeout` runs out before the
/// gateway answers (a gateway that answers in time says so itself, `UPSTREAM_TIMEOUT`): its
/// bare "Timeout expired" names neither the gateway nor the flag.
fn timed_out_here(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled
        && status.details().is_empty()
        && status.message() == tonic::TimeoutExpired(()).to_string()
}

fn task_fault(status: &tonic::Status) -> Option<TaskFault> {
    let rpc_status = pb::Status::decode(status.details()).ok()?;
    rpc_status
        .details
        .iter()
        .find(|any| any.type_url == TASK_FAULT_TYPE_URL)
        .and_then(|any| TaskFault::decode(any.value.as_slice()).ok())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use tonic::Code;
    use tonic_types::ErrorDetails;

    use super::*;

    fn with_error_info(code: Code, domain: &str, reason: &str, fault_code: &str) -> tonic::Status {
        let metadata = HashMap::from([("faultCode".to_owned(), fault_code.to_owned())]);
        let details = ErrorDetails::with_error_info(reason, domain, metadata);
        tonic::Status::with_error_details(code, "failed", details)
    }

    /// The gateway's field violations are printed one a line, for a gateway whose checks differ
    /// from this CLI's (another version).
    #[test]
    fn field_violations_are_printed_one_a_line() {
        let mut details = ErrorDetails::with_error_info(
            "INVALID_PARAMETER",
            gateway_error::DOMAIN,
            HashMap::new(),
        );
        details.add_bad_request_violation("port_id", "port_id 0 is out of range");
        let status = tonic::Status::with_error_details(Code::InvalidArgument, "bad", details);
        assert_eq!(
            describe_status("case_extract port 0 bin 1", &status, CallKind::Command),
            "failed: case_extract port 0 bin 1: INVALID_ARGUMENT\n\
             \x20 reason:  INVALID_PARAMETER (taskgate)\n\
             \x20 field:   port_id: port_id 0 is out of range\n\
             \x20 retry:   no; fix the request\n\
             \x20 message: bad"
        );
    }

    /// An UPSTREAM_UNREACHABLE marked `requestOutcome: unknown`: it followed an attempt that
    /// may have acted.
    fn marked_unknown_status() -> tonic::Status {
        let metadata = HashMap::from([(
            gateway_error::REQUEST_OUTCOME_KEY.to_owned(),
            gateway_error::OUTCOME_UNKNOWN.to_owned(),
        )]);
        let details =
            ErrorDetails::with_error_info("UPSTREAM_UNREACHABLE", gateway_error::DOMAIN, metadata);
        tonic::Status::with_error_details(Code::Unavailable, "failed", details)
    }

    /// The status the gateway sends for the controller's fault `code`, as its row makes it.
    fn fault_status(code: u32) -> tonic::Status {
        let class = fault::classify(code);
        let delayed = class.retry().has_retry_info();
        status_of(
            class.grpc_code(),
            fault::DOMAIN,
            "FAULT",
            &code.to_string(),
            delayed,
        )
    }

    /// The status the gateway sends for a row of its gateway-error table.
    fn gateway_status(row: &gateway_error::GatewayError) -> tonic::Status {
        status_of(
            row.code,
            gateway_error::DOMAIN,
            row.reason,
            "",
            row.retry.has_retry_info(),
        )
    }

    /// A status as the gateway makes it: `ErrorInfo` with `reason` in `domain` (and `faultCode`
    /// when given), a `RetryInfo` of a second when `delay`.
    fn status_of(
        code: Code,
        domain: &str,
        reason: &str,
        fault_code: &str,
        delay: bool,
    ) -> tonic::Status {
        let metadata = HashMap::from([("faultCode".to_owned(), fault_code.to_owned())]);
        let mut details = ErrorDetails::with_error_info(reason, domain, metadata);
        if delay {
            details.set_retry_info(Some(Duration::from_secs(1)));
        }
        tonic::Status::with_error_details(code, "failed", details)
    }

    /// A failed write keeps every exit code of a command, 0 for an accepted extraction
    /// included (a 1 would have a script send it again), and gives what was not printed.
    #[test]
    fn a_failed_write_keeps_the_exit_code_of_what_was_done() {
        let told = || Told {
            text: "ok: case_extract port 4 bin 1: accepted\n".to_owned(),
            printed: Err(Unwritten::Failed(std::io::Error::from_raw_os_error(5))),
        };
        for exit in [
            Exit::Success,
            Exit::CallFailed,
            Exit::FollowingStopped,
            Exit::Usage,
        ] {
            let (kept, error) = end_command((exit, told())).unwrap_err();
            assert_eq!(kept, exit);
            assert_eq!(
                format!("{error:#}"),
                "cannot write to stdout: Input/output error (os error 5); not printed there:\n\
                 ok: case_extract port 4 bin 1: accepted"
            );
        }
    }

    /// A command given its key whose answer the gateway gave after taking the key, unmarked and
    /// not replayed: the gateway took it as a new call, so no advice to send it again (after a
    /// delay, with backoff, a longer deadline) is given; a marked one, or an unknown outcome, is
    /// repeated with the key as ever, and a refusal before the key was looked at says nothing
    /// of it.
    #[test]
    fn a_repeat_answered_as_a_new_call_is_not_advised_to_be_sent_again() {
        let cases = [
            (
                fault_status(1148),
                REPEAT_REFUSED_ADVICE.to_owned(),
                "safe after 1s",
            ),
            (
                fault_status(1149),
                REPEAT_REFUSED_ADVICE.to_owned(),
                "do not retry until the port's state changes",
            ),
            (
                gateway_status(&gateway_error::IDEMPOTENCY_TABLE_FULL),
                REPEAT_REFUSED_ADVICE.to_owned(),
                "later, with backoff, once entries have expired; or raise \
                 --idempotency-max-entries",
            ),
            (
                gateway_status(&gateway_error::DEADLINE_TOO_SHORT),
                REPEAT_REFUSED_ADVICE.to_owned(),
                "with a longer deadline",
            ),
            (
                gateway_status(&gateway_error::UPSTREAM_UNREACHABLE),
                REPEAT_REFUSED_ADVICE.to_owned(),
                "safe after 1s",
            ),
            (marked_unknown_status(), KEY_ADVICE.to_owned(), KEY_ADVICE),
            (
                gateway_status(&gateway_error::UPSTREAM_TIMEOUT),
                KEY_ADVICE.to_owned(),
                KEY_ADVICE,
            ),
            // Refused before the key was looked at: it says nothing of an earlier call.
            (
                gateway_status(&gateway_error::OVERLOADED),
                "yes, with backoff".to_owned(),
                "yes, with backoff",
            ),
        ];
        for (status, repeat, command) in cases {
            assert_eq!(
                retry_advice(&status, CallKind::Repeat),
                repeat,
                "{status:?}"
            );
            assert_eq!(
                retry_advice(&status, CallKind::Command),
                command,
                "{status:?}"
            );
        }
        // Every row: a repeat's answer that the gateway gave after taking the key, which says
        // the controller did not act, is never followed by advice to send again; every other
        // answer is advised as a command's.
        let gateway_rows = gateway_error::GATEWAY_ERRORS.iter().map(|row| {
            (
                gateway_status(row),
                row.key_claimed && !row.retry.controller_may_have_acted(),
            )
        });
        let fault_rows = fault::FAULTS.iter().map(|known| {
            let class = fault::FaultClass::Known(known);
            (
                fault_status(known.code),
                !class.retry().controller_may_have_acted(),
            )
        });
        for (status, taken_as_new) in gateway_rows.chain(fault_rows) {
            let expected = if taken_as_new {
                REPEAT_REFUSED_ADVICE.to_owned()
            } else {
                retry_advice(&status, CallKind::Command)
            };
            assert_eq!(
                retry_advice(&status, CallKind::Repeat),
                expected,
                "{status:?}"
            );
            // Replayed, a kept answer is the first call's: its row's advice stands.
            let mut replayed = status.clone();
            replayed
                .metadata_mut()
                .insert(REPLAYED_HEADER, "stored".parse().unwrap());
            assert_eq!(
                retry_advice(&replayed, CallKind::Repeat),
                retry_advice(&status, CallKind::Command),
                "{status:?}"
            );
        }
    }

    /// The key line a user reads: to repeat with where the outcome is unknown; that a repeat
    /// gets the same answer where the gateway keeps a refusal for the key; bare where a repeat
    /// is a new call, or cannot settle it; none for a refusal without a given key.
    #[test]
    fn the_key_line_says_what_a_repeat_with_the_key_gets() {
        const KEY: &str = "3f6c2a1e-8b4d-4c5e-9f0a-1b2c3d4e5f6a";
        let repeat = format!("  idempotency key: {KEY} (repeat with --idempotency-key {KEY})");
        let kept = format!(
            "  idempotency key: {KEY} (the same gateway process answers a repeat with it the \
             same way within its --idempotency-window; for a new attempt leave --idempotency-key \
             out)"
        );
        let unsettled = format!(
            "  idempotency key: {KEY} (a repeat with it cannot settle this: read the port first)"
        );
        let bare = format!("  idempotency key: {KEY}");
        let cases = [
            (fault_status(1149), true, Some(kept.clone())),
            (fault_status(1000), true, Some(kept)),
            (fault_status(1149), false, None),
            (fault_status(1148), true, Some(bare.clone())),
            (fault_status(1148), false, None),
            (fault_status(1999), false, Some(repeat.clone())),
            (
                gateway_status(&gateway_error::UPSTREAM_TIMEOUT),
                false,
                Some(repeat),
            ),
            (
                gateway_status(&gateway_error::SHUTDOWN_GRACE_RAN_OUT),
                false,
                Some(unsettled.clone()),
            ),
            (
                gateway_status(&gateway_error::UPSTREAM_HTTP_OTHER),
                true,
                Some(unsettled),
            ),
            (gateway_status(&gateway_error::OVERLOADED), true, Some(bare)),
            (gateway_status(&gateway_error::OVERLOADED), false, None),
        ];
        for (status, given, line) in cases {
            assert_eq!(
                key_line(&status, KEY, given),
                line,
                "{status:?} given={given}"
            );
        }
    }

    /// For every row of both tables, the exact retry line of a command and of a read, and
    /// "repeat with" on the key line exactly where the retry line offers the repeat.
    #[test]
    fn the_retry_line_follows_every_row_of_the_tables() {
        let gateway_rows = gateway_error::GATEWAY_ERRORS.iter().map(|row| {
            let delayed = row.retry.has_retry_info();
            let status = status_of(row.code, gateway_error::DOMAIN, row.reason, "", delayed);
            let retry = row.retry;
            (
                status,
                retry.controller_may_have_acted(),
                retry.repeat_same_key(),
                retry.unsettled(),
                retry.advice(),
            )
        });
        let fault_rows = [1999, 2500]
            .into_iter()
            .chain(fault::FAULTS.iter().map(|fault| fault.code))
            .map(|code| {
                let class = fault::classify(code);
                let retry = class.retry();
                let number = code.to_string();
                let delayed = retry.has_retry_info();
                let status = status_of(class.grpc_code(), fault::DOMAIN, "FAULT", &number, delayed);
                (
                    status,
                    retry.controller_may_have_acted(),
                    false,
                    false,
                    retry.advice(),
                )
            });
        for (status, may_have_acted, repeat, unsettled, advice) in gateway_rows.chain(fault_rows) {
            let delayed = status.get_details_retry_info().is_some();
            let (command, read) = match (repeat || may_have_acted, unsettled, delayed) {
                (true, false, _) => (KEY_ADVICE.to_owned(), READ_ADVICE.to_owned()),
                (true, true, _) => (in_cli_terms(advice), READ_ADVICE.to_owned()),
                (false, _, true) => ("safe after 1s".to_owned(), "safe after 1s".to_owned()),
                (false, _, false) => (in_cli_terms(advice), in_cli_terms(advice)),
            };
            assert_eq!(
                retry_advice(&status, CallKind::Command),
                command,
                "{status:?}"
            );
            assert_eq!(retry_advice(&status, CallKind::Read), read, "{status:?}");
            assert_eq!(
                offers_key_repeat(&status),
                command == KEY_ADVICE,
                "{status:?}"
            );
        }
    }

    /// The lines a user reads, for the statuses that are not a row's plain advice.
    #[test]
    fn the_retry_line_in_the_words_a_user_reads() {
        let watch_limit = {
            let metadata =
                HashMap::from([("method".to_owned(), gateway_error::WATCH_METHOD.to_owned())]);
            let details =
                ErrorDetails::with_error_info("TOO_MANY_WATCHES", gateway_error::DOMAIN, metadata);
            tonic::Status::with_error_details(Code::ResourceExhausted, "failed", details)
        };
        assert_eq!(retry_advice(&watch_limit, CallKind::Read), READ_ADVICE);
        let stopping_marked = {
            let metadata = HashMap::from([(
                gateway_error::REQUEST_OUTCOME_KEY.to_owned(),
                gateway_error::OUTCOME_UNKNOWN.to_owned(),
            )]);
            let details = ErrorDetails::with_error_info(
                "SHUTDOWN_GRACE_RAN_OUT",
                gateway_error::DOMAIN,
                metadata,
            );
            tonic::Status::with_error_details(Code::Unknown, "failed", details)
        };
        let gateway = |code, reason| status_of(code, gateway_error::DOMAIN, reason, "", false);
        let read_the_port =
            "no, not even with the same --idempotency-key: read the port with case-state first";
        let cases = [
            (
                tonic::Status::cancelled("Timeout expired"),
                KEY_ADVICE,
                READ_ADVICE,
            ),
            (marked_unknown_status(), KEY_ADVICE, READ_ADVICE),
            (stopping_marked, read_the_port, READ_ADVICE),
            (
                gateway(Code::DeadlineExceeded, "UPSTREAM_TIMEOUT"),
                KEY_ADVICE,
                READ_ADVICE,
            ),
            (
                gateway(Code::FailedPrecondition, "REQUEST_OUTCOME_UNKNOWN"),
                "no, not even with the same --idempotency-key: read the port with case-state and \
                 decide",
                READ_ADVICE,
            ),
            (
                gateway(Code::Unavailable, "UPSTREAM_UNREACHABLE"),
                "safe: the controller started nothing",
                READ_ADVICE,
            ),
            // A wrong controller URL: a repeat with the key would read the port through it.
            (
                gateway(Code::Internal, "UPSTREAM_HTTP_ERROR"),
                "no, not even with the same --idempotency-key: check the controller URL and \
                 what answers there, then read the port with case-state",
                READ_ADVICE,
            ),
            (
                gateway(Code::InvalidArgument, "REQUEST_ID_REUSED"),
                "no; send a fresh --idempotency-key for each new call",
                "no; send a fresh --idempotency-key for each new call",
            ),
        ];
        for (status, command, read) in cases {
            assert_eq!(
                retry_advice(&status, CallKind::Command),
                command,
                "{status:?}"
            );
            assert_eq!(retry_advice(&status, CallKind::Read), read, "{status:?}");
        }
    }

    /// The key is printed unless the status says the controller certainly did not act: a status
    /// the client made itself (a connection broken after sending) gets it, a gateway refusal
    /// that sent nothing does not.
    #[test]
    fn the_key_is_printed_unless_the_controller_certainly_did_not_act() {
        let gateway = |code, reason| with_error_info(code, gateway_error::DOMAIN, reason, "");
        let fault = |code, number| with_error_info(code, fault::DOMAIN, "FAULT", number);
        let marked = marked_unknown_status();
        let cases = [
            (marked, true),
            (tonic::Status::unavailable("connection reset"), true),
            (tonic::Status::unknown("h2 protocol error"), true),
            (gateway(Code::Unavailable, "UPSTREAM_UNREACHABLE"), false),
            (gateway(Code::DeadlineExceeded, "DEADLINE_TOO_SHORT"), false),
            (gateway(Code::DeadlineExceeded, "UPSTREAM_TIMEOUT"), true),
            (gateway(Code::Unavailable, "UPSTREAM_HTTP_ERROR"), false),
            (gateway(Code::Unknown, "UPSTREAM_HTTP_ERROR"), true),
            (
                gateway(Code::FailedPrecondition, "REQUEST_OUTCOME_UNKNOWN"),
                true,
            ),
            (gateway(Code::Unavailable, "NO_SUCH_REASON"), true),
            (fault(Code::Unavailable, "1148"), false),
            (fault(Code::FailedPrecondition, "1149"), false),
            (fault(Code::Unknown, "1999"), true),
            (fault(Code::Internal, "2000"), true),
        ];
        for (status, expected) in cases {
            assert_eq!(outcome_unknown(&status), expected, "{status:?}");
        }
    }
}
