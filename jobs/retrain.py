"""The retraining job: ingest up to now, tune and train on recent data, register, gate.

A Ray job entrypoint (the controller submits it; `ray job submit -- python -m jobs.retrain
--config configs/demo.yaml` works too). The config comes from `--config` or, as the
controller sends it, from `DRIFTLOOP_CONFIG_YAML`. Training uses the newest
`retrain.train_rows` rows (from `--since` on, when given), so a model retrained after drift
learns the world as it is now; the gate compares it with the champion on the same recent
holdout. The last line printed is `DRIFTLOOP_RESULT {json}`: what the controller reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from jobs.controller import CAUSE_ENV, CONFIG_ENV, RESULT_MARK
from streams.config import PipelineConfig, load_config, parse_config
from streams.errors import DriftloopError
from streams.progress import enabled

__all__ = ["main"]


def _config(path: Path | None) -> PipelineConfig:
    if path is not None:
        return load_config(path)
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise SystemExit(f"give --config PATH (or set {CONFIG_ENV}, as the controller does)")
    return parse_config(text, source=f"${CONFIG_ENV}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="job directory (default: runs/retrain-<time>)")
    parser.add_argument("--trigger-event-id", default=None, help="the RetrainRequested event this job answers")
    parser.add_argument("--since", default=None, help="train on rows from this ISO time on (and the newest rows)")
    parser.add_argument("--drift-event-id", default=None, help="the DriftDetected event behind the request")
    parser.add_argument("--rows", type=int, default=None, help="newest rows to train on (default retrain.train_rows)")
    args = parser.parse_args(argv)
    try:
        since = datetime.fromisoformat(args.since) if args.since else None
    except ValueError:
        parser.error(f"--since must be an ISO 8601 time, not {args.since!r}")
    config = _config(args.config)
    rows = args.rows or config.retrain.train_rows
    if rows < 1:
        parser.error("--rows must be >= 1")

    import ray.data

    from jobs.registry import ModelRegistry, tracking_uri
    from jobs.train import join_ray
    from jobs.tune import tune_train_and_gate
    from streams.datasets import DatasetStore
    from streams.ingest import ingest

    started = time.monotonic()
    join_ray(config)

    ray.data.DataContext.get_current().enable_progress_bars = enabled()  # a terminal's; job logs get stage lines
    out = (args.out or Path("runs") / f"retrain-{int(time.time())}").resolve()
    try:
        store = DatasetStore(config.datasets.root, config.name)
        ingested = ingest(config, store)
        if ingested.manifest is not None:
            m = ingested.manifest
            print(f"[ingest] version {m.version_id}: {m.rows} rows ({'new' if ingested.created else 'existing'})")
        window = store.window(since=since, last_rows=rows)
        if not window.manifests:
            print(f"no data to train on in {config.datasets.root}/{config.name}", file=sys.stderr)
            return 1
        print(f"[data] {len(window.manifests)} dataset versions, training on the newest {rows} rows")
        registry = ModelRegistry(config, tracking_uri(config, out), artifact_root=out / "mlartifacts",
                                 lock_dir=out.parent / "locks")  # fmt: skip
        summary = tune_train_and_gate(config, window, out, store, registry, args.trigger_event_id)
        for key, value in (("drift_event_id", args.drift_event_id), ("retrain_cause", os.environ.get(CAUSE_ENV))):
            if value:
                registry.client.set_model_version_tag(config.name, summary["version"], f"driftloop.{key}", value)
    except DriftloopError as err:
        print(f"retrain failed: {err}", file=sys.stderr)
        return 1
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["trigger_event_id"] = args.trigger_event_id
    print(RESULT_MARK + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
