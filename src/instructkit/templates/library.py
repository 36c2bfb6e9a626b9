"""TemplateLibrary: the built-in collections plus user files, lookup, validation and PromptSource import.

Two file formats are read:
- instructkit collections: a top-level `schemas:` list, each schema with its `templates:` (docs/templates.md);
- PromptSource `templates.yaml` files as they are: `dataset:`/`subset:` and a `templates:` mapping of
  `!Template` objects with `!TemplateMetadata`, the prompt and target in one `jinja` string split by `|||`.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from instructkit.errors import TemplateError
from instructkit.templates.template import (
    CHOICE_FAMILIES,
    CHOICES_SEPARATOR,
    FIELD_TYPES,
    Schema,
    Template,
    compile_source,
    fields_read,
    render_bounded,
)

CATALOG_PACKAGE = "instructkit.templates.catalog"


# --------------------------------------------------------------------------------------------------
# YAML loading (safe: the two PromptSource tags build plain mappings, nothing else is constructed)
# --------------------------------------------------------------------------------------------------


class _CollectionLoader(yaml.SafeLoader):
    """SafeLoader that also accepts PromptSource's `!Template` and `!TemplateMetadata` tags."""


def _mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
    return loader.construct_mapping(node, deep=True)


_CollectionLoader.add_constructor("!Template", _mapping)
_CollectionLoader.add_constructor("!TemplateMetadata", _mapping)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{path}: template file not found") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except (OSError, ValueError) as exc:  # a folder, no permission, a NUL in the path
        raise TemplateError(f"{path}: cannot read the template file: {exc}") from None
    try:
        return yaml.load(text, Loader=_CollectionLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TemplateError(f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise TemplateError(f"{path}: invalid YAML: nested too deeply") from None


def load_collection(path: str | Path, origin: str | None = None) -> tuple[list[Schema], list[Template]]:
    """Read one collection file (instructkit or PromptSource format); `origin` names it in messages."""
    path = Path(path)
    data = _read_yaml(path)
    origin = origin or str(path)
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: expected a mapping with `schemas:` (or a PromptSource `templates:`)")
    if "schemas" in data:
        return _load_native(data, origin)
    if isinstance(data.get("templates"), dict):
        return _load_promptsource(data, origin)
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
        choices = tuple(str(c) for c in choices)
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


# PromptSource metric names -> ours, and the task family they imply.
_PS_METRICS = {
    "accuracy": "accuracy",
    "rouge": "rougeL",
    "bleu": "bleu",
    "squad": "exact_match",
    "other": None,
    "auc": None,
    "pearson correlation": None,
    "spearman correlation": None,
    "edit distance": None,
}


def _load_promptsource(data: dict, origin: str) -> tuple[list[Schema], list[Template]]:
    dataset = str(data.get("dataset") or Path(origin).parent.name or "promptsource")
    subset = data.get("subset")
    schema_name = f"{dataset}/{subset}" if subset else dataset
    templates: list[Template] = []
    for key, raw in data["templates"].items():
        where = f"{origin}: PromptSource template {key!r}"
        if not isinstance(raw, dict) or "jinja" not in raw:
            raise TemplateError(f"{where}: expected a !Template with a `jinja` field")
        jinja = str(raw["jinja"])
        parts = jinja.split(CHOICES_SEPARATOR)
        if len(parts) != 2:
            raise TemplateError(
                f"{where}: `jinja` must hold one '|||' between prompt and target, found {len(parts) - 1}"
            )
        meta = raw.get("metadata") or {}
        if not isinstance(meta, dict) or not isinstance(meta.get("metrics") or [], list):
            raise TemplateError(f"{where}: `metadata` must be a !TemplateMetadata mapping with a `metrics` list")
        ps_metrics = [str(m).lower() for m in meta.get("metrics") or []]
        metrics = tuple(dict.fromkeys(m for m in (_PS_METRICS.get(x) for x in ps_metrics) if m))
        choices = raw.get("answer_choices")
        task = _promptsource_task(choices, ps_metrics)
        name = str(raw.get("name", key))
        slug = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower() or str(key)
        template = Template(
            id=f"{schema_name}.{slug}",
            name=name,
            dataset=schema_name,
            task=task,
            instruction=parts[0],
            completion=parts[1],
            answer_choices=str(choices) if choices else None,
            choices_in_prompt=bool(meta.get("choices_in_prompt", False)),
            metrics=metrics,
            reference=str(raw.get("reference", "") or f"PromptSource template {raw.get('id', key)}"),
            origin=origin,
        )
        templates.append(template)
    # PromptSource files declare no schema: the fields are what the templates read, of any type.
    schema = Schema(name=schema_name, fields={}, description=f"imported from {origin}", origin=origin)
    return [schema], templates


def _promptsource_task(choices: Any, metrics: list[str]) -> str:
    if choices:
        return "classification"
    if "squad" in metrics:
        return "extractive_qa"
    if "bleu" in metrics:
        return "translation"
    if "rouge" in metrics:
        return "summarization"
    return "generation"


# --------------------------------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One failed check: which template, which rule, and what happened."""

    template_id: str
    rule: str
    detail: str
    row: int | None = None

    def __str__(self) -> str:
        row = f" (sample row {self.row})" if self.row is not None else ""
        return f"{self.template_id}: [{self.rule}]{row} {self.detail}"


class TemplateLibrary:
    """A set of schemas and templates with lookup and validation."""

    def __init__(self, schemas: Iterable[Schema], templates: Iterable[Template]):
        self.schemas: dict[str, Schema] = {}
        for schema in schemas:
            if schema.name in self.schemas:
                raise TemplateError(
                    f"{schema.origin}: schema {schema.name!r} is already defined in {self.schemas[schema.name].origin}"
                )
            self.schemas[schema.name] = schema
        self.templates: dict[str, Template] = {}
        self.duplicates: list[Problem] = []
        for template in templates:
            if template.id in self.templates:
                self.duplicates.append(
                    Problem(
                        template.id,
                        "duplicate-id",
                        f"id defined in {self.templates[template.id].origin} and again in {template.origin}",
                    )
                )
                continue
            self.templates[template.id] = template

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, paths: Sequence[str | Path]) -> TemplateLibrary:
        schemas: list[Schema] = []
        templates: list[Template] = []
        for path in paths:
            s, t = load_collection(path)
            schemas += s
            templates += t
        return cls(schemas, templates)

    @classmethod
    def builtin(cls) -> TemplateLibrary:
        """The built-in catalog (parsed once per process)."""
        return _builtin()

    @classmethod
    def load(cls, user_files: Sequence[str | Path] = (), include_builtin: bool = True) -> TemplateLibrary:
        """The built-in catalog plus the user's collection files."""
        if not user_files:
            return cls.builtin() if include_builtin else cls([], [])
        base = cls.builtin() if include_builtin else cls([], [])
        extra = cls.from_files(user_files)
        schemas = list(base.schemas.values()) + [s for s in extra.schemas.values() if s.name not in base.schemas]
        library = cls(schemas, list(base.templates.values()) + list(extra.templates.values()))
        library.duplicates = base.duplicates + extra.duplicates + library.duplicates
        return library

    # -- lookup ----------------------------------------------------------------------------------
    def get(self, template_id: str) -> Template:
        try:
            return self.templates[template_id]
        except KeyError:
            close = difflib.get_close_matches(template_id, list(self.templates), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `instructkit templates list`"
            raise TemplateError(f"unknown template id {template_id!r}{hint}") from None

    def schema(self, name: str) -> Schema:
        try:
            return self.schemas[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.schemas), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(self.schemas))}"
            raise TemplateError(f"unknown dataset schema {name!r}{hint}") from None

    def select(
        self, dataset: str | None = None, task: str | None = None, ids: Sequence[str] | None = None
    ) -> list[Template]:
        if ids:
            chosen = [self.get(i) for i in ids]
        else:
            chosen = list(self.templates.values())
        if dataset:
            chosen = [t for t in chosen if t.dataset == dataset]
        if task:
            chosen = [t for t in chosen if t.task == task]
        return chosen

    def __len__(self) -> int:
        return len(self.templates)

    # -- validation --------------------------------------------------------------------------------
    def check(
        self,
        rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        templates: Sequence[Template] | None = None,
        max_problems_per_template: int = 3,
        missing: dict[str, Counter] | None = None,
    ) -> list[Problem]:
        """Render every template on rows of its schema; return the problems found.

        `rows` maps a schema name to rows (already mapped to the schema's fields); without it the
        schema's built-in sample rows are used. A data row that lacks a value the template reads is the
        data's fault, not the template's: it is skipped and counted in `missing[template_id][field]`
        (prepare skips or rejects such rows by the same rule). Sample rows must have every field.
        """
        problems = list(self.duplicates)
        for template in templates if templates is not None else self.templates.values():
            schema = self.schemas.get(template.dataset)
            sample = rows.get(template.dataset) if rows is not None else None
            real_data = sample is not None
            if sample is None:
                sample = schema.samples if schema else ()
                if not sample:
                    problems.append(Problem(template.id, "no-sample-rows", "no sample rows to render it on"))
                    continue
            reads = sorted(template.fields_read & set(schema.fields)) if schema is not None else []
            found = 0
            for i, row in enumerate(sample):
                if real_data:
                    absent = [f for f in reads if row.get(f) is None]
                    if absent:
                        if missing is not None:
                            missing.setdefault(template.id, Counter()).update(absent)
                        continue
                for problem in check_row(template, schema, row, i):
                    problems.append(problem)
                    found += 1
                if found >= max_problems_per_template:
                    break
        return problems


