"""What the monitor decides, in Prometheus form, through Ray's metrics API.

Exported like the serving replicas' series (`serving/metrics.py`): at the node's Ray metrics
endpoint, prefixed `ray_`, each labelled `pipeline`. Per closed window:

- `driftloop_windows_total{kind, drifted}`: windows closed (data, performance);
- `driftloop_feature_drift_statistic{feature, test}`, `driftloop_feature_drift_p_value{feature}`,
  `driftloop_feature_psi{feature}`, `driftloop_feature_drifted{feature}` (0/1): the last data
  window's per-feature drift;
- `driftloop_window_accuracy`, `driftloop_window_f1_macro`, `driftloop_window_expected_accuracy`:
  the last performance window against the champion's validation;
- `driftloop_drift_events_total`, `driftloop_retrain_requests_total`, `driftloop_rollbacks_total`;
- `driftloop_delivery_steps_total{step, outcome}`: delivery steps ended (the next step, champion, rejected);
- `driftloop_monitored_total{topic}`: predictions and labels read.

Outside Ray (`driftloop monitor` in the foreground) nothing is exported. `samples` is pure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["MonitorMetrics", "samples"]

log = logging.getLogger(__name__)

GAUGES = {
    "driftloop_feature_drift_statistic": ("The last data window's drift statistic per feature.", ("feature", "test")),
    "driftloop_feature_drift_p_value": ("The last data window's adjusted p-value per feature.", ("feature",)),
    "driftloop_feature_psi": ("The last data window's PSI per feature.", ("feature",)),
    "driftloop_feature_drifted": ("1 when the last data window found the feature drifted.", ("feature",)),
    "driftloop_window_accuracy": ("The last performance window's accuracy.", ()),
    "driftloop_window_f1_macro": ("The last performance window's macro F1.", ()),
    "driftloop_window_expected_accuracy": ("The champion's validation accuracy it is held to.", ()),
}
COUNTERS = {
    "driftloop_windows_total": ("Windows closed, by kind and whether they drifted.", ("kind", "drifted")),
    "driftloop_drift_events_total": ("DriftDetected events published.", ()),
    "driftloop_retrain_requests_total": ("RetrainRequested events published.", ()),
    "driftloop_rollbacks_total": ("Champions on probation rolled back.", ()),
    "driftloop_delivery_steps_total": ("Delivery steps ended, by step and outcome.", ("step", "outcome")),
    "driftloop_monitored_total": ("Predictions and labels the monitor read.", ("topic",)),
}

Sample = tuple[str, dict[str, str], float]


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


class MonitorMetrics:
    """The monitor's series; a no-op outside Ray. Exporting never stops the monitor."""

    def __init__(self, pipeline: str) -> None:
        self.tags = {"pipeline": pipeline}
        self._metrics: dict[str, Any] = {}
        try:
            import ray
            from ray.util.metrics import Counter, Gauge

            if not ray.is_initialized():
                return
            for name, (about, keys) in GAUGES.items():
                self._metrics[name] = Gauge(name, about, tag_keys=("pipeline", *keys))
            for name, (about, keys) in COUNTERS.items():
                self._metrics[name] = Counter(name, about, tag_keys=("pipeline", *keys))
        except Exception as err:
            log.warning("monitor metrics are not exported: %s", err)
            self._metrics = {}

    def _apply(self, name: str, tags: dict[str, str], value: float) -> None:
        metric = self._metrics.get(name)
        if metric is None:
            return
        try:
            if name in COUNTERS:
                if value > 0:
                    metric.inc(value, tags=self.tags | tags)
            else:
                metric.set(value, tags=self.tags | tags)
        except Exception as err:
            log.warning("monitor metric %s not exported: %s", name, err)

    def window(self, summary: Mapping[str, Any]) -> None:
        for name, tags, value in samples(summary):
            self._apply(name, tags, value)

    def count(self, name: str, n: int = 1, **tags: str) -> None:
        self._apply(name, tags, float(n))
