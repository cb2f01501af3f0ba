"""driftloop's own Prometheus series, through Ray's metrics API (`ray.util.metrics`).

Ray exports every worker's metrics at its node's metrics endpoint (`ray.nodes()`'s
`MetricsExportPort`, path `/metrics`, the port `driftloop up` prints as `metrics_url`), each name
prefixed `ray_`; KubeRay's Prometheus integration scrapes the same endpoint. Each part declares
its series as a `SERIES` table (`jobs/monitor_metrics.py`, `jobs/controller_metrics.py`,
`serving/metrics.py`): name -> (kind, help, label keys besides `pipeline`). A histogram is
exported as `<name>_bucket`, `<name>_sum` and `<name>_count`.

`Metrics` is a no-op outside Ray (a command run in the foreground) and never raises: a metric
that cannot be exported is logged and the loop goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

__all__ = ["PREFIX", "SECONDS", "Metrics", "Sample", "Spec", "exported_names"]

log = logging.getLogger(__name__)

PREFIX = "ray_"  # what Ray's exporter puts before each name
Kind = Literal["gauge", "counter", "histogram"]
Spec = tuple[Kind, str, tuple[str, ...]]  # kind, help, label keys besides `pipeline`
Sample = tuple[str, dict[str, str], float]  # name, labels, value (a counter's increment, a histogram's observation)
# Histogram boundaries for durations: label lag, a job, the loop (seconds).
SECONDS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1800.0, 3600.0)


def exported_names(series: Mapping[str, Spec]) -> set[str]:
    """The names a Prometheus scrape shows for `series` (Ray's prefix included). Pure."""
    out: set[str] = set()
    for name, (kind, _, _) in series.items():
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        out |= {PREFIX + name + s for s in suffixes}
    return out


class Metrics:
    """One part's series for one pipeline."""

    def __init__(self, pipeline: str, series: Mapping[str, Spec], boundaries: Iterable[float] = SECONDS) -> None:
        self.series = dict(series)
        self.tags = {"pipeline": pipeline}
        self._metrics: dict[str, Any] = {}
        try:
            import ray
            from ray.util.metrics import Counter, Gauge, Histogram

            if not ray.is_initialized():
                return
            for name, (kind, about, keys) in self.series.items():
                tag_keys = ("pipeline", *keys)
                if kind == "histogram":
                    self._metrics[name] = Histogram(name, about, boundaries=list(boundaries), tag_keys=tag_keys)
                else:
                    self._metrics[name] = (Gauge if kind == "gauge" else Counter)(name, about, tag_keys=tag_keys)
        except Exception as err:
            log.warning("metrics are not exported: %s", err)
            self._metrics = {}

    @property
    def exporting(self) -> bool:
        return bool(self._metrics)

    def record(self, name: str, value: float, **tags: str) -> None:
        """Set a gauge, add to a counter (only a positive amount), or observe into a histogram."""
        metric = self._metrics.get(name)
        if metric is None:
            if name not in self.series:
                raise KeyError(f"{name} is not a declared series")  # a typo in our code, not in data
            return
        try:
            kind = self.series[name][0]
            if kind == "counter":
                if value > 0:
                    metric.inc(value, tags=self.tags | tags)
            elif kind == "gauge":
                metric.set(value, tags=self.tags | tags)
            else:
                metric.observe(value, tags=self.tags | tags)
        except Exception as err:
            log.warning("metric %s not exported: %s", name, err)

    def apply(self, samples: Iterable[Sample]) -> None:
        for name, tags, value in samples:
            self.record(name, value, **tags)
