"""Read source rows from local files, map columns to schema fields, and check every row.

Formats (`format: auto` picks by suffix; a `.gz` of any text format is decompressed first):

    .csv        comma-separated with a header row, RFC 4180 quoting
    .tsv        tab-separated with a header row, no quoting (the GLUE convention: a quote is text)
    .json       an array of objects, or {"data": [...]}; a .json file holding one object per line
                (e.g. the Amazon 2018 `*_5.json` files) is read as JSONL
    .jsonl      one object per line (.ndjson too)
    .parquet    through pyarrow
    a folder    a Hugging Face dataset saved with `save_to_disk`; a DatasetDict gives its splits
    parallel    line-aligned text files, one per field: `parallel: {en: train.en.gz, de: train.de.gz}`,
                or `format: parallel` with `path` (or each `files:` entry) a stem such as
                `multi30k/train`, read as `<stem>.<field>[.gz]` for each schema field
                (`columns: {en: english}` reads `<stem>.english`)

Text formats are parsed here rather than by `datasets.load_dataset("csv"/"json")`: that route builds an
Arrow cache (seconds for SST-2's 67k rows, plus a cache folder to manage) and its errors name neither the
line nor the column. Parsing ourselves lets every problem name the file and the 1-based line: a malformed
JSON line, a ragged CSV row, a byte that is not valid in the file's encoding, an empty file. Parquet
files and saved datasets are Arrow already and are read with pyarrow / `datasets.load_from_disk`.

After reading, each file's columns are mapped to schema fields (`columns: {field: column}`; a list of
candidate columns takes the first one the file has, so one mapping serves split files whose headers
differ, e.g. SST-2 `sentence` in train.tsv and `content` in dev.tsv), values are converted with
`Schema.coerce` (a 2018 Amazon `overall: 5.0` becomes 5 when the schema says int) and the label is
checked against the schema's label map. A bad row stops reading with a DataError naming file, line,
column and the templates that read the column, unless `skip_bad_rows` is on: then it is skipped and
counted by reason.

Data already in instruction form needs no schema and no template:
    prompt/completion   rows with `prompt` and `completion`; a trailing end-of-sequence marker such as
                        "<|endoftext|>" is stripped from the completion (tokenization adds the model's own)
    chat                rows with `messages: [{role, content}, ...]` ending with an assistant turn: the
                        final assistant turn is the completion, the turns before it are kept as
                        `messages` so tokenization can apply a chat template; the plain-text `prompt` is
                        the user's message for a single exchange, else "role: content" lines.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import difflib
import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from instructkit.config import DatasetConfig
from instructkit.errors import ConfigError, DataError, InstructkitError
from instructkit.templates.template import Schema, Template

TEXT_FORMATS = ("csv", "tsv", "json", "jsonl")
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
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
CHAT_ROLES = frozenset({"system", "user", "assistant"})
DEMO_FILE = "reviews.jsonl"
DEMO_SCHEMA = "amazon_us_reviews"
MAX_SAMPLES = 10
"""How many skipped-row messages are kept (per dataset) for stats.json."""


# --------------------------------------------------------------------------------------------------
# Bad rows: raise at the first, or count them
# --------------------------------------------------------------------------------------------------


class Problems:
    """Collects bad rows: raises a DataError at the first one unless `skip` is on, then counts by reason."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts: Counter[str] = Counter()
        self.samples: list[str] = []

    def bad(self, reason: str, message: str, error: type[InstructkitError] = DataError) -> None:
        if not self.skip:
            raise error(message) from None
        self.counts[reason] += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --------------------------------------------------------------------------------------------------
# Raw tables
# --------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """The rows of one file as read, before column mapping."""

    path: str
    columns: list[str]
    rows: list[dict]
    lines: list[int] | None = None
    """1-based line where each row starts (line formats); None: rows are named by `unit` and number."""
    unit: str = "row"
    format: str = ""
    positions: list[int] | None = None
    """1-based `unit` numbers when rows were skipped while parsing (else the row's index + 1)."""

    def where(self, index: int) -> str:
        """`line 12` / `record 3` / `row 7`: how row `index` (0-based) is named in messages."""
        if self.lines is not None:
            return f"line {self.lines[index]}"
        if self.positions is not None:
            return f"{self.unit} {self.positions[index]}"
        return f"{self.unit} {index + 1}"


