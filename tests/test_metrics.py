"""Reading the replicas' counts out of Prometheus text, as Ray's exporter writes it. Pure."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from serving.metrics import counts_by_replica

TEXT = """# HELP ray_driftloop_predictions_total Predictions answered, by variant.
# TYPE ray_driftloop_predictions_total counter
ray_driftloop_predictions_total{WorkerId="a1",pipeline="demo",replica="vm:1",variant="champion"} 90.0
ray_driftloop_predictions_total{WorkerId="a1",pipeline="demo",replica="vm:1",variant="shadow"} 10.0
ray_driftloop_predictions_total{WorkerId="b2",pipeline="demo",replica="vm:2",variant="champion"} 40.0
ray_driftloop_predictions_total{WorkerId="c3",pipeline="other",replica="vm:3",variant="champion"} 7.0
# TYPE ray_driftloop_predictions_logged_total counter
ray_driftloop_predictions_logged_total{pipeline="demo",replica="vm:1"} 100.0
# TYPE ray_driftloop_requests_total counter
ray_driftloop_requests_total{pipeline="demo",replica="vm:2",code="200"} 8.0
ray_driftloop_requests_total{pipeline="demo",replica="vm:2",code="503"} 2.0
# TYPE ray_serve_num_http_requests_total counter
ray_serve_num_http_requests_total{application="demo"} 12.0
"""


def test_counts_by_replica_sums_variants_splits_codes_and_keeps_to_the_pipeline() -> None:
    counts = counts_by_replica(TEXT, "demo")
    assert counts == {
        "vm:1": {"predictions_total": 100.0, "predictions_logged_total": 100.0},
        "vm:2": {"predictions_total": 40.0, "requests_total:200": 8.0, "requests_total:503": 2.0},
    }
    assert counts_by_replica(TEXT, "nobody") == {}
    assert counts_by_replica("", "demo") == {}


def test_a_closed_windows_summary_gives_its_drift_per_feature_or_its_scores() -> None:
    from jobs.monitor_metrics import SERIES, samples

    data = {"kind": "data", "drifted": True, "features": {
        "plan": {"test": "chi2", "statistic": 31.5, "p_value": 0.0001, "psi": 0.4, "drifted": True},
        "tenure months": {"test": "ks", "statistic": 0.02, "p_value": 0.9, "psi": None, "drifted": False},
    }}  # fmt: skip
    got = samples(data)
    assert ("driftloop_windows_total", {"kind": "data", "drifted": "True"}, 1) in got
    assert ("driftloop_feature_drift_statistic", {"feature": "plan", "test": "chi2"}, 31.5) in got
    assert ("driftloop_feature_drifted", {"feature": "plan"}, 1.0) in got
    assert ("driftloop_feature_drifted", {"feature": "tenure months"}, 0.0) in got
    assert not [s for s in got if s[0] == "driftloop_feature_psi" and s[1]["feature"] == "tenure months"]
    performance = {"kind": "performance", "drifted": False, "accuracy": 0.8, "f1_macro": 0.7, "expected_accuracy": 0.82}
    assert sorted(samples(performance)) == sorted([
        ("driftloop_windows_total", {"kind": "performance", "drifted": "False"}, 1),
        ("driftloop_window_accuracy", {}, 0.8),
        ("driftloop_window_f1_macro", {}, 0.7),
        ("driftloop_window_expected_accuracy", {}, 0.82),
    ])  # fmt: skip
    assert {s[0] for s in got + samples(performance)} <= set(SERIES)


def test_the_label_join_counts_joins_and_losses_as_increments_and_each_lag() -> None:
    from datetime import datetime, timedelta, timezone

    from jobs.monitor import LabelJoin
    from jobs.monitor_metrics import join_samples

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    join = LabelJoin(ttl_s=60, max_pending=10)
    join.add_prediction("a", "yes", t0)
    join.add_label("a", "no", t0 + timedelta(seconds=12))  # the label 12 s later
    join.add_label("b", "no", t0 + timedelta(seconds=13))  # a label before its prediction: lag 0
    join.add_prediction("b", "no", t0 + timedelta(seconds=14))
    join.add_prediction("c", "no", t0 + timedelta(seconds=15))
    join.add_prediction("d", "no", t0 + timedelta(seconds=100))  # c expires (TTL 60 s)
    seen: dict[str, int] = {}
    counts = {"joined": join.joined, "expired": join.expired, "evicted": join.evicted}
    assert sorted(join_samples(counts, seen, join.take_lags())) == sorted([
        ("driftloop_labels_joined_total", {}, 2.0),
        ("driftloop_labels_unjoined_total", {"reason": "expired"}, 1.0),
        ("driftloop_label_lag_seconds", {}, 12.0),
        ("driftloop_label_lag_seconds", {}, 0.0),
    ])  # fmt: skip
    assert join.take_lags() == [] and join_samples(counts, seen, []) == [], "only what is new"
    # a new champion's monitor: a new join, counting from 0 again
    assert join_samples({"joined": 1, "expired": 0, "evicted": 0}, seen, [3.0]) == [
        ("driftloop_labels_joined_total", {}, 1.0), ("driftloop_label_lag_seconds", {}, 3.0)]  # fmt: skip


@pytest.mark.parametrize(
    ("status", "summary", "outcome", "decision"),
    [
        ("SUCCEEDED", {"version": "3", "promoted": True}, "promoted", "promote"),
        ("SUCCEEDED", {"version": "3", "promoted": False, "delivery_step": "shadow"}, "staged", "stage"),
        ("SUCCEEDED", {"version": "3", "promoted": False, "delivery_step": None}, "rejected", "reject"),
        ("SUCCEEDED", {}, "failed", None),  # ended without registering a model
        ("FAILED", {"version": "3", "promoted": True}, "failed", None),
        ("UNKNOWN", None, "failed", None),
    ],
)
def test_a_finished_jobs_outcome_and_gate_decision(
    status: str, summary: dict[str, object] | None, outcome: str, decision: str | None
) -> None:
    from jobs.controller_metrics import job_outcome, job_samples

    assert job_outcome(status, summary) == outcome
    got = job_samples(status, summary, datetime(2026, 1, 1, 0, 2, tzinfo=timezone.utc))
    assert ("driftloop_retrain_jobs_total", {"outcome": outcome}, 1) in got
    assert [s[1] for s in got if s[0] == "driftloop_gate_decisions_total"] == (
        [{"decision": decision}] if decision else []
    )


def test_a_jobs_durations_stages_and_the_loop_latency_of_a_promotion() -> None:
    from jobs.controller_metrics import SERIES, job_samples

    ended = datetime(2026, 1, 1, 0, 2, tzinfo=timezone.utc)
    asked, drifted = ended - timedelta(seconds=40), ended - timedelta(seconds=55)
    summary = {"version": "4", "promoted": True, "stages_s": {"ingest": 3.5, "tune": 9.0, "odd": "x"}}
    got = job_samples("SUCCEEDED", summary, ended, asked, drifted)
    assert ("driftloop_retrain_job_seconds", {}, 40.0) in got
    assert ("driftloop_loop_latency_seconds", {}, 55.0) in got
    assert [s for s in got if s[0] == "driftloop_retrain_stage_seconds"] == [
        ("driftloop_retrain_stage_seconds", {"stage": "ingest"}, 3.5),
        ("driftloop_retrain_stage_seconds", {"stage": "tune"}, 9.0)]  # fmt: skip
    rejected = job_samples("SUCCEEDED", {"version": "4", "promoted": False}, ended, asked, drifted)
    assert not [s for s in rejected if s[0] == "driftloop_loop_latency_seconds"], "no promotion: the loop is open"
    assert {s[0] for s in got + rejected} <= set(SERIES)


def test_every_series_is_declared_once_with_a_kind_and_exported_under_rays_prefix() -> None:
    from jobs.controller_metrics import SERIES as CONTROLLER
    from jobs.metrics import Metrics, exported_names
    from jobs.monitor_metrics import SERIES as MONITOR
    from serving.metrics import SERIES as SERVING

    shared = set(MONITOR) & set(CONTROLLER)
    assert shared == {"driftloop_consumer_lag"} and MONITOR["driftloop_consumer_lag"] == CONTROLLER[
        "driftloop_consumer_lag"], "one meaning per name"  # fmt: skip
    assert not set(SERVING) & (set(MONITOR) | set(CONTROLLER))
    for name, (kind, about, _) in (MONITOR | CONTROLLER | SERVING).items():
        assert name.startswith("driftloop_") and kind in ("gauge", "counter", "histogram") and about
    assert exported_names({"driftloop_x_seconds": ("histogram", "x", ())}) == {
        "ray_driftloop_x_seconds_bucket", "ray_driftloop_x_seconds_sum", "ray_driftloop_x_seconds_count"}  # fmt: skip
    with pytest.raises(KeyError, match="not a declared series"):
        Metrics("demo", MONITOR).record("driftloop_misspelt_total", 1)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/metrics", "data:text/plain,x 1", "/etc/passwd"])
def test_a_metrics_url_that_is_not_http_is_refused_before_anything_is_read(url: str) -> None:
    from serving.metrics import scrape

    with pytest.raises(ValueError, match="must be http:// or https://"):
        scrape(url)
