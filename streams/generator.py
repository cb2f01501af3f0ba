"""A deterministic, labeled tabular classification stream whose distribution changes on cue.

Pure: no Kafka, no clock. The *world* (feature distributions and the labeling function) is
derived from the pipeline's name, so every seed samples the same world and a model trained on
one seed's records is valid for another's; the *seed* decides the sample. From record
`drift_at` on, one of three scenarios applies:

- covariate: P(x) moves (drift features shift by `magnitude` standard deviations, category
  frequencies reverse), P(y | x) stays;
- concept: P(y | x) changes (the drift features' effects flip sign), P(x) stays;
- prior: P(y) moves to `prior_positive_rate` on the last class, P(x | y) stays (rejection
  sampling).

>>> from streams.config import load_config
>>> cfg = load_config("configs/demo.yaml", env={})
>>> gen = StreamGenerator(cfg, seed=7, scenario="covariate", drift_at=100)
>>> rows = list(gen.records(200))
>>> (rows[0].drifted, rows[99].drifted, rows[100].drifted)
(False, False, True)
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import numpy as np

from streams.config import Feature, PipelineConfig, RecordSchema

__all__ = ["SCENARIOS", "GeneratedRecord", "Scenario", "StreamGenerator", "corrupt"]

Scenario = Literal["covariate", "concept", "prior"]
SCENARIOS: tuple[Scenario, ...] = ("covariate", "concept", "prior")
_CHUNK = 4096


@dataclass(frozen=True)
class GeneratedRecord:
    """One generated record: the payload (label included unless unlabeled) and its true label."""

    index: int
    record: dict[str, Any]
    label: str | int | None  # None: a file row without its label
    drifted: bool
    id: str = ""  # the record's id (also when the schema has no record_id column: labels join on it)

    def key(self, schema: RecordSchema) -> str | None:
        """The Kafka key: the entity id, else the record id."""
        value = self.record.get(schema.entity_id) if schema.entity_id is not None else None
        return str(value) if value is not None else (self.id or None)


@dataclass(frozen=True)
class _NumericWorld:
    mean: float
    sd: float
    low: float | None
    high: float | None
    integer: bool


class StreamGenerator:
    """Generates records for a pipeline's schema; see the module docstring for the scenarios."""

    def __init__(
        self,
        config: PipelineConfig,
        seed: int = 0,
        scenario: Scenario = "covariate",
        drift_at: int | None = None,
        start_time: datetime | None = None,
        interval: timedelta = timedelta(milliseconds=10),
        unlabeled: bool = False,
        id_prefix: str | None = None,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
        if drift_at is not None and drift_at < 0:
            raise ValueError(f"drift_at must be >= 0, not {drift_at}")
        self.schema = config.schema
        self.settings = config.generator
        self.seed = seed
        self.scenario = scenario
        self.drift_at = drift_at
        self.start_time = start_time or datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.interval = interval
        self.unlabeled = unlabeled
        self.id_prefix = id_prefix if id_prefix is not None else f"s{seed}"
        self.classes = list(self.schema.label.classes)
        self.drift_features = self.settings.drift_features or _default_drift_features(self.schema.features)
        world = np.random.default_rng(zlib.crc32(config.name.encode()))
        self._numeric: dict[str, _NumericWorld] = {}
        self._probs: dict[str, np.ndarray] = {}
        self._effects: dict[str, np.ndarray] = {}
        k = len(self.classes)
        for feature in self.schema.features:
            if feature.type == "category":
                self._probs[feature.name] = world.dirichlet(np.full(len(feature.categories), 4.0))
                self._effects[feature.name] = world.normal(0, 1.2, size=(len(feature.categories), k))
            elif feature.type == "bool":
                self._probs[feature.name] = np.array([0.7, 0.3])
                self._effects[feature.name] = world.normal(0, 1.2, size=(2, k))
            else:
                self._numeric[feature.name] = _numeric_world(feature, world)
                self._effects[feature.name] = world.normal(0, 1.2, size=k)
        self._bias = np.zeros(k)
        for _ in range(4):  # calibrate towards balanced classes
            self._bias -= np.log(np.maximum(self._estimate_prior(world), 1e-3) * k)
        self._base_prior = self._estimate_prior(world)
        target = np.full(k, (1 - self.settings.prior_positive_rate) / (k - 1))
        target[-1] = self.settings.prior_positive_rate
        ratio = target / np.maximum(self._base_prior, 1e-6)
        self._accept = ratio / ratio.max()
        self._rng = np.random.default_rng(seed)
        self._produced = 0
        self._buffer: list[GeneratedRecord] = []

    def records(self, n: int) -> Iterator[GeneratedRecord]:
        """The next `n` records; successive calls continue the same stream."""
        for _ in range(n):
            if not self._buffer:
                self._buffer = self._chunk()
                self._buffer.reverse()
            yield self._buffer.pop()

    # --- internals -------------------------------------------------------------------------

    def _chunk(self) -> list[GeneratedRecord]:
        rng = self._rng
        start = self._produced
        before = _CHUNK if self.drift_at is None else max(0, min(_CHUNK, self.drift_at - start))
        x = self._sample_x(rng, _CHUNK, drifted_from=before)
        logits = self._logits(x, drifted_from=before)
        y = _sample_classes(rng, logits)
        noise = rng.random(_CHUNK) < self.settings.label_noise
        y = np.where(noise, rng.integers(0, len(self.classes), _CHUNK), y)
        keep = np.ones(_CHUNK, dtype=bool)
        if self.scenario == "prior":
            keep[before:] = rng.random(_CHUNK - before) < self._accept[y[before:]]
        entity = rng.integers(0, self.settings.entities, _CHUNK)
        rows: list[GeneratedRecord] = []
        for i in np.flatnonzero(keep):
            index = start + len(rows)
            rows.append(self._row(index, x, int(i), int(y[i]), int(entity[i]), drifted=bool(i >= before)))
        self._produced += len(rows)
        return rows

    def _row(self, index: int, x: dict[str, np.ndarray], i: int, y: int, entity: int, drifted: bool) -> GeneratedRecord:
        schema = self.schema
        stamp = self.start_time + self.interval * index
        ident = f"{self.id_prefix}-{index}"
        record: dict[str, Any] = {}
        if schema.record_id is not None:
            record[schema.record_id] = ident
        if schema.entity_id is not None:
            record[schema.entity_id] = f"e{entity}"
        if schema.timestamp is not None:
            record[schema.timestamp] = stamp.isoformat().replace("+00:00", "Z")
        for feature in schema.features:
            value = x[feature.name][i]
            if feature.type == "category":
                record[feature.name] = feature.categories[int(value)]
            elif feature.type == "bool":
                record[feature.name] = bool(value)
            elif feature.type == "int":
                record[feature.name] = int(value)
            else:
                record[feature.name] = round(float(value), 4)
        label = self.classes[y]
        if not self.unlabeled:
            record[schema.label.name] = label
        return GeneratedRecord(index, record, label, drifted, ident)

    def _sample_x(self, rng: np.random.Generator, n: int, drifted_from: int) -> dict[str, np.ndarray]:
        covariate = self.scenario == "covariate"
        x: dict[str, np.ndarray] = {}
        for feature in self.schema.features:
            name = feature.name
            shifted = covariate and name in self.drift_features
            if name in self._numeric:
                w = self._numeric[name]
                mean = np.full(n, w.mean)
                if shifted:
                    mean[drifted_from:] += self.settings.magnitude * w.sd
                values = rng.normal(mean, w.sd)
                if w.low is not None or w.high is not None:
                    values = np.clip(values, w.low, w.high)
                x[name] = np.round(values) if w.integer else values
            else:
                probs = self._probs[name]
                u = rng.random(n)
                base = np.searchsorted(np.cumsum(probs), u, side="right")
                if shifted:
                    moved = np.searchsorted(np.cumsum(probs[::-1]), u, side="right")
                    base[drifted_from:] = moved[drifted_from:]
                x[name] = np.minimum(base, len(probs) - 1)
        return x

    def _logits(self, x: dict[str, np.ndarray], drifted_from: int) -> np.ndarray:
        n = len(next(iter(x.values())))
        logits = np.tile(self._bias, (n, 1))
        sign = np.ones((n, 1))
        if self.scenario == "concept":
            sign[drifted_from:] = -1.0
        for name, effect in self._effects.items():
            flip = sign if name in self.drift_features else 1.0
            if name in self._numeric:
                w = self._numeric[name]
                z = (x[name] - w.mean) / w.sd
                logits += flip * z[:, None] * effect[None, :]
            else:
                logits += flip * effect[x[name].astype(int)]
        return logits

    def _estimate_prior(self, world: np.random.Generator) -> np.ndarray:
        x = self._sample_x(world, 20_000, drifted_from=20_000)
        y = _sample_classes(world, self._logits(x, drifted_from=20_000))
        return np.bincount(y, minlength=len(self.classes)) / len(y)


def _numeric_world(feature: Feature, world: np.random.Generator) -> _NumericWorld:
    low, high = feature.min, feature.max
    if low is not None and high is not None:
        span = high - low
        mean, sd = low + span * world.uniform(0.3, 0.5), span / 8
    elif low is not None:
        mean, sd = low + 10.0, 3.0
    elif high is not None:
        mean, sd = high - 10.0, 3.0
    else:
        mean, sd = 0.0, 1.0
    return _NumericWorld(mean, sd, low, high, feature.type == "int")


def _sample_classes(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    u = rng.random(len(probs))[:, None]
    return np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)


def _default_drift_features(features: tuple[Feature, ...]) -> tuple[str, ...]:
    numeric = [f.name for f in features if f.numeric]
    other = [f.name for f in features if not f.numeric]
    return tuple(numeric[:1] + other[:1])


_CORRUPTIONS = (
    "wrong_type",
    "missing_field",
    "out_of_range",
    "unknown_category",
    "invalid_json",
    "invalid_utf8",
    "non_finite",
)


def corrupt(record: dict[str, Any], schema: RecordSchema, rng: np.random.Generator) -> tuple[bytes, str]:
    """A malformed payload made from a good record, and the kind of damage (for DLQ demos and tests)."""
    kind = _CORRUPTIONS[int(rng.integers(len(_CORRUPTIONS)))]
    bad = dict(record)
    numeric = [f for f in schema.features if f.numeric]
    categorical = [f for f in schema.features if f.type == "category"]
    if kind == "wrong_type" and numeric:
        bad[numeric[0].name] = "not a number"
    elif kind == "missing_field":
        bad.pop(schema.features[0].name, None)
    elif kind == "out_of_range" and numeric and numeric[0].max is not None:
        too_big = numeric[0].max * 10 + 1
        bad[numeric[0].name] = int(too_big) if numeric[0].type == "int" else too_big
    elif kind == "unknown_category" and categorical:
        bad[categorical[0].name] = "no-such-category"
    elif kind == "invalid_utf8":
        return json.dumps(bad).encode()[:-2] + b'\xff"}', kind
    elif kind == "non_finite" and numeric:
        bad[numeric[0].name] = float("nan")
        return json.dumps(bad).encode(), kind
    else:
        return json.dumps(bad).encode()[:-1], "invalid_json"
    return json.dumps(bad).encode(), kind
