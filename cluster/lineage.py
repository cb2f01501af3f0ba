"""`driftloop lineage NAME@ALIAS|VERSION`: one model version's trail, end to end.

Kafka topic/partition/offset ranges -> dataset versions (rows, digest) -> the MLflow run
(params, metrics, git commit) -> the registered version and its gate decision -> the retrain
request and the drift event behind it -> when it was promoted (and so served). What lives in
MLflow and the dataset store is always shown; the events come from the `retrain`, `drift` and
`models` topics when the broker still has them.
"""

from __future__ import annotations

import json
from typing import Any

from streams.config import PipelineConfig
from streams.errors import DriftloopError

__all__ = ["model_trail", "print_trail", "read_events"]


def model_trail(config: PipelineConfig, tracking_uri: str, ref: str, datasets_root: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    from jobs.registry import ModelRegistry
    from streams.datasets import DatasetStore

    registry = ModelRegistry(config, tracking_uri)
    version = ref if ref.isdigit() else registry.alias(ref)
    if version is None:
        raise DriftloopError(f"model {config.name!r} has no alias {ref!r} in {tracking_uri}")
    try:
        mv = registry.client.get_model_version(config.name, version)
        run = registry.client.get_run(mv.run_id or "")
    except MlflowException as err:
        raise DriftloopError(f"model {config.name!r} version {version}: {err.message}") from None
    tags = {k.removeprefix("driftloop."): v for k, v in mv.tags.items()}
    store = DatasetStore(datasets_root, config.name)
    datasets = []
    for version_id in filter(None, tags.get("datasets", "").split(",")):
        try:
            m = store.get(version_id)
            datasets.append(
                {
                    "version": version_id,
                    "rows": m.rows,
                    "invalid_rows": m.invalid_rows,
                    "digest": m.digest,
                    "ranges": [f"{r.topic}/{r.partition}:[{r.start},{r.end})" for r in m.ranges],
                }
            )
        except (KeyError, OSError):
            datasets.append({"version": version_id, "note": f"not in the dataset store at {datasets_root}"})
    trail: dict[str, Any] = {
        "model": config.name,
        "version": version,
        "aliases": list(mv.aliases),
        "registered_at_ms": mv.creation_timestamp,
        "family": tags.get("family"),
        "mlflow_model": f"models:/{config.name}/{version}",  # mlflow.pyfunc.load_model takes it
        "kafka": tags.get("kafka"),
        "datasets": datasets,
        "run": {
            "id": run.info.run_id,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "git_commit": run.data.tags.get("git_commit"),
        },
        "gate": {"decision": tags.get("gate"), "reasons": tags.get("gate_reasons")},
        "retrain": {
            "request_id": tags.get("trigger_event_id"),
            "cause": tags.get("retrain_cause"),
            "drift_event_id": tags.get("drift_event_id"),
        },
        "events": _events(config, tags.get("trigger_event_id"), tags.get("drift_event_id"), version),
    }
    return trail


def _events(config: PipelineConfig, request_id: str | None, drift_id: str | None, version: str) -> dict[str, Any]:
    """The drift event, retrain request and promotions of this version, from the broker if it is there."""
    if config.kafka.embedded:
        return {"note": "no broker configured (KAFKA_BOOTSTRAP_SERVERS): events not looked up"}
    from streams.events import DriftDetected, ModelPromoted, ModelRolledBack, RetrainRequested
    from streams.serde import encode_event

    try:
        events = read_events(config)
    except DriftloopError as err:
        return {"note": f"events not looked up: {err}"}
    found: dict[str, Any] = {"promoted_at": [], "rolled_back_at": []}
    for e in events:
        if isinstance(e, RetrainRequested) and e.event_id == request_id:
            found["retrain_request"] = json.loads(encode_event(e))
        elif isinstance(e, DriftDetected) and e.event_id == drift_id:
            found["drift_event"] = json.loads(encode_event(e))
        elif isinstance(e, ModelPromoted) and e.model_version == version:
            found["promoted_at"].append(e.occurred_at.isoformat())
        elif isinstance(e, ModelRolledBack) and version in (e.from_version, e.to_version):
            found["rolled_back_at"].append(f"{e.occurred_at.isoformat()} {e.from_version}->{e.to_version}")
    return found


def read_events(config: PipelineConfig, idle_timeout_s: float = 2.0) -> list[Any]:
    """Everything on the `drift`, `retrain` and `models` topics, oldest first (read until none came
    for `idle_timeout_s`)."""
    from streams.kafka import Batch, StreamConsumer
    from streams.serde import decode_events
    from streams.topics import Topics

    topics = Topics.of(config)
    seen: list[Any] = []

    def keep(batch: Batch) -> None:
        seen.extend(batch.values)

    StreamConsumer(
        config.kafka, [topics.drift, topics.retrain, topics.models], decode_events, keep, group_id=None,
        dlq_topic=None,
    ).run(idle_timeout_s=idle_timeout_s)  # fmt: skip
    return sorted(seen, key=lambda e: e.occurred_at)


def print_trail(trail: dict[str, Any]) -> None:
    print(f"{trail['model']} version {trail['version']}  aliases: {', '.join(trail['aliases']) or '-'}")
    print(f"  family     {trail.get('family') or '-'}  (MLflow pyfunc: {trail['mlflow_model']})")
    print(f"  kafka      {trail['kafka']}")
    for d in trail["datasets"]:
        print(
            f"  dataset    {d['version']}: {d.get('rows', '?')} rows, digest {d.get('digest', '?')}"
            + (f" ({d['note']})" if "note" in d else "")
        )
        for r in d.get("ranges", []):
            print(f"               {r}")
    run = trail["run"]
    print(f"  run        {run['id']} (git {run['git_commit']})")
    print(f"  params     {json.dumps(run['params'], sort_keys=True)[:300]}")
    metrics = {k: round(v, 4) for k, v in run["metrics"].items() if not k.startswith("epoch")}
    print(f"  metrics    {json.dumps(metrics, sort_keys=True)[:300]}")
    print(f"  gate       {trail['gate']['decision']}: {trail['gate']['reasons']}")
    retrain = trail["retrain"]
    print(f"  retrain    request {retrain['request_id']}: {retrain['cause']}")
    events = trail["events"]
    if "note" in events:
        print(f"  events     {events['note']}")
        return
    drift = events.get("drift_event")
    if drift:
        drifted = [s["feature"] for s in drift["statistics"] if s["drifted"]]
        print(
            f"  drift      {drift['kind']} drift at {drift['window_end']} in {sorted(set(drifted))}, "
            f"window of {drift['window_size']}"
        )
    print(
        f"  served     promoted at {', '.join(events['promoted_at']) or '-'}"
        + (f"; rollbacks {events['rolled_back_at']}" if events["rolled_back_at"] else "")
    )
