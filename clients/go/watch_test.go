package taskgateclient

import (
	"context"
	"errors"
	"io"
	"reflect"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	taskgatev1 "taskgate/v1"
)

// seen is what a test compares of an event: the oneof's side, the state, the bin and the
// segment as sent.
type seen struct {
	port, bin     uint32
	cancelRequest bool
	state         taskgatev1.CaseState
	segment       string
}

func seenOf(event *taskgatev1.CaseEvent) seen {
	return seen{event.GetPortId(), event.GetBinId(), event.GetCancelRequest(), event.GetState(), event.GetSegment()}
}

func mustRecv(t *testing.T, watch *Watch) *taskgatev1.CaseEvent {
	t.Helper()
	event, err := watch.Recv()
	if err != nil {
		t.Fatalf("the watch ended: %v", err)
	}
	return event
}

var errCompleted = errors.New("ECMP")

func TestFollowSeesACaseFromItsStateToECMP(t *testing.T) {
	client := startGateway(t, layout(t, "50ms")...).client(Options{})
	ctx := testContext(t)
	var states []*taskgatev1.CaseGetStateResponse
	var events []seen
	err := client.Follow(ctx, 4,
		func(state *taskgatev1.CaseGetStateResponse) error {
			states = append(states, state)
			// The state is read once the watch is live: the extraction's every event follows.
			if len(states) == 1 {
				_, err := client.CaseExtract(ctx, 4, 101337)
				return err
			}
			return nil
		},
		func(event *taskgatev1.CaseEvent) error {
			events = append(events, seenOf(event))
			if event.GetState() == taskgatev1.CaseState_CASE_STATE_EXTRACTION_COMPLETED {
				return errCompleted
			}
			return nil
		})
	if err != errCompleted {
		t.Fatalf("Follow ended with %v, not with its handler's error", err)
	}
	if len(states) != 1 || states[0].GetState() != taskgatev1.CaseState_CASE_STATE_NO_OPERATION || states[0].BinId != nil {
		t.Errorf("the states read are %v, not one NOOP without a bin", states)
	}
	want := []seen{
		{4, 101337, false, taskgatev1.CaseState_CASE_STATE_EXTRACTION_REQUESTED, "AC,4,101337,EREQ"},
		{4, 101337, false, taskgatev1.CaseState_CASE_STATE_EXTRACTION_READY_TO_SEND, "AC,4,101337,ERSO"},
		{4, 101337, false, taskgatev1.CaseState_CASE_STATE_EXTRACTION_COMPLETED, "AC,4,101337,ECMP"},
	}
	if !reflect.DeepEqual(events, want) {
		t.Errorf("the events are\n%+v, not\n%+v", events, want)
	}
	state, err := client.CaseGetState(ctx, 4)
	if err != nil {
		t.Fatal(err)
	}
	if state.GetState() != taskgatev1.CaseState_CASE_STATE_EXTRACTION_COMPLETED || state.GetRawState() != "ECMP" || state.GetBinId() != 101337 {
		t.Errorf("after ECMP the state is %v", state)
	}
}

func TestACancelIsWatchedAsCRThenNOOP(t *testing.T) {
	// Each step of an extraction lasts an hour: the cancel finds it running.
	client := startGateway(t, layout(t, "1h")...).client(Options{})
	ctx := testContext(t)
	watch := openWatch(ctx, t, client, nil)
	if watch.RequestID == "" {
		t.Error("the watch has no x-request-id")
	}
	if _, err := client.CaseExtract(ctx, 4, 101337); err != nil {
		t.Fatalf("CaseExtract: %v", err)
	}
	if requested := seenOf(mustRecv(t, watch)); requested.segment != "AC,4,101337,EREQ" {
		t.Fatalf("the first event is %+v, not EREQ", requested)
	}
	if _, err := client.CaseCancel(ctx, 4, 101337); err != nil {
		t.Fatalf("CaseCancel: %v", err)
	}
	cancel, noop := mustRecv(t, watch), mustRecv(t, watch)
	// CR is a signal, not a state: the oneof holds cancel_request, and no state.
	if _, ok := cancel.Change.(*taskgatev1.CaseEvent_CancelRequest); !ok {
		t.Errorf("the CR event's change is %T", cancel.Change)
	}
	if got, want := seenOf(cancel), (seen{4, 101337, true, taskgatev1.CaseState_CASE_STATE_UNSPECIFIED, "AC,4,101337,CR"}); got != want {
		t.Errorf("the cancel event is %+v, not %+v", got, want)
	}
	if got, want := seenOf(noop), (seen{4, 101337, false, taskgatev1.CaseState_CASE_STATE_NO_OPERATION, "AC,4,101337,NOOP"}); got != want {
		t.Errorf("the event after CR is %+v, not %+v", got, want)
	}
	state, err := client.CaseGetState(ctx, 4)
	if err != nil {
		t.Fatal(err)
	}
	if state.GetState() != taskgatev1.CaseState_CASE_STATE_NO_OPERATION || state.GetRawState() != "NOOP" || state.GetBinId() != 101337 {
		t.Errorf("after the cancel the state is %v", state)
	}
}

