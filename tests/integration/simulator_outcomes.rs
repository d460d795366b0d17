//! Every `case_extract` outcome of the simulated controller, through the gateway.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use taskgate::proto::{FaultCode, TaskFault};
use taskgate::simulator::layout::Layout;
use taskgate::simulator::port::{PortMode, PortSettings};

use crate::support::{
    CALL_LIMIT, Gateway, error_info, error_info_count, metadata, task_fault, within,
};

/// Checks a fault outcome exactly: gRPC code, ErrorInfo, TaskFault.
fn check_fault(
    status: &tonic::Status,
    (port_id, bin_id): (u32, u32),
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
    assert_eq!(
        error_info.metadata,
        metadata(&[
            ("faultCode", &raw_code.to_string()),
            ("method", "case_extract"),
            ("portId", &port_id.to_string()),
            ("binId", &bin_id.to_string()),
        ])
    );
    assert_eq!(
        task_fault(status),
        Some(TaskFault {
            code: fault_code as i32,
            raw_code,
            method: "case_extract".to_owned(),
        })
    );
    let message = status.message();
    assert!(
        message.starts_with(&format!(
            "case_extract port {port_id} bin {bin_id}: controller fault {raw_code} {reason}: "
        )),
        "{message}"
    );
}

#[tokio::test]
async fn extract_succeeds_then_repeating_at_once_is_1148_with_retry_info() {
    let gateway = Gateway::builder().start().await;
    gateway.case_extract(4, 101337, None).await.unwrap();
    let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
    check_fault(
        &status,
        (4, 101337),
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
        check_fault(&status, (port_id, bin_id), code, fault_code);
        assert!(status.get_details_retry_info().is_none());
    }
}

#[tokio::test]
async fn the_port_frees_up_after_ecmp() {
    let layout = Layout {
        step_time: Duration::from_millis(20),
        ..Layout::default_layout()
    };
    let gateway = Gateway::builder().simulator(layout).start().await;
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
        assert_eq!(status.code(), Code::InvalidArgument);
        let error_info = error_info(&status);
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
        assert_eq!(task_fault(&status), None);
    }
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
            };
            client.clone().case_extract(request).await
        })
    });
    let handles: Vec<_> = calls.collect();
    for handle in handles {
        handle.await.unwrap().unwrap();
    }
}
