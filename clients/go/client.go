// Package taskgateclient is a small typed Go client for taskgate's TaskService.
//
// The protobuf and gRPC code is generated from proto/ into target/go by scripts/go-client,
// under the import path taskgate/v1; it is not committed, so it always matches the contract.
//
//	gateway, err := taskgateclient.New("127.0.0.1:50051", taskgateclient.Options{})
//	if err != nil {
//		return err
//	}
//	defer gateway.Close()
//	result, err := gateway.CaseExtract(ctx, 4, 101337)
//	if failure := taskgateclient.ErrorOf(err); failure != nil && failure.RepeatSettles() {
//		// The outcome is unknown: repeat with the same key, which is not extracted twice,
//		// with a context of its own (the first call may have used up ctx). When only
//		// MayHaveActed, a repeat cannot settle it: read the port with CaseGetState first.
//		repeat, cancel := context.WithTimeout(context.Background(), 10*time.Second)
//		defer cancel()
//		result, err = gateway.CaseExtract(repeat, 4, 101337,
//			taskgateclient.WithIdempotencyKey(failure.IdempotencyKey))
//	}
//	if err != nil {
//		return err
//	}
//
// Each CaseExtract and CaseCancel call sends a fresh idempotency key (the message's request_id,
// a UUID v4, sent also as the idempotency-key metadata for a proxy to route on) and keeps it
// across its own retries. A call is retried on UNAVAILABLE (after the RetryInfo delay) and
// OVERLOADED (with backoff), at most WithMaxAttempts times in all and within the context's
// deadline (DefaultTimeout without one). From the gateway, these say the controller started
// nothing; a bare UNAVAILABLE without ErrorInfo is grpc-go's own, when the connection to the
// gateway broke, possibly after the call reached it. Its retry carries the same key, so the same
// gateway process does not send it twice; a gateway restarted in between, or another replica,
// has forgotten the key. So after an attempt that may have acted, only an answer marked
// requestOutcome: unknown (the gateway still holds the key and reads the port first) is
// retried; any other is returned, MayHaveActed and not Retryable. A call given its key with
// WithIdempotencyKey repeats one that may have acted, so its first attempt already counts as one
// after such an attempt.
package taskgateclient

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	taskgatev1 "taskgate/v1"
)

// The retries of one call, as the service config in docs/clients.md recommends: at most 4
// attempts, waiting the RetryInfo delay, or else a backoff from 1 s doubling up to 10 s; and
// the time a call may take, retries included, when its context sets no deadline.
const (
	DefaultMaxAttempts = 4
	DefaultTimeout     = 10 * time.Second
	initialBackoff     = time.Second
	maxBackoff         = 10 * time.Second
)

// Options are a Client's connection settings.
type Options struct {
	// TLS connects over TLS with this configuration; nil connects in plain text.
	TLS *tls.Config
	// Token is sent as "authorization: Bearer <Token>" on every call, when the gateway
	// requires one (--auth-tokens-file); empty sends none.
	Token string
}

// Client is a connection to a taskgate gateway. It is safe for concurrent use.
type Client struct {
	connection *grpc.ClientConn
	stub       taskgatev1.TaskServiceClient
	token      string
}

