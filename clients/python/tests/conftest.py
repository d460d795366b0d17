"""Starts the real gateway binary on the embedded simulator for the tests."""

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _binary() -> str:
    binary = os.environ.get("TASKGATE_BIN", str(ROOT / "target" / "debug" / "taskgate"))
    if not os.path.exists(binary):
        pytest.exit(f"no taskgate binary at {binary}: run 'cargo build' or set TASKGATE_BIN", 2)
    return binary


@pytest.fixture(scope="session")
def gateway():
    """The address of a gateway in front of the simulator with its default layout."""
    process = subprocess.Popen(
        [_binary(), "serve", "--simulator", "--listen", "127.0.0.1:0", "--retry-delay", "1500ms"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_LOG": "info", "TASKGATE_LOG_FORMAT": "text"},
    )
    address = None
    for line in process.stderr:
        match = re.search(r"gateway listening address=(\S+)", line)
        if match:
            address = match.group(1)
            break
    if address is None:
        process.kill()
        pytest.exit("the gateway exited before it listened", 2)
    yield address
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
