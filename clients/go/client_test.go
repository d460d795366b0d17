package taskgateclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	taskgatev1 "taskgate/v1"
)

var uuid4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// mustFail gives the *Error a call failed with, and fails the test if it succeeded or failed
// with another type.
func mustFail(t *testing.T, err error) *Error {
	t.Helper()
	if err == nil {
		t.Fatal("the call succeeded; it should have failed")
	}
	var failure *Error
	if !errors.As(err, &failure) {
		t.Fatalf("the call failed with %T (%v), not with an *Error", err, err)
	}
	return failure
}

func TestASuccessThen1148WithItsRetryDelay(t *testing.T) {
	client := startGateway(t).client(Options{})
	ctx := testContext(t)
	result, err := client.CaseExtract(ctx, 4, 101337, WithRequestID("go-1"))
	if err != nil {
		t.Fatalf("CaseExtract: %v", err)
	}
	if result.RequestID != "go-1" || !uuid4.MatchString(result.IdempotencyKey) || result.Replayed != "" || result.Attempts != 1 {
		t.Errorf("the result is %+v", result)
	}
	// The extraction runs for a few seconds: a second one meets fault 1148.
	_, err = client.CaseExtract(ctx, 4, 101337, WithMaxAttempts(1))
	failure := mustFail(t, err)
	if failure.Code != codes.Unavailable || failure.FaultCode != taskgatev1.FaultCode_FAULT_CODE_PREVIOUS_ACTION_NOT_COMPLETED ||
		failure.FaultName() != "PREVIOUS_ACTION_NOT_COMPLETED" || failure.RawCode != 1148 {
		t.Errorf("the fault is %v %v %q %d", failure.Code, failure.FaultCode, failure.FaultName(), failure.RawCode)
	}
	if !failure.HasRetryDelay || failure.RetryDelay != 1500*time.Millisecond {
		t.Errorf("the RetryInfo delay is %v (present: %v), not the gateway's --retry-delay 1500ms", failure.RetryDelay, failure.HasRetryDelay)
	}
	if !failure.Retryable() || failure.MayHaveActed() || failure.Attempts != 1 || !uuid4.MatchString(failure.IdempotencyKey) {
		t.Errorf("retryable %v, may have acted %v, attempts %d, key %q", failure.Retryable(), failure.MayHaveActed(), failure.Attempts, failure.IdempotencyKey)
	}
	if failure.Reason != "PREVIOUS_ACTION_NOT_COMPLETED" || failure.Domain != "autostore.task" {
		t.Errorf("the ErrorInfo is %q in %q", failure.Reason, failure.Domain)
	}
	wantMetadata := map[string]string{"faultCode": "1148", "method": "case_extract", "portId": "4", "binId": "101337"}
	if !reflect.DeepEqual(failure.Metadata, wantMetadata) {
		t.Errorf("the ErrorInfo metadata is %v, not %v", failure.Metadata, wantMetadata)
	}
	text := "UNAVAILABLE: case_extract port 4 bin 101337: controller fault 1148 PREVIOUS_ACTION_NOT_COMPLETED: New action cannot be started until the previous action has been completed (request id: " + failure.RequestID + ")"
	if failure.RequestID == "" || failure.Error() != text {
		t.Errorf("the error reads\n%q, not\n%q", failure.Error(), text)
	}
	// grpc-go's own status functions read the client's errors as they read its own.
	if code := status.Code(err); code != codes.Unavailable {
		t.Errorf("status.Code gives %v, not Unavailable", code)
	}
	var fault *taskgatev1.TaskFault
	var retryInfo *errdetails.RetryInfo
	for _, detail := range status.Convert(err).Details() {
		switch d := detail.(type) {
		case *taskgatev1.TaskFault:
			fault = d
		case *errdetails.RetryInfo:
			retryInfo = d
		}
	}
	if fault.GetRawCode() != 1148 || retryInfo.GetRetryDelay().AsDuration() != 1500*time.Millisecond {
		t.Errorf("status.Convert(err).Details() has the TaskFault %v and the RetryInfo %v", fault, retryInfo)
	}
}

