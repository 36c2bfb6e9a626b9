"""One configured dataset read in bounded memory: pass 1 keeps a few numbers per row, pass 2 hands back
the rows asked for.

    source = scan_source(dataset, schema, templates=..., key_for=..., group_by=..., chunk_rows=20_000)
    for p, row in source.walk(wanted): ...        # the kept rows p with wanted[p], checked again

Pass 1 (`scan_source`) reads every file in chunks (data/chunks.py), checks each row exactly as
sources.load_source does (the same RowChecker, the same messages naming file and line), and keeps for each
kept row: where it came from (file, index for the source id, line for messages), an 8-byte BLAKE2b hash of
its dedup key (of its split.normalized_text with `split.text_match: normalized`), a small code of its
label, a hash of its group and, for prompt/completion data, a hash of its completion (with the text of
short ones, for the answer choices). A million rows hold some 40 MB.
Two different keys share a hash with probability about n^2 / 2^65 (3e-8 for a million rows).

Pass 2 (`walk`) reads the files again and checks only the rows asked for.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instructkit.config import DatasetConfig
from instructkit.data.rows import instruction_row
from instructkit.data.sources import Source, file_parts, set_kind, source_fields, table_checker
from instructkit.data.split import _hashable, canonical_text, label_value, normalized_text
from instructkit.data.table import Problems, Table
from instructkit.errors import DataError
from instructkit.templates.schema import Schema
from instructkit.templates.template import Template

GIVEN_CODES = {"test": 0, "validation": 1, "train": 2, None: 3}
"""A given split as a small code; the order is dedup's keep priority (test, then validation, then train)."""
GIVEN_NAMES = {code: name for name, code in GIVEN_CODES.items()}
TEXT_KEEP = (256, 50_000)
"""Completions up to 256 characters keep their text, for at most 50,000 distinct ones (answer choices)."""


