"""`driftloop up` → `status` → `submit` → `status` → `down`, with real processes; nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.stack import alive
from streams.config import PipelineConfig
from tests.test_cli import config_file, driftloop

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


def processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines()[1:] if text in line and "ps -eo" not in line]


def test_up_status_submit_down_leaves_no_process_behind(demo_config: PipelineConfig, tmp_path: Path) -> None:
    config = config_file(tmp_path, demo_config)
    state = tmp_path / "stack"
    where = ["--config", str(config), "--state-dir", str(state)]
    upped = driftloop("up", *where, "--num-cpus", "2", timeout=400)
    recorded: dict[str, int] = {}
    ray_dir = "<none>"
    try:
        assert upped.returncode == 0, upped.stdout[-3000:] + upped.stderr[-3000:]
        saved = json.loads((state / "state.json").read_text())
        recorded, ray_dir = saved["pids"], saved["ray_temp_dir"]
        assert set(recorded) == {"broker", "mlflow", "ray"} and all(alive(p) for p in recorded.values())
        exports = dict(line[len("export ") :].split("=", 1) for line in upped.stdout.splitlines() if "export " in line)
        assert set(exports) == {"KAFKA_BOOTSTRAP_SERVERS", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"}

        again = driftloop("up", *where)
        assert again.returncode == 1 and "already up" in again.stderr and "Traceback" not in again.stderr

        before = json.loads(driftloop("status", *where, "--json", "--serve-url", "http://127.0.0.1:9").stdout)
        parts = before["parts"]
        down_parts = {p: parts[p] for p in ("kafka", "mlflow", "ray", "processes") if not parts[p]["ok"]}
        assert not down_parts, down_parts
        assert parts["mlflow"]["champion"] is None and not parts["serve"]["ok"]  # no model yet, so nothing served

        submitted = driftloop(
            "submit", "--address", exports["RAY_ADDRESS"], "--python", sys.executable, "--",
            "python", "-m", "tests.job_echo", "--trigger-event-id", "stack-1", timeout=300,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        after = json.loads(driftloop("status", *where, "--json").stdout)
        jobs = after["parts"]["ray"]["recent"] + after["parts"]["ray"]["running"]
        assert any("tests.job_echo" in j["entrypoint"] and j["status"] == "SUCCEEDED" for j in jobs), jobs
        text = driftloop("status", *where).stdout
        assert "ray     up" in text and "stack   up" in text
    finally:
        downed = driftloop("down", "--state-dir", str(state), timeout=120)
    assert downed.returncode == 0, downed.stderr
    assert not [p for p in recorded.values() if alive(p)], "every recorded process is gone"
    assert not processes_mentioning(str(state)) and not processes_mentioning(ray_dir), "nothing of it runs on"
    gone = driftloop("down", "--state-dir", str(state))
    assert gone.returncode == 1 and "nothing was started" in gone.stderr
    assert os.path.exists(state / "ray.log"), "the logs stay for a post-mortem"
