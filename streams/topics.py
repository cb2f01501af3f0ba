"""Topic names: one namespace per pipeline, `<pipeline>.<topic>` (docs/design.md, "Topics and
events"), unless the config's `topics` names one (a topic that exists already)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.config import PipelineConfig

__all__ = ["TOPICS", "Topics"]

TOPICS = ("records", "predictions", "labels", "drift", "retrain", "models", "dlq", "heartbeats", "state")


@dataclass(frozen=True)
class Topics:
    """The topics of one pipeline namespace; tests give each test its own namespace."""

    namespace: str
    named: tuple[tuple[str, str], ...] = ()  # (kind, name): the topics a config names

    @classmethod
    def of(cls, config: PipelineConfig) -> Topics:
        """The topics of a pipeline: its `topics` settings, else `<name>.<kind>`."""
        return cls(config.name, tuple(sorted(config.topics.named().items())))

    def name(self, topic: str) -> str:
        if topic not in TOPICS:
            raise ValueError(f"unknown topic {topic!r}; known: {', '.join(TOPICS)}")
        for kind, name in self.named:
            if kind == topic:
                return name
        return f"{self.namespace}.{topic}"

    def all(self) -> tuple[str, ...]:
        return tuple(self.name(t) for t in TOPICS)

    @property
    def records(self) -> str:
        return self.name("records")

    @property
    def predictions(self) -> str:
        return self.name("predictions")

    @property
    def labels(self) -> str:
        return self.name("labels")

    @property
    def drift(self) -> str:
        return self.name("drift")

    @property
    def retrain(self) -> str:
        return self.name("retrain")

    @property
    def models(self) -> str:
        return self.name("models")

    @property
    def dlq(self) -> str:
        return self.name("dlq")

    @property
    def heartbeats(self) -> str:
        return self.name("heartbeats")

    @property
    def state(self) -> str:
        return self.name("state")
