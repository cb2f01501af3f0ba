"""The multi-node manifests parse, keep token auth on, name entrypoints and configs that exist, hold no secrets."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.config import load_config
from tests.conftest import ROOT

KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|TRACKING_URI", re.IGNORECASE)


def in_repo(path: str) -> Path:
    """A path as the image sees it (/app is the repository) or relative to the repository."""
    return ROOT / path.removeprefix("/app/")


def ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    return [s for s in (spec, spec.get("rayClusterSpec"), spec.get("rayClusterConfig")) if s and "headGroupSpec" in s]


def containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def check_entrypoint(command: str) -> None:
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    module = importlib.import_module(words[2])
    assert callable(getattr(module, "main", None)), f"{words[2]} has no main()"
    if "--config" in words:
        load_config(in_repo(words[words.index("--config") + 1]), env={})


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob", "RayService")
    clusters = ray_cluster_specs(doc)
    assert clusters, "a Ray cluster spec"
    for cluster in clusters:
        assert cluster["rayVersion"] == importlib.import_module("ray").__version__
        assert cluster["authOptions"] == {"mode": "token"}, "token auth stays on"
        for container in containers(cluster):
            assert {"secretRef": {"name": "driftloop-secrets"}} in container.get("envFrom", [])
            for variable in container.get("env", []):
                assert not SECRET_NAME.search(variable["name"]) or "value" not in variable, "secrets from Secrets"
    if doc["kind"] == "RayJob":
        check_entrypoint(doc["spec"]["entrypoint"])
    if doc["kind"] == "RayService":
        from ray.serve.schema import ServeDeploySchema

        (app,) = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"])).applications
        module, _, name = app.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), name))
        load_config(in_repo(app.args["config"]), env={})


def test_the_kinds_we_promise_are_there() -> None:
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in KUBERAY}
    assert kinds == {"RayCluster", "RayJob", "RayService"}


def test_the_cluster_launcher_config() -> None:
    doc = yaml.safe_load((ROOT / "cluster" / "launcher" / "cluster.yaml").read_text())
    assert doc["provider"]["type"] == "local" and doc["file_mounts"]["/home/ray/driftloop"] == "."
    setup = " ".join(doc["setup_commands"])
    assert "constraints.txt" in setup and (ROOT / "constraints.txt").exists()
    starts = doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert all("RAY_SERVE_ENABLE_HA_PROXY=1" in c for c in starts if "ray start" in c), "HAProxy, as driftloop's own"
    assert "--dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"]), "the Jobs API stays private"
    text = (ROOT / "cluster" / "launcher" / "cluster.yaml").read_text()
    for line in text.splitlines():
        assert not re.search(r"(PASSWORD|TOKEN|API_KEY)=\S", line), f"a secret in the file: {line}"


def test_the_image_copies_what_the_entrypoints_need() -> None:
    copied = re.findall(r"^COPY \S+ (\S+(?: \S+)*) \S+$", (ROOT / "cluster" / "Dockerfile").read_text(), re.M)
    sources = {s for group in copied for s in group.split()}
    assert {"streams", "jobs", "serving", "cluster", "configs", "constraints.txt", "pyproject.toml"} <= sources
    assert all((ROOT / s).exists() for s in sources)
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(r"^ENV RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1$", text, re.M)
