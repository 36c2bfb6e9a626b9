"""Other tools' public data-loading bug reports, replayed against instructkit (one section per report).

Every input is prepared in memory and streamed (`split.streaming: on`, chunks of 3 rows): the two must write
the same files byte for byte, or fail with the same message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.config import DatasetConfig, RunConfig, SplitConfig
from instructkit.data import stream_build
from instructkit.data.build import prepare
from instructkit.errors import InstructkitError

SPLITS = ("train", "validation", "test")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(stream_build, "CHUNK_ROWS", 3)
    monkeypatch.setattr(stream_build, "BUCKET_LINES", 5)


def _config(datasets: list[dict], **kw) -> RunConfig:
    split = {"validation": 0.2, "test": 0.2, **kw.pop("split", {})}
    return RunConfig(name="replay", datasets=[DatasetConfig(**d) for d in datasets], split=SplitConfig(**split), **kw)


def prepare_both(tmp_path: Path, datasets: list[dict], **kw) -> dict[str, list[dict]]:
    """The examples of each split, after checking that both paths wrote the same bytes."""
    written = {}
    for mode in ("off", "on"):
        config = _config(datasets, **kw)
        config = config.model_copy(update={"split": config.split.model_copy(update={"streaming": mode})})
        out = tmp_path / f"prepared-{mode}"
        prepare(config, out)
        written[mode] = {s: (out / f"{s}.jsonl").read_bytes() for s in SPLITS}
    assert written["off"] == written["on"]
    return {s: [json.loads(line) for line in written["off"][s].splitlines()] for s in SPLITS}


def error_of_both(tmp_path: Path, datasets: list[dict], **kw) -> str:
    """The message both paths fail with (the same one)."""
    messages = []
    for mode in ("off", "on"):
        config = _config(datasets, **kw)
        config = config.model_copy(update={"split": config.split.model_copy(update={"streaming": mode})})
        with pytest.raises(InstructkitError) as caught:
            prepare(config, tmp_path / f"prepared-{mode}")
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    return messages[0]


def _sst2(path: Path, **kw) -> list[dict]:
    return [{"path": str(path), "schema": "sst2", "templates": ["sst2.sentiment_with_options"], **kw}]


SST2_ROWS = [(i % 2, f"{'good' if i % 2 else 'bad'} film number {i}") for i in range(20)]


# --------------------------------------------------------------------------------------------------
# huggingface/datasets#622: a file whose lines end with a lone carriage return (classic Mac, some Excel
# exports) or holds one inside a quoted field. The in-memory reader split lines at CR (io.StringIO, newline="")
# but the streamed reader only at LF: `split.streaming: on` failed with "new-line character seen in unquoted
# field" on a file the in-memory path read.
# --------------------------------------------------------------------------------------------------


def test_csv_with_lone_carriage_returns_reads_alike_in_memory_and_streamed(tmp_path):
    body = "".join(f'{label},"{text}"\r' for label, text in SST2_ROWS)
    body = body.replace("number 3", "number\r3")  # a lone CR inside a quoted field stays in the text
    path = tmp_path / "mac.csv"
    path.write_bytes(("label,sentence\r" + body).encode())
    examples = prepare_both(tmp_path, _sst2(path))
    assert sum(len(v) for v in examples.values()) == 20
    prompts = [e["prompt"] for split in examples.values() for e in split]
    assert any("number\r3" in p for p in prompts)


def test_a_ragged_row_after_lone_carriage_returns_is_named_by_the_same_line(tmp_path):
    path = tmp_path / "mac.csv"
    path.write_bytes(b'label,sentence\r1,"a\rb"\r0,fine\r1,one,too many\r0,ok\r')
    message = error_of_both(tmp_path, _sst2(path))
    assert "mac.csv: line 5: 3 fields, but the header (line 1) has 2" in message


# --------------------------------------------------------------------------------------------------
# pandas-dev/pandas#4793: a UTF-8 byte-order mark glued to the first column name. With `encoding: utf-8`
# it was dropped, but with another declared encoding (cp1252, latin-1) it was decoded as "ï»¿label"; and
# with utf-8, a bad byte in such a file was named by its position after the BOM, in memory only ("byte 0x63
# at byte offset 27" for the 0xe9 at offset 30).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1", "utf-8-sig"])
def test_a_utf8_bom_is_dropped_whatever_encoding_is_declared(tmp_path, encoding):
    text = "label,sentence\r\n" + "".join(f'{label},"{text} caf\u00e9"\r\n' for label, text in SST2_ROWS)
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8" if encoding == "utf-8-sig" else encoding))
    examples = prepare_both(tmp_path, _sst2(path, encoding=encoding))
    prompts = [e["prompt"] for split in examples.values() for e in split]
    assert len(prompts) == 20 and all("caf\u00e9" in p for p in prompts)


def test_a_bad_byte_after_a_bom_is_named_by_its_place_in_the_file(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(b"\xef\xbb\xbflabel,sentence\n1,good\n0,caf\xe9\n")
    message = error_of_both(tmp_path, _sst2(path))
    assert "b.csv: line 3: not valid utf-8 text: byte 0xe9 at byte offset 30 (byte 6 of the line)" in message


# --------------------------------------------------------------------------------------------------
# huggingface/datasets#4963 (and #6891): JSON lines vs a JSON array. A .json file of JSON lines was read,
# but a .jsonl file holding one array (`json.dump(rows, f)`, pretty-printed or not) failed: "line 1: malformed
# JSON at column 2" in memory and "column 1" streamed (a streamed line kept its "\n").
# --------------------------------------------------------------------------------------------------

QA = [{"prompt": f"Question {i}?", "completion": f"Answer number {i}"} for i in range(20)]


@pytest.mark.parametrize("indent", [None, 2])
def test_a_jsonl_file_holding_one_json_array_is_read_as_the_array(tmp_path, indent):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n" + json.dumps(QA, indent=indent) + "\n", encoding="utf-8")
    examples = prepare_both(tmp_path, [{"path": str(path)}])
    assert sorted(e["prompt"] for split in examples.values() for e in split) == sorted(r["prompt"] for r in QA)


def test_a_jsonl_array_with_a_non_object_names_its_record(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps([*QA[:4], "oops", *QA[4:]]), encoding="utf-8")
    assert "rows.jsonl: record 5: expected an object, found str" in error_of_both(tmp_path, [{"path": str(path)}])


def test_json_lines_that_are_not_one_array_are_still_read_line_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('["a list line"]\n' + "\n".join(json.dumps(r) for r in QA), encoding="utf-8")
    message = error_of_both(tmp_path, [{"path": str(path)}])
    assert "rows.jsonl: line 1: expected a JSON object, found list" in message
    examples = prepare_both(tmp_path, [{"path": str(path), "skip_bad_rows": True}])
    assert sum(len(v) for v in examples.values()) == 20


def test_a_truncated_json_line_is_named_by_its_own_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in QA[:5]) + '\n{"prompt": "cut", "completion": \n',
                    encoding="utf-8")
    assert "rows.jsonl: line 6: malformed JSON at column 33: Expecting value" in \
        error_of_both(tmp_path, [{"path": str(path)}])


# --------------------------------------------------------------------------------------------------
# huggingface/datasets#2207: a ClassLabel column holds ids (0, 1, ...) whose names are in the features. The
# Hub's AG News names ids 0-3 World, Sports, Business, Sci/Tech; the ag_news schema codes them 1-4. A saved
# copy stopped at "label=0 is outside the label map", and with skip_bad_rows trained every Sports story as
# World, Business as Sports, Sci/Tech as Business.
# --------------------------------------------------------------------------------------------------

AG_NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def _ag_dataset(names=AG_NAMES, n=40, start=0):
    import datasets

    features = datasets.Features({"label": datasets.ClassLabel(names=names), "title": datasets.Value("string"),
                                  "description": datasets.Value("large_string")})
    ids = range(start, start + n)
    rows = {"label": [i % 4 for i in ids], "title": [f"Title {i}" for i in ids],
            "description": [f"A story about {AG_NAMES[i % 4]}, number {i}" for i in ids]}
    return datasets.Dataset.from_dict(rows, features=features)


def _ag(path: Path, **kw) -> list[dict]:
    return [{"path": str(path), "schema": "ag_news", "templates": ["ag_news.topic_no_options"], **kw}]


def _topic_matches_story(examples: dict[str, list[dict]]) -> None:
    for split in examples.values():
        for example in split:
            assert f"A story about {example['completion']}," in example["prompt"], example


@pytest.mark.parametrize("form", ["save_to_disk", "parquet"])
def test_classlabel_ids_are_read_by_their_names(tmp_path, form):
    import datasets

    dataset = _ag_dataset()
    if form == "save_to_disk":
        path = tmp_path / "ag_news_saved"
        datasets.DatasetDict({"train": dataset, "test": _ag_dataset(n=8, start=40)}).save_to_disk(str(path),
                                                                                      max_shard_size="1KB")
    else:
        path = tmp_path / "ag_news.parquet"
        dataset.to_parquet(str(path))
    examples = prepare_both(tmp_path, _ag(path))
    assert sum(len(v) for v in examples.values()) == (48 if form == "save_to_disk" else 40)
    _topic_matches_story(examples)
    assert {e["completion"] for split in examples.values() for e in split} == set(AG_NAMES)


def test_classlabel_ids_that_are_the_codes_stay(tmp_path):
    import datasets

    features = datasets.Features({"label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "sentence": datasets.Value("string")})
    rows = {"label": [i % 2 for i in range(20)], "sentence": [f"{['bad', 'good'][i % 2]} film {i}" for i in range(20)]}
    path = tmp_path / "sst2.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    examples = prepare_both(tmp_path, _sst2(path))
    for example in [e for split in examples.values() for e in split]:
        assert ("good" in example["prompt"]) == (example["completion"] == "positive")


def test_classlabel_names_only_partly_in_the_label_map_are_an_error(tmp_path):
    path = tmp_path / "ag_news.parquet"
    _ag_dataset(names=["World", "Sports", "Business", "Science"]).to_parquet(str(path))
    message = error_of_both(tmp_path, _ag(path))
    assert "ag_news.parquet: column 'label' is a ClassLabel named ['World', 'Sports', 'Business', 'Science']" in message
    assert "['Science'] are not names in the label map of schema 'ag_news'" in message


def test_an_unlabelled_classlabel_row_is_named_with_what_minus_one_means(tmp_path):
    dataset = _ag_dataset().map(lambda row, i: {"label": -1 if i == 2 else row["label"]}, with_indices=True)
    path = tmp_path / "ag_news.parquet"
    dataset.to_parquet(str(path))
    message = error_of_both(tmp_path, _ag(path))
    assert "ag_news.parquet: row 3: column 'label': label label=-1 is outside the label map" in message
    assert "(-1 is a ClassLabel's 'no label'" in message


def test_templates_check_rows_carry_the_schema_codes(tmp_path):
    from instructkit.data.sources import rows_for_check
    from instructkit.templates.library import TemplateLibrary

    path = tmp_path / "ag_news.parquet"
    _ag_dataset().to_parquet(str(path))
    rows = rows_for_check(path, TemplateLibrary.load().schema("ag_news"), limit=4)
    assert [r["label"] for r in rows] == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------
# pandas-dev/pandas#48170: integers read from text went through float, so 1234567890123456789 became
# ...768. An `int` field of a CSV row was float(text) rounded (9007199254740993 rendered ...992, its JSON copy
# ...993), and label keys likewise: two labels differing past the 16th digit were one class, so rows that
# disagreed only there were kept as exact duplicates instead of dropped as conflicting.
# --------------------------------------------------------------------------------------------------

TICKETS = """schemas:
  - name: tickets
    fields: {text: str, id: int, queue: str}
    label_field: queue
    samples:
      - {text: "printer jams", id: 1, queue: "100"}
      - {text: "vpn drops", id: 2, queue: "200"}
    templates:
      - id: tickets.queue
        name: queue
        task: generation
        instruction: "Ticket {{ id }}: {{ text }}\\nQueue:"
        completion: "{{ queue }}"
