"""Pipeline configuration: one YAML file per pipeline, loaded into frozen dataclasses.

The dataclasses' types carry their constraints (`PositiveInt`, `Literal`s, patterns) and pydantic
decodes and validates the file against them (a `TypeAdapter` over these stdlib dataclasses, strict:
no "1" for 1, no `true` for 1, finite floats, no unknown keys); checks that relate several fields
are each class's `problems()`. Pydantic rather than msgspec (which decodes our records) because it
reports every error of a file at once, where msgspec stops at the first. Each error names the file,
its line and column (from the YAML node tree), the key, what was expected and what was found.
Connection settings can be overridden from the environment (`KAFKA_BOOTSTRAP_SERVERS`,
`RAY_ADDRESS`, `MLFLOW_TRACKING_URI`); secrets (SASL credentials) come *only* from the environment.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import keyword
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, cast

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError, core_schema

from streams.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from pydantic import GetCoreSchemaHandler
    from pydantic_core import CoreSchema

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
    "config_schema",
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
API_KEY_HASH_ENV = "DRIFTLOOP_API_KEY_SHA256"  # what replicas get instead of the key: salt$sha256
RESERVED_COLUMNS = ("topic", "partition", "offset", "timestamp")  # Kafka metadata in every dataset
KAFKA_TIME = "timestamp"  # the Kafka record timestamp: the event time when a schema names none
INLINE = "\x00inline"  # marks the field a shorthand value stands for (see FeatureTransform.normalize)
_NOT_FROM_YAML = {"yaml": False}
Problem = tuple[str, str, object]  # (key relative to the section, expected, found)

# Constrained types: the constraint is checked on load, named in errors and in the JSON Schema.
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
# A column name as users have them: any printable text ("region-centroid-col", "Monthly charges").
Column = Annotated[
    str,
    Field(
        pattern=r"^(?=\S)[^\x00-\x1f\x7f]{1,128}(?<=\S)$",
        description="a column name: 1-128 printable characters, no leading or trailing space",
    ),
]
# A Ray custom resource's name, as `ray start --resources` and `entrypoint_resources` take it.
RESOURCE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.:/-]{0,63}$")
ResourceName = Annotated[
    str,
    Field(pattern=RESOURCE_NAME.pattern, description="a Ray resource name: a letter, then up to 63 of A-Za-z0-9_.:/-"),
]
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
PipelineName = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9_-]{1,100}$", description="1-100 letters, digits, '_' or '-' (it prefixes topic names)"),
]
TopicName = Annotated[
    str,
    Field(
        pattern=r"^(?!\.\.?$)[A-Za-z0-9._-]{1,249}$",
        description="a Kafka topic name (1-249 letters, digits, '.', '_', '-')",
    ),
]

# Value lists: each is written once, as a Literal, and read as a tuple where code needs one.
DriftKind = Literal["data", "prediction", "performance"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
FeatureType = Literal["float", "int", "bool", "category"]
StatelessStep = Literal["clip", "log1p"]
NumericFit = Literal["standardize", "minmax", "bucketize"]  # fitted steps of numeric inputs
CategoryFit = Literal["one_hot", "hash"]  # fitted steps of categories
StepOp = Literal[StatelessStep, NumericFit, CategoryFit, "drop"]
DerivedOp = Literal["ratio", "product", "difference", "sum"]
NeuralFamily = Literal["mlp", "logreg"]
TreeFamily = Literal["xgboost", "random_forest"]
Family = Literal[NeuralFamily, TreeFamily]
Knob = Literal[
    "learning_rate", "weight_decay", "dropout", "batch_size", "hidden",
    "eta", "rounds", "max_depth", "min_child_weight", "subsample", "colsample", "reg_lambda", "trees",
]  # fmt: skip
Searchable = Literal[Knob, "kind"]
SearchMetric = Literal["val_loss", "val_accuracy"]
GateMetric = Literal["accuracy", "f1", "f1_macro", "precision_macro", "recall_macro", "roc_auc", "log_loss"]
ServingPolicy = Literal["none", "shadow", "canary"]

STATELESS_STEPS: tuple[StatelessStep, ...] = typing.get_args(StatelessStep)
STATEFUL_STEPS: tuple[str, ...] = (*typing.get_args(NumericFit), *typing.get_args(CategoryFit))
NUMERIC_STEPS: tuple[str, ...] = (*STATELESS_STEPS, *typing.get_args(NumericFit))  # numeric inputs only
CATEGORY_STEPS: tuple[CategoryFit, ...] = typing.get_args(CategoryFit)  # categories only
FAMILIES: tuple[Family, ...] = typing.get_args(Family)
TREE_FAMILIES: tuple[TreeFamily, ...] = typing.get_args(TreeFamily)
SEARCHABLE: tuple[Searchable, ...] = typing.get_args(Searchable)
SEARCH_METRICS: tuple[SearchMetric, ...] = typing.get_args(SearchMetric)
GATE_METRICS: tuple[GateMetric, ...] = typing.get_args(GateMetric)
SERVING_POLICIES: tuple[ServingPolicy, ...] = typing.get_args(ServingPolicy)


class _Section:
    """Base of the config dataclasses: how pydantic decodes them (a stdlib dataclass stays one).

    Strict (`__pydantic_config__`, below), but a mapping is accepted for the dataclass itself (strict mode alone
    would take only instances); a class's `problems()` (checks relating its fields) run after its
    fields are valid, and come back as one error that `_Reader` splits into one problem each.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = cast("dict[str, Any]", handler(source))
        if schema["type"] != "dataclass":  # pragma: no cover - a pydantic we were not written for
            raise TypeError(f"expected pydantic's dataclass schema for {cls.__name__}, got {schema['type']}")
        schema["strict"] = False
        if not hasattr(cls, "problems"):
            return cast("CoreSchema", schema)
        # The after-validator takes over the reference, as pydantic's own model validators do, so
        # that every use of the class (not only the first) runs it.
        ref = schema.pop("ref", None)
        return core_schema.no_info_after_validator_function(_check_problems, schema, ref=ref)


