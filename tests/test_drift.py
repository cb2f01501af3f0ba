"""Drift statistics: each equals scipy on the same data, and `compare` finds the generator's drift.

Also measured here: the false-alarm rate of `compare` on a stream without drift stays within
its level, and bad input gets a clear ValueError.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from streams.config import PipelineConfig
from streams.drift import (
    CategoricalReference,
    DriftReport,
    Kind,
    NumericReference,
    Reference,
    adjust,
    chi2_test,
    compare,
    js_distance,
    ks_2samp,
    psi,
    wasserstein,
)
from streams.generator import Scenario, StreamGenerator

RNG = np.random.default_rng(20260101)

# (size of a, size of b, how b differs): equal and unequal sizes, the exact and asymptotic
# p-value paths (scipy's 'auto' is exact up to 10,000), tiny samples, ties and integers
SAMPLES: list[tuple[int, int, str]] = [
    (1, 1, "normal"),
    (1, 3, "normal"),
    (5, 2, "normal"),
    (8, 8, "integers"),
    (30, 40, "shifted"),
    (200, 200, "ties"),
    (1000, 1000, "normal"),
    (1000, 5000, "shifted"),
    (999, 5000, "normal"),
    (1000, 5000, "far"),
    (4999, 5000, "integers"),
    (5000, 5000, "far"),
    (10_000, 10_000, "slightly"),
    (10_000, 9_999, "normal"),
    (10_001, 3_000, "shifted"),
    (12_000, 12_000, "ties"),
    (50, 10_000, "far"),
]


def sample(n: int, how: str, rng: np.random.Generator) -> np.ndarray:
    if how == "integers":
        return rng.integers(0, 6, n).astype(np.float64)
    if how == "ties":
        return np.round(rng.normal(0.1, 1, n), 1)
    shift = {"normal": 0.0, "slightly": 0.03, "shifted": 0.3, "far": 1.5}[how]
    return rng.normal(shift, 1, n)


def scipy_ks(a: np.ndarray, b: np.ndarray) -> Any:
    with warnings.catch_warnings():  # scipy warns where its exact p-value fails and it falls back
        warnings.simplefilter("ignore", RuntimeWarning)
        return stats.ks_2samp(a, b)


# --- each statistic equals scipy ---------------------------------------------------------------


@pytest.mark.parametrize(("n1", "n2", "how"), SAMPLES)
def test_ks_2samp_equals_scipy(n1: int, n2: int, how: str) -> None:
    rng = np.random.default_rng(n1 * 7919 + n2)
    a = sample(n1, "ties" if how == "ties" else "integers" if how == "integers" else "normal", rng)
    b = sample(n2, how, rng)
    expected = scipy_ks(a, b)
    statistic, p_value = ks_2samp(a, b)
    assert statistic == pytest.approx(expected.statistic, abs=1e-12)
    assert p_value == pytest.approx(expected.pvalue, abs=1e-9)
    assert ks_2samp(b, a) == pytest.approx((statistic, p_value), abs=1e-12)


@pytest.mark.parametrize(("n1", "n2"), [(50, 70), (200, 1000), (1000, 5000), (999, 5000), (3000, 7001), (50, 10_000)])
def test_ks_tiny_p_values_stay_within_1e9_of_scipy_exact(n1: int, n2: int) -> None:
    """The one shortcut: unequal sizes, asymptotic p below 1e-15, so the exact one is skipped."""
    rng = np.random.default_rng(n1 + n2)
    for shift in (0.6, 1.0, 2.0, 4.0):
        a, b = rng.normal(0, 1, n1), rng.normal(shift, 1, n2)
        expected = scipy_ks(a, b)
        statistic, p_value = ks_2samp(a, b)
        assert statistic == pytest.approx(expected.statistic, abs=1e-12)
        assert p_value == pytest.approx(expected.pvalue, abs=1e-9)


@pytest.mark.parametrize(("n1", "n2", "how"), SAMPLES)
def test_wasserstein_equals_scipy(n1: int, n2: int, how: str) -> None:
    rng = np.random.default_rng(n1 + 31 * n2)
    a, b = sample(n1, "normal", rng), sample(n2, how, rng)
    assert wasserstein(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 12])
def test_chi2_test_equals_scipy_chi2_contingency(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(20):
        ref = rng.integers(0, 400, k)
        cur = rng.integers(0, 60, k)
        ref[0], cur[0] = ref[0] + 1, cur[0] + 1
        keep = (ref + cur) > 0
        expected = stats.chi2_contingency(np.stack((ref[keep], cur[keep])), correction=False)
        statistic, p_value, dof = chi2_test(ref, cur)
        assert statistic == pytest.approx(expected.statistic, rel=1e-12, abs=1e-12)
        assert p_value == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-15)
        assert dof == expected.dof


def test_chi2_test_takes_mappings_and_a_category_unseen_in_the_reference() -> None:
    statistic, p_value, dof = chi2_test({"a": 90, "b": 10}, {"a": 40, "b": 5, "new": 5})
    expected = stats.chi2_contingency([[90, 10, 0], [40, 5, 5]], correction=False)
    assert (statistic, p_value, dof) == pytest.approx((expected.statistic, expected.pvalue, expected.dof))
    assert p_value < 0.01  # a new category is evidence of drift
    assert chi2_test({"a": 10, "b": 0}, {"a": 5}) == (0.0, 1.0, 0)  # one category seen: nothing to test


@pytest.mark.parametrize("k", [2, 4, 30])
def test_js_distance_equals_scipy(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(20):
        p, q = rng.integers(0, 50, k).astype(float), rng.random(k)
        p[0] += 1
        assert js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-12)
    assert js_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)


@pytest.mark.parametrize("m", [1, 2, 7, 20, 100])
def test_adjust_equals_scipy_false_discovery_control_and_bonferroni(m: int) -> None:
    rng = np.random.default_rng(m)
    p = rng.random(m) ** 4
    p[: m // 3] = p[0]  # ties
    assert adjust(p).tolist() == pytest.approx(stats.false_discovery_control(p, method="bh").tolist(), abs=1e-15)
    assert adjust(p, "bonferroni").tolist() == pytest.approx(np.minimum(p * m, 1).tolist())
    q = adjust(p)
    q[0] = 2.0
    assert p[0] != 2.0, "the adjusted p-values are a new array, even for one"


def test_js_distance_of_two_nearly_equal_distributions_is_small_not_nan() -> None:
    """Where rounding makes the divergence a hair below 0, scipy's square root gives nan (and warns)."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = rng.integers(1, 10_000, 10).astype(float)
        distance = js_distance(p, p * (1 + rng.normal(0, 1e-12, 10)))
        assert 0.0 <= distance < 1e-6


