"""Starts the real gateway binary on the embedded simulator for the tests."""

import collections
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _binary() -> str:
    binary = os.environ.get("TASKGATE_TEST_BINARY", str(ROOT / "target" / "debug" / "taskgate"))
    if not os.path.exists(binary):
        pytest.exit(f"no taskgate binary at {binary}: run 'cargo build' or set TASKGATE_TEST_BINARY", 2)
    return binary


# The longest the gateway may take to log its address, and to exit after SIGTERM.
STARTUP_LIMIT_S = 60
STOP_LIMIT_S = 30
# The longest the gateway may take to log a line a test waits for.
LINE_LIMIT_S = 30


class _StderrReader(threading.Thread):
    """Reads the gateway's stderr, its log, for as long as the process lives.

    Reading only up to the "listening" line would leave a pipe nobody reads: once it is full
    (64 KiB on Linux) the gateway's log writer blocks and every later line is lost. The last
    lines are kept to explain a failure.
    """

    def __init__(self, stream):
        super().__init__(name="taskgate-stderr", daemon=True)
        self._stream = stream
        self.lines = collections.deque(maxlen=200)
        # Every line, for tests that wait for one; notified on each.
        self.logged = []
        self.new_line = threading.Condition()
        self.address = None
        # Set once the address is known or stderr has ended, whichever comes first.
        self.settled = threading.Event()

    def run(self):
        for line in self._stream:
            self.lines.append(line)
            with self.new_line:
                self.logged.append(line)
                self.new_line.notify_all()
            if self.address is None:
                match = re.search(r"gateway listening address=(\S+)", line)
                if match:
                    self.address = match.group(1)
                    self.settled.set()
        self.settled.set()

    def log(self) -> str:
        return "".join(self.lines)


class Gateway(str):
    """A running gateway's address, whose log lines a test can wait for (``lines_logged``)."""

    def __new__(cls, address: str, stderr: "_StderrReader"):
        gateway = super().__new__(cls, address)
        gateway._stderr = stderr
        return gateway

    def lines_logged(self, test, count: int) -> list:
        """The logged lines that pass ``test``, once there are ``count`` of them; fails the test
        if there are not within ``LINE_LIMIT_S``."""
        def matching():
            return [line for line in self._stderr.logged if test(line)]
        with self._stderr.new_line:
            if not self._stderr.new_line.wait_for(lambda: len(matching()) >= count, LINE_LIMIT_S):
                raise AssertionError(
                    f"the gateway did not log {count} such lines within {LINE_LIMIT_S} s:\n"
                    f"{self._stderr.log()}")
            return matching()


def _serve(*extra_args, upstream=("--simulator",), retry_delay="1500ms"):
    """Starts the gateway in front of ``upstream`` (the simulator unless told) with
    ``extra_args``; yields its address (a ``Gateway``) and checks, once the tests are done, that
    it exits cleanly on SIGTERM."""
    process = subprocess.Popen(
        [_binary(), "serve", *upstream, "--listen", "127.0.0.1:0", "--retry-delay", retry_delay, *extra_args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_LOG": "info", "TASKGATE_LOG_FORMAT": "text"},
    )
    stderr = _StderrReader(process.stderr)
    stderr.start()
    if not stderr.settled.wait(timeout=STARTUP_LIMIT_S) or stderr.address is None:
        process.kill()
        process.wait(timeout=STOP_LIMIT_S)
        pytest.exit(
            f"the gateway did not log its listening address within {STARTUP_LIMIT_S} s:\n{stderr.log()}",
            2,
        )
    yield Gateway(stderr.address, stderr)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the gateway did not exit within {STOP_LIMIT_S} s of SIGTERM:\n{stderr.log()}")
    stderr.join(timeout=STOP_LIMIT_S)
    assert code == 0, f"the gateway exited with {code}:\n{stderr.log()}"


# Port 4 of the default layout (AutoCase, OPEN, bin 101337 selected), alone, with each
# extraction state (EREQ, ERSO) lasting STEP_TIME.
_LAYOUT = """step_time = "{step_time}"
[[port]]
id = 4
autocase = true
mode = "OPEN"
selected_bin = 101337
"""


def _layout(tmp_path_factory, step_time: str) -> str:
    path = tmp_path_factory.mktemp("layout") / f"step-{step_time}.toml"
    path.write_text(_LAYOUT.format(step_time=step_time))
    return str(path)


@pytest.fixture(scope="session")
def gateway():
    """The address of a gateway in front of the simulator with its default layout."""
    yield from _serve()


@pytest.fixture(scope="session")
def fast_gateway(tmp_path_factory):
    """A gateway whose simulator runs an extraction through EREQ, ERSO and ECMP in 100 ms."""
    yield from _serve("--simulator-config", _layout(tmp_path_factory, "50ms"))


@pytest.fixture(scope="session")
def slow_gateway(tmp_path_factory):
    """A gateway whose simulator keeps an extraction requested (EREQ) for an hour: long enough
    for any cancel to find it running."""
    yield from _serve("--simulator-config", _layout(tmp_path_factory, "1h"))


@pytest.fixture(scope="session")
def gateway_without_log_publisher():
    """A gateway run with --log-publisher off: it has no case events."""
    yield from _serve("--log-publisher", "off")


@pytest.fixture(scope="session")
def idempotency_gateway(tmp_path_factory):
    """A gateway of its own whose simulator runs an extraction in 100 ms, for the tests of
    idempotency keys: no other test moves its port 4."""
    yield from _serve("--simulator-config", _layout(tmp_path_factory, "50ms"))


# The longest the fake controller waits for a request's bytes.
_FAKE_READ_LIMIT_S = 30


class FakeController(threading.Thread):
    """A controller's task interface that answers the n-th POST as ``script[n]`` says: ``"503"``
    (HTTP 503: the controller declined it) or ``"drop"`` (read it, then close the connection:
    it may have been acted on). Connections that send nothing (health probes) are not POSTs."""

    def __init__(self, script):
        super().__init__(name="fake-controller", daemon=True)
        self._script = list(script)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/api/v2/task"
        self.posts = 0

    def run(self):
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(_FAKE_READ_LIMIT_S)
                if not self._read_request(connection):
                    continue
                action = self._script[min(self.posts, len(self._script) - 1)]
                self.posts += 1
                if action == "503":
                    connection.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                        b"connection: close\r\n\r\n"
                    )

    @staticmethod
    def _read_request(connection) -> bool:
        """Reads one request's head and body; False when the peer sent nothing."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        while length and len(body) < int(length.group(1)):
            chunk = connection.recv(65536)
            if not chunk:
                break
            body += chunk
        return head.startswith(b"POST")

    def close(self):
        # shutdown wakes the thread blocked in accept; close alone does not.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()


@pytest.fixture
def fake_controller(request):
    """A ``FakeController`` following the test's ``script`` (``@pytest.mark.script(...)``) and a
    gateway in front of it, with a RetryInfo delay of 100 ms: yields (controller, gateway)."""
    controller = FakeController(request.node.get_closest_marker("script").args)
    controller.start()
    try:
        yield from (
            (controller, gateway)
            for gateway in _serve(upstream=("--upstream", controller.url, "--log-publisher", "off"),
                                  retry_delay="100ms")
        )
    finally:
        controller.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "script(*actions): the fake controller's answers to POSTs")
