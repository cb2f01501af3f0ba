"""The report: its model from constructed events (pure), its page in a real browser (headless
Chromium), and `driftloop report` rebuilding it from a real broker's topics."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from cluster.report import (
    PREDICTION,
    Inputs,
    Served,
    Thresholds,
    WindowSample,
    build,
    feature_rows,
    histogram,
    join,
    render,
)
from streams.config import PipelineConfig
from streams.drift import Reference
from streams.events import (
    DriftDetected,
    Event,
    FeatureDrift,
    LabelObserved,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    OffsetRange,
    PredictionLogged,
    RetrainRequested,
    TrainingCompleted,
)

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)
THRESHOLDS = Thresholds(alpha=0.01, psi_threshold=0.05, correction="bh", window_size=200, performance_tolerance=0.05)
FEATURES = ("monthly_charges", "plan", "tenure_months")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def drift_event(pipeline: str, start: float, drifted: tuple[str, ...], offsets: tuple[OffsetRange, ...] = ()) -> Event:
    stats = []
    for i, feature in enumerate(FEATURES):
        moved = feature in drifted
        test = "chi2" if feature == "plan" else "ks"
        stats.append(FeatureDrift(feature=feature, statistic=test, value=0.4 if moved else 0.02 + i / 100,
                                  threshold=0.01, drifted=moved, p_value=1e-9 if moved else 0.5))  # fmt: skip
        stats.append(FeatureDrift(feature=feature, statistic="psi", value=0.9 if moved else 0.01, threshold=0.05,
                                  drifted=moved))  # fmt: skip
    return DriftDetected(event_id=f"drift-{start:.0f}", pipeline=pipeline, occurred_at=at(start + 20),
                         window_start=at(start), window_end=at(start + 20), window_size=200, offsets=offsets,
                         statistics=tuple(stats))  # fmt: skip


def loop_events(pipeline: str, offsets: tuple[OffsetRange, ...] = ()) -> list[Event]:
    """A whole loop: first model, two drifted windows, a retrain, its job, a refused and a promoted
    version, a rollback."""
    first = drift_event(pipeline, 100, ("monthly_charges", "plan"), offsets)
    second = drift_event(pipeline, 120, ("monthly_charges",))
    records = (OffsetRange(topic=f"{pipeline}.records", partition=0, start=40, end=90),)
    request = RetrainRequested(event_id="retrain-141", pipeline=pipeline, occurred_at=at(141),
                               cause="data drift in 2 windows", drift_event_id=first.event_id,
                               records=records)  # fmt: skip
    return [
        TrainingCompleted(pipeline=pipeline, model_name=pipeline, model_version="1", run_id="run1",
                          occurred_at=at(5), started_at=at(1), metrics={"accuracy": 0.9}, submission_id="boot"),
        ModelPromoted(model_name=pipeline, model_version="1", occurred_at=at(6)),
        first,
        second,
        request,
        TrainingCompleted(pipeline=pipeline, model_name=pipeline, model_version="2", run_id="run2",
                          occurred_at=at(170), started_at=at(145), metrics={"accuracy": 0.88},
                          trigger_event_id=request.event_id, submission_id=request.event_id),
        ModelRejected(model_name=pipeline, model_version="3", reasons=("accuracy 0.70 below 0.85",),
                      occurred_at=at(171)),
        ModelPromoted(model_name=pipeline, model_version="2", previous_version="1", occurred_at=at(172)),
        ModelRolledBack(model_name=pipeline, from_version="2", to_version="1", reason="lost 2 windows",
                        occurred_at=at(250)),
    ]  # fmt: skip


def served(n_old: int = 300, n_new: int = 100) -> Served:
    """Version 1 right on even seconds before drift, then wrong; version 2 right; the last 10 unlabelled."""
    times = np.arange(n_old + n_new, dtype=np.float64) * 0.5 + T0.timestamp() + 10
    versions = np.array(["1"] * n_old + ["2"] * n_new)
    correct = np.where(np.arange(n_old + n_new) < 180, 1.0, 0.0)
    correct[n_old:] = 1.0
    correct[-10:] = np.nan
    return Served(times, versions, correct)


def inputs(**changes: object) -> Inputs:
    base = Inputs(pipeline="demo", config_path="configs/demo.yaml", generated_at=at(400), thresholds=THRESHOLDS,
                  events=loop_events("demo"), served=served(), scenario="covariate")  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_the_model_marks_every_event_of_the_loop() -> None:
    report = build(inputs())
    lanes = [m.lane for m in report.marks]
    assert lanes.count("drift detected") == 2, "every drifted window, not only the first"
    for lane in ("retrain requested", "job started", "job ended", "gate", "promotion", "rollback", "serving swap"):
        assert lane in lanes, lane
    swaps = [m for m in report.marks if m.lane == "serving swap"]
    assert [m.version for m in swaps] == ["1", "2"] and swaps[1].at == at(10 + 300 * 0.5)
    job = next(m for m in report.marks if m.lane == "job started" and m.at == at(145))
    assert job.detail.startswith("job ")
    promoted = [m.detail for m in report.marks if m.lane == "promotion"]
    assert promoted == [
        "version 1 is the champion: the first champion",
        "version 2 is the champion: replaces version 1",
    ]
    assert not any("None" in m.detail for m in report.marks)


def test_the_model_carries_the_configured_thresholds_and_times_with_zone() -> None:
    report = build(inputs(thresholds=dataclasses.replace(THRESHOLDS, psi_threshold=0.07, alpha=0.02)))
    assert report.thresholds.psi_threshold == 0.07 and report.thresholds.alpha == 0.02
    assert report.header["generated"] == "2026-03-01 09:06:40.000 UTC"
    assert report.header["scenario"] == "covariate" and report.header["config"] == "configs/demo.yaml"
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC", t) for t, _, _ in report.timeline)
    page = render(report)
    assert "psi_threshold 0.07" in page and "alpha 0.02" in page and "0.2" not in re.sub(r"<script.*?</script>", "",
                                                                                         page, flags=re.S)  # fmt: skip


def test_feature_rows_pair_each_test_with_its_psi_drifted_first() -> None:
    event = drift_event("demo", 0, ("plan",))
    assert isinstance(event, DriftDetected)
    rows = feature_rows(event)
    assert [r.feature for r in rows] == ["plan", "monthly_charges", "tenure_months"]
    plan = rows[0]
    assert (plan.test, plan.statistic, plan.p_value, plan.psi, plan.drifted) == ("chi2", 0.4, 1e-9, 0.9, True)
    assert rows[1].psi == 0.01 and not rows[1].drifted


def test_drift_series_are_on_the_time_axis_one_point_per_drifted_window() -> None:
    report = build(inputs())
    xs, ys = report.psi["monthly_charges"]
    assert xs == (at(120).timestamp(), at(140).timestamp()) and ys == (0.9, 0.9)
    assert report.p_values["plan"][1] == (1e-9, 0.5)
    assert len(report.tables) == 2 and "data drift, window 2026-03-01 09:01:40.000 UTC" in report.tables[0][0]


def test_rolling_accuracy_per_version_against_its_validation_accuracy() -> None:
    report = build(inputs())
    assert set(report.accuracy) == {"1", "2"} and report.expected == {"1": 0.9, "2": 0.88}
    width = report.accuracy_window
    xs, ys = report.accuracy["1"]
    assert ys[0] == 1.0 and ys[-1] == 0.0, "version 1 is right until record 180, then wrong"
    assert len(report.accuracy["2"][1]) == 90 - width + 1, "the unlabelled predictions are left out"
    assert xs == tuple(sorted(xs))


def test_join_leaves_out_shadow_predictions_and_waits_for_labels() -> None:
    def p(rid: str, version: str, prediction: str, variant: str = "champion") -> PredictionLogged:
        return PredictionLogged(request_id=rid, pipeline="d", model_name="d", model_version=version,
                                features={}, prediction=prediction, variant=variant, occurred_at=at(len(rid)))  # type: ignore[arg-type]  # fmt: skip

    labels = [LabelObserved(request_id=r, pipeline="d", label=v) for r, v in (("a", "yes"), ("bb", "no"))]
    got = join([p("bb", "1", "yes"), p("a", "1", "yes"), p("ccc", "2", "no"), p("a", "2", "no", "shadow")], labels)
    assert got.version.tolist() == ["1", "1", "2"]
    assert got.correct[:2].tolist() == [1.0, 0.0] and np.isnan(got.correct[2]) and got.labelled == 2


def test_histograms_come_from_the_reference_bins_and_the_window_only() -> None:
    rng = np.random.default_rng(0)
    reference = Reference.from_columns(
        {"monthly_charges": rng.normal(50, 10, 2000), "plan": ["basic"] * 1500 + ["premium"] * 500},
        {"monthly_charges": "numeric", "plan": "categorical"},
    )
    events = loop_events("demo")
    first = events[2]
    window = {"monthly_charges": list(rng.normal(80, 10, 300)), "plan": ["premium"] * 300}
    sample = WindowSample(first.event_id, "1", window, reference)
    report = build(inputs(sample=sample))
    assert [h.feature for h in report.histograms] == ["monthly_charges", "plan"]
    charges = report.histograms[0]
    assert len(charges.bins) == 10 and abs(sum(charges.reference) - 1) < 1e-3
    assert charges.current[-1] > 0.9, "the shifted window sits in the reference's top bin"
    plan = report.histograms[1]
    assert plan.bins == ("basic", "premium") and plan.reference == (0.75, 0.25) and plan.current == (0.0, 1.0)
    assert "version 1" in report.histogram_note

    nothing = build(inputs(sample=WindowSample(first.event_id, note="MLflow was not read")))
    assert nothing.histograms == () and nothing.histogram_note == "MLflow was not read"
    other = histogram(PREDICTION, reference.features["plan"], [None, "basic"])
    assert other.current == (1.0, 0.0) and other.current_count == 1, "nulls are left out, as the tests leave them"


def test_lineage_is_a_table_per_version_from_the_events() -> None:
    report = build(inputs(registry={"2": {"family": "mlp", "gate": "passed"}}))
    versions = dict(report.lineage)
    rows = dict(versions["2"])
    assert rows["MLflow run"] == "run2" and rows["registry: family"] == "mlp"
    assert rows["retrain request"].endswith("data drift in 2 windows")
    assert rows["trained on"] == "demo.records partition 0, offsets [40, 90)"
    assert "(data: monthly_charges, plan)" in rows["drift event"]
    assert rows["first served"] == "2026-03-01 09:02:40.000 UTC"
    page = render(report)
    assert "<h3>Version 2</h3>" in page and "{&quot;" not in page, "a table, not JSON in a string"


def test_an_empty_stack_still_gives_a_page() -> None:
    page = render(build(inputs(events=[], served=Served.empty())))
    assert "No drift event on the drift topic." in page and "plotly" in page


# --- in a real browser -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium, installed when missing (CI starts from a clean machine)."""
    found = shutil.which("chromium")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if found is None and shutil.which("apt-get"):
        if subprocess.run(install, capture_output=True, timeout=600).returncode != 0:  # no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300)
            subprocess.run(install, capture_output=True, timeout=600)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed and apt-get could not install it")
    return found


