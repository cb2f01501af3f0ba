"""Ray Serve over real HTTP: predictions, auth, validation, hot swap, and the predictions topic."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import requests

from cluster.broker import free_port
from jobs.features import fit_pipeline
from jobs.models import ModelSpec, build_model, save_artifact
from jobs.registry import ModelRegistry
from jobs.worker_loop import pick_device, train_standalone
from serving.app import API_KEY_ENV, build_app
from serving.model import load_served_model
from streams.config import PipelineConfig
from streams.datasets import Window
from streams.events import PredictionLogged
from streams.generator import StreamGenerator
from streams.kafka import Batch, StreamConsumer
from streams.serde import decode_events
from streams.topics import Topics

# One Serve instance per Ray cluster, and the workers of `pytest -n` share one cluster: `make test`
# runs each file in one worker (`--dist loadfile`), which also trains the module's models once.
pytestmark = [pytest.mark.integration, pytest.mark.heavy, pytest.mark.usefixtures("ray_session")]
KEY = "test-key-0123456789"
FEATURES = ("tenure_months", "monthly_charges", "support_calls", "data_usage_gb", "autopay", "plan", "region")


def train_artifact(config: PipelineConfig, folder: Path, seed: int) -> Path:
    rows = [r.record for r in StreamGenerator(config, seed=seed).records(3000)]
    features = fit_pipeline(ray.data.from_items(rows, override_num_blocks=2), config.schema, config.features)
    x = features.transform_records(rows)
    y = features.encode_labels([r["churned"] for r in rows])
    spec = ModelSpec.from_settings(config.model, features.output_names, list(config.schema.label.classes))
    model = build_model(spec)
    train_standalone(model, x[:2500], y[:2500], x[2500:], y[2500:], epochs=2, batch_size=128, learning_rate=0.01,
                     device=pick_device(False), seed=seed)  # fmt: skip
    save_artifact(folder, spec, model, features.to_json())
    return folder


@pytest.fixture(scope="module")
def artifacts(demo_config: PipelineConfig, tmp_path_factory: pytest.TempPathFactory, ray_session: str) -> list[Path]:
    """Two models trained once for the module (seeds 1 and 2); each test registers them in its own registry."""
    root = tmp_path_factory.mktemp("models")
    return [train_artifact(demo_config, root / f"m{seed}", seed) for seed in (1, 2)]


def register_model(registry: ModelRegistry, artifact: Path, f1: float) -> str:
    report = {"holdout": "h", "f1_macro": f1, "accuracy": 0.8, "log_loss": 0.4, "baseline_f1_macro": 0.3}
    return registry.log_training(artifact, {}, [], report, Window(())).version


def empty_registry(config: PipelineConfig, tmp_path: Path) -> ModelRegistry:
    """A registry of its own in tmp_path, with no model yet."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return ModelRegistry(config, uri, artifact_root=tmp_path / "art")


def champion_registry(config: PipelineConfig, tmp_path: Path, artifacts: list[Path]) -> tuple[ModelRegistry, str]:
    """A registry in tmp_path whose champion is the first trained model (version 1)."""
    registry = empty_registry(config, tmp_path)
    champion = register_model(registry, artifacts[0], f1=0.7)
    assert registry.promote(champion, config.gate).promote
    return registry, champion


