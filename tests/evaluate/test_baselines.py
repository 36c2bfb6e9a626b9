"""Tests for instructkit.evaluate.baselines (no torch)."""

from __future__ import annotations

import random

import pytest

from instructkit.errors import DataError
from instructkit.evaluate import metrics as M
from instructkit.evaluate.baselines import (
    baseline_predictions,
    classification_baselines,
    generation_baselines,
    gold_choice,
    score_baselines,
)
from instructkit.evaluate.main_input import first_sentence, main_inputs

SENTIMENT = ["negative", "neutral", "positive"]
CUES = {
    "negative": ["awful", "broken", "refund", "terrible", "disappointed"],
    "neutral": ["okay", "average", "fine", "ordinary", "acceptable"],
    "positive": ["excellent", "love", "perfect", "wonderful", "delighted"],
}
FILLER = ["the", "product", "arrived", "box", "it", "was", "and", "my", "order", "this"]


def _example(tid: str, label: str, text: str, source: str, *, dataset: str = "shop", task: str = "sentiment",
             choices=SENTIMENT, held_out: bool = False) -> dict:
    return {"prompt": f"Review: {text}\nIs this review negative, neutral or positive?\nAnswer:",
            "completion": f" {label}", "choices": list(choices), "task": task, "template_id": tid,
            "source_id": source, "dataset": dataset, "label": label, "metrics": ["accuracy", "macro_f1"],
            "held_out": held_out}


