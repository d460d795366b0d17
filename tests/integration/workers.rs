//! Worker threads: connections spread over them, each worker's calls reuse the controller
//! connections that worker opened, and all workers together keep at most `max_in_flight`
//! controller connections open.

use std::num::NonZeroUsize;

use taskgate::proto::CaseExtractRequest;
use taskgate::proto::task_service_client::TaskServiceClient;

use crate::support::{FakeUpstream, Gateway, Script};

const OK: &str = "<response><params/></response>";

/// A gateway with two workers in front of a fake controller, allowing `max_in_flight` calls.
async fn two_workers(max_in_flight: usize) -> (Gateway, FakeUpstream) {
    let upstream = FakeUpstream::start(Script::ok_xml(OK)).await;
    let gateway = Gateway::builder()
        .upstream(&upstream.url)
        .config(move |config| {
            config.worker_threads = NonZeroUsize::new(2).unwrap();
            config.upstream.max_in_flight = NonZeroUsize::new(max_in_flight).unwrap();
        })
        .start()
        .await;
    (gateway, upstream)
}

/// One call over `client`'s connection, which must succeed.
async fn call(client: &TaskServiceClient<tonic::transport::Channel>) {
    let request = CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
    };
    client.clone().case_extract(request).await.unwrap();
}

/// The gateway's own client connection went to worker 0, the second to worker 1; each worker
/// keeps its controller connection for its next call.
#[tokio::test]
async fn each_worker_reuses_the_controller_connections_it_opened() {
    let (gateway, mut upstream) = two_workers(2).await;
    let second = TaskServiceClient::new(gateway.client_channel().await);
    for _ in 0..3 {
        call(&gateway.client).await;
        call(&second).await;
    }
    assert_eq!(upstream.requests_so_far(), 6);
    assert_eq!(upstream.connections_so_far(), 2);
}

/// With one call allowed in flight, one controller connection may be open: a worker that needs
/// one closes the other worker's idle connection first.
#[tokio::test]
async fn all_workers_together_keep_at_most_max_in_flight_controller_connections() {
    let (gateway, mut upstream) = two_workers(1).await;
    let second = TaskServiceClient::new(gateway.client_channel().await);
    for (calls, client) in [&gateway.client, &second, &gateway.client]
        .into_iter()
        .enumerate()
    {
        call(client).await;
        upstream.wait_for_open_connections(1).await;
        assert_eq!(upstream.connections_so_far(), calls + 1);
    }
    assert_eq!(upstream.requests_so_far(), 3);
}
