"""`driftloop status`: is each part of a pipeline's stack up, and what is it doing.

Checks, each on its own (one part down does not hide the others):
- **kafka**: the brokers answer; per topic its records (from fetch high watermarks: Tansu's
  ListOffsets under-reports); per consumer group of the pipeline
  (`<pipeline>.monitor`, `<pipeline>.controller`, ...) its lag, the records not yet consumed;
- **mlflow**: the tracking store answers; the champion (and challenger) versions;
- **ray**: the Jobs API answers; the jobs running now and the last few that ended;
- **serve**: the endpoint's `/v1/health` (the version it serves, predictions logged/dropped and
  the drop rate); down when its prediction log has stopped;
- **metrics**: Ray's metrics endpoint (`metrics_url`, also at the top of the result: the URL
  Prometheus scrapes for every `driftloop_*` series, None when not known): each serving replica's
  answered, logged and dropped predictions and its drop rate (`/v1/health` reaches one replica;
  this reaches them all, and a killed one's last counts);
- **events**: the newest events on the drift, retrain and models topics.

`healthy` is true when every part that was asked about answered. The result is a plain dict
(`--json` prints it); `render` turns it into lines for people.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from streams.config import PipelineConfig
from streams.topics import Topics

__all__ = ["render", "stack_status"]

RECENT_EVENTS = 8


def known_groups(pipeline: str) -> tuple[str, ...]:
    """The consumer groups driftloop's own services use (others of the pipeline are listed too)."""
    return (f"{pipeline}.monitor", f"{pipeline}.controller", f"{pipeline}.cli")


RECENT_JOBS = 5


def _part(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        found = {"ok": True, **check()}
    except Exception as err:  # a part that does not answer is a finding, not a crash
        found = {"ok": False, "error": f"{type(err).__name__}: {err}".strip()[:500]}
    found["seconds"] = round(time.monotonic() - started, 2)
    return found


def kafka_status(config: PipelineConfig) -> dict[str, Any]:
    """End offsets per topic and lag per consumer group of the pipeline."""
    from kafka import TopicPartition

    from streams.kafka import admin_client, new_consumer
    from streams.kafka_source import fetch_high_watermarks

    topics = Topics.of(config)
    admin = admin_client(config.kafka)
    consumer = new_consumer(config.kafka)
    try:
        present = set(consumer.topics())
        partitions = [
            TopicPartition(t, p) for t in topics.all() if t in present for p in consumer.partitions_for_topic(t) or ()
        ]
        # Fetch high watermarks, not ListOffsets: Tansu 0.6 under-reports the end there (it said
        # 5,996 records of 6,000); ingestion counts the same way.
        ends = fetch_high_watermarks(consumer, partitions, 10.0) if partitions else {}
        per_topic: dict[str, int] = {}
        for tp, end in ends.items():
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + int(end)
        groups: dict[str, Any] = {}
        listed = {str(g.get("group_id", "")) for g in admin.list_groups()}
        names = sorted({g for g in listed if g.startswith(config.name + ".")} | set(known_groups(config.name)))
        starts = consumer.beginning_offsets(partitions) if partitions else {}
        for name, committed in admin.list_group_offsets(names).items():
            if not committed:
                continue  # a group that never committed: not running, nothing to lag
            # A partition of a topic the group reads, without a commit, is read from its start.
            mine = {tp.topic for tp in committed}
            lag: dict[str, int] = {}
            for tp in (tp for tp in partitions if tp.topic in mine):
                meta = committed.get(tp)
                position = meta.offset if meta is not None and meta.offset >= 0 else starts.get(tp, 0)
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, int(ends[tp]) - int(position))
            groups[name] = {"lag": lag, "total_lag": sum(lag.values())}
        return {"bootstrap": config.kafka.bootstrap_servers, "records": per_topic, "groups": groups}
    finally:
        consumer.close()
        admin.close()


SERVICES = ("monitor", "controller")
STALL_S = 60.0  # a consumer loop that has not polled for this long is stuck
DLQ_RECENT_S = 900.0  # the DLQ's growth is counted over this long


