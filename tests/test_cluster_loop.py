"""The loop's parts on a real multi-node Ray cluster, sharing state only through services.

The cluster is the session's `multinode_cluster` (a head and a worker node in namespaces of their
own: no shared local path); the services are `shared_services` (moto's S3, PostgreSQL and an
MLflow server on both) and a Tansu broker, all on the bridge address the nodes reach. A job's
datasets, checkpoints and artifacts go to S3, its registry to MLflow on PostgreSQL, its events
to Kafka; nothing else passes between nodes.
"""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from cluster.broker import EmbeddedBroker
from cluster.netns import NODE_WORK_DIR, NetnsCluster
from cluster.report_io import read_events
from jobs.controller import CONFIG_ENV
from jobs.models import ModelSpec, build_model, save_artifact
from jobs.registry import LOCK_SUFFIX, ModelRegistry
from serving.app import key_hash
from streams.config import API_KEY_HASH_ENV, PipelineConfig, dump_config, parse_config
from streams.datasets import Window
from streams.events import RetrainRequested, TrainingCompleted, TrainingFailed, deterministic_id
from streams.generator import StreamGenerator
from streams.kafka import Producer, ensure_topics
from streams.publish import publish_stream
from streams.topics import Topics
from tests.job_promote import MARK
from tests.multinode import run_job

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster_broker(multinode_cluster: NetnsCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Tansu broker on the bridge, where the nodes reach it (the session's is on loopback)."""
    log = tmp_path_factory.mktemp("cluster-broker") / "tansu.log"
    with EmbeddedBroker(host=multinode_cluster.host_ip, log_file=log) as broker:
        yield broker.bootstrap


def _pipeline(name: str, broker: str, services: Any, **sections: dict[str, Any]) -> PipelineConfig:
    """The demo pipeline renamed, on the cluster's services, with `sections` merged in (a config
    file's text, parsed and checked as a user's would be)."""
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data["name"] = name
    data["kafka"]["bootstrap_servers"] = broker
    data["mlflow"]["tracking_uri"] = services.mlflow.url
    data["datasets"]["root"] = services.datasets_root(f"datasets-{name}")
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return parse_config(yaml.safe_dump(data), source=f"{name}.yaml", env={})


def _register(registry: ModelRegistry, tmp_path: Path, f1: float) -> str:
    """A model version with a report of macro F1 `f1` on holdout h1 (the gate reads only the report)."""
    spec = ModelSpec("logreg", ("a", "b"), ("no", "yes"))
    folder = tmp_path / f"model-{f1}"
    report = {"holdout": "h1", "f1_macro": f1, "accuracy": 0.8, "log_loss": 0.4, "baseline_f1_macro": 0.35,
              "baseline_accuracy": 0.55, "confusion_matrix": [[1, 2], [3, 4]]}  # fmt: skip
    save_artifact(folder, spec, build_model(spec), "{}", extra={"report.json": json.dumps(report)})
    return registry.log_training(folder, {}, [], report, Window(manifests=())).version


def test_two_promotions_racing_on_two_nodes_never_crown_a_version_that_did_not_beat_the_champion(
    multinode_cluster: NetnsCluster, shared_services: Any, tmp_path: Path
) -> None:
    """Each promotion runs in a job of its own, one on the worker node and one on the head, sharing
    only the MLflow server (on PostgreSQL). With the old lock, a file under each job's own folder,
    both judged against the same champion and the alias ended on the worse version."""
    cluster, services = multinode_cluster, shared_services
    name = f"race{int(time.time() * 1000) % 10**9}"
    config = _pipeline(name, "127.0.0.1:9", services)
    registry = ModelRegistry(config, services.mlflow.url)
    champion = _register(registry, tmp_path, 0.70)
    assert registry.promote(champion, config.gate).promote
    good, best = _register(registry, tmp_path, 0.72), _register(registry, tmp_path, 0.75)

    results: dict[str, tuple[Any, str]] = {}

    def race(role: str, other: str, version: str, pause: float, node: str) -> None:
        command = ["python", "-m", "tests.job_promote", name, version, role, other, str(pause)]
        results[role] = run_job(cluster, shlex.join(command), working_dir=ROOT, resources={node: 1},
                                env=services.mlflow.client_env(), timeout_s=240)  # fmt: skip

    # Unserialised, `best` (judged second, quickly) is crowned first and `good` (which beat the
    # champion it saw) last: the alias would rest on a version that did not beat the one it replaced.
    threads = [threading.Thread(target=race, args=("good", "best", good, 3.0, "worker_node")),
               threading.Thread(target=race, args=("best", "good", best, 0.5, "head_node"))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    verdicts = {}
    for role, (info, logs) in results.items():
        assert str(info.status.value) == "SUCCEEDED", logs
        (line,) = [line for line in logs.splitlines() if line.startswith(MARK)]
        verdicts[role] = json.loads(line.removeprefix(MARK))
    assert verdicts["good"]["ip"] == cluster.nodes["w1"].ip and verdicts["best"]["ip"] == cluster.nodes["head"].ip
    assert registry.alias("champion") == best and verdicts["best"]["promote"] is True, verdicts
    client = MlflowClient(services.mlflow.url)
    assert client.get_model_version(name, best).tags["driftloop.gate"] == "passed"
    assert f"{name}{LOCK_SUFFIX}" not in [m.name for m in client.search_registered_models()], "the lock was released"


def test_a_registry_on_a_tracking_server_leaves_artifacts_to_the_servers_store(
    shared_services: Any, tmp_path: Path
) -> None:
    """A job passes its own folder as the artifact root (for a local store); with a tracking server, a
    folder of the job's node would be out of reach of the others (Serve on the head)."""
    config = _pipeline(f"art{int(time.time() * 1000) % 10**9}", "127.0.0.1:9", shared_services)
    registry = ModelRegistry(config, shared_services.mlflow.url, artifact_root=tmp_path / "mlartifacts")
    location = registry.client.get_experiment(registry.experiment_id).artifact_location
    assert location.startswith("mlflow-artifacts:"), location


def _first_checkpoint(services: Any, prefix: str, timeout_s: float) -> str:
    """The first checkpoint Ray Train wrote under `prefix` on S3 (a `-train-` run: not a Tune trial's)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(k for k in services.s3.keys(prefix) if "-train-" in k and "/checkpoint_" in k)
        if found:
            return found[0]
        time.sleep(0.5)
    raise TimeoutError(f"no Ray Train checkpoint under s3://{services.s3.bucket}/{prefix} in {timeout_s:.0f}s")


def _await(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f}s")
        time.sleep(0.5)


def _outcome(config: PipelineConfig, request_id: str) -> Any:
    """The controller's outcome event for retrain request `request_id` on the models topic, or None."""
    found = [e for e in read_events(config, idle_timeout_s=1.0)
             if isinstance(e, TrainingCompleted | TrainingFailed) and e.trigger_event_id == request_id]  # fmt: skip
    return found[-1] if found else None


def _launch(cluster: NetnsCluster, env: dict[str, str], *flags: str) -> str:
    """`driftloop submit ... -- python -m cluster launch` as a user runs it; its output (it must succeed).
    The job runs on the head (it holds half its `head_node`: the actors it starts need a little)."""
    forwarded = [n for n in env if n.startswith(("AWS_", "MLFLOW_", "DRIFTLOOP_"))]
    command = [sys.executable, "-m", "cluster.cli", "submit", "--address", cluster.jobs_url,
               "--resource", "head_node=0.5", *[f"--env={n}" for n in forwarded],
               "--", "python", "-m", "cluster", "launch", *flags]  # fmt: skip
    done = subprocess.run(command, env=cluster.client_env(env), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _status(cluster: NetnsCluster, env: dict[str, str]) -> dict[str, Any]:
    """What `driftloop launch --status` (a job on the cluster) says of the pipeline's actors."""
    (line,) = [line for line in _launch(cluster, env, "--status").splitlines() if line.startswith('{"')]
    return dict(json.loads(line))


def test_the_loop_as_actors_on_the_cluster_retrains_on_the_worker_swaps_serve_on_the_head_and_survives_a_killed_node(
    multinode_cluster: NetnsCluster, shared_services: Any, cluster_broker: str, tmp_path: Path
) -> None:
    """`driftloop launch`, submitted to the cluster as a job, starts the pipeline's controller and
    monitors as detached actors and its Serve app, all on the head (`ray.service_resources`,
    `serving.resources`). A retrain request on Kafka: the controller actor submits a job pinned to
    the worker node (`ray.job_resources`), which ingests from Kafka into a dataset on S3, tunes,
    trains with Ray Train over both nodes (checkpoints on S3: `ray.storage_path`), registers and
    promotes in MLflow on PostgreSQL; Serve on the head swaps to it and the monitor actor reads its
    predictions. A second job loses its node mid-training: the controller reports it failed, nothing
    is half-promoted, and the head kept serving."""
    cluster, services = multinode_cluster, shared_services
    name = f"loop{int(time.time() * 1000) % 10**9}"
    port = 8000 + int(time.time()) % 1000
    pin = {"head_node": 0.001}
    config = _pipeline(
        name, cluster_broker, services,
        ray={"distributed_min_rows": 0, "job_resources": {"worker_node": 1}, "service_resources": pin,
             "storage_path": services.s3.uri(f"ray/{name}")},
        serving={"host": "0.0.0.0", "port": port, "num_cpus": 0, "resources": pin},
        model={"kind": "mlp", "epochs": 4, "hidden": [32]},
        search={"trials": 2, "families": ["mlp"], "space": {"learning_rate": {"low": 0.002, "high": 0.01}}},
        training={"workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        retrain={"train_rows": 3000},
    )  # fmt: skip
    topics = Topics.of(config)
    ensure_topics(config.kafka, topics.all())
    with Producer(config.kafka) as producer:
        publish_stream(StreamGenerator(config, seed=3), producer, topics, name, 3000)

    key = secrets.token_urlsafe(24)
    env = services.client_env(f"datasets-{name}") | {CONFIG_ENV: dump_config(config), API_KEY_HASH_ENV: key_hash(key)}
    s3_env = [f"--job-env={n}" for n in env if n.startswith("AWS_")]  # the retrain jobs' S3 keys
    jobs, serve = cluster.jobs_client(), f"http://{cluster.head_ip}:{port}"
    worker, head = cluster.nodes["w1"], cluster.nodes["head"]
    try:
        launched = _launch(cluster, env, *s3_env, "--jobs-dir", f"{NODE_WORK_DIR}/jobs")
        assert f"{name}-controller" in launched and f"{name}-monitor-0" in launched, launched
        state = requests.get(f"{cluster.jobs_url}/api/v0/actors", params={"detail": "1", "limit": "10000"},
                             headers=cluster.auth_headers(), timeout=30)  # fmt: skip
        services_on = {a["name"]: a["node_id"] for a in state.json()["data"]["result"]["result"]
                       if a["name"].startswith(f"{name}-") and a["state"] == "ALIVE"}  # fmt: skip
        assert services_on == {f"{name}-controller": head.node_id, f"{name}-monitor-0": head.node_id}, services_on
        assert requests.get(f"{serve}/v1/health", timeout=30).json()["status"] == "no_model", "up before any model"

        first = RetrainRequested(event_id=deterministic_id(name, "first"), pipeline=name, cause="test: first")
        with Producer(config.kafka) as producer:
            producer.send_event(topics.retrain, first)
        _await(lambda: _outcome(config, first.event_id) is not None, 600, "the first job did not end")
        done = _outcome(config, first.event_id)
        logs = jobs.get_job_logs(done.submission_id or first.event_id)
        assert isinstance(done, TrainingCompleted), f"{done}\n{logs[-3000:]}"
        assert jobs.get_job_info(done.submission_id).driver_node_id == worker.node_id, "pinned to the worker node"
        # Ray Train's two workers, one on each node (each has one CPU), as the cluster's state API says
        job_id = jobs.get_job_info(done.submission_id).job_id
        state = requests.get(f"{cluster.jobs_url}/api/v0/actors", params={"detail": "1", "limit": "10000"},
                             headers=cluster.auth_headers(), timeout=30)  # fmt: skip
        actors = state.json()["data"]["result"]["result"]
        trainers = [a for a in actors if a["class_name"].endswith("RayTrainWorker") and a["job_id"] == job_id]
        assert {a["node_id"] for a in trainers} == {head.node_id, worker.node_id}, trainers
        version = done.model_version
        registry = ModelRegistry(config, services.mlflow.url)
        assert registry.alias("champion") == version
        assert _first_checkpoint(services, f"ray/{name}/", 5).startswith(f"ray/{name}/{name}-train-")
        assert any(k.endswith("manifest.json") for k in services.s3.keys(f"datasets-{name}/")), "the dataset on S3"
        artifacts = services.s3.keys("mlartifacts/")
        # The model was logged on the worker node: it is in S3, through the server, and so readable here
        assert registry.client.get_experiment(registry.experiment_id).artifact_location.startswith("mlflow-artifacts:")
        assert any(k.startswith(f"mlartifacts/{registry.experiment_id}/models/") for k in artifacts), artifacts[:5]
        assert (registry.download(version, tmp_path / "champion") / "spec.json").is_file()

        # Serve on the head swaps to the promoted version; the monitor actor reads what it predicts.
        _await(lambda: requests.get(f"{serve}/v1/model", headers={"x-api-key": key}, timeout=30).json()
               .get("version") == version, 120, f"Serve did not swap to version {version}")  # fmt: skip
        features = config.schema.feature_names
        records = [{f: r.record[f] for f in features} for r in StreamGenerator(config, seed=9).records(20)]
        for record in records:
            answer = requests.post(f"{serve}/v1/predict", json=record, headers={"x-api-key": key}, timeout=30)
            assert answer.status_code == 200 and answer.json()["model"]["version"] == version, answer.text
        _await(lambda: _status(cluster, env)[f"{name}-monitor-0"]["predictions"] >= len(records), 120,
               "the monitor actor did not read the predictions")  # fmt: skip

        # The second job: its node dies mid-training; the head goes on serving.
        second = RetrainRequested(event_id=deterministic_id(name, "second"), pipeline=name, cause="test: second")
        before = set(services.s3.keys(f"ray/{name}/"))
        with Producer(config.kafka) as producer:
            producer.send_event(topics.retrain, second)
        deadline = time.monotonic() + 600
        while not [k for k in set(services.s3.keys(f"ray/{name}/")) - before if "-train-" in k and "/checkpoint_" in k]:
            assert time.monotonic() < deadline and _outcome(config, second.event_id) is None, "no training"
            time.sleep(0.5)
        cluster.kill_node("w1")
        killed = time.monotonic()
        _await(lambda: _outcome(config, second.event_id) is not None, cluster.dead_after_s + 180,
               "the killed job was not reported")  # fmt: skip
        failed = _outcome(config, second.event_id)
        print(f"first job: version {version}; killed job reported {type(failed).__name__} "
              f"{time.monotonic() - killed:.1f}s after the kill: {getattr(failed, 'reason', '')[:300]}")  # fmt: skip
        assert isinstance(failed, TrainingFailed) and failed.reason, failed
        assert registry.alias("champion") == version, "nothing half-promoted"
        names = [m.name for m in MlflowClient(services.mlflow.url).search_registered_models()]
        assert f"{name}{LOCK_SUFFIX}" not in names
        assert [v.version for v in registry.client.search_model_versions(f"name='{name}'")] == [version]
        answer = requests.post(f"{serve}/v1/predict", json=records[0], headers={"x-api-key": key}, timeout=30)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == version, answer.text
        reports = _status(cluster, env)
        assert reports[f"{name}-controller"]["outcomes"] == 2 and all(r["running"] for r in reports.values()), reports
    finally:
        cluster.ensure_running()  # the next test gets its worker node whatever happened here
        stopped = _launch(cluster, env, "--stop")
        print(stopped.strip().splitlines()[-1:])
