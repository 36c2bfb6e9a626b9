"""Row checking: map a table's columns to fields, convert each value, check labels and instruction rows.

Each file's columns are mapped to schema fields (`columns: {field: column}`; a list of candidate columns
takes the first one the file has, so one mapping serves split files whose headers differ, e.g. SST-2
`sentence` in train.tsv and `content` in dev.tsv), values are converted with `Schema.coerce` (a 2018
Amazon `overall: 5.0` becomes 5 when the schema says int) and the label is checked against the schema's
label map (a Hugging Face ClassLabel id through its name: `RowChecker.label_codes`). A bad row stops
reading with a DataError naming file, line, column and the templates that read the column, unless
`skip_bad_rows` is on: then it is skipped and counted by reason.

What counts as missing is one rule for every format (`missing_kind`): null (JSON null, a Parquet or
Arrow null, None), a float NaN (a bare `NaN` written by `json.dumps`, a NaN cell pandas wrote to Parquet)
and text that is empty or only whitespace (an empty CSV/TSV cell, quoted `""` or not: the csv module
cannot tell them apart, and pandas writes a NaN as an empty cell). The text "nan" or "NULL" is text. A
missing value in a field a template reads, the label, a `dedup_key` or `group_by` field is a bad row
("missing value (<column>)"), exactly like null; a field that every template reading it tests first
(`{% if input %}`, Alpaca's optional input) may be missing and becomes "" (text) or null; any other
field that is missing becomes null.

Data already in instruction form needs no schema and no template:
    prompt/completion   rows with `prompt` and `completion`; a trailing end-of-sequence marker such as
                        "<|endoftext|>" is stripped from the completion (tokenization adds the model's own)
    chat                rows with `messages: [{role, content}, ...]` or ShareGPT `conversations: [{from,
                        value}, ...]` (and `tools`) ending with an assistant turn: the final assistant
                        turn is the completion, the turns before it are kept as `messages` so
                        tokenization can apply a chat template (chat_rows.py reads them); the plain-text
                        `prompt` is the user's message for a single exchange, else "role: content" lines.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from instructkit.data.chat_rows import chat_row
from instructkit.data.table import Problems, Table, separator_hint
from instructkit.errors import DataError
from instructkit.templates.schema import Schema, label_key, missing_kind
from instructkit.templates.template import Template, strip_eos


def column_candidates(columns: Mapping[str, Any], name: str) -> list[str]:
    """The columns that may hold field `name` under the `columns:` mapping (the name itself by default)."""
    value = columns.get(name, name)
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


class RowChecker:
    """Maps one table's columns to fields, converts and checks each row (the per-row hot loop).

    Raises (when built): DataError naming the file's columns and the closest match when a required field
    has no column.
    """

    def __init__(
        self,
        table: Table,
        schema: Schema | None,
        fields: Sequence[str],
        required: set[str],
        columns: Mapping[str, Any],
        templates: Sequence[Template],
        problems: Problems,
        label: str | None,
    ):
        self.table, self.schema, self.problems, self.templates = table, schema, problems, templates
        self.columns = columns
        self.mapping: dict[str, str] = {}
        present = set(table.columns)
        for name in fields:
            for candidate in column_candidates(columns, name):
                if candidate in present:
                    self.mapping[name] = candidate
                    break
            else:
                if name in required:
                    raise DataError(self._missing_column(name, schema))
        self.renames = [(f, c) for f, c in self.mapping.items() if f != c]
        self.coerce = schema.coerce if schema is not None and schema.fields else None
        self.label = label if label in self.mapping else None
        self.label_codes = self._class_label_codes(label) if label in self.mapping else None
        # fields every template that reads them tests first (`{% if input %}`) may be missing
        optional = {
            f for f in self.mapping
            if any(f in t.fields_read for t in templates)
            and all(f in t.fields_optional for t in templates if f in t.fields_read)
        }
        non_text = {f for f, kind in (schema.fields if schema is not None else {}).items() if kind != "str"}
        self.required = [
            f for f in self.mapping if (f in required and f not in optional) or f == self.label
        ]
        # the other mapped fields: a missing value becomes "" (optional text a template tests) or None
        self.blank = [(f, "" if f in optional and f not in non_text else None)
                      for f in self.mapping if f not in self.required]

    def _class_label_codes(self, label: str) -> dict[int, Any] | None:
        """ClassLabel id -> the schema's label code of the same name, when the label column is a Hugging Face
        ClassLabel whose names are the label map's (AG News: ids 0-3 named World..Sci/Tech, the schema's codes
        1-4 with those names); None when the ids are the codes already or its names are none of the map's.

        Raises: DataError when only some of its names are the label map's (the ids cannot be placed)."""
        names = self.table.class_labels.get(self.mapping[label])
        label_map = self.schema.label_map if self.schema is not None else None
        if not names or not label_map:
            return None
        by_name: dict[str, Any] = {}
        for code, name in label_map.items():
            by_name.setdefault(_name_key(str(name)), code)
        codes = {i: by_name.get(_name_key(name)) for i, name in enumerate(names)}
        unknown = [names[i] for i, code in codes.items() if code is None]
        if len(unknown) == len(names) or all(label_key(code) == str(i) for i, code in codes.items()):
            return None
        if unknown:
            raise DataError(
                f"{self.table.path}: {self.column(label)} is a ClassLabel named {list(names)}, but "
                f"{unknown} are not names in the label map of schema {self.schema.name!r} "  # type: ignore[union-attr]
                f"({', '.join(map(str, label_map.values()))}): its ids cannot be matched to the schema's labels"
            )
        return codes

    def _readers(self, name: str) -> str:
        ids = [t.id for t in self.templates if name in t.fields_read]
        return f"; read by template(s) {', '.join(ids)}" if ids else ""

    def _missing_column(self, name: str, schema: Schema | None) -> str:
        wanted = column_candidates(self.columns, name)
        cols = self.table.columns
        lower = {c.lower(): c for c in cols}
        close: list[str] = []
        for candidate in dict.fromkeys([*wanted, name]):
            if candidate.lower() in lower:
                close.append(lower[candidate.lower()])
            close += difflib.get_close_matches(candidate, cols, n=1, cutoff=0.6)
        close = list(dict.fromkeys(close))
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        advice = f" (map it with `columns: {{{name}: <column>}}`)"
        separator = delimiter_hint(self.table)
        if separator:
            hint, advice = "", separator
        of_schema = f" of schema {schema.name!r}" if schema is not None else ""
        what = " or ".join(repr(c) for c in wanted)
        return (
            f"{self.table.path}: no column {what} for field {name!r}{of_schema}{self._readers(name)}; "
            f"the file has columns: {', '.join(cols)}{hint}{advice}"
        )

    def column(self, name: str) -> str:
        col = self.mapping.get(name, name)
        return f"column {col!r}" if col == name else f"column {col!r} (field {name!r})"

    def check(self, i: int, row: dict) -> dict | None:
        """Row `i` with fields renamed, converted and its label checked; None when it is bad and skipped.

        Raises: DataError for a missing value, a bad value or a label outside the map, unless skipping.
        """
        for name, col in self.renames:
            row[name] = row.get(col)
        if self.label_codes is not None:
            self.recode(row)
        for name in self.required:
            kind = missing_kind(row.get(name))
            if kind is not None:
                self.problems.bad(
                    f"missing value ({self.mapping.get(name, name)})",
                    f"{self.table.path}: {self.table.where(i)}: {self.column(name)} is missing ({kind})"
                    f"{self._readers(name)}",
                )
                return None
        for name, empty in self.blank:
            if missing_kind(row.get(name)) is not None:
                row[name] = empty
        if self.coerce is not None:
            try:
                row = self.coerce(row)
            except ValueError as exc:
                name = self._failing_field(row)
                self.problems.bad(
                    f"bad value ({self.mapping.get(name, name)})",
                    f"{self.table.path}: {self.table.where(i)}: {self.column(name)}: {exc} "
                    f"(schema {self.schema.name!r}{self._readers(name)})",  # type: ignore[union-attr]
                )
                return None
            if self.label is not None:
                problem = self.schema.check_label(row)  # type: ignore[union-attr]
                if problem:
                    if row[self.label] == -1 and self.mapping[self.label] in self.table.class_labels:
                        problem += " (-1 is a ClassLabel's 'no label', as in an unlabelled test split)"
                    self.problems.bad(
                        "label outside the label map",
                        f"{self.table.path}: {self.table.where(i)}: {self.column(self.label)}: {problem} "
                        f"(schema {self.schema.name!r}{self._readers(self.label)})",  # type: ignore[union-attr]
                    )
                    return None
        return row

    def convert(self, row: dict) -> dict:
        """`check` of a row known to pass it (prepared in bounded memory, its second read): renamed,
        blanks filled, converted; nothing checked again."""
        for name, col in self.renames:
            row[name] = row.get(col)
        if self.label_codes is not None:
            self.recode(row)
        for name, empty in self.blank:
            if missing_kind(row.get(name)) is not None:
                row[name] = empty
        return self.coerce(row) if self.coerce is not None else row

    def recode(self, row: dict) -> None:
        """A ClassLabel id in the label field -> the schema's code of its name (`label_codes`)."""
        value = row.get(self.label)  # type: ignore[arg-type]
        if type(value) is int and value in self.label_codes:  # type: ignore[operator]
            row[self.label] = self.label_codes[value]  # type: ignore[index]

    def _failing_field(self, row: dict) -> str:
        for name in self.schema.fields:  # type: ignore[union-attr]
            if name in row and row[name] is not None:
                try:
                    self.schema.coerce({name: row[name]})  # type: ignore[union-attr]
                except ValueError:
                    return name
        return "?"