// New connects to the gateway at target (host:port). The connection is made in the
// background: a gateway that cannot be reached fails the calls, as UNAVAILABLE.
func New(target string, options Options) (*Client, error) {
	transport := grpc.WithInsecure()
	if options.TLS != nil {
		transport = grpc.WithTransportCredentials(credentials.NewTLS(options.TLS))
	}
	connection, err := grpc.Dial(target, transport)
	if err != nil {
		return nil, fmt.Errorf("taskgate gateway %s: %w", target, err)
	}
	return &Client{
		connection: connection,
		stub:       taskgatev1.NewTaskServiceClient(connection),
		token:      options.Token,
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error {
	return c.connection.Close()
}

// CallResult is a CaseExtract or CaseCancel call that succeeded.
type CallResult struct {
	// RequestID is the last attempt's x-request-id, as the gateway logs it (a correlation ID).
	RequestID string
	// IdempotencyKey is the message's request_id, the same on every attempt of the call.
	IdempotencyKey string
	// Replayed is "stored" or "resolved" when the gateway answered a repeat of IdempotencyKey
	// without calling the controller's method (the taskgate-replayed header), else "".
	Replayed string
	// Attempts is how many times the call was sent: more than 1 after retryable errors.
	Attempts int
}

// CallOption changes one call.
type CallOption func(*callSettings)

type callSettings struct {
	requestID      string
	idempotencyKey string
	maxAttempts    int
}

// WithRequestID sends id as the x-request-id header, a correlation ID for the gateway's logs.
func WithRequestID(id string) CallOption {
	return func(settings *callSettings) { settings.requestID = id }
}

// WithIdempotencyKey sends key as the message's request_id instead of a fresh UUID v4: give the
// one an *Error carries to repeat a call whose outcome is unknown. Such a repeat may meet its own
// first call's operation, so it is retried only on an answer marked requestOutcome: unknown: a
// key is for repeats, not for new calls. CaseGetState and WatchCaseEvents ignore it.
func WithIdempotencyKey(key string) CallOption {
	return func(settings *callSettings) { settings.idempotencyKey = key }
}

// WithMaxAttempts sends the call at most attempts times in all (DefaultMaxAttempts unless set).
// WatchCaseEvents ignores it: a watch is not retried (Follow watches again).
func WithMaxAttempts(attempts int) CallOption {
	return func(settings *callSettings) { settings.maxAttempts = attempts }
}

func settingsOf(options []CallOption) callSettings {
	settings := callSettings{maxAttempts: DefaultMaxAttempts}
	for _, option := range options {
		option(&settings)
	}
	return settings
}

// CaseExtract extracts a case from binID at portID. Success means the controller accepted the
// request; the port then runs the extraction (EREQ, ERSO, ECMP) on its own. A failure is an
// *Error with the typed fault.
func (c *Client) CaseExtract(ctx context.Context, portID, binID uint32, options ...CallOption) (*CallResult, error) {
	settings := settingsOf(options)
	key, err := keyOf(settings)
	if err != nil {
		return nil, err
	}
	request := &taskgatev1.CaseExtractRequest{PortId: portID, BinId: binID, RequestId: key}
	return c.call(ctx, settings, key, func(ctx context.Context, header, trailer *metadata.MD) error {
		_, err := c.stub.CaseExtract(ctx, request, grpc.Header(header), grpc.Trailer(trailer))
		return err
	})
}

// CaseCancel cancels the case operation running on binID at portID, with the options and
// retries of CaseExtract. A failure is an *Error (fault 1149 when nothing runs on that bin at
// the port).
func (c *Client) CaseCancel(ctx context.Context, portID, binID uint32, options ...CallOption) (*CallResult, error) {
	settings := settingsOf(options)
	key, err := keyOf(settings)
	if err != nil {
		return nil, err
	}
	request := &taskgatev1.CaseCancelRequest{PortId: portID, BinId: binID, RequestId: key}
	return c.call(ctx, settings, key, func(ctx context.Context, header, trailer *metadata.MD) error {
		_, err := c.stub.CaseCancel(ctx, request, grpc.Header(header), grpc.Trailer(trailer))
		return err
	})
}

// CaseGetState reads the port's AutoCase state: State, RawState (the vendor code, e.g. ERSO)
// and BinId (nil when the port has run no case operation). It only reads, so it is retried like
// the other calls, without an idempotency key. A failure is an *Error.
func (c *Client) CaseGetState(ctx context.Context, portID uint32, options ...CallOption) (*taskgatev1.CaseGetStateResponse, error) {
	var response *taskgatev1.CaseGetStateResponse
	request := &taskgatev1.CaseGetStateRequest{PortId: portID}
	_, err := c.call(ctx, settingsOf(options), "", func(ctx context.Context, header, trailer *metadata.MD) error {
		var err error
		response, err = c.stub.CaseGetState(ctx, request, grpc.Header(header), grpc.Trailer(trailer))
		return err
	})
	if err != nil {
		return nil, err
	}
	return response, nil
}

// keyOf is the call's idempotency key: the one given, or a fresh UUID v4.
func keyOf(settings callSettings) (string, error) {
	if settings.idempotencyKey != "" {
		return settings.idempotencyKey, nil
	}
	return newUUID4()
}

// call makes attempt with the token and request id, again after each retryable error while
// the attempts and the context's deadline allow. attempt fills in the response's headers and
// trailers.
func (c *Client) call(ctx context.Context, settings callSettings, key string, attempt func(ctx context.Context, header, trailer *metadata.MD) error) (*CallResult, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	ctx = c.outgoing(ctx, settings.requestID, key)
	deadline, _ := ctx.Deadline()
	backoff := initialBackoff
	// A key the caller gave repeats a call that may have acted.
	mayHaveActed := key != "" && key == settings.idempotencyKey
	for attempts := 1; ; attempts++ {
		var header, trailer metadata.MD
		err := attempt(ctx, &header, &trailer)
		if err == nil {
			return &CallResult{
				RequestID:      first(header, "x-request-id"),
				IdempotencyKey: key,
				Replayed:       first(header, "taskgate-replayed"),
				Attempts:       attempts,
			}, nil
		}
		failure := endedBy(ctx, err)
		failure.IdempotencyKey, failure.Attempts = key, attempts
		failure.RequestID = requestIDOf(header, trailer)
		failure.EarlierAttemptMayHaveActed = mayHaveActed
		mayHaveActed = failure.MayHaveActed()
		delay := backoff
		if failure.HasRetryDelay {
			delay = failure.RetryDelay
		}
		if !failure.Retryable() || attempts >= settings.maxAttempts || !time.Now().Add(delay).Before(deadline) {
			return nil, failure
		}
		timer := time.NewTimer(delay)
		select {
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			return nil, failure
		}
		if backoff *= 2; backoff > maxBackoff {
			backoff = maxBackoff
		}
	}
}

// idempotencyKeyHeader repeats the message's request_id, for a proxy to hash on (README,
// "Idempotency", "What the table does not cover"); the gateway reads only the field.
const idempotencyKeyHeader = "idempotency-key"

// outgoing adds the token, the request id and the idempotency key to the call's headers.
func (c *Client) outgoing(ctx context.Context, requestID, key string) context.Context {
	if c.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
	}
	if requestID != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "x-request-id", requestID)
	}
	if key != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, idempotencyKeyHeader, key)
	}
	return ctx
}

// requestIDOf is the x-request-id the gateway answered a failed call with: grpc-go gives a
// trailers-only answer (a call the gateway refused or failed at once) as trailers alone, and
// otherwise the id came with the headers.
func requestIDOf(header, trailer metadata.MD) string {
	if id := first(trailer, "x-request-id"); id != "" {
		return id
	}
	return first(header, "x-request-id")
}

func first(header metadata.MD, key string) string {
	if values := header.Get(key); len(values) > 0 {
		return values[0]
	}
	return ""
}

// randomBytes is where idempotency keys come from. A variable of this package, not
// crypto/rand.Reader swapped, so that a test can take the bytes away from the keys alone:
// crypto/tls reads rand.Reader too, from the goroutines of connections still open.
var randomBytes io.Reader = rand.Reader

// newUUID4 is a random UUID (version 4, RFC 4122) in its hyphenated form. Without random
// bytes it fails with an *Error, as every call does, that says nothing was sent.
func newUUID4() (string, error) {
	var b [16]byte
	if _, err := io.ReadFull(randomBytes, b[:]); err != nil {
		return "", localError(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}
