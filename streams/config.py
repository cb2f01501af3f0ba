"""Pipeline configuration: one YAML file per pipeline, loaded into frozen dataclasses.

Every error names the file, the key, what was expected and what was found. Connection
settings can be overridden from the environment (`KAFKA_BOOTSTRAP_SERVERS`, `RAY_ADDRESS`,
`MLFLOW_TRACKING_URI`); secrets (SASL credentials) come *only* from the environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import keyword
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, cast

import yaml

from streams.errors import ConfigError

__all__ = [
    "API_KEY_ENV",
    "DATASETS_ROOT_ENV",
    "GIT_COMMIT_ENV",
    "MLFLOW_PASSWORD_FILE_ENV",
    "ConsumerSettings",
    "DatasetSettings",
    "DeliverySettings",
    "Derived",
    "Feature",
    "FeatureSettings",
    "FeatureTransform",
    "GateSettings",
    "GeneratorSettings",
    "KafkaSettings",
    "LabelSpec",
    "MlflowSettings",
    "ModelSettings",
    "MonitorSettings",
    "Param",
    "PipelineConfig",
    "ProducerSettings",
    "RaySettings",
    "RecordSchema",
    "RetrainSettings",
    "SearchSettings",
    "ServingSettings",
    "Step",
    "TopicSettings",
    "TrackerSettings",
    "TrainingSettings",
    "dump_config",
    "field_key",
    "load_config",
    "parse_config",
]

EMBEDDED = "embedded"
DATASETS_ROOT_ENV = "DRIFTLOOP_DATASETS_ROOT"  # overrides datasets.root (the local stack sets it)
MLFLOW_PASSWORD_FILE_ENV = "DRIFTLOOP_MLFLOW_PASSWORD_FILE"  # a 0600 file holding the tracking password
GIT_COMMIT_ENV = "DRIFTLOOP_GIT_COMMIT"  # a job's code commit, set by its submitter (`.git` does not travel)
API_KEY_ENV = "DRIFTLOOP_API_KEY"  # the key Serve's clients send: from the environment only
RESERVED_COLUMNS = ("topic", "partition", "offset", "timestamp")  # Kafka metadata in every dataset
KAFKA_TIME = "timestamp"  # the Kafka record timestamp: the event time when a schema names none
INLINE = "\x00inline"  # marks the field a shorthand value stands for (see FeatureTransform.normalize)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
# A column name as users have them: any printable text ("region-centroid-col", "Monthly charges").
_COLUMN = re.compile(r"^(?=\S)[^\x00-\x1f\x7f]{1,128}(?<=\S)$")
_COLUMN_EXPECTED = "a column name: 1-128 printable characters, no leading or trailing space"
_NOT_FROM_YAML = {"yaml": False}
DriftKind = Literal["data", "prediction", "performance"]
Problem = tuple[str, str, object]  # (key relative to the section, expected, found)


@dataclass(frozen=True)
class ProducerSettings:
    """Producer knobs; `buffer_bytes` bounds the payload waiting for acknowledgement."""

    linger_ms: int = 5
    batch_size: int = 65536
    buffer_bytes: int = 32 * 1024 * 1024
    max_block_ms: int = 10_000
    delivery_timeout_ms: int = 120_000

    def problems(self) -> Iterator[Problem]:
        for name in ("linger_ms", "max_block_ms"):
            if getattr(self, name) < 0:
                yield name, "an integer >= 0", getattr(self, name)
        for name in ("batch_size", "buffer_bytes", "delivery_timeout_ms"):
            if getattr(self, name) < 1:
                yield name, "an integer >= 1", getattr(self, name)
        if self.delivery_timeout_ms <= self.linger_ms + 30_000:
            yield (
                "delivery_timeout_ms",
                f"more than linger_ms + 30000 ({self.linger_ms + 30_000})",
                self.delivery_timeout_ms,
            )


@dataclass(frozen=True)
class ConsumerSettings:
    """Consumer loop knobs: batch size, group timing and the handler's retry budget."""

    max_poll_records: int = 2000
    poll_timeout_ms: int = 500
    session_timeout_ms: int = 6000
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    handler_retries: int = 3
    retry_backoff_ms: int = 200

    def problems(self) -> Iterator[Problem]:
        for name in ("max_poll_records", "poll_timeout_ms", "session_timeout_ms"):
            if getattr(self, name) < 1:
                yield name, "an integer >= 1", getattr(self, name)
        for name in ("handler_retries", "retry_backoff_ms"):
            if getattr(self, name) < 0:
                yield name, "an integer >= 0", getattr(self, name)


@dataclass(frozen=True)
class KafkaSettings:
    """Where the broker is and how topics are laid out.

    `bootstrap_servers: embedded` means driftloop starts its own Tansu broker.
    """

    bootstrap_servers: str = EMBEDDED
    partitions: int = 4
    replication_factor: int = 1
    max_record_bytes: int = 1024 * 1024
    connect_timeout_ms: int = 10_000
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    ssl_cafile: str | None = None
    producer: ProducerSettings = ProducerSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    sasl_username: str | None = field(default=None, metadata=_NOT_FROM_YAML, repr=False)
    sasl_password: str | None = field(default=None, metadata=_NOT_FROM_YAML, repr=False)

    @property
    def embedded(self) -> bool:
        return self.bootstrap_servers == EMBEDDED

    def problems(self) -> Iterator[Problem]:
        if not self.bootstrap_servers.strip():
            yield "bootstrap_servers", "host:port[,host:port...] or 'embedded'", self.bootstrap_servers
        for name in ("partitions", "replication_factor", "connect_timeout_ms"):
            if getattr(self, name) < 1:
                yield name, "an integer >= 1", getattr(self, name)
        if not 1024 <= self.max_record_bytes <= 64 * 1024 * 1024:
            yield "max_record_bytes", "an integer between 1024 and 67108864", self.max_record_bytes
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            yield "sasl_mechanism", f"a mechanism when security_protocol is {self.security_protocol}", None


