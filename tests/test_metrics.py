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
