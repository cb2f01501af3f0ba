"""`driftloop submit`: any entrypoint to a Ray cluster through the Ray Jobs API.

The repository goes along as the job's `working_dir` (without `.git`, `.venv`, `runs`, ...),
so the cluster runs the code you have; the job's logs stream back here and the command exits
with the job's outcome: 0 when it succeeded, 1 when it failed or was stopped. The same
entrypoints run with plain `ray job submit --working-dir . -- python -m jobs.retrain ...`.

Secrets are never put on the command line: `--env NAME` forwards a variable's value from this
environment to the job's (the cluster's own environment is the better place for them).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jobs.controller import EXCLUDES, TERMINAL, job_status
from jobs.gitinfo import git_commit
from streams.config import GIT_COMMIT_ENV, RAY_BUILTIN_RESOURCES, RESOURCE_NAME
from streams.errors import ConfigError, DriftloopError

__all__ = ["Submission", "default_python", "jobs_address", "parse_resources", "submit"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Submission:
    submission_id: str
    status: str  # SUCCEEDED, FAILED, STOPPED; PENDING/RUNNING when not waited for
    message: str = ""


def jobs_address(given: str | None, env: dict[str, str] | None = None) -> str:
    """The Jobs API to talk to: `--address`, else RAY_ADDRESS when it is an http(s) URL."""
    env = dict(os.environ) if env is None else env
    address = given or env.get("RAY_ADDRESS") or ""
    if not address:
        raise ConfigError(
            "<command line>",
            "--address",
            "the Ray Jobs API, e.g. http://127.0.0.1:8265 (or set RAY_ADDRESS)",
            "<missing>",
        )
    if not address.startswith(("http://", "https://")):
        raise ConfigError(
            "<command line>", "--address", "the dashboard's http(s) URL, e.g. http://head:8265 (not a GCS address)",
            address,
        )  # fmt: skip
    return address.rstrip("/")


def default_python(address: str, stack_jobs: str | None, stack_python: str | None) -> str | None:
    """The interpreter a leading `python` becomes when `--python` is not given. Pure.

    The stack's (the one `driftloop up` ran with) when `address` is the stack's Jobs API; this
    interpreter when the cluster is on this machine (a loopback address: it can run it);
    otherwise None, the cluster's own `python`. Without this, a job on the local stack ran the
    system `python`, which has none of driftloop's dependencies (ModuleNotFoundError).
    """
    if stack_jobs and stack_python and address.rstrip("/") == stack_jobs.rstrip("/"):
        return stack_python
    host = urlsplit(address).hostname or ""
    if host == "localhost" or host == "::1" or host.startswith("127."):
        return sys.executable
    return None


def parse_resources(values: Sequence[str]) -> dict[str, float]:
    """`--resource NAME=AMOUNT` (repeatable) as Ray's `entrypoint_resources`. Pure.

    >>> parse_resources(["worker_node=1", "ssd=0.5"])
    {'worker_node': 1.0, 'ssd': 0.5}
    """
    resources: dict[str, float] = {}
    for value in values:
        name, sep, amount = value.partition("=")
        try:
            number = float(amount) if sep else 0.0
        except ValueError:
            number = 0.0
        if not RESOURCE_NAME.match(name) or name in RAY_BUILTIN_RESOURCES or not 0 < number < float("inf"):
            raise ConfigError(
                "<command line>", "--resource", "NAME=AMOUNT: a custom Ray resource (not CPU, GPU), a positive amount",
                value[:80],
            )  # fmt: skip
        resources[name] = number
    return resources


def entrypoint_of(command: Sequence[str], python: str | None) -> str:
    """The shell command the job runs; a leading `python` becomes the given interpreter. Pure."""
    words = list(command)
    if not words:
        raise ConfigError(
            "<command line>", "ENTRYPOINT", "a command after `--`, e.g. -- python -m jobs.retrain", "<missing>"
        )
    if python and words[0] in ("python", "python3"):
        words[0] = python
    return shlex.join(words)


def submit(
    address: str,
    command: Sequence[str],
    *,
    python: str | None = None,
    working_dir: Path = ROOT,
    forward_env: Sequence[str] = (),
    submission_id: str | None = None,
    resources: Mapping[str, float] | None = None,
    wait: bool = True,
    out: Any = None,
    client_factory: Any = None,
) -> Submission:
    """Submit `command`; when `wait`, stream its logs to `out` and return how it ended.

    `resources`: custom Ray resources the entrypoint needs, so that it runs on a node that has
    them (e.g. `{"worker_node": 1}`: a worker node started with `--resources`).
    """
    entrypoint = entrypoint_of(command, python)
    missing = [name for name in forward_env if name not in os.environ]
    if missing:
        raise ConfigError(
            "<command line>", "--env", "names of variables set in this environment", f"<unset: {', '.join(missing)}>"
        )
    if client_factory is None:
        from ray.job_submission import JobSubmissionClient

        client_factory = JobSubmissionClient
    try:
        client = client_factory(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise DriftloopError(f"no Ray Jobs API at {address}: {err}") from None
    submission_id = submission_id or f"driftloop-{uuid.uuid4().hex[:12]}"
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "env_vars": {GIT_COMMIT_ENV: git_commit(working_dir), **{name: os.environ[name] for name in forward_env}},
    }
    try:
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata={"driftloop": "submit"},
            entrypoint_resources=dict(resources or {}) or None,  # only on nodes that have them
        )
    except RuntimeError as err:
        raise DriftloopError(f"the Jobs API at {address} refused the job: {err}") from None
    if not wait:
        return Submission(submission_id, job_status(client, submission_id))
    stream = out if out is not None else sys.stdout
    asyncio.run(_tail(client, submission_id, stream))
    status = job_status(client, submission_id)
    while status not in TERMINAL:  # the log stream can close a moment before the status changes
        time.sleep(0.5)
        status = job_status(client, submission_id)
    message = "" if status == "SUCCEEDED" else str(getattr(client.get_job_info(submission_id), "message", "") or "")
    return Submission(submission_id, status, message)


async def _tail(client: Any, submission_id: str, out: Any) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        out.write(chunk)
        out.flush()
