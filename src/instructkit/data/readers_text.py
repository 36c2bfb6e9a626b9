"""Decoded text -> Table: decode bytes, parse CSV / TSV / JSON / JSONL with errors that name the line.

    .csv        comma-separated with a header row, RFC 4180 quoting
    .tsv        tab-separated with a header row, no quoting (the GLUE convention: a quote is text)
    .json       an array of objects, or {"data": [...]}; a .json file holding one object per line
                (e.g. the Amazon 2018 `*_5.json` files) is read as JSONL
    .jsonl      one object per line (.ndjson too); a .jsonl file that is one JSON array (`json.dump` of a
                list) is read as the array

Text formats are parsed here rather than by `datasets.load_dataset("csv"/"json")`: that route builds an
Arrow cache (seconds for SST-2's 67k rows, plus a cache folder to manage) and its errors name neither the
line nor the column. Parsing ourselves lets every problem name the file and the 1-based line: a malformed
JSON line, a ragged CSV row, a byte that is not valid in the file's encoding, an empty file.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from instructkit.data.table import SEPARATOR_NAMES, Problems, Table, separator_hint
from instructkit.errors import DataError
from instructkit.io import json_problem


def undecodable(path: Path | str, encoding: str, line: int, byte: int, offset: int, column: int) -> DataError:
    """The error for a byte that is not `encoding` text: 1-based `line` and `column`, `offset` in the file."""
    inside = " of the decompressed text" if str(path).lower().endswith(".gz") else ""
    return DataError(f"{path}: line {line}: not valid {encoding} text: byte 0x{byte:02x} at byte offset "
                     f"{offset}{inside} (byte {column} of the line); set `encoding:` for this dataset "
                     "(e.g. latin-1 or cp1252)")


def bom_bytes(head: bytes, encoding: str) -> int:
    """How many bytes of a UTF-8 byte-order mark start `head` and are dropped before decoding: 3 whatever
    `encoding:` says (a cp1252 or latin-1 reading would glue "ï»¿" to the first column name), 0 without one
    or for UTF-16/32, whose own BOM their codec reads."""
    if not head.startswith(codecs.BOM_UTF8) or codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        return 0
    return len(codecs.BOM_UTF8)


def text_codec(encoding: str) -> str:
    """The codec that decodes text after `bom_bytes`: utf-8 for utf-8 and utf-8-sig, else `encoding`."""
    return "utf-8" if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig") else encoding


def decode_text(data: bytes, path: Path | str, encoding: str = "utf-8") -> str:
    """Decode `data`, dropping a byte-order mark; an undecodable byte is named by offset and line.

    Raises: DataError when the encoding is unknown, a byte does not decode, or the text is empty.
    """
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(
            f"{path}: unknown text encoding {encoding!r} (set `encoding:`, e.g. utf-8 or latin-1)"
        ) from None
    skip = bom_bytes(data, encoding)
    try:
        text = data[skip:].decode(text_codec(encoding))
    except UnicodeDecodeError as exc:
        start = skip + exc.start  # positions in the file, the BOM counted
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise undecodable(path, encoding, line, data[start], start, column) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def parse_delimited(text: str, path: str, delimiter: str, problems: Problems, fmt: str | None = None) -> Table:
    """CSV (quoted) or TSV (unquoted) with a header row, all rows in one Table (see `iter_delimited`)."""
    return merge_tables(list(iter_delimited(io.StringIO(text, newline=""), path, delimiter, problems, fmt=fmt)))


def delimited_as(path: object, fmt: str, delimiter: str | None) -> tuple[str, str]:
    """(format, separator) a csv/tsv file is parsed with: by its format, or with a configured `delimiter`
    (DatasetConfig.delimiter) as quoted CSV whatever its suffix.

    Raises: DataError when a delimiter is given for a file of another format (JSON, Parquet, ...).
    """
    if delimiter is None:
        return fmt, "\t" if fmt == "tsv" else ","
    if fmt not in ("csv", "tsv"):
        raise DataError(f"{path}: `delimiter: {delimiter!r}` is set, but the file is read as {fmt}, which has no "
                        "field separator (remove `delimiter:`, or set `format: csv` if it is delimited text)")
    return "csv", delimiter


def iter_delimited(lines: Iterable[str], path: str, delimiter: str, problems: Problems,
                   chunk_rows: int = 1 << 62, fmt: str | None = None) -> Iterator[Table]:
    """CSV (quoted) or TSV (unquoted) with a header row, in Tables of at most `chunk_rows` rows; a ragged
    row is named by its line. `lines` are the text's lines with their line ends (a quoted field may span
    several). `fmt` (csv: quoted, tsv: not) defaults to tsv for a tab `delimiter`, else csv.

    Raises: DataError when the header repeats a name, the text cannot be parsed, or there is no header or
    no data row; a ragged row goes to `problems` (a DataError unless skipping).
    """
    if csv.field_size_limit() < 1 << 30:
        csv.field_size_limit(1 << 30)  # long reviews and articles are longer than the 128 KiB default
    fmt = fmt or ("tsv" if delimiter == "\t" else "csv")
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    header: list[str] | None = None
    header_line = 0
    rows: list[dict] = []
    where: list[int] = []
    previous = 0
    seen = 0
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
                    hint = separator_hint(header, fmt, delimiter) or \
                        f" (an unquoted {SEPARATOR_NAMES.get(delimiter, repr(delimiter))} inside a field?)"
                else:
                    hint = " (a line break inside an unquoted field, or a missing field?)"
                problems.bad(
                    "ragged row",
                    f"{path}: line {start}: {len(record)} fields, but the header (line {header_line}) "
                    f"has {width}{hint}",
                )
                continue
            rows.append(dict(zip(header, record)))
            where.append(start)
            if len(rows) >= chunk_rows:
                yield Table(path, list(header), rows, where, format=fmt, offset=seen, delimiter=delimiter)
                seen += len(rows)
                rows, where = [], []
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: cannot parse as CSV: {exc}") from None
    if header is None:
        raise DataError(f"{path}: the file is empty")
    if not rows and not seen and not problems.total:
        raise DataError(f"{path}: only a header (line {header_line}), no data rows")
    if rows or not seen:
        yield Table(path, list(header), rows, where, format=fmt, offset=seen, delimiter=delimiter)


def merge_tables(chunks: Sequence[Table]) -> Table:
    """The chunks of one file as one Table (rows, lines and positions joined; columns in order of first
    appearance)."""
    if len(chunks) == 1:
        return chunks[0]
    first = chunks[0]
    rows = [row for chunk in chunks for row in chunk.rows]
    lines = None if first.lines is None else [n for chunk in chunks for n in chunk.lines or []]
    columns = list(dict.fromkeys(c for chunk in chunks for c in chunk.columns))
    return Table(first.path, columns, rows, lines, unit=first.unit, format=first.format,
                 delimiter=first.delimiter, class_labels=first.class_labels)


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


OPENS_ARRAY = re.compile(r"[ \t\r\n]*\[")
"""The start of a text that is a JSON array (JSON whitespace, then "[")."""


def parse_jsonl(text: str, path: str, problems: Problems) -> Table:
    """One JSON object per line, all rows in one Table (see `iter_jsonl_rows`); a text that is one JSON
    array of objects (`json.dump` of a list under a .jsonl name) is read as the array it is."""
    if OPENS_ARRAY.match(text):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            data = None  # not one array: line by line, each malformed line named
        if isinstance(data, list):
            return _records_table(data, path, problems)
    # split("\n"), not splitlines(): U+2028 and friends may sit raw inside JSON strings
    return merge_tables(list(iter_jsonl_rows(text.split("\n"), path, problems)))


def _line_error(line: str, exc: json.JSONDecodeError) -> json.JSONDecodeError:
    """The error of `line` without its line end (a streamed line keeps its "\n": "Expecting value" was
    then placed at column 1 of the next line)."""
    try:
        json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as bare:
        return bare
    return exc


def iter_jsonl_rows(lines: Iterable[str], path: str, problems: Problems,
                    chunk_rows: int = 1 << 62) -> Iterator[Table]:
    """One JSON object per line, in Tables of at most `chunk_rows` rows; a malformed line is named by its
    1-based number.

    Raises: DataError when the text holds no object; a malformed line or a non-object goes to `problems`
    (a DataError unless skipping).
    """
    loads = json.loads
    rows: list[dict] = []
    where: list[int] = []
    seen = 0
    for lineno, line in enumerate(lines, 1):
        if not line or line.isspace():
            continue
        try:
            record = loads(line)
        except json.JSONDecodeError as exc:
            exc = _line_error(line, exc)
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
        where.append(lineno)
        if len(rows) >= chunk_rows:
            yield Table(path, _columns_of(rows), rows, where, format="jsonl", offset=seen)
            seen += len(rows)
            rows, where = [], []
    if not rows and not seen and not problems.total:
        raise DataError(f"{path}: the file is empty")
    if rows or not seen:
        yield Table(path, _columns_of(rows), rows, where, format="jsonl", offset=seen)


class NotStreamable(Exception):
    """The JSON text is not a well-formed top-level array: read it whole (parse_json) for its own message."""


JSON_BLOCK_CHARS = 1 << 20  # characters of JSON text decoded per read while streaming an array


def iter_json_array(lines: Iterable[str], path: str, problems: Problems,
                    chunk_rows: int = 1 << 62) -> Iterator[Table]:
    """A top-level JSON array of objects, decoded one record at a time, in Tables of at most `chunk_rows`
    records: memory holds a block of text and one chunk, never the document. The rows, their numbering
    ("record N") and the problems are those of `parse_json` on the whole text.

    Raises: NotStreamable, possibly after some Tables, when the text is not a well-formed array (another top
    level, malformed JSON, text after the array): the caller parses the whole text with `parse_json`, which
    gives the message naming line and column. DataError for an empty array; a record that is not an object
    goes to `problems` (a DataError unless skipping).
    """
    decode = json.JSONDecoder().raw_decode
    source = iter(lines)
    buf, pos, eof = "", 0, False

    def more() -> None:
        nonlocal buf, pos, eof
        cut = buf.rfind("\n", 0, pos) + 1  # keep whole lines: positions stay valid for messages
        buf, pos = buf[cut:], pos - cut
        parts, size = [], 0
        for line in source:
            parts.append(line)
            size += len(line)
            if size >= JSON_BLOCK_CHARS:
                break
        else:
            eof = True
        buf += "".join(parts)

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos] if pos < len(buf) else ""
            more()

    more()
    if skip_space() != "[":
        raise NotStreamable
    pos += 1
    rows: list[dict] = []
    positions: list[int] = []
    records = kept = 0
    if skip_space() == "]":
        raise DataError(f"{path}: the JSON array is empty")
    while True:
        while True:
            try:
                record, end = decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    raise NotStreamable from None
                more()
                continue
            except (ValueError, RecursionError):
                raise NotStreamable from None
            if end < len(buf) or eof:  # a number at the end of the block may go on in the next
                break
            more()
        pos = end
        records += 1
        if isinstance(record, dict):
            rows.append(record)
            positions.append(records)
        else:
            problems.bad("not a JSON object",
                         f"{path}: record {records}: expected an object, found {type(record).__name__}")
        if len(rows) >= chunk_rows:
            yield Table(path, _columns_of(rows), rows, None, unit="record", format="json", positions=positions,
                        offset=kept)
            kept += len(rows)
            rows, positions = [], []
        delimiter = skip_space()
        pos += 1
        if delimiter == "]":
            break
        if delimiter != "," or skip_space() in ("]", ""):
            raise NotStreamable
    if skip_space() != "":
        raise NotStreamable  # text after the array
    if rows or not kept:
        yield Table(path, _columns_of(rows), rows, None, unit="record", format="json", positions=positions,
                    offset=kept)


def parse_json(text: str, path: str, problems: Problems) -> Table:
    """A JSON array of objects or {"data": [...]}; a file of one object per line is read as JSONL.

    Raises: DataError on malformed JSON, a top level that is neither an array nor {"data": [...]}, or an
    empty array; a record that is not an object goes to `problems` (a DataError unless skipping).
    """
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
    return _records_table(records, path, problems)


def _records_table(records: list, path: str, problems: Problems) -> Table:
    """The objects of a JSON array as a Table of records; a record that is not an object goes to `problems`.

    Raises: DataError for an empty array."""
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
