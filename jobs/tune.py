"""Model selection and hyperparameter search: Optuna's TPE through Ray Tune, ASHA stopping weak trials.

The search is over model families and their knobs together (`search.families`, e.g. an MLP,
gradient-boosted trees and a random forest): a trial first draws a family, then that family's
part of `search.space` (a conditional space; a knob belongs to the families that read it,
`streams.config.FAMILY_KNOBS`). Each trial trains in one process on the window's training
part and reports the holdout's loss and accuracy `model.epochs` times, after equal shares of
its family's budget (epochs, boosting rounds), so ASHA cuts every family at the same fractions
of its budget and compares them on the same holdout loss. Concurrency and resources are
bounded, and a retrain warm-starts from the champion's family and hyperparameters (Optuna
evaluates them first). The best trial's settings are then trained for real (`jobs.train`).

As a Ray job entrypoint: `python -m jobs.tune --config configs/demo.yaml` (tune, train the
best, register it in MLflow and run the promotion gate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from jobs.families import Step, family
from jobs.features import fit_pipeline
from jobs.train import check_resources, in_process, join_ray, model_inputs, read_window, split_by_time
from streams.config import (
    FAMILY_KNOBS,
    INTEGER_KNOBS,
    SEARCH_METRICS,
    ModelSettings,
    Param,
    PipelineConfig,
    SearchSettings,
)
from streams.datasets import DatasetStore, Window

__all__ = [
    "TuneResult",
    "apply_params",
    "optuna_space",
    "params_of",
    "search_in_process",
    "suggest",
    "tune_arrays",
    "tune_model",
]


@dataclass(frozen=True)
class TuneResult:
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    trials: list[dict[str, Any]]
    seconds: float

    def settings(self, base: ModelSettings) -> ModelSettings:
        return apply_params(base, self.best_params)


def optuna_space(search: SearchSettings) -> dict[str, Any]:
    import optuna.distributions as d

    space: dict[str, Any] = {}
    for param in search.space:
        space[param.name] = _distribution(param, d)
    return space


def _distribution(param: Param, d: Any) -> Any:
    if param.choices:
        return d.CategoricalDistribution(list(param.choices))
    assert param.low is not None and param.high is not None
    if param.name in INTEGER_KNOBS:
        return d.IntDistribution(int(param.low), int(param.high), log=param.log)
    return d.FloatDistribution(param.low, param.high, log=param.log)


def suggest(trial: Any, search: SearchSettings, families: tuple[str, ...]) -> dict[str, Any]:
    """A trial's point in the conditional space: a family (when several are searched), then the
    family's own knobs, named `<family>.<knob>` so that each family's values are modelled apart.
    Only Optuna's public `suggest_*` calls: Ray Tune's define-by-run captures those."""
    chosen = families[0]
    params: dict[str, Any] = {}
    if len(families) > 1:
        chosen = params["kind"] = trial.suggest_categorical("kind", list(families))
    for param in search.space_of(chosen):
        name = param.name if len(families) == 1 else f"{chosen}.{param.name}"
        if param.choices:
            params[name] = trial.suggest_categorical(name, list(param.choices))
        elif param.name in INTEGER_KNOBS:
            params[name] = trial.suggest_int(name, int(param.low or 0), int(param.high or 0), log=param.log)
        else:
            params[name] = trial.suggest_float(name, float(param.low or 0), float(param.high or 0), log=param.log)
    return params


def tune_callbacks(config: PipelineConfig, out: Path, tracking_uri: str | None) -> list[Any]:
    """One MLflow run per trial, and W&B / Comet when the config switches them on."""
    callbacks: list[Any] = []
    project = config.trackers.project or config.name
    if tracking_uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(tracking_uri, experiment_name=config.name, tags={"driftloop.kind": "tune-trial"})
        )
    if config.trackers.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        mode = "offline" if config.trackers.offline else None
        if mode:
            os.environ["WANDB_MODE"] = mode  # Ray's callback asks for an API key unless this says offline
        callbacks.append(WandbLoggerCallback(project=project, mode=mode, dir=str(out.resolve())))
    if config.trackers.comet:
        from ray.air.integrations.comet import CometLoggerCallback

        extra: dict[str, Any] = {"offline_directory": str((out / "comet").resolve())} if config.trackers.offline else {}
        callbacks.append(CometLoggerCallback(online=not config.trackers.offline, project_name=project, **extra))
    return callbacks


def apply_params(settings: ModelSettings, params: dict[str, Any]) -> ModelSettings:
    """Model settings with a trial's parameters applied: `kind` picks the family, and knobs come
    bare or as `<family>.<knob>` (only the chosen family's apply); `hidden` comes as "64,32"."""
    kind = str(params.get("kind", settings.kind))
    changes: dict[str, Any] = {"kind": kind}
    for key, value in params.items():
        owner, _, name = key.rpartition(".")
        if owner and owner != kind:
            continue
        if name == "hidden":
            changes["hidden"] = tuple(int(w) for w in str(value).split(",") if w.strip())
        elif name in INTEGER_KNOBS:
            changes[name] = int(value)
        elif name in FAMILY_KNOBS[kind] or name in ("learning_rate", "weight_decay", "dropout"):
            changes[name] = float(value)
    return dataclasses.replace(settings, **changes)


def _searched(config: PipelineConfig) -> tuple[ModelSettings, tuple[str, ...]]:
    """The families a search tries, and the settings it starts from: `model`, of a searched family."""
    base, families = config.model, config.search.searched(config.model.kind)
    return (base if base.kind in families else dataclasses.replace(base, kind=families[0])), families


def first_points(
    search: SearchSettings, base: ModelSettings, families: tuple[str, ...], warm_start: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The points a search tries before sampling: the champion's (`warm_start`), then, when
    several families are searched and the budget leaves room to explore (at least two trials per
    family), each other family's configured values (`model.*`), so that no family is judged only
    on random draws. Pure."""
    points = [warm_start] if warm_start else []
    if len(families) > 1 and search.trials >= 2 * len(families):
        tried = {p.get("kind") for p in points}
        points += [
            params_of(dataclasses.replace(base, kind=f), search, families)  # type: ignore[arg-type]
            for f in families
            if f not in tried
        ]
    return points


@dataclass(frozen=True)
class _DefineByRun:
    """Ray Tune's define-by-run space (a module-level object: Ray Tune checkpoints its searcher)."""

    search: SearchSettings
    families: tuple[str, ...]

    def __call__(self, ot_trial: Any) -> None:
        suggest(ot_trial, self.search, self.families)  # Ray Tune takes the trial's suggestions as its config


def params_of(settings: ModelSettings, search: SearchSettings, families: tuple[str, ...] = ()) -> dict[str, Any]:
    """The searched parameters of some settings (a champion's), as a point for Optuna to try
    first, in `suggest`'s names; empty when the settings' family is not among `families`."""
    families = families or search.searched(settings.kind)
    if settings.kind not in families:
        return {}
    several = len(families) > 1
    point: dict[str, Any] = {"kind": settings.kind} if several else {}
    for param in search.space_of(settings.kind):
        value: Any = getattr(settings, param.name)
        if param.name == "hidden":
            value = ",".join(str(w) for w in value)
        if param.choices and value not in param.choices:
            continue  # outside today's space: Optuna would reject the point
        if (
            not param.choices
            and param.low is not None
            and param.high is not None
            and not param.low <= value <= param.high
        ):
            continue
        point[f"{settings.kind}.{param.name}" if several else param.name] = value
    return point


def tune_model(
    config: PipelineConfig,
    window: Window,
    out: Path,
    *,
    store: DatasetStore | None = None,
    warm_start: dict[str, Any] | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    data: Any = None,
) -> TuneResult:
    """Search the config's space on the window (or on `data`, the window already read).

    An Arrow table (a window below `ray.distributed_min_rows`) is searched in this
    process (`search_in_process`), a Ray Dataset with Ray Tune (`tune_arrays`).
    """
    store = store or DatasetStore(config.datasets.root, config.name)
    started = time.monotonic()
    # W&B and Comet log through Ray Tune's callbacks: with either on, Ray Tune runs the search.
    ray_trackers = config.trackers.wandb or config.trackers.comet
    here = in_process(data, window, config)
    if not here or ray_trackers:
        check_resources(config.search.cpus_per_trial, 0, "a tuning trial")
    if data is None:
        data = read_window(store, window, config.schema.event_time, config)
    train_raw, holdout_raw, _ = split_by_time(data, config.schema.event_time, config.model.holdout_fraction)
    if not here:
        train_raw = train_raw.materialize()
    features = fit_pipeline(train_raw, config.schema, config.features)
    to_inputs = features.batch_fn()
    arrays = (*model_inputs(train_raw, to_inputs), *model_inputs(holdout_raw, to_inputs))
    search = search_in_process if here and not ray_trackers else tune_arrays
    result = search(
        config, arrays, features.output_names, out, warm_start=warm_start, seed=seed, tracking_uri=tracking_uri
    )
    return dataclasses.replace(result, seconds=time.monotonic() - started)


def tune_arrays(
    config: PipelineConfig,
    arrays: tuple[Any, Any, Any, Any],
    input_names: list[str],
    out: Path,
    *,
    warm_start: dict[str, Any] | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
) -> TuneResult:
    """The search itself, on (x_train, y_train, x_val, y_val) already transformed."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    search = config.search
    started = time.monotonic()
    refs = [ray.put(a) for a in arrays]
    names, classes = input_names, list(config.schema.label.classes)
    base, families = _searched(config)

    def trial(params: dict[str, Any]) -> None:
        local: Any = tuple(ray.get(r) for r in refs)
        settings = apply_params(base, params)
        owner = family(settings.kind)
        report = lambda s: tune.report({**s.metrics, "epoch": s.step, "train_loss": s.train_loss})  # noqa: E731
        owner.fit(owner.spec(settings, names, classes), settings, local, on_step=report)

    algorithm = OptunaSearch(
        space=_DefineByRun(search, families),
        metric=search.metric,
        mode=search.mode,
        points_to_evaluate=first_points(search, base, families, warm_start) or None,
        seed=seed,
    )
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": search.cpus_per_trial}),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(algorithm, max_concurrent=search.max_concurrent),
            scheduler=ASHAScheduler(
                time_attr="epoch",
                max_t=base.epochs,
                grace_period=search.grace_period,
                reduction_factor=search.reduction_factor,
            ),
            num_samples=search.trials,
            metric=search.metric,
            mode=search.mode,
            # one trial's actor runs the next: no new worker process (and torch import) per trial
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{config.name}-tune-{int(time.time() * 1000)}",
            storage_path=config.ray.train_storage(out),
            callbacks=tune_callbacks(config, out, tracking_uri),
        ),
    )
    grid = tuner.fit()
    trials = []
    for i in range(len(grid)):
        result = grid[i]
        if result.error is not None:
            raise RuntimeError(f"a tuning trial failed: {result.error!r}")
        reported = result.metrics or {}
        trial_metrics: dict[str, float] = {k: float(reported[k]) for k in SEARCH_METRICS if k in reported}
        trials.append({"params": dict(result.config or {}), "epochs": int(reported.get("epoch", 0)), **trial_metrics})
    best = grid.get_best_result(metric=search.metric, mode=search.mode, scope="all")
    found = best.metrics or {}
    metrics: dict[str, float] = {k: float(found[k]) for k in SEARCH_METRICS if k in found}
    return TuneResult({"kind": families[0], **(best.config or {})}, metrics, trials, time.monotonic() - started)


def search_in_process(
    config: PipelineConfig,
    arrays: tuple[Any, Any, Any, Any],
    input_names: list[str],
    out: Path,
    *,
    warm_start: dict[str, Any] | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
) -> TuneResult:
    """The same search as `tune_arrays` (space, TPE seed, budget, warm start, early stopping by
    successive halving at the same rungs, one MLflow run per trial) in this process, trial after
    trial: for windows where a Ray Tune trial actor costs more to start than the trial to run."""
    import optuna

    del out  # Ray Tune keeps its experiment there; nothing here needs a folder
    search, classes = config.search, list(config.schema.label.classes)
    base, families = _searched(config)
    log_trial = _trial_logger(config, tracking_uri)
    started = time.monotonic()
    trials: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, search, families)
        settings = apply_params(base, params)
        owner = family(settings.kind)
        history: list[dict[str, float]] = []

        def on_step(step: Step) -> None:
            history.append({**step.metrics, "train_loss": step.train_loss, "epoch": step.step})
            trial.report(step.metrics[search.metric], step.step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            owner.fit(owner.spec(settings, input_names, classes), settings, arrays, on_step=on_step)
        finally:
            last = history[-1] if history else {}
            trials.append({"params": params, "epochs": int(last.get("epoch", 0)),
                           **{k: float(last[k]) for k in SEARCH_METRICS if k in last}})  # fmt: skip
            log_trial(params, history)
        return float(history[-1][search.metric])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize" if search.mode == "min" else "maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=search.grace_period, reduction_factor=search.reduction_factor
        ),
    )
    for point in first_points(search, base, families, warm_start):
        study.enqueue_trial(point)
    study.optimize(objective, n_trials=search.trials)
    # Like Ray Tune's best result (scope "all"): the best value any trial reported, pruned ones too.
    sign = 1 if search.mode == "min" else -1
    best = min((t for t in trials if search.metric in t), key=lambda t: sign * t[search.metric])
    metrics: dict[str, float] = {k: float(best[k]) for k in SEARCH_METRICS if k in best}
    # The family is named even when only one was searched (it may not be model.kind).
    return TuneResult({"kind": families[0], **best["params"]}, metrics, trials, time.monotonic() - started)


def _trial_logger(config: PipelineConfig, tracking_uri: str | None) -> Callable[[dict[str, Any], list[Any]], None]:
    """One MLflow run per trial (params, per-epoch metrics), as Ray Tune's MLflow callback logs them."""
    if not tracking_uri:
        return lambda params, history: None
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(config.name)
    experiment = found.experiment_id if found else client.create_experiment(config.name)

    def log(params: dict[str, Any], history: list[dict[str, float]]) -> None:
        run = client.create_run(experiment, tags={"driftloop.kind": "tune-trial", "driftloop.search": "in-process"})
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, int(row["epoch"])) for row in history for k, v in row.items() if k != "epoch"
        ]
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(run.info.run_id)

    return log


