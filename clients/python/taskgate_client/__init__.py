"""A small typed Python client for taskgate's TaskService.

The protobuf and gRPC modules are generated from ``proto/`` by ``generate.py`` (run by the test
script) into ``taskgate_client/_generated``; they are not committed, so they always match the
contract.

>>> from taskgate_client import TaskGate, TaskGateError
>>> with TaskGate("127.0.0.1:50051") as gateway:
...     try:
...         gateway.case_extract(port_id=4, bin_id=101337, timeout=5.0)
...     except TaskGateError as error:
...         print(error.fault_name, error.raw_code, error.code, error.retry_delay)
...         if error.repeat_settles:  # the outcome is unknown: repeat with the same key
...             gateway.case_extract(port_id=4, bin_id=101337, timeout=5.0,
...                                  idempotency_key=error.idempotency_key)
...         elif error.may_have_acted:  # a repeat cannot tell: read the port before acting
...             print(gateway.case_get_state(port_id=4, timeout=5.0))

Each CaseExtract and CaseCancel call sends a fresh idempotency key (the message's ``request_id``,
a UUID v4, sent also as the ``idempotency-key`` metadata for a proxy to route on) and keeps it
across its own retries. A call is retried on ``UNAVAILABLE`` (after the ``RetryInfo`` delay) and
``OVERLOADED`` (with backoff), at most ``max_attempts`` times in all and within ``timeout``. From
the gateway, these say the controller started nothing; a bare ``UNAVAILABLE`` without ErrorInfo
is grpcio's own, when the connection to the gateway broke, possibly after the call reached it. Its
retry carries the same key, so the same gateway process does not send it twice; a gateway
restarted in between, or another replica, has forgotten the key. So after an attempt that may
have acted, only an answer marked ``requestOutcome: unknown`` (the gateway still holds the key and
reads the port first) is retried; any other is raised, ``may_have_acted`` true and ``retryable``
false. A call given its ``idempotency_key`` repeats one that may have acted, so its first attempt
already counts as one after such an attempt.

Case events stream from ``watch_case_events``; the stream's end raises the same ``TaskGateError``:

>>> with TaskGate("127.0.0.1:50051") as gateway:
...     state = gateway.case_get_state(port_id=4)
...     with gateway.watch_case_events(port_ids=[4], timeout=60) as events:
...         for event in events:
...             print(event.segment)
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator, Optional

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_generated"))
try:
    from taskgate.v1 import task_pb2, task_pb2_grpc  # noqa: E402
except ImportError as error:  # pragma: no cover - a setup mistake, reported clearly
    raise ImportError(
        "taskgate_client: the generated modules are missing; run "
        "'python clients/python/generate.py' first"
    ) from error

__all__ = [
    "TaskGate",
    "TaskGateError",
    "CallResult",
    "CaseEventWatch",
    "FaultCode",
    "CaseState",
    "CaseEvent",
    "CaseGetStateResponse",
    "task_pb2",
]

FaultCode = task_pb2.FaultCode
CaseState = task_pb2.CaseState
CaseGetStateResponse = task_pb2.CaseGetStateResponse
CaseEvent = task_pb2.CaseEvent
_TASK_FAULT_TYPE = "taskgate.v1.TaskFault"

# The retries of one call, as the service config docs/clients.md recommends: at most 4 attempts,
# waiting the RetryInfo delay, or else a backoff from 1 s doubling up to 10 s.
DEFAULT_MAX_ATTEMPTS = 4
_INITIAL_BACKOFF_S = 1.0
_MAX_BACKOFF_S = 10.0

# The README's retry contract: besides UNAVAILABLE, the reasons safe to retry as they are (the
# controller was not called); the codes after which the controller may have acted, and the
# reasons that are exceptions to their code's rule.
_RETRYABLE_REASONS = frozenset({"OVERLOADED"})
_MAY_HAVE_ACTED_CODES = frozenset({
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
})
_NOTHING_SENT_REASONS = frozenset({"DEADLINE_TOO_SHORT"})
_OUTCOME_UNKNOWN_REASONS = frozenset({"REQUEST_OUTCOME_UNKNOWN"})
# The README's gateway errors (its "Gateway errors" table) after which the controller may have
# acted but a repeat with the same key cannot settle what it did, by reason and code: the rows
# whose advice says "not even with the same request_id". UPSTREAM_HTTP_ERROR is one only as
# INTERNAL, not as UNKNOWN. tests/integration/contract.rs checks this copy against the gateway's
# table.
_UNSETTLED_ROWS = frozenset({
    ("SHUTDOWN_GRACE_RAN_OUT", grpc.StatusCode.UNKNOWN),
    ("REQUEST_OUTCOME_UNKNOWN", grpc.StatusCode.FAILED_PRECONDITION),
    ("UPSTREAM_HTTP_ERROR", grpc.StatusCode.INTERNAL),
})
# The ErrorInfo metadata that marks a failed port read after an unknown outcome (README, "Gateway
# errors"): whatever its code, the earlier call may have acted.
_REQUEST_OUTCOME_KEY = "requestOutcome"
_OUTCOME_UNKNOWN = "unknown"
# The metadata that repeats the message's request_id, for a proxy to hash on (README,
# "Idempotency", "What the table does not cover"); the gateway reads only the field.
_IDEMPOTENCY_KEY_HEADER = "idempotency-key"


@dataclass(frozen=True)
class CallResult:
    """A CaseExtract or CaseCancel call that succeeded."""

    request_id: str
    """The last attempt's ``x-request-id``, as the gateway logs it (a correlation ID)."""
    idempotency_key: str
    """The message's ``request_id``, the same on every attempt of the call."""
    replayed: Optional[str]
    """``stored`` or ``resolved`` when the gateway answered a repeat of ``idempotency_key``
    without calling the controller's method (the ``taskgate-replayed`` header), else None."""
    attempts: int
    """How many times the call was sent: more than 1 after retryable errors."""


