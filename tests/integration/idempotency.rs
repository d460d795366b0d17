//! The `request_id` field of CaseExtract and CaseCancel (AIP-155): whatever a client repeats,
//! and however it retries, the controller sees one POST per request_id it may have acted on.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tonic::Code;
use tonic_types::StatusExt;

use prost::Message as _;
use taskgate::proto::task_service_client::TaskServiceClient;

use taskgate::proto::{CaseCancelRequest, CaseExtractRequest, IDEMPOTENCY_KEY_HEADER};

use crate::cli::TaskgateProcess;
use crate::support::{FakeUpstream, Gateway, Script, error_info, metadata, scrape_line, within};

const REQUEST_ID: &str = "9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b";
const CALL_LIMIT: Duration = Duration::from_secs(30);
const OK: &str = "<response><params></params></response>";

fn extract(bin_id: u32) -> tonic::Request<CaseExtractRequest> {
    tonic::Request::new(CaseExtractRequest {
        port_id: 4,
        bin_id,
        request_id: REQUEST_ID.to_owned(),
    })
}

fn replayed<T>(response: &tonic::Response<T>) -> Option<&str> {
    let value = response.metadata().get("taskgate-replayed")?;
    Some(value.to_str().unwrap())
}

/// A `case_getstate` reply: port 4 in `state`, naming bin 101337.
fn port_state(state: &str) -> String {
    format!(
        "<response><params><port_id>4</port_id><bin_id>101337</bin_id>\
         <case_state>{state}</case_state></params></response>"
    )
}

/// A controller that reads the first POST of all and drops its connection without answering,
/// then answers every later request with `then`.
fn lost_then(then: &str) -> Script {
    Script::poisoned(b"", true, b"", then)
}

/// (a) A repeat sent while the first call is in flight waits for it: one POST, both OK, the
/// repeat marked as replayed.
#[tokio::test]
async fn a_repeat_while_the_first_call_is_in_flight_waits_for_its_answer() {
    let release = Arc::new(Notify::new());
    let script = Script::RespondWhen {
        release: release.clone(),
        body: OK.as_bytes().to_vec(),
    };
    let mut upstream = FakeUpstream::start(script).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .metrics()
        .start()
        .await;
    let mut first_client = gateway.client.clone();
    let first = tokio::spawn(async move { first_client.case_extract(extract(101337)).await });
    upstream.next_request_body().await;
    let mut repeat_client = gateway.client.clone();
    let repeat = tokio::spawn(async move { repeat_client.case_extract(extract(101337)).await });
    scrape_line(gateway.metrics_url(), "taskgate_idempotency_hits_total 1").await;
    release.notify_one();
    let first = within(CALL_LIMIT, "the first call did not end", first).await;
    let repeat = within(CALL_LIMIT, "the repeat did not end", repeat).await;
    let (first, repeat) = (first.unwrap().unwrap(), repeat.unwrap().unwrap());
    assert_eq!(replayed(&first), None);
    assert_eq!(replayed(&repeat), Some("stored"));
    assert_eq!(
        upstream.methods_so_far(),
        Vec::<String>::new(),
        "one POST only"
    );
    scrape_line(
        gateway.metrics_url(),
        "taskgate_idempotency_replays_total 1",
    )
    .await;
}

/// (b) A repeat after OK gets OK again without a POST, marked as replayed; a call without a
/// request_id is never deduplicated.
#[tokio::test]
async fn a_repeat_after_an_answer_gets_it_without_a_post() {
    let mut upstream = FakeUpstream::start(Script::ok_xml(OK)).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let mut client = gateway.client.clone();
    let first = client.case_extract(extract(101337)).await.unwrap();
    assert_eq!(replayed(&first), None);
    let repeat = client.case_extract(extract(101337)).await.unwrap();
    assert_eq!(replayed(&repeat), Some("stored"));
    assert_eq!(upstream.methods_so_far(), ["case_extract"]);
    for _ in 0..2 {
        gateway.case_extract(4, 101337, None).await.unwrap();
    }
    assert_eq!(upstream.methods_so_far(), ["case_extract", "case_extract"]);
}

