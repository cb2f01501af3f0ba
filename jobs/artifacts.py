"""A model artifact's files and their digests, without torch: what the registry records and checks.

An artifact is a folder: `spec.json`, `features.json`, a weights file (`weights.safetensors` for
the neural families, `model.ubj` for the XGBoost ones), any extra JSON
(`report.json`, `profile.json`) and `digests.json`, the SHA-256 of each. `digests.json` travels
with the files, so it shows only that they were not changed one at a time; the registry keeps its
own copy of the digests (`jobs.registry.DIGESTS_TAG`), which whoever rewrites the artifact store
cannot change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from streams.errors import DriftloopError

__all__ = [
    "DIGESTS",
    "FEATURES",
    "SPEC",
    "WEIGHTS",
    "WEIGHT_FILES",
    "ArtifactError",
    "artifact_digests",
    "recorded_digests",
    "sha256_file",
    "verify_artifact",
]

SPEC, FEATURES, WEIGHTS, DIGESTS = "spec.json", "features.json", "weights.safetensors", "digests.json"
WEIGHT_FILES = (WEIGHTS, "model.ubj")  # one of them holds the model (which one, the spec's family says)


class ArtifactError(DriftloopError):
    """A model artifact is missing a file, fails its digest, or is not what it claims to be."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded_digests(folder: Path) -> dict[str, Any]:
    try:
        digests = json.loads((folder / DIGESTS).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{folder} has no {DIGESTS}: not a driftloop model artifact") from None
    except ValueError as err:
        raise ArtifactError(f"{folder / DIGESTS} is not valid JSON: {err}") from None
    if not isinstance(digests, dict):
        raise ArtifactError(f"{folder / DIGESTS} is not an object of file names and digests")
    return digests


def verify_artifact(folder: Path, digests: dict[str, Any], where: str = DIGESTS) -> None:
    """Every file `digests` names is in `folder` and has that SHA-256, and the model's own files are
    among them; an `ArtifactError` names the first that is not. `where` says whose record it is."""
    for name in (SPEC, FEATURES):
        if not isinstance(digests.get(name), str):
            raise ArtifactError(f"{where} records no digest for {name}")
    if not any(isinstance(digests.get(name), str) for name in WEIGHT_FILES):
        raise ArtifactError(f"{where} records no digest for a weights file ({' or '.join(WEIGHT_FILES)})")
    for name, expected in sorted(digests.items()):
        if not isinstance(name, str) or not isinstance(expected, str) or Path(name).name != name or name[:1] == ".":
            raise ArtifactError(f"{where} holds an entry that is not a file name and digest: {name!r}")
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{folder} is missing {name}")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{name} does not match its SHA-256 in {where}: the artifact was changed")


def artifact_digests(folder: Path) -> dict[str, str]:
    """The SHA-256 of each file of a freshly written artifact, computed from the files (what the
    registry records when the version is registered); refuses a folder that no longer matches its
    own `digests.json`."""
    recorded = recorded_digests(folder)
    verify_artifact(folder, recorded)
    return {name: sha256_file(folder / name) for name in sorted(recorded)}
