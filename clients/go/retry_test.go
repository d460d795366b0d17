package taskgateclient

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
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