"""


def test_integers_past_2_53_in_csv_text_stay_exact(tmp_path):
    (tmp_path / "tickets.yaml").write_text(TICKETS, encoding="utf-8")
    big = 9007199254740993  # 2**53 + 1: float() makes it ...992
    rows = [(big + i, f"issue {i}", str(12345678901234567800 + i % 3)) for i in range(12)]
    rows += [(7, "same words", "12345678901234567891"), (7, "same words", "12345678901234567892")]
    path = tmp_path / "tickets.csv"
    path.write_text("id,text,queue\n" + "".join(f"{i},{t},{q}\n" for i, t, q in rows), encoding="utf-8")
    examples = prepare_both(tmp_path, [{"path": str(path), "schema": "tickets", "templates": ["tickets.queue"]}],
                            templates={"files": [str(tmp_path / "tickets.yaml")]})
    prompts = sorted(e["prompt"] for split in examples.values() for e in split)
    assert prompts == sorted(f"Ticket {big + i}: issue {i}\nQueue:" for i in range(12))  # the 2 conflicting gone
    stats = json.loads((tmp_path / "prepared-off" / "stats.json").read_text())
    assert stats["datasets"]["tickets"]["duplicates"]["conflicting_label_groups"] == 1


# --------------------------------------------------------------------------------------------------
# The YAML "Norway problem" (rugk/crops-parser#48, alibaba/nacos#12969): YAML 1.1 reads a bare `on` / `off` as
# true / false, so the documented `split: {streaming: off}` (or `split.streaming=off` on the command line) was
# refused: "split.streaming: Input should be 'auto', 'on' or 'off' (got False)".
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["on", "off", "auto"])
def test_streaming_on_and_off_are_read_as_written(tmp_path, word):
    from instructkit.config_load import load_config

    path = tmp_path / "run.yaml"
    path.write_text(f"name: t\ndatasets:\n  - path: demo\nsplit: {{streaming: {word}}}\n", encoding="utf-8")
    assert load_config(path, []).split.streaming == word
    assert load_config(path, [f"split.streaming={word}"]).split.streaming == word


# --------------------------------------------------------------------------------------------------
# EleutherAI/lm-evaluation-harness#2346 (and #508): targets carry a leading space (" yes"), the delimiter
# between prompt and answer. A list `answer_choices: [" yes", " no"]` written that way was kept as is, while
# completions and `|||` choices are stripped: every row failed "completion 'yes' is not one of the answer
# choices [' yes', ' no']".
# --------------------------------------------------------------------------------------------------

SPACED = """schemas:
  - name: spaced
    fields: {text: str, answer: str}
    samples:
      - {text: "is water wet", answer: "yes"}
      - {text: "is fire cold", answer: "no"}
    templates:
      - id: spaced.yes_no
        name: yes or no
        task: yes_no_qa
        instruction: "{{ text }}?\\nAnswer:"
        completion: "{{ answer }}"
        answer_choices: CHOICES
