//! Worker threads: connections spread over them, and the controller connections their calls
//! share. Each worker keeps the controller connections it opened, and one with none idle
//! borrows another's rather than open one, so calls that take turns on different workers reuse
//! one controller connection.

use std::num::NonZeroUsize;

use taskgate::proto::CaseExtractRequest;
use taskgate::proto::task_service_client::TaskServiceClient;
use tonic::transport::Channel;

use crate::support::{FakeUpstream, Gateway, Script};

/// The gateway's own client connection goes to worker 0 and the next to worker 1. Calls that
/// take turns on them, one at a time, use one controller connection throughout: each worker's
/// call finds the connection idle on the other worker's list and borrows it.
#[tokio::test]
async fn workers_lend_idle_controller_connections_rather_than_open_more() {
    let mut upstream = FakeUpstream::start(Script::ok_xml("<response><params/></response>")).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(|config| config.worker_threads = NonZeroUsize::new(2).unwrap())
        .start()
        .await;
    let second = TaskServiceClient::new(gateway.client_channel().await);
    for _ in 0..3 {
        call(&second).await;
        call(&gateway.client).await;
    }
    assert_eq!(upstream.requests_so_far(), 6);
    assert_eq!(upstream.connections_so_far(), 1);
    upstream.wait_for_open_connections(1).await;
    // Worker 1 opened the connection; its runtime stops before the pool is dropped.
    gateway.stop().await.unwrap();
    upstream.wait_for_open_connections(0).await;
}

/// One call over `client`'s connection, which must succeed.
async fn call(client: &TaskServiceClient<Channel>) {
    let request = CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
    };
    client.clone().case_extract(request).await.unwrap();
}
