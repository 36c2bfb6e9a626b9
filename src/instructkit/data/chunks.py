"""Files -> Tables of at most `chunk_rows` rows, read in bounded memory (preparation at scale).

    read_chunks(path, format, encoding, problems, chunk_rows) -> {split or None: () -> Iterator[Table]}

Each value is a function that reads the file (again) from its start, so preparation can pass over a file
twice (plan, then render) without holding its rows. The parsing and the messages are those of the whole-file
readers (readers_text.py): a problem names the file and the 1-based line (or row).

    .csv .tsv .jsonl (.gz too)   decoded line by line (a bad byte names its line and byte offset)
                                 (a .jsonl that is one JSON array is parsed whole)
    .json                        a top-level array decoded record by record (any other top level, or
                                 malformed JSON, is parsed whole for parse_json's message)
    .parquet                     record batches through pyarrow
    a folder                     saved with `Dataset.save_to_disk` (its Arrow files read batch by batch, a
                                 DatasetDict's splits kept), or a folder of Parquet shards (the split of a
                                 shard from its folder or name: `train/0000.parquet`, `test-00000-of-00001.parquet`)
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from instructkit.data.readers_text import (
    OPENS_ARRAY,
    NotStreamable,
    bom_bytes,
    decode_text,
    delimited_as,
    iter_delimited,
    iter_json_array,
    iter_jsonl_rows,
    parse_json,
    parse_jsonl,
    text_codec,
    undecodable,
)
from instructkit.data.table import Problems, Table
from instructkit.errors import DataError

CHUNK_ROWS = 20_000
"""Rows per Table when a file is read in parts."""
SPLIT_WORDS = ("train", "training", "validation", "valid", "val", "dev", "test", "testing")
LINE_CODECS_EXCLUDED = ("utf-16", "utf-32")
"""Encodings whose line ends are not the byte 0x0a: such files are decoded whole."""

Chunks = Callable[[], Iterator[Table]]
_AFTER_LONE_CR = re.compile(r"(?<=\r)(?!\n)")


def line_safe(encoding: str) -> bool:
    """Whether `encoding` writes a line end as the single byte 0x0a (utf-8, latin-1, cp1252, ...)."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return False
    return not name.startswith(LINE_CODECS_EXCLUDED)


def text_lines(path: Path, encoding: str, lone_cr: bool = False) -> Iterator[str]:
    """The decoded lines of a text file (with their line ends), a `.gz` decompressed on the fly. With `lone_cr`
    a carriage return not followed by a line feed ends a line too (classic Mac files, a CR inside a quoted
    CSV field), as `io.StringIO(text, newline="")` splits the whole text for the csv module.

    Raises: DataError as `decode_text` does (the line, byte offset and byte of the line of a bad byte),
    for a missing or unreadable file, or an empty one.
    """
    from instructkit.data.readers import open_binary

    decode = codecs.getdecoder(text_codec(encoding))
    offset, any_text = 0, False
    with open_binary(path) as handle:
        for lineno, raw in enumerate(handle, 1):
            skip = bom_bytes(raw, encoding) if lineno == 1 else 0
            try:
                text = decode(raw[skip:] if skip else raw)[0]
            except UnicodeDecodeError as exc:
                start = skip + exc.start
                raise undecodable(path, encoding, lineno, raw[start], offset + start, start + 1) from None
            except (OSError, EOFError) as exc:  # a damaged gzip stream
                raise DataError(f"{path}: not a valid gzip file ({exc})") from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            offset += len(raw)
            any_text = any_text or not text.isspace() and bool(text)
            if lone_cr and "\r" in text and text.count("\r") != text.endswith("\r\n"):
                yield from (part for part in _AFTER_LONE_CR.split(text) if part)
            else:
                yield text
    if not any_text:
        raise DataError(f"{path}: the file is empty")


