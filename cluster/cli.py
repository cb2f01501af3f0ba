"""`driftloop`: the command line.

Every command reports bad input as one line on stderr and a non-zero exit status (2 for a
usage or config error, 1 for a runtime failure), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jobs.controller import CONFIG_ENV
from streams.config import (
    API_KEY_ENV,
    API_KEY_HASH_ENV,
    MLFLOW_PASSWORD_FILE_ENV,
    PipelineConfig,
    load_config,
    parse_config,
)
from streams.errors import ConfigError, DriftloopError
from streams.generator import SCENARIOS, StreamGenerator
from streams.kafka import Batch, Producer, StreamConsumer, ensure_topics
from streams.progress import bar
from streams.publish import interval_for, publish_stream
from streams.serde import RecordCodec
from streams.topics import Topics

log = logging.getLogger("driftloop")
STACK_DIR = Path("runs/stack")


def main(argv: Sequence[str] | None = None) -> int:
    # Ray token auth stays on: clients of a cluster send the token (RAY_AUTH_TOKEN or ~/.ray/auth_token).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kafka").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"driftloop: config error: {err}", file=sys.stderr)
        return 2
    except DriftloopError as err:
        print(f"driftloop: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("driftloop: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driftloop", description="An event-driven, closed-loop ML lifecycle on Kafka and Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the libraries do, too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu) until Ctrl-C")
    broker.add_argument("--port", type=_port, default=None, help="loopback port (default: a free one)")
    broker.add_argument(
        "--log-file", type=Path, default=Path("runs/broker.log"), help="broker log (default: %(default)s)"
    )
    broker.add_argument("--storage", default="memory://tansu/", help="Tansu storage engine URL (default: %(default)s)")
    broker.set_defaults(func=cmd_broker)

    init = sub.add_parser("init", help="write a pipeline config inferred from a data file (CSV, Parquet, JSON Lines)")
    init.add_argument("--from", dest="source", type=Path, required=True, help="the data file")
    init.add_argument("--label", required=True, help="the column to predict")
    init.add_argument("--name", default=None, help="the pipeline's name (default: from the file's name)")
    init.add_argument("--id", dest="record_id", default=None, help="the column that names each record, if any")
    init.add_argument("--time", dest="timestamp", default=None, help="the event-time column, if any")
    init.add_argument("--entity", dest="entity_id", default=None, help="the column of entity ids (the Kafka key)")
    init.add_argument("--out", type=Path, default=None, help="where the config goes (default: configs/<name>.yaml)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.set_defaults(func=cmd_init)

    produce = sub.add_parser(
        "produce", help="stream records into Kafka: generated ones (with drift), or a file's rows (--from)"
    )
    _config_arg(produce)
    produce.add_argument("--from", dest="source", type=Path, default=None, help="send this file's rows (CSV, Parquet, "
                         "JSON Lines), converted losslessly to the schema's types")  # fmt: skip
    produce.add_argument("--limit", type=_positive_int, default=None, help="with --from: send at most this many rows")
    produce.add_argument("--records", type=_positive_int, default=None, help="how many records to generate")
    produce.add_argument("--drift-at", type=_non_negative_int, default=None, help="index of the first drifted record")
    produce.add_argument(
        "--scenario", choices=SCENARIOS, default="covariate", help="kind of drift (default: %(default)s)"
    )
    produce.add_argument(
        "--rate", type=_positive_float, default=None, help="records per second (default: as fast as possible)"
    )
    produce.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same stream")
    produce.add_argument(
        "--label-delay",
        type=_non_negative_int,
        default=None,
        help="also publish labels on the labels topic, this many records later",
    )
    produce.add_argument("--unlabeled", action="store_true", help="leave the label out of the records")
    produce.add_argument(
        "--bad-fraction", type=_fraction, default=0.0, help="fraction of records to corrupt on purpose (DLQ demo)"
    )
    produce.set_defaults(func=cmd_produce)

    consume = sub.add_parser("consume", help="consume a pipeline's records (bad ones go to the DLQ) and report")
    _config_arg(consume)
    consume.add_argument("--group", default=None, help="consumer group (default: <pipeline>.cli)")
    consume.add_argument("--max-records", type=_positive_int, default=None, help="stop after this many records")
    consume.add_argument(
        "--idle-timeout", type=_positive_float, default=None, help="stop after this many seconds without records"
    )
    consume.add_argument(
        "--print", dest="print_records", action="store_true", help="print each good record as a JSON line"
    )
    consume.set_defaults(func=cmd_consume)

    ingest = sub.add_parser("ingest", help="ingest new records into a versioned Parquet dataset (Ray)")
    _config_arg(ingest)
    ingest.add_argument("--follow", action="store_true", help="keep ingesting every --interval seconds until Ctrl-C")
    ingest.add_argument(
        "--interval", type=_positive_float, default=30.0, help="seconds between ingestions (default: %(default)s)"
    )
    ingest.add_argument(
        "--root", default=None, help="dataset store root, a path or URI (default: the config's datasets.root)"
    )
    ingest.set_defaults(func=cmd_ingest)

    train = sub.add_parser("train", help="train one model on the dataset with Ray Train (local Ray or RAY_ADDRESS)")
    _config_arg(train)
    train.add_argument("--out", type=Path, default=None, help="where the artifact goes (default: runs/train-<time>)")
    train.add_argument("--last-rows", type=_positive_int, default=None, help="train on the newest N rows")
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", help="tune, train the best, register it in MLflow and run the promotion gate")
    _config_arg(tune)
    tune.add_argument("--out", type=Path, default=None, help="run directory (default: runs/tune-<time>)")
    tune.set_defaults(func=cmd_tune)

    deploy = sub.add_parser("deploy", help="serve the champion (or --version) with Ray Serve; hot-swaps a running app")
    _config_arg(deploy)
    deploy.add_argument("--version", default=None, help="serve this registry version instead of the champion")
    _tracking_uri_arg(deploy)
    deploy.add_argument("--challenger", default=None, help="the version that shadows or canaries (serving.policy)")
    deploy.set_defaults(func=cmd_deploy)

    launch = sub.add_parser(
        "launch",
        help="on a Ray cluster, start a pipeline's controller and monitors (detached actors) and its Serve app; "
        "run it as a job: driftloop submit -- python -m cluster launch ...",
    )
    launch.add_argument(
        "--config", type=Path, default=None, help=f"pipeline config (default: the YAML text in ${CONFIG_ENV})"
    )
    _tracking_uri_arg(launch)
    launch.add_argument(
        "--jobs-address", default=None, help="the Jobs API the controller submits retrains to (default: this cluster's)"
    )
    launch.add_argument(
        "--jobs-dir", type=Path, default=None, help="where each retrain job writes, on its node (default: temp)"
    )
    launch.add_argument(
        "--job-env", action="append", default=[], metavar="NAME",
        help="pass this variable's value from this environment on to each retrain job (repeatable)",
    )  # fmt: skip
    action = launch.add_mutually_exclusive_group()
    action.add_argument("--stop", action="store_true", help="stop the pipeline's controller, monitors and app instead")
    action.add_argument(
        "--status", action="store_true", help="print what each of its actors says, as JSON (exit 1: one is not running)"
    )
    launch.set_defaults(func=cmd_launch)

    key_hash = sub.add_parser(
        "key-hash", help=f"print the salted hash of ${API_KEY_ENV} for ${API_KEY_HASH_ENV} (the key stays here)"
    )
    key_hash.set_defaults(func=cmd_key_hash)

    rollback = sub.add_parser("rollback", help="point the champion back at the previous version (serving follows)")
    _config_arg(rollback)
    _tracking_uri_arg(rollback)
    rollback.add_argument("--reason", default="manual rollback", help="recorded in the ModelRolledBack event")
    rollback.set_defaults(func=cmd_rollback)

    report = sub.add_parser(
        "report", help="an HTML report of a pipeline, rebuilt from its topics (and logged to MLflow when reachable)"
    )
    _config_arg(report)
    report.add_argument(
        "--state-dir", type=Path, default=STACK_DIR, help="a stack from `driftloop up` (default: %(default)s)"
    )
    report.add_argument(
        "--since", type=_iso_time, default=None, help="only from this ISO 8601 time on (no zone: UTC; default: all)"
    )
    _tracking_uri_arg(report)
    report.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    report.add_argument("--scenario", default=None, help="a note for the header: what this stream is")
    report.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    report.set_defaults(func=cmd_report)

    lineage = sub.add_parser("lineage", help="a model version's whole trail, from Kafka offsets to serving")
    lineage.add_argument("model", help="NAME@ALIAS or NAME@VERSION, e.g. demo@champion or demo@3")
    _config_arg(lineage)
    _tracking_uri_arg(lineage)
    lineage.add_argument("--datasets-root", default=None, help="the dataset store (default: datasets.root)")
    lineage.add_argument("--json", action="store_true", help="print the trail as JSON")
    lineage.set_defaults(func=cmd_lineage)

    monitor = sub.add_parser(
        "monitor", help="watch predictions and delayed labels for drift in the foreground; publish drift and retrains"
    )
    _config_arg(monitor)
    _tracking_uri_arg(monitor)
    monitor.add_argument("--windows", type=_positive_int, default=None, help="stop after this many closed windows")
    monitor.add_argument("--max-seconds", type=_positive_float, default=None, help="stop after this long")
    monitor.set_defaults(func=cmd_monitor)

    up = sub.add_parser("up", help="start a local stack in the background: broker, Ray, MLflow, monitor, controller")
    up.add_argument(
        "--config", type=Path, action="append", required=True,
        help="a pipeline config, e.g. configs/demo.yaml; give it again for each pipeline the stack runs",
    )  # fmt: skip
    up.add_argument("--state-dir", type=Path, default=STACK_DIR, help="its state and logs (default: %(default)s)")
    up.add_argument(
        "--num-cpus", type=_positive_int, default=None,
        help="logical CPUs the Ray cluster offers (default: the machine's, and at least what Serve and a retraining "
        "job hold at once); with --workers, split evenly between the head and the worker nodes, the head keeping "
        "the rest, so that together they offer no more than that",
    )  # fmt: skip
    up.add_argument("--serve-port", type=_port, default=None, help="Serve's port (default: the config's serving.port)")
    from cluster.stack import MAX_WORKERS

    up.add_argument(
        "--workers", type=_number(int, lambda v: 0 <= v <= MAX_WORKERS, f"an integer from 0 to {MAX_WORKERS}"),
        default=0, metavar="N",
        help="also start N Ray worker nodes on this machine, with the custom resource worker_node (the head has "
        "head_node): a multi-node cluster to try, e.g. `driftloop submit --resource worker_node=1 -- ...` "
        "(default: %(default)s)",
    )  # fmt: skip
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop what `driftloop up` started (by process id), and nothing else")
    down.add_argument("--state-dir", type=Path, default=STACK_DIR, help="the stack's state dir (default: %(default)s)")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="each part of the stack: up or down, consumer lag, champion, jobs, events")
    _config_arg(status)
    status.add_argument(
        "--state-dir", type=Path, default=STACK_DIR, help="a stack from `driftloop up` (default: %(default)s)"
    )
    _tracking_uri_arg(status)
    status.add_argument("--address", default=None, help="the Ray Jobs API URL (default: RAY_ADDRESS when a URL)")
    status.add_argument(
        "--serve-url", default=None, help="the Serve endpoint (default: http://serving.host:serving.port)"
    )
    status.add_argument(
        "--metrics-url",
        default=None,
        help="Ray's metrics endpoint, Prometheus text, e.g. http://head:8080/metrics (default: the stack's)",
    )
    status.add_argument(
        "--expect-services",
        action="store_true",
        help="the controller and monitor should run (a pipeline from `launch`): none heard from is a finding "
        "(a stack from `up` expects them already)",
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)

    submit = sub.add_parser(
        "submit",
        help="run an entrypoint on the Ray cluster (Jobs API), stream its logs, exit with its outcome",
        description="Submit `-- COMMAND ...` as a Ray job with this repository as its working_dir, e.g. "
        "`driftloop submit --address http://head:8265 -- python -m jobs.retrain --config configs/demo.yaml`.",
    )
    submit.add_argument("--address", default=None, help="the Ray Jobs API URL (default: RAY_ADDRESS)")
    submit.add_argument(
        "--python",
        default=None,
        help="interpreter that replaces a leading `python` (default: the stack's for the stack's cluster, this one "
        "for a cluster on this machine, else the cluster's)",
    )
    submit.add_argument(
        "--state-dir", type=Path, default=STACK_DIR, help="a stack from `driftloop up` (default: %(default)s)"
    )  # fmt: skip
    submit.add_argument(
        "--env", action="append", default=[], metavar="NAME", help="forward this variable's value to the job"
    )
    submit.add_argument("--submission-id", default=None, help="the job's id (default: driftloop-<random>)")
    submit.add_argument(
        "--resource", action="append", default=[], metavar="NAME=AMOUNT",
        help="run on a node with this custom Ray resource, e.g. worker_node=1 (repeatable)",
    )  # fmt: skip
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.add_argument("--json", action="store_true", help="end with the outcome as one JSON line")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command the job runs")
    submit.set_defaults(func=cmd_submit)

    run = sub.add_parser("run", help="run the pipeline end to end on the embedded default")
    run.add_argument(
        "config", type=Path, nargs="?", default=Path("configs/demo.yaml"), help="pipeline config (default: %(default)s)"
    )
    run.add_argument("--scenario", choices=(*SCENARIOS, "bad-model"), default="concept",
                     help="kind of drift (default: %(default)s); bad-model: no drift, a bad model is forced in as "
                     "the champion by hand, and the monitor's probation rolls it back")  # fmt: skip
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--run-dir", type=Path, default=None, help="where logs and state go (default: runs/<time>)")
    run.add_argument("--report", type=Path, default=None, help="also write the run's numbers as JSON here")
    run.add_argument("--from", dest="source", type=Path, default=None,
                     help="serve this file's rows (CSV, Parquet, JSON Lines) as the stream")  # fmt: skip
    run.add_argument("--drift-at", type=_non_negative_int, default=None,
                     help="with --from: the row where you know the data changes (only the report uses it)")  # fmt: skip
    run.add_argument("--bootstrap-records", type=_positive_int, default=None,
                     help="records the first model trains on (default: 6000, or a third of --from's rows)")  # fmt: skip
    run.add_argument("--before-drift", type=_positive_int, default=3000, help="records served before drift starts")
    run.add_argument("--after-promotion", type=_positive_int, default=3000,
                     help="records the new champion serves before the run ends")  # fmt: skip
    run.add_argument("--rate", type=_positive_float, default=250.0, help="records per second sent to the endpoint")
    run.add_argument("--max-seconds", type=_positive_float, default=600.0, help="give up after this long")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="about config files: `driftloop config schema` prints their JSON Schema")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    schema = actions.add_parser("schema", help="print the JSON Schema of a pipeline config (for editors)")
    schema.set_defaults(func=cmd_config_schema)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="pipeline config, e.g. configs/demo.yaml")


def _tracking_uri_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None, help="MLflow (default: MLFLOW_TRACKING_URI or the config)")


def _number(kind: Callable[[str], Any], check: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "an integer > 0")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a number > 0")
_fraction = _number(float, lambda v: 0 <= v <= 1, "a number between 0 and 1")
_port = _number(int, lambda v: 1 <= v <= 65535, "a port number (1-65535)")


def _iso_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an ISO 8601 time such as 2026-05-01T12:00:00+00:00, not {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _on_signals(callback: Callable[[], None]) -> None:
    """Run `callback` on SIGTERM and SIGINT (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: callback())