def _encode(value: Any) -> bytes:
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 5.0 == 5, as when rows are grouped in memory
    return b"j" + json.dumps(_hashable(value), ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")


def hash_values(values: Sequence[Any]) -> bytes:
    """8-byte BLAKE2b digest of a tuple of row values (one value: of that value)."""
    if len(values) == 1:
        return hashlib.blake2b(_encode(values[0]), digest_size=8).digest()
    h = hashlib.blake2b(digest_size=8)
    for value in values:
        data = _encode(value)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


@dataclass
class Part:
    """One file (or saved split) of a streamed dataset."""

    split: str | None
    read: Callable[[], Iterator[Table]]
    prefix: str
    path: str = ""
    format: str = ""
    delimiter: str = ""


@dataclass
class StreamSource(Source):
    """A `Source` whose rows stay on disk: per kept row p, arrays say where it is and what it hashes to."""

    parts: list[Part] = field(default_factory=list)
    origins: list[tuple[int, str, str]] = field(default_factory=list)
    """(part, path, unit) of each file a kept row came from (a folder of shards has one per shard)."""
    origin: Any = None  # int32 [n]: index into origins
    index: Any = None  # int64 [n]: the row's index in its part (the number in its source id)
    line: Any = None  # int64 [n]: the line (or row, record) number messages name
    keys: Any = None  # uint64 [n]: hash of the dedup key without the label
    normalized: bool = False  # the key texts were hashed as split.normalized_text writes them
    labels: Any = None  # int32 [n]: label code (label_values[code]); None: no label field
    label_values: list = field(default_factory=list)
    groups: Any = None  # uint64 [n]: hash of the group value; None: no group_by
    completions: Any = None  # uint64 [n]: hash of the completion (instruction-form data)
    completion_text: dict = field(default_factory=dict)
    chunk_rows: int = 20_000
    spill: Path | None = None
    """A file holding the kept rows as checked in pass 1 (per chunk: 8 bytes of length, then the marshal
    bytes of its rows): pass 2 reads it instead of parsing and converting the data files again. None: pass 2
    reads the files."""
    _walk: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return 0 if self.origin is None else len(self.origin)

    def where(self, index: int) -> str:
        _, path, unit = self.origins[int(self.origin[index])]
        return f"{path}: {unit} {int(self.line[index])}"

    def source_id(self, index: int) -> str:
        return f"{self.parts[self.part_of(index)].prefix}{int(self.index[index])}"

    def part_of(self, index: int) -> int:
        return self.origins[int(self.origin[index])][0]

    def given_codes(self) -> np.ndarray:
        """int8 [n]: GIVEN_CODES of each kept row's given split."""
        part_codes = np.array([GIVEN_CODES[self.parts[k].split] for k, _, _ in self.origins], dtype=np.int8)
        return part_codes[self.origin] if len(self.origins) else np.zeros(0, np.int8)

    def walk(self, wanted: np.ndarray) -> Iterator[tuple[int, dict]]:
        """(p, checked row) for every kept row p with `wanted[p]`, in file order (pass 2)."""
        if self.spill is not None:
            yield from self._walk_spill(wanted)
            return
        yield from self._walk_files(wanted)

    def _walk_spill(self, wanted: np.ndarray) -> Iterator[tuple[int, dict]]:
        p = 0
        with open(self.spill, "rb") as handle:  # type: ignore[arg-type]
            while p < len(self) and wanted[p:].any():  # marshal.load(file) reads object by object: slow
                rows = marshal.loads(handle.read(int.from_bytes(handle.read(8), "little")))
                for row in rows:
                    if wanted[p]:
                        yield p, row
                    p += 1

    def _walk_files(self, wanted: np.ndarray) -> Iterator[tuple[int, dict]]:
        part_of_origin = np.array([k for k, _, _ in self.origins], dtype=np.int32)
        parts = part_of_origin[self.origin]
        n, p = len(self), 0
        for k, part in enumerate(self.parts):
            if p >= n or not wanted[p:].any():
                return
            checker, base = None, 0
            problems, eos = Problems(True), Counter()
            for chunk in part.read():
                if checker is None:
                    checker = table_checker(self.kind, chunk, *self._walk["args"], problems, self._walk["label"])
                checker.table = chunk
                end = base + len(chunk.rows)
                while p < n and parts[p] == k and self.index[p] < end:
                    if wanted[p]:
                        j = int(self.index[p]) - base
                        row = checker.convert(chunk.rows[j])  # it passed `check` in pass 1
                        if self.kind != "schema":
                            row = instruction_row(self.kind, row, "", problems, eos)
                        if row is None:
                            raise DataError(f"{self.where(p)}: the row changed while it was being prepared")
                        yield p, row
                    p += 1
                base = end


def scan_source(
    dataset: DatasetConfig,
    schema: Schema | None,
    *,
    templates: Sequence[Template] = (),
    required: Iterable[str] = (),
    name: str,
    schemas: Iterable[Schema] = (),
    key_for: Callable[[str, str | None], list[str]],
    group_by: str | None = None,
    chunk_rows: int = 20_000,
    spill: Path | None = None,
    normalize: bool = False,
) -> StreamSource:
    """Pass 1 over every file of `dataset` (see the module docstring); the checks and errors of
    sources.load_source. `key_for(kind, label_field)` gives the dedup key fields without the label; with
    `normalize` their values are hashed as `normalized_text` writes them. With `spill`, the kept rows are
    also written to that file for pass 2 (`StreamSource.spill`).

    Raises: what load_source raises.
    """
    problems = Problems(dataset.skip_bad_rows)
    columns: Mapping[str, Any] = dataset.columns or {}
    fields, required_set, label = source_fields(dataset, schema, templates, required, name)
    source = StreamSource(name=name, kind="schema" if schema is not None else "", schema=schema, rows=[], ids=[],
                          given=None, label_field=None, chunk_rows=chunk_rows, spill=spill, normalized=normalize)
    spill_handle = open(spill, "wb") if spill is not None else None  # noqa: SIM115 - closed below
    source._walk = {"args": (schema, fields, required_set, columns, templates), "label": label}
    origin, index, line = [], [], []
    keys, labels, groups, completions = bytearray(), [], bytearray(), bytearray()
    label_codes: dict[Any, int] = {}
    eos: Counter[str] = Counter()
    label_everywhere = label is not None
    key_fields: list[str] | None = None
    text_cap, distinct_cap = TEXT_KEEP
    texts = source.completion_text
    try:
        for split, read in file_parts(dataset, schema, required_set, problems, source.notes, chunk_rows):
            k = len(source.parts)
            part = Part(split, read, f"{name}:{split}:" if split is not None else f"{name}:")
            source.parts.append(part)
            checker, base, kept_before, origin_code = None, 0, len(origin), -1
            for chunk in read():
                if checker is None:
                    set_kind(source, chunk, columns, schemas)
                    checker = table_checker(source.kind, chunk, schema, fields, required_set, columns, templates,
                                            problems, label)
                    part.path, part.format, part.delimiter = chunk.path, chunk.format, chunk.delimiter
                    if label is not None and label not in checker.mapping:
                        label_everywhere = False
                    if key_fields is None:
                        key_fields = [f for f in key_for(source.kind, label) if f != label]
                if origin_code < 0 or source.origins[origin_code][1] != chunk.path:
                    origin_code = len(source.origins)
                    source.origins.append((k, chunk.path, "line" if chunk.lines is not None else chunk.unit))
                checker.table = chunk
                check, kind, lines = checker.check, source.kind, chunk.lines
                kept: list[dict] = []
                for j, row in enumerate(chunk.rows):
                    row = check(j, row)
                    if row is None:
                        continue
                    if kind != "schema":
                        row = instruction_row(kind, row, f"{chunk.path}: {chunk.where(j)}", problems, eos)
                        if row is None:
                            continue
                        text = unicodedata.normalize("NFC", row["completion"])  # answers compare NFC forms
                        digest = hash_values([text])
                        completions += digest
                        if len(text) <= text_cap and len(texts) < distinct_cap:
                            texts.setdefault(int.from_bytes(digest, "little"), text)
                    kept.append(row)
                    origin.append(origin_code)
                    index.append(base + j)
                    line.append(lines[j] if lines is not None else
                                chunk.positions[j] if chunk.positions is not None else chunk.offset + j + 1)
                    if not key_fields:
                        keys += b"\0" * 8
                    elif normalize:
                        keys += hash_values([normalized_text(row.get(f)) for f in key_fields])
                    else:
                        keys += hash_values([canonical_text(row.get(f)) for f in key_fields])
                    if label is not None:
                        value = label_value(row.get(label))
                        code = label_codes.get(value)
                        if code is None:
                            code = label_codes[value] = len(label_codes)
                        labels.append(code)
                    if group_by:
                        groups += hash_values([canonical_text(row.get(group_by))])
                base += len(chunk.rows)
                if spill_handle is not None and kept:
                    try:
                        blob = marshal.dumps(kept)
                        spill_handle.write(len(blob).to_bytes(8, "little") + blob)
                    except ValueError:  # a value marshal cannot write (a datetime from Parquet): read the files again
                        spill_handle.close()
                        spill_handle = source.spill = None
            source.files.append({"split": split, "path": part.path, "format": part.format,
                                 "delimiter": part.delimiter or None, "rows_read": base,
                                 "rows_kept": len(origin) - kept_before,
                                 "columns": dict(checker.mapping) if checker is not None else {}})
    finally:
        if spill_handle is not None:
            spill_handle.close()
    source.origin = np.array(origin, dtype=np.int32)
    source.index = np.array(index, dtype=np.int64)
    source.line = np.array(line, dtype=np.int64)
    source.keys = np.frombuffer(bytes(keys), dtype="<u8")
    source.label_values = list(label_codes)
    source.labels = np.array(labels, dtype=np.int32) if label is not None else None
    source.groups = np.frombuffer(bytes(groups), dtype="<u8") if group_by else None
    source.completions = np.frombuffer(bytes(completions), dtype="<u8") if source.kind != "schema" else None
    source.label_field = label if label_everywhere else None
    if label is not None and not label_everywhere and label in (key_for(source.kind, label) or []):
        # the label is part of the key when some file has no label column: fold its code into the hash
        source.keys = source.keys * np.uint64(1_000_003) + source.labels.astype(np.uint64)
    if not label_everywhere:
        source.labels = None
    source.given = None
    source.rows_read = len(origin) + problems.total
    source.skipped = problems.counts
    source.skipped_samples = problems.samples
    for marker, n in eos.most_common():
        where = "completions" if source.kind == "prompt_completion" else "final assistant turns"
        source.notes.append(f"stripped a trailing {marker!r} from {n} {where} (tokenization adds the model's own EOS)")
    if not len(origin):
        raise DataError(f"dataset {name!r}: no usable rows ({problems.total} skipped: {dict(problems.counts)})")
    return source