def services_status(config: PipelineConfig, expected: bool, now: float | None = None) -> dict[str, Any]:
    """The monitor's and controller's heartbeats (the `heartbeats` topic): alive when one came within
    three intervals, stuck when its loop has not polled for `STALL_S`, and the monitor blind to new
    records when it has not read the records topic's end for as long. `expected`: the stack started
    them, so no heartbeat at all is a finding too."""
    from jobs.service import HEARTBEAT_S
    from streams.events import ServiceHeartbeat
    from streams.kafka_source import read_tail
    from streams.serde import decode_events

    now = time.time() if now is None else now
    raw = read_tail(config.kafka, Topics.of(config).heartbeats, 200)
    beats = [e for e in decode_events([r.value for r in raw]) if isinstance(e, ServiceHeartbeat)]
    newest: dict[tuple[str, str], ServiceHeartbeat] = {}
    for beat in beats:
        if beat.pipeline == config.name:
            key = (beat.service, beat.instance)
            if key not in newest or beat.occurred_at > newest[key].occurred_at:
                newest[key] = beat
    return judge_services(list(newest.values()), expected, now, 3 * HEARTBEAT_S)


def judge_services(beats: list[Any], expected: bool, now: float, within_s: float) -> dict[str, Any]:
    """Each service's state from its instances' newest heartbeats. Pure."""
    services: dict[str, Any] = {}
    problems: list[str] = []

    def age(at: Any) -> float | None:
        return None if at is None else round(now - at.timestamp(), 1)

    for name in SERVICES:
        mine = sorted((b for b in beats if b.service == name), key=lambda b: b.occurred_at, reverse=True)
        alive = [b for b in mine if (age(b.occurred_at) or 0.0) <= within_s]
        if not mine:
            services[name] = {"state": "never seen"}
            if expected:
                problems.append(f"the {name} has sent no heartbeat")
            continue
        beat = (alive or mine)[0]
        entry = {"instances": len(alive), "heartbeat_age_s": age(beat.occurred_at),
                 "last_poll_age_s": age(beat.last_poll_at), "polled": beat.polled,
                 "dead_lettered": beat.dead_lettered}  # fmt: skip
        if beat.resumed:
            entry["resumed"] = beat.resumed  # what state the monitor took back when it started
        state = "up"
        if not alive:
            state = "gone"
            problems.append(f"no heartbeat from the {name} for {entry['heartbeat_age_s']:.0f}s")
        elif beat.waiting_for:
            state, entry["waiting_for"] = "waiting", beat.waiting_for
        elif beat.last_poll_at is None or (age(beat.last_poll_at) or 0.0) > STALL_S:
            state = "stuck"
            problems.append(f"the {name}'s loop has not polled for {entry['last_poll_age_s'] or '?'}s (it is stuck)")
        if name == "monitor" and alive and not beat.waiting_for:
            entry["records_position_age_s"] = age(beat.records_position_at)
            if beat.records_position_at is None or (age(beat.records_position_at) or 0.0) > STALL_S:
                state = "blind" if state == "up" else state
                problems.append("the monitor cannot read the records topic's end: a retrain would start late")
        entry["state"] = state
        services[name] = entry
    return {"ok": not problems, "services": services, **({"error": "; ".join(problems)} if problems else {})}


def dlq_growth(config: PipelineConfig, now: float | None = None) -> dict[str, Any]:
    """How many records reached the DLQ in the last `DLQ_RECENT_S` (of its last 5,000 per partition),
    and why, by the `driftloop.error` header."""
    from streams.kafka_source import read_tail

    now = time.time() if now is None else now
    recent = [
        r for r in read_tail(config.kafka, Topics.of(config).dlq, 5000) if r.timestamp / 1000 >= now - DLQ_RECENT_S
    ]
    reasons: dict[str, int] = {}
    for r in recent:
        kind = dict(r.headers or []).get("driftloop.error", b"?").decode(errors="replace")
        reasons[kind] = reasons.get(kind, 0) + 1
    return {"recent": len(recent), "window_s": DLQ_RECENT_S, "reasons": reasons}