_Section.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]
    strict=True, extra="forbid", allow_inf_nan=False, regex_engine="python-re"
)


def _check_problems(value: Any) -> Any:
    problems = list(value.problems())
    if problems:
        raise PydanticCustomError("problems", "{count} problems", {"count": len(problems), "problems": problems})
    return value


@dataclass(frozen=True)
class ProducerSettings(_Section):
    """Producer knobs; `buffer_bytes` bounds the payload waiting for acknowledgement."""

    linger_ms: NonNegativeInt = 5
    batch_size: PositiveInt = 65536
    buffer_bytes: PositiveInt = 32 * 1024 * 1024
    max_block_ms: NonNegativeInt = 10_000
    delivery_timeout_ms: PositiveInt = 120_000

    def problems(self) -> Iterator[Problem]:
        if self.delivery_timeout_ms <= self.linger_ms + 30_000:
            yield (
                "delivery_timeout_ms",
                f"more than linger_ms + 30000 ({self.linger_ms + 30_000})",
                self.delivery_timeout_ms,
            )


@dataclass(frozen=True)
class ConsumerSettings(_Section):
    """Consumer loop knobs: batch size, group timing and the handler's retry budget."""

    max_poll_records: PositiveInt = 2000
    poll_timeout_ms: PositiveInt = 500
    session_timeout_ms: PositiveInt = 6000
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    handler_retries: NonNegativeInt = 3
    retry_backoff_ms: NonNegativeInt = 200


@dataclass(frozen=True)
class KafkaSettings(_Section):
    """Where the broker is and how topics are laid out.

    `bootstrap_servers: embedded` means driftloop starts its own Tansu broker.
    """

    bootstrap_servers: Annotated[str, Field(pattern=r"\S", description="host:port[,host:port...] or 'embedded'")] = (
        EMBEDDED
    )
    partitions: PositiveInt = 4
    replication_factor: PositiveInt = 1
    max_record_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    connect_timeout_ms: PositiveInt = 10_000
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    ssl_cafile: str | None = None
    producer: ProducerSettings = ProducerSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    sasl_username: str | None = field(default=None, metadata=_NOT_FROM_YAML, repr=False)
    sasl_password: str | None = field(default=None, metadata=_NOT_FROM_YAML, repr=False)

    @property
    def embedded(self) -> bool:
        return self.bootstrap_servers == EMBEDDED

    def problems(self) -> Iterator[Problem]:
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            yield "sasl_mechanism", f"a mechanism when security_protocol is {self.security_protocol}", None


@dataclass(frozen=True)
class Feature(_Section):
    """One input column: its type, and its range (numbers) or categories."""

    name: Column
    type: FeatureType
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] = ()
    nullable: bool = False

    @property
    def numeric(self) -> bool:
        return self.type in ("float", "int")

    def problems(self) -> Iterator[Problem]:
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
class LabelSpec(_Section):
    """The target column and its classes (strings or integers)."""

    name: Column
    classes: Annotated[tuple[str | int, ...], Field(min_length=2, description="at least two classes")]

    def problems(self) -> Iterator[Problem]:
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
class RecordSchema(_Section):
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
    record_id: Column | None = "record_id"
    entity_id: Column | None = None
    timestamp: Column | None = None
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
class GeneratorSettings(_Section):
    """The synthetic stream: which features drift, and how far."""

    drift_features: tuple[str, ...] = ()
    magnitude: Annotated[float, Field(gt=0, le=10)] = 1.5
    label_noise: Annotated[float, Field(ge=0, lt=0.5)] = 0.05
    prior_positive_rate: Annotated[float, Field(gt=0, lt=1)] = 0.8
    entities: PositiveInt = 1000


@dataclass(frozen=True)
class DatasetSettings(_Section):
    """Where versioned datasets live and how ingestion reads Kafka."""

    root: Annotated[str, Field(pattern=r"\S", description="a local path or a filesystem URI")] = "runs/datasets"
    max_records_per_task: PositiveInt = 250_000
    read_timeout_s: PositiveFloat = 30.0