func TestAWatchEndsWithShuttingDownWhenTheGatewayStops(t *testing.T) {
	g := startGateway(t)
	watch := openWatch(testContext(t), t, g.client(Options{}), []uint32{4})
	stopped := make(chan error, 1)
	go func() { stopped <- g.stop() }()
	_, err := watch.Recv()
	failure := mustFail(t, err)
	if failure.Code != codes.Unavailable || failure.Reason != "SHUTTING_DOWN" || failure.Domain != "taskgate" {
		t.Errorf("the watch ended with %v %q in %q", failure.Code, failure.Reason, failure.Domain)
	}
	if want := map[string]string{"method": "WatchCaseEvents"}; !reflect.DeepEqual(failure.Metadata, want) {
		t.Errorf("the ErrorInfo metadata is %v, not %v", failure.Metadata, want)
	}
	text := "UNAVAILABLE: WatchCaseEvents: the gateway is shutting down; watch again once it is back, or through another instance (request id: " + watch.RequestID + ")"
	if failure.RequestID == "" || failure.Error() != text {
		t.Errorf("the error reads\n%q, not\n%q", failure.Error(), text)
	}
	if !failure.Retryable() {
		t.Error("a watch ended by a shutdown is not retryable")
	}
	if err := <-stopped; err != nil {
		t.Error(err)
	}
}

func TestARefusedWatchIsAnErrorAtOnce(t *testing.T) {
	client := startGateway(t, "--log-publisher", "off").client(Options{})
	_, err := client.WatchCaseEvents(testContext(t), []uint32{4})
	failure := mustFail(t, err)
	if failure.Code != codes.FailedPrecondition || failure.Reason != "LOG_PUBLISHER_DISABLED" || failure.HasRetryDelay {
		t.Errorf("the refusal is %v %q (retry delay: %v)", failure.Code, failure.Reason, failure.HasRetryDelay)
	}
}

func TestAWatchsErrorCarriesItsRequestID(t *testing.T) {
	client := startGateway(t, layout(t, "50ms")...).client(Options{})
	// Refused: the gateway's one answer is trailers-only.
	_, err := client.WatchCaseEvents(testContext(t), []uint32{0}, WithRequestID("go-watch-refused"))
	if failure := mustFail(t, err); failure.Reason != "INVALID_PARAMETER" || failure.RequestID != "go-watch-refused" {
		t.Errorf("the refusal is %q with request id %q", failure.Reason, failure.RequestID)
	}
	// Ended after it started: the id came with the headers, the status with the trailers. (The
	// first watch waits for the gateway's Log Publisher feed, so that the second one starts.)
	openWatch(testContext(t), t, client, []uint32{4}).Close()
	ctx, cancel := context.WithTimeout(testContext(t), time.Second)
	defer cancel()
	watch, err := client.WatchCaseEvents(ctx, []uint32{4}, WithRequestID("go-watch-ended"))
	if err != nil {
		t.Fatalf("WatchCaseEvents: %v", err)
	}
	defer watch.Close()
	for err == nil {
		_, err = watch.Recv()
	}
	if failure := mustFail(t, err); failure.Reason != "DEADLINE_REACHED" || failure.RequestID != "go-watch-ended" {
		t.Errorf("the watch ended with %q, request id %q", failure.Reason, failure.RequestID)
	}
}

func TestClosingAWatchEndsItWithEOF(t *testing.T) {
	client := startGateway(t, layout(t, "50ms")...).client(Options{})
	watch := openWatch(testContext(t), t, client, []uint32{4})
	// From another goroutine, as a program stops a watch that Recv waits on.
	go watch.Close()
	if event, err := watch.Recv(); err != io.EOF {
		t.Errorf("after Close, Recv gives %v, %v; not io.EOF", event, err)
	}
}

func TestErrorOfReadsContextErrorsAndOthers(t *testing.T) {
	if ErrorOf(nil) != nil {
		t.Error("ErrorOf(nil) is not nil")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if failure := ErrorOf(ctx.Err()); failure.Code != codes.Canceled || !failure.MayHaveActed() {
		t.Errorf("a cancelled context is %v, may have acted %v", failure.Code, failure.MayHaveActed())
	}
	if failure := ErrorOf(errors.New("no route")); failure.Code != codes.Unknown || failure.Message != "no route" {
		t.Errorf("an error of no gRPC status is %v %q", failure.Code, failure.Message)
	}
	if code := status.Code(&Error{Code: codes.NotFound}); code != codes.NotFound {
		t.Errorf("status.Code gives %v for an *Error of NotFound built by hand", code)
	}
}

// headerlessStub is a TaskServiceClient whose watch answers empty headers and then an event:
// a server that sends no metadata of its own, seen by a gRPC library that, unlike grpc-go 1.33,
// keeps content-type out of the headers it hands over. Only WatchCaseEvents is implemented.
type headerlessStub struct {
	taskgatev1.TaskServiceClient
}

func (headerlessStub) WatchCaseEvents(context.Context, *taskgatev1.WatchCaseEventsRequest, ...grpc.CallOption) (taskgatev1.TaskService_WatchCaseEventsClient, error) {
	return &headerlessStream{events: []*taskgatev1.CaseEvent{{PortId: 4, Segment: "first"}}}, nil
}

type headerlessStream struct {
	grpc.ClientStream
	events []*taskgatev1.CaseEvent
}

func (*headerlessStream) Header() (metadata.MD, error) { return metadata.MD{}, nil }

func (s *headerlessStream) Recv() (*taskgatev1.CaseEvent, error) {
	if len(s.events) == 0 {
		return nil, io.EOF
	}
	event := s.events[0]
	s.events = s.events[1:]
	return event, nil
}

func TestTheFirstEventIsKeptWhenTheWatchSendsNoHeaders(t *testing.T) {
	client := &Client{stub: headerlessStub{}}
	watch, err := client.WatchCaseEvents(testContext(t), []uint32{4})
	if err != nil {
		t.Fatalf("WatchCaseEvents: %v", err)
	}
	defer watch.Close()
	if event := mustRecv(t, watch); event.GetSegment() != "first" {
		t.Errorf("the first event Recv gives is %v, not the one the server sent first", event)
	}
}