def mlflow_status(config: PipelineConfig, tracking_uri: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from jobs.registry import use_tracking_credentials

    use_tracking_credentials()
    client = MlflowClient(tracking_uri)
    versions = client.search_model_versions(f"name = '{config.name}'", max_results=1000)
    aliases: dict[str, str] = {}
    if versions:  # no registered model before the first training run: nothing to alias, not an error
        aliases = {alias: str(v) for alias, v in (client.get_registered_model(config.name).aliases or {}).items()}
    return {"tracking_uri": tracking_uri, "versions": len(versions), "aliases": aliases,
            "champion": aliases.get("champion")}  # fmt: skip


def ray_status(address: str) -> dict[str, Any]:
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(address).list_jobs()
    rows = [_job_row(j) for j in jobs]  # submitted jobs and drivers that connected directly
    running = [r for r in rows if r["status"] in ("PENDING", "RUNNING")]
    ended = sorted((r for r in rows if r not in running), key=lambda r: r["end_time"] or 0)[-RECENT_JOBS:]
    return {"address": address, "running": running, "recent": ended}


def _job_row(job: Any) -> dict[str, Any]:
    from jobs.controller import status_name

    return {"submission_id": job.submission_id or job.job_id, "type": status_name(job.type),
            "status": status_name(job.status), "entrypoint": (job.entrypoint or "")[:200], "start_time": job.start_time,
            "end_time": job.end_time}  # fmt: skip


def serve_status(url: str) -> dict[str, Any]:
    import requests

    answer = requests.get(f"{url.rstrip('/')}/v1/health", timeout=5)
    answer.raise_for_status()
    health = answer.json()
    if health.get("status") == "model_refused":  # the endpoint is up, and answers every request 503
        raise RuntimeError(f"{url}: the model could not be loaded (a refused artifact or the registry away)")
    if health.get("prediction_log_alive") is False:  # serving works, the loop is blind: not healthy
        raise RuntimeError(f"{url}: the prediction log has stopped (nothing served is logged or monitored)")
    logged, dropped = int(health.get("predictions_logged") or 0), int(health.get("predictions_dropped") or 0)
    rate = dropped / (logged + dropped) if logged + dropped else 0.0
    return {"url": url, **health, "drop_rate": round(rate, 4)}


def metrics_status(config: PipelineConfig, url: str) -> dict[str, Any]:
    from serving.metrics import counts_by_replica, scrape

    replicas: dict[str, Any] = {}
    for replica, counts in sorted(counts_by_replica(scrape(url, 5.0), config.name).items()):
        entry: dict[str, float] = {k: int(v) for k, v in counts.items()}
        logged, dropped = entry.get("predictions_logged_total", 0), entry.get("predictions_dropped_total", 0)
        entry["drop_rate"] = round(dropped / (logged + dropped), 4) if logged + dropped else 0.0
        replicas[replica] = entry
    return {"metrics_url": url, "replicas": replicas}


def recent_events(config: PipelineConfig) -> dict[str, Any]:
    from cluster.lineage import read_events

    events = read_events(config)[-RECENT_EVENTS:]
    return {
        "events": [
            {"at": e.occurred_at.isoformat(), "type": type(e).__name__, "id": e.event_id, "what": _describe(e)}
            for e in events
        ]
    }


def _describe(event: Any) -> str:
    from streams.events import DriftDetected

    if isinstance(event, DriftDetected):
        return f"{event.kind} drift in {', '.join(event.drifted_features) or '-'} ({event.window_size} in window)"
    for name in ("reason", "cause"):
        value = getattr(event, name, None)
        if value:
            return str(value)[:160]
    version = getattr(event, "model_version", None)
    return f"version {version}" if version else ""


def stack_status(
    config: PipelineConfig,
    *,
    tracking_uri: str | None = None,
    jobs_address: str | None = None,
    serve_url: str | None = None,
    metrics_url: str | None = None,
    expect_services: bool = False,
) -> dict[str, Any]:
    """Each part that can be asked about, asked; see the module docstring. `expect_services`: the
    monitor and controller should be running (a stack from `up`), so no heartbeat is a failure."""
    parts: dict[str, Any] = {"kafka": _part(lambda: kafka_status(config))}
    if parts["kafka"]["ok"]:
        parts["kafka"]["dlq"] = dlq_growth(config)
        parts["services"] = _part(lambda: services_status(config, expect_services))
        parts["events"] = _part(lambda: recent_events(config))
    if tracking_uri:
        parts["mlflow"] = _part(lambda: mlflow_status(config, tracking_uri))
    if jobs_address:
        parts["ray"] = _part(lambda: ray_status(jobs_address))
    if serve_url:
        parts["serve"] = _part(lambda: serve_status(serve_url))
    if metrics_url:
        parts["metrics"] = _part(lambda: metrics_status(config, metrics_url))
    healthy = all(p["ok"] for p in parts.values())
    return {"pipeline": config.name, "healthy": healthy, "metrics_url": metrics_url, "parts": parts}


def render(status: dict[str, Any]) -> list[str]:
    """Lines for people. Pure."""
    lines = [f"pipeline {status['pipeline']}: {'healthy' if status['healthy'] else 'NOT healthy'}"]
    for name, part in status["parts"].items():
        if not part["ok"]:
            reason = part.get("error") or ", ".join(n for n, up in part.get("alive", {}).items() if not up) + " exited"
            lines.append(f"  {name:<7} DOWN  {reason}")
            continue
        if name == "kafka":
            lag = ", ".join(f"{g} lag {v['total_lag']}" for g, v in part["groups"].items()) or "no consumer groups"
            records = ", ".join(f"{t.split('.')[-1]} {n}" for t, n in part["records"].items())
            lines.append(f"  kafka   up    {part['bootstrap']}; {lag}")
            lines.append(f"                records: {records or 'no topics yet'}")
            dlq = part.get("dlq")
            if dlq:
                why = ", ".join(f"{k} {n}" for k, n in sorted(dlq["reasons"].items()))
                lines.append(f"                dlq: {dlq['recent']} in the last {dlq['window_s'] / 60:.0f} min"
                             + (f" ({why})" if why else ""))  # fmt: skip
        elif name == "services":
            for service, s in part["services"].items():
                if s["state"] == "never seen":
                    lines.append(f"  {service:<7} -     no heartbeat yet (not running here?)")
                    continue
                lines.append(
                    f"  {service:<7} {s['state']:<5} heartbeat {s['heartbeat_age_s']}s ago, last poll "
                    f"{s['last_poll_age_s']}s ago, {s['polled']} polled, {s['dead_lettered']} to the DLQ"
                )
                if s.get("resumed"):
                    lines.append(f"                at its start: {s['resumed']}")
        elif name == "mlflow":
            aliases = ", ".join(f"{a}={v}" for a, v in part["aliases"].items()) or "no aliases"
            lines.append(f"  mlflow  up    {part['tracking_uri']}; {part['versions']} versions; {aliases}")
        elif name == "ray":
            running = ", ".join(r["submission_id"] for r in part["running"]) or "none"
            lines.append(f"  ray     up    {part['address']}; running jobs: {running}")
            for r in part["recent"]:
                lines.append(f"                {r['submission_id']} {r['status']}")
        elif name == "serve":
            version = part.get("model_version") or "none (no model promoted yet)"
            lines.append(
                f"  serve   up    {part['url']}; version {version}, "
                f"logged {part.get('predictions_logged')}, dropped {part.get('predictions_dropped')} "
                f"({100 * part.get('drop_rate', 0.0):.1f}%)"
            )
        elif name == "metrics":
            lines.append(f"  metrics up    {part['metrics_url']}; {len(part['replicas'])} replicas counted")
            for replica, c in part["replicas"].items():
                lines.append(
                    f"                {replica}: answered {c.get('predictions_total', 0)}, logged "
                    f"{c.get('predictions_logged_total', 0)}, dropped {c.get('predictions_dropped_total', 0)} "
                    f"({100 * c['drop_rate']:.1f}%)"
                )
        elif name == "processes":
            lines.append("  stack   up    " + ", ".join(f"{n} pid {pid}" for n, pid in part["pids"].items()))
        elif name == "events":
            for e in part["events"]:
                lines.append(f"  event   {e['at'][:19]}  {e['type']:<18} {e['what']}")
    return lines


def to_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, default=str)
