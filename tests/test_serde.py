"""Events and records: round trips, and a clear, specific error for each kind of bad payload."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from streams.config import Feature, PipelineConfig, RecordSchema
from streams.errors import DecodeError, ErrorKind
from streams.events import (
    EVENT_TYPES,
    DeliveryStep,
    DriftDetected,
    Event,
    FeatureDrift,
    LabelObserved,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    MonitorState,
    OffsetRange,
    PendingSpan,
    PredictionLogged,
    RetrainRequested,
    ServiceHeartbeat,
    TrainingCompleted,
    TrainingFailed,
    deterministic_id,
)
from streams.serde import RecordCodec, decode_event, decode_events, encode_event

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
T1 = datetime(2026, 11, 1, 13, 0, tzinfo=timezone.utc)


def sample_events() -> list[Event]:
    """One fully populated instance of every event type."""
    window = (OffsetRange(topic="demo.predictions", partition=0, start=10, end=20),)
    drift = FeatureDrift(feature="plan", statistic="psi", value=0.4, threshold=0.2, drifted=True, p_value=0.001)
    return [
        PredictionLogged(
            occurred_at=T0,
            request_id="r1",
            pipeline="demo",
            model_name="demo",
            model_version="3",
            features={"plan": "basic", "tenure_months": 4, "autopay": True, "x": 1.5, "gone": None},
            prediction="yes",
            probabilities={"no": 0.25, "yes": 0.75},
            variant="shadow",
        ),
        LabelObserved(occurred_at=T0, request_id="r1", pipeline="demo", label="no"),
        DriftDetected(
            occurred_at=T0,
            pipeline="demo",
            window_start=T0,
            window_end=T1,
            window_size=10,
            offsets=window,
            statistics=(drift,),
            kind="prediction",
        ),
        RetrainRequested(
            event_id=deterministic_id("demo", T0, T1),
            occurred_at=T1,
            pipeline="demo",
            cause="drift",
            data_start=T0,
            data_end=T1,
            drift_event_id="d1",
        ),
        TrainingCompleted(
            occurred_at=T1,
            pipeline="demo",
            model_name="demo",
            model_version="4",
            run_id="abc",
            metrics={"f1": 0.8},
            trigger_event_id="x",
            submission_id="x",
        ),
        TrainingFailed(occurred_at=T1, pipeline="demo", model_name="demo", reason="OOM", submission_id="x"),
        ModelPromoted(occurred_at=T1, model_name="demo", model_version="4", previous_version="3", metrics={"f1": 0.8}),
        DeliveryStep(
            occurred_at=T1,
            model_name="demo",
            model_version="5",
            step="canary",
            fraction=0.1,
            champion_version="4",
            evidence={"candidate_accuracy": 0.81, "champion_accuracy": 0.8},
        ),
        ModelRejected(occurred_at=T1, model_name="demo", model_version="5", reasons=("f1 regressed",)),
        ModelRolledBack(occurred_at=T1, model_name="demo", from_version="5", to_version="4", reason="manual"),
        ServiceHeartbeat(
            occurred_at=T1,
            pipeline="demo",
            service="monitor",
            instance="host-1",
            started_at=T1,
            last_poll_at=T1,
            polled=10,
            records_position_at=T1,
            resumed="fresh",
        ),
        MonitorState(
            occurred_at=T1,
            pipeline="demo",
            model_version="3",
            cut=(OffsetRange(topic="demo.predictions", partition=0, start=20, end=20),),
            streaks={"data": 1},
            streak_started={"data": T0},
            streak_records={"data": window},
            last_request_at=T0,
            recent_requests=(T0,),
            performance=(("yes", "no"),),
            performance_started=T0,
            performance_records=window,
            pending=(PendingSpan(topic="demo.predictions", partition=0, start=10, end=20, bitmap=b"x\x9c"),),
            joined=3,
        ),
    ]


def test_samples_cover_every_event_type() -> None:
    assert {type(e).__name__ for e in sample_events()} == set(EVENT_TYPES)


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: type(e).__name__)
def test_every_event_round_trips(event: Event) -> None:
    data = encode_event(event)
    assert json.loads(data)["type"] == type(event).__name__
    assert decode_event(data) == event


def test_events_are_frozen_and_keyed() -> None:
    promoted = ModelPromoted(model_name="demo", model_version="2")
    with pytest.raises(AttributeError):
        promoted.model_version = "3"  # type: ignore[misc]
    assert promoted.key() == "demo"
    assert LabelObserved(request_id="r9", pipeline="demo", label="yes").key() == "r9"
    assert RetrainRequested(pipeline="demo", cause="drift").key() == "demo"


def test_deterministic_ids_repeat_and_differ() -> None:
    assert deterministic_id("demo", T0, T1) == deterministic_id("demo", T0, T1)
    assert deterministic_id("demo", T0, T1) != deterministic_id("demo", T1, T0)
    assert (
        ModelPromoted(model_name="m", model_version="1").event_id
        != ModelPromoted(model_name="m", model_version="1").event_id
    )


def event_error(payload: bytes, max_bytes: int = 1 << 20) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode_event(payload, max_bytes)
    return caught.value


def test_unknown_event_type_is_an_error_not_a_skip() -> None:
    err = event_error(b'{"type":"ModelExploded","event_id":"x","occurred_at":"2026-01-01T00:00:00Z"}')
    assert err.kind is ErrorKind.UNKNOWN_EVENT_TYPE
    assert "ModelExploded" in str(err) and "ModelPromoted" in str(err)


def test_unknown_schema_version_is_an_error() -> None:
    data = json.loads(encode_event(ModelPromoted(model_name="m", model_version="1")))
    data["schema_version"] = 2
    err = event_error(json.dumps(data).encode())
    assert err.kind is ErrorKind.UNSUPPORTED_VERSION
    assert "ModelPromoted schema_version 2" in str(err)


@pytest.mark.parametrize(
    ("change", "kind", "field"),
    [
        ({"model_version": 4}, ErrorKind.WRONG_TYPE, "model_version"),
        ({"model_name": None}, ErrorKind.WRONG_TYPE, "model_name"),
        ({"occurred_at": "2026-01-01T00:00:00"}, ErrorKind.WRONG_TYPE, "occurred_at"),  # no timezone
        ({"occurred_at": "yesterday"}, ErrorKind.WRONG_TYPE, "occurred_at"),
    ],
)
def test_bad_event_fields(change: dict[str, object], kind: ErrorKind, field: str) -> None:
    data = json.loads(encode_event(ModelPromoted(model_name="m", model_version="1")))
    data.update(change)
    err = event_error(json.dumps(data).encode())
    assert (err.kind, err.field) == (kind, field)


def test_missing_event_field() -> None:
    data = json.loads(encode_event(ModelPromoted(model_name="m", model_version="1")))
    del data["model_name"]
    err = event_error(json.dumps(data).encode())
    assert (err.kind, err.field) == (ErrorKind.MISSING_FIELD, "model_name")


def test_offset_range_must_not_run_backwards() -> None:
    data = json.loads(encode_event(sample_events()[2]))
    data["offsets"][0]["end"] = 5
    err = event_error(json.dumps(data).encode())
    assert err.kind is ErrorKind.INVALID
    assert "before its start" in str(err)


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"", ErrorKind.INVALID_JSON),
        (b"{", ErrorKind.INVALID_JSON),
        (b"\xff\xfe{}", ErrorKind.INVALID_UTF8),
        (b'{"type":"LabelObserved","request_id":"\xc3\x28"}', ErrorKind.INVALID_UTF8),
        (b"[1, 2]", ErrorKind.WRONG_TYPE),
        (b'{"schema_version": 1}', ErrorKind.MISSING_FIELD),
    ],
)
def test_malformed_event_payloads(payload: bytes, kind: ErrorKind) -> None:
    assert event_error(payload).kind is kind


def test_oversized_event() -> None:
    payload = encode_event(LabelObserved(request_id="r" * 5000, pipeline="demo", label="yes"))
    err = event_error(payload, max_bytes=1024)
    assert err.kind is ErrorKind.OVERSIZED
    assert f"{len(payload)} bytes exceeds the limit of 1024" in str(err)


def test_decode_events_keeps_errors_in_place() -> None:
    good = encode_event(LabelObserved(request_id="r", pipeline="demo", label="yes"))
    results = decode_events([good, b"nope", None, good])
    assert isinstance(results[0], LabelObserved) and isinstance(results[3], LabelObserved)
    assert isinstance(results[1], DecodeError) and isinstance(results[2], DecodeError)


# --- records -------------------------------------------------------------------------------


GOOD = {
    "record_id": "r-1",
    "customer_id": "e7",
    "event_time": "2026-11-01T12:00:00Z",
    "tenure_months": 12,
    "monthly_charges": 79.5,
    "support_calls": 2,
    "data_usage_gb": 33.0,
    "autopay": True,
    "plan": "standard",
    "region": "west",
    "churned": "no",
}


@pytest.fixture
def codec(demo_config: PipelineConfig) -> RecordCodec:
    return RecordCodec(demo_config.schema, max_bytes=4096)


def record_error(codec: RecordCodec, payload: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        codec.decode(payload)
    return caught.value


def with_(**changes: object) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def without(key: str) -> bytes:
    return json.dumps({k: v for k, v in GOOD.items() if k != key}).encode()


def test_record_round_trip(codec: RecordCodec) -> None:
    record = codec.decode(codec.encode(GOOD))
    assert record.plan == "standard" and record.tenure_months == 12
    assert record.event_time == datetime(2026, 11, 1, 12, tzinfo=timezone.utc)
    assert codec.to_dict(record)["churned"] == "no"
    assert codec.decode(codec.encode(record)) == record


def test_unlabeled_records_are_valid(codec: RecordCodec) -> None:
    assert codec.decode(without("churned")).churned is None


@pytest.mark.parametrize(
    ("payload", "kind", "field", "words"),
    [
        (with_(tenure_months="12"), ErrorKind.WRONG_TYPE, "tenure_months", "expected `int`, got `str`"),
        (with_(tenure_months=12.5), ErrorKind.WRONG_TYPE, "tenure_months", "expected `int`, got `float`"),
        (with_(autopay="yes"), ErrorKind.WRONG_TYPE, "autopay", "expected `bool`"),
        (with_(event_time="2026-11-01T12:00:00"), ErrorKind.WRONG_TYPE, "event_time", "timezone"),
        (without("monthly_charges"), ErrorKind.MISSING_FIELD, "monthly_charges", "missing required field"),
        (with_(monthly_charges=400.01), ErrorKind.OUT_OF_RANGE, "monthly_charges", "<= 400"),
        (with_(tenure_months=-1), ErrorKind.OUT_OF_RANGE, "tenure_months", ">= 0"),
        (with_(monthly_charges=float("nan")), ErrorKind.NON_FINITE, "monthly_charges", "NaN"),
        (with_(data_usage_gb=float("-inf")), ErrorKind.NON_FINITE, "data_usage_gb", "-Infinity"),
        (
            with_(data_usage_gb=7.0).replace(b"7.0", b"1e400"),
            ErrorKind.NON_FINITE,
            "data_usage_gb",
            "too large to be finite",
        ),
        (with_(plan="platinum"), ErrorKind.UNKNOWN_CATEGORY, "plan", "'platinum'"),
        (with_(churned="maybe"), ErrorKind.UNKNOWN_CATEGORY, "churned", "'maybe'"),
        (with_(colour="red"), ErrorKind.UNKNOWN_FIELD, "colour", "unknown field"),
        (b'{"record_id": "r-1",', ErrorKind.INVALID_JSON, None, "truncated"),
        (b"not json", ErrorKind.INVALID_JSON, None, "malformed"),
        (with_(region="w\udcffst").replace(b"\\udcff", b"\xff"), ErrorKind.INVALID_UTF8, None, "invalid UTF-8"),
        (b'"just a string"', ErrorKind.WRONG_TYPE, None, "expected `object`"),
        (json.dumps({**GOOD, "pad": "x" * 5000}).encode(), ErrorKind.OVERSIZED, None, "exceeds the limit of 4096"),
    ],
)
def test_each_malformed_record_gets_a_specific_error(
    codec: RecordCodec, payload: bytes, kind: ErrorKind, field: str | None, words: str
) -> None:
    err = record_error(codec, payload)
    assert err.kind is kind
    assert err.field == field
    assert words in str(err)


def test_unknown_fields_may_be_ignored(demo_config: PipelineConfig) -> None:
    import dataclasses

    schema: RecordSchema = dataclasses.replace(demo_config.schema, unknown_fields="ignore")
    assert RecordCodec(schema).decode(with_(colour="red")).plan == "standard"


def test_unbounded_ints_stay_in_int64(demo_config: PipelineConfig) -> None:
    import dataclasses

    schema = dataclasses.replace(
        demo_config.schema,
        features=tuple(
            dataclasses.replace(f, min=None, max=None) if f.name == "tenure_months" else f
            for f in demo_config.schema.features
        ),
    )
    codec = RecordCodec(schema)
    assert codec.decode(with_(tenure_months=2**62)).tenure_months == 2**62
    assert record_error(codec, with_(tenure_months=2**64)).kind is ErrorKind.OUT_OF_RANGE


def test_decode_batch_aligns_results_with_payloads(codec: RecordCodec) -> None:
    results = codec.decode_batch([with_(), b"{", None, with_(plan="x"), with_(record_id="r-2")])
    assert [type(r).__name__ for r in results] == ["Record", "DecodeError", "DecodeError", "DecodeError", "Record"]
    assert results[4].record_id == "r-2"


def test_validate_rejects_bad_mappings_before_they_are_sent(codec: RecordCodec) -> None:
    with pytest.raises(DecodeError) as caught:
        codec.encode({**GOOD, "plan": "platinum"})
    assert caught.value.kind is ErrorKind.UNKNOWN_CATEGORY


SHELL_METACHARACTERS = [";", "|", "&", "$", "`", "(", ")", "<", ">", "\\", '"', "'", "*", "?", "[", "]",
                        "{", "}", "~", "#", "!", "=", "%", " ", "\t", "\n", "/", "..", "\x00"]  # fmt: skip
# Every id field of every event type that can carry one: each reaches a command line, a path or a tag.
ID_FIELDS = sorted(
    {(name, f) for name, cls in EVENT_TYPES.items() for f in cls.__struct_fields__}
    & {(n, f) for n in EVENT_TYPES for f in ("event_id", "request_id", "pipeline", "model_name", "drift_event_id",
                                           "trigger_event_id", "submission_id", "run_id", "model_version",
                                           "previous_version", "from_version", "to_version")}
)  # fmt: skip


@pytest.mark.parametrize(("event_type", "field"), ID_FIELDS)
def test_every_id_field_refuses_every_shell_metacharacter(event_type: str, field: str) -> None:
    (event,) = [e for e in sample_events() if type(e).__name__ == event_type]
    data = json.loads(encode_event(event))
    good = str(data.get(field) or "1")
    for char in SHELL_METACHARACTERS:
        data[field] = f"{good}{char}id>/tmp/owned"
        err = event_error(json.dumps(data).encode())
        assert (err.kind, err.field) == (ErrorKind.INVALID_FIELD, field), (char, err)
    data[field] = "a" * 129  # too long
    assert event_error(json.dumps(data).encode()).kind is ErrorKind.INVALID_FIELD


def test_the_issues_hostile_retrain_event_is_refused() -> None:
    data = json.loads(encode_event(RetrainRequested(pipeline="demo", cause="drift")))
    data["event_id"] = "x --help; id > FILE; #"
    err = event_error(json.dumps(data).encode())
    assert (err.kind, err.field) == (ErrorKind.INVALID_FIELD, "event_id")
    assert ErrorKind.INVALID_FIELD.value == "invalid_field"


def test_request_ids_are_limited_where_requests_are_decoded(demo_config: PipelineConfig) -> None:
    from streams.serde import RequestCodec

    codec = RequestCodec(demo_config.schema, max_bytes=8 * 1024 * 1024)
    record = {f.name: _value(f) for f in demo_config.schema.features}
    assert (
        codec.decode(json.dumps({**record, "request_id": "order-17:a.b_c"}).encode())[0].request_id == "order-17:a.b_c"
    )
    for bad in ("r" * 3_000_000, "a" * 129, "", "../x", "a/b", "x; id", "x\\ny"):
        with pytest.raises(DecodeError) as caught:
            codec.decode(json.dumps({**record, "request_id": bad}).encode())
        assert (caught.value.kind, caught.value.field) == (ErrorKind.INVALID_FIELD, "request_id"), bad[:20]


def _value(feature: Feature) -> object:
    kind = feature.type
    if kind == "category":
        return feature.categories[0]
    if kind == "bool":
        return True
    low = feature.min
    return int(low or 0) if kind == "int" else float(low or 0.0)


def test_the_readmes_label_example_decodes() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    block = readme.split("- **A label**", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    event = decode_event(" ".join(block.split()).encode())
    assert isinstance(event, LabelObserved) and event.label == "yes" and event.request_id == "order-17"
