//! Integration tests over real loopback sockets, compiled as one test binary.
//!
//! - `simulator_outcomes`: every simulator outcome end to end, gateway plus simulator.
//! - `simulator_http`: the simulator's HTTP edge, spoken to directly.
//! - `tls`: TLS, mutual TLS and HTTPS to the controller, with certificates made by rcgen.
//! - `transport_outcomes`: every transport outcome against a scripted fake controller.
//! - `upstream_hygiene`: whatever a controller sent before, the next call reads its own reply and
//!   each POST arrives once.
//! - `grpc_web`: gRPC-Web over HTTP/1.1 and CORS.
//! - `health`: grpc.health.v1 following the controller and shutdown; reflection.
//! - `json_upstream`: the JSON variant of the task interface.
//! - `limits`: shedding beyond the in-flight limit.
//! - `connections`: the gRPC port's connection limits, stream limits and shutdown drain.
//! - `http1_limits`: the timeouts and connection cap of `/metrics` and the simulator.
//! - `fd_limits`: the real binary at its file-descriptor limit, and its shutdown log.
//! - `hostile_binary`: the real binary's connection, HTTP/1.1 and protocol limits, given as flags,
//!   and its shutdown with idle and partial connections.
//! - `metrics`: the Prometheus endpoint after a known mix of calls.
//! - `protocol`: a malformed grpc-timeout and a second request message are refused.
//! - `request_id`: x-request-id from caller to controller and back.
//! - `idempotency`: the `request_id` message field: a repeat is never POSTed twice.
//! - `retry_contract`: a client retrying as the published service config says, on the real
//!   binary: one POST when the controller may have acted, retries when it declined.
//! - `shutdown`: graceful shutdown with calls in flight.
//! - `auth`: bearer tokens on task calls.
//! - `call_layer`: calls refused before the handler are counted and logged like any other.
//! - `chaos`: the real binary in front of a seeded chaos controller: every call answered in time
//!   with its documented status, no leak, a clean exit.
//! - `cli`: the real `taskgate` binary, its output and exit codes.
//! - `cli_edges`: the real binary with a closed stdout, `bench` against gateways that do not
//!   answer, settings out of range, and its messages when a wait runs out (issue 20).
//! - `operators`: the real binary as a careless operator runs it: no password printed.
//! - `bench`: `taskgate bench` against the simulator: its report, counts and exit codes.
//! - `contract`: the proto comments and the README agree with the fault table.
//! - `deploy`: the example config starts the binary, and the systemd unit waits out its grace.
//! - `readme_examples`: the README's command-line examples, run as written.
//! - `tracing`: W3C trace context through the real binary to an OTLP receiver served here.
//! - `watch`: WatchCaseEvents against the simulator's Log Publisher and a scripted one.
//! - `fuzz_corpus`: the fuzz targets' committed corpora, replayed through their checks on stable.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A panic in a test is a failed test.

mod support;

mod auth;
mod bench;
mod call_layer;
mod chaos;
mod cli;
mod cli_edges;
mod connections;
mod console;
mod contract;
mod deploy;
mod fd_limits;
mod fuzz_corpus;
mod grpc_web;
mod health;
mod hostile_binary;
mod http1_limits;
mod idempotency;
mod json_upstream;
mod limits;
mod metrics;
mod operators;
mod protocol;
mod readme_examples;
mod request_id;
mod retry_contract;
mod shutdown;
mod simulator_http;
mod simulator_outcomes;
mod tls;
mod tracing;
mod transport_outcomes;
mod upstream_hygiene;
mod upstream_proxy;
mod watch;
