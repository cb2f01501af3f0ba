"""The retrain policy: whether a drift window turns into a retraining job. Pure.

Fed one window result at a time (`observe`), it answers a `Decision` and the state to keep for
the next window. Rules, in order:

1. a window smaller than `min_window` records decides nothing (and does not break a streak);
2. `consecutive` drifted windows in a row are needed: one noisy window does not retrain;
3. after a retrain request, none for `cooldown_s` (the new model needs time to be trained,
   promoted and observed);
4. at most `max_per_hour` requests in any hour (a broken upstream cannot retrain forever).

The request's data window starts where the streak's first drifted window started, so the
retraining job can learn from the drifted data only.

A decision to retrain carries a deterministic event id derived from the pipeline and the
offsets of the window that tipped it, so the same window replayed (a monitor restarted before
it committed) asks for the same retrain, which the controller runs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from streams.config import RetrainSettings
from streams.events import DriftDetected, RetrainRequested, deterministic_id

__all__ = ["Decision", "PolicyState", "WindowResult", "decide"]


@dataclass(frozen=True)
class WindowResult:
    """What the monitor saw in one window."""

    size: int
    drifted: bool
    ended_at: datetime
    window_id: str  # a stable name of the window: its offsets
    started_at: datetime | None = None
    event: DriftDetected | None = None


@dataclass(frozen=True)
class PolicyState:
    streak: int = 0
    streak_started: datetime | None = None  # where the first drifted window of the streak began
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
    if not window.drifted:
        return Decision(False, "no drift", replace(state, streak=0, streak_started=None))
    streak = state.streak + 1
    state = replace(state, streak=streak, streak_started=state.streak_started or window.started_at)
    if streak < settings.consecutive:
        return Decision(False, f"drifted window {streak} of {settings.consecutive} needed", state)
    now = window.ended_at
    if state.last_request_at is not None and now - state.last_request_at < timedelta(seconds=settings.cooldown_s):
        left = settings.cooldown_s - (now - state.last_request_at).total_seconds()
        return Decision(False, f"cooling down ({left:.0f}s left)", state)
    hour_ago = now - timedelta(hours=1)
    recent = tuple(t for t in state.recent_requests if t > hour_ago)
    if len(recent) >= settings.max_per_hour:
        return Decision(False, f"{len(recent)} retrains in the last hour (max_per_hour {settings.max_per_hour})",
                        replace(state, recent_requests=recent))  # fmt: skip
    cause = f"{streak} consecutive drifted windows" + (
        f"; drifted: {', '.join(window.event.drifted_features)}" if window.event is not None else ""
    )
    request = RetrainRequested(
        event_id=deterministic_id(pipeline, "retrain", window.window_id),
        occurred_at=now,
        pipeline=pipeline,
        cause=cause,
        data_start=state.streak_started,
        data_end=now,
        drift_event_id=window.event.event_id if window.event is not None else None,
    )
    return Decision(True, cause, PolicyState(0, None, now, (*recent, now)), request)
