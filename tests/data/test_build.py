"""prepare(): rows x templates -> train/validation/test.jsonl + stats.json, on synthetic and real data."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from instructkit.config import DatasetConfig, RunConfig, SplitConfig, TemplatesConfig
from instructkit.data import Example, load_examples, prepare
from instructkit.data.examples import example_line
from instructkit.data.sources import demo_path
from instructkit.errors import ConfigError, DataError, InstructkitError, TemplateError
from instructkit.templates.library import TemplateLibrary

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SPLITS = ("train", "validation", "test")

TINY_YAML = """
schemas:
  - name: tiny
    fields: {text: str, stars: int, note: str}
    label_field: stars
    label_map: {1: "1", 2: "2", 3: "3"}
    samples:
      - {text: "good", stars: 3, note: "n"}
      - {text: "bad", stars: 1, note: "n"}
    templates:
      - id: tiny.rate
        task: rating
        instruction: "Rate: {{ text }}"
        completion: "{{ stars }}"
        answer_choices: ["1", "2", "3"]
      - id: tiny.echo
        task: generation
        instruction: "Repeat: {{ text }}"
        completion: "{{ text }}"
      - id: tiny.shout
        task: generation
        instruction: "Shout: {{ text }}"
        completion: "{{ text | upper }}"
      - id: tiny.note
        task: generation
        instruction: "Note for {{ text }}"
        completion: "{{ '' if note == '-' else note }}"
