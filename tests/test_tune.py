"""Ray Tune + Optuna + ASHA on the generator's stream: the tuned model clearly beats the baseline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jobs.tune import apply_params, params_of, tune_model
from streams.config import ModelSettings, Param, PipelineConfig, SearchSettings
from streams.datasets import DatasetStore
from streams.generator import StreamGenerator
from streams.ingest import ingest
from streams.kafka import Producer
from streams.publish import publish_stream
from streams.topics import Topics


def test_parameters_map_to_model_settings() -> None:
    settings = apply_params(
        ModelSettings(), {"hidden": "128,64", "batch_size": 128, "learning_rate": 0.01, "kind": "logreg"}
    )
    assert (settings.hidden, settings.batch_size, settings.learning_rate, settings.kind) == (
        (128, 64),
        128,
        0.01,
        "logreg",
    )
    search = SearchSettings(
        space=(Param(name="hidden", choices=("32", "64,32")), Param(name="learning_rate", low=0.001, high=0.01))
    )
    assert params_of(ModelSettings(hidden=(64, 32), learning_rate=0.003), search) == {
        "hidden": "64,32",
        "learning_rate": 0.003,
    }
    assert params_of(ModelSettings(hidden=(7,), learning_rate=0.5), search) == {}  # outside the space: not a point


@pytest.mark.integration
@pytest.mark.usefixtures("ray_session")
def test_a_tuned_model_clearly_beats_the_majority_baseline(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    with Producer(config.kafka) as producer:
        publish_stream(StreamGenerator(config, seed=2), producer, topics, config.name, 5000)
    assert ingest(config).manifest is not None
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, epochs=3),
        search=dataclasses.replace(config.search, trials=4, max_concurrent=2),
    )
    store = DatasetStore(config.datasets.root, config.name)
    warm = {"learning_rate": 0.003, "dropout": 0.1, "hidden": "64,32", "batch_size": 256}
    result = tune_model(config, store.window(), tmp_path, store=store, warm_start=warm)
    assert len(result.trials) == 4
    assert any(t["params"] == warm for t in result.trials), "the champion's values were tried first"
    assert all(1 <= t["epochs"] <= 3 for t in result.trials)
    labels = [r.label for r in StreamGenerator(config, seed=2).records(5000)][-1000:]
    majority = max(labels.count("yes"), labels.count("no")) / len(labels)
    assert result.best_metrics["val_accuracy"] > majority + 0.15


@pytest.mark.integration
def test_driftloop_tune_registers_and_promotes_the_first_model(
    config: PipelineConfig, topics: Topics, tmp_path: Path, ray_session: None
) -> None:
    import json

    import ray
    import yaml

    from tests.conftest import DEMO
    from tests.test_cli import driftloop

    with Producer(config.kafka) as producer:
        publish_stream(StreamGenerator(config, seed=3), producer, topics, config.name, 3000)
    assert ingest(config).manifest is not None
    data = yaml.safe_load(DEMO.read_text())
    data["name"] = config.name
    data["datasets"]["root"] = config.datasets.root
    data["model"]["epochs"] = 2
    data["search"].update(trials=2, max_concurrent=2)
    data["training"]["workers"] = 1
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    result = driftloop("tune", "--config", str(path), "--out", str(tmp_path / "run"), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["version"] == "1" and summary["promoted"] is True
    assert "beats the majority-class baseline" in summary["reasons"][0]
    assert (tmp_path / "run" / "mlflow.db").exists()
