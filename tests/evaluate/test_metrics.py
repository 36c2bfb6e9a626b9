"""Tests for instructkit.evaluate.metrics.

Expected values are worked out by hand in the comments next to each assertion,
not obtained by running the wrapped libraries on the same inputs.
"""

from __future__ import annotations

import math

import pytest

from instructkit.evaluate import generation_metrics as gm
from instructkit.evaluate import metrics as m

# --------------------------------------------------------------------------- fixtures

# 3-class toy problem.
REFS = ["cat", "cat", "cat", "dog", "dog", "bird"]
PREDS = ["cat", "cat", "dog", "dog", "bird", "bird"]
# Per class (tp / #predicted / #references):
#   cat : tp=2, pred=2, ref=3 -> P=2/2=1,   R=2/3, F1=2*1*(2/3)/(1+2/3) = 4/5
#   dog : tp=1, pred=2, ref=2 -> P=1/2,     R=1/2, F1=1/2
#   bird: tp=1, pred=2, ref=1 -> P=1/2,     R=1,   F1=2*(1/2)*1/(3/2) = 2/3
# macro-F1 = (4/5 + 1/2 + 2/3) / 3 = (24 + 15 + 20) / 30 / 3 = 59/90
MACRO_F1 = 59 / 90


# ------------------------------------------------------------------- classification


def test_accuracy_by_hand():
    # matches at positions 0, 1, 3, 5 -> 4/6
    assert m.accuracy(PREDS, REFS) == pytest.approx(4 / 6)


def test_accuracy_is_exact_string_equality():
    assert m.accuracy(["Cat", "cat "], ["cat", "cat"]) == 0.0


def test_macro_f1_by_hand():
    assert m.macro_f1(PREDS, REFS) == pytest.approx(MACRO_F1)


def test_macro_f1_extra_label_counts_as_zero():
    # "fish" never occurs: F1 = 0 and it joins the average -> (59/30 + 0) / 4
    assert m.macro_f1(PREDS, REFS, labels=["bird", "cat", "dog", "fish"]) == pytest.approx(
        59 / 120
    )


def test_macro_f1_default_labels_include_predicted_only_label():
    # refs {a}, preds {a, b}; a: tp=1, pred=1, ref=2 -> P=1, R=1/2, F1=2/3; b: F1=0
    assert m.macro_f1(["a", "b"], ["a", "a"]) == pytest.approx((2 / 3 + 0) / 2)


def test_per_class_by_hand():
    got = m.per_class(PREDS, REFS)
    assert list(got) == ["bird", "cat", "dog"]
    expected = {
        "cat": (1.0, 2 / 3, 4 / 5, 3),
        "dog": (1 / 2, 1 / 2, 1 / 2, 2),
        "bird": (1 / 2, 1.0, 2 / 3, 1),
    }
    for label, (p, r, f, s) in expected.items():
        assert got[label]["precision"] == pytest.approx(p)
        assert got[label]["recall"] == pytest.approx(r)
        assert got[label]["f1"] == pytest.approx(f)
        assert got[label]["support"] == s


def test_confusion_rows_are_references():
    # ref bird: predicted bird once              -> [1, 0, 0]
    # ref cat : cat twice, dog once              -> [0, 2, 1]
    # ref dog : dog once, bird once              -> [1, 0, 1]
    assert m.confusion(PREDS, REFS, ["bird", "cat", "dog"]) == [[1, 0, 0], [0, 2, 1], [1, 0, 1]]


def test_confusion_ignores_labels_outside_the_set():
    assert m.confusion(["x", "a"], ["a", "a"], ["a"]) == [[1]]


# ------------------------------------------------------------------------- QA metrics


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Cat!", "cat"),
        ("  An   apple. ", "apple"),
        ("a quick, brown-fox", "quick brownfox"),  # punctuation deleted, not spaced
        ("theater", "theater"),  # articles only as whole words
        ("THE", ""),
    ],
)
def test_normalize_answer(raw, normalised):
    assert m.normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("\u201cParis\u201d", "paris"),  # typographic quotes (SQuAD's ASCII set kept them)
        ("Paris\u3002", "paris"),  # ideographic full stop
        ("1990\u20131995", "19901995"),  # en dash deleted as the ASCII hyphen is
        ("\u00bfQu\u00e9 tal?", "qu\u00e9 tal"),  # inverted question mark; letters with accents kept
        ("O\u2019Reilly", "oreilly"),  # right single quote as the ASCII apostrophe
        ("$5 + 3", "5 3"),  # ASCII symbols of string.punctuation still go, as in SQuAD
    ],
)
def test_normalize_answer_deletes_punctuation_of_every_script(raw, normalised):
    # MLQA's PUNCT: string.punctuation plus every Unicode category P* character.
    assert m.normalize_answer(raw) == normalised


