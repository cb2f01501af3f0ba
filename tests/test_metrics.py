"""Reading the replicas' counts out of Prometheus text, as Ray's exporter writes it. Pure."""

from __future__ import annotations

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
    from jobs.monitor_metrics import COUNTERS, GAUGES, samples

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
    assert {s[0] for s in got + samples(performance)} <= set(GAUGES) | set(COUNTERS)