/// A fault the controller sent is replayed like OK, unless it says the controller started
/// nothing and a retry may succeed (1148): then a repeat is a retry, and is sent.
#[tokio::test]
async fn a_fault_is_replayed_except_one_that_asks_for_a_retry() {
    for (code, posts) in [(1149, 1), (1148, 2)] {
        let fault = format!("<response><fault><code>{code}</code></fault></response>");
        let mut upstream = FakeUpstream::start(Script::ok_xml(&fault)).await;
        let gateway = Gateway::builder()
            .upstream(&upstream.url)
            .metrics()
            .start()
            .await;
        let mut client = gateway.client.clone();
        let first = client.case_extract(extract(101337)).await.unwrap_err();
        let repeat = client.case_extract(extract(101337)).await.unwrap_err();
        assert_eq!(repeat.code(), first.code(), "{code}");
        assert_eq!(repeat.message(), first.message(), "{code}");
        assert_eq!(
            repeat.metadata().get("taskgate-replayed").is_some(),
            posts == 1,
            "{code}"
        );
        assert_eq!(upstream.methods_so_far().len(), posts, "{code}");
        // Counted as often as the controller sent it.
        scrape_line(
            gateway.metrics_url(),
            &format!(
                "taskgate_controller_faults_total{{method=\"case_extract\",fault_code=\"{code}\"}} {posts}"
            ),
        )
        .await;
    }
}

/// (c) The same request_id with another bin, or on CaseCancel, is refused without a POST.
#[tokio::test]
async fn the_same_request_id_with_other_parameters_is_refused() {
    let mut upstream = FakeUpstream::start(Script::ok_xml(OK)).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let mut client = gateway.client.clone();
    client.case_extract(extract(101337)).await.unwrap();
    let other_bin = client.case_extract(extract(7)).await.unwrap_err();
    assert_eq!(other_bin.code(), Code::InvalidArgument);
    assert_eq!(
        other_bin.message(),
        format!(
            "case_extract port 4 bin 7: request_id {REQUEST_ID} was first sent with case_extract \
             port 4 bin 101337; send a fresh request_id for each new call"
        )
    );
    let info = error_info(&other_bin);
    assert_eq!(info.reason, "REQUEST_ID_REUSED");
    assert_eq!(
        info.metadata,
        metadata(&[
            ("method", "case_extract"),
            ("portId", "4"),
            ("binId", "7"),
            ("requestId", REQUEST_ID)
        ])
    );
    let cancel = CaseCancelRequest {
        port_id: 4,
        bin_id: 101337,
        request_id: REQUEST_ID.to_owned(),
    };
    let on_cancel = client.case_cancel(cancel).await.unwrap_err();
    assert_eq!(error_info(&on_cancel).reason, "REQUEST_ID_REUSED");
    assert_eq!(upstream.methods_so_far(), ["case_extract"]);
}

/// A request_id that is not a UUID is refused with a field violation naming it; the nil UUID
/// too, as the value of a client that never set the field.
#[tokio::test]
async fn a_request_id_that_is_not_a_uuid_is_refused() {
    let mut upstream = FakeUpstream::start(Script::ok_xml(OK)).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let cases = [
        (
            "order-42",
            "case_extract port 4 bin 101337: request_id \"order-42\" is not a UUID in its \
             hyphenated form, as 123e4567-e89b-12d3-a456-426614174000",
        ),
        (
            "9f1c2b3a4d5e4f608a7b1c2d3e4f5a6b",
            "case_extract port 4 bin 101337: request_id \"9f1c2b3a4d5e4f608a7b1c2d3e4f5a6b\" is \
             not a UUID in its hyphenated form, as 123e4567-e89b-12d3-a456-426614174000",
        ),
        (
            "00000000-0000-0000-0000-000000000000",
            "case_extract port 4 bin 101337: request_id 00000000-0000-0000-0000-000000000000 is \
             the nil UUID; send a fresh random one for each call",
        ),
    ];
    for (request_id, message) in cases {
        let request = CaseExtractRequest {
            port_id: 4,
            bin_id: 101337,
            request_id: request_id.to_owned(),
        };
        let status = gateway
            .client
            .clone()
            .case_extract(request)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{request_id}");
        assert_eq!(status.message(), message);
        assert_eq!(error_info(&status).reason, "INVALID_PARAMETER");
        let bad_request = status.get_details_bad_request().unwrap();
        assert_eq!(bad_request.field_violations[0].field, "request_id");
    }
    let upper_case = CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        request_id: REQUEST_ID.to_uppercase(),
    };
    gateway
        .client
        .clone()
        .case_extract(upper_case)
        .await
        .unwrap();
    let repeat = gateway
        .client
        .clone()
        .case_extract(extract(101337))
        .await
        .unwrap();
    assert_eq!(
        replayed(&repeat),
        Some("stored"),
        "the case of the hex digits is not the id"
    );
    assert_eq!(upstream.methods_so_far(), ["case_extract"]);
}