@dataclass(frozen=True)
class Step(_Section):
    """One transform step: `standardize`, or `{clip: {min: 0, max: 72}}` in YAML."""

    op: StepOp
    min: float | None = None
    max: float | None = None
    boundaries: tuple[float, ...] = ()
    quantiles: Annotated[int, Field(ge=2, le=100)] | None = None
    buckets: Annotated[int, Field(ge=2, le=4096)] | None = None
    max_categories: PositiveInt | None = None

    @staticmethod
    def normalize(value: Any) -> Any:
        if isinstance(value, str):
            return {"op": value}
        if isinstance(value, dict) and len(value) == 1 and "op" not in value:
            ((op, params),) = value.items()
            return {"op": op, **(params or {})} if isinstance(params, dict) or params is None else value
        return value

    @staticmethod
    def shorthands(full: dict[str, Any]) -> list[dict[str, Any]]:
        """What `normalize` reads besides the full form, in JSON Schema (given the full form's)."""
        op = {k: v for k, v in full["properties"]["op"].items() if k != "title"}
        params = {k: v for k, v in full["properties"].items() if k != "op"}
        return [
            op,
            {
                "type": "object", "minProperties": 1, "maxProperties": 1, "propertyNames": op,
                "additionalProperties": {
                    "anyOf": [{"type": "object", "properties": params, "additionalProperties": False}, {"type": "null"}]
                },
            },
        ]  # fmt: skip

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
        if self.op == "hash" and self.buckets is None:
            yield "buckets", "an integer between 2 and 4096", None


@dataclass(frozen=True)
class Derived(_Section):
    """A feature computed from two numeric ones before any transform."""

    name: Column
    op: DerivedOp
    inputs: Annotated[tuple[str, ...], Field(min_length=2, max_length=2, description="two feature names")]


@dataclass(frozen=True)
class FeatureTransform(_Section):
    """The steps applied to one input (a schema feature or a derived one)."""

    name: str
    steps: tuple[Step, ...] = ()

    @staticmethod
    def normalize(value: Any) -> Any:
        # `name: [steps]` in the file: errors name `...name[i]`, as the file reads
        return {"steps": value, INLINE: "steps"} if isinstance(value, list) else value

    @staticmethod
    def shorthands(full: dict[str, Any]) -> list[dict[str, Any]]:
        """What `normalize` reads besides the full form, in JSON Schema: the steps alone."""
        return [{"type": "array", "items": full["properties"]["steps"]["items"]}]


@dataclass(frozen=True)
class FeatureSettings(_Section):
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


# The knobs each family reads (its search space may use only these).
FAMILY_KNOBS: dict[str, tuple[Knob, ...]] = {
    "mlp": ("learning_rate", "weight_decay", "dropout", "batch_size", "hidden"),
    "logreg": ("learning_rate", "weight_decay", "batch_size"),
    "xgboost": ("eta", "rounds", "max_depth", "min_child_weight", "subsample", "colsample", "reg_lambda"),
    "random_forest": ("trees", "max_depth", "min_child_weight", "subsample", "colsample", "reg_lambda"),
}


@dataclass(frozen=True)
class ModelSettings(_Section):
    """The model and how one training run trains it.

    `kind` is the model family. The neural families (mlp, logreg) train for `epochs` with
    `learning_rate`, `batch_size`, ...; the tree families use `eta`, `rounds`, `max_depth`, ...
    (XGBoost: `xgboost` boosts `rounds` trees, `random_forest` grows `trees` in one round).
    A search reports every family's holdout loss `epochs` times: after each epoch, or after
    each 1/epochs of the boosting rounds.
    """

    kind: Family = "mlp"
    hidden: tuple[PositiveInt, ...] = (64, 32)
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    epochs: PositiveInt = 8
    batch_size: PositiveInt = 256
    learning_rate: Annotated[float, Field(gt=0, lt=10)] = 0.003
    weight_decay: NonNegativeFloat = 0.0
    eta: Fraction = 0.1
    rounds: PositiveInt = 200
    trees: PositiveInt = 100
    max_depth: Annotated[int, Field(ge=1, le=32)] = 6
    min_child_weight: NonNegativeFloat = 1.0
    subsample: Fraction = 0.8
    colsample: Fraction = 0.8
    reg_lambda: NonNegativeFloat = 1.0
    class_weight: Literal["none", "balanced"] = "none"
    holdout_fraction: Annotated[float, Field(gt=0, lt=0.9)] = 0.2
    bf16: bool = False
    seed: int = 0


@dataclass(frozen=True)
class TrainingSettings(_Section):
    """Ray Train's scaling and fault tolerance for one training run (when it pays: `ray.distributed_min_rows`)."""

    workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    max_failures: NonNegativeInt = 2


# The knobs that are integers in ModelSettings (a search draws them as integers).
INTEGER_KNOBS: tuple[Knob, ...] = tuple(
    k for k in typing.get_args(Knob) if typing.get_type_hints(ModelSettings)[k] is int
)


@dataclass(frozen=True)
class Param(_Section):
    """One dimension of the search space: a range (`low`..`high`, `log`) or `choices`."""

    name: Searchable
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[str | int | float, ...] = ()

    def problems(self) -> Iterator[Problem]:
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
class SearchSettings(_Section):
    """Hyperparameter search: Optuna's TPE through Ray Tune, ASHA early stopping."""

    trials: PositiveInt = 8
    max_concurrent: PositiveInt = 2
    metric: SearchMetric = "val_loss"
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[int, Field(ge=2)] = 2
    cpus_per_trial: PositiveFloat = 1.0
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


