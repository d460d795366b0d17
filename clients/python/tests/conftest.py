"""Starts the real gateway binary on the embedded simulator for the tests."""

import collections
import os
import pathlib
import re
import signal
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
        self.address = None
        # Set once the address is known or stderr has ended, whichever comes first.
        self.settled = threading.Event()

    def run(self):
        for line in self._stream:
            self.lines.append(line)
            if self.address is None:
                match = re.search(r"gateway listening address=(\S+)", line)
                if match:
                    self.address = match.group(1)
                    self.settled.set()
        self.settled.set()

    def log(self) -> str:
        return "".join(self.lines)


def _serve(*extra_args):
    """Starts the gateway in front of the simulator with ``extra_args``; yields its address and
    checks, once the tests are done, that it exits cleanly on SIGTERM."""
    process = subprocess.Popen(
        [_binary(), "serve", "--simulator", "--listen", "127.0.0.1:0", "--retry-delay", "1500ms", *extra_args],
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
    yield stderr.address
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
