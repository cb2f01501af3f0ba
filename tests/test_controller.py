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
