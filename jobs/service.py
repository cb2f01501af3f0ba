"""A long-running loop in a thread of its own: the body of the monitor's and controller's Ray actors.

The loop gets a stop event; the service keeps the loop's error (if it ended with one) so that a
caller asking for the actor's stats learns why it stopped.
"""

from __future__ import annotations

import logging
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
            raise

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
