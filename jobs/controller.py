"""The retrain controller: `RetrainRequested` events in, Ray Jobs out, outcomes on the models topic.

For each request on `<pipeline>.retrain` the controller submits `python -m jobs.retrain`
through the Ray Jobs API (`JobSubmissionClient`) with the event id as the `submission_id`
and the repository as `working_dir`. Ray refuses a second job with the same submission id,
so a replayed or duplicated request starts no second job: the controller follows the one
that exists. When the job ends it publishes `TrainingCompleted` (with the version the job
registered) or `TrainingFailed`, with ids derived from the submission id, so a replay repeats
the same event rather than adding one. The gate's own `ModelPromoted`/`ModelRejected` come
from the job.

The request's offset is committed once the job is submitted (Ray now owns it); following runs
in a thread. After a restart the controller picks up the jobs it had submitted and that are
still running (found by their metadata), so none goes unreported.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jobs.controller_metrics import ControllerMetrics, job_samples
from jobs.gitinfo import git_commit
from jobs.service import Heartbeat, Service, consume_until
from streams.config import GIT_COMMIT_ENV, PipelineConfig, dump_config
from streams.errors import DecodeError, ErrorKind, RetryableError
from streams.events import (
    ID_PATTERN,
    Event,
    RetrainRequested,
    TrainingCompleted,
    TrainingFailed,
    deterministic_id,
)
from streams.topics import Topics

__all__ = [
    "RESULT_MARK",
    "ControllerReport",
    "JobFinished",
    "JobOutcome",
    "JobTemplate",
    "entrypoint_argv",
    "outcome_event",
    "parse_result",
    "run_controller",
    "started_at",
    "submit_retrain",
]

log = logging.getLogger(__name__)

RESULT_MARK = "DRIFTLOOP_RESULT "  # the job's last line: this, then its summary as JSON
CONFIG_ENV = "DRIFTLOOP_CONFIG_YAML"
CAUSE_ENV = "DRIFTLOOP_RETRAIN_CAUSE"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_ID = re.compile(ID_PATTERN)
EXCLUDES = [".git", ".venv", "runs", "benchmarks/.peer-venv", "**/__pycache__", "*.db", ".mypy_cache", ".ruff_cache"]


@dataclass(frozen=True)
class JobTemplate:
    """How a retrain job is submitted: the code (`working_dir`), where jobs write, and the command.

    `python` is the interpreter the cluster runs the entrypoint with (its `python` on PATH by
    default; the local stack passes its own); `module` is the entrypoint (`jobs.retrain`).
    """

    working_dir: Path
    out_root: Path
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = "python"
    module: str = "jobs.retrain"


@dataclass(frozen=True)
class JobOutcome:
    submission_id: str
    status: str
    summary: Mapping[str, Any] | None
    message: str = ""
    started_at: datetime | None = None  # when the job started running, as the Jobs API says


def parse_result(logs: str) -> dict[str, Any] | None:
    """The summary the job printed last (`RESULT_MARK` + JSON), or None."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARK):
            try:
                value = json.loads(line[len(RESULT_MARK) :])
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def outcome_event(config: PipelineConfig, request_id: str, outcome: JobOutcome) -> Event:
    """What the models topic hears about a finished job. Pure."""
    summary = outcome.summary or {}
    if outcome.status == "SUCCEEDED" and summary.get("version"):
        report = summary.get("report") or {}
        return TrainingCompleted(
            event_id=deterministic_id(outcome.submission_id, "completed"),
            pipeline=config.name,
            model_name=config.name,
            model_version=str(summary["version"]),
            run_id=str(summary.get("run_id") or ""),
            metrics={k: float(v) for k, v in report.items() if isinstance(v, (int, float))},
            trigger_event_id=request_id,
            submission_id=outcome.submission_id,
            started_at=outcome.started_at,
        )
    reason = outcome.message or f"job {outcome.submission_id} ended {outcome.status} without a registered model"
    return TrainingFailed(
        event_id=deterministic_id(outcome.submission_id, "failed"),
        pipeline=config.name,
        model_name=config.name,
        reason=reason[:2000],
        trigger_event_id=request_id,
        submission_id=outcome.submission_id,
        started_at=outcome.started_at,
    )


def entrypoint_argv(request: RetrainRequested, job: JobTemplate, records_topic: str | None = None) -> list[str]:
    """The job's command as an argv list. Pure.

    Ray Jobs runs an entrypoint through a shell, so it is built with `shlex.join` from this list:
    every value is one quoted argument, whatever it holds. The event's free text (`cause`) is
    never on it (it travels in the environment). The ids were checked against `ID_PATTERN` when
    the event was decoded; they are checked again here, since a path is made from one.
    """
    for name, value in (("event_id", request.event_id), ("drift_event_id", request.drift_event_id)):
        if value is not None and not _ID.match(value):
            raise ValueError(f"RetrainRequested.{name} {value[:80]!r} does not match {ID_PATTERN}")
    argv = [job.python, "-m", job.module, "--trigger-event-id", request.event_id]
    argv += ["--out", str(job.out_root.resolve() / request.event_id)]
    records = records_topic or Topics(request.pipeline).records
    starts = [f"{r.partition}:{r.start}" for r in request.records if r.topic == records]
    if starts:  # the drifted data by its offsets; event time only when the request has none
        argv += ["--from-offsets", ",".join(starts)]
    elif request.data_start is not None:
        argv += ["--since", request.data_start.isoformat()]
    if request.drift_event_id:
        argv += ["--drift-event-id", request.drift_event_id]
    return argv


