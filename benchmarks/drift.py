"""Drift detection: our `streams.drift.compare` against Evidently's `DataDriftPreset`, on the same windows.

Throughput: 20 features (the demo generator's 7 plus 13 noisy copies: 14 numeric, 6 categorical),
windows of 10,000 records against a reference of 10,000. Ours: `compare(reference, columns)` with
the `Reference` built once beforehand. Evidently: `Report([DataDriftPreset()]).run(window,
reference)` plus reading its result, with both `Dataset`s' definitions given and the reference
`Dataset` built once beforehand; its run includes the per-column widgets the preset renders (it
has no switch to skip them). Rounds alternate ours/peer and the median round is reported; within a
round ours runs each window several times (milliseconds each, so load spikes average out) and
Evidently once (seconds each).
ratio = ours / Evidently records per second.

Detection: for each generator scenario (covariate, concept, prior, and none), windows of 1,000
over the 7 features against the stream's first 5,000 records, the change falling mid-window. A
window is truly drifted when it holds a drifted record (so concept drift, which leaves P(x)
alone, is a miss for both by design). Ours flags a window when any feature drifts by its rule
(adjusted p < alpha and PSI >= the floor); Evidently when any column drifts by its default
per-column tests (the preset's dataset-level rule, half the columns, is reported beside it).
Per tool: delay (records after the change until the end of the first flagged window), false
alarms per 100 clean windows, and for windows where the tools disagree, which one was right.

Evidently needs pandas < 3, which the project's lock does not allow, so it runs in its own
virtual environment (runs/peer-venv, made on first use: a one-time setup of a minute or two)
as a subprocess fed the same windows through Parquet files; only its drift computation is timed.

    python benchmarks/drift.py --quick --json runs/bench/drift.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from streams.drift import Kind
    from streams.generator import Scenario

# Our packages are imported inside the functions that use them: the peer worker runs this same
# file in Evidently's virtual environment, which has none of our dependencies beyond numpy.

PEER_VENV = ROOT / "runs" / "peer-venv"
PEER_REQUIREMENTS = ["evidently==0.7.23", "pandas>=2.2,<3", "pyarrow>=17"]
QUIET_ENV = {"DO_NOT_TRACK": "1", "EVIDENTLY_DISABLE_TELEMETRY": "1", "PYTHONWARNINGS": "ignore"}
SCENARIOS = ("covariate", "concept", "prior", "none")
THROUGHPUT_WINDOW = 10_000
DETECT_WINDOW = 1000
DETECT_REFERENCE = 5000


# --- the data both tools see ---------------------------------------------------------------------


def twenty_features(records: list[dict[str, Any]], kinds: dict[str, Kind], seed: int) -> dict[str, np.ndarray]:
    """The 7 generated features plus 13 noisy copies: 10 numeric, 3 categorical (10% of values redrawn)."""
    rng = np.random.default_rng(seed)
    columns = base_columns(records, kinds)
    numeric = [n for n, k in kinds.items() if k == "numeric"]
    categorical = [n for n, k in kinds.items() if k == "categorical"]
    for k in range(10):
        base = columns[numeric[k % len(numeric)]]
        columns[f"{numeric[k % len(numeric)]}_copy{k}"] = base * (1 + 0.05 * k) + rng.normal(
            0, 0.1 * base.std(), len(base)
        )
    for k, name in enumerate(categorical):
        values = columns[name].copy()
        redraw = rng.random(len(values)) < 0.1
        values[redraw] = rng.choice(np.unique(values), int(redraw.sum()))
        columns[f"{name}_copy{k}"] = values
    return columns


def base_columns(records: list[dict[str, Any]], kinds: dict[str, Kind]) -> dict[str, np.ndarray]:
    return {
        name: np.array([r[name] for r in records], dtype=np.float64)
        if kind == "numeric"
        else np.array([str(r[name]) for r in records], dtype=object)
        for name, kind in kinds.items()
    }


def column_kinds(columns: dict[str, np.ndarray]) -> dict[str, Kind]:
    return {name: "numeric" if values.dtype == np.float64 else "categorical" for name, values in columns.items()}


def write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({n: pa.array(v.tolist() if v.dtype == object else v) for n, v in columns.items()}), path)


def window_slice(columns: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: values[start:stop] for name, values in columns.items()}


# --- ours ----------------------------------------------------------------------------------------


def ours_compare(reference: Any, windows: list[dict[str, np.ndarray]]) -> tuple[list[float], list[bool]]:
    """Seconds per window and whether it was flagged."""
    from streams.drift import compare

    seconds, flags = [], []
    for window in windows:
        started = time.perf_counter()
        report = compare(reference, window)
        seconds.append(time.perf_counter() - started)
        flags.append(report.drifted)
    return seconds, flags


# --- the peer: Evidently in its own venv, driven over stdin/stdout --------------------------------


def peer_python(venv: Path) -> Path:
    """The peer venv's interpreter, after making the venv if it is not there yet (one-time setup)."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import evidently, pandas, pyarrow; assert pandas.__version__ < '3'"]
    if python.exists() and subprocess.run(check, capture_output=True, env={**os.environ, **QUIET_ENV}).returncode == 0:
        return python
    print(f"one-time setup: creating {venv} with {' '.join(PEER_REQUIREMENTS)} (a minute or two)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PEER_REQUIREMENTS]
    subprocess.run(pip, check=True)
    subprocess.run(check, check=True, env={**os.environ, **QUIET_ENV})
    return python


class Peer:
    """An Evidently worker process; each request names a Parquet file, the reference rows and the windows."""

    def __init__(self, python: Path) -> None:
        self.process = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--peer-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **QUIET_ENV},
        )
        self.version = self.request({"op": "version"})["evidently"]

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the Evidently worker exited ({self.process.wait()}) on {message['op']}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"the Evidently worker failed: {answer['error']}")
        return answer

    def drift(
        self, path: Path, kinds: dict[str, Kind], reference: tuple[int, int], windows: list[tuple[int, int]]
    ) -> dict[str, Any]:
        return self.request(
            {"op": "drift", "path": str(path), "kinds": kinds, "reference": reference, "windows": windows}
        )

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def peer_worker() -> int:
    """Runs in the peer venv: answers one JSON request per line of stdin with one JSON line."""
    import evidently
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    frames: dict[str, Any] = {}
    references: dict[tuple[str, int, int], Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "version":
                answer: dict[str, Any] = {"evidently": evidently.__version__}
            else:
                path, kinds = request["path"], request["kinds"]
                if path not in frames:
                    frames[path] = pd.read_parquet(path)
                frame = frames[path]
                definition = DataDefinition(
                    numerical_columns=[n for n, k in kinds.items() if k == "numeric"],
                    categorical_columns=[n for n, k in kinds.items() if k == "categorical"],
                )
                start, stop = request["reference"]
                key = (path, start, stop)
                if key not in references:
                    references[key] = Dataset.from_pandas(frame.iloc[start:stop], data_definition=definition)
                seconds, flags, dataset_flags = [], [], []
                for start, stop in request["windows"]:
                    window = frame.iloc[start:stop]
                    began = time.perf_counter()
                    current = Dataset.from_pandas(window, data_definition=definition)
                    result = Report([DataDriftPreset()]).run(current, references[key]).dict()
                    seconds.append(time.perf_counter() - began)
                    counted = next(m for m in result["metrics"] if m["metric_name"].startswith("DriftedColumnsCount"))
                    flags.append(counted["value"]["count"] > 0)
                    dataset_flags.append(counted["value"]["share"] >= counted["config"]["drift_share"])
                answer = {"seconds": seconds, "flags": flags, "dataset_flags": dataset_flags}
        except Exception as err:  # reported to the parent, which stops
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), flush=True)
    return 0


