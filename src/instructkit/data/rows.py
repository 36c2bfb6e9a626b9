"""Row checking: map a table's columns to fields, convert each value, check labels and instruction rows.

Each file's columns are mapped to schema fields (`columns: {field: column}`; a list of candidate columns
takes the first one the file has, so one mapping serves split files whose headers differ, e.g. SST-2
`sentence` in train.tsv and `content` in dev.tsv), values are converted with `Schema.coerce` (a 2018
Amazon `overall: 5.0` becomes 5 when the schema says int) and the label is checked against the schema's
label map. A bad row stops reading with a DataError naming file, line, column and the templates that read
the column, unless `skip_bad_rows` is on: then it is skipped and counted by reason.

Data already in instruction form needs no schema and no template:
    prompt/completion   rows with `prompt` and `completion`; a trailing end-of-sequence marker such as
                        "<|endoftext|>" is stripped from the completion (tokenization adds the model's own)
    chat                rows with `messages: [{role, content}, ...]` ending with an assistant turn: the
                        final assistant turn is the completion, the turns before it are kept as
                        `messages` so tokenization can apply a chat template; the plain-text `prompt` is
                        the user's message for a single exchange, else "role: content" lines.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from instructkit.data.chat import CHAT_ROLES, chat_prompt
from instructkit.data.table import Problems, Table
from instructkit.errors import DataError
from instructkit.templates.schema import Schema
from instructkit.templates.template import Template

KNOWN_EOS_MARKERS = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "<eos>",
)
"""End-of-sequence markers stripped from the end of ready-made completions (tokenize adds the real EOS)."""


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
        self.required = [f for f in fields if f in required]
        self.coerce = schema.coerce if schema is not None and schema.fields else None
        self.label = label if label in self.mapping else None

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
        of_schema = f" of schema {schema.name!r}" if schema is not None else ""
        what = " or ".join(repr(c) for c in wanted)
        return (
            f"{self.table.path}: no column {what} for field {name!r}{of_schema}{self._readers(name)}; "
            f"the file has columns: {', '.join(cols)}{hint} (map it with `columns: {{{name}: <column>}}`)"
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
        for name in self.required:
            if row.get(name) is None:
                self.problems.bad(
                    f"missing value ({self.mapping.get(name, name)})",
                    f"{self.table.path}: {self.table.where(i)}: {self.column(name)} is missing or null"
                    f"{self._readers(name)}",
                )
                return None
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
                    self.problems.bad(
                        "label outside the label map",
                        f"{self.table.path}: {self.table.where(i)}: {self.column(self.label)}: {problem} "
                        f"(schema {self.schema.name!r}{self._readers(self.label)})",  # type: ignore[union-attr]
                    )
                    return None
        return row

    def _failing_field(self, row: dict) -> str:
        for name in self.schema.fields:  # type: ignore[union-attr]
            if name in row and row[name] is not None:
                try:
                    self.schema.coerce({name: row[name]})  # type: ignore[union-attr]
                except ValueError:
                    return name
        return "?"


def strip_eos(text: str) -> tuple[str, str | None]:
    """`text` without surrounding whitespace and one trailing known EOS marker (and the marker found)."""
    text = text.strip()
    for marker in KNOWN_EOS_MARKERS:
        if text.endswith(marker):
            return text[: -len(marker)].rstrip(), marker
    return text, None


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
    messages = row.get("messages")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError:
            pass
    if not isinstance(messages, list) or not messages:
        problems.bad(
            "bad messages", f"{where}: column 'messages' must be a non-empty list of {{role, content}}"
        )
        return None
    turns = []
    for j, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or role.lower() not in CHAT_ROLES or not isinstance(content, str):
            problems.bad(
                "bad messages",
                f"{where}: column 'messages': turn {j + 1} must be "
                "{role: system|user|assistant, content: text}, "
                f"got {str(message)[:120]}",
            )
            return None
        turns.append({"role": role.lower(), "content": content})
    if turns[-1]["role"] != "assistant":
        problems.bad(
            "no final assistant turn",
            f"{where}: column 'messages': the conversation must end with an assistant turn to learn",
        )
        return None
    context = turns[:-1]
    if not any(t["role"] == "user" for t in context):
        problems.bad(
            "no user turn", f"{where}: column 'messages': no user turn before the final assistant turn"
        )
        return None
    completion, marker = strip_eos(turns[-1]["content"])
    if marker:
        eos[marker] += 1
    if not completion:
        problems.bad("empty completion", f"{where}: column 'messages': the final assistant turn is empty")
        return None
    row["messages"] = context
    row["prompt"] = chat_prompt(context)
    row["completion"] = completion
    return row


def instruction_kind(columns: Iterable[str], mapping: Mapping[str, Any]) -> str | None:
    """The kind of instruction data: "chat" with a `messages` column, "prompt_completion" with both of
    those columns, else None."""
    present = set(columns)

    def has(name: str) -> bool:
        return any(c in present for c in column_candidates(mapping, name))

    if has("messages"):
        return "chat"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    return None
