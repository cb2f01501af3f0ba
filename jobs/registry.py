"""Tracking and the model registry in MLflow, and promotion through the gate.

One MLflow experiment per pipeline, one run per training: params, per-epoch metrics, the
holdout report, the dataset versions as inputs (with their Kafka ranges), the git commit,
and the model: an MLflow pyfunc model (`jobs.pyfunc`, logged from code) whose `driftloop`
artifact is the artifact folder. Each run's model becomes a version of the pipeline's registered
model, tagged with its lineage, its report and its artifact's digests; `download` hands back the
artifact folder, verified against those digests. Aliases, not stages: `champion` is what serves,
`previous` is where a rollback goes.

`promote` runs the gate under a lock per model, so two racing promotions are serialised:
each challenger is judged against the champion of the moment, and the alias never rests on
a version that did not pass against the version it replaced. The lock lives in the registry
(`_lock`), not on a local disk, so promotions on different machines see it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from jobs.artifacts import ArtifactError, artifact_digests, verify_artifact
from jobs.dataset_inputs import log_dataset_version
from jobs.gate import Verdict, judge
from jobs.gitinfo import git_commit
from streams.config import MLFLOW_PASSWORD_FILE_ENV, GateSettings, PipelineConfig
from streams.datasets import Window
from streams.errors import DriftloopError
from streams.events import DeliveryStep, Event, ModelPromoted, ModelRejected, ModelRolledBack

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo
    from mlflow.models.signature import ModelSignature

__all__ = ["ModelRegistry", "Registered", "git_commit", "tracking_uri"]

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
DELIVERY_TAG = "driftloop.delivery"  # on the challenger: its step (shadow, canary), or how its delivery ended
DELIVERY_SINCE_TAG = "driftloop.delivery_since"  # when its step began (wall time, seconds)
ROLLED_BACK_TAG = "driftloop.rolled_back"  # on a version rolled back from: why
PREVIOUS_SEEN_TAG = "driftloop.previous_on_holdout"  # on a promoted version: the champion it beat, on its holdout
REPORT_TAG = "driftloop.report"
LOCK_SUFFIX = ".promotion-lock"  # `<name>.promotion-lock`: the registered model that is the promotion lock
LOCK_DESCRIPTION = "driftloop's promotion lock for the model of the same name: held while a promotion runs"
LOCK_LEASE_S = 300.0  # a lock older than this lost its holder (a promotion takes seconds) and is taken over
LOCK_WAIT_S = 600.0
# Each artifact file's SHA-256, recorded on the model version when it is registered: the artifact
# store (a bucket, a folder, MLflow's artifact proxy) can be rewritten without touching the registry,
# so a digests file beside the weights cannot be the only record.
DIGESTS_TAG = "driftloop.digests"
FAMILY_TAG = "driftloop.family"  # the model family (spec.json's kind): what model selection chose
MODEL_PATH = "model"  # the pyfunc model's name in its run
EXAMPLE = "example.json"  # in an artifact: a few raw records, the pyfunc model's input example
_ROOT = Path(__file__).resolve().parent.parent  # holds `jobs` and `streams`, the pyfunc model's code
_MLFLOW_TYPES = {"float": "double", "int": "long", "bool": "boolean", "category": "string"}
# What loading the pyfunc model imports (each entry: the first of its names that is installed).
_RUNTIME = (("mlflow",), ("numpy",), ("pandas",), ("torch",), ("safetensors",), ("pyarrow",), ("msgspec",),
            ("pyyaml",), ("xgboost-cpu", "xgboost"))  # fmt: skip


def use_tracking_credentials() -> None:
    """Give MLflow's client the tracking password from the file `DRIFTLOOP_MLFLOW_PASSWORD_FILE`
    names, unless `MLFLOW_TRACKING_PASSWORD` is set already. The stack's Ray head, and so its
    jobs and actors, gets the file's path, never the password itself: Ray logs a runtime env's
    variables, and a variable on a command line is visible to every local user."""
    import os

    path = os.environ.get(MLFLOW_PASSWORD_FILE_ENV)
    if path and not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        try:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = Path(path).read_text().strip()
        except OSError as err:
            raise DriftloopError(f"{MLFLOW_PASSWORD_FILE_ENV}={path}: cannot read the password ({err})") from None


def tracking_uri(config: PipelineConfig, run_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI` / `mlflow.tracking_uri`, else a SQLite store under the run directory."""
    if config.mlflow.tracking_uri:
        return config.mlflow.tracking_uri
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


