"""Serde for everything on the wire: events, and records through a codec built from the schema.

Decoding is done in our code (never in a kafka-python deserializer) so that a bad payload is
a `DecodeError` with a specific `ErrorKind`, routed to the DLQ, and never wedges a consumer.
The fast path is msgspec (decode and validate in one pass); only a payload that fails
takes the slow path that works out exactly why.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import msgspec

from streams.coerce import coerce_record
from streams.config import Feature, RecordSchema, field_key
from streams.errors import DecodeError, ErrorKind
from streams.events import (
    EVENT_TYPES,
    REQUEST_ID_PATTERN,
    AwareDatetime,
    Event,
    LabelObserved,
    RequestId,
    deterministic_id,
    utcnow,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "LabelRecordCodec",
    "RecordCodec",
    "RequestCodec",
    "decode_event",
    "decode_events",
    "encode_event",
    "events_or_label_records",
]

DEFAULT_MAX_BYTES = 1024 * 1024
_INT64 = msgspec.Meta(ge=-(2**63), le=2**63 - 1)
_FINITE = msgspec.Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_NAMED = re.compile(r"field `([^`]*)`")


class _Envelope(msgspec.Struct):
    type: str
    schema_version: int = 1


_envelope = msgspec.json.Decoder(_Envelope)
_event_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}
_encoder = msgspec.json.Encoder()


def encode_event(event: Event) -> bytes:
    """JSON bytes of an event, with its `type` tag."""
    if event.schema_version != type(event).SCHEMA_VERSION:
        raise ValueError(
            f"{type(event).__name__} is at schema version {type(event).SCHEMA_VERSION}, not {event.schema_version}"
        )
    return _encoder.encode(event)


def decode_event(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Event:
    """Decode an event, dispatching on its `type`; unknown types and versions are errors."""
    _check_size(data, max_bytes)
    try:
        envelope = _envelope.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as err:
        raise _explain(err, data) from None
    cls = EVENT_TYPES.get(envelope.type)
    if cls is None:
        raise DecodeError(
            ErrorKind.UNKNOWN_EVENT_TYPE,
            f"unknown event type {envelope.type!r}; known: {', '.join(sorted(EVENT_TYPES))}",
            field="type",
        )
    if envelope.schema_version != cls.SCHEMA_VERSION:
        raise DecodeError(
            ErrorKind.UNSUPPORTED_VERSION,
            f"{envelope.type} schema_version {envelope.schema_version} is not supported "
            f"(this build reads version {cls.SCHEMA_VERSION})",
            field="schema_version",
        )
    try:
        return _event_decoders[envelope.type].decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as err:
        raise _explain(err, data) from None


def decode_events(payloads: Iterable[bytes | None], max_bytes: int = DEFAULT_MAX_BYTES) -> list[Any]:
    """Decode many events; each result is an event or the `DecodeError` that rejected it."""
    out: list[Any] = []
    for data in payloads:
        try:
            out.append(decode_event(data, max_bytes))  # type: ignore[arg-type]
        except DecodeError as err:
            out.append(err)
    return out


class RecordCodec:
    """Encodes and decodes records of one pipeline's `records` topic.

    The record type is generated from the schema: numbers carry their ranges, categories
    their allowed values, the label its classes (and may be absent: unlabeled records),
    the timestamp must be RFC 3339 with a timezone. A column whose name is not an identifier
    is an attribute named `field_key(name)`; on the wire it keeps its name.
    With `schema.coerce`, a record that fails only because of a value's JSON type is converted
    losslessly (`streams.coerce`) and checked again; the fast path stays one msgspec pass.
    """

    def __init__(self, schema: RecordSchema, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.schema = schema
        self.max_bytes = max_bytes
        self.type = _record_type(schema)
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(self.type)
        self._coerce = schema.coerce

    def decode(self, data: bytes) -> Any:
        """One record as an instance of the generated (frozen) record type."""
        _check_size(data, self.max_bytes)
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as err:
            if self._coerce and isinstance(err, msgspec.ValidationError):
                return self._coerced(data, err)
            raise _explain(err, data) from None

    def _coerced(self, data: bytes, err: Exception) -> Any:
        """The slow path of `coerce`: the payload as plain JSON, converted, then checked strictly."""
        try:
            plain = msgspec.json.decode(data)
        except msgspec.DecodeError:
            raise _explain(err, data) from None
        if not isinstance(plain, dict):
            raise _explain(err, data) from None
        return self.validate(coerce_record(self.schema, plain))

    def decode_batch(self, payloads: Iterable[bytes | None]) -> list[Any]:
        """Decode many payloads; each result is a record or the `DecodeError` that rejected it."""
        out: list[Any] = []
        decode = self._decoder.decode
        limit = self.max_bytes
        for data in payloads:
            if data is None or len(data) > limit:
                out.append(_size_error(data, limit))
                continue
            try:
                out.append(decode(data))
            except (msgspec.DecodeError, UnicodeDecodeError) as err:
                if self._coerce and isinstance(err, msgspec.ValidationError):
                    try:
                        out.append(self._coerced(data, err))
                    except DecodeError as bad:
                        out.append(bad)
                else:
                    out.append(_explain(err, data))
        return out

    def validate(self, record: Mapping[str, Any]) -> Any:
        """Check a record given as a mapping (what a producer sends) and return it typed."""
        try:
            return msgspec.convert(dict(record), self.type)
        except msgspec.ValidationError as err:
            raise _explain(err, b"") from None

    def encode(self, record: Mapping[str, Any] | Any) -> bytes:
        """JSON bytes of a record; a mapping is validated first."""
        if isinstance(record, Mapping):
            record = self.validate(record)
        return _encoder.encode(record)

    def to_dict(self, record: Any) -> dict[str, Any]:
        """A decoded record as a mapping of column name (as on the wire) to value."""
        return {name: getattr(record, field_key(name)) for name in self.schema.columns}


class RequestCodec:
    """Decodes prediction requests: one record of features or a list of them.

    A request record holds the schema's features (nullable ones may be left out) and an
    optional `request_id`; the same field types, ranges and categories as the records topic
    apply, so a bad field is a `DecodeError` naming it.
    """

    def __init__(self, schema: RecordSchema, max_bytes: int = DEFAULT_MAX_BYTES, max_records: int = 10_000) -> None:
        self.schema = schema
        self.max_bytes = max_bytes
        self.max_records = max_records
        fields: list[Any] = [("request_id", RequestId | None, None)]
        required = [(field_key(f.name), _feature_type(f)) for f in schema.features if not f.nullable]
        optional = [(field_key(f.name), _feature_type(f) | None, None) for f in schema.features if f.nullable]
        self.type = msgspec.defstruct(
            "PredictRequest",
            [*required, *optional, *fields],
            frozen=True,
            forbid_unknown_fields=schema.unknown_fields == "reject",
            rename=_renames(f.name for f in schema.features),
        )
        request: Any = self.type
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(request | list[request])

    def decode(self, data: bytes) -> list[Any]:
        """The request's records, in order; a single object is a list of one."""
        _check_size(data, self.max_bytes)
        try:
            decoded = self._decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as err:
            raise _explain(err, data) from None
        records = decoded if isinstance(decoded, list) else [decoded]
        if not records:
            raise DecodeError(ErrorKind.INVALID, "an empty list of records")
        if len(records) > self.max_records:
            raise DecodeError(
                ErrorKind.OVERSIZED, f"{len(records)} records exceed the limit of {self.max_records} per request"
            )
        return records


