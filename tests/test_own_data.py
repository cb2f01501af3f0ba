"""A user's own data: files of real-world shape in, a config inferred, rows coerced and streamed.

Fixtures are built from data scikit-learn ships (breast cancer: 30 columns, binary; wine:
3 classes) and written the way users' files are: names with spaces and dashes, numbers as
text, missing values, no entity id, event times years in the past.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streams.coerce import coerce_record, coerce_time
from streams.config import Feature, LabelSpec, PipelineConfig, RecordSchema, field_key, load_config, parse_config
from streams.errors import ConfigError, DecodeError, DriftloopError, ErrorKind
from streams.events import LabelObserved
from streams.files import file_records, infer_config, read_table
from streams.serde import RecordCodec, RequestCodec, encode_event
from tests.test_cli import driftloop


def cancer_csv(path: Path, missing: float = 0.03, seed: int = 0) -> Path:
    """scikit-learn's breast cancer set as a CSV: odd names, quoted numbers, gaps, old times."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rng = random.Random(seed)
    names = [n.replace(" ", "-") if i % 2 else n for i, n in enumerate(data.feature_names)]
    with path.open("w", newline="") as f:
        out = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        out.writerow([*names, "diagnosis", "seen at"])
        for i, (x, y) in enumerate(zip(data.data, data.target, strict=True)):
            row: list[Any] = ["" if rng.random() < missing else f"{v:.5g}" for v in x]  # text, as csv gives
            out.writerow([*row, ["malignant", "benign"][y], f"2011-03-{1 + i % 28:02d} 10:{i % 60:02d}:00"])
    return path


def wine_parquet(path: Path) -> Path:
    """scikit-learn's wine set (3 classes, integer labels) as Parquet, ids as integers, ints as floats."""
    from sklearn.datasets import load_wine

    data = load_wine()
    columns: dict[str, Any] = {"row id": list(range(len(data.target)))}
    for i, name in enumerate(data.feature_names):
        columns[name.replace("/", "-")] = data.data[:, i].tolist()
    columns["class"] = [float(c) for c in data.target]  # what pandas makes of an int column with gaps
    pq.write_table(pa.table(columns), path)
    return path


# --- names and optional ids ------------------------------------------------------------------------


def odd_schema(**extra: Any) -> RecordSchema:
    return RecordSchema(
        label=LabelSpec("the class", ("a", "b")),
        features=(Feature("region-centroid-col", "float", 0, 10), Feature("class", "int", 0, 5, nullable=True)),
        **extra,
    )


def test_any_column_name_round_trips_with_its_own_name_on_the_wire() -> None:
    schema = odd_schema(record_id=None)
    codec = RecordCodec(schema)
    record = {"region-centroid-col": 1.5, "class": 2, "the class": "b"}
    decoded = codec.decode(codec.encode(record))
    assert codec.to_dict(decoded) == record
    assert json.loads(codec.encode(record)) == record, "the wire keeps the names as given"
    assert getattr(decoded, field_key("region-centroid-col")) == 1.5
    assert field_key("class") != "class" and field_key("class").isidentifier(), "a keyword gets a key of its own"
    with pytest.raises(DecodeError) as caught:
        codec.decode(b'{"region-centroid-col": 11, "the class": "a"}')
    err = caught.value
    assert (err.kind, err.field) == (ErrorKind.OUT_OF_RANGE, "region-centroid-col")
    requests = RequestCodec(schema).decode(b'[{"region-centroid-col": 2.0, "request_id": "r1"}]')
    assert getattr(requests[0], field_key("region-centroid-col")) == 2.0 and requests[0].request_id == "r1"


def test_record_id_entity_and_time_are_optional() -> None:
    codec = RecordCodec(odd_schema(record_id=None))
    assert codec.decode(b'{"region-centroid-col": 3, "the class": "a"}')
    with_ids = RecordCodec(odd_schema(record_id="id", entity_id="who", timestamp="when"))
    with pytest.raises(DecodeError) as caught:
        with_ids.decode(b'{"region-centroid-col": 3, "the class": "a"}')
    assert caught.value.kind is ErrorKind.MISSING_FIELD
    assert odd_schema(record_id=None).event_time == "timestamp", "Kafka's timestamp is the event time"
    assert odd_schema(timestamp="when").event_time == "when"


