package taskgateclient

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	taskgatev1 "taskgate/v1"
)

// The README's retry contract: besides UNAVAILABLE, the reasons safe to retry as they are (the
// controller was not called); the codes after which the controller may have acted, and the
// reasons that are exceptions to their code's rule. The Python and Node clients decide alike.
var (
	retryableReasons  = map[string]bool{"OVERLOADED": true}
	mayHaveActedCodes = map[codes.Code]bool{
		codes.Unknown:          true,
		codes.DeadlineExceeded: true,
		codes.Internal:         true,
		codes.Canceled:         true,
	}
	nothingSentReasons    = map[string]bool{"DEADLINE_TOO_SHORT": true}
	outcomeUnknownReasons = map[string]bool{"REQUEST_OUTCOME_UNKNOWN": true}
)

// unsettledRows are the README's gateway errors (its "Gateway errors" table) after which the
// controller may have acted but a repeat with the same key cannot settle what it did, by reason
// and code: the rows whose advice says "not even with the same request_id". UPSTREAM_HTTP_ERROR
// is one only as INTERNAL, not as UNKNOWN. The Python and Node clients decide alike;
// tests/integration/contract.rs checks each copy against the gateway's table.
var unsettledRows = map[string]codes.Code{
	"SHUTDOWN_GRACE_RAN_OUT":  codes.Unknown,
	"REQUEST_OUTCOME_UNKNOWN": codes.FailedPrecondition,
	"UPSTREAM_HTTP_ERROR":     codes.Internal,
}

// The ErrorInfo metadata that marks a failed port read after an unknown outcome (README,
// "Gateway errors"): whatever its code, the earlier call may have acted.
const (
	requestOutcomeKey = "requestOutcome"
	outcomeUnknown    = "unknown"
)

// FieldViolation is one entry of a google.rpc.BadRequest: a field and what is wrong with it.
type FieldViolation struct {
	Field       string
	Description string
}

// Error is a call that did not succeed, with everything its status details say. Every method
// of Client returns one when a call fails; ErrorOf turns any other error into one.
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Message is the status message (it names the method, port, bin, code and meaning).
	Message string
	// Reason is the ErrorInfo reason: the fault name (PREVIOUS_ACTION_NOT_COMPLETED) or a
	// gateway reason (INVALID_PARAMETER); empty when the status has no ErrorInfo, that is when
	// it came from the gRPC library rather than from the gateway.
	Reason string
	// Domain is the ErrorInfo domain: autostore.task for controller faults, taskgate for the
	// gateway's own errors.
	Domain string
	// Metadata is the ErrorInfo metadata (faultCode, method, portId, binId, httpStatus, ...).
	Metadata map[string]string
	// FaultCode is the TaskFault code; FAULT_CODE_UNSPECIFIED without a TaskFault or for a
	// code the contract does not list.
	FaultCode taskgatev1.FaultCode
	// RawCode is the controller's fault number as it sent it; 0 without a TaskFault.
	RawCode uint32
	// HasRetryDelay says whether the status carries a RetryInfo: then a retry is safe after
	// RetryDelay (which may be zero).
	HasRetryDelay bool
	// RetryDelay is the RetryInfo delay.
	RetryDelay time.Duration
	// FieldViolations are the BadRequest's violations, in order.
	FieldViolations []FieldViolation
	// IdempotencyKey is the call's request_id (CaseExtract and CaseCancel): when RepeatSettles,
	// give it back with WithIdempotencyKey to repeat the call, within the gateway's idempotency
	// window.
	IdempotencyKey string
	// Attempts is how many times the call was sent before it failed.
	Attempts int
	// EarlierAttemptMayHaveActed says whether an earlier attempt of the same call, retried by
	// Client, may have acted; for a call given its key with WithIdempotencyKey, always: the call
	// it repeats may have.
	EarlierAttemptMayHaveActed bool
	// RequestID is the x-request-id of the attempt that failed (the last one), as the gateway's
	// access line and every log line of the call show it; empty when no answer came from the
	// gateway (it could not be reached, or the connection broke before its headers), and in an
	// *Error that ErrorOf made from another error.
	RequestID string

	// status is the gRPC status the fields are read from, for GRPCStatus.
	status *status.Status
	// cause is the error Unwrap gives: the context's error when the call ended because its
	// context did, else the error the gRPC library (or the caller of ErrorOf) gave.
	cause error
}

