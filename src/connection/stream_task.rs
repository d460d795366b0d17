//! Responses that a handler can end from outside, whatever its peer reads.
//!
//! A response is sent from one task: hyper runs each HTTP/2 stream as a task of its own, and
//! serves an HTTP/1.1 request (gRPC-Web) in its connection's task. Either task polls the response
//! body only while the peer takes what was sent (an HTTP/2 window with room, a socket that
//! drains), so a watch whose client has stopped reading is never polled again, and nothing in
//! its body can end it: it would keep its `--max-watches` slot and hold the shutdown drain for
//! the whole grace. So both tasks run with a place for an end signal, which a handler fills
//! ([`end_stream_when`]): once the signal says the response has ended, it goes on going out by
//! itself (what was queued, then its status) for as long as its peer reads; once it has made no
//! headway for [`END_LINGER`], the task drops it, which resets an HTTP/2 stream (RST_STREAM,
//! CANCEL) or closes an HTTP/1.1 connection. Headway is the handler's to report: only it knows
//! what its body took. Hyper asks a body for a chunk only once the one before has found room (an
//! HTTP/2 window with space, a socket that drains), so a body that keeps taking small chunks is
//! one whose peer keeps reading.
//!
//! A response that leaves no signal (every call) costs one task-local lookup per poll.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// How long a response told to end may go without headway before it is dropped: long enough
/// for a client that reads to make room for its next messages even when it (or the gateway)
/// waits for a CPU on a loaded machine, where 250 ms was seen to reset a client reading steadily;
/// short enough that one that does not read cannot hold shutdown.
pub(crate) const END_LINGER: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// Where a handler leaves the signal that ends its response; set only in the tasks that
    /// send responses.
    static END_SIGNAL: Cell<Option<watch::Receiver<ResponseEnd>>>;
}

/// What a handler says of its response through [`end_stream_when`]: `None` while it runs;
/// `Some(headway)` once it must end, `headway` counting the steps it has made since (each a
/// sign that its peer still reads).
pub(crate) type ResponseEnd = Option<u64>;

/// Spawns hyper's HTTP/2 stream tasks on tokio, each one endable through [`end_stream_when`],
/// and tracked so that shutdown can wait for those its connections' end has cut off.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamExecutor {
    tasks: TaskTracker,
}

/// What a task that sends responses does about the signal a handler left in it.
#[derive(Default)]
pub(super) struct EndSignal {
    /// Resolves with `true` when the response must be dropped, `false` once it has gone
    /// without needing to be; allocated only for a response that left a signal.
    end: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.tasks.spawn(with_end_signal(Endable {
            stream,
            end_signal: EndSignal::default(),
        }));
    }
}

pin_project_lite::pin_project! {
    /// A stream's task, dropped once its handler's signal says so. A struct rather than an
    /// `async` block: the block would hold the stream twice, as captured and as pinned, and it
    /// is most of what every call's task holds.
    struct Endable<F> {
        #[pin]
        stream: F,
        end_signal: EndSignal,
    }
}

impl<F: Future<Output = ()>> Future for Endable<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        this.end_signal.poll_with(this.stream, cx).map(|_| ())
    }
}

impl StreamExecutor {
    /// Waits, for at most `within`, until every stream task spawned so far has ended: a handler
    /// cut off with its connection ends at its task's next poll, and with it its call's spans.
    pub(crate) async fn all_ended(&self, within: Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(within, self.tasks.wait()).await;
    }
}

/// Ends the response whose handler calls this once `ending` says so, whether or not its peer
/// reads: it goes on going out by itself while its headway grows, and is dropped once it has not
/// for [`END_LINGER`], unless the sender is dropped first (the response has gone). Outside a
/// task that sends responses, `ending` is dropped and nothing is ended.
pub(crate) fn end_stream_when(ending: watch::Receiver<ResponseEnd>) {
    // Outside such a task (a test calling the service directly) there is nothing to end.
    let _ = END_SIGNAL.try_with(|signal| signal.set(Some(ending)));
}

/// Runs `task` (one that sends responses) with a place for a handler's end signal.
pub(super) fn with_end_signal<F: Future>(task: F) -> impl Future<Output = F::Output> {
    END_SIGNAL.scope(Cell::new(None), task)
}

/// Polls `task`, then the signal a handler may have left while it ran: `None` once the signal
/// says to drop it.
pub(super) fn until_ended<'a, F: Future>(
    mut task: Pin<&'a mut F>,
    end_signal: &'a mut EndSignal,
) -> impl Future<Output = Option<F::Output>> + 'a {
    poll_fn(move |cx| end_signal.poll_with(task.as_mut(), cx))
}

// === impl EndSignal ===

