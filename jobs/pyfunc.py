"""Every registered version as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/<name>@champion")`
and `mlflow models serve` answer class probabilities for raw records.

This file is logged as a model *from code* (`jobs.registry.ModelRegistry.log_training` passes its
path as `python_model`): MLflow copies the file and runs it when the model loads, so nothing is
cloudpickled. The model's artifacts are the driftloop artifact folder (`ARTIFACT`), loaded through
`jobs.models.load_artifact` (digests checked, weights read by safetensors or XGBoost: nothing
unpickled), and the pipeline config as YAML (`CONFIG`), which says how to compile the raw records.
The `jobs` and `streams` packages travel with the model as its code paths.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

with warnings.catch_warnings():  # mlflow.pyfunc's own modules warn, as they import, about their own type hints
    warnings.filterwarnings("ignore", message=r".*Any type hint is inferred as AnyType", category=UserWarning)
    from mlflow.pyfunc import PythonModel

__all__ = ["ARTIFACT", "CONFIG", "CONFIG_FILE", "DriftloopPyfunc"]

ARTIFACT, CONFIG = "driftloop", "config"  # the keys of the model's artifacts
CONFIG_FILE = "pipeline.yaml"


class DriftloopPyfunc(PythonModel):
    """Raw records (a DataFrame, one column per feature) -> class probabilities (one column per class)."""

    def load_context(self, context: Any) -> None:
        from jobs.features import FeaturePipeline
        from jobs.models import load_artifact
        from streams.config import parse_config

        config_path = Path(context.artifacts[CONFIG])
        config = parse_config(config_path.read_text(encoding="utf-8"), source=str(config_path), env={})
        spec, model, features_json = load_artifact(Path(context.artifacts[ARTIFACT]))
        self.features = FeaturePipeline.from_json(features_json, config.schema, config.features)
        self.model = model
        self.columns = [str(c) for c in spec.classes]

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)  # a model logged without a signature may be handed a list of records
        if len(frame) == 0:
            return pd.DataFrame({c: pd.Series(dtype="float64") for c in self.columns})
        x = self.features.transform_records(frame.to_dict("records"))
        return pd.DataFrame(self.model.predict_proba(x), columns=self.columns)


mlflow.models.set_model(DriftloopPyfunc())
