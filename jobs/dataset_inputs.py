"""Lineage into MLflow: a dataset version becomes a run's dataset input, naming its Kafka ranges.

The input's source is `KafkaRangesSource` (type `kafka`): the topic-partition offset ranges the
version was ingested from, its dataset store location and version id; its digest is the
manifest's content digest. From a run, `driftloop lineage` can then walk back to the offsets.
"""

from __future__ import annotations

from typing import Any

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset

from streams.datasets import Manifest

__all__ = ["KafkaRangesSource", "log_dataset_version"]


class KafkaRangesSource(DatasetSource):
    """A dataset source made of exact Kafka offset ranges (load it through the dataset store)."""

    def __init__(self, uri: str, ranges: list[dict[str, Any]], version_id: str) -> None:
        self.uri = uri
        self.ranges = ranges
        self.version_id = version_id

    @staticmethod
    def _get_source_type() -> str:
        return "kafka"

    def load(self, **kwargs: Any) -> Any:
        raise NotImplementedError("load a dataset version through streams.datasets.DatasetStore")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return isinstance(raw_source, str) and raw_source.startswith("kafka://")

    @classmethod
    def _resolve(cls, raw_source: Any) -> KafkaRangesSource:
        return cls(raw_source, [], "")

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "ranges": self.ranges, "version_id": self.version_id}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> KafkaRangesSource:
        return cls(source_dict["uri"], list(source_dict.get("ranges", [])), source_dict.get("version_id", ""))


def dataset_of(manifest: Manifest) -> MetaDataset:
    ranges = [{"topic": r.topic, "partition": r.partition, "start": r.start, "end": r.end} for r in manifest.ranges]
    source = KafkaRangesSource(manifest.source_uri(), ranges, manifest.version_id)
    return MetaDataset(source, name=f"{manifest.pipeline}@{manifest.version_id}", digest=manifest.digest)  # type: ignore[abstract]


def log_dataset_version(manifest: Manifest, context: str = "training") -> None:
    """Log a dataset version as an input of the active MLflow run."""
    import mlflow

    mlflow.log_input(dataset_of(manifest), context=context)
