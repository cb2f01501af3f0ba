"""The retrain controller over the real broker and the real Ray Jobs API."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from jobs.controller import (
    RESULT_MARK,
    ControllerStats,
    JobOutcome,
    JobTemplate,
    entrypoint_argv,
    outcome_event,
    parse_result,
    run_controller,
)
from streams.config import PipelineConfig
from streams.events import RetrainRequested, TrainingCompleted, TrainingFailed, deterministic_id
from streams.kafka import Batch, Producer, StreamConsumer
from streams.serde import decode_events
from streams.topics import Topics

ROOT = Path(__file__).resolve().parent.parent


def test_the_result_line_is_found_and_bad_ones_are_ignored() -> None:
    assert parse_result(f'noise\n{RESULT_MARK}{{"version": "3"}}\nmore noise') == {"version": "3"}
    assert parse_result(f"{RESULT_MARK}{{not json") is None
    assert parse_result(f"{RESULT_MARK}[1, 2]") is None
    assert parse_result("") is None


def test_outcomes_become_events_with_ids_derived_from_the_job(demo_config: PipelineConfig) -> None:
    summary = {"version": "4", "run_id": "r", "report": {"accuracy": 0.8}}
    done = outcome_event(demo_config, "req", JobOutcome("job1", "SUCCEEDED", summary))
    assert isinstance(done, TrainingCompleted) and done.model_version == "4" and done.metrics == {"accuracy": 0.8}
    assert done.event_id == deterministic_id("job1", "completed") and done.trigger_event_id == "req"
    failed = outcome_event(demo_config, "req", JobOutcome("job1", "FAILED", None, "boom"))
    assert isinstance(failed, TrainingFailed) and failed.reason == "boom"
    no_version = outcome_event(demo_config, "req", JobOutcome("job1", "SUCCEEDED", {"promoted": False}))
    assert isinstance(no_version, TrainingFailed)


def _models_events(config: PipelineConfig, topics: Topics, count: int) -> list[Any]:
    seen: list[Any] = []

    def keep(batch: Batch) -> None:
        seen.extend(batch.values)

    StreamConsumer(config.kafka, [topics.models], decode_events, keep, group_id=None, dlq_topic=topics.dlq).run(
        max_records=count, idle_timeout_s=60
    )
    return seen


@pytest.mark.integration
def test_a_duplicated_request_starts_one_job_and_the_outcome_is_published(
    config: PipelineConfig, topics: Topics, tmp_path: Path, jobs_address: str
) -> None:
    from ray.job_submission import JobSubmissionClient

    stop, stats = threading.Event(), ControllerStats()
    job = JobTemplate(ROOT, tmp_path / "jobs", {}, sys.executable, "tests.job_echo")
    args = (config, jobs_address, job, stop, stats)
    thread = threading.Thread(target=run_controller, args=args, daemon=True)
    thread.start()
    request = RetrainRequested(event_id=deterministic_id(config.name, "test"), pipeline=config.name, cause="test")
    try:
        with Producer(config.kafka) as producer:
            producer.send_event(topics.retrain, request)
            producer.send_event(topics.retrain, request)  # a duplicate
            producer.send(topics.retrain, b"{not an event")  # malformed: to the DLQ, nothing else happens
            producer.flush()
        events = _models_events(config, topics, 1)
        with Producer(config.kafka) as producer:  # a replay after the job finished
            producer.send_event(topics.retrain, request)
            producer.flush()
        deadline = time.monotonic() + 60
        while len(stats.duplicates) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(30)
    assert stats.submitted == [request.event_id]
    assert stats.duplicates == [request.event_id, request.event_id]
    jobs = [j for j in JobSubmissionClient(jobs_address).list_jobs() if j.submission_id == request.event_id]
    assert len(jobs) == 1 and str(jobs[0].status).endswith("SUCCEEDED")
    (done,) = events
    assert isinstance(done, TrainingCompleted) and done.model_version == "7"
    assert done.submission_id == request.event_id == done.trigger_event_id

    # The same, for Prometheus, at the Ray metrics endpoint (the controller ran in this driver)
    from jobs.controller_metrics import SERIES
    from serving.metrics import pipeline_samples

    wanted = {("submitted", 1.0), ("duplicate", 2.0)}
    deadline = time.monotonic() + 60
    while True:
        series = pipeline_samples(config.name, SERIES)
        received = {
            (labels["result"], v) for n, labels, v in series if n == "driftloop_retrain_requests_received_total"
        }
        ended = {labels["outcome"]: v for n, labels, v in series if n == "driftloop_retrain_jobs_total"}
        timed = [v for n, _, v in series if n == "driftloop_retrain_job_seconds_count"]
        if (received == wanted and ended and timed) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    # job_echo registers a version but says nothing of the gate: counted as rejected (not promoted)
    assert received == wanted and ended == {"rejected": 1.0} and timed == [1.0], series
    running = [v for n, _, v in series if n == "driftloop_retrain_jobs_running"]
    assert running == [0.0], series


def test_the_entrypoint_is_quoted_arguments_and_refuses_ids_that_bypassed_decoding(tmp_path: Path) -> None:
    import shlex
    from datetime import datetime, timezone

    job = JobTemplate(ROOT, tmp_path / "my jobs; rm -rf ~", {}, "/opt/py $HOME/python", "jobs.retrain")
    since = datetime(2020, 1, 1, tzinfo=timezone.utc)
    good = RetrainRequested(event_id="abc-1", pipeline="demo", cause="x; id #", data_start=since, drift_event_id="d_2")
    argv = entrypoint_argv(good, job)
    assert shlex.split(shlex.join(argv)) == argv  # what the shell sees is exactly this list
    assert argv[:5] == ["/opt/py $HOME/python", "-m", "jobs.retrain", "--trigger-event-id", "abc-1"]
    assert "x; id #" not in shlex.join(argv)  # free text never reaches the command line
    for field in ("event_id", "drift_event_id"):
        # msgspec checks patterns on decode only: an event built in code is checked here again
        hostile = RetrainRequested(pipeline="demo", cause="c", **{field: "x --help; id > FILE; #"})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=field):
            entrypoint_argv(hostile, job)


class _FlakyJobs:
    """The real Jobs API, except that it answers one submission id as Ray did for an id with `/`."""

    def __init__(self, address: str, refuse: str) -> None:
        from ray.job_submission import JobSubmissionClient

        self._real = JobSubmissionClient(address)
        self.refuse = refuse

    def submit_job(self, **kwargs: Any) -> str:
        if kwargs["submission_id"] == self.refuse:
            raise RuntimeError("Request failed with status code 500: Internal Server Error")
        return str(self._real.submit_job(**kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.integration
def test_hostile_and_failing_requests_go_to_the_dlq_and_the_controller_goes_on(
    config: PipelineConfig, topics: Topics, tmp_path: Path, jobs_address: str
) -> None:
    import json

    from kafka import KafkaConsumer, TopicPartition

    from streams.kafka import client_options
    from streams.serde import encode_event

    marker = tmp_path / "owned"
    stop, stats = threading.Event(), ControllerStats()
    job = JobTemplate(ROOT, tmp_path / "jobs", {}, sys.executable, "tests.job_echo")
    failing = deterministic_id(config.name, "refused")
    args = (config, jobs_address, job, stop, stats, lambda address: _FlakyJobs(address, failing))
    thread = threading.Thread(target=run_controller, args=args, daemon=True)
    thread.start()
    hostile = json.loads(encode_event(RetrainRequested(pipeline=config.name, cause="drift")))
    hostile["event_id"] = f"x --help; id > {marker}; #"
    good = RetrainRequested(event_id=deterministic_id(config.name, "good"), pipeline=config.name, cause="$(id)")
    try:
        with Producer(config.kafka) as producer:
            producer.send(topics.retrain, json.dumps(hostile).encode(), key=config.name)
            producer.send_event(topics.retrain, RetrainRequested(event_id=failing, pipeline=config.name, cause="c"))
            producer.send_event(topics.retrain, good)
            producer.flush()
        events = _models_events(config, topics, 1)
    finally:
        stop.set()
        thread.join(30)
    assert stats.submitted == [good.event_id] and stats.dead_lettered == [failing]
    (done,) = events
    assert isinstance(done, TrainingCompleted) and done.submission_id == good.event_id
    assert not marker.exists()
    consumer = KafkaConsumer(**client_options(config.kafka), enable_auto_commit=False)
    try:
        parts = [TopicPartition(topics.dlq, p) for p in consumer.partitions_for_topic(topics.dlq) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        dead = [r for batch in consumer.poll(timeout_ms=5000).values() for r in batch]
    finally:
        consumer.close()
    kinds = sorted(dict(r.headers)["driftloop.error"].decode() for r in dead)
    assert kinds == ["invalid_field", "unprocessable"]
    reasons = " ".join(dict(r.headers)["driftloop.reason"].decode() for r in dead)
    assert "status code 500" in reasons and "event_id" in reasons


def test_the_entrypoint_passes_the_drifted_records_by_offset_not_by_time(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from streams.events import OffsetRange

    job = JobTemplate(ROOT, tmp_path, {}, "python", "jobs.retrain")
    records = (
        OffsetRange(topic="demo.records", partition=0, start=120, end=300),
        OffsetRange(topic="demo.records", partition=3, start=7, end=9),
        OffsetRange(topic="other.records", partition=1, start=5, end=6),  # not this pipeline's: left out
    )
    since = datetime(2020, 1, 1, tzinfo=timezone.utc)
    argv = entrypoint_argv(RetrainRequested(pipeline="demo", cause="c", data_start=since, records=records), job)
    assert argv[argv.index("--from-offsets") + 1] == "0:120,3:7"
    assert "--since" not in argv, "event time is not the window when offsets are known"
    timed = entrypoint_argv(RetrainRequested(pipeline="demo", cause="c", data_start=since), job)
    assert timed[timed.index("--since") + 1] == since.isoformat() and "--from-offsets" not in timed