def delimiter_hint(table: Table) -> str:
    """Why a CSV/TSV header is one column holding another separator (a semicolon CSV from a European Excel,
    a tab-separated .csv): the separator is fixed by the format or `delimiter:`, never guessed (sniffing
    guesses wrong, pandas-dev/pandas#53035)."""
    if table.format not in ("csv", "tsv"):
        return ""
    return separator_hint(table.columns, table.format, table.delimiter)


def instruction_row(kind: str, row: dict, where: str, problems: Problems, eos: Counter) -> dict | None:
    """Check a prompt/completion or chat row and set its `prompt`, `completion` (and `messages`).

    A stripped EOS marker is counted in `eos`. None when the row is bad and skipped.
    Raises: DataError through `problems` for an empty or non-text field or malformed messages, unless
    skipping.
    """
    if kind == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str) or not value.strip():
                problems.bad(
                    f"empty or missing {name}", f"{where}: column {name!r} is empty, missing or not text"
                )
                return None
        completion, marker = strip_eos(completion)  # type: ignore[arg-type]
        if marker:
            eos[marker] += 1
        if not completion:
            problems.bad(
                "empty completion", f"{where}: column 'completion' holds only an end-of-sequence marker"
            )
            return None
        row["prompt"] = prompt.strip()  # type: ignore[union-attr]
        row["completion"] = completion
        return row
    return chat_row(row, where, problems, eos)


def instruction_kind(columns: Iterable[str], mapping: Mapping[str, Any]) -> str | None:
    """The kind of instruction data: "chat" with a `messages` (or ShareGPT `conversations`) column,
    "prompt_completion" with both of
    those columns, else None."""
    present = set(columns)

    def has(name: str) -> bool:
        return any(c in present for c in column_candidates(mapping, name))

    if has("messages") or has("conversations"):
        return "chat"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    return None


def _name_key(name: str) -> str:
    """A ClassLabel or label-map name as the two are matched: stripped, casefolded, in Unicode NFC."""
    return unicodedata.normalize("NFC", name.strip().casefold())
