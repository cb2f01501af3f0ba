"""Drift statistics: pure functions over arrays, and one `compare` of a window against a reference.

Pure: data in, data out; no Kafka, no Ray, no clock. The chi-square test, the Jensen–Shannon
distance and Benjamini–Hochberg are scipy's. The KS statistic and Wasserstein distance are our
own, for the monitor's case: one `Reference` built once from the training data (a sorted sample
per numeric feature, value counts per categorical one), compared with many windows, so one merge
per window of two sorted samples gives both; the tests pin them to `scipy.stats`.

- numeric features: two-sample Kolmogorov–Smirnov test (`ks_2samp`), PSI over reference
  deciles (`psi`), Jensen–Shannon distance over the same bins (`js_distance`), Wasserstein-1
  distance (`wasserstein`);
- categorical features: chi-square test of homogeneity (`chi2_test`), PSI and Jensen–Shannon
  distance over the categories;
- across features: a multiple-testing correction of the p-values (`adjust`, Benjamini–Hochberg
  by default, or Bonferroni).

`compare` decides per feature, with the rule in its docstring; a model's predicted probability
is one more numeric column (prediction drift).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> train = {"x": rng.normal(size=5000), "c": rng.choice(["a", "b", "c"], size=5000)}
>>> ref = Reference.from_columns(train, {"x": "numeric", "c": "categorical"})
>>> compare(ref, {"x": rng.normal(size=1000), "c": rng.choice(["a", "b", "c"], size=1000)}).drifted
False
>>> report = compare(ref, {"x": rng.normal(0.5, 1, size=1000), "c": rng.choice(["a", "b", "c"], size=1000)})
>>> report.drifted_features
('x',)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

# scipy is imported where a test needs it: a job that only builds a Reference (every training)
# would otherwise pay about a second of imports for nothing.


__all__ = [
    "PSI_THRESHOLD",
    "CategoricalReference",
    "DriftReport",
    "FeatureReference",
    "FeatureStats",
    "Kind",
    "NumericReference",
    "Reference",
    "adjust",
    "chi2_test",
    "compare",
    "js_distance",
    "ks_2samp",
    "psi",
    "wasserstein",
]

Kind = Literal["numeric", "categorical"]
Correction = Literal["bh", "bonferroni"]
FloatArray = npt.NDArray[np.float64]

FORMAT_VERSION = 1
PSI_THRESHOLD = 0.05
"""The default effect floor of `compare`: a significant change with a smaller PSI is not drift."""

_EPS = 1e-4  # the floor of a bin's proportion in PSI (see psi)
_KS_EXACT_MAX_N = 10_000  # scipy's method='auto': exact p-value when both sizes are at most this
_KS_TINY_P = 1e-15  # below this asymptotic p-value, the exact one is below 1e-9 too (see ks_2samp)
_KS_SHORTCUT_MIN_N = 50  # ... for samples of at least this many (smaller ones are cheap to do exactly)


# --- statistics ------------------------------------------------------------------------------


def ks_2samp(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[float, float]:
    """Two-sample, two-sided Kolmogorov–Smirnov test: `(statistic, p_value)`.

    Equals `scipy.stats.ks_2samp(a, b)` (method 'auto': exact p-value when both samples have at
    most 10,000 values, asymptotic otherwise), to 1e-9 absolute on the p-value. Two
    differences, both for speed: with unequal sizes of at least 50 each, an asymptotic p-value
    below 1e-15 is returned as is (the exact one, far costlier there, is then below 1e-11);
    and where scipy warns that its exact computation failed and uses the asymptotic p-value,
    this does the same silently. The statistic comes from one merge of the sorted samples; in
    `compare` the reference's sample is sorted once, when the `Reference` is built.

    >>> ks_2samp([1, 2, 3, 4], [3, 4, 5, 6])
    (0.5, 0.771...)
    """
    x = np.sort(_finite(a, "a"))
    y = np.sort(_finite(b, "b"))
    return _ks_sorted(x, y)


def _ks_sorted(x: FloatArray, y: FloatArray) -> tuple[float, float]:
    d, _ = _ecdf_gaps(x, y, need_area=False)
    return _ks_pvalue(x, y, d)


def _ecdf_gaps(x: FloatArray, y: FloatArray, need_area: bool) -> tuple[float, float]:
    """The KS statistic and (if asked) the Wasserstein-1 distance of two sorted samples.

    Both come from the gap between the two empirical CDFs at every observed value, with the
    same floats as scipy's `searchsorted(..., 'right') / n`: one stable merge of the two sorted
    samples counts how many of each lie at or below every point, and within a run of equal
    values only the last point is a CDF value (the others add zero area, their width being 0).
    """
    n1 = len(x)
    points = np.concatenate((x, y))
    order = np.argsort(points, kind="stable")  # two sorted runs: a merge
    points = points[order]
    at_most_x = np.cumsum(order < n1)
    gap = at_most_x / n1 - (np.arange(1, len(points) + 1) - at_most_x) / len(y)
    last = np.empty(len(points), dtype=bool)
    np.not_equal(points[1:], points[:-1], out=last[:-1])
    last[-1] = True
    cdf_gap = gap[last]
    d = max(float(cdf_gap.max()), float(np.clip(-cdf_gap.min(), 0.0, 1.0)))
    area = float(np.dot(np.abs(gap[:-1]), np.diff(points))) if need_area else math.nan
    return d, area


def _ks_pvalue(x: FloatArray, y: FloatArray, d: float) -> tuple[float, float]:
    """scipy's two-sided p-value for statistic `d` of the sorted samples `x` and `y` (and the
    statistic, rounded as scipy rounds it).

    With unequal sizes the exact p-value comes from `scipy.stats.ks_2samp(x, y, method="exact")`
    itself: its compiled exact distribution has no other public entry point, and recomputing the
    statistic there costs little beside it (the samples are already sorted).
    """
    n1, n2 = len(x), len(y)
    if max(n1, n2) > _KS_EXACT_MAX_N:
        return d, _ks_asymptotic(n1, n2, d)
    lcm = (n1 // math.gcd(n1, n2)) * n2
    h = int(np.round(d * lcm))
    d = h / lcm
    if h == 0:
        return d, 1.0
    if n1 == n2:
        p = _ks_exact_equal(n1, h)
        return d, (p if 0.0 <= p <= 1.0 else _ks_asymptotic(n1, n2, d))
    asymptotic = _ks_asymptotic(n1, n2, d)
    if min(n1, n2) >= _KS_SHORTCUT_MIN_N and asymptotic < _KS_TINY_P:
        return d, asymptotic
    from scipy import stats

    with warnings.catch_warnings():  # where its exact computation fails scipy warns and goes asymptotic
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ks_2samp(x, y, method="exact")
    return float(result.statistic), float(np.clip(result.pvalue, 0.0, 1.0))


def _ks_asymptotic(n1: int, n2: int, d: float) -> float:
    from scipy import stats

    m, n = sorted((float(n1), float(n2)), reverse=True)
    return float(np.clip(stats.kstwo.sf(d, np.round(m * n / (m + n))), 0.0, 1.0))


def _ks_exact_equal(n: int, h: int) -> float:
    """P(D_{n,n} >= h/n), as scipy's `_compute_prob_outside_square`, with the inner products vectorised.

    P = 2 * A0 * (1 - A1 * (1 - A2 * (...))), with Ak = prod_{j<h} (n - k*h - j) / (n + k*h + j + 1).
    """
    k = np.arange(n // h + 1, dtype=np.float64)[:, None] * h
    j = np.arange(h, dtype=np.float64)[None, :]
    with np.errstate(under="ignore"):
        terms = np.prod((n - k - j) / (n + k + j + 1.0), axis=1)
    p = 0.0
    for a in terms[::-1].tolist():
        p = a * (1.0 - p)
    return 2.0 * p


def wasserstein(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Wasserstein-1 (earth mover's) distance between two samples; equals `scipy.stats.wasserstein_distance`.

    >>> wasserstein([0, 1, 3], [5, 6, 8])
    5.0
    """
    _, area = _ecdf_gaps(np.sort(_finite(a, "a")), np.sort(_finite(b, "b")), need_area=True)
    return area


