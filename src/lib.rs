//! taskgate: a gRPC gateway to the AutoStore task interface.
//!
//! The major components, in the order a newcomer should read them:
//!
//! - [`proto`]: the generated `taskgate.v1` contract (messages, client, server, descriptor set).
//! - [`fault`]: the fault table, the one source of truth for controller fault codes.
//! - [`codec`]: task-interface XML to and from method calls and replies.
//! - [`domain`]: the task interface's parameter ranges and the AutoCase states, shared by the
//!   gateway and the simulator.
//! - [`log_publisher`]: the Log Publisher's event stream: CRLF lines and the segments in them.
//! - [`config`]: validated settings for the gateway and the simulator.
//! - [`request_id`]: the `x-request-id` that ties a call's logs together.
//! - `call`: the layer around every call: request ID, span, in-flight gauge, metrics, access line.
//! - [`protocol`]: the layer that refuses a malformed `grpc-timeout` and a second request message.
//! - [`auth`]: bearer tokens for the task service, reloaded on SIGHUP.
//! - [`tls`]: certificate files for gRPC (and mTLS) and for HTTPS to the controller.
//! - [`regular_file`]: reading an operator's file: regular files only, size capped.
//! - `upstream`: the HTTP client that calls the controller.
//! - `status`: the only place a `tonic::Status` is built.
//! - `service`: the `TaskService` implementation.
//! - `accept`: accept loops that back off, count and log once per interval when accept fails.
//! - `connection`: the limits every accepted connection lives under (handshake, idle, heads,
//!   how many) and the drain at shutdown.
//! - `router`: serves the simulator's and the metrics endpoint's axum routers within the limits.
//! - [`simulator`]: an embedded simulated controller.
//! - `health`: the grpc.health.v1 statuses and the controller probe.
//! - [`log`]: logging off the call path, through a bounded queue and a writer thread.
//! - [`metrics`]: Prometheus counters, histograms and the `/metrics` endpoint.
//! - [`server`]: wiring a listener, a config and a shutdown signal into a running gateway.
//! - [`shutdown`]: the SIGINT/SIGTERM future, and SIGHUP caught so it never ends the process.
//! - [`nofile`]: the open-file limit: raised at startup, and what the connection limit is
//!   sized from.
//! - [`cli`]: the `taskgate` command line.
//! - `bench_api`: hidden entry points for `benches/`; not a stable API.

pub mod proto {
    //! The generated `taskgate.v1` types, tonic client and server, and encoded descriptor set.
    #![allow(missing_docs, unreachable_pub, clippy::all)] // Generated code: documented in the .proto.

    tonic::include_proto!("taskgate.v1");

    /// The encoded `FileDescriptorSet` of `proto/`, with source info (comments) included.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/taskgate_descriptor.bin"));

    /// The full name of `TaskFault`, for its `google.protobuf.Any` type URL.
    pub const TASK_FAULT_TYPE_URL: &str = "type.googleapis.com/taskgate.v1.TaskFault";
}

mod accept;
pub mod auth;
#[doc(hidden)]
pub mod bench_api;
mod call;
pub mod cli;
pub mod codec;
pub mod config;
mod connection;
pub mod domain;
pub mod fault;
mod health;
pub mod log;
pub mod log_publisher;
pub mod metrics;
pub mod nofile;
pub mod protocol;
pub mod regular_file;
pub mod request_id;
mod router;
pub mod server;
mod service;
pub mod shutdown;
pub mod simulator;
mod status;
pub mod tls;
mod upstream;
