"""A pipeline's HTML report, from its events: pure (events in, a report model and its page out).

`cluster.report_io` reads the topics (drift, retrain, models, predictions, labels) and MLflow and
writes the file; `driftloop report` and the end of `driftloop run` both go through it.

Drawn with plotly: the page is interactive (hover a point for its window, its values and its
event; zoom one chart and the others follow, as every chart shares one time axis), which is what
readers who know Evidently's and MLflow's reports expect, and plotly.js is embedded in the page
(no CDN: a report opens on a machine without internet). matplotlib would give static SVG with no
hover, and a reader could not tell eight features' lines apart without it.

What the page holds:

- a header: pipeline, config, scenario, when it was made and what it covers (times in UTC);
- one figure, one time axis (UTC) for every chart: rolling accuracy of the served predictions
  joined to their delayed labels (one line per model version, the version's validation
  accuracy dashed); PSI per feature for each drifted window (the configured PSI floor drawn);
  each feature's adjusted p-value (log scale, the configured alpha drawn); and a lane of the
  loop's events: every drift event (also shaded over every chart), retrain request, job start,
  job end, gate decision, promotion, rollback and serving swap (the first prediction a version
  answered), with vertical lines through every chart for all but the drift windows;
- per drifted window a table (feature, test, statistic, adjusted p-value, PSI, drifted);
- reference-vs-current histograms of the drifted features of the first drifted data window,
  over the reference's own bins, when the model's reference and the window's predictions could
  be read (otherwise a note says why: nothing is drawn from data the report does not have);
- the timeline (dates, times and zone) and each version's lineage as a table.

The drift topic carries drifted windows only: windows within the thresholds publish nothing, so
the PSI and p-value charts have points where the monitor raised drift and nowhere else (the page
says so).
"""

from __future__ import annotations

import html
import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import numpy.typing as npt

from streams.drift import CategoricalReference, NumericReference, Reference
from streams.events import (
    DriftDetected,
    Event,
    LabelObserved,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    PredictionLogged,
    RetrainRequested,
    TrainingCompleted,
    TrainingFailed,
)

__all__ = [
    "FeatureRow",
    "Histogram",
    "Inputs",
    "Mark",
    "Report",
    "Served",
    "Thresholds",
    "WindowSample",
    "build",
    "histogram",
    "join",
    "render",
]

PREDICTION = "__prediction__"  # the monitor's name for the model's output column (jobs.monitor.PREDICTION)
MAX_POINTS = 1500  # points per accuracy line on the page: 100,000 predictions would make a 10 MB page
MAX_TABLES = 30  # drifted windows with a table of their own; more are counted, not shown

# One colour per kind of event, far apart; the feature lines use plotly's 24-colour palette.
LANES: dict[str, str] = {
    "drift injected": "#000000",
    "drift detected": "#ff7f0e",
    "retrain requested": "#9467bd",
    "job started": "#8c564b",
    "job ended": "#7f7f7f",
    "gate": "#1f77b4",
    "promotion": "#2ca02c",
    "rollback": "#d62728",
    "serving swap": "#17becf",
}


@dataclass(frozen=True)
class Thresholds:
    """The monitor's configured thresholds (`monitor.*` in the config)."""

    alpha: float
    psi_threshold: float
    correction: str
    window_size: int
    performance_tolerance: float

    @classmethod
    def of(cls, monitor: Any) -> Thresholds:
        return cls(monitor.alpha, monitor.psi_threshold, monitor.correction, monitor.window_size,
                   monitor.performance_tolerance)  # fmt: skip


@dataclass(frozen=True)
class Served:
    """The served predictions, in time order: when (seconds since the epoch), which version answered,
    and whether it was right (1 or 0; NaN while its label has not arrived)."""

    at: npt.NDArray[np.float64]
    version: npt.NDArray[np.str_]
    correct: npt.NDArray[np.float64]

    @classmethod
    def empty(cls) -> Served:
        return cls(np.zeros(0), np.zeros(0, dtype=np.str_), np.zeros(0))

    def __len__(self) -> int:
        return len(self.at)

    @property
    def labelled(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.correct)))


