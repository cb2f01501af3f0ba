"""cluster.processes: a server that dies while starting, or never answers, is reported with its log."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cluster.processes import spawn, tail, wait_ready
from streams.errors import DriftloopError


def test_a_process_that_exits_while_starting_is_reported_with_its_status_and_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "server.log"  # the folder is made
    process = spawn([sys.executable, "-c", "print('port 5000 in use', flush=True); raise SystemExit(3)"], log, {})
    with pytest.raises(DriftloopError, match=r"(?s)the server exited while starting \(status 3\).*port 5000 in use"):
        wait_ready("the server", lambda: False, process, log, timeout_s=60)
    assert process.poll() == 3


def test_a_process_that_never_answers_is_reported_with_the_checks_last_error(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = spawn([sys.executable, "-c", "import time; print('listening', flush=True); time.sleep(60)"], log, {})

    def refused() -> bool:
        raise ConnectionRefusedError("connection refused")

    try:
        with pytest.raises(DriftloopError, match=r"did not answer within 1s \(last error: connection refused\)"):
            wait_ready("the server", refused, process, log, timeout_s=1)
        assert process.poll() is None  # the wait reports; stopping is the caller's
    finally:
        process.kill()
        process.wait()


def test_a_ready_process_returns_and_an_unreadable_log_says_why(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = spawn([sys.executable, "-c", "import time; time.sleep(60)"], log, {})
    try:
        wait_ready("the server", lambda: True, process, log, timeout_s=5)
    finally:
        process.kill()
        process.wait()
    assert "cannot read" in tail(tmp_path / "missing.log")
