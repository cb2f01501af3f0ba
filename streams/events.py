"""The events that travel on driftloop's topics: frozen, typed, versioned, with ids.

Every event carries `type` (its class name, the tag on the wire), `schema_version`,
`event_id` and `occurred_at`. Ids are random by default; where a retry could duplicate work
the caller derives them with `deterministic_id` (a retrain's id comes from the pipeline and
the drift window, and is reused as the Ray Jobs submission id).

Encoding and decoding live in `streams.serde`.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import datetime, timezone
from typing import Annotated, ClassVar, Literal

import msgspec

__all__ = [
    "EVENT_TYPES",
    "ID_PATTERN",
    "REQUEST_ID_PATTERN",
    "DeliveryStep",
    "DriftDetected",
    "Event",
    "FeatureDrift",
    "LabelObserved",
    "ModelPromoted",
    "ModelRejected",
    "ModelRolledBack",
    "MonitorState",
    "OffsetRange",
    "PendingSpan",
    "PredictionLogged",
    "RetrainRequested",
    "ServiceHeartbeat",
    "TrainingCompleted",
    "TrainingFailed",
    "deterministic_id",
    "new_event_id",
    "request_id_of",
    "row_id",
    "utcnow",
]

_NAMESPACE = uuid.UUID("5c6f2a0e-9d0b-4c77-8d8a-2f1f5b9e1d40")
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]

# Ids cross a trust boundary on every topic and end up in Ray Jobs submission ids, job
# directories and MLflow tags: letters, digits, `_` and `-` only (no `/`, `.`, spaces or shell
# metacharacters), at most 128 characters. Request ids (chosen by HTTP callers) may also hold
# `.` and `:` (UUIDs, trace ids), never anything that could be a path segment on its own.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$"
Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, max_length=128)]
RequestId = Annotated[str, msgspec.Meta(pattern=REQUEST_ID_PATTERN, max_length=128)]
Version = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,20}$")]
Scalar = str | int | float | bool | None


def new_event_id() -> str:
    """A random 128-bit event id (32 hex digits), for events whose duplicates are harmless."""
    return os.urandom(16).hex()  # uuid4().hex costs 5x more; ids are made per served prediction


def deterministic_id(*parts: object) -> str:
    """The same parts always give the same id (uuid5), so a replayed event is recognisable."""
    return uuid.uuid5(_NAMESPACE, "\x1f".join(str(p) for p in parts)).hex


def request_id_of(value: object, source: str, index: int, room: int = 0) -> str:
    """A file row's request id: its own id (`value`) where that is a valid request id with `room`
    characters to spare (for a suffix), else `row_id(source, index)`."""
    text = None if value is None else str(value)
    if text is not None and len(text) <= 128 - room and re.match(REQUEST_ID_PATTERN, text):
        return text
    return row_id(source, index)


def row_id(source: str, index: int) -> str:
    """The request id of a file's row that has no usable id of its own: the file's name (what a
    request id cannot hold made `_`) and the row's number, `machine_log.csv:17`. Stable for a name
    and a row, readable, and the same in `produce --from` (its labels) and `run --from` (its requests)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", source.replace("\\", "/").rsplit("/", 1)[-1])[:80]
    return f"{'_' if name[:1] in ('', '.', '-') else ''}{name}:{index}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class OffsetRange(msgspec.Struct, frozen=True, kw_only=True):
    """Records `[start, end)` of one topic partition."""

    topic: str
    partition: Annotated[int, msgspec.Meta(ge=0)]
    start: Annotated[int, msgspec.Meta(ge=0)]
    end: Annotated[int, msgspec.Meta(ge=0)]

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"offset range end {self.end} is before its start {self.start}")

    @property
    def count(self) -> int:
        return self.end - self.start


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of all events. Subclasses set `SCHEMA_VERSION` and `key()` (the Kafka key)."""

    SCHEMA_VERSION: ClassVar[int] = 1

    event_id: Id = msgspec.field(default_factory=new_event_id)
    occurred_at: AwareDatetime = msgspec.field(default_factory=utcnow)
    schema_version: int = 1

    def key(self) -> str:
        raise NotImplementedError


class PredictionLogged(Event, frozen=True, kw_only=True):
    """One served prediction, as logged to the `predictions` topic."""

    request_id: RequestId
    pipeline: Id
    model_name: Id
    model_version: Version
    features: dict[str, Scalar]
    prediction: str | int
    probabilities: dict[str, float] = {}
    variant: Literal["champion", "challenger", "shadow"] = "champion"

    def key(self) -> str:
        return self.request_id


class LabelObserved(Event, frozen=True, kw_only=True):
    """Delayed ground truth for an earlier request (the `labels` topic)."""

    request_id: RequestId
    pipeline: Id
    label: str | int

    def key(self) -> str:
        return self.request_id


class FeatureDrift(msgspec.Struct, frozen=True, kw_only=True):
    """One statistic on one feature (or on the model output) for one window."""

    feature: str
    statistic: str
    value: float
    threshold: float
    drifted: bool
    p_value: float | None = None


class DriftDetected(Event, frozen=True, kw_only=True):
    """A monitoring window whose distribution moved past the policy's thresholds."""

    pipeline: Id
    window_start: AwareDatetime
    window_end: AwareDatetime
    window_size: int
    offsets: tuple[OffsetRange, ...]
    statistics: tuple[FeatureDrift, ...]
    kind: Literal["data", "prediction", "performance"] = "data"
    # Where the records topic stood when the window opened and when it closed: the records that
    # came in beside the window's predictions (what a retrain learns from; see jobs.policy).
    records: tuple[OffsetRange, ...] = ()

    def key(self) -> str:
        return self.pipeline

    @property
    def drifted_features(self) -> tuple[str, ...]:
        return tuple(sorted({s.feature for s in self.statistics if s.drifted}))


