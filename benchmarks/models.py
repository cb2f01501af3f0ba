"""Model families: our tuned model against scikit-learn's HistGradientBoosting, and XGBoost on Ray Train.

1. Quality. On each data set (our generated stream after a concept drift; scikit-learn's
   breast cancer, digits and wine) one split: a training part and a holdout (the most recent
   20 % of the stream; a seeded shuffled 20 % of a scikit-learn set). Ours: one search
   (`jobs.tune.search_in_process`: Optuna TPE and successive halving) over the mlp, xgboost and
   random_forest families and their knobs, each trial fitted on the first 75 % of the training
   part and judged on its last 25 % (by position, so never on the holdout); the best settings
   are then fitted on the whole training part. The peer: `HistGradientBoostingClassifier()`
   with its defaults (random_state=0) fitted on the same training part. Both are judged by
   macro F1 on the holdout; ratio = ours / HGB, ratio_worst the smallest over the data sets.
2. Speed. XGBoost with the same parameters (`jobs.trees.booster_params`, the same rounds) on the
   same rows of the generated stream's feature matrix: ours through Ray Train
   (`TreeFamily.fit_on_ray`, 2 workers of 1 CPU on a local 2-CPU Ray) against `xgboost.train`
   in this process with nthread=2; neither scores the validation rows during the rounds, both
   score them once at the end.
   Throughput = rows * rounds / s of the whole call (ours: `fit_on_ray`; plain: DMatrix +
   train); ratio = ours / plain. The rounds alternate which side goes first; medians.

    python benchmarks/models.py --quick --json runs/bench/models.json
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from jobs.evaluate import evaluate  # noqa: E402
from jobs.families import family  # noqa: E402
from jobs.features import fit_pipeline, numpy_batch  # noqa: E402
from jobs.tune import apply_params, search_in_process  # noqa: E402
from streams.config import Param, PipelineConfig, SearchSettings, load_config  # noqa: E402
from streams.generator import StreamGenerator  # noqa: E402
from streams.kafka_source import arrow_schema  # noqa: E402
from streams.serde import RecordCodec  # noqa: E402

FAMILIES = ("mlp", "xgboost", "random_forest")
# A space over every knob of the three families (a knob two families read, e.g. max_depth, has one range).
SPACE = (
    Param(name="learning_rate", low=0.001, high=0.03, log=True),
    Param(name="weight_decay", low=1e-6, high=1e-2, log=True),
    Param(name="dropout", low=0.0, high=0.3),
    Param(name="hidden", choices=("64", "128,64", "256,128")),
    Param(name="batch_size", choices=(64, 128, 256)),
    Param(name="eta", low=0.02, high=0.3, log=True),
    Param(name="rounds", choices=(100, 200, 400)),
    Param(name="trees", choices=(100, 200, 300)),
    Param(name="max_depth", low=2, high=10),
    Param(name="min_child_weight", low=0.5, high=10.0, log=True),
    Param(name="subsample", low=0.6, high=1.0),
    Param(name="colsample", low=0.5, high=1.0),
    Param(name="reg_lambda", low=0.1, high=10.0, log=True),
)

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# --- data -------------------------------------------------------------------------------------


def generated_table(config: PipelineConfig, rows: int, seed: int, **drift: Any) -> tuple[pa.Table, np.ndarray]:
    """Generated records as an Arrow table (in stream order) and which of them come after the drift."""
    codec = RecordCodec(config.schema)
    records, drifted = [], []
    for r in StreamGenerator(config, seed=seed, **drift).records(rows):
        records.append(codec.to_dict(codec.validate(r.record)))
        drifted.append(r.drifted)
    schema = arrow_schema(config.schema)
    names = [f.name for f in schema][:-4]  # the record's columns, without the Kafka metadata
    return pa.Table.from_pylist(records, schema=pa.schema([schema.field(n) for n in names])), np.array(drifted)


def stream_after_drift(config: PipelineConfig, rows: int) -> tuple[Split, list[str], list[Any]]:
    """`rows` records after a concept drift (the effects of the drift features flip), split by
    position (= event time): the first 80 % are the training part (its first 75 % train, the
    rest validation), the last 20 % the holdout. Features are fitted on the training part."""
    before = rows // 4
    table, drifted = generated_table(config, before + rows, seed=11, scenario="concept", drift_at=before)
    table = table.filter(pa.array(drifted))
    assert table.num_rows == rows
    cut_train, cut_val = int(rows * 0.6), int(rows * 0.8)
    features = fit_pipeline(table.slice(0, cut_val), config.schema, config.features)
    out = features.batch_fn()(numpy_batch(table))
    x, y = out["x"], out["y"]
    split = (x[:cut_train], y[:cut_train], x[cut_train:cut_val], y[cut_train:cut_val], x[cut_val:], y[cut_val:])
    return split, list(features.output_names), list(config.schema.label.classes)


def sklearn_set(name: str) -> tuple[Split, list[str], list[Any]]:
    """A scikit-learn data set, shuffled (seed 0) and split 60/20/20; standardized float32 with the
    training part's (first 80 %) means and deviations."""
    from sklearn import datasets

    data = getattr(datasets, f"load_{name}")()
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    cut_train, cut_val = int(len(y) * 0.6), int(len(y) * 0.8)
    mean, sd = x[:cut_val].mean(axis=0), x[:cut_val].std(axis=0)
    x = ((x - mean) / np.where(sd > 0, sd, 1.0)).astype(np.float32)
    split = (x[:cut_train], y[:cut_train], x[cut_train:cut_val], y[cut_train:cut_val], x[cut_val:], y[cut_val:])
    return split, [f"x{i}" for i in range(x.shape[1])], sorted(set(y.tolist()))


