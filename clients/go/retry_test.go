package taskgateclient

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
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

// The longest the fake controller waits for a request's bytes.
const fakeReadLimit = 30 * time.Second

// fakeController is a controller's task interface that answers the n-th POST as script[n]
// says (the last entry for every later one): "503" (HTTP 503: the controller declined it) or
// "drop" (read it, then close the connection: it may have been acted on). Connections that
// send nothing (health probes) are not POSTs.
type fakeController struct {
	url   string
	posts atomic.Int32
}

func startFakeController(t *testing.T, script ...string) *fakeController {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = listener.Close() })
	controller := &fakeController{url: "http://" + listener.Addr().String() + "/api/v2/task"}
	go func() {
		for {
			connection, err := listener.Accept()
			if err != nil {
				return
			}
			controller.answer(connection, script)
		}
	}()
	return controller
}

func (c *fakeController) answer(connection net.Conn, script []string) {
	defer connection.Close()
	_ = connection.SetDeadline(time.Now().Add(fakeReadLimit))
	request, err := http.ReadRequest(bufio.NewReader(connection))
	if err != nil || request.Method != http.MethodPost {
		return
	}
	_, _ = io.Copy(io.Discard, request.Body)
	n := int(c.posts.Add(1)) - 1
	if n >= len(script) {
		n = len(script) - 1
	}
	if script[n] == "503" {
		_, _ = io.WriteString(connection, "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
	}
}

// attemptsLogged waits for the gateway's access lines of count calls with idempotency key key
// (each is written once its call has ended, maybe after the client saw the end).
func attemptsLogged(g *gateway, key string, count int) []string {
	g.t.Helper()
	withKey := regexp.MustCompile(`idempotency_key=` + regexp.QuoteMeta(key) + `\b`)
	return g.waitForLines(func(line string) bool {
		return strings.Contains(line, "taskgate::access") && withKey.MatchString(line)
	}, count)
}

func TestUnavailableIsRetriedWithTheSameKeyUpToMaxAttempts(t *testing.T) {
	controller := startFakeController(t, "503")
	g := serve(t, "--upstream", controller.url, "--log-publisher", "off", "--retry-delay", "100ms")
	_, err := g.client(Options{}).CaseExtract(testContext(t), 4, 101337, WithMaxAttempts(3))
	failure := mustFail(t, err)
	if failure.Code != codes.Unavailable || failure.Reason != "UPSTREAM_HTTP_ERROR" || failure.Metadata["httpStatus"] != "503" {
		t.Errorf("the call ended with %v %q %v", failure.Code, failure.Reason, failure.Metadata)
	}
	if !failure.Retryable() || failure.MayHaveActed() || failure.Attempts != 3 {
		t.Errorf("retryable %v, may have acted %v, attempts %d", failure.Retryable(), failure.MayHaveActed(), failure.Attempts)
	}
	if posts := controller.posts.Load(); posts != 3 {
		t.Errorf("the controller got %d POSTs, not 3", posts)
	}
	attemptsLogged(g, failure.IdempotencyKey, 3)
}

func TestARetriedCallsErrorCarriesTheRequestIDOfItsLastAttempt(t *testing.T) {
	controller := startFakeController(t, "503")
	g := serve(t, "--upstream", controller.url, "--log-publisher", "off", "--retry-delay", "100ms")
	_, err := g.client(Options{}).CaseExtract(testContext(t), 4, 101337, WithMaxAttempts(3))
	failure := mustFail(t, err)
	// An error's access line is written before its answer is sent, so the lines come in the
	// order of the attempts; the gateway gave each attempt an id of its own.
	var logged []string
	distinct := map[string]bool{}
	for _, line := range attemptsLogged(g, failure.IdempotencyKey, 3) {
		id := accessRequestID.FindStringSubmatch(line)[1]
		logged = append(logged, id)
		distinct[id] = true
	}
	if len(distinct) != 3 || failure.RequestID != logged[2] {
		t.Errorf("the error carries request id %q; the attempts' access lines %q", failure.RequestID, logged)
	}
}

func TestAnUnknownOutcomeIsNotRetriedAndCarriesTheKeyToRepeatWith(t *testing.T) {
	controller := startFakeController(t, "503", "drop")
	g := serve(t, "--upstream", controller.url, "--log-publisher", "off", "--retry-delay", "100ms")
	_, err := g.client(Options{}).CaseExtract(testContext(t), 4, 101337)
	failure := mustFail(t, err)
	if failure.Code != codes.Unknown || failure.Reason != "UPSTREAM_CONNECTION_LOST" {
		t.Errorf("the call ended with %v %q", failure.Code, failure.Reason)
	}
	if failure.Retryable() || !failure.MayHaveActed() || failure.Attempts != 2 {
		t.Errorf("retryable %v, may have acted %v, attempts %d", failure.Retryable(), failure.MayHaveActed(), failure.Attempts)
	}
	if posts := controller.posts.Load(); posts != 2 {
		t.Errorf("the controller got %d POSTs, not 2: the one that may have acted was sent again", posts)
	}
	if !uuid4.MatchString(failure.IdempotencyKey) {
		t.Errorf("the key to repeat with is %q", failure.IdempotencyKey)
	}
	attemptsLogged(g, failure.IdempotencyKey, 2)
}

// recordingGateway is a TaskService that records the key each call carried in its message and
// in its metadata: the gateway reads only the field, so only a server that looks can tell.
type recordingGateway struct {
	taskgatev1.UnimplementedTaskServiceServer
	mu   sync.Mutex
	seen [][2]string
}

func (g *recordingGateway) record(ctx context.Context, requestID string) {
	incoming, _ := metadata.FromIncomingContext(ctx)
	g.mu.Lock()
	defer g.mu.Unlock()
	g.seen = append(g.seen, [2]string{requestID, strings.Join(incoming.Get("idempotency-key"), ",")})
}

func (g *recordingGateway) CaseExtract(ctx context.Context, request *taskgatev1.CaseExtractRequest) (*taskgatev1.CaseExtractResponse, error) {
	g.record(ctx, request.RequestId)
	return &taskgatev1.CaseExtractResponse{}, nil
}

func (g *recordingGateway) CaseCancel(ctx context.Context, request *taskgatev1.CaseCancelRequest) (*taskgatev1.CaseCancelResponse, error) {
	g.record(ctx, request.RequestId)
	return &taskgatev1.CaseCancelResponse{}, nil
}

func TestCaseExtractAndCaseCancelSendTheKeyAlsoAsMetadataForAProxyToHashOn(t *testing.T) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	recording := &recordingGateway{}
	server := grpc.NewServer()
	taskgatev1.RegisterTaskServiceServer(server, recording)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	client, err := New(listener.Addr().String(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	extracted, err := client.CaseExtract(ctx, 4, 101337)
	if err != nil {
		t.Fatal(err)
	}
	cancelled, err := client.CaseCancel(ctx, 4, 101337, WithIdempotencyKey(extracted.IdempotencyKey))
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]string{
		{extracted.IdempotencyKey, extracted.IdempotencyKey},
		{cancelled.IdempotencyKey, cancelled.IdempotencyKey},
	}
	recording.mu.Lock()
	defer recording.mu.Unlock()
	if !reflect.DeepEqual(recording.seen, want) {
		t.Fatalf("the stand-in TaskService saw (request_id, idempotency-key) %v, want %v", recording.seen, want)
	}
}

// busyGateway is a TaskService that answers every CaseExtract and CaseCancel with its answer
// (fault 1148, without the requestOutcome marker: as a gateway answers a key it does not hold
// while an operation runs on the port), and records the key of each call.
type busyGateway struct {
	taskgatev1.UnimplementedTaskServiceServer
	answer error
	mu     sync.Mutex
	keys   []string
}

func (g *busyGateway) busy(requestID string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.keys = append(g.keys, requestID)
	return g.answer
}

func (g *busyGateway) CaseExtract(_ context.Context, request *taskgatev1.CaseExtractRequest) (*taskgatev1.CaseExtractResponse, error) {
	return nil, g.busy(request.RequestId)
}

func (g *busyGateway) CaseCancel(_ context.Context, request *taskgatev1.CaseCancelRequest) (*taskgatev1.CaseCancelResponse, error) {
	return nil, g.busy(request.RequestId)
}

func TestARepeatWithTheCallersKeyDoesNotRetryIntoASecondOperation(t *testing.T) {
	// The caller repeats, with its key, a call that may have acted. A gateway that forgot the key
	// (restarted, another replica) sends the repeat as a new call, and its 1148 most likely means
	// the first call's operation is running: retrying until it ends would start a second one.
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	info := &errdetails.ErrorInfo{Reason: "PREVIOUS_ACTION_NOT_COMPLETED", Domain: "autostore.task", Metadata: map[string]string{"faultCode": "1148"}}
	delay := &errdetails.RetryInfo{RetryDelay: durationpb.New(time.Millisecond)}
	answer, err := status.New(codes.Unavailable, "controller fault 1148 PREVIOUS_ACTION_NOT_COMPLETED").WithDetails(info, delay)
	if err != nil {
		t.Fatalf("cannot build the status: %v", err)
	}
	busy := &busyGateway{answer: answer.Err()}
	server := grpc.NewServer()
	taskgatev1.RegisterTaskServiceServer(server, busy)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	client, err := New(listener.Addr().String(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	const key = "9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b"
	for name, call := range map[string]func(context.Context, uint32, uint32, ...CallOption) (*CallResult, error){
		"CaseExtract": client.CaseExtract,
		"CaseCancel":  client.CaseCancel,
	} {
		busy.mu.Lock()
		busy.keys = nil
		busy.mu.Unlock()
		_, err := call(testContext(t), 4, 101337, WithIdempotencyKey(key), WithMaxAttempts(3))
		repeat := mustFail(t, err)
		if repeat.Reason != "PREVIOUS_ACTION_NOT_COMPLETED" || repeat.IdempotencyKey != key || repeat.Attempts != 1 ||
			!repeat.MayHaveActed() || repeat.Retryable() {
			t.Errorf("%s repeat: reason %q, key %q, attempts %d, may have acted %v, retryable %v; want the 1148, %q, 1, true, false",
				name, repeat.Reason, repeat.IdempotencyKey, repeat.Attempts, repeat.MayHaveActed(), repeat.Retryable(), key)
		}
		// A new call (a fresh key) meets another operation's 1148: it is retried.
		_, err = call(testContext(t), 4, 101337, WithMaxAttempts(3))
		fresh := mustFail(t, err)
		if fresh.Attempts != 3 || fresh.MayHaveActed() || !fresh.Retryable() {
			t.Errorf("%s new call: attempts %d, may have acted %v, retryable %v; want 3, false, true",
				name, fresh.Attempts, fresh.MayHaveActed(), fresh.Retryable())
		}
		busy.mu.Lock()
		want := []string{key, fresh.IdempotencyKey, fresh.IdempotencyKey, fresh.IdempotencyKey}
		if !reflect.DeepEqual(busy.keys, want) {
			t.Errorf("%s: the stand-in gateway saw the keys %v, want %v", name, busy.keys, want)
		}
		busy.mu.Unlock()
	}
}
