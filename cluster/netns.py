"""A multi-node Ray cluster on one Linux machine, its nodes in network namespaces (root only).

Each node is a namespace of its own, as a separate machine would be:
- network: `ip netns` `dl<slot>-head`, `dl<slot>-w1`, ..., each with loopback and an `eth0`
  (one end of a veth pair) on a bridge `dl<slot>-br` in the root namespace. Addresses are ours,
  in 10.213.<slot>.0/24: the bridge (this machine's side, where the nodes reach services it runs)
  .1, the head .2, the workers .3 and on. Nothing else carries them, and the nodes have no route
  beyond that subnet: nothing of the cluster is reachable on the machine's real interfaces.
- mounts: the node's `/tmp` is a folder of its own (`<root>/<node>` seen from the machine),
  `/dev/shm` (Ray's object store) a fresh tmpfs, `HOME` is `/tmp/home`; the repository and the
  Python environment are mounted read-only. So nothing passes between nodes through a local
  path: what one node writes under /tmp the others cannot see, and Ray's temp dir (`/tmp/ray`)
  is each node's own.
- processes: a PID namespace per node, so a node's processes see only each other (`ray stop`
  inside a node stops that node), and killing the node kills all of them at once.

Token authentication is on, as `driftloop up` runs Ray: `RAY_AUTH_MODE=token` and the token in
every node's environment (`RAY_AUTH_TOKEN`), never on a command line; clients get it the same
way (`client_env`) or as the HTTP header (`jobs_client`). The head runs the dashboard (the Jobs
API) and exports metrics; workers carry the custom resource `worker_node` (one unit each) to pin
work to them, the head `head_node`.

To try it by hand (as root): `python -m cluster.netns --workers 2` starts one, prints where it
answers and how to submit to it, and removes it on Ctrl-C (docs/multinode.md).

Slots let several clusters run at once (two pytest-xdist workers); each takes the first free one
under a lock, and removes what a crashed earlier holder of that slot left (namespaces,
processes, links) before it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from streams.errors import DriftloopError

__all__ = ["NetnsCluster", "Node", "NodeSpec", "Plan", "main", "plan", "remove_slot"]

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.213.{slot}"
SLOTS = 16
LOCK_DIR = Path("/run/lock")
GCS_PORT = 6379  # each node has its own ports (its own network namespace): Ray's defaults cannot collide
DASHBOARD_PORT = 8265
METRICS_PORT = 8080
NODE_TEMP_DIR = "/tmp/ray"
NODE_WORK_DIR = "/tmp/work"  # a node's processes start here; a job with no working_dir writes here
HEALTH_CHECK = {"period_ms": 1000, "timeout_ms": 3000, "failure_threshold": 5}
"""The GCS's checks of each raylet. Ray's defaults (every 3 s, 10 s to answer, dead after 5 failures)
call a killed node dead after about 15 s; these after about 5 s, so the tests of a lost node wait
less, and a raylet slow on a loaded machine still has 3 s to answer."""

# Runs as PID 1 of the node's PID namespace, in its own mount namespace: the node's mounts, then Ray.
# Arguments: the node's root (its /tmp); the read-only paths under /tmp, `--`; the other read-only
# paths, `--`; Ray's command line. A path under /tmp (a checkout in /tmp, as CI has) is mounted into
# the node's root first: the machine's /tmp is out of reach once the node's covers it.
_NODE_INIT = r"""
set -eu
root=$1; shift
while [ "$1" != -- ]; do
  inside="$root/${1#/tmp/}"; mkdir -p "$inside"; mount --bind "$1" "$inside"; mount -o remount,bind,ro "$inside"
  shift
