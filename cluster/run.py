"""The whole loop, closed: what `driftloop run` (and `make run`) does.

1. an embedded Tansu broker (unless `KAFKA_BOOTSTRAP_SERVERS` names one), a local Ray head
   with token auth and the Jobs API, an MLflow SQLite store under the run directory;
2. the controller actor, then the generator's first records; a bootstrap `RetrainRequested`
   makes the controller train the first model through a Ray Job (the same job every retrain
   runs: ingest, tune, train, gate), which becomes the champion;
3. Ray Serve serves it; the monitor actor watches its predictions and the delayed labels;
4. a client sends the stream to the HTTP endpoint (each record's id is the request id), the
   records go to the records topic and their labels follow a little later on the labels topic;
5. drift is injected at a known record; the monitor detects it, the policy asks for a retrain,
   the controller submits the job, the gate promotes the new model, Serve swaps it in, and the
   client sees accuracy recover. No step is driven by this script except the traffic.

It ends with a summary, an HTML report with plots and, with `--report`, a JSON report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import requests

from cluster.report_io import gather, log_report, promoted_run, write
from streams.config import API_KEY_ENV, PipelineConfig
from streams.errors import DriftloopError
from streams.events import (
    DriftDetected,
    LabelObserved,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    RetrainRequested,
    TrainingCompleted,
    TrainingFailed,
    deterministic_id,
    utcnow,
)
from streams.files import FileStream, read_table
from streams.generator import Scenario, StreamGenerator
from streams.kafka import Producer, ensure_topics
from streams.progress import bar, say
from streams.publish import publish_file, publish_stream
from streams.serde import RecordCodec
from streams.topics import Topics

if TYPE_CHECKING:
    from jobs.controller import ControllerReport
    from jobs.monitor import MonitorReport

__all__ = ["LoopOptions", "run_loop"]


@dataclass(frozen=True)
class LoopOptions:
    bootstrap_records: int = 0  # labeled records the first model trains on; 0: 6000, or a third of `source`'s rows
    before_drift: int = 3000  # records served before the drift starts
    after_promotion: int = 3000  # records served by the new champion before the run ends
    rate: float = 250.0  # records per second sent to the endpoint
    batch: int = 25  # records per HTTP request
    label_delay: int = 100  # a record's label arrives this many records later
    scenario: Scenario | Literal["bad-model"] = "concept"  # bad-model: no drift; a bad model is promoted by hand
    seed: int = 0
    max_seconds: float = 600.0  # give up (and say so) after this long
    report: Path | None = None
    source: Path | None = None  # a user's file as the stream (`run --from`): its rows instead of the generator's
    drift_at: int | None = None  # with `source`: the row where the user knows the data changes (for the report)
    config_path: str = ""  # the config file, for the report's header


@dataclass
class _Traffic:
    """What the client saw, record by record."""

    sent: int = 0
    failed: int = 0
    requests: int = 0
    correct: list[bool] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    drifted: list[bool] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)  # time.time() when each record was answered
    first_new_version_at: dict[str, float] = field(default_factory=dict)
    # --scenario bad-model: the version forced in, the record it was forced at, the first record the
    # champion it replaced answered again (after the monitor's rollback), and the wall time of that
    bad_version: str | None = None
    bad_at_record: int | None = None
    restored_at_record: int | None = None
    restored_wall: float | None = None


@contextlib.contextmanager
def kafka_for(config: PipelineConfig, run_dir: Path) -> Iterator[PipelineConfig]:
    """The config with a reachable broker: the given one, or an embedded Tansu for the run."""
    from cluster.broker import EmbeddedBroker

    if not config.kafka.embedded:
        yield config
        return
    with EmbeddedBroker(log_file=run_dir / "broker.log") as broker:
        print(f"[broker] embedded Tansu at {broker.bootstrap} (log: {run_dir / 'broker.log'})", flush=True)
        yield config.connected_to(broker.bootstrap)


def _say(started: float, stage: str, message: str) -> None:
    say(f"[{time.monotonic() - started:6.1f}s] [{stage}] {message}")


def run_loop(config: PipelineConfig, run_dir: Path, options: LoopOptions) -> int:
    import ray
    from ray import serve

    from cluster.broker import free_port
    from cluster.pipeline import Pipeline
    from cluster.ray_runtime import bind_to_loopback, is_loopback_address, start_local
    from jobs.registry import ModelRegistry
    from serving.metrics import metrics_urls

    stream: FileStream | None = None
    if options.source is not None:  # read (and refuse) the file before anything starts
        table = read_table(options.source)
        if not options.bootstrap_records:
            options = dataclasses.replace(options, bootstrap_records=max(1, table.num_rows // 3))
        if not 0 < options.bootstrap_records < table.num_rows:
            raise DriftloopError(
                f"{options.source}: {table.num_rows} rows; the first model needs --bootstrap-records "
                f"({options.bootstrap_records}) and some rows to serve after them"
            )
        live = options.bootstrap_records
        changed = options.drift_at if options.drift_at is not None and options.drift_at >= live else None
        replay = changed if changed is not None else live + (table.num_rows - live) // 2
        stream = FileStream(table, config.schema, str(options.source), start=live, drift_at=options.drift_at,
                            replay_from=replay)  # fmt: skip
    elif not options.bootstrap_records:
        options = dataclasses.replace(options, bootstrap_records=6000)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    begun_at = utcnow()  # the report covers this run's events (a configured broker may hold older ones)
    deadline = started + options.max_seconds
    os.environ.setdefault(API_KEY_ENV, secrets.token_urlsafe(24))
    embedded = config.kafka.embedded
    with kafka_for(config, run_dir) as config:
        uri = config.mlflow.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        # The embedded broker starts empty each run, so its offsets need a dataset store of their own.
        root = str(run_dir / "datasets") if embedded else config.datasets.root
        if "://" not in root:
            root = str(Path(root).resolve())  # jobs run in their own working directory
        config = dataclasses.replace(
            config.connected_to(tracking_uri=uri), datasets=dataclasses.replace(config.datasets, root=root)
        )
        topics = Topics.of(config)
        ensure_topics(config.kafka, topics.all())
        registry = ModelRegistry(config, uri, artifact_root=run_dir / "mlartifacts")
        _say(started, "mlflow", f"tracking and registry in {uri}")

        address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address:  # an existing cluster: its Jobs API is on its dashboard
            if is_loopback_address(address):  # a stack's Ray (`up`): join it where it listens
                bind_to_loopback()
            context = ray.init(address=address, **quiet)
        else:
            context = start_local(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                                  dashboard_port=free_port(), **quiet)  # fmt: skip
        jobs_address = f"http://{context.dashboard_url}"
        metrics_url = metrics_urls()[0]
        _say(started, "ray", f"local head with token auth; Jobs API at {jobs_address}; metrics at {metrics_url}")
        pipeline = Pipeline(config, uri, jobs_address, run_dir / "jobs")
        controller = pipeline.start_controller()
        monitors: list[Any] = []
        traffic = _Traffic()
        try:
            drift_at = options.bootstrap_records + options.before_drift
            interval = timedelta(seconds=1 / options.rate)  # event time keeps pace with the wall clock
            codec = RecordCodec(config.schema, config.kafka.max_record_bytes)
            with Producer(config.kafka, client_id=f"{config.name}.run") as producer:
                if stream is not None:
                    drift_at = options.drift_at if options.drift_at is not None else -1
                    sent = publish_file(stream.head(options.bootstrap_records), config.schema, producer, topics,
                                        config.name, str(options.source))  # fmt: skip
                    refused = f"; {len(sent.rejected)} refused (on {topics.dlq})" if sent.rejected else ""
                    _say(started, "produce", f"the file's first {sent.records} rows for the first model{refused}")
                else:
                    history = StreamGenerator(
                        config,
                        seed=options.seed,
                        start_time=utcnow() - interval * options.bootstrap_records,
                        interval=interval,
                        id_prefix=f"r{options.seed}-boot",
                    )
                    publish_stream(history, producer, topics, config.name, options.bootstrap_records)
                    _say(started, "produce", f"{options.bootstrap_records} labeled records for the first model")
                bootstrap = RetrainRequested(
                    event_id=deterministic_id(config.name, "bootstrap", run_dir.name),
                    pipeline=config.name,
                    cause="bootstrap: no champion yet",
                )
                producer.send_event(topics.retrain, bootstrap)
                producer.flush()
                _say(
                    started,
                    "retrain",
                    f"bootstrap request {bootstrap.event_id[:12]} -> the controller submits a Ray Job",
                )
                first = _wait_for(lambda: registry.alias("champion"), deadline, controller, started, "first model")
                if first is None:
                    return _fail(
                        started, "no first model: see the controller's job logs under " + str(run_dir / "jobs")
                    )
                _say(started, "gate", f"version {first} is the champion")

                url = pipeline.serve(config.serving.host, config.serving.port)
                _say(started, "serve", f"version {first} at {url}/v1/predict (API key in ${API_KEY_ENV})")
                monitors = pipeline.start_monitors()
                _say(started, "monitor", f"{len(monitors)} actor(s) watching predictions and delayed labels")
                bad = options.scenario == "bad-model"
                if bad:
                    drift_at = -1  # no drift: a bad model, forced in by hand, is what goes wrong

                def promote_bad() -> str:
                    return _promote_a_bad_model(config, registry, producer, topics, run_dir, options.seed)

                generator: Any = stream or StreamGenerator(
                    config,
                    seed=options.seed + 1,
                    scenario="concept" if bad else options.scenario,  # type: ignore[arg-type]
                    drift_at=None if bad else options.before_drift,
                    start_time=utcnow(),
                    interval=interval,
                    id_prefix=f"r{options.seed}-live",
                )
                with bar(None, "records served", unit="records") as shown:
                    outcome = _send_traffic(
                        shown,
                        config,
                        options,
                        generator,
                        codec,
                        producer,
                        topics,
                        url,
                        traffic,
                        first,
                        drift_at,
                        started,
                        deadline,
                        monitors,
                        controller,
                        promote_bad if bad else None,
                    )
            monitor_stats = _monitor_stats(monitors)
            controller_stats = ray.get(controller.stats.remote())
            settle = time.monotonic() + 60  # the job that promoted may still be finishing up
            while len(controller_stats.outcomes) < len(controller_stats.submitted) and time.monotonic() < settle:
                time.sleep(1.0)
                controller_stats = ray.get(controller.stats.remote())
            scenario = f"the rows of {options.source}" if options.source else f"{options.scenario} drift (generated)"
            if options.scenario == "bad-model":
                scenario = "bad-model: no drift, a model trained on inverted labels forced in by hand"
            gathered = gather(config, options.config_path or config.name, since=begun_at, tracking_uri=uri,
                              scenario=scenario)  # fmt: skip
            events = list(gathered.inputs.events)
            report = _report(
                config, options, traffic, events, monitor_stats, controller_stats, registry, first, drift_at, outcome
            )
            report["metrics_url"] = metrics_url  # driftloop_* series (jobs/metrics.py), while the run lasts
            if options.scenario == "bad-model":
                report["bad_model"] = _bad_model_report(traffic, events, first, options.bootstrap_records)
            html = write(run_dir / "report.html", dataclasses.replace(
                gathered.inputs, marks=_injected(traffic, drift_at - options.bootstrap_records),
                numbers={k: report[k] for k in NUMBERS},
            ))  # fmt: skip
            _print_summary(report, html, started)
            _log_report(uri, events, html)
            if options.report is not None:
                options.report.parent.mkdir(parents=True, exist_ok=True)
                options.report.write_text(json.dumps(report, indent=2, default=str))
                print(f"JSON report: {options.report}")
            closed = report["promoted_version"] or report["outcome"] == "kept"
            if options.scenario == "bad-model":
                closed = report["outcome"] == "rolled back"
            return 0 if closed and report["failed_requests"] == 0 else 1
        finally:
            for actor in [*monitors, controller]:
                try:
                    ray.get(actor.stop.remote(), timeout=40)
                except Exception as err:  # shutting down anyway
                    print(f"[stop] {err}", file=sys.stderr)
            serve.shutdown()
            ray.shutdown()


def _promote_a_bad_model(
    config: PipelineConfig, registry: Any, producer: Producer, topics: Topics, run_dir: Path, seed: int
) -> str:
    """`--scenario bad-model`: a model of the config's family trained in this process on generated
    records whose labels are inverted, registered and forced in as the champion (no gate), its
    `ModelPromoted` on the models topic. Returns its version."""
    import pyarrow as pa

    from jobs.train import train_model
    from streams.datasets import Window

    classes = config.schema.label.classes
    records = []
    for r in StreamGenerator(config, seed=seed + 7, id_prefix=f"r{seed}-bad").records(3000):
        record = dict(r.record)
        record[config.schema.label.name] = classes[(classes.index(r.label) + 1) % len(classes)]  # every label wrong
        when = record.get(config.schema.event_time)
        if isinstance(when, str):  # as the dataset store holds it: a timestamp
            record[config.schema.event_time] = datetime.fromisoformat(when.replace("Z", "+00:00"))
        records.append(record)
    table = pa.Table.from_pylist(records, schema=None)
    trained = train_model(config, Window(()), run_dir / "bad-model", data=table)
    report = json.loads((trained.artifact / "report.json").read_text())
    version = registry.log_training(trained.artifact, {"scenario": "bad-model"}, [], report, Window(())).version
    registry.force_promote(version, "run --scenario bad-model: trained on inverted labels",
                           publish=lambda e: producer.send_event(topics.models, e))  # fmt: skip
    producer.flush()
    return str(version)


def _bad_model_report(traffic: _Traffic, events: list[Any], first: str, base: int) -> dict[str, Any]:
    """What `--scenario bad-model` shows: the bad version's time as champion and its rollback."""
    bad = traffic.bad_version
    rolled = next((e for e in events if isinstance(e, ModelRolledBack) and e.from_version == bad), None)
    served_from = traffic.first_new_version_at.get(bad or "")
    flags = list(zip(traffic.correct, traffic.versions, strict=True))
    start = traffic.bad_at_record - base if traffic.bad_at_record is not None else len(flags)
    restored = traffic.restored_at_record - base if traffic.restored_at_record is not None else len(flags)
    return {
        "version": bad,
        "forced_at_record": traffic.bad_at_record,
        "rolled_back": rolled is not None,
        "rollback_reason": rolled.reason if rolled else None,
        "restored_version_answers_at_record": traffic.restored_at_record,
        "served_by_it_s": _seconds(served_from, traffic.restored_wall),
        "records_served_by_it": sum(1 for _, v in flags if v == bad),
        "accuracy_before": _accuracy([c for c, _ in flags[:start]]),
        "accuracy_while_bad": _accuracy([c for c, v in flags if v == bad]),
        "accuracy_after_rollback": _accuracy([c for c, v in flags[restored:] if v == first]),
    }