@pytest.mark.parametrize(
    ("name", "message"),
    [("", "a column name"), (" lead", "a column name"), ("tab\there", "a column name"),
     ("offset", "reserved for Kafka metadata"), ("request_id", "a prediction request's own field")],
)  # fmt: skip
def test_column_names_that_cannot_work_are_config_errors(name: str, message: str) -> None:
    text = f"""
name: p
schema:
  label: {{name: y, classes: [0, 1]}}
  features:
    {json.dumps(name)}: {{type: float}}
"""
    with pytest.raises(ConfigError, match=message):
        parse_config(text, env={})


# --- coercion --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feature", "value", "expected"),
    [
        (Feature("n", "int"), "50", 50),
        (Feature("n", "int"), " -3 ", -3),
        (Feature("n", "int"), 50.0, 50),
        (Feature("n", "int"), "50.0", 50),
        (Feature("n", "int"), 50.5, 50.5),  # not lossless: left for the codec to refuse
        (Feature("n", "int"), "5e300", "5e300"),
        (Feature("x", "float"), "1.25", 1.25),
        (Feature("x", "float"), "nan", "nan"),
        (Feature("x", "float"), "inf", "inf"),
        (Feature("x", "float", nullable=True), "", None),
        (Feature("x", "float", nullable=True), "NA", None),
        (Feature("x", "float"), "", ""),  # not nullable: stays, and is refused
        (Feature("b", "bool"), "yes", True),
        (Feature("b", "bool"), "0", False),
        (Feature("b", "bool"), 1, True),
        (Feature("b", "bool"), 2, 2),
        (Feature("c", "category", categories=("1", "2")), 1, "1"),
        (Feature("c", "category", categories=("1", "2")), 2.0, "2"),
        (Feature("c", "category", categories=("1", "2")), 3, 3),
    ],
)
def test_coercion_converts_only_what_it_can_convert_losslessly(feature: Feature, value: Any, expected: Any) -> None:
    schema = RecordSchema(label=LabelSpec("y", (0, 1)), features=(feature,), record_id=None)
    got = coerce_record(schema, {feature.name: value})[feature.name]
    assert got == expected and type(got) is type(expected)


def test_times_from_epoch_seconds_and_iso_text_without_a_zone_are_utc() -> None:
    utc = datetime(2011, 3, 1, 10, 0, tzinfo=timezone.utc)
    assert coerce_time(utc.timestamp()) == utc
    assert coerce_time(str(int(utc.timestamp()))) == utc
    assert coerce_time("2011-03-01 10:00:00") == utc
    assert coerce_time("2011-03-01T11:00:00+01:00") == utc
    assert coerce_time("last tuesday") == "last tuesday"


def test_the_codec_coerces_only_when_the_schema_says_so() -> None:
    payload = b'{"region-centroid-col": "1.5", "class": 2.0, "the class": "a"}'
    strict = RecordCodec(odd_schema(record_id=None))
    with pytest.raises(DecodeError) as caught:
        strict.decode(payload)
    assert caught.value.kind is ErrorKind.WRONG_TYPE
    lax = RecordCodec(odd_schema(record_id=None, coerce=True))
    assert lax.to_dict(lax.decode(payload)) == {"region-centroid-col": 1.5, "class": 2, "the class": "a"}
    batch = lax.decode_batch([payload, b'{"region-centroid-col": "x", "the class": "a"}', b"[1]"])
    assert not isinstance(batch[0], DecodeError)
    assert isinstance(batch[1], DecodeError) and batch[1].field == "region-centroid-col"
    assert isinstance(batch[2], DecodeError)


# --- init: a config from a file -------------------------------------------------------------------


def test_init_infers_a_config_that_reads_the_file_it_came_from(tmp_path: Path) -> None:
    table = read_table(cancer_csv(tmp_path / "cancer.csv"))
    inferred = infer_config(table, label="diagnosis", name="cancer", timestamp="seen at", source="cancer.csv")
    config = inferred.config
    schema = config.schema
    assert schema.label.classes == ("benign", "malignant")
    assert len(schema.features) == 30 and schema.record_id is None and schema.entity_id is None
    assert "mean-texture" in schema.feature_names and "mean radius" in schema.feature_names
    assert all(f.type == "float" and f.nullable for f in schema.features), "gaps make columns nullable"
    assert parse_config(inferred.text, env={}) == config, "what init writes reads back as it is"
    codec = RecordCodec(schema)
    rows = list(file_records(table, schema))
    assert len(rows) == 569
    decoded = [codec.decode(codec.encode(r)) for _, r in rows]  # every row is accepted
    first = codec.to_dict(decoded[0])
    assert first["seen at"] == datetime(2011, 3, 1, 10, 0, tzinfo=timezone.utc)
    assert first["diagnosis"] == "malignant"


