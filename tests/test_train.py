"""Ray Train on the generator's stream: it learns, and a worker killed mid-training resumes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from jobs.models import load_artifact, predict_proba
from jobs.train import load_features, train_model
from streams.config import PipelineConfig
from streams.datasets import DatasetStore
from streams.generator import StreamGenerator
from streams.ingest import ingest
from streams.kafka import Producer
from streams.publish import publish_stream
from streams.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def test_a_killed_worker_resumes_from_its_checkpoint_and_the_model_beats_the_baseline(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    with Producer(config.kafka) as producer:
        publish_stream(StreamGenerator(config, seed=1), producer, topics, config.name, 6000)
    assert ingest(config).manifest is not None
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, epochs=4, batch_size=128))
    store = DatasetStore(config.datasets.root, config.name)
    marker = tmp_path / "killed"
    result = train_model(
        config, store.window(), tmp_path / "out", store=store, kill_once={"epoch": 2, "marker": str(marker)}
    )

    assert marker.exists(), "the worker was killed once"
    last = result.history[-1]
    assert last["epoch"] == 4 and last["resumed_from"] >= 1, "training resumed from a checkpoint, not from scratch"
    report = result.report
    assert report["accuracy"] > report["baseline_accuracy"] + 0.15
    assert report["f1_macro"] > report["baseline_f1_macro"] + 0.2
    assert result.train_rows + result.holdout_rows == 6000
    assert report["holdout"].startswith("event_time>=")

    _, model, _ = load_artifact(result.artifact)
    features = load_features(result.artifact, config)
    rows = [r.record for r in StreamGenerator(config, seed=1).records(6000)][-200:]
    proba = predict_proba(model, features.transform_records(rows)).numpy()
    labels = features.encode_labels([r["churned"] for r in rows])
    assert np.mean(proba.argmax(axis=1) == labels) > report["baseline_accuracy"]
