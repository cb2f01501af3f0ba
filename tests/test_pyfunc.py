"""Every registered version is an MLflow pyfunc model (logged from code): `mlflow.pyfunc.load_model`
and `mlflow models serve` answer what the driftloop artifact answers, on a real SQLite store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from jobs import pyfunc  # before mlflow.pyfunc: it imports MLflow's pyfunc without MLflow's import-time warning
from jobs.artifacts import ArtifactError, artifact_digests
from jobs.features import FeaturePipeline, fit_pipeline
from jobs.models import ModelSpec, build_model, load_artifact, save_artifact
from jobs.registry import DIGESTS_TAG, ModelRegistry
from streams.config import PipelineConfig
from streams.datasets import Window
from streams.generator import StreamGenerator

import mlflow.pyfunc  # isort: skip

REPORT = {"holdout": "h", "f1_macro": 0.7, "accuracy": 0.8, "log_loss": 0.4}


def feature_rows(config: PipelineConfig, n: int, seed: int) -> list[dict[str, object]]:
    """Generated records, feature fields only: what a client of the pyfunc model sends."""
    names = config.schema.feature_names
    return [{k: r.record[k] for k in names} for r in StreamGenerator(config, seed=seed).records(n)]


@pytest.fixture(scope="module")
def artifact(demo_config: PipelineConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real artifact: features fitted on generated records, an untrained model of the config's
    family (seeded), and a few raw records as its example."""
    rows = [r.record for r in StreamGenerator(demo_config, seed=1).records(400)]
    features = fit_pipeline(pa.Table.from_pylist(rows), demo_config.schema, demo_config.features)
    spec = ModelSpec.from_settings(demo_config.model, features.output_names, list(demo_config.schema.label.classes))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("artifact") / "model"
    example = json.dumps(feature_rows(demo_config, 3, seed=2))
    save_artifact(folder, spec, build_model(spec), features.to_json(), extra={"example.json": example})
    return folder


@pytest.fixture
def registry(demo_config: PipelineConfig, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(demo_config, f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")


def champion(registry: ModelRegistry, artifact: Path) -> str:
    version = registry.log_training(artifact, {}, [], REPORT, Window(())).version
    registry.client.set_registered_model_alias(registry.name, "champion", version)
    mlflow.set_tracking_uri(registry.uri)
    return version


def expected(config: PipelineConfig, artifact: Path, rows: list[dict[str, object]]) -> np.ndarray:
    """What the driftloop artifact itself answers for these records."""
    _, model, features_json = load_artifact(artifact)
    features = FeaturePipeline.from_json(features_json, config.schema, config.features)
    return np.asarray(model.predict_proba(features.transform_records(rows)))


def stored(registry_root: Path) -> Path:
    """The driftloop artifact inside the logged pyfunc model, in the artifact store."""
    (spec,) = registry_root.rglob(f"artifacts/{pyfunc.ARTIFACT}/spec.json")
    return spec.parent


def test_the_champion_loads_as_a_pyfunc_model_and_answers_what_the_artifact_answers(
    demo_config: PipelineConfig, registry: ModelRegistry, artifact: Path, tmp_path: Path
) -> None:
    champion(registry, artifact)
    rows = feature_rows(demo_config, 50, seed=3)
    model = mlflow.pyfunc.load_model("models:/demo@champion")
    out = model.predict(pd.DataFrame(rows))
    assert list(out.columns) == ["no", "yes"]
    assert np.allclose(out.to_numpy(), expected(demo_config, artifact, rows), atol=1e-6)
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-5)
    info = model.metadata
    assert [c.name for c in info.get_input_schema().inputs] == list(demo_config.schema.feature_names)
    assert info.get_output_schema().input_names() == ["no", "yes"]
    assert model.predict(pd.DataFrame(rows).iloc[:0]).shape == (0, 2)


def test_mlflow_models_serve_answers_invocations(
    demo_config: PipelineConfig, registry: ModelRegistry, artifact: Path, tmp_path: Path
) -> None:
    from cluster.broker import free_port

    champion(registry, artifact)
    port = free_port()
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))  # its uvicorn
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": registry.uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/demo@champion",
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    log = tmp_path / "serve.log"
    # cwd outside the project: the server imports `jobs` and `streams` from the model's own code
    with open(log, "wb") as out:
        server = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the server exited ({server.returncode}):\n{log.read_text()[-4000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"no /ping answer in 120 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        rows = feature_rows(demo_config, 20, seed=4)
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": rows}, timeout=30)
        assert answer.status_code == 200, answer.text
        got = pd.DataFrame(answer.json()["predictions"])
        assert list(got.columns) == ["no", "yes"]
        assert np.allclose(got.to_numpy(), expected(demo_config, artifact, rows), atol=1e-6)
        bad = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": [{"plan": 3}]},
                            timeout=30)  # fmt: skip
        assert bad.status_code == 400, "a record without the schema's fields is refused"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server's own group: mlflow and the uvicorn it starts
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_a_tampered_artifact_fails_to_load_as_a_pyfunc_model(
    registry: ModelRegistry, artifact: Path, tmp_path: Path
) -> None:
    """A pickle planted as the weights, with `digests.json` rewritten to match: the loader reads
    weights with safetensors only, so it refuses the file and never runs it."""
    champion(registry, artifact)
    folder = stored(tmp_path / "artifacts")
    marker = tmp_path / "unpickled"
    payload = f"cbuiltins\nopen\n(S'{marker}'\nS'w'\ntR.".encode()  # unpickling it would create `marker`
    (folder / "weights.safetensors").write_bytes(payload)
    digests = json.loads((folder / "digests.json").read_text())
    digests["weights.safetensors"] = hashlib.sha256(payload).hexdigest()
    (folder / "digests.json").write_text(json.dumps(digests))
    with pytest.raises(Exception, match="not a safetensors file"):
        mlflow.pyfunc.load_model("models:/demo@champion")
    assert not marker.exists()

    (folder / "digests.json").write_bytes((artifact / "digests.json").read_bytes())  # the weights alone changed
    with pytest.raises(Exception, match=r"weights\.safetensors does not match its SHA-256"):
        mlflow.pyfunc.load_model("models:/demo@champion")


def test_download_still_returns_the_verified_driftloop_artifact(
    registry: ModelRegistry, artifact: Path, tmp_path: Path
) -> None:
    version = champion(registry, artifact)
    folder = registry.download(version, tmp_path / "dl")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in artifact.iterdir())
    assert load_artifact(folder)[0].classes == ("no", "yes")

    (stored(tmp_path / "artifacts") / "example.json").write_text("[]")
    with pytest.raises(ArtifactError, match=r"example\.json does not match its SHA-256 in the registry"):
        registry.download(version, tmp_path / "tampered")


