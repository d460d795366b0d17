//! `taskgate watch` (a line per case event as it arrives) and `taskgate case-extract --wait`
//! (an extraction followed to its end), both on WatchCaseEvents.

use std::io::Write as _;
use std::time::{Duration, SystemTime};

use clap::Args;
use tonic::Code;
use tonic::codec::Streaming;

use taskgate::config::Bounds;
use taskgate::fault;
use taskgate::proto::case_event::Change;
use taskgate::proto::{CaseEvent, CaseState, WatchCaseEventsRequest};

use super::output::{self, Printed, Unwritten};
use super::task_call::{self, GatewayArgs, PortAndBinArgs};
use super::{Exit, Outcome, duration, usage};

/// The range of `--wait-timeout`.
const WAIT_TIMEOUT: Bounds<Duration> = Bounds {
    setting: "--wait-timeout",
    min: Duration::from_millis(1),
    max: Duration::from_secs(24 * 60 * 60),
    below: "following needs some time, for example 30s",
    above: "no case takes that long; leave --wait-timeout out to follow until the end",
};

#[derive(Debug, Args)]
pub(super) struct WatchArgs {
    /// Only events of this AutoCase port (1-2000); repeat, or separate with commas, for more.
    /// Default: every port.
    #[arg(
        long = "port",
        env = "TASKGATE_PORTS",
        value_delimiter = ',',
        value_parser = task_call::port_id
    )]
    ports: Vec<u32>,

    #[command(flatten)]
    gateway: GatewayArgs,
}

#[derive(Debug, Args)]
pub(super) struct CaseExtractArgs {
    #[command(flatten)]
    call: PortAndBinArgs,

    /// Follow the case after the controller accepts it, printing each state, until ECMP (exit
    /// 0) or a cancel (exit 1); exit 3 if following stops before (the watch failed): the case
    /// may still be running. The watch opens before the extraction is asked for, so no state is
    /// missed; if it cannot open (no Log Publisher), nothing is asked for.
    #[arg(long)]
    wait: bool,

    /// With --wait: stop following after this long (exit 3: the extraction was accepted and may
    /// still be running); 1ms to 1day. Default: follow until the end.
    #[arg(long, requires = "wait", value_parser = duration)]
    wait_timeout: Option<Duration>,
}

/// How following an extraction ends.
#[derive(Debug, PartialEq, Eq)]
enum Followed {
    /// The event is not the end: keep following.
    Going,
    /// ECMP: the case is out.
    Completed,
    /// NOOP after the extraction began: it was cancelled.
    Cancelled,
}

pub(super) async fn watch(args: WatchArgs) -> Outcome {
    let what = match args.ports.as_slice() {
        [] => "watch every port".to_owned(),
        ports => format!("watch port {}", join(ports)),
    };
    let message = WatchCaseEventsRequest {
        port_ids: args.ports,
    };
    let Some(mut events) = open(&args.gateway, &what, message, None).await? else {
        return Ok(Exit::CallFailed);
    };
    // On stderr, so stdout holds only events; a closed stderr loses only this line.
    let _ = writeln!(
        std::io::stderr(),
        "{what}: one line per event; stop with Ctrl-C"
    );
    let stop = taskgate::shutdown::signal();
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            () = &mut stop => return Ok(Exit::Success),
            message = events.message() => message,
        };
        match message {
            // Printing is all a watch does: once stdout's reader has gone, it is over.
            Ok(Some(event)) => match output::line(event_line(&event)) {
                Ok(()) => {}
                Err(Unwritten::ReaderGone) => return Ok(Exit::Success),
                Err(failed) => return output::exit_after(Err(failed), Exit::Success),
            },
            Ok(None) => {
                return output::exit_after(print_ended_without_status(&what), Exit::CallFailed);
            }
            Err(status) => {
                return output::exit_after(
                    task_call::print_failure(&what, &status),
                    Exit::CallFailed,
                );
            }
        }
    }
}

