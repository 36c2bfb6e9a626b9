"""ROUGE on every script (huggingface/evaluate#256, google/adk-python#3111): rouge-score's default tokenizer
keeps only [a-z0-9], so identical Russian or Chinese texts scored 0 and German "fährt" / "führt" were the
same tokens "f hrt". Expected values are worked out by hand in the comments."""

from __future__ import annotations

import pytest
from rouge_score import tokenizers

from instructkit.evaluate import generation_metrics as gm

ASCII_TEXTS = [
    "The cat sat on the mat.",
    "Running runners ran; it's 2024-05-01 at 10:30am!",
    "snake_case and CamelCase, e-mail: a.b@c.org (x+y)/2 = 3.5%",
    "  tabs\tand\nnewlines\r\n  ",
    "",
    "ALL CAPS generalization operational",
]


@pytest.mark.parametrize("text", ASCII_TEXTS)
def test_ascii_tokens_are_rouge_scores_own(text):
    assert gm._UnicodeTokenizer().tokenize(text) == tokenizers.DefaultTokenizer(use_stemmer=True).tokenize(text)


def test_identical_non_latin_texts_score_one():
    # Before: no tokens on either side -> 0.0 for all four keys.
    for text in ["кошка сидит на коврике", "猫坐在垫子上", "पूर्व प्रधानमन्त्री शिंजो आबेको हत्याले", "สวัสดีครับ"]:
        assert gm.rouge([text], [text]) == {key: pytest.approx(1.0) for key in gm.ROUGE_KEYS}


def test_words_of_other_scripts_by_hand():
    # Russian: 3 of 4 words shared -> P = R = F = 0.75 (before 0.0).
    assert gm.rouge(["кошка сидит на коврике"], ["кошка сидит на полу"])["rouge1"] == pytest.approx(0.75)
    # Chinese, one token per character: 猫 坐 在 垫 子 上 vs 猫 坐 在 地 上, 4 shared ->
    # P = 4/6, R = 4/5, F = 16/22; bigrams 猫坐 坐在 shared: P = 2/5, R = 2/4, F = 4/9 (before 0.0).
    got = gm.rouge(["猫坐在垫子上"], ["猫坐在地上"])
    assert got["rouge1"] == pytest.approx(16 / 22)
    assert got["rouge2"] == pytest.approx(4 / 9)
    # German: "fährt" and "führt" are different words (before: both "f hrt" -> 1.0).
    assert gm.rouge(["fährt"], ["führt"])["rouge1"] == pytest.approx(0.0)
    # A Devanagari vowel sign (a combining mark) stays inside its word: one token, not three pieces.
    assert gm._UnicodeTokenizer().tokenize("पूर्व") == ["पूर्व"]