def _seconds(start: float | None, end: float | None) -> float | None:
    return round(end - start, 1) if start is not None and end is not None else None


NUMBERS = (
    "outcome", "records_sent", "requests_sent", "failed_requests", "drift_injected_at_record",
    "drift_detected_at_record", "promoted_version", "accuracy_before_drift", "accuracy_after_drift_before_retrain",
    "accuracy_after_promotion", "loop_latency_s", "loop_stages_s",
)  # fmt: skip


def _injected(traffic: _Traffic, index: int) -> list[tuple[datetime, str]]:
    """Where the run changed the stream (the served record `index`), when it was answered."""
    if not 0 <= index < len(traffic.wall):
        return []
    return [(datetime.fromtimestamp(traffic.wall[index], timezone.utc), "drift injected")]


def _log_report(uri: str, events: list[Any], html: Path) -> None:
    """The report, as an artifact of the MLflow run that produced the promoted model."""
    promoted = promoted_run(events)
    if promoted is None:
        return
    try:
        where = log_report(uri, promoted[1], html)
    except Exception as err:  # the page is on disk; MLflow holds a copy
        print(f"[report] not logged to MLflow: {type(err).__name__}: {err}", file=sys.stderr)
        return
    print(f"HTML report logged to MLflow run {promoted[1]} (version {promoted[0]}): {where}")


