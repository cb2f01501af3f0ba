"""The promotion gate: a pure function of two evaluation reports and the gate settings.

A challenger replaces the champion only when it is better on the same recent holdout: its
primary metric improves by at least `min_improvement`, and no guarded metric regresses by
more than `tolerance`. With no champion yet, it must beat the trivial (majority-class)
baseline by `baseline_margin`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobs.evaluate import LOWER_IS_BETTER
from streams.config import GateSettings

__all__ = ["Verdict", "judge"]


@dataclass(frozen=True)
class Verdict:
    """What the gate decided, and why (one reason per rule it checked)."""

    promote: bool
    reasons: tuple[str, ...]
    staged: str | None = None  # passed, and on this delivery step (`delivery.steps`) rather than champion


def _better(metric: str, new: float, old: float) -> float:
    """How much better `new` is than `old` (positive is better), whatever the metric's direction."""
    return old - new if metric in LOWER_IS_BETTER else new - old


def judge(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, gate: GateSettings) -> Verdict:
    primary = gate.primary_metric
    if primary not in challenger:
        return Verdict(False, (f"the challenger's report has no {primary}",))
    if champion is None:
        baseline = challenger.get(f"baseline_{primary}")
        if baseline is None:
            return Verdict(False, (f"no champion, and the report has no baseline_{primary} to beat",))
        gain = _better(primary, challenger[primary], baseline)
        ok = gain >= gate.baseline_margin
        verb = "beats" if ok else "does not beat"
        return Verdict(
            ok,
            (
                f"first model: {primary} {challenger[primary]:.4f} {verb} the majority-class baseline "
                f"{baseline:.4f} by the margin {gate.baseline_margin}",
            ),
        )
    if challenger.get("holdout") != champion.get("holdout"):
        return Verdict(False, ("the reports are not on the same holdout: re-evaluate the champion first",))
    reasons = []
    gain = _better(primary, challenger[primary], champion[primary])
    ok = gain >= gate.min_improvement
    reasons.append(
        f"{primary} {challenger[primary]:.4f} vs champion {champion[primary]:.4f}: "
        f"{'improves' if ok else 'does not improve'} by {gate.min_improvement}"
    )
    for metric in gate.no_regression:
        if metric not in challenger or metric not in champion:
            reasons.append(f"{metric} missing from a report")
            ok = False
            continue
        change = _better(metric, challenger[metric], champion[metric])
        held = change >= -gate.tolerance
        ok = ok and held
        reasons.append(
            f"{metric} {challenger[metric]:.4f} vs {champion[metric]:.4f}: "
            f"{'within' if held else 'regresses beyond'} tolerance {gate.tolerance}"
        )
    return Verdict(ok, tuple(reasons))
