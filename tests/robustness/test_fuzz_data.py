"""Fuzzing data: damaged files through the readers (data.sources) and odd rows through `prepare`.

Files: truncated JSON lines, ragged CSV rows, wrong delimiters, BOMs, binary garbage, invalid UTF-8, bad
gzip, NUL bytes, CRLF/CR line ends, deep nesting, huge numbers. Rows: odd Unicode, empty strings, huge
fields, missing and extra columns, numbers where strings are expected, wrong label types.

Acceptable outcomes only: the rows (a correct Table / PrepareResult), or an InstructkitError naming the
culprit (the file and line, the dataset, the column or field, the template).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import strategies as st

import _robust
from _robust import expect_clean, fuzz_test, time_limit
from instructkit.config import DatasetConfig, RunConfig
from instructkit.data.build import load_examples, prepare
from instructkit.data.readers import read_table
from instructkit.data.sources import load_source
from instructkit.data.table import Problems
from instructkit.errors import DataError
from instructkit.templates.library import TemplateLibrary

LIBRARY = TemplateLibrary.builtin()
SCHEMA = LIBRARY.schema("amazon_us_reviews")
TEMPLATES = ["amazon_us_reviews.predict_rating", "amazon_us_reviews.describe_review"]
COLUMNS = ["review_body", "star_rating", "product_title", "review_headline"]

odd_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\t", "\n", "\r\n", "\x00", "\u2028", "\u200b", "\ufeff", "é", "\U0001F600",
                     "a,b", '"quoted"', "tab\there", "x" * 3000, "{{ review_body }}", "</s>", "<|endoftext|>",
                     "NaN", "null", "5.0", "  5  ", "-0", "1e3", "٣"]),
)
odd_value = st.one_of(odd_text, st.integers(-10, 10), st.integers(), st.floats(allow_nan=True), st.booleans(),
                      st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                      st.integers(), max_size=2))
review_rows = st.lists(
    st.fixed_dictionaries(
        {},
        optional={"review_body": st.one_of(odd_text, odd_value), "star_rating": st.one_of(st.integers(0, 6), odd_value),
                  "product_title": odd_value, "review_headline": st.one_of(odd_text, odd_value),
                  "extra": odd_value, "Review_Body": odd_text},
    ),
    min_size=0, max_size=12,
)


def _good_row(i: int) -> dict:
    return {"review_body": f"review number {i} is fine", "star_rating": 1 + i % 5,
            "product_title": f"product {i % 3}", "review_headline": f"headline {i}"}


# --------------------------------------------------------------------------------------------------
# Files -> bytes
# --------------------------------------------------------------------------------------------------


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, allow_nan=True)


def _encode(rows: list[dict], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8", "surrogatepass")
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=False).encode("utf-8", "surrogatepass")
    columns = list(dict.fromkeys(k for r in rows for k in r)) or COLUMNS
    buffer = io.StringIO()
    if fmt == "csv":
        writer = csv.writer(buffer)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_as_text(r.get(c, "")) for c in columns])
    else:  # tsv: no quoting, as GLUE writes it
        buffer.write("\t".join(columns) + "\n")
        for r in rows:
            cells = (_as_text(r.get(c, "")).replace("\t", " ").replace("\n", " ") for c in columns)
            buffer.write("\t".join(cells) + "\n")
    return buffer.getvalue().encode("utf-8", "surrogatepass")


MUTATIONS = ["none", "truncate", "insert_bytes", "bom", "swap_delimiter", "ragged", "invalid_utf8", "garbage",
             "nul", "crlf", "cr", "gzip", "gzip_truncated", "drop_header", "duplicate_header", "deep_nesting",
             "huge_number", "empty", "only_newlines"]


def _mutate(data: bytes, fmt: str, mutation: str, draw) -> tuple[bytes, bool]:
    """(damaged bytes, gzipped?)"""
    if mutation == "truncate":
        return data[: draw(st.integers(0, max(len(data), 1)))], False
    if mutation == "insert_bytes":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:], False
    if mutation == "bom":
        return b"\xef\xbb\xbf" + data, False
    if mutation == "swap_delimiter":
        a, b = draw(st.sampled_from([(b",", b"\t"), (b"\t", b","), (b",", b";"), (b"\n", b","), (b'"', b"'")]))
        return data.replace(a, b), False
    if mutation == "ragged":
        lines = data.split(b"\n")
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        lines[i] = lines[i] + draw(st.sampled_from([b",x", b"\tx", b",", b""])) if lines else b","
        if len(lines) > 2 and draw(st.booleans()):
            lines[-2] = lines[-2].split(b",")[0]
        return b"\n".join(lines), False
    if mutation == "invalid_utf8":
        i = draw(st.integers(0, len(data)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\x80\x80"]))
        return data[:i] + bad + data[i:], False
    if mutation == "garbage":
        return draw(st.binary(max_size=200)), False
    if mutation == "nul":
        return data.replace(b" ", b"\x00", 1), False
    if mutation == "crlf":
        return data.replace(b"\n", b"\r\n"), False
    if mutation == "cr":
        return data.replace(b"\n", b"\r"), False
    if mutation == "gzip":
        return gzip.compress(data), True
    if mutation == "gzip_truncated":
        packed = gzip.compress(data)
        return packed[: draw(st.integers(0, len(packed) - 1))], True
    if mutation == "drop_header":
        return b"\n".join(data.split(b"\n")[1:]), False
    if mutation == "duplicate_header":
        lines = data.split(b"\n")
        return b"\n".join(lines[:1] + lines), False
    if mutation == "deep_nesting":
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        return data + b'{"review_body": ' + b"[" * depth + b"]" * depth + b"}\n", False
    if mutation == "huge_number":
        return data + b'{"star_rating": ' + b"9" * draw(st.sampled_from([20, 400, 5000])) + b"}\n", False
    if mutation == "empty":
        return b"", False
    if mutation == "only_newlines":
        return b"\n\r\n \n", False
    return data, False


@st.composite
def damaged_files(draw):
    fmt = draw(st.sampled_from(["csv", "tsv", "json", "jsonl"]))
    rows = draw(st.one_of(review_rows, st.builds(lambda n: [_good_row(i) for i in range(n)], st.integers(1, 8))))
    mutation = draw(st.sampled_from(MUTATIONS))
    data, zipped = _mutate(_encode(rows, fmt), fmt, mutation, draw)
    declared = draw(st.sampled_from(["auto", "auto", "auto", "csv", "tsv", "json", "jsonl"]))
    return fmt, mutation, data, zipped, declared


def _write(tmp: str, fmt: str, data: bytes, zipped: bool) -> Path:
    path = Path(tmp) / f"reviews.{fmt}{'.gz' if zipped else ''}"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


@fuzz_test(default=200, slow=3000,
           case=damaged_files(), skip=st.booleans(), encoding=st.sampled_from(["utf-8", "utf-8", "latin-1", "cp1252",
                                                                             "utf-16", "no-such-codec"]))
def test_damaged_files_read_or_name_the_file(case, skip, encoding):
    fmt, mutation, data, zipped, declared = case
    with tempfile.TemporaryDirectory() as tmp, time_limit(10, "reading a damaged file"):
        path = _write(tmp, fmt, data, zipped)
        with expect_clean(f"data file: {mutation}", [str(path)], (declared, encoding, skip, data[:300])) as out:
            table = read_table(path, declared, encoding, skip_bad_rows=skip)
        if out["error"] is not None:
            return
        assert all(isinstance(row, dict) for row in table.rows)
        if table.lines is not None:
            assert len(table.lines) == len(table.rows) and table.lines == sorted(table.lines)
        for i in range(len(table.rows)):
            assert table.where(i)  # every kept row can be named in a message


@fuzz_test(default=100, slow=1500,
           case=damaged_files(), skip=st.booleans(), mapping=st.sampled_from([{}, {"review_body": "Review_Body"},
                                                                              {"review_body": ["Text", "review_body"]},
                                                                              {"nonexistent": "x"}]))
def test_damaged_files_through_load_source_name_file_line_or_column(case, skip, mapping):
    fmt, mutation, data, zipped, declared = case
    templates = [LIBRARY.get(t) for t in TEMPLATES]
    with tempfile.TemporaryDirectory() as tmp, time_limit(10, "load_source on a damaged file"):
        path = _write(tmp, fmt, data, zipped)
        dataset = DatasetConfig(path=str(path), schema="amazon_us_reviews", templates=TEMPLATES, format=declared,
                                columns=mapping, skip_bad_rows=skip, name="fuzzset")
        culprits = [str(path), "fuzzset", "nonexistent"]
        with expect_clean(f"load_source: {mutation}", culprits, (declared, mapping, skip, data[:300])) as out:
            source = load_source(dataset, SCHEMA, templates=templates)
        if out["error"] is not None:
            return
        assert len(source.rows) == len(source.ids) >= 1
        for row in source.rows:  # every kept row passed the schema: its label is in the label map
            assert SCHEMA.check_label(row) is None
            assert isinstance(row["star_rating"], int) and isinstance(row["review_body"], str)


# --------------------------------------------------------------------------------------------------
# prepare: odd rows end to end (read -> dedup -> split -> render -> atomic write)
# --------------------------------------------------------------------------------------------------


def _check_prepared(result, run_dir: Path) -> None:
    seen: dict[str, str] = {}
    for split in ("train", "validation", "test"):
        for example in load_examples(run_dir, split):
            assert {"prompt", "completion", "choices", "task", "template_id", "source_id", "dataset",
                    "template_version", "label", "metrics"} <= set(example)
            assert example["prompt"] and example["completion"]
            if example["choices"] is not None:
                assert example["completion"] in example["choices"]
            assert seen.setdefault(example["source_id"], split) == split  # a source row in one split only
    assert json.loads((run_dir / "stats.json").read_text(encoding="utf-8"))["examples"] == result.counts


@fuzz_test(default=50, slow=800,
           rows=review_rows, good=st.integers(0, 12), fmt=st.sampled_from(["jsonl", "json", "csv", "tsv"]),
           skip=st.booleans(), per_row=st.sampled_from([None, 1]))
def test_odd_rows_through_prepare(rows, good, fmt, skip, per_row):
    rows = [_good_row(i) for i in range(good)] + rows
    with tempfile.TemporaryDirectory() as tmp, time_limit(20, "prepare on odd rows"):
        path = Path(tmp) / f"reviews.{fmt}"
        path.write_bytes(_encode(rows, fmt))
        config = RunConfig(name="fuzz", output_dir=str(Path(tmp) / "runs"), datasets=[DatasetConfig(
            path=str(path), schema="amazon_us_reviews", templates=TEMPLATES, skip_bad_rows=skip,
            templates_per_row=per_row, name="fuzzset")], split={"seed": 1, "validation": 0.2, "test": 0.2})
        run_dir = config.run_dir
        culprits = [str(path), "fuzzset", *TEMPLATES]
        with expect_clean("prepare: odd rows", culprits, (fmt, skip, rows)) as out:
            result = prepare(config, library=LIBRARY)
        if out["error"] is not None:
            leftovers = sorted(p.name for p in run_dir.glob("*")) if run_dir.exists() else []
            assert not leftovers, f"a failed prepare left files behind: {leftovers}"  # atomic: all or nothing
            return
        _check_prepared(result, run_dir)


chat_turn = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "USER", "tool", ""]),
                           "content": st.one_of(odd_text, odd_value)}),
    odd_value,
)
prompt_completion_rows = st.lists(
    st.fixed_dictionaries({}, optional={"prompt": st.one_of(odd_text, odd_value),
                                        "completion": st.one_of(odd_text, odd_value), "extra": odd_value}),
    max_size=10)
chat_rows = st.lists(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(chat_turn, max_size=4), odd_value,
                                                  st.lists(chat_turn, max_size=3).map(json.dumps))}),
    max_size=10)


def _good_instruction_row(kind: str, i: int) -> dict:
    if kind == "chat":
        return {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i}?"},
                             {"role": "assistant", "content": f"answer {i}<|im_end|>"}]}
    return {"prompt": f"question {i}?", "completion": f"answer {i}"}


@fuzz_test(default=50, slow=800,
           kind=st.sampled_from(["prompt_completion", "chat"]), data=st.data(), good=st.integers(0, 6), skip=st.booleans())
def test_odd_instruction_rows_through_prepare(kind, data, good, skip):
    """Data already in prompt/completion or chat form (no schema, no template)."""
    odd = data.draw(chat_rows if kind == "chat" else prompt_completion_rows)
    rows = [_good_instruction_row(kind, i) for i in range(good)] + odd
    with tempfile.TemporaryDirectory() as tmp, time_limit(20, "prepare on odd instruction rows"):
        path = Path(tmp) / "sft.jsonl"
        path.write_bytes(_encode(rows, "jsonl"))
        config = RunConfig(name="fuzz", output_dir=str(Path(tmp) / "runs"),
                           datasets=[DatasetConfig(path=str(path), skip_bad_rows=skip, name="sft")])
        with expect_clean(f"prepare: {kind} rows", [str(path), "sft"], rows) as out:
            result = prepare(config, library=LIBRARY)
        if out["error"] is None:
            _check_prepared(result, config.run_dir)
            for split in ("train", "validation", "test"):
                for example in load_examples(config.run_dir, split):
                    assert not example["completion"].endswith("<|im_end|>")  # the EOS marker is stripped


# --------------------------------------------------------------------------------------------------
# Regression tests for what the fuzzers found, and fixed cases that must name the culprit
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content", [
    ("deep.jsonl", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000),
    ("big.jsonl", b'{"a": ' + b"9" * 5000 + b"}\n"),
    ("big.json", b'[{"a": ' + b"9" * 5000 + b"}]"),
])
def test_json_the_parser_refuses_is_a_data_error_naming_the_file(name, content, tmp_path):
    """Found by fuzzing: RecursionError / ValueError escaped json.loads in the readers."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{path}.*cannot read this JSON"):
        read_table(path)
    if name.endswith(".jsonl"):
        assert read_table(path, skip_bad_rows=True).rows == []


def test_prepared_jsonl_the_parser_refuses_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    deep = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": ' + deep + b"}\n")
    with pytest.raises(DataError, match=rf"{path}: line 2: cannot read this JSON"):
        load_examples(path)


def test_problems_collector_counts_and_samples_when_skipping():
    problems = Problems(skip=True)
    for i in range(15):
        problems.bad("reason", f"message {i}")
    assert problems.total == 15 and len(problems.samples) == 10
    with pytest.raises(DataError, match="first"):
        Problems(skip=False).bad("reason", "first")
    _robust.tried("data: problems collector")
