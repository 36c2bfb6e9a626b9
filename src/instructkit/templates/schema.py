"""Schema: a dataset layout (typed fields, the label field and label map, sample rows), label keys, and the
conversion of row values to the declared field types."""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

FIELD_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,4000}")
"""Integer text int() reads exactly (float() rounds past 2**53: 12345678901234567891 -> ...568), within
Python's 4,300-digit limit on converting text to int."""


def label_key(value: Any) -> str:
    """Canonical form of a label value for comparing with label-map keys: 5, 5.0 and "5" agree; a text is in
    Unicode NFC ("cafe\u0301" and "caf\u00e9" agree)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        text = unicodedata.normalize("NFC", value.strip())
        if _INTEGER_TEXT.fullmatch(text):
            return str(int(text))
        try:
            number = float(text)
        except ValueError:
            return text
        return str(int(number)) if number.is_integer() else text
    return str(value)


def missing_kind(value: Any) -> str | None:
    """How `value` is missing ("null", "NaN", "empty text"), or None when it holds a value."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else None
    if isinstance(value, str) and (not value or value.isspace()):
        return "empty text"
    return None


@dataclass(frozen=True)
class Schema:
    """A dataset layout: its fields with types, the label field and label map, sample rows."""

    name: str
    fields: dict[str, str]
    description: str = ""
    source: str = ""
    label_field: str | None = None
    label_map: dict[Any, str] | None = None
    samples: tuple[dict, ...] = ()
    origin: str = "<builtin>"

    def coerce(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Convert the declared fields of `row` to their declared types.

        Raises ValueError naming the field when a value cannot be converted (the caller adds the
        file and row). Fields not declared pass through unchanged.
        """
        out = dict(row)
        for name, type_name in self.fields.items():
            if name not in out or out[name] is None:
                continue
            out[name] = _coerce_value(out[name], type_name, name)
        return out

    def check_label(self, row: Mapping[str, Any]) -> str | None:
        """A problem description when the row's label is outside the label map, else None."""
        if not self.label_field or not self.label_map or self.label_field not in row:
            return None
        value = row[self.label_field]
        keys = self._label_names
        if label_key(value) not in keys:
            allowed = ", ".join(sorted(keys))
            return f"label {self.label_field}={value!r} is outside the label map ({allowed})"
        return None

    def label_name(self, value: Any) -> str:
        """The label map's name for a coded label value (the value itself without a map)."""
        if self.label_map:
            return self._label_names.get(label_key(value), str(value))
        return label_key(value)

    @functools.cached_property
    def _label_names(self) -> dict[str, str]:
        """label_key of each label-map key -> its name (computed once: `check_label` runs for every row)."""
        return {label_key(k): v for k, v in (self.label_map or {}).items()}


def _coerce_value(value: Any, type_name: str, name: str) -> Any:
    if type_name == "str":
        if isinstance(value, (dict, list)):
            raise ValueError(f"field {name!r} should be text, got {type(value).__name__}")
        return value if isinstance(value, str) else label_key(value) if isinstance(value, float) else str(value)
    if type_name == "int":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
            return int(value)  # exact, as JSON and Parquet give it
        if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
            return int(value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"field {name!r} should be an integer, got {value!r}") from None
        if not number.is_integer():
            raise ValueError(f"field {name!r} should be an integer, got {value!r}")
        return int(number)
    if type_name == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"field {name!r} should be a number, got {value!r}") from None
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"true", "1", "yes", "1.0"}:
            return True
        if text in {"false", "0", "no", "0.0"}:
            return False
        raise ValueError(f"field {name!r} should be true/false, got {value!r}")
    if type_name in ("list", "dict"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        if not isinstance(value, FIELD_TYPES[type_name]):
            raise ValueError(f"field {name!r} should be a {type_name}, got {type(value).__name__}")
        return value
    raise ValueError(f"unknown field type {type_name!r} for field {name!r}")
