//! The Log Publisher: the controller's event stream (TCP port 44001), readable text in which
//! every event is a segment on its own CRLF-terminated line (task-interface.md §3.3a).
//!
//! Two layers, one file each, both pure (no I/O, not async) so they are tested byte by byte:
//!
//! - [`lines`]: a byte stream to CRLF lines, each capped in length; an over-long line is an
//!   error for that line only, and reading resumes at the next CRLF.
//! - [`segment`]: one line to a typed [`Segment`](segment::Segment): the AutoCase `AC` segment
//!   fully typed, any other segment kept only by its tag so a client can skip it, and a
//!   malformed `AC` line a typed error, never a guess.
//!
//! A malformed or over-long line must never end the stream: whoever reads it counts the error
//! and moves on to the next line.
//!
//! The gateway's client (`client`, the I/O edge) reads the stream with both and feeds the
//! case-event watches; the simulator's Log Publisher writes it with [`segment::encode_autocase`].

pub(crate) mod client;
pub mod lines;
pub mod segment;
