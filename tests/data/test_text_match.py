"""`split.text_match: normalized`: rows and prompts that differ only in whitespace, letter case or Unicode
form are one row to deduplication and one prompt to the leakage guard, in memory and streamed alike.

The default ('exact') keeps the split of every shipped example and benchmark as it was (Amazon Fashion has 4
reviews that are case-only copies of others: "Excellent" / "EXCELLENT"), so the tests also show what
'exact' lets through.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.config import DatasetConfig, RunConfig, SplitConfig
from instructkit.config_load import load_config
from instructkit.data import stream_build
from instructkit.data.build import prepare
from instructkit.data.leakage import PromptLedger, prompt_digest
from instructkit.data.plan import plan_dataset
from instructkit.data.split import deduplicate, normalized_text
from instructkit.data.stream_plan import plan_streamed
from instructkit.templates.library import TemplateLibrary

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RATING = "amazon_us_reviews.predict_rating"
DESCRIBE = "amazon_us_reviews.describe_review"
SPLITS = ("train", "validation", "test")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(stream_build, "CHUNK_ROWS", 7)
    monkeypatch.setattr(stream_build, "BUCKET_LINES", 50)


@pytest.fixture(scope="module")
def library() -> TemplateLibrary:
    return TemplateLibrary.builtin()


def _review(i: int) -> str:
    return f"Review {i}: the {['kettle', 'lamp', 'case'][i % 3]} {['broke', 'works'][i % 2]} after {i + 2} days."


def write_near_duplicates(path: Path) -> Path:
    """40 reviews, then 12 copies that differ only in whitespace (0-4), case (5-9) or Unicode form (10-11),
    with the same stars, and 2 case-only copies with other stars (12-13: conflicting labels)."""
    rows = [{"review_body": _review(i), "star_rating": 1 + i % 5, "review_headline": f"Headline {i}",
             "product_title": "P"} for i in range(40)]
    copies = {i: "  " + _review(i).replace(" ", " \t ") + "\n" for i in range(5)}
    copies |= {i: _review(i).upper() for i in range(5, 10)}
    copies |= {10: _review(10).replace(" ", "\u00a0"), 11: _review(11).replace("R", "\uff32")}  # NBSP, fullwidth R
    rows += [{**rows[i], "review_body": text} for i, text in copies.items()]
    rows += [{**rows[i], "review_body": _review(i).lower(), "star_rating": 1 + (i + 2) % 5} for i in (12, 13)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def config_for(data: Path, tmp_path: Path, text_match: str, templates: list[str], streaming: str = "off"
               ) -> RunConfig:
    return RunConfig(
        name=f"{text_match}-{streaming}", output_dir=str(tmp_path / "runs"),
        datasets=[DatasetConfig(path=str(data), schema="amazon_us_reviews", name="reviews", templates=templates)],
        split=SplitConfig(seed=0, validation=0.2, test=0.2, text_match=text_match, streaming=streaming))


def read(run_dir: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (run_dir / f"{s}.jsonl").read_text().splitlines()] for s in SPLITS}


def test_normalized_text_is_nfkc_casefolded_whitespace_collapsed():
    same = ["Great product!", "great  product! ", "great product!\n", " GREAT\tproduct!", "Great\u00a0product!",
            "\uff27reat product\uff01", "GREAT PRODUCT!"]
    assert {normalized_text(text) for text in same} == {"great product!"}
    assert normalized_text("Straße") == normalized_text("STRASSE") == "strasse"  # casefold, not lower
    assert normalized_text("Great products!") != normalized_text("Great product!")
    assert normalized_text([{"role": "user", "content": " Hi  THERE"}, 5, None]) == [
        {"role": "user", "content": "hi there"}, 5, None]
    rows = [{"t": "Great product!", "y": 5}, {"t": "great  product! \n", "y": 5}, {"t": "Fine.", "y": 3}]
    assert deduplicate(rows, ["t"], "y").keep == [0, 1, 2]  # exact: three rows
    result = deduplicate(rows, ["t"], "y", normalize=True)
    assert result.keep == [0, 2] and result.exact_dropped == 1
    assert result.to_dict()["text_match"] == "normalized"


@pytest.mark.parametrize("planner", ["memory", "streamed"])
def test_whitespace_and_case_copies_are_deduplicated(tmp_path, library, planner):
    data = write_near_duplicates(tmp_path / "reviews.jsonl")

    def plan(text_match: str):
        config = config_for(data, tmp_path, text_match, [RATING])
        if planner == "memory":
            return plan_dataset(config.datasets[0], library, config)
        return plan_streamed(config.datasets[0], library, config, chunk_rows=7)

    exact, normalized = plan("exact"), plan("normalized")
    assert len(exact.dedup.keep) == 54 and exact.dedup.exact_dropped == exact.dedup.conflicting_groups == 0
    dedup = normalized.dedup
    assert (dedup.exact_groups, dedup.exact_dropped) == (12, 12)
    assert (dedup.conflicting_groups, dedup.conflicting_dropped) == (2, 4)
    # the first row of each text kept (the original, as written), both rows of 12 and 13 dropped
    assert dedup.keep == list(range(12)) + list(range(14, 40))
    assert normalized.rows == dedup.keep and len(normalized.split.assignment) == 38


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_a_near_identical_test_prompt_never_reaches_train(tmp_path, library, streaming):
    """Re-posts under another headline (so no duplicate under a key that holds the headline) whose text
    differs only in whitespace or case: 'exact' lets a test rating prompt into train in that form,
    'normalized' leaves the training copy out."""
    rows = [{"review_body": _review(i), "star_rating": 1 + i % 5, "review_headline": f"Headline {i}",
             "product_title": "P"} for i in range(60)]
    variants = [lambda t: t.lower(), lambda t: t + "\n", lambda t: t.replace(" ", "  "), lambda t: t.upper() + " "]
    rows += [{**rows[i], "review_body": variants[i % 4](rows[i]["review_body"]), "review_headline": f"Other {i}"}
             for i in range(0, 60, 2)]
    data = tmp_path / "reposts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def near_leaks(examples: dict[str, list[dict]]) -> int:
        train = {normalized_text(ex["prompt"]) for ex in examples["train"]}
        return sum(normalized_text(ex["prompt"]) in train for s in ("validation", "test") for ex in examples[s])

    exact = prepare(config_for(data, tmp_path, "exact", [RATING, DESCRIBE], streaming), tmp_path / "exact")
    assert near_leaks(read(exact.run_dir)) > 0  # the fault: a test prompt in train, case or spacing changed
    assert exact.stats["leaked_prompts"] == {"validation": 0, "test": 0}  # ... and the exact guard saw none
    result = prepare(config_for(data, tmp_path, "normalized", [RATING, DESCRIBE], streaming), tmp_path / "norm")
    examples = read(result.run_dir)
    assert near_leaks(examples) == 0
    assert result.stats["leaked_prompts"] == {"validation": 0, "test": 0}
    leakage = result.stats["prompt_leakage"]
    assert leakage["text_match"] == "normalized"
    assert leakage["train_examples_dropped"] > exact.stats["prompt_leakage"]["train_examples_dropped"]
    for split in ("validation", "test"):  # the split itself is the one 'exact' makes: only train loses examples
        assert examples[split] == read(exact.run_dir)[split]


def test_prompt_completion_near_copy_of_a_held_out_prompt_is_dropped(tmp_path):
    train = [{"prompt": f"Is this review positive? Review {i}.", "completion": "yes"} for i in range(8)]
    train.append({"prompt": "is this review POSITIVE?  Great product!\n", "completion": "no"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "probe.jsonl").write_text(json.dumps({"prompt": "Is this review positive? Great product!",
                                                      "completion": "yes"}) + "\n")
    out = {}
    for text_match in ("exact", "normalized"):
        for streaming in ("off", "on"):
            config = RunConfig(name="pc", datasets=[
                DatasetConfig(name="train", path=str(tmp_path / "train.jsonl"), choices="none"),
                DatasetConfig(name="probe", path=str(tmp_path / "probe.jsonl"), held_out=True, choices="none")],
                split=SplitConfig(validation=0, test=0, text_match=text_match, streaming=streaming))
            result = prepare(config, tmp_path / f"{text_match}-{streaming}", library=TemplateLibrary([], []))
            out[text_match, streaming] = [ex["prompt"] for ex in read(result.run_dir)["train"]]
    assert len(out["exact", "off"]) == 9  # the near copy trains on the test prompt
    assert len(out["normalized", "off"]) == 8
    assert not any("Great product" in p for p in out["normalized", "off"])
    for text_match in ("exact", "normalized"):
        assert out[text_match, "off"] == out[text_match, "on"]


@pytest.mark.parametrize("templates", [[RATING], [RATING, DESCRIBE]])
def test_in_memory_and_streamed_prepare_write_the_same_files(tmp_path, library, templates):
    data = write_near_duplicates(tmp_path / "reviews.jsonl")
    runs = {}
    for streaming in ("off", "on"):
        runs[streaming] = prepare(config_for(data, tmp_path, "normalized", templates, streaming),
                                  tmp_path / streaming)
    memory, streamed = runs["off"], runs["on"]
    for split in SPLITS:
        assert memory.files[split].read_bytes() == streamed.files[split].read_bytes(), split
    volatile = ("seconds", "streaming", "run_dir", "config")
    a, b = ({k: v for k, v in r.stats.items() if k not in volatile} for r in (memory, streamed))
    assert a == b
    dup = a["datasets"]["reviews"]["duplicates"]
    assert dup["text_match"] == "normalized"
    if templates == [RATING]:
        assert dup["exact_duplicates_dropped"] == 12 and dup["conflicting_label_rows_dropped"] == 4
        # the conflicting groups are named by the first row's text, file and line
        assert [(c["review_body"], c["where"]) for c in dup["conflicting_examples"]] == [
            (_review(12), f"{tmp_path / 'reviews.jsonl'}: line 13"),
            (_review(13), f"{tmp_path / 'reviews.jsonl'}: line 14")]


def test_ledger_normalized_digests():
    assert prompt_digest("A  b\n") != prompt_digest("a b")
    assert prompt_digest("A  b\n", normalize=True) == prompt_digest("a b", normalize=True)
    ledger = PromptLedger.of(SplitConfig(text_match="normalized"))
    assert ledger.keep("test", "Rate: Great product!", "d", "t")
    assert not ledger.keep("train", "rate:  GREAT product!\n", "d", "t")
    assert ledger.keep("train", "Rate: Great products!", "d", "t")
    assert ledger.report("drop")["train_examples_dropped"] == 1
    exact = PromptLedger.of(SplitConfig())
    assert exact.keep("test", "Rate: Great product!", "d", "t")
    assert exact.keep("train", "rate:  GREAT product!\n", "d", "t")


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_chats_compare_normalized_turns(tmp_path, streaming):
    """Chat rows: a copy of a conversation in other case and spacing is a duplicate, and an earlier turn
    whose prompt is the held-out chat's prompt in other case and spacing is not learned."""
    def chat(*texts: str) -> dict:
        return {"messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": t}
                             for k, t in enumerate(texts)]}
    train = [chat("who are  YOU?\n", f"I am bot {i}.", f"What is {i} + 1?", f"{i + 1}.") for i in range(4)]
    train += [chat("Hello there", "Hi."), chat("  HELLO\tthere ", "hi.")]  # the second: a copy of the first
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "probe.jsonl").write_text(json.dumps(chat("Who are you?", "The test answer.")) + "\n")
    config = RunConfig(name="c", datasets=[
        DatasetConfig(name="chats", path=str(tmp_path / "chats.jsonl")),
        DatasetConfig(name="probe", path=str(tmp_path / "probe.jsonl"), held_out=True)],
        split=SplitConfig(validation=0, test=0, streaming=streaming, text_match="normalized"))
    result = prepare(config, tmp_path / streaming, library=TemplateLibrary([], []))
    assert result.stats["datasets"]["chats"]["duplicates"]["exact_duplicates_dropped"] == 1
    assert result.stats["prompt_leakage"]["train_turns_unlabelled"] == 4
    train_out = read(result.run_dir)["train"]
    weights = sorted(([m.get("weight") for m in ex["messages"]] for ex in train_out), key=len)
    assert weights == [[None]] + [[None, 0, None]] * 4  # "I am bot i." is context only


def test_real_fashion_case_only_copies_in_memory_and_streamed(shared_data, library):
    """examples/amazon_reviews_2018.yaml: 'normalized' finds 4 more duplicates ("Excellent" / "EXCELLENT"),
    which is why it is not the default; both planners agree on rows, split and counts."""
    config = load_config(EXAMPLES / "amazon_reviews_2018.yaml", [])
    plans = {}
    for text_match in ("exact", "normalized"):
        config = config.model_copy(update={"split": config.split.model_copy(update={"text_match": text_match})})
        memory = plan_dataset(config.datasets[0], library, config)
        streamed = plan_streamed(config.datasets[0], library, config, chunk_rows=101)
        assert streamed.rows == memory.rows and streamed.split.assignment == memory.split.assignment
        a, b = memory.dedup.to_dict(), streamed.dedup.to_dict()
        a.pop("conflicting_examples"), b.pop("conflicting_examples")  # b's are filled in while rendering
        assert a == b
        plans[text_match] = memory
    assert len(plans["exact"].dedup.keep) - len(plans["normalized"].dedup.keep) == 4
    assert plans["normalized"].dedup.exact_dropped == plans["exact"].dedup.exact_dropped + 4