def main(argv: list[str] | None = None) -> int:
    """Tune, train the best with Ray Train, register the model and run the gate."""
    from jobs.registry import ModelRegistry, tracking_uri
    from streams.config import load_config

    parser = argparse.ArgumentParser(prog="python -m jobs.tune", description="Tune, train, register, gate.")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/tune-<time>)")
    parser.add_argument("--trigger-event-id", default=None, help="the RetrainRequested event this job answers")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    join_ray(config)
    out = args.out or Path("runs") / f"tune-{int(time.time())}"
    store = DatasetStore(config.datasets.root, config.name)
    window = store.window()
    if not window.manifests:
        print(
            f"no dataset versions in {config.datasets.root}/{config.name}: run `driftloop ingest` first",
            file=sys.stderr,
        )
        return 1
    registry = ModelRegistry(config, tracking_uri(config, out), artifact_root=out / "mlartifacts")
    summary = tune_train_and_gate(config, window, out, store, registry, args.trigger_event_id)
    print(json.dumps(summary))
    return 0


def tune_train_and_gate(
    config: PipelineConfig,
    window: Window,
    out: Path,
    store: DatasetStore,
    registry: Any,
    trigger_event_id: str | None = None,
) -> dict[str, Any]:
    """Tune (warm-started from the champion), train the best, register it, run the gate; a summary."""
    from jobs.train import evaluate_artifact, train_model

    champion = registry.alias("champion")
    warm = None
    if champion is not None:
        run = registry.client.get_run(registry.client.get_model_version(config.name, champion).run_id or "")
        known = {k: json.loads(v) if v.startswith("[") else v for k, v in run.data.params.items()}
        warm = params_of(_settings_from_params(config.model, known), config.search) or None
    clock = _Stages()
    data = read_window(store, window, config.schema.event_time, config)  # once, for both stages
    here = isinstance(data, pa.Table)
    clock.done("read")
    tuned = tune_model(config, window, out, store=store, warm_start=warm, tracking_uri=registry.uri, data=data)
    clock.done("tune")
    trained = train_model(config, window, out, model=tuned.settings(config.model), store=store, data=data)
    clock.done("train")
    params = {**trained.params, **{f"tuned.{k}": v for k, v in tuned.best_params.items()}}
    registered = registry.log_training(
        trained.artifact, params, trained.history, trained.report, window, trigger_event_id
    )
    clock.done("register")
    holdout_id = trained.report["holdout"]

    def champion_on_this_holdout(version: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as folder:
            return evaluate_artifact(registry.download(version, Path(folder)), config, trained.holdout, holdout_id)

    decision = _promote_and_publish(registry, registered.version, config, champion_on_this_holdout)
    clock.done("gate")
    summary = {
        "version": registered.version,
        "run_id": registered.run_id,
        "datasets": [m.version_id for m in window.manifests],
        "train_rows": trained.train_rows,
        "promoted": decision.promote and decision.staged is None,
        "delivery_step": decision.staged,  # passed the gate, and proves itself live (delivery.steps) first
        "reasons": decision.reasons,
        "best_params": tuned.best_params,
        "report": {k: trained.report[k] for k in ("accuracy", "f1_macro", "baseline_accuracy")},
        "ran_in": "the job's process" if here else "Ray Data, Ray Tune and Ray Train",
        "stages_s": clock.seconds,
    }
    return summary


class _Stages:
    """Seconds per stage of a job, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def done(self, stage: str) -> None:
        now = time.monotonic()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now


def _promote_and_publish(registry: Any, version: str, config: PipelineConfig, champion_report: Any) -> Any:
    """Run the gate; publish ModelPromoted / ModelRejected on the models topic when Kafka is configured."""
    if config.kafka.embedded:
        print(
            "no Kafka configured (kafka.bootstrap_servers: embedded): the gate's event is not published",
            file=sys.stderr,
        )
        return registry.promote(version, config.gate, champion_report=champion_report)
    from streams.kafka import Producer, ensure_topics
    from streams.topics import Topics

    topic = Topics.of(config).models
    ensure_topics(config.kafka, [topic])
    with Producer(config.kafka, client_id=f"{config.name}.gate") as producer:
        return registry.promote(
            version, config.gate, champion_report=champion_report, publish=lambda e: producer.send_event(topic, e)
        )


def _settings_from_params(base: ModelSettings, params: dict[str, Any]) -> ModelSettings:
    """A champion's settings from its run's logged params (its family and that family's knobs)."""
    kind = str(params.get("kind", base.kind))
    if kind not in FAMILY_KNOBS:
        return base
    values: dict[str, Any] = {"kind": kind}
    for name in FAMILY_KNOBS[kind]:
        if name in params:
            value = params[name]
            values[name] = ",".join(str(w) for w in value) if isinstance(value, list) else value
    return apply_params(base, values)


if __name__ == "__main__":
    sys.exit(main())