@dataclass(frozen=True)
class GateSettings(_Section):
    """When a challenger may replace the champion (see jobs.gate)."""

    primary_metric: GateMetric = "f1_macro"
    min_improvement: NonNegativeFloat = 0.005
    no_regression: tuple[GateMetric, ...] = ("accuracy", "log_loss")
    tolerance: NonNegativeFloat = 0.01
    baseline_margin: NonNegativeFloat = 0.02


@dataclass(frozen=True)
class MonitorSettings(_Section):
    """Drift monitoring (see jobs.monitor): windows, statistics' thresholds, the label join."""

    window_size: PositiveInt = 2000  # predictions per drift window
    window_seconds: PositiveFloat | None = None  # set: windows by event time instead of by count
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.01  # significance after the multiple-testing correction
    psi_threshold: PositiveFloat = 0.05  # the effect floor: see streams.drift.compare
    correction: Literal["bh", "bonferroni"] = "bh"
    reference_sample: PositiveInt = 5000  # training values per numeric feature kept in the model's reference
    performance_window: PositiveInt = 1000  # labelled predictions per accuracy/F1 window
    performance_tolerance: PositiveFloat = 0.05  # accuracy this far below the champion's validation report is drift
    # ...and only if the drop is more than the window's own noise: the upper end of a one-sided interval at
    # this confidence (a bootstrap over the window's pairs) is below the report's value (0.5: no allowance)
    performance_confidence: Annotated[float, Field(ge=0.5, lt=1)] = 0.99
    label_ttl_s: PositiveFloat = 3600.0  # a prediction waits this long for its label, then is forgotten
    max_pending: PositiveInt = 200_000  # predictions (and early labels) waiting to be joined, at most
    actors: PositiveInt = 1  # monitor actors in the consumer group


@dataclass(frozen=True)
class RollbackSettings(_Section):
    """A newly promoted champion on probation: rolled back by itself when live traffic says so.

    For its first `probation_windows` performance windows, each is also compared with the
    previous champion's validation report: `consecutive` windows in a row below it by more than
    `monitor.performance_tolerance` (and more than the window's noise, as performance drift is
    judged) make the monitor point `champion` back at the previous version and publish
    `ModelRolledBack` with the evidence. While the new champion is losing, its windows do not
    count towards a retrain. A version rolled back to is not on probation.
    """

    enabled: bool = True
    probation_windows: PositiveInt = 4
    consecutive: PositiveInt = 2

    def problems(self) -> Iterator[Problem]:
        if self.probation_windows < self.consecutive:
            yield "probation_windows", f"an integer >= consecutive ({self.consecutive})", self.probation_windows


DeliveryStepName = Literal["shadow", "canary"]
DELIVERY_STEPS: tuple[DeliveryStepName, ...] = typing.get_args(DeliveryStepName)


@dataclass(frozen=True)
class DeliverySettings(_Section):
    """How a model that passed the gate becomes the champion: at once (no `steps`), or after
    proving itself live, step by step (see `jobs.delivery`).

    - `shadow`: it scores every request beside the champion, its answers logged, never returned;
    - `canary`: it answers `canary_fraction` of the requests.

    A step ends when the candidate has `min_labeled` predictions joined to their delayed labels:
    it goes on if its live accuracy is at least the champion's on the same traffic, less
    `tolerance`; it is rejected (`ModelRejected`, with the live evidence) when it is worse by more
    than that and the noise; and it is rejected when there is no verdict after `max_step_s`.
    """

    steps: tuple[DeliveryStepName, ...] = ()
    canary_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    min_labeled: PositiveInt = 200
    tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.02
    max_step_s: PositiveFloat = 900.0

    def problems(self) -> Iterator[Problem]:
        if len(set(self.steps)) < len(self.steps) or list(self.steps) != sorted(self.steps, key=DELIVERY_STEPS.index):
            yield "steps", "each of shadow, canary at most once, in that order", list(self.steps)


@dataclass(frozen=True)
class RetrainSettings(_Section):
    """When drift turns into a retraining job (see jobs.policy), and what it trains on."""

    min_window: PositiveInt = 500  # windows smaller than this never trigger
    consecutive: PositiveInt = 2  # drifted windows in a row before a retrain
    cooldown_s: NonNegativeFloat = 300.0  # after a retrain request, none for this long
    max_per_hour: PositiveInt = 4
    train_rows: PositiveInt = 6000  # the newest rows the retraining job trains on
    job_timeout_s: NonNegativeFloat = 900.0
    # Which drift kinds count towards a retrain, each with its own streak of `consecutive`
    # windows; `any`: one kind's streak retrains, `all`: every listed kind's streak at once.
    triggers: Annotated[tuple[DriftKind, ...], Field(min_length=1)] = ("data", "prediction", "performance")
    combine: Literal["any", "all"] = "any"

    def problems(self) -> Iterator[Problem]:
        if len(set(self.triggers)) != len(self.triggers):
            yield "triggers", "a non-empty list of distinct drift kinds", list(self.triggers)


