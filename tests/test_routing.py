"""Traffic policies as pure decisions."""

from __future__ import annotations

from serving.routing import route


def test_no_challenger_or_no_policy_means_the_champion() -> None:
    assert route("r1", "canary", 1.0, has_challenger=False) == route("r1", "none", 1.0, has_challenger=True)
    assert not route("r1", "none", 1.0, has_challenger=True).answer_with_challenger


def test_shadow_scores_every_request_and_answers_with_the_champion() -> None:
    decisions = [route(f"r{i}", "shadow", 0.5, has_challenger=True) for i in range(100)]
    assert all(d.shadow and not d.answer_with_challenger for d in decisions)


def test_canary_sends_the_configured_fraction_and_is_stable_per_request() -> None:
    keys = [f"request-{i}" for i in range(20_000)]
    share = sum(route(k, "canary", 0.1, has_challenger=True).answer_with_challenger for k in keys) / len(keys)
    assert 0.09 < share < 0.11
    assert all(route(k, "canary", 0.1, True) == route(k, "canary", 0.1, True) for k in keys[:500])
    assert not any(route(k, "canary", 0.0, True).answer_with_challenger for k in keys[:500])
    assert all(route(k, "canary", 1.0, True).answer_with_challenger for k in keys[:500])
