"""MLflow tracking, the registry's aliases and the promotion gate, on a real SQLite store."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.models import ModelSpec, build_model, load_artifact, save_artifact
from jobs.registry import ModelRegistry
from streams.config import GateSettings, PipelineConfig
from streams.datasets import DataFile, DatasetStore
from streams.errors import DriftloopError
from streams.events import Event, ModelPromoted, ModelRejected, OffsetRange

GATE = GateSettings(primary_metric="f1_macro", min_improvement=0.005, no_regression=("accuracy",), tolerance=0.02)


def report(f1: float, holdout: str = "h1") -> dict[str, object]:
    return {"holdout": holdout, "f1_macro": f1, "accuracy": 0.8, "log_loss": 0.4, "baseline_f1_macro": 0.35,
            "baseline_accuracy": 0.55, "confusion_matrix": [[1, 2], [3, 4]]}  # fmt: skip


@pytest.fixture
def registry(demo_config: PipelineConfig, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(
        demo_config,
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=tmp_path / "artifacts",
    )


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    spec = ModelSpec("logreg", ("a", "b"), ("no", "yes"))
    folder = tmp_path / "model"
    save_artifact(folder, spec, build_model(spec), "{}")
    return folder


@pytest.fixture
def window(tmp_path: Path) -> object:
    store = DatasetStore(str(tmp_path / "ds"), "demo")
    ranges = [OffsetRange(topic="demo.records", partition=0, start=0, end=10)]
    attempt = store.new_attempt(ranges)
    Path(attempt, "f.parquet").write_bytes(b"x")
    files = [DataFile(path="f.parquet", range=ranges[0], rows=10, sha256="0" * 64, bytes=1)]
    import pyarrow as pa

    store.commit(ranges, attempt, files, pa.schema([("x", pa.int64())]), now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    return store.window()


def test_a_training_run_is_tracked_and_registered_with_its_lineage(
    registry: ModelRegistry, artifact: Path, window: object, tmp_path: Path
) -> None:
    history = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_accuracy": 0.7},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.5, "val_accuracy": 0.8}]  # fmt: skip
    registered = registry.log_training(artifact, {"kind": "logreg", "epochs": 2}, history, report(0.7), window,
                                       trigger_event_id="evt-1")  # type: ignore[arg-type]  # fmt: skip
    client = MlflowClient(registry.uri)
    run = client.get_run(registered.run_id)
    assert run.data.params == {"kind": "logreg", "epochs": "2"}
    assert run.data.metrics["holdout_f1_macro"] == 0.7
    assert [m.value for m in client.get_metric_history(registered.run_id, "val_accuracy")] == [0.7, 0.8]
    assert run.data.tags["git_commit"] and run.data.tags["driftloop.trigger_event_id"] == "evt-1"
    (dataset,) = run.inputs.dataset_inputs
    assert json.loads(dataset.dataset.source)["uri"] == "kafka://demo.records?p0=0-10"
    version = client.get_model_version("demo", registered.version)
    assert version.tags["driftloop.kafka"] == "kafka://demo.records?p0=0-10"
    assert json.loads(version.tags["driftloop.report"])["f1_macro"] == 0.7
    downloaded = registry.download(registered.version, tmp_path / "dl")
    assert load_artifact(downloaded)[0].kind == "logreg"


def test_first_model_promoted_over_the_baseline_then_a_worse_one_rejected(
    registry: ModelRegistry, artifact: Path, window: object
) -> None:
    events: list[Event] = []
    first = registry.log_training(artifact, {}, [], report(0.70), window)  # type: ignore[arg-type]
    assert registry.promote(first.version, GATE, publish=events.append).promote
    assert registry.alias("champion") == first.version and registry.alias("previous") is None
    worse = registry.log_training(artifact, {}, [], report(0.702), window)  # type: ignore[arg-type]
    decision = registry.promote(worse.version, GATE, publish=events.append)
    assert not decision.promote and "does not improve" in decision.reasons[0]
    better = registry.log_training(artifact, {}, [], report(0.75), window)  # type: ignore[arg-type]
    assert registry.promote(better.version, GATE, publish=events.append).promote
    assert (registry.alias("champion"), registry.alias("previous")) == (better.version, first.version)
    assert [type(e) for e in events] == [ModelPromoted, ModelRejected, ModelPromoted]
    assert isinstance(events[2], ModelPromoted) and events[2].previous_version == first.version
    seen = registry.client.get_model_version(registry.name, better.version).tags["driftloop.previous_on_holdout"]
    assert json.loads(seen)["f1_macro"] == pytest.approx(report(0.70)["f1_macro"]), "the bar a probation holds it to"
    other_holdout = registry.log_training(artifact, {}, [], report(0.9, holdout="h2"), window)  # type: ignore[arg-type]
    assert not registry.promote(other_holdout.version, GATE).promote


def test_rollback_returns_to_the_previous_version(registry: ModelRegistry, artifact: Path, window: object) -> None:
    from streams.errors import DriftloopError
    from streams.events import ModelRolledBack

    first = registry.log_training(artifact, {}, [], report(0.70), window)  # type: ignore[arg-type]
    registry.promote(first.version, GATE)
    with pytest.raises(DriftloopError, match="no previous version"):
        registry.rollback()
    second = registry.log_training(artifact, {}, [], report(0.75), window)  # type: ignore[arg-type]
    registry.promote(second.version, GATE)
    events: list[Event] = []
    assert registry.rollback("bad canary", publish=events.append) == (second.version, first.version)
    assert (registry.alias("champion"), registry.alias("previous")) == (first.version, second.version)
    (event,) = events
    assert isinstance(event, ModelRolledBack) and (event.from_version, event.to_version, event.reason) == (
        second.version, first.version, "bad canary")  # fmt: skip
    assert (
        registry.client.get_model_version(registry.name, second.version).tags["driftloop.rolled_back"] == "bad canary"
    )
    assert registry.rollback("again", only_from=second.version) is None, "not the champion any more: nothing moves"
    assert registry.alias("champion") == first.version


def test_two_racing_promotions_never_leave_the_alias_on_a_version_that_did_not_pass(
    registry: ModelRegistry, artifact: Path, window: object, demo_config: PipelineConfig
) -> None:
    """Two registries over one tracking store, sharing nothing else, as two jobs on two machines
    would (the lock that was a file on the local disk let both judge against the same champion)."""
    champion = registry.log_training(artifact, {}, [], report(0.70), window)  # type: ignore[arg-type]
    assert registry.promote(champion.version, GATE).promote
    best = registry.log_training(artifact, {}, [], report(0.75), window)  # type: ignore[arg-type]
    good = registry.log_training(artifact, {}, [], report(0.72), window)  # type: ignore[arg-type]
    results: dict[str, bool] = {}
    elsewhere = ModelRegistry(demo_config, registry.uri)

    def race(on: ModelRegistry, version: str, pause: float) -> None:
        results[version] = on.promote(version, GATE, pause=pause).promote

    # Unserialised, the best would be crowned first and the good one (which beat the champion it
    # saw) last: the alias would rest on a version that did not beat the one it replaced.
    threads = [threading.Thread(target=race, args=(registry, good.version, 1.0)),
               threading.Thread(target=race, args=(elsewhere, best.version, 0.2))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Whatever the order, each was judged against the champion of its moment: the best one serves.
    assert registry.alias("champion") == best.version
    assert results[best.version] is True
    client = MlflowClient(registry.uri)
    assert client.get_model_version("demo", best.version).tags["driftloop.gate"] == "passed"
    assert [m.name for m in client.search_registered_models()] == ["demo"], "the lock was released"


def test_a_promotion_lock_whose_holder_died_is_taken_over_after_its_lease(
    registry: ModelRegistry, artifact: Path, window: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobs.registry

    version = registry.log_training(artifact, {}, [], report(0.70), window)  # type: ignore[arg-type]
    registry.client.create_registered_model(f"{registry.name}{jobs.registry.LOCK_SUFFIX}")  # a holder that died
    monkeypatch.setattr(jobs.registry, "LOCK_WAIT_S", 1.0)
    with pytest.raises(DriftloopError, match=r"promotion lock 'demo\.promotion-lock' was not free within 1s"):
        registry.promote(version.version, GATE)
    assert registry.alias("champion") is None, "nothing moved without the lock"
    monkeypatch.setattr(jobs.registry, "LOCK_LEASE_S", 0.0)
    assert registry.promote(version.version, GATE).promote and registry.alias("champion") == version.version


def test_a_download_is_checked_against_the_digests_the_registry_recorded(
    registry: ModelRegistry, window: object, tmp_path: Path
) -> None:
    """Whoever can rewrite the artifact store can replace the weights and `digests.json` together, or
    the profile the monitor reads: the registry's own record of each file's SHA-256 catches both."""
    import hashlib

    from jobs.models import ArtifactError

    spec = ModelSpec("logreg", ("a", "b"), ("no", "yes"))
    folder = tmp_path / "model"
    extra = {"report.json": json.dumps(report(0.7)), "profile.json": '{"reference": {}}'}
    save_artifact(folder, spec, build_model(spec), "{}", extra=extra)
    version = registry.log_training(folder, {}, [], report(0.7), window).version  # type: ignore[arg-type]
    load_artifact(registry.download(version, tmp_path / "ok"))  # as registered: loads

    stored = next((tmp_path / "artifacts").rglob("weights.safetensors")).parent
    sound = {p.name: p.read_bytes() for p in stored.iterdir()}

    def tamper(name: str, data: bytes) -> None:
        for p in stored.iterdir():
            p.write_bytes(sound[p.name])
        (stored / name).write_bytes(data)
        digests = json.loads(sound["digests.json"])
        digests[name] = hashlib.sha256(data).hexdigest()  # the file beside it agrees with the change
        (stored / "digests.json").write_text(json.dumps(digests))

    zero = tmp_path / "zero"
    save_artifact(zero, spec, build_model(spec), "{}")  # another model's weights, a valid safetensors file
    tamper("weights.safetensors", (zero / "weights.safetensors").read_bytes())
    load_artifact(stored)  # the artifact alone cannot tell
    with pytest.raises(ArtifactError, match=r"weights\.safetensors does not match its SHA-256 in the registry"):
        registry.download(version, tmp_path / "w")
    tamper("profile.json", b'{"reference": {"forged": true}}')
    with pytest.raises(ArtifactError, match=r"profile\.json does not match"):
        registry.download(version, tmp_path / "p")

    client = MlflowClient(registry.uri)
    client.delete_model_version_tag(registry.name, version, "driftloop.digests")
    with pytest.raises(ArtifactError, match=r"no driftloop\.digests tag"):
        registry.download(version, tmp_path / "t")