def psi(reference: npt.ArrayLike, current: npt.ArrayLike, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `current` against `reference`.

    Bins are the reference's quantiles (`bins` equal-frequency bins; repeated edges, from ties,
    are merged, so a heavily tied reference has fewer bins). Each bin holds [lower, upper);
    values below the first edge or above the last fall in the end bins. PSI is
    sum((c - r) * ln(c / r)) over the bins' proportions, each floored at `eps` so an empty bin
    counts as rare rather than impossible.

    >>> psi([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    0.0
    """
    ref = np.sort(_finite(reference, "reference"))
    cur = np.sort(_finite(current, "current"))
    edges = _quantile_edges(ref, bins)
    return _psi_counts(_bin_counts(ref, edges), _bin_counts(cur, edges), eps)


def _quantile_edges(sorted_values: FloatArray, bins: int) -> FloatArray:
    """The interior edges of `bins` equal-frequency bins. A value that holds more than one bin's
    share (quantiles that collapse on it) gets a bin of its own, [v, next float after v): merged
    into the bin above it, a shift from it to anything larger would move nothing between bins.

    >>> _quantile_edges(np.array([0.0] * 49 + [7.0]), 10).tolist()
    [0.0, 5e-324]
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, not {bins}")
    edges, repeats = np.unique(np.quantile(sorted_values, np.arange(1, bins) / bins), return_counts=True)
    atoms = edges[repeats > 1]
    return np.unique(np.concatenate([edges, np.nextafter(atoms, np.inf)])) if len(atoms) else edges


def _bin_counts(sorted_values: FloatArray, edges: FloatArray) -> npt.NDArray[np.int64]:
    """Counts per bin [e[i-1], e[i]) of a sorted array (the end bins are open)."""
    cuts = np.concatenate(([0], sorted_values.searchsorted(edges, "left"), [len(sorted_values)]))
    return np.diff(cuts).astype(np.int64)


def _psi_counts(reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike, eps: float) -> float:
    r = np.asarray(reference_counts, dtype=np.float64)
    c = np.asarray(current_counts, dtype=np.float64)
    r = np.maximum(r / r.sum(), eps)
    c = np.maximum(c / c.sum(), eps)
    return float(np.sum((c - r) * np.log(c / r)))


def js_distance(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Jensen–Shannon distance (base 2, so in [0, 1]) of two distributions given as counts or weights.

    `scipy.spatial.distance.jensenshannon(p, q, base=2)` (both are normalised first), after checking
    the input, and 0 rather than nan where rounding makes two nearly equal distributions' divergence
    negative.

    >>> js_distance([1, 0], [0, 1])
    1.0
    """
    pa = np.asarray(p, dtype=np.float64)
    qa = np.asarray(q, dtype=np.float64)
    if pa.shape != qa.shape or pa.ndim != 1 or len(pa) == 0:
        raise ValueError(f"p and q must be 1-d and of one length, not shapes {pa.shape} and {qa.shape}")
    if not (np.all(np.isfinite(pa)) and np.all(np.isfinite(qa)) and pa.min() >= 0 and qa.min() >= 0):
        raise ValueError("p and q must be finite and non-negative")
    if pa.sum() <= 0 or qa.sum() <= 0:
        raise ValueError("p and q must each have a positive total")
    from scipy.spatial.distance import jensenshannon

    with np.errstate(invalid="ignore"):  # nearly equal p and q can round to sqrt(-1e-17): nan, read as 0
        distance = float(jensenshannon(pa, qa, base=2))
    return 0.0 if math.isnan(distance) else distance


def chi2_test(
    reference_counts: Mapping[str, int] | Sequence[int] | npt.ArrayLike,
    current_counts: Mapping[str, int] | Sequence[int] | npt.ArrayLike,
) -> tuple[float, float, int]:
    """Chi-square test that two samples of a categorical variable share one distribution.

    `(statistic, p_value, dof)` of `scipy.stats.chi2_contingency([ref, cur],
    correction=False)` on the 2 x k table of counts. It is the test of homogeneity, not a
    goodness-of-fit test against the reference's frequencies taken as exact: the reference is
    a sample too, and treating it as exact raises the false-alarm rate above `alpha` once the
    window is not small next to it.

    Counts are two mappings category -> count (categories are the union of both; a category
    seen only in the window, say a new one, weighs as evidence of drift) or two aligned
    sequences. Categories with no count on either side are dropped; with fewer than two left,
    the statistic is 0 and the p-value 1 (dof 0), as scipy does.

    >>> chi2_test({"a": 50, "b": 50}, {"a": 30, "b": 70})
    (8.333..., 0.00389..., 1)
    """
    ref, cur = _aligned_counts(reference_counts, current_counts)
    keep = (ref + cur) > 0
    ref, cur = ref[keep], cur[keep]
    if ref.sum() <= 0 or cur.sum() <= 0:
        raise ValueError("chi2_test needs a positive total count on both sides")
    if len(ref) < 2:
        return 0.0, 1.0, 0
    from scipy import stats

    result = stats.chi2_contingency(np.stack((ref, cur)), correction=False)
    return float(result.statistic), float(result.pvalue), int(result.dof)


def _aligned_counts(
    reference_counts: Mapping[str, int] | Sequence[int] | npt.ArrayLike,
    current_counts: Mapping[str, int] | Sequence[int] | npt.ArrayLike,
) -> tuple[FloatArray, FloatArray]:
    if isinstance(reference_counts, Mapping) or isinstance(current_counts, Mapping):
        if not (isinstance(reference_counts, Mapping) and isinstance(current_counts, Mapping)):
            raise ValueError("give both counts as mappings (category -> count) or both as sequences")
        keys = sorted(set(reference_counts) | set(current_counts), key=str)
        ref = np.array([reference_counts.get(k, 0) for k in keys], dtype=np.float64)
        cur = np.array([current_counts.get(k, 0) for k in keys], dtype=np.float64)
    else:
        ref = np.asarray(reference_counts, dtype=np.float64)
        cur = np.asarray(current_counts, dtype=np.float64)
        if ref.ndim != 1 or ref.shape != cur.shape:
            raise ValueError(f"counts must be 1-d and aligned, not shapes {ref.shape} and {cur.shape}")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(cur))) or min(ref.min(initial=0), cur.min(initial=0)) < 0:
        raise ValueError("counts must be finite and non-negative")
    return ref, cur


def adjust(pvalues: npt.ArrayLike, method: Correction = "bh") -> FloatArray:
    """P-values adjusted for testing several features at once, in the input's order.

    `bh`: Benjamini–Hochberg (`scipy.stats.false_discovery_control(p, method='bh')`);
    it bounds the expected share of false discoveries, and when no feature drifts, the chance
    of any discovery, by the level. `bonferroni`: min(1, p * m), bounding the chance of any
    false discovery by the level under any dependence, at a loss of power.

    >>> adjust([0.5, 0.6, 0.1, 0.001]).tolist()
    [0.6, 0.6, 0.2, 0.004]
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be 1-d, not of shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("pvalues must be numbers in [0, 1]")
    m = len(p)
    if method == "bonferroni":
        return np.minimum(p * m, 1.0)
    if method != "bh":
        raise ValueError(f"unknown correction {method!r}; choose 'bh' or 'bonferroni'")
    if m <= 1:
        return p.copy()
    from scipy import stats

    return np.asarray(stats.false_discovery_control(p, method="bh"), dtype=np.float64)


# --- the reference ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NumericReference:
    """A numeric feature's reference: a sorted sample for KS and Wasserstein, and its PSI bins.

    `count` and `nulls` count the whole training column; `edges` are the interior bin edges
    (deciles by default) and `bin_counts` the whole column's counts per bin.
    """

    count: int
    nulls: int
    edges: tuple[float, ...]
    bin_counts: tuple[int, ...]
    sample: FloatArray

    kind: ClassVar[Kind] = "numeric"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NumericReference):
            return NotImplemented
        return (
            (self.count, self.nulls, self.edges, self.bin_counts)
            == (other.count, other.nulls, other.edges, other.bin_counts)
            and self.sample.shape == other.sample.shape
            and bool(np.array_equal(self.sample, other.sample))
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "numeric",
            "count": self.count,
            "nulls": self.nulls,
            "edges": list(self.edges),
            "bin_counts": list(self.bin_counts),
            "sample": self.sample.tolist(),
        }


@dataclass(frozen=True)
class CategoricalReference:
    """A categorical feature's reference: the count of each value (as text) in the training column."""

    count: int
    nulls: int
    frequencies: dict[str, int]

    kind: ClassVar[Kind] = "categorical"

    def to_json(self) -> dict[str, Any]:
        return {"kind": "categorical", "count": self.count, "nulls": self.nulls, "frequencies": dict(self.frequencies)}


FeatureReference = NumericReference | CategoricalReference


@dataclass(frozen=True)
class Reference:
    """What windows are compared against, built once from the training data and stored with the model.

    Per numeric feature a sorted random sample (without replacement) of at most `sample_size`
    values and the quantile bins; per categorical feature the value counts. Nulls (None, NaN)
    are counted, never tested. `to_json()` is a plain JSON-able dict whose floats round-trip
    exactly through `json`.
    """

    features: dict[str, FeatureReference]
    sample_size: int = 5000
    seed: int = 0
    bins: int = 10

    @classmethod
    def from_columns(
        cls,
        columns: Mapping[str, Any],
        kinds: Mapping[str, Kind],
        sample_size: int = 5000,
        seed: int = 0,
        bins: int = 10,
    ) -> Reference:
        """Profile each column named in `kinds` ("numeric" or "categorical")."""
        if sample_size < 1:
            raise ValueError(f"sample_size must be at least 1, not {sample_size}")
        if bins < 2:
            raise ValueError(f"bins must be at least 2, not {bins}")
        if not kinds:
            raise ValueError("kinds names no feature")
        missing = [name for name in kinds if name not in columns]
        if missing:
            raise ValueError(f"no column for feature(s) {', '.join(map(repr, missing))}")
        features: dict[str, FeatureReference] = {}
        for name, kind in kinds.items():
            if kind == "numeric":
                values, nulls = _numeric_column(name, columns[name])
                if len(values) == 0:
                    raise ValueError(f"feature {name!r}: no non-null values to build a reference from")
                ordered = np.sort(values)
                edges = _quantile_edges(ordered, bins)
                counts = _bin_counts(ordered, edges)
                if len(values) > sample_size:
                    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
                    ordered = np.sort(values[rng.choice(len(values), size=sample_size, replace=False)])
                ordered.setflags(write=False)
                features[name] = NumericReference(
                    count=len(values),
                    nulls=nulls,
                    edges=tuple(edges.tolist()),
                    bin_counts=tuple(counts.tolist()),
                    sample=ordered,
                )
            elif kind == "categorical":
                frequencies, nulls = _categorical_column(columns[name])
                if not frequencies:
                    raise ValueError(f"feature {name!r}: no non-null values to build a reference from")
                features[name] = CategoricalReference(
                    count=sum(frequencies.values()), nulls=nulls, frequencies=frequencies
                )
            else:
                raise ValueError(f"feature {name!r}: kind must be 'numeric' or 'categorical', not {kind!r}")
        return cls(features=features, sample_size=sample_size, seed=seed, bins=bins)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "sample_size": self.sample_size,
            "seed": self.seed,
            "bins": self.bins,
            "features": {name: f.to_json() for name, f in self.features.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        """The reference `to_json()` wrote; a clear ValueError for anything else."""
        try:
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version must be {FORMAT_VERSION}, not {data.get('format_version')!r}")
            features: dict[str, FeatureReference] = {}
            for name, spec in data["features"].items():
                if spec["kind"] == "numeric":
                    sample = np.asarray(spec["sample"], dtype=np.float64)
                    if sample.ndim != 1 or len(sample) == 0 or np.any(np.diff(sample) < 0):
                        raise ValueError(f"feature {name!r}: sample must be a non-empty sorted list")
                    sample.setflags(write=False)
                    edges = tuple(float(e) for e in spec["edges"])
                    bin_counts = tuple(int(c) for c in spec["bin_counts"])
                    if len(bin_counts) != len(edges) + 1:
                        raise ValueError(f"feature {name!r}: bin_counts must have len(edges) + 1 entries")
                    features[name] = NumericReference(
                        count=int(spec["count"]),
                        nulls=int(spec["nulls"]),
                        edges=edges,
                        bin_counts=bin_counts,
                        sample=sample,
                    )
                elif spec["kind"] == "categorical":
                    features[name] = CategoricalReference(
                        count=int(spec["count"]),
                        nulls=int(spec["nulls"]),
                        frequencies={str(k): int(v) for k, v in spec["frequencies"].items()},
                    )
                else:
                    raise ValueError(f"feature {name!r}: unknown kind {spec['kind']!r}")
            return cls(
                features=features,
                sample_size=int(data["sample_size"]),
                seed=int(data["seed"]),
                bins=int(data["bins"]),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a drift reference: {err!r}") from err


# --- comparing a window ----------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """One feature's statistics in one window, and whether it counts as drifted (see `compare`)."""

    name: str
    kind: Kind
    test: Literal["ks", "chi2"]
    statistic: float
    p_value: float
    adjusted_p_value: float
    psi: float
    js_distance: float
    wasserstein: float | None
    drifted: bool
    count: int
    nulls: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "test": self.test,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "adjusted_p_value": self.adjusted_p_value,
            "psi": self.psi,
            "js_distance": self.js_distance,
            "wasserstein": self.wasserstein,
            "drifted": self.drifted,
            "count": self.count,
            "nulls": self.nulls,
        }


@dataclass(frozen=True)
class DriftReport:
    """A window's verdict: drifted when any feature is, with the thresholds it was judged by."""

    features: tuple[FeatureStats, ...]
    window_size: int
    alpha: float
    psi_threshold: float
    correction: Correction

    @property
    def drifted(self) -> bool:
        return any(f.drifted for f in self.features)

    @property
    def drifted_features(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.drifted)

    def feature(self, name: str) -> FeatureStats:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "window_size": self.window_size,
            "drifted": self.drifted,
            "drifted_features": list(self.drifted_features),
            "alpha": self.alpha,
            "psi_threshold": self.psi_threshold,
            "correction": self.correction,
            "features": [f.to_json() for f in self.features],
        }


def compare(
    reference: Reference,
    window_columns: Mapping[str, Any],
    alpha: float = 0.01,
    psi_threshold: float = PSI_THRESHOLD,
    correction: Correction = "bh",
) -> DriftReport:
    """Compare one window's columns with the reference, feature by feature.

    A feature has drifted when its test rejects "same distribution" after the correction
    across the window's features (adjusted p < `alpha`) AND its PSI is at least
    `psi_threshold`. Both, because each alone misleads:

    - the test alone flags tiny shifts once windows are large (10,000 rows make a 0.05
      standard deviation shift significant), and nobody should retrain for those;
    - PSI alone has no error rate and is noisy on small windows (its mean under no drift is
      about (bins - 1) * (1/window + 1/reference): 0.1 is crossed by chance at about 100 rows).

    With both, a window without drift is flagged (any feature) with probability at most
    `alpha`: when no feature drifts, Benjamini–Hochberg (for independent or positively
    dependent tests) and Bonferroni (always) bound the chance of any rejection by the level,
    KS on tied, integer data is conservative, and the floor only removes flags. The tests
    measure this rate. With some features drifting, BH bounds the expected share of false
    ones among those flagged instead.

    The floor is an effect size: PSI between two normals `delta` standard deviations apart is
    about `delta ** 2`, so the default 0.05 asks for about 0.22 sd, below the rule-of-thumb
    0.1 ("moderate change") because the test already keeps chance out; it is there to ignore
    changes too small to matter, not to control false alarms. On the generator's stream:
    covariate drift (1.5 sd shift, category frequencies reversed) gives PSI near 2 and 0.5
    with p near 0; prior drift (P(y) from about 0.5 to 0.8) moves the label-dependent
    features by PSI 0.05 to 0.1 (and the label column, when given, by 0.3); concept drift
    changes P(y | x) only, so P(x) stays and feature drift does not fire, by design:
    performance on delayed labels is what catches it.

    `window_columns` maps feature names to array-likes of one length; every name must be in
    the reference (a ValueError otherwise), and reference features the window lacks are not
    compared (so one reference serves feature and prediction drift). Nulls (None, NaN) are
    counted and left out of the tests; infinities, an empty window or a column of nulls only
    are ValueErrors. The p-values are those of `ks_2samp` and `chi2_test`; for numbers PSI and
    the Jensen–Shannon distance are over the reference's bins, for categories over the
    categories; Wasserstein is in the feature's units.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")
    if psi_threshold < 0:
        raise ValueError(f"psi_threshold must be >= 0, not {psi_threshold}")
    if correction not in ("bh", "bonferroni"):
        raise ValueError(f"unknown correction {correction!r}; choose 'bh' or 'bonferroni'")
    if not window_columns:
        raise ValueError("the window has no columns")
    unknown = [name for name in window_columns if name not in reference.features]
    if unknown:
        raise ValueError(
            f"unknown feature(s) {', '.join(map(repr, unknown))}; the reference has "
            f"{', '.join(map(repr, reference.features))}"
        )
    sizes = {name: _length(name, column) for name, column in window_columns.items()}
    window_size = next(iter(sizes.values()))
    if len(set(sizes.values())) > 1:
        raise ValueError(f"window columns differ in length: {sizes}")
    if window_size == 0:
        raise ValueError("the window is empty")

    unadjusted = [_feature_stats(name, reference.features[name], column) for name, column in window_columns.items()]
    adjusted = adjust([f.p_value for f in unadjusted], correction).tolist()
    features = tuple(
        dataclasses.replace(f, adjusted_p_value=q, drifted=bool(q < alpha and f.psi >= psi_threshold))
        for f, q in zip(unadjusted, adjusted, strict=True)
    )
    return DriftReport(
        features=features, window_size=window_size, alpha=alpha, psi_threshold=psi_threshold, correction=correction
    )


def _feature_stats(name: str, ref: FeatureReference, column: Any) -> FeatureStats:
    """One feature's statistics, before the correction across features (so not yet judged)."""
    if isinstance(ref, NumericReference):
        values, nulls = _numeric_column(name, column)
        if len(values) == 0:
            raise ValueError(f"feature {name!r}: every value in the window is null ({nulls})")
        current = np.sort(values)
        d, area = _ecdf_gaps(ref.sample, current, need_area=True)
        d, p = _ks_pvalue(ref.sample, current, d)
        counts = _bin_counts(current, np.asarray(ref.edges, dtype=np.float64))
        return FeatureStats(
            name=name,
            kind="numeric",
            test="ks",
            statistic=d,
            p_value=p,
            adjusted_p_value=p,
            psi=_psi_counts(ref.bin_counts, counts, _EPS),
            js_distance=js_distance(ref.bin_counts, counts),
            wasserstein=area,
            drifted=False,
            count=len(current),
            nulls=nulls,
        )
    frequencies, nulls = _categorical_column(column)
    if not frequencies:
        raise ValueError(f"feature {name!r}: every value in the window is null ({nulls})")
    ref_counts, cur_counts = _aligned_counts(ref.frequencies, frequencies)
    statistic, p, _ = chi2_test(ref_counts, cur_counts)
    return FeatureStats(
        name=name,
        kind="categorical",
        test="chi2",
        statistic=statistic,
        p_value=p,
        adjusted_p_value=p,
        psi=_psi_counts(ref_counts, cur_counts, _EPS),
        js_distance=js_distance(ref_counts, cur_counts),
        wasserstein=None,
        drifted=False,
        count=int(cur_counts.sum()),
        nulls=nulls,
    )


# --- columns ---------------------------------------------------------------------------------


def _length(name: str, column: Any) -> int:
    try:
        return len(column)
    except TypeError:
        raise ValueError(
            f"feature {name!r}: expected a column (a sequence or array), not {type(column).__name__}"
        ) from None


def _numeric_column(name: str, column: Any) -> tuple[FloatArray, int]:
    """The non-null values as float64, and how many were null (None or NaN)."""
    try:
        values = np.asarray(column, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"feature {name!r}: expected numbers (or None), {err}") from None
    if values.ndim != 1:
        raise ValueError(f"feature {name!r}: expected a 1-d column, not shape {values.shape}")
    null = np.isnan(values)
    nulls = int(null.sum())
    if nulls:
        values = values[~null]
    infinite = int(np.isinf(values).sum())
    if infinite:
        raise ValueError(f"feature {name!r}: {infinite} infinite value(s); only finite numbers and nulls are allowed")
    return values, nulls


def _categorical_column(column: Any) -> tuple[dict[str, int], int]:
    """The count of each non-null value, keyed by its text, and how many were null (None or NaN)."""
    items: Iterable[Any] = column.tolist() if isinstance(column, np.ndarray) else column
    frequencies: dict[str, int] = {}
    nulls = 0
    for value, count in Counter(items).items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            nulls += count
        else:
            key = str(value)
            frequencies[key] = frequencies.get(key, 0) + count
    return dict(sorted(frequencies.items())), nulls


def _finite(values: npt.ArrayLike, what: str) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{what} must be a non-empty 1-d sample, not of shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} has non-finite values (NaN or infinity)")
    return array
