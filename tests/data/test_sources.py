"""Reading sources: every format, column mapping, schema checks, and errors that name file/line/column."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from instructkit.config import DatasetConfig
from instructkit.data.readers import read_table
from instructkit.data.readers_text import parse_jsonl
from instructkit.data.rows import strip_eos
from instructkit.data.sources import demo_path, load_source, rows_for_check
from instructkit.data.table import Problems
from instructkit.errors import DataError, InstructkitError
from instructkit.templates.library import TemplateLibrary

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"../shared/data not found: {DATA.resolve()}")
    return DATA.resolve()


@pytest.fixture(scope="module")
def library() -> TemplateLibrary:
    return TemplateLibrary.builtin()


def dataset(**kw) -> DatasetConfig:
    return DatasetConfig(**kw)


def sst2(library, path, **kw):
    templates = library.select(dataset="sst2")
    return load_source(
        dataset(path=str(path), schema="sst2", **kw), library.schema("sst2"), templates=templates
    )


def one_error(fn, *args, **kw) -> str:
    with pytest.raises(InstructkitError) as info:
        fn(*args, **kw)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def test_csv_with_bom_and_quoted_newline(tmp_path, library):
    path = tmp_path / "reviews.csv"
    path.write_bytes('\ufefflabel,sentence\n1,"good, really\ngood"\n0,bad\n'.encode())
    source = sst2(library, path)
    assert [r["sentence"] for r in source.rows] == ["good, really\ngood", "bad"]
    assert [r["label"] for r in source.rows] == [1, 0]  # coerced to the schema's int
    assert source.where(1).endswith("reviews.csv: line 4")  # the quoted field spans lines 2-3
    assert source.ids == ["sst2:0", "sst2:1"]


def test_tsv_has_no_quoting(tmp_path, library):
    path = tmp_path / "train.tsv"
    path.write_text('label\tsentence\n1\t"quoted" is text , like in GLUE\n0\tplain\n', encoding="utf-8")
    source = sst2(library, path)
    assert source.rows[0]["sentence"] == '"quoted" is text , like in GLUE'


def test_encoding_setting(tmp_path, library):
    path = tmp_path / "latin.csv"
    path.write_bytes("label,sentence\n1,caf\xe9 cr\xe8me\n".encode("latin-1"))
    assert sst2(library, path, encoding="latin-1").rows[0]["sentence"] == "café crème"


def test_json_array_data_key_and_jsonl_named_json(tmp_path):
    rows = [{"a": 1}, {"a": 2, "b": "x"}]
    (tmp_path / "arr.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("arr.json", "wrapped.json", "lines.json"):
        table = read_table(tmp_path / name)
        assert table.rows == rows and table.columns == ["a", "b"], name
    assert read_table(tmp_path / "lines.json").where(1) == "line 2"
    assert read_table(tmp_path / "arr.json").where(1) == "record 2"


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(
        json.dumps({"t": "a\u2028b"}, ensure_ascii=False) + "\r\n" + json.dumps({"t": "c"}) + "\n"
    )
    assert [r["t"] for r in read_table(path).rows] == ["a\u2028b", "c"]


def test_parquet(tmp_path, library):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"sentence": "fine", "label": 1}, {"sentence": "meh", "label": 0}]),
        tmp_path / "d.parquet",
    )
    source = sst2(library, tmp_path / "d.parquet")
    assert source.rows[1] == {"sentence": "meh", "label": 0}
    assert source.where(1).endswith("d.parquet: row 2")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, library):
    datasets = pytest.importorskip("datasets")
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    source = sst2(library, tmp_path / "one")
    assert len(source) == 6 and source.given is None
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows),
            "validation": datasets.Dataset.from_list(rows[:2]),
            "unsupervised": datasets.Dataset.from_list(rows[:1]),
        }
    ).save_to_disk(str(tmp_path / "dict"))
    source = sst2(library, tmp_path / "dict")
    assert source.given == ["train"] * 6 + ["validation"] * 2
    assert source.ids[6] == "sst2:validation:0"
    assert any("unsupervised" in note for note in source.notes)


def test_gzip_of_text_formats(tmp_path, library):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"sentence": "gz ok", "label": 1}\n')
    with gzip.open(tmp_path / "d.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("label\tsentence\n0\tgz tsv\n")
    assert sst2(library, tmp_path / "d.jsonl.gz").rows[0]["sentence"] == "gz ok"
    assert sst2(library, tmp_path / "d.tsv.gz").rows[0]["sentence"] == "gz tsv"


def test_parallel_files_explicit_and_by_stem(tmp_path, library):
    for split, n in (("train", 3), ("val", 2)):
        with gzip.open(tmp_path / f"{split}.en.gz", "wt", encoding="utf-8") as f:
            f.write("".join(f"en {i}\n" for i in range(n)))
        with gzip.open(tmp_path / f"{split}.de.gz", "wt", encoding="utf-8") as f:
            f.write("".join(f"de {i}\n" for i in range(n)))
    schema = library.schema("multi30k")
    templates = library.select(dataset="multi30k")
    explicit = dataset(
        parallel={"en": str(tmp_path / "train.en.gz"), "de": str(tmp_path / "train.de.gz")}, schema="multi30k"
    )
    source = load_source(explicit, schema, templates=templates)
    assert source.rows == [{"en": f"en {i}", "de": f"de {i}"} for i in range(3)]
    stems = dataset(
        files={"train": str(tmp_path / "train"), "validation": str(tmp_path / "val")},
        format="parallel",
        schema="multi30k",
    )
    source = load_source(stems, schema, templates=templates)
    assert source.given == ["train"] * 3 + ["validation"] * 2
    assert source.rows[4] == {"en": "en 1", "de": "de 1"}


def test_parallel_files_must_align(tmp_path, library):
    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "a.de").write_text("eins\n")
    config = dataset(parallel={"en": str(tmp_path / "a.en"), "de": str(tmp_path / "a.de")}, schema="multi30k")
    message = one_error(
        load_source, config, library.schema("multi30k"), templates=library.select(dataset="multi30k")
    )
    assert "a.en has 2" in message and "a.de has 1" in message


def test_prompt_completion_strips_eos(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Q: 1+1?\n", "completion": "2<|endoftext|>"},
        {"prompt": "Q: hi", "completion": " hello "},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    source = load_source(dataset(path=str(path)), None)
    assert source.kind == "prompt_completion"
    assert [(r["prompt"], r["completion"]) for r in source.rows] == [("Q: 1+1?", "2"), ("Q: hi", "hello")]
    assert any("'<|endoftext|>' from 1 completions" in note for note in source.notes)
    assert strip_eos("yes </s>") == ("yes", "</s>")


def test_chat_messages(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello!<|im_end|>"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    source = load_source(dataset(path=str(path)), None)
    assert source.kind == "chat"
    first, second = source.rows
    assert (first["prompt"], first["completion"]) == ("Hi?", "Hello!")
    assert first["messages"] == [{"role": "user", "content": "Hi?"}]
    assert second["completion"] == "6" and len(second["messages"]) == 4
    assert second["prompt"].splitlines() == [
        "system: Be brief.",
        "user: 2+2?",
        "assistant: 4",
        "user: and 3+3?",
        "assistant:",
    ]


def test_chat_must_end_with_assistant(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"}]}) + "\n")
    message = one_error(load_source, dataset(path=str(path)), None)
    assert "chat.jsonl: line 1" in message and "assistant" in message


def test_rows_for_check_maps_but_does_not_convert(tmp_path, library):
    path = tmp_path / "d.csv"
    path.write_text("stars,text\n1,fine\nfive,odd\n")
    rows = rows_for_check(path, library.schema("sst2"), {"label": "stars", "sentence": "text"}, limit=2)
    assert [(r["sentence"], r["label"]) for r in rows] == [("fine", "1"), ("odd", "five")]
    problems = library.check(rows={"sst2": rows}, templates=library.select(dataset="sst2"))
    assert problems and all(p.rule == "bad-value" and p.row == 1 for p in problems)
    message = one_error(rows_for_check, path, library.schema("sst2"))
    assert "d.csv" in message and "schema 'sst2'" in message and "stars, text" in message


def test_schema_less_file_suggests_schema(tmp_path, library):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    message = one_error(load_source, dataset(path=str(path)), None, schemas=library.schemas.values())
    assert "a.json" in message and "alpaca" in message


# --------------------------------------------------------------------------------------------------
# Errors name file, line, column and template
# --------------------------------------------------------------------------------------------------


def test_missing_column_names_file_column_existing_columns_and_suggestion(tmp_path, library):
    path = tmp_path / "d.csv"
    path.write_text("label,Sentence,other\n1,good,x\n")
    message = one_error(sst2, library, path)
    assert "d.csv" in message
    assert "'sentence'" in message and "Sentence, other" in message  # wanted column and the existing ones
    assert "did you mean 'Sentence'" in message
    assert "sst2.sentiment_with_options" in message  # a template that reads it


def test_empty_files(tmp_path, library):
    for name, content in (("e.csv", ""), ("e.jsonl", "\n\n"), ("e.json", "  "), ("bom.csv", "\ufeff")):
        (tmp_path / name).write_text(content, encoding="utf-8")
        message = one_error(sst2, library, tmp_path / name)
        assert name in message and "empty" in message
    (tmp_path / "header.csv").write_text("label,sentence\n")
    assert "no data rows" in one_error(sst2, library, tmp_path / "header.csv")


def test_malformed_json_line_names_its_line(tmp_path, library):
    path = tmp_path / "d.jsonl"
    path.write_text('{"sentence": "a", "label": 1}\n\n{"sentence": "b", "label": 0\n')
    message = one_error(sst2, library, path)
    assert "d.jsonl: line 3" in message and "malformed JSON" in message
    (tmp_path / "bad.json").write_text('[\n {"a": 1},\n {"a": 2,}\n]')
    assert "bad.json: line 3" in one_error(read_table, tmp_path / "bad.json")


def test_wrong_encoding_names_byte_offset_and_line(tmp_path, library):
    path = tmp_path / "d.csv"
    path.write_bytes(b"label,sentence\n1,fine\n0,caf\xe9\n")
    message = one_error(sst2, library, path)
    assert "d.csv: line 3" in message and "byte offset 27" in message and "encoding" in message


def test_ragged_csv_row_names_its_line(tmp_path, library):
    path = tmp_path / "d.csv"
    path.write_text("label,sentence\n1,fine\n0,bad, really bad\n")
    message = one_error(sst2, library, path)
    assert "d.csv: line 3" in message and "3 fields" in message and "header" in message


def test_label_outside_the_map_names_file_line_column_template(tmp_path, library):
    path = tmp_path / "d.tsv"
    path.write_text("label\tsentence\n1\tfine\n7\tweird\n")
    message = one_error(sst2, library, path)
    assert "d.tsv: line 3" in message and "column 'label'" in message and "outside the label map" in message
    assert "sst2.sentiment_with_options" in message


def test_bad_value_and_missing_value_name_the_column(tmp_path, library):
    path = tmp_path / "d.csv"
    path.write_text("label,sentence\nfive,fine\n")
    message = one_error(sst2, library, path)
    assert "d.csv: line 2" in message and "column 'label'" in message and "integer" in message
    path = tmp_path / "d.jsonl"
    path.write_text('{"label": 1, "sentence": null}\n')
    message = one_error(sst2, library, path)
    assert "d.jsonl: line 1" in message and "column 'sentence'" in message and "missing" in message


def test_mapped_column_errors_name_column_and_field(tmp_path, library):
    path = tmp_path / "d.csv"
    path.write_text("stars,text\n1,fine\n9,odd\n")
    message = one_error(sst2, library, path, columns={"label": "stars", "sentence": "text"})
    assert "line 3" in message and "column 'stars' (field 'label')" in message


def test_skip_bad_rows_counts_reasons(tmp_path, library):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"sentence": "ok", "label": 1}',
                '{"sentence": "broken", ',
                '{"sentence": "odd", "label": 9}',
                '{"label": 0}',
                "[1, 2]",
                '{"sentence": "ok too", "label": 0}',
            ]
        )
    )
    source = sst2(library, path, skip_bad_rows=True)
    assert [r["sentence"] for r in source.rows] == ["ok", "ok too"]
    assert source.skipped == {
        "malformed JSON line": 1,
        "label outside the label map": 1,
        "missing value (sentence)": 1,
        "not a JSON object": 1,
    }
    assert source.rows_read == 6
    assert source.ids == ["sst2:0", "sst2:3"]  # ids index the rows as parsed (stable when skipping)
    assert any("line 2" in s for s in source.skipped_samples)


def test_problems_raise_one_data_error():
    with pytest.raises(DataError, match="x.jsonl: line 2"):
        parse_jsonl('{"a": 1}\n{oops}\n', "x.jsonl", Problems(False))


# --------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------


def test_real_fine_food_bom_csv(data, library):
    source = load_source(
        dataset(path=str(data / "amazon_fine_food" / "reviews.csv"), schema="amazon_fine_food"),
        library.schema("amazon_fine_food"),
        templates=library.select(dataset="amazon_fine_food"),
    )
    assert len(source) == 1000
    assert source.files[0]["columns"]["Score"] == "Score"  # the BOM is not part of the first header name
    assert sum(r["Score"] == 5 for r in source.rows) == 642
    assert all(isinstance(r["Score"], int) for r in source.rows)


def test_real_amazon_2018_float_rating_becomes_int(data, library):
    """Mapping the 2018 file onto amazon_us_reviews: `overall: 5.0` becomes star_rating 5 (int)."""
    config = dataset(
        path=str(data / "amazon_fashion" / "reviews.jsonl"),
        schema="amazon_us_reviews",
        skip_bad_rows=True,
        columns={
            "star_rating": "overall",
            "review_body": "reviewText",
            "review_headline": "summary",
            "product_title": "asin",
        },
    )
    templates = [library.get("amazon_us_reviews.predict_rating")]
    source = load_source(config, library.schema("amazon_us_reviews"), templates=templates)
    assert {type(r["star_rating"]) for r in source.rows} == {int}
    assert source.skipped == {"missing value (reviewText)": 16}  # 16 rows of the file have no reviewText
    assert len(source) == 3160


def test_real_sst2_per_file_candidate_columns(data, library):
    config = dataset(
        files={"train": str(data / "sst2" / "train.tsv"), "test": str(data / "sst2" / "dev.tsv")},
        schema="sst2",
        columns={"sentence": ["sentence", "content"]},
    )
    source = load_source(config, library.schema("sst2"), templates=library.select(dataset="sst2"))
    assert len(source) == 67349 + 872
    assert [f["columns"]["sentence"] for f in source.files] == ["sentence", "content"]
    assert source.given[-1] == "test" and source.ids[-1] == "sst2:test:871"


def test_real_sst2_dev_without_mapping_names_content(data, library):
    message = one_error(sst2, library, data / "sst2" / "dev.tsv")
    assert "dev.tsv" in message and "content" in message and "'sentence'" in message


def test_real_multi30k_by_stem(data, library):
    config = dataset(path=str(data / "multi30k" / "val"), format="parallel", schema="multi30k")
    source = load_source(config, library.schema("multi30k"), templates=library.select(dataset="multi30k"))
    assert len(source) == 1014 and set(source.rows[0]) == {"en", "de"}


def test_real_p3_prompt_completion(data):
    path = data / "p3_samples" / "amazon_polarity_Is_this_review.jsonl"
    source = load_source(dataset(path=str(path)), None)
    assert source.kind == "prompt_completion" and len(source) == 200
    assert not any(r["completion"].endswith("<|endoftext|>") for r in source.rows)
    assert any("from 200 completions" in note for note in source.notes)


def test_demo_file_reads():
    if not demo_path().exists():
        pytest.skip("the demo reviews file is not there yet")
    library = TemplateLibrary.builtin()
    source = load_source(
        dataset(path="demo"),
        library.schema("amazon_us_reviews"),
        templates=library.select(dataset="amazon_us_reviews"),
    )
    assert len(source) > 0 and isinstance(source.rows[0]["star_rating"], int)
