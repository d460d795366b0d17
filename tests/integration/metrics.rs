//! The Prometheus endpoint, scraped after a known mix of calls.

use std::time::Duration;

use crate::support::{Gateway, http_client, scrape_line, unused_address};

async fn scrape(url: &str) -> String {
    let response = http_client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    response.text().await.unwrap()
}

fn assert_line(text: &str, expected: &str) {
    assert!(
        text.lines().any(|line| line == expected),
        "{expected} missing from:\n{text}"
    );
}

#[tokio::test]
async fn metrics_count_a_known_mix_of_calls() {
    let gateway = Gateway::builder()
        .config(|config| config.health_interval = Duration::from_millis(20))
        .metrics()
        .start()
        .await;
    let metrics_url = gateway.metrics_url();

    gateway.case_extract(4, 101337, None).await.unwrap();
    gateway.case_extract(4, 101337, None).await.unwrap_err(); // 1148
    gateway.case_extract(1, 101337, None).await.unwrap_err(); // 1087
    gateway.case_extract(0, 101337, None).await.unwrap_err(); // invalid, not sent

    let text = scrape(metrics_url).await;
    for line in [
        "taskgate_calls_total{method=\"case_extract\",code=\"OK\"} 1",
        "taskgate_calls_total{method=\"case_extract\",code=\"UNAVAILABLE\"} 1",
        "taskgate_calls_total{method=\"case_extract\",code=\"FAILED_PRECONDITION\"} 1",
        "taskgate_calls_total{method=\"case_extract\",code=\"INVALID_ARGUMENT\"} 1",
        "taskgate_controller_faults_total{method=\"case_extract\",fault_code=\"1148\"} 1",
        "taskgate_controller_faults_total{method=\"case_extract\",fault_code=\"1087\"} 1",
        "taskgate_upstream_request_duration_seconds_count{method=\"case_extract\"} 3",
        "taskgate_call_duration_seconds_count{method=\"case_extract\"} 4",
        "taskgate_calls_in_flight 0",
    ] {
        assert_line(&text, line);
    }
    assert!(
        !text.contains("port_id") && !text.contains("101337"),
        "ids leaked into labels"
    );

    // Health reaches SERVING on its own schedule; scrape until it shows, for a bounded time.
    scrape_line(metrics_url, "taskgate_health_serving 1").await;
}

/// The call layer learns CaseCancel and CaseGetState from the descriptor set: their calls,
/// faults and controller times are counted like CaseExtract's, under their snake-case names.
#[tokio::test]
async fn metrics_count_case_cancel_and_case_get_state() {
    let gateway = Gateway::builder().metrics().start().await;
    gateway.case_cancel(4, 101337).await.unwrap_err(); // 1149: nothing runs
    gateway.case_extract(4, 101337, None).await.unwrap();
    gateway.case_cancel(4, 101337).await.unwrap();
    gateway.case_get_state(4).await.unwrap();
    gateway.case_get_state(1).await.unwrap_err(); // 1087
    gateway.case_get_state(0).await.unwrap_err(); // invalid, not sent

    let text = scrape(gateway.metrics_url()).await;
    for line in [
        "taskgate_calls_total{method=\"case_cancel\",code=\"OK\"} 1",
        "taskgate_calls_total{method=\"case_cancel\",code=\"FAILED_PRECONDITION\"} 1",
        "taskgate_controller_faults_total{method=\"case_cancel\",fault_code=\"1149\"} 1",
        "taskgate_upstream_request_duration_seconds_count{method=\"case_cancel\"} 2",
        "taskgate_calls_total{method=\"case_get_state\",code=\"OK\"} 1",
        "taskgate_calls_total{method=\"case_get_state\",code=\"FAILED_PRECONDITION\"} 1",
        "taskgate_calls_total{method=\"case_get_state\",code=\"INVALID_ARGUMENT\"} 1",
        "taskgate_controller_faults_total{method=\"case_get_state\",fault_code=\"1087\"} 1",
        "taskgate_upstream_request_duration_seconds_count{method=\"case_get_state\"} 2",
        "taskgate_call_duration_seconds_count{method=\"case_get_state\"} 3",
        "taskgate_calls_in_flight 0",
    ] {
        assert_line(&text, line);
    }
}

#[tokio::test]
async fn upstream_errors_are_counted_by_kind() {
    let address = unused_address().await;
    let url =
        taskgate::config::parse_upstream_url(&format!("http://{address}/api/v2/task")).unwrap();
    let gateway = Gateway::builder().upstream(&url).metrics().start().await;
    gateway.case_extract(4, 101337, None).await.unwrap_err();
    let text = scrape(gateway.metrics_url()).await;
    assert_line(
        &text,
        "taskgate_upstream_errors_total{kind=\"unreachable\"} 1",
    );
    assert_line(&text, "taskgate_health_serving 0");
}

#[tokio::test]
async fn other_paths_are_404() {
    let gateway = Gateway::builder().metrics().start().await;
    let response = http_client()
        .get(gateway.metrics_url().replace("/metrics", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}
