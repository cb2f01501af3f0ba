"""Report generation: `driftloop report`'s path on a stack holding 100,000 predictions.

An embedded broker gets a pipeline's topics filled as a day of serving would leave them: N
predictions (the demo's 7 features, two model versions), their N labels, 20 drift events, a
retrain request, the job's and the gate's events. Then, timed, what `driftloop report` does
without MLflow: `report_io.gather` (read the five topics; each read ends after 2 s without new
records, as the CLI's does), `report.build` (join, rolling accuracy, marks, tables) and
`report.render` + write (plotly, plotly.js inline).

There is no fair peer: Evidently and MLflow render reports from data frames already in memory,
not from Kafka topics, and mark no loop events. Beside ours the benchmark runs the floor of the
reading part: one bare kafka-python consumer fetching the same five topics (no decoding), which
no report built from the topics can beat. ratio = ours (whole report) / floor (fetch only).

    python benchmarks/report.py --quick --json runs/bench/report.json
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
from kafka import KafkaConsumer, TopicPartition  # noqa: E402

from cluster.broker import EmbeddedBroker  # noqa: E402
from cluster.report import build, render  # noqa: E402
from cluster.report_io import gather  # noqa: E402
from streams.config import PipelineConfig, load_config  # noqa: E402
from streams.events import (  # noqa: E402
    DriftDetected,
    FeatureDrift,
    LabelObserved,
    ModelPromoted,
    PredictionLogged,
    RetrainRequested,
    TrainingCompleted,
)
from streams.generator import StreamGenerator  # noqa: E402
from streams.kafka import Producer, client_options, ensure_topics  # noqa: E402
from streams.topics import Topics  # noqa: E402

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def fill(config: PipelineConfig, count: int) -> int:
    """Publish the stack's history; the number of records written."""
    topics = Topics.of(config)
    ensure_topics(config.kafka, topics.all())
    names = list(config.schema.feature_names)
    label = config.schema.label.name
    records = StreamGenerator(config, seed=3, scenario="covariate", drift_at=count // 2).records(count)
    step = timedelta(seconds=86_400 / count)
    with Producer(config.kafka, client_id="bench-fill") as producer:
        for i, r in enumerate(records):
            at = T0 + step * i
            version = "1" if i < count * 3 // 4 else "2"
            prediction = PredictionLogged(request_id=f"r{i}", pipeline=config.name, model_name=config.name,
                                          model_version=version, features={n: r.record[n] for n in names},
                                          prediction="yes" if i % 2 else "no", probabilities={"yes": 0.4, "no": 0.6},
                                          occurred_at=at)  # fmt: skip
            producer.send_event(topics.predictions, prediction)
            producer.send_event(topics.labels, LabelObserved(request_id=f"r{i}", pipeline=config.name,
                                                             label=str(r.record[label]), occurred_at=at))  # fmt: skip
        events: list[Any] = [
            TrainingCompleted(pipeline=config.name, model_name=config.name, model_version="1", run_id="r1",
                              occurred_at=T0, started_at=T0 - timedelta(minutes=3), metrics={"accuracy": 0.85}),
            ModelPromoted(model_name=config.name, model_version="1", occurred_at=T0),
        ]  # fmt: skip
        for w in range(20):
            start = T0 + step * (count // 2 + w * 1000)
            stats = [FeatureDrift(feature=n, statistic=s, value=0.3, threshold=0.05, drifted=n == "plan",
                                  p_value=1e-6 if s == "ks" else None)
                     for n in names for s in ("ks", "psi")]  # fmt: skip
            events.append(DriftDetected(pipeline=config.name, occurred_at=start + step * 1000, window_start=start,
                                        window_end=start + step * 1000, window_size=1000, offsets=(),
                                        statistics=tuple(stats)))  # fmt: skip
        request = RetrainRequested(
            pipeline=config.name, cause="data drift", occurred_at=T0 + step * (count // 2 + 3000)
        )
        events += [
            request,
            TrainingCompleted(pipeline=config.name, model_name=config.name, model_version="2", run_id="r2",
                              occurred_at=request.occurred_at + timedelta(minutes=4), trigger_event_id=request.event_id,
                              started_at=request.occurred_at + timedelta(seconds=5), metrics={"accuracy": 0.84}),
            ModelPromoted(model_name=config.name, model_version="2", previous_version="1",
                          occurred_at=request.occurred_at + timedelta(minutes=4)),
        ]  # fmt: skip
        for e in events:
            topic = topics.drift if isinstance(e, DriftDetected) else topics.retrain
            producer.send_event(topics.models if isinstance(e, (TrainingCompleted, ModelPromoted)) else topic, e)
        producer.flush()
    return 2 * count + len(events)


def ours(config: PipelineConfig, out: Path) -> dict[str, float]:
    started = time.perf_counter()
    gathered = gather(config, "configs/demo.yaml")
    read = time.perf_counter()
    model = build(gathered.inputs)
    built = time.perf_counter()
    out.write_text(render(model), encoding="utf-8")
    done = time.perf_counter()
    if len(gathered.inputs.served) == 0:
        raise SystemExit("the report read no predictions")
    return {"read_s": read - started, "build_s": built - read, "render_s": done - built, "total_s": done - started}


def floor(config: PipelineConfig, expected: int) -> float:
    """Seconds for a bare consumer to fetch every record of the five topics."""
    topics = Topics.of(config)
    consumer = KafkaConsumer(**client_options(config.kafka), enable_auto_commit=False, fetch_max_bytes=64 << 20,
                             max_partition_fetch_bytes=4 << 20)  # fmt: skip
    names = [topics.predictions, topics.labels, topics.drift, topics.retrain, topics.models]
    parts = [TopicPartition(t, p) for t in names for p in sorted(consumer.partitions_for_topic(t) or ())]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    started = time.perf_counter()
    seen = 0
    deadline = time.monotonic() + 120
    while seen < expected and time.monotonic() < deadline:
        seen += sum(len(rs) for rs in consumer.poll(timeout_ms=500, max_records=5000).values())
    elapsed = time.perf_counter() - started
    consumer.close()
    if seen != expected:
        raise SystemExit(f"the floor read {seen} records, expected {expected}")
    return elapsed


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--predictions", type=int, default=None, help="default 20,000 quick, 100,000 full")
    parser.add_argument("--rounds", type=int, default=None, help="default 1 quick, 3 full")
    args = parser.parse_args()
    count = args.predictions or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (1 if args.quick else 3)
    base = load_config(ROOT / "configs" / "demo.yaml", env={})
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as folder:
        kafka = dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap)
        config = dataclasses.replace(base, name="bench-report", kafka=kafka)
        records = fill(config, count)
        results, floors = [], []
        for i in range(rounds):
            page = Path(folder) / "report.html"
            results.append(ours(config, page))
            floors.append(floor(config, records))
            print(f"round {i + 1}/{rounds}: ours {results[-1]['total_s']:.2f}s (read {results[-1]['read_s']:.2f}s), "
                  f"floor {floors[-1]:.2f}s; page {page.stat().st_size / 1e6:.1f} MB", file=sys.stderr)  # fmt: skip
        size = page.stat().st_size
    median = {k: round(statistics.median(r[k] for r in results), 3) for k in results[0]}
    fetch = round(statistics.median(floors), 3)
    return common.emit(
        {
            "benchmark": "report",
            "machine": common.machine(),
            "predictions": count,
            "records_read": records,
            "rounds": rounds,
            "ours_s": median,
            "floor_fetch_only_s": fetch,
            "page_mb": round(size / 1e6, 2),
            "ratio_ours_over_floor": round(median["total_s"] / fetch, 2),
            "note": "ours' read includes 2 s of idleness per read pass (2 passes), as `driftloop report` waits",
        },
        args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
