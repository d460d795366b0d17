//! Every outcome of the simulated controller's AutoCase methods (`case_extract`, `case_cancel`,
//! `case_getstate`), through the gateway.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use taskgate::proto::{CaseGetStateResponse, CaseState, FaultCode, TaskFault};
use taskgate::simulator::layout::Layout;
use taskgate::simulator::port::{PortMode, PortSettings};

use crate::support::{
    CALL_LIMIT, Gateway, error_info, error_info_count, metadata, task_fault, within,
};

/// Checks a fault outcome of a `method` call on `port_id` (and `bin_id`, when the method takes
/// one) exactly: gRPC code, ErrorInfo, TaskFault, the start of the message.
fn check_fault(
    status: &tonic::Status,
    method: &str,
    (port_id, bin_id): (u32, Option<u32>),
    code: Code,
    fault_code: FaultCode,
) {
    let raw_code = fault_code as u32;
    let reason = fault_code.as_str_name().trim_start_matches("FAULT_CODE_");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_info_count(status), 1);
    let error_info = error_info(status);
    assert_eq!(error_info.domain, "autostore.task");
    assert_eq!(error_info.reason, reason);
    let port = port_id.to_string();
    let mut expected = metadata(&[
        ("faultCode", &raw_code.to_string()),
        ("method", method),
        ("portId", &port),
    ]);
    let mut what = format!("{method} port {port_id}");
    if let Some(bin_id) = bin_id {
        expected.extend(metadata(&[("binId", &bin_id.to_string())]));
        what = format!("{what} bin {bin_id}");
    }
    assert_eq!(error_info.metadata, expected);
    assert_eq!(
        task_fault(status),
        Some(TaskFault {
            code: fault_code as i32,
            raw_code,
            method: method.to_owned(),
        })
    );
    let message = status.message();
    assert!(
        message.starts_with(&format!("{what}: controller fault {raw_code} {reason}: ")),
        "{message}"
    );
}

/// A gateway in front of the simulator's default layout, each case state lasting `step_time`.
async fn with_step_time(step_time: Duration) -> Gateway {
    let layout = Layout {
        step_time,
        ..Layout::default_layout()
    };
    Gateway::builder().simulator(layout).start().await
}

/// What CaseGetState says about a port: its vendor code, the proto state and the bin; the port
/// must be the one asked about.
fn state_of(response: &CaseGetStateResponse, port_id: u32) -> (&str, CaseState, Option<u32>) {
    assert_eq!(response.port_id, port_id, "{response:?}");
    (
        response.raw_state.as_str(),
        response.state(),
        response.bin_id,
    )
}

#[tokio::test]
async fn extract_succeeds_then_repeating_at_once_is_1148_with_retry_info() {
    let gateway = Gateway::builder().start().await;
    gateway.case_extract(4, 101337, None).await.unwrap();
    let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
    check_fault(
        &status,
        "case_extract",
        (4, Some(101337)),
        Code::Unavailable,
        FaultCode::PreviousActionNotCompleted,
    );
    let retry_info = status.get_details_retry_info().unwrap();
    assert_eq!(retry_info.retry_delay, Some(Duration::from_secs(1)));
}

#[tokio::test]
async fn every_port_fault_of_the_default_layout() {
    let gateway = Gateway::builder().start().await;
    let cases = [
        (
            (1, 101337),
            Code::FailedPrecondition,
            FaultCode::PortIsNotAutocase,
        ),
        (
            (2, 101337),
            Code::FailedPrecondition,
            FaultCode::PortNotInAppropriateMode,
        ),
        (
            (3, 101337),
            Code::FailedPrecondition,
            FaultCode::BinNotSelectedForPort,
        ),
        (
            (4, 7),
            Code::FailedPrecondition,
            FaultCode::BinNotSelectedForPort,
        ),
        ((5, 101337), Code::NotFound, FaultCode::PortIsNotAvailable),
        ((2000, 1), Code::NotFound, FaultCode::PortIsNotAvailable),
    ];
    for ((port_id, bin_id), code, fault_code) in cases {
        let status = gateway
            .case_extract(port_id, bin_id, None)
            .await
            .unwrap_err();
        check_fault(
            &status,
            "case_extract",
            (port_id, Some(bin_id)),
            code,
            fault_code,
        );
        assert!(status.get_details_retry_info().is_none());
    }
}

