//! taskgate: a gRPC gateway to the AutoStore task interface, as a library.
//!
//! What a library user needs is small: build a [`server::Config`] (from
//! [`server::Config::with_upstream`], changing what differs), bind a listener and call
//! [`server::serve`] with a shutdown future; or run the embedded [`simulator`] the same way.
//! The `taskgate` binary is one such user: its command line (flags, environment, config file)
//! lives in the binary and only builds these types.
//!
//! The public modules, in the order a newcomer should read them:
//!
//! - [`proto`]: the generated `taskgate.v1` contract (messages, client, server, descriptor set).
//! - [`fault`]: the fault table, the one source of truth for controller fault codes.
//! - [`gateway_error`]: the gateway-error table, the one source of truth for its own errors and
//!   which of them a caller may retry.
//! - [`codec`]: task-interface XML (and JSON) to and from method calls and replies.
//! - [`config`]: the shared vocabulary of settings: defaults, ranges, URL and origin checks.
//! - [`upstream`]: the controller client's settings ([`upstream::Settings`]).
//! - [`connection`]: the gRPC port's connection limits ([`connection::Settings`]).
//! - [`domain`]: the task interface's parameter ranges and the AutoCase states, shared by the
//!   gateway and the simulator.
//! - [`log_publisher`]: the Log Publisher's event stream: CRLF lines and the segments in them.
//! - [`tls`]: certificate files for gRPC (and mTLS) and for HTTPS to the controller.
//! - [`auth`]: the bearer-token file for the task service, reloaded on SIGHUP and when it changes.
//! - [`server`]: the whole configuration and [`server::serve`], which runs a gateway.
//! - [`console`]: the operator console's page, served on the gRPC port with `--console`.
//! - [`simulator`]: an embedded simulated controller.
//! - [`log`]: logging off the call path: tracing-subscriber's fmt layer into tracing-appender's lossy writer.
//! - [`otel`]: distributed tracing: W3C trace context in and out, spans exported over OTLP.
//! - [`shutdown`]: the SIGINT/SIGTERM future, and SIGHUP caught so it never ends the process.
//! - [`nofile`]: the open-file limit, raised at startup.
//! - [`regular_file`]: reading an operator's file: regular files only, size capped.
//!
//! Inside, and not part of the API: `call` (the layer around every call: request ID, span,
//! in-flight gauge, metrics, access line), `request_id` (the `x-request-id` itself), `protocol`
//! (the layer that refuses a malformed `grpc-timeout` or a second request message), `status` (the
//! only place a `tonic::Status` is built), `service` (the `TaskService` implementation),
//! `idempotency` (what the gateway remembers of each `request_id`, the AIP-155 idempotency key),
//! `health`, `metrics`, `accept` and `router` (the axum endpoints within the connection limits);
//! `bench_api` and `fuzz_api` are hidden doors for `benches/` and `fuzz/`.

pub mod proto {
    //! The generated `taskgate.v1` types, tonic client and server, and encoded descriptor set.
    #![allow(missing_docs, unreachable_pub, clippy::all)] // Generated code: documented in the .proto.

    tonic::include_proto!("taskgate.v1");

    /// The encoded `FileDescriptorSet` of `proto/`, with source info (comments) included.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/taskgate_descriptor.bin"));

    /// The full name of `TaskFault`, for its `google.protobuf.Any` type URL.
    pub const TASK_FAULT_TYPE_URL: &str = "type.googleapis.com/taskgate.v1.TaskFault";

    /// The health service name for liveness probes: SERVING from the start until shutdown
    /// begins, whatever the controller does. A liveness probe of `""` would restart the gateway
    /// whenever the controller is down, which brings no controller back and only drops the
    /// watchers' streams and the idempotency keys it remembers.
    pub const LIVENESS_SERVICE: &str = "liveness";

    /// The metadata key of a call's request ID: a caller may send one (printable ASCII, at most
    /// 128 bytes), and the gateway returns it, on errors too, and logs it with every line of the
    /// call.
    pub const REQUEST_ID_HEADER: &str = "x-request-id";

    /// The response header that marks an answer to a repeated `request_id` given without calling
    /// the controller's method again: `stored` (the first call's answer) or `resolved` (OK, read
    /// from the port after an unknown outcome).
    pub const REPLAYED_HEADER: &str = "taskgate-replayed";

    /// The metadata key that carries a CaseExtract's or CaseCancel's `request_id` outside the
    /// message, for a proxy in front of several replicas to route a repeat to the replica that
    /// holds its entry: the clients and the CLI send it; the gateway itself reads the message.
    pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
}

mod accept;
pub mod auth;
#[doc(hidden)]
pub mod bench_api;
mod call;
pub mod codec;
pub mod config;
pub mod connection;
pub mod console;
pub mod domain;
mod error_chain;
pub mod fault;
#[doc(hidden)]
pub mod fuzz_api;
pub mod gateway_error;
mod health;
pub mod idempotency;
pub mod log;
pub mod log_publisher;
mod metrics;
pub mod nofile;
pub mod otel;
mod protocol;
pub mod regular_file;
pub mod request_id;
mod router;
pub mod server;
mod service;
pub mod shutdown;
pub mod simulator;
mod status;
pub mod tls;
pub mod upstream;
pub mod watch;

#[cfg(test)]
mod layering;