@dataclass
class TaskGateError(Exception):
    """A call that did not succeed, with everything the status details say."""

    code: grpc.StatusCode
    """The gRPC status code."""
    message: str
    """The status message (names method, port, bin, code and meaning)."""
    reason: str
    """ErrorInfo reason: the fault name (PREVIOUS_ACTION_NOT_COMPLETED) or a gateway reason."""
    domain: str
    """ErrorInfo domain: ``autostore.task`` for controller faults, ``taskgate`` for the gateway."""
    metadata: dict
    """ErrorInfo metadata (faultCode, method, portId, binId, httpStatus, ...)."""
    fault_code: int = FaultCode.FAULT_CODE_UNSPECIFIED
    """The TaskFault code as the FaultCode enum value (UNSPECIFIED when unknown or no fault)."""
    raw_code: Optional[int] = None
    """The controller's fault number, when the controller answered a fault."""
    retry_delay: Optional[timedelta] = None
    """From RetryInfo, when a retry is safe."""
    field_violations: tuple = ()
    """From BadRequest: (field, description) pairs."""
    idempotency_key: Optional[str] = None
    """The call's idempotency key (CaseExtract and CaseCancel): when ``repeat_settles``, pass it
    back as ``idempotency_key`` to repeat the call, within the gateway's idempotency window."""
    attempts: int = 1
    """How many times the call was sent before it failed."""
    earlier_attempt_may_have_acted: bool = False
    """Whether an earlier attempt of the same call, retried by the client, may have acted; for
    a call given its ``idempotency_key``, always: the call it repeats may have."""
    request_id: Optional[str] = None
    """The ``x-request-id`` of the attempt that failed (the last one), as the gateway's access
    line and every log line of the call show it; None when no answer came from the gateway
    (it could not be reached, or the connection broke before its headers)."""

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} (request id: {self.request_id})" if self.request_id else text

    @property
    def fault_name(self) -> Optional[str]:
        """The FaultCode name without its prefix, when the fault is a known one."""
        if self.fault_code == FaultCode.FAULT_CODE_UNSPECIFIED:
            return None
        return FaultCode.Name(self.fault_code).removeprefix("FAULT_CODE_")

    @property
    def retryable(self) -> bool:
        """Whether the error is retried as it is: ``UNAVAILABLE`` (after ``retry_delay``) and
        ``OVERLOADED`` (with backoff). From the gateway, these say the controller started
        nothing; a bare ``UNAVAILABLE`` without ErrorInfo (the connection to the gateway broke)
        may have reached it, and is retried with the same key, which only the same gateway
        process deduplicates. The client retries these itself. Not retryable: an error of a
        CaseExtract or CaseCancel call that may already have acted (an earlier attempt, or the
        call it repeats), unless marked ``requestOutcome: unknown``. A gateway that forgot the
        key (restarted, another replica) sent that attempt as a new call: its 1148 most likely
        means the first operation is running, and retrying until it ends would start a second."""
        if (self.idempotency_key is not None and self.earlier_attempt_may_have_acted
                and self.metadata.get(_REQUEST_OUTCOME_KEY) != _OUTCOME_UNKNOWN):
            return False
        return self.code == grpc.StatusCode.UNAVAILABLE or self.reason in _RETRYABLE_REASONS

    @property
    def may_have_acted(self) -> bool:
        """Whether the controller may have acted on the call (the README's "Controller may have
        acted?" column): ``UNKNOWN``, ``DEADLINE_EXCEEDED`` (but ``DEADLINE_TOO_SHORT``),
        ``INTERNAL``, ``REQUEST_OUTCOME_UNKNOWN``, a call cancelled or cut off before an answer
        (an ``UNAVAILABLE`` without the gateway's ``ErrorInfo``), a failed port read after an
        earlier unknown outcome (metadata ``requestOutcome: unknown``), and any error of a call
        one of whose earlier attempts may have acted. Then, if ``repeat_settles``, repeat the
        call with ``idempotency_key``; else read the port with ``case_get_state`` before acting
        again."""
        return self.earlier_attempt_may_have_acted or self._answer_may_have_acted()

    def _answer_may_have_acted(self) -> bool:
        """``may_have_acted`` by this answer alone, without the call's earlier attempts."""
        if self.reason in _OUTCOME_UNKNOWN_REASONS:
            return True
        if self.metadata.get(_REQUEST_OUTCOME_KEY) == _OUTCOME_UNKNOWN:
            return True
        if self.code == grpc.StatusCode.UNAVAILABLE:
            return not self.reason
        return self.code in _MAY_HAVE_ACTED_CODES and self.reason not in _NOTHING_SENT_REASONS

    @property
    def repeat_settles(self) -> bool:
        """Whether this answer says the controller may have acted and a repeat of the call with
        ``idempotency_key`` can settle what it did: the gateway process that holds the key
        answers such a repeat from the first call or from the port, and sends it again only if
        the port shows it was not acted on (README, "Idempotency: ``request_id``"). Judged by
        this answer alone (``may_have_acted`` without the call's earlier attempts): an answer
        marked ``requestOutcome: unknown``, or one the README's column says may have acted. An
        unmarked definite answer to a repeat (fault 1148, a kept fault such as 1149,
        ``REQUEST_ID_REUSED``) means the gateway did not hold the key's unknown outcome: it took
        the key as new (forgotten after its window, evicted, restarted, another replica) or has
        a definite answer stored, so a further repeat settles nothing; after 1148 (the first
        call's operation most likely running), repeating until it ends would start a second. False too
        after the README's gateway errors whose repeat cannot settle it, marked
        ``requestOutcome: unknown`` or not: ``SHUTDOWN_GRACE_RAN_OUT`` (the process that held
        the key has exited, and the one a repeat reaches never saw it, so sends it as a new
        call, which may move a robot twice), ``REQUEST_OUTCOME_UNKNOWN`` (a repeat has already
        read the port and could not tell) and ``UPSTREAM_HTTP_ERROR`` as ``INTERNAL`` (a status
        the task interface never answers, most often a wrong controller URL, which a repeat
        would read the port through too; fixing it restarts the gateway, which forgets the
        key). Whenever ``may_have_acted`` but not this, read the port with ``case_get_state``
        before acting again."""
        return self._answer_may_have_acted() and (self.reason, self.code) not in _UNSETTLED_ROWS

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "TaskGateError":
        """Reads the rich details of a failed call."""
        error_info = error_details_pb2.ErrorInfo()
        task_fault = None
        retry_delay = None
        violations = ()
        status = rpc_status.from_call(error)
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(error_info)
            elif detail.type_url.endswith("/" + _TASK_FAULT_TYPE):
                task_fault = task_pb2.TaskFault()
                detail.Unpack(task_fault)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry_info = error_details_pb2.RetryInfo()
                detail.Unpack(retry_info)
                retry_delay = retry_info.retry_delay.ToTimedelta()
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations = tuple(
                    (violation.field, violation.description)
                    for violation in bad_request.field_violations
                )
        return cls(
            code=error.code(),
            message=error.details() or "",
            request_id=_request_id_of(error),
            reason=error_info.reason,
            domain=error_info.domain,
            metadata=dict(error_info.metadata),
            fault_code=task_fault.code if task_fault else FaultCode.FAULT_CODE_UNSPECIFIED,
            raw_code=task_fault.raw_code if task_fault else None,
            retry_delay=retry_delay,
            field_violations=violations,
        )


