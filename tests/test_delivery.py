"""Progressive delivery's decisions (jobs.delivery), table-tested: pure, no Ray, no broker."""

from __future__ import annotations

import pytest

from jobs.delivery import LiveComparison, Tally, judge_step, next_step
from streams.config import DeliverySettings, parse_config
from streams.errors import ConfigError

SETTINGS = DeliverySettings(steps=("shadow", "canary"), min_labeled=100, tolerance=0.02, max_step_s=600)


@pytest.mark.parametrize(
    ("candidate", "champion", "elapsed", "action", "said"),
    [
        ((99, 99), (500, 400), 10, "hold", "waiting for 100"),  # too few of the candidate's
        ((300, 250), (99, 80), 10, "hold", "waiting for 100"),  # too few of the champion's
        ((99, 99), (500, 400), 600, "reject", "no verdict within 600 s"),
        ((400, 320), (400, 320), 10, "advance", "at least as good"),  # equal
        ((400, 316), (400, 320), 10, "advance", "at least as good"),  # 0.79 vs 0.80: within the tolerance
        ((400, 340), (400, 320), 10, "advance", "at least as good"),  # better
        ((400, 200), (400, 320), 10, "reject", "worse by more than the tolerance and the noise"),  # 0.50 vs 0.80
        ((100, 74), (100, 80), 10, "hold", "within the noise"),  # 0.74 vs 0.80 on 100 each: not clear yet
        ((100, 74), (100, 80), 600, "reject", "not shown as good within 600 s"),
    ],
)
def test_a_step_holds_advances_or_rejects_by_the_live_evidence(
    candidate: tuple[int, int], champion: tuple[int, int], elapsed: float, action: str, said: str
) -> None:
    verdict = judge_step(Tally(*candidate), Tally(*champion), SETTINGS, elapsed)
    assert verdict.action == action and said in verdict.reason, verdict
    assert verdict.evidence["candidate_labeled"] == candidate[0] and verdict.evidence["elapsed_s"] == elapsed
    if min(candidate[0], champion[0]) >= SETTINGS.min_labeled:
        assert verdict.evidence["candidate_accuracy"] == round(candidate[1] / candidate[0], 4)


def test_the_steps_run_in_order_and_the_last_ends_in_champion() -> None:
    assert next_step(SETTINGS, "shadow") == "canary"
    assert next_step(SETTINGS, "canary") == "champion"
    assert next_step(DeliverySettings(steps=("canary",)), "canary") == "champion"
    assert next_step(DeliverySettings(steps=("shadow",)), "shadow") == "champion"


def test_the_comparison_joins_each_models_predictions_to_their_labels() -> None:
    live = LiveComparison(candidate="2", step="shadow", started_at=100.0)
    live.on_prediction("a", "1", "champion", "yes")
    live.on_prediction("a", "2", "shadow", "no")  # same request, both scored (shadow)
    live.on_prediction("b", "2", "challenger", "yes")  # a canary's answer
    live.on_prediction("c", "3", "shadow", "yes")  # another version's: not this step's
    live.on_prediction("d", "2", "champion", "yes")  # the candidate as champion already: not the comparison
    live.on_label("a", "yes")
    live.on_label("b", "yes")
    live.on_label("c", "yes")
    live.on_label("zzz", "yes")  # a label with no prediction
    assert (live.ours.n, live.ours.correct, live.theirs.n, live.theirs.correct) == (2, 1, 1, 1)
    live.on_label("a", "yes")  # a label seen twice counts once
    assert live.ours.n == 2 and live.theirs.n == 1
    assert live.verdict(SETTINGS, now=130.0).evidence["elapsed_s"] == 30.0


def test_delivery_settings_are_checked() -> None:
    base = "name: d\nschema:\n  features: {x: {type: float}}\n  label: {name: y, classes: [a, b]}\n"
    for bad, key in [
        ("delivery: {steps: [canary, shadow]}", "delivery.steps"),
        ("delivery: {steps: [shadow, shadow]}", "delivery.steps"),
        ("delivery: {steps: [blue]}", "delivery.steps"),
        ("delivery: {canary_fraction: 1.0}", "delivery.canary_fraction"),
        ("delivery: {min_labeled: 0}", "delivery.min_labeled"),
        ("delivery: {max_step_s: 0}", "delivery.max_step_s"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config(base + bad, env={})
    config = parse_config(base + "delivery: {steps: [shadow, canary], canary_fraction: 0.25}", env={})
    assert config.delivery.steps == ("shadow", "canary") and config.delivery.canary_fraction == 0.25
