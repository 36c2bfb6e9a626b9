"""Prompt/completion data with a closed set of answers is classification (data/answers.py): declared with
`choices`/`metrics`, or detected when few distinct completions cover the rows; stated in stats.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.config import DatasetConfig, RunConfig
from instructkit.data.answers import decide_answers
from instructkit.data.build import load_examples, prepare
from instructkit.errors import ConfigError, DataError
from instructkit.templates.library import TemplateLibrary


def _write(path: Path, completions: list[str]) -> Path:
    rows = [{"prompt": f"Review {i}: the kettle leaks. Rate it from 1 to 5.", "completion": c}
            for i, c in enumerate(completions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(tmp_path: Path, run: dict | None = None, **dataset) -> tuple[dict, list[dict]]:
    config = RunConfig(name="p3", output_dir=str(tmp_path / "runs"), datasets=[DatasetConfig(**dataset)],
                       **(run or {}))
    result = prepare(config, library=TemplateLibrary([], []))
    examples = [ex for split in ("train", "validation", "test") for ex in load_examples(config.run_dir, split)]
    return result.stats["datasets"][config.datasets[0].name or Path(dataset["path"]).stem], examples


RATINGS = [str(1 + i % 5) for i in range(100)]  # the P3 rating prompts: answers "1".."5"


def test_a_completion_column_with_five_values_is_detected_as_classification(tmp_path):
    stats, examples = _prepare(tmp_path, path=str(_write(tmp_path / "ratings.jsonl", RATINGS)))
    assert stats["answers"] == {
        "task": "classification", "choices": ["1", "2", "3", "4", "5"], "metrics": ["accuracy", "macro_f1"],
        "origin": "detected", "distinct": 5, "coverage": 1.0,
        "rule": "classification when the most frequent completions covering >= 95% of the rows (ties included) "
                "are at most 20, with >= 4 rows per answer on average"}
    assert len(examples) == 100
    for ex in examples:
        assert ex["choices"] == ["1", "2", "3", "4", "5"] and ex["label"] == ex["completion"]
        assert (ex["task"], ex["metrics"], ex["template_id"]) == ("classification", ["accuracy", "macro_f1"],
                                                                   "ratings.as_is")


def test_rows_outside_the_detected_answers_are_left_out_and_counted(tmp_path):
    completions = RATINGS[:97] + ["5 stars", "five", "3/5"]  # 97% of the rows in "1".."5"
    stats, examples = _prepare(tmp_path, path=str(_write(tmp_path / "ratings.jsonl", completions)))
    assert stats["answers"]["choices"] == ["1", "2", "3", "4", "5"] and stats["answers"]["coverage"] == 0.97
    assert stats["rows_skipped_by_reason"] == {"completion outside the detected answer choices": 3}
    assert len(examples) == 97 and all(ex["completion"] in "12345" for ex in examples)


def test_free_text_stays_free_text(tmp_path):
    titles = [f"title number {i}" for i in range(100)]
    stats, examples = _prepare(tmp_path, path=str(_write(tmp_path / "titles.jsonl", titles)))
    assert (stats["answers"]["task"], stats["answers"]["choices"], stats["answers"]["distinct"]) == \
        ("instruction_following", None, 100)
    assert all(ex["choices"] is None and ex["metrics"] == ["rougeL"] for ex in examples)


def test_declared_choices_and_metrics_win(tmp_path):
    path = _write(tmp_path / "ratings.jsonl", RATINGS)
    stats, examples = _prepare(tmp_path, path=str(path), choices=["5", "4", "3", "2", "1"], metrics=["accuracy"])
    assert (stats["answers"]["origin"], stats["answers"]["choices"]) == ("declared", ["5", "4", "3", "2", "1"])
    assert all(ex["choices"] == ["5", "4", "3", "2", "1"] and ex["metrics"] == ["accuracy"] for ex in examples)
    stats, examples = _prepare(tmp_path, path=str(path), choices="none")  # free text although 5 values
    assert stats["answers"]["task"] == "instruction_following"
    assert all(ex["choices"] is None for ex in examples)


def test_a_completion_outside_declared_choices_names_file_and_line(tmp_path):
    path = _write(tmp_path / "ratings.jsonl", RATINGS[:10] + ["6"] + RATINGS[10:])
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, path=str(path), choices=["1", "2", "3", "4", "5"])
    assert str(err.value).startswith(f"{path}: line 11: completion '6' is not one of the dataset's choices")
    stats, examples = _prepare(tmp_path, path=str(path), choices=["1", "2", "3", "4", "5"], skip_bad_rows=True)
    assert stats["rows_skipped_by_reason"] == {"completion outside the declared choices": 1}
    assert len(examples) == 100


NFC, NFD = "caf\u00e9", "cafe\u0301"  # the same text up to canonical equivalence, spelled apart


@pytest.mark.parametrize("streaming", ["off", "on"])
@pytest.mark.parametrize("declared", [[NFC, "tea"], [NFD, "tea"], "auto"])
def test_a_completion_spelled_apart_from_its_choice_is_that_choice(tmp_path, streaming, declared):
    # Rows whose completion is "cafe" + combining acute are the answer "caf\u00e9" (which they look the same
    # as), and the reverse: kept, trained and scored under the choice's spelling. Declared, they were bad
    # rows; detected, the two spellings were two choices that rank classification cannot tell apart.
    answers = [NFC if i % 3 else NFD if i % 2 else "tea" for i in range(60)]  # 20 tea, 30 NFC, 10 NFD
    stats, examples = _prepare(tmp_path, path=str(_write(tmp_path / "drinks.jsonl", answers)), choices=declared,
                               run={"split": {"streaming": streaming}})
    expected = declared if declared != "auto" else [NFC, "tea"]  # detected: spelled in NFC
    assert stats["answers"]["choices"] == expected and stats["answers"]["coverage"] == 1.0
    assert stats["answers"]["distinct"] == 2
    assert len(examples) == 60 and not stats.get("rows_skipped_by_reason")
    cafe = expected[0]
    assert sorted(ex["completion"] for ex in examples) == sorted(cafe if a != "tea" else a for a in answers)
    assert all(ex["label"] == ex["completion"] and ex["choices"] == expected for ex in examples)


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_a_long_choice_matches_its_longer_decomposed_spelling_in_both_paths(tmp_path, streaming):
    # 240 characters composed, 300 decomposed: longer than the streamed path keeps as text (256)
    long_nfc, long_nfd = NFC * 60, NFD * 60
    answers = [long_nfd if i % 2 else long_nfc for i in range(40)]
    stats, examples = _prepare(tmp_path, path=str(_write(tmp_path / "long.jsonl", answers)),
                               choices=[long_nfc, "tea"], run={"split": {"streaming": streaming}})
    assert stats["answers"]["coverage"] == 1.0 and len(examples) == 40
    assert all(ex["completion"] == long_nfc for ex in examples)


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_rows_the_same_up_to_nfc_are_duplicates(tmp_path, streaming):
    rows = [{"prompt": f"Drink {i}?", "completion": spelling} for i in range(30) for spelling in (NFC, NFD)]
    rows += [{"prompt": f"Tea {i}?", "completion": "tea"} for i in range(30)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats, examples = _prepare(tmp_path, path=str(path), choices=[NFC, "tea"],
                               run={"split": {"streaming": streaming}})
    assert stats["duplicates"]["exact_duplicates_dropped"] == 30 and len(examples) == 60  # one of each pair
    assert len({(ex["prompt"], ex["completion"]) for ex in examples}) == 60


@pytest.mark.parametrize("twice", [NFD, NFC])
def test_declared_choices_the_same_up_to_nfc_are_a_config_error(twice):
    with pytest.raises(ValueError, match=r"\(entry 3\) are the same text"):
        DatasetConfig(path="x.jsonl", choices=[NFC, "tea", twice])


def test_detection_counts_spellings_as_one_answer_spelled_in_nfc():
    answers = decide_answers([NFD] * 12 + [NFC] * 8 + ["tea"] * 20, "auto", None)
    assert (answers.choices, answers.distinct, answers.coverage) == ([NFC, "tea"], 2, 1.0)


def test_choices_on_templated_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="`choices` and `metrics` are for prompt/completion data"):
        prepare(RunConfig(output_dir=str(tmp_path), datasets=[DatasetConfig(
            path="demo", schema="amazon_us_reviews", templates=["amazon_us_reviews.predict_rating"],
            choices=["1", "2"])]))


TWENTY = [str(i) for i in range(20)] * 10


@pytest.mark.parametrize("completions, choices", [
    (["a", "b"] * 10, ["a", "b"]),
    (["a", "b", "c"] * 3, None),  # 9 rows for 3 answers: fewer than 4 rows per answer
    ([str(i) for i in range(21)] * 10, None),  # 21 answers, equally frequent: none is a straggler
    (TWENTY + [f"x{i}" for i in range(10)], [str(i) for i in range(20)]),  # 20 answers cover 95.2%
    (TWENTY + [f"x{i}" for i in range(11)], None),  # 20 answers cover 94.8%: 21+ needed
    (["yes"] * 60 + ["no"] * 38 + ["maybe"] * 2, ["no", "yes"]),  # 98%; "maybe" left out
])
def test_detection_thresholds(completions, choices):
    assert decide_answers(completions, "auto", None).choices == choices


def test_real_p3_yes_no_prompts_are_classification_and_titles_are_not(tmp_path, shared_data):
    polarity = shared_data / "p3_samples" / "amazon_polarity_Is_this_review.jsonl"
    stats, examples = _prepare(tmp_path / "a", path=str(polarity))
    assert (stats["answers"]["choices"], stats["answers"]["origin"]) == (["Negative", "Positive"], "detected")
    assert {ex["task"] for ex in examples} == {"classification"}
    stats, _ = _prepare(tmp_path / "b", path=str(shared_data / "p3_samples" / "gigaword_TLDR.jsonl"))
    assert stats["answers"]["choices"] is None


def _write_chats(path: Path, replies: list[str]) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: who are you?"},
                          {"role": "assistant", "content": reply}]} for i, reply in enumerate(replies)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_conversations_are_free_text_unless_choices_are_declared(tmp_path):
    """Chat rows whose last replies repeat (a bot's identity answer) are not a closed set of classes under
    `choices: auto`; declared choices still make them classification."""
    path = _write_chats(tmp_path / "chats.jsonl", RATINGS)  # 5 distinct replies over 100 rows
    stats, examples = _prepare(tmp_path, path=str(path))
    assert (stats["answers"]["task"], stats["answers"]["choices"], stats["answers"]["origin"]) == \
        ("instruction_following", None, "default")
    assert stats["answers"]["rule"] == "conversations are free text unless the config declares choices"
    assert all(ex["choices"] is None and ex["metrics"] == ["rougeL", "token_f1"] for ex in examples)
    stats, examples = _prepare(tmp_path, path=str(path), choices=["1", "2", "3", "4", "5"])
    assert (stats["answers"]["task"], stats["answers"]["origin"]) == ("classification", "declared")
    assert all(ex["choices"] == ["1", "2", "3", "4", "5"] for ex in examples)


def test_real_fastchat_conversations_are_free_text(tmp_path, shared_data):
    """FastChat's identity conversations repeat the same few answers; they stay generation tasks."""
    path = shared_data / "conversations" / "fastchat_dummy_conversation.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared data is not on this machine)")
    stats, _ = _prepare(tmp_path, path=str(path), name="fastchat")
    assert stats["answers"]["task"] == "instruction_following" and stats["answers"]["choices"] is None