def join(predictions: Sequence[PredictionLogged], labels: Sequence[LabelObserved]) -> Served:
    """Predictions (shadow ones left out: no client saw them) joined to labels by request id; the
    last label of a request counts. Pure."""
    truth = {label.request_id: str(label.label) for label in labels}
    kept = sorted((p for p in predictions if p.variant != "shadow"), key=lambda p: p.occurred_at)
    at = np.fromiter((p.occurred_at.timestamp() for p in kept), dtype=np.float64, count=len(kept))
    version = np.array([p.model_version for p in kept], dtype=np.str_)
    correct = np.fromiter(
        (float(str(p.prediction) == truth[p.request_id]) if p.request_id in truth else math.nan for p in kept),
        dtype=np.float64,
        count=len(kept),
    )
    return Served(at, version if len(kept) else np.zeros(0, dtype=np.str_), correct)


@dataclass(frozen=True)
class WindowSample:
    """The first drifted data window's values, for histograms: the predictions at its offsets
    (`columns`, by feature) and the reference of the model that served them. `note` says what is
    missing when something is."""

    event_id: str
    version: str | None = None
    columns: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    reference: Reference | None = None
    note: str = ""


@dataclass(frozen=True)
class Inputs:
    """Everything a report is made of, read by `cluster.report_io` (or built by a test)."""

    pipeline: str
    config_path: str
    generated_at: datetime
    thresholds: Thresholds
    events: Sequence[Event]  # drift, retrain and models topics, any order
    served: Served
    scenario: str | None = None
    since: datetime | None = None
    sample: WindowSample | None = None
    registry: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # version -> its lineage tags
    marks: Sequence[tuple[datetime, str]] = ()  # more moments to mark (a run: where it injected drift)
    numbers: Mapping[str, Any] = field(default_factory=dict)  # a run's own figures
    notes: Sequence[str] = ()  # what the reader should know about where the data came from


@dataclass(frozen=True)
class Mark:
    """One moment of the loop, drawn in the events lane (and as a line through the charts)."""

    at: datetime
    lane: str  # a key of LANES
    label: str
    detail: str
    window: tuple[datetime, datetime] | None = None  # a drift event's window (`at`: when it was raised)
    version: str | None = None  # the model version it is about, if one


@dataclass(frozen=True)
class FeatureRow:
    feature: str
    test: str
    statistic: float | None
    p_value: float | None
    psi: float | None
    drifted: bool


@dataclass(frozen=True)
class Histogram:
    """Reference and current shares over the same bins (a numeric feature's are the reference's
    quantile bins, the ones PSI uses; a categorical feature's are its values)."""

    feature: str
    bins: tuple[str, ...]
    reference: tuple[float, ...]
    current: tuple[float, ...]
    reference_count: int
    current_count: int


@dataclass(frozen=True)
class Report:
    """The report's content, ready to draw: what `render` turns into a page."""

    header: dict[str, str]
    thresholds: Thresholds
    marks: tuple[Mark, ...]
    accuracy: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]  # version -> (times, rolling accuracy)
    accuracy_window: int
    expected: dict[str, float]  # version -> its validation accuracy
    psi: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]  # feature -> (window ends, PSI)
    p_values: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]  # feature -> (window ends, adjusted p)
    performance: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]  # metric -> (window ends, value)
    tables: tuple[tuple[str, tuple[FeatureRow, ...]], ...]  # (window caption, rows) per drifted window
    more_tables: int
    histograms: tuple[Histogram, ...]
    histogram_note: str
    timeline: tuple[tuple[str, str, str], ...]  # (time, event, detail)
    lineage: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (version, (field, value) rows)
    numbers: tuple[tuple[str, str], ...]
    notes: tuple[str, ...]


def when(at: datetime) -> str:
    """A time for a reader: date, time to the millisecond and zone (UTC)."""
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _seconds(at: datetime) -> float:
    return at.timestamp()