@dataclass(frozen=True)
class Registered:
    """A model version in the registry, and the run it came from."""

    name: str
    version: str
    run_id: str


class ModelRegistry:
    """The pipeline's experiment and registered model (see the module docstring)."""

    def __init__(self, config: PipelineConfig, uri: str, artifact_root: Path | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        use_tracking_credentials()
        self.config = config
        self.name = config.name
        self.uri = uri
        self.client = MlflowClient(uri)
        self._config_yaml: str | None = None  # the config as the pyfunc model carries it, written once
        experiment = self.client.get_experiment_by_name(self.name)
        if experiment is None:
            # A tracking server keeps artifacts where it says (its artifact store, which every node
            # reaches through it); a folder of this machine would be out of reach of the others: a
            # job on a worker node wrote the model where Serve on the head could not read it.
            served = urlsplit(uri).scheme in ("http", "https")
            location = artifact_root.resolve().as_uri() if artifact_root is not None and not served else None
            self.experiment_id = self.client.create_experiment(self.name, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id
        self._mlflow = mlflow

    # --- tracking ------------------------------------------------------------------------

    def log_training(
        self,
        artifact: Path,
        params: dict[str, Any],
        history: list[dict[str, Any]],
        report: dict[str, Any],
        window: Window,
        trigger_event_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> Registered:
        """Log one training run and register its model as a new version."""
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.uri)
        tags = {"driftloop.pipeline": self.name, "git_commit": git_commit()}
        if trigger_event_id:
            tags["driftloop.trigger_event_id"] = trigger_event_id
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        with mlflow.start_run(experiment_id=self.experiment_id, tags=tags) as run:
            mlflow.log_params(params)
            for row in history:
                step = int(row.get("epoch", 0))
                mlflow.log_metrics(
                    {k: float(row[k]) for k in ("train_loss", "val_loss", "val_accuracy") if k in row}, step=step
                )
            mlflow.log_metrics({f"holdout_{k}": float(v) for k, v in report.items() if _number(v)})
            for manifest in window.manifests:
                log_dataset_version(manifest, context="training")
            logged = self._log_pyfunc(artifact)
            run_id = run.info.run_id
        with contextlib.suppress(Exception):  # already exists
            self.client.create_registered_model(self.name, tags={"driftloop.pipeline": self.name})
        lineage = {
            "driftloop.datasets": ",".join(m.version_id for m in window.manifests),
            "driftloop.kafka": ";".join(m.source_uri() for m in window.manifests)[:4900],
            "driftloop.run_id": run_id,
            REPORT_TAG: json.dumps(_compact(report), sort_keys=True),
            DIGESTS_TAG: json.dumps(artifact_digests(artifact), sort_keys=True),
        }
        if trigger_event_id:
            lineage["driftloop.trigger_event_id"] = trigger_event_id
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # the model family chosen
            lineage[FAMILY_TAG] = str(json.loads((artifact / "spec.json").read_text())["kind"])
        version = self.client.create_model_version(
            self.name, source=logged.model_uri, run_id=run_id, tags=lineage, model_id=logged.model_id
        )
        return Registered(self.name, str(version.version), run_id)

    def _log_pyfunc(self, artifact: Path) -> ModelInfo:
        """Log the artifact as an MLflow pyfunc model of the active run (`jobs.pyfunc`, logged from
        code): the artifact folder as its `driftloop` artifact, the pipeline config beside it, the
        `jobs` and `streams` packages as its code. Requirements and signature are given, not
        inferred: MLflow's inference loads the model in a subprocess, seconds on the retrain path."""
        import shutil
        import tempfile

        from jobs import pyfunc
        from streams.config import dump_config

        signature, example = None, _example(artifact)
        if example is not None:  # without an example MLflow warns at a signature: both or neither
            signature = self._signature(artifact)
            if not _fits(example, signature):
                signature = example = None
        with tempfile.TemporaryDirectory(prefix="driftloop-pyfunc-") as tmp:
            # A fixed name, so that the artifact's place in the model is known without reading MLmodel.
            folder = shutil.copytree(artifact, Path(tmp) / pyfunc.ARTIFACT)
            config = Path(tmp) / pyfunc.CONFIG_FILE
            if self._config_yaml is None:
                self._config_yaml = dump_config(self.config)
            config.write_text(self._config_yaml, encoding="utf-8")
            return self._mlflow.pyfunc.log_model(
                name=MODEL_PATH,
                python_model=pyfunc.__file__,
                artifacts={pyfunc.ARTIFACT: str(folder), pyfunc.CONFIG: str(config)},
                code_paths=[str(_ROOT / "jobs"), str(_ROOT / "streams")],
                pip_requirements=list(pip_requirements()),
                signature=signature,
                input_example=example,
            )

    def _signature(self, artifact: Path) -> ModelSignature:
        """Raw records in (typed as the pipeline's schema types them), class probabilities out."""
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema, TensorSpec

        from jobs.artifacts import SPEC

        inputs: list[ColSpec | TensorSpec] = [
            # An int column with gaps is a float column in pandas: MLflow's advice is to type it double.
            ColSpec(
                "double" if f.nullable and f.type == "int" else _MLFLOW_TYPES[f.type], f.name, required=not f.nullable
            )
            for f in self.config.schema.features
        ]
        outputs: list[ColSpec | TensorSpec] = [
            ColSpec("double", str(c)) for c in json.loads((artifact / SPEC).read_text())["classes"]
        ]
        return ModelSignature(Schema(inputs), Schema(outputs))

    # --- registry ------------------------------------------------------------------------

    def alias(self, alias: str) -> str | None:
        """The version an alias points at, or None."""
        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except Exception:  # MlflowException: no such alias or model
            return None

    def has_version(self, version: str) -> bool:
        """Whether this model has that version (False for a version that is not a number, too)."""
        try:
            self.client.get_model_version(self.name, version)
        except Exception:  # MlflowException: no such model or version, or not a version number
            return False
        return True

    def report(self, version: str) -> dict[str, Any]:
        tags = self.client.get_model_version(self.name, version).tags
        return dict(json.loads(tags[REPORT_TAG]))

    def download(self, version: str, into: Path) -> Path:
        """The version's artifact folder (its pyfunc model's `driftloop` artifact), downloaded, each
        file checked against the SHA-256 that the registry recorded at registration (spec, features,
        weights, report, profile): an `ArtifactError` if any is missing or changed, or if the version
        has no such record."""
        registered = self.client.get_model_version(self.name, version)
        try:
            digests = json.loads(registered.tags[DIGESTS_TAG])
        except KeyError:
            raise ArtifactError(f"version {version} of {self.name!r} has no {DIGESTS_TAG} tag: it was registered "
                                "without digests (retrain it, or register it again)") from None  # fmt: skip
        except ValueError as err:
            raise ArtifactError(f"version {version}'s {DIGESTS_TAG} tag is not JSON: {err}") from None
        if not isinstance(digests, dict):
            raise ArtifactError(f"version {version}'s {DIGESTS_TAG} tag is not an object of names and digests")
        source = str(registered.source)
        if source.startswith("models:/"):  # a logged pyfunc model (a source of old is the artifact folder itself)
            from jobs.pyfunc import ARTIFACT

            location = self.client.get_logged_model(source.removeprefix("models:/")).artifact_location
            source = f"{location.rstrip('/')}/artifacts/{ARTIFACT}"
        folder = Path(
            self._mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into), tracking_uri=self.uri)
        )
        verify_artifact(folder, digests, where=f"the registry's record of version {version}")
        return folder

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """The model's promotion lock, held in the registry itself so that it works across
        machines: a registered model named `<name>.promotion-lock`, which the tracking store's
        unique name makes a compare-and-set (creating it takes the lock; a second creator is
        refused). Released by deleting it; one older than `LOCK_LEASE_S` (its holder died) is
        taken over."""
        from mlflow.exceptions import MlflowException

        name, holder = f"{self.name}{LOCK_SUFFIX}", f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        deadline, wait = time.monotonic() + LOCK_WAIT_S, 0.05
        while True:
            try:
                self.client.create_registered_model(
                    name, tags={"driftloop.holder": holder}, description=LOCK_DESCRIPTION
                )
                break
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            self._take_over_stale_lock(name)
            if time.monotonic() > deadline:
                raise DriftloopError(f"the promotion lock {name!r} was not free within {LOCK_WAIT_S:.0f}s")
            time.sleep(wait + random.random() * wait)
            wait = min(wait * 2, 1.0)
        try:
            yield
        finally:
            try:
                self.client.delete_registered_model(name)
            except MlflowException as err:  # taken over after its lease: say so, the promotion is done
                log.warning("releasing the promotion lock %s: %s", name, err)

    def _take_over_stale_lock(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            lock = self.client.get_registered_model(name)
        except MlflowException:
            return  # released meanwhile
        age = time.time() - lock.creation_timestamp / 1000
        if age > LOCK_LEASE_S:
            log.warning("taking over the promotion lock %s, held %.0fs by %s", name, age,
                        lock.tags.get("driftloop.holder"))  # fmt: skip
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(name)

    def promote(
        self,
        version: str,
        gate: GateSettings,
        champion_report: Callable[[str], dict[str, Any]] | None = None,
        publish: Callable[[Event], None] | None = None,
        pause: float = 0.0,
    ) -> Verdict:
        """Judge `version` against the current champion and move the aliases if it passes.

        `champion_report(v)` re-evaluates champion `v` on the challenger's holdout (default:
        the champion's own recorded report, which the gate accepts only if its holdout is the
        same). `pause` widens the race window in tests.
        """
        with self._lock():
            challenger = self.report(version)
            champion = self.alias(CHAMPION)
            if champion == version:
                return Verdict(True, (f"version {version} is already the champion",))
            champion_seen = None
            if champion is not None:
                champion_seen = champion_report(champion) if champion_report else self.report(champion)
            time.sleep(pause)
            decision = judge(challenger, champion_seen, gate)
            steps = self.config.delivery.steps
            if decision.promote and steps and champion is not None:  # it proves itself live first
                decision = dataclasses.replace(decision, staged=steps[0])
                self._stage(version, steps[0])
            elif decision.promote:
                self._crown(version, champion)
            if decision.promote and champion_seen is not None:  # what a rollback's probation holds it to
                seen = {k: float(champion_seen[k]) for k in ("accuracy", "f1_macro") if _number(champion_seen.get(k))}
                self.client.set_model_version_tag(self.name, version, PREVIOUS_SEEN_TAG, json.dumps(seen))
            self.client.set_model_version_tag(
                self.name, version, "driftloop.gate", "passed" if decision.promote else "rejected"
            )
            self.client.set_model_version_tag(
                self.name, version, "driftloop.gate_reasons", "; ".join(decision.reasons)[:4900]
            )
        if publish is not None:
            metrics = {k: float(v) for k, v in challenger.items() if _number(v)}
            if decision.staged is not None:
                publish(self._step_event(version, decision.staged, champion, {}))
            elif decision.promote:
                publish(
                    ModelPromoted(
                        model_name=self.name, model_version=version, previous_version=champion, metrics=metrics
                    )
                )
            else:
                publish(ModelRejected(model_name=self.name, model_version=version, reasons=decision.reasons))
        return decision

    def _crown(self, version: str, champion: str | None) -> None:
        """`champion` -> version, `previous` -> the champion it replaces (under the lock)."""
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        if champion is not None:
            self.client.set_registered_model_alias(self.name, PREVIOUS, champion)

    def _stage(self, version: str, step: str) -> None:
        """`challenger` -> version, on `step` (under the lock)."""
        self.client.set_registered_model_alias(self.name, CHALLENGER, version)
        self.client.set_model_version_tag(self.name, version, DELIVERY_TAG, step)
        self.client.set_model_version_tag(self.name, version, DELIVERY_SINCE_TAG, f"{time.time():.3f}")

    def _step_event(self, version: str, step: str, champion: str | None, evidence: dict[str, float]) -> Event:
        fraction = self.config.delivery.canary_fraction if step == "canary" else 0.0
        return DeliveryStep(model_name=self.name, model_version=version, step=step, fraction=fraction,  # type: ignore[arg-type]
                            champion_version=champion, evidence=evidence)  # fmt: skip

    def delivery(self) -> tuple[str, str, float] | None:
        """The challenger on its way to champion, its step (`delivery.steps`) and when the step
        began (wall time), or None."""
        version = self.alias(CHALLENGER)
        if version is None:
            return None
        tags = self.client.get_model_version(self.name, version).tags
        step = tags.get(DELIVERY_TAG)
        try:
            since = float(tags.get(DELIVERY_SINCE_TAG) or "nan")
        except ValueError:
            since = math.nan
        return (version, step, since if math.isfinite(since) else time.time()) if step in ("shadow", "canary") else None

    def advance(
        self, version: str, step: str, evidence: dict[str, float], reason: str,
        publish: Callable[[Event], None] | None = None,
    ) -> str | None:  # fmt: skip
        """The challenger `version` passed its live step: on to `step` (`champion`: it replaces the
        champion, `ModelPromoted`; else `DeliveryStep`). None when `version` is no longer the
        challenger (someone moved it first)."""
        with self._lock():
            if self.alias(CHALLENGER) != version:
                return None
            champion = self.alias(CHAMPION)
            if step == "champion":
                self._crown(version, champion)
                self.client.delete_registered_model_alias(self.name, CHALLENGER)
                self.client.set_model_version_tag(self.name, version, DELIVERY_TAG, f"champion: {reason}"[:5000])
            else:
                self._stage(version, step)
        if publish is not None:
            if step == "champion":
                publish(ModelPromoted(model_name=self.name, model_version=version, previous_version=champion,
                                      metrics=evidence))  # fmt: skip
            else:
                publish(self._step_event(version, step, champion, evidence))
        return step

    def reject_challenger(
        self, version: str, reason: str, evidence: dict[str, float], publish: Callable[[Event], None] | None = None
    ) -> bool:
        """End the delivery of challenger `version` (it lost a live step): `ModelRejected` with the evidence."""
        with self._lock():
            if self.alias(CHALLENGER) != version:
                return False
            self.client.delete_registered_model_alias(self.name, CHALLENGER)
            self.client.set_model_version_tag(self.name, version, DELIVERY_TAG, f"rejected: {reason}"[:5000])
        if publish is not None:
            publish(ModelRejected(model_name=self.name, model_version=version, reasons=(reason,), evidence=evidence))
        return True

    def force_promote(self, version: str, reason: str, publish: Callable[[Event], None] | None = None) -> str | None:
        """Make `version` the champion without the gate (a human's hand promotion; `run --scenario
        bad-model` shows what the monitor's probation does with a bad one). The champion it
        replaces becomes `previous`, and the new one's probation holds it to that one's validation
        report. Returns the replaced champion."""
        with self._lock():
            champion = self.alias(CHAMPION)
            self._crown(version, champion)
            self.client.set_model_version_tag(self.name, version, "driftloop.gate", f"forced: {reason}"[:5000])
        if publish is not None:
            publish(ModelPromoted(model_name=self.name, model_version=version, previous_version=champion))
        return champion

    def rollback(
        self, reason: str = "", publish: Callable[[Event], None] | None = None, only_from: str | None = None
    ) -> tuple[str, str] | None:
        """Point `champion` back at `previous` (and `previous` at the version rolled back from,
        tagged `driftloop.rolled_back` with the reason). With `only_from`: only while that version
        is the champion (None otherwise: someone else moved it first)."""
        with self._lock():
            champion, previous = self.alias(CHAMPION), self.alias(PREVIOUS)
            if only_from is not None and champion != only_from:
                return None
            if champion is None or previous is None:
                raise DriftloopError(f"model {self.name!r} has no previous version to roll back to")
            self.client.set_registered_model_alias(self.name, CHAMPION, previous)
            self.client.set_registered_model_alias(self.name, PREVIOUS, champion)
            self.client.set_model_version_tag(self.name, champion, ROLLED_BACK_TAG, reason[:5000] or "rolled back")
        if publish is not None:
            publish(ModelRolledBack(model_name=self.name, from_version=champion, to_version=previous, reason=reason))
        return champion, previous


@functools.cache
def pip_requirements() -> tuple[str, ...]:
    """The pyfunc model's runtime requirements: the installed versions of what loading it imports."""
    from importlib.metadata import PackageNotFoundError, version

    out: list[str] = []
    for names in _RUNTIME:
        for name in names:
            try:
                installed = version(name)
            except PackageNotFoundError:
                continue
            out.append(f"{name}=={installed.split('+')[0]}")  # 2.13.0+cpu: the local label is no index's
            break
    return tuple(out)


def _example(artifact: Path) -> list[dict[str, Any]] | None:
    """A few raw records the artifact carries (`example.json`), as the pyfunc model's input example."""
    try:
        records = json.loads((artifact / EXAMPLE).read_text())
    except FileNotFoundError:
        return None
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        return None
    return records


def _fits(records: list[dict[str, Any]], signature: ModelSignature) -> bool:
    """Whether the example records fit the signature: MLflow refuses to log a model whose example does
    not, and a retrain must not fail over its example (an int field that the data holds as floats)."""
    import pandas as pd
    from mlflow.models import validate_schema

    try:
        validate_schema(pd.DataFrame(records), signature.inputs)
    except Exception as err:  # MlflowException: a missing column, a type that does not convert
        log.warning("the model's example records do not fit the schema: it is logged without a signature (%s)", err)
        return False
    return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _compact(report: dict[str, Any]) -> dict[str, Any]:
    """The report without bulky fields, to fit a registry tag."""
    return {k: v for k, v in report.items() if k not in ("confusion_matrix",)} | {
        "confusion_matrix": report.get("confusion_matrix", [])[:20]
    }