"""


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"../shared/data not found: {DATA.resolve()}")
    return DATA.resolve()


@pytest.fixture()
def tiny(tmp_path) -> tuple[Path, TemplateLibrary]:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path, TemplateLibrary.load([path])


def write_tiny(path: Path, n: int, note: str = "n", prefix: str = "row") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"text": f"{prefix} {i}", "stars": 1 + i % 3, "note": note}) + "\n" for i in range(n)
        )
    return path


def dataset(**kw) -> DatasetConfig:
    return DatasetConfig(**kw)


def config(tmp_path: Path, *datasets: DatasetConfig | dict, template_files=(), **split) -> RunConfig:
    return RunConfig(
        name="run",
        output_dir=str(tmp_path / "runs"),
        datasets=[d if isinstance(d, DatasetConfig) else dataset(**d) for d in datasets],
        split=SplitConfig(**split),
        templates=TemplatesConfig(files=[str(f) for f in template_files]),
    )


def read_run(run_dir: Path) -> dict[str, list[dict]]:
    return {s: load_examples(run_dir, s) for s in SPLITS}


def assert_no_row_in_two_splits(run: dict[str, list[dict]]) -> None:
    seen: dict[str, str] = {}
    for split, examples in run.items():
        for ex in examples:
            assert seen.setdefault(ex["source_id"], split) == split, ex["source_id"]


# --------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------


def test_prepare_writes_splits_stats_and_no_row_in_two_splits(tmp_path, tiny):
    _, library = tiny
    cfg = config(
        tmp_path,
        {
            "path": str(write_tiny(tmp_path / "d.jsonl", 300)),
            "schema": "tiny",
            "templates": ["tiny.rate", "tiny.echo", "tiny.shout"],
        },
    )
    result = prepare(cfg, library=library)
    assert result.run_dir == cfg.run_dir
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == [
        "stats.json",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    run = read_run(cfg.run_dir)
    assert (
        {s: len(v) for s, v in run.items()} == result.counts == {"train": 630, "validation": 90, "test": 180}
    )
    assert_no_row_in_two_splits(run)
    per_row = Counter(ex["source_id"] for ex in run["train"])
    assert set(per_row.values()) == {3}
    rate = next(ex for ex in run["test"] if ex["template_id"] == "tiny.rate")
    assert (
        rate["choices"] == ["1", "2", "3"]
        and rate["label"] == rate["completion"]
        and rate["task"] == "rating"
    )
    echo = next(ex for ex in run["test"] if ex["template_id"] == "tiny.echo")
    assert echo["choices"] is None and echo["label"] is None and echo["metrics"] == ["rougeL"]
    assert "held_out" not in echo and "messages" not in echo
    stats = json.loads((cfg.run_dir / "stats.json").read_text())
    assert stats["examples"] == result.counts
    assert stats["splits"]["train"]["by_template"] == {"tiny.echo": 210, "tiny.rate": 210, "tiny.shout": 210}
    assert stats["splits"]["test"]["labels"]["tiny"] == {"1": 20, "2": 20, "3": 20}
    assert stats["templates"]["tiny.rate"]["version"] == library.get("tiny.rate").version
    assert stats["config"]["datasets"][0]["schema"] == "tiny"


def test_fast_lines_equal_the_example_record(tmp_path, tiny):
    _, library = tiny
    cfg = config(
        tmp_path,
        {
            "path": str(write_tiny(tmp_path / "d.jsonl", 30)),
            "schema": "tiny",
            "templates": ["tiny.rate", "tiny.echo"],
            "held_out_templates": ["tiny.shout"],
        },
    )
    prepare(cfg, library=library)
    for split in SPLITS:
        for line in (cfg.run_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True):
            assert example_line(Example.from_dict(json.loads(line))) == line
    row = {"text": "row 0", "stars": 1, "note": "n"}
    template = library.get("tiny.rate")
    example = Example.from_rendered(template.render(row, seed="tiny:0"), template, "tiny:0", "tiny")
    line = next(
        x
        for s in SPLITS
        for x in load_examples(cfg.run_dir, s)
        if x["source_id"] == "tiny:0" and x["template_id"] == "tiny.rate"
    )
    assert example.to_dict() == line


def test_templates_per_row_samples_k_for_training_only(tmp_path, tiny):
    _, library = tiny
    cfg = config(
        tmp_path,
        {
            "path": str(write_tiny(tmp_path / "d.jsonl", 200)),
            "schema": "tiny",
            "templates": ["tiny.rate", "tiny.echo", "tiny.shout"],
            "templates_per_row": 2,
        },
    )
    prepare(cfg, library=library)
    run = read_run(cfg.run_dir)
    train = Counter(ex["source_id"] for ex in run["train"])
    assert set(train.values()) == {2}
    assert len({ex["template_id"] for ex in run["train"]}) == 3  # sampled, not always the same two
    assert set(Counter(ex["source_id"] for ex in run["test"]).values()) == {3}
    again = tmp_path / "again"
    prepare(cfg, run_dir=again, library=library)
    assert (again / "train.jsonl").read_text() == (cfg.run_dir / "train.jsonl").read_text()  # seeded


def test_held_out_templates_stay_out_of_train(tmp_path, tiny):
    _, library = tiny
    cfg = config(
        tmp_path,
        {
            "path": str(write_tiny(tmp_path / "d.jsonl", 100)),
            "schema": "tiny",
            "templates": ["tiny.rate", "tiny.echo"],
            "held_out_templates": ["tiny.echo"],
        },
    )
    result = prepare(cfg, library=library)
    run = read_run(cfg.run_dir)
    assert {ex["template_id"] for ex in run["train"]} == {"tiny.rate"}
    for split in ("validation", "test"):
        for ex in run[split]:
            assert ex.get("held_out", False) == (ex["template_id"] == "tiny.echo")
    assert result.stats["splits"]["test"]["held_out_examples"] == 20
    assert result.stats["templates"]["tiny.echo"]["held_out"] is True


def test_mixture_weights_and_held_out_dataset(tmp_path, tiny):
    _, library = tiny
    a = {
        "path": str(write_tiny(tmp_path / "a.jsonl", 400, prefix="a")),
        "schema": "tiny",
        "name": "a",
        "templates": ["tiny.rate"],
        "weight": 1.0,
    }
    b = {
        "path": str(write_tiny(tmp_path / "b.jsonl", 100, prefix="b")),
        "schema": "tiny",
        "name": "b",
        "templates": ["tiny.rate"],
        "weight": 3.0,
    }
    c = {
        "path": str(write_tiny(tmp_path / "c.jsonl", 50, prefix="c")),
        "schema": "tiny",
        "name": "c",
        "templates": ["tiny.echo"],
        "held_out": True,
    }
    cfg = config(tmp_path, a, b, c)
    result = prepare(cfg, library=library)
    run = read_run(cfg.run_dir)
    train = Counter(ex["dataset"] for ex in run["train"])
    assert train == {"a": 88, "b": 262}  # 280 + 70 training rows, shared 1 : 3
    assert result.stats["mixture"]["b"]["factor"] == pytest.approx(262 / 70, rel=1e-3)
    b_rows = {ex["source_id"] for ex in run["train"] if ex["dataset"] == "b"}
    assert len(b_rows) == 70  # every b training row, repeated
    assert_no_row_in_two_splits(run)
    held = [ex for s in ("validation", "test") for ex in run[s] if ex["dataset"] == "c"]
    assert len(held) == 50 and all(ex["held_out"] for ex in held)
    assert result.stats["datasets"]["c"]["split"]["sizes"] == {"train": 0, "validation": 0, "test": 50}
    assert {ex["dataset"] for ex in run["train"][:40]} == {"a", "b"}  # shuffled: the datasets are interleaved


def test_chat_and_prompt_completion_data(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}</s>"},
                    ]
                }
            )
            for i in range(20)
        )
    )
    pc = tmp_path / "pc.json"
    pc.write_text(json.dumps([{"prompt": f"p{i}", "completion": f"c{i}<|endoftext|>"} for i in range(20)]))
    cfg = config(tmp_path, {"path": str(chat)}, {"path": str(pc)})
    result = prepare(cfg, library=TemplateLibrary([], []))
    run = read_run(cfg.run_dir)
    every = [ex for s in SPLITS for ex in run[s]]
    chats = [ex for ex in every if ex["dataset"] == "chat"]
    assert len(chats) == 20 and all(ex["template_id"] == "chat.chat" for ex in chats)
    assert all(ex["messages"] == [{"role": "user", "content": ex["prompt"]}] for ex in chats)
    assert all(not ex["completion"].endswith("</s>") for ex in chats)
    plain = [ex for ex in every if ex["dataset"] == "pc"]
    assert len(plain) == 20 and all("messages" not in ex and ex["completion"].startswith("c") for ex in plain)
    assert all(not ex["completion"].endswith("<|endoftext|>") for ex in plain)
    assert any("<|endoftext|>" in note for note in result.stats["datasets"]["pc"]["notes"])


def test_max_rows_caps_each_file(tmp_path, tiny):
    _, library = tiny
    train = write_tiny(tmp_path / "train.jsonl", 300, prefix="tr")
    test = write_tiny(tmp_path / "test.jsonl", 50, prefix="te")
    cfg = config(
        tmp_path,
        {
            "files": {"train": str(train), "test": str(test)},
            "schema": "tiny",
            "templates": ["tiny.rate"],
            "max_rows": 100,
        },
    )
    result = prepare(cfg, library=library)
    stats = result.stats["datasets"]["tiny"]
    assert stats["rows_capped"] == 200 and stats["rows_used"] == 150
    assert stats["split"]["sizes"] == {"train": 90, "validation": 10, "test": 50}  # the test file stays whole


def test_template_selection_errors(tmp_path, tiny):
    _, library = tiny
    d = {"path": str(write_tiny(tmp_path / "d.jsonl", 5)), "schema": "tiny"}
    with pytest.raises(ConfigError, match="selects no template"):
        prepare(config(tmp_path, {**d, "templates": []}), library=library)
    with pytest.raises(TemplateError, match="unknown template id 'tiny.rat'.*tiny.rate"):
        prepare(config(tmp_path, {**d, "templates": ["tiny.rat"]}), library=library)


def test_load_examples_file_and_errors(tmp_path, tiny):
    _, library = tiny
    cfg = config(
        tmp_path,
        {"path": str(write_tiny(tmp_path / "d.jsonl", 20)), "schema": "tiny", "templates": ["tiny.rate"]},
    )
    prepare(cfg, library=library)
    assert load_examples(cfg.run_dir / "test.jsonl") == load_examples(cfg.run_dir, "test")
    with pytest.raises(DataError, match="unknown split"):
        load_examples(cfg.run_dir, "dev")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{nope\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2"):
        load_examples(bad)
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# Errors and atomicity
# --------------------------------------------------------------------------------------------------


def test_template_rendering_empty_names_file_line_template_column(tmp_path, tiny):
    _, library = tiny
    data = write_tiny(tmp_path / "d.jsonl", 10)
    with open(data, "a") as f:
        f.write(json.dumps({"text": "last", "stars": 2, "note": "-"}) + "\n")  # tiny.note renders "" for "-"
    cfg = config(tmp_path, {"path": str(data), "schema": "tiny", "templates": ["tiny.note"]})
    with pytest.raises(InstructkitError) as info:
        prepare(cfg, library=library)
    message = str(info.value)
    assert "d.jsonl: line 11" in message and "'tiny.note'" in message and "empty completion" in message
    assert "note" in message
    # a blank value is not rendered at all: it is a missing value, named by line and column
    blank = write_tiny(tmp_path / "blank.jsonl", 10)
    with open(blank, "a") as f:
        f.write(json.dumps({"text": "last", "stars": 2, "note": "  "}) + "\n")
    cfg = config(tmp_path, {"path": str(blank), "schema": "tiny", "templates": ["tiny.note"]})
    with pytest.raises(DataError) as info:
        prepare(cfg, library=library)
    assert str(info.value) == (f"{blank}: line 11: column 'note' is missing (empty text); "
                               "read by template(s) tiny.note")


def test_failure_leaves_previous_run_untouched(tmp_path, tiny):
    _, library = tiny
    good = config(
        tmp_path,
        {"path": str(write_tiny(tmp_path / "d.jsonl", 50)), "schema": "tiny", "templates": ["tiny.note"]},
    )
    prepare(good, library=library)
    before = {p.name: p.read_bytes() for p in good.run_dir.iterdir()}
    bad_data = write_tiny(tmp_path / "bad.jsonl", 50, note="-")  # every completion renders empty
    bad = config(tmp_path, {"path": str(bad_data), "schema": "tiny", "templates": ["tiny.note"]})
    with pytest.raises(DataError):
        prepare(bad, library=library)
    assert {p.name: p.read_bytes() for p in good.run_dir.iterdir()} == before  # no temp files, same bytes


def test_skip_bad_rows_counts_examples_that_fail_to_render(tmp_path, tiny, caplog):
    _, library = tiny
    data = write_tiny(tmp_path / "d.jsonl", 30)
    with open(data, "a") as f:
        f.write(json.dumps({"text": "x", "stars": 2, "note": "-"}) + "\n")  # tiny.note renders "" for "-"
        f.write(json.dumps({"text": "y", "stars": 7, "note": "n"}) + "\n")
    cfg = config(
        tmp_path, {"path": str(data), "schema": "tiny", "templates": ["tiny.note"], "skip_bad_rows": True}
    )
    result = prepare(cfg, library=library)
    stats = result.stats["datasets"]["tiny"]
    assert stats["rows_skipped_by_reason"] == {"label outside the label map": 1}
    assert stats["examples_skipped_by_reason"] == {"empty completion (tiny.note)": 1}
    assert sum(result.counts.values()) == 30
    # an empty note is a missing value: the row is skipped when read, before any template renders it
    with open(data, "a") as f:
        f.write(json.dumps({"text": "z", "stars": 2, "note": ""}) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="instructkit.data.build"):
        result = prepare(cfg, library=library)
    stats = result.stats["datasets"]["tiny"]
    assert stats["rows_skipped_by_reason"] == {"label outside the label map": 1, "missing value (note)": 1}
    assert stats["examples_skipped_by_reason"] == {"empty completion (tiny.note)": 1}
    # ... and the end of prepare says so, with the reasons (not only stats.json)
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert summary == [f"dataset 'tiny': 2 of 33 rows skipped (1 label outside the label map, 1 missing value "
                       f"(note)); 1 example skipped (1 empty completion (tiny.note)); see {result.run_dir}/stats.json"]


def test_jinja_syntax_error_in_user_template_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text(TINY_YAML.replace('completion: "{{ text | upper }}"', 'completion: "{{ text | upper }"'))
    cfg = config(
        tmp_path, {"path": str(write_tiny(tmp_path / "d.jsonl", 5)), "schema": "tiny"}, template_files=[bad]
    )
    with pytest.raises(TemplateError) as info:
        prepare(cfg)
    message = str(info.value)
    assert "mine.yaml" in message and "tiny.shout" in message and "line 1" in message


def test_config_errors(tmp_path, tiny):
    path, library = tiny
    with pytest.raises(ConfigError, match="no datasets"):
        prepare(config(tmp_path), library=library)
    d = {"path": str(write_tiny(tmp_path / "d.jsonl", 5)), "schema": "tiny"}
    with pytest.raises(ConfigError, match="distinct `name:`"):
        prepare(config(tmp_path, d, d), library=library)
    with pytest.raises(TemplateError, match="is for schema 'sst2'"):
        prepare(
            config(tmp_path, {**d, "templates": ["sst2.good_or_bad"]}), library=TemplateLibrary.load([path])
        )


def test_demo_dataset(tmp_path):
    if not demo_path().exists():
        pytest.skip("the demo reviews file is not there yet")
    result = prepare(config(tmp_path, {"path": "demo", "templates": ["amazon_us_reviews.predict_rating"]}))
    run = read_run(result.run_dir)
    assert_no_row_in_two_splits(run)
    assert result.stats["datasets"]["demo"]["schema"] == "amazon_us_reviews"
    assert result.stats["datasets"]["demo"]["split"]["max_deviation_points"] <= 2


# --------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------


def label_proportions(examples, template_id):
    labels = Counter(ex["completion"] for ex in examples if ex["template_id"] == template_id)
    total = sum(labels.values())
    return {k: v / total for k, v in labels.items()}


def test_real_fine_food_rating_and_title(tmp_path, data):
    ids = ["amazon_fine_food.predict_rating", "amazon_fine_food.write_title"]
    cfg = config(
        tmp_path,
        {
            "path": str(data / "amazon_fine_food" / "reviews.csv"),
            "schema": "amazon_fine_food",
            "templates": ids,
        },
    )
    result = prepare(cfg)
    run = read_run(cfg.run_dir)
    assert_no_row_in_two_splits(run)
    stats = result.stats["datasets"]["amazon_fine_food"]
    assert stats["rows_read"] == 1000 and stats["rows_used"] == stats["duplicates"]["rows_kept"]
    # label proportions measured on the written files: every split within 2 points of the whole
    whole = label_proportions([ex for s in SPLITS for ex in run[s]], ids[0])
    for split in SPLITS:
        part = label_proportions(run[split], ids[0])
        assert max(abs(part.get(k, 0) - p) for k, p in whole.items()) * 100 <= 2.0, split
    assert stats["split"]["max_deviation_points"] <= 2.0
    assert all(set(Counter(ex["source_id"] for ex in run[s]).values()) == {2} for s in SPLITS)
    titles = [ex for ex in run["test"] if ex["template_id"] == ids[1]]
    assert titles and all(ex["completion"] and ex["choices"] is None for ex in titles)


def test_real_fine_food_grouped_by_product(tmp_path, data):
    path = data / "amazon_fine_food" / "reviews.csv"
    cfg = config(
        tmp_path,
        {
            "path": str(path),
            "schema": "amazon_fine_food",
            "group_by": "ProductId",
            "templates": ["amazon_fine_food.predict_rating"],
        },
    )
    result = prepare(cfg)
    with open(path, encoding="utf-8-sig", newline="") as f:
        product = {f"amazon_fine_food:{i}": row["ProductId"] for i, row in enumerate(csv.DictReader(f))}
    splits_of = defaultdict(set)
    for split, examples in read_run(cfg.run_dir).items():
        for ex in examples:
            splits_of[product[ex["source_id"]]].add(split)
    assert all(len(s) == 1 for s in splits_of.values())
    report = result.stats["datasets"]["amazon_fine_food"]["split"]
    assert report["grouped"] and report["groups_in_several_splits"] == 0
    assert report["max_deviation_points"] >= 0  # best effort, reported


def test_real_fashion_dedup_and_skipped_rows(tmp_path, data):
    cfg = config(
        tmp_path,
        {
            "path": str(data / "amazon_fashion" / "reviews.jsonl"),
            "schema": "amazon_reviews_2018",
            "templates": ["amazon_reviews_2018.predict_rating", "amazon_reviews_2018.write_summary"],
            "skip_bad_rows": True,
        },
        prompt_leakage="report",  # every kept row written, as before the prompt guard (checked below)
    )
    result = prepare(cfg)
    stats = result.stats["datasets"]["amazon_reviews_2018"]
    assert stats["rows_read"] == 3176
    assert stats["rows_skipped_by_reason"] == {"missing value (reviewText)": 16}
    dup = stats["duplicates"]
    assert dup["key"] == ["overall", "reviewText", "summary"]
    # 444 unique (reviewText, summary, overall) in the file; one of them is the 16 rows without reviewText
    assert dup["rows_kept"] == 443 and dup["exact_duplicates_dropped"] == 3160 - 443
    assert dup["conflicting_label_groups"] == 0
    run = read_run(cfg.run_dir)
    assert_no_row_in_two_splits(run)
    assert len({ex["source_id"] for s in SPLITS for ex in run[s]}) == 443
    assert {ex["completion"] for ex in run["train"] if ex["template_id"].endswith("predict_rating")} <= set(
        "12345"
    )
    # Some reviewText repeats under another summary (not duplicates under the default key): those
    # training rows repeat a validation/test prompt. The default guard leaves exactly their examples out.
    held = {ex["prompt"] for s in ("validation", "test") for ex in run[s]}
    leaking = [ex for ex in run["train"] if ex["prompt"] in held]
    assert leaking and result.stats["leaked_prompts"]["test"] > 0
    guarded = prepare(cfg.model_copy(update={"split": cfg.split.model_copy(update={"prompt_leakage": "drop"})}))
    assert guarded.stats["leaked_prompts"] == {"validation": 0, "test": 0}
    assert guarded.stats["prompt_leakage"]["train_examples_dropped"] == len(leaking)
    after = read_run(cfg.run_dir)
    assert after["train"] == [ex for ex in run["train"] if ex["prompt"] not in held]
    assert after["validation"] == run["validation"] and after["test"] == run["test"]


def test_real_sst2_train_and_dev_as_test(tmp_path, data):
    cfg = config(
        tmp_path,
        {
            "files": {"train": str(data / "sst2" / "train.tsv"), "test": str(data / "sst2" / "dev.tsv")},
            "schema": "sst2",
            "columns": {"sentence": ["sentence", "content"]},
            "templates": ["sst2.good_or_bad"],
        },
    )
    result = prepare(cfg)
    stats = result.stats["datasets"]["sst2"]
    dup = stats["duplicates"]
    assert (dup["repeated_keys"], dup["conflicting_label_groups"], dup["exact_duplicates_dropped"]) == (
        371,
        5,
        366,
    )
    assert dup["conflicting_label_rows_dropped"] == 10
    sizes = stats["split"]["sizes"]
    assert sizes["test"] == 872  # dev.tsv as given, whole
    assert sizes["validation"] == round(0.1 * (67349 - 376))  # carved from train.tsv
    assert stats["split"]["max_deviation_points_carved"] <= 2.0
    assert result.counts == {"train": sizes["train"], "validation": sizes["validation"], "test": 872}
    test_ids = {ex["source_id"] for ex in load_examples(cfg.run_dir, "test")}
    assert all(i.startswith("sst2:test:") for i in test_ids)
    train_ids = {ex["source_id"] for ex in load_examples(cfg.run_dir, "train")}
    assert all(i.startswith("sst2:train:") for i in train_ids) and not train_ids & test_ids


def test_real_p3_prompt_completion_prepare(tmp_path, data):
    path = data / "p3_samples" / "gigaword_TLDR.jsonl"
    cfg = config(tmp_path, {"path": str(path)})
    result = prepare(cfg)
    run = read_run(cfg.run_dir)
    assert (
        sum(len(v) for v in run.values())
        == 200 - result.stats["datasets"]["gigaword_TLDR"]["duplicates"]["exact_duplicates_dropped"]
    )
    assert all(not ex["completion"].endswith("<|endoftext|>") for ex in run["train"])
    assert run["train"][0]["template_id"] == "gigaword_TLDR.as_is"


@pytest.mark.slow
def test_real_every_catalog_template_renders_on_real_rows(tmp_path, data):
    """All templates of each schema with shared data, skipping nothing: a failure names the template."""
    cases = [
        {"path": str(data / "amazon_fine_food" / "reviews.csv"), "schema": "amazon_fine_food"},
        {"path": str(data / "ag_news" / "ag_news.csv"), "schema": "ag_news"},
        {"path": str(data / "alpaca" / "alpaca_en_demo.json"), "schema": "alpaca"},
        {"path": str(data / "alpaca" / "seed_tasks.jsonl"), "schema": "self_instruct_seed"},
        {"path": str(data / "dialogsum" / "dialogsum.dev.jsonl"), "schema": "dialogsum"},
        {"path": str(data / "multi30k" / "val"), "format": "parallel", "schema": "multi30k"},
        {"path": str(data / "sst2" / "dev.tsv"), "schema": "sst2", "columns": {"sentence": "content"}},
    ]
    for i, case in enumerate(cases):
        prepare(config(tmp_path / str(i), case))


def test_empty_train_split_is_an_error_and_writes_nothing(tmp_path):
    from instructkit.config_load import load_config
    from instructkit.errors import DataError

    held = "[amazon_us_reviews.predict_rating, amazon_us_reviews.describe_review]"
    cfg = load_config(None, ["datasets.0.path=demo", "datasets.0.schema=amazon_us_reviews",
                             f"datasets.0.templates={held}", f"datasets.0.held_out_templates={held}",
                             f"output_dir={tmp_path}"])
    with pytest.raises(DataError, match="no training examples"):
        prepare(cfg)
    assert not (tmp_path / "demo" / "train.jsonl").exists()