def detect_format(path: Path, declared: str = "auto") -> str:
    """The format of `path`: the declared one, or the suffix's (after a `.gz`); a folder is hf_disk."""
    if declared != "auto":
        return declared
    if path.is_dir():
        return "hf_disk"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the name; set `format:` to one of "
            "csv, tsv, json, jsonl, parquet, hf_disk, parallel"
        )
    return fmt


def _not_found(path: Path) -> DataError:
    hint = ""
    parent = path.parent
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=2, cutoff=0.6)
        if close:
            hint = f"; did you mean {' or '.join(str(parent / c) for c in close)}?"
    elif not parent.exists():
        hint = f" (the folder {parent} does not exist either)"
    return DataError(f"{path}: file not found{hint}")


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when the name ends in .gz."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _not_found(path) from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a NUL character in the path
        raise DataError(f"{path!r}: not a usable file path ({exc})") from None
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: not a valid gzip file ({exc})") from None
    return data


def decode_text(data: bytes, path: Path | str, encoding: str = "utf-8") -> str:
    """Decode `data`, dropping a byte-order mark; an undecodable byte is named by offset and line."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise DataError(
            f"{path}: unknown text encoding {encoding!r} (set `encoding:`, e.g. utf-8 or latin-1)"
        ) from None
    try:
        text = data.decode("utf-8-sig" if codec == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        inside = " of the decompressed text" if str(path).lower().endswith(".gz") else ""
        raise DataError(
            f"{path}: line {line}: not valid {encoding} text: byte 0x{data[exc.start]:02x} at byte offset "
            f"{exc.start}{inside} (byte {column} of the line); set `encoding:` for this dataset "
            "(e.g. latin-1 or cp1252)"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def parse_delimited(text: str, path: str, delimiter: str, problems: Problems) -> Table:
    """CSV (quoted) or TSV (unquoted) with a header row; a ragged row is named by its line."""
    if csv.field_size_limit() < 1 << 30:
        csv.field_size_limit(1 << 30)  # long reviews and articles are longer than the 128 KiB default
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header: list[str] | None = None
    header_line = 0
    rows: list[dict] = []
    lines: list[int] = []
    previous = 0
    try:
        for record in reader:
            start = previous + 1
            previous = reader.line_num
            if not record:
                continue
            if header is None:
                header, header_line = record, start
                dups = sorted(name for name, n in Counter(header).items() if n > 1)
                if dups:
                    raise DataError(f"{path}: line {start}: the header repeats column name(s) {dups}")
                width = len(header)
                continue
            if len(record) != width:
                if len(record) > width:
                    hint = f" (an unquoted {'tab' if delimiter == chr(9) else 'comma'} inside a field?)"
                else:
                    hint = " (a line break inside an unquoted field, or a missing field?)"
                problems.bad(
                    "ragged row",
                    f"{path}: line {start}: {len(record)} fields, but the header (line {header_line}) "
                    f"has {width}{hint}",
                )
                continue
            rows.append(dict(zip(header, record)))
            lines.append(start)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: cannot parse as CSV: {exc}") from None
    if header is None:
        raise DataError(f"{path}: the file is empty")
    if not rows and not problems.total:
        raise DataError(f"{path}: only a header (line {header_line}), no data rows")
    return Table(path, list(header), rows, lines, format="tsv" if delimiter == "\t" else "csv")


def _columns_of(rows: Iterable[dict]) -> list[str]:
    """Union of the rows' keys, in order of first appearance."""
    seen: set[str] = set()
    order: list[str] = []
    for row in rows:
        if not seen.issuperset(row):
            for key in row:
                if key not in seen:
                    seen.add(key)
                    order.append(key)
    return order


