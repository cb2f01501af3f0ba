"""The retraining job: ingest up to now, tune and train on recent data, register, gate.

A Ray job entrypoint (the controller submits it; `ray job submit -- python -m jobs.retrain
--config configs/demo.yaml` works too). The config comes from `--config` or, as the
controller sends it, from `DRIFTLOOP_CONFIG_YAML`. Training uses the newest
`retrain.train_rows` rows from the records topic's offsets where the drift began (`--from-offsets`,
what the monitor's request carries) or, given only a time, from `--since`; so a model retrained
after drift learns the world as it is now, whatever the records' event times say. When that
holds fewer than `retrain.min_window` rows, it trains on the newest rows of all. The gate
compares it with the champion on the same recent holdout. The last line printed is
`DRIFTLOOP_RESULT {json}`: what the controller reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.controller import CAUSE_ENV, CONFIG_ENV, RESULT_MARK
from streams.config import PipelineConfig, load_config, parse_config
from streams.errors import DriftloopError
from streams.progress import enabled

if TYPE_CHECKING:
    from streams.datasets import DatasetStore, Window

__all__ = ["main"]


def _config(path: Path | None) -> PipelineConfig:
    if path is not None:
        return load_config(path)
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise SystemExit(f"give --config PATH (or set {CONFIG_ENV}, as the controller does)")
    return parse_config(text, source=f"${CONFIG_ENV}")


def _offsets(text: str) -> dict[int, int]:
    pairs = [part.split(":") for part in text.split(",")]
    if not all(len(p) == 2 and p[0].isdigit() and p[1].isdigit() for p in pairs):
        raise ValueError(text)
    return {int(p): int(o) for p, o in pairs}


def _window(
    store: DatasetStore, config: PipelineConfig, rows: int, since: datetime | None, records_from: dict[int, int] | None
) -> tuple[Window, dict[str, Any]]:
    """The drifted data (from the request's offsets, or its time), newest `rows`; when that holds
    fewer than `retrain.min_window` rows, the newest `rows` of all (and it says so). Also what was
    chosen, for the job's result."""
    from streams.events import OffsetRange
    from streams.topics import Topics

    topic = Topics.of(config).records
    ranges = [OffsetRange(topic=topic, partition=p, start=o, end=o) for p, o in sorted((records_from or {}).items())]
    window = store.window(since=since, last_rows=rows, records_from=ranges or None)
    chosen: dict[str, Any] = {"from_offsets": records_from, "since": since.isoformat() if since else None}
    if records_from or since is not None:
        found = store.rows_in(window, config.schema.event_time) if window.manifests else 0
        where = f"offsets {','.join(f'{p}:{o}' for p, o in sorted(records_from.items()))}" if records_from else (
            f"event time {since.isoformat() if since else ''}")  # fmt: skip
        chosen["rows_since_drift"] = found
        if found >= config.retrain.min_window:
            print(f"[data] {found} rows since the drift began ({where}); training on the newest {rows} of them")
            return window, chosen | {"selected_by": "offsets" if records_from else "event time"}
        print(f"[data] only {found} rows since the drift began ({where}, fewer than retrain.min_window "
              f"{config.retrain.min_window}): training on the newest {rows} rows of all")  # fmt: skip
        window = store.window(last_rows=rows)
    print(f"[data] {len(window.manifests)} dataset versions, training on the newest {rows} rows")
    return window, chosen | {"selected_by": "newest rows"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="job directory (default: runs/retrain-<time>)")
    parser.add_argument("--trigger-event-id", default=None, help="the RetrainRequested event this job answers")
    parser.add_argument("--since", default=None, help="train on rows from this ISO time on (and the newest rows)")
    parser.add_argument(
        "--from-offsets", default=None, metavar="P:OFFSET,...", help="train on the records from these offsets on"
    )
    parser.add_argument("--drift-event-id", default=None, help="the DriftDetected event behind the request")
    parser.add_argument("--rows", type=int, default=None, help="newest rows to train on (default retrain.train_rows)")
    args = parser.parse_args(argv)
    try:
        since = datetime.fromisoformat(args.since) if args.since else None
    except ValueError:
        parser.error(f"--since must be an ISO 8601 time, not {args.since!r}")
    try:
        records_from = _offsets(args.from_offsets) if args.from_offsets else None
    except ValueError:
        parser.error(f"--from-offsets must be PARTITION:OFFSET[,PARTITION:OFFSET...], not {args.from_offsets!r}")
    config = _config(args.config)
    rows = args.rows or config.retrain.train_rows
    if rows < 1:
        parser.error("--rows must be >= 1")

    if not enabled():  # a terminal's progress bars; job logs get stage lines (set before Ray Data is imported)
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from jobs.registry import ModelRegistry, tracking_uri
    from jobs.train import join_ray
    from jobs.tune import tune_train_and_gate
    from streams.datasets import DatasetStore
    from streams.ingest import ingest

    started = time.monotonic()
    join_ray(config)

    out = (args.out or Path("runs") / f"retrain-{int(time.time())}").resolve()
    try:
        store = DatasetStore(config.datasets.root, config.name)
        joined = time.monotonic()
        ingested = ingest(config, store)
        ingest_s = time.monotonic() - joined
        if ingested.manifest is not None:
            m = ingested.manifest
            print(f"[ingest] version {m.version_id}: {m.rows} rows ({'new' if ingested.created else 'existing'})")
        window, chosen = _window(store, config, rows, since, records_from)
        if not window.manifests:
            print(f"no data to train on in {config.datasets.root}/{config.name}", file=sys.stderr)
            return 1
        registry = ModelRegistry(config, tracking_uri(config, out), artifact_root=out / "mlartifacts")
        summary = tune_train_and_gate(config, window, out, store, registry, args.trigger_event_id)
        for key, value in (("drift_event_id", args.drift_event_id), ("retrain_cause", os.environ.get(CAUSE_ENV))):
            if value:
                registry.client.set_model_version_tag(config.name, summary["version"], f"driftloop.{key}", value)
    except DriftloopError as err:
        print(f"retrain failed: {err}", file=sys.stderr)
        return 1
    summary["data"] = chosen
    # Where the job's time went: Ray and imports before the first stage, then each stage.
    summary["stages_s"] = {"start": round(joined - started, 2), "ingest": round(ingest_s, 2), **summary["stages_s"]}
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["trigger_event_id"] = args.trigger_event_id
    print(RESULT_MARK + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
