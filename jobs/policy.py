"""The retrain policy: whether a drift window turns into a retraining job. Pure.

Fed one window result at a time (`decide`), it answers a `Decision` and the state to keep for
the next window. Each drift kind (`data`, `prediction`, `performance`) keeps a streak of its own:
a data window measures the data and the prediction kinds, a performance window (delayed labels)
the performance kind, and a healthy window resets only the streaks of the kinds it measured (a
healthy performance window no longer hides data drift while labels flow). Rules, in order:

1. a window smaller than `min_window` records decides nothing (and does not break a streak);
2. a kind's streak counts once it reaches `consecutive` drifted windows in a row; the kinds in
   `retrain.triggers` count towards a retrain, and `retrain.combine` says how: `any` (one
   kind's streak is enough) or `all` (every listed kind's streak at once);
3. after a retrain request, none for `cooldown_s` (the new model needs time to be trained,
   promoted and observed);
4. at most `max_per_hour` requests in any hour (a broken upstream cannot retrain forever).

The request's data window starts where the earliest triggering streak's first drifted window
started, so the retraining job can learn from the drifted data only: as Kafka offsets of the
records topic (`records`: where it stood when that window opened, to where it stands now), and
as event time (`data_start`, kept for users who configure time windows).

A decision to retrain carries a deterministic event id derived from the pipeline and the
offsets of the window that tipped it, so the same window replayed (a monitor restarted before
it committed) asks for the same retrain, which the controller runs once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from streams.config import DriftKind, RetrainSettings
from streams.events import DriftDetected, OffsetRange, RetrainRequested, deterministic_id

__all__ = ["Decision", "PolicyState", "WindowResult", "decide", "records_since"]


@dataclass(frozen=True)
class WindowResult:
    """What the monitor saw in one window: the kinds it measured, and which of them drifted."""

    size: int
    drifted: bool
    ended_at: datetime
    window_id: str  # a stable name of the window: its offsets
    started_at: datetime | None = None
    event: DriftDetected | None = None
    kinds: tuple[DriftKind, ...] = ("data",)
    drifted_kinds: tuple[DriftKind, ...] | None = None  # None: all of `kinds` when `drifted`
    records: tuple[OffsetRange, ...] = ()  # the records topic, from the window's open to its close

    @property
    def drifted_in(self) -> tuple[DriftKind, ...]:
        if not self.drifted:
            return ()
        return self.drifted_kinds if self.drifted_kinds is not None else self.kinds


@dataclass(frozen=True)
class PolicyState:
    streaks: Mapping[str, int] = field(default_factory=dict)  # drifted windows in a row, per kind
    streak_started: Mapping[str, datetime] = field(default_factory=dict)  # where each streak began
    streak_records: Mapping[str, tuple[OffsetRange, ...]] = field(default_factory=dict)  # ... in the records topic
    last_request_at: datetime | None = None
    recent_requests: tuple[datetime, ...] = field(default=())


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reason: str
    state: PolicyState
    request: RetrainRequested | None = None


def decide(pipeline: str, settings: RetrainSettings, state: PolicyState, window: WindowResult) -> Decision:
    """The decision for `window`, given what came before (`state`)."""
    if window.size < settings.min_window:
        return Decision(False, f"window of {window.size} < min_window {settings.min_window}", state)
    streaks, started, positions = dict(state.streaks), dict(state.streak_started), dict(state.streak_records)
    drifted = window.drifted_in
    for kind in window.kinds:
        if kind in drifted:
            streaks[kind] = streaks.get(kind, 0) + 1
            if window.started_at is not None:
                started.setdefault(kind, window.started_at)
            if window.records:
                positions.setdefault(kind, window.records)
        else:
            streaks.pop(kind, None)
            started.pop(kind, None)
            positions.pop(kind, None)
    state = replace(state, streaks=streaks, streak_started=started, streak_records=positions)
    if not drifted:
        return Decision(False, "no drift", state)
    ready = [k for k in settings.triggers if streaks.get(k, 0) >= settings.consecutive]
    if settings.combine == "all" and len(ready) < len(settings.triggers):
        ready = []
    if not ready:
        counts = ", ".join(f"{k} {streaks.get(k, 0)}/{settings.consecutive}" for k in settings.triggers)
        ignored = [k for k in drifted if k not in settings.triggers]
        note = f"; {', '.join(ignored)} drift does not trigger (retrain.triggers)" if ignored else ""
        return Decision(False, f"drifted windows ({settings.combine} of: {counts}){note}", state)
    now = window.ended_at
    if state.last_request_at is not None and now - state.last_request_at < timedelta(seconds=settings.cooldown_s):
        left = settings.cooldown_s - (now - state.last_request_at).total_seconds()
        return Decision(False, f"cooling down ({left:.0f}s left)", state)
    hour_ago = now - timedelta(hours=1)
    recent = tuple(t for t in state.recent_requests if t > hour_ago)
    if len(recent) >= settings.max_per_hour:
        return Decision(False, f"{len(recent)} retrains in the last hour (max_per_hour {settings.max_per_hour})",
                        replace(state, recent_requests=recent))  # fmt: skip
    cause = "; ".join(f"{streaks[k]} consecutive drifted {k} windows" for k in ready) + (
        f"; drifted: {', '.join(window.event.drifted_features)}" if window.event is not None else ""
    )
    starts = [started[k] for k in ready if k in started]
    request = RetrainRequested(
        event_id=deterministic_id(pipeline, "retrain", window.window_id),
        occurred_at=now,
        pipeline=pipeline,
        cause=cause,
        data_start=min(starts) if starts else None,
        data_end=now,
        drift_event_id=window.event.event_id if window.event is not None else None,
        records=records_since([positions[k] for k in ready if k in positions], window.records),
    )
    return Decision(True, cause, PolicyState(last_request_at=now, recent_requests=(*recent, now)), request)


def records_since(starts: list[tuple[OffsetRange, ...]], now: tuple[OffsetRange, ...]) -> tuple[OffsetRange, ...]:
    """Per partition of the records topic: from the earliest streak's start to where it is now."""
    begin: dict[tuple[str, int], int] = {}
    for ranges in starts:
        for r in ranges:
            key = (r.topic, r.partition)
            begin[key] = min(begin.get(key, r.start), r.start)
    end = {(r.topic, r.partition): r.end for r in now}
    return tuple(
        OffsetRange(topic=t, partition=p, start=a, end=max(a, end.get((t, p), a)))
        for (t, p), a in sorted(begin.items())
    )
