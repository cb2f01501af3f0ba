"""Serving: our endpoint against a plain FastAPI/uvicorn app and a no-op Ray Serve deployment.

Ours: `serving.app` (API key, validation, the training-time feature transform, the model,
prediction logging to the embedded broker). Peer (a): a plain FastAPI app under uvicorn,
one process, serving the same artifact without Ray (JSON parse, the same transform and
model). Peer (b): a Ray Serve deployment behind the same ingress that answers at once. One
client process sends single-record requests (each body encoded once) at fixed concurrency
for a fixed time to each in turn; then batch requests (1,000 records) to ours for rows/s.
ratio = ours / no-op Serve requests per second: the median over rounds of each round's ratio (the
endpoints take turns within a round). metrics_ratio = ours / the same app with `serving.metrics:
false` (a second app beside it, taking its turn in each round): what the replica's Prometheus
series cost on the request path.

Serve's ingress is HAProxy, as on every cluster driftloop starts; with
`DRIFTLOOP_SERVE_HAPROXY=0` it is Serve's Python proxy (`cluster.ray_runtime.serve_ingress_env`).

    python benchmarks/serve.py --quick --json runs/bench/serve.json
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402
from fastapi import Request  # noqa: E402

from cluster.broker import EmbeddedBroker, free_port  # noqa: E402
from jobs.features import fit_pipeline  # noqa: E402
from jobs.models import ModelSpec, build_model, save_artifact  # noqa: E402
from jobs.registry import ModelRegistry  # noqa: E402
from jobs.worker_loop import pick_device, train_standalone  # noqa: E402
from streams.config import API_KEY_ENV, load_config  # noqa: E402
from streams.datasets import Window  # noqa: E402
from streams.generator import StreamGenerator  # noqa: E402
from streams.kafka import ensure_topics  # noqa: E402
from streams.topics import Topics  # noqa: E402

KEY = "bench-key"
FEATURES = ("tenure_months", "monthly_charges", "support_calls", "data_usage_gb", "autopay", "plan", "region")
PLAIN_APP = """
import sys, pathlib
sys.path.insert(0, {root!r})
from fastapi import FastAPI, Request
from jobs.features import FeaturePipeline
from jobs.models import load_artifact
from serving.model import ServedModel
from streams.config import load_config
config = load_config({config!r}, env={{}})
spec, model, features_json = load_artifact(pathlib.Path({artifact!r}))
features = FeaturePipeline.from_json(features_json, config.schema, config.features)
served = ServedModel("plain", "1", None, spec, model, features, {{}})
app = FastAPI()

@app.post("/v1/predict")
async def predict(request: Request):
    body = await request.json()
    records = body if isinstance(body, list) else [body]
    proba = served.predict(records)
    return {{"predictions": [{{"prediction": int(p.argmax()), "probabilities": p.tolist()}} for p in proba]}}