/// (d) The first call's connection is lost after the POST: its outcome is unknown. The port
/// then shows the bin in EREQ, so the first call was accepted: the repeat answers OK without a
/// second `case_extract`.
#[tokio::test]
async fn after_an_unknown_outcome_a_port_running_the_extraction_answers_ok() {
    let mut upstream = FakeUpstream::start(lost_then(&port_state("EREQ"))).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .metrics()
        .start()
        .await;
    let mut client = gateway.client.clone();
    let first = client.case_extract(extract(101337)).await.unwrap_err();
    assert_eq!(first.code(), Code::Unknown, "{first:?}");
    let repeat = client.case_extract(extract(101337)).await.unwrap();
    assert_eq!(replayed(&repeat), Some("resolved"));
    let again = client.case_extract(extract(101337)).await.unwrap();
    assert_eq!(replayed(&again), Some("stored"));
    assert_eq!(upstream.methods_so_far(), ["case_extract", "case_getstate"]);
    scrape_line(
        gateway.metrics_url(),
        "taskgate_idempotency_resolved_total{outcome=\"accepted\"} 1",
    )
    .await;
}

/// (d) The same, but the port shows no operation: the first call was not acted on, so the
/// repeat sends it again.
#[tokio::test]
async fn after_an_unknown_outcome_a_port_with_no_operation_is_sent_again() {
    let noop_without_bin = "<response><params><port_id>4</port_id>\
                            <case_state>NOOP</case_state></params></response>";
    let mut upstream = FakeUpstream::start(lost_then(noop_without_bin)).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let mut client = gateway.client.clone();
    client.case_extract(extract(101337)).await.unwrap_err();
    let repeat = client.case_extract(extract(101337)).await.unwrap();
    assert_eq!(replayed(&repeat), None);
    assert_eq!(
        upstream.methods_so_far(),
        ["case_extract", "case_getstate", "case_extract"]
    );
}

/// After an unknown outcome, a state that tells neither way is named, with a code no retry
/// policy retries, and nothing is sent.
#[tokio::test]
async fn after_an_unknown_outcome_an_unclear_state_is_named() {
    let other_bin = "<response><params><port_id>4</port_id><bin_id>7</bin_id>\
                     <case_state>ERSO</case_state></params></response>";
    let mut upstream = FakeUpstream::start(lost_then(other_bin)).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let mut client = gateway.client.clone();
    client.case_extract(extract(101337)).await.unwrap_err();
    let repeat = client.case_extract(extract(101337)).await.unwrap_err();
    assert_eq!(repeat.code(), Code::FailedPrecondition);
    assert_eq!(
        repeat.message(),
        format!(
            "case_extract port 4 bin 101337: the first call with request_id {REQUEST_ID} may have \
             been acted on, and case_getstate shows the port in ERSO with bin 7, which does not \
             tell whether it was; nothing was sent: read the port with CaseGetState and decide"
        )
    );
    let info = error_info(&repeat);
    assert_eq!(info.reason, "REQUEST_OUTCOME_UNKNOWN");
    assert_eq!(info.metadata["caseState"], "ERSO");
    assert_eq!(upstream.methods_so_far(), ["case_extract", "case_getstate"]);
}