def build(inputs: Inputs) -> Report:
    """The report model of `inputs`. Pure: no I/O, no clock (the time is `inputs.generated_at`)."""
    events = sorted(inputs.events, key=lambda e: e.occurred_at)
    drift = [e for e in events if isinstance(e, DriftDetected)]
    completed = {e.model_version: e for e in events if isinstance(e, TrainingCompleted)}
    marks = _marks(events, inputs.served, inputs.marks)
    accuracy, width = _accuracy(inputs.served)
    expected = {v: e.metrics["accuracy"] for v, e in completed.items() if "accuracy" in e.metrics}
    psi: dict[str, tuple[list[float], list[float]]] = {}
    p_values: dict[str, tuple[list[float], list[float]]] = {}
    performance: dict[str, tuple[list[float], list[float]]] = {}
    tables: list[tuple[str, tuple[FeatureRow, ...]]] = []
    for event in drift:
        end = _seconds(event.window_end)
        for s in event.statistics:
            if event.kind == "performance":
                performance.setdefault(s.statistic, ([], []))
            elif s.statistic == "psi":
                _append(psi, s.feature, end, s.value)
            elif s.p_value is not None:
                _append(p_values, s.feature, end, s.p_value)
            if event.kind == "performance":
                _append(performance, s.statistic, end, s.value)
        caption = (f"{event.kind} drift, window {when(event.window_start)} to {when(event.window_end)} "
                   f"({event.window_size} predictions; event {event.event_id[:12]})")  # fmt: skip
        tables.append((caption, feature_rows(event)))
    header = {
        "pipeline": inputs.pipeline,
        "config": inputs.config_path,
        "scenario": inputs.scenario or "not recorded on the topics",
        "generated": when(inputs.generated_at),
        "covers": (f"events since {when(inputs.since)}" if inputs.since else "everything on the topics")
        + (f"; first {when(events[0].occurred_at)}, last {when(events[-1].occurred_at)}" if events else ""),
        "predictions": f"{len(inputs.served):,} served, {inputs.served.labelled:,} with their label",
        "events": f"{len(drift)} drift, {sum(isinstance(e, RetrainRequested) for e in events)} retrain requests, "
        f"{sum(isinstance(e, (TrainingCompleted, TrainingFailed)) for e in events)} jobs ended, "
        f"{sum(isinstance(e, ModelPromoted) for e in events)} promotions, "
        f"{sum(isinstance(e, ModelRolledBack) for e in events)} rollbacks",
    }
    histograms, note = _histograms(inputs.sample, drift)
    notes = [
        *inputs.notes,
        "The drift topic carries drifted windows only: windows within the thresholds publish nothing, so the PSI "
        "and p-value charts have a point only where the monitor raised drift.",
    ]
    return Report(
        header=header,
        thresholds=inputs.thresholds,
        marks=tuple(marks),
        accuracy=accuracy,
        accuracy_window=width,
        expected=expected,
        psi=_frozen(psi),
        p_values=_frozen(p_values),
        performance=_frozen(performance),
        tables=tuple(tables[:MAX_TABLES]),
        more_tables=max(0, len(tables) - MAX_TABLES),
        histograms=histograms,
        histogram_note=note,
        timeline=tuple((when(m.at), m.label, m.detail) for m in sorted(marks, key=lambda m: m.at)),
        lineage=_lineage(events, inputs.registry, marks),
        numbers=tuple((k, _text(v)) for k, v in inputs.numbers.items()),
        notes=tuple(notes),
    )


def _append(into: dict[str, tuple[list[float], list[float]]], key: str, x: float, y: float) -> None:
    xs, ys = into.setdefault(key, ([], []))
    xs.append(x)
    ys.append(y)


Series = dict[str, tuple[tuple[float, ...], tuple[float, ...]]]


def _frozen(series: dict[str, tuple[list[float], list[float]]]) -> Series:
    return {k: (tuple(xs), tuple(ys)) for k, (xs, ys) in sorted(series.items())}


