"""A replica's counts in Prometheus form, through Ray's metrics API.

Ray exports every worker's metrics at its node's metrics endpoint (`ray.nodes()`'s
`MetricsExportPort`, path `/metrics`), prefixed `ray_` and labelled with the worker (`WorkerId`)
and the node. So each replica's counts can be read there, one series per replica: `/v1/health`
reaches only the replica Serve routes it to, and a killed replica's counts are gone from it.

The request path only adds to plain counters; a thread hands the increments to Ray every
`every_s` (Ray exports them on its own schedule, every few seconds). Series (each labelled
`pipeline` and `replica`, the replica's `host:pid` as `/v1/health` gives it):

- `driftloop_requests_total{code}`: answers to `/v1/predict` by HTTP status;
- `driftloop_predictions_total{variant}`: predictions answered (champion, challenger, shadow);
- `driftloop_predictions_logged_total` / `driftloop_predictions_dropped_total`: acknowledged by
  the broker / dropped and counted by the prediction log;
- `driftloop_predictions_buffered`: handed to the log, not yet acknowledged or dropped;
- `driftloop_model_version{variant}`: the version a replica serves (champion, challenger).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping

from jobs.metrics import PREFIX, Metrics, Spec, exported_names

__all__ = [
    "SERIES",
    "ServingMetrics",
    "counts_by_replica",
    "node_texts",
    "parse_prometheus",
    "pipeline_samples",
    "replica_counts",
    "scrape",
]

log = logging.getLogger(__name__)

SERIES: dict[str, Spec] = {
    "driftloop_requests_total": ("counter", "Answers to /v1/predict, by HTTP status.", ("replica", "code")),
    "driftloop_predictions_total": ("counter", "Predictions answered, by variant.", ("replica", "variant")),
    "driftloop_predictions_logged_total": ("counter", "Predictions the broker acknowledged.", ("replica",)),
    "driftloop_predictions_dropped_total": ("counter", "Predictions the log dropped (and counted).", ("replica",)),
    "driftloop_predictions_buffered": ("gauge", "Predictions not yet acknowledged or dropped.", ("replica",)),
    "driftloop_model_version": ("gauge", "The model version served, by variant.", ("replica", "variant")),
}


class ServingMetrics:
    def __init__(
        self,
        pipeline: str,
        replica: str,
        log_counts: Callable[[], tuple[int, int, int]],
        versions: Callable[[], dict[str, str | None]],
        every_s: float = 1.0,
        enabled: bool = True,
    ) -> None:
        """`log_counts` gives the prediction log's (logged, dropped, buffered) so far; `versions`
        the served version per variant. Not `enabled` (`serving.metrics: false`): nothing is counted."""
        self.enabled = enabled
        self.tags = {"replica": replica}
        self._requests: Counter[int] = Counter()
        self._predictions: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._log_counts = log_counts
        self._versions = versions
        self._logged = self._dropped = 0
        self.metrics = Metrics(pipeline, SERIES if enabled else {})
        self._stop = threading.Event()
        if enabled:
            threading.Thread(target=self._run, args=(every_s,), name="serving-metrics", daemon=True).start()

    def answered(self, code: int, predictions: dict[str, int] | None = None) -> None:
        """One answer to /v1/predict, with the predictions it gave per variant (the request path: no I/O)."""
        if not self.enabled:
            return
        with self._lock:
            self._requests[code] += 1
            self._predictions.update(predictions or {})

    def flush(self) -> None:
        """Hand what was counted since the last flush to Ray."""
        with self._lock:
            requests, self._requests = self._requests, Counter()
            predictions, self._predictions = self._predictions, Counter()
        record = self.metrics.record
        for code, n in requests.items():
            record("driftloop_requests_total", n, code=str(code), **self.tags)
        for variant, n in predictions.items():
            record("driftloop_predictions_total", n, variant=variant, **self.tags)
        logged, dropped, buffered = self._log_counts()
        if logged > self._logged:
            record("driftloop_predictions_logged_total", logged - self._logged, **self.tags)
            self._logged = logged
        if dropped > self._dropped:
            record("driftloop_predictions_dropped_total", dropped - self._dropped, **self.tags)
            self._dropped = dropped
        record("driftloop_predictions_buffered", buffered, **self.tags)
        for variant, version in self._versions().items():
            with contextlib.suppress(TypeError, ValueError):  # a version MLflow did not number
                record("driftloop_model_version", float(version or 0), variant=variant, **self.tags)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.flush()
            except Exception as err:  # metrics must never stop serving; the next flush tries again
                log.warning("serving metrics not exported: %s", err)

    def close(self) -> None:
        self._stop.set()
        if self.enabled:
            with contextlib.suppress(Exception):
                self.flush()


def parse_prometheus(text: str, names: set[str]) -> list[tuple[str, dict[str, str], float]]:
    """The samples of `names` (without Ray's prefix) in Prometheus text format: (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (sample.name.removeprefix(PREFIX), dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.removeprefix(PREFIX) in names
    ]