/// The port read that clears a resend may come before the first call reaches the controller.
/// When the resend then meets it (fault 1148), the repeat is told the outcome is still unknown,
/// with a code no retry policy retries, and the id is kept: the next repeat reads the port
/// again rather than send a fresh POST.
#[tokio::test]
async fn a_resend_that_meets_the_first_call_leaves_the_outcome_unknown() {
    let noop = "<response><params><port_id>4</port_id>\
                <case_state>NOOP</case_state></params></response>";
    let fault = "<response><fault><code>1148</code></fault></response>";
    let script = Script::sequence(&[None, Some(noop), Some(fault), Some(&port_state("EREQ"))]);
    let mut upstream = FakeUpstream::start(script).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let mut client = gateway.client.clone();
    let first = client.case_extract(extract(101337)).await.unwrap_err();
    assert_eq!(first.code(), Code::Unknown, "{first:?}");
    let repeat = client.case_extract(extract(101337)).await.unwrap_err();
    assert_eq!(repeat.code(), Code::FailedPrecondition, "{repeat:?}");
    assert_eq!(
        repeat.message(),
        format!(
            "case_extract port 4 bin 101337: the first call with request_id {REQUEST_ID} may have \
             been acted on; case_getstate showed the port in NOOP with no bin, so it was sent \
             again, and that ended: controller fault 1148 \
             PREVIOUS_ACTION_NOT_COMPLETED: New action cannot be started until the previous \
             action has been completed; the first call may have reached the controller after \
             the port was read: read the port with CaseGetState and decide"
        )
    );
    assert_eq!(error_info(&repeat).reason, "REQUEST_OUTCOME_UNKNOWN");
    let again = client.case_extract(extract(101337)).await.unwrap();
    assert_eq!(replayed(&again), Some("resolved"));
    assert_eq!(
        upstream.methods_so_far(),
        [
            "case_extract",
            "case_getstate",
            "case_extract",
            "case_getstate"
        ]
    );
}

/// A repeat whose deadline runs out while the first call is in flight is told so, and a later
/// repeat gets the first call's answer.
#[tokio::test]
async fn a_repeat_that_cannot_wait_for_the_first_call_says_so() {
    let release = Arc::new(Notify::new());
    let script = Script::RespondWhen {
        release: release.clone(),
        body: OK.as_bytes().to_vec(),
    };
    let mut upstream = FakeUpstream::start(script).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let mut first_client = gateway.client.clone();
    let first = tokio::spawn(async move { first_client.case_extract(extract(101337)).await });
    upstream.next_request_body().await;
    let mut hurried = extract(101337);
    hurried.set_timeout(Duration::from_millis(500));
    let status = gateway
        .client
        .clone()
        .case_extract(hurried)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(error_info(&status).reason, "REQUEST_IN_PROGRESS");
    release.notify_one();
    within(CALL_LIMIT, "the first call did not end", first)
        .await
        .unwrap()
        .unwrap();
    let repeat = gateway
        .client
        .clone()
        .case_extract(extract(101337))
        .await
        .unwrap();
    assert_eq!(replayed(&repeat), Some("stored"));
    assert_eq!(
        upstream.methods_so_far(),
        Vec::<String>::new(),
        "one POST only"
    );
}

/// (e) The five-POST case on the real binary, with a naive client that retries every
/// error five times with the same request_id: the controller, which reads each POST and drops
/// the connection, sees one `case_extract`; the repeats only read the port.
#[tokio::test]
async fn a_client_retrying_everything_with_one_request_id_makes_one_post() {
    let mut upstream = FakeUpstream::start(Script::Drop).await;
    let gateway = TaskgateProcess::start_with_upstream(upstream.url.as_str(), &[]).await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let attempts = async {
        let mut codes = Vec::new();
        for _ in 0..5 {
            let status = client.case_extract(extract(101337)).await.unwrap_err();
            codes.push(status.code());
        }
        codes
    };
    let codes = within(CALL_LIMIT, "the attempts did not end", attempts).await;
    assert_eq!(codes, [Code::Unknown; 5]);
    let methods = upstream.methods_so_far();
    assert_eq!(
        methods
            .iter()
            .filter(|method| *method == "case_extract")
            .count(),
        1,
        "{methods:?}"
    );
    assert_eq!(methods.len(), 5, "{methods:?}");
}

/// `case-extract` sends a fresh request_id and prints it when the outcome is unknown; repeated
/// with `--idempotency-key`, the call is answered from the port's state, not POSTed again.
#[tokio::test]
async fn the_cli_prints_the_key_of_an_unknown_outcome_and_repeats_with_it() {
    let mut upstream = FakeUpstream::start(lost_then(&port_state("ERSO"))).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let address = format!("http://{}", gateway.address);
    let args = [
        "case-extract",
        "--gateway",
        &address,
        "--port",
        "4",
        "--bin",
        "101337",
    ];
    let (stdout, _) = crate::cli::run(&args, 1).await;
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("  idempotency key: "))
        .unwrap_or_else(|| panic!("no idempotency key line in:\n{stdout}"));
    let (key, repeat_hint) = line.split_once(' ').unwrap();
    assert_eq!(
        repeat_hint,
        format!("(repeat with --idempotency-key {key})")
    );
    let mut repeat = args.to_vec();
    repeat.extend(["--idempotency-key", key]);
    let (stdout, _) = crate::cli::run(&repeat, 0).await;
    assert!(
        stdout.starts_with(
            "ok: case_extract port 4 bin 101337: the controller accepted the case extraction\n"
        ),
        "{stdout}"
    );
    assert_eq!(upstream.methods_so_far(), ["case_extract", "case_getstate"]);
}