def check_row(template: Template, schema: Schema | None, row: Mapping[str, Any], index: int) -> list[Problem]:
    """The rules `instructkit templates check` applies to one template on one row."""
    problems: list[Problem] = []
    if schema is not None and schema.fields:
        undeclared = template.fields_read - set(schema.fields)
        if undeclared and index == 0:
            problems.append(
                Problem(template.id, "undeclared-field", f"reads {sorted(undeclared)} not declared in schema {schema.name!r}")
            )
        try:
            row = schema.coerce(row)
        except ValueError as exc:
            return [Problem(template.id, "bad-value", str(exc), index)]
        label_problem = schema.check_label(row)
        if label_problem:
            problems.append(Problem(template.id, "label-outside-map", label_problem, index))
            return problems
    try:
        rendered = template.render(row, seed=index)
    except TemplateError as exc:
        rule = "undefined-field" if "undefined field" in str(exc) else "render-error"
        return problems + [Problem(template.id, rule, str(exc), index)]
    if not rendered.prompt:
        problems.append(Problem(template.id, "empty-prompt", "the instruction renders empty", index))
    if not rendered.completion:
        problems.append(Problem(template.id, "empty-completion", "the completion renders empty", index))
    if rendered.choices is not None:
        if any(not c for c in rendered.choices):
            problems.append(Problem(template.id, "empty-choice", f"an answer choice renders empty: {rendered.choices}", index))
        if rendered.completion and rendered.completion not in rendered.choices:
            problems.append(
                Problem(
                    template.id,
                    "target-not-in-choices",
                    f"completion {rendered.completion!r} is not one of the answer choices {list(rendered.choices)}",
                    index,
                )
            )
    elif template.task in CHOICE_FAMILIES:
        problems.append(Problem(template.id, "missing-choices", f"task {template.task!r} needs answer_choices", index))
    return problems


@functools.lru_cache(maxsize=1)
def _builtin() -> TemplateLibrary:
    files = sorted(
        (entry for entry in resources.files(CATALOG_PACKAGE).iterdir() if entry.name.endswith(".yaml")),
        key=lambda entry: entry.name,
    )
    schemas: list[Schema] = []
    templates: list[Template] = []
    for entry in files:
        with resources.as_file(entry) as path:
            s, t = load_collection(path, origin=f"catalog/{entry.name}")
        schemas += s
        templates += t
    return TemplateLibrary(schemas, templates)


__all__ = [
    "Problem",
    "TemplateLibrary",
    "check_row",
    "compile_source",
    "fields_read",
    "load_collection",
    "render_bounded",
]