def test_init_on_parquet_with_integer_classes_and_an_id_column(tmp_path: Path) -> None:
    table = read_table(wine_parquet(tmp_path / "wine.parquet"))
    config = infer_config(table, label="class", name="wine", record_id="row id").config
    assert config.schema.label.classes == (0, 1, 2) and config.schema.record_id == "row id"
    assert config.schema.feature("magnesium").type == "int", "integral floats make an int feature"
    codec = RecordCodec(config.schema)
    for _, record in file_records(table, config.schema):
        assert isinstance(record["row id"], str) and record["class"] in (0, 1, 2)
        codec.encode(record)


def test_init_leaves_out_free_text_and_makes_categories_of_few_values(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [{"plan": ["basic", "gold"][i % 2], "note": f"free text {i}", "n": i, "ok": i % 3 == 0, "y": i % 2}
             for i in range(200)]  # fmt: skip
    path.write_text("\n".join(json.dumps(x) for x in lines))
    inferred = infer_config(read_table(path), label="y", name="mixed")
    schema = inferred.config.schema
    assert schema.feature("plan").categories == ("basic", "gold") and schema.feature("ok").type == "bool"
    assert "note" not in schema.feature_names and schema.unknown_fields == "ignore"
    assert any("note" in n for n in inferred.notes)


@pytest.mark.parametrize(
    ("content", "label", "message"),
    [
        ("a,y\n", "y", "no rows"),
        ("a,y\n1,0\n2,0\n", "y", "at least two classes"),
        ("a,y\n1,0\n2,1\n", "nope", "a column of the file"),
        ("a,y\n1,0.5\n2,1\n", "y", "regression"),
        ("offset,y\n1,0\n2,1\n", "y", "rename the column"),
    ],
)
def test_init_bad_input_is_a_clear_error(tmp_path: Path, content: str, label: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises((ConfigError, DriftloopError), match=message):
        infer_config(read_table(path), label=label, name="bad")


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DriftloopError, match=r"x\.parquet: not a readable parquet file"):
        read_table(tmp_path / "x.parquet")
    with pytest.raises(DriftloopError, match="no such file"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(DriftloopError, match="unknown file type"):
        read_table(tmp_path / "data.xlsx")


# --- the commands, on a real broker -------------------------------------------------------------


@pytest.mark.integration
def test_init_then_produce_from_the_file_sends_every_row_and_dead_letters_the_bad_ones(
    config: PipelineConfig, broker: str, tmp_path: Path
) -> None:
    source = cancer_csv(tmp_path / "cancer data.csv")
    out = tmp_path / "cancer.yaml"
    made = driftloop("init", "--from", str(source), "--label", "diagnosis", "--time", "seen at",
                     "--name", config.name, "--out", str(out))  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "mean-texture" in made.stdout and "label, 2 classes" in made.stdout and str(out) in made.stdout
    again = driftloop("init", "--from", str(source), "--label", "diagnosis", "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr, "init never overwrites a config unasked"

    env = {"KAFKA_BOOTSTRAP_SERVERS": broker}
    sent = driftloop("produce", "--config", str(out), "--from", str(source), "--label-delay", "50", env=env)
    assert sent.returncode == 0, sent.stderr
    assert "sent 569 rows" in sent.stdout and "refused: 0" in sent.stdout and "labels: 569" in sent.stdout
    consumed = driftloop("consume", "--config", str(out), "--idle-timeout", "3", "--print", env=env)
    assert consumed.returncode == 0, consumed.stderr
    rows = [json.loads(line) for line in consumed.stdout.splitlines()]
    assert len(rows) == 569 and {r["diagnosis"] for r in rows} == {"benign", "malignant"}
    assert all(r["seen at"].startswith("2011-03-") for r in rows)

    # rows that disagree with the config: each to the DLQ with its reason, the rest sent, exit 1
    bad = tmp_path / "bad.csv"
    text = source.read_text().splitlines()
    text[3] = text[3].replace('"malignant"', '"unknown"').replace('"benign"', '"unknown"')
    fields = text[5].split(",")
    fields[0] = '"9999"'
    text[5] = ",".join(fields)
    bad.write_text("\n".join(text) + "\n")
    refused = driftloop("produce", "--config", str(out), "--from", str(bad), "--limit", "10", env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "sent 8 rows" in refused.stdout and "refused: 2" in refused.stdout
    assert "row 3: " in refused.stderr and "diagnosis" in refused.stderr
    assert "row 5: " in refused.stderr and "mean radius" in refused.stderr and "Traceback" not in refused.stderr

    from kafka import KafkaConsumer

    from streams.topics import Topics

    consumer = KafkaConsumer(Topics(config.name).dlq, bootstrap_servers=broker, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)  # fmt: skip
    dead = list(consumer)
    consumer.close()
    # the file has no id column: each label names its row by the file and the row, as `run --from` does
    consumer = KafkaConsumer(Topics(config.name).labels, bootstrap_servers=broker, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)  # fmt: skip
    labels = [json.loads(m.value) for m in consumer]
    consumer.close()
    assert len(labels) == 569 and labels[0]["type"] == "LabelObserved"
    assert {e["request_id"] for e in labels} == {f"cancer_data.csv:{i}" for i in range(569)}
    assert labels[3]["label"] in ("malignant", "benign")
    assert len(dead) == 2
    headers = [dict(m.headers) for m in dead]
    assert {h["driftloop.error"] for h in headers} == {b"unknown_category", b"out_of_range"}
    assert {h["driftloop.source"].decode() for h in headers} == {f"file:{bad}/0/2", f"file:{bad}/0/4"}
    assert json.loads(dead[0].value)["diagnosis"] in ("unknown", "malignant", "benign"), "the row itself, as JSON"


def shifting_csv(path: Path, rows: int = 6000, change_at: int = 4000, seed: int = 0) -> Path:
    """A 3-class file with a dominant class whose labels flip between two classes from `change_at` on
    (a concept change, which also moves the class mix), written as users' files are: names with
    spaces and dashes, numbers as quoted text, gaps, no entity id, event times in 2009."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows, n_features=6, n_informative=4, n_redundant=1, n_classes=3, n_clusters_per_class=1,
        weights=[0.6, 0.25, 0.15], class_sep=1.6, random_state=seed,
    )  # fmt: skip
    names = ["pressure kPa", "flow-rate", "temp C", "vibration-rms", "load %", "age-days"]
    grades = ["ok", "warn", "fail"]
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        out = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        out.writerow(["recorded at", *names, "grade"])
        for i, (row, label) in enumerate(zip(x, y, strict=True)):
            if i >= change_at and label in (0, 1):
                label = 1 - label  # the same inputs now mean the other grade
            cells = ["" if rng.random() < 0.01 else f"{v:.4f}" for v in row]
            out.writerow([f"2009-06-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}", *cells, grades[label]])
    return path


def mixing_csv(path: Path, rows: int = 6000, change_at: int = 4000, seed: int = 0) -> Path:
    """A 2-class file whose class mix turns over from `change_at` on ("fail" from 15 % to 75 %) while
    each class's inputs keep their distribution (a prior shift, P(x|y) unchanged). The classes
    overlap, so the best boundary moves with the mix: the old champion misses many failures, and a
    model trained on the new mix gets them back. Same shape as `shifting_csv`: text numbers, gaps,
    a category, no ids, old times."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fail = rng.random(rows) < np.where(np.arange(rows) < change_at, 0.15, 0.75)
    shift = np.array([0.9, -0.8, 0.7, 0.6, -0.9])  # the classes' means, 2 standard deviations apart
    x = rng.normal(size=(rows, 5)) + np.outer(fail, shift * 2 / np.linalg.norm(shift))
    names = ["pressure kPa", "flow-rate", "temp C", "vibration-rms", "load %"]
    with path.open("w", newline="") as f:
        out = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        out.writerow(["recorded at", *names, "line", "grade"])
        for i in range(rows):
            cells = ["" if rng.random() < 0.01 else f"{v:.4f}" for v in x[i]]
            line = "ABC"[int(rng.integers(3))]
            out.writerow([f"2011-03-0{1 + i // 86400}T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}", *cells,
                          line, "fail" if fail[i] else "ok"])  # fmt: skip
    return path


def test_a_file_stream_serves_its_rows_then_replays_with_request_ids_of_their_own(tmp_path: Path) -> None:
    from streams.files import FileStream

    path = tmp_path / "ids.jsonl"
    ids = ["a b", "ok-1", "x" * 120, "ok-2", "ok-3", "ok-4"]  # a space, and one too long to carry a suffix
    path.write_text("\n".join(json.dumps({"id": i, "v": n, "y": n % 2}) for n, i in enumerate(ids)))
    config = infer_config(read_table(path), label="y", name="ids", record_id="id").config
    stream = FileStream(read_table(path), config.schema, str(path), start=2, drift_at=4, replay_from=4)
    served = list(stream.records(6))
    assert [r.index for r in served] == [2, 3, 4, 5, 4, 5] and stream.cycle == 1
    assert [r.drifted for r in served] == [False, False, True, True, True, True]
    assert served[1].id == "ok-2" and served[4].id == "ok-3.r1", "a replayed row has an id of its own"
    assert len({r.id for r in served}) == 6
    codec = RequestCodec(config.schema)
    body = json.dumps([{"request_id": r.id, "v": r.record["v"]} for r in served]).encode()
    assert len(codec.decode(body)) == 6, "every id is a valid request id"
    assert FileStream(read_table(path), config.schema, str(path))._ids[0] == "ids.jsonl:0", "'a b' is named by its row"


def init_and_run(
    tmp_path: Path, source: Path, name: str, change_at: int
) -> tuple[Path, Path, subprocess.CompletedProcess[str], dict[str, Any]]:
    """`driftloop init` on `source` (label `grade`, time `recorded at`), a small search, then
    `driftloop run --from` it: the config, the run's folder, the process and its JSON report."""
    import yaml

    from cluster.broker import free_port

    config_path = tmp_path / f"{name}.yaml"
    made = driftloop("init", "--from", str(source), "--label", "grade", "--time", "recorded at",
                     "--name", name, "--out", str(config_path))  # fmt: skip
    assert made.returncode == 0, made.stderr
    data = yaml.safe_load(config_path.read_text())
    data["search"] = {"trials": 2, "space": {"learning_rate": {"low": 0.001, "high": 0.02, "log": True}}}
    data["model"], data["training"] = {"epochs": 5}, {"workers": 1}
    data["serving"] = {"port": free_port()}
    data["retrain"]["job_timeout_s"] = 1200  # a loaded CI machine is slow
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))

    run_dir, report_file = tmp_path / "run", tmp_path / "report.json"
    result = driftloop(
        "run", str(config_path), "--from", str(source), "--drift-at", str(change_at), "--rate", "100",
        "--after-promotion", "1000", "--run-dir", str(run_dir), "--report", str(report_file), "--max-seconds", "1500",
        timeout=1600,
    )  # fmt: skip
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return config_path, run_dir, result, report


@pytest.mark.integration
@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_run_from_a_file_retrains_by_itself_after_the_file_changes_and_recovers(tmp_path: Path) -> None:
    """`init` then `run --from`: a 3-class file whose labels flip in its last third (times from 2009,
    names with spaces and dashes, numbers as text, gaps, no ids), through the real broker, Ray,
    MLflow and Serve. Nothing but the file's rows drives the loop: the monitor sees the change, the
    policy asks for a retrain on the records since then (by offset: the event times are 17 years
    old), the gate promotes, and the new champion answers better."""
    source = shifting_csv(tmp_path / "machine log.csv", rows=6000, change_at=4000)
    config_path, run_dir, result, report = init_and_run(tmp_path, source, "machines", change_at=4000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["drift_injected_at_record"] == 4000
    assert 4000 < report["drift_detected_at_record"] < 6000, report["timeline"]
    assert report["retrain_submission_id"] and report["promoted_version"] == "2"
    assert report["failed_requests"] == 0 and report["requests_sent"] > 100
    assert report["accuracy_after_drift_before_retrain"] < report["accuracy_before_drift"] - 0.2
    assert report["accuracy_after_promotion"] > report["accuracy_after_drift_before_retrain"] + 0.2
    assert report["lineage"]["trigger_event_id"] == report["retrain_submission_id"]
    assert [j["status"] for j in report["jobs"]] == ["SUCCEEDED", "SUCCEEDED"]
    assert "=== driftloop run: promoted" in result.stdout
    page = (run_dir / "report.html").read_text()
    for mark in ("drift detected (", "retrain requested", "job started", "gate passed: version 2 promoted",
                 "serving version 2", "drift injected", "<h3>Version 2</h3>"):  # fmt: skip
        assert mark in page, mark
    assert "HTML report logged to MLflow run" in result.stdout

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(uri).list_artifacts(report["lineage"]["run_id"], "report")
    assert [a.path for a in logged] == ["report/report.html"], "the report is an artifact of version 2's run"
    where = ["--config", str(config_path), "--tracking-uri", uri, "--datasets-root", str(run_dir / "datasets")]
    shown = driftloop("lineage", "machines@champion", *where, "--json")
    assert shown.returncode == 0, shown.stderr
    trail = json.loads(shown.stdout)
    assert trail["version"] == "2" and "champion" in trail["aliases"] and trail["gate"]["decision"] == "passed"
    assert trail["family"] == "mlp" and trail["mlflow_model"] == "models:/machines/2"
    assert trail["retrain"]["request_id"] == report["retrain_submission_id"] and trail["retrain"]["drift_event_id"]
    assert trail["datasets"] and trail["datasets"][0]["ranges"]
    assert trail["kafka"].startswith("kafka://machines.records")
    assert trail["run"]["params"] and trail["run"]["metrics"]
    text = driftloop("lineage", "machines@1", *where)
    assert text.returncode == 0 and "bootstrap" in text.stdout
    missing = driftloop("lineage", "machines@nope", *where)
    assert missing.returncode == 1 and "no alias 'nope'" in missing.stderr and "Traceback" not in missing.stderr
    # the retrain learned from the records since the change, found by offset, not by their 2009 times
    data = report["jobs"][1]["summary"]["data"]
    # (how many depends on how soon the job ingests: at 100 rows/s, about 900 here; at least
    # retrain.min_window, or the job would have fallen back to the newest rows of all)
    min_window = load_config(config_path).retrain.min_window
    assert data["selected_by"] == "offsets" and data["rows_since_drift"] >= min_window, data
    assert data["from_offsets"] and data["since"] is None
    # where the loop's time went: the stages, the job's own among them, add up to the latency
    stages = report["loop_stages_s"]
    assert list(stages)[:3] == ["detect", "request", "submit and job start"] and list(stages)[-1] == "swap"
    assert {"job ingest", "job read", "job tune", "job train", "job register", "job gate"} <= set(stages)
    assert sum(stages.values()) == pytest.approx(report["loop_latency_s"], abs=0.05 * len(stages) + 0.1)
    assert report["jobs"][1]["summary"]["ran_in"] == "the job's process", "6,000 rows: below ray.distributed_min_rows"


# The class-mix loop runs in this file, after the concept-change one, on purpose: under xdist's
# --dist loadfile both then run on one worker, one after the other. Side by side (two Ray heads,
# four Ray jobs on 2 cores) each took 510 s instead of about 250 s, and `make test` 22.5 minutes.
@pytest.mark.integration
@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_run_from_a_file_whose_class_mix_turns_over_retrains_by_offsets_and_recovers(tmp_path: Path) -> None:
    """ "fail" goes from 15 % to 75 % of the rows at row 4000 of 6000, P(x|fail) and P(x|ok) unchanged,
    with overlapping classes (best accuracy about 0.90 before and 0.85 after; the old boundary gets
    about 0.66 after). The monitor sees it (data, prediction or performance drift), the retrain
    learns from the records since then, chosen by offset, the gate promotes on the same recent data,
    and the new champion answers better than the old one did after the change."""
    source = mixing_csv(tmp_path / "line-3 grades.csv", rows=6000, change_at=4000)
    _, _, result, report = init_and_run(tmp_path, source, "grades", change_at=4000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "=== driftloop run: promoted" in result.stdout
    assert 4000 < report["drift_detected_at_record"] < 6000, report["timeline"]
    assert report["failed_requests"] == 0
    assert report["accuracy_before_drift"] > 0.85
    assert report["accuracy_after_drift_before_retrain"] < report["accuracy_before_drift"] - 0.1
    assert report["accuracy_after_promotion"] > report["accuracy_after_drift_before_retrain"] + 0.08
    retrains = [g for g in report["gate"] if g["version"] != "1"]
    assert retrains and retrains[-1]["promoted"], report["gate"]
    data = report["jobs"][-1]["summary"]["data"]
    assert data["selected_by"] == "offsets" and data["from_offsets"], data


@pytest.mark.integration
def test_the_monitor_follows_the_records_topic_end_as_records_arrive(config: PipelineConfig, topics: Any) -> None:
    """What a retrain's offsets come from: fresh within about a second, never the first answer kept."""
    import time

    from jobs.monitor import RecordsPosition
    from streams.kafka import Producer

    def send(n: int) -> None:
        with Producer(config.kafka) as producer:
            for i in range(n):
                producer.send(topics.records, b"{}", key=str(i))

    def total_within(position: RecordsPosition, expected: int, seconds: float = 15) -> int:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = sum(r.end for r in position.now())
            if found == expected:
                return found
            time.sleep(0.2)
        return sum(r.end for r in position.now())

    send(10)
    position = RecordsPosition(config.kafka, topics.records, every_s=0.5)
    try:
        assert total_within(position, 10) == 10
        send(25)
        assert total_within(position, 35) == 35, "the position moves on as the topic grows"
        assert {r.partition for r in position.now()} == set(range(config.kafka.partitions))
    finally:
        position.close()


# --- topics of your own, labels as plain records ----------------------------------------------------


def test_topic_names_come_from_the_config_when_it_names_them() -> None:
    from streams.topics import TOPICS, Topics

    text = """
name: churn
topics: {records: crm.customers.v2, labels: crm.churn-labels, labels_format: record}
schema:
  label: {name: churned, classes: ["no", "yes"]}
  features: {tenure: {type: int}}
"""
    config = parse_config(text, env={})
    topics = Topics.of(config)
    assert (topics.records, topics.labels, topics.predictions) == ("crm.customers.v2", "crm.churn-labels",
                                                                   "churn.predictions")  # fmt: skip
    assert len(set(topics.all())) == len(TOPICS)
    for bad, message in (("records: 'a b'", "a Kafka topic name"), ("{records: x, labels: x}", "a different topic")):
        wrong = text.replace("{records: crm.customers.v2, labels: crm.churn-labels, labels_format: record}", bad)
        with pytest.raises(ConfigError, match=message):
            parse_config(wrong.replace("topics: records:", "topics:\n  records:"), env={})


def test_labels_as_plain_records_become_label_events_and_bad_ones_say_why() -> None:
    from streams.serde import LabelRecordCodec, events_or_label_records

    schema = RecordSchema(label=LabelSpec("is fraud", (0, 1)), features=(Feature("amount", "float"),),
                          record_id="txn id", coerce=True)  # fmt: skip
    decode = events_or_label_records(LabelRecordCodec(schema, "fraud"))
    event = LabelObserved(request_id="t-9", pipeline="fraud", label=1)
    got = decode([
        b'{"txn id": "t-1", "is fraud": 1, "note": "extra fields are ignored"}',
        b'{"txn id": 42, "is fraud": "0"}',  # an integer id; coerce: "0" is class 0
        encode_event(event),  # events are still understood
        b'{"txn id": "t-2", "is fraud": 7}',
        b'{"txn id": "t 3", "is fraud": 1}',
        b'{"is fraud": 1}',
        b'{"type": "LabelObserved"}',  # an event that is broken stays an event error
    ])  # fmt: skip
    assert isinstance(got[0], LabelObserved) and (got[0].request_id, got[0].label) == ("t-1", 1)
    assert isinstance(got[1], LabelObserved) and (got[1].request_id, got[1].label) == ("42", 0)
    assert got[0].event_id == LabelRecordCodec(schema, "fraud").decode(b'{"txn id": "t-1", "is fraud": 1}').event_id
    assert isinstance(got[2], LabelObserved) and got[2].request_id == "t-9"
    assert [(e.kind, e.field) for e in got[3:6]] == [
        (ErrorKind.UNKNOWN_CATEGORY, "is fraud"),
        (ErrorKind.INVALID_FIELD, "txn id"),
        (ErrorKind.MISSING_FIELD, "txn id"),
    ]
    assert isinstance(got[6], DecodeError) and got[6].field != "txn id"
