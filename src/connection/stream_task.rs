//! HTTP/2 stream tasks that a handler can end from outside, whatever the peer's flow-control
//! window.
//!
//! Hyper runs each HTTP/2 stream as a task of its own, which polls the response body only while
//! the peer's window has room. A watch whose client has stopped reading is never polled again,
//! so nothing in its body can end it: it would keep its `--max-watches` slot and hold the
//! shutdown drain for the whole grace. So hyper spawns streams through [`StreamExecutor`], whose
//! tasks a handler running in one may give a signal ([`end_stream_when`]). Once the signal
//! fires, the stream has [`END_LINGER`] to end by itself (its status reaching a client that
//! reads); then its task drops it, which resets it (RST_STREAM, CANCEL) and drops its body.
//!
//! A stream that gives no signal (every call) costs one task-local lookup per poll.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::oneshot;

/// How long a stream told to end may still take to send what it has before it is reset: long
/// enough for a client that reads to take its last messages and status, short enough that one
/// that does not cannot hold shutdown.
pub(crate) const END_LINGER: Duration = Duration::from_millis(250);

tokio::task_local! {
    /// Where a handler leaves the signal that ends its stream; set only in a stream's task.
    static END_SIGNAL: Cell<Option<oneshot::Receiver<()>>>;
}

/// Spawns hyper's HTTP/2 stream tasks on tokio, each one endable through [`end_stream_when`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        tokio::spawn(END_SIGNAL.scope(Cell::new(None), endable(stream)));
    }
}

/// Ends the stream whose handler calls this once `ended` receives, whether or not its peer
/// reads: the stream gets [`END_LINGER`] to end by itself, then is reset. A dropped sender
/// ends nothing. `false` (and `ended` is dropped) outside an HTTP/2 stream's task, as for
/// gRPC-Web over HTTP/1.1, where the connection's task serves the request.
pub(crate) fn end_stream_when(ended: oneshot::Receiver<()>) -> bool {
    END_SIGNAL
        .try_with(|signal| signal.set(Some(ended)))
        .is_ok()
}

/// Runs `stream` until it ends, or until [`END_LINGER`] after the signal its handler left has
/// fired.
async fn endable(stream: impl Future<Output = ()>) {
    let mut stream = pin!(stream);
    let mut signal: Option<oneshot::Receiver<()>> = None;
    // Allocated only for a stream that is being ended.
    let mut reset_at: Option<Pin<Box<tokio::time::Sleep>>> = None;
    poll_fn(|cx| {
        if stream.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if signal.is_none() && reset_at.is_none() {
            signal = END_SIGNAL.with(Cell::take);
        }
        if let Some(receiver) = &mut signal
            && let Poll::Ready(fired) = Pin::new(receiver).poll(cx)
        {
            signal = None;
            if fired.is_ok() {
                reset_at = Some(Box::pin(tokio::time::sleep(END_LINGER)));
            }
        }
        match &mut reset_at {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    use hyper::rt::Executor as _;
    use tokio::sync::mpsc;

    /// A stream that never ends on its own and says when it is dropped; its handler leaves
    /// `ended` on its first poll.
    async fn stream_that_never_ends(ended: oneshot::Receiver<()>, dropped: mpsc::Sender<()>) {
        let _dropped = DropSignal(dropped);
        assert!(end_stream_when(ended));
        std::future::pending::<()>().await;
    }

    struct DropSignal(mpsc::Sender<()>);

    impl Drop for DropSignal {
        fn drop(&mut self) {
            let _ = self.0.try_send(());
        }
    }

    #[tokio::test]
    async fn a_stream_told_to_end_is_dropped_after_the_linger() {
        let (end, ended) = oneshot::channel();
        let (dropped_sender, mut dropped) = mpsc::channel(1);
        StreamExecutor.execute(stream_that_never_ends(ended, dropped_sender));
        tokio::task::yield_now().await;
        let told_at = tokio::time::Instant::now();
        end.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), dropped.recv())
            .await
            .expect("the stream was not dropped within 5s")
            .unwrap();
        let elapsed = told_at.elapsed();
        assert!(elapsed >= END_LINGER, "dropped after {elapsed:?}");
    }

    #[test]
    fn no_signal_is_taken_outside_a_stream_task() {
        let (_end, ended) = oneshot::channel();
        assert!(!end_stream_when(ended));
    }
}