def _request_id_of(error: grpc.RpcError) -> Optional[str]:
    """The ``x-request-id`` the gateway answered a failed call with: among the trailing metadata
    when the failure was its only answer (trailers-only, as a refused call is), else among the
    headers (a watch that had started)."""
    for metadata in (error.trailing_metadata(), error.initial_metadata()):
        for key, value in metadata or ():
            if key == "x-request-id":
                return value
    return None


class TaskGate:
    """A connection to a taskgate gateway."""

    def __init__(self, target: str, token: Optional[str] = None,
                 credentials: Optional[grpc.ChannelCredentials] = None):
        """``target`` is host:port; ``token`` a bearer token when the gateway requires one."""
        self._channel = (
            grpc.secure_channel(target, credentials)
            if credentials is not None
            else grpc.insecure_channel(target)
        )
        self._stub = task_pb2_grpc.TaskServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def case_extract(self, port_id: int, bin_id: int, timeout: float = 10.0,
                     request_id: Optional[str] = None, idempotency_key: Optional[str] = None,
                     max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> CallResult:
        """Extracts a case from ``bin_id`` at ``port_id``.

        ``timeout`` (seconds) bounds the whole call, retries included; ``request_id`` is the
        ``x-request-id`` (a correlation ID for the logs); ``idempotency_key`` the message's
        ``request_id`` (a fresh UUID v4 when None): give the one a ``TaskGateError`` carries to
        repeat a call whose error says ``repeat_settles``. Such a repeat may meet its own first
        call's operation, so it is retried only on an answer marked ``requestOutcome:
        unknown``; a key is for repeats, not for new calls. Raises ``TaskGateError`` with the
        typed fault when the call fails.
        """
        request = task_pb2.CaseExtractRequest(
            port_id=port_id, bin_id=bin_id, request_id=idempotency_key or str(uuid.uuid4()))
        return self._call(self._stub.CaseExtract, request, timeout, request_id, max_attempts,
                          repeat=bool(idempotency_key))[1]

    def case_cancel(self, port_id: int, bin_id: int, timeout: float = 10.0,
                    request_id: Optional[str] = None, idempotency_key: Optional[str] = None,
                    max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> CallResult:
        """Cancels the case operation running on ``bin_id`` at ``port_id``, with the arguments
        and retries of ``case_extract``.

        Raises ``TaskGateError`` with the typed fault when the call fails (1149 when nothing
        runs on that bin at the port).
        """
        request = task_pb2.CaseCancelRequest(
            port_id=port_id, bin_id=bin_id, request_id=idempotency_key or str(uuid.uuid4()))
        return self._call(self._stub.CaseCancel, request, timeout, request_id, max_attempts,
                          repeat=bool(idempotency_key))[1]

    def case_get_state(self, port_id: int, timeout: float = 10.0,
                       request_id: Optional[str] = None,
                       max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> "CaseGetStateResponse":
        """Reads the port's AutoCase state: ``state`` (a ``CaseState``), ``raw_state`` (the
        vendor code, e.g. ``ERSO``) and ``bin_id`` (check ``HasField("bin_id")``: a port that has
        run no case operation names none).

        It only reads, so it is retried like the other calls, without an idempotency key. Raises ``TaskGateError`` with the typed fault when the call fails.
        """
        request = task_pb2.CaseGetStateRequest(port_id=port_id)
        return self._call(self._stub.CaseGetState, request, timeout, request_id, max_attempts)[0]

    def watch_case_events(self, port_ids: Iterable[int] = (), timeout: Optional[float] = None,
                          request_id: Optional[str] = None) -> "CaseEventWatch":
        """Watches the AutoCase events of ``port_ids`` (every port when empty) from now on.

        Returns once the gateway has started the watch, so an operation started after this
        returns is seen from its first event. Raises ``TaskGateError`` at once when the gateway
        refuses the watch (``LOG_PUBLISHER_UNAVAILABLE``, ``LOG_PUBLISHER_DISABLED``,
        ``TOO_MANY_WATCHES``, ``INVALID_PARAMETER``, ...). Iterating the returned
        ``CaseEventWatch`` yields ``CaseEvent`` messages; a stream that the gateway ends raises
        ``TaskGateError`` with its reason (``WATCH_LAGGED``, ``LOG_PUBLISHER_UNAVAILABLE``,
        ``DEADLINE_REACHED``, ...). ``timeout`` (seconds) bounds the whole stream; ``None``
        watches until cancelled. Read the state with ``case_get_state`` first, and again after
        the stream ends with an error: events may have been missed.
        """
        request = task_pb2.WatchCaseEventsRequest(port_ids=list(port_ids))
        call = self._stub.WatchCaseEvents(request, timeout=timeout,
                                          metadata=self._call_metadata(request_id))
        # The gateway answers headers once it has subscribed the stream; a refusal is a
        # trailers-only response, which leaves the initial metadata empty.
        headers = call.initial_metadata()
        if not headers:
            raise TaskGateError.from_rpc_error(call)
        return CaseEventWatch(call, dict(headers).get("x-request-id", ""))

    def _call_metadata(self, request_id: Optional[str]) -> tuple:
        return self._metadata + ((("x-request-id", request_id),) if request_id else ())

    def _call(self, method, request, timeout: float, request_id: Optional[str],
              max_attempts: int, repeat: bool = False):
        """Calls ``method`` with the token and request id, again after each retryable error while
        attempts and ``timeout`` allow; returns the response and a ``CallResult``, or raises
        ``TaskGateError``. ``repeat``: the call repeats one that may have acted (the caller gave
        its key)."""
        idempotency_key = getattr(request, "request_id", "") or None
        metadata = self._call_metadata(request_id)
        if idempotency_key:
            metadata += ((_IDEMPOTENCY_KEY_HEADER, idempotency_key),)
        deadline = time.monotonic() + timeout
        backoff = _INITIAL_BACKOFF_S
        attempt = 0
        may_have_acted = repeat
        while True:
            attempt += 1
            try:
                response, call = method.with_call(
                    request, timeout=max(deadline - time.monotonic(), 0.0), metadata=metadata)
            except grpc.RpcError as rpc_error:
                error = TaskGateError.from_rpc_error(rpc_error)
                error.idempotency_key = idempotency_key
                error.attempts = attempt
                error.earlier_attempt_may_have_acted = may_have_acted
                may_have_acted = error.may_have_acted
                delay = (error.retry_delay.total_seconds() if error.retry_delay is not None
                         else backoff)
                if (not error.retryable or attempt >= max_attempts
                        or time.monotonic() + delay >= deadline):
                    raise error from None
                time.sleep(delay)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            headers = dict(call.initial_metadata())
            return response, CallResult(
                request_id=headers.get("x-request-id", ""),
                idempotency_key=idempotency_key or "",
                replayed=headers.get("taskgate-replayed"),
                attempts=attempt,
            )

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> "TaskGate":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CaseEventWatch:
    """An open ``WatchCaseEvents`` stream: an iterator over ``CaseEvent`` messages.

    The stream ends only with an error, raised as ``TaskGateError`` from the iteration, or when
    it is cancelled (``cancel()``, or leaving its ``with`` block), which ends the iteration.
    """

    def __init__(self, call, request_id: str):
        self._call = call
        self._cancelled = False
        self.request_id = request_id
        """The call's request id, as the gateway logs it."""

    def __iter__(self) -> Iterator["CaseEvent"]:
        return self

    def __next__(self) -> "CaseEvent":
        try:
            return next(self._call)
        except grpc.RpcError as error:
            if self._cancelled and error.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise TaskGateError.from_rpc_error(error) from None

    def cancel(self) -> None:
        """Ends the stream; the iteration then stops."""
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> "CaseEventWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