# --- 1. quality -------------------------------------------------------------------------------


def quality(config: PipelineConfig, split: Split, names: list[str], classes: list[Any], trials: int) -> dict[str, Any]:
    """Ours (search, then the best fitted on the training part) and HGB, judged on the holdout."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x_tr, y_tr, x_val, y_val, x_ho, y_ho = split
    x_fit, y_fit = np.concatenate([x_tr, x_val]), np.concatenate([y_tr, y_val])
    label = dataclasses.replace(config.schema.label, classes=tuple(classes))
    search = SearchSettings(trials=trials, families=FAMILIES, space=SPACE)  # type: ignore[arg-type]
    cfg = dataclasses.replace(config, search=search, schema=dataclasses.replace(config.schema, label=label))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        tuned = search_in_process(cfg, (x_tr, y_tr, x_val, y_val), names, Path(out), seed=0)
    search_s = time.perf_counter() - started
    settings = apply_params(cfg.model, tuned.best_params)
    owner = family(settings.kind)
    started = time.perf_counter()
    # The validation rows are part of the training part now; passed only because `fit` reports on them.
    model, _ = owner.fit(owner.spec(settings, names, classes), settings, (x_fit, y_fit, x_val, y_val))
    refit_s = time.perf_counter() - started
    ours_f1 = float(evaluate(y_ho, model.predict_proba(x_ho), classes)["f1_macro"])

    started = time.perf_counter()
    hgb = HistGradientBoostingClassifier(random_state=0).fit(x_fit, y_fit)
    hgb_s = time.perf_counter() - started
    hgb_f1 = float(evaluate(y_ho, hgb.predict_proba(x_ho), classes)["f1_macro"])

    tried: dict[str, int] = {}
    for trial in tuned.trials:
        kind = str(trial["params"]["kind"])
        tried[kind] = tried.get(kind, 0) + 1
    return {
        "rows": {"train": len(y_tr), "validation": len(y_val), "holdout": len(y_ho)},
        "inputs": x_tr.shape[1],
        "classes": len(classes),
        "ours_f1_macro": round(ours_f1, 4),
        "hgb_f1_macro": round(hgb_f1, 4),
        "ratio": round(ours_f1 / hgb_f1, 4) if hgb_f1 > 0 else None,
        "winner": settings.kind,
        "best_params": tuned.best_params,
        "best_val_loss": round(tuned.best_metrics.get("val_loss", float("nan")), 4),
        "trials_per_family": tried,
        "ours_seconds": {
            "search": round(search_s, 2),
            "refit": round(refit_s, 2),
            "total": round(search_s + refit_s, 2),
        },
        "hgb_seconds": round(hgb_s, 2),
    }


# --- 2. XGBoost on Ray Train ------------------------------------------------------------------


def timed_loop(original: Callable[[dict[str, Any]], None], folder: str) -> Callable[[dict[str, Any]], None]:
    """`tree_loop_per_worker`, unchanged, with wall-clock stamps around it and around its
    `xgboost.train` call, written to `folder` (workers share this machine's clock and disk)."""

    def loop(cfg: dict[str, Any]) -> None:
        import xgboost

        stamps: dict[str, Any] = {"enter": time.time(), "before_callbacks": [], "after_callbacks": []}
        train = xgboost.train

        class Stamp(xgboost.callback.TrainingCallback):
            def __init__(self, key: str) -> None:
                super().__init__()
                self.key = key

            def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
                stamps[self.key].append(time.time())
                return False

        def timed_train(*args: Any, **kwargs: Any) -> Any:
            # Two stamps per round, around the loop's own callbacks (none today; until 2026-12-04 a
            # RayTrainReportCallback reporting every round): the rounds' compute and the callbacks' share.
            kwargs["callbacks"] = [Stamp("before_callbacks"), *kwargs.get("callbacks", []), Stamp("after_callbacks")]
            stamps["train_start"] = time.time()
            try:
                return train(*args, **kwargs)
            finally:
                stamps["train_end"] = time.time()

        xgboost.train = timed_train
        try:
            original(cfg)
        finally:
            xgboost.train = train
            stamps["exit"] = time.time()
            Path(folder, f"worker-{os.getpid()}-{time.time_ns()}.json").write_text(json.dumps(stamps))

    return loop


def ray_dataset(x: np.ndarray, y: np.ndarray, blocks: int) -> Any:
    """A materialized Ray Dataset of {x: a tensor column, y}, in `blocks` blocks."""
    import ray
    from ray.data.extensions import ArrowTensorArray

    edges = np.linspace(0, len(y), blocks + 1).astype(int)
    tables = [
        pa.table({"x": ArrowTensorArray.from_numpy(x[a:b]), "y": pa.array(y[a:b])})
        for a, b in itertools.pairwise(edges)
    ]
    return ray.data.from_arrow(tables).materialize()


def run_ray(config: PipelineConfig, settings: Any, train_ds: Any, val: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    import jobs.trees as trees

    owner = trees.TreeFamily("xgboost")
    spec = owner.spec(settings, [f"x{i}" for i in range(val[0].shape[1])], list(config.schema.label.classes))
    original = trees.tree_loop_per_worker
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as stamps_dir:
        trees.tree_loop_per_worker = timed_loop(original, stamps_dir)  # type: ignore[assignment]
        try:
            called = time.time()
            model, _, rows = owner.fit_on_ray(config, spec, settings, train_ds, val, Path(out))
            returned = time.time()
        finally:
            trees.tree_loop_per_worker = original
        workers = [json.loads(p.read_text()) for p in sorted(Path(stamps_dir).glob("worker-*.json"))]
    if not workers or any("train_end" not in w for w in workers):
        raise RuntimeError(f"the workers' stamps are incomplete: {workers}")
    # The phases of the call, as the slowest worker saw them (the first to enter, the last to leave).
    enter = min(w["enter"] for w in workers)
    train_start = max(w["train_start"] for w in workers)
    train_end = max(w["train_end"] for w in workers)
    leave = max(w["exit"] for w in workers)
    return {
        "seconds": returned - called,
        "rows": rows,
        "val_logloss": _logloss(model.predict_proba(val[0]), val[1]),
        "phases_s": {
            "start_up": enter - called,  # controller, placement group, worker group, xgboost collective
            "shard_and_dmatrix": train_start - enter,  # iterate the shard, build the DMatrices
            "xgboost_train": train_end - train_start,  # the rounds
            "after_train_in_worker": leave - train_end,
            "teardown_and_load": returned - leave,  # the report reaches the driver, workers stop, booster loaded
        },
        "xgboost_train_per_worker_s": [w["train_end"] - w["train_start"] for w in workers],
        # Per round (median over rounds and workers): compute = previous round's end -> this round's
        # callbacks; callbacks = the loop's callbacks (ray.train.report of the round's metrics).
        "round_compute_s": float(np.median(np.concatenate([_compute_gaps(w) for w in workers]))),
        "round_callbacks_s": float(
            np.median(np.concatenate([np.subtract(w["after_callbacks"], w["before_callbacks"]) for w in workers]))
        ),
    }


def _compute_gaps(stamps: dict[str, Any]) -> np.ndarray:
    ends = [stamps["train_start"], *stamps["after_callbacks"][:-1]]
    return np.subtract(stamps["before_callbacks"], ends)


def run_plain(
    params: dict[str, Any], rounds: int, x: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, ...]
) -> dict[str, Any]:
    import xgboost

    metric = params["eval_metric"]
    started = time.perf_counter()
    dtrain = xgboost.DMatrix(x, y)
    built = time.perf_counter()
    booster = xgboost.train({**params, "nthread": 2}, dtrain, num_boost_round=rounds, verbose_eval=False)
    done = time.perf_counter()
    raw = booster.inplace_predict(val[0])
    proba = np.column_stack([1 - raw, raw]) if raw.ndim == 1 else raw
    return {
        "seconds": done - started,
        "val_logloss": _logloss(proba, val[1]),
        "phases_s": {"dmatrix": built - started, "xgboost_train": done - built},
        "round_s": (done - built) / rounds,
        "metric": metric,
    }


def _logloss(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0))))


