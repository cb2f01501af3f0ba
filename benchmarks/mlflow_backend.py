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

`--tune`: a real Ray Tune run instead of the writer threads. Per round and side, a Tuner runs
T function trials (each reports `steps` results with a short sleep between), at most C at once
(each asks for num_cpus/C CPUs, so C fit on the local Ray), logging to the side's server through
Ray's `MLflowLoggerCallback` (one experiment per round). Note that the callback runs in Tune's
driver: the server sees one client logging the C trials' results one after another, not C
writers. Reported per side: trials completed per minute (median of rounds; the wall time of
`tuner.fit()`), trials that errored, lock errors (in the trials' errors and the server's log),
HTTP 5xx the server logged, the client's HTTP retries, and runs lost: after each round, every
trial must have a FINISHED run in MLflow holding all its metric steps.
ratio = PostgreSQL trials per minute / SQLite trials per minute.

    python benchmarks/mlflow_backend.py --quick --json runs/bench/mlflow_backend.json
    python benchmarks/mlflow_backend.py --tune --json runs/bench/mlflow_backend_tune.json
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


HTTP_5XX = re.compile(r'HTTP/1\.[01]" 5\d\d')


def http_5xx(log: Path, since: int) -> int:
    """HTTP 5xx answers in the server's access log after byte `since`."""
    return len(HTTP_5XX.findall(log.read_bytes()[since:].decode(errors="replace")))


class RetryCount(logging.Handler):
    """Counts urllib3's "Retrying ..." warnings: requests MLflow's client sent again (5xx, resets)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Retrying" in record.getMessage():
            self.count += 1


def trial(config: dict[str, Any]) -> None:
    """A short Tune trial: `steps` reports of three metrics, `sleep` seconds apart."""
    from ray import tune

    for step in range(config["steps"]):
        time.sleep(config["sleep"])
        x = config["x"]
        tune.report({"loss": 1.0 / (step + 1 + x), "acc": 1.0 - 1.0 / (step + 2 + x), "lr": 0.01 * x})


def tune_once(
    url: str | None, trials: int, concurrency: int, cpus: float, steps: int, sleep: float, storage: Path, tag: str
) -> dict[str, Any]:
    """One Tuner of `trials` trials, `concurrency` at once, logging to the MLflow server at `url`
    (None: no MLflow, a warm-up). Its wall time, trials done and errored, their errors, and the
    experiment's name."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    experiment = f"tune-{tag}-{time.time_ns()}"
    callbacks: list[Any] = [MLflowLoggerCallback(url, experiment_name=experiment, tags={"bench": tag})] if url else []
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": cpus / concurrency}),
        param_space={"x": tune.uniform(0.0, 1.0), "steps": steps, "sleep": sleep},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=experiment, storage_path=str(storage), callbacks=callbacks, verbose=0),
    )
    started = time.perf_counter()
    try:
        grid = tuner.fit()
    except Exception as err:  # the callback raising in Tune's driver ends the whole run
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "done": 0, "errored": trials, "errors": [f"fit: {type(err).__name__}: {err}"],
                "experiment": experiment}  # fmt: skip
    seconds = time.perf_counter() - started
    errors = [f"{type(e).__name__}: {str(e)[:300]}" for e in grid.errors]
    return {"seconds": seconds, "done": grid.num_terminated, "errored": grid.num_errors, "errors": errors,
            "experiment": experiment}  # fmt: skip


