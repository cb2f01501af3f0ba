"""`driftloop submit` through the real Ray Jobs API: logs stream back, the exit code is the job's outcome."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cluster.submit import entrypoint_of, jobs_address
from streams.errors import ConfigError
from tests.test_cli import driftloop


def test_the_address_must_be_the_jobs_api_url() -> None:
    assert jobs_address(None, {"RAY_ADDRESS": "http://head:8265/"}) == "http://head:8265"
    assert jobs_address("https://ray.example:443", {}) == "https://ray.example:443"
    with pytest.raises(ConfigError, match="expected the Ray Jobs API"):
        jobs_address(None, {})
    with pytest.raises(ConfigError, match="not a GCS address"):
        jobs_address("10.0.0.1:6379", {})


def test_the_entrypoint_is_quoted_and_python_replaced_only_at_the_front() -> None:
    assert entrypoint_of(["python", "-m", "jobs.retrain", "--since", "a b"], "/venv/bin/python") == (
        "/venv/bin/python -m jobs.retrain --since 'a b'"
    )
    assert entrypoint_of(["bash", "-c", "python x.py"], "/venv/bin/python") == "bash -c 'python x.py'"
    with pytest.raises(ConfigError, match="ENTRYPOINT"):
        entrypoint_of([], None)


@pytest.mark.integration
def test_a_job_runs_with_the_repository_and_its_outcome_is_the_exit_code(
    jobs_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"JOB_ECHO_FAIL": "0", "RAY_ADDRESS": jobs_address}
    ok = driftloop(
        "submit", "--python", sys.executable, "--env", "JOB_ECHO_FAIL", "--json", "--",
        "python", "-m", "tests.job_echo", "--trigger-event-id", "t-1", env=env,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert 'DRIFTLOOP_RESULT {"version": "7"' in ok.stdout, "the job's own output streams back"
    outcome = json.loads(ok.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "SUCCEEDED" and outcome["submission_id"].startswith("driftloop-")

    failed = driftloop(
        "submit", "--address", jobs_address, "--python", sys.executable, "--env", "JOB_ECHO_FAIL", "--",
        "python", "-m", "tests.job_echo", env={"JOB_ECHO_FAIL": "1"},
    )  # fmt: skip
    assert failed.returncode == 1
    assert "no data to train on" in failed.stdout and "FAILED" in failed.stderr


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["--", "python", "-V"], {}, 2, "expected the Ray Jobs API"),
        (["--address", "127.0.0.1:6379", "--", "python", "-V"], {}, 2, "not a GCS address"),
        (["--address", "http://127.0.0.1:9"], {}, 2, "ENTRYPOINT: expected a command after `--`"),
        (["--address", "http://127.0.0.1:9", "--env", "NOPE_NOT_SET", "--", "python"], {}, 2, "<unset: NOPE_NOT_SET>"),
        (["--address", "http://127.0.0.1:9", "--", "python", "-V"], {}, 1, "no Ray Jobs API at http://127.0.0.1:9"),
        (["--address", "http://127.0.0.1:9", "--resource", "CPU=1", "--", "python"], {}, 2, "--resource: expected"),
        (["--address", "http://127.0.0.1:9", "--resource", "worker_node", "--", "python"], {}, 2, "'worker_node'"),
        (["--address", "http://127.0.0.1:9", "--resource", "w=-1", "--", "python"], {}, 2, "custom Ray resource"),
        (["--address", "http://127.0.0.1:9", "--resource", "w=nan", "--", "python"], {}, 2, "custom Ray resource"),
        (["--address", "http://127.0.0.1:9", "--resource", "$(id)=1", "--", "python"], {}, 2, "custom Ray resource"),
    ],
)
def test_bad_submissions_are_clear_errors(args: list[str], env: dict[str, str], code: int, message: str) -> None:
    result = driftloop("submit", *args, env=env, timeout=60)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_python_defaults_to_the_stacks_then_this_machines_then_the_clusters() -> None:
    import sys

    from cluster.submit import default_python

    stack = "http://127.0.0.1:8265"
    assert default_python("http://127.0.0.1:8265/", stack, "/stack/venv/bin/python") == "/stack/venv/bin/python"
    assert default_python("http://127.0.0.1:9999", stack, "/stack/venv/bin/python") == sys.executable
    assert default_python("http://localhost:8265", None, None) == sys.executable
    assert default_python("http://head:8265", stack, "/stack/venv/bin/python") is None  # the cluster's own


def test_a_jobs_runs_record_the_commit_its_submitter_passed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from jobs.gitinfo import git_commit
    from streams.config import GIT_COMMIT_ENV

    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    assert git_commit(tmp_path) == "unknown"  # no .git there: what a Ray job's working_dir looks like
    here = git_commit(Path(__file__).parent)
    assert here != "unknown" and len(here.split("-")[0]) == 40
    monkeypatch.setenv(GIT_COMMIT_ENV, here)
    assert git_commit(tmp_path) == here
    monkeypatch.setenv(GIT_COMMIT_ENV, "$(id)")  # not a commit: ignored
    assert git_commit(tmp_path) == "unknown"
