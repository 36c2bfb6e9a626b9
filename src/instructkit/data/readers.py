"""Files -> Tables: pick each file's format, read its bytes, hand text to a parser or read the Arrow formats.

Formats (`format: auto` picks by suffix; a `.gz` of any text format is decompressed first):

    .csv .tsv .json .jsonl (.ndjson)   text, parsed in readers_text.py
    .parquet    through pyarrow
    a folder    a Hugging Face dataset saved with `save_to_disk` (a DatasetDict gives its splits), or a
                folder of Parquet shards (`train/0000.parquet`, `data/test-00000-of-00001.parquet`)
    parallel    line-aligned text files, one per field: `parallel: {en: train.en.gz, de: train.de.gz}`,
                or `format: parallel` with `path` (or each `files:` entry) a stem such as
                `multi30k/train`, read as `<stem>.<field>[.gz]` for each schema field
                (`columns: {en: english}` reads `<stem>.english`)

Parquet files and saved datasets are Arrow already and are read batch by batch with pyarrow (chunks.py,
which also reads every format in bounded chunks for preparation at scale).
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import itertools
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from instructkit.config_load import PATH_RULE
from instructkit.data.chunks import CHUNK_ROWS, parquet_chunks, read_chunks
from instructkit.data.readers_text import (
    decode_text,
    delimited_as,
    merge_tables,
    parse_delimited,
    parse_json,
    parse_jsonl,
)
from instructkit.data.table import Problems, Table
from instructkit.errors import ConfigError, DataError

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


def detect_format(path: Path, declared: str = "auto") -> str:
    """The format of `path`: the declared one, or the suffix's (after a `.gz`); a folder is hf_disk.

    Raises: DataError when the name has no known suffix and no format is declared.
    """
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


def not_found(path: Path) -> DataError:
    hint = ""
    parent = path.parent
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=2, cutoff=0.6)
        if close:
            hint = f"; did you mean {' or '.join(str(parent / c) for c in close)}?"
    elif not parent.exists():
        hint = f" (the folder {parent} does not exist either)"
    # The absolute path tried, and the rule that made it (config_load.PATH_RULE).
    return DataError(f"{os.path.abspath(path)}: file not found{hint}; {PATH_RULE}")


@contextlib.contextmanager
def _opening(path: Path) -> Iterator[None]:
    """OSError/ValueError while opening or reading `path` -> DataError naming it (close names when missing)."""
    try:
        yield
    except FileNotFoundError:
        raise not_found(path) from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a NUL character in the path
        raise DataError(f"{path!r}: not a usable file path ({exc})") from None


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when the name ends in .gz.

    Raises: DataError when the file is missing (naming close names), a folder, unreadable, or a bad gzip.
    """
    with _opening(path):
        data = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: not a valid gzip file ({exc})") from None
    return data


def open_binary(path: Path) -> IO[bytes]:
    """The file opened for reading bytes, decompressed on the fly when the name ends in .gz.

    Raises: DataError as `read_bytes` does for a missing, unreadable or folder path.
    """
    with _opening(path):
        return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def read_parquet(path: Path) -> Table:
    """One Parquet file, read through pyarrow.

    Raises: DataError when the file is missing, not readable as Parquet, or has no rows.
    """
    return merge_tables(list(parquet_chunks(path, CHUNK_ROWS)))


def read_hf_disk(path: Path) -> dict[str | None, Table]:
    """A dataset saved with `save_to_disk` ({None: table} for a Dataset, {split: table} for a
    DatasetDict) or a folder of Parquet shards (split by their folder or name, data/chunks.py).

    Raises: DataError when `path` is neither, cannot be loaded, or a split has no rows.
    """
    chunks = read_chunks(path, "hf_disk", "utf-8", Problems(False))
    return {split: merge_tables(list(read())) for split, read in chunks.items()}


def read_parallel(files: Mapping[str, Path], encoding: str, problems: Problems) -> Table:
    """Line-aligned text files, one per field: line i of each file makes row i.

    Raises: ConfigError for fewer than two files; DataError when a file cannot be read or decoded or the
    files differ in line count; an empty line goes to `problems` (a DataError unless skipping).
    """
    return merge_tables(list(iter_parallel(files, encoding, problems)))