def browser(chromium: str, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium on `page`, headless; its virtual time budget lets plotly's scripts run to the end."""
    return subprocess.run(
        [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
         "--virtual-time-budget=20000", "--window-size=1280,2400", *args, page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("browser")
    rng = np.random.default_rng(1)
    reference = Reference.from_columns({"monthly_charges": rng.normal(50, 10, 2000)}, {"monthly_charges": "numeric"})
    events = loop_events("demo")
    sample = WindowSample(events[2].event_id, "1", {"monthly_charges": list(rng.normal(70, 10, 200))}, reference)
    page = folder / "report.html"
    page.write_text(render(build(inputs(sample=sample))))
    dom = browser(chromium, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    yield page, dom.stdout


@pytest.mark.integration
def test_the_charts_draw_in_a_real_browser(drawn: tuple[Path, str]) -> None:
    """After plotly's scripts ran, the DOM holds its SVG: the chart's lines and markers, the axis
    titles, the thresholds' annotations and the histograms' bars (none of it is in the file)."""
    page, dom = drawn
    source = page.read_text()
    assert 'class="main-svg"' not in source, "plotly draws the SVG in the browser, not the file"
    chart = dom[dom.index('id="timeline-chart"') :]
    assert chart.count('class="main-svg"') >= 2
    assert chart.count('class="scatterlayer') >= 4, "one per chart: accuracy, PSI, p-value, events"
    assert re.search(r'class="js-line" d="M[\d.]+,[\d.]+L', chart), "a line has points"
    for text in ("accuracy", "PSI", "adjusted p-value", "time (UTC)", "psi_threshold 0.05", "alpha 0.01"):
        assert f">{text}<" in chart, text
    for lane in ("drift detected", "retrain requested", "job started", "promotion", "rollback", "serving swap"):
        assert f">{lane}<" in chart, lane
    bars = dom[dom.index('id="histograms"') :]
    assert bars.count('class="point"') >= 20, "reference and window bars over 10 bins"
    assert not re.search(r"<script[^>]*\ssrc=", source), "plotly.js is inline: no script comes from the network"


@pytest.mark.integration
def test_the_screenshot_is_not_blank(drawn: tuple[Path, str], chromium: str, tmp_path: Path) -> None:
    page, _ = drawn
    shot = tmp_path / "report.png"
    result = browser(chromium, page, f"--screenshot={shot}")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    chart = image[700:1800]  # the figure, below the header and the thresholds
    # Measured here: drawn, 4,201 coloured pixels and 8.6 % not white; the same page without its
    # scripts (nothing drawn, the titles only), 0 coloured and 1.6 % not white.
    coloured = np.abs(chart - chart.mean(axis=2, keepdims=True)).max(axis=2) > 40
    assert coloured.sum() > 1000, "the lines, markers and event diamonds are in colour"
    assert (chart.min(axis=2) < 235).mean() > 0.04, "axes, grid and traces cover the chart's area"


# --- from a real broker --------------------------------------------------------------------------


@pytest.mark.integration
def test_report_rebuilds_from_the_topics(config: PipelineConfig, topics: object, tmp_path: Path) -> None:
    """Events, predictions and labels published to a test pipeline's topics on the real broker;
    `driftloop report` (a process of its own) rebuilds the page from them."""
    from streams.kafka import Producer
    from streams.topics import Topics
    from tests.test_cli import driftloop

    names = Topics(config.name)
    window = tuple(OffsetRange(topic=names.predictions, partition=p, start=0, end=15) for p in range(4))
    events = loop_events(config.name, offsets=window)
    with Producer(config.kafka, client_id="report-test") as producer:
        for i in range(400):
            version = "1" if i < 300 else "2"
            prediction = PredictionLogged(
                request_id=f"r{i}", pipeline=config.name, model_name=config.name, model_version=version,
                features={"monthly_charges": 50.0 + i % 7, "plan": "basic"}, prediction="yes",
                occurred_at=at(10 + i * 0.5),
            )  # fmt: skip
            producer.send_event(names.predictions, prediction)
            producer.send_event(names.labels, LabelObserved(request_id=f"r{i}", pipeline=config.name,
                                                            label="yes" if i % 3 else "no"))  # fmt: skip
        for event in events:
            topic = names.drift if isinstance(event, DriftDetected) else names.retrain
            if isinstance(event, (TrainingCompleted, ModelPromoted, ModelRejected, ModelRolledBack)):
                topic = names.models
            producer.send_event(topic, event)
        producer.flush()
    path = tmp_path / "pipeline.yaml"
    text = (Path(__file__).parent.parent / "configs" / "demo.yaml").read_text()
    text = text.replace("name: demo", f"name: {config.name}")
    path.write_text(
        re.sub(r"psi_threshold: 0.05 ", "psi_threshold: 0.08 ", re.sub(r"alpha: 0.01 ", "alpha: 0.02 ", text))
    )
    out = tmp_path / "report.html"
    result = driftloop("report", "--config", str(path), "--state-dir", str(tmp_path / "no-stack"), "--out", str(out),
                       env={"KAFKA_BOOTSTRAP_SERVERS": config.kafka.bootstrap_servers})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "9 events, 400 predictions (400 labelled)" in result.stdout
    assert "no MLflow tracking URI" in result.stderr
    page = out.read_text()
    assert "psi_threshold 0.08" in page and "alpha 0.02" in page, "the thresholds of this config"
    for mark in ("drift detected (data)", "retrain requested", "job started", "gate refused version 3",
                 "gate passed: version 2 promoted", "rollback 2 -&gt; 1", "serving version 2"):  # fmt: skip
        assert mark in page, mark
    assert page.count("<details") == 2 and "<td>monthly_charges</td><td>ks</td>" in page
    assert "<h3>Version 2</h3>" in page and "<td>run2</td>" in page
    assert "not read" in page, "no MLflow: the histograms' absence is explained"

    since = driftloop("report", "--config", str(path), "--state-dir", str(tmp_path / "no-stack"), "--out",
                      str(out), "--since", "2026-03-01T09:02:30", "--no-mlflow",
                      env={"KAFKA_BOOTSTRAP_SERVERS": config.kafka.bootstrap_servers})  # fmt: skip
    assert since.returncode == 0, since.stderr[-3000:]
    assert "4 events, 120 predictions" in since.stdout, "from 09:02:30: the jobs' end on, and predictions 280 to 399"


def test_report_refuses_a_bad_since(tmp_path: Path) -> None:
    from tests.test_cli import driftloop

    result = driftloop("report", "--config", "configs/demo.yaml", "--since", "yesterday", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "ISO 8601" in result.stderr and "Traceback" not in result.stderr