// requestIDLogged waits for the gateway's access line of the call with idempotency key key, and
// gives the request id it shows.
func requestIDLogged(g *gateway, key string) string {
	g.t.Helper()
	line := attemptsLogged(g, key, 1)[0]
	return accessRequestID.FindStringSubmatch(line)[1]
}

var accessRequestID = regexp.MustCompile(` request_id=(\S+)`)

func TestAFailedCallCarriesTheRequestIDOfItsAccessLine(t *testing.T) {
	g := startGateway(t)
	client := g.client(Options{})
	// Port 1 is not an AutoCase port: the controller refuses the call.
	_, err := client.CaseExtract(testContext(t), 1, 101337, WithMaxAttempts(1))
	failure := mustFail(t, err)
	if logged := requestIDLogged(g, failure.IdempotencyKey); failure.RequestID != logged {
		t.Errorf("the error carries request id %q, the access line %q", failure.RequestID, logged)
	}
	if text := "FAILED_PRECONDITION: " + failure.Message + " (request id: " + failure.RequestID + ")"; err.Error() != text {
		t.Errorf("the error reads\n%q, not\n%q", err.Error(), text)
	}
	// One the caller sets is the one the gateway logs, and the one the error carries.
	_, err = client.CaseGetState(testContext(t), 1, WithRequestID("go-failed-read"))
	if failure := mustFail(t, err); failure.RequestID != "go-failed-read" || !strings.HasSuffix(err.Error(), " (request id: go-failed-read)") {
		t.Errorf("a failed read with request id go-failed-read is %q, reading %q", failure.RequestID, err.Error())
	}
}