@dataclass(frozen=True)
class Feature:
    """One input column: its type, and its range (numbers) or categories."""

    name: str
    type: Literal["float", "int", "bool", "category"]
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] = ()
    nullable: bool = False

    @property
    def numeric(self) -> bool:
        return self.type in ("float", "int")

    def problems(self) -> Iterator[Problem]:
        if not _COLUMN.match(self.name):
            yield "name", _COLUMN_EXPECTED, self.name
        if self.type == "category":
            if len(self.categories) < 2:
                yield "categories", "at least two categories", list(self.categories)
            if len(set(self.categories)) != len(self.categories):
                yield "categories", "distinct categories", list(self.categories)
            for bound in ("min", "max"):
                if getattr(self, bound) is not None:
                    yield bound, "no range on a category feature", getattr(self, bound)
        else:
            if self.categories:
                yield "categories", f"no categories on a {self.type} feature", list(self.categories)
            if self.type == "bool":
                for bound in ("min", "max"):
                    if getattr(self, bound) is not None:
                        yield bound, "no range on a bool feature", getattr(self, bound)
            if self.min is not None and self.max is not None and self.min >= self.max:
                yield "max", f"a number greater than min ({self.min})", self.max


@dataclass(frozen=True)
class LabelSpec:
    """The target column and its classes (strings or integers)."""

    name: str
    classes: tuple[str | int, ...]

    def problems(self) -> Iterator[Problem]:
        if not _COLUMN.match(self.name):
            yield "name", _COLUMN_EXPECTED, self.name
        if len(self.classes) < 2:
            yield "classes", "at least two classes", list(self.classes)
        if len(set(self.classes)) != len(self.classes):
            yield "classes", "distinct classes", list(self.classes)
        if len({type(c) for c in self.classes}) > 1:
            yield "classes", "classes all strings or all integers", list(self.classes)