def _fail(started: float, message: str) -> int:
    _say(started, "error", message)
    return 1


def _wait_for(probe: Any, deadline: float, controller: Any, started: float, what: str) -> Any:
    import ray

    last = time.monotonic()
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        stats = ray.get(controller.stats.remote())
        failed = stats.failed()
        if failed or stats.error:
            print(f"[error] {failed[-1].message if failed else stats.error}", file=sys.stderr)
            return None
        if time.monotonic() - last > 15:
            _say(started, "wait", f"{what}: job {', '.join(s[:12] for s in stats.submitted) or '(none yet)'} running")
            last = time.monotonic()
        time.sleep(1.0)
    return None


def _send_traffic(
    shown: Any,
    config: PipelineConfig,
    options: LoopOptions,
    generator: StreamGenerator,
    codec: RecordCodec,
    producer: Producer,
    topics: Topics,
    url: str,
    traffic: _Traffic,
    first: str,
    drift_at: int,
    started: float,
    deadline: float,
    monitors: list[Any],
    controller: Any,
    promote_bad: Any = None,
) -> str:
    """Send records to the endpoint until the new champion has served `after_promotion` records (a bar
    at a terminal, `shown`, counts them): "promoted". When a retrain's challenger is turned down by the
    gate and nothing is promoted, the old champion serves as many records again, and the run ends
    "kept": the loop did its work, and the data's change did not call for a new model. With
    `promote_bad` (`--scenario bad-model`), it forces a bad model in after `before_drift` records
    and ends "rolled back" once the champion it replaced has served `after_promotion` records again."""
    import ray

    schema = config.schema
    names = schema.feature_names
    session = requests.Session()
    headers = {"x-api-key": os.environ[API_KEY_ENV]}
    labels: deque[tuple[int, str, Any]] = deque()
    begun = time.monotonic()
    drift_from = options.bootstrap_records + options.before_drift  # where the bad model goes in (bad-model)
    promoted_at_record: int | None = None
    kept_at_record: int | None = None
    last_report = time.monotonic()
    while True:
        if time.monotonic() > deadline:
            return "timeout"
        index = options.bootstrap_records + traffic.sent  # this batch's first record
        replaying = getattr(generator, "cycle", 0) > 0  # a file served again: its records are on the topic already
        batch = list(generator.records(options.batch))
        if not batch:
            producer.flush()
            return "stream ended"
        if getattr(generator, "cycle", 0) > 0 and not replaying:
            again = getattr(generator, "replay_from", 0)
            _say(started, "replay", f"the file ended; serving its rows from {again} again")
        if promote_bad is not None and traffic.bad_version is None and index >= drift_from:
            traffic.bad_version, traffic.bad_at_record = promote_bad(), index
            _say(started, "bad-model", f"version {traffic.bad_version} (trained on inverted labels) forced in as the "
                 "champion, no gate: the monitor's probation should roll it back")  # fmt: skip
        body = [{"request_id": r.id, **{n: r.record[n] for n in names if n in r.record}} for r in batch]
        try:
            answer = session.post(f"{url}/v1/predict", json=body, headers=headers, timeout=30)
            ok = answer.status_code == 200
        except requests.RequestException:
            ok = False
        traffic.requests += 1
        now = time.time()
        if not ok:
            traffic.failed += 1
        else:
            result = answer.json()
            version = str(result["model"]["version"])
            for r, p in zip(batch, result["predictions"], strict=True):
                traffic.correct.append(str(p["prediction"]) == str(r.label))
                traffic.versions.append(version)
                traffic.drifted.append(r.drifted)
                traffic.wall.append(now)
            if version != first and version not in traffic.first_new_version_at:
                traffic.first_new_version_at[version] = now
                promoted_at_record = index
                _say(started, "serve", f"now answering with version {version} (record {index})")
            bad_served = traffic.bad_version in traffic.first_new_version_at
            if bad_served and version == first and traffic.restored_at_record is None:
                traffic.restored_at_record, traffic.restored_wall = index, now
                _say(
                    started, "rollback", f"version {first} answers again (record {index}): the bad one was rolled back"
                )
        for j, r in enumerate(batch):
            if not replaying:
                producer.send(topics.records, codec.encode(r.record), key=r.key(schema))
            if r.label is not None:
                labels.append((index + j, r.id, r.label))
        while labels and labels[0][0] <= index - options.label_delay:
            _, request_id, label = labels.popleft()
            producer.send_event(
                topics.labels,
                LabelObserved(
                    event_id=deterministic_id(config.name, "label", request_id),
                    occurred_at=utcnow(),
                    request_id=request_id,
                    pipeline=config.name,
                    label=label,
                ),
            )
        traffic.sent += len(batch)
        shown.update(len(batch))
        if index < drift_at <= index + len(batch):
            what = "the file changes" if options.source else f"{options.scenario} drift starts"
            _say(started, "drift", f"{what} at record {drift_at}")
        if promote_bad is not None:
            restored = traffic.restored_at_record
            if restored is not None and index + len(batch) - restored >= options.after_promotion:
                producer.flush()
                return "rolled back"
        elif promoted_at_record is not None and index + len(batch) - promoted_at_record >= options.after_promotion:
            producer.flush()
            return "promoted"
        kept = promoted_at_record is None and kept_at_record is not None
        if kept and index + len(batch) - (kept_at_record or 0) >= options.after_promotion:
            producer.flush()
            return "kept"
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            recent = traffic.correct[-500:]
            stats = _monitor_stats(monitors)
            windows = stats.windows
            last = windows[-1] if windows else None
            _say(
                started,
                "traffic",
                f"{traffic.sent} records, accuracy (last 500) {sum(recent) / max(len(recent), 1):.3f}"
                + (f", {traffic.failed} requests FAILED" if traffic.failed else "")
                + "; monitor: "
                f"{len(windows)} windows, {stats.drift_events} drifted, {stats.retrain_requests} retrains"
                + (f"; last {last['kind']} window {'DRIFTED' if last['drifted'] else 'ok'}" if last else ""),
            )
            if stats.error:
                _say(started, "monitor", f"error: {stats.error}")
            if kept_at_record is None and (turned_down := _turned_down(ray.get(controller.stats.remote()))):
                kept_at_record = index + len(batch)
                _say(started, "gate", f"kept the champion: {'; '.join(turned_down[0]['reasons'])}")
        ahead = traffic.sent / options.rate - (time.monotonic() - begun)
        if ahead > 0:
            time.sleep(ahead)


