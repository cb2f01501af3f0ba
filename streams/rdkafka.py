"""A fire-and-forget producer for high-volume streams, on librdkafka (confluent-kafka).

kafka-python spends 20-30 us of Python per record in `send`; serving logs one event per
prediction, so at tens of thousands of rows per second that alone would take a core and the
GIL from the requests. librdkafka batches, compresses and retries in its own threads: a
`produce` costs about 2 us of the caller's time. Use this for streams where a record may be
dropped and counted (prediction logs); everything that must not be lost uses `Producer` in
`streams.kafka`, which raises instead.

Idempotent, `acks=all`. Bounded: at most `max_messages` wait in librdkafka's queue; beyond it,
or after `timeout_s` without delivery, a record is dropped and counted, never retried forever.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka import Producer as _RdProducer

from streams.config import KafkaSettings
from streams.errors import BrokerError
from streams.kafka import bootstrap_servers

__all__ = ["BulkProducer", "rdkafka_options"]

log = logging.getLogger(__name__)

# Delivery errors after which this producer can deliver nothing more. Once records time out in
# flight, librdkafka bumps the idempotent producer's epoch; Tansu 0.6 then answers every later
# produce PRODUCER_FENCED (seen after a 10 s outage with a 3 s timeout), while a new producer works.
_DEAD_PRODUCER = frozenset(
    getattr(KafkaError, name)
    for name in (
        "PRODUCER_FENCED",
        "INVALID_PRODUCER_EPOCH",
        "OUT_OF_ORDER_SEQUENCE_NUMBER",
        "UNKNOWN_PRODUCER_ID",
        "INVALID_PRODUCER_ID_MAPPING",
        "_FENCED",
        "_FATAL",
    )
    if hasattr(KafkaError, name)
)


def rdkafka_options(kafka: KafkaSettings) -> dict[str, Any]:
    """The connection settings of `kafka` in librdkafka's names (secrets come from the environment)."""
    options: dict[str, Any] = {
        "bootstrap.servers": ",".join(bootstrap_servers(kafka)),
        "security.protocol": kafka.security_protocol.lower(),
        "socket.connection.setup.timeout.ms": kafka.connect_timeout_ms,
    }
    if kafka.sasl_mechanism:
        options["sasl.mechanism"] = kafka.sasl_mechanism
        options["sasl.username"] = kafka.sasl_username or ""
        options["sasl.password"] = kafka.sasl_password or ""
    if kafka.ssl_cafile:
        options["ssl.ca.location"] = kafka.ssl_cafile
    return options


class BulkProducer:
    """Counts: `produced` (queued), `rejected` (queue full), `failed` (not delivered), `in_flight`."""

    def __init__(
        self,
        kafka: KafkaSettings,
        client_id: str = "driftloop.bulk",
        max_messages: int = 100_000,
        timeout_s: float = 30.0,
        linger_ms: int = 20,
    ) -> None:
        self.produced = 0
        self.rejected = 0
        self.failed = 0
        self.fatal: str | None = None  # librdkafka's fatal error, if it hit one: this producer is done
        self._lock = threading.Lock()
        options = rdkafka_options(kafka) | {
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": linger_ms,
            "partitioner": "murmur2_random",  # kafka-python's (and Java's): a key lands on the same partition
            "queue.buffering.max.messages": max_messages,
            "message.timeout.ms": int(timeout_s * 1000),
            "message.max.bytes": max(kafka.max_record_bytes * 2, 1024 * 1024),
            "delivery.report.only.error": True,  # success costs no callback; failures are counted
            "on_delivery": self._delivered,
            "error_cb": self._error,
            "logger": log,
        }
        try:
            self._producer = _RdProducer(options)
        except KafkaException as err:
            raise BrokerError(f"cannot configure a producer for {kafka.bootstrap_servers}: {err}") from err

    def _delivered(self, err: KafkaError | None, _message: Any) -> None:
        if err is not None:
            with self._lock:
                self.failed += 1
            if err.fatal() or err.code() in _DEAD_PRODUCER:
                self.fatal = self.fatal or f"{err.name()}: {err.str()}"

    def _error(self, err: KafkaError) -> None:
        # An idempotent producer whose records timed out while the broker was away can end in a
        # fatal state: every later produce fails. The owner sees `fatal` and makes a new producer.
        # (`err` is librdkafka's; an error event has no delivery of its own to count.)
        if err.fatal():
            self.fatal = str(err)
            log.warning("the producer hit a fatal error and must be replaced: %s", err)

    def produce(self, topic: str, value: bytes, key: bytes | None = None) -> bool:
        """Queue one record; False (and counted as rejected) when the bounded queue is full or the
        record cannot be sent at all (too large, say); `BrokerError` when the producer is dead."""
        try:
            self._producer.produce(topic, value, key)
        except BufferError:
            self.rejected += 1
            return False
        except KafkaException as err:
            error = err.args[0] if err.args and isinstance(err.args[0], KafkaError) else None
            if error is not None and error.fatal():
                self.fatal = str(error)
            if self.fatal is not None or error is None:
                raise BrokerError(f"cannot produce to {topic}: {err}") from err
            self.rejected += 1  # this record alone (MSG_SIZE_TOO_LARGE, ...): counted, not raised
            log.warning("a record for %s was refused: %s", topic, err)
            return False
        self.produced += 1
        return True

    def send(self, topic: str, value: bytes, key: bytes | None = None, max_block_s: float = 10.0) -> None:
        """Queue one record, waiting (up to `max_block_s`) while the bounded queue is full: back-pressure,
        for a producer that must lose nothing. `BrokerError` when it cannot be queued."""
        deadline = time.monotonic() + max_block_s
        while True:
            try:
                self._producer.produce(topic, value, key)
            except BufferError:
                if time.monotonic() > deadline:
                    raise BrokerError(f"the producer's queue stayed full for {max_block_s:g}s") from None
                self._producer.poll(0.05)
                continue
            except KafkaException as err:
                raise BrokerError(f"cannot produce to {topic}: {err}") from err
            self.produced += 1
            return

    def serve(self, timeout_s: float = 0.0) -> None:
        """Run delivery callbacks (failures are counted there)."""
        self._producer.poll(timeout_s)

    @property
    def in_flight(self) -> int:
        return len(self._producer)

    @property
    def delivered(self) -> int:
        """Records acknowledged by the broker."""
        return self.produced - self.in_flight - self.failed

    def flush(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for delivery; the number still in flight."""
        return int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be within `timeout_s`; what is left is purged and counted as failed."""
        if self.flush(timeout_s):
            self._producer.purge(in_queue=True, in_flight=True)
            self._producer.flush(0)  # runs the purged records' failure callbacks
