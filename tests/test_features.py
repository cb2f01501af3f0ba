"""Feature transforms as pure logic: the plan, the math of each step, and config errors."""

from __future__ import annotations

import dataclasses
import itertools
import zlib

import numpy as np
import pytest
import yaml

from jobs.features import FeaturePipeline, plan_inputs
from streams.config import FeatureSettings, FeatureTransform, PipelineConfig, Step, parse_config
from streams.errors import ConfigError
from tests.conftest import DEMO

STATS = {
    "tenure_months": {"mean": 10.0, "std": 5.0},
    "monthly_charges": {"mean": 1.0, "std": 2.0},
    "support_calls": {"boundaries": [1.0, 3.0]},
    "data_usage_gb": {"min": 0.0, "max": 200.0},
    "charges_per_tenure": {"mean": 0.0, "std": 1.0},
    "plan": {"vocabulary": ["basic", "premium"]},
}


@pytest.fixture
def pipeline(demo_config: PipelineConfig) -> FeaturePipeline:
    return FeaturePipeline(demo_config.schema, demo_config.features, STATS)


def record(**changes: object) -> dict[str, object]:
    base = {
        "tenure_months": 20,
        "monthly_charges": np.e - 1,
        "support_calls": 2,
        "data_usage_gb": 500.0,
        "autopay": True,
        "plan": "basic",
        "region": "north",
    }
    return {**base, **changes}


def value(pipeline: FeaturePipeline, name: str, row: dict[str, object]) -> float:
    return float(pipeline.transform_records([row])[0, pipeline.output_names.index(name)])


def test_unlisted_inputs_get_defaults(demo_config: PipelineConfig) -> None:
    plans = {p.name: p for p in plan_inputs(demo_config.schema, FeatureSettings())}
    assert plans["tenure_months"].fitted is not None and plans["tenure_months"].fitted.op == "standardize"
    assert plans["plan"].fitted is not None and plans["plan"].fitted.op == "one_hot"
    assert plans["autopay"].fitted is None and plans["autopay"].pre == ()


def test_each_step_computes_what_it_says(pipeline: FeaturePipeline) -> None:
    row = record()
    assert value(pipeline, "tenure_months", row) == pytest.approx((20 - 10) / 5)
    assert value(pipeline, "monthly_charges", row) == pytest.approx((1.0 - 1.0) / 2)  # log1p(e - 1) = 1
    assert value(pipeline, "data_usage_gb", row) == pytest.approx(300 / 200)  # clipped at 300 first
    assert value(pipeline, "autopay", row) == 1.0
    buckets = [value(pipeline, f"support_calls[bucket {i}]", row) for i in range(3)]
    assert buckets == [0.0, 1.0, 0.0]  # 1 <= 2 < 3
    assert value(pipeline, "plan=basic", row) == 1.0
    assert value(pipeline, "plan=__other__", record(plan="family")) == 1.0
    region = zlib.crc32(b"north") % 8
    assert value(pipeline, f"region[hash {region}]", row) == 1.0
    expected_ratio = np.log1p(min((np.e - 1) / 20, 50))
    assert value(pipeline, "charges_per_tenure", row) == pytest.approx(expected_ratio, rel=1e-6)


def test_division_by_zero_and_missing_values_become_zero(pipeline: FeaturePipeline) -> None:
    assert value(pipeline, "charges_per_tenure", record(tenure_months=0)) == 0.0
    out = pipeline.transform_records([record(tenure_months=None)])
    assert np.isfinite(out).all()
    assert value(pipeline, "tenure_months", record(tenure_months=None)) == 0.0


def test_one_batch_equals_the_rows_one_by_one(pipeline: FeaturePipeline) -> None:
    rng = np.random.default_rng(1)
    rows = [
        record(tenure_months=int(t), support_calls=int(c), plan=p, region=r)
        for t, c, p, r in zip(
            rng.integers(0, 120, 50), rng.integers(0, 9, 50), rng.choice(["basic", "family", "premium"], 50),
            rng.choice(["north", "south", "east", "west"], 50), strict=True,
        )
    ]  # fmt: skip
    batch = pipeline.transform_records(rows)
    assert np.array_equal(batch, np.concatenate([pipeline.transform_records([r]) for r in rows]))
    assert batch.shape == (50, pipeline.width) and batch.dtype == np.float32