# --- the two parts -------------------------------------------------------------------------------


def throughput(peer: Peer, work: Path, windows: int, rounds: int, repeats: int) -> dict[str, Any]:
    from streams.config import load_config
    from streams.drift import Reference
    from streams.generator import StreamGenerator

    config = load_config(ROOT / "configs" / "demo.yaml", env={})
    kinds: dict[str, Kind] = {
        f.name: "numeric" if f.type in ("int", "float") else "categorical" for f in config.schema.features
    }
    total = THROUGHPUT_WINDOW * (1 + windows)
    drift_at = THROUGHPUT_WINDOW * (1 + windows // 2)  # the later half of the windows has drifted
    generator = StreamGenerator(config, seed=1, scenario="covariate", drift_at=drift_at)
    columns = twenty_features([r.record for r in generator.records(total)], kinds, seed=1)
    frame_kinds = column_kinds(columns)
    path = work / "throughput.parquet"
    write_parquet(path, columns)
    reference = Reference.from_columns(
        window_slice(columns, 0, THROUGHPUT_WINDOW),
        frame_kinds,
        sample_size=THROUGHPUT_WINDOW,
    )
    ranges = [(THROUGHPUT_WINDOW * i, THROUGHPUT_WINDOW * (i + 1)) for i in range(1, windows + 1)]
    window_columns = [window_slice(columns, a, b) for a, b in ranges]

    ours_compare(reference, window_columns[:1])  # warm-up, both sides
    peer.drift(path, frame_kinds, (0, THROUGHPUT_WINDOW), ranges[:1])
    runs: dict[str, list[float]] = {"ours": [], "peer": []}
    flags: dict[str, list[bool]] = {}
    for i in range(rounds):
        seconds = []
        for _ in range(repeats):  # ours takes milliseconds a window: repeated, so load spikes average out
            took, flags["ours"] = ours_compare(reference, window_columns)
            seconds += took
        runs["ours"].append(THROUGHPUT_WINDOW * len(seconds) / sum(seconds))
        answer = peer.drift(path, frame_kinds, (0, THROUGHPUT_WINDOW), ranges)
        flags["peer"] = answer["flags"]
        runs["peer"].append(THROUGHPUT_WINDOW * windows / sum(answer["seconds"]))
        print(f"round {i + 1}/{rounds}: ours {runs['ours'][-1]:,.0f}/s peer {runs['peer'][-1]:,.0f}/s", file=sys.stderr)
    ours, peer_rate = statistics.median(runs["ours"]), statistics.median(runs["peer"])
    truth = [b > drift_at for _, b in ranges]
    return {
        "ours": round(ours),
        "peer": round(peer_rate),
        "ratio": round(ours / peer_rate, 2),
        "unit": "records/s",
        "ms_per_window": {
            "ours": round(1000 * THROUGHPUT_WINDOW / ours, 1),
            "peer": round(1000 * THROUGHPUT_WINDOW / peer_rate),
        },
        "runs": {k: [round(v) for v in vs] for k, vs in runs.items()},
        "windows_flagged": {"truth": sum(truth), "ours": sum(flags["ours"]), "peer": sum(flags["peer"])},
        "features": {
            "numeric": list(frame_kinds.values()).count("numeric"),
            "categorical": list(frame_kinds.values()).count("categorical"),
        },
    }


def detection(peer: Peer, work: Path, before: int, after: int) -> dict[str, Any]:
    from streams.config import load_config
    from streams.drift import Reference
    from streams.generator import StreamGenerator

    config = load_config(ROOT / "configs" / "demo.yaml", env={})
    kinds: dict[str, Kind] = {
        f.name: "numeric" if f.type in ("int", "float") else "categorical" for f in config.schema.features
    }
    windows = before + after
    drift_at = DETECT_REFERENCE + before * DETECT_WINDOW + DETECT_WINDOW // 2  # mid-window
    ranges = [
        (DETECT_REFERENCE + i * DETECT_WINDOW, DETECT_REFERENCE + (i + 1) * DETECT_WINDOW) for i in range(windows)
    ]
    out: dict[str, Any] = {}
    totals = {"clean": 0, "ours": 0, "peer": 0}
    for number, scenario in enumerate(SCENARIOS):
        generator = StreamGenerator(
            config,
            seed=100 + number,
            scenario=cast("Scenario", "covariate" if scenario == "none" else scenario),
            drift_at=None if scenario == "none" else drift_at,
        )
        rows = list(generator.records(ranges[-1][1]))
        truth = [any(r.drifted for r in rows[a:b]) for a, b in ranges]
        columns = base_columns([r.record for r in rows], kinds)
        path = work / f"detect-{scenario}.parquet"
        write_parquet(path, columns)
        reference = Reference.from_columns(window_slice(columns, 0, DETECT_REFERENCE), kinds)
        _, ours = ours_compare(reference, [window_slice(columns, a, b) for a, b in ranges])
        answer = peer.drift(path, kinds, (0, DETECT_REFERENCE), ranges)
        flags = {"ours": ours, "peer": answer["flags"]}
        clean = truth.count(False)
        summary: dict[str, Any] = {
            "windows": windows,
            "clean_windows": clean,
            "drift_at": None if scenario == "none" else drift_at,
        }
        for tool, flagged in flags.items():
            false_alarms = sum(f and not t for f, t in zip(flagged, truth, strict=True))
            first = next((b for (_, b), f, t in zip(ranges, flagged, truth, strict=True) if f and t), None)
            summary[tool] = {
                "delay_records": None if first is None or scenario == "none" else first - drift_at,
                "false_alarms_per_100": round(100 * false_alarms / clean, 1) if clean else None,
                "missed_windows": sum(t and not f for f, t in zip(flagged, truth, strict=True)),
            }
            totals[tool] += false_alarms
        summary["peer"]["dataset_rule_flagged"] = sum(answer["dataset_flags"])
        disagree = [i for i in range(windows) if flags["ours"][i] != flags["peer"][i]]
        summary["disagreements"] = {
            "windows": len(disagree),
            "ours_right": sum(flags["ours"][i] == truth[i] for i in disagree),
            "peer_right": sum(flags["peer"][i] == truth[i] for i in disagree),
        }
        totals["clean"] += clean
        out[scenario] = summary
        print(f"{scenario}: {json.dumps(summary)}", file=sys.stderr)
    out["false_alarms_per_100_clean_windows"] = {
        tool: round(100 * totals[tool] / totals["clean"], 1) for tool in ("ours", "peer")
    } | {"clean_windows": totals["clean"]}
    return out


def main() -> int:
    if sys.argv[1:] == ["--peer-worker"]:
        return peer_worker()
    parser = common.parser(__doc__)
    parser.add_argument("--peer-venv", type=Path, default=PEER_VENV, help="Evidently's venv (made if missing)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 1 quick, 3 full)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    windows = 2 if args.quick else 4
    repeats = 5 if args.quick else 10
    before, after = (4, 6) if args.quick else (20, 30)

    python = peer_python(args.peer_venv)
    peer = Peer(python)
    try:
        with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
            speed = throughput(peer, Path(tmp), windows, rounds, repeats)
            found = detection(peer, Path(tmp), before, after)
    finally:
        peer.close()

    from streams.drift import PSI_THRESHOLD

    result = {
        "benchmark": "drift",
        "ours": speed["ours"],
        "peer": speed["peer"],
        "ratio": speed["ratio"],
        "unit": "records/s",
        "conditions": {
            "what": "ours: streams.drift.compare (KS/chi2 + BH, PSI, JS, Wasserstein); "
            f"peer: evidently {peer.version} DataDriftPreset (Report.run + .dict(), widgets included)",
            "throughput": f"{speed['features']['numeric']} numeric + {speed['features']['categorical']} categorical "
            f"features, windows of {THROUGHPUT_WINDOW} vs a reference of {THROUGHPUT_WINDOW}, "
            f"{windows} windows per round (ours: each {repeats} times), {rounds} round(s), median round",
            "detection": f"7 features, windows of {DETECT_WINDOW} vs a reference of {DETECT_REFERENCE}, "
            f"{before} windows before the change and {after} from it (the change mid-window)",
            "ours_rule": f"any feature with BH-adjusted p < 0.01 and PSI >= {PSI_THRESHOLD}",
            "peer_rule": "any column drifted by the preset's per-column defaults (DriftedColumnsCount > 0)",
            "python": platform.python_version(),
            "machine": common.machine(),
        },
        "throughput": speed,
        "detection": found,
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