/// A call that failed with a definite answer prints no key: there is nothing to repeat.
#[tokio::test]
async fn the_cli_prints_no_key_after_a_definite_answer() {
    let fault = "<response><fault><code>1149</code></fault></response>";
    let upstream = FakeUpstream::start(Script::ok_xml(fault)).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let address = format!("http://{}", gateway.address);
    let args = [
        "case-cancel",
        "--gateway",
        &address,
        "--port",
        "4",
        "--bin",
        "101337",
    ];
    let (stdout, _) = crate::cli::run(&args, 1).await;
    assert!(
        stdout.contains("1149 BIN_NOT_SELECTED_FOR_PORT"),
        "{stdout}"
    );
    assert!(!stdout.contains("idempotency key"), "{stdout}");
}

/// Past `--idempotency-max-entries`, the oldest answered id is forgotten, and counted by its
/// state: an OK forgotten means its repeat is sent again, which an operator must see.
#[tokio::test]
async fn past_the_entry_limit_the_oldest_id_is_forgotten_and_counted() {
    let mut upstream = FakeUpstream::start(Script::ok_xml(OK)).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(|config| {
            config.upstream.max_in_flight = std::num::NonZeroUsize::new(1).unwrap();
            config.upstream.idempotency_max_entries = std::num::NonZeroUsize::new(2).unwrap();
        })
        .metrics()
        .start()
        .await;
    let mut client = gateway.client.clone();
    let other = CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        request_id: "0b6f7c1e-2d3a-4b5c-9d8e-7f6a5b4c3d2e".to_owned(),
    };
    let third = CaseExtractRequest {
        request_id: "5d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6".to_owned(),
        ..other.clone()
    };
    client.case_extract(extract(101337)).await.unwrap();
    client.case_extract(other).await.unwrap();
    client.case_extract(third).await.unwrap();
    let repeat = client.case_extract(extract(101337)).await.unwrap();
    assert_eq!(replayed(&repeat), None);
    assert_eq!(upstream.methods_so_far().len(), 4);
    scrape_line(
        gateway.metrics_url(),
        "taskgate_idempotency_evictions_total{state=\"ok\"} 2",
    )
    .await;
}

fn cancel(request_id: &str) -> tonic::Request<CaseCancelRequest> {
    tonic::Request::new(CaseCancelRequest {
        port_id: 4,
        bin_id: 101337,
        request_id: request_id.to_owned(),
    })
}

/// CaseCancel after an unknown outcome, on the real binary: a port in NOOP keeping the bin
/// shows the cancel was applied, so the repeat answers OK without a second `case_cancel`; a
/// port still in EREQ with the bin shows it was not, so the repeat sends it again.
#[tokio::test]
async fn after_an_unknown_cancel_the_port_decides_on_the_real_binary() {
    let mut upstream = FakeUpstream::start(lost_then(&port_state("NOOP"))).await;
    let gateway = TaskgateProcess::start_with_upstream(upstream.url.as_str(), &[]).await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    let first = client.case_cancel(cancel(REQUEST_ID)).await.unwrap_err();
    assert_eq!(first.code(), Code::Unknown, "{first:?}");
    let repeat = client.case_cancel(cancel(REQUEST_ID)).await.unwrap();
    assert_eq!(replayed(&repeat), Some("resolved"));
    let again = client.case_cancel(cancel(REQUEST_ID)).await.unwrap();
    assert_eq!(replayed(&again), Some("stored"));
    assert_eq!(upstream.methods_so_far(), ["case_cancel", "case_getstate"]);

    let ereq = port_state("EREQ");
    let script = Script::sequence(&[None, Some(&ereq), Some(OK)]);
    let mut upstream = FakeUpstream::start(script).await;
    let gateway = TaskgateProcess::start_with_upstream(upstream.url.as_str(), &[]).await;
    let mut client = TaskServiceClient::connect(gateway.gateway.clone())
        .await
        .unwrap();
    client.case_cancel(cancel(REQUEST_ID)).await.unwrap_err();
    let repeat = client.case_cancel(cancel(REQUEST_ID)).await.unwrap();
    assert_eq!(replayed(&repeat), None);
    assert_eq!(
        upstream.methods_so_far(),
        ["case_cancel", "case_getstate", "case_cancel"]
    );
}