impl EndSignal {
    /// Polls `task`, then the signal a handler may have left while it ran: `None` once the
    /// signal says to drop it.
    fn poll_with<F: Future>(
        &mut self,
        task: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<F::Output>> {
        if let Poll::Ready(output) = task.poll(cx) {
            return Poll::Ready(Some(output));
        }
        self.poll_end(cx).map(|()| None)
    }

    /// Takes a signal left since the last call; ready once the response must be dropped.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let end = match &mut self.end {
                Some(end) => end,
                None => {
                    let Some(ended) = END_SIGNAL.try_with(Cell::take).ok().flatten() else {
                        return Poll::Pending;
                    };
                    self.end.insert(Box::pin(end_after_linger(ended)))
                }
            };
            match end.as_mut().poll(cx) {
                Poll::Ready(true) => return Poll::Ready(()),
                // Gone by itself; on HTTP/1.1 a later request may have left a signal since.
                Poll::Ready(false) => self.end = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl std::fmt::Debug for EndSignal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EndSignal")
            .field("end", &self.end.is_some())
            .finish()
    }
}

/// `true` once `ending` has said the response must end and its headway has then stood still
/// for [`END_LINGER`]; `false` as soon as its sender is dropped (the response has gone),
/// whether or not it had said so.
async fn end_after_linger(mut ending: watch::Receiver<ResponseEnd>) -> bool {
    if ending.wait_for(Option::is_some).await.is_err() {
        return false;
    }
    let linger = tokio::time::sleep(END_LINGER);
    let mut linger = pin!(linger);
    loop {
        tokio::select! {
            () = linger.as_mut() => return true,
            // Once it has said `Some`, the signal changes only with headway, or by going.
            headway = ending.changed() => {
                if headway.is_err() {
                    return false;
                }
                linger.as_mut().reset(tokio::time::Instant::now() + END_LINGER);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use hyper::rt::Executor as _;
    use tokio::sync::mpsc;

    /// A stream that never ends on its own and says when it is dropped; its handler leaves
    /// `ending` on its first poll.
    async fn stream_that_never_ends(
        ending: watch::Receiver<ResponseEnd>,
        dropped: mpsc::Sender<()>,
    ) {
        let _dropped = DropSignal(dropped);
        end_stream_when(ending);
        std::future::pending::<()>().await;
    }

    struct DropSignal(mpsc::Sender<()>);

    impl Drop for DropSignal {
        fn drop(&mut self) {
            let _ = self.0.try_send(());
        }
    }

    /// Waits for the stream to be dropped, within 5 s.
    async fn dropped_within_5s(dropped: &mut mpsc::Receiver<()>) {
        tokio::time::timeout(Duration::from_secs(5), dropped.recv())
            .await
            .expect("the stream was not dropped within 5s")
            .unwrap();
    }

    #[tokio::test]
    async fn a_stream_told_to_end_is_dropped_after_the_linger() {
        let (end, ending) = watch::channel(None);
        let (dropped_sender, mut dropped) = mpsc::channel(1);
        StreamExecutor::default().execute(stream_that_never_ends(ending, dropped_sender));
        tokio::task::yield_now().await;
        let told_at = tokio::time::Instant::now();
        end.send_replace(Some(0));
        dropped_within_5s(&mut dropped).await;
        let elapsed = told_at.elapsed();
        assert!(elapsed >= END_LINGER, "dropped after {elapsed:?}");
    }

    /// A stream that goes on making headway after it was told to end is left to finish, however
    /// long that takes; it is dropped a linger after its headway stops.
    #[tokio::test]
    async fn a_stream_told_to_end_is_dropped_only_once_its_headway_stops() {
        let (end, ending) = watch::channel(None);
        let (dropped_sender, mut dropped) = mpsc::channel(1);
        StreamExecutor::default().execute(stream_that_never_ends(ending, dropped_sender));
        tokio::task::yield_now().await;
        end.send_replace(Some(0));
        // Four lingers, with headway ten times in each.
        for _ in 0..40 {
            tokio::time::sleep(END_LINGER / 10).await;
            end.send_modify(|headway| *headway = headway.map(|steps| steps + 1));
        }
        assert!(dropped.try_recv().is_err(), "dropped while making headway");
        let stopped_at = tokio::time::Instant::now();
        dropped_within_5s(&mut dropped).await;
        let elapsed = stopped_at.elapsed();
        assert!(elapsed >= END_LINGER, "dropped after {elapsed:?}");
    }

    /// Nothing is dropped for a response that has gone, told to end or not: on HTTP/1.1 its
    /// connection goes on to the next request.
    #[tokio::test]
    async fn a_signal_whose_sender_is_gone_ends_nothing() {
        let (end, ending) = watch::channel(None);
        drop(end);
        assert!(!end_after_linger(ending).await);
        let (end, ending) = watch::channel(None);
        end.send_replace(Some(0));
        end.send_replace(Some(1));
        drop(end);
        assert!(!end_after_linger(ending).await);
    }

    #[test]
    fn no_signal_is_taken_outside_a_task_that_sends_responses() {
        let (end, ending) = watch::channel(None);
        end_stream_when(ending);
        assert!(end.is_closed(), "the signal was kept");
    }
}
