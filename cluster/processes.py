"""Server processes started by driftloop (`driftloop up`'s stack, the test services): each in a
process group of its own with its output in a log file, and a wait until it answers that reports,
if it exits or time runs out, the log's tail and the last error of the readiness check."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from streams.errors import DriftloopError


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """In the child, before exec (after any change of user): get `sig` when the parent dies (Linux),
    so a killed test session leaves no server behind. Linux sends it when the *thread* that started
    the child ends, so only a start from the main thread asks for it (None: not asked)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None

    def child() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return child


def tail(log: Path, chars: int = 3000) -> str:
    """The end of `log`, or why it cannot be read."""
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"(cannot read {log}: {err})"


def spawn(
    argv: Sequence[str], log: Path, env: Mapping[str, str], die_with: int | None = None, **popen: Any
) -> subprocess.Popen[bytes]:
    """`argv` in a process group of its own, output appended to `log` (the child keeps its own copy of
    the file). With `die_with`, the child gets that signal when this process dies (`die_with_parent`);
    without, it outlives it (`driftloop up`'s detached stack)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    preexec = die_with_parent(die_with) if die_with is not None else None
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env),
            start_new_session=True, preexec_fn=preexec, **popen,
        )  # fmt: skip


def wait_ready(
    what: str,
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float,
    poll_s: float = 0.2,
) -> None:
    """Until `ready()` answers True (an exception counts as not yet); a DriftloopError naming `what`,
    with the end of `log`, if the process exits first or `timeout_s` runs out (then with the check's
    last error too)."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DriftloopError(
                f"{what} exited while starting (status {process.returncode}); the end of {log}:\n{tail(log)}"
            )
        try:
            if ready():
                return
        except Exception as err:  # not answering yet
            last = err
        time.sleep(poll_s)
    raise DriftloopError(
        f"{what} did not answer within {timeout_s:.0f}s (last error: {last}); the end of {log}:\n{tail(log)}"
    )