pub(super) async fn case_extract(args: CaseExtractArgs) -> Outcome {
    let CaseExtractArgs {
        call,
        wait,
        wait_timeout,
    } = args;
    if !wait {
        return super::case_extract::case_extract(call).await;
    }
    if let Some(timeout) = wait_timeout {
        WAIT_TIMEOUT
            .check(timeout)
            .map_err(|error| usage(error.into()))?;
    }
    let (port_id, bin_id) = call.port_and_bin();
    let what = format!("case_extract port {port_id} bin {bin_id}");
    let message = WatchCaseEventsRequest {
        port_ids: vec![port_id],
    };
    // Named for what failed if it fails: the watch, a read, with the extraction not yet sent.
    let watching = format!("watch port {port_id} before case_extract, which was not sent");
    let Some(mut events) = open(call.gateway(), &watching, message, wait_timeout).await? else {
        return Ok(Exit::CallFailed);
    };
    let accepted = "the controller accepted the case extraction; following it";
    let (exit, mut told) = super::case_extract::ask(&call, accepted).await?;
    if exit != Exit::Success {
        return task_call::end_command((exit, told));
    }
    // The watch opened before the ask, so a fresh extraction is seen from its first state,
    // EREQ; an earlier operation on the bin may still signal in between (its ERSO or ECMP, late
    // from the Log Publisher, or its cancel), which says nothing of this one. A repeated key's
    // operation may have begun before the watch, so any of its states counts; it may also have
    // ended before, and then no event of it ever comes. The port's state cannot say which: an
    // ECMP of this bin there may be an earlier extraction's, with this one not yet shown.
    let mut begun = call.repeats_a_key();
    // The exit code says how the case ended, so following goes on after stdout's reader has
    // gone (`| head -n 1`) or failed; what stdout could not take is given with the error.
    if begun {
        told.line(format_args!(
            "  note: this key's extraction may have ended before following began; if no event \
             comes, read the port: taskgate case-state --port {port_id}"
        ));
    }
    let mut followed = Followed::Going;
    while followed == Followed::Going {
        let event = match events.message().await {
            Ok(Some(event)) => event,
            // Not `print_failure`: its retry advice would be read as the extraction's, and a
            // second `case-extract` is a second extraction.
            Ok(None) => {
                let why = "the watch's stream ended without a status (the connection was cut)";
                told.line(stopped_following(&what, port_id, why));
                return task_call::end_command((Exit::FollowingStopped, told));
            }
            // The only deadline on the watch is --wait-timeout's.
            Err(status) => {
                let why = match (status.code(), wait_timeout) {
                    (Code::DeadlineExceeded, Some(wait_timeout)) => format!(
                        "--wait-timeout {} ran out before the case ended",
                        humantime::format_duration(wait_timeout)
                    ),
                    _ => format!(
                        "the watch failed: {}: {}",
                        fault::grpc_code_name(status.code()),
                        status.message()
                    ),
                };
                told.line(stopped_following(&what, port_id, why));
                return task_call::end_command((Exit::FollowingStopped, told));
            }
        };
        // Another bin's events are an earlier operation's.
        if event.bin_id != Some(bin_id) {
            continue;
        }
        begun = begun || event.change == Some(Change::State(CaseState::ExtractionRequested as i32));
        if !begun {
            continue;
        }
        told.line(event_line(&event));
        followed = follow(&event);
    }
    if followed == Followed::Completed {
        told.line(format_args!("ok: {what}: the case is out (ECMP)"));
        task_call::end_command((Exit::Success, told))
    } else {
        told.line(format_args!(
            "failed: {what}: the extraction was cancelled (NOOP)"
        ));
        task_call::end_command((Exit::CallFailed, told))
    }
}

/// What is true when following stops before the case ended, for `why`: the controller accepted
/// the extraction, only the following stopped, and the case may still be running; and how to
/// follow it further. No retry advice, since sending the extraction again would start another.
fn stopped_following(what: &str, port_id: u32, why: impl std::fmt::Display) -> String {
    format!(
        "stopped following: {what}: {why}\n\
         \x20 the controller accepted the extraction; the case may still be running\n\
         \x20 follow it: taskgate watch --port {port_id}, or taskgate case-state --port \
         {port_id}"
    )
}

