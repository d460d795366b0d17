package taskgateclient

import (
	"context"
	"errors"
	"net"
	"reflect"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	taskgatev1 "taskgate/v1"
)

// endingGateway is a TaskService whose n-th watch ends as endings[n] says, after one event
// (NOOP at port 4, the segment naming n): the endings the real gateway cannot be made to give
// on demand. Past the list, a watch sends its event and stays open.
type endingGateway struct {
	taskgatev1.UnimplementedTaskServiceServer
	endings []error
	mu      sync.Mutex
	watches int
}

func (g *endingGateway) CaseGetState(context.Context, *taskgatev1.CaseGetStateRequest) (*taskgatev1.CaseGetStateResponse, error) {
	return &taskgatev1.CaseGetStateResponse{PortId: 4, State: taskgatev1.CaseState_CASE_STATE_NO_OPERATION, RawState: "NOOP"}, nil
}

func (g *endingGateway) WatchCaseEvents(_ *taskgatev1.WatchCaseEventsRequest, stream taskgatev1.TaskService_WatchCaseEventsServer) error {
	g.mu.Lock()
	n := g.watches
	g.watches++
	g.mu.Unlock()
	var ending error
	if n < len(g.endings) {
		ending = g.endings[n]
	}
	// A refusal sends no headers: the gateway answers them only once the watch is live.
	if status.Code(ending) == codes.Unavailable {
		return ending
	}
	if err := stream.SendHeader(metadata.Pairs("x-request-id", "fake")); err != nil {
		return err
	}
	event := &taskgatev1.CaseEvent{PortId: 4, Change: &taskgatev1.CaseEvent_State{State: taskgatev1.CaseState_CASE_STATE_NO_OPERATION},
		Segment: "watch " + string(rune('0'+n))}
	if err := stream.Send(event); err != nil {
		return err
	}
	if ending != nil {
		return ending
	}
	<-stream.Context().Done()
	return nil
}

// watchEnding is a WatchCaseEvents status as the gateway builds it, with retry when not nil.
func watchEnding(t *testing.T, code codes.Code, reason string, retry *errdetails.RetryInfo) error {
	t.Helper()
	s, err := status.New(code, "WatchCaseEvents: "+reason).WithDetails(
		&errdetails.ErrorInfo{Reason: reason, Domain: "taskgate", Metadata: map[string]string{"method": "WatchCaseEvents"}})
	if err == nil && retry != nil {
		s, err = s.WithDetails(retry)
	}
	if err != nil {
		t.Fatal(err)
	}
	return s.Err()
}

func serveEndings(t *testing.T, endings ...error) *Client {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	taskgatev1.RegisterTaskServiceServer(server, &endingGateway{endings: endings})
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	client, err := New(listener.Addr().String(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

var errEnough = errors.New("enough")

func TestFollowWatchesAndReadsAgainAfterAnOutageOrALagAndStopsAtOtherEndings(t *testing.T) {
	retry := &errdetails.RetryInfo{RetryDelay: durationpb.New(10 * time.Millisecond)}
	client := serveEndings(t,
		watchEnding(t, codes.Unavailable, "LOG_PUBLISHER_UNAVAILABLE", retry),
		watchEnding(t, codes.ResourceExhausted, "WATCH_LAGGED", nil),
		watchEnding(t, codes.Unavailable, "LOG_PUBLISHER_UNAVAILABLE", retry),
	)
	var seen []string
	err := client.Follow(testContext(t), 4,
		func(state *taskgatev1.CaseGetStateResponse) error {
			seen = append(seen, "state "+state.GetRawState())
			return nil
		},
		func(event *taskgatev1.CaseEvent) error {
			seen = append(seen, event.GetSegment())
			if event.GetSegment() == "watch 3" {
				return errEnough
			}
			return nil
		})
	if err != errEnough {
		t.Fatalf("Follow ended with %v, not with its handler's error", err)
	}
	// Watch 0 is refused and watch 2 too: each is followed by a new watch, read state first.
	want := []string{"state NOOP", "watch 1", "state NOOP", "watch 3"}
	if !reflect.DeepEqual(seen, want) {
		t.Errorf("Follow handed over %q, not %q", seen, want)
	}

	client = serveEndings(t, watchEnding(t, codes.Unavailable, "SHUTTING_DOWN", nil))
	err = client.Follow(testContext(t), 4,
		func(*taskgatev1.CaseGetStateResponse) error { return nil },
		func(*taskgatev1.CaseEvent) error { return nil })
	if failure := ErrorOf(err); failure.Reason != "SHUTTING_DOWN" {
		t.Errorf("Follow ended with %v, not with the SHUTTING_DOWN that ended its watch", err)
	}
}

func TestFollowBacksOffFromAFloorWhileTheGatewayRefusesAtOnce(t *testing.T) {
	// --retry-delay 0s is valid: the gateway may ask for no wait at all.
	now := &errdetails.RetryInfo{RetryDelay: durationpb.New(0)}
	refusal := watchEnding(t, codes.Unavailable, "LOG_PUBLISHER_UNAVAILABLE", now)
	client := serveEndings(t, refusal, refusal, refusal, refusal)
	started := time.Now()
	err := client.Follow(testContext(t), 4,
		func(*taskgatev1.CaseGetStateResponse) error { return nil },
		func(*taskgatev1.CaseEvent) error { return errEnough })
	if err != errEnough {
		t.Fatalf("Follow ended with %v, not with its handler's error", err)
	}
	// The floor, then the backoff doubling from it with at most half taken off by the jitter:
	// 100 + 100 + 200 + 400 ms at the least before the fifth watch.
	if elapsed, least := time.Since(started), 800*time.Millisecond; elapsed < least {
		t.Errorf("Follow watched 5 times in %v, though the first 4 were refused: it waits at least %v in all", elapsed, least)
	}
}