def _text_chunks(path: Path, fmt: str, encoding: str, problems: Problems, chunk_rows: int,
                 separator: str | None = None) -> Iterator[Table]:
    from instructkit.data.readers import read_bytes

    yielded = 0
    # a .jsonl file that is one JSON array is parsed whole, as parse_jsonl reads it in memory
    whole = fmt == "jsonl" and line_safe(encoding) and _opens_array(path, encoding)
    if fmt == "json" and line_safe(encoding):
        try:
            for table in iter_json_array(text_lines(path, encoding), str(path), problems, chunk_rows):
                yielded += 1
                yield table
            return
        except NotStreamable:
            pass  # parse_json on the whole text names what is wrong (or reads {"data": [...]}, JSONL)
    if fmt == "json" or whole or not line_safe(encoding):
        text = decode_text(read_bytes(path), path, encoding)
        if fmt == "json":
            table = parse_json(text, str(path), problems)  # after streamed records: raises (malformed)
            if yielded:
                raise DataError(f"{path}: the JSON array could not be read record by record")
            yield table
            return
        if fmt == "jsonl" and OPENS_ARRAY.match(text):
            yield parse_jsonl(text, str(path), problems)
            return
        lines: object = text.split("\n") if fmt == "jsonl" else __import__("io").StringIO(text, newline="")
    else:  # JSON lines end at a line feed only, as parse_jsonl splits them
        lines = text_lines(path, encoding, lone_cr=fmt != "jsonl")
    if fmt == "jsonl":
        yield from iter_jsonl_rows(lines, str(path), problems, chunk_rows)  # type: ignore[arg-type]
    else:
        yield from iter_delimited(lines, str(path), separator or ",", problems,  # type: ignore[arg-type]
                                  chunk_rows, fmt=fmt)


def _opens_array(path: Path, encoding: str) -> bool:
    """Whether the text's first character other than whitespace is "[" (a JSON array)."""
    for line in text_lines(path, encoding):
        if line.strip():
            return line.lstrip().startswith("[")
    return False


def _batches_to_tables(batches: Iterator, where: str, fmt: str, chunk_rows: int, offset: int = 0
                       ) -> Iterator[Table]:
    """Arrow record batches -> Tables of at most `chunk_rows` rows named `row N` (counting from `offset`)."""
    rows: list[dict] = []
    columns: list[str] = []
    labels: dict[str, tuple[str, ...]] = {}
    for batch in batches:
        columns = list(batch.schema.names)
        labels = labels or class_labels(batch.schema)
        for start in range(0, batch.num_rows, chunk_rows):
            rows.extend(batch.slice(start, chunk_rows).to_pylist())
            while len(rows) >= chunk_rows:
                yield Table(where, columns, rows[:chunk_rows], None, format=fmt, offset=offset, class_labels=labels)
                offset += chunk_rows
                rows = rows[chunk_rows:]
    if rows:
        yield Table(where, columns, rows, None, format=fmt, offset=offset, class_labels=labels)


