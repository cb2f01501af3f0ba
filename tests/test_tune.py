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
def test_a_tuned_model_clearly_beats_the_majority_baseline_and_each_trial_is_tracked(
    config: PipelineConfig, topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One tuning run (trial processes are what costs): the search, and each trial in MLflow, W&B and Comet."""
    from mlflow.tracking import MlflowClient

    from streams.config import TrackerSettings

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("COMET_API_KEY", "offline-key")  # offline mode writes archives, sends nothing
    with Producer(config.kafka) as producer:
        publish_stream(StreamGenerator(config, seed=2), producer, topics, config.name, 5000)
    assert ingest(config).manifest is not None
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, epochs=3),
        search=dataclasses.replace(config.search, trials=4, max_concurrent=2, families=("mlp", "xgboost")),
        trackers=TrackerSettings(wandb=True, comet=True, offline=True),
    )
    store = DatasetStore(config.datasets.root, config.name)
    # a champion of the tree family: the search over both families tries its values first
    champion = dataclasses.replace(config.model, kind="xgboost", eta=0.1, max_depth=4, rounds=100)
    warm = params_of(champion, config.search)
    assert warm == {"kind": "xgboost", "xgboost.eta": 0.1, "xgboost.max_depth": 4, "xgboost.rounds": 100}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = tune_model(config, store.window(), tmp_path, store=store, warm_start=warm, tracking_uri=uri)
    assert len(result.trials) == 4
    assert any(t["params"] == warm for t in result.trials), "the champion's values were tried first"
    assert all(1 <= t["epochs"] <= 3 for t in result.trials)
    for trial in result.trials:  # Ray Tune's define-by-run space: each trial holds its own family's knobs only
        kind = trial["params"]["kind"]
        assert kind in ("mlp", "xgboost") and all(k == "kind" or k.startswith(f"{kind}.") for k in trial["params"])
    # Ray Tune's best (scope "all") is the lowest loss any trial reported at any step; a trial's
    # record holds its last report, so the best may be a trial whose last loss was not the lowest.
    assert result.best_params in [t["params"] for t in result.trials]
    assert result.best_metrics["val_loss"] <= min(t["val_loss"] for t in result.trials), "the best, whatever its family"
    labels = [r.label for r in StreamGenerator(config, seed=2).records(5000)][-1000:]
    majority = max(labels.count("yes"), labels.count("no")) / len(labels)
    assert result.best_metrics["val_accuracy"] > majority + 0.15

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 and all(r.data.tags.get("driftloop.kind") == "tune-trial" for r in runs)
    assert all("val_loss" in r.data.metrics for r in runs)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 4
    assert len(list((tmp_path / "comet").glob("*.zip"))) == 4

    # The same search in the job's process (a small window, no W&B or Comet): same budget, same
    # warm start, each trial an MLflow run, a model as good.
    config = dataclasses.replace(config, trackers=TrackerSettings())
    here_uri = f"sqlite:///{tmp_path / 'mlflow-here.db'}"
    here = tune_model(config, store.window(), tmp_path / "here", store=store, warm_start=warm, tracking_uri=here_uri)
    assert len(here.trials) == 4 and here.trials[0]["params"] == warm
    assert all(1 <= t["epochs"] <= 3 for t in here.trials)
    assert here.best_metrics["val_accuracy"] > majority + 0.15
    client = MlflowClient(here_uri)
    experiment = client.get_experiment_by_name(config.name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 and all(r.data.tags.get("driftloop.search") == "in-process" for r in runs)
    assert all("val_loss" in r.data.metrics for r in runs)
    assert not (tmp_path / "here" / "ray").exists(), "no Ray Tune experiment"
