"""The monitor as a Ray actor on the real broker: killed mid-window, restarted, nothing lost or doubled."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from jobs.features import fit_pipeline
from jobs.models import ModelSpec, build_model, save_artifact
from jobs.monitor import MonitorService
from jobs.registry import ModelRegistry
from jobs.train import drift_reference
from streams.config import PipelineConfig
from streams.datasets import Window
from streams.events import LabelObserved, PredictionLogged, RetrainRequested, utcnow
from streams.generator import StreamGenerator
from streams.kafka import Producer
from streams.kafka_source import read_tail
from streams.serde import decode_events
from streams.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def champion(config: PipelineConfig, tmp_path: Path) -> ModelRegistry:
    """A registry whose champion carries a drift reference built from generated training rows."""
    rows = [r.record for r in StreamGenerator(config, seed=1).records(2000)]
    data = ray.data.from_items(rows, override_num_blocks=2)  # 2,000 rows: not 200 tiny blocks
    features = fit_pipeline(data, config.schema, config.features)
    spec = ModelSpec.from_settings(config.model, features.output_names, list(config.schema.label.classes))
    outputs = features.transform_records(rows)[:, 0]
    reference = drift_reference(data, np.column_stack([1 - outputs, outputs]), config)
    report = {"holdout": "h", "accuracy": 0.8, "f1_macro": 0.8, "baseline_f1_macro": 0.3, "log_loss": 0.4}
    extra = {"profile.json": json.dumps({"reference": reference.to_json()}), "report.json": json.dumps(report)}
    save_artifact(tmp_path / "m1", spec, build_model(spec), features.to_json(), extra=extra)
    registry = ModelRegistry(config, f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "art")
    version = registry.log_training(tmp_path / "m1", {}, [], report, Window(())).version
    assert registry.promote(version, config.gate).promote
    return registry


def publish(config: PipelineConfig, topics: Topics, start: int, count: int, drift_at: int | None = None) -> None:
    names = config.schema.feature_names
    with Producer(config.kafka) as producer:
        for r in StreamGenerator(config, seed=5, id_prefix="live", drift_at=drift_at).records(start + count):
            if r.index < start:
                continue
            event = PredictionLogged(
                request_id=r.record[config.schema.record_id], occurred_at=utcnow(), pipeline=config.name,
                model_name=config.name, model_version="1", features={n: r.record[n] for n in names},
                prediction=r.label, probabilities={"no": 0.4, "yes": 0.6},
            )  # fmt: skip
            producer.send_event(topics.predictions, event)
        producer.flush()


def windows(actor: Any, count: int, timeout: float = 90) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = ray.get(actor.stats.remote())
        assert stats.error is None, stats.error
        found = [w for w in stats.windows if w["kind"] == "data"]
        if len(found) >= count:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{count} windows not seen in {timeout}s")


def test_a_killed_monitor_resumes_from_its_last_window_without_loss_or_double_counting(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    config = dataclasses.replace(config, monitor=dataclasses.replace(config.monitor, window_size=500))
    registry = champion(config, tmp_path)
    service: Any = ray.remote(MonitorService)
    publish(config, topics, 0, 1250)  # two whole windows and half of the third
    first = service.options(max_restarts=0, num_cpus=0).remote(config, registry.uri)
    before = windows(first, 2)
    time.sleep(2.0)  # it holds the half window, uncommitted
    ray.kill(first, no_restart=True)
    publish(config, topics, 1250, 1250)
    second = service.options(max_restarts=0, num_cpus=0).remote(config, registry.uri)
    after = windows(second, 3)
    ray.get(second.stop.remote())

    assert len(before) == 2 and len(after) == 3
    assert all(w["size"] == 500 for w in before + after)
    spans: dict[str, list[tuple[int, int]]] = {}
    for w in before + after:
        for partition, (start, end) in w["offsets"].items():
            spans.setdefault(partition, []).append((start, end))
    total = 0
    for partition, ranges in spans.items():
        ranges.sort()
        for (_, end), (start, _) in itertools.pairwise(ranges):
            assert start == end, f"{partition}: gap or overlap between windows: {ranges}"
        assert ranges[0][0] == 0
        total += ranges[-1][1]
    assert total == 2500, "every prediction in exactly one window"

    # What it decided, for Prometheus: at the Ray metrics endpoint, from both instances
    deadline = time.monotonic() + 60
    while True:
        series = monitor_series(config.name)
        closed = sum(v for n, labels, v in series if n == "driftloop_windows_total" and labels["kind"] == "data")
        psi = {labels["feature"] for n, labels, _ in series if n == "driftloop_feature_psi"}
        read = sum(
            v for n, labels, v in series if n == "driftloop_monitored_total" and labels["topic"] == "predictions"
        )
        if (closed >= 3 and read >= 1250 and psi) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    # the second instance reads again what the first had not committed (at most a window)
    assert 3 <= closed <= 5 and 1250 <= read <= 2500 + 500, series
    assert set(config.schema.feature_names) <= psi, psi  # and the prediction (`__prediction__`)


def monitor_series(pipeline: str) -> list[tuple[str, dict[str, str], float]]:
    """The pipeline's monitor series at every node's Ray metrics endpoint."""
    from jobs.monitor_metrics import SERIES
    from serving.metrics import pipeline_samples

    return pipeline_samples(pipeline, SERIES)


def publish_labels(config: PipelineConfig, topics: Topics, start: int, count: int, drift_at: int | None) -> None:
    """The true labels of the predictions `publish` sent (whose 'model' was always right)."""
    with Producer(config.kafka) as producer:
        for r in StreamGenerator(config, seed=5, id_prefix="live", drift_at=drift_at).records(start + count):
            if r.index >= start:
                label = LabelObserved(request_id=r.record[config.schema.record_id], pipeline=config.name, label=r.label)
                producer.send_event(topics.labels, label)
        producer.flush()


def stats_when(actor: Any, done: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = ray.get(actor.stats.remote())
        assert stats.error is None, stats.error
        if done(stats):
            return stats
        time.sleep(0.5)
    raise AssertionError(f"not reached in {timeout}s: {stats}")


def kinds(stats: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [w for w in stats.windows if w["kind"] == kind]


def test_a_monitor_killed_mid_streak_resumes_its_streak_label_join_and_performance_window(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    """Issue 13, item 11: killed after the first of two drifted windows that make a retrain, while
    150 labelled predictions fill half a performance window and 50 predictions wait for their
    labels. The restarted monitor still asks for the retrain, once, and every label joins."""
    monitor = dataclasses.replace(config.monitor, window_size=500, performance_window=300)
    retrain = dataclasses.replace(config.retrain, consecutive=2, min_window=100, cooldown_s=0)
    config = dataclasses.replace(config, monitor=monitor, retrain=retrain)
    registry = champion(config, tmp_path)
    service: Any = ray.remote(MonitorService)
    first = service.options(max_restarts=0, num_cpus=0).remote(config, registry.uri)
    publish(config, topics, 0, 450, drift_at=0)
    publish_labels(config, topics, 0, 450, drift_at=0)
    stats_when(first, lambda s: s.predictions >= 450 and s.labels >= 450)
    publish(config, topics, 450, 300, drift_at=0)  # the first window closes at 500 predictions
    before = stats_when(first, lambda s: kinds(s, "data"))
    time.sleep(2.0)  # it holds the next window's first 250, uncommitted
    ray.kill(first, no_restart=True)
    assert [w["drifted"] for w in kinds(before, "data")] == [True] and len(kinds(before, "performance")) == 1
    assert before.retrain_requests == 0

    second = service.options(max_restarts=0, num_cpus=0).remote(config, registry.uri)
    publish(config, topics, 750, 250, drift_at=0)
    publish_labels(config, topics, 450, 300, drift_at=0)
    after = stats_when(second, lambda s: kinds(s, "data") and s.labels >= 300 and s.retrain_requests)
    time.sleep(3.0)  # anything more it would send
    after = ray.get(second.stats.remote())
    ray.get(second.stop.remote())

    assert after.resumed.startswith("restored the state at"), after.resumed
    assert [w["drifted"] for w in kinds(after, "data")] == [True] and after.retrain_requests == 1
    perf = kinds(before, "performance") + kinds(after, "performance")
    assert [w["size"] for w in perf] == [300, 300], "all 750 labels joined: two windows, 150 in the third"
    assert all(w["accuracy"] == 1.0 for w in perf), "each label joined its own prediction"
    requested = [e for e in decode_events([r.value for r in read_tail(config.kafka, topics.retrain, 100)])]
    assert len(requested) == 1 and isinstance(requested[0], RetrainRequested)

    # The label join and the consumer's lag, for Prometheus (from the second monitor at least)
    deadline = time.monotonic() + 60
    while True:
        series = monitor_series(config.name)
        joined = sum(v for n, _, v in series if n == "driftloop_labels_joined_total")
        lags = sum(v for n, _, v in series if n == "driftloop_label_lag_seconds_count")
        behind = {labels["topic"] for n, labels, _ in series if n == "driftloop_consumer_lag"}
        if (joined >= 300 and lags >= 300 and len(behind) == 2) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert joined >= 300 and lags >= 300, series
    assert behind == {topics.predictions, topics.labels}, series


def test_junk_on_the_state_topic_goes_to_the_dlq_and_the_newest_good_state_is_taken(
    config: PipelineConfig, topics: Topics
) -> None:
    from jobs.monitor import Monitor, resume_state
    from streams.kafka import REASON_HEADER
    from tests.test_monitor import champion as reference_champion
    from tests.test_monitor import labels, predictions, small

    config = small(config)
    items = predictions(config, 400, "covariate", drift_at=0)
    core = Monitor(config, reference_champion(config), keep_state=True)
    core.on_labels(labels(items))
    outcomes = core.on_predictions([(e, "p.predictions", 0, i) for i, (e, _) in enumerate(items)])
    (closed,) = [o for o in outcomes if o.kind == "data"]
    assert closed.state is not None and closed.state.streaks == {"data": 1}
    with Producer(config.kafka) as producer:
        producer.send_event(topics.state, closed.state)
        producer.send(topics.state, b'{"type": "MonitorState", "pipeline": "$(id)"}', key=config.name)
        producer.send(topics.state, b"\x00not json", key=config.name)
        producer.flush()
        restarted = Monitor(config, reference_champion(config), keep_state=True)
        said, outcomes = resume_state(config, restarted, topics, decode_events, producer)
    assert said.startswith("restored the state at") and outcomes == [], said
    assert restarted.policy.streaks == {"data": 1} and restarted.join.joined == 400
    dead = read_tail(config.kafka, topics.dlq, 10)
    assert len(dead) == 2 and all(dict(r.headers).get(REASON_HEADER) for r in dead)


def test_the_monitor_command_watches_in_the_foreground_and_reports(
    config: PipelineConfig, topics: Topics, tmp_path: Path, broker: str
) -> None:
    from tests.test_cli import config_file, driftloop

    registry = champion(config, tmp_path)
    publish(config, topics, 0, 2000)  # two windows of the demo's 1,000
    path = str(config_file(tmp_path, config))
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker}
    watched = driftloop(
        "monitor", "--config", path, "--tracking-uri", registry.uri, "--windows", "2", "--max-seconds", "120", env=env
    )
    assert watched.returncode == 0, watched.stderr[-2000:]
    assert watched.stdout.count("[monitor] data        window of 1000") == 2
    summary = json.loads(watched.stdout.strip().splitlines()[-1])
    assert summary["windows"] == 2 and summary["predictions"] >= 2000

    missing = driftloop("monitor", "--config", path, env=env)
    assert missing.returncode == 2 and "mlflow.tracking_uri" in missing.stderr and "Traceback" not in missing.stderr


def test_the_monitor_joins_labels_sent_as_plain_records_on_a_topic_of_the_users_own(
    config: PipelineConfig, tmp_path: Path
) -> None:
    """`topics.labels` names an existing topic and `labels_format: record` reads `{"record_id": .., "churned": ..}`."""
    from streams.config import TopicSettings
    from streams.kafka import ensure_topics

    labels_topic = f"{config.name}-crm-labels"
    config = dataclasses.replace(
        config,
        topics=TopicSettings(labels=labels_topic, labels_format="record"),
        monitor=dataclasses.replace(config.monitor, performance_window=200),
    )
    topics = Topics.of(config)
    ensure_topics(config.kafka, topics.all())
    assert topics.labels == labels_topic
    registry = champion(config, tmp_path)
    publish(config, topics, 0, 400)
    with Producer(config.kafka) as producer:
        for r in StreamGenerator(config, seed=5, id_prefix="live").records(400):
            plain = {"record_id": r.record["record_id"], "churned": r.label}
            producer.send(labels_topic, json.dumps(plain).encode(), key=r.record["record_id"])
        producer.send(labels_topic, b'{"record_id": "x", "churned": "maybe"}', key="x")  # to the DLQ
        producer.flush()
    actor = ray.remote(MonitorService).options(max_restarts=0, num_cpus=0).remote(config, registry.uri)
    deadline = time.monotonic() + 90
    stats = ray.get(actor.stats.remote())
    while time.monotonic() < deadline and len([w for w in stats.windows if w["kind"] == "performance"]) < 2:
        time.sleep(0.5)
        stats = ray.get(actor.stats.remote())
    ray.get(actor.stop.remote())
    performance = [w for w in stats.windows if w["kind"] == "performance"]
    assert len(performance) == 2 and all(w["size"] == 200 for w in performance), stats.windows
    assert stats.labels == 400
    assert performance[0]["accuracy"] == 1.0, "each plain label joined its own prediction (the 'model' was right)"


def test_a_promoted_champion_that_loses_live_to_the_previous_one_is_rolled_back_by_the_monitor(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    """Issue 19, item 3: version 2 validated as well as version 1, then answers wrongly 60 % of the
    time. Its first live performance windows lose to version 1's report: the monitor points
    `champion` back at 1, publishes ModelRolledBack with the evidence, and asks for no retrain."""
    from jobs.registry import ROLLED_BACK_TAG
    from streams.events import ModelRolledBack

    monitor = dataclasses.replace(config.monitor, window_size=400, performance_window=200)
    # Performance only: these made-up answers' probabilities drift from any reference.
    retrain = dataclasses.replace(
        config.retrain, consecutive=2, min_window=100, cooldown_s=0, triggers=("performance",)
    )
    config = dataclasses.replace(config, monitor=monitor, retrain=retrain)
    registry = champion(config, tmp_path)
    report = {"holdout": "h", "accuracy": 0.8, "f1_macro": 0.8, "baseline_f1_macro": 0.3, "log_loss": 0.4}
    second = registry.log_training(tmp_path / "m1", {}, [], report, Window(())).version
    registry.client.set_registered_model_alias(config.name, "previous", "1")  # as a promotion leaves them
    registry.client.set_registered_model_alias(config.name, "champion", second)

    names, classes = config.schema.feature_names, list(config.schema.label.classes)
    with Producer(config.kafka) as producer:
        for r in StreamGenerator(config, seed=5, id_prefix="bad").records(800):
            wrong = r.index % 5 < 3
            guess = next(c for c in classes if c != r.label) if wrong else r.label
            producer.send_event(topics.predictions, PredictionLogged(
                request_id=r.record[config.schema.record_id], occurred_at=utcnow(), pipeline=config.name,
                model_name=config.name, model_version=second, features={n: r.record[n] for n in names},
                prediction=guess, probabilities={"no": 0.5, "yes": 0.5},
            ))  # fmt: skip
            label = LabelObserved(request_id=r.record[config.schema.record_id], pipeline=config.name, label=r.label)
            producer.send_event(topics.labels, label)
        producer.flush()
    service: Any = ray.remote(MonitorService)
    actor = service.options(max_restarts=0, num_cpus=0).remote(config, registry.uri)
    stats = stats_when(actor, lambda s: s.rollbacks >= 1 and len(kinds(s, "performance")) >= 4)
    time.sleep(3.0)  # anything more it would send
    stats = ray.get(actor.stats.remote())
    ray.get(actor.stop.remote())

    assert stats.rollbacks == 1
    assert registry.alias("champion") == "1" and registry.alias("previous") == second
    tag = registry.client.get_model_version(config.name, second).tags[ROLLED_BACK_TAG]
    assert f"version {second} on probation lost 2 live performance windows" in tag
    events = decode_events([r.value for r in read_tail(config.kafka, topics.models, 10)])
    (rolled,) = [e for e in events if isinstance(e, ModelRolledBack)]
    assert (rolled.from_version, rolled.to_version) == (second, "1") and "against 0.800" in rolled.reason
    retrains = decode_events([r.value for r in read_tail(config.kafka, topics.retrain, 10)])
    assert not retrains, f"rolled back, not retrained: {[getattr(e, 'cause', e) for e in retrains]} {stats.windows}"
    perf = kinds(stats, "performance")
    assert [w["model_version"] for w in perf[:2]] == [second, second] and not any(w["retrain"] for w in perf)
    assert "lost 2 live performance windows" in perf[1]["decision"]
