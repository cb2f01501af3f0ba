"""Ray Train on the generator's stream: it learns, and a worker killed mid-training resumes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs.models import load_artifact
from jobs.train import evaluate_artifact, load_features, split_by_time, train_model
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
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, epochs=3, batch_size=128),
        ray=dataclasses.replace(config.ray, distributed_min_rows=0),  # Ray Train, whatever the size
    )
    store = DatasetStore(config.datasets.root, config.name)
    marker = tmp_path / "killed"
    result = train_model(
        config, store.window(), tmp_path / "out", store=store, kill_once={"epoch": 2, "marker": str(marker)}
    )

    assert marker.exists(), "the worker was killed once"
    last = result.history[-1]
    assert last["epoch"] == 3 and last["resumed_from"] == 2, "training resumed from its last checkpoint"
    report = result.report
    assert report["accuracy"] > report["baseline_accuracy"] + 0.15
    assert report["f1_macro"] > report["baseline_f1_macro"] + 0.2
    assert result.train_rows + result.holdout_rows == 6000
    assert report["holdout"].startswith("event_time>=")

    again = evaluate_artifact(result.artifact, config, result.holdout, report["holdout"])
    for metric in ("accuracy", "f1_macro", "roc_auc", "log_loss"):
        assert again[metric] == pytest.approx(report[metric], abs=1e-6), "the champion is judged as it was trained"
    _, model, _ = load_artifact(result.artifact)
    assert {"report.json", "profile.json"} <= set(json.loads((result.artifact / "digests.json").read_text()))
    features = load_features(result.artifact, config)
    rows = [r.record for r in StreamGenerator(config, seed=1).records(6000)][-200:]
    proba = model.predict_proba(features.transform_records(rows))
    labels = features.encode_labels([r["churned"] for r in rows])
    assert np.mean(proba.argmax(axis=1) == labels) > report["baseline_accuracy"]


def test_a_small_window_trains_in_the_jobs_process_and_judges_alike(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    """Below ray.distributed_min_rows: no Ray Train worker group, the same loop, transform and report."""
    with Producer(config.kafka) as producer:
        # the demo's data: the generator seeds from the pipeline's name, which is random per test
        publish_stream(StreamGenerator(dataclasses.replace(config, name="demo"), seed=3), producer, topics,
                       config.name, 3000)  # fmt: skip
    assert ingest(config).manifest is not None
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, epochs=3))
    store = DatasetStore(config.datasets.root, config.name)
    window = store.window()
    assert not config.ray.distributed(window.rows)
    result = train_model(config, window, tmp_path / "out", store=store)

    assert result.params["trained_in"] == "the job's process" and result.params["workers"] == 0
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and "val_loss" in result.history[-1]
    report = result.report
    assert report["accuracy"] > report["baseline_accuracy"] + 0.15
    assert result.train_rows + result.holdout_rows == 3000
    held = store.read(window, config.schema.event_time)  # the Ray Data path judges it the same way
    _, holdout, holdout_id = split_by_time(held, config.schema.event_time, config.model.holdout_fraction)
    assert holdout_id == report["holdout"]
    again = evaluate_artifact(result.artifact, config, holdout, holdout_id)
    for metric in ("accuracy", "f1_macro", "roc_auc", "log_loss"):
        assert again[metric] == pytest.approx(report[metric], abs=1e-6)
    with pytest.raises(ValueError, match="distributed_min_rows"):
        train_model(config, window, tmp_path / "again", store=store, kill_once={"epoch": 1, "marker": "x"})


def test_tree_families_train_on_ray_train_and_in_the_jobs_process_and_are_judged_alike(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    """Gradient-boosted trees through Ray Train's XGBoostTrainer (2 workers, each on its shard) and
    a random forest in the job's process, on one window: each beats the baseline, and its artifact
    (XGBoost's UBJSON, no pickle) judges the holdout exactly as the training run reported."""
    with Producer(config.kafka) as producer:
        publish_stream(StreamGenerator(config, seed=4), producer, topics, config.name, 4000)
    assert ingest(config).manifest is not None
    store = DatasetStore(config.datasets.root, config.name)
    window = store.window()
    small = dataclasses.replace(config.model, rounds=60, trees=40, epochs=3)
    on_ray = dataclasses.replace(
        config,
        model=dataclasses.replace(small, kind="xgboost"),
        ray=dataclasses.replace(config.ray, distributed_min_rows=0),
    )
    here = dataclasses.replace(config, model=dataclasses.replace(small, kind="random_forest"))
    for cfg, where in ((on_ray, "Ray Train"), (here, "the job's process")):
        result = train_model(cfg, window, tmp_path / cfg.model.kind, store=store)
        assert result.params["trained_in"] == where and result.params["kind"] == cfg.model.kind
        assert result.spec.kind == cfg.model.kind and (result.artifact / "model.ubj").is_file()
        assert "val_loss" in result.history[-1]
        report = result.report
        assert report["accuracy"] > report["baseline_accuracy"] + 0.15, (cfg.model.kind, report)
        assert result.train_rows + result.holdout_rows == 4000
        again = evaluate_artifact(result.artifact, cfg, result.holdout, report["holdout"])
        for metric in ("accuracy", "f1_macro", "log_loss"):
            assert again[metric] == pytest.approx(report[metric], abs=1e-6)
        assert len(json.loads((result.artifact / "example.json").read_text())) == 5


def test_the_gate_judges_a_challenger_of_another_family_against_the_champion_on_its_own_holdout(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    """An MLP champion, then a retrain whose search holds only gradient-boosted trees, on a window
    with newer rows: the gate scores the champion on the challenger's holdout (not its own report),
    and the chosen family is a param of the run and a tag of the version."""
    import re

    from jobs.registry import ModelRegistry
    from jobs.tune import tune_train_and_gate

    with Producer(config.kafka) as producer:
        publish_stream(StreamGenerator(config, seed=5), producer, topics, config.name, 3000)
    assert ingest(config).manifest is not None
    store = DatasetStore(config.datasets.root, config.name)
    registry = ModelRegistry(config, f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "art")
    model = dataclasses.replace(config.model, epochs=3, rounds=60)
    mlp = dataclasses.replace(
        config, model=model, search=dataclasses.replace(config.search, trials=2, families=("mlp",))
    )
    first = tune_train_and_gate(mlp, store.window(), tmp_path / "a", store, registry)
    assert first["promoted"] and first["best_params"].get("kind", "mlp") == "mlp"

    with Producer(config.kafka) as producer:
        publish_stream(StreamGenerator(config, seed=6), producer, topics, config.name, 2000)
    assert ingest(config).manifest is not None
    trees = dataclasses.replace(mlp, search=dataclasses.replace(mlp.search, families=("xgboost",)))
    window = store.window()
    second = tune_train_and_gate(trees, window, tmp_path / "b", store, registry)
    version = registry.client.get_model_version(config.name, second["version"])
    run = registry.client.get_run(second["run_id"])
    assert run.data.params["kind"] == "xgboost" and version.tags["driftloop.family"] == "xgboost"

    # The champion, judged again on the challenger's holdout: the number the gate compared with.
    data = store.read_table(window, config.schema.event_time)
    _, holdout, holdout_id = split_by_time(data, config.schema.event_time, model.holdout_fraction)
    champion = evaluate_artifact(registry.download(first["version"], tmp_path / "c"), config, holdout, holdout_id)
    (said,) = re.findall(r"vs champion (\d\.\d{4})", " ".join(second["reasons"]))
    assert float(said) == pytest.approx(champion["f1_macro"], abs=5e-5), second["reasons"]
    assert holdout_id != registry.report(first["version"])["holdout"], "a holdout of newer rows"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"training": {"workers": 64}, "ray": {"distributed_min_rows": 0}},
            r"training needs 64 CPUs and 0 GPUs, but the Ray cluster has \d+ CPUs",
        ),
        ({"training": {"use_gpu": True, "workers": 1}}, "training needs 1 CPUs and 1 GPUs"),
        ({"search": {"cpus_per_trial": 16.0}, "ray": {"distributed_min_rows": 0}}, "a tuning trial needs 16 CPUs"),
    ],
)
def test_impossible_resources_fail_at_once_with_a_clear_error(
    config: PipelineConfig, tmp_path: Path, change: dict[str, dict[str, object]], message: str
) -> None:
    from jobs.tune import tune_model
    from streams.errors import DriftloopError

    for section, values in change.items():
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})
    store = DatasetStore(config.datasets.root, config.name)
    with pytest.raises(DriftloopError, match=message):
        if "search" in change:
            tune_model(config, store.window(), tmp_path, store=store)
        else:
            train_model(config, store.window(), tmp_path, store=store)