class RetrainRequested(Event, frozen=True, kw_only=True):
    """A decision to retrain; its id is deterministic and doubles as the Ray Jobs submission id."""

    pipeline: Id
    cause: str
    data_start: AwareDatetime | None = None
    data_end: AwareDatetime | None = None
    drift_event_id: Id | None = None
    # The records topic's offsets from where the drift began to the request: the data to retrain
    # on, by offsets, not by event time (which a replay, a backfill or a skewed clock makes wrong).
    records: tuple[OffsetRange, ...] = ()

    def key(self) -> str:
        return self.pipeline


class TrainingCompleted(Event, frozen=True, kw_only=True):
    """A training job finished and registered a model version."""

    pipeline: Id
    model_name: Id
    model_version: Version
    run_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,128}$")]
    metrics: dict[str, float] = {}
    trigger_event_id: Id | None = None
    submission_id: Id | None = None
    started_at: AwareDatetime | None = None  # when the Ray job started running (None: not known)

    def key(self) -> str:
        return self.model_name


class TrainingFailed(Event, frozen=True, kw_only=True):
    """A training job ended without a model."""

    pipeline: Id
    model_name: Id
    reason: str
    trigger_event_id: Id | None = None
    submission_id: Id | None = None
    started_at: AwareDatetime | None = None  # when the Ray job started running (None: not known)

    def key(self) -> str:
        return self.model_name


class ModelPromoted(Event, frozen=True, kw_only=True):
    """The gate passed: `champion` now points at `model_version`."""

    model_name: Id
    model_version: Version
    previous_version: Version | None = None
    metrics: dict[str, float] = {}

    def key(self) -> str:
        return self.model_name


class DeliveryStep(Event, frozen=True, kw_only=True):
    """A model that passed the gate is on a step towards champion (`delivery.steps`): Serve's
    replicas load it as the challenger, in `shadow` or as a `canary` answering `fraction` of the
    requests. `evidence`: what the live comparison that ended the previous step measured."""

    model_name: Id
    model_version: Version
    step: Literal["shadow", "canary"]
    fraction: float = 0.0
    champion_version: Version | None = None
    evidence: dict[str, float] = {}

    def key(self) -> str:
        return self.model_name


