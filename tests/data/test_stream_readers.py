"""Streaming readers: a .json array record by record, parallel files line by line (data/chunks.py, readers.py)."""

from __future__ import annotations

import json

import pytest

from instructkit.data import readers_text
from instructkit.data.chunks import read_chunks
from instructkit.data.readers_text import parse_json
from instructkit.data.table import Problems
from instructkit.errors import DataError


def _streamed(path, chunk_rows=3, skip=False):
    problems = Problems(skip)
    (read,) = read_chunks(path, "json", "utf-8", problems, chunk_rows).values()
    tables = list(read())
    return tables, problems


def _whole(path, skip=False):
    problems = Problems(skip)
    return parse_json(path.read_text(encoding="utf-8-sig"), str(path), problems), problems


@pytest.mark.parametrize("block", [7, 1 << 20])  # tiny blocks: every record and number crosses a block end
@pytest.mark.parametrize("indent", [None, 2])
def test_rows_and_record_numbers_equal_parse_json(tmp_path, monkeypatch, block, indent):
    monkeypatch.setattr(readers_text, "JSON_BLOCK_CHARS", block)
    records = [{"text": f"row {i}\nwith \u2028 and \"quotes\"", "n": 10 ** i, "x": [1.5, None, True]}
               for i in range(8)]
    records.insert(3, 12345678)  # not an object: skipped, and the records after keep their numbers
    records.insert(6, ["a"])
    path = tmp_path / "d.json"
    path.write_text("\ufeff " + json.dumps(records, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    tables, problems = _streamed(path, skip=True)
    whole, whole_problems = _whole(path, skip=True)
    assert [r for t in tables for r in t.rows] == whole.rows
    assert [t.where(i) for t in tables for i in range(len(t.rows))] == \
        [whole.where(i) for i in range(len(whole.rows))]
    assert [t.offset for t in tables] == [0, 3, 6][:len(tables)]
    assert problems.total == whole_problems.total == 2
    assert all(len(t.rows) <= 3 for t in tables) and len(tables) == 3


@pytest.mark.parametrize("text, message", [
    ('[{"a": 1}, {"a": 2,}]', r"line 1: malformed JSON at column 20"),
    ('[{"a": 1},\n {"a": 2}\n] extra', r"line 3: malformed JSON at column 3: Extra data"),
    ('[{"a": 1}, ]', r"line 1: malformed JSON"),
    ('[{"a": 1}', r"line 1: malformed JSON"),
    ("[]", r"the JSON array is empty"),
    ('{"other": 1}', r"expected a JSON array of objects"),
])
def test_errors_are_parse_jsons(tmp_path, monkeypatch, text, message):
    monkeypatch.setattr(readers_text, "JSON_BLOCK_CHARS", 4)
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        _streamed(path)
    with pytest.raises(DataError, match=message):
        _whole(path)


def test_other_top_levels_still_read(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [{"a": 1}, {"a": 2}]}), encoding="utf-8")
    assert [r for t in _streamed(path)[0] for r in t.rows] == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")  # JSON lines under a .json name
    assert [r for t in _streamed(path)[0] for r in t.rows] == [{"a": 1}, {"a": 2}]


def test_a_non_object_record_is_named_when_not_skipping(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1}, {"a": 2}, 3]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json: record 3: expected an object, found int"):
        _streamed(path)


def test_parallel_files_read_line_by_line_in_chunks(tmp_path):
    """iter_parallel: the rows of line-aligned files in chunks, empty lines skipped with their numbers kept,
    CRLF ends dropped, a line-count mismatch named with both counts."""
    import gzip

    from instructkit.data.readers import iter_parallel

    (tmp_path / "a.en").write_bytes(b"one\r\ntwo\n\nfour\nfive\nsix\nseven")
    with gzip.open(tmp_path / "a.de.gz", "wb") as handle:
        handle.write(b"eins\nzwei\ndrei\nvier\nfuenf\nsechs\nsieben\n")
    files = {"en": tmp_path / "a.en", "de": tmp_path / "a.de.gz"}
    problems = Problems(True)
    tables = list(iter_parallel(files, "utf-8", problems, chunk_rows=4))
    assert [len(t.rows) for t in tables] == [4, 2] and [t.offset for t in tables] == [0, 4]
    assert tables[0].rows[:2] == [{"en": "one", "de": "eins"}, {"en": "two", "de": "zwei"}]
    assert [t.where(i) for t in tables for i in range(len(t.rows))] == \
        ["line 1", "line 2", "line 4", "line 5", "line 6", "line 7"]
    assert problems.total == 1
    (tmp_path / "b.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "b.de").write_text("eins\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"not line-aligned: .*b.en has 3, .*b.de has 1 lines"):
        list(iter_parallel({"en": tmp_path / "b.en", "de": tmp_path / "b.de"}, "utf-8", Problems(False), 1))
