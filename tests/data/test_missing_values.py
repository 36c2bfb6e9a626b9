"""What counts as missing is one rule for every file format (issue 19, item 2).

One pandas DataFrame with one missing review body, written as CSV (an empty cell), TSV, Parquet (a null),
`to_json` (records and lines: a null) and JSONL through `json.dumps` (a bare NaN), gives the same
outcome in every format: a DataError naming file, 1-based line (or row/record) and column, or with
`skip_bad_rows` the same skipped row and the same examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

from instructkit.config import DatasetConfig, RunConfig, SplitConfig
from instructkit.data import prepare
from instructkit.data.rows import missing_kind
from instructkit.data.sources import load_source
from instructkit.errors import DataError
from instructkit.templates.library import TemplateLibrary

RATING = "amazon_us_reviews.predict_rating"
MISSING_AT = 4
"""0-based index of the row whose review body is missing."""


@pytest.fixture(scope="module")
def library() -> TemplateLibrary:
    return TemplateLibrary.builtin()


def reviews_frame():
    bodies = [f"review number {i}: the kettle {'works' if i % 2 else 'leaks'}" for i in range(20)]
    bodies[MISSING_AT] = float("nan")
    return pd.DataFrame({
        "review_body": bodies,
        "star_rating": [1 + i % 5 for i in range(20)],
        "review_headline": [f"headline {i}" for i in range(20)],
        "product_title": ["Kettle"] * 20,
    })


def write_all_formats(df, folder: Path) -> dict[str, tuple[Path, str, str]]:
    """{format: (path, how the bad row is named, how its value is missing)}."""
    folder.mkdir(parents=True, exist_ok=True)
    n = MISSING_AT + 1
    out = {
        "csv": (folder / "reviews.csv", f"line {n + 1}", "empty text"),  # line 1 is the header
        "tsv": (folder / "reviews.tsv", f"line {n + 1}", "empty text"),
        "parquet": (folder / "reviews.parquet", f"row {n}", "null"),
        "to_json lines": (folder / "reviews_lines.jsonl", f"line {n}", "null"),
        "to_json records": (folder / "reviews_records.json", f"record {n}", "null"),
        "json.dumps": (folder / "reviews_dumps.jsonl", f"line {n}", "NaN"),
    }
    df.to_csv(out["csv"][0], index=False)
    df.to_csv(out["tsv"][0], sep="\t", index=False)
    df.to_parquet(out["parquet"][0])
    df.to_json(out["to_json lines"][0], orient="records", lines=True)
    df.to_json(out["to_json records"][0], orient="records")
    with open(out["json.dumps"][0], "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in df.to_dict("records"))
    return out


def test_the_files_hold_what_each_format_writes_for_nan(tmp_path):
    files = write_all_formats(reviews_frame(), tmp_path)
    assert files["csv"][0].read_text().splitlines()[MISSING_AT + 1].startswith(",")  # an empty cell
    assert '"review_body":null' in files["to_json lines"][0].read_text().splitlines()[MISSING_AT]
    assert '"review_body": NaN' in files["json.dumps"][0].read_text().splitlines()[MISSING_AT]


def test_a_missing_review_body_is_the_same_error_in_every_format(tmp_path, library):
    schema, template = library.schema("amazon_us_reviews"), library.get(RATING)
    for fmt, (path, where, kind) in write_all_formats(reviews_frame(), tmp_path).items():
        with pytest.raises(DataError) as info:
            load_source(DatasetConfig(path=str(path), schema="amazon_us_reviews"), schema, templates=[template])
        assert str(info.value) == (
            f"{path}: {where}: column 'review_body' is missing ({kind}); read by template(s) {RATING}"
        ), fmt


def test_skip_bad_rows_gives_the_same_examples_in_every_format(tmp_path, library):
    outputs = {}
    for fmt, (path, _, _) in write_all_formats(reviews_frame(), tmp_path / "data").items():
        config = RunConfig(
            name=fmt.replace(" ", "_").replace(".", "_"),
            output_dir=str(tmp_path / "runs"),
            datasets=[DatasetConfig(path=str(path), name="reviews", schema="amazon_us_reviews",
                                    templates=[RATING], skip_bad_rows=True)],
            split=SplitConfig(validation=0.2, test=0.2),
        )
        result = prepare(config, library=library)
        stats = result.stats["datasets"]["reviews"]
        assert stats["rows_read"] == 20 and stats["rows_used"] == 19, fmt
        assert stats["rows_skipped_by_reason"] == {"missing value (review_body)": 1}, fmt
        outputs[fmt] = {s: result.files[s].read_text() for s in ("train", "validation", "test")}
        prompts = [json.loads(line)["prompt"] for text in outputs[fmt].values() for line in text.splitlines()]
        assert len(prompts) == 19
        assert all(p.startswith("Predict the associated rating for the following review: review number ")
                   for p in prompts), fmt  # neither an empty review nor the text "nan"
        assert f"reviews:{MISSING_AT}" not in "".join(outputs[fmt].values())
    first = outputs["csv"]
    assert all(out == first for out in outputs.values())  # byte for byte the same examples


@pytest.mark.parametrize(
    ("value", "kind"),
    [(None, "null"), (float("nan"), "NaN"), ("", "empty text"), (" \t\n", "empty text"),
     ("nan", None), ("NULL", None), (0, None), (0.0, None), (False, None), ([], None)],
)
def test_missing_kind(value, kind):
    assert missing_kind(value) == kind


def test_a_nan_float_label_in_parquet_is_missing(tmp_path, library):
    """A float column keeps a real NaN in Parquet (pyarrow without pandas' NaN -> null conversion)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "fashion.parquet"
    table = pa.table({
        "reviewText": ["fits well", "tore at once", "fine"],
        "overall": pa.array([5.0, math.nan, 3.0], from_pandas=False),
        "summary": ["good", "bad", "ok"],
        "asin": ["A", "B", "C"],
    })
    pq.write_table(table, path)
    assert math.isnan(pq.read_table(path).column("overall")[1].as_py())
    templates = [library.get("amazon_reviews_2018.predict_rating")]
    with pytest.raises(DataError) as info:
        load_source(DatasetConfig(path=str(path), schema="amazon_reviews_2018"),
                    library.schema("amazon_reviews_2018"), templates=templates)
    assert str(info.value) == (f"{path}: row 2: column 'overall' is missing (NaN); "
                               "read by template(s) amazon_reviews_2018.predict_rating")


VOTES_YAML = """
schemas:
  - name: votes
    fields: {text: str, stars: int, votes: int}
    label_field: stars
    label_map: {1: "1", 5: "5"}
    templates:
      - id: votes.rate
        task: rating
        instruction: "Rate: {{ text }}"
        completion: "{{ stars }}"
        answer_choices: ["1", "5"]
"""


def test_an_unread_empty_number_is_null_in_every_format(tmp_path):
    """A field no template reads may be missing: an empty CSV cell in an int field is null like a JSON
    null or a Parquet null (not "should be an integer, got ''"), so the same rows come through."""
    (tmp_path / "votes.yaml").write_text(VOTES_YAML)
    library = TemplateLibrary.load([tmp_path / "votes.yaml"], include_builtin=False)
    df = pd.DataFrame({"text": ["good", "bad"], "stars": [5, 1], "votes": [3, None]})
    paths = [tmp_path / "v.csv", tmp_path / "v.jsonl", tmp_path / "v.parquet"]
    df.to_csv(paths[0], index=False)
    df.to_json(paths[1], orient="records", lines=True)
    df.to_parquet(paths[2])
    rows = []
    for path in paths:
        source = load_source(DatasetConfig(path=str(path), schema="votes"), library.schema("votes"),
                             templates=[library.get("votes.rate")])
        rows.append([{f: r[f] for f in ("text", "stars", "votes")} for r in source.rows])
    assert rows[0] == rows[1] == rows[2] == [
        {"text": "good", "stars": 5, "votes": 3},
        {"text": "bad", "stars": 1, "votes": None},
    ]


def test_an_optional_field_a_template_tests_may_be_empty_or_null(tmp_path, library):
    """Alpaca's `input` is read only under `{% if input %}`: "", null and NaN all render the same prompt."""
    template = library.get("alpaca.task_and_response")
    assert template.fields_optional == {"input"}
    records = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say hi", "input": None, "output": "hi"},
        {"instruction": "Say hi", "input": float("nan"), "output": "hi"},
        {"instruction": "Say hi", "input": "  ", "output": "hi"},
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    source = load_source(DatasetConfig(path=str(path), schema="alpaca"), library.schema("alpaca"),
                         templates=[template])
    assert [r["input"] for r in source.rows] == ["", "", "", ""]
    assert {template.render(r).prompt for r in source.rows} == {"Say hi\n\nResponse:"}
    # the instruction itself is read unguarded: missing there is a bad row
    path.write_text(json.dumps({"instruction": None, "input": "x", "output": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"alpaca.jsonl: line 1: column 'instruction' is missing \(null\)"):
        load_source(DatasetConfig(path=str(path), schema="alpaca"), library.schema("alpaca"),
                    templates=[template])


@pytest.mark.parametrize(
    ("source", "guarded"),
    [
        ("{% if input %}Input: {{ input }}{% endif %}", {"input"}),
        ("{% if not context %}none{% else %}{{ context }}{% endif %}", {"context"}),
        ("{{ title if title else 'untitled' }}", {"title"}),
        ("{{ note or 'n/a' }} {{ x | default('') }}", {"note", "x"}),
        ("{% if a is defined and b %}{{ a }}{{ b }}{% endif %}", {"a", "b"}),
        ("{% if stars > 3 %}good{% endif %}{{ 'y' if stars == 5 else 'n' }}", set()),
        ("{{ text }}", set()),
    ],
)
def test_fields_guarded(source, guarded):
    from instructkit.templates.sandbox import fields_guarded

    assert fields_guarded(source) == guarded