// Error gives the code's canonical name, the message and the request id when there is one, as
// the Python and Node clients do: "UNAVAILABLE: case_extract port 4 bin 101337: ... (request
// id: 5b0c...)".
func (e *Error) Error() string {
	text := codeName(e.Code) + ": " + e.Message
	if e.RequestID == "" {
		return text
	}
	return text + " (request id: " + e.RequestID + ")"
}

// GRPCStatus is the status the error was read from, with all its details (for an *Error built
// by hand, its Code and Message): with it, status.Code, status.FromError and status.Convert
// work on an *Error as on grpc-go's own errors.
func (e *Error) GRPCStatus() *status.Status {
	if e.status == nil {
		return status.New(e.Code, e.Message)
	}
	return e.status
}

// Unwrap gives the error the *Error was made from: context.DeadlineExceeded or
// context.Canceled when the call's context ended it (so errors.Is finds them), else the gRPC
// library's error.
func (e *Error) Unwrap() error {
	return e.cause
}

// FaultName is the FaultCode name without its FAULT_CODE_ prefix, or "" without a known fault.
func (e *Error) FaultName() string {
	if e.FaultCode == taskgatev1.FaultCode_FAULT_CODE_UNSPECIFIED {
		return ""
	}
	return strings.TrimPrefix(e.FaultCode.String(), "FAULT_CODE_")
}

// Retryable says whether the error is retried as it is: UNAVAILABLE (after RetryDelay) and
// OVERLOADED (with backoff). From the gateway, these say the controller started nothing; a
// bare UNAVAILABLE without ErrorInfo (the connection to the gateway broke) may have reached it,
// and is retried with the same key, which only the same gateway process deduplicates. Client
// retries these itself. Not retryable: an error of a CaseExtract or CaseCancel call that may
// already have acted (an earlier attempt, or the call it repeats), unless marked requestOutcome:
// unknown. A gateway that forgot the key (restarted, another replica) sent that attempt as a new
// call: its 1148 most likely means the first operation is running, and retrying until it ends
// would start a second.
func (e *Error) Retryable() bool {
	if e.IdempotencyKey != "" && e.EarlierAttemptMayHaveActed && e.Metadata[requestOutcomeKey] != outcomeUnknown {
		return false
	}
	return e.Code == codes.Unavailable || retryableReasons[e.Reason]
}

// MayHaveActed says whether the controller may have acted on the call (the README's "Controller
// may have acted?" column): UNKNOWN, DEADLINE_EXCEEDED (but DEADLINE_TOO_SHORT), INTERNAL,
// REQUEST_OUTCOME_UNKNOWN, a call cancelled or cut off before an answer (CANCELLED, or an
// UNAVAILABLE without the gateway's ErrorInfo), a failed port read after an earlier unknown
// outcome (metadata requestOutcome: unknown), and any error of a call one of whose earlier
// attempts may have acted. Then, if RepeatSettles, repeat the call with WithIdempotencyKey;
// else read the port with CaseGetState before acting again.
func (e *Error) MayHaveActed() bool {
	return e.EarlierAttemptMayHaveActed || e.answerMayHaveActed()
}

// answerMayHaveActed is MayHaveActed by this answer alone, without the call's earlier attempts.
func (e *Error) answerMayHaveActed() bool {
	if outcomeUnknownReasons[e.Reason] || e.Metadata[requestOutcomeKey] == outcomeUnknown {
		return true
	}
	if e.Code == codes.Unavailable {
		return e.Reason == ""
	}
	return mayHaveActedCodes[e.Code] && !nothingSentReasons[e.Reason]
}

