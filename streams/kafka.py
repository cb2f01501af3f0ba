"""Kafka I/O on kafka-python: topic creation, an idempotent producer, and the consumer loop.

The consumer loop is the reliability contract in code (DESIGN.md): it decodes raw bytes in our
code, sends each bad record to the DLQ with its original bytes and a reason header, hands the
good ones to a handler in batches, and commits offsets only after the handler has returned and
the DLQ writes are acknowledged. A crash at any point re-delivers, never skips.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from streams.config import KafkaSettings
from streams.errors import BrokerError, DecodeError, HandlerFailed, RetryableError
from streams.events import Event
from streams.serde import encode_event

__all__ = [
    "Batch",
    "Chunk",
    "ConsumerStats",
    "Producer",
    "StreamConsumer",
    "admin_client",
    "bootstrap_servers",
    "client_options",
    "committed_offsets",
    "dead_letter",
    "dlq_copy",
    "ensure_topics",
    "new_consumer",
    "topic_id",
]

log = logging.getLogger(__name__)

REASON_HEADER = "driftloop.reason"
KIND_HEADER = "driftloop.error"
SOURCE_HEADER = "driftloop.source"
BatchDecoder = Callable[[Sequence[bytes | None]], list[Any]]


def bootstrap_servers(kafka: KafkaSettings) -> list[str]:
    """The brokers to connect to; a clear error when the config still says 'embedded'."""
    if kafka.embedded:
        raise BrokerError(
            "kafka.bootstrap_servers is 'embedded' but no broker was started: "
            "run `driftloop broker` and set KAFKA_BOOTSTRAP_SERVERS, or use `driftloop run`"
        )
    return [s.strip() for s in kafka.bootstrap_servers.split(",") if s.strip()]


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by every kafka-python client."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(kafka),
        "security_protocol": kafka.security_protocol,
        "bootstrap_timeout_ms": kafka.connect_timeout_ms,
    }
    if kafka.sasl_mechanism:
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password
    if kafka.ssl_cafile:
        options["ssl_cafile"] = kafka.ssl_cafile
    return options


def _unreachable(kafka: KafkaSettings, err: KafkaError) -> BrokerError:
    return BrokerError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {err}")


def admin_client(kafka: KafkaSettings) -> KafkaAdminClient:
    """An admin client with the config's connection and security settings; unreachable is a BrokerError."""
    try:
        return KafkaAdminClient(**client_options(kafka), request_timeout_ms=10_000)
    except KafkaError as err:
        raise _unreachable(kafka, err) from err


def new_consumer(kafka: KafkaSettings, **options: Any) -> KafkaConsumer:
    """A kafka-python consumer with our connection and fetch settings (manual commits always)."""
    try:
        return KafkaConsumer(
            **client_options(kafka),
            enable_auto_commit=False,
            max_poll_records=kafka.consumer.max_poll_records,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=max(kafka.max_record_bytes * 2, 4 * 1024 * 1024),
            **options,
        )
    except KafkaError as err:
        raise _unreachable(kafka, err) from err


def ensure_topics(kafka: KafkaSettings, topics: Iterable[str], partitions: int | None = None) -> list[str]:
    """Create the topics that do not exist yet (idempotent); returns the ones it created."""
    wanted = list(dict.fromkeys(topics))
    count = partitions or kafka.partitions
    admin = admin_client(kafka)
    created = []
    try:
        existing = set(admin.list_topics())
        for name in wanted:
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, count, kafka.replication_factor)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # created concurrently by someone else: that is what we wanted
        for described in admin.describe_topics([n for n in wanted if n not in created]):
            have = len(described.get("partitions") or [])
            if have and have != count:
                log.warning("topic %s has %d partitions, the config asks for %d", described["name"], have, count)
    finally:
        admin.close()
    return created


