"""The commit of the code that runs, for MLflow runs: light to import (no MLflow, no Ray)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from streams.config import GIT_COMMIT_ENV

__all__ = ["git_commit"]

_COMMIT = re.compile(r"^[0-9a-f]{7,64}(-dirty)?$")


def git_commit(cwd: Path | None = None) -> str:
    """The commit of the code that runs: `DRIFTLOOP_GIT_COMMIT` (a job's submitter), else git's in `cwd`."""
    given = os.environ.get(GIT_COMMIT_ENV, "")
    if _COMMIT.match(given):
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True,
                             cwd=cwd)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                               cwd=cwd).stdout  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