@pytest.mark.parametrize(
    ("yaml_change", "key", "expected"),
    [
        ({"model": {"kind": "forest"}}, "model.kind", "one of ['mlp', 'logreg', 'xgboost', 'random_forest']"),
        ({"search": {"families": ["mlp", "gbm"]}}, "search.families[1]", "one of ['mlp', 'logreg', 'xgboost'"),
        ({"search": {"families": ["mlp", "mlp"]}}, "search.families", "each family once"),
        (
            {"search": {"families": ["mlp"], "space": {"max_depth": {"choices": [3, 6]}}}},
            "search.space.max_depth",
            "a knob of a searched family (it is one of ['xgboost', 'random_forest'])",
        ),
        (
            {"search": {"families": ["mlp", "xgboost"], "space": {"kind": {"choices": ["mlp"]}}}},
            "search.space.kind",
            "no kind in the space",
        ),
        ({"search": {"space": {"kind": {"choices": ["mlp", "svm"]}}}}, "search.space.kind.choices", "families among"),
        ({"model": {"max_depth": 0}}, "model.max_depth", "an integer in [1, 32]"),
        ({"model": {"eta": 2}}, "model.eta", "a number in (0, 1]"),
        ({"model": {"class_weight": "auto"}}, "model.class_weight", "one of ['none', 'balanced']"),
        ({"search": {"space": {}}}, "search.space", "at least one parameter"),
        ({"search": {"space": {"momentum": {"low": 0, "high": 1}}}}, "search.space.momentum.name", "one of ["),
        (
            {"search": {"space": {"learning_rate": {"low": 0.1, "high": 0.01}}}},
            "search.space.learning_rate.high",
            "low < high",
        ),
        ({"training": {"workers": 0}}, "training.workers", "an integer >= 1"),
        ({"ray": {"distributed_min_rows": -1}}, "ray.distributed_min_rows", "an integer >= 0"),
    ],
)
def test_bad_training_configs(yaml_change: dict[str, dict[str, object]], key: str, expected: str) -> None:
    import yaml

    from streams.config import parse_config
    from streams.errors import ConfigError
    from tests.conftest import DEMO

    data = yaml.safe_load(DEMO.read_text())
    for section, values in yaml_change.items():
        data[section].update(values)
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(data), source="p.yaml", env={})
    assert caught.value.key == key and expected in str(caught.value)


