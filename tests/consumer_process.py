"""A consumer in its own process, for crash tests: it logs every record it has handled.

Usage: python -m tests.consumer_process BOOTSTRAP NAMESPACE GROUP OUT_FILE [BATCH_SLEEP_S]

Each handled record becomes a line `partition offset record_id` in OUT_FILE, written and
fsynced *before* the handler returns, i.e. before the consumer may commit its offsets.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

from streams.kafka import Batch, StreamConsumer
from streams.serde import RecordCodec
from streams.topics import Topics
from tests.conftest import DEMO


def main() -> int:
    bootstrap, namespace, group, out_file = sys.argv[1:5]
    pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    from streams.config import load_config

    config = load_config(DEMO, env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap})
    consumer_settings = dataclasses.replace(config.kafka.consumer, max_poll_records=200)
    kafka = dataclasses.replace(config.kafka, consumer=consumer_settings)
    topics = Topics(namespace)
    codec = RecordCodec(config.schema)
    out = open(out_file, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process

    def handle(batch: Batch) -> None:
        lines = [
            f"{chunk.partition} {record.offset} {value.record_id}\n"
            for chunk in batch.chunks
            for record, value in zip(chunk.records, chunk.values, strict=True)
        ]
        out.write("".join(lines))
        out.flush()
        os.fsync(out.fileno())
        time.sleep(pause)

    consumer = StreamConsumer(kafka, [topics.records], codec.decode_batch, handle, group_id=group, dlq_topic=topics.dlq)
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    print("ready", flush=True)
    stats = consumer.run(idle_timeout_s=8)
    print(f"done polled={stats.polled} processed={stats.processed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
