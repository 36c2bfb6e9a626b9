"""Deduplication and splitting of source rows: seeded, stratified, grouped, given splits."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from instructkit.data.readers import read_table
from instructkit.data.split import SPLITS, allocate, deduplicate, largest_remainder, split_rows

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"../shared/data not found: {DATA.resolve()}")
    return DATA.resolve()


def proportions(labels, indices):
    counts = Counter(labels[i] for i in indices)
    return {k: v / len(indices) for k, v in counts.items()}


def max_deviation_points(labels, assignment):
    whole = proportions(labels, range(len(labels)))
    worst = 0.0
    for split in SPLITS:
        members = [i for i, s in enumerate(assignment) if s == split]
        if not members:
            continue
        part = proportions(labels, members)
        worst = max(worst, *(abs(part.get(k, 0) - p) * 100 for k, p in whole.items()))
    return worst


# --------------------------------------------------------------------------------------------------
# Deduplication
# --------------------------------------------------------------------------------------------------


def test_dedup_exact_and_conflicting_are_reported_separately():
    rows = [
        {"text": "a", "label": 1},
        {"text": "a", "label": 1},  # exact duplicate of row 0
        {"text": "b", "label": 0},
        {"text": "b", "label": 1},  # conflicts with row 2: both go
        {"text": "c", "label": 0},
        {"text": "a", "label": 1},  # another copy of row 0
    ]
    result = deduplicate(rows, ["text", "label"], label_field="label")
    assert result.keep == [0, 4]
    assert (result.exact_groups, result.exact_dropped) == (1, 2)
    assert (result.conflicting_groups, result.conflicting_dropped) == (1, 2)
    report = result.to_dict()
    assert report["unique_keys"] == 3 and report["repeated_keys"] == 2
    assert report["conflicting_examples"][0]["label"] == ["0", "1"]


def test_dedup_without_label_and_unhashable_values():
    rows = [{"q": "x", "a": {"t": [1]}}, {"q": "x", "a": {"t": [1]}}, {"q": "x", "a": {"t": [2]}}]
    result = deduplicate(rows, ["q", "a"])
    assert result.keep == [0, 2] and result.exact_dropped == 1 and result.conflicting_groups == 0


def test_dedup_keeps_the_copy_in_the_evaluation_split():
    rows = [{"text": "same", "label": 1}, {"text": "same", "label": 1}, {"text": "other", "label": 0}]
    result = deduplicate(rows, ["text"], "label", given=["train", "test", "train"])
    assert result.keep == [1, 2] and result.cross_split_dropped == 1


def test_dedup_one_label_in_several_representations_is_no_conflict():
    """fastai/fastai#1868: labels read as "1" from a CSV and as 1 from another source are one class. A row
    and its copy with the label as 1 / "1" (or "01" / 1.0) were a "conflict" (['1', '1']) and both dropped."""
    rows = [
        {"text": "great", "label": "1"},  # CSV train
        {"text": "great", "label": 1},  # the same row in a JSONL test file
        {"text": "bad", "label": "01"},
        {"text": "bad", "label": 1.0},
        {"text": "meh", "label": "0"},
        {"text": "meh", "label": 1},  # a real conflict still drops both
    ]
    result = deduplicate(rows, ["text", "label"], "label", given=["train", "test", "train", "train", "train", "test"])
    assert result.keep == [1, 2]
    assert (result.exact_groups, result.exact_dropped, result.cross_split_dropped) == (2, 2, 1)
    assert (result.conflicting_groups, result.conflicting_dropped) == (1, 2)
    assert result.to_dict()["conflicting_examples"] == [{"text": "meh", "label": ["0", "1"], "rows": 2}]


SCHEMA_STR_LABEL = """
schemas:
  - name: rated
    fields: {sentence: str, label: str}
    label_field: label
    label_map: {0: negative, 1: positive}
    templates:
      - id: rated.sentiment
        name: Sentiment
        task: sentiment
        instruction: "{{ sentence }}\\nSentiment:"
        completion: "{{ label_map[label] }}"
        answer_choices: [negative, positive]
        metrics: [accuracy]