@pytest.fixture(scope="module")
def serve_url(ray_session: str) -> Iterator[str]:
    """One Serve instance (controller and proxy) for the module's tests, on a free loopback port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@contextlib.contextmanager
def serving(app: object, name: str, url: str) -> Iterator[str]:
    """Run `app` at `url` (the module's Serve instance) for the duration."""
    from ray import serve

    serve.run(app, name=name, route_prefix="/")  # type: ignore[arg-type]
    try:
        yield url
    finally:
        serve.delete(name)


@pytest.fixture
def served(
    config: PipelineConfig,
    topics: Topics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve_url: str,
    artifacts: list[Path],
) -> Iterator[tuple[str, ModelRegistry, PipelineConfig]]:
    monkeypatch.setenv(API_KEY_ENV, KEY)
    registry, _ = champion_registry(config, tmp_path, artifacts)
    with serving(build_app(config, registry.uri), config.name, serve_url) as url:
        yield url, registry, config


def post(
    url: str, body: object, key: str | None = KEY, raw: bytes | None = None, timeout: float = 60
) -> requests.Response:
    headers = {"x-api-key": key} if key else {}
    if raw is not None:
        return requests.post(
            f"{url}/v1/predict", data=raw, headers={**headers, "content-type": "application/json"}, timeout=timeout
        )
    return requests.post(f"{url}/v1/predict", json=body, headers=headers, timeout=timeout)


def rows(config: PipelineConfig, n: int, seed: int = 8) -> list[dict[str, object]]:
    return [{k: r.record[k] for k in FEATURES} for r in StreamGenerator(config, seed=seed).records(n)]


def test_predictions_match_the_model_evaluated_offline_and_bad_requests_are_refused(
    served: tuple[str, ModelRegistry, PipelineConfig],
) -> None:
    url, registry, config = served
    batch = rows(config, 50)
    answer = post(url, [{**r, "request_id": f"r{i}"} for i, r in enumerate(batch)])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == {"name": config.name, "version": "1"}
    offline = load_served_model(config, registry).predict(batch)
    served_proba = np.array([[p["probabilities"][c] for c in ("no", "yes")] for p in body["predictions"]])
    assert np.allclose(served_proba, offline, atol=1e-6)
    assert [p["request_id"] for p in body["predictions"]] == [f"r{i}" for i in range(50)]
    single = post(url, batch[0]).json()["predictions"]
    assert len(single) == 1 and len(single[0]["request_id"]) == 32  # generated when not given
    assert requests.get(f"{url}/docs", timeout=10).status_code == 200

    # The same app (one deployment for both halves): auth, validation and limits.
    record = batch[0]
    assert post(url, record, key=None).status_code == 401
    assert post(url, record, key="wrong").status_code == 401
    assert requests.get(f"{url}/v1/model", timeout=10).status_code == 401
    bearer = requests.post(f"{url}/v1/predict", json=record, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert bearer.status_code == 200
    health = requests.get(f"{url}/v1/health", timeout=10)
    assert health.status_code == 200 and health.json()["model_version"] == "1"

    bad = post(url, {**record, "plan": "gold"})
    assert bad.status_code == 422
    assert bad.json()["detail"] == {
        "kind": "unknown_category",
        "field": "plan",
        "message": "field 'plan': unknown category 'gold'",
    }
    missing = post(url, {k: v for k, v in record.items() if k != "tenure_months"})
    assert missing.status_code == 422 and missing.json()["detail"]["field"] == "tenure_months"
    assert post(url, None, raw=b'{"tenure_months": ').json()["detail"]["kind"] == "invalid_json"
    assert post(url, []).status_code == 422
    assert post(url, None, raw=b"[" + b",".join([b"{}"] * 10) + b"]").status_code == 422
    huge = post(url, None, raw=b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}')
    assert huge.status_code == 413
    for request_id in ("r" * 3_000_000, "a/../b", "x; id", "", "a" * 129):  # a 3 MB id killed the log thread
        refused = post(url, {**record, "request_id": request_id})
        assert refused.status_code in (413, 422), request_id[:20]
        if refused.status_code == 422:
            assert refused.json()["detail"]["kind"] == "invalid_field", refused.json()
    assert post(url, {**record, "request_id": "order-17:a.b_c"}).status_code == 200
    info = requests.get(f"{url}/v1/model", headers={"x-api-key": KEY}, timeout=10).json()
    assert info["version"] == "1" and info["alias"] == "champion" and info["lineage"]["run_id"]
    # Under the pipeline's name too (how clients reach any pipeline of a cluster), and only its name
    named = requests.post(f"{url}/{config.name}/v1/predict", json=record, headers={"x-api-key": KEY}, timeout=30)
    assert named.status_code == 200 and named.json()["predictions"][0]["probabilities"] == single[0]["probabilities"]
    assert requests.get(f"{url}/{config.name}/v1/model", headers={"x-api-key": KEY}, timeout=10).json() == info
    assert requests.get(f"{url}/{config.name}/v1/health", timeout=10).json()["model_version"] == "1"
    other = requests.post(f"{url}/not-{config.name}/v1/predict", json=record, headers={"x-api-key": KEY}, timeout=30)
    assert other.status_code == 404 and other.json()["detail"]["kind"] == "unknown_pipeline", other.text


def family_artifact(config: PipelineConfig, kind: str, folder: Path) -> Path:
    """A model of `kind` trained by `train_model` in this process on 3,000 generated rows (spec,
    features, weights, report and the monitor's profile, as a retrain writes them)."""
    from datetime import datetime

    import pyarrow as pa

    from jobs.train import train_model

    # The generator's data depends on the pipeline's name, which is random per test: train on the
    # demo's, so that what is asserted of the model does not change from run to run
    records = [r.record for r in StreamGenerator(dataclasses.replace(config, name="demo"), seed=7).records(3000)]
    for record in records:  # as the dataset store holds it: a timestamp
        record["event_time"] = datetime.fromisoformat(str(record["event_time"]).replace("Z", "+00:00"))
    table = pa.Table.from_pylist(records)
    settings = dataclasses.replace(config.model, kind=kind, epochs=2, rounds=40, trees=30)
    return train_model(dataclasses.replace(config, model=settings), Window(()), folder, data=table).artifact


@pytest.mark.parametrize("kind", ["xgboost", "random_forest"])  # logreg: the MLP's family class, served below
def test_every_family_is_served_by_alias_over_http_and_monitored_from_its_profile(
    kind: str,
    config: PipelineConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve_url: str,
) -> None:
    """Fit -> register -> load by alias -> serve over HTTP -> the monitor's reference, for the tree
    families (the neural ones are what the rest of this module serves): nothing asks which it is."""
    from jobs.monitor import load_champion

    monkeypatch.setenv(API_KEY_ENV, KEY)
    artifact = family_artifact(config, kind, tmp_path / "out")
    registry = empty_registry(config, tmp_path)
    report = json.loads((artifact / "report.json").read_text())
    version = registry.log_training(artifact, {"kind": kind}, [], report, Window(())).version
    assert registry.promote(version, config.gate).promote
    batch = rows(config, 40)
    with serving(build_app(config, registry.uri), config.name, serve_url) as url:
        answer = post(url, [{**r, "request_id": f"r{i}"} for i, r in enumerate(batch)])
        assert answer.status_code == 200, answer.text
        info = requests.get(f"{url}/v1/model", headers={"x-api-key": KEY}, timeout=10).json()
    assert info["kind"] == kind and info["alias"] == "champion"
    offline = load_served_model(config, registry).predict(batch)
    served_proba = np.array([[p["probabilities"][c] for c in ("no", "yes")] for p in answer.json()["predictions"]])
    assert np.allclose(served_proba, offline, atol=1e-6)
    assert report["accuracy"] > report["baseline_accuracy"] + 0.15, "it learnt"
    champion = load_champion(config, registry)
    assert champion.version == version and champion.report["f1_macro"] == report["f1_macro"]
    from jobs.monitor import PREDICTION

    assert {*config.schema.feature_names, PREDICTION} <= set(champion.reference.features)


def test_hot_swap_under_load_fails_no_request_and_logs_every_prediction(
    served: tuple[str, ModelRegistry, PipelineConfig], artifacts: list[Path]
) -> None:
    from ray import serve

    url, registry, config = served
    second = register_model(registry, artifacts[1], f1=0.9)
    assert registry.promote(second, config.gate).promote
    batch = rows(config, 5)
    outcomes: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answer = post(url, batch, timeout=180)  # slow is not dropped: a loaded CI machine answers late
            outcomes.append((answer.status_code, answer.json()["model"]["version"] if answer.ok else answer.text))

    running: list[int] = []  # replicas RUNNING, seen every 0.1 s through both redeploys

    def watch() -> None:
        while not stop.is_set():
            deployments = serve.status().applications[config.name].deployments
            running.append(deployments["ModelServer"].replica_states.get("RUNNING", 0))  # a str enum
            time.sleep(0.1)

    threads = [threading.Thread(target=client) for _ in range(3)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    # Each serve.run is a new code version to Serve: it replaces the replica, and with
    # max_surge_percent the new one runs before the old one stops. The same version first, then the next.
    serve.run(build_app(config, registry.uri), name=config.name, route_prefix="/")
    serve.run(build_app(config, registry.uri, version=second), name=config.name, route_prefix="/")
    deadline = time.monotonic() + 60
    while not any(v == second for _, v in outcomes[-5:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert outcomes and all(status == 200 for status, _ in outcomes), [o for o in outcomes if o[0] != 200][:3]
    assert running and min(running) >= 1, "a moment with no replica serving"
    versions = [v for _, v in outcomes]
    assert set(versions) == {"1", second}
    assert versions.index(second) > 0 and "1" not in versions[versions.index(second) + 10 :]

    expected = len(outcomes) * len(batch)
    seen: list[PredictionLogged] = []

    def keep(b: Batch) -> None:
        seen.extend(v for v in b.values if isinstance(v, PredictionLogged))

    topics = Topics(config.name)
    StreamConsumer(config.kafka, [topics.predictions], decode_events, keep, group_id=None, dlq_topic=topics.dlq).run(
        max_records=expected, idle_timeout_s=15
    )
    assert len(seen) == expected
    assert {e.model_version for e in seen} == {"1", second}
    health = requests.get(f"{url}/v1/health", timeout=10).json()
    assert health["predictions_dropped"] == 0


def test_a_replica_starts_with_no_model_and_promotions_on_the_models_topic_load_one(
    config: PipelineConfig,
    topics: Topics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve_url: str,
    artifacts: list[Path],
) -> None:
    from streams.kafka import Producer

    monkeypatch.setenv(API_KEY_ENV, KEY)
    registry = empty_registry(config, tmp_path)
    with serving(build_app(config, registry.uri), config.name, serve_url) as url:
        health = requests.get(f"{url}/v1/health", timeout=10).json()
        assert health["status"] == "no_model" and health["model_version"] is None
        waiting = post(url, rows(config, 1))
        assert waiting.status_code == 503 and waiting.json()["detail"]["kind"] == "no_model"
        assert waiting.headers["retry-after"] == "5"
        info = requests.get(f"{url}/v1/model", headers={"x-api-key": KEY}, timeout=10)
        assert info.status_code == 503

        def promote(artifact: Path, f1: float, announce: bool) -> str:
            version = register_model(registry, artifact, f1=f1)
            with Producer(config.kafka) as producer:
                publish = (lambda e: producer.send_event(topics.models, e)) if announce else None
                assert registry.promote(version, config.gate, publish=publish).promote
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and requests.get(f"{url}/v1/health", timeout=10).json()["model_version"] != version
            ):
                time.sleep(0.3)
            return version

        # The first model, not announced: the replica finds it in the registry by itself.
        first = promote(artifacts[0], f1=0.7, announce=False)
        assert requests.get(f"{url}/v1/health", timeout=10).json()["status"] == "ok"
        assert post(url, rows(config, 1)).json()["model"]["version"] == first == "1"
        second = promote(artifacts[1], f1=0.9, announce=True)  # a swap, announced on the models topic
        assert post(url, rows(config, 1)).json()["model"]["version"] == second == "2"


def test_a_champion_whose_artifact_was_changed_is_refused_with_503_at_once_until_a_good_one_is_promoted(
    config: PipelineConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve_url: str, artifacts: list[Path]
) -> None:
    """The replica refuses the tampered champion but starts: requests get 503 `model_refused` with the
    reason (they used to wait 40 s and more in Serve's proxy for a replica that never came up), health
    and `status` say so, and the next promotion of a sound model is picked up by itself."""
    from cluster.status import serve_status

    monkeypatch.setenv(API_KEY_ENV, KEY)
    registry, _ = champion_registry(config, tmp_path, artifacts)
    weights = [p for p in (tmp_path / "art").rglob("weights.safetensors")]
    assert len(weights) == 1
    weights[0].write_bytes(weights[0].read_bytes()[:-8] + bytes(8))  # the digest beside it is left as it was
    with serving(build_app(config, registry.uri), config.name, serve_url) as url:
        health = requests.get(f"{url}/v1/health", timeout=10).json()
        assert health["status"] == "model_refused" and health["model_version"] is None
        refused = post(url, rows(config, 1), timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        detail = refused.json()["detail"]
        assert detail["kind"] == "model_refused" and "does not match its SHA-256" in detail["message"]
        with pytest.raises(RuntimeError, match="could not be loaded"):
            serve_status(url)
        version = register_model(registry, artifacts[1], f1=0.9)
        assert registry.promote(version, config.gate).promote
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and requests.get(f"{url}/v1/health", timeout=10).json()["status"] != "ok":
            time.sleep(0.5)
        answer = post(url, rows(config, 1))
        assert answer.status_code == 200 and answer.json()["model"]["version"] == version
        assert serve_status(url)["status"] == "ok"


def test_a_broker_outage_costs_prediction_logs_not_requests(
    config: PipelineConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve_url: str, artifacts: list[Path]
) -> None:
    from cluster.broker import EmbeddedBroker
    from streams.kafka import ensure_topics

    monkeypatch.setenv(API_KEY_ENV, KEY)
    with EmbeddedBroker() as own:
        config = dataclasses.replace(
            config,
            kafka=dataclasses.replace(config.kafka, bootstrap_servers=own.bootstrap),
            serving=dataclasses.replace(config.serving, log_timeout_s=3.0),  # undelivered logs count as dropped soon
        )
        ensure_topics(config.kafka, Topics(config.name).all())
        registry, _ = champion_registry(config, tmp_path, artifacts)
        with serving(build_app(config, registry.uri), config.name, serve_url) as url:
            batch = rows(config, 3)
            assert post(url, batch).status_code == 200
            own.stop()  # the broker goes away mid-traffic
            statuses, dropped = [], 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and dropped == 0:
                statuses.append(post(url, batch).status_code)
                dropped = requests.get(f"{url}/v1/health", timeout=10).json()["predictions_dropped"]
                time.sleep(0.1)
            assert statuses and set(statuses) == {200}, "serving kept answering"
            assert dropped > 0, "what could not be logged is counted"


def test_a_replica_killed_under_load_fails_no_request_and_each_replica_counts_its_predictions(
    config: PipelineConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve_url: str,
    artifacts: list[Path],
    ray_session: str,
) -> None:
    """A request in flight on a killed replica is answered by the other one (HAProxy resends it,
    `cluster.ray_runtime.RETRY_ON_ENV`); each replica's counts are in Prometheus form at Ray's
    metrics endpoint, where every live one's answered predictions are logged or counted as dropped."""
    from ray.util.state import list_actors

    from serving.app import replica_name
    from serving.metrics import replica_counts

    monkeypatch.setenv(API_KEY_ENV, KEY)
    config = dataclasses.replace(config, serving=dataclasses.replace(config.serving, num_replicas=2))
    registry, _ = champion_registry(config, tmp_path, artifacts)

    host = replica_name().partition(":")[0]  # the replicas run on this machine

    def victim_name(actor: Any) -> str:
        return f"{host}:{actor.pid}"

    def replicas() -> list[object]:
        # The state API's own address lookup finds every Ray on the machine (other tests start some)
        alive = list_actors(address=f"http://{ray_session}", filters=[("state", "=", "ALIVE")])
        return [a for a in alive if str(a.class_name).startswith(f"ServeReplica:{config.name}:")]

    with serving(build_app(config, registry.uri), config.name, serve_url) as url:
        batch = rows(config, 5)
        outcomes: list[int | str] = []
        stop = threading.Event()

        retried: list[str] = []

        def client() -> None:
            """As README's "Calling the model" asks of a client: a request whose connection closed
            with no answer, or that got a 5xx, is sent again (a prediction is idempotent)."""
            while not stop.is_set():
                for attempt in range(4):
                    try:
                        answer = post(url, batch, timeout=180)
                        if answer.status_code < 500:
                            outcomes.append(answer.status_code)
                            break
                        retried.append(str(answer.status_code))
                    except requests.RequestException as err:
                        retried.append(f"{type(err).__name__}: {str(err)[:120]}")
                    time.sleep(0.2 * (attempt + 1))
                else:
                    outcomes.append("gave up")

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        victim: Any = replicas()[0]
        ray.kill(ray.get_actor(str(victim.name), namespace=victim.ray_namespace), no_restart=False)
        deadline = time.monotonic() + 120
        while len({str(getattr(a, "name", "")) for a in replicas()} - {victim.name}) < 2:
            assert time.monotonic() < deadline, "the killed replica was not replaced"
            time.sleep(0.5)
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join()
        answered = sum(o == 200 for o in outcomes)
        # HAProxy resends a request the victim held with no answer yet (`cluster.ray_runtime.RETRY_ON_ENV`):
        # without that, the 3 requests in flight on it failed; with it, 0-2 in 5 runs (one whose answer
        # had begun, or one HAProxy's old process held while Serve reloaded it). The client's resend covers those.
        assert answered > 50 and all(o == 200 for o in outcomes), (outcomes[-5:], retried[:5])

        live = {victim_name(a) for a in replicas()}
        deadline = time.monotonic() + 60
        while True:  # Ray exports every few seconds; the live replicas' logs empty soon after traffic stops
            series = replica_counts(config.name)
            mine = {w: c for w, c in series.items() if w in live}
            settled = len(mine) == 2 and all(
                c.get("predictions_total", 0)
                == c.get("predictions_logged_total", 0) + c.get("predictions_dropped_total", 0)
                and c.get("predictions_buffered") == 0
                for c in mine.values()
            )
            if settled or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert len(mine) == 2, f"two live replicas export their counts: {series}"
        assert settled, f"every answered prediction of a live replica is logged or counted as dropped: {mine}"
        assert sum(c.get("requests_total:200", 0) for c in series.values()) <= answered + len(retried)
        assert victim_name(victim) in series, "the killed replica's counts outlive it"
        assert all(c.get("predictions_dropped_total", 0) == 0 for c in mine.values())


def test_overload_answers_503_instead_of_queueing(
    config: PipelineConfig,
    topics: Topics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve_url: str,
    artifacts: list[Path],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv(API_KEY_ENV, KEY)
    config = dataclasses.replace(
        config, serving=dataclasses.replace(config.serving, max_ongoing_requests=1, max_queued_requests=1)
    )
    registry, _ = champion_registry(config, tmp_path, artifacts)
    with serving(build_app(config, registry.uri), config.name, serve_url) as url:
        heavy = rows(config, 5000)
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda _: post(url, heavy).status_code, range(12)))
        assert 503 in statuses and 200 in statuses, statuses
        assert set(statuses) <= {200, 503}


def test_the_serve_config_file_builds_the_app(
    demo_config: PipelineConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.app import app_builder
    from tests.conftest import ROOT

    spec = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "cluster" / "serve" / "demo.yaml").read_text()))
    (app,) = spec.applications
    assert app.import_path == "serving.app:app_builder"
    monkeypatch.setenv(API_KEY_ENV, KEY)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow's set_tracking_uri exports it
    monkeypatch.chdir(ROOT)
    with pytest.raises(RuntimeError, match="no MLflow tracking URI"):
        app_builder(dict(app.args))
    built = app_builder({**app.args, "tracking_uri": f"sqlite:///{tmp_path / 'x.db'}"})
    assert type(built).__name__ == "Application"


@pytest.mark.parametrize("policy", ["shadow", "canary"])
def test_shadow_and_canary_policies(
    config: PipelineConfig,
    topics: Topics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    serve_url: str,
    artifacts: list[Path],
) -> None:
    monkeypatch.setenv(API_KEY_ENV, KEY)
    config = dataclasses.replace(
        config, serving=dataclasses.replace(config.serving, policy=policy, canary_fraction=0.5)
    )
    registry, champion = champion_registry(config, tmp_path, artifacts)
    challenger = register_model(registry, artifacts[1], f1=0.71)
    with serving(build_app(config, registry.uri, challenger=challenger), config.name, serve_url) as url:
        record = rows(config, 1)[0]
        responses = [post(url, {**record, "request_id": f"q{i}"}) for i in range(40)]
        assert all(r.status_code == 200 for r in responses), responses[0].text[:2000]
        answers = [r.json() for r in responses]
        versions = {a["model"]["version"] for a in answers}
        seen: list[PredictionLogged] = []

        def keep(b: Batch) -> None:
            seen.extend(v for v in b.values if isinstance(v, PredictionLogged))

        expected = 80 if policy == "shadow" else 40
        StreamConsumer(
            config.kafka, [topics.predictions], decode_events, keep, group_id=None, dlq_topic=topics.dlq
        ).run(max_records=expected, idle_timeout_s=15)
        variants = {(e.variant, e.model_version) for e in seen}
        if policy == "shadow":
            assert versions == {champion}
            assert variants == {("champion", champion), ("shadow", challenger)} and len(seen) == 80
        else:
            assert versions == {champion, challenger}
            assert variants == {("champion", champion), ("challenger", challenger)} and len(seen) == 40
            again = post(url, {**record, "request_id": "q7"}).json()["model"]["version"]
            assert again == answers[7]["model"]["version"], "a retried request lands on the same model"


def test_serving_refuses_to_start_without_an_api_key(config: PipelineConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"set {API_KEY_ENV}"):
        build_app(config, "sqlite:///nowhere.db")


def test_replicas_get_a_salted_hash_of_the_key_never_the_key() -> None:
    from serving.app import API_KEY_HASH_ENV, key_check, key_hash

    hashed = key_hash(KEY)
    assert KEY not in hashed and key_hash(KEY) != hashed  # salted: two hashes of one key differ
    salt, digest = key_check({API_KEY_HASH_ENV: hashed})
    import hashlib

    assert hashlib.sha256(salt + KEY.encode()).digest() == digest
    assert hashlib.sha256(salt + b"wrong").digest() != digest
    with pytest.raises(RuntimeError, match=API_KEY_HASH_ENV):
        key_check({API_KEY_HASH_ENV: "not-a-hash"})
    with pytest.raises(RuntimeError, match=API_KEY_ENV):
        key_check({})


def delivery_artifact(config: PipelineConfig, folder: Path, seed: int, flip: bool = False) -> Path:
    """An XGBoost model trained as a retrain does (with the monitor's profile); `flip`: on inverted
    labels, a model that passes any gate we hand it but is wrong on live traffic."""
    from datetime import datetime

    import pyarrow as pa

    from jobs.train import train_model

    records = [r.record for r in StreamGenerator(dataclasses.replace(config, name="demo"), seed=seed).records(3000)]
    for record in records:
        record["event_time"] = datetime.fromisoformat(str(record["event_time"]).replace("Z", "+00:00"))
        if flip:
            record["churned"] = "no" if record["churned"] == "yes" else "yes"
    settings = dataclasses.replace(config.model, kind="xgboost", rounds=40)
    table = pa.Table.from_pylist(records)
    return train_model(dataclasses.replace(config, model=settings), Window(()), folder, data=table).artifact


def test_a_model_goes_shadow_canary_champion_on_live_evidence_a_worse_one_is_rejected_a_forced_one_rolled_back(
    config: PipelineConfig, topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve_url: str
) -> None:
    """Progressive delivery over real HTTP with the real monitor: every model that passes the gate
    is a challenger first. One trained on inverted labels is rejected in shadow (ModelRejected with
    the live figures); a good one goes on to canary, then replaces the champion. No request fails;
    every prediction is logged with the variant that made it."""
    from jobs.monitor import MonitorService
    from streams.config import DeliverySettings
    from streams.events import DeliveryStep, LabelObserved, ModelPromoted, ModelRejected, ModelRolledBack
    from streams.kafka import Producer

    monkeypatch.setenv(API_KEY_ENV, KEY)
    delivery = DeliverySettings(steps=("shadow", "canary"), canary_fraction=0.4, min_labeled=150, tolerance=0.03,
                                max_step_s=600)  # fmt: skip
    config = dataclasses.replace(config, delivery=delivery)
    registry = empty_registry(config, tmp_path)
    good, bad, better = (delivery_artifact(config, tmp_path / n, s, flip=(n == "bad"))
                         for n, s in (("good", 3), ("bad", 4), ("better", 5)))  # fmt: skip
    first = register_model(registry, good, f1=0.7)
    assert registry.promote(first, config.gate).staged is None, "no champion yet: the first is champion at once"
    monitor: Any = ray.remote(MonitorService).options(num_cpus=0, max_restarts=0).remote(config, registry.uri)
    answers: list[tuple[str, str]] = []  # (version, request id) of each answered record
    # the demo's data, as the models were trained on (the generator seeds from the pipeline's name)
    generated = iter(
        StreamGenerator(dataclasses.replace(config, name="demo"), seed=11, id_prefix="live").records(100_000)
    )

    def traffic(until: Any, what: str, limit_s: float = 300) -> Any:
        """Requests of 10 records, each record's label right after its answer, until `until()`."""
        deadline = time.monotonic() + limit_s
        with Producer(config.kafka) as producer:
            while time.monotonic() < deadline:
                batch = [next(generated) for _ in range(10)]
                ids = [str(r.record[config.schema.record_id]) for r in batch]
                body = [
                    {**{k: r.record[k] for k in FEATURES}, "request_id": i} for r, i in zip(batch, ids, strict=True)
                ]
                answer = post(url, body, timeout=120)
                assert answer.status_code == 200, answer.text
                version = answer.json()["model"]["version"]
                answers.extend((version, p["request_id"]) for p in answer.json()["predictions"])
                for r, i in zip(batch, ids, strict=True):
                    producer.send_event(topics.labels, LabelObserved(request_id=i, pipeline=config.name, label=r.label))
                producer.flush()
                done = until()
                if done:
                    return done
        raise AssertionError(f"no {what} within {limit_s} s: {ray.get(monitor.stats.remote()).deliveries}")

    def ended(version: str, to: str) -> Any:
        return lambda: next((d for d in ray.get(monitor.stats.remote()).deliveries
                             if d["version"] == version and d["to"] == to), None)  # fmt: skip

    try:
        with serving(build_app(config, registry.uri), config.name, serve_url) as url, Producer(config.kafka) as gate:
            traffic(lambda: len(answers) >= 100, "first answers")  # the monitor has its champion

            def promote(artifact: Path) -> str:
                version = register_model(registry, artifact, f1=0.9)
                verdict = registry.promote(version, config.gate, publish=lambda e: gate.send_event(topics.models, e))
                gate.flush()
                assert verdict.promote and verdict.staged == "shadow", verdict
                assert registry.alias("champion") == first and registry.delivery() is not None
                return version

            wrong = promote(bad)
            rejected = traffic(ended(wrong, "rejected"), "rejection")
            assert rejected["step"] == "shadow" and "worse by more than the tolerance" in rejected["reason"], rejected
            assert rejected["evidence"]["candidate_accuracy"] < rejected["evidence"]["champion_accuracy"] - 0.2
            assert registry.alias("champion") == first and registry.delivery() is None
            assert {v for v, _ in answers} == {first}, "a shadow never answers"

            right = promote(better)
            shadowed = traffic(ended(right, "canary"), "canary step")
            assert shadowed["evidence"]["candidate_labeled"] >= 150
            canaried = traffic(ended(right, "champion"), "promotion")
            assert canaried["step"] == "canary" and registry.alias("champion") == right
            traffic(lambda: all(v == right for v, _ in answers[-50:]) or None, "the new champion answering", 60)

            # Automatic rollback: a bad model forced in by hand (no gate, no delivery) loses its
            # probation's live windows to the champion it replaced, which answers again by itself.
            forced = register_model(registry, bad, f1=0.9)
            registry.force_promote(forced, "by hand, in a test", publish=lambda e: gate.send_event(topics.models, e))
            gate.flush()
            traffic(lambda: forced in {v for v, _ in answers[-10:]} or None, "the forced model answering", 60)
            traffic(lambda: registry.alias("champion") == right or None, "the rollback")
            traffic(lambda: all(v == right for v, _ in answers[-50:]) or None, "the champion answering again", 60)
            assert ray.get(monitor.stats.remote()).rollbacks == 1
    finally:
        ray.get(monitor.stop.remote())
    versions = [v for v, _ in answers]
    assert versions.index(right) < len(versions) - 1 - versions[::-1].index(first), "the canary shared the traffic"

    models: list[Any] = []
    logged: list[PredictionLogged] = []

    def keep(b: Batch) -> None:
        models.extend(
            v for v in b.values if isinstance(v, DeliveryStep | ModelPromoted | ModelRejected | ModelRolledBack)
        )
        logged.extend(v for v in b.values if isinstance(v, PredictionLogged))

    StreamConsumer(config.kafka, [topics.models, topics.predictions], decode_events, keep, group_id=None,
                   dlq_topic=topics.dlq).run(idle_timeout_s=10)  # fmt: skip
    told = [
        (
            type(e).__name__,
            (e.from_version if isinstance(e, ModelRolledBack) else e.model_version),
            getattr(e, "step", ""),
        )
        for e in models
    ]
    assert told == [("DeliveryStep", wrong, "shadow"), ("ModelRejected", wrong, ""), ("DeliveryStep", right, "shadow"),
                    ("DeliveryStep", right, "canary"), ("ModelPromoted", right, ""), ("ModelPromoted", forced, ""),
                    ("ModelRolledBack", forced, "")], told  # fmt: skip
    assert "lost 2 live performance windows" in models[-1].reason, models[-1].reason
    assert next(e for e in models if isinstance(e, ModelRejected)).evidence["candidate_labeled"] >= 150
    served = {(e.request_id, e.model_version) for e in logged if e.variant != "shadow"}
    assert served == {(r, v) for v, r in answers}, "every answer is logged, with the version that made it"
    kinds = {(e.variant, e.model_version) for e in logged}
    expected = {("shadow", wrong), ("shadow", right), ("challenger", right), ("champion", first), ("champion", right),
                ("champion", forced)}  # fmt: skip
    assert kinds == expected, kinds