class LabelRecordCodec:
    """Labels as users have them: a plain record of the id and the label, read as a `LabelObserved`.

    `{"<schema.record_id>": "r-1", "<label>": "yes"}` (the id field is `request_id` when the
    schema has none); other fields are ignored. The id must be a valid request id and the label
    one of the classes; with `schema.coerce`, `"1"` is class `1`. The event's time is when it was
    read (a plain record has none).
    """

    def __init__(self, schema: RecordSchema, pipeline: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.pipeline = pipeline
        self.max_bytes = max_bytes
        self.id_field = schema.record_id or "request_id"
        self._id_key, self._label_key = field_key(self.id_field), field_key(schema.label.name)
        label: Any = Literal.__getitem__(schema.label.classes)
        self.type = msgspec.defstruct(
            "LabelRecord",
            [(self._id_key, str | Annotated[int, _INT64]), (self._label_key, label)],
            frozen=True,
            rename=_renames([self.id_field, schema.label.name]),
        )
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(self.type, strict=not schema.coerce)
        self._id = re.compile(REQUEST_ID_PATTERN)

    def decode(self, data: bytes) -> LabelObserved:
        _check_size(data, self.max_bytes)
        try:
            record = self._decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as err:
            raise _explain(err, data) from None
        ident = str(getattr(record, self._id_key))
        if not self._id.match(ident):
            raise DecodeError(
                ErrorKind.INVALID_FIELD,
                f"field {self.id_field!r}: {ident[:80]!r} is not a valid request id",
                self.id_field,
            )
        return LabelObserved(
            event_id=deterministic_id(self.pipeline, "label", ident),
            occurred_at=utcnow(),
            request_id=ident,
            pipeline=self.pipeline,
            label=getattr(record, self._label_key),
        )


def events_or_label_records(codec: LabelRecordCodec, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """A batch decoder for topics that carry events and, on the labels topic, plain label records:
    a payload without an event `type` is read as a label record (and refused with that reason)."""

    def decode(payloads: Iterable[bytes | None]) -> list[Any]:
        payloads = list(payloads)
        out = decode_events(payloads, max_bytes)
        for i, result in enumerate(out):
            if isinstance(result, DecodeError) and result.kind is ErrorKind.MISSING_FIELD and result.field == "type":
                try:
                    out[i] = codec.decode(payloads[i])  # type: ignore[arg-type]
                except DecodeError as plain:
                    out[i] = plain
        return out

    return decode


def _renames(names: Iterable[str]) -> dict[str, str] | None:
    renamed = {field_key(n): n for n in names if field_key(n) != n}
    return renamed or None


def _record_type(schema: RecordSchema) -> type:
    label: Any = Literal.__getitem__(schema.label.classes)  # the classes become a Literal type
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    if schema.record_id is not None:
        fields.append((field_key(schema.record_id), str))
    if schema.entity_id is not None:
        fields.append((field_key(schema.entity_id), str | Annotated[int, _INT64]))
    if schema.timestamp is not None:
        fields.append((field_key(schema.timestamp), AwareDatetime))
    optional: list[tuple[str, Any, Any]] = []
    for feature in schema.features:
        tp = _feature_type(feature)
        if feature.nullable:
            optional.append((field_key(feature.name), tp | None, None))
        else:
            fields.append((field_key(feature.name), tp))
    optional.append((field_key(schema.label.name), label | None, None))
    return msgspec.defstruct(
        "Record",
        [*fields, *optional],
        frozen=True,
        forbid_unknown_fields=schema.unknown_fields == "reject",
        rename=_renames(schema.columns),
    )


def _feature_type(feature: Feature) -> Any:
    if feature.type == "category":
        return Literal.__getitem__(feature.categories)
    if feature.type == "bool":
        return bool
    if feature.type == "int":
        low = math.ceil(feature.min) if feature.min is not None else _INT64.ge
        high = math.floor(feature.max) if feature.max is not None else _INT64.le
        return Annotated[int, msgspec.Meta(ge=low, le=high)]
    low = feature.min if feature.min is not None else _FINITE.ge
    high = feature.max if feature.max is not None else _FINITE.le
    return Annotated[float, msgspec.Meta(ge=low, le=high)]


def _check_size(data: bytes, limit: int) -> None:
    if data is None or len(data) > limit:
        raise _size_error(data, limit)


def _size_error(data: bytes | None, limit: int) -> DecodeError:
    if data is None:
        return DecodeError(ErrorKind.INVALID_JSON, "empty record (null value, a tombstone)")
    return DecodeError(ErrorKind.OVERSIZED, f"payload of {len(data)} bytes exceeds the limit of {limit} bytes")


def _explain(err: Exception, data: bytes) -> DecodeError:
    """Work out the specific reason a payload failed (the slow path: failures only)."""
    if isinstance(err, UnicodeDecodeError):
        return DecodeError(ErrorKind.INVALID_UTF8, f"invalid UTF-8 at byte {err.start}")
    message = str(err)
    if isinstance(err, msgspec.ValidationError):
        return _explain_validation(message)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as bad:
        return DecodeError(ErrorKind.INVALID_UTF8, f"invalid UTF-8 at byte {bad.start}")
    found = _non_finite_constant(text)
    if found is not None:
        token, field = found
        where = f"field {field!r}: " if field else ""
        return DecodeError(
            ErrorKind.NON_FINITE, f"{where}non-finite number {token} (JSON allows finite numbers only)", field
        )
    return DecodeError(ErrorKind.INVALID_JSON, message)


def _explain_validation(message: str) -> DecodeError:
    at = _AT.search(message)
    field = at.group(1) if at else None
    if field is None:
        named = _NAMED.search(message)
        field = named.group(1) if named else None
    text = message[: at.start()] if at else message
    where = f"field {field!r}: " if field else ""
    if text.startswith("Object missing required field"):
        return DecodeError(ErrorKind.MISSING_FIELD, f"missing required field {field!r}", field)
    if text.startswith("Object contains unknown field"):
        return DecodeError(ErrorKind.UNKNOWN_FIELD, f"unknown field {field!r}", field)
    if text.startswith("Invalid enum value"):
        return DecodeError(
            ErrorKind.UNKNOWN_CATEGORY, f"{where}unknown category {text[len('Invalid enum value ') :]}", field
        )
    if text.startswith("Number out of range"):
        return DecodeError(ErrorKind.NON_FINITE, f"{where}number too large to be finite", field)
    if re.match(r"Expected `(int|float)` [<>]=", text):
        if "1.7976931348623157e+308" in text:
            return DecodeError(ErrorKind.NON_FINITE, f"{where}number too large to be finite", field)
        return DecodeError(ErrorKind.OUT_OF_RANGE, f"{where}{_lower(text)}", field)
    if text.startswith("Expected `str` matching regex") or text.startswith("Expected `str` of length"):
        return DecodeError(ErrorKind.INVALID_FIELD, f"{where}{_lower(text)}", field)
    if text.startswith("Expected") or text.startswith("Invalid RFC3339"):
        return DecodeError(ErrorKind.WRONG_TYPE, f"{where}{_lower(text)}", field)
    return DecodeError(ErrorKind.INVALID, f"{where}{text}", field)


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _non_finite_constant(text: str) -> tuple[str, str | None] | None:
    """The first NaN/Infinity token (Python's json writes them; strict JSON has none) and its field."""
    found: list[str] = []
    marker = object()

    def constant(token: str) -> object:
        found.append(token)
        return marker

    try:
        parsed = json.loads(text, parse_constant=constant)
    except ValueError:
        return None
    if not found:
        return None
    fields = [k for k, v in parsed.items() if v is marker] if isinstance(parsed, dict) else []
    return found[0], (fields[0] if fields else None)
