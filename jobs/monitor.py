"""The monitor: drift and delayed-label performance over the served predictions.

Two layers. `Monitor` is pure: fed decoded events with their offsets, it keeps the current
windows and the label join, and answers what to publish and what offsets are now safe to
commit. `run_monitor` is the I/O around it: a consumer in the group `<pipeline>.monitor` over
the `predictions` and `labels` topics, a producer for the `drift` and `retrain` topics, and the
registry for the champion's reference. `MonitorService` runs it as a restartable Ray actor.

Windows:
- a *data window* is `monitor.window_size` served predictions (or, with `window_seconds`, the
  predictions of that many seconds of event time). When it closes, every feature and the
  model's output are compared with the champion's reference (`streams.drift.compare`); a
  drifted window publishes `DriftDetected` (kind `data`, or `prediction` when only the output
  moved) carrying every statistic, its threshold and the window's offsets;
- a *performance window* is `monitor.performance_window` predictions joined to their labels
  (by request id, in bounded state with a time-to-live): its accuracy and macro F1 are compared
  with the champion's validation report; falling more than `performance_tolerance` below it
  publishes `DriftDetected` (kind `performance`). This is what sees concept drift, where the
  inputs do not move but their meaning does.
Every window result goes through the retrain policy (`jobs.policy`); a decision to retrain
publishes `RetrainRequested`.

Offsets are committed only when a data window closes, after its events are acknowledged, and
only up to the window's last record: a monitor killed mid-window re-reads that window from its
first record after the restart, so no window is lost or counted twice. Events carry ids derived
from the window's offsets, so a window re-evaluated after a crash between publish and commit
repeats the same ids. What lives beyond the offsets (the policy's streaks and cooldown, a
partly filled performance window, the label join) is written to the `state` topic at each data
window's close, before the commit (`Monitor.snapshot`, `resume_state`): a restarted monitor goes
on as if it had not stopped. With more than one monitor actor no state is kept.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import zlib
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec
import numpy as np

from jobs.delivery import LiveComparison, next_step
from jobs.evaluate import macro_f1
from jobs.policy import Decision, PolicyState, WindowResult, decide, records_since
from jobs.service import Heartbeat, Service, consume_until
from streams.config import PipelineConfig
from streams.drift import Reference, compare
from streams.events import (
    DriftDetected,
    FeatureDrift,
    LabelObserved,
    MonitorState,
    OffsetRange,
    PendingSpan,
    PredictionLogged,
    RetrainRequested,
    deterministic_id,
)
from streams.serde import encode_event
from streams.topics import Topics

__all__ = [
    "PREDICTION",
    "Champion",
    "LabelJoin",
    "Monitor",
    "MonitorReport",
    "Outcome",
    "pending_spans",
    "run_monitor",
    "span_offsets",
]

log = logging.getLogger(__name__)

MAX_WINDOWS_KEPT = 10_000  # window summaries a running monitor keeps for its stats (the newest)
PREDICTION = "__prediction__"  # the model's output (probability of the last class) as a monitored column


@dataclass(frozen=True)
class Champion:
    """What the monitor compares against: the served model's reference and validation report."""

    version: str
    reference: Reference
    report: Mapping[str, Any]
    # After a promotion: the version it replaced and that version's validation report, which the
    # new champion's first live windows are held to (see `RollbackSettings`). None: no probation.
    previous: str | None = None
    previous_report: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Rollback:
    """A champion on probation lost to the version it replaced: point `champion` back at it."""

    from_version: str
    to_version: str
    reason: str


@dataclass
class _DataWindow:
    columns: dict[str, list[Any]] = field(default_factory=dict)
    offsets: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (topic, partition) -> [first, next)
    started: datetime | None = None
    ended: datetime | None = None
    size: int = 0
    records_from: tuple[OffsetRange, ...] = ()  # the records topic when the window opened

    def add(self, event: PredictionLogged, topic: str, partition: int, offset: int, positive: str | None) -> None:
        for name, value in event.features.items():
            self.columns.setdefault(name, []).append(value)
        if positive is None:  # more than two classes: the predicted class, so that every class is watched
            self.columns.setdefault(PREDICTION, []).append(str(event.prediction))
        else:
            self.columns.setdefault(PREDICTION, []).append(float(event.probabilities.get(positive, np.nan)))
        span = self.offsets.setdefault((topic, partition), [offset, offset + 1])
        span[1] = offset + 1
        self.started = event.occurred_at if self.started is None else min(self.started, event.occurred_at)
        self.ended = event.occurred_at if self.ended is None else max(self.ended, event.occurred_at)
        self.size += 1

    def ranges(self) -> tuple[OffsetRange, ...]:
        return tuple(
            OffsetRange(topic=t, partition=p, start=a, end=b) for (t, p), (a, b) in sorted(self.offsets.items())
        )

    def window_id(self) -> str:
        return ",".join(f"{r.topic}/{r.partition}:{r.start}-{r.end}" for r in self.ranges())


Where = tuple[str, int, int]  # (topic, partition, offset) of a record