/// Opens the watch, with `deadline` if given; `None` when the gateway refused it (printed).
async fn open(
    gateway: &GatewayArgs,
    what: &str,
    message: WatchCaseEventsRequest,
    deadline: Option<Duration>,
) -> Result<Option<Streaming<CaseEvent>>, (Exit, anyhow::Error)> {
    let (mut client, mut request) = task_call::open(gateway, message).await?;
    if let Some(deadline) = deadline {
        request.set_timeout(deadline);
    }
    match client.watch_case_events(request).await {
        Ok(response) => Ok(Some(response.into_inner())),
        Err(status) => {
            output::exit_after(task_call::print_failure(what, &status), Exit::CallFailed)?;
            Ok(None)
        }
    }
}

/// What an event of the followed bin means for the extraction.
fn follow(event: &CaseEvent) -> Followed {
    match event.change {
        Some(Change::State(state)) if state == CaseState::ExtractionCompleted as i32 => {
            Followed::Completed
        }
        Some(Change::State(state)) if state == CaseState::NoOperation as i32 => Followed::Cancelled,
        _ => Followed::Going,
    }
}

/// The gateway always ends a watch with a status; a stream that ends without one was cut.
fn print_ended_without_status(what: &str) -> Printed {
    output::line(format_args!(
        "failed: {what}: the stream ended without a status (the connection was cut)"
    ))
}

/// `2026-11-29T08:01:02.345Z port 4 bin 101337 ERSO (EXTRACTION_READY_TO_SEND)`: when the
/// gateway received it, then the vendor's code and the contract's name for it.
fn event_line(event: &CaseEvent) -> String {
    let received_at = event
        .received_at
        .and_then(|timestamp| SystemTime::try_from(timestamp).ok())
        .map_or_else(
            || "-".to_owned(),
            |time| humantime::format_rfc3339_millis(time).to_string(),
        );
    let bin = event
        .bin_id
        .map_or_else(|| "-".to_owned(), |bin_id| bin_id.to_string());
    let meaning = match event.change {
        Some(Change::State(state)) => CaseState::try_from(state)
            .map(|state| state.as_str_name().trim_start_matches("CASE_STATE_"))
            .unwrap_or("UNKNOWN"),
        Some(Change::CancelRequest(_)) => "CANCEL_REQUEST",
        None => "UNKNOWN",
    };
    format!(
        "{received_at} port {} bin {bin} {} ({meaning})",
        event.port_id, event.raw_state
    )
}

fn join(ports: &[u32]) -> String {
    ports
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(bin_id: Option<u32>, change: Change, raw_state: &str) -> CaseEvent {
        CaseEvent {
            port_id: 4,
            bin_id,
            change: Some(change),
            raw_state: raw_state.to_owned(),
            segment: String::new(),
            received_at: Some(SystemTime::UNIX_EPOCH.into()),
        }
    }

    #[test]
    fn lines_name_the_code_and_the_state() {
        let erso = event(
            Some(101337),
            Change::State(CaseState::ExtractionReadyToSend as i32),
            "ERSO",
        );
        assert_eq!(
            event_line(&erso),
            "1970-01-01T00:00:00.000Z port 4 bin 101337 ERSO (EXTRACTION_READY_TO_SEND)"
        );
        let cancel = event(None, Change::CancelRequest(true), "CR");
        assert_eq!(
            event_line(&cancel),
            "1970-01-01T00:00:00.000Z port 4 bin - CR (CANCEL_REQUEST)"
        );
    }

    #[test]
    fn an_extraction_ends_at_ecmp_or_noop_and_a_cancel_request_is_only_a_signal() {
        let state = |state: CaseState| event(Some(1), Change::State(state as i32), "");
        assert_eq!(
            follow(&state(CaseState::ExtractionRequested)),
            Followed::Going
        );
        assert_eq!(
            follow(&state(CaseState::ExtractionReadyToSend)),
            Followed::Going
        );
        let cancel_request = event(Some(1), Change::CancelRequest(true), "CR");
        assert_eq!(follow(&cancel_request), Followed::Going);
        assert_eq!(
            follow(&state(CaseState::ExtractionCompleted)),
            Followed::Completed
        );
        assert_eq!(follow(&state(CaseState::NoOperation)), Followed::Cancelled);
    }
}
