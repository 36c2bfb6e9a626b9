"""TemplateLibrary: the built-in catalog plus user collection files, lookup, and validation (`check_row`)."""

from __future__ import annotations

import difflib
import functools
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from instructkit.errors import TemplateError
from instructkit.templates.collection import load_collection
from instructkit.templates.schema import Schema
from instructkit.templates.template import CHOICE_FAMILIES, Template

CATALOG_PACKAGE = "instructkit.templates.catalog"


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
    """A set of schemas and templates with lookup and validation.

    Raises (on construction): TemplateError when two schemas share a name. A template id defined twice is
    kept once and reported by `check` (rule duplicate-id).
    """

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
        """The schemas and templates of the given collection files.

        Raises: TemplateError from `load_collection`, or when a schema is defined twice.
        """
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
        """The built-in catalog plus the user's collection files.

        Raises: TemplateError from `load_collection`, or when the user files define one schema twice.
        """
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
        """The template with this id.

        Raises: TemplateError for an unknown id, suggesting close matches.
        """
        try:
            return self.templates[template_id]
        except KeyError:
            close = difflib.get_close_matches(template_id, list(self.templates), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `instructkit templates list`"
            raise TemplateError(f"unknown template id {template_id!r}{hint}") from None

    def schema(self, name: str) -> Schema:
        """The dataset schema with this name.

        Raises: TemplateError for an unknown name, suggesting close matches or listing the known ones.
        """
        try:
            return self.schemas[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.schemas), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(self.schemas))}"
            raise TemplateError(f"unknown dataset schema {name!r}{hint}") from None

    def select(
        self, dataset: str | None = None, task: str | None = None, ids: Sequence[str] | None = None
    ) -> list[Template]:
        """The templates with these ids (default: all), kept when they match `dataset` and `task`.

        Raises: TemplateError for an unknown id.
        """
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
        (prepare skips or rejects such rows by the same rule). Sample rows must have every field. A template
        with answer choices that reads the label is also rendered for every value of the label map
        (`check_label_map`), so a label the choices leave out fails before any real row has it.
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
            problems += check_label_map(template, schema, sample)
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
        forms = Counter(unicodedata.normalize("NFC", c) for c in rendered.choices)
        if len(forms) < len(rendered.choices):  # rank classification cannot tell them apart
            same = [c for c in rendered.choices if forms[unicodedata.normalize("NFC", c)] > 1]
            problems.append(Problem(template.id, "duplicate-choice", f"answer choices {same} are the same text "
                                    "(up to Unicode canonical equivalence, NFC)", index))
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


def check_label_map(template: Template, schema: Schema | None, rows: Sequence[Mapping[str, Any]]) -> list[Problem]:
    """Render `template` once for every value of the schema's label map (on the first row of `rows` with
    the label replaced) and report each label whose completion is not among the answer choices (rule
    label-not-in-choices). Nothing to check without answer choices, a label map, a row, or when the
    template does not read the label field; rows that fail to render are left to `check_row`."""
    if (schema is None or not schema.label_field or not schema.label_map or template.answer_choices is None
            or schema.label_field not in template.fields_read or not rows):
        return []
    problems = []
    base = dict(rows[0])
    for key, name in schema.label_map.items():
        try:
            row = schema.coerce({**base, schema.label_field: key}) if schema.fields else {**base, schema.label_field: key}
            rendered = template.render(row, seed=0)
        except (ValueError, TemplateError):
            continue
        if rendered.choices is not None and rendered.completion and rendered.completion not in rendered.choices:
            problems.append(Problem(
                template.id, "label-not-in-choices",
                f"label {schema.label_field}={key!r} ({name!r} in the label map) renders the completion "
                f"{rendered.completion!r}, which is not one of the answer choices {list(rendered.choices)}"))
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


__all__ = ["Problem", "TemplateLibrary", "check_label_map", "check_row"]
