"""WatchCaseEvents from the Python client against the real gateway and its simulator's Log
Publisher: an extraction, a cancel, and the statuses that end or refuse a stream."""

import time
from datetime import datetime, timezone

import grpc
import pytest

from taskgate_client import CaseEventWatch, CaseState, TaskGate, TaskGateError

# The longest a test waits for the gateway's Log Publisher feed to connect after start, and the
# deadline of every stream a test reads: an event that never comes ends the stream (and fails
# the test) within it.
FEED_LIMIT_S = 10
STREAM_LIMIT_S = 10


@pytest.fixture
def fast_client(fast_gateway):
    with TaskGate(fast_gateway) as task_gate:
        yield task_gate


@pytest.fixture
def slow_client(slow_gateway):
    with TaskGate(slow_gateway) as task_gate:
        yield task_gate


def open_watch(client: TaskGate, port_ids, timeout: float = STREAM_LIMIT_S,
               request_id=None) -> CaseEventWatch:
    """Opens a watch once the gateway's Log Publisher feed is connected: just after the gateway
    starts, a watch is refused with UNAVAILABLE (LOG_PUBLISHER_UNAVAILABLE) until then, which is
    retried for at most FEED_LIMIT_S."""
    give_up = time.monotonic() + FEED_LIMIT_S
    while True:
        try:
            return client.watch_case_events(port_ids=port_ids, timeout=timeout,
                                            request_id=request_id)
        except TaskGateError as error:
            if error.reason != "LOG_PUBLISHER_UNAVAILABLE" or time.monotonic() > give_up:
                raise


def test_an_extraction_is_watched_from_request_to_completion(fast_client):
    # The recommended order: read the state, then watch.
    assert fast_client.case_get_state(port_id=4).state in (
        CaseState.CASE_STATE_NO_OPERATION,
        CaseState.CASE_STATE_EXTRACTION_COMPLETED,
    )
    before = datetime.now(timezone.utc)
    with open_watch(fast_client, [4]) as events:
        assert events.request_id
        fast_client.case_extract(port_id=4, bin_id=101337)
        seen = [next(events) for _ in range(3)]
    assert [
        (event.port_id, event.bin_id, event.WhichOneof("change"), event.state, event.raw_state, event.segment)
        for event in seen
    ] == [
        (4, 101337, "state", CaseState.CASE_STATE_EXTRACTION_REQUESTED, "EREQ", "AC,4,101337,EREQ"),
        (4, 101337, "state", CaseState.CASE_STATE_EXTRACTION_READY_TO_SEND, "ERSO", "AC,4,101337,ERSO"),
        (4, 101337, "state", CaseState.CASE_STATE_EXTRACTION_COMPLETED, "ECMP", "AC,4,101337,ECMP"),
    ]
    assert all(event.HasField("bin_id") for event in seen)
    received = [event.received_at.ToDatetime(tzinfo=timezone.utc) for event in seen]
    assert before <= received[0] <= received[1] <= received[2], received
    state = fast_client.case_get_state(port_id=4)
    assert (state.state, state.raw_state) == (CaseState.CASE_STATE_EXTRACTION_COMPLETED, "ECMP")


def test_a_cancel_is_watched_as_cr_then_noop(slow_client):
    with open_watch(slow_client, []) as events:
        slow_client.case_extract(port_id=4, bin_id=101337)
        requested = next(events)
        assert (requested.port_id, requested.raw_state) == (4, "EREQ")
        slow_client.case_cancel(port_id=4, bin_id=101337)
        cancel = next(events)
        noop = next(events)
    # CR is a signal, not a state: the oneof holds cancel_request, and no state.
    assert cancel.WhichOneof("change") == "cancel_request"
    assert cancel.cancel_request is True
    assert (cancel.port_id, cancel.bin_id, cancel.raw_state, cancel.segment) == (4, 101337, "CR", "AC,4,101337,CR")
    assert noop.WhichOneof("change") == "state"
    assert (noop.state, noop.bin_id, noop.segment) == (CaseState.CASE_STATE_NO_OPERATION, 101337, "AC,4,101337,NOOP")
    state = slow_client.case_get_state(port_id=4)
    assert (state.state, state.bin_id, state.raw_state) == (CaseState.CASE_STATE_NO_OPERATION, 101337, "NOOP")


def test_a_deadline_ends_the_stream_with_deadline_reached(fast_client):
    events = open_watch(fast_client, [4], timeout=1.0)
    started = time.monotonic()
    with pytest.raises(TaskGateError) as raised:
        for _ in events:
            pass
    error = raised.value
    # The gateway's own status, with its details, not the client's bare timeout.
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert (error.reason, error.domain, error.metadata) == (
        "DEADLINE_REACHED",
        "taskgate",
        {"method": "WatchCaseEvents"},
    )
    assert "deadline" in error.message
    assert time.monotonic() - started < STREAM_LIMIT_S


def test_a_watch_s_error_carries_its_request_id(fast_client):
    # Refused: the gateway's one answer is trailers-only.
    with pytest.raises(TaskGateError) as raised:
        fast_client.watch_case_events(port_ids=[0], timeout=STREAM_LIMIT_S,
                                      request_id="py-watch-refused")
    assert raised.value.request_id == "py-watch-refused"
    # Ended after it started: the id came with the headers, the status with the trailers.
    with open_watch(fast_client, [4], timeout=1.0, request_id="py-watch-ended") as events:
        with pytest.raises(TaskGateError) as raised:
            for _ in events:
                pass
    assert (raised.value.reason, raised.value.request_id) == ("DEADLINE_REACHED", "py-watch-ended")


def test_cancelling_a_watch_ends_its_iteration(fast_client):
    events = open_watch(fast_client, [4])
    events.cancel()
    assert list(events) == []


def test_a_gateway_without_log_publisher_refuses_watches(gateway_without_log_publisher):
    with TaskGate(gateway_without_log_publisher) as client:
        with pytest.raises(TaskGateError) as raised:
            client.watch_case_events(port_ids=[4], timeout=STREAM_LIMIT_S)
        # Task calls do not need the Log Publisher: read states instead.
        assert client.case_get_state(port_id=4).port_id == 4
    error = raised.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (error.reason, error.domain, error.metadata) == (
        "LOG_PUBLISHER_DISABLED",
        "taskgate",
        {"method": "WatchCaseEvents"},
    )
    assert "--log-publisher off" in error.message
    assert error.retry_delay is None


def test_ports_out_of_range_are_refused(fast_client):
    with pytest.raises(TaskGateError) as raised:
        fast_client.watch_case_events(port_ids=[4, 0, 2001], timeout=STREAM_LIMIT_S)
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_PARAMETER"
    assert [field for field, _ in error.field_violations] == ["port_ids", "port_ids"]