class LabelJoin:
    """Predictions waiting for their labels (and labels that came first), bounded, with a TTL.

    Time is event time (the events' `occurred_at`), so the join is reproducible. When full, the
    oldest entries go first; `expired` and `evicted` count what was forgotten unjoined. Each entry
    remembers where its record lies (`where`), so that a snapshot of the monitor's state can name
    the waiting records by offset instead of copying them (`pending_spans`).
    """

    def __init__(self, ttl_s: float, max_pending: int) -> None:
        self.ttl = timedelta(seconds=ttl_s)
        self.max_pending = max_pending
        # id -> (at, predicted or label, where, the model version that predicted)
        self._predictions: OrderedDict[str, tuple[datetime, str, Where | None, str | None]] = OrderedDict()
        self._labels: OrderedDict[str, tuple[datetime, str, Where | None, str | None]] = OrderedDict()
        self.expired = 0
        self.evicted = 0
        self.joined = 0
        self._lags: list[float] = []  # seconds from prediction to label, per join, until `take_lags`

    def _joined(self, predicted_at: datetime, labelled_at: datetime) -> None:
        self.joined += 1
        if len(self._lags) < 10_000:  # drained after each batch; a bound all the same
            self._lags.append(max(0.0, (labelled_at - predicted_at).total_seconds()))

    def take_lags(self) -> list[float]:
        """The label lags (seconds, event time) of the joins since the last call."""
        lags, self._lags = self._lags, []
        return lags

    def add_prediction(
        self, request_id: str, predicted: str, at: datetime, where: Where | None = None, version: str | None = None
    ) -> tuple[str, str, str | None] | None:
        """A prediction (by model `version`); (predicted, label, version) when its label came first."""
        early = self._labels.pop(request_id, None)
        if early is not None:
            self._joined(at, early[0])
            return predicted, early[1], version
        self._predictions[request_id] = (at, predicted, where, version)
        self._trim(at)
        return None

    def add_label(
        self, request_id: str, label: str, at: datetime, where: Where | None = None
    ) -> tuple[str, str, str | None] | None:
        """A label; (predicted, label, version) when its prediction is waiting."""
        waiting = self._predictions.pop(request_id, None)
        if waiting is not None:
            self._joined(waiting[0], at)
            return waiting[1], label, waiting[3]
        self._labels[request_id] = (at, label, where, None)
        self._trim(at)
        return None

    @property
    def pending(self) -> int:
        return len(self._predictions) + len(self._labels)

    def waiting(self) -> Iterator[Where]:
        """Where the waiting predictions and labels lie (those added with a `where`)."""
        for table in (self._predictions, self._labels):
            yield from (entry[2] for entry in table.values() if entry[2] is not None)

    def evict_oldest(self, count: int) -> None:
        """Forget the `count` oldest waiting entries (counted in `evicted`)."""
        for _ in range(min(count, self.pending)):
            table = self._predictions if len(self._predictions) >= len(self._labels) else self._labels
            table.popitem(last=False)
            self.evicted += 1

    def _trim(self, now: datetime) -> None:
        for table in (self._predictions, self._labels):
            while table:
                key, entry = next(iter(table.items()))
                if now - entry[0] > self.ttl:
                    table.pop(key)
                    self.expired += 1
                else:
                    break
        if self.pending > self.max_pending:
            self.evict_oldest(self.pending - self.max_pending)


def pending_spans(where: Iterable[Where]) -> tuple[PendingSpan, ...]:
    """The records at `where`, as one span per partition with a bitmap of the offsets. Pure."""
    by: defaultdict[tuple[str, int], list[int]] = defaultdict(list)
    for topic, partition, offset in where:
        by[(topic, partition)].append(offset)
    spans = []
    for (topic, partition), offsets in sorted(by.items()):
        at = np.asarray(offsets, dtype=np.int64)
        start, end = int(at.min()), int(at.max()) + 1
        bits = np.zeros(end - start, dtype=bool)
        bits[at - start] = True
        bitmap = zlib.compress(np.packbits(bits).tobytes())
        spans.append(PendingSpan(topic=topic, partition=partition, start=start, end=end, bitmap=bitmap))
    return tuple(spans)


def span_offsets(span: PendingSpan) -> np.ndarray:
    """The offsets a span's bitmap marks; a bitmap that is not what its span says is a ValueError
    (the state topic is input like any other: its decompressed size is bounded first). Pure."""
    size = (span.end - span.start + 7) // 8
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(span.bitmap, size + 1)
    except zlib.error as err:
        raise ValueError(f"the bitmap of {span.topic}/{span.partition} is not zlib data: {err}") from None
    if len(raw) != size or inflate.unconsumed_tail:
        raise ValueError(f"the bitmap of {span.topic}/{span.partition} is not {size} bytes long")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=span.end - span.start)
    return span.start + np.flatnonzero(bits)


@dataclass(frozen=True)
class Outcome:
    """One closed window: its summary (for history), what to publish, and what may be committed."""

    kind: str  # "data" | "performance"
    summary: dict[str, Any]
    drift: DriftDetected | None
    retrain: RetrainRequested | None
    decision: str
    commit: dict[tuple[str, int], int] | None = None
    state: MonitorState | None = None  # what a restarted monitor resumes from, written before `commit`
    rollback: Rollback | None = None  # the champion on probation lost: roll back (before any retrain)


