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

    result = driftloop(
        "status", "--config", str(config_file(tmp_path, config)), "--tracking-uri", uri, "--address", jobs_address,
        "--serve-url", "http://127.0.0.1:9", "--json", env={"KAFKA_BOOTSTRAP_SERVERS": broker},
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
