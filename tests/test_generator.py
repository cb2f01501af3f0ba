"""The stream generator: deterministic per seed, learnable, and its drift is real (measured)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from streams.config import PipelineConfig
from streams.errors import DecodeError
from streams.generator import GeneratedRecord, StreamGenerator, corrupt
from streams.serde import RecordCodec

N = 8000
DRIFT_AT = 4000


def stream(config: PipelineConfig, scenario: str = "covariate", seed: int = 3, n: int = N) -> list[GeneratedRecord]:
    return list(StreamGenerator(config, seed=seed, scenario=scenario, drift_at=DRIFT_AT).records(n))  # type: ignore[arg-type]


def column(rows: list[GeneratedRecord], name: str) -> np.ndarray:
    return np.array([r.record[name] for r in rows])


def positive_rate(rows: list[GeneratedRecord]) -> float:
    return float(np.mean([r.label == "yes" for r in rows]))


def test_same_seed_same_stream_other_seed_other_stream(demo_config: PipelineConfig) -> None:
    a, b, c = stream(demo_config, seed=11), stream(demo_config, seed=11), stream(demo_config, seed=12)
    assert [r.record for r in a] == [r.record for r in b]
    assert [r.record for r in a] != [r.record for r in c]


def test_a_stream_read_in_pieces_equals_one_read(demo_config: PipelineConfig) -> None:
    generator = StreamGenerator(demo_config, seed=5, drift_at=DRIFT_AT)
    pieces = list(generator.records(1234)) + list(generator.records(N - 1234))
    assert [r.record for r in pieces] == [r.record for r in stream(demo_config, seed=5)]
    assert [r.index for r in pieces] == list(range(N))


def test_every_generated_record_is_valid(demo_config: PipelineConfig) -> None:
    codec = RecordCodec(demo_config.schema)
    decoded = codec.decode_batch([codec.encode(r.record) for r in stream(demo_config, "prior", n=3000)])
    assert not [d for d in decoded if isinstance(d, DecodeError)]


def test_unlabeled_records_keep_the_true_label_aside(demo_config: PipelineConfig) -> None:
    rows = list(StreamGenerator(demo_config, seed=1, unlabeled=True).records(10))
    assert all("churned" not in r.record and r.label in ("no", "yes") for r in rows)


def test_drift_flag_starts_at_drift_at(demo_config: PipelineConfig) -> None:
    rows = stream(demo_config)
    assert [r.drifted for r in rows].index(True) == DRIFT_AT
    assert all(r.drifted for r in rows[DRIFT_AT:])


def test_covariate_drift_moves_the_drift_features_and_only_them(demo_config: PipelineConfig) -> None:
    rows = stream(demo_config, "covariate")
    before, after = rows[:DRIFT_AT], rows[DRIFT_AT:]
    moved = stats.ks_2samp(column(before, "monthly_charges"), column(after, "monthly_charges"))
    still = stats.ks_2samp(column(before, "data_usage_gb"), column(after, "data_usage_gb"))
    assert moved.pvalue < 1e-50 and moved.statistic > 0.3
    assert still.pvalue > 0.01
    plans = sorted(demo_config.schema.feature("plan").categories)
    table = [[int(np.sum(column(part, "plan") == p)) for p in plans] for part in (before, after)]
    assert stats.chi2_contingency(table).pvalue < 1e-50
    regions = sorted(demo_config.schema.feature("region").categories)
    table = [[int(np.sum(column(part, "region") == p)) for p in regions] for part in (before, after)]
    assert stats.chi2_contingency(table).pvalue > 0.01


def test_concept_drift_changes_the_label_given_x_not_x(demo_config: PipelineConfig) -> None:
    rows = stream(demo_config, "concept")
    before, after = rows[:DRIFT_AT], rows[DRIFT_AT:]
    assert stats.ks_2samp(column(before, "monthly_charges"), column(after, "monthly_charges")).pvalue > 0.01

    def correlation(part: list[GeneratedRecord]) -> float:
        return float(np.corrcoef(column(part, "monthly_charges"), [r.label == "yes" for r in part])[0, 1])

    assert abs(correlation(before)) > 0.1
    assert np.sign(correlation(before)) == -np.sign(correlation(after))


def test_prior_drift_moves_the_class_balance_and_keeps_x_given_y(demo_config: PipelineConfig) -> None:
    rows = stream(demo_config, "prior")
    before, after = rows[:DRIFT_AT], rows[DRIFT_AT:]
    assert abs(positive_rate(before) - 0.5) < 0.1
    assert positive_rate(after) == pytest.approx(demo_config.generator.prior_positive_rate, abs=0.03)
    yes_before = [r for r in before if r.label == "yes"]
    yes_after = [r for r in after if r.label == "yes"]
    assert stats.ks_2samp(column(yes_before, "monthly_charges"), column(yes_after, "monthly_charges")).pvalue > 0.01


def test_the_label_is_learnable(demo_config: PipelineConfig) -> None:
    """A plain logistic regression beats the majority class clearly on held-out records."""
    rows = list(StreamGenerator(demo_config, seed=9).records(6000))
    schema = demo_config.schema
    columns = []
    for feature in schema.features:
        values = column(rows, feature.name)
        if feature.type == "category":
            columns += [(values == c).astype(float) for c in feature.categories]
        else:
            values = values.astype(float)
            columns.append((values - values.mean()) / values.std())
    x = np.column_stack([*columns, np.ones(len(rows))])
    y = np.array([r.label == "yes" for r in rows], dtype=float)
    train, test = slice(0, 4000), slice(4000, None)
    w = np.zeros(x.shape[1])
    for _ in range(500):
        p = 1 / (1 + np.exp(-x[train] @ w))
        w -= 0.5 * x[train].T @ (p - y[train]) / 4000
    accuracy = np.mean((x[test] @ w > 0) == (y[test] == 1))
    majority = max(y[test].mean(), 1 - y[test].mean())
    assert accuracy > majority + 0.15


@pytest.mark.parametrize("seed", range(20))
def test_corrupted_records_are_rejected_for_the_reason_they_claim(demo_config: PipelineConfig, seed: int) -> None:
    codec = RecordCodec(demo_config.schema)
    record = next(StreamGenerator(demo_config, seed=seed).records(1)).record
    payload, kind = corrupt(record, demo_config.schema, np.random.default_rng(seed))
    with pytest.raises(DecodeError) as caught:
        codec.decode(payload)
    assert caught.value.kind.value == kind


def test_bad_arguments(demo_config: PipelineConfig) -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        StreamGenerator(demo_config, scenario="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="drift_at must be >= 0"):
        StreamGenerator(demo_config, drift_at=-1)