def _custom_resources(key: str, resources: Mapping[str, float]) -> Iterator[Problem]:
    """A problem for each of Ray's own resources among `resources` (CPUs and GPUs are asked for elsewhere)."""
    for name in resources:
        if name in RAY_BUILTIN_RESOURCES:
            yield f"{key}.{name}", "a custom resource (CPUs and GPUs are not pinned here)", name


@dataclass(frozen=True)
class ServingSettings(_Section):
    """The Serve deployment: where it listens and how much it takes on before answering 503."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    num_replicas: PositiveInt = 1
    max_replicas: PositiveInt | None = None  # set: autoscale between num_replicas and this
    target_ongoing_requests: float = 8.0
    max_ongoing_requests: PositiveInt = 32
    max_queued_requests: PositiveInt = 64
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    max_records_per_request: PositiveInt = 10_000
    policy: ServingPolicy = "none"
    canary_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    batch_max_size: PositiveInt = 32  # single requests scored together (@serve.batch)
    batch_wait_ms: NonNegativeFloat = 1.0
    log_capacity: PositiveInt = 100_000  # predictions buffered for the predictions topic before dropping
    log_timeout_s: NonNegativeFloat = 30.0  # a prediction not delivered within this is dropped (and counted)
    access_log: bool = False  # Serve's line per request; the predictions topic already has each one
    metrics: bool = True  # each replica's driftloop_* series (serving/metrics.py); off: no counting at all
    # a redeploy starts new replicas before it stops old ones (0: stop first)
    max_surge_percent: Annotated[int, Field(ge=0, le=100)] = 100
    num_cpus: NonNegativeFloat = 1.0  # each replica's CPUs (Ray's reservation, not a limit)
    resources: Annotated[
        dict[ResourceName, PositiveFloat],
        Field(description="custom Ray resources each replica needs, e.g. {head_node: 0.01}"),
    ] = field(default_factory=dict)

    def __hash__(self) -> int:  # the config stays hashable with a mapping in it
        values = [getattr(self, f.name) for f in fields(self)]
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in values))

    def problems(self) -> Iterator[Problem]:
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            yield "max_replicas", f"an integer >= num_replicas ({self.num_replicas})", self.max_replicas
        yield from _custom_resources("resources", self.resources)


@dataclass(frozen=True)
class TrackerSettings(_Section):
    """Optional trackers beside MLflow, fed by Ray Tune's logger callbacks.

    API keys come from the environment only (`WANDB_API_KEY`, `COMET_API_KEY`).
    """

    wandb: bool = False
    comet: bool = False
    project: str | None = None
    offline: bool = False


@dataclass(frozen=True)
class RaySettings(_Section):
    """Where Ray is (None starts or joins a local instance), and when its workers pay.

    `distributed_min_rows`: a job reads, ingests, tunes and trains work of fewer rows in its own
    process (pyarrow, Optuna, plain torch: the same code, transform, search space and loop),
    because starting Ray tasks, Ray Tune's trial actors and a DDP worker group costs tens of
    seconds, far more than such work takes. At or above it (and training always with
    `training.use_gpu`), Ray tasks, Ray Data, Ray Tune and Ray Train do it. 0: always Ray.

    On a cluster of many nodes: `job_resources` pins the retrain job's entrypoint to nodes that
    have these custom resources (`ray start --resources '{"worker_node": 1}'`; Ray's
    `entrypoint_resources`); `storage_path` is where Ray Train and Tune keep checkpoints, a URI
    every node reaches (`s3://bucket/ray`): by default each job's own folder, on one node.
    """

    address: str | None = None
    distributed_min_rows: NonNegativeInt = 100_000
    job_resources: Annotated[
        dict[ResourceName, PositiveFloat],
        Field(description="a mapping of Ray resource name to a positive amount, e.g. {worker_node: 1}"),
    ] = field(default_factory=dict)
    storage_path: Annotated[str, Field(pattern=r"\S", description="a path or URI (s3://bucket/ray)")] | None = None
    service_resources: Annotated[
        dict[ResourceName, PositiveFloat],
        Field(description="custom Ray resources the controller and monitor actors need, e.g. {head_node: 0.01}"),
    ] = field(default_factory=dict)

    def __hash__(self) -> int:  # the config stays hashable with mappings in it
        return hash((self.address, self.distributed_min_rows, tuple(sorted(self.job_resources.items())),
                     self.storage_path, tuple(sorted(self.service_resources.items()))))  # fmt: skip

    def distributed(self, rows: int) -> bool:
        """Whether work of `rows` rows goes to Ray's workers."""
        return rows >= self.distributed_min_rows

    def problems(self) -> Iterator[Problem]:
        yield from _custom_resources("job_resources", self.job_resources)
        yield from _custom_resources("service_resources", self.service_resources)

    def train_storage(self, out: Path) -> str:
        """Where Ray Train and Ray Tune keep checkpoints and experiment state for a job writing to `out`.

        `storage_path` when set (a URI every node reaches, `s3://bucket/prefix`, or a shared
        mount), else the job's own folder, which only works while the whole job is on one node.
        """
        return self.storage_path or str((out / "ray").resolve())