// RepeatSettles says whether this answer says the controller may have acted and a repeat of the
// call with WithIdempotencyKey(IdempotencyKey) can settle what it did: the gateway process that
// holds the key answers such a repeat from the first call or from the port, and sends it again
// only if the port shows it was not acted on (README, "Idempotency: request_id"). Judged by this
// answer alone (MayHaveActed without the call's earlier attempts): an answer marked
// requestOutcome: unknown, or one the README's column says may have acted. An unmarked definite
// answer to a repeat (fault 1148, a kept fault such as 1149, REQUEST_ID_REUSED) means the
// gateway did not hold the key's unknown outcome: it took the key as new (forgotten after its
// window, evicted, restarted, another replica) or has a definite answer stored, so a further
// repeat settles nothing; after 1148 (the first call's operation most likely running),
// repeating until it ends would start a second. False too after the README's gateway errors
// whose repeat cannot settle it, marked requestOutcome: unknown or not: SHUTDOWN_GRACE_RAN_OUT
// (the process that held the key has exited, and the one a repeat reaches never saw it, so
// sends it as a new call, which may move a robot twice), REQUEST_OUTCOME_UNKNOWN (a repeat has
// already read the port and could not tell) and UPSTREAM_HTTP_ERROR as INTERNAL (a status the
// task interface never answers, most often a wrong controller URL, which a repeat would read
// the port through too; fixing it restarts the gateway, which forgets the key). Whenever
// MayHaveActed but not this, read the port with CaseGetState before acting again.
func (e *Error) RepeatSettles() bool {
	code, unsettled := unsettledRows[e.Reason]
	return e.answerMayHaveActed() && !(unsettled && code == e.Code)
}

// ErrorOf turns any error into an *Error: an *Error (from Client) as it is, a gRPC status with
// its details read, a context error as CANCELLED or DEADLINE_EXCEEDED, anything else as UNKNOWN
// with its text. It returns nil for nil.
func ErrorOf(err error) *Error {
	if err == nil {
		return nil
	}
	var typed *Error
	if errors.As(err, &typed) {
		return typed
	}
	var grpcStatus interface{ GRPCStatus() *status.Status }
	if errors.As(err, &grpcStatus) {
		return fromStatus(grpcStatus.GRPCStatus(), err)
	}
	if errors.Is(err, context.Canceled) {
		return fromStatus(status.New(codes.Canceled, err.Error()), err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fromStatus(status.New(codes.DeadlineExceeded, err.Error()), err)
	}
	return fromStatus(status.New(codes.Unknown, err.Error()), err)
}

// endedBy is ErrorOf(err) for a call made with ctx: when ctx has ended and the call failed
// with the matching code, it unwraps to the context's error, which grpc-go's status does not.
func endedBy(ctx context.Context, err error) *Error {
	failure := ErrorOf(err)
	switch ctxErr := ctx.Err(); {
	case errors.Is(ctxErr, context.DeadlineExceeded) && failure.Code == codes.DeadlineExceeded,
		errors.Is(ctxErr, context.Canceled) && failure.Code == codes.Canceled:
		failure.cause = ctxErr
	}
	return failure
}

// The ErrorInfo of a call the client could not send for want of random bytes for its
// idempotency key: FAILED_PRECONDITION, as nothing was sent, so nothing may have acted, and
// retrying at once will not help.
const (
	noRandomBytesReason = "NO_RANDOM_BYTES"
	clientDomain        = "taskgateclient"
)

// localError is the *Error of a call not sent because crypto/rand failed with err.
func localError(err error) *Error {
	s := status.New(codes.FailedPrecondition, "no random bytes for an idempotency key: "+err.Error())
	if withInfo, detailErr := s.WithDetails(&errdetails.ErrorInfo{Reason: noRandomBytesReason, Domain: clientDomain}); detailErr == nil {
		s = withInfo
	}
	failure := fromStatus(s, err)
	failure.Attempts = 0
	return failure
}

// fromStatus reads the details the gateway puts in grpc-status-details-bin; cause is the
// error s came from.
func fromStatus(s *status.Status, cause error) *Error {
	e := &Error{Code: s.Code(), Message: s.Message(), Metadata: map[string]string{}, Attempts: 1,
		status: s, cause: cause}
	for _, detail := range s.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			e.Reason, e.Domain = d.GetReason(), d.GetDomain()
			for key, value := range d.GetMetadata() {
				e.Metadata[key] = value
			}
		case *taskgatev1.TaskFault:
			e.FaultCode, e.RawCode = d.GetCode(), d.GetRawCode()
		case *errdetails.RetryInfo:
			e.HasRetryDelay, e.RetryDelay = true, d.GetRetryDelay().AsDuration()
		case *errdetails.BadRequest:
			for _, violation := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations,
					FieldViolation{Field: violation.GetField(), Description: violation.GetDescription()})
			}
		}
	}
	return e
}

// codeNames are the canonical names of the gRPC codes, as every other gRPC library spells them
// (grpc-go's own String gives "Unavailable").
var codeNames = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

func codeName(code codes.Code) string {
	if name, ok := codeNames[code]; ok {
		return name
	}
	return fmt.Sprintf("CODE_%d", uint32(code))
}