def window_metrics(
    predicted: np.ndarray, truth: np.ndarray, classes: Sequence[str], confidence: float, resamples: int = 200
) -> dict[str, tuple[float, float]]:
    """A performance window's accuracy and macro F1, each with the upper end of a one-sided interval at
    `confidence` (a seeded bootstrap over the window's pairs, so the same window gives the same bound).
    A window of 150 labels with a 15 % minority class has a macro F1 that wanders by about +-0.05 from
    window to window: the bound keeps that noise from reading as drift. Pure."""
    n = len(truth)
    index = np.random.default_rng(n).integers(0, n, size=(resamples, n)) if confidence > 0.5 and n > 1 else None

    def scores(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (p == t).mean(axis=-1), macro_f1(p, t, classes)

    accuracy, f1 = (float(v) for v in scores(predicted, truth))
    if index is None:
        return {"accuracy": (accuracy, accuracy), "f1_macro": (f1, f1)}
    boot_acc, boot_f1 = scores(predicted[index], truth[index])
    return {
        "accuracy": (accuracy, float(np.quantile(boot_acc, confidence))),
        "f1_macro": (f1, float(np.quantile(boot_f1, confidence))),
    }


class Monitor:
    """The pure core: windows, the label join and the retrain policy.

    With `keep_state`, each closed data window carries a `MonitorState` (`snapshot`): what the
    I/O part writes to the state topic before it commits, and what `restore` and `rejoin` take
    back after a restart.
    """

    def __init__(self, config: PipelineConfig, champion: Champion, keep_state: bool = False) -> None:
        self.config = config
        self.keep_state = keep_state
        self.settings = config.monitor
        self.classes = [str(c) for c in config.schema.label.classes]
        self.positive = self.classes[-1] if len(self.classes) == 2 else None  # see _DataWindow.add
        self.join = LabelJoin(self.settings.label_ttl_s, self.settings.max_pending)
        self.policy = PolicyState()
        self.champion = champion
        self._window = _DataWindow()
        self._perf: list[tuple[str, str]] = []
        self._perf_started: datetime | None = None
        self._perf_records: tuple[OffsetRange, ...] = ()
        self._next: dict[tuple[str, int], int] = {}  # per partition read, the next offset: the commit
        self._resume: dict[tuple[str, int], int] = {}  # offsets below these are in a restored state
        self.records_position: tuple[OffsetRange, ...] = ()  # the records topic's ends, as last seen
        # where the records topic stood at an event time (the I/O part's RecordsPosition.at): a window
        # opens at its first prediction's position, not at the moment a lagging monitor reads it
        self.records_at: Callable[[datetime], tuple[OffsetRange, ...]] | None = None
        self.other_versions = 0  # joined pairs of another model version than the champion, left out
        self._start_probation()

    def _start_probation(self) -> None:
        on = self.config.rollback.enabled and self.champion.previous_report is not None
        self._probation = self.config.rollback.probation_windows if on else 0  # performance windows left
        self._losing: list[str] = []  # the evidence of the windows lost in a row
        self._rolled_back = False  # this champion was rolled back: until the swap, its windows count for nothing

    def note_records(self, position: tuple[OffsetRange, ...]) -> None:
        """Where the records topic stands now (its high watermarks as empty ranges); the I/O part
        tells the core before each batch, and a window remembers it from when it opened."""
        self.records_position = position

    def _position(self, at: datetime) -> tuple[OffsetRange, ...]:
        """The records topic's ends when an event of time `at` happened (as last seen, without a lookup)."""
        found = self.records_at(at) if self.records_at is not None else ()
        return found or self.records_position

    def _records_window(self, opened: tuple[OffsetRange, ...]) -> tuple[OffsetRange, ...]:
        """The records topic from where it stood when a window opened to where it stands now."""
        return records_since([opened], self.records_position)

    def set_champion(self, champion: Champion) -> None:
        """A new model is served: compare against its reference from now on, with a fresh streak."""
        if champion.version != self.champion.version:
            self.champion = champion
            self.policy = PolicyState(
                last_request_at=self.policy.last_request_at, recent_requests=self.policy.recent_requests
            )
            self._start_probation()
            self._perf, self._perf_started = [], None

    def on_predictions(self, items: Sequence[tuple[PredictionLogged, str, int, int]]) -> list[Outcome]:
        """Predictions with (topic, partition, offset), in offset order per partition."""
        out: list[Outcome] = []
        limit = self.settings.window_seconds
        for event, topic, partition, offset in items:
            key = (topic, partition)
            if offset < self._resume.get(key, 0):
                continue  # re-read after a restart, but already in the restored state
            if event.variant == "shadow":
                self._next[key] = offset + 1
                continue  # the challenger's shadow answers were not served
            w = self._window
            if limit is not None and w.started is not None and (event.occurred_at - w.started).total_seconds() >= limit:
                out.append(self._close_window())
            if self._window.size == 0:
                self._window.records_from = self._position(event.occurred_at)
            self._window.add(event, topic, partition, offset, self.positive)
            self._next[key] = offset + 1
            where = (topic, partition, offset)
            joined = self.join.add_prediction(
                event.request_id, str(event.prediction), event.occurred_at, where, event.model_version
            )
            if joined is not None:
                out.extend(self._add_joined(joined, event.occurred_at))
            if limit is None and self._window.size >= self.settings.window_size:
                out.append(self._close_window())
        return out

    def on_labels(self, items: Sequence[tuple[LabelObserved, str, int, int]]) -> list[Outcome]:
        out: list[Outcome] = []
        for event, topic, partition, offset in items:
            if offset < self._resume.get((topic, partition), 0):
                continue
            self._next[(topic, partition)] = offset + 1
            where = (topic, partition, offset)
            joined = self.join.add_label(event.request_id, str(event.label), event.occurred_at, where)
            if joined is not None:
                out.extend(self._add_joined(joined, event.occurred_at))
        return out

    def _add_joined(self, joined: tuple[str, str, str | None], at: datetime) -> list[Outcome]:
        predicted, truth, version = joined
        if version is not None and version != self.champion.version:
            self.other_versions += 1  # another model's answer (before a swap, or a canary's): not this one's record
            return []
        pair = (predicted, truth)
        if not self._perf:
            self._perf_records = self._position(at)
        self._perf.append(pair)
        self._perf_started = self._perf_started or at
        if len(self._perf) < self.settings.performance_window:
            return []
        pairs, started, records = self._perf, self._perf_started, self._records_window(self._perf_records)
        self._perf, self._perf_started = [], None
        return [self._performance(pairs, started, at, records)]

    def _performance(
        self, pairs: list[tuple[str, str]], started: datetime, ended: datetime, records: tuple[OffsetRange, ...] = ()
    ) -> Outcome:
        predicted = np.array([p for p, _ in pairs])
        truth = np.array([t for _, t in pairs])
        measured = window_metrics(predicted, truth, self.classes, self.settings.performance_confidence)
        accuracy, f1 = measured["accuracy"][0], measured["f1_macro"][0]
        tolerance = self.settings.performance_tolerance
        expected_acc = float(self.champion.report.get("accuracy", float("nan")))
        stats = tuple(
            FeatureDrift(
                feature=metric,
                statistic=metric,
                value=value,
                threshold=expected - tolerance,
                drifted=value < expected - tolerance and upper < expected,
            )
            for metric, (value, upper) in measured.items()
            for expected in [float(self.champion.report.get(metric, float("nan")))]
        )
        drifted = any(s.drifted for s in stats)
        rollback, losing = self._judge_probation(measured, started, ended)
        window_id = f"performance:{self.champion.version}:{started.isoformat()}:{len(pairs)}"
        event = (
            DriftDetected(
                event_id=deterministic_id(self.config.name, "drift", window_id),
                occurred_at=ended,
                pipeline=self.config.name,
                window_start=started,
                window_end=ended,
                window_size=len(pairs),
                offsets=(),
                statistics=stats,
                kind="performance",
                records=records,
            )
            if drifted
            else None
        )
        before = self.policy
        decision = self._decide(
            WindowResult(len(pairs), drifted, ended, window_id, started, event, kinds=("performance",), records=records)
        )
        if losing:  # a champion losing its probation is rolled back, not retrained: this window does not count
            self.policy = before
            decision = Decision(False, "the champion on probation is losing to the previous one: no retrain", before)
        summary = {
            "kind": "performance",
            "start": started.isoformat(),
            "end": ended.isoformat(),
            "size": len(pairs),
            "model_version": self.champion.version,
            "accuracy": accuracy,
            "f1_macro": f1,
            "accuracy_upper": measured["accuracy"][1],
            "f1_macro_upper": measured["f1_macro"][1],
            "expected_accuracy": expected_acc,
            "drifted": drifted,
            "probation": {"losing": len(self._losing), "windows_left": self._probation} if losing or rollback else None,
        }
        reason = rollback.reason if rollback else decision.reason
        return Outcome("performance", summary, event, decision.request, reason, rollback=rollback)

    def _judge_probation(
        self, measured: Mapping[str, tuple[float, float]], started: datetime, ended: datetime
    ) -> tuple[Rollback | None, bool]:
        """On probation, hold a performance window to the previous champion's validation report:
        (the rollback, when `rollback.consecutive` windows in a row lost; whether this one lost)."""
        previous, champion = self.champion.previous_report, self.champion
        if self._rolled_back:
            return None, True
        if self._probation <= 0 or previous is None or champion.previous is None:
            return None, False
        self._probation -= 1
        tolerance = self.settings.performance_tolerance
        lost = [
            f"{metric} {value:.3f} (at most {upper:.3f}) against {float(previous[metric]):.3f}"
            for metric, (value, upper) in measured.items()
            if metric in previous and value < float(previous[metric]) - tolerance and upper < float(previous[metric])
        ]
        if not lost:
            self._losing = []
            return None, False
        self._losing.append(f"{started.isoformat()}..{ended.isoformat()}: {', '.join(lost)}")
        if len(self._losing) < self.config.rollback.consecutive:
            return None, True
        reason = (
            f"version {champion.version} on probation lost {len(self._losing)} live performance windows in a row "
            f"to version {champion.previous}'s validation report (tolerance {tolerance}): " + "; ".join(self._losing)
        )
        self._probation, self._losing, self._rolled_back = 0, [], True
        return Rollback(champion.version, champion.previous, reason[:2000]), True

    def _close_window(self) -> Outcome:
        w, self._window = self._window, _DataWindow()
        s = self.settings
        report = compare(
            self.champion.reference, w.columns, alpha=s.alpha, psi_threshold=s.psi_threshold, correction=s.correction
        )
        stats = []
        for f in report.features:
            stats.append(
                FeatureDrift(
                    feature=f.name,
                    statistic=f.test,
                    value=float(f.statistic),
                    threshold=s.alpha,
                    drifted=f.drifted,
                    p_value=_finite(f.adjusted_p_value),
                )
            )
            stats.append(
                FeatureDrift(
                    feature=f.name,
                    statistic="psi",
                    value=float(f.psi),
                    threshold=s.psi_threshold,
                    drifted=f.psi >= s.psi_threshold,
                )
            )

        drifted_features = [f.name for f in report.features if f.drifted]
        records = self._records_window(w.records_from)
        kind: Literal["data", "prediction"] = "prediction" if drifted_features == [PREDICTION] else "data"
        assert w.started is not None and w.ended is not None
        event = None
        if drifted_features:
            event = DriftDetected(
                event_id=deterministic_id(self.config.name, "drift", w.window_id()),
                occurred_at=w.ended,
                pipeline=self.config.name,
                window_start=w.started,
                window_end=w.ended,
                window_size=w.size,
                offsets=w.ranges(),
                statistics=tuple(stats),
                kind=kind,
                records=records,
            )
        drifted_kinds: list[Literal["data", "prediction"]] = []
        if any(f != PREDICTION for f in drifted_features):
            drifted_kinds.append("data")
        if PREDICTION in drifted_features:
            drifted_kinds.append("prediction")
        result = WindowResult(w.size, bool(drifted_features), w.ended, w.window_id(), w.started, event,
                              kinds=("data", "prediction"), drifted_kinds=tuple(drifted_kinds),
                              records=records)  # fmt: skip
        decision = self._decide(result)
        commit = dict(self._next)
        summary = {
            "kind": "data",
            "start": w.started.isoformat(),
            "end": w.ended.isoformat(),
            "size": w.size,
            "model_version": self.champion.version,
            "drifted": bool(drifted_features),
            "drifted_features": drifted_features,
            "features": {
                f.name: {
                    "test": f.test,
                    "statistic": f.statistic,
                    "p_value": f.adjusted_p_value,
                    "psi": f.psi,
                    "drifted": f.drifted,
                }
                for f in report.features
            },
            "offsets": {f"{t}/{p}": span for (t, p), span in sorted(w.offsets.items())},
        }
        state = self.snapshot(w.ended) if self.keep_state else None
        return Outcome("data", summary, event, decision.request, decision.reason, commit, state)

    def _decide(self, result: WindowResult) -> Decision:
        decision = decide(self.config.name, self.config.retrain, self.policy, result)
        self.policy = decision.state
        return decision

    def snapshot(self, at: datetime) -> MonitorState:
        """The state beyond the committed offsets, now (see `MonitorState`). It must fit in one
        record: while it does not, the oldest waiting entries of the label join are forgotten
        (counted in `evicted`, and logged)."""
        cut = tuple(OffsetRange(topic=t, partition=p, start=o, end=o) for (t, p), o in sorted(self._next.items()))
        name = ",".join(f"{r.topic}/{r.partition}:{r.end}" for r in cut)
        policy, limit = self.policy, self.config.kafka.max_record_bytes
        while True:
            try:
                pending = pending_spans(self.join.waiting())
                state = MonitorState(
                    event_id=deterministic_id(self.config.name, "state", name), occurred_at=at,
                    pipeline=self.config.name, model_version=self.champion.version, cut=cut,
                    streaks=dict(policy.streaks), streak_started=dict(policy.streak_started),  # type: ignore[arg-type]
                    streak_records=dict(policy.streak_records),  # type: ignore[arg-type]
                    last_request_at=policy.last_request_at, recent_requests=policy.recent_requests,
                    performance=tuple(self._perf), performance_started=self._perf_started,
                    performance_records=self._perf_records, pending=pending,
                    joined=self.join.joined, expired=self.join.expired, evicted=self.join.evicted,
                )  # fmt: skip
                if len(encode_event(state)) <= limit:
                    return state
            except ValueError:  # a pending span longer than a state may hold
                pass
            if not self.join.pending:  # the performance window alone is too big: keep the rest
                log.warning("the monitor's state is over %d bytes without its performance window", limit)
                return msgspec.structs.replace(state, performance=(), performance_started=None)
            dropped = max(1, self.join.pending // 10)
            log.warning("the monitor's state is over %d bytes: forgetting the %d oldest of %d waiting entries",
                        limit, dropped, self.join.pending)  # fmt: skip
            self.join.evict_oldest(dropped)

    def restore(
        self, state: MonitorState, committed: Mapping[tuple[str, int], int]
    ) -> tuple[str, tuple[PendingSpan, ...]]:
        """Take back a snapshot written before a restart, given the offsets the group committed.

        The snapshot is written before its offsets are committed, so it may be ahead of them (a
        crash in between): what the consumer then re-reads below its cut is skipped. A snapshot
        behind the commits is stale (someone else consumed since) and is not taken. Returns what
        was done, in words, and the spans whose marked records go back into the label join
        (`rejoin`)."""
        cut = {(r.topic, r.partition): r.end for r in state.cut}
        if state.pipeline != self.config.name:
            return f"fresh: the newest state is pipeline {state.pipeline!r}'s", ()
        behind = sorted(f"{t}/{p}" for (t, p), o in committed.items() if o > cut.get((t, p), 0))
        if behind:
            return f"fresh: the newest state is older than the offsets committed on {', '.join(behind)}", ()
        self._resume, self._next = dict(cut), dict(cut)
        same_model = state.model_version == self.champion.version
        self.policy = PolicyState(
            streaks={str(k): v for k, v in state.streaks.items()} if same_model else {},
            streak_started={str(k): v for k, v in state.streak_started.items()} if same_model else {},
            streak_records={str(k): v for k, v in state.streak_records.items()} if same_model else {},
            last_request_at=state.last_request_at,
            recent_requests=state.recent_requests,
        )
        known = set(self.classes)
        pairs = [(p, t) for p, t in state.performance if t in known]
        if same_model and len(pairs) == len(state.performance):
            self._perf, self._perf_started = pairs, state.performance_started
            self._perf_records = state.performance_records
        self.join.joined += state.joined
        self.join.expired += state.expired
        self.join.evicted += state.evicted
        streaks = ", ".join(f"{k} {v}" for k, v in sorted(self.policy.streaks.items())) or "none"
        note = "" if same_model else f" (streaks and the performance window were for model {state.model_version})"
        where = ", ".join(f"{t}/{p}:{o}" for (t, p), o in sorted(cut.items()))
        return (f"restored the state at {where}: streaks {streaks}, {len(self._perf)} labelled predictions "
                f"of a performance window{note}"), state.pending  # fmt: skip

    def rejoin(
        self, spans: Sequence[PendingSpan], items: Sequence[tuple[PredictionLogged | LabelObserved, str, int, int]]
    ) -> list[Outcome]:
        """Records re-read from a restored state's pending spans: those the bitmaps mark go back
        into the label join (in event-time order, as the join's time-to-live wants)."""
        marked = {(s.topic, s.partition): set(span_offsets(s).tolist()) for s in spans}
        chosen = [i for i in items if i[3] in marked.get((i[1], i[2]), ())]
        out: list[Outcome] = []
        for event, topic, partition, offset in sorted(chosen, key=lambda i: i[0].occurred_at):
            where = (topic, partition, offset)
            if isinstance(event, PredictionLogged):
                if event.variant == "shadow":
                    continue
                joined = self.join.add_prediction(
                    event.request_id, str(event.prediction), event.occurred_at, where, event.model_version
                )
            else:
                joined = self.join.add_label(event.request_id, str(event.label), event.occurred_at, where)
            if joined is not None:
                out.extend(self._add_joined(joined, event.occurred_at))
        return out


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def load_champion(config: PipelineConfig, registry: Any, version: str | None = None) -> Champion:
    """The champion's (or `version`'s) reference and validation report, from its artifact."""
    import json
    import tempfile
    from pathlib import Path

    chosen = version or registry.alias("champion")
    if chosen is None:
        raise LookupError(f"model {registry.name!r} has no champion yet: nothing to monitor against")
    with tempfile.TemporaryDirectory() as folder:
        path = registry.download(chosen, Path(folder))
        profile = json.loads((path / "profile.json").read_text())
        report = json.loads((path / "report.json").read_text())
    if "reference" not in profile:
        raise ValueError(f"model version {chosen} has no drift reference in its profile (trained before monitoring?)")
    previous, previous_report = _probation_of(registry, str(chosen))
    return Champion(str(chosen), Reference.from_json(profile["reference"]), report, previous, previous_report)


def _probation_of(registry: Any, version: str) -> tuple[str | None, Mapping[str, Any] | None]:
    """The version `version` replaced and the bar its probation holds it to, when `version`
    came by a promotion (not by a rollback: `previous` then names a version rolled back from).
    The bar is what the gate measured: the previous champion on the new one's holdout, the same
    recent data (after a drift, the old version's own report is a bar the world no longer
    allows); without that record, the previous version's own validation report."""
    import json
    import tempfile
    from pathlib import Path

    from jobs.registry import PREVIOUS, PREVIOUS_SEEN_TAG, ROLLED_BACK_TAG

    previous = registry.alias(PREVIOUS)
    if previous is None or previous == version:
        return None, None
    try:
        if registry.client.get_model_version(registry.name, previous).tags.get(ROLLED_BACK_TAG):
            return None, None
        seen = registry.client.get_model_version(registry.name, version).tags.get(PREVIOUS_SEEN_TAG)
        if seen:
            bar = json.loads(seen)
            if isinstance(bar, dict) and all(isinstance(v, int | float) for v in bar.values()):
                return str(previous), bar
        with tempfile.TemporaryDirectory() as folder:
            report = json.loads((registry.download(previous, Path(folder)) / "report.json").read_text())
    except Exception as err:  # no probation rather than no monitor: say so
        log.warning("no probation for version %s: version %s's report cannot be read: %s", version, previous, err)
        return None, None
    return str(previous), report


@dataclass
class MonitorStats:
    windows: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_WINDOWS_KEPT))
    drift_events: int = 0
    retrain_requests: int = 0
    predictions: int = 0
    labels: int = 0
    resumed: str | None = None  # what state the monitor took back at its start, in words
    rollbacks: int = 0  # champions on probation it rolled back
    deliveries: list[dict[str, Any]] = field(default_factory=list)  # each delivery step it ended, and how