def json_problem(exc: BaseException) -> str:
    """What json.loads refused beyond syntax: nesting too deep for the parser, an over-long integer."""
    if isinstance(exc, RecursionError):
        return "arrays or objects nested too deeply"
    return str(exc).split(";")[0]


def parse_jsonl(text: str, path: str, problems: Problems) -> Table:
    """One JSON object per line; a malformed line is named by its 1-based number."""
    loads = json.loads
    rows: list[dict] = []
    lines: list[int] = []
    # split("\n"), not splitlines(): U+2028 and friends may sit raw inside JSON strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line or line.isspace():
            continue
        try:
            record = loads(line)
        except json.JSONDecodeError as exc:
            problems.bad(
                "malformed JSON line",
                f"{path}: line {lineno}: malformed JSON at column {exc.colno}: {exc.msg}",
            )
            continue
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number; arrays nested 100,000 deep
            problems.bad("malformed JSON line", f"{path}: line {lineno}: cannot read this JSON: {json_problem(exc)}")
            continue
        if not isinstance(record, dict):
            problems.bad(
                "not a JSON object",
                f"{path}: line {lineno}: expected a JSON object, found {type(record).__name__}",
            )
            continue
        rows.append(record)
        lines.append(lineno)
    if not rows and not problems.total:
        raise DataError(f"{path}: the file is empty")
    return Table(path, _columns_of(rows), rows, lines, format="jsonl")