"""


def test_list_answer_choices_are_compared_without_surrounding_spaces(tmp_path):
    (tmp_path / "spaced.yaml").write_text(SPACED.replace("CHOICES", '[" yes", " no "]'), encoding="utf-8")
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"question {i}", "answer": ["yes", "no"][i % 2]}) for i in range(12)),
                    encoding="utf-8")
    examples = prepare_both(tmp_path, [{"path": str(path), "schema": "spaced", "templates": ["spaced.yes_no"]}],
                            templates={"files": [str(tmp_path / "spaced.yaml")]})
    assert all(e["choices"] == ["yes", "no"] for split in examples.values() for e in split)


@pytest.mark.parametrize("choices", ['["yes", " yes", "no"]', '["yes", "  ", "no"]'])
def test_list_answer_choices_equal_or_empty_once_stripped_are_refused(tmp_path, choices):
    from instructkit.errors import TemplateError
    from instructkit.templates.collection import load_collection

    path = tmp_path / "spaced.yaml"
    path.write_text(SPACED.replace("CHOICES", choices), encoding="utf-8")
    with pytest.raises(TemplateError, match=r"spaced.yaml.*`answer_choices` .* has an empty or repeated choice"):
        load_collection(path)


# --------------------------------------------------------------------------------------------------
# Jinja's `default` fires only for an undefined value, never for None (pallets/jinja#2144, ansible/ansible#48592,
# home-assistant/core#65913). A field every template guards with `default` is optional, and a missing value
# (no key, null, NaN, empty text) reaches it as "" or None: `{{ votes | default('unknown') }}` trained
# "votes None" and `{{ hint | default('none given') }}` an empty hint.
# --------------------------------------------------------------------------------------------------

DEFAULTS = """schemas:
  - name: hinted
    fields: {text: str, hint: str, votes: int, answer: str}
    samples:
      - {text: "2 + 2", hint: "small", votes: 3, answer: "4"}
      - {text: "3 + 3", hint: "even", votes: 1, answer: "6"}
    templates:
      - id: hinted.solve
        name: solve
        task: generation
        instruction: "{{ text }} (hint: {{ hint | default('none given') }}; votes: {{ votes | d('unknown') }})"
        completion: "{{ answer }}"
