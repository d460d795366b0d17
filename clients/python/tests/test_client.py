"""The Python client against the real gateway: success, every simulator fault, bad arguments,
cancel and case state."""

import re
from datetime import timedelta

import grpc
import pytest

from taskgate_client import CaseState, FaultCode, TaskGate, TaskGateError


@pytest.fixture
def client(gateway):
    with TaskGate(gateway) as task_gate:
        yield task_gate


def expect_error(client, port_id, bin_id) -> TaskGateError:
    with pytest.raises(TaskGateError) as raised:
        client.case_extract(port_id=port_id, bin_id=bin_id, timeout=5, max_attempts=1)
    return raised.value


def request_id_logged(gateway, key) -> str:
    """The request id of the gateway's access line for the call with idempotency key ``key``."""
    [line] = gateway.lines_logged(
        lambda line: "taskgate::access" in line and re.search(rf"idempotency_key={key}\b", line), 1)
    return re.search(r" request_id=(\S+)", line).group(1)


def test_a_failed_call_carries_the_request_id_of_its_access_line(client, gateway):
    # Port 1 is not an AutoCase port: the controller refuses the call.
    error = expect_error(client, 1, 101337)
    assert error.request_id == request_id_logged(gateway, error.idempotency_key)
    assert str(error) == f"FAILED_PRECONDITION: {error.message} (request id: {error.request_id})"
    # One the caller sets is the one the gateway logs, and the one the error carries.
    with pytest.raises(TaskGateError) as raised:
        client.case_get_state(port_id=1, request_id="py-failed-read")
    assert raised.value.request_id == "py-failed-read"
    assert str(raised.value).endswith(" (request id: py-failed-read)")


def test_success_then_1148_with_the_retry_delay(client):
    assert client.case_extract(port_id=4, bin_id=101337, request_id="py-1").request_id == "py-1"
    error = expect_error(client, 4, 101337)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.fault_code == FaultCode.FAULT_CODE_PREVIOUS_ACTION_NOT_COMPLETED
    assert error.fault_name == "PREVIOUS_ACTION_NOT_COMPLETED"
    assert error.raw_code == 1148
    assert error.retry_delay == timedelta(milliseconds=1500)
    assert (error.retryable, error.may_have_acted, error.attempts) == (True, False, 1)
    assert error.domain == "autostore.task"
    assert error.metadata == {
        "faultCode": "1148",
        "method": "case_extract",
        "portId": "4",
        "binId": "101337",
    }


@pytest.mark.parametrize(
    "port_id, bin_id, code, fault_code",
    [
        (1, 101337, grpc.StatusCode.FAILED_PRECONDITION, FaultCode.FAULT_CODE_PORT_IS_NOT_AUTOCASE),
        (2, 101337, grpc.StatusCode.FAILED_PRECONDITION, FaultCode.FAULT_CODE_PORT_NOT_IN_APPROPRIATE_MODE),
        (3, 101337, grpc.StatusCode.FAILED_PRECONDITION, FaultCode.FAULT_CODE_BIN_NOT_SELECTED_FOR_PORT),
        (9, 101337, grpc.StatusCode.NOT_FOUND, FaultCode.FAULT_CODE_PORT_IS_NOT_AVAILABLE),
    ],
)
def test_every_simulator_fault(client, port_id, bin_id, code, fault_code):
    error = expect_error(client, port_id, bin_id)
    assert error.code == code
    assert error.fault_code == fault_code
    assert error.raw_code == fault_code
    assert error.reason == FaultCode.Name(fault_code).removeprefix("FAULT_CODE_")
    assert error.retry_delay is None


@pytest.mark.parametrize(
    "port_id, bin_id, field",
    [(0, 1, "port_id"), (2001, 1, "port_id"), (4, 0, "bin_id"), (4, 4_000_001, "bin_id")],
)
def test_invalid_arguments(client, port_id, bin_id, field):
    error = expect_error(client, port_id, bin_id)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_PARAMETER"
    assert error.domain == "taskgate"
    assert error.raw_code is None
    assert [violation[0] for violation in error.field_violations] == [field]


def test_case_cancel_leaves_noop_with_the_bin(client):
    # Port 4 may still run the extraction of an earlier test (each step lasts 2 s): either way
    # an extraction on bin 101337 runs when the cancel arrives.
    try:
        client.case_extract(port_id=4, bin_id=101337, timeout=5, max_attempts=1)
    except TaskGateError as error:
        assert error.raw_code == 1148, error
    assert client.case_cancel(port_id=4, bin_id=101337, request_id="py-cancel").request_id == "py-cancel"
    state = client.case_get_state(port_id=4)
    assert (state.port_id, state.state, state.raw_state) == (4, CaseState.CASE_STATE_NO_OPERATION, "NOOP")
    assert state.HasField("bin_id") and state.bin_id == 101337
    with pytest.raises(TaskGateError) as raised:
        client.case_cancel(port_id=4, bin_id=101337)
    assert raised.value.fault_name == "BIN_NOT_SELECTED_FOR_PORT"
    assert raised.value.metadata == {
        "faultCode": "1149",
        "method": "case_cancel",
        "portId": "4",
        "binId": "101337",
    }


def test_case_get_state(client):
    # Port 2 is a CLOSED AutoCase port: reading its state changes nothing, so it answers.
    state = client.case_get_state(port_id=2)
    assert (state.port_id, state.state, state.raw_state) == (2, CaseState.CASE_STATE_NO_OPERATION, "NOOP")
    assert not state.HasField("bin_id")
    with pytest.raises(TaskGateError) as raised:
        client.case_get_state(port_id=1)
    error = raised.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.fault_name == "PORT_IS_NOT_AUTOCASE"
    assert error.metadata == {"faultCode": "1087", "method": "case_getstate", "portId": "1"}
