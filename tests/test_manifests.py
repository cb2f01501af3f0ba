"""The multi-node manifests parse, keep token auth on, name entrypoints and configs that exist, hold no secrets,
and carry what KubeRay's operator and Ray's cluster launcher need to run them (named head ports, the autoscaler
for groups that can grow, pullable images, no local state uploaded)."""

from __future__ import annotations

import fnmatch
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
LAUNCHER = ROOT / "cluster" / "launcher" / "cluster.yaml"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|TRACKING_URI", re.IGNORECASE)
# KubeRay builds the head Service from the head container's ports as soon as one is listed: the RayJob
# and RayService controllers reach the Jobs and Serve APIs through `dashboard`, workers the GCS through
# `gcs-server`, clients `client`, traffic `serve`. A missing name leaves a RayService never Ready.
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}
# A registry host, as Docker tells one from a Docker Hub user: a dot or a port in it, or localhost.
QUALIFIED_IMAGE = re.compile(r"^(?:localhost|[^/]*[.:][^/]*)/[a-z0-9._/-]+:(?P<tag>\w[\w.-]{0,127})$")
LOCAL_STATE = (".venv", "runs", "mlruns", ".git", "__pycache__")


def in_repo(path: str) -> Path:
    """A path as the image sees it (/app is the repository) or relative to the repository."""
    return ROOT / path.removeprefix("/app/")


def ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    return [s for s in (spec, spec.get("rayClusterSpec"), spec.get("rayClusterConfig")) if s and "headGroupSpec" in s]


def containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def worker_groups() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(manifest, cluster spec, worker group) for every worker group of every manifest."""
    docs = [(p.name, yaml.safe_load(p.read_text())) for p in KUBERAY]
    return [(name, c, g) for name, doc in docs for c in ray_cluster_specs(doc) for g in c.get("workerGroupSpecs", [])]


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


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_the_head_names_every_port_kuberay_builds_its_service_from(path: Path) -> None:
    for cluster in ray_cluster_specs(yaml.safe_load(path.read_text())):
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]  # KubeRay's Ray container
        named = {p.get("name"): p["containerPort"] for p in head.get("ports", [])}
        assert named.items() >= HEAD_PORTS.items(), f"head ports {named}, KubeRay needs {HEAD_PORTS}"


@pytest.mark.parametrize("where", worker_groups(), ids=lambda w: f"{w[0]}:{w[2]['groupName']}")
def test_a_group_that_can_grow_or_starts_empty_has_the_autoscaler(
    where: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    _, cluster, group = where
    assert {"minReplicas", "replicas", "maxReplicas"} <= group.keys(), "every group says how far it scales"
    low, start, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
    assert 0 <= low <= start <= high and high >= 1, f"minReplicas {low} <= replicas {start} <= maxReplicas {high}"
    if low == 0 or start == 0 or low != high:
        # Without the autoscaler KubeRay holds the group at `replicas`: 0 is never a pod, min/max mean nothing.
        assert cluster.get("enableInTreeAutoscaling") is True, f"{group['groupName']} needs enableInTreeAutoscaling"
        options = cluster.get("autoscalerOptions", {})
        assert options.get("upscalingMode") in ("Default", "Aggressive", "Conservative"), "autoscalerOptions"
        idle = options.get("idleTimeoutSeconds")
        assert isinstance(idle, int) and idle > 0, "autoscalerOptions.idleTimeoutSeconds"
        assert options.get("imagePullPolicy") == "IfNotPresent", "the autoscaler sidecar is a container too"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_every_container_pulls_a_registry_qualified_tagged_image(path: Path) -> None:
    for cluster in ray_cluster_specs(yaml.safe_load(path.read_text())):
        for container in containers(cluster):
            image = container["image"]
            assert container.get("imagePullPolicy") == "IfNotPresent", f"{image}: an explicit imagePullPolicy"
            match = QUALIFIED_IMAGE.match(image)
            assert match, f"{image}: a registry host and a tag (a bare name is pulled from Docker Hub's library)"
            assert match["tag"] != "latest", f"{image}: a version tag, not latest"
            if "nvidia.com/gpu" in container.get("resources", {}).get("limits", {}):
                assert match["tag"].endswith("-gpu"), f"{image}: the CUDA build (cluster/Dockerfile's GPU args)"


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


def test_the_launcher_uploads_the_code_not_the_local_state() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    doc = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(doc))  # what `ray up` checks first
    excludes = [p.strip("/") for p in doc.get("rsync_exclude", [])]
    for name in LOCAL_STATE:
        assert any(fnmatch.fnmatch(name, p) for p in excludes), f"{name} goes to every node: add it to rsync_exclude"
    assert ".gitignore" in doc.get("rsync_filter", []), "what .gitignore lists stays home too"


def test_the_image_copies_what_the_entrypoints_need() -> None:
    copied = re.findall(r"^COPY \S+ (\S+(?: \S+)*) \S+$", (ROOT / "cluster" / "Dockerfile").read_text(), re.M)
    sources = {s for group in copied for s in group.split()}
    assert {"streams", "jobs", "serving", "cluster", "configs", "constraints.txt", "pyproject.toml"} <= sources
    assert all((ROOT / s).exists() for s in sources)
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(r"^ENV RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1$", text, re.M)


def test_the_image_builds_for_cpu_by_default_and_for_gpu_with_build_args() -> None:
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    ray_version = importlib.import_module("ray").__version__
    assert re.search(rf"^ARG BASE=rayproject/ray:{re.escape(ray_version)}-py311$", text, re.M), "CPU by default"
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=$", text, re.M), "the CUDA torch's index, empty for the CPU build"
    assert f"BASE=rayproject/ray:{ray_version}-py311-gpu" in text, "the GPU build is written down"
