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
        "text_match": "exact",
        "train_examples_dropped": sum(dropped.values()),
        "train_examples_dropped_by_template": dict(sorted(dropped.items())),
        "train_turns_unlabelled": 0,
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


def _conversations(tmp_path: Path) -> list[DatasetConfig]:
    """Training chats whose first exchange is the held-out test chat's whole prompt ("Who are you?")."""
    def chat(*texts: str) -> dict:
        return {"messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": t}
                             for k, t in enumerate(texts)]}
    train = [chat("Who are you?", f"I am bot {i}.", f"What is {i} + 1?", f"{i + 1}.") for i in range(6)]
    train += [chat(f"Name a colour ({i}).", "Blue.", "Who are you?", "A bot.") for i in range(3)]
    train += [chat(f"Hello {i}", "Hi.") for i in range(3)]
    paths = {"train": tmp_path / "train.jsonl", "probe": tmp_path / "probe.jsonl"}
    paths["train"].write_text("".join(json.dumps(r) + "\n" for r in train))
    paths["probe"].write_text(json.dumps(chat("Who are you?", "I am the test answer.")) + "\n")
    return [DatasetConfig(name="chats", path=str(paths["train"])),
            DatasetConfig(name="probe", path=str(paths["probe"]), held_out=True)]


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_an_earlier_turn_on_a_test_prompt_is_not_learned(tmp_path, streaming):
    """With all_assistant_turns a training chat also learns its first answer on its first question: when
    that prompt is a test prompt, the turn is marked weight 0 (context only) and counted, in both build
    paths; the rest of the conversation is still learned. Under `report` it is counted as a leak."""
    from conftest import build_tiny_tokenizer

    from instructkit.data import load_examples
    from instructkit.data.tokenize import TokenizeSettings, tokenize_examples

    out = {}
    for policy in ("drop", "report"):
        config = RunConfig(name="c", output_dir=str(tmp_path / "runs"), datasets=_conversations(tmp_path),
                           split=SplitConfig(validation=0, test=0, streaming=streaming, prompt_leakage=policy))
        result = prepare(config, tmp_path / f"{policy}-{streaming}", library=TemplateLibrary([], []))
        out[policy] = result.stats, load_examples(result.run_dir, "train")
    stats, train = out["drop"]
    assert stats["prompt_leakage"]["train_turns_unlabelled"] == 6 and stats["leaked_prompts"]["test"] == 0
    weights = [[m.get("weight") for m in ex["messages"]] for ex in train]
    assert weights.count([None, 0, None]) == 6  # "I am bot i." not learned
    assert weights.count([None, None, None]) == 3  # "Who are you?" mid-chat: another prompt
    stats_report, train_report = out["report"]
    assert stats_report["leaked_prompts"]["test"] == 1
    assert stats_report["prompt_leakage"]["train_turns_unlabelled"] == 0
    assert all("weight" not in m for ex in train_report for m in ex["messages"])
    tokenizer = build_tiny_tokenizer()
    dataset, _ = tokenize_examples(train, tokenizer, TokenizeSettings(max_length=256, chat_template=True))
    learned = [tokenizer.decode([t for t in labels if t != -100]) for labels in dataset["labels"]]
    assert not any("I am bot" in text for text in learned)
    assert sum(text.startswith("Blue.") for text in learned) == 3  # the other chats keep every turn
    assert sum(text[0].isdigit() for text in learned) == 6  # and the leaking ones their later turns