func TestACallThatNeverReachedTheGatewayHasNoRequestID(t *testing.T) {
	// Nothing listens there: the connection is refused, and no gateway named the call.
	client, err := New(unusedAddress(t), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	_, err = client.CaseGetState(testContext(t), 4, WithMaxAttempts(1))
	if failure := mustFail(t, err); failure.Code != codes.Unavailable || failure.RequestID != "" || strings.Contains(err.Error(), "request id") {
		t.Errorf("an unreachable gateway's call fails with %v, request id %q", err, failure.RequestID)
	}
}

func TestACallWhoseContextEndsIsItsContextsError(t *testing.T) {
	client := startGateway(t).client(Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	<-ctx.Done()
	_, err := client.CaseGetState(ctx, 4)
	if failure := mustFail(t, err); failure.Code != codes.DeadlineExceeded || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("a call past its deadline fails with %v, which errors.Is does not find to be context.DeadlineExceeded", err)
	}
	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	_, err = client.CaseExtract(ctx, 4, 101337)
	if !errors.Is(err, context.Canceled) || status.Code(err) != codes.Canceled {
		t.Errorf("a call whose context was cancelled fails with %v, which errors.Is does not find to be context.Canceled", err)
	}
}

func TestA1148IsRetriedWithTheSameKeyAndARepeatOfTheKeyIsReplayed(t *testing.T) {
	// Each step of an extraction lasts an hour: every later extraction meets 1148.
	g := startGateway(t, layout(t, "1h")...)
	client := g.client(Options{})
	ctx := testContext(t)
	first, err := client.CaseExtract(ctx, 4, 101337)
	if err != nil {
		t.Fatalf("CaseExtract: %v", err)
	}
	_, err = client.CaseExtract(ctx, 4, 101337, WithMaxAttempts(3))
	failure := mustFail(t, err)
	if failure.RawCode != 1148 || failure.Attempts != 3 {
		t.Errorf("the call ended with fault %d after %d attempts, not 1148 after 3", failure.RawCode, failure.Attempts)
	}
	if failure.IdempotencyKey == first.IdempotencyKey || !uuid4.MatchString(failure.IdempotencyKey) {
		t.Errorf("a new logical call sent the key %q (the first sent %q)", failure.IdempotencyKey, first.IdempotencyKey)
	}
	// Every attempt carried the one key: the gateway's access log records it on each.
	attemptsLogged(g, failure.IdempotencyKey, 3)
	repeat, err := client.CaseExtract(ctx, 4, 101337, WithIdempotencyKey(first.IdempotencyKey))
	if err != nil {
		t.Fatalf("the repeat of the first call: %v", err)
	}
	if repeat.IdempotencyKey != first.IdempotencyKey || repeat.Replayed != "stored" || repeat.Attempts != 1 {
		t.Errorf("the repeat of the first call is %+v", repeat)
	}
}

func TestAnOutOfRangePortCarriesItsBadRequest(t *testing.T) {
	client := startGateway(t).client(Options{})
	_, err := client.CaseExtract(testContext(t), 2001, 101337)
	failure := mustFail(t, err)
	if failure.Code != codes.InvalidArgument || failure.Reason != "INVALID_PARAMETER" || failure.Domain != "taskgate" {
		t.Errorf("the error is %v %q in %q", failure.Code, failure.Reason, failure.Domain)
	}
	want := []FieldViolation{{Field: "port_id", Description: "port_id 2001 is out of range 1-2000"}}
	if !reflect.DeepEqual(failure.FieldViolations, want) {
		t.Errorf("the violations are %+v, not %+v", failure.FieldViolations, want)
	}
	if failure.Retryable() || failure.MayHaveActed() || failure.Attempts != 1 || failure.HasRetryDelay || failure.RawCode != 0 {
		t.Errorf("retryable %v, may have acted %v, attempts %d, retry delay %v, fault %d",
			failure.Retryable(), failure.MayHaveActed(), failure.Attempts, failure.HasRetryDelay, failure.RawCode)
	}
}

func TestACallWithoutAValidTokenIsUnauthenticated(t *testing.T) {
	tokens := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(tokens, []byte("# the Go suite's token\ngo-client-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, "--auth-tokens-file", tokens)
	ctx := testContext(t)
	for _, token := range []string{"", "another-token"} {
		_, err := g.client(Options{Token: token}).CaseGetState(ctx, 4)
		failure := mustFail(t, err)
		if failure.Code != codes.Unauthenticated || failure.Reason != "UNAUTHENTICATED" || failure.Domain != "taskgate" {
			t.Errorf("token %q: the error is %v %q in %q", token, failure.Code, failure.Reason, failure.Domain)
		}
		if failure.Retryable() || failure.MayHaveActed() {
			t.Errorf("token %q: retryable %v, may have acted %v", token, failure.Retryable(), failure.MayHaveActed())
		}
	}
	state, err := g.client(Options{Token: "go-client-token"}).CaseGetState(ctx, 4)
	if err != nil {
		t.Fatalf("with the token in the file: %v", err)
	}
	if state.PortId != 4 {
		t.Errorf("the state is %v", state)
	}
}

func TestEachErrorSaysWhetherToRetryAndWhetherTheControllerMayHaveActed(t *testing.T) {
	for _, row := range []struct {
		code                    codes.Code
		reason                  string
		retryable, mayHaveActed bool
	}{
		{codes.Unavailable, "PREVIOUS_ACTION_NOT_COMPLETED", true, false},
		{codes.Unavailable, "UPSTREAM_UNREACHABLE", true, false},
		{codes.Unavailable, "UPSTREAM_HTTP_ERROR", true, false},
		// The connection to the gateway broke: the call may have reached it.
		{codes.Unavailable, "", true, true},
		{codes.Unknown, "UPSTREAM_CONNECTION_LOST", false, true},
		{codes.Unknown, "UPSTREAM_HTTP_ERROR", false, true},
		{codes.Unknown, "UNKNOWN_FAULT", false, true},
		{codes.DeadlineExceeded, "UPSTREAM_TIMEOUT", false, true},
		{codes.DeadlineExceeded, "REQUEST_IN_PROGRESS", false, true},
		{codes.DeadlineExceeded, "", false, true},
		{codes.DeadlineExceeded, "DEADLINE_TOO_SHORT", false, false},
		{codes.Internal, "UPSTREAM_BAD_RESPONSE", false, true},
		{codes.Internal, "CONTROLLER_INTERNAL_ERROR", false, true},
		{codes.FailedPrecondition, "REQUEST_OUTCOME_UNKNOWN", false, true},
		{codes.FailedPrecondition, "BIN_NOT_SELECTED_FOR_PORT", false, false},
		{codes.InvalidArgument, "REQUEST_ID_REUSED", false, false},
		{codes.NotFound, "PORT_IS_NOT_AVAILABLE", false, false},
		{codes.Unauthenticated, "UNAUTHENTICATED", false, false},
		{codes.ResourceExhausted, "OVERLOADED", true, false},
		{codes.ResourceExhausted, "WATCH_LAGGED", false, false},
		{codes.Canceled, "", false, true},
	} {
		failure := &Error{Code: row.code, Reason: row.reason}
		if failure.Retryable() != row.retryable || failure.MayHaveActed() != row.mayHaveActed {
			t.Errorf("%v %q: retryable %v, may have acted %v; the README says %v, %v",
				row.code, row.reason, failure.Retryable(), failure.MayHaveActed(), row.retryable, row.mayHaveActed)
		}
	}
}

func TestARepeatWithTheKeyIsOfferedOnlyWhereTheGatewayCanSettleIt(t *testing.T) {
	marked := map[string]string{"requestOutcome": "unknown"}
	for _, row := range []struct {
		code          codes.Code
		reason        string
		metadata      map[string]string
		repeat        bool
		repeatSettles bool
	}{
		// The process that held the key has exited: a repeat would be a new call.
		{codes.Unknown, "SHUTDOWN_GRACE_RAN_OUT", nil, false, false},
		{codes.Unknown, "SHUTDOWN_GRACE_RAN_OUT", marked, false, false},
		{codes.Unknown, "SHUTDOWN_GRACE_RAN_OUT", marked, true, false},
		// A repeat already read the port and could not tell.
		{codes.FailedPrecondition, "REQUEST_OUTCOME_UNKNOWN", nil, false, false},
		// A status the task interface never answers: a repeat reads the port through the same URL.
		{codes.Internal, "UPSTREAM_HTTP_ERROR", nil, false, false},
		{codes.Unknown, "UPSTREAM_HTTP_ERROR", nil, false, true},
		{codes.DeadlineExceeded, "UPSTREAM_TIMEOUT", nil, false, true},
		{codes.DeadlineExceeded, "UPSTREAM_TIMEOUT", nil, true, true},
		{codes.Unknown, "UPSTREAM_CONNECTION_LOST", nil, false, true},
		// The connection to the gateway broke: the gateway that got the call holds its key.
		{codes.Unavailable, "", nil, false, true},
		// Refused: the controller did not act, so there is nothing to settle.
		{codes.ResourceExhausted, "OVERLOADED", nil, false, false},
		{codes.NotFound, "PORT_IS_NOT_AVAILABLE", nil, false, false},
		// A repeat's failed port read: the gateway holds the key's unknown outcome.
		{codes.Unavailable, "UPSTREAM_UNREACHABLE", marked, true, true},
		// An unmarked definite answer to a repeat: the gateway took the key as new (forgotten,
		// evicted, restarted, another replica) or has an answer stored, so a further repeat
		// settles nothing; after 1148 it would start a second extraction.
		{codes.Unavailable, "PREVIOUS_ACTION_NOT_COMPLETED", nil, true, false},
		{codes.FailedPrecondition, "BIN_NOT_SELECTED_FOR_PORT", nil, true, false},
		{codes.InvalidArgument, "REQUEST_ID_REUSED", nil, true, false},
	} {
		// A repeat is a call given its key, which counts as one after an attempt that may have acted.
		failure := &Error{Code: row.code, Reason: row.reason, Metadata: row.metadata, EarlierAttemptMayHaveActed: row.repeat}
		if row.repeat {
			failure.IdempotencyKey = "key"
		}
		if failure.RepeatSettles() != row.repeatSettles {
			t.Errorf("%v %q %v, repeat %v: a repeat with the key settles it: %v; the README says %v",
				row.code, row.reason, row.metadata, row.repeat, failure.RepeatSettles(), row.repeatSettles)
		}
	}
}

func TestAFailedPortReadAfterAnUnknownOutcomeMayHaveActed(t *testing.T) {
	marked := &Error{Code: codes.Unavailable, Reason: "UPSTREAM_UNREACHABLE", Metadata: map[string]string{"requestOutcome": "unknown"}}
	if !marked.Retryable() || !marked.MayHaveActed() {
		t.Errorf("retryable %v, may have acted %v; want true, true", marked.Retryable(), marked.MayHaveActed())
	}
}

func TestMayHaveActedIsKeptAcrossTheClientsOwnRetries(t *testing.T) {
	// The first attempt was cut off (it may have reached the controller); the retry was answered
	// "unreachable": the call may still have acted.
	failures := []error{
		status.Error(codes.Unavailable, "cut off"),
		statusWithReason(t, codes.Unavailable, "UPSTREAM_UNREACHABLE"),
	}
	client := &Client{}
	_, err := client.call(testContext(t), callSettings{maxAttempts: 2}, "key", func(context.Context, *metadata.MD, *metadata.MD) error {
		next := failures[0]
		failures = failures[1:]
		return next
	})
	failure := mustFail(t, err)
	if failure.Reason != "UPSTREAM_UNREACHABLE" || failure.Attempts != 2 || !failure.MayHaveActed() {
		t.Errorf("reason %q, attempts %d, may have acted %v", failure.Reason, failure.Attempts, failure.MayHaveActed())
	}
	alone := ErrorOf(statusWithReason(t, codes.Unavailable, "UPSTREAM_UNREACHABLE"))
	if alone.MayHaveActed() {
		t.Errorf("an unreachable controller alone may have acted")
	}
}

func TestAfterAnAttemptThatMayHaveActedOnlyAPortReadIsRetried(t *testing.T) {
	// The first attempt was cut off after it may have reached the controller. A gateway that
	// forgot the key (restarted, another replica) sends the retry as a new call, and its 1148
	// then most likely means the first attempt's extraction is running: retrying until it ends
	// would start a second one.
	withInfo := func(code codes.Code, reason string, metadata map[string]string) error {
		info := &errdetails.ErrorInfo{Reason: reason, Domain: "taskgate", Metadata: metadata}
		delay := &errdetails.RetryInfo{RetryDelay: durationpb.New(time.Millisecond)}
		s, err := status.New(code, "failed").WithDetails(info, delay)
		if err != nil {
			t.Fatalf("cannot build the status: %v", err)
		}
		return s.Err()
	}
	cutOff := status.Error(codes.Unavailable, "cut off")
	busy := withInfo(codes.Unavailable, "PREVIOUS_ACTION_NOT_COMPLETED", nil)
	marked := withInfo(codes.Unavailable, "UPSTREAM_UNREACHABLE", map[string]string{"requestOutcome": "unknown"})
	last := withInfo(codes.Unknown, "LAST", nil)
	run := func(key string, failures ...error) *Error {
		client := &Client{}
		_, err := client.call(testContext(t), callSettings{maxAttempts: 3}, key, func(context.Context, *metadata.MD, *metadata.MD) error {
			next := failures[0]
			failures = failures[1:]
			return next
		})
		return mustFail(t, err)
	}
	if failure := run("key", cutOff, busy, cutOff); failure.Reason != "PREVIOUS_ACTION_NOT_COMPLETED" || failure.Attempts != 2 ||
		!failure.MayHaveActed() || failure.Retryable() {
		t.Errorf("reason %q, attempts %d, may have acted %v, retryable %v; want the 1148, 2, true, false",
			failure.Reason, failure.Attempts, failure.MayHaveActed(), failure.Retryable())
	}
	// A gateway that remembers the key as unknown reads the port before sending again, and says
	// so: that answer is retried. So is any answer to a read (no key), which never acts.
	if failure := run("key", cutOff, marked, last); failure.Reason != "LAST" || failure.Attempts != 3 {
		t.Errorf("after a marked answer: reason %q, attempts %d; want LAST, 3", failure.Reason, failure.Attempts)
	}
	if failure := run("", cutOff, busy, last); failure.Reason != "LAST" || failure.Attempts != 3 {
		t.Errorf("a read: reason %q, attempts %d; want LAST, 3", failure.Reason, failure.Attempts)
	}
}

// statusWithReason is a status error carrying the gateway's ErrorInfo with reason.
func statusWithReason(t *testing.T, code codes.Code, reason string) error {
	t.Helper()
	withInfo, err := status.New(code, "failed").WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: "taskgate"})
	if err != nil {
		t.Fatalf("cannot build the status: %v", err)
	}
	return withInfo.Err()
}

func TestTheClientConnectsOverTLS(t *testing.T) {
	cert, key, roots := selfSignedCertificate(t)
	client := startGateway(t, "--tls-cert", cert, "--tls-key", key).client(Options{TLS: &tls.Config{RootCAs: roots}})
	state, err := client.CaseGetState(testContext(t), 4)
	if err != nil {
		t.Fatalf("CaseGetState over TLS: %v", err)
	}
	if state.PortId != 4 {
		t.Errorf("the state is %v", state)
	}
}

// selfSignedCertificate writes a certificate for 127.0.0.1 and its key as PEM files, and gives
// their paths and a pool that trusts the certificate.
func selfSignedCertificate(t *testing.T) (string, string, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "taskgate Go suite"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	folder := t.TempDir()
	certPath, keyPath := filepath.Join(folder, "cert.pem"), filepath.Join(folder, "key.pem")
	for path, block := range map[string]*pem.Block{
		certPath: {Type: "CERTIFICATE", Bytes: der},
		keyPath:  {Type: "PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	parsed, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(parsed)
	return certPath, keyPath, roots
}

// failingReader is a source of random bytes that has none.
type failingReader struct{}

var errNoEntropy = errors.New("no entropy")

func (failingReader) Read([]byte) (int, error) { return 0, errNoEntropy }

func TestACallWithoutRandomBytesIsATypedErrorThatSentNothing(t *testing.T) {
	reader := randomBytes
	randomBytes = failingReader{}
	t.Cleanup(func() { randomBytes = reader })
	// Nothing listens there: the call must fail before it connects.
	client, err := New("127.0.0.1:1", Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	_, err = client.CaseExtract(testContext(t), 4, 101337)
	failure := mustFail(t, err)
	if failure.Code != codes.FailedPrecondition || failure.Reason != "NO_RANDOM_BYTES" || failure.Domain != "taskgateclient" ||
		failure.Attempts != 0 || failure.Retryable() || failure.MayHaveActed() || !errors.Is(err, errNoEntropy) {
		t.Errorf("the call failed with %v (reason %q in %q, %d attempts, retryable %v, may have acted %v)",
			err, failure.Reason, failure.Domain, failure.Attempts, failure.Retryable(), failure.MayHaveActed())
	}
	const text = "FAILED_PRECONDITION: no random bytes for an idempotency key: no entropy"
	if err.Error() != text {
		t.Errorf("the error reads %q, not %q", err.Error(), text)
	}
}

// unusedAddress is a loopback address where nothing listens: bound, read, then released.
func unusedAddress(t *testing.T) string {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	address := listener.Addr().String()
	if err := listener.Close(); err != nil {
		t.Fatal(err)
	}
	return address
}