def submit_retrain(
    client: Any,
    config: PipelineConfig,
    request: RetrainRequested,
    job: JobTemplate,
) -> bool:
    """Submit the job for `request`; False when a job with its id already exists (a duplicate)."""
    submission_id = request.event_id
    entrypoint = shlex.join(entrypoint_argv(request, job, Topics.of(config).records))
    if _exists(client, submission_id):
        return False
    runtime_env = {
        "working_dir": str(job.working_dir),
        "excludes": EXCLUDES,
        "env_vars": {
            CONFIG_ENV: dump_config(config),
            CAUSE_ENV: request.cause[:1000],
            GIT_COMMIT_ENV: git_commit(job.working_dir),  # `.git` stays out of the job's working_dir
            **job.env,
        },
    }
    deadline = time.monotonic() + 120
    while True:
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env,
                metadata={"driftloop_pipeline": config.name, "driftloop_cause": request.cause[:500]},
                # on a node with these custom resources (a cluster's worker group); {}: anywhere
                entrypoint_resources=dict(config.ray.job_resources) or None,
            )
            return True
        except RuntimeError as err:
            if "already exists" in str(err):
                return False
            # A head that has just started answers 500 until its agent is up: wait for it.
            if "try again" not in str(err) or time.monotonic() > deadline:
                raise
            log.info("the Jobs API is not ready (%s); retrying", err)
            time.sleep(2.0)


def _exists(client: Any, submission_id: str) -> bool:
    try:
        client.get_job_status(submission_id)
    except RuntimeError:
        return False
    return True


def status_name(status: Any) -> str:
    """A Ray `JobStatus` (or its string) as its bare name: SUCCEEDED, FAILED, RUNNING, ... Pure."""
    return str(status).split(".")[-1]


def job_status(client: Any, submission_id: str) -> str:
    return status_name(client.get_job_status(submission_id))


def follow(client: Any, submission_id: str, timeout_s: float, poll_s: float = 1.0) -> JobOutcome:
    """Wait for the job to end (stopping it after `timeout_s`); its status and printed summary."""
    deadline = time.monotonic() + timeout_s
    status = job_status(client, submission_id)
    while status not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            return JobOutcome(submission_id, "STOPPED", None, f"stopped after the {timeout_s:.0f}s job timeout")
        time.sleep(poll_s)
        status = job_status(client, submission_id)
    info = client.get_job_info(submission_id)
    try:
        logs = client.get_job_logs(submission_id)
    except RuntimeError as err:  # the driver's node is gone, and its logs with it: the status still says
        logs, lost = "", f"(its logs are unreadable: {str(err).splitlines()[0][:300]})"
    else:
        lost = ""
    message = ""
    if status != "SUCCEEDED":
        tail = " | ".join(line for line in logs.splitlines()[-5:] if line.strip()) or lost
        message = f"job {submission_id} {status}: {getattr(info, 'message', '') or ''} {tail}".strip()
    return JobOutcome(submission_id, status, parse_result(logs), message, started_at(info))


def started_at(info: Any) -> datetime | None:
    """When a job started running, from its `JobDetails` (`start_time`, milliseconds since the epoch). Pure."""
    ms = getattr(info, "start_time", None)
    return datetime.fromtimestamp(ms / 1000, timezone.utc) if isinstance(ms, (int, float)) and ms > 0 else None


@dataclass(frozen=True)
class JobFinished:
    """A retraining job that ended, and the event the controller published for it."""

    submission_id: str
    status: str
    event: str  # ModelPromoted, ModelRejected or TrainingFailed
    summary: Mapping[str, Any] | None
    message: str


@dataclass
class ControllerStats:
    submitted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    outcomes: list[JobFinished] = field(default_factory=list)


@dataclass(frozen=True)
class ControllerReport:
    """What `ControllerService.stats()` answers across the Ray boundary."""

    submitted: tuple[str, ...]
    duplicates: tuple[str, ...]
    dead_lettered: tuple[str, ...]
    outcomes: tuple[JobFinished, ...]
    error: str | None
    running: bool

    def failed(self) -> list[JobFinished]:
        return [o for o in self.outcomes if o.event == "TrainingFailed"]