@dataclass(frozen=True)
class MonitorReport:
    """What `MonitorService.stats()` answers across the Ray boundary (`combined` adds up several)."""

    windows: tuple[dict[str, Any], ...]  # each window's summary (see `Outcome.summary`), oldest first
    drift_events: int
    retrain_requests: int
    predictions: int
    labels: int
    rollbacks: int
    resumed: str | None
    error: str | None
    running: bool
    deliveries: tuple[dict[str, Any], ...] = ()

    @staticmethod
    def combined(parts: list[MonitorReport]) -> MonitorReport:
        """The reports of a pipeline's monitor actors as one (each holds some of the partitions)."""
        return MonitorReport(
            windows=tuple(sorted((w for p in parts for w in p.windows), key=lambda w: w["end"])),
            drift_events=sum(p.drift_events for p in parts),
            retrain_requests=sum(p.retrain_requests for p in parts),
            predictions=sum(p.predictions for p in parts),
            labels=sum(p.labels for p in parts),
            rollbacks=sum(p.rollbacks for p in parts),
            resumed="; ".join(p.resumed for p in parts if p.resumed) or None,
            error=next((p.error for p in parts if p.error), None),
            running=all(p.running for p in parts),
            deliveries=tuple(d for p in parts for d in p.deliveries),
        )