def test_labels_and_statistics_round_trip(pipeline: FeaturePipeline, demo_config: PipelineConfig) -> None:
    assert pipeline.encode_labels(["no", "yes", "yes"]).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        pipeline.encode_labels(["maybe"])
    restored = FeaturePipeline.from_json(pipeline.to_json(), demo_config.schema, demo_config.features)
    assert restored.output_names == pipeline.output_names
    with pytest.raises(ValueError, match="no fitted statistics for tenure_months"):
        FeaturePipeline(
            demo_config.schema, demo_config.features, {k: v for k, v in STATS.items() if k != "tenure_months"}
        )
    fixed = FeatureTransform(name="support_calls", steps=(Step(op="bucketize", boundaries=(1.0, 2.0, 3.0)),))
    other = dataclasses.replace(
        demo_config.features,
        transforms=tuple(fixed if t.name == "support_calls" else t for t in demo_config.features.transforms),
    )
    with pytest.raises(ValueError, match="another feature config"):
        FeaturePipeline.from_json(pipeline.to_json(), demo_config.schema, other)


@pytest.mark.parametrize(
    ("transforms", "key", "expected"),
    [
        ({"tenure_months": ["standardize", "minmax"]}, "features.transforms.tenure_months", "at most one fitted step"),
        ({"nope": ["standardize"]}, "features.transforms.nope", "a feature or derived name"),
        ({"tenure_months": ["one_hot"]}, "features.transforms.tenure_months", "no one_hot on a int feature"),
        ({"plan": ["standardize"]}, "features.transforms.plan", "no standardize on a category feature"),
        ({"region": ["hash"]}, "features.transforms.region[0].buckets", "an integer between 2 and 4096"),
        (
            {"support_calls": ["bucketize"]},
            "features.transforms.support_calls[0].bucketize",
            "either boundaries or quantiles",
        ),
        (
            {"support_calls": [{"bucketize": {"boundaries": [3, 1]}}]},
            "features.transforms.support_calls[0].boundaries",
            "increasing",
        ),
        (
            {"tenure_months": [{"clip": {"buckets": 3}}]},
            "features.transforms.tenure_months[0].buckets",
            "no buckets on a clip step",
        ),
        ({"tenure_months": ["sqrt"]}, "features.transforms.tenure_months[0].op", "one of ["),
    ],
)
def test_feature_config_errors(transforms: dict[str, object], key: str, expected: str) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data["features"]["transforms"] = transforms
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(data), source="p.yaml", env={})
    assert any(p.key == key and expected in p.expected for p in caught.value.problems), str(caught.value)


def test_statistics_merged_from_uneven_batches_equal_those_of_the_whole(demo_config: PipelineConfig) -> None:
    from jobs.features import _apply_pre, _needs_stats, merge_summaries, summarise_batch
    from streams.generator import StreamGenerator

    rows = [r.record for r in StreamGenerator(demo_config, seed=3).records(3000)]
    rows[5]["tenure_months"] = None  # a missing value counts in no statistic
    columns = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    plans = _needs_stats(plan_inputs(demo_config.schema, demo_config.features))
    cuts = [0, 1, 1, 700, 2999, 3000]  # one-row batches, an empty one, large ones
    parts = [summarise_batch(plans, {k: v[a:b] for k, v in columns.items()}) for a, b in itertools.pairwise(cuts)]
    stats = merge_summaries(plans, parts)
    for plan in plans:
        whole = _apply_pre(plan, columns)
        got = stats[plan.name]
        op = plan.fitted.op  # type: ignore[union-attr]
        if op == "one_hot":
            values, counts = np.unique(whole.astype(str), return_counts=True)
            ranked = sorted(zip(values.tolist(), counts.tolist(), strict=True), key=lambda vc: (-vc[1], vc[0]))
            assert got["vocabulary"] == [v for v, _ in ranked][: plan.fitted.max_categories or None]  # type: ignore[union-attr]
            continue
        x = whole[np.isfinite(whole)]
        if op == "standardize":
            assert got["mean"] == pytest.approx(x.mean(), rel=1e-12) and got["std"] == pytest.approx(x.std(), rel=1e-9)
        elif op == "minmax":
            assert (got["min"], got["max"]) == (x.min(), x.max())
        else:
            k = plan.fitted.quantiles or 4  # type: ignore[union-attr]
            assert got["boundaries"] == sorted(set(np.quantile(x, [i / k for i in range(1, k)]).tolist()))
    assert {plan.fitted.op for plan in plans} >= {"standardize", "minmax", "bucketize", "one_hot"}  # type: ignore[union-attr]
    empty = merge_summaries(plans, [])
    assert empty["tenure_months"] == {"mean": 0.0, "std": 1.0}
