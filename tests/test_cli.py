"""The `driftloop` command: real processes, the real broker, bad input answered without tracebacks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.broker import wait_for_kafka
from streams.config import PipelineConfig
from tests.conftest import DEMO, ROOT

DRIFTLOOP = [sys.executable, "-m", "cluster"]


def driftloop(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # Connection settings come only from `env`: in-process tests may have set them (MLflow's
    # set_tracking_uri exports MLFLOW_TRACKING_URI, for one).
    scrub = ("KAFKA_BOOTSTRAP_SERVERS", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")
    clean = {k: v for k, v in os.environ.items() if k not in scrub}
    return subprocess.run(
        [*DRIFTLOOP, *args], cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def config_file(tmp_path: Path, config: PipelineConfig) -> Path:
    """The demo config renamed to this test's namespace."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(DEMO.read_text().replace("name: demo", f"name: {config.name}"))
    return path


COMMANDS = [
    "broker",
    "init",
    "produce",
    "consume",
    "ingest",
    "train",
    "tune",
    "deploy",
    "rollback",
    "lineage",
    "report",
    "run",
    "up",
    "down",
    "status",
    "submit",
    "monitor",
    "launch",
    "key-hash",
]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help(command: str) -> None:
    result = driftloop(*([command] if command else []), "--help")
    assert result.returncode == 0
    assert "usage: driftloop" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["produce", "--config", "configs/demo.yaml", "--records", "-5"], "expected an integer > 0, found '-5'"),
        (["produce", "--config", "configs/demo.yaml", "--records", "10", "--scenario", "sideways"], "invalid choice"),
        (["produce", "--config", "configs/demo.yaml", "--records", "10", "--bad-fraction", "2"], "between 0 and 1"),
        (["produce", "--records", "10"], "--config"),
        (["broker", "--port", "70000"], "a port number"),
        (["lineage", "demo", "--config", "configs/demo.yaml"], "MODEL: expected NAME@ALIAS or NAME@VERSION"),
        (["lineage", "other@3", "--config", "configs/demo.yaml", "--tracking-uri", "sqlite:///x.db"], "'demo'"),
        (["run", "--rate", "0"], "expected a number > 0"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_without_traceback(args: list[str], message: str) -> None:
    result = driftloop(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_errors_exit_2_and_name_the_problem(tmp_path: Path) -> None:
    missing = driftloop("produce", "--config", str(tmp_path / "none.yaml"), "--records", "1")
    assert missing.returncode == 2
    assert "none.yaml: <file>: expected an existing YAML file" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("partitions: 4", "partitions: many"))
    result = driftloop("consume", "--config", str(bad))
    assert result.returncode == 2
    message = r"bad\.yaml:\d+:\d+: kafka\.partitions: expected an integer >= 1, found 'many' \(str\)"
    assert re.search(message, result.stderr)
    assert "Traceback" not in result.stderr


def test_config_schema_prints_the_checked_in_json_schema() -> None:
    result = driftloop("config", "schema")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "configs" / "driftloop.schema.json").read_text()