/// An operator repeating a call with `--idempotency-key` sees the key on every failure, a
/// definite one included, so the next repeat has it at hand.
#[tokio::test]
async fn the_cli_prints_a_given_key_on_every_failure() {
    let fault = "<response><fault><code>1149</code></fault></response>";
    let upstream = FakeUpstream::start(Script::ok_xml(fault)).await;
    let gateway = Gateway::builder().upstream(&upstream.url).start().await;
    let address = format!("http://{}", gateway.address);
    let args = [
        "case-cancel",
        "--gateway",
        &address,
        "--port",
        "4",
        "--bin",
        "101337",
        "--idempotency-key",
        REQUEST_ID,
    ];
    let (stdout, _) = crate::cli::run(&args, 1).await;
    assert!(
        stdout.contains("1149 BIN_NOT_SELECTED_FOR_PORT"),
        "{stdout}"
    );
    // Not "repeat with" it: the gateway answers a repeat of a definite refusal with the same
    // refusal, so a call once the port has changed needs a fresh key; the line says so.
    let expected = format!(
        "\n  idempotency key: {REQUEST_ID} (the same gateway process answers a repeat with it \
         the same way within its --idempotency-window; for a new attempt leave \
         --idempotency-key out)\n"
    );
    assert!(stdout.contains(&expected), "{stdout}");
    // The gateway took the key as new: if an earlier call used it, that call may have acted.
    assert!(
        stdout
            .contains("\n  retry:   not at once: the gateway held no unknown outcome for this key"),
        "{stdout}"
    );
    let (again, _) = crate::cli::run(&args, 1).await;
    // Replayed, the refusal is the first call's, and its row's advice stands.
    assert!(
        again.contains("\n  retry:   do not retry until the port's state changes\n"),
        "{again}"
    );
    assert!(
        again.contains(
            "\n  replayed: the first call's answer; the controller was not called again\n  \
             request id: "
        ) && again.contains(&expected),
        "the replayed line, before the request id as after a success: {again}"
    );
}

/// Ids whose outcome is unknown are never forgotten: when they fill the table, a new id is
/// refused before anything is sent, and counted.
#[tokio::test]
async fn a_table_full_of_unknown_ids_refuses_a_new_one_without_a_post() {
    let mut upstream = FakeUpstream::start(Script::Drop).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(|config| {
            config.upstream.max_in_flight = std::num::NonZeroUsize::new(1).unwrap();
            config.upstream.idempotency_max_entries = std::num::NonZeroUsize::new(2).unwrap();
        })
        .metrics()
        .start()
        .await;
    let mut client = gateway.client.clone();
    let ids = [
        REQUEST_ID,
        "0b6f7c1e-2d3a-4b5c-9d8e-7f6a5b4c3d2e",
        "5d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6",
    ];
    for id in &ids[..2] {
        let status = client.case_cancel(cancel(id)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unknown, "{status:?}");
    }
    let refused = client.case_cancel(cancel(ids[2])).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(error_info(&refused).reason, "IDEMPOTENCY_TABLE_FULL");
    assert_eq!(
        refused.message(),
        format!(
            "case_cancel port 4 bin 101337: request_id {} is new, and all 2 remembered \
             request_ids (--idempotency-max-entries) are in flight or have an unknown outcome, \
             which are kept for --idempotency-window (10m) after their call ended; nothing was \
             sent: retry later, with backoff",
            ids[2]
        )
    );
    assert_eq!(upstream.methods_so_far(), ["case_cancel", "case_cancel"]);
    scrape_line(
        gateway.metrics_url(),
        "taskgate_idempotency_entries{state=\"unknown\"} 2",
    )
    .await;
    scrape_line(
        gateway.metrics_url(),
        "taskgate_idempotency_refusals_total 1",
    )
    .await;
}

