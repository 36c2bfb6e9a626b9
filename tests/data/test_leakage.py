"""No validation or test prompt is a training prompt, under any template mix (issue 19, item 4).

The issue's case: 60 reviews plus the same text and stars re-posted for 30 of them under another headline
(the usual pattern of Amazon dumps), templates predict_rating + describe_review, no `dedup_key`. The
default dedup key holds the headline (describe_review's target), so the re-posts are not duplicates and
can land in train while their twin is in test: the rating prompt is then a verbatim training example.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from instructkit.config import DatasetConfig, RunConfig, SplitConfig
from instructkit.data import prepare
from instructkit.data.leakage import PromptLedger
from instructkit.templates.library import TemplateLibrary

RATING = "amazon_us_reviews.predict_rating"
DESCRIBE = "amazon_us_reviews.describe_review"


@pytest.fixture(scope="module")
def library() -> TemplateLibrary:
    return TemplateLibrary.builtin()


def write_reposted_reviews(path: Path) -> Path:
    reviews = [
        {"review_body": f"Review {i}: the {['kettle', 'lamp', 'case'][i % 3]} {['broke', 'works'][i % 2]} "
                        f"after {i + 2} days of use.",
         "star_rating": 1 + i % 5, "review_headline": f"Headline {i}", "product_title": f"Product {i % 7}"}
        for i in range(60)
    ]
    reposts = [{**reviews[i], "review_headline": f"Another headline {i}"} for i in range(0, 60, 2)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in reviews + reposts)
    return path


def run(tmp_path: Path, library, data: Path, name: str, templates: list[str], policy: str = "drop"):
    config = RunConfig(
        name=name,
        output_dir=str(tmp_path / "runs"),
        datasets=[DatasetConfig(path=str(data), schema="amazon_us_reviews", name="reviews", templates=templates)],
        split=SplitConfig(seed=0, validation=0.2, test=0.2, prompt_leakage=policy),
    )
    result = prepare(config, library=library)
    examples = {s: [json.loads(line) for line in result.files[s].read_text().splitlines()]
                for s in ("train", "validation", "test")}
    return result, examples


def held_in_train(examples: dict[str, list[dict]], split: str, template: str | None = None) -> int:
    train = {ex["prompt"] for ex in examples["train"]}
    return sum(ex["prompt"] in train for ex in examples[split]
               if template is None or ex["template_id"] == template)


def test_reposted_reviews_leak_no_rating_test_prompt_into_train(tmp_path, library):
    data = write_reposted_reviews(tmp_path / "reviews.jsonl")
    kept, kept_examples = run(tmp_path, library, data, "report", [RATING, DESCRIBE], policy="report")
    guarded, examples = run(tmp_path, library, data, "drop", [RATING, DESCRIBE])

    # the fault as filed: with the leaking examples kept, rating test prompts are training prompts
    rating_test = [ex for ex in kept_examples["test"] if ex["template_id"] == RATING]
    assert len(rating_test) == 18  # 90 rows, 20% test
    leaked_rating = held_in_train(kept_examples, "test", RATING)
    assert leaked_rating > 0
    assert kept.stats["leaked_prompts"] == {
        "validation": held_in_train(kept_examples, "validation"), "test": held_in_train(kept_examples, "test")}
    assert kept.stats["prompt_leakage"]["train_examples_dropped"] == 0

    # the default: no test or validation prompt of any template in train, and stats.json says 0
    assert held_in_train(examples, "test", RATING) == 0
    assert held_in_train(examples, "test") == held_in_train(examples, "validation") == 0
    assert guarded.stats["leaked_prompts"] == {"validation": 0, "test": 0}
    stats = json.loads(guarded.files["stats"].read_text())
    assert stats["leaked_prompts"] == {"validation": 0, "test": 0}

    # the split itself is untouched: the same validation and test files, train minus the leaking examples
    for split in ("validation", "test"):
        assert guarded.files[split].read_bytes() == kept.files[split].read_bytes()
    held = {ex["prompt"] for s in ("validation", "test") for ex in examples[s]}
    expected = [ex for ex in kept_examples["train"] if ex["prompt"] not in held]
    assert examples["train"] == expected
    dropped = Counter(ex["template_id"] for ex in kept_examples["train"] if ex["prompt"] in held)
    assert stats["prompt_leakage"] == {
        "policy": "drop",
        "train_examples_dropped": sum(dropped.values()),
        "train_examples_dropped_by_template": dict(sorted(dropped.items())),
    }
    assert dropped[RATING] >= leaked_rating  # each leaked test prompt had at least one training copy


def test_rating_alone_was_never_affected(tmp_path, library):
    """With predict_rating alone the default key is the review text: re-posts are duplicates, nothing leaks."""
    data = write_reposted_reviews(tmp_path / "reviews.jsonl")
    result, examples = run(tmp_path, library, data, "alone", [RATING])
    assert result.stats["datasets"]["reviews"]["duplicates"]["exact_duplicates_dropped"] == 30
    assert result.stats["leaked_prompts"] == {"validation": 0, "test": 0}
    assert result.stats["prompt_leakage"]["train_examples_dropped"] == 0
    assert held_in_train(examples, "test") == 0


def test_a_dataset_of_a_mixture_cannot_leak_into_another(tmp_path, library):
    """Two datasets sharing texts: a test prompt of one is not a training prompt of the other."""
    data = write_reposted_reviews(tmp_path / "reviews.jsonl")
    config = RunConfig(
        name="mix",
        output_dir=str(tmp_path / "runs"),
        datasets=[
            DatasetConfig(path=str(data), schema="amazon_us_reviews", name="first", templates=[RATING]),
            DatasetConfig(path=str(data), schema="amazon_us_reviews", name="second", templates=[RATING],
                          max_rows=50),
        ],
        split=SplitConfig(seed=1, validation=0.2, test=0.2),
    )
    result = prepare(config, library=library)
    examples = {s: [json.loads(line) for line in result.files[s].read_text().splitlines()]
                for s in ("train", "validation", "test")}
    assert held_in_train(examples, "test") == held_in_train(examples, "validation") == 0
    assert result.stats["leaked_prompts"] == {"validation": 0, "test": 0}
    assert result.stats["prompt_leakage"]["train_examples_dropped"] > 0  # the guard had work to do


def test_ledger_counts_and_drops():
    ledger = PromptLedger(drop=True)
    assert ledger.keep("test", "p1", "d", "t") and ledger.keep("test", "p1", "d", "t")
    assert ledger.keep("validation", "p2", "d", "t")
    assert not ledger.keep("train", "p1", "d", "t") and not ledger.keep("train", "p2", "d", "u")
    assert ledger.keep("train", "p3", "d", "t")
    assert ledger.leaked() == {"validation": 0, "test": 0}
    assert ledger.report("drop")["train_examples_dropped_by_template"] == {"t": 1, "u": 1}
    assert ledger.notes("d", Counter({"t": 1})) and not ledger.notes("other", Counter())
    keep_all = PromptLedger(drop=False)
    for split, prompt in (("test", "p1"), ("test", "p1"), ("validation", "p2"), ("train", "p1")):
        assert keep_all.keep(split, prompt, "d", "t")
    assert keep_all.leaked() == {"validation": 0, "test": 2}
