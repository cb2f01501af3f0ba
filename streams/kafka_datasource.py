"""A Ray Data datasource for exact Kafka offset ranges, built on `streams.kafka_source.read_range`.

`KafkaRangeDatasource` splits ranges into read tasks of at most `max_records_per_task`
records and serves them to `ray.data.read_datasource`. (Also importable from
`streams.kafka_source`; it is a module of its own so that reading ranges does not import Ray Data.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from streams.config import KafkaSettings, RecordSchema
from streams.events import OffsetRange
from streams.kafka_source import arrow_schema, read_range, split_ranges

__all__ = ["KafkaRangeDatasource"]


class KafkaRangeDatasource(Datasource):
    """A Ray Data datasource for exact Kafka offset ranges (use with `ray.data.read_datasource`).

    Each read task reads one piece of at most `max_records_per_task` offsets with
    `read_range`, so it either yields every valid record of its piece or fails naming the
    partition and the offsets. Invalid records go to `dlq_topic`.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        ranges: Sequence[OffsetRange],
        schema: RecordSchema,
        *,
        dlq_topic: str | None,
        max_records_per_task: int = 250_000,
        timeout_s: float = 30.0,
    ) -> None:
        self.kafka = kafka
        self.ranges = [r for r in ranges if r.count > 0]
        self.schema = schema
        self.dlq_topic = dlq_topic
        self.max_records_per_task = max_records_per_task
        self.timeout_s = timeout_s

    def get_name(self) -> str:
        return "KafkaRanges"

    def estimate_inmemory_data_size(self) -> int:
        return sum(r.count for r in self.ranges) * 256

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[Any]:
        total = sum(r.count for r in self.ranges)
        size = max(1, min(self.max_records_per_task, -(-total // max(parallelism, 1))))
        arrow = arrow_schema(self.schema)
        kafka, schema, dlq, timeout = self.kafka, self.schema, self.dlq_topic, self.timeout_s
        tasks = []
        for piece in split_ranges(self.ranges, size):

            def read(piece: OffsetRange = piece) -> list[pa.Table]:
                return [read_range(kafka, piece, schema, dlq_topic=dlq, timeout_s=timeout).table]

            metadata = BlockMetadata(num_rows=None, size_bytes=piece.count * 256, exec_stats=None, input_files=None)
            tasks.append(ReadTask(read, metadata, schema=arrow, per_task_row_limit=per_task_row_limit))
        return tasks
