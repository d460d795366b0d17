"""Safe retries (README, "Retry contract" and "Idempotency"): every CaseExtract and CaseCancel
call sends a fresh idempotency key and keeps it across its retries; only UNAVAILABLE (and
OVERLOADED) is retried;
an error says whether the controller may have acted."""

import re
import socket
import uuid
from concurrent import futures

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from taskgate_client import TaskGate, TaskGateError, task_pb2, task_pb2_grpc


def attempts_logged(gateway, key, count):
    """The access lines of ``count`` calls the gateway received with idempotency key ``key``
    (each is written once its call has ended, maybe after the client saw the end)."""
    return gateway.lines_logged(
        lambda line: "taskgate::access" in line and re.search(rf"idempotency_key={key}\b", line),
        count)


def test_each_call_sends_a_fresh_uuid4_key_and_a_repeat_with_it_is_replayed(idempotency_gateway):
    with TaskGate(idempotency_gateway) as client:
        first = client.case_extract(port_id=4, bin_id=101337, timeout=10)
        assert uuid.UUID(first.idempotency_key).version == 4
        assert first.replayed is None
        repeat = client.case_extract(port_id=4, bin_id=101337, timeout=10,
                                     idempotency_key=first.idempotency_key)
        assert (repeat.idempotency_key, repeat.replayed, repeat.attempts) == (
            first.idempotency_key, "stored", 1)
        # A new logical call gets a new key: it is not answered from the first one's.
        second = client.case_extract(port_id=4, bin_id=101337, timeout=10)
        assert second.idempotency_key != first.idempotency_key
        assert second.replayed is None


@pytest.mark.script("503")
def test_unavailable_is_retried_with_the_same_key_up_to_max_attempts(fake_controller):
    controller, gateway = fake_controller
    with TaskGate(gateway) as client:
        with pytest.raises(TaskGateError) as raised:
            client.case_extract(port_id=4, bin_id=101337, timeout=30, max_attempts=3)
    error = raised.value
    assert (error.code, error.reason, error.metadata["httpStatus"]) == (
        grpc.StatusCode.UNAVAILABLE, "UPSTREAM_HTTP_ERROR", "503")
    assert (error.retryable, error.may_have_acted, error.attempts) == (True, False, 3)
    assert controller.posts == 3
    assert len(attempts_logged(gateway, error.idempotency_key, 3)) == 3


@pytest.mark.script("503")
def test_a_retried_call_s_error_carries_the_request_id_of_its_last_attempt(fake_controller):
    _, gateway = fake_controller
    with TaskGate(gateway) as client:
        with pytest.raises(TaskGateError) as raised:
            client.case_extract(port_id=4, bin_id=101337, timeout=30, max_attempts=3)
    error = raised.value
    # An error's access line is written before its answer is sent, so the lines come in the
    # order of the attempts; the gateway gave each attempt an id of its own.
    logged = [re.search(r" request_id=(\S+)", line).group(1)
              for line in attempts_logged(gateway, error.idempotency_key, 3)]
    assert len(set(logged)) == 3
    assert error.request_id == logged[-1]