done
shift
mount --rbind "$root" /tmp
while [ "$1" != -- ]; do mount --bind "$1" "$1"; mount -o remount,bind,ro "$1"; shift; done
shift
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mkdir -p /tmp/home /tmp/work
cd /tmp/work
exec "$@"
"""


@dataclass(frozen=True)
class NodeSpec:
    """One node of the plan: its names and address. Pure data."""

    name: str  # head, w1, w2, ...
    netns: str  # the network namespace, also the root-side veth's name
    ip: str
    head: bool


@dataclass(frozen=True)
class Plan:
    """Names and addresses of a cluster in one slot. Pure data."""

    slot: int
    bridge: str
    host_ip: str  # the bridge's: this machine as the nodes see it
    nodes: tuple[NodeSpec, ...]

    @property
    def head(self) -> NodeSpec:
        return self.nodes[0]


def plan(slot: int, workers: int) -> Plan:
    """The names and addresses of a cluster of one head and `workers` workers in `slot`. Pure.

    >>> p = plan(0, 2)
    >>> p.bridge, p.host_ip
    ('dl0-br', '10.213.0.1')
    >>> [(n.name, n.netns, n.ip) for n in p.nodes]  # doctest: +NORMALIZE_WHITESPACE
    [('head', 'dl0-head', '10.213.0.2'), ('w1', 'dl0-w1', '10.213.0.3'), ('w2', 'dl0-w2', '10.213.0.4')]
    """
    if not 0 <= slot < SLOTS:
        raise ValueError(f"slot must be in 0..{SLOTS - 1}, got {slot}")
    if not 1 <= workers <= 200:
        raise ValueError(f"workers must be in 1..200, got {workers}")
    net = SUBNET.format(slot=slot)
    names = ["head", *(f"w{i}" for i in range(1, workers + 1))]
    nodes = tuple(NodeSpec(name, f"dl{slot}-{name}", f"{net}.{i + 2}", i == 0) for i, name in enumerate(names))
    return Plan(slot, f"dl{slot}-br", f"{net}.1", nodes)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _netns_pids(netns: str) -> list[int]:
    found = _ip("netns", "pids", netns, check=False)
    return [int(word) for word in found.stdout.split()] if found.returncode == 0 else []


def _kill_netns_processes(netns: str, timeout_s: float = 10.0) -> None:
    """SIGKILL every process in `netns` and wait until none is left."""
    deadline = time.monotonic() + timeout_s
    while pids := _netns_pids(netns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise DriftloopError(f"processes {pids} in network namespace {netns} survive SIGKILL")
        time.sleep(0.05)


def remove_slot(slot: int) -> None:
    """Remove every namespace, process and link of `slot`: what a cluster left, crashed or not."""
    prefix = f"dl{slot}-"
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for netns in (line.split()[0] for line in listed if line.startswith(prefix)):
        _kill_netns_processes(netns)
        _ip("netns", "delete", netns, check=False)
    links = _ip("-o", "link", "show", check=False).stdout.split("\n")
    for line in links:
        parts = line.split(": ")
        if len(parts) > 1 and parts[1].split("@")[0].startswith(prefix):
            _ip("link", "delete", parts[1].split("@")[0], check=False)


@contextlib.contextmanager
def _slot_lock(slot: int | None) -> Iterator[tuple[int, IO[str]]]:
    """The first free slot (or the given one), locked until the block ends."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for candidate in range(SLOTS) if slot is None else (slot,):
        handle = (LOCK_DIR / f"driftloop-netns-{candidate}.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield candidate, handle
        finally:
            handle.close()
        return
    raise DriftloopError(f"no free multi-node slot ({'0..15' if slot is None else slot}): other clusters hold them")


@dataclass
class Node:
    """A node of a running cluster: its plan, where its /tmp lies on this machine, and its process."""

    spec: NodeSpec
    root: Path  # the node's /tmp, seen from this machine
    log: Path
    resources: dict[str, float]
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""  # Ray's id of the node as it runs now (a restarted node has a new one)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ip(self) -> str:
        return self.spec.ip

    def path(self, inside: str) -> Path:
        """Where a path under the node's /tmp lies on this machine."""
        relative = Path(inside).relative_to("/tmp")
        return self.root / relative

    def init_pid(self) -> int:
        """This machine's id of the node's PID 1 (`ray start --block`): `nsenter --target` it."""
        if self.process is None or self.process.poll() is not None:
            raise DriftloopError(f"node {self.name} is not running")
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        if not children:
            raise DriftloopError(f"node {self.name}: its PID namespace has no process yet")
        return int(children[0])


@dataclass
class NetnsCluster:
    """A Ray head and `workers` worker nodes, each in namespaces of its own (see the module docstring).

    `start()` builds it and waits until the head sees every node alive; `stop()` removes all of it.
    As a context manager it does both. Root only.
    """

    root: Path  # under /tmp on this machine: each node's /tmp under it, and the nodes' logs
    workers: int = 1
    slot: int | None = None  # None: the first free one
    cpus_per_node: int = 1
    object_store_bytes: int = 256 * 1024**2
    env: Mapping[str, str] = field(default_factory=dict)  # more environment for every node (and so its jobs)
    read_only: Sequence[str] = ()  # more folders every node sees read-only (besides the code and its Python)
    health_check: Mapping[str, int] = field(default_factory=lambda: dict(HEALTH_CHECK))
    token: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)  # Ray's own format
    plan: Plan | None = field(default=None, init=False)
    nodes: dict[str, Node] = field(default_factory=dict, init=False)
    timings: dict[str, float] = field(default_factory=dict, init=False)  # for whoever measures them
    _lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, init=False, repr=False)

    # --- where it answers -------------------------------------------------------------------------

    @property
    def _plan(self) -> Plan:
        if self.plan is None:
            raise DriftloopError("the cluster is not started")
        return self.plan

    @property
    def host_ip(self) -> str:
        """This machine's address as the nodes see it: a service for the nodes listens here."""
        return self._plan.host_ip

    @property
    def head_ip(self) -> str:
        return self._plan.head.ip

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip}:{GCS_PORT}"

    @property
    def jobs_url(self) -> str:
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.head_ip}:{METRICS_PORT}/metrics"

    @property
    def worker_names(self) -> list[str]:
        return [name for name, node in self.nodes.items() if not node.spec.head]

    @property
    def dead_after_s(self) -> float:
        """About how long the head takes to call a killed node dead (its health checks)."""
        check = self.health_check
        return (check["period_ms"] * check["failure_threshold"] + check["timeout_ms"]) / 1000

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a client process of this cluster (`ray job submit`, `ray list nodes`):
        `base` (default this process's) with the token, without another cluster's address."""
        env = dict(os.environ if base is None else base)
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            env.pop(name, None)
        return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def jobs_client(self) -> Any:
        """A `JobSubmissionClient` of the head's Jobs API, with the token.

        The header, not the environment: Ray reads a process's token once, and a test process is
        already a client of another cluster."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.jobs_url, headers=self.auth_headers())

    def in_node(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside node `name`'s namespaces (network, mounts, processes): a command line.

        It keeps the caller's environment: give it `node_env()` to run as the node's own processes do
        (`ray stop` so run stops that node only, and the head hears of it at once)."""
        pid = str(self.nodes[name].init_pid())
        return ["nsenter", "--target", pid, "--net", "--mount", "--pid", "--", *argv]

    def node_states(self) -> list[dict[str, Any]]:
        """Every node the head knows (alive and dead): `node_id`, `node_ip`, `state`, `resources_total`, ...
        (Ray's state API)."""
        import requests

        answer = requests.get(
            f"{self.jobs_url}/api/v0/nodes", params={"limit": "1000", "detail": "1"},
            headers=self.auth_headers(), timeout=10,
        )  # fmt: skip
        answer.raise_for_status()
        body = answer.json()
        if not body.get("result"):
            raise DriftloopError(f"the head's state API: {body.get('msg')}")
        return list(body["data"]["result"]["result"])

    def alive(self) -> dict[str, str]:
        """Node id -> node IP of every node the head sees alive."""
        return {n["node_id"]: n["node_ip"] for n in self.node_states() if n["state"] == "ALIVE"}

    # --- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> NetnsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0) -> None:
        """Take a slot, build its network, start the head and the workers; wait until all are alive."""
        if os.geteuid() != 0:
            raise DriftloopError("network namespaces need root")
        for tool in ("ip", "unshare", "nsenter", "mount"):
            if shutil.which(tool) is None:
                raise DriftloopError(f"{tool} is not installed (Debian: iproute2, util-linux, mount)")
        if not self.root.resolve().is_relative_to("/tmp"):  # elsewhere, every node could reach the others' roots
            raise DriftloopError(
                f"the cluster's root must lie under /tmp, which each node covers with its own: {self.root}"
            )
        try:
            slot, _ = self._lock.enter_context(_slot_lock(self.slot))
            self.plan = plan(slot, self.workers)
            remove_slot(slot)  # what a crashed holder of the slot left
            self._network()
            self.root.mkdir(parents=True, exist_ok=True)
            for spec in self.plan.nodes:
                resources = {"head_node" if spec.head else "worker_node": 1.0}
                self.nodes[spec.name] = Node(spec, self.root / spec.name, self.root / f"{spec.name}.log", resources)
            deadline = time.monotonic() + timeout_s
            for name in self.nodes:  # the workers' `ray start` waits for the head's GCS
                self._launch(name)
            self._wait_alive(list(self.nodes), deadline, known=set())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill every node and remove the namespaces and the bridge (safe to call twice)."""
        try:
            if self.plan is not None:
                for node in self.nodes.values():
                    if node.process is not None:
                        node.process.kill()
                remove_slot(self.plan.slot)
                for node in self.nodes.values():
                    if node.process is not None:
                        node.process.wait(timeout=10)
        finally:
            self._lock.close()

    def kill_node(self, name: str) -> None:
        """Kill node `name` at once, every process of it (SIGKILL): a machine that died."""
        node = self.nodes[name]
        if node.spec.head:
            raise DriftloopError("killing the head ends the cluster: stop() it")
        if node.process is not None:
            node.process.kill()  # unshare --kill-child: its PID 1 dies, and with it the whole PID namespace
            node.process.wait(timeout=10)
            node.process = None
        _kill_netns_processes(node.spec.netns)

    def start_node(self, name: str, timeout_s: float = 60.0) -> str:
        """(Re)start worker `name` (a fresh /dev/shm; its /tmp kept) and wait until the head sees it
        alive; returns its new node id."""
        node = self.nodes[name]
        if node.process is not None and node.process.poll() is None:
            raise DriftloopError(f"node {name} is running")
        known = {n["node_id"] for n in self.node_states()}  # its old id may still look alive for a while
        self._launch(name)
        self._wait_alive([name], time.monotonic() + timeout_s, known)
        return node.node_id

    def ensure_running(self) -> None:
        """Start again every worker that is not running (after a test that killed one failed)."""
        for name in self.worker_names:
            process = self.nodes[name].process
            if process is None or process.poll() is not None:
                with contextlib.suppress(DriftloopError):
                    self.kill_node(name)  # whatever is left of it
                self.start_node(name)

    def wait_dead(self, node_id: str, timeout_s: float) -> float:
        """Seconds until the head calls `node_id` dead; raises after `timeout_s`."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            states = {n["node_id"]: n["state"] for n in self.node_states()}
            if states.get(node_id) == "DEAD":
                return time.monotonic() - started
            time.sleep(0.2)
        raise DriftloopError(f"the head still sees node {node_id} alive after {timeout_s:.0f}s")

    # --- inside -------------------------------------------------------------------------------------

    def _network(self) -> None:
        p = self._plan
        batches: list[tuple[list[str], list[str]]] = [([], [f"link add {p.bridge} type bridge",
                    f"addr add {p.host_ip}/24 dev {p.bridge}", f"link set {p.bridge} up"])]  # fmt: skip
        for spec in p.nodes:
            batches[0][1].extend([
                f"netns add {spec.netns}",
                f"link add {spec.netns} type veth peer name eth0 netns {spec.netns}",
                f"link set {spec.netns} master {p.bridge}",
                f"link set {spec.netns} up",
            ])  # fmt: skip
            inside = ["link set lo up", f"addr add {spec.ip}/24 dev eth0", "link set eth0 up"]
            batches.append((["-n", spec.netns], inside))
        for options, commands in batches:
            done = subprocess.run(["ip", *options, "-batch", "-"], input="\n".join(commands) + "\n",
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                raise DriftloopError(f"building the cluster's network failed: {done.stderr.strip()}")

    def node_env(self) -> dict[str, str]:
        """A node's whole environment (its jobs inherit it): the token, `env`, and nothing of this
        process's Ray (its address, its loopback switch). For a command run `in_node` as a node would."""
        bin_dir = str(Path(sys.executable).parent)
        env = {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/tmp/home",
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "RAY_USAGE_STATS_ENABLED": "0",
            # torch's Gloo (Ray Train's DDP on CPUs) takes the address the hostname resolves to, and
            # every node shares this machine's hostname (127.0.1.1 in /etc/hosts): its peers then
            # dial loopback ("connectFullMesh failed ... remote=[127.0.0.1]"). The node's own interface.
            "GLOO_SOCKET_IFNAME": "eth0",
            **{f"RAY_health_check_{key}": str(value) for key, value in self.health_check.items()},
            **self.env,
        }
        return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _ray_argv(self, node: Node) -> list[str]:
        ray = str(Path(sys.executable).parent / "ray")
        common = [
            f"--node-ip-address={node.ip}",
            f"--num-cpus={self.cpus_per_node}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--resources={json.dumps(node.resources)}",
            f"--temp-dir={NODE_TEMP_DIR}",
            "--disable-usage-stats",
        ]
        if node.spec.head:
            return [ray, "start", "--head", "--block", f"--port={GCS_PORT}", f"--dashboard-host={node.ip}",
                    f"--dashboard-port={DASHBOARD_PORT}", f"--metrics-export-port={METRICS_PORT}", *common]  # fmt: skip
        return [ray, "start", "--block", f"--address={self.gcs_address}", *common]  # a worker has no dashboard

    def _read_only(self) -> tuple[list[str], list[str]]:
        """The folders every node sees, read-only, where this machine has them (those under /tmp, the
        others): the repository, the Python environment and its interpreter, and `read_only`."""
        wanted = [ROOT, Path(sys.prefix), Path(sys.base_prefix), *map(Path, self.read_only)]
        kept: list[Path] = []
        for path in sorted({path.resolve() for path in wanted}, key=lambda path: len(path.parts)):
            if path == Path("/tmp") or not path.is_dir():
                raise DriftloopError(f"cannot share {path} with the nodes: it must be a folder, and not /tmp")
            if not any(path.is_relative_to(other) for other in kept):
                kept.append(path)
        under_tmp = [str(path) for path in kept if path.is_relative_to("/tmp")]
        return under_tmp, [str(path) for path in kept if not path.is_relative_to("/tmp")]

    def _launch(self, name: str) -> None:
        node = self.nodes[name]
        node.root.mkdir(parents=True, exist_ok=True)
        under_tmp, others = self._read_only()
        argv = [
            "ip", "netns", "exec", node.spec.netns,
            "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "--kill-child",
            "--", "/bin/sh", "-c", _NODE_INIT, "node-init", str(node.root), *under_tmp, "--", *others, "--",
            *self._ray_argv(node),
        ]  # fmt: skip
        with node.log.open("ab") as log:
            node.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.node_env(),
                start_new_session=True,
            )  # fmt: skip

    def _wait_alive(self, names: list[str], deadline: float, known: set[str]) -> None:
        """Wait until the head sees each of `names` alive under an id not in `known`; note the ids."""
        waiting = {self.nodes[name].ip: self.nodes[name] for name in names}
        last: BaseException | None = None
        while time.monotonic() < deadline:
            for name in names:
                process = self.nodes[name].process
                if process is not None and process.poll() is not None:
                    tail = self.nodes[name].log.read_text(errors="replace")[-2000:]
                    raise DriftloopError(f"node {name} exited while starting ({process.returncode}):\n{tail}")
            try:
                for node_id, ip in self.alive().items():
                    if ip in waiting and node_id not in known:
                        waiting.pop(ip).node_id = node_id
                if not waiting:
                    return
            except Exception as err:  # the head is not answering yet
                last = err
            time.sleep(0.3)
        raise DriftloopError(f"nodes {sorted(n.name for n in waiting.values())} not alive in time "
                             f"(last error: {last}); logs under {self.root}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cluster.netns [--workers N] [--cpus C]`: a cluster until Ctrl-C (or SIGTERM)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m cluster.netns", description=main.__doc__)
    parser.add_argument("--workers", type=int, default=1, help="worker nodes beside the head (default 1)")
    parser.add_argument("--cpus", type=int, default=1, help="logical CPUs of each node (default 1)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dl-netns-"))  # under /tmp, mode 0700
    cluster = NetnsCluster(root, workers=args.workers, cpus_per_node=args.cpus)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop() below runs on SIGTERM too
    try:
        cluster.start()
        token = root / "auth_token"
        with os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write(cluster.token)
        for node in cluster.nodes.values():
            print(f"{node.name:5} {node.ip:12} {node.spec.netns:9} {node.node_id}  {json.dumps(node.resources)}")
        print(f"GCS       {cluster.gcs_address}\nJobs API  {cluster.jobs_url}\nmetrics   {cluster.metrics_url}")
        print(f"this machine, as the nodes see it: {cluster.host_ip}; node logs and /tmp folders under {root}")
        print(f"clients:  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}")
        print(f"          driftloop submit --address {cluster.jobs_url} -- python -m jobs.retrain ...")
        print("Ctrl-C removes the cluster.", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
