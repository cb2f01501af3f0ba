"""The multi-node cluster of the tests (`multinode_cluster` in conftest.py), and jobs on it.

The cluster is `cluster.netns.NetnsCluster`: a Ray head (10.213.<slot>.2) and a worker node
(.3, resource `worker_node`), each in network, mount and PID namespaces of its own, token auth on.
The test process is already a Ray client of the session's local Ray, and a process can be one
cluster's client only: drive this one through its Jobs API (`run_job`, or
`cluster.jobs_client()`), or from subprocesses (`cluster.client_env()`; `cluster.in_node(name,
argv)` runs a command inside a node).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cluster.netns import NetnsCluster

__all__ = ["multinode", "probe", "run_job"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_MARK = "PROBE "
PROBE = f'''"""Reports where it runs, and writes the file its first argument names (relative: in its cwd)."""
import json, os, sys

import ray

ray.init(logging_level="WARNING", log_to_driver=False)
for path in sys.argv[1:]:
    with open(path, "w") as handle:
        handle.write(ray.get_runtime_context().get_node_id())
print({PROBE_MARK!r} + json.dumps({{
    "ip": ray.util.get_node_ip_address(),
    "node_id": ray.get_runtime_context().get_node_id(),
    "cwd": os.getcwd(),
    "alive": sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]),
}}))
'''


def ensure_iproute2() -> None:
    """`ip` (Debian's iproute2) where it is missing; unshare and nsenter come with util-linux."""
    if shutil.which("ip") is not None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "iproute2"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)


@contextlib.contextmanager
def multinode(root: Path, workers: int = 1) -> Iterator[NetnsCluster]:
    """A started cluster (skips where this is not root: namespaces need it); stopped on leaving,
    whatever happened. `cluster.timings` holds what its start and stop cost."""
    if os.geteuid() != 0:
        pytest.skip("a multi-node cluster of network namespaces needs root")
    ensure_iproute2()
    cluster = NetnsCluster(root, workers=workers)
    started = time.monotonic()
    cluster.start()  # stops what it started if it fails
    cluster.timings["start_s"] = round(time.monotonic() - started, 1)
    try:
        yield cluster
    finally:
        stopping = time.monotonic()
        cluster.stop()
        cluster.timings["stop_s"] = round(time.monotonic() - stopping, 1)
        (root / "timings.json").write_text(json.dumps(cluster.timings))


def run_job(
    cluster: NetnsCluster,
    entrypoint: str,
    *,
    working_dir: Path | None = None,
    resources: Mapping[str, float] | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 180.0,
) -> tuple[Any, str]:
    """Submit `entrypoint` to the cluster's Jobs API and wait for its end: (its `JobDetails`, its logs).

    `resources` pins the entrypoint (`{"worker_node": 1}`: on a worker node); `working_dir` travels
    through the head (its GCS), as on any cluster; `env` is the job's own environment."""
    client = cluster.jobs_client()
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
    if env:
        runtime_env["env_vars"] = dict(env)
    submission = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env or None, entrypoint_resources=dict(resources or {}) or None
    )
    deadline = time.monotonic() + timeout_s
    while str(client.get_job_status(submission).value) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(submission)
            raise TimeoutError(f"job {submission} ({entrypoint}) did not end within {timeout_s:.0f}s")
        time.sleep(0.3)
    return client.get_job_info(submission), client.get_job_logs(submission)


def probe(
    cluster: NetnsCluster, folder: Path, *files: str, resources: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Run the probe job (`PROBE`) and return its report: `ip`, `node_id`, `cwd`, `alive` (node IPs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe.py").write_text(PROBE)
    info, logs = run_job(cluster, shlex.join(["python", "probe.py", *files]), working_dir=folder, resources=resources)
    assert str(info.status.value) == "SUCCEEDED", logs
    lines = [line for line in logs.splitlines() if line.startswith(PROBE_MARK)]
    assert lines, logs
    report: dict[str, Any] = json.loads(lines[-1].removeprefix(PROBE_MARK))
    report["driver_node_id"] = info.driver_node_id
    return report