def committed_offsets(kafka: KafkaSettings, group_id: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """The offsets `group_id` has committed on `topics`, per (topic, partition)."""
    wanted = set(topics)
    admin = admin_client(kafka)
    try:
        committed = admin.list_group_offsets([group_id]).get(group_id) or {}
    finally:
        admin.close()
    return {
        (tp.topic, tp.partition): int(meta.offset)
        for tp, meta in committed.items()
        if tp.topic in wanted and meta is not None and meta.offset >= 0
    }


def topic_id(kafka: KafkaSettings, topic: str) -> str | None:
    """The broker's id for this incarnation of a topic (it changes when a topic is recreated)."""
    admin = admin_client(kafka)
    try:
        (described,) = admin.describe_topics([topic])
    finally:
        admin.close()
    found = described.get("topic_id")
    return str(found) if found and str(found).strip("0-") else None


class Producer:
    """An idempotent producer (`acks="all"`) with a bounded buffer and a clean flush.

    At most `producer.buffer_bytes` of payload wait for acknowledgement: `send` blocks when
    the buffer is full and raises `BrokerError` after `max_block_ms`, so a dead broker never
    grows memory without bound. Delivery failures are counted; `flush` raises if any send
    since the last flush failed, so a caller never believes a record was written when it
    was not. The accounting runs in the sending thread (no per-record callbacks), under a
    lock, so one producer may be shared by threads.
    """

    def __init__(self, kafka: KafkaSettings, client_id: str = "driftloop") -> None:
        settings = kafka.producer
        self.max_request_size = max(kafka.max_record_bytes * 2, 1024 * 1024)
        try:
            self._producer = KafkaProducer(
                **client_options(kafka),
                client_id=client_id,
                acks="all",
                enable_idempotence=True,
                linger_ms=settings.linger_ms,
                batch_size=settings.batch_size,
                max_block_ms=settings.max_block_ms,
                delivery_timeout_ms=settings.delivery_timeout_ms,
                max_request_size=self.max_request_size,
            )
        except KafkaError as err:
            raise _unreachable(kafka, err) from err
        self.buffer_bytes = settings.buffer_bytes
        self.max_block_s = settings.max_block_ms / 1000
        self.delivery_timeout_s = settings.delivery_timeout_ms / 1000
        self.sent = 0
        self.failed = 0
        self._pending_bytes = 0
        self._inflight: deque[tuple[Any, int]] = deque()  # (future, bytes), oldest first
        self._failures: list[BaseException] = []
        self._lock = threading.Lock()

    def send(
        self,
        topic: str,
        value: bytes,
        key: str | bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> Any:
        raw_key = key.encode() if isinstance(key, str) else key
        size = len(value) + (len(raw_key) if raw_key else 0)
        with self._lock:
            if self._pending_bytes + size > self.buffer_bytes:
                self._make_room(size)
            try:
                future = self._producer.send(
                    topic, value=value, key=raw_key, headers=list(headers) or None, partition=partition
                )
            except KafkaError as err:
                raise BrokerError(f"cannot send to {topic}: {err}") from err
            self._inflight.append((future, size))
            self._pending_bytes += size
            self.sent += 1
        return future

    def send_event(self, topic: str, event: Event) -> Any:
        return self.send(topic, encode_event(event), key=event.key())

    def _make_room(self, size: int) -> None:
        """Retire acknowledged sends, oldest first, waiting for them up to `max_block_ms`."""
        deadline = time.monotonic() + self.max_block_s
        while self._inflight and self._pending_bytes + size > self.buffer_bytes:
            future, _ = self._inflight[0]
            if not future.is_done:
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise KafkaTimeoutError()
                    future.get(timeout=remaining)
                except KafkaTimeoutError:
                    raise BrokerError(
                        f"producer buffer full ({self._pending_bytes} bytes unacknowledged for "
                        f"{self.max_block_s:.0f}s): is the broker reachable?"
                    ) from None
                except KafkaError:
                    pass  # a failed send: counted by _retire
            self._retire()

    def _retire(self) -> None:
        future, size = self._inflight.popleft()
        self._pending_bytes -= size
        if future.failed():
            self.failed += 1
            if len(self._failures) < 10:
                self._failures.append(future.exception)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything sent so far is acknowledged; raise if anything failed."""
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as err:
            raise BrokerError(f"flush did not complete: {err}") from err
        with self._lock:
            while self._inflight and self._inflight[0][0].is_done:
                self._retire()
            failures, self._failures = self._failures, []
        if failures:
            raise BrokerError(f"{len(failures)}+ records were not delivered; first error: {failures[0]!r}")

    def close(self, timeout_s: float = 30.0) -> None:
        try:
            self.flush(timeout_s)
        finally:
            try:
                self._producer.close(timeout=timeout_s)
            except KafkaError as err:  # the flush error (if any) is the one that matters
                log.warning("producer did not close cleanly, closing it by force: %s", err)
                # kafka-python's close() raises from its own flush before it force-closes the
                # sender, which would leave the sender thread running; finish the job here.
                sender = getattr(self._producer, "_sender", None)
                if sender is not None:
                    sender.force_close()
                self._producer._closed = True

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dead_letter(producer: Producer, dlq_topic: str, dead: Sequence[tuple[Any, DecodeError]]) -> None:
    """Send rejected records to the DLQ with their original bytes and reason headers; flush.

    Returns only when the DLQ copies are acknowledged, so the caller may then move past them.
    A record too big to copy whole (within the producer's request limit, with its key, headers
    and `DLQ_OVERHEAD` for ours) goes truncated to its first `TRUNCATED_BYTES`, with its size and SHA-256 in
    the headers: a poison pill must never make the DLQ write, and so the consumer, fail.
    """
    kinds = Counter(error.kind.value for _, error in dead)
    log.warning("%d records to %s: %s", len(dead), dlq_topic, dict(kinds))
    for record, error in dead:
        log.info("%s/%d@%d to DLQ: %s", record.topic, record.partition, record.offset, error)
        value, key, headers = dlq_copy(record, error, producer.max_request_size - DLQ_OVERHEAD)
        producer.send(dlq_topic, value, key, headers)
    producer.flush()


TRUNCATED_BYTES = 64 * 1024
DLQ_OVERHEAD = 16 * 1024  # our headers (the reason is cut at 4,000 characters) and the batch framing
SIZE_HEADER = "driftloop.size"
DIGEST_HEADER = "driftloop.sha256"
TRUNCATED_HEADER = "driftloop.truncated"


def dlq_copy(record: Any, error: DecodeError, limit: int) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """The value, key and headers of a record's DLQ copy, within `limit` bytes. Pure."""
    value = record.value if record.value is not None else b""
    key = record.key
    headers = [(k, v) for k, v in (record.headers or []) if not k.startswith("driftloop.")]
    header_bytes = sum(len(k) + len(v or b"") for k, v in headers)
    extra: list[tuple[str, bytes]] = []
    if len(value) + len(key or b"") + header_bytes > limit:
        extra = [
            (TRUNCATED_HEADER, b"1"),
            (SIZE_HEADER, str(len(value)).encode()),
            (DIGEST_HEADER, hashlib.sha256(value).hexdigest().encode()),
        ]
        value = value[:TRUNCATED_BYTES]
        if key is not None and len(key) > 1024:
            extra.append(("driftloop.key_sha256", hashlib.sha256(key).hexdigest().encode()))
            key = key[:1024]
        if header_bytes > TRUNCATED_BYTES:
            headers = []  # the source offset still finds the original
    headers += [
        (KIND_HEADER, error.kind.value.encode()),
        (REASON_HEADER, str(error.message)[:4000].encode("utf-8", "replace")),
        (SOURCE_HEADER, f"{record.topic}/{record.partition}/{record.offset}".encode()),
        *extra,
    ]
    return value, key, headers


@dataclass(frozen=True)
class Chunk:
    """The good records of one topic partition in a batch, raw and decoded, in offset order."""

    topic: str
    partition: int
    records: list[Any]  # kafka-python ConsumerRecords: offset, key, timestamp, headers, value bytes
    values: list[Any]  # the decoded values, aligned with `records`


@dataclass(frozen=True)
class Batch:
    """What a handler receives: the good records of one poll, grouped by partition."""

    chunks: list[Chunk]

    def __len__(self) -> int:
        return sum(len(c.values) for c in self.chunks)

    @property
    def values(self) -> list[Any]:
        return [v for c in self.chunks for v in c.values]


@dataclass
class ConsumerStats:
    """Counts of one consumer run (`committed` maps topic-partition to the next offset)."""

    polled: int = 0
    processed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    retries: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    # Per topic, records past this consumer's position up to the end the broker last reported
    # with a fetch (updated after each poll; a partition with no fetch yet is left out).
    lag: dict[str, int] = field(default_factory=dict)


class StreamConsumer:
    """The consumer loop: decode in our code, DLQ the bad, handle the good, then commit.

    With a `group_id`, partitions are shared with the group's other members and offsets are
    committed after each batch. Without one, every partition of `topics` is assigned to this
    consumer from the beginning (or, with `from_end`, from the end) and nothing is committed
    (benchmarks, one-off reads, watchers).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Sequence[str],
        decode: BatchDecoder,
        handler: Callable[[Batch], None],
        *,
        group_id: str | None,
        dlq_topic: str | None,
        producer: Producer | None = None,
        retry_on: tuple[type[BaseException], ...] = (RetryableError, ConnectionError, TimeoutError),
        sleep: Callable[[float], None] | None = None,
        from_end: bool = False,
        commit_each_batch: bool = True,
    ) -> None:
        self.kafka = kafka
        self.commit_each_batch = commit_each_batch  # False: the handler commits (`commit`) when it is durable
        self.topics = list(topics)
        self.decode = decode
        self.handler = handler
        self.group_id = group_id
        self.dlq_topic = dlq_topic
        self.retry_on = retry_on
        self.stats = ConsumerStats()
        self.last_poll: float | None = None  # wall time of the loop's last poll: a heartbeat reports it
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._own_producer = producer is None and dlq_topic is not None
        self._producer = Producer(kafka, client_id=f"{group_id or 'driftloop'}-dlq") if self._own_producer else producer
        settings = kafka.consumer
        self._consumer = new_consumer(
            kafka,
            group_id=group_id,
            auto_offset_reset=settings.auto_offset_reset,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=max(settings.session_timeout_ms // 3, 100),
        )
        try:
            if group_id is None:
                parts = [TopicPartition(t, p) for t in self.topics for p in sorted(self._partitions(t))]
                self._consumer.assign(parts)
                if from_end:  # only what arrives from now on (Tansu may replay its last batch)
                    self._consumer.seek_to_end(*parts)
                else:
                    self._consumer.seek_to_beginning(*parts)
            else:
                self._consumer.subscribe(self.topics)
        except BaseException:
            self.close()
            raise

    def _partitions(self, topic: str) -> set[int]:
        deadline = time.monotonic() + 10
        while True:
            parts = self._consumer.partitions_for_topic(topic)
            if parts:
                return set(parts)
            if time.monotonic() > deadline:
                raise BrokerError(f"topic {topic!r} does not exist on {self.kafka.bootstrap_servers}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Ask the loop to finish its current batch, commit, and return (safe in a signal handler)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, max_records: int | None = None, idle_timeout_s: float | None = None) -> ConsumerStats:
        """Consume until stopped, until `max_records` were polled, or until idle for `idle_timeout_s`.

        Idle time counts only while partitions are assigned, so a slow group join is not idleness.
        """
        settings = self.kafka.consumer
        last_data = time.monotonic()
        try:
            while not self._stop.is_set():
                if max_records is not None and self.stats.polled >= max_records:
                    break
                budget = settings.max_poll_records
                if max_records is not None:
                    budget = min(budget, max_records - self.stats.polled)
                polled = self._consumer.poll(timeout_ms=settings.poll_timeout_ms, max_records=budget)
                self.last_poll = time.time()
                self.stats.lag = self._lag()
                if not polled:
                    if not self._consumer.assignment():
                        last_data = time.monotonic()  # still joining the group: not idle yet
                    elif idle_timeout_s is not None and time.monotonic() - last_data >= idle_timeout_s:
                        break
                    continue
                last_data = time.monotonic()
                self._process(polled)
        finally:
            self.close()
        return self.stats

    def _lag(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            for tp in self._consumer.assignment():
                end = self._consumer.highwater(tp)
                at = self._consumer.position(tp, timeout_ms=0) if end is not None else None
                if end is not None and at is not None:
                    out[tp.topic] = out.get(tp.topic, 0) + max(0, end - at)
        except KafkaError as err:  # a rebalance under us: the next poll measures again
            log.debug("consumer lag not measured: %s", err)
        return out

    def _process(self, polled: dict[TopicPartition, list[Any]]) -> None:
        chunks: list[Chunk] = []
        dead: list[tuple[Any, DecodeError]] = []
        next_offsets: dict[TopicPartition, int] = {}
        for tp, records in polled.items():
            results = self.decode([r.value for r in records])
            good_records, good_values = [], []
            for record, result in zip(records, results, strict=True):
                if isinstance(result, DecodeError):
                    dead.append((record, result))
                else:
                    good_records.append(record)
                    good_values.append(result)
            if good_values:
                chunks.append(Chunk(tp.topic, tp.partition, good_records, good_values))
            next_offsets[tp] = records[-1].offset + 1
            self.stats.polled += len(records)
        if dead:
            self._dead_letter(dead)
        if chunks:
            self._handle(Batch(chunks))
        if self.commit_each_batch:
            self._commit(next_offsets)
        self.stats.batches += 1

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Commit `(topic, partition) -> next offset` (for handlers that commit at their own boundaries)."""
        self._commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})

    def _dead_letter(self, dead: list[tuple[Any, DecodeError]]) -> None:
        if self._producer is None or self.dlq_topic is None:
            raise BrokerError(f"{len(dead)} records failed to decode and this consumer has no DLQ topic")
        dead_letter(self._producer, self.dlq_topic, dead)
        self.stats.dead_lettered += len(dead)

    def _handle(self, batch: Batch) -> None:
        attempts = self.kafka.consumer.handler_retries + 1
        for attempt in range(attempts):
            try:
                self.handler(batch)
                self.stats.processed += len(batch)
                return
            except self.retry_on as err:
                if attempt + 1 == attempts or self._stop.is_set():
                    raise HandlerFailed(f"handler failed {attempt + 1} times; last error: {err!r}") from err
                self.stats.retries += 1
                delay = self.kafka.consumer.retry_backoff_ms * (2**attempt) / 1000
                log.warning("handler failed (%r); retry %d of %d in %.2fs", err, attempt + 1, attempts - 1, delay)
                self._sleep(delay)

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.group_id is not None:
            try:
                self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
            except CommitFailedError as err:
                # The group rebalanced under us; the new owner re-reads from the last commit
                # (at-least-once: duplicates are possible, losses are not).
                log.warning("commit failed after a rebalance, the batch will be re-delivered: %s", err)
                return
        for tp, offset in offsets.items():
            self.stats.committed[(tp.topic, tp.partition)] = offset

    def close(self) -> None:
        try:
            self._consumer.close(autocommit=False)
        finally:
            if self._own_producer and self._producer is not None:
                self._producer.close()