def _gate(controller: ControllerReport) -> list[dict[str, Any]]:
    """Each finished job's gate decision: the version it registered, promoted or not, and why."""
    out = []
    for job in controller.outcomes:
        summary = job.summary or {}
        if summary.get("version"):
            out.append({"version": str(summary["version"]), "promoted": bool(summary.get("promoted")),
                        "reasons": [str(r) for r in summary.get("reasons") or []]})  # fmt: skip
    return out


def _turned_down(controller: ControllerReport) -> list[dict[str, Any]]:
    return [g for g in _gate(controller) if not g["promoted"]]


def _monitor_stats(monitors: list[Any]) -> MonitorReport:
    """The monitor actors' numbers, together (each holds some of the partitions)."""
    import ray

    from jobs.monitor import MonitorReport

    return MonitorReport.combined(ray.get([m.stats.remote() for m in monitors]))


def _accuracy(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _report(
    config: PipelineConfig,
    options: LoopOptions,
    traffic: _Traffic,
    events: list[Any],
    monitor: MonitorReport,
    controller: ControllerReport,
    registry: Any,
    first: str,
    drift_at: int,
    outcome: str,
) -> dict[str, Any]:
    base = options.bootstrap_records
    promoted = [e for e in events if isinstance(e, ModelPromoted) and e.model_version != first]
    new_version = promoted[0].model_version if promoted else None
    served_new = traffic.first_new_version_at.get(new_version or "", None)
    drift_wall = next((w for w, d in zip(traffic.wall, traffic.drifted, strict=True) if d), None)
    detections = [
        e for e in events if isinstance(e, DriftDetected) and drift_wall and e.occurred_at.timestamp() >= drift_wall
    ]
    retrains = [e for e in events if isinstance(e, RetrainRequested) and not e.cause.startswith("bootstrap")]

    def record_at(when: float | None) -> int | None:
        if when is None:
            return None
        for i, w in enumerate(traffic.wall):
            if w >= when:
                return base + i
        return base + len(traffic.wall)

    detected_wall = detections[0].occurred_at.timestamp() if detections else None
    before = [c for c, d in zip(traffic.correct, traffic.drifted, strict=True) if not d]
    after_old = [
        c for c, d, v in zip(traffic.correct, traffic.drifted, traffic.versions, strict=True) if d and v == first
    ]
    after_new = [c for c, v in zip(traffic.correct, traffic.versions, strict=True) if new_version and v == new_version]
    timeline = _timeline(events)
    lineage: dict[str, Any] = {}
    if new_version:
        version = registry.client.get_model_version(config.name, new_version)
        lineage = {
            "version": new_version,
            "run_id": version.run_id,
            **{k.removeprefix("driftloop."): v for k, v in version.tags.items() if k.startswith("driftloop.")},
        }
    stages = _loop_stages(
        drift_wall, detected_wall, retrains[0] if retrains else None, promoted[0] if promoted else None, served_new,
        controller,
    )  # fmt: skip
    return {
        "outcome": outcome,
        "scenario": options.scenario,
        "drift_injected_at_record": drift_at,
        "drift_detected_at_record": record_at(detected_wall),
        "drift_event_kind": detections[0].kind if detections else None,
        "retrain_submission_id": retrains[0].event_id if retrains else None,
        "first_version": first,
        "promoted_version": new_version,
        "loop_latency_s": round(served_new - drift_wall, 1) if served_new and drift_wall else None,
        "loop_stages_s": stages,
        "requests_sent": traffic.requests,
        "records_sent": traffic.sent,
        "failed_requests": traffic.failed,
        "accuracy_before_drift": _accuracy(before),
        "accuracy_after_drift_before_retrain": _accuracy(after_old),
        "accuracy_after_promotion": _accuracy(after_new),
        "monitor": {k: getattr(monitor, k) for k in ("drift_events", "retrain_requests", "predictions", "labels")},
        "gate": _gate(controller),
        "jobs": [dataclasses.asdict(o) for o in controller.outcomes],
        "duplicate_requests": list(controller.duplicates),
        "timeline": timeline,
        "lineage": lineage,
    }


def _loop_stages(
    drift_wall: float | None,
    detected_wall: float | None,
    retrain: RetrainRequested | None,
    promoted: ModelPromoted | None,
    served_new: float | None,
    controller: ControllerReport,
) -> dict[str, float] | None:
    """Where the loop latency went: detect, request, submit and job start, the job's own stages
    (start, ingest, read, tune, train, register, gate: from its result), swap."""
    if None in (drift_wall, detected_wall, retrain, promoted, served_new):
        return None
    assert drift_wall and detected_wall and retrain and promoted and served_new
    requested, promoted_at = retrain.occurred_at.timestamp(), promoted.occurred_at.timestamp()
    job = next((o.summary or {} for o in controller.outcomes if o.submission_id == retrain.event_id), {})
    inside = {k: float(v) for k, v in (job.get("stages_s") or {}).items()}
    stages = {"detect": detected_wall - drift_wall, "request": requested - detected_wall}
    stages["submit and job start"] = promoted_at - requested - sum(inside.values())
    stages |= {f"job {k}": v for k, v in inside.items()}
    stages["swap"] = served_new - promoted_at
    return {k: round(v, 1) for k, v in stages.items()}


def _timeline(events: list[Any]) -> list[dict[str, Any]]:
    """The events in order; a run of drift events of one kind is one line with its count."""
    out: list[dict[str, Any]] = []
    for e in events:
        item = {"at": e.occurred_at.isoformat(), "event": type(e).__name__, "detail": _detail(e), "count": 1}
        last = out[-1] if out else None
        if last and isinstance(e, DriftDetected) and last["event"] == item["event"] and last["kind"] == e.kind:
            last["count"] += 1
            last["until"] = item["at"]
            last["detail"] = f"{e.kind} drift in {last['count']} windows in a row, last: {item['detail']}"
            continue
        item["kind"] = getattr(e, "kind", None)
        out.append(item)
    return out


def _detail(event: Any) -> str:
    if isinstance(event, DriftDetected):
        return f"{event.kind} drift in {', '.join(event.drifted_features)} ({event.window_size} in window)"
    if isinstance(event, RetrainRequested):
        return f"{event.event_id[:12]}: {event.cause}"
    if isinstance(event, TrainingCompleted):
        return f"version {event.model_version} (job {str(event.submission_id)[:12]})"
    if isinstance(event, TrainingFailed):
        return event.reason[:200]
    if isinstance(event, ModelPromoted):
        return f"version {event.model_version} replaces {event.previous_version}"
    if isinstance(event, ModelRejected):
        return f"version {event.model_version}: {'; '.join(event.reasons)}"
    return ""


def _print_summary(report: dict[str, Any], html: Path, started: float) -> None:
    print(f"\n=== driftloop run: {report['outcome']} in {time.monotonic() - started:.0f}s ===")
    print("timeline:")
    for item in report["timeline"]:
        print(f"  {item['at'][11:23]}  {item['event']:<18} {item['detail']}")
    keys: tuple[str, ...] = (
        "drift_injected_at_record",
        "drift_detected_at_record",
        "drift_event_kind",
        "retrain_submission_id",
        "promoted_version",
        "loop_latency_s",
        "requests_sent",
        "failed_requests",
        "accuracy_before_drift",
        "accuracy_after_drift_before_retrain",
        "accuracy_after_promotion",
    )
    if report.get("bad_model"):  # no drift, no retrain: what the scenario shows is below
        keys = ("requests_sent", "failed_requests")
    for key in keys:
        print(f"  {key:<38} {report[key]}")
        if key == "loop_latency_s" and report.get("loop_stages_s"):
            print("    " + ", ".join(f"{k} {v:g}" for k, v in report["loop_stages_s"].items()))
    if report.get("bad_model"):
        print("bad model (--scenario bad-model):")
        for k, v in report["bad_model"].items():
            print(f"  {k:<38} {str(v)[:150]}")
    if report["lineage"]:
        print("lineage of the rolled-back version:" if report.get("bad_model") else "lineage of the new champion:")
        for k, v in report["lineage"].items():
            print(f"  {k:<20} {str(v)[:150]}")
    print(f"HTML report: {html}")
