"""Reading one collection file: the instructkit format, or a PromptSource file handed to `promptsource`.

The instructkit format is a top-level `schemas:` list, each schema with its `templates:` (docs/templates.md).
YAML loading is safe: the two PromptSource tags build plain mappings, nothing else is constructed.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from instructkit.errors import TemplateError
from instructkit.io import read_yaml
from instructkit.templates.promptsource import load_promptsource
from instructkit.templates.schema import FIELD_TYPES, Schema
from instructkit.templates.template import Template


class _CollectionLoader(yaml.SafeLoader):
    """SafeLoader that also accepts PromptSource's `!Template` and `!TemplateMetadata` tags."""


def _mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
    return loader.construct_mapping(node, deep=True)


_CollectionLoader.add_constructor("!Template", _mapping)
_CollectionLoader.add_constructor("!TemplateMetadata", _mapping)


def _read_yaml(path: Path) -> Any:
    return read_yaml(path, error=TemplateError, what="template file", loader=_CollectionLoader)


def load_collection(path: str | Path, origin: str | None = None) -> tuple[list[Schema], list[Template]]:
    """Read one collection file (instructkit or PromptSource format); `origin` names it in messages.

    Raises: TemplateError naming the file (and schema or template) when it cannot be read or parsed, breaks
    the format (unknown keys, wrong types, missing fields), or holds Jinja that does not compile.
    """
    path = Path(path)
    data = _read_yaml(path)
    origin = origin or str(path)
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: expected a mapping with `schemas:` (or a PromptSource `templates:`)")
    if "schemas" in data:
        return _load_native(data, origin)
    if isinstance(data.get("templates"), dict):
        return load_promptsource(data, origin)
    raise TemplateError(f"{path}: expected a top-level `schemas:` list or a PromptSource `templates:` mapping")


_SCHEMA_KEYS = {"name", "description", "source", "fields", "label_field", "label_map", "samples", "templates"}
_TEMPLATE_KEYS = {
    "id",
    "name",
    "task",
    "instruction",
    "completion",
    "answer_choices",
    "choices_in_prompt",
    "metrics",
    "reference",
}


def _unknown_keys(given: Iterable[str], valid: set[str], where: str) -> None:
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=1)  # YAML keys may be null or numbers
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(sorted(valid))})"
            raise TemplateError(f"{where}: unknown key {key!r}{hint}")


def _load_native(data: dict, origin: str) -> tuple[list[Schema], list[Template]]:
    schemas: list[Schema] = []
    templates: list[Template] = []
    if not isinstance(data["schemas"], list):
        raise TemplateError(f"{origin}: `schemas` must be a list")
    for i, raw in enumerate(data["schemas"]):
        where = f"{origin}: schemas[{i}]"
        if not isinstance(raw, dict) or "name" not in raw:
            raise TemplateError(f"{where}: each schema needs a `name`")
        where = f"{origin}: schema {raw['name']!r}"
        _unknown_keys(raw, _SCHEMA_KEYS, where)
        fields = raw.get("fields") or {}
        if not isinstance(fields, dict):
            raise TemplateError(f"{where}: `fields` must map field names to types")
        for fname, ftype in fields.items():
            if not isinstance(ftype, str) or ftype not in FIELD_TYPES:
                raise TemplateError(
                    f"{where}: field {fname!r} has unknown type {ftype!r} (one of {', '.join(FIELD_TYPES)})"
                )
        label_map = raw.get("label_map")
        if label_map is not None and not isinstance(label_map, dict):
            raise TemplateError(f"{where}: `label_map` must be a mapping of coded values to names")
        label_field = raw.get("label_field")
        if label_field is not None and not isinstance(label_field, str):
            raise TemplateError(f"{where}: `label_field` must be the name of one of its fields")
        samples = raw.get("samples") or []
        if not isinstance(samples, list) or not all(isinstance(row, dict) for row in samples):
            raise TemplateError(f"{where}: `samples` must be a list of rows (mappings of field to value)")
        template_list = raw.get("templates") or []
        if not isinstance(template_list, list):
            raise TemplateError(f"{where}: `templates` must be a list")
        schema = Schema(
            name=str(raw["name"]),
            fields={str(k): str(v) for k, v in fields.items()},
            description=str(raw.get("description", "")),
            source=str(raw.get("source", "")),
            label_field=label_field,
            label_map={k: str(v) for k, v in label_map.items()} if label_map else None,
            samples=tuple(samples),
            origin=origin,
        )
        if schema.label_field and schema.label_field not in schema.fields:
            raise TemplateError(f"{where}: label_field {schema.label_field!r} is not one of its fields")
        schemas.append(schema)
        for j, traw in enumerate(template_list):
            templates.append(_native_template(traw, schema, f"{where}: templates[{j}]"))
    return schemas, templates


def _native_template(raw: Any, schema: Schema, where: str) -> Template:
    if not isinstance(raw, dict):
        raise TemplateError(f"{where}: a template must be a mapping")
    _unknown_keys(raw, _TEMPLATE_KEYS, where)
    for key in ("id", "task", "instruction", "completion"):
        if not raw.get(key):
            raise TemplateError(f"{where}: missing `{key}`")
    choices = raw.get("answer_choices")
    if isinstance(choices, list):
        # stripped as rendered completions and `|||` choices are: [" yes", " no"] (a leading space, as
        # lm-evaluation-harness writes targets) is yes / no, never a list no completion can match
        choices = tuple(str(c).strip() for c in choices)
        if "" in choices or len({unicodedata.normalize("NFC", c) for c in choices}) < len(choices):
            raise TemplateError(f"{where}: `answer_choices` {list(raw['answer_choices'])} has an empty or repeated "
                                "choice (choices are compared without surrounding whitespace, up to Unicode NFC)")
    elif choices is not None and not isinstance(choices, str):
        raise TemplateError(f"{where}: `answer_choices` must be a list or a Jinja string with |||")
    metrics = raw.get("metrics") or ()
    if not isinstance(metrics, (list, tuple)):
        raise TemplateError(f"{where}: `metrics` must be a list of metric names")
    return Template(
        id=str(raw["id"]),
        name=str(raw.get("name", raw["id"])),
        dataset=schema.name,
        task=str(raw["task"]),
        instruction=str(raw["instruction"]),
        completion=str(raw["completion"]),
        answer_choices=choices,
        choices_in_prompt=bool(raw.get("choices_in_prompt", False)),
        metrics=tuple(str(m) for m in metrics),
        reference=str(raw.get("reference", "")),
        label_map=schema.label_map,
        origin=schema.origin,
    )