def field_key(name: str) -> str:
    """The Python name that stands for a column inside a record type (the wire keeps `name`).

    An identifier is its own key; any other name ("region-centroid-col", "a b") gets a stable one
    made from it, so no two names share a key.
    """
    if name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_"):
        return name
    stem = re.sub(r"\W", "_", name, flags=re.ASCII).strip("_")[:40] or "col"
    return f"c_{stem}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class RecordSchema:
    """The shape of a record on the `records` topic; the record codec is generated from it.

    `record_id`, `entity_id` and `timestamp` are optional: without a record id a record is named
    by its place in Kafka (topic, partition, offset), without an entity id it is keyed by its
    record id, and without a timestamp the Kafka record's timestamp is its event time.
    `coerce: true` lets the record codec convert losslessly where a value's JSON type differs from
    the field's (numeric strings, integral floats into int fields, epoch or ISO times without a zone
    as UTC, "" as missing in a nullable field); `driftloop produce --from` always does.
    """

    label: LabelSpec
    features: tuple[Feature, ...] = field(metadata={"keyed_by": "name"})
    record_id: str | None = "record_id"
    entity_id: str | None = None
    timestamp: str | None = None
    unknown_fields: Literal["reject", "ignore"] = "reject"
    coerce: bool = False

    def feature(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(name)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every field of a record, in a stable order."""
        ids = tuple(c for c in (self.record_id, self.entity_id, self.timestamp) if c is not None)
        return (*ids, *self.feature_names, self.label.name)

    @property
    def event_time(self) -> str:
        """The dataset column that holds each record's event time."""
        return self.timestamp or KAFKA_TIME

    def problems(self) -> Iterator[Problem]:
        if not self.features:
            yield "features", "at least one feature", {}
        for key in ("record_id", "entity_id", "timestamp"):
            value = getattr(self, key)
            if value is not None and not _COLUMN.match(value):
                yield key, _COLUMN_EXPECTED + " (or null)", value
        for name in self.columns:
            if name in RESERVED_COLUMNS:
                yield "features", f"no column named {name!r} (reserved for Kafka metadata)", name
        if "request_id" in self.feature_names:
            yield "features", "no feature named 'request_id' (a prediction request's own field)", "request_id"
        seen: dict[str, str] = {}
        for name in self.columns:
            if name in seen:
                yield "features", f"distinct names for every column ({name!r} is used twice)", name
            seen[name] = name
        keys = [field_key(n) for n in self.columns]
        if len(set(keys)) != len(keys):  # e.g. "c_a_<hash>" written as a name of its own
            yield "features", "column names that do not collide with another's internal name", list(self.columns)


@dataclass(frozen=True)
class GeneratorSettings:
    """The synthetic stream: which features drift, and how far."""

    drift_features: tuple[str, ...] = ()
    magnitude: float = 1.5
    label_noise: float = 0.05
    prior_positive_rate: float = 0.8
    entities: int = 1000

    def problems(self) -> Iterator[Problem]:
        if not 0 < self.magnitude <= 10:
            yield "magnitude", "a number in (0, 10]", self.magnitude
        if not 0 <= self.label_noise < 0.5:
            yield "label_noise", "a number in [0, 0.5)", self.label_noise
        if not 0 < self.prior_positive_rate < 1:
            yield "prior_positive_rate", "a number in (0, 1)", self.prior_positive_rate
        if self.entities < 1:
            yield "entities", "an integer >= 1", self.entities


@dataclass(frozen=True)
class DatasetSettings:
    """Where versioned datasets live and how ingestion reads Kafka."""

    root: str = "runs/datasets"
    max_records_per_task: int = 250_000
    read_timeout_s: float = 30.0

    def problems(self) -> Iterator[Problem]:
        if not self.root.strip():
            yield "root", "a local path or a filesystem URI", self.root
        if self.max_records_per_task < 1:
            yield "max_records_per_task", "an integer >= 1", self.max_records_per_task
        if self.read_timeout_s <= 0:
            yield "read_timeout_s", "a number > 0", self.read_timeout_s


STATELESS_STEPS = ("clip", "log1p")
STATEFUL_STEPS = ("standardize", "minmax", "bucketize", "one_hot", "hash")


@dataclass(frozen=True)
class Step:
    """One transform step: `standardize`, or `{clip: {min: 0, max: 72}}` in YAML."""

    op: Literal["clip", "log1p", "standardize", "minmax", "bucketize", "one_hot", "hash", "drop"]
    min: float | None = None
    max: float | None = None
    boundaries: tuple[float, ...] = ()
    quantiles: int | None = None
    buckets: int | None = None
    max_categories: int | None = None

    @staticmethod
    def normalize(value: Any) -> Any:
        if isinstance(value, str):
            return {"op": value}
        if isinstance(value, dict) and len(value) == 1 and "op" not in value:
            ((op, params),) = value.items()
            return {"op": op, **(params or {})} if isinstance(params, dict) or params is None else value
        return value

    def problems(self) -> Iterator[Problem]:
        allowed = {
            "clip": {"min", "max"},
            "bucketize": {"boundaries", "quantiles"},
            "hash": {"buckets"},
            "one_hot": {"max_categories"},
        }.get(self.op, set())
        for name in ("min", "max", "quantiles", "buckets", "max_categories"):
            if getattr(self, name) is not None and name not in allowed:
                yield name, f"no {name} on a {self.op} step", getattr(self, name)
        if self.boundaries and "boundaries" not in allowed:
            yield "boundaries", f"no boundaries on a {self.op} step", list(self.boundaries)
        if self.op == "clip" and self.min is None and self.max is None:
            yield "clip", "min, max or both", None
        if self.op == "bucketize":
            if bool(self.boundaries) == (self.quantiles is not None):
                yield "bucketize", "either boundaries or quantiles", None
            if list(self.boundaries) != sorted(set(self.boundaries)):
                yield "boundaries", "increasing numbers", list(self.boundaries)
            if self.quantiles is not None and not 2 <= self.quantiles <= 100:
                yield "quantiles", "an integer between 2 and 100", self.quantiles
        if self.op == "hash" and (self.buckets is None or not 2 <= self.buckets <= 4096):
            yield "buckets", "an integer between 2 and 4096", self.buckets
        if self.max_categories is not None and self.max_categories < 1:
            yield "max_categories", "an integer >= 1", self.max_categories


@dataclass(frozen=True)
class Derived:
    """A feature computed from two numeric ones before any transform."""

    name: str
    op: Literal["ratio", "product", "difference", "sum"]
    inputs: tuple[str, ...]

    def problems(self) -> Iterator[Problem]:
        if not _COLUMN.match(self.name):
            yield "name", _COLUMN_EXPECTED, self.name
        if len(self.inputs) != 2:
            yield "inputs", "two feature names", list(self.inputs)


@dataclass(frozen=True)
class FeatureTransform:
    """The steps applied to one input (a schema feature or a derived one)."""

    name: str
    steps: tuple[Step, ...] = ()

    @staticmethod
    def normalize(value: Any) -> Any:
        # `name: [steps]` in the file: errors name `...name[i]`, as the file reads
        return {"steps": value, INLINE: "steps"} if isinstance(value, list) else value


@dataclass(frozen=True)
class FeatureSettings:
    """Feature engineering, declared once and used identically in training and serving.

    Inputs not named in `transforms` get a default: numbers are standardized, categories
    one-hot encoded, booleans become 0/1.
    """

    transforms: tuple[FeatureTransform, ...] = field(default=(), metadata={"keyed_by": "name"})
    derived: tuple[Derived, ...] = field(default=(), metadata={"keyed_by": "name"})

    def problems(self) -> Iterator[Problem]:
        for transform in self.transforms:
            ops = [s.op for s in transform.steps]
            stateful = [i for i, op in enumerate(ops) if op in STATEFUL_STEPS]
            if stateful and stateful != [len(ops) - 1]:
                yield f"transforms.{transform.name}", "at most one fitted step, and it last", ops
            if "drop" in ops and ops != ["drop"]:
                yield f"transforms.{transform.name}", "drop alone", ops


FAMILIES = ("mlp", "logreg", "xgboost", "random_forest")
Family = Literal["mlp", "logreg", "xgboost", "random_forest"]
TREE_FAMILIES = ("xgboost", "random_forest")

# The knobs each family reads (its search space may use only these).
FAMILY_KNOBS: dict[str, tuple[str, ...]] = {
    "mlp": ("learning_rate", "weight_decay", "dropout", "batch_size", "hidden"),
    "logreg": ("learning_rate", "weight_decay", "batch_size"),
    "xgboost": ("eta", "rounds", "max_depth", "min_child_weight", "subsample", "colsample", "reg_lambda"),
    "random_forest": ("trees", "max_depth", "min_child_weight", "subsample", "colsample", "reg_lambda"),
}


@dataclass(frozen=True)
class ModelSettings:
    """The model and how one training run trains it.

    `kind` is the model family. The neural families (mlp, logreg) train for `epochs` with
    `learning_rate`, `batch_size`, ...; the tree families use `eta`, `rounds`, `max_depth`, ...
    (XGBoost: `xgboost` boosts `rounds` trees, `random_forest` grows `trees` in one round).
    A search reports every family's holdout loss `epochs` times: after each epoch, or after
    each 1/epochs of the boosting rounds.
    """

    kind: Family = "mlp"
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    epochs: int = 8
    batch_size: int = 256
    learning_rate: float = 0.003
    weight_decay: float = 0.0
    eta: float = 0.1
    rounds: int = 200
    trees: int = 100
    max_depth: int = 6
    min_child_weight: float = 1.0
    subsample: float = 0.8
    colsample: float = 0.8
    reg_lambda: float = 1.0
    class_weight: Literal["none", "balanced"] = "none"
    holdout_fraction: float = 0.2
    bf16: bool = False
    seed: int = 0

    def problems(self) -> Iterator[Problem]:
        if any(h < 1 for h in self.hidden):
            yield "hidden", "layer widths >= 1", list(self.hidden)
        if not 0 <= self.dropout < 1:
            yield "dropout", "a number in [0, 1)", self.dropout
        for name in ("epochs", "batch_size", "rounds", "trees"):
            if getattr(self, name) < 1:
                yield name, "an integer >= 1", getattr(self, name)
        if not 1 <= self.max_depth <= 32:
            yield "max_depth", "an integer in [1, 32]", self.max_depth
        if not 0 < self.learning_rate < 10:
            yield "learning_rate", "a number in (0, 10)", self.learning_rate
        if not 0 < self.eta <= 1:
            yield "eta", "a number in (0, 1]", self.eta
        for name in ("subsample", "colsample"):
            if not 0 < getattr(self, name) <= 1:
                yield name, "a number in (0, 1]", getattr(self, name)
        for name in ("weight_decay", "min_child_weight", "reg_lambda"):
            if getattr(self, name) < 0:
                yield name, "a number >= 0", getattr(self, name)
        if not 0 < self.holdout_fraction < 0.9:
            yield "holdout_fraction", "a number in (0, 0.9)", self.holdout_fraction


@dataclass(frozen=True)
class TrainingSettings:
    """Ray Train's scaling and fault tolerance for one training run (when it pays: `ray.distributed_min_rows`)."""

    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2

    def problems(self) -> Iterator[Problem]:
        if self.workers < 1:
            yield "workers", "an integer >= 1", self.workers
        if self.cpus_per_worker <= 0:
            yield "cpus_per_worker", "a number > 0", self.cpus_per_worker
        if self.max_failures < 0:
            yield "max_failures", "an integer >= 0", self.max_failures


SEARCHABLE = (*dict.fromkeys(k for knobs in FAMILY_KNOBS.values() for k in knobs), "kind")
INTEGER_KNOBS = ("batch_size", "rounds", "trees", "max_depth")


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a range (`low`..`high`, `log`) or `choices`."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[str | int | float, ...] = ()

    def problems(self) -> Iterator[Problem]:
        if self.name not in SEARCHABLE:
            yield "name", f"one of {list(SEARCHABLE)}", self.name
        if self.choices:
            if self.low is not None or self.high is not None:
                yield "choices", "either choices or low/high", list(self.choices)
            if self.name == "hidden":
                for choice in self.choices:
                    if not isinstance(choice, str) or not all(p.strip().isdigit() for p in choice.split(",")):
                        yield "choices", "layer widths as strings like '64,32'", choice
        elif self.low is None or self.high is None or self.low >= self.high:
            yield "high", "low < high, or a list of choices", self.high
        elif self.log and self.low <= 0:
            yield "low", "a number > 0 for a log scale", self.low
        elif self.name in ("batch_size", "hidden", "kind"):
            yield "choices", f"choices for {self.name}", None
        if self.name == "kind" and any(c not in FAMILIES for c in self.choices):
            yield "choices", f"families among {list(FAMILIES)} (or search.families)", list(self.choices)


@dataclass(frozen=True)
class SearchSettings:
    """Hyperparameter search: Optuna's TPE through Ray Tune, ASHA early stopping."""

    trials: int = 8
    max_concurrent: int = 2
    metric: Literal["val_loss", "val_accuracy"] = "val_loss"
    grace_period: int = 1
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    families: tuple[Family, ...] = ()  # model selection: the families searched together (default: model.kind)
    space: tuple[Param, ...] = field(default=(), metadata={"keyed_by": "name"})

    @property
    def mode(self) -> str:
        return "min" if self.metric == "val_loss" else "max"

    def searched(self, kind: Family) -> tuple[Family, ...]:
        """The families a search tries: `families`, else `model.kind` (or the `kind` choices)."""
        if self.families:
            return self.families
        kinds = next((p.choices for p in self.space if p.name == "kind"), ())
        return cast("tuple[Family, ...]", tuple(str(k) for k in kinds)) or (kind,)

    def space_of(self, family: str) -> tuple[Param, ...]:
        """The dimensions of `family`'s conditional space: the params it has a knob for."""
        return tuple(p for p in self.space if p.name in FAMILY_KNOBS[family])

    def problems(self) -> Iterator[Problem]:
        if self.trials < 1:
            yield "trials", "an integer >= 1", self.trials
        if self.max_concurrent < 1:
            yield "max_concurrent", "an integer >= 1", self.max_concurrent
        if self.grace_period < 1:
            yield "grace_period", "an integer >= 1", self.grace_period
        if self.reduction_factor < 2:
            yield "reduction_factor", "an integer >= 2", self.reduction_factor
        if self.cpus_per_trial <= 0:
            yield "cpus_per_trial", "a number > 0", self.cpus_per_trial
        if not self.space:
            yield "space", "at least one parameter to search", {}
        if len(set(self.families)) != len(self.families):
            yield "families", "each family once", list(self.families)
        if self.families and any(p.name == "kind" for p in self.space):
            yield "space.kind", "no kind in the space when search.families lists the families", "kind"
        if self.families:
            for param in self.space:
                if param.name != "kind" and not any(param.name in FAMILY_KNOBS[f] for f in self.families):
                    owners = [f for f, knobs in FAMILY_KNOBS.items() if param.name in knobs]
                    yield f"space.{param.name}", f"a knob of a searched family (it is one of {owners})", param.name


GATE_METRICS = ("accuracy", "f1", "f1_macro", "precision_macro", "recall_macro", "roc_auc", "log_loss")


@dataclass(frozen=True)
class GateSettings:
    """When a challenger may replace the champion (see jobs.gate)."""

    primary_metric: Literal["accuracy", "f1", "f1_macro", "precision_macro", "recall_macro", "roc_auc", "log_loss"] = (
        "f1_macro"
    )
    min_improvement: float = 0.005
    no_regression: tuple[str, ...] = ("accuracy", "log_loss")
    tolerance: float = 0.01
    baseline_margin: float = 0.02

    def problems(self) -> Iterator[Problem]:
        for metric in self.no_regression:
            if metric not in GATE_METRICS:
                yield "no_regression", f"metric names ({', '.join(GATE_METRICS)})", metric
        for name in ("min_improvement", "tolerance", "baseline_margin"):
            if getattr(self, name) < 0:
                yield name, "a number >= 0", getattr(self, name)


@dataclass(frozen=True)
class MonitorSettings:
    """Drift monitoring (see jobs.monitor): windows, statistics' thresholds, the label join."""

    window_size: int = 2000  # predictions per drift window
    window_seconds: float | None = None  # set: windows by event time instead of by count
    alpha: float = 0.01  # significance after the multiple-testing correction
    psi_threshold: float = 0.05  # the effect floor: see streams.drift.compare
    correction: Literal["bh", "bonferroni"] = "bh"
    reference_sample: int = 5000  # training values per numeric feature kept in the model's reference
    performance_window: int = 1000  # labelled predictions per accuracy/F1 window
    performance_tolerance: float = 0.05  # accuracy this far below the champion's validation report is drift
    # ...and only if the drop is more than the window's own noise: the upper end of a one-sided interval at
    # this confidence (a bootstrap over the window's pairs) is below the report's value
    performance_confidence: float = 0.99
    label_ttl_s: float = 3600.0  # a prediction waits this long for its label, then is forgotten
    max_pending: int = 200_000  # predictions (and early labels) waiting to be joined, at most
    actors: int = 1  # monitor actors in the consumer group

    def problems(self) -> Iterator[Problem]:
        for name in ("window_size", "reference_sample", "performance_window", "max_pending", "actors"):
            if getattr(self, name) < 1:
                yield name, "an integer >= 1", getattr(self, name)
        if not 0 < self.alpha < 1:
            yield "alpha", "a number in (0, 1)", self.alpha
        if self.window_seconds is not None and not self.window_seconds > 0:
            yield "window_seconds", "a number > 0 or null", self.window_seconds
        for name in ("psi_threshold", "performance_tolerance", "label_ttl_s"):
            if not getattr(self, name) > 0:
                yield name, "a number > 0", getattr(self, name)
        if not 0.5 <= self.performance_confidence < 1:
            yield "performance_confidence", "a number in [0.5, 1) (0.5: no allowance)", self.performance_confidence


@dataclass(frozen=True)
class RollbackSettings:
    """A newly promoted champion on probation: rolled back by itself when live traffic says so.

    For its first `probation_windows` performance windows, each is also compared with the
    previous champion's validation report: `consecutive` windows in a row below it by more than
    `monitor.performance_tolerance` (and more than the window's noise, as performance drift is
    judged) make the monitor point `champion` back at the previous version and publish
    `ModelRolledBack` with the evidence. While the new champion is losing, its windows do not
    count towards a retrain. A version rolled back to is not on probation.
    """

    enabled: bool = True
    probation_windows: int = 4
    consecutive: int = 2

    def problems(self) -> Iterator[Problem]:
        if self.consecutive < 1:
            yield "consecutive", "an integer >= 1", self.consecutive
        if self.probation_windows < self.consecutive:
            yield "probation_windows", f"an integer >= consecutive ({self.consecutive})", self.probation_windows


DELIVERY_STEPS = ("shadow", "canary")


@dataclass(frozen=True)
class DeliverySettings:
    """How a model that passed the gate becomes the champion: at once (no `steps`), or after
    proving itself live, step by step (see `jobs.delivery`).

    - `shadow`: it scores every request beside the champion, its answers logged, never returned;
    - `canary`: it answers `canary_fraction` of the requests.

    A step ends when the candidate has `min_labeled` predictions joined to their delayed labels:
    it goes on if its live accuracy is at least the champion's on the same traffic, less
    `tolerance`; it is rejected (`ModelRejected`, with the live evidence) when it is worse by more
    than that and the noise; and it is rejected when there is no verdict after `max_step_s`.
    """

    steps: tuple[Literal["shadow", "canary"], ...] = ()
    canary_fraction: float = 0.1
    min_labeled: int = 200
    tolerance: float = 0.02
    max_step_s: float = 900.0

    def problems(self) -> Iterator[Problem]:
        if len(set(self.steps)) < len(self.steps) or list(self.steps) != sorted(self.steps, key=DELIVERY_STEPS.index):
            yield "steps", "each of shadow, canary at most once, in that order", list(self.steps)
        if not 0 < self.canary_fraction < 1:
            yield "canary_fraction", "a number in (0, 1)", self.canary_fraction
        if self.min_labeled < 1:
            yield "min_labeled", "an integer >= 1", self.min_labeled
        if not 0 <= self.tolerance < 1:
            yield "tolerance", "a number in [0, 1)", self.tolerance
        if self.max_step_s <= 0:
            yield "max_step_s", "a number > 0", self.max_step_s


@dataclass(frozen=True)
class RetrainSettings:
    """When drift turns into a retraining job (see jobs.policy), and what it trains on."""

    min_window: int = 500  # windows smaller than this never trigger
    consecutive: int = 2  # drifted windows in a row before a retrain
    cooldown_s: float = 300.0  # after a retrain request, none for this long
    max_per_hour: int = 4
    train_rows: int = 6000  # the newest rows the retraining job trains on
    job_timeout_s: float = 900.0
    # Which drift kinds count towards a retrain, each with its own streak of `consecutive`
    # windows; `any`: one kind's streak retrains, `all`: every listed kind's streak at once.
    triggers: tuple[DriftKind, ...] = ("data", "prediction", "performance")
    combine: Literal["any", "all"] = "any"

    def problems(self) -> Iterator[Problem]:
        for name in ("min_window", "consecutive", "max_per_hour", "train_rows"):
            if getattr(self, name) < 1:
                yield name, "an integer >= 1", getattr(self, name)
        if not self.triggers or len(set(self.triggers)) != len(self.triggers):
            yield "triggers", "a non-empty list of distinct drift kinds", list(self.triggers)
        for name in ("cooldown_s", "job_timeout_s"):
            if not getattr(self, name) >= 0:
                yield name, "a number >= 0", getattr(self, name)


@dataclass(frozen=True)
class ServingSettings:
    """The Serve deployment: where it listens and how much it takes on before answering 503."""

    host: str = "127.0.0.1"
    port: int = 8000
    num_replicas: int = 1
    max_replicas: int | None = None  # set: autoscale between num_replicas and this
    target_ongoing_requests: float = 8.0
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    max_body_bytes: int = 4 * 1024 * 1024
    max_records_per_request: int = 10_000
    policy: Literal["none", "shadow", "canary"] = "none"
    canary_fraction: float = 0.1
    batch_max_size: int = 32  # single requests scored together (@serve.batch)
    batch_wait_ms: float = 1.0
    log_capacity: int = 100_000  # predictions buffered for the predictions topic before dropping
    log_timeout_s: float = 30.0  # a prediction not delivered within this is dropped (and counted)
    access_log: bool = False  # Serve's line per request; the predictions topic already has each one
    max_surge_percent: int = 100  # a redeploy starts new replicas before it stops old ones (0: stop first)

    def problems(self) -> Iterator[Problem]:
        for name in ("batch_max_size", "log_capacity"):
            if getattr(self, name) < 1:
                yield name, "an integer >= 1", getattr(self, name)
        for name in ("batch_wait_ms", "log_timeout_s"):
            if not getattr(self, name) >= 0:
                yield name, "a number >= 0", getattr(self, name)
        if not 0 <= self.canary_fraction <= 1:
            yield "canary_fraction", "a number in [0, 1]", self.canary_fraction
        if not 1 <= self.port <= 65535:
            yield "port", "a port number (1-65535)", self.port
        for name in ("num_replicas", "max_ongoing_requests", "max_queued_requests", "max_records_per_request"):
            if getattr(self, name) < 1:
                yield name, "an integer >= 1", getattr(self, name)
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            yield "max_replicas", f"an integer >= num_replicas ({self.num_replicas})", self.max_replicas
        if self.max_body_bytes < 1024:
            yield "max_body_bytes", "an integer >= 1024", self.max_body_bytes
        if not 0 <= self.max_surge_percent <= 100:
            yield "max_surge_percent", "an integer in [0, 100]", self.max_surge_percent


@dataclass(frozen=True)
class TrackerSettings:
    """Optional trackers beside MLflow, fed by Ray Tune's logger callbacks.

    API keys come from the environment only (`WANDB_API_KEY`, `COMET_API_KEY`).
    """

    wandb: bool = False
    comet: bool = False
    project: str | None = None
    offline: bool = False


@dataclass(frozen=True)
class RaySettings:
    """Where Ray is (None starts or joins a local instance), and when its workers pay.

    `distributed_min_rows`: a job reads, ingests, tunes and trains work of fewer rows in its own
    process (pyarrow, Optuna, plain torch: the same code, transform, search space and loop),
    because starting Ray tasks, Ray Tune's trial actors and a DDP worker group costs tens of
    seconds, far more than such work takes. At or above it (and training always with
    `training.use_gpu`), Ray tasks, Ray Data, Ray Tune and Ray Train do it. 0: always Ray.
    """

    address: str | None = None
    distributed_min_rows: int = 100_000

    def problems(self) -> Iterator[Problem]:
        if self.distributed_min_rows < 0:
            yield "distributed_min_rows", "an integer >= 0 (0: always on Ray's workers)", self.distributed_min_rows

    def distributed(self, rows: int) -> bool:
        """Whether work of `rows` rows goes to Ray's workers."""
        return rows >= self.distributed_min_rows


@dataclass(frozen=True)
class MlflowSettings:
    """Where MLflow is: None means a SQLite store under the run directory."""

    tracking_uri: str | None = None


_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True)
class TopicSettings:
    """Topic names: each defaults to `<pipeline>.<kind>`; name one to attach to a topic that exists.

    `labels_format: record` reads labels as users have them, plain records of the record id and
    the label (`{"<schema.record_id>": "r-1", "<label>": "yes"}`; `request_id` when the schema has
    no record id), beside the `LabelObserved` events that are always understood.
    """

    records: str | None = None
    predictions: str | None = None
    labels: str | None = None
    drift: str | None = None
    retrain: str | None = None
    models: str | None = None
    dlq: str | None = None
    heartbeats: str | None = None
    state: str | None = None
    labels_format: Literal["event", "record"] = "event"

    def named(self) -> dict[str, str]:
        """The topics this config names (kind -> name)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "labels_format" and v is not None}

    def problems(self) -> Iterator[Problem]:
        for kind, name in self.named().items():
            if not _TOPIC.match(name) or name in (".", ".."):
                yield kind, "a Kafka topic name (1-249 letters, digits, '.', '_', '-')", name
        names = list(self.named().values())
        if len(set(names)) != len(names):
            yield "topics", "a different topic for each kind", names


@dataclass(frozen=True)
class PipelineConfig:
    """One pipeline, as read from `configs/<name>.yaml`."""

    name: str
    schema: RecordSchema
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    generator: GeneratorSettings = GeneratorSettings()
    features: FeatureSettings = FeatureSettings()
    datasets: DatasetSettings = DatasetSettings()
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    gate: GateSettings = GateSettings()
    trackers: TrackerSettings = TrackerSettings()
    serving: ServingSettings = ServingSettings()
    monitor: MonitorSettings = MonitorSettings()
    retrain: RetrainSettings = RetrainSettings()
    rollback: RollbackSettings = RollbackSettings()
    delivery: DeliverySettings = DeliverySettings()
    search: SearchSettings = SearchSettings(space=(Param(name="learning_rate", low=0.0005, high=0.02, log=True),))
    ray: RaySettings = RaySettings()
    mlflow: MlflowSettings = MlflowSettings()
    source: str = field(default="<memory>", metadata=_NOT_FROM_YAML, compare=False)

    def connected_to(self, bootstrap: str | None = None, tracking_uri: str | None = None) -> PipelineConfig:
        """This config with this broker and/or this MLflow (what is None stays as it is)."""
        config = self
        if bootstrap is not None:
            config = dataclasses.replace(config, kafka=dataclasses.replace(config.kafka, bootstrap_servers=bootstrap))
        if tracking_uri is not None:
            config = dataclasses.replace(config, mlflow=dataclasses.replace(config.mlflow, tracking_uri=tracking_uri))
        return config

    def problems(self) -> Iterator[Problem]:
        if not _NAME.match(self.name):
            yield "name", "1-100 letters, digits, '_' or '-' (it prefixes topic names)", self.name
        for name in self.generator.drift_features:
            if name not in self.schema.feature_names:
                yield "generator.drift_features", f"names of features ({', '.join(self.schema.feature_names)})", name
        kinds = {f.name: f.type for f in self.schema.features}
        for derived in self.features.derived:
            if derived.name in kinds:
                yield f"features.derived.{derived.name}", "a name that is not a schema column", derived.name
            for name in derived.inputs:
                if kinds.get(name) not in ("int", "float"):
                    yield f"features.derived.{derived.name}.inputs", "names of numeric features", name
            kinds[derived.name] = "float"
        for transform in self.features.transforms:
            kind = kinds.get(transform.name)
            if kind is None:
                yield (
                    f"features.transforms.{transform.name}",
                    f"a feature or derived name ({', '.join(kinds)})",
                    transform.name,
                )
            for step in transform.steps:
                numeric_only = step.op in ("clip", "log1p", "standardize", "minmax", "bucketize")
                if numeric_only and kind not in ("int", "float"):
                    yield f"features.transforms.{transform.name}", f"no {step.op} on a {kind} feature", step.op
                if step.op in ("one_hot", "hash") and kind != "category":
                    yield f"features.transforms.{transform.name}", f"no {step.op} on a {kind} feature", step.op


# --- loading -------------------------------------------------------------------------------


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Read and validate a pipeline config file, then apply environment overrides."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "<file>", "an existing YAML file", "<no such file>") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(source, "<file>", "a readable UTF-8 YAML file", f"<{err}>") from None
    return parse_config(text, source=source, env=env)


def parse_config(text: str, source: str = "<memory>", env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Validate a pipeline config given as YAML text (see `load_config`)."""
    import os

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"<line {mark.line + 1}, column {mark.column + 1}>" if mark else "<YAML>"
        raise ConfigError(source, where, "valid YAML", f"<{getattr(err, 'problem', err)}>") from None
    config = _build(PipelineConfig, data, "", source)
    config = dataclasses.replace(config, source=source)
    return apply_env(config, os.environ if env is None else env)