def lost_runs(url: str, experiment: str, trials: int, steps: int) -> tuple[int, list[str]]:
    """Trials without a complete run in MLflow: a FINISHED run holding `steps` steps of `loss`.
    The count lost (of `trials`), and why, a few."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return trials, [f"no experiment {experiment}"]
    runs = client.search_runs([found.experiment_id], max_results=max(1000, 2 * trials))
    why: list[str] = []
    complete = 0
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "loss")
        if run.info.status == "FINISHED" and sorted(m.step for m in history) == list(range(1, steps + 1)):
            complete += 1
        else:
            why.append(f"{run.info.run_name}: {run.info.status}, {len(history)} loss steps")
    if len(runs) != trials:
        why.append(f"{len(runs)} runs for {trials} trials")
    return max(0, trials - complete), why[:3]


def tune_rounds(servers: dict[str, MlflowServer], args: Any, work: Path) -> dict[str, Any]:
    """The `--tune` rounds on a local Ray (started here, stopped at the end): the figures."""
    import ray

    from cluster.ray_runtime import start_local

    trials = args.trials or (8 if args.quick else 32)
    concurrency, rounds, cpus = args.concurrency, args.rounds or (1 if args.quick else 3), 2
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no experiment table on stdout (the JSON)
    retries = RetryCount()
    logging.getLogger("urllib3.connectionpool").addHandler(retries)
    started = time.perf_counter()
    start_local(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    print(f"ray up in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    storage = work / "ray_results"
    rates: dict[str, list[float]] = {side: [] for side in servers}
    seconds: dict[str, list[float]] = {side: [] for side in servers}
    counts = {key: {side: 0 for side in servers} for key in ("errored", "lock_errors", "http_5xx", "retries", "lost")}
    examples: dict[str, list[str]] = {side: [] for side in servers}
    bare: list[float] = []  # the same Tuner without MLflow: what the trials cost by themselves
    try:
        warm = tune_once(None, concurrency, concurrency, cpus, 2, 0.0, storage, "warmup")  # workers, imports
        print(f"warm-up tune run: {warm['seconds']:.1f}s, {warm['errored']} errored", file=sys.stderr)
        offsets = {side: server.log.stat().st_size for side, server in servers.items()}
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for side in order:
                url, before = servers[side].url, retries.count
                out = tune_once(url, trials, concurrency, cpus, args.steps, args.sleep, storage, f"{side}{r}")
                side_retries = retries.count - before
                locks, size = server_errors(servers[side].log, offsets[side])
                fives = http_5xx(servers[side].log, offsets[side])
                offsets[side] = size
                locks += sum(1 for e in out["errors"] if SERVER_ERROR.search(e))
                lost, why = lost_runs(url, out["experiment"], trials, args.steps)
                rate = out["done"] / out["seconds"] * 60
                rates[side].append(rate)
                seconds[side].append(out["seconds"])
                for key, value in (("errored", out["errored"]), ("lock_errors", locks), ("http_5xx", fives),
                                   ("retries", side_retries), ("lost", lost)):  # fmt: skip
                    counts[key][side] += value
                examples[side] += out["errors"][:3] + why
                print(f"round {r + 1}/{rounds}: {side} {out['done']}/{trials} trials in {out['seconds']:.1f}s "
                      f"({rate:,.1f}/min), {out['errored']} errored, {locks} lock errors, {fives} HTTP 5xx, "
                      f"{side_retries} client retries, {lost} runs lost or incomplete", file=sys.stderr)  # fmt: skip
            out = tune_once(None, trials, concurrency, cpus, args.steps, args.sleep, storage, f"none{r}")
            bare.append(out["done"] / out["seconds"] * 60)
            print(f"round {r + 1}/{rounds}: no MLflow {out['done']}/{trials} trials in {out['seconds']:.1f}s "
                  f"({bare[-1]:,.1f}/min)", file=sys.stderr)  # fmt: skip
    finally:
        logging.getLogger("urllib3.connectionpool").removeHandler(retries)
        ray.shutdown()

    pg, lite = statistics.median(rates["postgresql"]), statistics.median(rates["sqlite"])
    import mlflow

    return {
        "benchmark": "mlflow_backend_tune",
        "ours": round(pg, 1),
        "peer": round(lite, 1),
        "ratio": round(pg / lite, 3) if lite else None,
        "unit": "trials/min",
        "no_mlflow": {"median": round(statistics.median(bare), 1), "runs": [round(v, 1) for v in bare]},
        "fit_seconds": {side: [round(v, 1) for v in values] for side, values in seconds.items()},
        "errored_trials": counts["errored"],
        "lock_errors": counts["lock_errors"],
        "http_5xx": counts["http_5xx"],
        "client_retries": counts["retries"],
        "lost_runs": counts["lost"],
        "failure_examples": {side: sorted(set(e))[:3] for side, e in examples.items()},
        "runs": {side: [round(v, 1) for v in values] for side, values in rates.items()},
        "conditions": {
            "what": (
                "Ray Tune: function trials, each `steps` reports of 3 metrics `sleep` s apart, logged by Ray's "
                "MLflowLoggerCallback (in Tune's driver) to an mlflow server; ours: on PostgreSQL 15 (durable); "
                "peer: on SQLite (its defaults); every trial's run checked afterwards (FINISHED, all steps)"
            ),
            "trials_per_round": trials,
            "max_concurrent_trials": concurrency,
            "cpus_per_trial": round(cpus / concurrency, 4),
            "ray_cpus": cpus,
            "steps": args.steps,
            "sleep_s": args.sleep,
            "reuse_actors": True,
            "rounds": rounds,
            "server_workers": args.workers or (2 if args.quick else 4),
            "warm_up": f"one Tune run of {concurrency} trials without MLflow before the rounds (not timed)",
            "no_mlflow": "the same Tuner without the callback, last in each round (not in the ratio)",
            "statistic": "median of rounds of trials completed / fit() wall time; errors summed over rounds",
            "mlflow": mlflow.__version__,
            "ray": ray.__version__,
            "machine": common.machine(),
        },
    }


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--writers", type=int, default=None, help="concurrent writers (default 4 quick, 8 full)")
    parser.add_argument("--runs", type=int, default=None, help="runs per writer per round (default 3 quick, 6 full)")
    parser.add_argument("--steps", type=int, default=20, help="metric steps per run (default 20)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per side (default 1 quick, 3 full)")
    parser.add_argument("--workers", type=int, default=None, help="MLflow server workers (default 2 quick, 4 full)")
    parser.add_argument("--tune", action="store_true", help="a real Ray Tune run per round instead of writer threads")
    parser.add_argument("--trials", type=int, default=None, help="--tune: trials per round (default 8 quick, 32 full)")
    parser.add_argument("--concurrency", type=int, default=8, help="--tune: max_concurrent_trials (default 8)")
    parser.add_argument("--sleep", type=float, default=0.05, help="--tune: seconds between a trial's reports")
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

    from mlflow import MlflowClient

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
        if args.tune:
            for server in servers.values():  # each server's first request (its app, the backend's connection)
                MlflowClient(tracking_uri=server.url).search_experiments(max_results=1)
            return common.emit(tune_rounds(servers, args, work), args.json)
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
            "no_mlflow": "the same Tuner without the callback, last in each round (not in the ratio)",
            "statistic": "median of rounds; failures and server errors summed over rounds",
            "mlflow": mlflow.__version__,
            "machine": common.machine(),
        },
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
