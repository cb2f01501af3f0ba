"""Progress bars for long work, on stderr, for people at a terminal.

Bars show when stderr is a terminal; `DRIFTLOOP_PROGRESS=1` forces them on (for example under
`script` or in a notebook) and `DRIFTLOOP_PROGRESS=0` off. Logs and job output never get them:
a Ray Job's stderr is a file, so the default leaves them out there.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from tqdm import tqdm

__all__ = ["PROGRESS_ENV", "bar", "enabled", "say"]

PROGRESS_ENV = "DRIFTLOOP_PROGRESS"


def enabled(stream: IO[str] | None = None) -> bool:
    """Whether bars show: `DRIFTLOOP_PROGRESS` when set to 0 or 1, else whether `stream` is a terminal."""
    forced = os.environ.get(PROGRESS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(total: float | None, desc: str, unit: str = "it", file: IO[str] | None = None, **options: Any) -> tqdm:
    """A tqdm bar on `file` (stderr), shown only when `enabled`; use it as a context manager."""
    file = sys.stderr if file is None else file
    return tqdm(total=total, desc=desc, unit=unit, file=file, disable=not enabled(file), dynamic_ncols=True, **options)


def say(line: str, file: IO[str] | None = None) -> None:
    """Print a line without breaking a bar that is showing (plain print when none is)."""
    file = sys.stdout if file is None else file
    tqdm.write(line, file=file)
    file.flush()