def ray_vs_plain(config: PipelineConfig, rows: int, rounds: int, repeats: int) -> dict[str, Any]:
    import ray

    from cluster.ray_runtime import start_local
    from jobs.trees import booster_params

    val_rows = max(rows // 10, 2000)
    table, _ = generated_table(config, rows + val_rows, seed=5)
    features = fit_pipeline(table.slice(0, rows), config.schema, config.features)
    out = features.batch_fn()(numpy_batch(table))
    x, y = np.ascontiguousarray(out["x"][:rows]), out["y"][:rows]
    val = (np.ascontiguousarray(out["x"][rows:]), out["y"][rows:])
    settings = dataclasses.replace(config.model, kind="xgboost", rounds=rounds)
    cfg = dataclasses.replace(
        config, training=dataclasses.replace(config.training, workers=2, cpus_per_worker=1.0, use_gpu=False)
    )
    params = booster_params("xgboost", settings, len(config.schema.label.classes))

    started = time.perf_counter()
    start_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    ours: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    try:
        train_ds = ray_dataset(x, y, blocks=8)
        for i in range(repeats):
            order = ("ours", "plain") if i % 2 == 0 else ("plain", "ours")
            for side in order:
                runs = ours if side == "ours" else plain
                runs.append(
                    run_ray(cfg, settings, train_ds, val) if side == "ours" else run_plain(params, rounds, x, y, val)
                )
                print(f"  speed round {i + 1}/{repeats} {side}: {runs[-1]['seconds']:.1f} s", flush=True)
    finally:
        ray.shutdown()

    def median(runs: list[dict[str, Any]], *path: str) -> float:
        values = []
        for run in runs:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(float(value))
        return round(statistics.median(values), 3)

    ours_s, plain_s = median(ours, "seconds"), median(plain, "seconds")
    ours_tput, plain_tput = rows * rounds / ours_s, rows * rounds / plain_s
    inside = median(ours, "phases_s", "xgboost_train")
    return {
        "rows": rows,
        "validation_rows": len(val[1]),
        "inputs": x.shape[1],
        "rounds": rounds,
        "repeats": repeats,
        "params": {k: v for k, v in params.items() if k != "verbosity"},
        "ours": round(ours_tput),
        "peer": round(plain_tput),
        "ratio": round(ours_tput / plain_tput, 3),
        "unit": "rows * rounds / s",
        "ours_seconds_median": ours_s,
        "plain_seconds_median": plain_s,
        "ours_phases_s_median": {k: median(ours, "phases_s", k) for k in ours[0]["phases_s"]},
        "plain_phases_s_median": {k: median(plain, "phases_s", k) for k in plain[0]["phases_s"]},
        "ours_inside_xgboost_train_rows_rounds_per_s": round(rows * rounds / inside),
        "ours_round_compute_s_median": median(ours, "round_compute_s"),
        "ours_round_callbacks_s_median": median(ours, "round_callbacks_s"),
        "plain_round_s_median": median(plain, "round_s"),
        "ours_share_inside_xgboost_train": round(inside / ours_s, 3),
        "ours_val_logloss": median(ours, "val_logloss"),
        "plain_val_logloss": median(plain, "val_logloss"),
        "ours_seconds_each": [round(r["seconds"], 2) for r in ours],
        "plain_seconds_each": [round(r["seconds"], 2) for r in plain],
        "ours_xgboost_train_per_worker_s": [[round(s, 2) for s in r["xgboost_train_per_worker_s"]] for r in ours],
        "ray_start_seconds": round(ray_start_s, 2),
    }


# --- report -----------------------------------------------------------------------------------


def table(quality_rows: dict[str, dict[str, Any]], speed: dict[str, Any], worst: float | None) -> str:
    lines = [
        "1. Holdout macro F1: ours (one search over mlp / xgboost / random_forest, refit) vs HGB defaults",
        f"   {'data set':<22}{'rows tr/val/ho':>18}{'ours':>8}{'HGB':>8}{'ratio':>8}  {'winner':<14}"
        f"{'ours s':>8}{'HGB s':>7}",
    ]
    for name, q in quality_rows.items():
        r = q["rows"]
        sizes = f"{r['train']}/{r['validation']}/{r['holdout']}"
        lines.append(
            f"   {name:<22}{sizes:>18}{q['ours_f1_macro']:>8.4f}"
            f"{q['hgb_f1_macro']:>8.4f}{q['ratio'] or float('nan'):>8.3f}  {q['winner']:<14}"
            f"{q['ours_seconds']['total']:>8.1f}{q['hgb_seconds']:>7.2f}"
        )
    lines.append(f"   ratio_worst = {worst}  (the issue asks >= 1.0)")
    p, o, sp = speed["ours_phases_s_median"], speed["plain_phases_s_median"], speed
    lines += [
        "",
        f"2. XGBoost, {sp['rows']} rows x {sp['rounds']} rounds, median of {sp['repeats']}:",
        f"   ours  Ray Train (2 workers x 1 CPU): {sp['ours_seconds_median']:>7.2f} s {sp['ours']:>11,} rows*rounds/s"
        f"  val logloss {sp['ours_val_logloss']:.4f}",
        f"   plain xgboost.train (nthread=2):     {sp['plain_seconds_median']:>7.2f} s {sp['peer']:>11,} rows*rounds/s"
        f"  val logloss {sp['plain_val_logloss']:.4f}",
        f"   ratio ours/plain = {sp['ratio']}",
        "   where ours' time goes (medians, s; wall-clock stamps the workers write around the unchanged",
        "   tree_loop_per_worker, its xgboost.train call and the loop's own callbacks):",
        f"     start-up (call -> first worker in the loop) {p['start_up']:.2f},"
        f" shard + DMatrix {p['shard_and_dmatrix']:.2f}, xgboost.train {p['xgboost_train']:.2f},",
        f"     after train in worker {p['after_train_in_worker']:.2f},"
        f" teardown + booster load {p['teardown_and_load']:.2f}",
        f"     a round inside xgboost.train: compute {sp['ours_round_compute_s_median']:.4f},",
        f"     the loop's per-round callbacks (none now: one ray.train.report at the end)"
        f" {sp['ours_round_callbacks_s_median']:.4f}",
        f"     inside xgboost.train alone ours runs {sp['ours_inside_xgboost_train_rows_rounds_per_s']:,}"
        f" rows*rounds/s ({sp['ours_share_inside_xgboost_train']:.0%} of its wall time)",
        f"   plain: DMatrix {o['dmatrix']:.2f}, xgboost.train {o['xgboost_train']:.2f}"
        f" ({sp['plain_round_s_median']:.4f} a round)",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument(
        "--trials", type=int, default=None, help="search trials per data set (default 6 quick, 12 full)"
    )
    parser.add_argument("--stream-rows", type=int, default=None, help="post-drift rows (default 6k quick, 24k full)")
    parser.add_argument(
        "--rows", type=int, default=None, help="rows for the Ray Train comparison (40k quick, 200k full)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="boosting rounds, Ray Train comparison (10 quick, 50 full)"
    )
    args = parser.parse_args()
    trials = args.trials or (6 if args.quick else 12)
    stream_rows = args.stream_rows or (6_000 if args.quick else 24_000)
    rows = args.rows or (40_000 if args.quick else 200_000)
    # Ours pays ~2 s a round on this Ray (see the notes), so the rounds are fewer than the ~100 one
    # would pick: the comparison's ratio hardly depends on them, the run time does.
    rounds = args.rounds or (10 if args.quick else 50)
    repeats = 1 if args.quick else 3
    config = load_config(ROOT / "configs" / "demo.yaml", env={})
    started = time.perf_counter()

    loaders: dict[str, Callable[[], tuple[Split, list[str], list[Any]]]] = {
        "stream_after_drift": lambda: stream_after_drift(config, stream_rows),
        "breast_cancer": lambda: sklearn_set("breast_cancer"),
        "digits": lambda: sklearn_set("digits"),
        "wine": lambda: sklearn_set("wine"),
    }
    quality_rows: dict[str, dict[str, Any]] = {}
    for name, load in loaders.items():
        split, names, classes = load()
        quality_rows[name] = quality(config, split, names, classes, trials)
        q = quality_rows[name]
        print(f"  {name}: ours {q['ours_f1_macro']} ({q['winner']}) vs HGB {q['hgb_f1_macro']}", flush=True)
    ratios = [q["ratio"] for q in quality_rows.values() if q["ratio"] is not None]
    worst = round(min(ratios), 4) if ratios else None
    speed = ray_vs_plain(config, rows, rounds, repeats)

    print()
    print(table(quality_rows, speed, worst))
    print()
    result = {
        "benchmark": "models",
        "quality": {
            "peer": "sklearn HistGradientBoostingClassifier() defaults, random_state=0",
            "metric": "holdout f1_macro",
            "ratio_worst": worst,
            "data_sets": quality_rows,
            "conditions": {
                "search": f"search_in_process, {trials} trials, Optuna TPE seed 0, successive halving "
                f"(grace {config.search.grace_period}, factor {config.search.reduction_factor}) on validation "
                f"val_loss; families {list(FAMILIES)}; epochs (reports) {config.model.epochs}",
                "space": [dataclasses.asdict(p) for p in SPACE],
                "split": "stream: by position (= event time) 60/20/20 of the rows after a concept drift; "
                "sklearn: seeded (0) shuffle, 60/20/20; train/validation select, both refit on train+validation, "
                "holdout judges",
                "timed": "ours: the search plus the refit; HGB: its fit",
            },
        },
        "ray_train_xgboost": {
            **speed,
            "what": "ours: TreeFamily.fit_on_ray, XGBoostTrainer 2 workers x 1 CPU (nthread 1 each) on a local "
            "2-CPU Ray, a materialized Ray Dataset of 8 blocks; peer: xgboost.train in this process, nthread 2; "
            "both evaluate the validation rows every round",
            "timed": "ours: the whole fit_on_ray call (Ray Train start-up, shards, DMatrix, rounds, checkpoint, "
            "teardown, booster load); plain: DMatrix construction + xgboost.train",
        },
        "machine": common.machine(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
