"""A service's loop that dies inside a Ray actor takes the actor down, so that Ray restarts it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from jobs.service import Service


class _Dying(Service):
    """Records each start in `starts`, then its loop fails (as the controller's did on a 500)."""

    def __init__(self, starts: str) -> None:
        def loop(stop: threading.Event) -> None:
            with open(starts, "a") as out:
                out.write("start\n")
            raise RuntimeError("Request failed with status code 500")

        super().__init__("dying", loop)

    def ping(self) -> str:
        return "pong"


def test_outside_ray_the_error_is_kept_and_the_process_lives() -> None:
    service = _Dying("/dev/null")
    service._thread.join(10)
    assert not service.running and service.error == "RuntimeError: Request failed with status code 500"


@pytest.mark.integration
def test_a_dead_loop_restarts_its_actor(ray_session: str, tmp_path: Path) -> None:
    import ray

    starts = tmp_path / "starts"
    actor: Any = ray.remote(_Dying).options(max_restarts=2, num_cpus=0).remote(str(starts))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not starts.exists() or len(starts.read_text().split()) < 3):
        time.sleep(0.2)
    assert starts.read_text().split() == ["start"] * 3  # the first run and both restarts
    ray.kill(actor)