def apply_env(config: PipelineConfig, env: Mapping[str, str]) -> PipelineConfig:
    """Connection settings and secrets from the environment win over the file."""
    kafka = config.kafka
    if env.get("KAFKA_BOOTSTRAP_SERVERS"):
        kafka = dataclasses.replace(kafka, bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    if env.get("KAFKA_SECURITY_PROTOCOL"):
        protocol = env["KAFKA_SECURITY_PROTOCOL"]
        allowed = typing.get_args(typing.get_type_hints(KafkaSettings)["security_protocol"])
        if protocol not in allowed:
            raise ConfigError(
                "$KAFKA_SECURITY_PROTOCOL", "kafka.security_protocol", f"one of {list(allowed)}", protocol
            )
        kafka = dataclasses.replace(kafka, security_protocol=protocol)  # type: ignore[arg-type]
    kafka = dataclasses.replace(
        kafka,
        sasl_username=env.get("KAFKA_SASL_USERNAME") or None,
        sasl_password=env.get("KAFKA_SASL_PASSWORD") or None,
    )
    ray = config.ray
    if env.get("RAY_ADDRESS"):
        ray = dataclasses.replace(ray, address=env["RAY_ADDRESS"])
    mlflow = config.mlflow
    if env.get("MLFLOW_TRACKING_URI"):
        mlflow = dataclasses.replace(mlflow, tracking_uri=env["MLFLOW_TRACKING_URI"])
    datasets = config.datasets
    if env.get(DATASETS_ROOT_ENV):
        datasets = dataclasses.replace(datasets, root=env[DATASETS_ROOT_ENV])
    return dataclasses.replace(config, kafka=kafka, ray=ray, mlflow=mlflow, datasets=datasets)


def dump_config(config: PipelineConfig) -> str:
    """The config as YAML that `parse_config` reads back to an equal config (secrets left out)."""
    return yaml.safe_dump(_data(config), sort_keys=False)


def _data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if not f.metadata.get("yaml", True):
                continue
            item = getattr(value, f.name)
            keyed_by = f.metadata.get("keyed_by")
            if keyed_by:
                out[f.name] = {getattr(i, keyed_by): {k: v for k, v in _data(i).items() if k != keyed_by} for i in item}
            else:
                out[f.name] = _data(item)
        return out
    if isinstance(value, tuple):
        return [_data(v) for v in value]
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _build(tp: Any, value: Any, key: str, source: str) -> Any:
    """Turn parsed YAML into an instance of `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key, source)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        last: ConfigError | None = None
        for option in options:
            if option is type(None):
                continue
            try:
                return _build(option, value, key, source)
            except ConfigError as err:
                last = err
        if len(options) == 2 and type(None) in options and last is not None:
            raise last
        raise ConfigError(source, key, " or ".join(_describe(o) for o in options), value)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(source, key, f"one of {list(allowed)}", value)
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(source, key, "a list", value)
        return tuple(_build(item_type, item, f"{key}[{i}]", source) for i, item in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, "true or false", value)
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(source, key, "an integer", value)
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(source, key, "a finite number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, "a string", value)
        return value
    raise TypeError(f"config type {tp!r} is not supported")  # a bug in the dataclasses above


def _build_dataclass(tp: Any, value: Any, key: str, source: str) -> Any:
    if value is None:
        value = {}
    normalize = getattr(tp, "normalize", None)
    if normalize is not None:
        value = normalize(value)
    if not isinstance(value, dict):
        raise ConfigError(source, key or "<top level>", f"a mapping for {tp.__name__}", value)
    inline = value.pop(INLINE, None)
    hints = typing.get_type_hints(tp)
    fields = [f for f in dataclasses.fields(tp) if f.metadata.get("yaml", True)]
    known = {f.name for f in fields}
    for name in value:
        if name not in known:
            hint = " (secrets come from the environment)" if name in ("sasl_username", "sasl_password") else ""
            raise ConfigError(source, _join(key, str(name)), f"one of {sorted(known)}{hint}", "<unknown key>")
    kwargs: dict[str, Any] = {}
    for f in fields:
        sub = key if f.name == inline else _join(key, f.name)
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, sub, _describe(hints[f.name]), "<missing>")
            continue
        keyed_by = f.metadata.get("keyed_by")
        if keyed_by:
            kwargs[f.name] = _build_keyed(hints[f.name], value[f.name], keyed_by, sub, source)
        else:
            kwargs[f.name] = _build(hints[f.name], value[f.name], sub, source)
    instance = tp(**kwargs)
    for problem_key, expected, found in instance.problems() if hasattr(instance, "problems") else ():
        raise ConfigError(source, _join(key, problem_key), expected, found)
    return instance


def _build_keyed(tp: Any, value: Any, keyed_by: str, key: str, source: str) -> tuple[Any, ...]:
    """A YAML mapping `name: {spec}` read as a tuple of dataclasses whose `keyed_by` is the name."""
    (item_type, _) = typing.get_args(tp)
    if not isinstance(value, dict):
        raise ConfigError(source, key, "a mapping of name to spec", value)
    items = []
    for name, spec in value.items():
        sub = _join(key, str(name))
        normalize = getattr(item_type, "normalize", None)
        if normalize is not None:
            spec = normalize(spec)
        if spec is not None and not isinstance(spec, dict):
            raise ConfigError(source, sub, f"a mapping for {item_type.__name__}", spec)
        items.append(_build(item_type, {keyed_by: name, **(spec or {})}, sub, source))
    return tuple(items)


def _describe(tp: Any) -> str:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping for {tp.__name__}"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(o) for o in typing.get_args(tp) if o is not type(None))
    if origin is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