class ModelRejected(Event, frozen=True, kw_only=True):
    """The gate failed, or a step of the delivery did (then `evidence` holds the live figures);
    the reasons say which rule."""

    model_name: Id
    model_version: Version
    reasons: tuple[str, ...]
    evidence: dict[str, float] = {}

    def key(self) -> str:
        return self.model_name


class ModelRolledBack(Event, frozen=True, kw_only=True):
    """`champion` went back to an earlier version."""

    model_name: Id
    from_version: Version
    to_version: Version
    reason: str = ""

    def key(self) -> str:
        return self.model_name


class ServiceHeartbeat(Event, frozen=True, kw_only=True):
    """A long-running service (the monitor, the controller) says that it lives, on the `heartbeats`
    topic every few seconds, from a thread beside its loop: when its consumer loop last polled (a
    loop that hangs goes on beating with an old `last_poll_at`), and what else it knows of its own
    health. `driftloop status` reads them."""

    pipeline: Id
    service: Literal["monitor", "controller"]
    instance: Id  # host and process
    started_at: AwareDatetime
    last_poll_at: AwareDatetime | None = None  # None: its consumer has not polled yet
    polled: int = 0
    dead_lettered: int = 0
    records_position_at: AwareDatetime | None = None  # the monitor: when it last read the records' end
    waiting_for: Annotated[str, msgspec.Meta(max_length=200)] | None = None  # not started yet, and why
    resumed: Annotated[str, msgspec.Meta(max_length=300)] | None = None  # the monitor: what state it resumed

    def key(self) -> str:
        return f"{self.service}.{self.instance}"


MAX_PENDING_SPAN = 50_000_000  # offsets one pending span of a monitor state may cover (a 6 MB bitmap)
Kind = Literal["data", "prediction", "performance"]
Count = Annotated[int, msgspec.Meta(ge=0)]
ClassName = Annotated[str, msgspec.Meta(max_length=256)]


class PendingSpan(msgspec.Struct, frozen=True, kw_only=True):
    """Offsets `[start, end)` of one partition and which of them wait in the monitor's label join:
    `bitmap` is zlib-compressed, bit `i` (most significant first) for offset `start + i`."""

    topic: str
    partition: Count
    start: Count
    end: Count
    bitmap: Annotated[bytes, msgspec.Meta(max_length=8 * 1024 * 1024)]

    def __post_init__(self) -> None:
        if not 0 <= self.end - self.start <= MAX_PENDING_SPAN:
            raise ValueError(f"a pending span covers 0 to {MAX_PENDING_SPAN} offsets, not {self.end - self.start}")


class MonitorState(Event, frozen=True, kw_only=True):
    """What the monitor knows beyond its committed offsets, as a data window closes (the `state`
    topic, written before the offsets are committed): the retrain policy's streaks and cooldown,
    the partly filled performance window, and where the label join's waiting predictions and
    labels lie (re-read from the topics on a restart, so the state stays small). `cut` gives, per
    partition of the predictions and labels topics, the next offset: everything before it is
    accounted for here."""

    pipeline: Id
    model_version: Version
    cut: tuple[OffsetRange, ...]
    streaks: dict[Kind, Count] = {}
    streak_started: dict[Kind, AwareDatetime] = {}
    streak_records: dict[Kind, tuple[OffsetRange, ...]] = {}
    last_request_at: AwareDatetime | None = None
    recent_requests: Annotated[tuple[AwareDatetime, ...], msgspec.Meta(max_length=10_000)] = ()
    performance: Annotated[tuple[tuple[ClassName, ClassName], ...], msgspec.Meta(max_length=1_000_000)] = ()
    performance_started: AwareDatetime | None = None
    performance_records: tuple[OffsetRange, ...] = ()
    pending: tuple[PendingSpan, ...] = ()
    joined: Count = 0
    expired: Count = 0
    evicted: Count = 0

    def key(self) -> str:
        return self.pipeline


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        PredictionLogged,
        LabelObserved,
        DriftDetected,
        RetrainRequested,
        TrainingCompleted,
        TrainingFailed,
        ModelPromoted,
        DeliveryStep,
        ModelRejected,
        ModelRolledBack,
        ServiceHeartbeat,
        MonitorState,
    )
}
