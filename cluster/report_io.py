"""The report's I/O: read a pipeline's topics (and MLflow, when it is there), write the page, log
it to MLflow. What the page says is `cluster.report`'s (pure); this module only fetches and stores.

`driftloop report` and the end of `driftloop run` both call `gather` and `write`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster.report import PREDICTION, Inputs, Served, Thresholds, WindowSample, build, join, render
from streams.config import PipelineConfig
from streams.events import (
    DriftDetected,
    Event,
    LabelObserved,
    ModelPromoted,
    PredictionLogged,
    TrainingCompleted,
    utcnow,
)

__all__ = ["Gathered", "gather", "log_report", "promoted_run", "write"]

log = logging.getLogger(__name__)


@dataclass
class Gathered:
    """What was read: the report's inputs, and the notes on what could not be."""

    inputs: Inputs
    warnings: list[str] = field(default_factory=list)


def gather(
    config: PipelineConfig,
    config_path: str,
    *,
    since: datetime | None = None,
    tracking_uri: str | None = None,
    scenario: str | None = None,
    marks: Sequence[tuple[datetime, str]] = (),
    numbers: Mapping[str, Any] | None = None,
    idle_timeout_s: float = 2.0,
) -> Gathered:
    """Read the pipeline's drift, retrain, models, predictions and labels topics (from `since`, if
    given), and, with `tracking_uri`, each version's lineage tags and the reference of the model
    that served the first drifted window."""
    events = [e for e in read_events(config, idle_timeout_s) if since is None or e.occurred_at >= since]
    first = next((e for e in events if isinstance(e, DriftDetected) and e.kind != "performance"), None)
    predictions, labels, window = read_predictions(config, first, since, idle_timeout_s)
    warnings: list[str] = []
    notes = [f"Read from the topics of pipeline {config.name!r} on {config.kafka.bootstrap_servers}."]
    sample = None
    if first is not None:
        sample = _sample(config, first, window)
    registry: dict[str, dict[str, str]] = {}
    if tracking_uri:
        try:
            registry, sample = _from_mlflow(config, tracking_uri, events, sample)
        except Exception as err:  # MLflow is optional here: the report stands without it
            warnings.append(f"MLflow at {tracking_uri} not read ({type(err).__name__}: {err})")
    else:
        warnings.append("no MLflow tracking URI: lineage from the events only, no reference histograms")
    if sample is not None and sample.reference is None and not sample.note:
        sample = replace(sample, note="The model's reference is in MLflow, which was not read: " + "; ".join(warnings))
    inputs = Inputs(
        pipeline=config.name,
        config_path=config_path,
        generated_at=utcnow(),
        thresholds=Thresholds.of(config.monitor),
        events=events,
        served=join(predictions, labels) if predictions else Served.empty(),
        scenario=scenario,
        since=since,
        sample=sample,
        registry=registry,
        marks=marks,
        numbers=dict(numbers or {}),
        notes=[*notes, *warnings],
    )
    return Gathered(inputs, warnings)


def read_events(config: PipelineConfig, idle_timeout_s: float = 2.0) -> list[Event]:
    """Everything on the `drift`, `retrain` and `models` topics, oldest first."""
    from cluster.lineage import read_events as read

    return list(read(config, idle_timeout_s=idle_timeout_s))


def read_predictions(
    config: PipelineConfig, window: DriftDetected | None, since: datetime | None, idle_timeout_s: float
) -> tuple[list[PredictionLogged], list[LabelObserved], list[PredictionLogged]]:
    """The predictions and labels topics, and the predictions at `window`'s offsets (the values a
    drifted window held)."""
    from streams.kafka import Batch, StreamConsumer
    from streams.serde import decode_events
    from streams.topics import Topics

    topics = Topics.of(config)
    spans = {(r.topic, r.partition): (r.start, r.end) for r in (window.offsets if window else ())}
    predictions: list[PredictionLogged] = []
    labels: list[LabelObserved] = []
    inside: list[PredictionLogged] = []

    def keep(batch: Batch) -> None:
        for chunk in batch.chunks:
            span = spans.get((chunk.topic, chunk.partition))
            for record, value in zip(chunk.records, chunk.values, strict=True):
                if isinstance(value, PredictionLogged):
                    if span is not None and span[0] <= record.offset < span[1]:
                        inside.append(value)
                    if since is None or value.occurred_at >= since:
                        predictions.append(value)
                elif isinstance(value, LabelObserved):
                    labels.append(value)

    StreamConsumer(config.kafka, [topics.predictions, topics.labels], decode_events, keep, group_id=None,
                   dlq_topic=None).run(idle_timeout_s=idle_timeout_s)  # fmt: skip
    return predictions, labels, inside


def _sample(config: PipelineConfig, window: DriftDetected, inside: list[PredictionLogged]) -> WindowSample:
    """The window's values by feature, as the monitor saw them (the model's output included)."""
    if not inside:
        return WindowSample(window.event_id, note="The window's predictions are no longer on the predictions topic.")
    classes = [str(c) for c in config.schema.label.classes]
    positive = classes[-1] if len(classes) == 2 else None
    columns: dict[str, list[Any]] = {}
    for p in inside:
        for name, value in p.features.items():
            columns.setdefault(name, []).append(value)
        columns.setdefault(PREDICTION, []).append(
            str(p.prediction) if positive is None else p.probabilities.get(positive)
        )
    versions = [p.model_version for p in inside]
    version = max(set(versions), key=versions.count)
    return WindowSample(window.event_id, version, columns)


def _from_mlflow(
    config: PipelineConfig, uri: str, events: Sequence[Event], sample: WindowSample | None
) -> tuple[dict[str, dict[str, str]], WindowSample | None]:
    """Each trained version's lineage tags (`driftloop.*`), and the sample's model reference."""
    from jobs.monitor import load_champion
    from jobs.registry import ModelRegistry

    registry = ModelRegistry(config, uri)
    tags: dict[str, dict[str, str]] = {}
    for e in events:
        if isinstance(e, TrainingCompleted):
            version = registry.client.get_model_version(config.name, e.model_version)
            tags[e.model_version] = {k.removeprefix("driftloop."): str(v) for k, v in version.tags.items()
                                     if k.startswith("driftloop.") and k != "driftloop.digests"}  # fmt: skip
    if sample is not None and sample.version is not None:
        try:
            sample = replace(sample, reference=load_champion(config, registry, sample.version).reference)
        except Exception as err:
            sample = replace(sample, note=f"version {sample.version}'s reference could not be read: {err}")
    return tags, sample


def write(path: Path, inputs: Inputs) -> Path:
    """Build the report and write its page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(build(inputs)), encoding="utf-8")
    return path


def promoted_run(events: Sequence[Event]) -> tuple[str, str] | None:
    """The newest promoted version and the MLflow run that produced it (from its TrainingCompleted)."""
    runs = {e.model_version: e.run_id for e in events if isinstance(e, TrainingCompleted) and e.run_id}
    promoted = [e.model_version for e in events if isinstance(e, ModelPromoted)]
    for version in reversed(promoted):
        if version in runs:
            return version, runs[version]
    return None


def log_report(tracking_uri: str, run_id: str, page: Path, name: str = "report.html") -> str:
    """Log the page as an artifact of `run_id` (under `report/`); the artifact's URI."""
    from mlflow.tracking import MlflowClient

    from jobs.registry import use_tracking_credentials

    use_tracking_credentials()
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / name
        copy.write_bytes(page.read_bytes())
        client.log_artifact(run_id, str(copy), artifact_path="report")
    return f"{client.get_run(run_id).info.artifact_uri}/report/{name}"
