"""Progressive delivery: a model that passed the gate proves itself live before it is champion. Pure.

With `delivery.steps` (e.g. `[shadow, canary]`) the gate does not move `champion`: it points
the `challenger` alias at the new version and announces the first step (`DeliveryStep` on the
models topic), and Serve's replicas load it beside the champion (`serving.app`). The monitor
then keeps a `LiveComparison` for the step: each served prediction of the candidate and of the
champion, joined by request id to its delayed label. `judge_step` decides, for each label that
arrives, whether the step goes on, ends in the next step (the last one ends in champion), or
ends the candidate:

1. fewer than `min_labeled` labeled predictions of the candidate, or of the champion: hold,
   unless the step has run `max_step_s` (then reject: no verdict in time);
2. the candidate's live accuracy at least the champion's on the same traffic, less `tolerance`:
   advance;
3. worse than that by more than the noise (two standard errors of the difference): reject;
4. in between: hold for more evidence, until `max_step_s` (then reject: not shown as good).

In `shadow` both models score the same requests; in `canary` each request is answered by one
of them, the same stretch of traffic.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from streams.config import DeliverySettings

__all__ = ["LiveComparison", "StepVerdict", "Tally", "judge_step", "next_step"]

MAX_PENDING = 200_000  # predictions waiting for their label; the oldest are forgotten beyond it


@dataclass
class Tally:
    """Labeled predictions of one model during a step."""

    n: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else math.nan


@dataclass(frozen=True)
class StepVerdict:
    action: Literal["hold", "advance", "reject"]
    reason: str
    evidence: dict[str, float]


def next_step(settings: DeliverySettings, step: str) -> str:
    """The step after `step`: the next of `delivery.steps`, or `champion` after the last."""
    steps = list(settings.steps)
    i = steps.index(step) if step in steps else len(steps) - 1
    return steps[i + 1] if i + 1 < len(steps) else "champion"


def judge_step(candidate: Tally, champion: Tally, settings: DeliverySettings, elapsed_s: float) -> StepVerdict:
    """What a step's live comparison says now (see the module docstring). Pure."""
    evidence = {"candidate_labeled": float(candidate.n), "champion_labeled": float(champion.n),
                "elapsed_s": round(elapsed_s, 1)}  # fmt: skip
    timed_out = elapsed_s >= settings.max_step_s
    if min(candidate.n, champion.n) < settings.min_labeled:
        if timed_out:
            return StepVerdict("reject", f"no verdict within {settings.max_step_s:g} s: {candidate.n} labeled "
                               f"predictions of the candidate and {champion.n} of the champion, "
                               f"{settings.min_labeled} of each needed", evidence)  # fmt: skip
        return StepVerdict("hold", f"waiting for {settings.min_labeled} labeled predictions of each", evidence)
    a, b = candidate.accuracy, champion.accuracy
    pooled = (candidate.correct + champion.correct) / (candidate.n + champion.n)
    noise = 2 * math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / candidate.n + 1 / champion.n))
    evidence |= {"candidate_accuracy": round(a, 4), "champion_accuracy": round(b, 4), "noise": round(noise, 4)}
    said = f"live accuracy {a:.4f} on {candidate.n} labeled predictions against the champion's {b:.4f} on {champion.n}"
    if a >= b - settings.tolerance:
        return StepVerdict("advance", f"{said}: at least as good (tolerance {settings.tolerance:g})", evidence)
    if a < b - settings.tolerance - noise:
        return StepVerdict("reject", f"{said}: worse by more than the tolerance and the noise ({noise:.4f})", evidence)
    if timed_out:
        return StepVerdict("reject", f"{said}: not shown as good within {settings.max_step_s:g} s", evidence)
    return StepVerdict("hold", f"{said}: within the noise, waiting for more", evidence)


@dataclass
class LiveComparison:
    """One step's evidence: the candidate's and the champion's predictions joined to their labels."""

    candidate: str  # the candidate's version
    step: str
    started_at: float  # wall time the step began
    ours: Tally = field(default_factory=Tally)
    theirs: Tally = field(default_factory=Tally)
    _pending: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)

    def on_prediction(self, request_id: str, version: str, variant: str, prediction: Any) -> None:
        """A served (or shadowed) prediction: the candidate's, or one the champion answered."""
        if version == self.candidate and variant in ("shadow", "challenger"):
            who = "candidate"
        elif variant == "champion" and version != self.candidate:
            who = "champion"
        else:
            return
        self._pending.setdefault(request_id, {})[who] = prediction
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def on_label(self, request_id: str, label: Any) -> None:
        predicted = self._pending.pop(request_id, None)
        if not predicted:
            return
        for who, prediction in predicted.items():
            tally = self.ours if who == "candidate" else self.theirs
            tally.n += 1
            tally.correct += int(str(prediction) == str(label))

    def verdict(self, settings: DeliverySettings, now: float) -> StepVerdict:
        return judge_step(self.ours, self.theirs, settings, now - self.started_at)