/// The CLI shows when an answer is a replay, so an operator repeating with
/// `--idempotency-key` can tell that the controller was not called again.
#[tokio::test]
async fn the_cli_says_when_an_answer_is_replayed() {
    let gateway = Gateway::builder().start().await;
    let address = format!("http://{}", gateway.address);
    let args = [
        "case-extract",
        "--gateway",
        &address,
        "--port",
        "4",
        "--bin",
        "101337",
        "--idempotency-key",
        REQUEST_ID,
    ];
    let (first, _) = crate::cli::run(&args, 0).await;
    assert!(!first.contains("replayed"), "{first}");
    let (repeat, _) = crate::cli::run(&args, 0).await;
    assert!(
        repeat.starts_with(
            "ok: case_extract port 4 bin 101337: the controller accepted the case extraction\n  \
             replayed: the first call's answer; the controller was not called again\n  request id: "
        ),
        "{repeat}"
    );
}

/// A key the gateway would refuse is a usage error, found before connecting: nothing listens
/// on the address given.
#[tokio::test]
async fn the_cli_refuses_a_key_that_is_not_a_uuid_before_connecting() {
    for (key, cause) in [
        (
            "not-a-uuid",
            "it is not a UUID in its hyphenated form, as 123e4567-e89b-12d3-a456-426614174000",
        ),
        (
            "00000000-0000-0000-0000-000000000000",
            "it is the nil UUID; send a fresh random one for each call",
        ),
    ] {
        let args = [
            "case-extract",
            "--gateway",
            "http://127.0.0.1:1",
            "--port",
            "4",
            "--bin",
            "101337",
            "--idempotency-key",
            key,
        ];
        let (_, stderr) = crate::cli::run(&args, 2).await;
        let expected = format!(
            "error: invalid value '{key}' for '--idempotency-key <IDEMPOTENCY_KEY>': {cause}\n"
        );
        assert!(stderr.starts_with(&expected), "{stderr}");
    }
}

/// A stand-in gateway that answers every call `UNIMPLEMENTED`, and sends, for each, its
/// `idempotency-key` metadata and the `request_id` its message carries.
async fn recording_gateway() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<(Option<String>, String)>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let sender = sender.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    return;
                };
                // Each stream on its own task: the connection makes progress only while
                // `accept` is polled.
                while let Some(Ok((request, respond))) = connection.accept().await {
                    tokio::spawn(record(request, respond, sender.clone()));
                }
            });
        }
    });
    (address, receiver)
}

/// Sends the call's `idempotency-key` metadata and its message's `request_id`, and answers it
/// `UNIMPLEMENTED`.
async fn record(
    request: hyper::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    sender: tokio::sync::mpsc::UnboundedSender<(Option<String>, String)>,
) {
    let header = request
        .headers()
        .get(IDEMPOTENCY_KEY_HEADER)
        .map(|value| value.to_str().unwrap().to_owned());
    let extract = request.uri().path().ends_with("/CaseExtract");
    let mut body = request.into_body();
    let mut bytes = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    // A gRPC message: a flag byte and a 4-byte length before it.
    let message = &bytes[5..];
    let request_id = if extract {
        CaseExtractRequest::decode(message).unwrap().request_id
    } else {
        CaseCancelRequest::decode(message).unwrap().request_id
    };
    sender.send((header, request_id)).unwrap();
    let response = hyper::Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", "12")
        .body(())
        .unwrap();
    let _ = respond.send_response(response, true);
}

/// The CLI sends the request_id also as the `idempotency-key` metadata, as the clients do, so
/// that a proxy routing each id to one replica sends an operator's repeat where the first call
/// went: a fresh key and a given one alike.
#[tokio::test]
async fn the_cli_sends_its_key_as_idempotency_key_metadata() {
    let (address, mut seen) = recording_gateway().await;
    let common = ["--gateway", &address, "--port", "4", "--bin", "101337"];
    let mut extract = vec!["case-extract"];
    extract.extend(common);
    crate::cli::run(&extract, 1).await;
    let (header, request_id) = within(CALL_LIMIT, "the extraction's record", seen.recv())
        .await
        .unwrap();
    assert!(uuid::Uuid::parse_str(&request_id).is_ok(), "{request_id:?}");
    assert_eq!(header.as_deref(), Some(request_id.as_str()));
    let mut cancel = vec!["case-cancel"];
    cancel.extend(common);
    cancel.extend(["--idempotency-key", REQUEST_ID]);
    crate::cli::run(&cancel, 1).await;
    let recorded = within(CALL_LIMIT, "the cancel's record", seen.recv()).await;
    assert_eq!(
        recorded,
        Some((Some(REQUEST_ID.to_owned()), REQUEST_ID.to_owned()))
    );
}