def iter_parallel(files: Mapping[str, Path], encoding: str, problems: Problems,
                  chunk_rows: int = 1 << 62) -> Iterator[Table]:
    """`read_parallel` in Tables of at most `chunk_rows` rows, the files read line by line together (whole
    for encodings whose line end is not one byte, utf-16/32). A line-count mismatch is found at the end,
    after the aligned rows were handed out. Raises as `read_parallel`."""
    from instructkit.data.chunks import line_safe, text_lines

    if len(files) < 2:
        raise ConfigError(f"parallel data needs at least two files (one per field), got {dict(files)}")
    names = list(files)
    if line_safe(encoding):
        sources = [text_lines(path, encoding) for path in files.values()]
    else:
        sources = []
        for path in files.values():
            lines = decode_text(read_bytes(path), path, encoding).split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            sources.append(iter(lines))
    label = " + ".join(str(p) for p in files.values())
    rows: list[dict] = []
    lines_kept: list[int] = []
    counts, seen = [0] * len(names), 0
    missing = object()
    for i, values in enumerate(itertools.zip_longest(*sources, fillvalue=missing)):
        if any(v is missing for v in values):
            counts = [i + (v is not missing) + sum(1 for _ in source) for v, source in zip(values, sources)]
            break
        values = tuple(v.removesuffix("\n").removesuffix("\r") for v in values)
        counts = [i + 1] * len(names)
        empty = [names[j] for j, v in enumerate(values) if not v.strip()]
        if empty:
            where = ", ".join(str(files[n]) for n in empty)
            problems.bad("empty line in parallel files",
                         f"{where}: line {i + 1}: empty line (field {', '.join(empty)})")
            continue
        rows.append(dict(zip(names, values)))
        lines_kept.append(i + 1)
        if len(rows) >= chunk_rows:
            yield Table(label, names, rows, lines_kept, format="parallel", offset=seen)
            seen += len(rows)
            rows, lines_kept = [], []
    if len(set(counts)) > 1:
        detail = ", ".join(f"{files[name]} has {n}" for name, n in zip(names, counts))
        raise DataError(f"parallel files are not line-aligned: {detail} lines")
    if rows or not seen:
        yield Table(label, names, rows, lines_kept, format="parallel", offset=seen)


def read_table(
    path: str | Path, format: str = "auto", encoding: str = "utf-8", skip_bad_rows: bool = False
) -> Table:
    """Read one file (not a DatasetDict folder: see `read_tables`).

    Raises: DataError when the path holds several splits, or as `read_tables`.
    """
    tables = read_tables(Path(path), format, encoding, Problems(skip_bad_rows))
    if len(tables) != 1:
        raise DataError(f"{path}: holds several splits ({', '.join(map(str, tables))}); use read_tables")
    return next(iter(tables.values()))


def read_tables(path: Path, format: str, encoding: str, problems: Problems,
                delimiter: str | None = None) -> dict[str | None, Table]:
    """Read a file or saved-dataset folder; {None: table} unless the folder is a DatasetDict. `delimiter`:
    DatasetConfig.delimiter (readers_text.delimited_as).

    Raises: DataError for an unknown or multi-file format (parallel), a delimiter for a format without
    one, or what the format's reader raises.
    """
    fmt = detect_format(path, format)
    if delimiter is not None or fmt in ("csv", "tsv"):
        fmt, separator = delimited_as(path, fmt, delimiter)
        text = decode_text(read_bytes(path), path, encoding)
        return {None: parse_delimited(text, str(path), separator, problems, fmt=fmt)}
    if fmt in TEXT_FORMATS:
        text = decode_text(read_bytes(path), path, encoding)
        if fmt == "json":
            return {None: parse_json(text, str(path), problems)}
        return {None: parse_jsonl(text, str(path), problems)}
    if fmt == "parquet":
        return {None: read_parquet(path)}
    if fmt == "hf_disk":
        return read_hf_disk(path)
    raise DataError(f"{path}: format {fmt!r} cannot be read as a single file")
