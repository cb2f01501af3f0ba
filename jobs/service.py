"""A long-running loop in a thread of its own: the body of the monitor's and controller's Ray actors.

The loop gets a stop event; the service keeps the loop's error (if it ended with one) so that a
caller asking for the actor's stats learns why it stopped. Inside a Ray actor a loop that ends
without being asked to stop takes the actor's process down with it: an actor whose loop is dead
but whose process lives would never be restarted, and nothing would consume its topic again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

__all__ = ["HEARTBEAT_S", "Heartbeat", "Service", "consume_until"]

HEARTBEAT_S = 5.0  # a service's heartbeat interval; `driftloop status` allows three missed ones

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


def consume_until(stop: threading.Event, consumer: Any) -> None:
    """Run a `StreamConsumer` (its poll, handle, commit loop) until `stop` is set: the one shape of
    the monitor's and the controller's loops. A watcher thread stops the consumer, which ends
    `run()` after the batch in hand; the caller closes what it opened around the consumer."""

    def stop_when_asked() -> None:
        stop.wait()
        consumer.stop()

    threading.Thread(target=stop_when_asked, name="stop-when-asked", daemon=True).start()
    consumer.run()


def _at(wall: float | None) -> datetime | None:
    return None if wall is None else datetime.fromtimestamp(wall, tz=timezone.utc)


class Heartbeat:
    """`ServiceHeartbeat`s for one service, every `every_s`, from a thread and a producer of their own.

    `probe()` gives the loop's state: `last_poll` (wall time), `polled`, `dead_lettered`, and for
    the monitor `records_position` (wall time of its last fresh look at the records topic's end).
    A broker that is away costs heartbeats, never the service: a failed send is logged and the
    next one tried.
    """

    def __init__(self, kafka: Any, topic: str, pipeline: str, service: str, probe: Callable[[], dict[str, Any]],
                 every_s: float = HEARTBEAT_S) -> None:  # fmt: skip
        from streams.events import utcnow

        self.kafka, self.topic, self.pipeline, self.service, self.probe = kafka, topic, pipeline, service, probe
        self.every_s = every_s
        self.instance = f"{socket.gethostname()}-{os.getpid()}".replace(".", "-")[-128:]
        self.started_at = utcnow()
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{service}-heartbeat", daemon=True)
        self._thread.start()

    def event(self) -> Any:
        from streams.events import ServiceHeartbeat

        state = self.probe()
        return ServiceHeartbeat(
            pipeline=self.pipeline, service=self.service, instance=self.instance,  # type: ignore[arg-type]
            started_at=self.started_at, last_poll_at=_at(state.get("last_poll")), polled=int(state.get("polled", 0)),
            dead_lettered=int(state.get("dead_lettered", 0)), records_position_at=_at(state.get("records_position")),
            waiting_for=(str(state["waiting_for"])[:200] if state.get("waiting_for") else None),
            resumed=(str(state["resumed"])[:300] if state.get("resumed") else None),
        )  # fmt: skip

    def _run(self) -> None:
        from streams.kafka import Producer, ensure_topics

        producer = None
        while not self._stop.is_set():
            try:
                if producer is None:
                    ensure_topics(self.kafka, [self.topic])
                    producer = Producer(self.kafka, client_id=f"{self.pipeline}.{self.service}.heartbeat")
                producer.send_event(self.topic, self.event())
                producer.flush()
                self.sent += 1
            except Exception as err:  # the broker is away: the next beat tries again
                log.warning("the %s's heartbeat was not sent (%s)", self.service, err)
            self._stop.wait(self.every_s)
        if producer is not None:
            producer.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _in_ray_actor() -> bool:
    try:
        import ray

        return bool(ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:  # no Ray, or not in a worker
        return False