def run_monitor(config: PipelineConfig, tracking_uri: str, stop: threading.Event, stats: MonitorStats) -> None:
    """Consume predictions and labels until `stop`; publish drift and retrain events."""
    from jobs.registry import ModelRegistry
    from streams.kafka import ensure_topics

    topics = Topics.of(config)
    ensure_topics(config.kafka, [topics.predictions, topics.labels, topics.drift, topics.retrain, topics.dlq,
                                 topics.state, topics.models])  # fmt: skip
    registry = ModelRegistry(config, tracking_uri)
    live: dict[str, Any] = {}  # the consumer and the records position, once there is a champion

    def probe() -> dict[str, Any]:
        consumer, position = live.get("consumer"), live.get("position")
        if consumer is None or position is None:
            return {"waiting_for": "a champion to monitor against (none is promoted yet)"}
        return {"last_poll": consumer.last_poll, "polled": consumer.stats.polled, "resumed": stats.resumed,
                "dead_lettered": consumer.stats.dead_lettered, "records_position": position.fresh_at}  # fmt: skip

    beat = Heartbeat(config.kafka, topics.heartbeats, config.name, "monitor", probe)
    try:
        _monitor_loop(config, registry, stop, stats, topics, live)
    finally:
        beat.close()


def _monitor_loop(
    config: PipelineConfig, registry: Any, stop: threading.Event, stats: MonitorStats, topics: Topics,
    live: dict[str, Any],
) -> None:  # fmt: skip
    """`run_monitor`'s body: wait for a champion, take back the state a previous run left (with
    one monitor actor), then consume (what it runs is put in `live`)."""
    from jobs.monitor_metrics import MonitorMetrics
    from streams.kafka import Batch, Producer, StreamConsumer
    from streams.serde import LabelRecordCodec, decode_events, events_or_label_records

    metrics = MonitorMetrics(config.name)  # what it decides, for Prometheus (through Ray's metrics)
    keep_state = config.monitor.actors == 1  # with more, each holds partitions the group may reassign
    monitor: Monitor | None = None
    while monitor is None and not stop.is_set():
        try:
            monitor = Monitor(config, load_champion(config, registry), keep_state=keep_state)
        except LookupError as err:
            log.info("%s; waiting", err)
            stop.wait(2.0)
    if monitor is None:
        return
    checked = time.monotonic()
    producer = Producer(config.kafka, client_id=f"{config.name}.monitor")
    consumer: StreamConsumer
    position = RecordsPosition(config.kafka, topics.records)
    monitor.records_at = lambda when: position.at(when.timestamp())
    decoder: Any = decode_events
    if config.topics.labels_format == "record":
        decoder = events_or_label_records(LabelRecordCodec(config.schema, config.name, config.kafka.max_record_bytes))

    def rollback(decided: Rollback) -> None:
        """Point `champion` back (only if the losing version still holds it); ModelRolledBack on the models topic."""
        done = registry.rollback(
            decided.reason, publish=lambda e: producer.send_event(topics.models, e), only_from=decided.from_version
        )
        if done is None:
            log.info("no rollback of %s: it is no longer the champion", decided.from_version)
            return
        stats.rollbacks += 1
        metrics.count("driftloop_rollbacks_total")
        log.warning("rolled back %s -> %s: %s", done[0], done[1], decided.reason)

    def publish(outcomes: list[Outcome]) -> None:
        """Send what the windows decided; with a data window's close, its state, then the commit."""
        for o in outcomes:
            if o.drift is not None:
                producer.send_event(topics.drift, o.drift)
                stats.drift_events += 1
                metrics.count("driftloop_drift_events_total")
            if o.rollback is not None:
                rollback(o.rollback)
            if o.retrain is not None:
                producer.send_event(topics.retrain, o.retrain)
                stats.retrain_requests += 1
                metrics.count("driftloop_retrain_requests_total")
                log.info("retrain requested (%s): %s", o.retrain.event_id, o.decision)
            stats.windows.append(o.summary | {"decision": o.decision, "retrain": o.retrain is not None})
            metrics.window(o.summary)
        commits = [o for o in outcomes if o.commit]
        if commits:
            producer.flush()  # the events first: a state or a commit never gets ahead of them
            if commits[-1].state is not None:
                producer.send_event(topics.state, commits[-1].state)
                producer.flush()
            consumer.commit(commits[-1].commit or {})

    trial: LiveComparison | None = None  # the challenger's delivery step, while one runs
    join_seen: dict[str, int] = {}  # the label join's counts at the last export
    group = f"{config.name}.monitor"

    def follow_delivery() -> None:
        """The challenger's step, from the registry: a new one starts a new live comparison."""
        nonlocal trial
        found = registry.delivery()
        if found is None:
            trial = None
        elif trial is None or (trial.candidate, trial.step) != found[:2]:
            trial = LiveComparison(candidate=found[0], step=found[1], started_at=found[2])
            log.info("judging version %s live on its %s step", found[0], found[1])

    def judge_delivery() -> None:
        """End the step when the evidence says so: the next step (or champion), or a rejection."""
        nonlocal trial
        if trial is None:
            return
        verdict = trial.verdict(config.delivery, time.time())
        if verdict.action == "hold":
            return
        send = lambda e: producer.send_event(topics.models, e)  # noqa: E731
        if verdict.action == "advance":
            to = next_step(config.delivery, trial.step)
            done = registry.advance(trial.candidate, to, verdict.evidence, verdict.reason, publish=send) is not None
        else:
            to = "rejected"
            done = registry.reject_challenger(trial.candidate, verdict.reason, verdict.evidence, publish=send)
        producer.flush()
        if done:
            stats.deliveries.append({"version": trial.candidate, "step": trial.step, "to": to,
                                     "reason": verdict.reason, "evidence": verdict.evidence})  # fmt: skip
            metrics.count("driftloop_delivery_steps_total", step=trial.step, outcome=to)
            log.warning("version %s's %s step ended -> %s: %s", trial.candidate, trial.step, to, verdict.reason)
        trial = None
        follow_delivery()

    def handle(batch: Batch) -> None:
        nonlocal checked
        assert monitor is not None
        monitor.note_records(position.now())
        if time.monotonic() - checked > 2.0:  # follow promotions, rollbacks and deliveries
            checked = time.monotonic()
            current = registry.alias("champion")
            if current is not None and current != monitor.champion.version:
                monitor.set_champion(load_champion(config, registry, current))
                log.info("monitoring against model version %s now", current)
            if config.delivery.steps:
                follow_delivery()
        outcomes: list[Outcome] = []
        for chunk in batch.chunks:
            items = [
                (v, chunk.topic, chunk.partition, r.offset) for r, v in zip(chunk.records, chunk.values, strict=True)
            ]
            if chunk.topic == topics.predictions:
                preds = [i for i in items if isinstance(i[0], PredictionLogged)]
                if trial is not None:
                    for p, *_ in preds:
                        trial.on_prediction(p.request_id, p.model_version, p.variant, p.prediction)
                stats.predictions += len(preds)
                metrics.count("driftloop_monitored_total", len(preds), topic="predictions")
                outcomes += monitor.on_predictions(preds)
            elif chunk.topic == topics.labels:
                labels = [i for i in items if isinstance(i[0], LabelObserved)]
                if trial is not None:
                    for label, *_ in labels:
                        trial.on_label(label.request_id, label.label)
                stats.labels += len(labels)
                metrics.count("driftloop_monitored_total", len(labels), topic="labels")
                outcomes += monitor.on_labels(labels)
        publish(outcomes)
        judge_delivery()
        metrics.join(monitor.join, join_seen)
        metrics.lag(group, consumer.stats.lag)

    consumer = StreamConsumer(
        config.kafka,
        [topics.predictions, topics.labels],
        decoder,
        handle,
        group_id=group,
        dlq_topic=topics.dlq,
        commit_each_batch=False,
    )
    try:
        if keep_state:
            stats.resumed, outcomes = resume_state(config, monitor, topics, decoder, producer)
            log.info("monitor state: %s", stats.resumed)
            publish(outcomes)
        else:
            stats.resumed = f"fresh: no state is kept with monitor.actors {config.monitor.actors} > 1"
    except BaseException:
        consumer.close()
        producer.close()
        position.close()
        raise

    live.update(consumer=consumer, position=position)
    try:
        consume_until(stop, consumer)
    finally:
        producer.close()
        position.close()


