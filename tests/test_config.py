"""Pipeline configs: the demo loads, the environment overrides, and every error says where and what."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from streams.config import PipelineConfig, config_schema, load_config, parse_config
from streams.errors import ConfigError
from tests.conftest import DEMO, ROOT

SCHEMA = ROOT / "configs" / "driftloop.schema.json"


def demo_with(**changes: object) -> str:
    """The demo YAML with some keys replaced (dotted paths; None deletes the key)."""
    data = yaml.safe_load(DEMO.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for parent in parents:
            node = node[parent]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return yaml.safe_dump(data)


def error_for(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="pipeline.yaml", env={})
    return caught.value


def test_demo_config_loads_into_frozen_dataclasses(demo_config: PipelineConfig) -> None:
    assert demo_config.name == "demo"
    assert demo_config.kafka.embedded and demo_config.kafka.partitions == 4
    assert demo_config.schema.label.classes == ("no", "yes")
    assert demo_config.schema.feature("plan").categories[0] == "basic"
    assert demo_config.schema.feature("tenure_months").type == "int"
    with pytest.raises(AttributeError):
        demo_config.name = "other"  # type: ignore[misc]


def test_environment_overrides_connection_settings() -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092,kafka-2:9092",
        "RAY_ADDRESS": "ray://head:10001",
        "MLFLOW_TRACKING_URI": "postgresql://mlflow@db/mlflow",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_USERNAME": "svc",
        "KAFKA_SASL_PASSWORD": "s3cret",
        "DRIFTLOOP_DATASETS_ROOT": "s3://bucket/datasets",
    }
    config = parse_config(demo_with(kafka__sasl_mechanism="SCRAM-SHA-512"), env=env)
    assert config.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert config.datasets.root == "s3://bucket/datasets"
    assert parse_config(demo_with(), env={}).datasets.root == "runs/datasets"
    moved = config.connected_to("b:9092", "http://mlflow:5000")
    assert (moved.kafka.bootstrap_servers, moved.mlflow.tracking_uri) == ("b:9092", "http://mlflow:5000")
    assert config.connected_to() == config and moved.kafka.sasl_username == "svc"
    assert config.ray.address == "ray://head:10001"
    assert config.mlflow.tracking_uri == "postgresql://mlflow@db/mlflow"
    assert config.kafka.security_protocol == "SASL_SSL"
    assert (config.kafka.sasl_username, config.kafka.sasl_password) == ("svc", "s3cret")
    assert "s3cret" not in repr(config)


def test_secrets_are_refused_in_the_file() -> None:
    err = error_for(demo_with(kafka__sasl_password="hunter2"))
    assert err.key == "kafka.sasl_password"
    assert "secrets come from the environment" in str(err)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: <file>: expected an existing YAML file"):
        load_config(tmp_path / "nope.yaml", env={})


def test_invalid_yaml_names_line_and_column() -> None:
    err = error_for("name: demo\nschema: {label: {name: y}\nkafka: 1\n")
    assert err.file == "pipeline.yaml"
    assert (err.key, err.line, err.column) == ("<YAML>", 3, 1)  # where the flow mapping should have closed
    assert str(err).startswith("pipeline.yaml:3:1: <YAML>: expected valid YAML")


@pytest.mark.parametrize(
    ("changes", "key", "expected", "found"),
    [
        ({"kafka__partitions": "four"}, "kafka.partitions", "an integer", "'four' (str)"),
        ({"kafka__partitions": 0}, "kafka.partitions", "an integer >= 1", "0 (int)"),
        ({"kafka__partitions": True}, "kafka.partitions", "an integer", "True (bool)"),
        (
            {"kafka__consumer__auto_offset_reset": "middle"},
            "kafka.consumer.auto_offset_reset",
            "one of ['earliest', 'latest']",
            "'middle'",
        ),
        ({"kafka__colour": "blue"}, "kafka.colour", "one of [", "<unknown key>"),
        ({"schema__label": None}, "schema.label", "a mapping for LabelSpec", "<missing>"),
        ({"schema__label__classes": ["only"]}, "schema.label.classes", "at least two classes", "['only']"),
        (
            {"schema__features__monthly_charges__min": 500},
            "schema.features.monthly_charges.max",
            "greater than min",
            "400.0",
        ),
        (
            {"schema__features__plan__categories": ["a"]},
            "schema.features.plan.categories",
            "at least two categories",
            "['a']",
        ),
        (
            {"schema__features__plan__type": "text"},
            "schema.features.plan.type",
            "one of ['float', 'int', 'bool', 'category']",
            "'text'",
        ),
        (
            {"schema__features__monthly_charges__max": "lots"},
            "schema.features.monthly_charges.max",
            "a finite number",
            "'lots'",
        ),
        ({"schema__features__autopay": [1, 2]}, "schema.features.autopay", "a mapping for Feature", "[1, 2]"),
        ({"schema__entity_id": "region"}, "schema.features", "distinct names", "'region'"),
        ({"generator__drift_features": ["nope"]}, "generator.drift_features", "names of features", "'nope'"),
        ({"name": "has spaces"}, "name", "letters, digits", "'has spaces'"),
        ({"kafka__security_protocol": "SASL_SSL"}, "kafka.sasl_mechanism", "a mechanism", "None"),
        ({"serving__max_surge_percent": 150}, "serving.max_surge_percent", "an integer in [0, 100]", "150 (int)"),
        ({"ray__job_resources": {"CPU": 1}}, "ray.job_resources.CPU", "a custom resource", "'CPU'"),
        ({"ray__job_resources": {"worker_node": 0}}, "ray.job_resources", "resource name to a positive", "0 (int)"),
        ({"ray__job_resources": {"$(id)": 1}}, "ray.job_resources", "resource name to a positive", "'$(id)'"),
        ({"ray__job_resources": ["w"]}, "ray.job_resources", "resource name to a positive", "['w']"),
        ({"ray__storage_path": " "}, "ray.storage_path", "a path or URI", "' '"),
    ],
)
def test_every_error_names_file_key_expected_and_found(
    changes: dict[str, object], key: str, expected: str, found: str
) -> None:
    err = error_for(demo_with(**changes))
    assert err.file == "pipeline.yaml"
    assert err.key == key
    assert expected in err.expected
    assert re.match(rf"pipeline\.yaml:\d+:\d+: {re.escape(key)}: expected ", str(err))
    assert found in str(err)


def test_top_level_must_be_a_mapping() -> None:
    err = error_for("- just\n- a list\n")
    assert err.key == "<top level>"
    assert "a mapping for PipelineConfig" in str(err)


def test_bad_security_protocol_from_the_environment() -> None:
    with pytest.raises(ConfigError, match=r"\$KAFKA_SECURITY_PROTOCOL: kafka.security_protocol"):
        parse_config(DEMO.read_text(), env={"KAFKA_SECURITY_PROTOCOL": "CARRIER_PIGEON"})


def test_every_error_of_a_file_comes_at_once_with_its_line_and_column() -> None:
    err = error_for(
        """\