COUNTS = ("predictions_total", "predictions_logged_total", "predictions_dropped_total", "predictions_buffered")


def replica_counts(pipeline: str, timeout_s: float = 10.0) -> dict[str, dict[str, float]]:
    """Each replica's counts (by its `host:pid`) from every live node's Ray metrics endpoint, in the
    connected Ray: `predictions_total` (all variants), `predictions_logged_total`,
    `predictions_dropped_total`, `predictions_buffered` and `requests_total:<code>`."""
    out: dict[str, dict[str, float]] = {}
    for text in node_texts(timeout_s):
        out |= counts_by_replica(text, pipeline)
    return out


def metrics_urls() -> list[str]:
    """Every live node's Ray metrics endpoint (what Prometheus scrapes), in the connected Ray; the
    head's first."""
    import ray

    nodes = sorted(
        (n for n in ray.nodes() if n["Alive"]), key=lambda n: not n.get("Resources", {}).get("node:__internal_head__")
    )
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in nodes]


def node_texts(timeout_s: float = 10.0) -> list[str]:
    """What every live node's Ray metrics endpoint answers, in the connected Ray."""
    return [scrape(url, timeout_s) for url in metrics_urls()]


def pipeline_samples(
    pipeline: str, series: Mapping[str, Spec], timeout_s: float = 10.0
) -> list[tuple[str, dict[str, str], float]]:
    """The pipeline's samples of `series` (a `SERIES` table; a histogram's `_bucket`, `_sum` and
    `_count`) at every live node's endpoint, in the connected Ray, named without Ray's prefix."""
    names = {n.removeprefix(PREFIX) for n in exported_names(series)}
    return [
        s for text in node_texts(timeout_s) for s in parse_prometheus(text, names) if s[1].get("pipeline") == pipeline
    ]


def scrape(url: str, timeout_s: float = 10.0) -> str:
    """The text a metrics endpoint answers. Only http(s): `--metrics-url` comes from the command
    line, and urllib would read a `file://` one (and the parse error would show its first line)."""
    import urllib.request

    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"a metrics URL must be http:// or https://, not {url[:200]!r}")
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return str(answer.read().decode())


def counts_by_replica(text: str, pipeline: str) -> dict[str, dict[str, float]]:
    """The pipeline's replica counts in one endpoint's text (see `replica_counts`). Pure."""
    names = {f"driftloop_{n}" for n in (*COUNTS, "requests_total")}
    out: dict[str, dict[str, float]] = {}
    for name, labels, value in parse_prometheus(text, names):
        if labels.get("pipeline") != pipeline:
            continue
        counts = out.setdefault(labels.get("replica", "?"), {})
        key = name.removeprefix("driftloop_") + (f":{labels['code']}" if "code" in labels else "")
        counts[key] = counts.get(key, 0.0) + value  # predictions_total: summed over variants
    return out