def run_controller(
    config: PipelineConfig,
    address: str,
    job: JobTemplate,
    stop: threading.Event,
    stats: ControllerStats,
    client_factory: Callable[[str], Any] | None = None,
) -> None:
    """Consume retrain requests until `stop`; submit, follow, publish."""
    from streams.kafka import Batch, Producer, StreamConsumer, dead_letter, ensure_topics
    from streams.serde import decode_events

    if client_factory is None:
        from ray.job_submission import JobSubmissionClient

        client_factory = JobSubmissionClient
    client = client_factory(address)
    topics = Topics.of(config)
    ensure_topics(config.kafka, [topics.retrain, topics.models, topics.dlq])
    producer = Producer(config.kafka, client_id=f"{config.name}.controller")
    lock = threading.Lock()
    metrics = ControllerMetrics(config.name)
    running: set[str] = set()  # jobs followed and not ended
    group = f"{config.name}.controller"

    def follow_and_publish(request_id: str, submission_id: str, request: RetrainRequested | None) -> None:
        try:
            outcome = follow(client, submission_id, config.retrain.job_timeout_s)
        except Exception as err:  # the Jobs API went away: report the job as failed, keep consuming
            outcome = JobOutcome(submission_id, "UNKNOWN", None, f"lost track of job {submission_id}: {err}")
        event = outcome_event(config, request_id, outcome)
        with lock:
            producer.send_event(topics.models, event)
            producer.flush()
            stats.outcomes.append(JobFinished(submission_id, outcome.status, type(event).__name__, outcome.summary,
                                              outcome.message))  # fmt: skip
            running.discard(submission_id)
        metrics.record("driftloop_retrain_jobs_running", len(running))
        asked, drifted = (request.occurred_at, request.data_start) if request else (None, None)
        metrics.apply(job_samples(outcome.status, outcome.summary, datetime.now(timezone.utc), asked, drifted))
        log.info("job %s %s -> %s", submission_id, outcome.status, type(event).__name__)

    def start_following(request_id: str, submission_id: str, request: RetrainRequested | None = None) -> None:
        with lock:
            running.add(submission_id)
        metrics.record("driftloop_retrain_jobs_running", len(running))
        threading.Thread(target=follow_and_publish, args=(request_id, submission_id, request), daemon=True).start()

    for existing in client.list_jobs():  # resume: jobs submitted before a restart that still run
        mine = (existing.metadata or {}).get("driftloop_pipeline") == config.name
        if mine and existing.submission_id and status_name(existing.status) not in TERMINAL:
            start_following(existing.submission_id, existing.submission_id)

    def handle(batch: Batch) -> None:
        for chunk in batch.chunks:
            for record, event in zip(chunk.records, chunk.values, strict=True):
                if isinstance(event, RetrainRequested) and event.pipeline == config.name:
                    handle_one(record, event)
        metrics.record("driftloop_consumer_lag", consumer.stats.lag.get(topics.retrain, 0), group=group,
                       topic=topics.retrain)  # fmt: skip

    def handle_one(record: Any, event: RetrainRequested) -> None:
        """Submit one request. A request that cannot be carried out goes to the DLQ with the reason
        and the loop goes on; only an unreachable Jobs API is retried (and, if it stays down, ends
        the loop, and with it the actor, so that Ray restarts it)."""
        try:
            submitted = submit_retrain(client, config, event, job)
        except OSError as err:  # requests' ConnectionError and friends: the cluster is not there
            raise RetryableError(f"the Jobs API at {address} is unreachable: {err}") from err
        except Exception as err:
            reason = f"retrain request {event.event_id} could not be submitted: {type(err).__name__}: {err}"
            log.warning("%s; to %s", reason, topics.dlq)
            with lock:
                dead_letter(producer, topics.dlq, [(record, DecodeError(ErrorKind.UNPROCESSABLE, reason[:2000]))])
            stats.dead_lettered.append(event.event_id)
            metrics.record("driftloop_retrain_requests_received_total", 1, result="dead_lettered")
            return
        if submitted:
            stats.submitted.append(event.event_id)
            metrics.record("driftloop_retrain_requests_received_total", 1, result="submitted")
            log.info("submitted retrain job %s (%s)", event.event_id, event.cause[:200])
            start_following(event.event_id, event.event_id, event)
        else:
            stats.duplicates.append(event.event_id)
            metrics.record("driftloop_retrain_requests_received_total", 1, result="duplicate")
            log.info("retrain %s already has a job: not submitted again", event.event_id)

    consumer = StreamConsumer(
        config.kafka, [topics.retrain], decode_events, handle, group_id=group,
        dlq_topic=topics.dlq,
    )  # fmt: skip
    beat = Heartbeat(config.kafka, topics.heartbeats, config.name, "controller", lambda: {
        "last_poll": consumer.last_poll, "polled": consumer.stats.polled,
        "dead_lettered": consumer.stats.dead_lettered})  # fmt: skip
    try:
        consume_until(stop, consumer)
    finally:
        beat.close()
        with lock:
            producer.close()


class ControllerService(Service):
    """The controller as a long-running service (the body of a Ray actor: `ray.remote(ControllerService)`)."""

    def __init__(self, config: PipelineConfig, address: str, job: JobTemplate) -> None:
        self._stats = ControllerStats()
        super().__init__("controller", lambda stop: run_controller(config, address, job, stop, self._stats))

    def stats(self) -> ControllerReport:
        s = self._stats
        return ControllerReport(tuple(s.submitted), tuple(s.duplicates), tuple(s.dead_lettered), tuple(s.outcomes),
                                self.error, self.running)  # fmt: skip