def test_without_a_broker_the_message_says_how_to_get_one() -> None:
    result = driftloop("produce", "--config", "configs/demo.yaml", "--records", "1")
    assert result.returncode == 1
    assert "driftloop broker" in result.stderr and "KAFKA_BOOTSTRAP_SERVERS" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_broker_is_a_clear_error() -> None:
    from cluster.broker import free_port

    env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    result = driftloop("produce", "--config", "configs/demo.yaml", "--records", "1", env=env, timeout=180)
    assert result.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_broker_command_serves_kafka_and_stops_on_sigterm(tmp_path: Path) -> None:
    log_file = tmp_path / "tansu.log"
    process = subprocess.Popen(
        [*DRIFTLOOP, "broker", "--log-file", str(log_file)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:")
        bootstrap = line.split("=", 1)[1]
        wait_for_kafka(bootstrap, timeout_s=5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert log_file.exists()
    with pytest.raises(Exception, match="no Kafka broker answered"):
        wait_for_kafka(bootstrap, timeout_s=1)  # the Tansu child went with it


@pytest.mark.integration
def test_produce_then_consume_with_drift_labels_and_bad_records(
    config: PipelineConfig, broker: str, tmp_path: Path
) -> None:
    path = config_file(tmp_path, config)
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker}
    produced = driftloop(
        "produce", "--config", str(path), "--records", "500", "--drift-at", "250", "--scenario", "concept",
        "--seed", "3", "--label-delay", "50", "--bad-fraction", "0.05", env={**env, "DRIFTLOOP_PROGRESS": "1"},
    )  # fmt: skip
    assert produced.returncode == 0, produced.stderr
    assert "sent 500 records" in produced.stdout and "labels: 500" in produced.stdout
    assert "500/500" in produced.stderr and "records" in produced.stderr, "a progress bar, when asked for"
    bad = int(produced.stdout.rsplit("malformed on purpose: ", 1)[1].split(";")[0])
    assert bad > 0

    consumed = driftloop("consume", "--config", str(path), "--idle-timeout", "3", "--print", env=env)
    assert consumed.returncode == 0, consumed.stderr
    lines = consumed.stdout.splitlines()
    assert len(lines) == 500 - bad
    assert all(json.loads(line)["churned"] in ("no", "yes") for line in lines)
    summary = json.loads(consumed.stderr.strip().splitlines()[-1])
    assert summary["polled"] == 500 and summary["dead_lettered"] == bad
    assert sum(summary["committed"].values()) == 500

    again = driftloop("consume", "--config", str(path), "--idle-timeout", "2", env=env)
    assert json.loads(again.stdout)["polled"] == 0, "the group resumes after its committed offsets"


@pytest.mark.integration
def test_ingest_prints_what_it_read_per_partition_and_is_idempotent(
    config: PipelineConfig, broker: str, tmp_path: Path, ray_session: str
) -> None:
    import ray

    path = config_file(tmp_path, config)
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    produced = driftloop("produce", "--config", str(path), "--records", "400", "--bad-fraction", "0.05", env=env)
    assert produced.returncode == 0, produced.stderr
    bad = int(produced.stdout.rsplit("malformed on purpose: ", 1)[1].split(";")[0])
    root = str(tmp_path / "store")

    first = driftloop("ingest", "--config", str(path), "--root", root, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert sum(f"{config.name}.records partition {p}: offsets [0, " in first.stdout for p in range(4)) == 4
    assert "new version v-" in lines[-1] and f"{400 - bad} rows, {bad} to {config.name}.dlq" in lines[-1]

    again = driftloop("ingest", "--config", str(path), "--root", root, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"nothing new on {config.name}.records"


def test_deploy_and_rollback_need_a_tracking_uri(tmp_path: Path) -> None:
    for command in ("deploy", "rollback"):
        result = driftloop(command, "--config", "configs/demo.yaml", env={"DRIFTLOOP_API_KEY": "k"})
        assert result.returncode == 2, result.stderr
        assert "mlflow.tracking_uri: expected a tracking URI" in result.stderr and "Traceback" not in result.stderr
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    rollback = driftloop("rollback", "--config", "configs/demo.yaml", "--tracking-uri", uri)
    assert rollback.returncode == 1 and "no previous version to roll back to" in rollback.stderr
    for flag in ("--version", "--challenger"):
        unknown = driftloop("deploy", "--config", "configs/demo.yaml", "--tracking-uri", uri, flag, "7",
                            env={"DRIFTLOOP_API_KEY": "k"})  # fmt: skip
        assert unknown.returncode == 1 and f"{flag} 7: model 'demo' has no such version" in unknown.stderr
        assert "Traceback" not in unknown.stderr
    nokey = driftloop("deploy", "--config", "configs/demo.yaml", "--tracking-uri", uri, env={"DRIFTLOOP_API_KEY": ""})
    assert nokey.returncode == 1 and "set DRIFTLOOP_API_KEY" in nokey.stderr and "Traceback" not in nokey.stderr
    jobs_url = {"DRIFTLOOP_API_KEY": "k", "RAY_ADDRESS": "http://127.0.0.1:9"}  # what `up` exports, for submit
    deploy = driftloop("deploy", "--config", "configs/demo.yaml", "--tracking-uri", uri, env=jobs_url)
    assert deploy.returncode == 1 and "is a Jobs API URL" in deploy.stderr and "Traceback" not in deploy.stderr


def test_launch_refuses_what_it_cannot_start_before_it_joins_a_cluster() -> None:
    """Each refusal is a clear message before Ray is joined (RAY_ADDRESS points at nothing)."""
    base = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
            "RAY_ADDRESS": "127.0.0.1:9", "DRIFTLOOP_API_KEY": "", "DRIFTLOOP_CONFIG_YAML": ""}  # fmt: skip
    noconfig = driftloop("launch", env=base)
    assert noconfig.returncode == 2 and "--config: expected a pipeline config file" in noconfig.stderr
    hostile = driftloop("launch", env=base | {"DRIFTLOOP_CONFIG_YAML": "name: [unclosed"})
    assert hostile.returncode == 2 and "$DRIFTLOOP_CONFIG_YAML" in hostile.stderr
    nokey = driftloop("launch", env=base | {"DRIFTLOOP_CONFIG_YAML": DEMO.read_text()})
    assert nokey.returncode == 1 and "set DRIFTLOOP_API_KEY_SHA256" in nokey.stderr
    unset = driftloop("launch", "--config", "configs/demo.yaml", "--job-env", "DRIFTLOOP_NOT_SET",
                      env=base | {"DRIFTLOOP_API_KEY": "k"})  # fmt: skip
    assert unset.returncode == 2 and "--job-env" in unset.stderr and "DRIFTLOOP_NOT_SET" in unset.stderr
    url = driftloop("launch", "--config", "configs/demo.yaml", env=base | {"DRIFTLOOP_API_KEY": "k",
                    "RAY_ADDRESS": "http://127.0.0.1:9"})  # fmt: skip
    assert url.returncode == 1 and "is a Jobs API URL" in url.stderr
    bad_hash = driftloop("launch", "--config", "configs/demo.yaml",
                         env=base | {"DRIFTLOOP_API_KEY_SHA256": "not-a-hash"})  # fmt: skip
    assert bad_hash.returncode == 1 and "not a salt$sha256 pair" in bad_hash.stderr
    for result in (noconfig, hostile, nokey, unset, url, bad_hash):
        assert "Traceback" not in result.stderr, result.stderr


def test_key_hash_prints_what_a_replica_checks_the_key_against_and_never_the_key() -> None:
    from serving.app import key_check

    key = "a-random-key-0123456789"
    result = driftloop("key-hash", env={"DRIFTLOOP_API_KEY": key})
    assert result.returncode == 0, result.stderr
    salt, digest = key_check({"DRIFTLOOP_API_KEY_SHA256": result.stdout.strip()})
    assert hashlib.sha256(salt + key.encode()).digest() == digest and key not in result.stdout
    missing = driftloop("key-hash", env={"DRIFTLOOP_API_KEY": ""})
    assert missing.returncode == 1 and "set DRIFTLOOP_API_KEY" in missing.stderr


def test_ingest_bad_input() -> None:
    usage = driftloop("ingest", "--config", "configs/demo.yaml", "--interval", "0")
    assert usage.returncode == 2 and "expected a number > 0, found '0'" in usage.stderr
    no_broker = driftloop("ingest", "--config", "configs/demo.yaml")
    assert no_broker.returncode == 1 and "driftloop broker" in no_broker.stderr
    assert "Traceback" not in usage.stderr + no_broker.stderr