"""


def test_planned_dedup_of_csv_and_jsonl_labels_in_memory_and_streamed(tmp_path):
    """The same through plan_dataset and plan_streamed, a text label: train.csv writes "01", test.jsonl 1."""
    import json

    from instructkit.config import DatasetConfig, RunConfig
    from instructkit.data.plan import plan_dataset
    from instructkit.data.stream_plan import plan_streamed
    from instructkit.templates.library import TemplateLibrary

    texts = [f"sentence number {i}" for i in range(40)]
    (tmp_path / "train.csv").write_text("sentence,label\n" + "".join(f"{t},0{i % 2}\n" for i, t in enumerate(texts)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"sentence": t, "label": i % 2}) + "\n"
                                                 for i, t in enumerate(texts[:10])))
    (tmp_path / "schema.yaml").write_text(SCHEMA_STR_LABEL)
    config = RunConfig(name="mixed", datasets=[DatasetConfig(
        files={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.jsonl")}, schema="rated",
        templates=["rated.sentiment"])], split={"validation": 0.1})
    library = TemplateLibrary.load([tmp_path / "schema.yaml"])
    for plan in (plan_dataset(config.datasets[0], library, config),
                 plan_streamed(config.datasets[0], library, config, chunk_rows=7)):
        assert (plan.dedup.exact_dropped, plan.dedup.conflicting_dropped) == (10, 0)
        assert (len(plan.split_rows("train")), len(plan.split_rows("validation"))) == (27, 3)
        assert len(plan.split_rows("test")) == 10


# --------------------------------------------------------------------------------------------------
# Allocation arithmetic
# --------------------------------------------------------------------------------------------------


def test_largest_remainder_sums_and_bounds():
    for total in (0, 1, 7, 10, 999, 1000):
        counts = largest_remainder(total, [0.7, 0.1, 0.2])
        assert sum(counts) == total
        assert all(abs(c - total * f) < 1 for c, f in zip(counts, [0.7, 0.1, 0.2]))


def test_allocate_rows_and_columns_add_up():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(0, 40) for _ in range(rng.randint(1, 6))]
        cells = allocate(sizes, [0.7, 0.1, 0.2], rng)
        assert [sum(row) for row in cells] == sizes
        assert [sum(col) for col in zip(*cells)] == largest_remainder(sum(sizes), [0.7, 0.1, 0.2])
        assert all(c >= 0 for row in cells for c in row)


def test_small_classes_still_fill_validation():
    """20 rows in 5 classes of 4: per-class rounding alone would leave validation empty."""
    labels = [c for c in range(5) for _ in range(4)]
    result = split_rows(20, validation=0.1, test=0.2, labels=labels)
    assert result.report["sizes"] == {"train": 14, "validation": 2, "test": 4}


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [1000, 5000])
def test_stratified_proportions_within_two_points(seed, n):
    rng = random.Random(seed)
    labels = rng.choices(["1", "2", "3", "4", "5"], weights=[5, 3, 8, 20, 64], k=n)  # skewed like fine food
    result = split_rows(n, validation=0.1, test=0.2, seed=seed, labels=labels)
    assert max_deviation_points(labels, result.assignment) <= 2.0
    assert result.report["max_deviation_points"] == pytest.approx(
        max_deviation_points(labels, result.assignment), abs=1e-3
    )
    sizes = Counter(result.assignment)
    assert [sizes[s] for s in SPLITS] == largest_remainder(n, [0.7, 0.1, 0.2])


@pytest.mark.parametrize("seed", range(10))
def test_stratified_small_data_each_class_within_rows_of_its_share(seed):
    """With 103 rows validation holds 10 (one row = 10 points): the bound is in rows, not points."""
    rng = random.Random(seed)
    n = rng.randint(20, 200)
    labels = rng.choices("abcde", weights=[5, 3, 8, 20, 64], k=n)
    result = split_rows(n, validation=0.1, test=0.2, seed=seed, labels=labels)
    whole = Counter(labels)
    for split in SPLITS:
        members = [labels[i] for i, s in enumerate(result.assignment) if s == split]
        counts = Counter(members)
        for label, total in whole.items():
            assert abs(counts[label] - total * len(members) / n) < 2, (split, label)


def test_split_is_seeded():
    labels = [i % 3 for i in range(300)]
    a = split_rows(300, validation=0.1, test=0.2, seed=5, labels=labels).assignment
    b = split_rows(300, validation=0.1, test=0.2, seed=5, labels=labels).assignment
    c = split_rows(300, validation=0.1, test=0.2, seed=6, labels=labels).assignment
    assert a == b and a != c


def test_unstratified_split_sizes():
    result = split_rows(1000, validation=0.15, test=0.05, seed=0, labels=None)
    assert result.report["sizes"] == {"train": 800, "validation": 150, "test": 50}


def test_grouped_split_never_straddles_and_reports_deviation():
    rng = random.Random(0)
    groups = [f"P{rng.randint(0, 150)}" for _ in range(2000)]
    labels = [rng.choice("abc") if rng.random() < 0.5 else "a" for _ in range(2000)]
    result = split_rows(2000, validation=0.1, test=0.2, seed=0, labels=labels, groups=groups)
    where: dict[str, set[str]] = {}
    for g, s in zip(groups, result.assignment):
        where.setdefault(g, set()).add(s)
    assert all(len(splits) == 1 for splits in where.values())
    assert result.report["groups_in_several_splits"] == 0
    assert result.report["max_deviation_points"] == pytest.approx(
        max_deviation_points(labels, result.assignment), abs=1e-3
    )
    sizes = result.report["sizes"]
    assert abs(sizes["test"] - 400) < 60 and abs(sizes["validation"] - 200) < 60  # groups are ~13 rows


def test_given_splits_are_kept_and_missing_ones_carved_from_train():
    given = ["train"] * 900 + ["test"] * 100
    labels = [i % 2 for i in range(1000)]
    result = split_rows(1000, validation=0.1, test=0.2, seed=0, labels=labels, given=given)
    assert result.assignment[900:] == ["test"] * 100
    assert Counter(result.assignment[:900]) == {"train": 810, "validation": 90}
    assert result.report["max_deviation_points_carved"] <= 2.0
    assert result.report["given_splits"] == ["test", "train"]


def test_held_out_dataset_has_no_train_rows():
    result = split_rows(
        300, validation=0.1, test=0.2, seed=0, labels=[i % 3 for i in range(300)], held_out=True
    )
    assert result.report["sizes"] == {"train": 0, "validation": 0, "test": 300}  # every row is scored


# --------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------


def test_real_fashion_has_444_unique_review_summary_rating(data):
    table = read_table(data / "amazon_fashion" / "reviews.jsonl")
    assert len(table.rows) == 3176
    result = deduplicate(table.rows, ["reviewText", "summary", "overall"])
    assert len(result.keep) == 444 and result.exact_dropped == 3176 - 444
    # with the rating as the label: the same text and summary never carry two ratings here
    with_label = deduplicate(table.rows, ["reviewText", "summary", "overall"], label_field="overall")
    assert with_label.conflicting_groups == 0 and len(with_label.keep) == 444


def test_real_sst2_repeats_371_sentences_5_with_conflicting_labels(data):
    table = read_table(data / "sst2" / "train.tsv")
    result = deduplicate(table.rows, ["sentence", "label"], label_field="label")
    assert result.to_dict()["repeated_keys"] == 371
    assert result.conflicting_groups == 5 and result.conflicting_dropped == 10
    assert result.exact_dropped == 366
    assert len(result.keep) == 67349 - 366 - 10


def test_real_fine_food_grouped_by_product(data):
    table = read_table(data / "amazon_fine_food" / "reviews.csv")
    groups = [r["ProductId"] for r in table.rows]
    labels = [r["Score"] for r in table.rows]
    result = split_rows(len(groups), validation=0.1, test=0.2, seed=0, labels=labels, groups=groups)
    for product in set(groups):
        assert len({s for g, s in zip(groups, result.assignment) if g == product}) == 1
    assert result.report["groups_in_several_splits"] == 0
    assert result.report["max_deviation_points"] < 5  # best effort with ~200 products