def unused_address():
    """A loopback address where nothing listens: bound, read, then released."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return "127.0.0.1:%d" % listener.getsockname()[1]


def test_a_call_that_never_reached_the_gateway_has_no_request_id():
    # Nothing listens there: the connection is refused, and no gateway named the call.
    with TaskGate(unused_address()) as client:
        with pytest.raises(TaskGateError) as raised:
            client.case_get_state(port_id=4, timeout=5, max_attempts=1)
    assert (raised.value.code, raised.value.request_id) == (grpc.StatusCode.UNAVAILABLE, None)
    assert "request id" not in str(raised.value)


@pytest.mark.script("503", "drop")
def test_an_unknown_outcome_is_not_retried_and_carries_the_key_to_repeat_with(fake_controller):
    controller, gateway = fake_controller
    with TaskGate(gateway) as client:
        with pytest.raises(TaskGateError) as raised:
            client.case_extract(port_id=4, bin_id=101337, timeout=30)
    error = raised.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNKNOWN, "UPSTREAM_CONNECTION_LOST")
    assert (error.retryable, error.may_have_acted, error.attempts) == (False, True, 2)
    assert controller.posts == 2
    assert uuid.UUID(error.idempotency_key).version == 4
    assert len(attempts_logged(gateway, error.idempotency_key, 2)) == 2


def error(code, reason=""):
    return TaskGateError(code=code, message="", reason=reason, domain="taskgate", metadata={})


@pytest.mark.parametrize(
    "code, reason, retryable, may_have_acted",
    [
        (grpc.StatusCode.UNAVAILABLE, "PREVIOUS_ACTION_NOT_COMPLETED", True, False),
        (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNREACHABLE", True, False),
        (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_HTTP_ERROR", True, False),
        # The connection to the gateway broke: the call may have reached it.
        (grpc.StatusCode.UNAVAILABLE, "", True, True),
        (grpc.StatusCode.UNKNOWN, "UPSTREAM_CONNECTION_LOST", False, True),
        (grpc.StatusCode.UNKNOWN, "UPSTREAM_HTTP_ERROR", False, True),
        (grpc.StatusCode.UNKNOWN, "UNKNOWN_FAULT", False, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT", False, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "REQUEST_IN_PROGRESS", False, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", False, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_TOO_SHORT", False, False),
        (grpc.StatusCode.INTERNAL, "UPSTREAM_BAD_RESPONSE", False, True),
        (grpc.StatusCode.INTERNAL, "CONTROLLER_INTERNAL_ERROR", False, True),
        (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_OUTCOME_UNKNOWN", False, True),
        (grpc.StatusCode.FAILED_PRECONDITION, "BIN_NOT_SELECTED_FOR_PORT", False, False),
        (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED", False, False),
        (grpc.StatusCode.NOT_FOUND, "PORT_IS_NOT_AVAILABLE", False, False),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", False, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", True, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCH_LAGGED", False, False),
        (grpc.StatusCode.CANCELLED, "", False, True),
    ],
)
def test_each_error_says_whether_to_retry_and_whether_the_controller_may_have_acted(
        code, reason, retryable, may_have_acted):
    assert (error(code, reason).retryable, error(code, reason).may_have_acted) == (
        retryable, may_have_acted)


@pytest.mark.parametrize(
    "code, reason, metadata, repeat, repeat_settles",
    [
        # The process that held the key has exited: a repeat would be a new call.
        (grpc.StatusCode.UNKNOWN, "SHUTDOWN_GRACE_RAN_OUT", {}, False, False),
        (grpc.StatusCode.UNKNOWN, "SHUTDOWN_GRACE_RAN_OUT", {"requestOutcome": "unknown"}, False, False),
        (grpc.StatusCode.UNKNOWN, "SHUTDOWN_GRACE_RAN_OUT", {"requestOutcome": "unknown"}, True, False),
        # A repeat already read the port and could not tell.
        (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_OUTCOME_UNKNOWN", {}, False, False),
        # A status the task interface never answers: a repeat reads the port through the same URL.
        (grpc.StatusCode.INTERNAL, "UPSTREAM_HTTP_ERROR", {}, False, False),
        (grpc.StatusCode.UNKNOWN, "UPSTREAM_HTTP_ERROR", {}, False, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT", {}, False, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT", {}, True, True),
        (grpc.StatusCode.UNKNOWN, "UPSTREAM_CONNECTION_LOST", {}, False, True),
        # The connection to the gateway broke: the gateway that got the call holds its key.
        (grpc.StatusCode.UNAVAILABLE, "", {}, False, True),
        # Refused: the controller did not act, so there is nothing to settle.
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", {}, False, False),
        (grpc.StatusCode.NOT_FOUND, "PORT_IS_NOT_AVAILABLE", {}, False, False),
        # A repeat's failed port read: the gateway holds the key's unknown outcome.
        (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNREACHABLE", {"requestOutcome": "unknown"}, True, True),
        # An unmarked definite answer to a repeat: the gateway took the key as new (forgotten,
        # evicted, restarted, another replica) or has an answer stored, so a further repeat
        # settles nothing; after 1148 it would start a second extraction.
        (grpc.StatusCode.UNAVAILABLE, "PREVIOUS_ACTION_NOT_COMPLETED", {}, True, False),
        (grpc.StatusCode.FAILED_PRECONDITION, "BIN_NOT_SELECTED_FOR_PORT", {}, True, False),
        (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED", {}, True, False),
    ],
)
def test_a_repeat_with_the_key_is_offered_only_where_the_gateway_can_settle_it(
        code, reason, metadata, repeat, repeat_settles):
    # A repeat is a call given its key, which counts as one after an attempt that may have acted.
    failure = TaskGateError(code=code, message="", reason=reason, domain="taskgate",
                            metadata=metadata, idempotency_key="key" if repeat else None,
                            earlier_attempt_may_have_acted=repeat)
    assert failure.repeat_settles is repeat_settles


def test_a_failed_port_read_after_an_unknown_outcome_may_have_acted():
    marked = TaskGateError(code=grpc.StatusCode.UNAVAILABLE, message="", reason="UPSTREAM_UNREACHABLE",
                           domain="taskgate", metadata={"requestOutcome": "unknown"})
    assert (marked.retryable, marked.may_have_acted) == (True, True)


class _FailedAttempt(grpc.RpcError):
    """What grpcio raises for a failed call: a code, a message and the status details."""

    def __init__(self, code, reason, metadata=None):
        super().__init__()
        self._code = code
        status = status_pb2.Status(code=code.value[0], message="failed")
        if reason:
            info = error_details_pb2.ErrorInfo(reason=reason, domain="taskgate",
                                               metadata=metadata or {})
            status.details.add().Pack(info)
        self._trailing = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self):
        return self._code

    def details(self):
        return "failed"

    def trailing_metadata(self):
        return self._trailing

    def initial_metadata(self):
        return ()


class _Attempts:
    """A stub method that fails each attempt with the next of ``failures``."""

    def __init__(self, *failures):
        self.failures = list(failures)

    def with_call(self, request, timeout, metadata):
        raise self.failures.pop(0)


def test_may_have_acted_is_kept_across_the_clients_own_retries():
    # The first attempt was cut off (it may have reached the controller); the retry was answered
    # "unreachable": the call may still have acted.
    method = _Attempts(_FailedAttempt(grpc.StatusCode.UNAVAILABLE, ""),
                       _FailedAttempt(grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNREACHABLE"))
    request = task_pb2.CaseExtractRequest(port_id=4, bin_id=101337, request_id=str(uuid.uuid4()))
    with TaskGate("127.0.0.1:1") as client:
        with pytest.raises(TaskGateError) as raised:
            client._call(method, request, timeout=30, request_id=None, max_attempts=2)
    error = raised.value
    assert (error.reason, error.attempts, error.may_have_acted) == ("UPSTREAM_UNREACHABLE", 2, True)
    alone = _FailedAttempt(grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNREACHABLE")
    assert TaskGateError.from_rpc_error(alone).may_have_acted is False


def test_after_an_attempt_that_may_have_acted_only_a_port_read_is_retried():
    # The first attempt was cut off after it may have reached the controller. A gateway that
    # forgot the key (restarted, another replica) sends the retry as a new call, and its 1148
    # then most likely means the first attempt's extraction is running: retrying until it
    # ends would start a second one.
    cut_off = _FailedAttempt(grpc.StatusCode.UNAVAILABLE, "")
    busy = _FailedAttempt(grpc.StatusCode.UNAVAILABLE, "PREVIOUS_ACTION_NOT_COMPLETED")
    request = task_pb2.CaseExtractRequest(port_id=4, bin_id=101337, request_id=str(uuid.uuid4()))
    method = _Attempts(cut_off, busy, _FailedAttempt(grpc.StatusCode.UNAVAILABLE, ""))
    with TaskGate("127.0.0.1:1") as client:
        with pytest.raises(TaskGateError) as raised:
            client._call(method, request, timeout=30, request_id=None, max_attempts=3)
    error = raised.value
    assert (error.reason, error.attempts, error.may_have_acted, error.retryable) == (
        "PREVIOUS_ACTION_NOT_COMPLETED", 2, True, False)
    # A gateway that remembers the key as unknown reads the port before sending again, and
    # says so: that answer is retried. So is any answer to a read, which never acts.
    marked = _FailedAttempt(grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNREACHABLE",
                            {"requestOutcome": "unknown"})
    method = _Attempts(cut_off, marked, _FailedAttempt(grpc.StatusCode.UNKNOWN, "LAST"))
    with TaskGate("127.0.0.1:1") as client:
        with pytest.raises(TaskGateError) as raised:
            client._call(method, request, timeout=30, request_id=None, max_attempts=3)
    assert (raised.value.reason, raised.value.attempts) == ("LAST", 3)
    method = _Attempts(cut_off, busy, _FailedAttempt(grpc.StatusCode.UNKNOWN, "LAST"))
    with TaskGate("127.0.0.1:1") as client:
        with pytest.raises(TaskGateError) as raised:
            client._call(method, task_pb2.CaseGetStateRequest(port_id=4), timeout=30,
                         request_id=None, max_attempts=3)
    assert (raised.value.reason, raised.value.attempts) == ("LAST", 3)


class _BusyTaskService(task_pb2_grpc.TaskServiceServicer):
    """A stand-in gateway that answers every CaseExtract and CaseCancel with fault 1148, without
    the ``requestOutcome`` marker: as a gateway answers a key it does not hold while an
    operation runs on the port."""

    def __init__(self):
        self.keys = []

    def _busy(self, request, context):
        self.keys.append(request.request_id)
        status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0],
                                   message="controller fault 1148 PREVIOUS_ACTION_NOT_COMPLETED")
        status.details.add().Pack(error_details_pb2.ErrorInfo(
            reason="PREVIOUS_ACTION_NOT_COMPLETED", domain="autostore.task",
            metadata={"faultCode": "1148"}))
        status.details.add().Pack(error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(nanos=1_000_000)))
        context.abort_with_status(rpc_status.to_status(status))

    CaseExtract = _busy
    CaseCancel = _busy


@pytest.mark.parametrize("method", ["case_extract", "case_cancel"])
def test_a_repeat_with_the_callers_key_does_not_retry_into_a_second_operation(method):
    # The caller repeats, with its key, a call that may have acted. A gateway that forgot the
    # key (restarted, another replica) sends the repeat as a new call, and its 1148 most likely
    # means the first call's operation is running: retrying until it ends would start a second.
    service = _BusyTaskService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    task_pb2_grpc.add_TaskServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    key = str(uuid.uuid4())
    try:
        with TaskGate(f"127.0.0.1:{port}") as client:
            call = getattr(client, method)
            with pytest.raises(TaskGateError) as raised:
                call(port_id=4, bin_id=101337, timeout=30, idempotency_key=key, max_attempts=3)
            repeat = raised.value
            # A new call (a fresh key) meets another operation's 1148: it is retried.
            with pytest.raises(TaskGateError) as raised:
                call(port_id=4, bin_id=101337, timeout=30, max_attempts=3)
            new = raised.value
    finally:
        server.stop(grace=None)
    assert (repeat.reason, repeat.idempotency_key, repeat.attempts) == (
        "PREVIOUS_ACTION_NOT_COMPLETED", key, 1)
    assert (repeat.may_have_acted, repeat.retryable) == (True, False)
    assert (new.attempts, new.may_have_acted, new.retryable) == (3, False, True)
    assert service.keys == [key] + [new.idempotency_key] * 3


class _RecordingTaskService(task_pb2_grpc.TaskServiceServicer):
    """A stand-in TaskService that records the key each call carried in its message and in its
    metadata: the gateway reads only the field, so only a server that looks can tell."""

    def __init__(self):
        self.seen = []

    def _record(self, request, context, response):
        metadata = dict(context.invocation_metadata())
        self.seen.append((request.request_id, metadata.get("idempotency-key")))
        return response

    def CaseExtract(self, request, context):
        return self._record(request, context, task_pb2.CaseExtractResponse())

    def CaseCancel(self, request, context):
        return self._record(request, context, task_pb2.CaseCancelResponse())


def test_case_extract_and_case_cancel_send_the_key_also_as_metadata_for_a_proxy_to_hash_on():
    service = _RecordingTaskService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    task_pb2_grpc.add_TaskServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with TaskGate(f"127.0.0.1:{port}") as client:
            extracted = client.case_extract(port_id=4, bin_id=101337, timeout=10)
            cancelled = client.case_cancel(port_id=4, bin_id=101337, timeout=10,
                                           idempotency_key=extracted.idempotency_key)
    finally:
        server.stop(grace=None)
    assert service.seen == [
        (extracted.idempotency_key, extracted.idempotency_key),
        (cancelled.idempotency_key, cancelled.idempotency_key),
    ]