def feature_rows(event: DriftDetected) -> tuple[FeatureRow, ...]:
    """One row per feature of a drift event: its test's statistic and adjusted p-value beside its PSI
    (the monitor publishes both as separate statistics), or one row per metric of a performance window."""
    if event.kind == "performance":
        return tuple(FeatureRow(s.feature, f"below {s.threshold:.4g}", s.value, None, None, s.drifted)
                     for s in event.statistics)  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    for s in event.statistics:
        blank: dict[str, Any] = {"test": "", "statistic": None, "p_value": None, "psi": None, "drifted": False}
        row = rows.setdefault(s.feature, blank)
        if s.statistic == "psi":
            row["psi"] = s.value
        else:
            row.update(test=s.statistic, statistic=s.value, p_value=s.p_value, drifted=s.drifted)
    return tuple(FeatureRow(name, **row) for name, row in sorted(rows.items(), key=lambda kv: (not kv[1]["drifted"],
                                                                                             kv[0])))  # fmt: skip


def _marks(events: Sequence[Event], served: Served, extra: Sequence[tuple[datetime, str]]) -> list[Mark]:
    out = [Mark(at, "drift injected", label, "") for at, label in extra]
    for e in events:
        if isinstance(e, DriftDetected):
            features = ", ".join(f for f in e.drifted_features) or "-"
            out.append(Mark(e.occurred_at, "drift detected", f"drift detected ({e.kind})",
                            f"{e.kind} drift in {features}; window of {e.window_size} from {when(e.window_start)}",
                            window=(e.window_start, e.window_end)))  # fmt: skip
        elif isinstance(e, RetrainRequested):
            out.append(Mark(e.occurred_at, "retrain requested", "retrain requested",
                            f"request {e.event_id[:12]}: {e.cause}"))  # fmt: skip
        elif isinstance(e, (TrainingCompleted, TrainingFailed)):
            job = (e.submission_id or "")[:12]
            if e.started_at is not None:
                out.append(Mark(e.started_at, "job started", "job started", f"job {job}"))
            if isinstance(e, TrainingCompleted):
                out.append(Mark(e.occurred_at, "job ended", "job ended",
                                f"job {job} registered version {e.model_version} (run {e.run_id})"))  # fmt: skip
            else:
                out.append(Mark(e.occurred_at, "job ended", "job failed", f"job {job}: {e.reason[:300]}"))
        elif isinstance(e, ModelPromoted):
            replaces = (f"replaces version {e.previous_version}" if e.previous_version
                        else "the first champion")  # fmt: skip
            out.append(Mark(e.occurred_at, "promotion", f"gate passed: version {e.model_version} promoted",
                            f"version {e.model_version} is the champion: {replaces}",
                            version=e.model_version))  # fmt: skip
        elif isinstance(e, ModelRejected):
            out.append(Mark(e.occurred_at, "gate", f"gate refused version {e.model_version}",
                            "; ".join(e.reasons) or "no reason given", version=e.model_version))  # fmt: skip
        elif isinstance(e, ModelRolledBack):
            out.append(Mark(e.occurred_at, "rollback", f"rollback {e.from_version} -> {e.to_version}",
                            e.reason[:300], version=e.from_version))  # fmt: skip
    if len(served):  # each version's first answer (a canary's versions alternate: each counts once)
        _, first = np.unique(served.version, return_index=True)
        previous = None
        for i in sorted(first.tolist()):
            version = str(served.version[i])
            at = datetime.fromtimestamp(float(served.at[i]), timezone.utc)
            what = f"first prediction of version {version}" + (f" (before it: {previous})" if previous else "")
            out.append(Mark(at, "serving swap", f"serving version {version}", what, version=version))
            previous = version
    return sorted(out, key=lambda m: m.at)


