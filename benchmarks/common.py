"""What every benchmark shares: its command line, the machine line, and how figures are written."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the protocol's flags: `--quick` and `--json PATH`."""
    out = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    out.add_argument("--quick", action="store_true", help="a small run (about a minute at most)")
    out.add_argument("--json", type=Path, default=None, help="write the figures here")
    return out


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"


def emit(result: dict[str, Any], path: Path | None) -> int:
    """Print the figures and write them to `path` (if given); the exit status."""
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return 0
