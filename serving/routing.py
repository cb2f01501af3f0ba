"""Traffic policies, as pure decisions: who answers a request, and who only scores it.

- `none`: the champion answers.
- `shadow`: the champion answers; the challenger scores every request and its output is
  logged (variant `shadow`), never returned.
- `canary`: a fraction of requests is answered by the challenger (variant `challenger`).
  The split is decided by a hash of the request id, so a retried request lands on the same
  model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["Route", "route"]


@dataclass(frozen=True)
class Route:
    answer_with_challenger: bool
    shadow: bool


CHAMPION = Route(False, False)
SHADOW = Route(False, True)
CHALLENGER = Route(True, False)


def route(request_key: str, policy: str, canary_fraction: float, has_challenger: bool) -> Route:
    """Where one request goes under `policy` (see the module docstring)."""
    if not has_challenger or policy == "none":
        return CHAMPION
    if policy == "shadow":
        return SHADOW
    bucket = int.from_bytes(hashlib.sha256(request_key.encode()).digest()[:8], "big") / 2**64
    return CHALLENGER if bucket < canary_fraction else CHAMPION
