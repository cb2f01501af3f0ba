"""`driftloop status` against real parts: the broker, the Ray Jobs API, an MLflow store, an HTTP endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.status import render
from streams.config import PipelineConfig
from streams.events import RetrainRequested
from streams.generator import StreamGenerator
from streams.kafka import Batch, Producer, StreamConsumer
from streams.publish import publish_stream
from streams.serde import RecordCodec
from streams.topics import Topics
from tests.test_cli import config_file, driftloop

pytestmark = pytest.mark.integration


def test_status_reports_lag_champion_jobs_events_and_what_is_down(
    config: PipelineConfig, topics: Topics, broker: str, jobs_address: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    with Producer(config.kafka) as producer:
        # 300 records in large batches: Tansu's ListOffsets under-reports the end of each
        # partition's last batch, the counts status gives must not (they come from high watermarks)
        publish_stream(StreamGenerator(config, seed=1), producer, topics, config.name, 300)
        producer.flush()
        codec = RecordCodec(config.schema)
        producer.send_event(topics.retrain, RetrainRequested(pipeline=config.name, cause="plan moved"))
        producer.flush()
    group = f"{config.name}.monitor"
    seen: list[object] = []

    def keep(batch: Batch) -> None:
        seen.extend(batch.values)

    StreamConsumer(config.kafka, [topics.records], codec.decode_batch, keep, group_id=group,
                   dlq_topic=topics.dlq).run(max_records=100)  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model(config.name)
    client.create_model_version(config.name, source=str(tmp_path), run_id=None)
    client.set_registered_model_alias(config.name, "champion", "1")

    from serving.metrics import metrics_urls

    metrics_url = metrics_urls()[0]  # the session Ray's head: what a user passes for a cluster of theirs
    result = driftloop(
        "status", "--config", str(config_file(tmp_path, config)), "--tracking-uri", uri, "--address", jobs_address,
        "--serve-url", "http://127.0.0.1:9", "--metrics-url", metrics_url, "--expect-services", "--json",
        env={"KAFKA_BOOTSTRAP_SERVERS": broker},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # the endpoint is down
    status = json.loads(result.stdout)
    parts = status["parts"]
    assert not status["healthy"] and not parts["serve"]["ok"] and "ConnectionError" in parts["serve"]["error"]
    kafka = parts["kafka"]
    assert kafka["ok"], kafka
    assert kafka["records"][topics.records] == 300
    consumed = sum(1 for _ in seen)
    assert kafka["groups"][group]["lag"][topics.records] == 300 - consumed, kafka
    assert parts["mlflow"]["champion"] == "1" and parts["mlflow"]["versions"] == 1
    assert parts["ray"]["ok"] and isinstance(parts["ray"]["running"], list)
    services = parts["services"]  # expected (a launched pipeline's), and none has sent a heartbeat
    assert not services["ok"] and "the monitor has sent no heartbeat" in services["error"], services
    assert status["metrics_url"] == metrics_url and parts["metrics"]["ok"], parts["metrics"]
    assert [e["what"] for e in parts["events"]["events"]] == ["plan moved"]
    text = "\n".join(render(status))
    assert "NOT healthy" in text and "serve   DOWN" in text and f"{group} lag {300 - consumed}" in text


def test_status_of_an_unreachable_broker_is_down_not_a_traceback(config: PipelineConfig, tmp_path: Path) -> None:
    result = driftloop(
        "status", "--config", str(config_file(tmp_path, config)), "--serve-url", "http://127.0.0.1:9",
        env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}, timeout=90,
    )  # fmt: skip
    assert result.returncode == 1
    assert "kafka   DOWN" in result.stdout and "Traceback" not in result.stdout + result.stderr
    asked = driftloop(
        "status", "--config", str(config_file(tmp_path, config)), "--serve-url", "http://127.0.0.1:9", "--json",
        env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}, timeout=90,
    )  # fmt: skip
    assert json.loads(asked.stdout)["metrics_url"] is None, "always in the JSON, None when not known"


def test_status_needs_a_config() -> None:
    result = driftloop("status", "--config", "nope.yaml")
    assert result.returncode == 2 and "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_a_serve_endpoint_whose_prediction_log_stopped_is_not_healthy() -> None:
    import http.server
    import threading

    from cluster.status import serve_status, stack_status

    health = {"status": "ok", "model_version": "3", "predictions_logged": 90, "predictions_dropped": 10,
              "prediction_log_alive": True}  # fmt: skip

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(health).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert serve_status(url)["drop_rate"] == 0.1
        health["prediction_log_alive"] = False
        with pytest.raises(RuntimeError, match="prediction log has stopped"):
            serve_status(url)
        from streams.config import load_config
        from tests.conftest import DEMO

        config = load_config(DEMO, env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
        parts = stack_status(config, serve_url=url)["parts"]
        assert not parts["serve"]["ok"] and "prediction log" in parts["serve"]["error"]
    finally:
        server.shutdown()


def _beat(service: str, at: float, polled_at: float | None, position_at: float | None = None, instance: str = "h-1"):
    from datetime import datetime, timezone

    from streams.events import ServiceHeartbeat

    def when(t: float | None) -> datetime | None:
        return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc)

    return ServiceHeartbeat(
        occurred_at=when(at),  # type: ignore[arg-type]
        pipeline="demo",
        service=service,  # type: ignore[arg-type]
        instance=instance,
        started_at=when(at - 100),  # type: ignore[arg-type]
        last_poll_at=when(polled_at),
        records_position_at=when(position_at),
    )


@pytest.mark.parametrize(
    ("beats", "expected", "ok", "states", "says"),
    [
        ([("monitor", -2, -1, -1), ("controller", -3, -1, None)], True, True, ("up", "up"), ""),
        ([], False, True, ("never seen", "never seen"), ""),
        ([], True, False, ("never seen", "never seen"), "the monitor has sent no heartbeat"),
        ([("monitor", -40, -40, -40), ("controller", -2, -1, None)], True, False, ("gone", "up"), "no heartbeat from"),
        ([("monitor", -2, -200, -1), ("controller", -2, -1, None)], True, False, ("stuck", "up"), "not polled for 200"),
        (
            [("monitor", -2, -1, -300), ("controller", -2, -1, None)],
            True,
            False,
            ("blind", "up"),
            "records topic's end",
        ),
        ([("monitor", -2, None, -1), ("controller", -2, -1, None)], True, False, ("stuck", "up"), "not polled"),
    ],
)
def test_services_are_judged_by_their_heartbeats(
    beats: list[tuple[str, float, float | None, float | None]], expected: bool, ok: bool, states: tuple[str, str],
    says: str,
) -> None:  # fmt: skip
    from cluster.status import judge_services

    now = 1_800_000_000.0
    made = [_beat(s, now + at, None if p is None else now + p, None if q is None else now + q) for s, at, p, q in beats]
    judged = judge_services(made, expected, now, within_s=15)
    assert (
        judged["ok"] is ok
        and (judged["services"]["monitor"]["state"], judged["services"]["controller"]["state"]) == states
    )
    assert says in judged.get("error", "")


def test_a_monitor_waiting_for_its_first_champion_is_not_stuck() -> None:
    import msgspec

    from cluster.status import judge_services

    now = 1_800_000_000.0
    waiting = msgspec.structs.replace(_beat("monitor", now - 1, None), waiting_for="a champion to monitor against")
    judged = judge_services([waiting, _beat("controller", now - 1, now - 1)], True, now, within_s=15)
    assert judged["ok"] and judged["services"]["monitor"]["state"] == "waiting", judged


def test_an_old_instance_does_not_hide_a_live_one() -> None:
    from cluster.status import judge_services

    now = 1_800_000_000.0
    old, new = _beat("monitor", now - 500, now - 500, now - 500, "old"), _beat("monitor", now - 1, now - 1, now - 1)
    beats = [old, new, _beat("controller", now - 1, now - 1)]
    judged = judge_services(beats, True, now, within_s=15)
    assert judged["ok"] and judged["services"]["monitor"]["instances"] == 1


@pytest.mark.integration
def test_heartbeats_on_the_real_broker_say_a_service_lives_is_stuck_or_is_gone(config: PipelineConfig) -> None:
    """A `Heartbeat` beside a loop, through the broker, into `status`: up while it beats and polls, stuck
    when its loop stops polling, gone when the beats stop; the DLQ's recent growth with its reasons."""
    import time

    from cluster.status import dlq_growth, services_status
    from jobs.service import Heartbeat
    from streams.errors import DecodeError, ErrorKind
    from streams.kafka import dead_letter
    from streams.publish import FileRow

    topics = Topics.of(config)
    state = {"last_poll": time.time(), "polled": 7, "dead_lettered": 1, "records_position": time.time()}
    beat = Heartbeat(config.kafka, topics.heartbeats, config.name, "monitor", lambda: dict(state), every_s=0.5)
    other = Heartbeat(config.kafka, topics.heartbeats, config.name, "controller",
                      lambda: {"last_poll": time.time()}, every_s=0.5)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (beat.sent < 2 or other.sent < 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        found = services_status(config, expected=True)
        assert found["ok"], found
        assert found["services"]["monitor"]["polled"] == 7 and found["services"]["monitor"]["state"] == "up"
        state["last_poll"] = time.time() - 120  # the loop hangs; the heartbeat thread goes on
        sent = beat.sent
        while beat.sent < sent + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        stuck = services_status(config, expected=True)
        assert not stuck["ok"] and stuck["services"]["monitor"]["state"] == "stuck", stuck
    finally:
        beat.close()
        other.close()
    later = services_status(config, expected=True, now=time.time() + 60)  # no beat for a minute
    assert not later["ok"] and later["services"]["monitor"]["state"] == "gone"

    with Producer(config.kafka) as producer:
        rows = [FileRow(topic=topics.records, offset=i, value=b"{") for i in range(3)]
        bad = [(r, DecodeError(ErrorKind.INVALID_JSON, "not JSON")) for r in rows]
        dead_letter(producer, topics.dlq, bad)
        producer.flush()
    grown = dlq_growth(config)
    assert grown["recent"] == 3 and grown["reasons"] == {"invalid_json": 3}, grown