def resume_state(
    config: PipelineConfig, monitor: Monitor, topics: Topics, decoder: Any, producer: Any
) -> tuple[str, list[Outcome]]:
    """Take back the newest state on the state topic (see `Monitor.restore`) and re-read the
    label join's waiting records; returns what was done, in words, and any outcomes. A state
    record that does not decode goes to the DLQ with its reason and the next newer one is
    used; an unreachable broker raises (the actor restarts and tries again)."""
    from streams.kafka import committed_offsets, dead_letter
    from streams.kafka_source import poll_range, read_tail

    states: list[tuple[tuple[int, int], MonitorState]] = []
    bad = []
    for record in read_tail(config.kafka, topics.state, last=4):
        (value,) = decode_state([record.value], config.kafka.max_record_bytes)
        if isinstance(value, MonitorState):
            states.append(((record.timestamp, record.offset), value))
        elif value is not None:
            bad.append((record, value))
    if bad:
        dead_letter(producer, topics.dlq, bad)
    if not states:
        return "fresh: no state on " + topics.state, []
    _, state = max(states, key=lambda s: s[0])
    committed = committed_offsets(config.kafka, f"{config.name}.monitor", [topics.predictions, topics.labels])
    said, spans = monitor.restore(state, committed)
    items: list[tuple[Any, str, int, int]] = []
    lost = 0
    for span in spans:
        marked = len(span_offsets(span))
        try:
            whole = OffsetRange(topic=span.topic, partition=span.partition, start=span.start, end=span.end)
            for records in poll_range(config.kafka, whole, timeout_s=60.0):
                for r, v in zip(records, decoder([r.value for r in records]), strict=True):
                    if isinstance(v, PredictionLogged | LabelObserved):
                        items.append((v, span.topic, span.partition, r.offset))
        except Exception as err:  # deleted by retention: those entries are forgotten, and counted
            log.warning("re-reading the label join's waiting records: %s", err)
            lost += marked
    monitor.join.expired += lost
    outcomes = monitor.rejoin(spans, items)
    waiting = f"; {monitor.join.pending} predictions and labels wait for their match again" if spans else ""
    return said + waiting + (f" ({lost} could not be re-read)" if lost else ""), outcomes


