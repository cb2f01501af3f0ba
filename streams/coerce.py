"""Lossless coercion of a record's values to its schema's field types. Pure.

What files and other tools give is often not the JSON type a field wants: `csv` gives every value
as a string (`"50"`), pandas makes an int column with gaps a float one (`50.0`), times come as
epoch seconds or ISO text without a zone. `coerce_record` converts such a value only where nothing
is lost (`"50"` and `50.0` become `50`; `50.5` stays and is then refused by the codec; `"nan"`
stays a string), so a record that still disagrees with its schema is reported by the codec, with
the field and the reason, as before.

>>> from streams.config import Feature, LabelSpec, RecordSchema
>>> schema = RecordSchema(label=LabelSpec("y", (0, 1)), features=(Feature("age", "int"),))
>>> coerce_record(schema, {"record_id": 7, "age": "50", "y": "1"})
{'record_id': '7', 'age': 50, 'y': 1}
>>> coerce_record(schema, {"record_id": "a", "age": 50.5, "y": 1.0})
{'record_id': 'a', 'age': 50.5, 'y': 1}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import date, datetime, timezone
from typing import Any

from streams.config import Feature, RecordSchema

__all__ = ["coerce_record", "coerce_time", "coerce_value"]

_INT = re.compile(r"^[+-]?\d+$")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
_MISSING = ("", "na", "n/a", "nan", "null", "none", "?")  # what files write for a missing value


def coerce_record(schema: RecordSchema, record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `record` with each known field converted where that is lossless (see above)."""
    out = dict(record)
    features = {f.name: f for f in schema.features}
    for name, value in record.items():
        if value is None:
            continue
        feature = features.get(name)
        if feature is not None:
            out[name] = coerce_value(feature, value)
        elif name == schema.label.name:
            out[name] = _coerce_class(schema.label.classes, value)
        elif name == schema.timestamp:
            out[name] = coerce_time(value)
        elif name == schema.record_id:
            out[name] = _as_text(value)
        elif name == schema.entity_id:
            out[name] = _as_entity(value)
    return out


def coerce_value(feature: Feature, value: Any) -> Any:
    """One feature value in the type of `feature`, or unchanged where conversion would lose something."""
    if isinstance(value, str) and feature.nullable and value.strip().lower() in _MISSING:
        return None
    if isinstance(value, float) and math.isnan(value) and feature.nullable:
        return None
    if feature.type == "int":
        return _as_int(value)
    if feature.type == "float":
        return _as_float(value)
    if feature.type == "bool":
        return _as_bool(value)
    return _as_category(feature.categories, value)


def coerce_time(value: Any) -> Any:
    """An aware datetime from epoch seconds or ISO 8601 text (no zone: UTC), else `value` as it is."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    number = _as_float(value) if isinstance(value, str) else value
    if isinstance(number, (int, float)) and not isinstance(number, bool):
        if not math.isfinite(number):
            return value
        try:
            return datetime.fromtimestamp(number, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return value
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)
    return value


def _integral(value: float) -> bool:
    """A float that is a whole number a float holds exactly (beyond 2**53 it may not be the one written)."""
    return math.isfinite(value) and value.is_integer() and abs(value) <= 2**53


def _as_int(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and _integral(value):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if _INT.match(text):
            return int(text)
        number = _as_float(text)
        if isinstance(number, float) and _integral(number):
            return int(number)
    return value


def _as_float(value: Any) -> Any:
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return value
        return number if math.isfinite(number) else value  # "nan", "inf": left for the codec to refuse
    return value


def _as_bool(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return value


def _as_category(categories: tuple[str, ...], value: Any) -> Any:
    if isinstance(value, (str, bool)):
        return value
    if isinstance(value, float) and _integral(value):
        value = int(value)
    text = str(value)
    return text if text in categories else value


def _coerce_class(classes: tuple[str | int, ...], value: Any) -> Any:
    if isinstance(classes[0], int):
        return _as_int(value)
    return _as_category(tuple(str(c) for c in classes), value)


def _as_text(value: Any) -> Any:
    if isinstance(value, float) and _integral(value):
        value = int(value)
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _as_entity(value: Any) -> Any:
    if isinstance(value, float) and _integral(value):
        return int(value)
    return value
