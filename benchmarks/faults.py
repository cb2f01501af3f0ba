"""Faults under steady traffic: what a stack loses when its parts fail one after the other.

A whole stack in one process's reach (as `driftloop run` builds it): an embedded Tansu of the
run's own, a local Ray head with token auth, MLflow on SQLite, the controller and the monitor as
restartable Ray actors, two Serve replicas. A first model is trained by a bootstrap job; then a
client sends records to `/v1/predict` at a steady rate (with their labels, a few seconds later)
while, one after the other:

1. a 2 MB poison record lands on `records` and on `predictions`;
2. a hostile `RetrainRequested` (shell in its id and cause) and a valid retrain request sent
   three times, whose cause is `$(touch CANARY)`;
3. the controller is killed while that job runs;
4. the monitor is killed;
5. a Serve replica is killed;
6. the broker is stopped (SIGSTOP) for `--outage` seconds (60 by default), then resumed.

Reported: requests answered and failed; predictions answered, logged (on the predictions topic)
and counted as dropped by the live replicas; data windows lost (a gap in the offsets the
monitor's windows cover) or repeated (a window closed twice); jobs per retrain request; whether
the canary file exists (a command ran from an event field); and the seconds until each part was
back. There is no peer: the figures are counts against the goal (0 failed, every prediction
logged or counted, 0 windows lost, one job per request, no command run).

    python benchmarks/faults.py --json runs/bench/faults.json      # about 7 minutes here
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402
from kafka import KafkaProducer  # noqa: E402
from ray import serve  # noqa: E402

from cluster.broker import EmbeddedBroker, free_port  # noqa: E402
from cluster.ray_runtime import start_local  # noqa: E402
from jobs.controller import ControllerService, JobTemplate  # noqa: E402
from jobs.monitor import MonitorService  # noqa: E402
from jobs.registry import ModelRegistry  # noqa: E402
from serving.app import build_app  # noqa: E402
from serving.metrics import replica_counts  # noqa: E402
from streams.config import API_KEY_ENV, load_config  # noqa: E402
from streams.events import LabelObserved, RetrainRequested, deterministic_id  # noqa: E402
from streams.generator import StreamGenerator  # noqa: E402
from streams.kafka import Producer, ensure_topics  # noqa: E402
from streams.kafka_source import high_watermarks  # noqa: E402
from streams.publish import publish_stream  # noqa: E402
from streams.topics import Topics  # noqa: E402

RATE = 100.0  # records per second
BATCH = 10  # records per request
LABEL_DELAY_S = 3.0
RESENDS = 3  # a request whose connection closed with no answer, or that got a 5xx, is sent again


def say(started: float, message: str) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)


class Client(threading.Thread):
    """Steady traffic: a request of BATCH records every BATCH / RATE seconds, labels a little later."""

    def __init__(self, config: Any, url: str, topics: Topics) -> None:
        super().__init__(daemon=True)
        self.config, self.url, self.topics = config, url, topics
        self.stop = threading.Event()
        self.answered = self.failed = self.records = self.labels_lost = self.resent = 0
        self.failures: Counter[str] = Counter()  # why a first try failed (resent) or a request gave up
        self.last_ok = time.time()

    def run(self) -> None:
        names = self.config.schema.feature_names
        session = requests.Session()
        headers = {"x-api-key": os.environ[API_KEY_ENV]}
        generator = StreamGenerator(self.config, seed=7, interval=timedelta(seconds=1 / RATE), id_prefix="fault")
        labels: list[tuple[float, str, Any]] = []
        producer = Producer(self.config.kafka, client_id="faults.labels")
        begun = time.monotonic()
        sent = 0
        try:
            while not self.stop.is_set():
                batch = list(generator.records(BATCH))
                body = [{"request_id": r.id, **{n: r.record[n] for n in names}} for r in batch]
                for attempt in range(RESENDS + 1):  # as README asks of a client: again on no answer or a 5xx
                    try:
                        answer = session.post(f"{self.url}/v1/predict", json=body, headers=headers, timeout=30)
                        ok, why = answer.status_code == 200, str(answer.status_code)
                    except requests.RequestException as err:
                        ok, why = False, type(err).__name__
                    if ok or (why.isdigit() and not why.startswith("5")) or attempt == RESENDS:
                        break
                    self.resent += 1
                    self.failures[f"resent after {why}"] += 1
                    time.sleep(0.2 * (attempt + 1))
                if ok:
                    self.answered += 1
                    self.records += len(batch)
                    self.last_ok = time.time()
                    labels += [(time.monotonic() + LABEL_DELAY_S, r.id, r.label) for r in batch]
                else:
                    self.failed += 1
                    self.failures[why] += 1
                due = [x for x in labels if x[0] <= time.monotonic()]
                labels = labels[len(due) :]
                for _, request_id, label in due:  # the producer buffers while the broker is away
                    event = LabelObserved(request_id=request_id, pipeline=self.config.name, label=label)
                    try:
                        producer.send_event(self.topics.labels, event)
                    except Exception:  # a full buffer in a long outage: the label is lost, and counted
                        self.labels_lost += 1
                sent += len(batch)
                ahead = sent / RATE - (time.monotonic() - begun)
                if ahead > 0:
                    time.sleep(ahead)
        finally:
            producer.close(timeout_s=60)


class Windows:
    """Every data window any monitor instance reported, by its offsets."""

    def __init__(self) -> None:
        self.seen: dict[str, set[int]] = {}  # offsets (as JSON) -> the instances that closed it
        self.spans: dict[str, list[tuple[int, int]]] = {}

    def note(self, monitor: Any, instance: int) -> Any:
        try:
            stats = ray.get(monitor.stats.remote(), timeout=5)
        except Exception:
            return None
        for w in stats.windows:
            if w["kind"] != "data":
                continue
            key = json.dumps(w["offsets"], sort_keys=True)
            if key not in self.seen:
                for partition, (start, end) in w["offsets"].items():
                    self.spans.setdefault(partition, []).append((start, end))
            self.seen.setdefault(key, set()).add(instance)
        return stats

    def summary(self) -> dict[str, Any]:
        gaps: list[str] = []  # a gap of one offset may be a record that went to the DLQ (the poison)
        overlaps = 0
        for partition, ranges in sorted(self.spans.items()):
            ranges.sort()
            for (_, end), (start, _) in itertools.pairwise(ranges):
                if start > end:
                    gaps.append(f"{partition}: {end}..{start - 1}")
                overlaps += start < end
        repeated = sum(1 for instances in self.seen.values() if len(instances) > 1)
        return {"windows": len(self.seen), "gaps": gaps, "overlapping": overlaps, "repeated": repeated}


def restarts(name: str, address: str) -> int:
    """How often the named actor was restarted."""
    from ray.util.state import list_actors

    found = list_actors(
        address=address, filters=[("name", "=", name)], detail=True
    )  # num_restarts comes only with detail
    return max((a.num_restarts or 0 for a in found), default=0)


def wait(what: str, probe: Any, timeout_s: float, every_s: float = 0.5) -> float | None:
    """Seconds until `probe()` is true, or None after `timeout_s`."""
    begun = time.monotonic()
    while time.monotonic() - begun < timeout_s:
        try:
            if probe():
                return round(time.monotonic() - begun, 1)
        except Exception:
            pass
        time.sleep(every_s)
    print(f"  {what}: not within {timeout_s:.0f}s", flush=True)
    return None


def main() -> int:
    args = common.parser(__doc__)
    args.add_argument("--outage", type=float, default=60.0, help="seconds the broker is stopped")
    opts = args.parse_args()
    started = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="driftloop-faults-"))
    canary = run_dir / "CANARY"
    os.environ.setdefault(API_KEY_ENV, secrets.token_urlsafe(24))
    base = load_config(ROOT / "configs" / "demo.yaml", env={})
    serving = dataclasses.replace(base.serving, num_replicas=2, port=free_port())
    monitor_settings = dataclasses.replace(base.monitor, window_size=500)
    with EmbeddedBroker(log_file=run_dir / "broker.log") as broker:
        uri = f"sqlite:///{run_dir / 'mlflow.db'}"
        config = dataclasses.replace(
            base.connected_to(broker.bootstrap).connected_to(tracking_uri=uri),
            serving=serving, monitor=monitor_settings,
            datasets=dataclasses.replace(base.datasets, root=str(run_dir / "datasets")),
        )  # fmt: skip
        topics = Topics.of(config)
        ensure_topics(config.kafka, topics.all())
        registry = ModelRegistry(config, uri, artifact_root=run_dir / "mlartifacts")
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        context = start_local(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                              dashboard_port=free_port(), **quiet)  # fmt: skip
        jobs_address = f"http://{context.dashboard_url}"
        template = JobTemplate(ROOT, run_dir / "jobs", {"MLFLOW_TRACKING_URI": uri}, sys.executable)
        controller_cls: Any = ray.remote(ControllerService)
        monitor_cls: Any = ray.remote(MonitorService)
        controller = controller_cls.options(name="faults-controller", num_cpus=0, max_restarts=-1).remote(
            config, jobs_address, template
        )
        client: Client | None = None
        try:
            with Producer(config.kafka, client_id="faults") as producer:
                publish_stream(StreamGenerator(config, seed=1, id_prefix="boot"), producer, topics, config.name, 2000)
                boot = RetrainRequested(event_id=deterministic_id(config.name, "bootstrap", run_dir.name),
                                        pipeline=config.name, cause="bootstrap")  # fmt: skip
                producer.send_event(topics.retrain, boot)
            say(started, "bootstrap job submitted; waiting for the first champion")
            if wait("first champion", lambda: registry.alias("champion"), 600, 2.0) is None:
                return 1
            serve.start(http_options={"host": "127.0.0.1", "port": serving.port})
            serve.run(build_app(config, uri), name=config.name, route_prefix="/")
            url = f"http://127.0.0.1:{serving.port}"
            monitor = monitor_cls.options(name="faults-monitor", num_cpus=0, max_restarts=-1).remote(config, uri)
            windows = Windows()
            instance = 0
            client = Client(config, url, topics)
            client.start()
            say(started, f"champion {registry.alias('champion')} served by 2 replicas; traffic at {RATE:.0f} records/s")
            time.sleep(20)
            windows.note(monitor, instance)
            recovery: dict[str, Any] = {}

            # 1. poison records
            # a plain client: ours refuses to send what its consumers would refuse
            poisoner = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 * 1024 * 1024)
            poison = b'{"x": "' + b"A" * (2 * 1024 * 1024) + b'"}'
            poisoner.send(topics.records, poison, key=b"poison")
            poisoner.send(topics.predictions, poison, key=b"poison")
            poisoner.flush()
            poisoner.close()
            say(started, "2 MB poison records sent to records and predictions")
            time.sleep(5)

            # 2. hostile and duplicated retrain requests
            hostile = (b'{"type": "RetrainRequested", "event_id": "x; touch ' + str(canary).encode() + b' #", '
                       b'"occurred_at": "2026-01-01T00:00:00Z", "pipeline": "' + config.name.encode() + b'", '
                       b'"cause": "$(touch ' + str(canary).encode() + b')"}')  # fmt: skip
            request = RetrainRequested(event_id=deterministic_id(config.name, "faults", run_dir.name),
                                       pipeline=config.name, cause=f"$(touch {canary}); `touch {canary}`")  # fmt: skip
            with Producer(config.kafka, client_id="faults.retrain") as producer:
                producer.send(topics.retrain, hostile, key=config.name)
                for _ in range(3):
                    producer.send_event(topics.retrain, request)
            say(started, "a hostile retrain event and a valid request three times")
            time.sleep(10)

            # 3. the controller, killed while the job runs
            ray.kill(controller, no_restart=False)
            recovery["controller_s"] = wait(
                "controller",
                lambda: (
                    restarts("faults-controller", jobs_address) > 0 and ray.get(controller.stats.remote(), timeout=5)
                ),
                120,
            )
            say(started, f"controller killed; answering again after {recovery['controller_s']}s")

            # 4. the monitor
            before = windows.note(monitor, instance)
            ray.kill(monitor, no_restart=False)
            instance += 1
            seen = before.predictions if before else 0
            recovery["monitor_s"] = wait(  # a new instance (ray.kill returns before the old one is gone) consuming
                "monitor",
                lambda: (
                    restarts("faults-monitor", jobs_address) > 0
                    and ray.get(monitor.stats.remote(), timeout=5).predictions > 0
                ),
                120,
            )
            say(started, f"monitor killed; consuming again after {recovery['monitor_s']}s (had {seen} predictions)")

            # 5. a Serve replica
            from ray.util.state import list_actors

            def replicas() -> list[Any]:
                alive = list_actors(address=jobs_address, filters=[("state", "=", "ALIVE")])
                return [a for a in alive if str(a.class_name).startswith("ServeReplica")]

            victim = replicas()[0]
            ray.kill(ray.get_actor(str(victim.name), namespace=victim.ray_namespace), no_restart=False)
            failed_before = client.failed
            recovery["replica_s"] = wait(
                "replica", lambda: len({a.name for a in replicas()} - {victim.name}) >= 2, 120, 1.0
            )
            say(started, f"a replica killed; 2 replicas again after {recovery['replica_s']}s "
                         f"({client.failed - failed_before} requests failed meanwhile)")  # fmt: skip
            windows.note(monitor, instance)

            # 6. the broker stopped for opts.outage seconds
            assert broker.process is not None
            ends_before = sum(high_watermarks(config.kafka, topics.predictions).values())
            os.kill(broker.process.pid, signal.SIGSTOP)
            say(started, f"broker stopped for {opts.outage:.0f}s")
            time.sleep(opts.outage)
            os.kill(broker.process.pid, signal.SIGCONT)
            resumed = time.monotonic()

            def logged_since() -> int:
                return sum(high_watermarks(config.kafka, topics.predictions).values()) - ends_before

            # the first prediction delivered after the broker's return (what was buffered, then new ones)
            recovery["prediction_log_s"] = wait("prediction log", lambda: logged_since() > 0, 180, 0.2)
            polled = (windows.note(monitor, instance) or {}).get("predictions", 0)
            recovery["monitor_after_outage_s"] = wait(
                "monitor", lambda: ray.get(monitor.stats.remote(), timeout=5).predictions > polled, 180
            )
            say(started, f"broker resumed; logging again after {recovery['prediction_log_s']}s, "
                         f"the monitor after {recovery['monitor_after_outage_s']}s")  # fmt: skip
            time.sleep(20)
            client.stop.set()
            client.join(timeout=90)
            time.sleep(LABEL_DELAY_S + 10)  # the last predictions and labels land; the monitor closes windows
            windows.note(monitor, instance)

            # Each replica's counts, the killed one's last export among them, from Ray's metrics endpoint.
            live = {str(a.pid) for a in replicas()}
            counts: dict[str, dict[str, float]] = {}
            for _ in range(120):
                counts = replica_counts(config.name)
                alive = {r: c for r, c in counts.items() if r.rpartition(":")[2] in live}
                if alive and not any(c.get("predictions_buffered", 0) for c in alive.values()):
                    break  # every prediction a live replica handed to the log is delivered or dropped
                time.sleep(1.0)
            logged = sum(high_watermarks(config.kafka, topics.predictions).values()) - 1  # less the poison
            dropped = int(sum(c.get("predictions_dropped_total", 0) for c in counts.values()))
            killed = {r: c for r, c in counts.items() if r.rpartition(":")[2] not in live}
            held = sum(
                c.get("predictions_total", 0) - c.get("predictions_logged_total", 0)
                - c.get("predictions_dropped_total", 0)
                for c in killed.values()
            )  # fmt: skip
            jobs: Counter[str] = Counter()
            from ray.job_submission import JobSubmissionClient

            for job in JobSubmissionClient(jobs_address).list_jobs():
                jobs[str(job.submission_id)] += 1
            controller_stats = ray.get(controller.stats.remote())
            result = {
                "benchmark": "faults",
                "machine": common.machine(),
                "rate_records_per_s": RATE,
                "outage_s": opts.outage,
                "requests": {
                    "answered": client.answered,
                    "failed": client.failed,
                    "resent": client.resent,
                    "why": dict(client.failures),
                },
                "labels_lost": client.labels_lost,
                "predictions": {
                    "answered": client.records,
                    "logged": logged,
                    "dropped": dropped,
                    "still_buffered": int(sum(c.get("predictions_buffered", 0) for c in counts.values())),
                    "replicas": {r: {k: int(v) for k, v in c.items()} for r, c in sorted(counts.items())},
                    # answered by a replica that was then killed, neither logged nor dropped at its last export
                    "held_by_killed_replicas": int(held),
                    "unaccounted": client.records - logged - dropped,
                },
                "windows": windows.summary(),
                "jobs_per_request": {sid: jobs.get(sid, 0) for sid in (boot.event_id, request.event_id)},
                "hostile_event_ran_a_command": canary.exists(),
                "controller_outcomes": len(controller_stats.outcomes),
                "recovery_s": recovery,
                "seconds": round(time.monotonic() - started, 1),
                "after_resume_s": round(time.monotonic() - resumed, 1),
            }
            return common.emit(result, opts.json)
        finally:
            if client is not None:
                client.stop.set()
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