name: demo
kafka:
  partitions: 0
  colour: blue
schema:
  label: {name: churned, classes: ["no", "yes"]}
  features:
    tenure: {type: int, min: 0, max: 120}
    plan: {type: category, categories: [basic]}
features:
  transforms:
    tenure: [standardize, {clip: {buckets: 3}}]
model:
  eta: -1
  hidden: [64, "32"]
"""
    )
    where = [f"{p.line}:{p.column} {p.key}" for p in err.problems]
    assert where == [
        "3:15 kafka.partitions",
        "4:3 kafka.colour",  # an unknown key: where the key is written
        "9:40 schema.features.plan.categories",  # a check across fields (type and categories)
        "12:27 features.transforms.tenure[1].clip",  # a shorthand step: where it is written
        "12:44 features.transforms.tenure[1].buckets",
        "14:8 model.eta",
        "15:16 model.hidden[1]",
    ]
    assert str(err).splitlines()[0] == "pipeline.yaml:3:15: kafka.partitions: expected an integer >= 1, found 0 (int)"
    assert str(err).splitlines()[5] == "pipeline.yaml:14:8: model.eta: expected a number in (0, 1], found -1 (int)"
    assert len(str(err).splitlines()) == len(err.problems)
    assert (err.key, err.line, err.column, err.found) == ("kafka.partitions", 3, 15, 0)  # the first stands for all


def test_unknown_keys_are_refused_where_they_are_written() -> None:
    err = error_for(demo_with(kafka__colour="blue", model__depth=3, schema__features__plan__colour="red"))
    assert {p.key: p.found for p in err.problems} == {
        "kafka.colour": "<unknown key>",
        "model.depth": "<unknown key>",
        "schema.features.plan.colour": "<unknown key>",
    }
    assert all(p.line is not None and "one of [" in p.expected for p in err.problems)


def test_types_are_strict_and_every_mismatch_is_reported() -> None:
    err = error_for(
        """\
name: demo
kafka: {partitions: "4", producer: {linger_ms: true}}
schema:
  label: {name: churned, classes: [true, false]}
  features: {x: {type: float, max: .nan}}
training: {use_gpu: 1, cpus_per_worker: "2"}
"""
    )
    assert [(p.line, p.column, p.key, p.found) for p in err.problems] == [
        (2, 21, "kafka.partitions", "4"),  # no "4" for 4
        (2, 48, "kafka.producer.linger_ms", True),  # no true for 1
        (4, 36, "schema.label.classes[0]", True),
        (4, 42, "schema.label.classes[1]", False),
        (5, 36, "schema.features.x.max", pytest.approx(float("nan"), nan_ok=True)),  # floats are finite
        (6, 21, "training.use_gpu", 1),  # no 1 for true
        (6, 41, "training.cpus_per_worker", "2"),
    ]


def test_the_checked_in_json_schema_is_the_generated_one() -> None:
    regenerate = "driftloop config schema > configs/driftloop.schema.json"
    assert json.loads(SCHEMA.read_text()) == config_schema(), f"the schema changed: {regenerate}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_against_the_schema_and_name_it(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    data = yaml.safe_load(path.read_text())
    assert [e.message for e in validator.iter_errors(data)] == []
    assert path.read_text().startswith("# yaml-language-server: $schema=driftloop.schema.json\n")
    load_config(path, env={})
    data["model"]["eta"] = -1
    data["features"]["transforms"]["plan"] = ["sqrt"]
    assert sorted(tuple(e.path) for e in validator.iter_errors(data)) == [
        ("features", "transforms", "plan"),
        ("model", "eta"),
    ]