def decode_state(payloads: list[bytes | None], max_bytes: int) -> list[Any]:
    """The state topic's records: a `MonitorState`, a `DecodeError` (to the DLQ), or None (another
    event type, which has no business there but harms nothing)."""
    from streams.errors import DecodeError
    from streams.serde import decode_events

    return [v if isinstance(v, MonitorState | DecodeError) else None for v in decode_events(payloads, max_bytes)]


class RecordsPosition:
    """The records topic's high watermarks, as fresh as about `every_s`, without blocking the monitor.

    A thread reads them (from fetch responses, with a new consumer each time: a reused one
    answers the high watermark of its last fetch, which can be long stale) and `now()` returns
    the latest answer at once. An unreachable broker keeps the last answer (and says so in the
    log): the monitor goes on, and a retrain then starts its data a little later.
    """

    def __init__(self, kafka: Any, topic: str, every_s: float = 1.0) -> None:
        self.kafka, self.topic, self.every_s = kafka, topic, every_s
        self._last: tuple[OffsetRange, ...] = ()
        self.fresh_at: float | None = None  # wall time of the last answer (the monitor's heartbeat says it)
        # (wall time, ends) of the last hour's answers: where the topic stood when a prediction was
        # made, which a monitor that lags behind its topics must not take from "now"
        self._history: deque[tuple[float, tuple[OffsetRange, ...]]] = deque(maxlen=int(3600 / max(every_s, 0.1)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="records-position", daemon=True)
        self._thread.start()

    def now(self) -> tuple[OffsetRange, ...]:
        return self._last

    def at(self, when: float) -> tuple[OffsetRange, ...]:
        """The newest answer read at or before wall time `when` (the oldest kept if all are later;
        `now()` when there is none yet)."""
        history = list(self._history)
        if not history:
            return self._last
        i = bisect.bisect_right([t for t, _ in history], when)
        return history[max(i - 1, 0)][1]

    def _run(self) -> None:
        from streams.kafka_source import high_watermarks

        while not self._stop.is_set():
            try:
                ends = high_watermarks(self.kafka, self.topic, timeout_s=5.0)
            except Exception as err:  # the broker is away: keep the last position
                log.warning("records topic %s: no high watermarks (%s); keeping the last ones", self.topic, err)
            else:
                self._last = tuple(
                    OffsetRange(topic=self.topic, partition=p, start=end, end=end) for p, end in sorted(ends.items())
                )
                self.fresh_at = time.time()
                self._history.append((self.fresh_at, self._last))
            self._stop.wait(self.every_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class MonitorService(Service):
    """The monitor as a long-running service (the body of a Ray actor: `ray.remote(MonitorService)`)."""

    def __init__(self, config: PipelineConfig, tracking_uri: str) -> None:
        self._stats = MonitorStats()
        super().__init__("monitor", lambda stop: run_monitor(config, tracking_uri, stop, self._stats))

    def stats(self) -> MonitorReport:
        s = self._stats
        return MonitorReport(tuple(s.windows), s.drift_events, s.retrain_requests, s.predictions, s.labels,
                             s.rollbacks, s.resumed, self.error, self.running, tuple(s.deliveries))  # fmt: skip
