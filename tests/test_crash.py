"""A consumer killed with SIGKILL mid-stream loses nothing and never commits past unprocessed work."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from streams.config import PipelineConfig
from streams.generator import StreamGenerator
from streams.kafka import Producer
from streams.serde import RecordCodec
from streams.topics import Topics
from tests.conftest import ROOT
from tests.test_kafka import committed

pytestmark = pytest.mark.integration
RECORDS = 6000
BATCH = 200  # max_poll_records in tests/consumer_process.py


def start_consumer(config: PipelineConfig, group: str, out: Path, pause: float) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.consumer_process",
            config.kafka.bootstrap_servers,
            config.name,
            group,
            str(out),
            str(pause),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def handled(out: Path) -> list[tuple[int, int]]:
    lines = out.read_text().splitlines() if out.exists() else []
    return [(int(p), int(o)) for p, o, _ in (line.split() for line in lines)]


def publish(config: PipelineConfig, topics: Topics) -> None:
    codec = RecordCodec(config.schema)
    with Producer(config.kafka) as producer:
        for row in StreamGenerator(config, seed=2).records(RECORDS):
            producer.send(topics.records, codec.encode(row.record), key=str(row.record["customer_id"]))


def test_sigkill_mid_stream_then_restart_processes_everything_at_least_once(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    publish(config, topics)
    group, out = f"{config.name}.crash", tmp_path / "handled.txt"

    victim = start_consumer(config, group, out, pause=0.05)
    deadline = time.monotonic() + 60
    while len(handled(out)) < RECORDS // 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stdout.close()  # type: ignore[union-attr]
    assert victim.returncode == -signal.SIGKILL
    before_restart = handled(out)
    assert RECORDS // 3 <= len(before_restart) < RECORDS, "the kill did not land mid-stream"

    # Never committed past an unprocessed record: everything below each committed offset was handled.
    offsets = committed(config, topics.records, group)
    done = set(before_restart)
    for partition, offset in offsets.items():
        missing = [o for o in range(offset or 0) if (partition, o) not in done]
        assert not missing, f"partition {partition} committed to {offset} but never handled {missing[:5]}"

    survivor = start_consumer(config, group, out, pause=0.0)
    assert survivor.wait(timeout=120) == 0
    survivor.stdout.close()  # type: ignore[union-attr]
    counts = Counter(handled(out))
    per_partition = Counter(p for p, _ in counts)
    assert sum(per_partition.values()) == RECORDS, "some record was never handled"
    duplicates = sum(n - 1 for n in counts.values())
    print(f"\nSIGKILL after {len(before_restart)} handled records: {duplicates} handled twice (bound: {BATCH})")
    # Only the batch handled after the last commit is redone: at most one poll's worth of records.
    assert duplicates <= BATCH
    final = committed(config, topics.records, group)
    assert sum(o or 0 for o in final.values()) == RECORDS


def test_sigterm_finishes_the_batch_commits_and_exits_cleanly(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    publish(config, topics)
    group, out = f"{config.name}.term", tmp_path / "handled.txt"
    process = start_consumer(config, group, out, pause=0.05)
    while len(handled(out)) < RECORDS // 4:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    process.stdout.close()  # type: ignore[union-attr]
    done = handled(out)
    assert len(done) < RECORDS, "it stopped early, not at the end of the stream"
    assert len(done) == len(set(done))
    offsets = committed(config, topics.records, group)
    assert sum(o or 0 for o in offsets.values()) == len(done), "graceful stop commits exactly what it handled"