def class_labels(schema) -> dict[str, tuple[str, ...]]:
    """Column -> ClassLabel names, from the features `datasets` writes into an Arrow or Parquet schema's
    metadata (`huggingface` key); {} without them."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
        return {name: tuple(str(n) for n in feature["names"]) for name, feature in features.items()
                if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"
                and isinstance(feature.get("names"), list)}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


def parquet_chunks(path: Path, chunk_rows: int) -> Iterator[Table]:
    """One Parquet file in record batches.

    Raises: DataError when the file is missing, not readable as Parquet, or has no rows."""
    import pyarrow.parquet as pq

    from instructkit.data.readers import not_found

    if not path.exists():
        raise not_found(path)
    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    if handle.metadata.num_rows == 0:
        raise DataError(f"{path}: the file has no rows (columns: {', '.join(handle.schema_arrow.names)})")
    yield from _batches_to_tables(handle.iter_batches(batch_size=chunk_rows), str(path), "parquet", chunk_rows)


def _arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{folder}: cannot load the saved dataset: state.json unreadable ({exc})") from None
    return files


def saved_chunks(folder: Path, where: str, chunk_rows: int) -> Iterator[Table]:
    """A `Dataset.save_to_disk` folder: its Arrow stream files read batch by batch (never mapped whole).

    Raises: DataError when a file cannot be read or the dataset has no rows."""
    import pyarrow as pa

    def batches() -> Iterator:
        for file in _arrow_files(folder):
            try:
                with pa.OSFile(str(file)) as source:
                    yield from pa.ipc.open_stream(source)
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"{where}: cannot load the saved dataset: {exc}") from None

    any_rows = False
    for table in _batches_to_tables(batches(), where, "hf_disk", chunk_rows):
        any_rows = any_rows or bool(table.rows)
        yield table
    if not any_rows:
        raise DataError(f"{where}: the dataset has no rows")


def _split_of(shard: Path, root: Path) -> str | None:
    """`train` for train/0000.parquet, data/train-00000-of-00002.parquet or train.parquet; else None."""
    for part in shard.relative_to(root).parts[:-1][::-1]:
        if part.lower() in SPLIT_WORDS:
            return part
    head = re.split(r"[-_.]", shard.name, maxsplit=1)[0]
    return head if head.lower() in SPLIT_WORDS else None


def folder_chunks(path: Path, chunk_rows: int) -> dict[str | None, Chunks]:
    """A saved-dataset folder or a folder of Parquet shards: {split or None: chunks}.

    Raises: DataError for a folder that is neither (naming what it lacks).
    """
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: cannot load the saved dataset: dataset_dict.json unreadable ({exc})") from None
        return {s: (lambda s=s: saved_chunks(path / s, f"{path} [{s}]", chunk_rows)) for s in splits}
    if (path / "state.json").is_file():
        return {None: lambda: saved_chunks(path, str(path), chunk_rows)}
    shards = sorted(path.rglob("*.parquet"))
    if not shards:
        raise DataError(
            f"{path}: this folder is not a dataset saved with `save_to_disk` (no dataset_dict.json or "
            "state.json) and holds no .parquet shards; for line-aligned text files use `format: parallel`"
        )
    by_split: dict[str | None, list[Path]] = {}
    for shard in shards:
        by_split.setdefault(_split_of(shard, path), []).append(shard)

    def read(files: list[Path]) -> Iterator[Table]:
        for shard in files:
            yield from parquet_chunks(shard, chunk_rows)

    return {s: (lambda files=files: read(files)) for s, files in by_split.items()}


def read_chunks(path: Path, fmt: str, encoding: str, problems: Problems,
                chunk_rows: int = CHUNK_ROWS, delimiter: str | None = None) -> dict[str | None, Chunks]:
    """{None: chunks} for a file, {split: chunks} for a DatasetDict or split Parquet shards (`fmt` as
    detected by readers.detect_format; `delimiter`: DatasetConfig.delimiter, readers_text.delimited_as).

    Raises: DataError for a multi-file format (parallel), a delimiter for a format without one, or an
    unknown encoding; reading raises what the format's reader raises (naming the file and line).
    """
    separator = None
    if delimiter is not None or fmt in ("csv", "tsv"):
        fmt, separator = delimited_as(path, fmt, delimiter)
    if fmt in ("csv", "tsv", "json", "jsonl"):
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise DataError(
                f"{path}: unknown text encoding {encoding!r} (set `encoding:`, e.g. utf-8 or latin-1)"
            ) from None
        return {None: lambda: _text_chunks(path, fmt, encoding, problems, chunk_rows, separator)}
    if fmt == "parquet":
        return {None: lambda: parquet_chunks(path, chunk_rows)}
    if fmt == "hf_disk":
        from instructkit.data.readers import not_found

        if not path.is_dir():
            raise not_found(path) if not path.exists() else DataError(
                f"{path}: expected a folder saved with save_to_disk or a folder of .parquet shards")
        return folder_chunks(path, chunk_rows)
    raise DataError(f"{path}: format {fmt!r} cannot be read as a single file")