def test_download_reads_a_version_registered_before_pyfunc_models(
    registry: ModelRegistry, artifact: Path, tmp_path: Path
) -> None:
    """A version of old: the artifact folder itself logged under the run, and registered as the source."""
    mlflow.set_tracking_uri(registry.uri)
    with mlflow.start_run(experiment_id=registry.experiment_id) as run:
        mlflow.log_artifacts(str(artifact), artifact_path="model")
    registry.client.create_registered_model(registry.name)
    tags = {DIGESTS_TAG: json.dumps(artifact_digests(artifact))}
    old = registry.client.create_model_version(registry.name, f"{run.info.artifact_uri}/model", run.info.run_id, tags)
    folder = registry.download(str(old.version), tmp_path / "dl")
    assert load_artifact(folder)[0].classes == ("no", "yes")


def test_a_version_without_a_fitting_example_is_still_logged(
    demo_config: PipelineConfig, registry: ModelRegistry, tmp_path: Path
) -> None:
    """No `example.json` (the registry tests' toy artifacts), or one that does not fit the schema's
    types (MLflow would refuse to log it): the model is logged without a signature and example."""
    spec = ModelSpec("logreg", ("a", "b"), ("no", "yes"))
    save_artifact(tmp_path / "toy", spec, build_model(spec), "{}")
    misfit = json.dumps([{**feature_rows(demo_config, 1, seed=5)[0], "tenure_months": 1.5}])
    save_artifact(tmp_path / "misfit", spec, build_model(spec), "{}", extra={"example.json": misfit})
    client = MlflowClient(registry.uri)
    toy, other = (
        registry.log_training(tmp_path / name, {}, [], REPORT, Window(())).version for name in ("toy", "misfit")
    )
    source = client.get_model_version(registry.name, toy).source
    assert source.startswith("models:/")
    info = mlflow.models.get_model_info(source)
    assert info.signature is None and pyfunc.ARTIFACT in info.flavors["python_function"]["artifacts"]
    info = mlflow.models.get_model_info(client.get_model_version(registry.name, other).source)
    assert info.signature is None and info.saved_input_example_info is None
    model = next((tmp_path / "artifacts").rglob("MLmodel"))
    for module in ("pyfunc.py", "code/jobs/models.py", "code/jobs/features.py", "code/streams/config.py"):
        assert (model.parent / module).is_file(), f"{module}: the loader imports it in a process of its own"