@dataclass(frozen=True)
class MlflowSettings(_Section):
    """Where MLflow is: None means a SQLite store under the run directory."""

    tracking_uri: str | None = None


@dataclass(frozen=True)
class TopicSettings(_Section):
    """Topic names: each defaults to `<pipeline>.<kind>`; name one to attach to a topic that exists.

    `labels_format: record` reads labels as users have them, plain records of the record id and
    the label (`{"<schema.record_id>": "r-1", "<label>": "yes"}`; `request_id` when the schema has
    no record id), beside the `LabelObserved` events that are always understood.
    """

    records: TopicName | None = None
    predictions: TopicName | None = None
    labels: TopicName | None = None
    drift: TopicName | None = None
    retrain: TopicName | None = None
    models: TopicName | None = None
    dlq: TopicName | None = None
    heartbeats: TopicName | None = None
    state: TopicName | None = None
    labels_format: Literal["event", "record"] = "event"

    def named(self) -> dict[str, str]:
        """The topics this config names (kind -> name)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "labels_format" and v is not None}

    def problems(self) -> Iterator[Problem]:
        names = list(self.named().values())
        if len(set(names)) != len(names):
            yield "topics", "a different topic for each kind", names


@dataclass(frozen=True)
class PipelineConfig(_Section):
    """One pipeline, as read from `configs/<name>.yaml`."""

    name: PipelineName
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
                if step.op in NUMERIC_STEPS and kind not in ("int", "float"):
                    yield f"features.transforms.{transform.name}", f"no {step.op} on a {kind} feature", step.op
                if step.op in CATEGORY_STEPS and kind != "category":
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
    """Validate a pipeline config given as YAML text (see `load_config`); a ConfigError holds every problem."""
    import os

    node, data = _compose(text, source)
    config = _Reader(source).read(data, node)
    config = dataclasses.replace(config, source=source)
    return apply_env(config, os.environ if env is None else env)


def apply_env(config: PipelineConfig, env: Mapping[str, str]) -> PipelineConfig:
    """Connection settings and secrets from the environment win over the file."""
    kafka = config.kafka
    if env.get("KAFKA_BOOTSTRAP_SERVERS"):
        kafka = dataclasses.replace(kafka, bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    if env.get("KAFKA_SECURITY_PROTOCOL"):
        protocol = env["KAFKA_SECURITY_PROTOCOL"]
        allowed = typing.get_args(SecurityProtocol)
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


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a config file, for editors (`configs/driftloop.schema.json`, `driftloop config schema`).

    Pydantic's schema of the dataclasses, rewritten where a file is written otherwise than the
    dataclasses read: keyed mappings (`name: {spec}`), the shorthands `normalize` reads, defaults
    as a file writes them, and no fields that never come from a file.
    """
    schema = _adapter().json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    defs = schema["$defs"]
    keyed_items: dict[str, str] = {}
    for cls in _sections():
        definition = schema if cls is PipelineConfig else defs[cls.__name__]
        properties, required = definition["properties"], definition.get("required", [])
        for f in dataclasses.fields(cls):
            if not f.metadata.get("yaml", True):
                del properties[f.name]
                continue
            if f.default is not dataclasses.MISSING:
                properties[f.name]["default"] = _field_data(f, f.default)
            keyed_by = f.metadata.get("keyed_by")
            if keyed_by:
                item = typing.get_args(_bare(_hints(cls)[f.name]))[0]
                keyed_items[item.__name__] = keyed_by
                prop = properties[f.name]
                del prop["type"]
                prop.update(type="object", additionalProperties=prop.pop("items"))
                prop["propertyNames"] = {k: v for k, v in defs[item.__name__]["properties"][keyed_by].items()
                                         if k not in ("title", "description")}  # fmt: skip
        definition["required"] = [r for r in required if r in properties]
        if not definition["required"]:
            del definition["required"]
    for name, keyed_by in keyed_items.items():
        definition = defs[name]
        del definition["properties"][keyed_by]
        definition["required"] = [r for r in definition.get("required", []) if r != keyed_by]
        if not definition["required"]:
            del definition["required"]
    for cls in _sections():
        shorthands = getattr(cls, "shorthands", None)
        if shorthands is not None:
            full = defs[cls.__name__]
            defs[cls.__name__] = {"title": full["title"], "anyOf": [full, *shorthands(full)]}
    return schema


def _data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _field_data(f, getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("yaml", True)}  # fmt: skip
    if isinstance(value, tuple):
        return [_data(v) for v in value]
    return value


def _field_data(f: dataclasses.Field[Any], value: Any) -> Any:
    keyed_by = f.metadata.get("keyed_by")
    if keyed_by:
        return {getattr(i, keyed_by): {k: v for k, v in _data(i).items() if k != keyed_by} for i in value}
    return _data(value)


# --- decoding --------------------------------------------------------------------------------------

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it