def parse_json(text: str, path: str, problems: Problems) -> Table:
    """A JSON array of objects or {"data": [...]}; a file of one object per line is read as JSONL."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return parse_jsonl(text, path, problems)
        raise DataError(
            f"{path}: line {exc.lineno}: malformed JSON at column {exc.colno}: {exc.msg}"
        ) from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number; arrays nested 100,000 deep
        raise DataError(f"{path}: cannot read this JSON: {json_problem(exc)}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        records = data["data"]
    elif isinstance(data, list):
        records = data
    else:
        found = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(f'{path}: expected a JSON array of objects or {{"data": [...]}}, found {found}')
    rows: list[dict] = []
    for i, record in enumerate(records):
        if isinstance(record, dict):
            rows.append(record)
        else:
            problems.bad(
                "not a JSON object",
                f"{path}: record {i + 1}: expected an object, found {type(record).__name__}",
            )
    if not records:
        raise DataError(f"{path}: the JSON array is empty")
    positions = None
    if len(rows) != len(records):  # some records skipped: keep naming rows by their place in the array
        positions = [i + 1 for i, record in enumerate(records) if isinstance(record, dict)]
    return Table(path, _columns_of(rows), rows, None, unit="record", format="json", positions=positions)


def read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    if not path.exists():
        raise _not_found(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no rows (columns: {', '.join(table.column_names)})")
    return Table(str(path), list(table.column_names), table.to_pylist(), None, format="parquet")


def read_hf_disk(path: Path) -> dict[str | None, Table]:
    """A dataset saved with `save_to_disk`: {None: table} for a Dataset, {split: table} for a DatasetDict."""
    if not path.is_dir():
        raise (
            _not_found(path)
            if not path.exists()
            else DataError(f"{path}: expected a folder saved with save_to_disk")
        )
    if not any(
        (path / marker).exists() for marker in ("dataset_dict.json", "state.json", "dataset_info.json")
    ):
        raise DataError(
            f"{path}: this folder is not a dataset saved with `save_to_disk` "
            "(no dataset_dict.json or state.json); "
            "for line-aligned text files use `format: parallel`"
        )
    import datasets  # imported here: slow to import and only needed for this format

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a damaged folder
        raise DataError(f"{path}: cannot load the saved dataset: {exc}") from None

    def table(ds: Any, where: str) -> Table:
        rows = ds.with_format(None).to_list()
        if not rows:
            raise DataError(f"{where}: the dataset has no rows")
        return Table(where, list(ds.column_names), rows, None, format="hf_disk")

    if isinstance(loaded, datasets.DatasetDict):
        return {split: table(ds, f"{path} [{split}]") for split, ds in loaded.items()}
    return {None: table(loaded, str(path))}


def read_parallel(files: Mapping[str, Path], encoding: str, problems: Problems) -> Table:
    """Line-aligned text files, one per field: line i of each file makes row i."""
    if len(files) < 2:
        raise ConfigError(f"parallel data needs at least two files (one per field), got {dict(files)}")
    columns: dict[str, list[str]] = {}
    for name, path in files.items():
        text = decode_text(read_bytes(path), path, encoding)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        columns[name] = [line.removesuffix("\r") for line in lines]
    counts = {name: len(lines) for name, lines in columns.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{files[name]} has {n}" for name, n in counts.items())
        raise DataError(f"parallel files are not line-aligned: {detail} lines")
    label = " + ".join(str(p) for p in files.values())
    names = list(columns)
    rows: list[dict] = []
    lines_kept: list[int] = []
    for i, values in enumerate(zip(*columns.values())):
        empty = [names[j] for j, v in enumerate(values) if not v.strip()]
        if empty:
            where = ", ".join(str(files[n]) for n in empty)
            problems.bad(
                "empty line in parallel files",
                f"{where}: line {i + 1}: empty line (field {', '.join(empty)})",
            )
            continue
        rows.append(dict(zip(names, values)))
        lines_kept.append(i + 1)
    return Table(label, names, rows, lines_kept, format="parallel")


def read_table(
    path: str | Path, format: str = "auto", encoding: str = "utf-8", skip_bad_rows: bool = False
) -> Table:
    """Read one file (not a DatasetDict folder: see `read_tables`)."""
    tables = read_tables(Path(path), format, encoding, Problems(skip_bad_rows))
    if len(tables) != 1:
        raise DataError(f"{path}: holds several splits ({', '.join(map(str, tables))}); use read_tables")
    return next(iter(tables.values()))


def read_tables(path: Path, format: str, encoding: str, problems: Problems) -> dict[str | None, Table]:
    """Read a file or saved-dataset folder; {None: table} unless the folder is a DatasetDict."""
    fmt = detect_format(path, format)
    if fmt in TEXT_FORMATS:
        text = decode_text(read_bytes(path), path, encoding)
        if fmt == "csv":
            return {None: parse_delimited(text, str(path), ",", problems)}
        if fmt == "tsv":
            return {None: parse_delimited(text, str(path), "\t", problems)}
        if fmt == "json":
            return {None: parse_json(text, str(path), problems)}
        return {None: parse_jsonl(text, str(path), problems)}
    if fmt == "parquet":
        return {None: read_parquet(path)}
    if fmt == "hf_disk":
        return read_hf_disk(path)
    raise DataError(f"{path}: format {fmt!r} cannot be read as a single file")


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


def _candidates(columns: Mapping[str, Any], name: str) -> list[str]:
    value = columns.get(name, name)
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _stem_files(
    stem: Path, fields: Sequence[str], required: set[str], columns: Mapping[str, Any]
) -> dict[str, Path]:
    """`<stem>.<field>[.gz]` for each field (parallel data given by a stem such as multi30k/train)."""
    files: dict[str, Path] = {}
    for name in fields:
        tried = []
        for suffix in _candidates(columns, name):
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


class _RowChecker:
    """Maps one table's columns to fields, converts and checks each row (the per-row hot loop)."""

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
            for candidate in _candidates(columns, name):
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
        wanted = _candidates(self.columns, name)
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


def chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """Plain-text prompt for the turns before the final assistant turn.

    A single user message (no system prompt) is the prompt as it is; otherwise the turns are written as
    "role: content" lines ending with "assistant:". Tokenization uses `messages` with the model's chat
    template when it has one; this text is for models without one and for reports.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"].strip()
    lines = [f"{m['role']}: {m['content'].strip()}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def _instruction_row(kind: str, row: dict, where: str, problems: Problems, eos: Counter) -> dict | None:
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


def _kind_of(columns: Iterable[str], mapping: Mapping[str, Any]) -> str | None:
    present = set(columns)

    def has(name: str) -> bool:
        return any(c in present for c in _candidates(mapping, name))

    if has("messages"):
        return "chat"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    return None


def _schema_hint(columns: Sequence[str], schemas: Iterable[Schema]) -> str:
    present = set(columns)
    fits = [s.name for s in schemas if s.fields and set(s.fields) <= present]
    return f"; its columns fit schema {' or '.join(fits)} (set `schema:`)" if fits else " (set `schema:`)"


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
    """
    name = name or dataset_name(dataset)
    problems = Problems(dataset.skip_bad_rows)
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
    label = schema.label_field if schema is not None else None

    source = Source(
        name=name,
        kind="schema" if schema is not None else "",
        schema=schema,
        rows=[],
        ids=[],
        given=None,
        label_field=None,
    )
    specs = _file_specs(dataset)
    fmt_declared = dataset.format
    eos: Counter[str] = Counter()
    given: list[str | None] = []
    label_everywhere = label is not None
    for split, spec in specs:
        if isinstance(spec, Mapping):
            tables = {None: read_parallel(spec, dataset.encoding, problems)}
        elif fmt_declared == "parallel":
            if schema is None or not schema.fields:
                raise ConfigError(
                    f"dataset {name!r}: `format: parallel` with a path stem needs a `schema:` with fields"
                )
            files = _stem_files(spec, list(schema.fields), required_set, columns)
            tables = {None: read_parallel(files, dataset.encoding, problems)}
        else:
            tables = read_tables(spec, fmt_declared, dataset.encoding, problems)
        for sub, table in tables.items():
            table_split = split
            if sub is not None:  # a DatasetDict split
                table_split = SPLIT_NAMES.get(sub.lower())
                if table_split is None:
                    source.notes.append(f"{table.path}: split {sub!r} ignored (not train/validation/test)")
                    continue
            if not source.kind:
                kind = _kind_of(table.columns, columns)
                if kind is None:
                    raise DataError(
                        f"{table.path}: dataset {name!r} has no `schema:` and the file has neither "
                        f"prompt/completion columns nor chat `messages` (columns: {', '.join(table.columns)})"
                        + _schema_hint(table.columns, schemas)
                    )
                source.kind = kind
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
) -> list[dict]:
    """The first `limit` rows of a data file mapped to `schema`'s fields, for `instructkit templates check`.

    Values are not converted: the template check converts them itself and reports a bad value or a label
    outside the map as a problem of that row. A missing column is a DataError naming the file, the
    columns it has and the closest match. Required are the fields `templates` read (default: all the
    schema's fields). A saved DatasetDict gives its train split (else its first).
    """
    problems = Problems(skip=False)
    if format == "parallel":  # a stem such as multi30k/val -> val.en.gz, val.de.gz
        fields = list(schema.fields)
        stem_files = _stem_files(Path(path), fields, set(fields), dict(columns or {}))
        tables = {None: read_parallel(stem_files, encoding, problems)}
    else:
        tables = read_tables(Path(path), format, encoding, problems)
    table = tables.get(None) or tables.get("train") or next(iter(tables.values()))
    fields = list(schema.fields)
    required = set(fields)
    if templates:
        required = set().union(*(t.fields_read for t in templates)) & set(fields)
    checker = _RowChecker(table, schema, fields, required, dict(columns or {}), templates, problems, None)
    rows = table.rows if limit is None else table.rows[:limit]
    for row in rows:
        for name, col in checker.renames:
            row[name] = row.get(col)
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
    if kind == "schema":
        checker = _RowChecker(table, schema, fields, required, columns, templates, problems, label)
    else:
        base = ["messages"] if kind == "chat" else ["prompt", "completion"]
        wanted = list(dict.fromkeys([*base, *sorted(required)]))
        checker = _RowChecker(table, None, wanted, set(wanted), columns, templates, problems, None)
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
            row = _instruction_row(kind, row, f"{table.path}: {table.where(i)}", problems, eos)
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
            "rows_read": len(table.rows),
            "rows_kept": kept,
            "columns": {f: c for f, c in checker.mapping.items()},
        }
    )
    table.rows = []  # the checked rows live on in source.rows; only line numbers are kept
    return checker.mapping