def _connected(config: PipelineConfig) -> PipelineConfig:
    if config.kafka.embedded:
        raise DriftloopError(
            "no broker: the config says kafka.bootstrap_servers: embedded. Start one with "
            "`driftloop broker` and export the KAFKA_BOOTSTRAP_SERVERS it prints, or use `driftloop run`"
        )
    return config


# --- commands ----------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from cluster.broker import EmbeddedBroker

    stop = threading.Event()
    _on_signals(stop.set)
    with EmbeddedBroker(port=args.port, log_file=args.log_file, storage=args.storage) as broker:
        print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}", flush=True)
        print(f"Tansu broker running (log: {args.log_file}); Ctrl-C stops it.", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if broker.process is None or broker.process.poll() is not None:
                raise DriftloopError(f"the broker exited unexpectedly; see {args.log_file}")
    print("broker stopped", file=sys.stderr)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    import re

    from streams.files import infer_config, read_table

    name = args.name or re.sub(r"[^A-Za-z0-9_-]+", "-", args.source.stem).strip("-")[:100] or "pipeline"
    out = args.out or Path("configs") / f"{name}.yaml"
    if out.exists() and not args.force:
        raise ConfigError("<command line>", "--out", "a path that does not exist yet (or --force)", str(out))
    table = read_table(args.source)
    inferred = infer_config(
        table, label=args.label, name=name, record_id=args.record_id, timestamp=args.timestamp,
        entity_id=args.entity_id, source=str(args.source),
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(inferred.text, encoding="utf-8")
    width = max(len(c) for c, _ in inferred.columns)
    print(f"{args.source}: {table.num_rows} rows, {table.num_columns} columns")
    for column, what in inferred.columns:
        print(f"  {column:<{width}}  {what}")
    for note in inferred.notes:
        print(f"note: {note}")
    print(f"wrote {out} (pipeline {name!r}); check its ranges and categories, then:")
    print(f"  driftloop run {out} --from {args.source}")
    return 0


def _produce_file(args: argparse.Namespace, config: PipelineConfig, topics: Topics) -> int:
    from streams.files import file_records, read_table
    from streams.publish import publish_file
    from streams.rdkafka import BulkProducer

    table = read_table(args.source)
    total = min(table.num_rows, args.limit or table.num_rows)
    settings = config.kafka.producer
    bulk = BulkProducer(config.kafka, client_id=f"{config.name}.file", timeout_s=settings.delivery_timeout_ms / 1000,
                        linger_ms=settings.linger_ms)  # fmt: skip
    with (
        Producer(config.kafka, client_id=f"{config.name}.producer") as producer,
        bar(total, f"producing {args.source} to {topics.records}", unit="rows") as shown,
    ):
        stats = publish_file(
            file_records(table, config.schema, coerce=False), config.schema, producer, topics, config.name,
            str(args.source),
            rate=args.rate, label_delay=args.label_delay, limit=args.limit,
            progress=lambda sent: shown.update(sent - shown.n), bulk=bulk,
        )  # fmt: skip
    bulk.close()
    print(
        f"sent {stats.records} rows of {args.source} to {topics.records} in {stats.seconds:.1f}s "
        f"({stats.records / max(stats.seconds, 1e-9):,.0f}/s); labels: {stats.labels}; "
        f"refused: {len(stats.rejected)} (to {topics.dlq})"
    )
    for index, err in stats.rejected[:5]:
        print(f"  {args.source}: row {index + 1}: {err}", file=sys.stderr)
    if stats.rejected:
        more = f" ({len(stats.rejected) - 5} more)" if len(stats.rejected) > 5 else ""
        print(f"driftloop: error: {len(stats.rejected)} rows disagree with {args.config}{more}; each is on "
              f"{topics.dlq} with its reason", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    config = _connected(load_config(args.config))
    if (args.source is None) == (args.records is None):
        raise ConfigError("<command line>", "--records/--from", "one of --records N or --from FILE", None)
    topics = Topics.of(config)
    ensure_topics(config.kafka, topics.all())
    if args.source is not None:
        return _produce_file(args, config, topics)
    generator = StreamGenerator(
        config,
        seed=args.seed,
        scenario=args.scenario,
        drift_at=args.drift_at,
        start_time=datetime.now().astimezone(),
        interval=interval_for(args.rate),
        unlabeled=args.unlabeled,
    )
    with (
        Producer(config.kafka, client_id=f"{config.name}.producer") as producer,
        bar(args.records, f"producing to {topics.records}", unit="records") as shown,
    ):
        stats = publish_stream(
            generator,
            producer,
            topics,
            config.name,
            args.records,
            rate=args.rate,
            label_delay=args.label_delay,
            bad_fraction=args.bad_fraction,
            progress=lambda sent: shown.update(sent - shown.n),
        )
    print(
        f"sent {stats.records} records to {topics.records} in {stats.seconds:.1f}s "
        f"({stats.records / max(stats.seconds, 1e-9):,.0f}/s); labels: {stats.labels}; "
        f"malformed on purpose: {stats.malformed}"
        + (f"; drift ({args.scenario}) from record {args.drift_at}" if args.drift_at is not None else "")
    )
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    config = _connected(load_config(args.config))
    topics = Topics.of(config)
    ensure_topics(config.kafka, [topics.records, topics.dlq])
    codec = RecordCodec(config.schema, config.kafka.max_record_bytes)

    shown = bar(args.max_records, f"consuming {topics.records}", unit="records")

    def handle(batch: Batch) -> None:
        shown.update(len(batch.values))
        if args.print_records:
            for value in batch.values:
                sys.stdout.write(codec.encode(value).decode() + "\n")
            sys.stdout.flush()

    consumer = StreamConsumer(
        config.kafka,
        [topics.records],
        codec.decode_batch,
        handle,
        group_id=args.group or f"{config.name}.cli",
        dlq_topic=topics.dlq,
    )
    _on_signals(consumer.stop)
    with shown:
        stats = consumer.run(max_records=args.max_records, idle_timeout_s=args.idle_timeout)
    summary = {
        "polled": stats.polled,
        "processed": stats.processed,
        "dead_lettered": stats.dead_lettered,
        "batches": stats.batches,
        "committed": {f"{t}/{p}": o for (t, p), o in sorted(stats.committed.items())},
    }
    print(json.dumps(summary), file=sys.stderr if args.print_records else sys.stdout)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    import dataclasses

    from cluster.ray_runtime import connect
    from streams.datasets import DatasetStore
    from streams.ingest import ingest

    config = _connected(load_config(args.config))
    if args.root:
        config = dataclasses.replace(config, datasets=dataclasses.replace(config.datasets, root=args.root))
    topics = Topics.of(config)
    ensure_topics(config.kafka, [topics.records, topics.dlq])
    store = DatasetStore(config.datasets.root, config.name)
    stop = threading.Event()
    _on_signals(stop.set)
    connect(config, quiet=not args.verbose)
    while True:
        result = ingest(config, store)
        if result.manifest is None:
            print(f"nothing new on {topics.records}", flush=True)
        else:
            m = result.manifest
            rows = m.rows_by_partition()
            for r in m.ranges:
                invalid = sum(sum(f.invalid.values()) for f in m.files if f.range.partition == r.partition)
                read = f"{rows.get(r.partition, 0)} rows, {invalid} invalid"
                print(f"  {r.topic} partition {r.partition}: offsets [{r.start}, {r.end}): {read}")
            state = "new version" if result.created else "already ingested as"
            print(
                f"{state} {m.version_id}: {m.rows} rows, {m.invalid_rows} to {topics.dlq}, digest {m.digest}, "
                f"parent {m.parent or '-'}, in {store.root}",
                flush=True,
            )
        if not args.follow or stop.wait(args.interval):
            return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.ray_runtime import connect
    from jobs.train import main as train_main

    config = load_config(args.config)
    connect(config, quiet=not args.verbose)
    argv = ["--config", str(args.config)] + (["--out", str(args.out)] if args.out else [])
    return train_main(argv + (["--last-rows", str(args.last_rows)] if args.last_rows else []))


def cmd_tune(args: argparse.Namespace) -> int:
    from cluster.ray_runtime import connect
    from jobs.tune import main as tune_main

    config = load_config(args.config)
    connect(config, quiet=not args.verbose)
    return tune_main(["--config", str(args.config)] + (["--out", str(args.out)] if args.out else []))


def _tracking_uri(args: argparse.Namespace, config: PipelineConfig) -> str:
    uri = args.tracking_uri or config.mlflow.tracking_uri
    if not uri:
        raise ConfigError(
            str(args.config), "mlflow.tracking_uri", "a tracking URI (or MLFLOW_TRACKING_URI, --tracking-uri)", None
        )
    return uri


def cmd_deploy(args: argparse.Namespace) -> int:
    from cluster.pipeline import Pipeline, app_route_prefix
    from cluster.ray_runtime import cluster_address, connect

    config = load_config(args.config)  # what can be refused is, before Ray, torch and MLflow load
    uri = _tracking_uri(args, config)
    cluster_address(config)
    if not os.environ.get(API_KEY_ENV):
        raise DriftloopError(f"set {API_KEY_ENV} to the API key clients must send")
    from ray import serve

    from jobs.registry import ModelRegistry

    registry = ModelRegistry(config, uri)
    for flag, version in (("--version", args.version), ("--challenger", args.challenger)):
        if version is not None and not registry.has_version(version):
            raise DriftloopError(f"{flag} {version}: model {config.name!r} has no such version in {uri}")
    connect(config, quiet=not args.verbose)
    prefix = app_route_prefix(config.name)  # a running app keeps its prefix
    pipeline = Pipeline(config, uri, jobs_address="", jobs_dir=Path())  # only its app: no controller here
    url = pipeline.serve(config.serving.host, config.serving.port, prefix=prefix, version=args.version,
                         challenger=args.challenger)  # fmt: skip
    print(
        f"serving {config.name} ({'version ' + args.version if args.version else 'champion'}) at {url}/v1/predict",
        flush=True,
    )
    if config.ray.address or os.environ.get("RAY_ADDRESS"):
        return 0  # the cluster keeps it running
    stop = threading.Event()
    _on_signals(stop.set)
    print("a local Ray instance holds the app: Ctrl-C stops it", file=sys.stderr, flush=True)
    stop.wait()
    serve.shutdown()
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    import tempfile

    from cluster.pipeline import NAMESPACE, Pipeline, app_route_prefix
    from cluster.ray_runtime import cluster_address, connect

    if args.config is not None:
        config = load_config(args.config)
    elif os.environ.get(CONFIG_ENV):
        config = parse_config(os.environ[CONFIG_ENV], source=f"${CONFIG_ENV}")
    else:
        raise ConfigError("<command line>", "--config", f"a pipeline config file (or its YAML text in ${CONFIG_ENV})",
                          "<missing>")  # fmt: skip
    config = _connected(config)
    uri = _tracking_uri(args, config)
    starting = not (args.stop or args.status)
    if starting and not (os.environ.get(API_KEY_ENV) or os.environ.get(API_KEY_HASH_ENV)):
        raise DriftloopError(f"set {API_KEY_HASH_ENV} (`driftloop key-hash`) or {API_KEY_ENV}: the app checks keys")
    if starting and not os.environ.get(API_KEY_ENV):
        from serving.app import key_check

        try:
            key_check({API_KEY_HASH_ENV: os.environ[API_KEY_HASH_ENV]})
        except RuntimeError as err:
            raise DriftloopError(str(err)) from None
    missing = [name for name in args.job_env if name not in os.environ]
    if missing:
        raise ConfigError("<command line>", "--job-env", "names of variables set in this environment",
                          f"<unset: {', '.join(missing)}>")  # fmt: skip
    cluster_address(config)
    context = connect(config, quiet=not args.verbose, namespace=NAMESPACE)  # the actors' names are found there
    jobs_address = args.jobs_address or (f"http://{context.dashboard_url}" if context and context.dashboard_url else "")
    if starting and not jobs_address.startswith(("http://", "https://")):
        raise DriftloopError("this cluster's Jobs API is not known here: give --jobs-address http://head:8265")
    jobs_dir = args.jobs_dir or Path(tempfile.gettempdir()) / "driftloop-jobs"
    pipeline = Pipeline(config, uri, jobs_address, jobs_dir, detached=True, python=sys.executable,
                        job_env={name: os.environ[name] for name in args.job_env})  # fmt: skip
    if args.stop:
        stopped = pipeline.stop_services()
        print(f"[launch] {config.name}: stopped {', '.join(stopped) or 'nothing (none was running)'}", flush=True)
        return 0
    if args.status:
        reports = pipeline.service_reports()
        print(json.dumps(reports, default=str), flush=True)
        return 0 if all(r["running"] and not r["error"] for r in reports.values()) else 1
    started = pipeline.start_services()
    print(f"[launch] {config.name}: {', '.join(started)} (detached actors; retrains go to {jobs_address})", flush=True)
    url = pipeline.serve(config.serving.host, config.serving.port, prefix=app_route_prefix(config.name))
    print(f"[launch] {config.name}: serving the champion at {url}/v1/predict", flush=True)
    return 0


def cmd_key_hash(args: argparse.Namespace) -> int:
    from serving.app import key_hash

    key = os.environ.get(API_KEY_ENV)
    if not key:
        raise DriftloopError(f"set {API_KEY_ENV} to the API key clients will send")
    print(key_hash(key))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    uri = _tracking_uri(args, config)
    from jobs.registry import ModelRegistry

    registry = ModelRegistry(config, uri)
    if config.kafka.embedded:
        done = registry.rollback(args.reason)
        print("no Kafka configured: serving replicas learn of it on their next deploy", file=sys.stderr)
    else:
        topic = Topics.of(config).models
        ensure_topics(config.kafka, [topic])
        with Producer(config.kafka, client_id=f"{config.name}.rollback") as producer:
            done = registry.rollback(args.reason, publish=lambda e: producer.send_event(topic, e))
    assert done is not None  # without only_from, a rollback happens or raises
    print(f"{config.name}: champion {done[0]} -> {done[1]}")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    import time

    from jobs.monitor import MonitorStats, run_monitor

    config = _connected(load_config(args.config))
    uri = _tracking_uri(args, config)
    stop, stats, failure = threading.Event(), MonitorStats(), []
    _on_signals(stop.set)

    def body() -> None:
        try:
            run_monitor(config, uri, stop, stats)
        except Exception as err:  # reported below, as one line
            failure.append(err)
        finally:
            stop.set()

    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    started, said = time.monotonic(), 0

    def say_new_windows() -> int:
        for window in list(stats.windows)[said:]:
            print(f"[monitor] {window['kind']:<11} window of {window['size']}: "
                  f"{'DRIFTED' if window['drifted'] else 'ok'}", flush=True)  # fmt: skip
        return len(stats.windows)

    while not stop.wait(1.0):
        said = say_new_windows()
        if args.max_seconds is not None and time.monotonic() - started >= args.max_seconds:
            break
        if args.windows is not None and len(stats.windows) >= args.windows:
            break
    stop.set()
    worker.join(timeout=60)
    say_new_windows()
    if failure:
        raise DriftloopError(f"the monitor stopped: {failure[0]}")
    summary = {"windows": len(stats.windows), "drift_events": stats.drift_events,
               "retrain_requests": stats.retrain_requests, "predictions": stats.predictions,
               "labels": stats.labels}  # fmt: skip
    print(json.dumps(summary))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from cluster.stack import up

    configs = [load_config(path) for path in args.config]
    stack = up(
        args.config, configs, args.state_dir, num_cpus=args.num_cpus, serve_port=args.serve_port,
        workers=args.workers, say=lambda m: print(m, flush=True),
    )  # fmt: skip
    print(f"[up] Prometheus metrics (driftloop_* and Ray's own) at {stack.metrics}")
    print(f"[up] state and logs in {args.state_dir}; `driftloop down` stops it. To use it:")
    for key, value in stack.env().items():
        print(f"export {key}={value}")
    if stack.api_key_file:
        print(f"export {API_KEY_ENV}=$(cat {stack.api_key_file})")
    if stack.mlflow_password_file:  # for MLflow's own tools; driftloop's read the file itself
        print(f"export MLFLOW_TRACKING_PASSWORD=$(cat {stack.mlflow_password_file})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from cluster.stack import down

    stopped = down(args.state_dir)
    print(f"[down] stopped {', '.join(stopped) or 'nothing (it had already exited)'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.stack import alive, load_state
    from cluster.status import render, stack_status, to_json

    config = load_config(args.config)
    stack = load_state(args.state_dir)
    tracking_uri = args.tracking_uri or config.mlflow.tracking_uri
    ray_address = args.address or os.environ.get("RAY_ADDRESS") or ""
    serve_url = args.serve_url or f"http://{config.serving.host}:{config.serving.port}"
    if stack is not None:  # a stack from `driftloop up`: its addresses unless given
        if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            config = config.connected_to(stack.kafka)
        tracking_uri = args.tracking_uri or stack.mlflow
        if tracking_uri == stack.mlflow and stack.mlflow_user:  # the stack's credentials, unless given
            os.environ.setdefault("MLFLOW_TRACKING_USERNAME", stack.mlflow_user)
            os.environ.setdefault(MLFLOW_PASSWORD_FILE_ENV, stack.mlflow_password_file)
        ray_address = args.address or stack.ray_jobs
        if stack.routes and config.name not in stack.routes:
            raise DriftloopError(
                f"the stack in {args.state_dir} runs {', '.join(sorted(stack.routes))}, not {config.name!r}"
            )
        route = stack.routes.get(config.name, "/").rstrip("/")
        serve_url = args.serve_url or (stack.serve + route if stack.serve else serve_url)
    result = stack_status(
        config,
        tracking_uri=tracking_uri,
        jobs_address=ray_address if ray_address.startswith(("http://", "https://")) else None,
        serve_url=serve_url,
        metrics_url=args.metrics_url or ((stack.metrics or None) if stack is not None else None),
        expect_services=args.expect_services or bool(stack is not None and stack.actors),
    )
    if stack is not None:
        processes = {name: alive(pid) for name, pid in stack.pids.items()}
        result["parts"]["processes"] = {"ok": all(processes.values()), "pids": stack.pids, "alive": processes}
        result["healthy"] = result["healthy"] and all(processes.values())
    print(to_json(result) if args.json else "\n".join(render(result)))
    return 0 if result["healthy"] else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.stack import load_state
    from cluster.submit import default_python, jobs_address, parse_resources, submit

    command = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    address = jobs_address(args.address)
    resources = parse_resources(args.resource)
    if args.python is None:
        stack = load_state(args.state_dir)
        args.python = default_python(address, stack.ray_jobs if stack else None, stack.python if stack else None)
    print(f"[submit] to {address}: {' '.join(command)}", file=sys.stderr)
    result = submit(
        address, command, python=args.python, forward_env=args.env, submission_id=args.submission_id,
        resources=resources, wait=not args.no_wait,
    )  # fmt: skip
    if args.json:
        print(json.dumps({"submission_id": result.submission_id, "status": result.status, "message": result.message}))
    else:
        print(f"[submit] job {result.submission_id}: {result.status} {result.message}".rstrip(), file=sys.stderr)
    return 0 if args.no_wait or result.status == "SUCCEEDED" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from cluster.report_io import gather, log_report, promoted_run, write
    from cluster.stack import load_state

    config = load_config(args.config)
    stack = load_state(args.state_dir)
    tracking_uri = args.tracking_uri or config.mlflow.tracking_uri
    if stack is not None:  # a stack from `driftloop up`: its broker and MLflow unless given
        if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            config = config.connected_to(stack.kafka)
        tracking_uri = tracking_uri or stack.mlflow
        if tracking_uri == stack.mlflow and stack.mlflow_user:
            os.environ.setdefault("MLFLOW_TRACKING_USERNAME", stack.mlflow_user)
            os.environ.setdefault(MLFLOW_PASSWORD_FILE_ENV, stack.mlflow_password_file)
    config = _connected(config)
    gathered = gather(config, str(args.config), since=args.since, tracking_uri=tracking_uri, scenario=args.scenario)
    for warning in gathered.warnings:
        print(f"driftloop: note: {warning}", file=sys.stderr)
    page = write(args.out, gathered.inputs)
    served = gathered.inputs.served
    print(f"wrote {page}: {len(gathered.inputs.events)} events, {len(served):,} predictions "
          f"({served.labelled:,} labelled)")  # fmt: skip
    promoted = promoted_run(gathered.inputs.events)
    if args.no_mlflow or not tracking_uri or promoted is None or gathered.warnings:
        if promoted is None:
            print("not logged to MLflow: no promoted version on the models topic", file=sys.stderr)
        return 0
    try:
        where = log_report(tracking_uri, promoted[1], page)
    except Exception as err:  # the page is written; MLflow is a copy of it
        print(f"driftloop: note: not logged to MLflow ({type(err).__name__}: {err})", file=sys.stderr)
        return 0
    print(f"logged to MLflow run {promoted[1]} (version {promoted[0]}): {where}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from cluster.lineage import model_trail, print_trail

    name, _, ref = args.model.partition("@")
    if not name or not ref:
        raise ConfigError("<command line>", "MODEL", "NAME@ALIAS or NAME@VERSION, e.g. demo@champion", args.model)
    config = load_config(args.config)
    if name != config.name:
        raise ConfigError("<command line>", "MODEL", f"a model of pipeline {config.name!r} ({args.config})", name)
    trail = model_trail(config, _tracking_uri(args, config), ref, args.datasets_root or config.datasets.root)
    if args.json:
        print(json.dumps(trail, indent=2, default=str))
    else:
        print_trail(trail)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cluster.run import LoopOptions, run_loop

    config = load_config(args.config)
    if not args.verbose:
        logging.getLogger("streams.kafka").setLevel(logging.ERROR)
    run_dir = args.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.drift_at is not None and args.source is None:
        raise ConfigError("<command line>", "--drift-at", "--from FILE with it (generated drift: --before-drift)", None)
    options = LoopOptions(
        bootstrap_records=args.bootstrap_records or 0, before_drift=args.before_drift,
        after_promotion=args.after_promotion, rate=args.rate, scenario=args.scenario, seed=args.seed,
        max_seconds=args.max_seconds, report=args.report, source=args.source, drift_at=args.drift_at,
        config_path=str(args.config),
    )  # fmt: skip
    return run_loop(config, run_dir, options)


def cmd_config_schema(args: argparse.Namespace) -> int:
    from streams.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
