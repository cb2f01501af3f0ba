"""A long-running loop in a thread of its own: the body of the monitor's and controller's Ray actors.

The loop gets a stop event; the service keeps the loop's error (if it ended with one) so that a
caller asking for the actor's stats learns why it stopped. Inside a Ray actor a loop that ends
without being asked to stop takes the actor's process down with it: an actor whose loop is dead
but whose process lives would never be restarted, and nothing would consume its topic again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

__all__ = ["Service"]

log = logging.getLogger(__name__)


class Service:
    def __init__(self, name: str, loop: Callable[[threading.Event], None]) -> None:
        self.name = name
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(loop,), name=name, daemon=True)
        self._thread.start()

    def _run(self, loop: Callable[[threading.Event], None]) -> None:
        try:
            loop(self._stop)
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"
            log.exception("the %s stopped", self.name)
            self._exit_actor()
            return
        if not self._stop.is_set():
            self.error = "the loop returned without being asked to stop"
            log.error("the %s stopped: %s", self.name, self.error)
            self._exit_actor()

    def _exit_actor(self) -> None:
        """In a Ray actor: end the process so that Ray restarts the actor (its `max_restarts`)."""
        if _in_ray_actor():
            log.error("the %s's loop is dead: exiting the actor's process so that Ray restarts it", self.name)
            logging.shutdown()
            os._exit(1)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _in_ray_actor() -> bool:
    try:
        import ray

        return bool(ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:  # no Ray, or not in a worker
        return False
