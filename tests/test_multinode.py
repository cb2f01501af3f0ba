"""The multi-node cluster (`multinode_cluster`: cluster/netns.py): a job pinned to the worker node runs
there and what it writes stays on that node; token auth refuses a client without the token; a
killed worker node is seen dead and a restarted one rejoins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from cluster.netns import NODE_WORK_DIR, NetnsCluster, plan
from tests.multinode import probe

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


def test_the_plan_keeps_every_address_in_its_slot() -> None:
    p = plan(3, 2)
    assert p.host_ip == "10.213.3.1"
    assert [n.ip for n in p.nodes] == ["10.213.3.2", "10.213.3.3", "10.213.3.4"]
    assert all(name.startswith("dl3-") and len(name) <= 15 for name in [p.bridge, *(n.netns for n in p.nodes)])
    with pytest.raises(ValueError, match="slot"):
        plan(16, 1)


def _exists_in(cluster: NetnsCluster, node: str, path: str) -> bool:
    done = subprocess.run(cluster.in_node(node, ["test", "-e", path]), capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def test_a_job_pinned_to_the_worker_runs_there_and_writes_only_there(
    multinode_cluster: NetnsCluster, tmp_path: Path
) -> None:
    cluster = multinode_cluster
    head, worker = cluster.nodes["head"], cluster.nodes["w1"]
    assert worker.ip == cluster.head_ip.rsplit(".", 1)[0] + ".3"
    resources = {n["node_ip"]: n["resources_total"] for n in cluster.node_states() if n["state"] == "ALIVE"}
    assert resources[head.ip]["head_node"] == 1 and "worker_node" not in resources[head.ip]
    assert resources[worker.ip]["worker_node"] == 1 and resources[worker.ip]["CPU"] == 1

    marker = f"written-{uuid.uuid4().hex}"
    in_work, in_cwd = f"{NODE_WORK_DIR}/{marker}", f"{marker}-cwd"  # the second in the job's working_dir
    report = probe(cluster, tmp_path / "probe", in_work, in_cwd, resources={"worker_node": 1})

    assert (report["ip"], report["node_id"], report["driver_node_id"]) == (worker.ip, worker.node_id, worker.node_id)
    assert report["alive"] == sorted([head.ip, worker.ip])
    written_in_cwd = f"{report['cwd']}/{in_cwd}"
    assert report["cwd"].startswith("/tmp/ray/")  # the working_dir came through the head, into the node's temp dir
    assert _exists_in(cluster, "w1", in_work) and _exists_in(cluster, "w1", written_in_cwd)
    assert not _exists_in(cluster, "head", in_work) and not _exists_in(cluster, "head", written_in_cwd)
    assert worker.path(in_work).read_text() == worker.node_id  # the node's /tmp, seen from this machine
    assert not head.path(in_work).exists() and not Path(in_work).exists()

    # Unpinned, the entrypoint runs on the head: its working_dir is the head's own copy.
    on_head = probe(cluster, tmp_path / "probe", in_cwd)
    assert (on_head["ip"], on_head["node_id"]) == (head.ip, head.node_id)
    assert _exists_in(cluster, "head", f"{on_head['cwd']}/{in_cwd}") and not _exists_in(cluster, "head", in_work)


GCS_CALL = """
from ray._raylet import GcsClient
print(len(GcsClient(address={address!r}).internal_kv_keys(b"", None, timeout=10)))
"""


def test_token_auth_refuses_a_client_without_the_token(multinode_cluster: NetnsCluster) -> None:
    cluster = multinode_cluster
    jobs = f"{cluster.jobs_url}/api/jobs/"
    assert requests.get(jobs, timeout=10).status_code == 401
    assert requests.get(jobs, headers={"Authorization": "Bearer " + "0" * 64}, timeout=10).status_code == 403
    assert requests.get(jobs, headers=cluster.auth_headers(), timeout=10).status_code == 200

    # The GCS (gRPC), where nodes and drivers join: the token, else refused.
    call = [sys.executable, "-c", GCS_CALL.format(address=cluster.gcs_address)]
    with_token = subprocess.run(call, env=cluster.client_env(), capture_output=True, text=True, timeout=60)
    assert with_token.returncode == 0 and int(with_token.stdout) > 0, with_token.stderr
    wrong = cluster.client_env() | {"RAY_AUTH_TOKEN": "0" * 64}
    refused = subprocess.run(call, env=wrong, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, refused.stderr

    # The token travels in environments, never on a command line (every process of the machine).
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        assert cluster.token.encode() not in command, f"the token on the command line of process {pid}"


def test_a_killed_worker_node_is_seen_dead_and_a_restarted_one_rejoins(
    multinode_cluster: NetnsCluster, tmp_path: Path
) -> None:
    cluster = multinode_cluster
    worker = cluster.nodes["w1"]
    old = worker.node_id
    try:
        cluster.kill_node("w1")
        seen_dead_s = cluster.wait_dead(old, timeout_s=cluster.dead_after_s + 60)
        started = time.monotonic()
        new = cluster.start_node("w1")
        rejoined_s = time.monotonic() - started
        print(f"killed worker seen dead in {seen_dead_s:.1f}s (health checks: ~{cluster.dead_after_s:.0f}s), "
              f"restarted and alive in {rejoined_s:.1f}s")  # fmt: skip
        assert new != old and cluster.alive()[new] == worker.ip
        states = {n["node_id"]: n["state"] for n in cluster.node_states()}
        assert states[old] == "DEAD"
        report = probe(cluster, tmp_path / "probe", resources={"worker_node": 1})
        assert (report["ip"], report["node_id"]) == (worker.ip, new)
    finally:
        cluster.ensure_running()  # the next test gets its worker node whatever happened here


def test_driftloop_submit_pins_a_job_to_the_node_with_the_resource(multinode_cluster: NetnsCluster) -> None:
    cluster = multinode_cluster
    env = cluster.client_env()
    where: dict[str, str] = {}
    for resource, node in (("worker_node", "w1"), ("head_node", "head")):
        done = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "submit", "--address", cluster.jobs_url, "--resource",
             f"{resource}=1", "--json", "--", "ip", "-4", "-o", "addr", "show", "eth0"],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        assert json.loads(done.stdout.splitlines()[-1])["status"] == "SUCCEEDED"
        where[node] = done.stdout
    assert f"inet {cluster.nodes['w1'].ip}/" in where["w1"] and cluster.nodes["head"].ip not in where["w1"]
    assert f"inet {cluster.nodes['head'].ip}/" in where["head"]
