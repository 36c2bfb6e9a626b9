"""One configured dataset -> a Source: read each of its files, map and check every row, keep the ids.

A dataset names its data by `path` (a file, a saved-dataset folder, or `demo`), by `files: {train: ...,
validation: ..., test: ...}` (each file's split is given and kept), or by `parallel: {field: file}`.
Files are read by readers.py and their rows checked by rows.py; a file without a schema must hold
instruction-form data (prompt/completion or chat messages). Every kept row gets a stable source id
("<dataset>:<index in file>", or "<dataset>:<split>:<index>" with several files) and can be named by file
and line in later messages (`Source.where`).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from instructkit.config import DatasetConfig
from instructkit.data.chat_rows import chat_column
from instructkit.data.chunks import read_chunks
from instructkit.data.readers import SUFFIX_FORMATS, detect_format, iter_parallel, read_parallel, read_tables
from instructkit.data.rows import (
    RowChecker,
    column_candidates,
    delimiter_hint,
    instruction_kind,
    instruction_row,
)
from instructkit.data.table import Problems, Table
from instructkit.errors import ConfigError, DataError
from instructkit.templates.schema import Schema
from instructkit.templates.template import Template

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
DEMO_FILE = "reviews.jsonl"
DEMO_SCHEMA = "amazon_us_reviews"


# --------------------------------------------------------------------------------------------------
# A dataset's rows: files -> mapped, coerced, checked rows
# --------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """All rows of one configured dataset, mapped to schema fields and checked, ready to split.

    `rows[i]` has the schema's fields (and the file's other columns); `ids[i]` is its stable source id
    ("<dataset>:<index in file>" or "<dataset>:<split>:<index>" with several files); `given[i]` the
    split its file provides (None: to be carved by the splitter), or `given` is None for one file.
    Instruction-form data (`kind` prompt_completion / chat) has `prompt`, `completion` (and `messages`).
    """

    name: str
    kind: str
    schema: Schema | None
    rows: list[dict]
    ids: list[str]
    given: list[str | None] | None
    label_field: str | None
    files: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_samples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows_read: int = 0
    _tables: list[Table] = field(default_factory=list, repr=False)
    _starts: list[int] = field(default_factory=list, repr=False)
    _orig: list[int] = field(default_factory=list, repr=False)

    def where(self, index: int) -> str:
        """`<file>: line N` for row `index` of this source."""
        k = bisect.bisect_right(self._starts, index) - 1
        table = self._tables[k]
        return f"{table.path}: {table.where(self._orig[index])}"

    def __len__(self) -> int:
        return len(self.rows)


def dataset_name(dataset: DatasetConfig) -> str:
    """The name a dataset goes by in reports, source ids and mixtures."""
    if dataset.name:
        return dataset.name
    if dataset.schema_name:
        return dataset.schema_name
    if dataset.path == "demo":
        return "demo"
    first = dataset.path or next(iter((dataset.files or dataset.parallel or {"": "data"}).values()))
    name = Path(str(first)).name
    for suffix in (".gz", *SUFFIX_FORMATS):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or "data"


def demo_path() -> Path:
    """The built-in demo reviews file (schema amazon_us_reviews)."""
    return Path(str(resources.files("instructkit.demo").joinpath(DEMO_FILE)))


def _file_specs(dataset: DatasetConfig) -> list[tuple[str | None, Any]]:
    """(given split or None, path or {field: path} for parallel files) for each file of the dataset."""
    if dataset.parallel:
        return [(None, {k: Path(v) for k, v in dataset.parallel.items()})]
    if dataset.files:
        base = (
            Path(dataset.path)
            if dataset.path and dataset.path != "demo" and Path(dataset.path).is_dir()
            else None
        )
        specs: list[tuple[str | None, Any]] = []
        for key, value in dataset.files.items():
            split = SPLIT_NAMES.get(str(key).lower())
            if split is None:
                raise ConfigError(f"files: unknown split {key!r} (use train, validation, test)")
            if split in [s for s, _ in specs]:
                raise ConfigError(f"files: split {split!r} is given twice")
            specs.append((split, _under(base, value)))
        return specs
    if dataset.path == "demo":
        return [(None, demo_path())]
    if not dataset.path:
        raise ConfigError("a dataset needs `path`, `files` or `parallel`")
    return [(None, Path(dataset.path))]


def _under(base: Path | None, value: str) -> Path:
    path = Path(value)
    if base is not None and not path.is_absolute() and not path.exists():
        return base / path
    return path


def _stem_files(
    stem: Path, fields: Sequence[str], required: set[str], columns: Mapping[str, Any]
) -> dict[str, Path]:
    """`<stem>.<field>[.gz]` for each field (parallel data given by a stem such as multi30k/train)."""
    files: dict[str, Path] = {}
    for name in fields:
        tried = []
        for suffix in column_candidates(columns, name):
            for candidate in (Path(f"{stem}.{suffix}"), Path(f"{stem}.{suffix}.gz")):
                tried.append(candidate.name)
                if candidate.exists():
                    files[name] = candidate
                    break
            if name in files:
                break
        if name not in files and name in required:
            near = sorted(p.name for p in stem.parent.glob(f"{stem.name}.*")) if stem.parent.is_dir() else []
            raise DataError(
                f"{stem}: no line-aligned file for field {name!r} (tried {', '.join(tried)}); "
                f"files with this stem: {', '.join(near) or 'none'}"
            )
    return files


def _schema_hint(columns: Sequence[str], schemas: Iterable[Schema]) -> str:
    present = set(columns)
    fits = [s.name for s in schemas if s.fields and set(s.fields) <= present]
    return f"; its columns fit schema {' or '.join(fits)} (set `schema:`)" if fits else " (set `schema:`)"


def source_fields(dataset: DatasetConfig, schema: Schema | None, templates: Sequence[Template],
                  required: Iterable[str], name: str) -> tuple[list[str], set[str], str | None]:
    """(fields to map, fields every row must have, label field) of a dataset.

    Raises: ConfigError for a `columns:` key outside the schema.
    """
    columns: Mapping[str, Any] = dataset.columns or {}
    required_set = set(required)
    for template in templates:
        reads = template.fields_read
        required_set |= (reads & set(schema.fields)) if schema is not None and schema.fields else reads
    if schema is not None and schema.fields:
        unknown = [k for k in columns if k not in schema.fields and k not in required_set]
        if unknown:
            raise ConfigError(
                f"dataset {name!r}: columns: {', '.join(map(repr, unknown))} not a field of schema "
                f"{schema.name!r} (fields: {', '.join(schema.fields)})"
            )
        fields = list(dict.fromkeys([*schema.fields, *sorted(required_set)]))
    else:
        fields = sorted(required_set)
    return fields, required_set, schema.label_field if schema is not None else None


def file_parts(dataset: DatasetConfig, schema: Schema | None, required: set[str], problems: Problems,
               notes: list[str], chunk_rows: int | None = None) -> Iterator[tuple[str | None, Callable]]:
    """(given split, reader) for each file or saved split of `dataset`; a split outside train/validation/test
    is noted and left out. The reader returns the whole Table, or with `chunk_rows` an iterator of Tables of
    that many rows (data/chunks.py), read anew at each call.

    Raises: ConfigError for `format: parallel` without schema fields; DataError from the readers.
    """
    name = dataset_name(dataset)
    columns: Mapping[str, Any] = dataset.columns or {}
    for split, spec in _file_specs(dataset):
        if isinstance(spec, Mapping) or dataset.format == "parallel":
            if not isinstance(spec, Mapping):
                if schema is None or not schema.fields:
                    raise ConfigError(
                        f"dataset {name!r}: `format: parallel` with a path stem needs a `schema:` with fields"
                    )
                spec = _stem_files(spec, list(schema.fields), required, columns)
            if chunk_rows is None:
                table = read_parallel(spec, dataset.encoding, problems)
                tables: dict[str | None, Callable] = {None: lambda t=table: t}
            else:  # read again at each pass, line by line
                tables = {None: lambda s=spec, n=chunk_rows: iter_parallel(s, dataset.encoding, problems, n)}
        elif chunk_rows is not None:
            fmt = detect_format(spec, dataset.format)
            tables = dict(read_chunks(spec, fmt, dataset.encoding, problems, chunk_rows, dataset.delimiter))
        else:
            tables = {k: (lambda t=t: t) for k, t in read_tables(spec, dataset.format, dataset.encoding,
                                                                 problems, dataset.delimiter).items()}
        for sub, reader in tables.items():
            table_split = split
            if sub is not None:  # a DatasetDict split
                table_split = SPLIT_NAMES.get(sub.lower())
                if table_split is None:
                    notes.append(f"{spec} [{sub}]: split {sub!r} ignored (not train/validation/test)")
                    continue
            yield table_split, reader


def set_kind(source: Source, table: Table, columns: Mapping[str, Any], schemas: Iterable[Schema]) -> None:
    """Set `source.kind` from the first table of a dataset without a schema.

    Raises: DataError when the table is neither prompt/completion nor chat data."""
    if source.kind:
        return
    kind = instruction_kind(table.columns, columns)
    if kind is None:
        raise DataError(
            f"{table.path}: dataset {source.name!r} has no `schema:` and the file has neither "
            f"prompt/completion columns nor chat `messages` (columns: {', '.join(table.columns)})"
            + (delimiter_hint(table) or _schema_hint(table.columns, schemas))
        )
    source.kind = kind


def load_source(
    dataset: DatasetConfig,
    schema: Schema | None,
    *,
    templates: Sequence[Template] = (),
    required: Iterable[str] = (),
    name: str | None = None,
    schemas: Iterable[Schema] = (),
) -> Source:
    """Read every file of `dataset`, map columns, convert and check each row.

    `schema` None means data in instruction form (prompt/completion or chat messages). `required` are
    fields every row must have besides those `templates` read (dedup key, group column). `schemas` only
    serve the hint when a schema-less file fits a known schema.

    Raises: ConfigError for a `columns:` key outside the schema, bad `files:` splits, or `format: parallel`
    without schema fields; DataError for a file that cannot be read, a missing column, a schema-less file
    that is not in instruction form, a bad row (unless `skip_bad_rows`) or no usable row at all.
    """
    name = name or dataset_name(dataset)
    problems = Problems(dataset.skip_bad_rows)
    columns: Mapping[str, Any] = dataset.columns or {}
    fields, required_set, label = source_fields(dataset, schema, templates, required, name)
    source = Source(
        name=name,
        kind="schema" if schema is not None else "",
        schema=schema,
        rows=[],
        ids=[],
        given=None,
        label_field=None,
    )
    eos: Counter[str] = Counter()
    given: list[str | None] = []
    label_everywhere = label is not None
    for table_split, chunks in file_parts(dataset, schema, required_set, problems, source.notes):
        table = chunks()
        set_kind(source, table, columns, schemas)
        mapping = _add_table(
            source,
            table,
            table_split,
            schema,
            fields,
            required_set,
            columns,
            templates,
            problems,
            label,
            eos,
            given,
        )
        if label is not None and label not in mapping:
            label_everywhere = False
    source.given = given if any(g is not None for g in given) else None
    source.label_field = label if label_everywhere else None
    source.rows_read = len(source.rows) + problems.total
    source.skipped = problems.counts
    source.skipped_samples = problems.samples
    for marker, n in eos.most_common():
        where = "completions" if source.kind == "prompt_completion" else "final assistant turns"
        source.notes.append(
            f"stripped a trailing {marker!r} from {n} {where} (tokenization adds the model's own EOS)"
        )
    if not source.rows:
        raise DataError(
            f"dataset {name!r}: no usable rows ({problems.total} skipped: {dict(problems.counts)})"
        )
    return source


def rows_for_check(
    path: str | Path,
    schema: Schema,
    columns: Mapping[str, Any] | None = None,
    limit: int | None = None,
    encoding: str = "utf-8",
    templates: Sequence[Template] = (),
    format: str = "auto",
    delimiter: str | None = None,
) -> list[dict]:
    """The first `limit` rows of a data file mapped to `schema`'s fields, for `instructkit templates check`.

    Values are not converted (but for ClassLabel ids, named as the label map names them): the template check
    converts them itself and reports a bad value or a label outside the map as a problem of that row. A missing column is a DataError naming the file, the
    columns it has and the closest match. Required are the fields `templates` read (default: all the
    schema's fields). A saved DatasetDict gives its train split (else its first).

    Raises: DataError when the file cannot be read or lacks a required column.
    """
    problems = Problems(skip=False)
    if format == "parallel":  # a stem such as multi30k/val -> val.en.gz, val.de.gz
        fields = list(schema.fields)
        stem_files = _stem_files(Path(path), fields, set(fields), dict(columns or {}))
        tables = {None: read_parallel(stem_files, encoding, problems)}
    else:
        tables = read_tables(Path(path), format, encoding, problems, delimiter)
    table = tables.get(None) or tables.get("train") or next(iter(tables.values()))
    fields = list(schema.fields)
    required = set(fields)
    if templates:
        required = set().union(*(t.fields_read for t in templates)) & set(fields)
    checker = RowChecker(table, schema, fields, required, dict(columns or {}), templates, problems,
                         schema.label_field)
    rows = table.rows if limit is None else table.rows[:limit]
    for row in rows:
        for name, col in checker.renames:
            row[name] = row.get(col)
        if checker.label_codes is not None:
            checker.recode(row)
    return rows


def _add_table(
    source: Source,
    table: Table,
    split: str | None,
    schema: Schema | None,
    fields: Sequence[str],
    required: set[str],
    columns: Mapping[str, Any],
    templates: Sequence[Template],
    problems: Problems,
    label: str | None,
    eos: Counter,
    given: list[str | None],
) -> dict[str, str]:
    """Check `table`'s rows into `source`; return the field -> column mapping used."""
    kind = source.kind
    checker = table_checker(kind, table, schema, fields, required, columns, templates, problems, label)
    prefix = f"{source.name}:{split}:" if split is not None else f"{source.name}:"
    source._tables.append(table)
    source._starts.append(len(source.rows))
    rows_out, ids_out, orig_out = source.rows, source.ids, source._orig
    check = checker.check
    n_before = len(rows_out)
    for i, row in enumerate(table.rows):
        row = check(i, row)
        if row is None:
            continue
        if kind != "schema":
            row = instruction_row(kind, row, f"{table.path}: {table.where(i)}", problems, eos)
            if row is None:
                continue
        rows_out.append(row)
        ids_out.append(f"{prefix}{i}")
        orig_out.append(i)
    kept = len(rows_out) - n_before
    given.extend([split] * kept)
    source.files.append(
        {
            "split": split,
            "path": table.path,
            "format": table.format,
            "delimiter": table.delimiter or None,
            "rows_read": len(table.rows),
            "rows_kept": kept,
            "columns": {f: c for f, c in checker.mapping.items()},
        }
    )
    table.rows = []  # the checked rows live on in source.rows; only line numbers are kept
    return checker.mapping


def table_checker(kind: str, table: Table, schema: Schema | None, fields: Sequence[str], required: set[str],
                  columns: Mapping[str, Any], templates: Sequence[Template], problems: Problems,
                  label: str | None) -> RowChecker:
    """The row checker of one table of a dataset of `kind` (schema, prompt_completion, chat).

    Raises: DataError naming the file's columns when a required field has no column."""
    if kind == "schema":
        return RowChecker(table, schema, fields, required, columns, templates, problems, label)
    present = set(table.columns)
    has = lambda name: any(c in present for c in column_candidates(columns, name))
    base = [chat_column(has)] if kind == "chat" else ["prompt", "completion"]
    wanted = list(dict.fromkeys([*base, *sorted(required)]))
    return RowChecker(table, None, wanted, set(wanted), columns, templates, problems, None)