@pytest.mark.parametrize(
    ("rows", "min_rows", "use_gpu", "expected"),
    [
        (6000, 100_000, False, True),  # small: the job's own process
        (100_000, 100_000, False, False),  # at the threshold: Ray's workers
        (6000, 0, False, False),  # 0: always Ray
        (6000, 100_000, True, False),  # a GPU is on a Ray worker
    ],
)
def test_where_a_window_is_worked_on(rows: int, min_rows: int, use_gpu: bool, expected: bool) -> None:
    from jobs.train import in_process
    from streams.config import RaySettings, TrainingSettings, load_config
    from streams.datasets import Window
    from tests.conftest import DEMO

    config = load_config(DEMO)
    config = dataclasses.replace(
        config, ray=RaySettings(distributed_min_rows=min_rows), training=TrainingSettings(use_gpu=use_gpu)
    )
    manifest = type("M", (), {"rows": rows * 2})()
    window = Window((manifest,), last_rows=rows)  # type: ignore[arg-type]  # the newest `rows` of twice as many
    assert in_process(None, window, config) is expected
    assert in_process(pa.table({"a": [1]}), window, config) is True, "data already read decides"


def test_the_reference_profile_describes_the_training_data(demo_config: PipelineConfig) -> None:
    from jobs.profile import reference_profile

    rows = [r.record for r in StreamGenerator(demo_config, seed=4).records(2000)]
    batches = [
        {k: np.array([r[k] for r in rows[i : i + 500]], dtype=object) for k in rows[0]} for i in range(0, 2000, 500)
    ]
    profile = reference_profile(batches, demo_config.schema)
    charges = profile["features"]["monthly_charges"]
    values = np.array([r["monthly_charges"] for r in rows])
    assert charges["count"] == 2000 and charges["mean"] == pytest.approx(values.mean())
    assert charges["deciles"] == pytest.approx(np.quantile(values, [i / 10 for i in range(1, 10)]).tolist())
    assert sum(charges["bin_counts"]) == 2000
    plans = profile["features"]["plan"]["frequencies"]
    assert sum(plans.values()) == 2000 and set(plans) <= set(demo_config.schema.feature("plan").categories)
    assert set(profile["features"]["churned"]["frequencies"]) == {"no", "yes"}
