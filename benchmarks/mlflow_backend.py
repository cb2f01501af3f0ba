"""MLflow's backend under concurrent writers: PostgreSQL (ours, cluster.services) against SQLite.

Each backend sits behind its own `mlflow server` (the same version, workers and artifact store: a
local folder, so that only the backend differs). N writer threads, as N concurrent Tune trials
would, each create runs in one experiment: a run logs its params in one batch, then `steps`
metric steps (three metrics per step, one batch each, as Tune's MLflow callback does per
report), then ends. Per round, each side runs the same work; the sides alternate which goes
first. Reported per side: runs per minute (median of rounds), each run's seconds (p50, p95,
max: SQLite serialises writers, and MLflow sets its busy_timeout to 20 s, so contention shows
as waiting rather than as errors), runs that failed at the client (after MLflow's own HTTP
retries), and errors the server logged meanwhile ("database is locked" and other backend
errors, which a client sees only as retries and latency).
ratio = PostgreSQL runs per minute / SQLite runs per minute.

    python benchmarks/mlflow_backend.py --quick --json runs/bench/mlflow_backend.json
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import shutil
import statistics
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

from cluster.services import MlflowServer, PostgresServer  # noqa: E402

SERVER_ERROR = re.compile(r"database is locked|OperationalError|deadlock detected|could not serialize", re.I)


def one_run(client: Any, experiment: str, writer: int, index: int, steps: int) -> None:
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment, run_name=f"w{writer}-r{index}")
    run_id = run.info.run_id
    params = [Param(f"p{i}", str(0.1 * i + writer)) for i in range(8)]
    client.log_batch(run_id, params=params)
    now = int(time.time() * 1000)
    for step in range(steps):
        metrics = [Metric(name, 1.0 / (step + 1 + i), now + step, step) for i, name in enumerate(("loss", "acc", "lr"))]
        client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id)


def round_of(
    url: str, writers: int, runs_each: int, steps: int, tag: str
) -> tuple[int, int, float, list[str], list[float]]:
    """`writers` threads each logging `runs_each` runs: (runs done, runs failed, seconds, failures,
    each completed run's seconds)."""
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=url).create_experiment(f"bench-{tag}-{time.time_ns()}")
    failures: list[str] = []
    lock = threading.Lock()
    done = [0]
    latencies: list[float] = []

    def writer(w: int) -> None:
        client = MlflowClient(tracking_uri=url)
        for i in range(runs_each):
            try:
                began = time.perf_counter()
                one_run(client, experiment, w, i, steps)
                with lock:
                    done[0] += 1
                    latencies.append(time.perf_counter() - began)
            except Exception as err:  # counted, not fatal: the figure is how many runs a backend completes
                with lock:
                    failures.append(f"{type(err).__name__}: {str(err)[:200]}")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        list(pool.map(writer, range(writers)))
    return done[0], len(failures), time.perf_counter() - started, failures[:3], latencies


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def server_errors(log: Path, since: int) -> tuple[int, int]:
    """Backend errors the server logged after byte `since` of its log, and the log's size now."""
    data = log.read_bytes()
    return len(SERVER_ERROR.findall(data[since:].decode(errors="replace"))), len(data)


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--writers", type=int, default=None, help="concurrent writers (default 4 quick, 8 full)")
    parser.add_argument("--runs", type=int, default=None, help="runs per writer per round (default 3 quick, 6 full)")
    parser.add_argument("--steps", type=int, default=20, help="metric steps per run (default 20)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per side (default 1 quick, 3 full)")
    parser.add_argument("--workers", type=int, default=None, help="MLflow server workers (default 2 quick, 4 full)")
    args = parser.parse_args()
    writers = args.writers or (4 if args.quick else 8)
    runs_each = args.runs or (3 if args.quick else 6)
    rounds = args.rounds or (1 if args.quick else 3)
    workers = args.workers or (2 if args.quick else 4)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # no "View run" lines, and no GET per run for them
    for name in [n for n in os.environ if n.startswith("MLFLOW_TRACKING_")]:
        os.environ.pop(name)

    work = Path(tempfile.mkdtemp(prefix="driftloop-bench-mlflow-"))
    postgres = PostgresServer(durable=True)  # durable, as SQLite is by default: commits reach the disk
    servers: dict[str, MlflowServer] = {}
    try:
        postgres.start()
        servers["postgresql"] = MlflowServer(work / "pg", postgres.uri, str(work / "pg" / "artifacts"),
                                             env=postgres.env(), workers=workers)  # fmt: skip
        servers["sqlite"] = MlflowServer(work / "sqlite", f"sqlite:///{work / 'sqlite' / 'mlflow.db'}",
                                         str(work / "sqlite" / "artifacts"), workers=workers)  # fmt: skip
        started = time.perf_counter()
        for server in servers.values():  # both import their app at once
            server.launch()
        for server in servers.values():
            server.wait_ready()
        print(f"servers up in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        rates: dict[str, list[float]] = {side: [] for side in servers}
        failed = {side: 0 for side in servers}
        logged = {side: 0 for side in servers}
        examples: dict[str, list[str]] = {side: [] for side in servers}
        latency: dict[str, list[float]] = {side: [] for side in servers}
        offsets = {side: server.log.stat().st_size for side, server in servers.items()}
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for side in order:
                done, fails, seconds, why, took = round_of(
                    servers[side].url, writers, runs_each, args.steps, f"{side}{r}"
                )
                latency[side] += took
                errors, offsets[side] = server_errors(servers[side].log, offsets[side])
                rates[side].append(done / seconds * 60)
                failed[side] += fails
                logged[side] += errors
                examples[side] += why
                print(f"round {r + 1}/{rounds}: {side} {done} runs in {seconds:.1f}s ({done / seconds * 60:,.0f}/min), "
                      f"{fails} failed, {errors} server errors", file=sys.stderr)  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
        postgres.stop()
        shutil.rmtree(work, ignore_errors=True)

    pg, lite = statistics.median(rates["postgresql"]), statistics.median(rates["sqlite"])
    import mlflow

    result = {
        "benchmark": "mlflow_backend",
        "ours": round(pg, 1),
        "peer": round(lite, 1),
        "ratio": round(pg / lite, 3) if lite else None,
        "unit": "runs/min",
        "run_seconds": {
            side: {"p50": round(statistics.median(v), 2), "p95": round(_p95(v), 2), "max": round(max(v), 2)}
            for side, v in latency.items()
            if v
        },
        "failed_runs": failed,
        "server_errors": logged,
        "failure_examples": {side: sorted(set(e))[:3] for side, e in examples.items()},
        "runs": {side: [round(v, 1) for v in values] for side, values in rates.items()},
        "conditions": {
            "what": (
                "concurrent writers, each run: create, params (1 batch), steps x 3 metrics (1 batch per step), end; "
                "ours: mlflow server on PostgreSQL 15 (durable); peer: mlflow server on SQLite (its defaults)"
            ),
            "writers": writers,
            "runs_per_writer_per_round": runs_each,
            "steps": args.steps,
            "requests_per_run": args.steps + 3,
            "rounds": rounds,
            "server_workers": workers,
            "artifacts": "a local folder for both (not timed: no artifact is logged)",
            "statistic": "median of rounds; failures and server errors summed over rounds",
            "mlflow": mlflow.__version__,
            "machine": common.machine(),
        },
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