def test_exact_match_ignores_typographic_punctuation():
    # Each prediction is its reference with other quotes/dashes/stops: all match -> 1.0; token F1 1.0 too.
    preds = ["\u201cParis\u201d", "Paris\u3002", "O\u2019Reilly", "1990\u20131995"]
    refs = ['"Paris"', "Paris", "O'Reilly", "1990-1995"]
    assert m.exact_match(preds, refs) == 1.0
    assert m.token_f1(preds, refs) == 1.0


def test_exact_match_uses_normalisation():
    # "The Cat!" == "cat", "a dog" == "dog", "Paris" != "London" -> 2/3
    assert m.exact_match(["The Cat!", "a dog", "Paris"], ["cat", "dog", "London"]) == (
        pytest.approx(2 / 3)
    )


def test_token_f1_by_hand():
    preds = ["the cat sat on the mat", "blue red", "x", "x x y"]
    refs = ["a cat sat on a hat", "red", "y", "x y y"]
    # 1: "cat sat on mat" vs "cat sat on hat": 3 common, P=R=3/4, F1=3/4
    # 2: "blue red" vs "red": 1 common, P=1/2, R=1, F1=2/3
    # 3: no overlap -> 0
    # 4: counts x:2,y:1 vs x:1,y:2 -> min overlap 1+1=2, P=R=2/3, F1=2/3
    expected = (3 / 4 + 2 / 3 + 0 + 2 / 3) / 4
    assert m.token_f1(preds, refs) == pytest.approx(expected)


def test_token_f1_empty_answers():
    # SQuAD v2 convention: both empty -> 1, one empty -> 0
    assert m.token_f1(["the", "the"], ["a", "cat"]) == pytest.approx(0.5)


# ------------------------------------------------------------------------ perplexity


def test_perplexity():
    assert m.perplexity(total_nll=math.log(4) * 3, n_tokens=3) == pytest.approx(4.0)
    assert m.perplexity(0.0, 10) == 1.0
    assert m.perplexity(1e6, 1) == math.inf


@pytest.mark.parametrize(("nll", "n"), [(1.0, 0), (-1.0, 3), (float("nan"), 3)])
def test_perplexity_rejects_bad_input(nll, n):
    with pytest.raises(ValueError):
        m.perplexity(nll, n)


# ---------------------------------------------------------------------------- errors


ALL_FUNCTIONS = [
    m.accuracy, m.macro_f1, m.per_class, m.exact_match, m.token_f1, gm.rouge,
    gm.corpus_bleu, gm.sentence_bleu_mean, gm.chrf,
]  # fmt: skip


@pytest.mark.parametrize("fn", ALL_FUNCTIONS, ids=lambda f: f.__name__)
def test_empty_input_raises(fn):
    with pytest.raises(ValueError, match="empty input"):
        fn([], [])


@pytest.mark.parametrize("fn", ALL_FUNCTIONS, ids=lambda f: f.__name__)
def test_length_mismatch_raises(fn):
    with pytest.raises(ValueError, match=r"length mismatch: preds has 2 items, refs has 1"):
        fn(["a", "b"], ["a"])


def test_confusion_errors():
    with pytest.raises(ValueError, match="empty input"):
        m.confusion([], [], ["a"])
    with pytest.raises(ValueError, match="labels is empty"):
        m.confusion(["a"], ["a"], [])


def test_single_string_is_rejected():
    with pytest.raises(TypeError, match="not a single string"):
        m.accuracy("cat", "cat")


def test_token_f1_counts_characters_of_scripts_written_without_spaces():
    # MLQA's mixed segmentation: 北京市 -> 北 京 市 (3 tokens), 北京 -> 北 京 (2); overlap 2:
    # precision 2/3, recall 1 -> F1 = 2 * (2/3) / (2/3 + 1) = 0.8. Whitespace-split it was 0.
    assert m.token_f1(["北京市"], ["北京"]) == pytest.approx(0.8)
    # Thai: 4 characters against 3 of them -> precision 3/4, recall 1 -> F1 6/7.
    assert m.token_f1(["กขคง"], ["กขค"]) == pytest.approx(6 / 7)
    # Mixed text: the Latin word stays one token: {iphone, 手, 机} vs {iphone, 手, 表}: 2/3 each -> 2/3.
    assert m.token_f1(["iPhone手机"], ["iPhone 手表"]) == pytest.approx(2 / 3)
    assert m.normalize_answer("北京。") == "北 京"
    assert m.exact_match(["北 京"], ["北京。"]) == 1.0
