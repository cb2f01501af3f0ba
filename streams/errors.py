"""The exceptions driftloop raises, in one place.

```
DriftloopError
├── ConfigError          a pipeline config is missing, unreadable or invalid (every problem of a file)
├── DecodeError          a record or event could not be decoded (carries an ErrorKind)
├── BrokerError          the Kafka broker could not be started or reached
├── HandlerFailed        a consumer's handler kept failing after its retries
└── IncompleteRead       an offset range could not be read in full (never a silent short read)
```

`RetryableError` is raised *by handlers* to mark a transient failure that the consumer
retries; any other exception from a handler is retried the same way, but the name
documents intent.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class DriftloopError(Exception):
    """Base class of every error driftloop raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong in a config: the file, the key, and the line and column (1-based) when known."""

    file: str
    key: str
    expected: str
    found: object
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.key}: expected {self.expected}, found {_show(self.found)}"


class ConfigError(DriftloopError):
    """A config problem, naming the file, the key, what was expected and what was found.

    A config file's errors come all at once: `problems` holds every one, in file order, and the
    message has a line for each; `file`, `key`, `expected`, `found`, `line` and `column` are the first's.
    """

    def __init__(
        self,
        file: str,
        key: str,
        expected: str,
        found: object,
        *,
        line: int | None = None,
        column: int | None = None,
        more: Sequence[ConfigProblem] = (),
    ) -> None:
        self.file = file
        self.key = key
        self.expected = expected
        self.found = found
        self.line = line
        self.column = column
        self.problems = (ConfigProblem(file, key, expected, found, line, column), *more)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def of(cls, problems: Sequence[ConfigProblem]) -> ConfigError:
        """One error for several problems (at least one), the first standing for them all."""
        first, *more = problems
        return cls(first.file, first.key, first.expected, first.found, line=first.line, column=first.column, more=more)


def _show(found: object) -> str:
    if isinstance(found, str) and found.startswith("<") and found.endswith(">"):
        return found  # already a description, e.g. "<missing>"
    text = repr(found)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(found).__name__})"


class ErrorKind(str, enum.Enum):
    """Why a payload was rejected; the value travels in the DLQ reason header."""

    OVERSIZED = "oversized"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    WRONG_TYPE = "wrong_type"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    OUT_OF_RANGE = "out_of_range"
    NON_FINITE = "non_finite"
    UNKNOWN_CATEGORY = "unknown_category"
    INVALID_FIELD = "invalid_field"  # a string that breaks its pattern or length (ids)
    UNPROCESSABLE = "unprocessable"  # decoded, but could not be carried out (the reason says why)
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID = "invalid"


class DecodeError(DriftloopError):
    """A payload that cannot be decoded; `kind` says why and `field` where (if known)."""

    def __init__(self, kind: ErrorKind, message: str, field: str | None = None) -> None:
        self.kind = kind
        self.field = field
        self.message = message
        super().__init__(f"{kind.value}: {message}")


class BrokerError(DriftloopError):
    """The Kafka broker could not be started, reached or configured."""


class RetryableError(DriftloopError):
    """Raised by a consumer handler for a transient failure worth retrying."""


class IncompleteRead(DriftloopError):
    """An offset range could not be read in full; the message names the partition and offsets."""


class HandlerFailed(DriftloopError):
    """A handler failed on every retry; the batch's offsets were not committed."""
