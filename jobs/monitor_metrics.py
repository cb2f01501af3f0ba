"""What the monitor decides, in Prometheus form, through Ray's metrics API.

Exported as `jobs/metrics.py` says, each labelled `pipeline`. Per closed window:

- `driftloop_windows_total{kind, drifted}`: windows closed (data, performance);
- `driftloop_feature_drift_statistic{feature, test}`, `driftloop_feature_drift_p_value{feature}`,
  `driftloop_feature_psi{feature}`, `driftloop_feature_drifted{feature}` (0/1): the last data
  window's per-feature drift;
- `driftloop_window_accuracy`, `driftloop_window_f1_macro`, `driftloop_window_expected_accuracy`:
  the last performance window against the champion's validation;
- `driftloop_drift_events_total`, `driftloop_retrain_requests_total`, `driftloop_rollbacks_total`;
- `driftloop_delivery_steps_total{step, outcome}`: delivery steps ended (the next step, champion, rejected);
- `driftloop_monitored_total{topic}`: predictions and labels read.

As the labels come: `driftloop_labels_joined_total`, `driftloop_labels_unjoined_total{reason}`
(expired, evicted) and `driftloop_label_lag_seconds` (a histogram, prediction to label in event
time); the join rate is joined over `driftloop_monitored_total{topic="predictions"}`. After each
batch, `driftloop_consumer_lag{group, topic}`: what the monitor's group has yet to read.

Outside Ray (`driftloop monitor` in the foreground) nothing is exported. `samples` is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobs.metrics import Metrics, Sample, Spec

__all__ = ["SERIES", "MonitorMetrics", "join_samples", "samples"]

SERIES: dict[str, Spec] = {
    "driftloop_feature_drift_statistic": ("gauge", "The last data window's drift statistic.", ("feature", "test")),
    "driftloop_feature_drift_p_value": ("gauge", "The last data window's adjusted p-value per feature.", ("feature",)),
    "driftloop_feature_psi": ("gauge", "The last data window's PSI per feature.", ("feature",)),
    "driftloop_feature_drifted": ("gauge", "1 when the last data window found the feature drifted.", ("feature",)),
    "driftloop_window_accuracy": ("gauge", "The last performance window's accuracy.", ()),
    "driftloop_window_f1_macro": ("gauge", "The last performance window's macro F1.", ()),
    "driftloop_window_expected_accuracy": ("gauge", "The champion's validation accuracy it is held to.", ()),
    "driftloop_windows_total": ("counter", "Windows closed, by kind and whether they drifted.", ("kind", "drifted")),
    "driftloop_drift_events_total": ("counter", "DriftDetected events published.", ()),
    "driftloop_retrain_requests_total": ("counter", "RetrainRequested events published.", ()),
    "driftloop_rollbacks_total": ("counter", "Champions on probation rolled back.", ()),
    "driftloop_delivery_steps_total": ("counter", "Delivery steps ended, by step and outcome.", ("step", "outcome")),
    "driftloop_monitored_total": ("counter", "Predictions and labels the monitor read.", ("topic",)),
    "driftloop_labels_joined_total": ("counter", "Predictions joined with their label.", ()),
    "driftloop_labels_unjoined_total": (
        "counter",
        "Predictions or labels forgotten unjoined: past the TTL or the bound.",
        ("reason",),
    ),
    "driftloop_label_lag_seconds": ("histogram", "From a prediction to its label, in event time.", ()),
    "driftloop_consumer_lag": ("gauge", "Records on a topic the consumer group has not read yet.", ("group", "topic")),
}


def samples(summary: Mapping[str, Any]) -> list[Sample]:
    """The gauge values and counter increments one closed window's summary gives. Pure."""
    kind = str(summary.get("kind", ""))
    out: list[Sample] = [("driftloop_windows_total", {"kind": kind, "drifted": str(bool(summary.get("drifted")))}, 1)]
    if kind == "data":
        for feature, f in (summary.get("features") or {}).items():
            name = {"feature": str(feature)}
            for key, metric in (("p_value", "driftloop_feature_drift_p_value"), ("psi", "driftloop_feature_psi")):
                if f.get(key) is not None:
                    out.append((metric, name, float(f[key])))
            if f.get("statistic") is not None:
                out.append(
                    ("driftloop_feature_drift_statistic", name | {"test": str(f.get("test"))}, float(f["statistic"]))
                )
            out.append(("driftloop_feature_drifted", name, float(bool(f.get("drifted")))))
    elif kind == "performance":
        for key in ("accuracy", "f1_macro", "expected_accuracy"):
            if summary.get(key) is not None:
                out.append((f"driftloop_window_{key}", {}, float(summary[key])))
    return out


def join_samples(now: Mapping[str, int], seen: dict[str, int], lags: list[float]) -> list[Sample]:
    """The label join's series since `seen` (its counts at the last call, updated here): joined,
    expired and evicted (a new champion's join starts again from 0), each join's label lag. Pure
    but for `seen`."""
    new = {k: v - seen.get(k, 0) if v >= seen.get(k, 0) else v for k, v in now.items()}
    seen.update(now)
    out: list[Sample] = []
    if new.get("joined"):
        out.append(("driftloop_labels_joined_total", {}, float(new["joined"])))
    out += [
        ("driftloop_labels_unjoined_total", {"reason": r}, float(new[r])) for r in ("expired", "evicted") if new.get(r)
    ]
    return out + [("driftloop_label_lag_seconds", {}, lag) for lag in lags]


class MonitorMetrics(Metrics):
    """The monitor's series (see `jobs/metrics.py`)."""

    def __init__(self, pipeline: str) -> None:
        super().__init__(pipeline, SERIES)

    def window(self, summary: Mapping[str, Any]) -> None:
        self.apply(samples(summary))

    def count(self, name: str, n: int = 1, **tags: str) -> None:
        self.record(name, float(n), **tags)

    def join(self, join: Any, seen: dict[str, int]) -> None:
        """What the label join did since the last call (`seen` keeps its counts)."""
        self.apply(join_samples({"joined": join.joined, "expired": join.expired, "evicted": join.evicted}, seen,
                                join.take_lags()))  # fmt: skip

    def lag(self, group: str, lags: Mapping[str, int]) -> None:
        for topic, behind in lags.items():
            self.record("driftloop_consumer_lag", float(behind), group=group, topic=topic)