def test_drift_statistics_use_public_scipy_only_and_import_it_lazily() -> None:
    """A private scipy function can vanish in any release; and a job that only builds a Reference
    (every training) should not pay scipy's import."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    source = (ROOT / "streams" / "drift.py").read_text()
    assert "scipy.stats._" not in source and "scipy._" not in source
    probe = "import sys, streams.drift; print(sorted(m for m in sys.modules if m.startswith('scipy')))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- PSI ---------------------------------------------------------------------------------------


def test_psi_is_zero_for_one_sample_and_small_for_two_samples_of_one_distribution() -> None:
    x = RNG.normal(size=5000)
    assert psi(x, x) == 0.0
    assert psi(x, RNG.normal(size=5000)) < 0.02


def test_psi_is_large_for_a_shift_and_grows_with_it() -> None:
    x = RNG.normal(size=5000)
    small, large = psi(x, RNG.normal(0.5, 1, 5000)), psi(x, RNG.normal(1.5, 1, 5000))
    assert 0.15 < small < large
    assert large > 1.0


def test_psi_puts_values_outside_the_reference_range_in_the_end_bins() -> None:
    x = np.arange(1000.0)
    # everything lands in the last bin: 0.9 * ln(1 / 0.1) + 9 * (1e-4 - 0.1) * ln(1e-4 / 0.1)
    expected = 0.9 * math.log(10) + 9 * (1e-4 - 0.1) * math.log(1e-3)
    assert psi(x, x + 10_000) == pytest.approx(expected)
    assert psi(x, x - 10_000) == pytest.approx(expected)


def test_psi_merges_repeated_edges_of_a_tied_reference() -> None:
    tied = np.concatenate((np.zeros(900), np.arange(1.0, 101.0)))  # 90% zeros: the deciles repeat
    assert psi(tied, tied) == 0.0
    assert psi(tied, np.ones(100)) > 1.0
    assert math.isfinite(psi(np.zeros(10), np.ones(10)))


def test_a_value_that_holds_several_bins_has_a_bin_of_its_own_so_a_shift_up_from_it_counts() -> None:
    """49 zeros and one 7: the deciles all fall on 0. Merged into the bin above, 0 shared it with
    everything larger, and a shift from 0 to 500 gave PSI 0 (KS p = 4e-20), so the AND rule never
    flagged it; a shift down was caught. Both directions count now, through `compare` too."""
    tied = np.array([0.0] * 49 + [7.0])
    assert psi(tied, tied) == 0.0
    assert psi(tied, np.full(25, 500.0)) > 1.0 and psi(tied, np.full(25, -500.0)) > 1.0
    ref = Reference.from_columns({"x": np.zeros(50)}, {"x": "numeric"})
    up = compare(ref, {"x": np.full(25, 500.0)}).feature("x")
    assert up.psi is not None and up.psi > 1.0 and up.drifted
    assert Reference.from_json(json.loads(json.dumps(ref.to_json()))) == ref, "the edge survives JSON"


# --- the reference -----------------------------------------------------------------------------


def test_reference_samples_without_replacement_and_round_trips_through_json() -> None:
    columns: dict[str, Any] = {
        "x": np.concatenate((RNG.normal(size=20_000) / 3, [np.nan] * 7)),
        "n": [None, 1, 2, 3] * 10,
        "c": ["a", "b", None, "a"] * 10,
        "flag": [True, False, True, float("nan")] * 10,
    }
    kinds: dict[str, Kind] = {"x": "numeric", "n": "numeric", "c": "categorical", "flag": "categorical"}
    ref = Reference.from_columns(columns, kinds, sample_size=5000, seed=3)
    x = ref.features["x"]
    assert isinstance(x, NumericReference)
    assert (x.count, x.nulls, len(x.sample)) == (20_000, 7, 5000)
    assert np.all(np.diff(x.sample) >= 0)
    assert len(np.unique(x.sample)) == 5000  # no value drawn twice
    assert np.isin(x.sample, columns["x"]).all()
    assert sum(x.bin_counts) == 20_000 and len(x.bin_counts) == len(x.edges) + 1 == 10
    n = ref.features["n"]
    assert isinstance(n, NumericReference) and (n.count, n.nulls) == (30, 10)
    assert ref.features["c"] == CategoricalReference(count=30, nulls=10, frequencies={"a": 20, "b": 10})
    assert ref.features["flag"] == CategoricalReference(count=30, nulls=10, frequencies={"False": 10, "True": 20})
    assert Reference.from_columns(columns, kinds, sample_size=5000, seed=3) == ref
    assert not np.array_equal(Reference.from_columns(columns, kinds, seed=4).features["x"].sample, x.sample)  # type: ignore[union-attr]

    text = json.dumps(ref.to_json())
    again = Reference.from_json(json.loads(text))
    assert again == ref
    assert again.features["x"].sample.tobytes() == x.sample.tobytes()  # type: ignore[union-attr]


def test_reference_from_json_rejects_what_it_did_not_write() -> None:
    with pytest.raises(ValueError, match="format_version"):
        Reference.from_json({"format_version": 99})
    with pytest.raises(ValueError, match="not a drift reference"):
        Reference.from_json({"format_version": 1, "features": {"x": {"kind": "numeric"}}})


# --- detection on the generator's scenarios ----------------------------------------------------

WINDOW = 1000
REFERENCE = 5000
DRIFT_AT = REFERENCE + 3 * WINDOW  # three windows without drift after the reference's records


def kinds_of(config: PipelineConfig, with_label: bool = False) -> dict[str, Kind]:
    kinds: dict[str, Kind] = {
        f.name: "numeric" if f.type in ("int", "float") else "categorical" for f in config.schema.features
    }
    if with_label:
        kinds[config.schema.label.name] = "categorical"
    return kinds


def columns_of(records: list[dict[str, Any]], names: list[str]) -> dict[str, list[Any]]:
    return {name: [r[name] for r in records] for name in names}


def scenario_reports(
    config: PipelineConfig, scenario: Scenario, with_label: bool = False, windows: int = 6
) -> tuple[list[DriftReport], list[DriftReport]]:
    """Reports on the windows before and after the change, against the first records of the stream."""
    generator = StreamGenerator(config, seed=5, scenario=scenario, drift_at=DRIFT_AT)
    records = [r.record for r in generator.records(DRIFT_AT + windows * WINDOW)]
    kinds = kinds_of(config, with_label)
    names = list(kinds)
    reference = Reference.from_columns(columns_of(records[:REFERENCE], names), kinds)
    reports = [
        compare(reference, columns_of(records[start : start + WINDOW], names))
        for start in range(REFERENCE, len(records), WINDOW)
    ]
    return reports[:3], reports[3:]


def test_covariate_drift_is_found_in_every_window_after_the_change(demo_config: PipelineConfig) -> None:
    before, after = scenario_reports(demo_config, "covariate")
    assert not any(r.drifted for r in before)
    assert all(r.drifted for r in after)
    assert all({"monthly_charges", "plan"} <= set(r.drifted_features) for r in after)  # the config's drift features
    assert all(set(r.drifted_features) <= {"monthly_charges", "plan"} for r in after)


def test_concept_drift_leaves_the_features_alone(demo_config: PipelineConfig) -> None:
    """P(y | x) changes, P(x) does not: no feature drift, by design (performance monitoring catches it)."""
    before, after = scenario_reports(demo_config, "concept", with_label=True)
    assert not any(r.drifted for r in before + after)
    assert all(f.psi < 0.05 for r in after for f in r.features)


def test_prior_drift_moves_the_label_and_the_features_that_depend_on_it(demo_config: PipelineConfig) -> None:
    """P(y) moves, P(x | y) stays: the label column drifts, and so do the label-dependent features."""
    before, after = scenario_reports(demo_config, "prior", with_label=True)
    assert not any(r.drifted for r in before)
    assert all("churned" in r.drifted_features for r in after)
    assert all(r.feature("churned").psi > 0.2 for r in after)
    # without the (delayed) label, the features still show it: monthly_charges depends most on the label
    assert sum("monthly_charges" in r.drifted_features for r in after) >= len(after) - 1
    assert all(r.feature("monthly_charges").adjusted_p_value < 1e-4 for r in after)
    # features with little effect on the label barely move
    assert all(r.feature("tenure_months").psi < 0.05 and r.feature("region").psi < 0.05 for r in after)


def test_prediction_drift_is_one_more_numeric_column() -> None:
    rng = np.random.default_rng(9)
    reference = Reference.from_columns({"p_yes": rng.beta(2, 5, 10_000)}, {"p_yes": "numeric"})
    assert not compare(reference, {"p_yes": rng.beta(2, 5, 2000)}).drifted
    report = compare(reference, {"p_yes": rng.beta(3, 4, 2000)})
    assert report.drifted_features == ("p_yes",)
    assert report.features[0].wasserstein == pytest.approx(3 / 7 - 2 / 7, abs=0.02)


# --- false alarms ------------------------------------------------------------------------------

TRIALS = 200
ALPHA = 0.01
# flagged windows out of TRIALS with no drift: at most the level plus three binomial standard deviations
ALLOWED = math.floor(TRIALS * ALPHA + 3 * math.sqrt(TRIALS * ALPHA * (1 - ALPHA)))  # 6


def test_false_alarm_rate_without_drift_is_within_the_level(demo_config: PipelineConfig) -> None:
    """200 independent-enough trials: a fresh reference of 5,000 and a window of 1,000 from one stream."""
    kinds = kinds_of(demo_config, with_label=True)
    records = [r.record for r in StreamGenerator(demo_config, seed=21).records(120_000)]
    pool = {
        name: np.array([r[name] for r in records], dtype=np.float64 if kind == "numeric" else object)
        for name, kind in kinds.items()
    }
    rng = np.random.default_rng(0)
    flagged = flagged_by_test = flagged_uncorrected = 0
    for _ in range(TRIALS):
        rows = rng.choice(len(records), size=6000, replace=False)
        reference = Reference.from_columns({n: c[rows[:5000]] for n, c in pool.items()}, kinds, seed=int(rows[0]))
        window = {n: c[rows[5000:]] for n, c in pool.items()}
        report = compare(reference, window, alpha=ALPHA)
        flagged += report.drifted
        flagged_by_test += compare(reference, window, alpha=ALPHA, psi_threshold=0.0).drifted
        flagged_uncorrected += min(f.p_value for f in report.features) < ALPHA
    assert flagged <= flagged_by_test <= ALLOWED
    # the check can fail: testing 8 columns without the correction is over the line
    assert flagged_uncorrected > ALLOWED


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_reference() -> Reference:
    rng = np.random.default_rng(1)
    return Reference.from_columns(
        {"x": rng.normal(size=500), "c": rng.choice(["a", "b"], 500)}, {"x": "numeric", "c": "categorical"}
    )


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ({}, "no columns"),
        ({"x": [], "c": []}, "empty"),
        ({"x": [None, None], "c": ["a", "b"]}, "'x': every value in the window is null"),
        ({"x": [1.0, 2.0], "c": [None, float("nan")]}, "'c': every value in the window is null"),
        ({"x": [1.0, 2.0], "zz": ["a", "b"]}, "unknown feature.*'zz'"),
        ({"x": [1.0, float("inf")]}, "'x': 1 infinite value"),
        ({"x": [1.0, "one"]}, "'x': expected numbers"),
        ({"x": [1.0, 2.0], "c": ["a"]}, "differ in length"),
        ({"x": 3.0}, "'x': expected a column"),
    ],
)
def test_bad_windows_get_a_clear_error(small_reference: Reference, window: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compare(small_reference, window)


def test_nulls_are_counted_not_tested(small_reference: Reference) -> None:
    rng = np.random.default_rng(2)
    x: list[float | None] = list(rng.normal(size=300))
    x[:100] = [None] * 50 + [float("nan")] * 50
    report = compare(small_reference, {"x": x, "c": ["a", None] * 150})
    assert (report.feature("x").count, report.feature("x").nulls) == (200, 100)
    assert (report.feature("c").count, report.feature("c").nulls) == (150, 150)
    assert report.window_size == 300
    assert report.feature("x").drifted is False


def test_bad_arguments_get_a_clear_error(small_reference: Reference) -> None:
    with pytest.raises(ValueError, match="alpha"):
        compare(small_reference, {"x": [1.0]}, alpha=0)
    with pytest.raises(ValueError, match="correction"):
        compare(small_reference, {"x": [1.0]}, correction="holm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        ks_2samp([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        wasserstein([1.0, math.nan], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        psi([1.0, 2.0], [math.inf])
    with pytest.raises(ValueError, match="no column"):
        Reference.from_columns({}, {"x": "numeric"})
    with pytest.raises(ValueError, match="no non-null values"):
        Reference.from_columns({"x": [None]}, {"x": "numeric"})
    with pytest.raises(ValueError, match="kind"):
        Reference.from_columns({"x": [1]}, {"x": "text"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-negative"):
        chi2_test([1, -1], [1, 1])
    with pytest.raises(ValueError, match="both"):
        chi2_test({"a": 1}, [1])


def test_a_report_is_plain_json(small_reference: Reference) -> None:
    report = compare(small_reference, {"x": np.linspace(-1, 1, 100), "c": ["a", "b"] * 50})
    data = json.loads(json.dumps(report.to_json()))
    assert data["window_size"] == 100
    assert [f["name"] for f in data["features"]] == ["x", "c"]
    assert data["features"][1]["wasserstein"] is None