#[tokio::test]
async fn the_port_frees_up_after_ecmp() {
    let gateway = with_step_time(Duration::from_millis(20)).await;
    gateway.case_extract(4, 101337, None).await.unwrap();
    // Poll until the port is free: each 1148 proves the operation is still running, and the
    // loop ends on the first success, so no fixed sleep decides the outcome.
    let freed = async {
        while let Err(status) = gateway.case_extract(4, 101337, None).await {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            tokio::task::yield_now().await;
        }
    };
    within(CALL_LIMIT, "port 4 did not become free after ECMP", freed).await;
}

/// CaseGetState, polled as fast as the gateway answers, sees the extraction run EREQ → ERSO →
/// ECMP with its bin; a step time of half a second leaves every state long enough to be seen.
#[tokio::test]
async fn case_get_state_follows_an_extraction_to_ecmp() {
    let gateway = with_step_time(Duration::from_millis(500)).await;
    assert_eq!(
        state_of(&gateway.case_get_state(4).await.unwrap(), 4),
        ("NOOP", CaseState::NoOperation, None)
    );
    gateway.case_extract(4, 101337, None).await.unwrap();
    let mut seen: Vec<(String, CaseState, Option<u32>)> = Vec::new();
    let followed = async {
        loop {
            let response = gateway.case_get_state(4).await.unwrap();
            let (raw_state, state, bin_id) = state_of(&response, 4);
            if seen.last().is_none_or(|(last, _, _)| last != raw_state) {
                seen.push((raw_state.to_owned(), state, bin_id));
            }
            if state == CaseState::ExtractionCompleted {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    within(CALL_LIMIT, "port 4 did not reach ECMP", followed).await;
    let bin = Some(101337);
    assert_eq!(
        seen,
        [
            ("EREQ".to_owned(), CaseState::ExtractionRequested, bin),
            ("ERSO".to_owned(), CaseState::ExtractionReadyToSend, bin),
            ("ECMP".to_owned(), CaseState::ExtractionCompleted, bin),
        ]
    );
}

#[tokio::test]
async fn a_cancel_mid_way_leaves_noop_with_the_bin_and_frees_the_port() {
    // Long enough that the extraction is still running whatever the machine's load.
    let gateway = with_step_time(Duration::from_secs(60)).await;
    gateway.case_extract(4, 101337, None).await.unwrap();
    assert_eq!(
        state_of(&gateway.case_get_state(4).await.unwrap(), 4),
        ("EREQ", CaseState::ExtractionRequested, Some(101337))
    );
    gateway.case_cancel(4, 101337).await.unwrap();
    assert_eq!(
        state_of(&gateway.case_get_state(4).await.unwrap(), 4),
        ("NOOP", CaseState::NoOperation, Some(101337))
    );
    // Nothing runs any more: the port takes a new extraction at once.
    gateway.case_extract(4, 101337, None).await.unwrap();
}

#[tokio::test]
async fn a_cancel_with_nothing_running_is_1149() {
    let gateway = Gateway::builder().start().await;
    let status = gateway.case_cancel(4, 101337).await.unwrap_err();
    check_fault(
        &status,
        "case_cancel",
        (4, Some(101337)),
        Code::FailedPrecondition,
        FaultCode::BinNotSelectedForPort,
    );
    assert!(status.get_details_retry_info().is_none());
}

#[tokio::test]
async fn case_get_state_port_faults() {
    let gateway = Gateway::builder().start().await;
    let status = gateway.case_get_state(1).await.unwrap_err();
    check_fault(
        &status,
        "case_getstate",
        (1, None),
        Code::FailedPrecondition,
        FaultCode::PortIsNotAutocase,
    );
    let status = gateway.case_get_state(9).await.unwrap_err();
    check_fault(
        &status,
        "case_getstate",
        (9, None),
        Code::NotFound,
        FaultCode::PortIsNotAvailable,
    );
    // Reading changes nothing, so a port that is not OPEN answers too.
    assert_eq!(
        state_of(&gateway.case_get_state(2).await.unwrap(), 2),
        ("NOOP", CaseState::NoOperation, None)
    );
}

/// Expected field violations: (field, description).
type Violations = &'static [(&'static str, &'static str)];

#[tokio::test]
async fn out_of_range_arguments_are_refused_with_bad_request() {
    let gateway = Gateway::builder().start().await;
    let cases: [(u32, u32, Violations); 5] = [
        (0, 1, &[("port_id", "port_id 0 is out of range 1-2000")]),
        (
            2001,
            1,
            &[("port_id", "port_id 2001 is out of range 1-2000")],
        ),
        (4, 0, &[("bin_id", "bin_id 0 is out of range 1-4000000")]),
        (
            4,
            4_000_001,
            &[("bin_id", "bin_id 4000001 is out of range 1-4000000")],
        ),
        (
            0,
            0,
            &[
                ("port_id", "port_id 0 is out of range 1-2000"),
                ("bin_id", "bin_id 0 is out of range 1-4000000"),
            ],
        ),
    ];
    for (port_id, bin_id, violations) in cases {
        let status = gateway
            .case_extract(port_id, bin_id, None)
            .await
            .unwrap_err();
        check_invalid_argument(&status, violations);
        // CaseCancel takes the same parameters, checked by the same path.
        let status = gateway.case_cancel(port_id, bin_id).await.unwrap_err();
        check_invalid_argument(&status, violations);
    }
    // CaseGetState takes no bin, so only its port is checked.
    let status = gateway.case_get_state(2001).await.unwrap_err();
    check_invalid_argument(
        &status,
        &[("port_id", "port_id 2001 is out of range 1-2000")],
    );
    assert_eq!(
        status.message(),
        "case_getstate port 2001: port_id 2001 is out of range 1-2000"
    );
}

/// Checks an INVALID_ARGUMENT status: ErrorInfo, the BadRequest's violations, no TaskFault.
fn check_invalid_argument(status: &tonic::Status, violations: Violations) {
    assert_eq!(status.code(), Code::InvalidArgument);
    let error_info = error_info(status);
    assert_eq!(error_info.domain, "taskgate");
    assert_eq!(error_info.reason, "INVALID_PARAMETER");
    assert_eq!(error_info.metadata["field"], violations[0].0);
    let bad_request = status.get_details_bad_request().unwrap();
    let actual: Vec<(String, String)> = bad_request
        .field_violations
        .into_iter()
        .map(|violation| (violation.field, violation.description))
        .collect();
    let expected: Vec<(String, String)> = violations
        .iter()
        .map(|(field, description)| ((*field).to_owned(), (*description).to_owned()))
        .collect();
    assert_eq!(actual, expected);
    assert_eq!(task_fault(status), None);
}

#[tokio::test]
async fn two_hundred_fifty_six_concurrent_calls_succeed() {
    let ports = (1..=256)
        .map(|id| PortSettings {
            id,
            autocase: true,
            mode: PortMode::Open,
            selected_bin: Some(1000 + id),
        })
        .collect();
    let layout = Layout {
        ports,
        step_time: Duration::from_secs(60),
    };
    let gateway = Gateway::builder().simulator(layout).start().await;
    let calls = (1..=256).map(|port_id| {
        let client = gateway.client.clone();
        tokio::spawn(async move {
            let request = taskgate::proto::CaseExtractRequest {
                port_id,
                bin_id: 1000 + port_id,
                ..Default::default()
            };
            client.clone().case_extract(request).await
        })
    });
    let handles: Vec<_> = calls.collect();
    for handle in handles {
        handle.await.unwrap().unwrap();
    }
}