"""


def test_default_replaces_a_missing_value_of_any_kind(tmp_path):
    (tmp_path / "hinted.yaml").write_text(DEFAULTS, encoding="utf-8")
    missing = [{}, {"hint": None, "votes": None}, {"hint": "  ", "votes": float("nan")}, {"hint": ""}]
    rows = [{"text": f"sum {i}", "answer": str(i), **missing[i % 4]} if i % 5 else
            {"text": f"sum {i}", "answer": str(i), "hint": "think", "votes": 0} for i in range(16)]
    path = tmp_path / "sums.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    examples = prepare_both(tmp_path, [{"path": str(path), "schema": "hinted", "templates": ["hinted.solve"]}],
                            templates={"files": [str(tmp_path / "hinted.yaml")]})
    prompts = {e["prompt"] for split in examples.values() for e in split}
    assert prompts == {f"sum {i} (hint: think; votes: 0)" if i % 5 == 0 else
                       f"sum {i} (hint: none given; votes: unknown)" for i in range(16)}


# --------------------------------------------------------------------------------------------------
# pandas-dev/pandas#53035: delimiter sniffing guesses (wrong on one-column files). instructkit does not guess,
# but a semicolon CSV (European Excel) or a tab-separated .csv was refused with "no column 'sentence' ...
# did you mean 'label;sentence'? (map it with `columns: ...`)", advice that cannot work.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, separator, says", [
    (".csv", ";", "the file looks ';'-separated, but it was read comma-separated: set `delimiter: ';'`"),
    (".csv", "\t", "the file looks '\\t'-separated, but it was read comma-separated: set `format: tsv`"),
    (".tsv", ",", "the file looks ','-separated, but it was read tab-separated: set `delimiter: ','`"),
])
def test_a_header_split_by_another_separator_is_named(tmp_path, suffix, separator, says):
    path = tmp_path / f"reviews{suffix}"
    path.write_text(f"label{separator}sentence\n" + "".join(f"{a}{separator}{b}\n" for a, b in SST2_ROWS),
                    encoding="utf-8")
    message = error_of_both(tmp_path, _sst2(path))
    assert says in message and "map it with" not in message and "did you mean" not in message
    plain = tmp_path / f"qa{suffix}"
    plain.write_text(f"prompt{separator}completion\n" + "".join(f"q {i}{separator}a {i}\n" for i in range(9)),
                     encoding="utf-8")
    assert says in error_of_both(tmp_path, [{"path": str(plain)}])


@pytest.mark.parametrize("suffix, separator", [(".csv", ";"), (".csv", "|"), (".tsv", ";"), (".csv", "\t")])
def test_delimiter_reads_a_file_separated_otherwise_as_quoted_csv(tmp_path, suffix, separator):
    """`delimiter:` (pandas' sep, datasets' delimiter) reads the file the hint above names, in memory and
    streamed alike: the same examples as the comma-separated file, a quoted field holding the separator
    kept whole."""
    rows = [(label, text.replace("film", f'"film{separator} really"')) for label, text in SST2_ROWS]
    def write(path, sep):
        path.write_text(f"label{sep}sentence\n" + "".join(f'{a}{sep}"{b.replace(chr(34), chr(34) * 2)}"\n'
                                                          for a, b in rows), encoding="utf-8")
        return path
    expected = prepare_both(tmp_path / "comma", _sst2(write(tmp_path / "comma.csv", ",")))
    got = prepare_both(tmp_path / "other", _sst2(write(tmp_path / f"other{suffix}", separator),
                                                 delimiter=separator))
    assert got == expected
    assert any(f'"film{separator} really"' in e["prompt"] for split in got.values() for e in split)
    for mode in ("off", "on"):  # stats.json names the separator each file was read with
        stats = json.loads((tmp_path / "other" / f"prepared-{mode}" / "stats.json").read_text())
        assert [f["delimiter"] for f in stats["datasets"]["sst2"]["files"]] == [separator]
        stats = json.loads((tmp_path / "comma" / f"prepared-{mode}" / "stats.json").read_text())
        assert [f["delimiter"] for f in stats["datasets"]["sst2"]["files"]] == [","]


def test_delimiter_ragged_row_names_the_separator_and_a_format_without_one_is_refused(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("label;sentence\n1;good\n0;bad;worse\n", encoding="utf-8")
    message = error_of_both(tmp_path, _sst2(path, delimiter=";"))
    assert "semi.csv: line 3: 3 fields, but the header (line 1) has 2 (an unquoted semicolon inside a field?)" in message
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"label": 1, "sentence": "good"}\n', encoding="utf-8")
    message = error_of_both(tmp_path, _sst2(jsonl, delimiter=";"))
    assert "rows.jsonl: `delimiter: ';'` is set, but the file is read as jsonl" in message
    with pytest.raises(ValueError, match="format 'parquet' has no field separator"):
        DatasetConfig(path="x.parquet", format="parquet", delimiter=";")
    for bad in (";;", "", '"', "\n"):
        with pytest.raises(ValueError, match="must be one character other than a quote or a line break"):
            DatasetConfig(path="x.csv", delimiter=bad)


# --------------------------------------------------------------------------------------------------
# Ghadjeres/DeepBach#25, v7labs/darwin-py#657: on a tiny dataset a split fraction rounds to zero rows. Here an
# empty train split already stops `prepare`, but validation or test went empty without a word (`run` then
# stopped at the base evaluation: "the 'test' split has no examples"); the split sizes stay exact, and
# stats.json notes (and the log warns) which split a positive fraction left empty.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, empty", [(1, ["validation", "test"]), (3, ["validation"]), (10, [])])
def test_a_split_a_fraction_leaves_empty_is_noted(tmp_path, n, empty):
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in QA[:n]), encoding="utf-8")
    examples = prepare_both(tmp_path, [{"path": str(path)}], split={"validation": 0.1, "test": 0.2})
    notes = [json.loads((tmp_path / f"prepared-{m}" / "stats.json").read_text())["datasets"]["few"]["notes"]
             for m in ("off", "on")]
    assert notes[0] == notes[1]
    assert [note.split(":")[0] for note in notes[0]] == empty
    assert [s for s in ("validation", "test") if not examples[s]] == empty
    if n == 3:
        assert notes[0] == ["validation: no rows: 0.1 of 3 rows rounds to none (add rows, or raise split.validation)"]


def test_templates_check_reads_a_semicolon_file_with_delimiter(tmp_path, capsys):
    from instructkit.cli import main

    path = tmp_path / "semi.csv"
    path.write_text("label;sentence\n" + "".join(f"{a};{b}\n" for a, b in SST2_ROWS), encoding="utf-8")
    assert main(["templates", "check", "--data", str(path), "--schema", "sst2"]) == 2
    assert "set `delimiter: ';'`" in capsys.readouterr().err
    assert main(["templates", "check", "--data", str(path), "--schema", "sst2", "--delimiter", ";"]) == 0


def test_a_semicolon_file_with_commas_in_its_text_is_named_by_its_separator_not_as_a_ragged_comma(tmp_path, capsys):
    """Real reviews hold commas: a semicolon file read comma-separated is then ragged before the one-column
    header check can speak; the ragged row's hint names the file's separator too."""
    from instructkit.cli import main

    path = tmp_path / "semi.csv"
    path.write_text("label;sentence\n" + "".join(f"{a};{b}, really\n" for a, b in SST2_ROWS), encoding="utf-8")
    message = error_of_both(tmp_path, _sst2(path))
    assert "semi.csv: line 2: 2 fields, but the header (line 1) has 1" in message
    assert "the file looks ';'-separated, but it was read comma-separated: set `delimiter: ';'`" in message
    assert main(["templates", "check", "--data", str(path), "--schema", "sst2"]) == 2
    assert "`--delimiter ';'` for templates check" in capsys.readouterr().err
    for bad in (";;", "", '"'):
        with pytest.raises(SystemExit) as exit_info:
            main(["templates", "check", "--data", str(path), "--schema", "sst2", "--delimiter", bad])
        assert exit_info.value.code == 2
        assert "must be one character other than a quote or a line break" in capsys.readouterr().err