def _toy_sentiment(n: int, seed: int, tid: str = "shop.sentiment", weights=(1, 1, 1)) -> list[dict]:
    """Separable toy set: each review holds two cue words of its class among filler words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choices(SENTIMENT, weights=weights)[0]
        words = rng.sample(FILLER, 6) + rng.sample(CUES[label], 2)
        rng.shuffle(words)
        out.append(_example(tid, label, " ".join(words), f"{tid}-{seed}-{i}"))
    return out


# ------------------------------------------------------------------ classification


def test_gold_choice_strips_template_space_and_names_culprit():
    assert gold_choice({"completion": " positive", "choices": SENTIMENT}) == "positive"
    assert gold_choice({"completion": "Positive", "choices": SENTIMENT}) == "positive"
    with pytest.raises(DataError, match="shop.sentiment.*'s9'.*'great'"):
        gold_choice({"completion": "great", "choices": SENTIMENT, "template_id": "shop.sentiment",
                     "source_id": "s9"})


def test_majority_is_most_common_training_label():
    train = [_example("t", "positive", "x", str(i)) for i in range(7)]
    train += [_example("t", "negative", "y", f"n{i}") for i in range(3)]
    test = [_example("t", "neutral", "z", f"test{i}") for i in range(4)]
    predictions = classification_baselines(train, test)
    assert predictions["t"]["majority"] == ["positive"] * 4


def test_majority_tie_goes_to_first_listed_choice():
    train = [_example("t", "positive", "x", "1"), _example("t", "neutral", "y", "2")]
    predictions = classification_baselines(train, [_example("t", "negative", "z", "3")])
    assert predictions["t"]["majority"] == ["neutral"]


def test_tfidf_lr_beats_majority_on_separable_toy_set():
    train = _toy_sentiment(150, seed=0, weights=(1, 1, 3))
    test = _toy_sentiment(60, seed=1)
    predictions = classification_baselines(train, test)["shop.sentiment"]
    refs = [gold_choice(e) for e in test]
    majority_f1 = M.macro_f1(predictions["majority"], refs, labels=SENTIMENT)
    tfidf_f1 = M.macro_f1(predictions["tfidf_lr"], refs, labels=SENTIMENT)
    assert set(predictions["majority"]) == {"positive"}
    assert tfidf_f1 > 0.9 > 0.4 > majority_f1


def test_held_out_template_pools_same_dataset_and_task():
    train = _toy_sentiment(90, seed=2)
    test = [dict(e, template_id="shop.sentiment_v2", held_out=True) for e in _toy_sentiment(30, seed=3)]
    result = baseline_predictions(train, test)
    assert set(result.predictions["shop.sentiment_v2"]) == {"majority", "tfidf_lr"}
    assert len(result.predictions["shop.sentiment_v2"]["tfidf_lr"]) == 30
    assert result.references["shop.sentiment_v2"] == [gold_choice(e) for e in test]


def test_template_without_any_training_source_is_skipped_with_reason():
    train = _toy_sentiment(30, seed=4)
    other = [_example("news.topic", "World", "a b", "n1", dataset="news", task="classification",
                      choices=["World", "Sports"])]
    result = baseline_predictions(train, other)
    assert "news.topic" not in result.predictions
    assert "news/classification" in result.skipped["news.topic"]


def test_held_out_training_examples_are_not_used():
    train = [_example("t", "positive", "x", str(i), held_out=True) for i in range(5)]
    train += [_example("t", "negative", "y", "n")]
    predictions = classification_baselines(train, [_example("t", "neutral", "z", "q")])
    assert predictions["t"]["majority"] == ["negative"]
    assert "tfidf_lr" not in predictions["t"]  # one class left: no classifier to fit


def test_no_training_examples_skips_classification_but_not_generation():
    test = _toy_sentiment(5, seed=5) + [
        {"prompt": "Translate into German.\nEnglish: A dog.\nGerman:", "completion": " Ein Hund.",
         "choices": None, "template_id": "mt", "task": "translation", "dataset": "m", "source_id": "1"},
    ]
    result = baseline_predictions(None, test)
    assert "shop.sentiment" in result.skipped and "mt" in result.predictions


# --------------------------------------------------------------------- generation


def test_first_sentence():
    assert first_sentence("The cat sat. Then it left.") == "The cat sat."
    assert first_sentence("#Person1#: Hello there!\n#Person2#: Hi.") == "#Person1#: Hello there!"
    assert first_sentence("one two three four", max_words=2) == "one two"
    assert first_sentence("3.5 percent rise. Shares fell.") == "3.5 percent rise."
    assert first_sentence("Dr. Ann Lee of St. Mary's, i.e. the clinic, spoke. Then left.") == \
        "Dr. Ann Lee of St. Mary's, i.e. the clinic, spoke."  # abbreviations end no sentence


def test_first_sentence_of_scripts_written_without_spaces():
    # A Chinese article has no space after its stops and none between words: it was one sentence of one
    # "word", so the lead baseline was the whole article.
    assert first_sentence("今天天气很好。我们去公园吧！然后回家。") == "今天天气很好。"
    assert first_sentence("ภาษาไทย" * 20, max_words=5) == "ภาษาไ"  # each Thai character a word
    assert first_sentence("中" * 100) == "中" * 40  # LEAD_MAX_WORDS characters
    assert first_sentence("the 中文 words", max_words=3) == "the 中文"
    assert first_sentence("¿Qué tal? Bien.") == "¿Qué tal?"
    assert first_sentence("क्या हाल है। ठीक है।") == "क्या हाल है।"  # Devanagari danda


def _summaries(docs: list[str]) -> list[dict]:
    return [{"prompt": f"Article: {doc}\n\nWhat are the key takeaways from the article above?\nTakeaways:",
             "completion": " x", "choices": None, "template_id": "news.takeaways", "task": "summarization",
             "dataset": "news", "source_id": str(i)} for i, doc in enumerate(docs)]


def test_main_input_removes_shared_template_text():
    docs = ["Storms hit the coast on Monday. Roads were closed.", "Prices rose again. Analysts expect more."]
    assert main_inputs([e["prompt"] for e in _summaries(docs)]) == docs


def test_main_input_cuts_shared_text_at_word_boundaries():
    # the two documents share "The" but not the word: "The cat" / "Then"
    prompts = ["Summarize:\nThe cat sat down.\n\nSummary:", "Summarize:\nThen it rained hard.\n\nSummary:"]
    assert main_inputs(prompts) == ["The cat sat down.", "Then it rained hard."]


def test_main_input_single_prompt_uses_longest_block_without_header():
    prompt = ("Write a short newspaper headline for this sentence:\n"
              "Mayor opens new bridge in town.\n\nHeadline:")
    assert main_inputs([prompt]) == ["Mayor opens new bridge in town."]


def test_lead_sentence_baseline_text():
    docs = ["Storms hit the coast on Monday. Roads were closed.", "Prices rose again. Analysts expect more."]
    predictions = generation_baselines(_summaries(docs))
    leads = ["Storms hit the coast on Monday.", "Prices rose again."]
    assert predictions == {"news.takeaways": {"lead_sentence": leads}}


def test_copy_source_and_title_and_skipped_tasks():
    sources = ["A man rides a red bike.", "Two dogs play in the snow."]
    translation = [{"prompt": f"How would a native speaker say \"{s}\" in German?\nGerman:",
                    "completion": " x", "choices": None, "template_id": "mt.how", "task": "translation",
                    "dataset": "m30k",
                    "source_id": str(i)} for i, s in enumerate(sources)]
    titles = [{"prompt": f"{d}\n\nGive a short label for the topic of this text.\nTopic:", "completion": " x",
               "choices": None, "template_id": "d.topic", "task": "title_generation", "dataset": "d",
               "source_id": str(i)}
              for i, d in enumerate(["one two three four five six seven eight nine ten eleven twelve.",
                                     "Short one."])]
    open_gen = [{"prompt": "Write a poem about the sea.", "completion": " x", "choices": None,
                 "template_id": "gen", "task": "generation", "dataset": "d", "source_id": "0"}]
    predictions = generation_baselines(translation + titles + open_gen)
    assert predictions["mt.how"] == {"copy_source": sources}
    assert predictions["d.topic"] == {"first_10_words": ["one two three four five six seven eight nine ten",
                                                         "Short one."]}
    assert "gen" not in predictions


# ------------------------------------------------------------------------ scoring


def test_score_baselines_with_fixed_label_set():
    train = _toy_sentiment(60, seed=6, weights=(0, 1, 3))  # never "negative" in training
    test = _toy_sentiment(30, seed=7)
    result = baseline_predictions(train, test)
    scores = score_baselines(result, {"shop.sentiment": ["accuracy", "macro_f1", "perplexity"]},
                             labels_by_template={"shop.sentiment": SENTIMENT}, n_resamples=200)
    majority = scores["shop.sentiment"]["majority"]
    refs = result.references["shop.sentiment"]
    assert "perplexity" not in majority  # not a prediction metric
    # macro-F1 averages over all three choices, including the never-predicted "negative"
    expected = M.macro_f1(["positive"] * 30, refs, labels=SENTIMENT)
    assert majority["macro_f1"]["value"] == pytest.approx(expected)
    for metric in majority.values():
        assert metric["low"] <= metric["value"] <= metric["high"]