def _accuracy(served: Served) -> tuple[dict[str, tuple[tuple[float, ...], tuple[float, ...]]], int]:
    """Rolling accuracy of each version's labelled predictions, at most `MAX_POINTS` per version."""
    labelled = ~np.isnan(served.correct)
    counts = Counter(served.version[labelled].tolist())
    if not counts:
        return {}, 0
    width = int(min(250, max(10, min(counts.values()) // 4)))
    out = {}
    for version in sorted(counts, key=lambda v: (len(v), v)):
        chosen = labelled & (served.version == version)
        at, flags = served.at[chosen], served.correct[chosen]
        if len(flags) < width:
            continue
        sums = np.cumsum(np.concatenate(([0.0], flags)))
        rolling = (sums[width:] - sums[:-width]) / width
        ends = at[width - 1 :]
        step = max(1, math.ceil(len(rolling) / MAX_POINTS))
        out[version] = (tuple(ends[::step].tolist()), tuple(np.round(rolling[::step], 4).tolist()))
    return out, width


def histogram(feature: str, reference: NumericReference | CategoricalReference, values: Sequence[Any]) -> Histogram:
    """Reference and current shares of `feature` over the reference's bins. Nulls are left out,
    as the drift tests leave them out. Pure."""
    if isinstance(reference, NumericReference):
        current = np.sort(np.array([float(v) for v in values if v is not None and not _nan(v)], dtype=np.float64))
        edges = np.asarray(reference.edges, dtype=np.float64)
        cuts = np.concatenate(([0], current.searchsorted(edges, "left"), [len(current)]))
        counts = np.diff(cuts)
        ref = np.asarray(reference.bin_counts, dtype=np.float64)
        bounds = ["-inf", *(f"{e:.4g}" for e in edges), "inf"]
        bins = tuple(f"[{a}, {b})" for a, b in itertools.pairwise(bounds))
        return Histogram(feature, bins, _shares(ref), _shares(counts), int(ref.sum()), len(current))
    cur = Counter(str(v) for v in values if v is not None)
    names = sorted(set(reference.frequencies) | set(cur))
    ref_counts = np.array([reference.frequencies.get(n, 0) for n in names], dtype=np.float64)
    cur_counts = np.array([cur.get(n, 0) for n in names], dtype=np.float64)
    return Histogram(feature, tuple(names), _shares(ref_counts), _shares(cur_counts), int(ref_counts.sum()),
                     int(cur_counts.sum()))  # fmt: skip


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _shares(counts: Any) -> tuple[float, ...]:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return tuple((counts / total).round(4).tolist()) if total else tuple(0.0 for _ in counts)


def _histograms(sample: WindowSample | None, drift: Sequence[DriftDetected]) -> tuple[tuple[Histogram, ...], str]:
    first = next((e for e in drift if e.kind != "performance"), None)
    if first is None:
        return (), "No data or prediction drift was published: no histograms to draw."
    if sample is None or sample.event_id != first.event_id:
        return (), "The window's predictions and the model's reference were not read: no histograms drawn."
    if sample.reference is None or not sample.columns:
        return (), sample.note or "The window's predictions or the model's reference are missing: no histograms drawn."
    out = []
    for feature in first.drifted_features:
        ref = sample.reference.features.get(feature)
        if ref is not None and feature in sample.columns:
            out.append(histogram(feature, ref, sample.columns[feature]))
    where = (f"Drifted features of the first drifted window ({when(first.window_start)} to {when(first.window_end)}), "
             f"served by version {sample.version}: the window's predictions against that version's training "
             "reference, over the reference's bins (PSI's bins).")  # fmt: skip
    return tuple(out), " ".join(filter(None, [where, sample.note]))


def _lineage(
    events: Sequence[Event], registry: Mapping[str, Mapping[str, str]], marks: Sequence[Mark]
) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """Per registered version: the job and run that made it, the request and drift behind it, the
    gate, and when it was promoted and first served."""
    requests = {e.event_id: e for e in events if isinstance(e, RetrainRequested)}
    drifts = {e.event_id: e for e in events if isinstance(e, DriftDetected)}
    out = []
    for e in events:
        if not isinstance(e, TrainingCompleted):
            continue
        rows: list[tuple[str, str]] = [("MLflow run", e.run_id or "-"), ("job", e.submission_id or "-")]
        request = requests.get(e.trigger_event_id or "")
        if request is not None:
            rows.append(("retrain request", f"{request.event_id} at {when(request.occurred_at)}: {request.cause}"))
            rows.extend(("trained on", f"{r.topic} partition {r.partition}, offsets [{r.start:,}, {r.end:,})")
                        for r in request.records)  # fmt: skip
            drift = drifts.get(request.drift_event_id or "")
            if drift is not None:
                rows.append(("drift event", f"{drift.event_id} ({drift.kind}: {', '.join(drift.drifted_features)}) "
                                            f"window ending {when(drift.window_end)}"))  # fmt: skip
        elif e.trigger_event_id:
            rows.append(("retrain request", e.trigger_event_id))
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(e.metrics.items()))
        rows.append(("validation", metrics or "-"))
        for m in marks:
            if m.version == e.model_version:
                rows.append(("first served" if m.lane == "serving swap" else m.label, when(m.at)))
        rows.extend((f"registry: {k}", v) for k, v in sorted(registry.get(e.model_version, {}).items()))
        out.append((e.model_version, tuple(rows)))
    return tuple(out)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return "; ".join(_text(v) for v in value) or "-"
    return "-" if value is None else str(value)


# --- the page ---------------------------------------------------------------------------------


def _utc(seconds: Sequence[float]) -> list[str]:
    """Times as plotly reads them on a date axis: naive ISO strings, here all in UTC."""
    return [datetime.fromtimestamp(s, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f") for s in seconds]


def figure(report: Report) -> Any:
    """The time-axis charts, one above the other, sharing their x-axis."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    t = report.thresholds
    fig = make_subplots(
        rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.3, 0.24, 0.24, 0.22],
        subplot_titles=(
            f"Accuracy of served predictions, joined to their delayed labels (rolling, {report.accuracy_window})",
            f"PSI per feature in drifted windows (floor monitor.psi_threshold = {t.psi_threshold:g})",
            f"Adjusted p-value per feature in drifted windows ({t.correction}; monitor.alpha = {t.alpha:g})",
            "The loop's events",
        ),
    )  # fmt: skip
    versions = qualitative.D3
    for i, (version, (xs, ys)) in enumerate(report.accuracy.items()):
        color = versions[i % len(versions)]
        fig.add_trace(go.Scatter(x=_utc(xs), y=ys, mode="lines", name=f"accuracy, version {version}",
                                 line={"color": color, "width": 2}, legendgroup="accuracy"), row=1, col=1)  # fmt: skip
        if version in report.expected:
            fig.add_trace(go.Scatter(
                x=_utc([xs[0], xs[-1]]), y=[report.expected[version]] * 2, mode="lines",
                name=f"version {version}'s validation accuracy", line={"color": color, "dash": "dash", "width": 1},
                legendgroup="accuracy"), row=1, col=1)  # fmt: skip
    for metric, (xs, ys) in report.performance.items():
        fig.add_trace(go.Scatter(x=_utc(xs), y=ys, mode="markers", name=f"performance window {metric}",
                                 marker={"symbol": "x", "size": 9, "color": "#d62728"}), row=1, col=1)  # fmt: skip
    palette = qualitative.Dark24
    for i, feature in enumerate(sorted(set(report.psi) | set(report.p_values))):
        color = palette[i % len(palette)]
        if feature in report.psi:
            xs, ys = report.psi[feature]
            fig.add_trace(go.Scatter(x=_utc(xs), y=ys, mode="markers", name=feature, legendgroup=feature,
                                     marker={"size": 9, "color": color}), row=2, col=1)  # fmt: skip
        if feature in report.p_values:
            xs, ys = report.p_values[feature]
            floor = [max(y, 1e-300) for y in ys]  # a p-value of 0 has no place on a log axis
            fig.add_trace(go.Scatter(x=_utc(xs), y=floor, mode="markers", name=feature, legendgroup=feature,
                                     showlegend=feature not in report.psi,
                                     marker={"size": 9, "color": color}), row=3, col=1)  # fmt: skip
    fig.add_hline(y=t.psi_threshold, line={"dash": "dash", "color": "#444"}, row=2, col=1,
                  annotation_text=f"psi_threshold {t.psi_threshold:g}", annotation_position="top left")  # fmt: skip
    fig.add_hline(y=t.alpha, line={"dash": "dash", "color": "#444"}, row=3, col=1,
                  annotation_text=f"alpha {t.alpha:g}", annotation_position="top left")  # fmt: skip
    lanes = [lane for lane in LANES if lane != "drift injected" or any(m.lane == lane for m in report.marks)]
    for lane in lanes:
        chosen = [m for m in report.marks if m.lane == lane]
        if chosen:
            fig.add_trace(go.Scatter(
                x=_utc([m.at.timestamp() for m in chosen]), y=[lane] * len(chosen), mode="markers", name=lane,
                marker={"color": LANES[lane], "size": 11, "symbol": "diamond", "line": {"width": 1, "color": "#fff"}},
                text=[f"{m.label}<br>{when(m.at)}<br>{html.escape(m.detail)}" for m in chosen],
                hovertemplate="%{text}<extra></extra>", showlegend=False), row=4, col=1)  # fmt: skip
    shapes: list[dict[str, Any]] = []  # set at once: plotly's add_vrect copies the layout each call
    for m in report.marks:
        if m.window is not None:  # a drift window: shaded over the three charts
            start, end = _utc([m.window[0].timestamp(), m.window[1].timestamp()])
            shapes.extend({"type": "rect", "xref": "x", "yref": f"{axis} domain", "x0": start, "x1": end, "y0": 0,
                           "y1": 1, "fillcolor": LANES[m.lane], "opacity": 0.12, "line": {"width": 0},
                           "layer": "below"} for axis in ("y", "y2", "y3"))  # fmt: skip
        elif m.lane != "job ended":
            x = _utc([m.at.timestamp()])[0]
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
                           "line": {"color": LANES[m.lane], "width": 1, "dash": "dot"}})  # fmt: skip
    fig.update_layout(shapes=[*fig.layout.shapes, *shapes])
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="PSI", rangemode="tozero", row=2, col=1)
    fig.update_yaxes(title_text="adjusted p-value", type="log", exponentformat="power", row=3, col=1)
    fig.update_yaxes(categoryorder="array", categoryarray=lanes[::-1], range=[-0.5, len(lanes) - 0.5], row=4, col=1)
    fig.update_xaxes(type="date", tickformat="%b %d\n%H:%M:%S", showticklabels=True)
    fig.update_xaxes(title_text="time (UTC)", row=4, col=1)
    fig.update_layout(height=1100, margin={"l": 140, "r": 30, "t": 60, "b": 60}, template="plotly_white",
                      legend={"orientation": "v", "x": 1.01, "y": 1}, hovermode="closest")  # fmt: skip
    return fig


def histogram_figure(report: Report) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    shown = report.histograms
    fig = make_subplots(rows=len(shown), cols=1, subplot_titles=[
        f"{h.feature}: reference ({h.reference_count:,}) vs window ({h.current_count:,})" for h in shown],
        vertical_spacing=min(0.12, 0.5 / len(shown)))  # fmt: skip
    for row, h in enumerate(shown, start=1):
        first = row == 1
        fig.add_trace(go.Bar(x=list(h.bins), y=list(h.reference), name="reference (training)",
                             marker_color="#1f77b4", showlegend=first, legendgroup="ref"), row=row, col=1)  # fmt: skip
        fig.add_trace(go.Bar(x=list(h.bins), y=list(h.current), name="current (drifted window)",
                             marker_color="#ff7f0e", showlegend=first, legendgroup="cur"), row=row, col=1)  # fmt: skip
        fig.update_yaxes(title_text="share", row=row, col=1)
        fig.update_xaxes(title_text="bin" if h.bins and h.bins[0].startswith("[") else "value", row=row, col=1)
    fig.update_layout(barmode="group", height=320 * len(shown), template="plotly_white",
                      margin={"l": 80, "r": 30, "t": 50, "b": 50})  # fmt: skip
    return fig


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}"


STYLE = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}th,td{padding:3px 10px;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right}tr.drifted td{background:#fff1e0}
.header td:first-child,.kv td:first-child{font-weight:600;white-space:nowrap}.note{color:#555;font-size:0.9em}
details{margin:4px 0}summary{cursor:pointer}"""


def render(report: Report) -> str:
    """The page: self-contained HTML (plotly.js inline, no network). Pure."""
    import plotly.io as pio

    t = report.thresholds
    settings = [
        ("monitor.alpha", f"{t.alpha:g}", f"a feature drifts when its {t.correction}-adjusted p-value is below this"),
        ("monitor.psi_threshold", f"{t.psi_threshold:g}", "... and its PSI is at least this (both rules at once)"),
        ("monitor.correction", t.correction, "the multiple-testing correction across features"),
        ("monitor.window_size", f"{t.window_size:,}", "predictions per data window"),
        ("monitor.performance_tolerance", f"{t.performance_tolerance:g}",
         "accuracy or F1 this far below the model's validation report is performance drift"),
    ]  # fmt: skip
    chart = pio.to_html(figure(report), include_plotlyjs=True, full_html=False, div_id="timeline-chart",
                        config={"displaylogo": False, "responsive": True})  # fmt: skip
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>driftloop report: {html.escape(report.header['pipeline'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>driftloop report: {html.escape(report.header['pipeline'])}</h1>",
        _table(("", ""), list(report.header.items()), "header"),
        "<h2>Thresholds (from the config)</h2>",
        _table(("setting", "value", "meaning"), settings, "kv"),
        "<h2>Over time</h2>",
        chart,
        "".join(f"<p class='note'>{html.escape(n)}</p>" for n in report.notes),
        "<h2>Drifted windows, feature by feature</h2>",
    ]
    if not report.tables:
        parts.append("<p>No drift event on the drift topic.</p>")
    for i, (caption, rows) in enumerate(report.tables):
        cells = [(r.feature, r.test, _number(r.statistic), _number(r.p_value), _number(r.psi),
                  "yes" if r.drifted else "no") for r in rows]  # fmt: skip
        table = _table(("feature", "test", "statistic", "adjusted p-value", "PSI", "drifted"), cells, "features")
        table = table.replace("<tr><td>", "<tr class='row'><td>")
        for r in rows:
            if r.drifted:
                table = table.replace(f"<tr class='row'><td>{html.escape(r.feature)}</td>",
                                      f"<tr class='drifted'><td>{html.escape(r.feature)}</td>", 1)  # fmt: skip
        parts.append(f"<details{' open' if i == 0 else ''}><summary>{html.escape(caption)}</summary>{table}</details>")
    if report.more_tables:
        parts.append(f"<p class='note'>{report.more_tables} more drifted windows are not shown.</p>")
    parts.append("<h2>Reference vs current, drifted features</h2>")
    parts.append(f"<p class='note'>{html.escape(report.histogram_note)}</p>")
    if report.histograms:
        parts.append(pio.to_html(histogram_figure(report), include_plotlyjs=False, full_html=False,
                                 div_id="histograms", config={"displaylogo": False}))  # fmt: skip
    parts.append("<h2>Timeline</h2>")
    parts.append(_table(("time (UTC)", "event", "detail"), list(report.timeline), "timeline"))
    parts.append("<h2>Lineage</h2>")
    if not report.lineage:
        parts.append("<p>No TrainingCompleted event on the models topic.</p>")
    for version, trail in report.lineage:
        parts.append(f"<h3>Version {html.escape(version)}</h3>" + _table(("", ""), list(trail), "kv lineage"))
    if report.numbers:
        parts.append("<h2>The run's numbers</h2>" + _table(("", ""), list(report.numbers), "kv"))
    parts.append("</body></html>")
    return "\n".join(parts)
