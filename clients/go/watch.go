package taskgateclient

import (
	"context"
	"io"
	"math/rand"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"

	taskgatev1 "taskgate/v1"
)

// Watch is an open WatchCaseEvents stream. Always Close it (defer watch.Close()), even after
// Recv has failed: it holds the stream's context, and with it the connection's stream, until
// then. Recv is for one goroutine at a time; Close may be called from any.
type Watch struct {
	// RequestID is the stream's x-request-id, as the gateway logs it.
	RequestID string
	stream    taskgatev1.TaskService_WatchCaseEventsClient
	// pending is an event read while WatchCaseEvents waited for the headers, for the first Recv.
	pending *taskgatev1.CaseEvent
	ctx     context.Context
	cancel  context.CancelFunc
	closed  atomic.Bool
}

// WatchCaseEvents watches the AutoCase events of portIDs (every port when empty) from now on.
//
// It returns once the gateway has started the watch, so an operation started after it returns
// is seen from its first event; a refused watch (LOG_PUBLISHER_UNAVAILABLE,
// LOG_PUBLISHER_DISABLED, TOO_MANY_WATCHES, INVALID_PARAMETER, ...) is an *Error at once. The
// context bounds the whole stream: without a deadline it lasts until Close, which must always be
// called. Read the state with CaseGetState once it has returned, and again after the stream
// ends with an error: events may have been missed. Follow does all of this.
func (c *Client) WatchCaseEvents(ctx context.Context, portIDs []uint32, options ...CallOption) (*Watch, error) {
	ctx, cancel := context.WithCancel(c.outgoing(ctx, settingsOf(options).requestID, ""))
	stream, err := c.stub.WatchCaseEvents(ctx, &taskgatev1.WatchCaseEventsRequest{PortIds: portIDs})
	if err != nil {
		failure := endedBy(ctx, err)
		cancel()
		return nil, failure
	}
	// The gateway answers headers once it has subscribed the stream; a refusal is a
	// trailers-only response, which leaves them empty, and Recv gives its status. Empty headers
	// followed by an event are a live watch too (a server that sends no metadata, read by a
	// grpc-go that, unlike 1.33, leaves content-type out): the event is kept for the first Recv.
	header, err := stream.Header()
	var pending *taskgatev1.CaseEvent
	if err == nil && len(header) == 0 {
		pending, err = stream.Recv()
	}
	if err != nil {
		failure := endedBy(ctx, err)
		failure.RequestID = requestIDOf(header, stream.Trailer())
		cancel()
		return nil, failure
	}
	return &Watch{RequestID: first(header, "x-request-id"), stream: stream, pending: pending, ctx: ctx, cancel: cancel}, nil
}

// Recv waits for the next event. The stream ends only with an error, an *Error with its reason
// (WATCH_LAGGED, LOG_PUBLISHER_UNAVAILABLE, SHUTTING_DOWN, DEADLINE_REACHED, ...), or with
// io.EOF once Close has been called.
func (w *Watch) Recv() (*taskgatev1.CaseEvent, error) {
	if event := w.pending; event != nil && !w.closed.Load() {
		w.pending = nil
		return event, nil
	}
	event, err := w.stream.Recv()
	if err == nil {
		return event, nil
	}
	failure := endedBy(w.ctx, err)
	if w.closed.Load() && failure.Code == codes.Canceled {
		return nil, io.EOF
	}
	failure.RequestID = w.RequestID
	return nil, failure
}

// Close ends the stream, from any goroutine; Recv then returns io.EOF.
func (w *Watch) Close() {
	w.closed.Store(true)
	w.cancel()
}

// Follow's waits between watches: at least followFloor (a RetryInfo delay may be zero), and
// after consecutive watches that delivered no event a backoff doubling from followFloor up to
// maxBackoff, jittered, so that many followers of a gateway that keeps refusing neither spin
// nor come back all at once.
const followFloor = 100 * time.Millisecond

// Follow runs the pattern of docs/clients.md, "Watching case events", on one port until a
// handler returns an error or the watch ends for good: it starts a watch, once the watch is live
// reads the state with CaseGetState and gives it to onState, then gives each event to onEvent.
// When the watch is refused or ends with LOG_PUBLISHER_UNAVAILABLE or WATCH_LAGGED, events may
// have been missed, so it watches and reads the state again: after the RetryInfo delay, but at
// least 100 ms, and longer (doubling up to 10 s, jittered) while the watches deliver no event.
// It returns the first error a handler returns, as it is, or otherwise the *Error that ended
// the watch (the context's end included).
func (c *Client) Follow(ctx context.Context, portID uint32,
	onState func(*taskgatev1.CaseGetStateResponse) error,
	onEvent func(*taskgatev1.CaseEvent) error) error {
	random := rand.New(rand.NewSource(time.Now().UnixNano()))
	backoff := followFloor
	for {
		failure, delivered, handlerErr := c.followOnce(ctx, portID, onState, onEvent)
		if handlerErr != nil {
			return handlerErr
		}
		switch failure.Reason {
		case "LOG_PUBLISHER_UNAVAILABLE", "WATCH_LAGGED":
		default:
			return failure
		}
		if delivered {
			backoff = followFloor
		}
		// Equal jitter: between half the backoff and all of it, never below the floor or the
		// gateway's RetryInfo delay.
		delay := backoff/2 + time.Duration(random.Int63n(int64(backoff/2)+1))
		if delay < followFloor {
			delay = followFloor
		}
		if failure.HasRetryDelay && delay < failure.RetryDelay {
			delay = failure.RetryDelay
		}
		if sleep(ctx, delay) != nil {
			return failure
		}
		if backoff *= 2; backoff > maxBackoff {
			backoff = maxBackoff
		}
	}
}

// followOnce is one watch of Follow: it ends with the *Error that ended the watch (or refused
// it, or failed the state's read), saying whether the watch delivered an event, or with a
// handler's error.
func (c *Client) followOnce(ctx context.Context, portID uint32,
	onState func(*taskgatev1.CaseGetStateResponse) error,
	onEvent func(*taskgatev1.CaseEvent) error) (*Error, bool, error) {
	watch, err := c.WatchCaseEvents(ctx, []uint32{portID})
	if err != nil {
		return ErrorOf(err), false, nil
	}
	defer watch.Close()
	state, err := c.CaseGetState(ctx, portID)
	if err != nil {
		return ErrorOf(err), false, nil
	}
	if err := onState(state); err != nil {
		return nil, false, err
	}
	for delivered := false; ; delivered = true {
		event, err := watch.Recv()
		if err != nil {
			return ErrorOf(err), delivered, nil
		}
		if err := onEvent(event); err != nil {
			return nil, true, err
		}
	}
}

func sleep(ctx context.Context, delay time.Duration) error {
	timer := time.NewTimer(delay)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