"""


def load(url: str, body: Any, concurrency: int, seconds: float, headers: dict[str, str]) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    first_failure = ""
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    payload = json.dumps(body).encode()  # encoded once: the client's own JSON work is not what is measured
    headers = {**headers, "content-type": "application/json"}

    def worker() -> None:
        nonlocal failures, first_failure
        session = requests.Session()
        while time.monotonic() < stop:
            started = time.perf_counter()
            response = session.post(url, data=payload, headers=headers, timeout=30)
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    failures += 1
                    first_failure = first_failure or f"{response.status_code} {response.text[:200]}"

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    ordered = sorted(latencies) or [float("nan")]
    return {
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 2),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "requests": len(latencies),
        "failed": failures,
    } | ({"first_failure": first_failure} if first_failure else {})


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median requests/s (its latencies with it), and every round's requests/s."""
    ordered = sorted(runs, key=lambda r: r["requests_per_s"])
    return ordered[len(ordered) // 2] | {"rounds_requests_per_s": [r["requests_per_s"] for r in runs]}


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--seconds", type=float, default=None, help="load per endpoint and round (5 quick, 8 full)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-log", action="store_true", help="serve without prediction logging (to see its cost)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over the endpoints, median (1 quick, 5 full)")
    parser.add_argument("--batch-max-size", type=int, default=None, help="serving.batch_max_size (1: no @serve.batch)")
    args = parser.parse_args()
    seconds = args.seconds or (5.0 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 5)
    base = load_config(ROOT / "configs" / "demo.yaml", env={})
    if args.batch_max_size is not None:
        base = dataclasses.replace(base, serving=dataclasses.replace(base.serving, batch_max_size=args.batch_max_size))
    work = Path(tempfile.mkdtemp(prefix="driftloop-bench-serve-"))
    os.environ[API_KEY_ENV] = KEY
    from cluster.ray_runtime import haproxy_ingress, start_local

    # logical CPUs: our two apps take one each (as a replica does on a cluster), the no-op a third
    start_local(num_cpus=(os.cpu_count() or 2) + 2, include_dashboard=False, log_to_driver=False)
    ingress = "haproxy" if haproxy_ingress() else "python-proxy"  # DRIFTLOOP_SERVE_HAPROXY=0: the Python proxy
    from ray import serve

    from serving.app import build_app

    plain: subprocess.Popen[bytes] | None = None
    try:
        with EmbeddedBroker() as broker:
            config = dataclasses.replace(
                base, name="bench", kafka=dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap)
            )
            # the same app with `serving.metrics: false`, beside it: what the replica's metrics cost
            unmetered = dataclasses.replace(
                config, name="bench-nometrics", serving=dataclasses.replace(config.serving, metrics=False)
            )
            ensure_topics(config.kafka, Topics.of(config).all() + Topics.of(unmetered).all())
            rows = [r.record for r in StreamGenerator(config, seed=1).records(4000)]
            features = fit_pipeline(ray.data.from_items(rows), config.schema, config.features)
            x, y = features.transform_records(rows), features.encode_labels([r["churned"] for r in rows])
            spec = ModelSpec.from_settings(config.model, features.output_names, list(config.schema.label.classes))
            model = build_model(spec)
            train_standalone(
                model, x, y, x[:500], y[:500], epochs=2, batch_size=256, learning_rate=0.01, device=pick_device(False)
            )
            artifact = work / "model"
            save_artifact(artifact, spec, model, features.to_json())
            registry = ModelRegistry(config, f"sqlite:///{work / 'mlflow.db'}", artifact_root=work / "art")
            version = registry.log_training(
                artifact, {}, [], {"holdout": "h", "f1_macro": 0.8, "baseline_f1_macro": 0.3}, Window(())
            ).version
            registry.promote(version, config.gate)

            serve_port, plain_port = free_port(), free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
            served_config = dataclasses.replace(
                config, kafka=dataclasses.replace(config.kafka, bootstrap_servers="embedded")
            )
            serve.run(build_app(served_config if args.no_log else config, registry.uri), name="bench", route_prefix="/")
            unmetered = dataclasses.replace(unmetered, kafka=served_config.kafka) if args.no_log else unmetered
            unmetered_registry = ModelRegistry(
                unmetered, f"sqlite:///{work / 'mlflow2.db'}", artifact_root=work / "art2"
            )
            unmetered_version = unmetered_registry.log_training(
                artifact, {}, [], {"holdout": "h", "f1_macro": 0.8, "baseline_f1_macro": 0.3}, Window(())
            ).version
            unmetered_registry.promote(unmetered_version, unmetered.gate)
            serve.run(build_app(unmetered, unmetered_registry.uri), name="nometrics", route_prefix="/nometrics")

            from fastapi import FastAPI

            noop_api = FastAPI()

            @serve.deployment(max_ongoing_requests=32)
            @serve.ingress(noop_api)
            class NoOp:
                @noop_api.post("/v1/predict")
                async def predict(self) -> dict[str, Any]:
                    return {}

                @noop_api.post("/v1/read")
                async def read(self, request: Request) -> dict[str, Any]:
                    await request.body()  # Serve fetches a body from the proxy in a second call
                    return {}

            serve.run(NoOp.bind(), name="noop", route_prefix="/noop")  # type: ignore[attr-defined]

            (work / "plain_app.py").write_text(
                PLAIN_APP.format(root=str(ROOT), config=str(ROOT / "configs" / "demo.yaml"), artifact=str(artifact))
            )
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "plain_app:app",
                "--port",
                str(plain_port),
                "--log-level",
                "warning",
            ]
            plain = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            record = {k: rows[0][k] for k in FEATURES}
            headers = {"x-api-key": KEY}
            for url in (
                f"http://127.0.0.1:{serve_port}/v1/predict",
                f"http://127.0.0.1:{serve_port}/nometrics/v1/predict",
                f"http://127.0.0.1:{plain_port}/v1/predict",
            ):
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if requests.post(url, json=record, headers=headers, timeout=5).status_code == 200:
                            break
                    except requests.RequestException:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{url} did not come up")
                    time.sleep(0.5)
            urls = {
                "ours": f"http://127.0.0.1:{serve_port}/v1/predict",
                "ours_without_metrics": f"http://127.0.0.1:{serve_port}/nometrics/v1/predict",
                "noop_ray_serve": f"http://127.0.0.1:{serve_port}/noop/v1/predict",
                "noop_ray_serve_reading_body": f"http://127.0.0.1:{serve_port}/noop/v1/read",
                "plain_fastapi_uvicorn": f"http://127.0.0.1:{plain_port}/v1/predict",
            }
            batch = [{k: r[k] for k in FEATURES} for r in rows[:1000]]
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*urls, "batch"]}
            for _ in range(rounds):  # the endpoints take turns, so drift in the machine's load hits each alike
                for name, url in urls.items():
                    runs[name].append(load(url, record, args.concurrency, seconds, headers))
                runs["batch"].append(load(urls["ours"], batch, 2, seconds, headers))
            ours, unmetered_run, noop, noop_body, fastapi_plain, batched = (
                median_run(runs[n]) for n in [*urls, "batch"]
            )
            health = requests.get(f"http://127.0.0.1:{serve_port}/v1/health", timeout=10).json()
    finally:
        if plain is not None:
            plain.terminate()
            plain.wait()
        serve.shutdown()
        ray.shutdown()

    # Per round, ours against the no-op measured right after it: the machine's load drifts between
    # rounds more than between neighbours, so the median of these is the steadier ratio.
    round_ratios = [
        round(o["requests_per_s"] / max(n["requests_per_s"], 1e-9), 3)
        for o, n in zip(runs["ours"], runs["noop_ray_serve"], strict=True)
    ]
    ratio = sorted(round_ratios)[len(round_ratios) // 2]
    # The replica's metrics (serving/metrics.py): ours with them / the same app without, per round
    metrics_ratios = [
        round(o["requests_per_s"] / max(n["requests_per_s"], 1e-9), 3)
        for o, n in zip(runs["ours"], runs["ours_without_metrics"], strict=True)
    ]
    result = {
        "benchmark": "serve",
        "ours": ours["requests_per_s"],
        "peer": noop["requests_per_s"],
        "ratio": ratio,
        "round_ratios": round_ratios,
        "unit": "requests/s (single record)",
        "metrics_ratio": sorted(metrics_ratios)[len(metrics_ratios) // 2],
        "metrics_round_ratios": metrics_ratios,
        "ratio_vs_noop_reading_body": round(ours["requests_per_s"] / max(noop_body["requests_per_s"], 1e-9), 3),
        "endpoints": {
            "ours": ours,
            "ours_without_metrics": unmetered_run,
            "noop_ray_serve": noop,
            "noop_ray_serve_reading_body": noop_body,
            "plain_fastapi_uvicorn": fastapi_plain,
        },
        "batch_rows_per_s": round(batched["requests_per_s"] * len(batch)),
        "batch": batched,
        "predictions_logged": health["predictions_logged"],
        "predictions_dropped": health["predictions_dropped"],
        "conditions": {
            "concurrency": args.concurrency,
            "seconds_per_endpoint": seconds,
            "rounds": rounds,
            "batch_max_size": base.serving.batch_max_size,
            "batch_records": len(batch),
            "client": "one process, threads + requests.Session, same machine",
            "serve": "1 replica, FastAPI ingress on 127.0.0.1; ours logs to an embedded Tansu",
            "ingress": ingress,
            "prediction_logging": not args.no_log,
            "machine": common.machine(),
        },
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
