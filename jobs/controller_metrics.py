"""What the retrain controller sees, in Prometheus form (exported as `jobs/metrics.py` says).

Each series is labelled `pipeline`:

- `driftloop_retrain_requests_received_total{result}`: retrain requests read (submitted,
  duplicate: a job with that id exists, dead_lettered: could not be carried out);
- `driftloop_retrain_jobs_running`: jobs submitted and not ended;
- `driftloop_retrain_jobs_total{outcome}`: jobs ended (promoted, staged: passed the gate and
  goes through delivery first, rejected: the gate kept the champion, failed);
- `driftloop_gate_decisions_total{decision}`: the gate's decisions (promote, stage, reject);
- `driftloop_retrain_job_seconds`: from the request to the job's end (a histogram);
- `driftloop_retrain_stage_seconds{stage}`: the last job's seconds per stage (start, ingest,
  tune, train, register, gate);
- `driftloop_loop_latency_seconds`: from the drift's first record (the request's `data_start`,
  event time) to the promotion (a histogram; the swap follows within seconds);
- `driftloop_consumer_lag{group, topic}`: retrain requests the controller has yet to read.

`job_samples` is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from jobs.metrics import Metrics, Sample, Spec

__all__ = ["SERIES", "ControllerMetrics", "job_outcome", "job_samples"]

SERIES: dict[str, Spec] = {
    "driftloop_retrain_requests_received_total": ("counter", "Retrain requests read, by what was done.", ("result",)),
    "driftloop_retrain_jobs_running": ("gauge", "Retrain jobs submitted and not ended.", ()),
    "driftloop_retrain_jobs_total": ("counter", "Retrain jobs ended, by outcome.", ("outcome",)),
    "driftloop_gate_decisions_total": ("counter", "The promotion gate's decisions.", ("decision",)),
    "driftloop_retrain_job_seconds": ("histogram", "From a retrain request to its job's end.", ()),
    "driftloop_retrain_stage_seconds": ("gauge", "The last retrain job's seconds per stage.", ("stage",)),
    "driftloop_loop_latency_seconds": ("histogram", "From the drift's first record to the promotion.", ()),
    "driftloop_consumer_lag": ("gauge", "Records on a topic the consumer group has not read yet.", ("group", "topic")),
}
DECISIONS = {"promoted": "promote", "staged": "stage", "rejected": "reject"}


def job_outcome(status: str, summary: Mapping[str, Any] | None) -> str:
    """promoted, staged, rejected or failed, from a finished job's status and summary. Pure."""
    summary = summary or {}
    if status != "SUCCEEDED" or not summary.get("version"):
        return "failed"
    if summary.get("promoted"):
        return "promoted"
    return "staged" if summary.get("delivery_step") else "rejected"


def job_samples(
    status: str,
    summary: Mapping[str, Any] | None,
    ended_at: datetime,
    requested_at: datetime | None = None,
    drift_started_at: datetime | None = None,
) -> list[Sample]:
    """The series one finished job adds. `requested_at` and `drift_started_at` come from its
    retrain request (unknown for a job picked up after a restart). Pure."""
    outcome = job_outcome(status, summary)
    out: list[Sample] = [("driftloop_retrain_jobs_total", {"outcome": outcome}, 1)]
    if outcome in DECISIONS:
        out.append(("driftloop_gate_decisions_total", {"decision": DECISIONS[outcome]}, 1))
    for stage, seconds in ((summary or {}).get("stages_s") or {}).items():
        if isinstance(seconds, (int, float)):
            out.append(("driftloop_retrain_stage_seconds", {"stage": str(stage)}, float(seconds)))
    if requested_at is not None:
        out.append(("driftloop_retrain_job_seconds", {}, max(0.0, (ended_at - requested_at).total_seconds())))
    if outcome == "promoted" and drift_started_at is not None:
        out.append(("driftloop_loop_latency_seconds", {}, max(0.0, (ended_at - drift_started_at).total_seconds())))
    return out


class ControllerMetrics(Metrics):
    def __init__(self, pipeline: str) -> None:
        super().__init__(pipeline, SERIES)