def _compose(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The YAML node tree (where each value is written) and the values it holds."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return node, (None if node is None else loader.construct_document(node))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        found = f"<{getattr(err, 'problem', None) or err}>"
        raise ConfigError(source, "<YAML>", "valid YAML", found, line=line, column=column) from None
    finally:
        loader.dispose()


@functools.cache
def _adapter() -> TypeAdapter[PipelineConfig]:
    for cls in _sections():  # without the base, pydantic's strict mode would take only instances
        if not issubclass(cls, _Section):
            raise TypeError(f"config dataclass {cls.__name__} must derive from _Section")
    return TypeAdapter(PipelineConfig)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _sections() -> Iterator[type]:
    """Every config dataclass, PipelineConfig first."""
    seen: list[type] = []
    todo: list[Any] = [PipelineConfig]
    while todo:
        tp = _bare(todo.pop())
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if tp not in seen:
                seen.append(tp)
                todo.extend(_hints(tp).values())
        else:
            todo.extend(typing.get_args(tp))
    yield from seen


@dataclass(frozen=True)
class _Spot:
    """Where a value of the file is: its key as the file reads, its node, its declared type."""

    key: str  # "features.transforms.plan[0].op"
    node: yaml.Node | None  # the value's own node, or its mapping's when the value is missing
    tp: Any  # None: a key the section does not have
    keyed: bool = False  # a mapping of name to spec


class _Reader:
    """Decodes one file: readies its values for pydantic (keyed mappings as tuples, shorthands in
    full, lists as tuples), noting where each came from, then turns each of pydantic's errors
    (a path in the readied values) into a problem at the key and node it came from."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.spots: dict[tuple[int | str, ...], _Spot] = {}
        self.nodes: dict[str, yaml.Node] = {}
        self.problems: list[ConfigProblem] = []

    def read(self, data: Any, node: yaml.Node | None) -> PipelineConfig:
        ready = self.value(PipelineConfig, data, node, (), "")
        config: PipelineConfig | None = None
        try:
            config = _adapter().validate_python(ready)
        except ValidationError as err:
            self.add_errors(err)
        if config is None or self.problems:
            raise ConfigError.of(sorted(self.problems, key=lambda p: (p.line or 0, p.column or 0)))
        return config

    def spot(self, loc: tuple[int | str, ...], key: str, node: yaml.Node | None, tp: Any, keyed: bool = False) -> None:
        self.spots[loc] = _Spot(key, node, tp, keyed)
        if node is not None:
            self.nodes.setdefault(key, node)

    def value(self, tp: Any, value: Any, node: yaml.Node | None, loc: tuple[int | str, ...], key: str) -> Any:
        self.spot(loc, key, node, tp)
        bare = _bare(tp)
        if isinstance(bare, type) and dataclasses.is_dataclass(bare):
            return self.section(bare, value, node, loc, key)
        if typing.get_origin(bare) is tuple and isinstance(value, list):
            (item, _) = typing.get_args(bare)
            nodes = node.value if isinstance(node, yaml.SequenceNode) else [node] * len(value)
            return tuple(
                self.value(item, v, n, (*loc, i), f"{key}[{i}]")
                for i, (v, n) in enumerate(zip(value, nodes, strict=True))
            )
        return value  # a scalar, or what pydantic will refuse (config unions hold scalars only)

    def section(
        self, cls: type, value: Any, node: yaml.Node | None, loc: tuple[int | str, ...], key: str,
        pinned: Mapping[str, yaml.Node | None] | None = None,
    ) -> Any:  # fmt: skip
        if value is None:
            value = {}
        normalize = getattr(cls, "normalize", None)
        shorthand = False
        if normalize is not None:
            full = normalize(value)
            shorthand, value = full is not value, full
        if not isinstance(value, dict):
            return value  # pydantic says what was expected
        inline = value.get(INLINE)
        fields = _from_yaml(cls)
        ready: dict[Any, Any] = {}
        for name, item in value.items():
            if name == INLINE or name in fields:
                continue
            sub, sub_node = _join(key, str(name)), _pairs(node).get(str(name), (node, node))[0]
            if name in {f.name for f in dataclasses.fields(cls)}:  # a field that never comes from a file
                hint = " (secrets come from the environment)" if name in ("sasl_username", "sasl_password") else ""
                self.add(sub, sub_node, f"one of {sorted(fields)}{hint}", "<unknown key>")
                continue
            self.spot((*loc, name), sub, sub_node, None)
            ready[name] = item  # pydantic refuses it, as an unknown key
        for name, f in fields.items():
            if name == inline:
                sub, sub_node = key, node
            else:
                sub = _join(key, name)
                sub_node = pinned[name] if pinned and name in pinned else _child(node, name, shorthand)
            tp = _hints(cls)[name]
            if name not in value:
                self.spot((*loc, name), sub, sub_node or node, tp)
            elif f.metadata.get("keyed_by"):
                ready[name] = self.keyed(tp, f.metadata["keyed_by"], value[name], sub_node, (*loc, name), sub)
            else:
                ready[name] = self.value(tp, value[name], sub_node, (*loc, name), sub)
        return ready

    def keyed(
        self, tp: Any, keyed_by: str, value: Any, node: yaml.Node | None, loc: tuple[int | str, ...], key: str
    ) -> Any:
        """A mapping `name: {spec}` as the tuple of dataclasses it stands for (`keyed_by` is the name)."""
        self.spot(loc, key, node, tp, keyed=True)
        if not isinstance(value, dict):
            return value
        (cls, _) = typing.get_args(_bare(tp))
        pairs = _pairs(node)
        items = []
        for i, (name, spec) in enumerate(value.items()):
            key_node, spec_node = pairs.get(str(name), (node, node))
            sub = _join(key, str(name))
            self.spot((*loc, i), sub, spec_node, cls)
            normalize = getattr(cls, "normalize", None)
            spec = {} if spec is None else normalize(spec) if normalize is not None else spec
            if isinstance(spec, dict):
                spec = self.section(cls, {keyed_by: name, **spec}, spec_node, (*loc, i), sub, {keyed_by: key_node})
            items.append(spec)
        return tuple(items)

    def add(self, key: str, node: yaml.Node | None, expected: str, found: object) -> None:
        mark = None if node is None else node.start_mark
        self.problems.append(
            ConfigProblem(
                self.source, key or "<top level>", expected, list(found) if isinstance(found, tuple) else found,
                None if mark is None else mark.line + 1, None if mark is None else mark.column + 1,
            )
        )  # fmt: skip

    def add_errors(self, err: ValidationError) -> None:
        unions: set[tuple[int | str, ...]] = set()
        errors = err.errors(include_url=False)
        for error in errors:
            loc = error["loc"]
            if error["type"] in ("too_short", "too_long") and any(_within(e["loc"], loc) for e in errors):
                continue  # pydantic counts only the valid items of a list whose items have errors
            n = len(loc)
            while loc[:n] not in self.spots:
                n -= 1
            spot = self.spots[loc[:n]]
            if error["type"] == "problems":  # a section's own checks, each relative to it
                for relative, expected, found in error["ctx"]["problems"]:
                    key = _join(spot.key, relative)
                    self.add(key, self._nearest(key), expected, found)
            elif n < len(loc):  # the members of a union, each refusing the value: one problem for all
                if loc[:n] not in unions:
                    unions.add(loc[:n])
                    self.add(spot.key, spot.node, _describe(spot.tp), error["input"])
            elif spot.tp is None:
                known = _from_yaml(_bare(self.spots[loc[:-1]].tp))
                self.add(spot.key, spot.node, f"one of {sorted(known)}", "<unknown key>")
            else:
                found = "<missing>" if error["type"] == "missing" else error["input"]
                self.add(spot.key, spot.node, _describe(spot.tp, spot.keyed), found)

    def _nearest(self, key: str) -> yaml.Node | None:
        while key not in self.nodes:
            cut = max(key.rfind("."), key.rfind("["))
            if cut < 0:
                return self.nodes.get("")
            key = key[:cut]
        return self.nodes[key]


def _from_yaml(cls: Any) -> dict[str, dataclasses.Field[Any]]:
    """The fields of a config dataclass that a file may set."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _within(loc: tuple[int | str, ...], outer: tuple[int | str, ...]) -> bool:
    return len(loc) > len(outer) and loc[: len(outer)] == outer


def _bare(tp: Any) -> Any:
    """`tp` without its Annotated constraints."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _pairs(node: yaml.Node | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's (key node, value node) by key."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): (k, v) for k, v in node.value}


def _child(node: yaml.Node | None, name: object, shorthand: bool) -> yaml.Node | None:
    """The node of `name`'s value in a mapping node; in a shorthand (`{clip: {max: 1}}`, `log1p`),
    inside the one mapping it holds, else where the shorthand is written."""
    pairs = _pairs(node)
    if str(name) in pairs:
        return pairs[str(name)][1]
    if not shorthand:
        return None
    if len(pairs) == 1:
        ((key, inner),) = pairs.values()
        return _pairs(inner).get(str(name), (key, key))[1] if isinstance(inner, yaml.MappingNode) else key
    return node


def _describe(tp: Any, keyed: bool = False) -> str:
    """What a value of type `tp` must be, in words."""
    if keyed:
        return "a mapping of name to spec"
    if typing.get_origin(tp) is Annotated:
        base, *annotations = typing.get_args(tp)
        bounds: dict[str, Any] = {}
        for annotation in annotations:
            if getattr(annotation, "description", None):
                return str(annotation.description)
            for constraint in getattr(annotation, "metadata", [annotation]):
                bounds.update({k: getattr(constraint, k) for k in _BOUNDS if hasattr(constraint, k)})
        return _bounded(base, bounds)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping for {tp.__name__}"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        words = " or ".join(_describe(o) for o in options if o is not type(None))
        return words + (" or null" if type(None) in options else "")
    if origin is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))


_BOUNDS = ("ge", "gt", "le", "lt", "min_length", "max_length")


def _bounded(base: Any, bounds: dict[str, Any]) -> str:
    if base in (int, float):
        noun = "an integer" if base is int else "a number"
        low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
        high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
        if low and high:
            return f"{noun} in {low[0]}{low[1]}, {high[1]}{high[0]}"
        if low:
            return f"{noun} {'>=' if low[0] == '[' else '>'} {low[1]}"
        if high:
            return f"{noun} {'<=' if high[0] == ']' else '<'} {high[1]}"
    if bounds.get("min_length") == 1:
        return f"a non-empty {_describe(base).removeprefix('a ')}"
    return _describe(base)
