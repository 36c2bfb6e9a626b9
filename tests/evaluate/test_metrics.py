"""Tests for instructkit.evaluate.metrics.

Expected values are worked out by hand in the comments next to each assertion,
not obtained by running the wrapped libraries on the same inputs.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------------------------ ROUGE


def test_rouge_by_hand():
    preds = ["the cat sat on the mat", "the cat sat"]
    refs = ["the cat lay on the mat", "the cat sat on the mat"]
    # (all tokens <= 3 chars, so the stemmer leaves them alone)
    # Example 1 (6 vs 6 tokens):
    #   rouge1: clipped unigram overlap the:2 cat on mat = 5 -> P=R=5/6, F=5/6
    #   rouge2: pred bigrams the-cat cat-sat sat-on on-the the-mat, shared with ref:
    #           the-cat on-the the-mat = 3 of 5 -> F=3/5
    #   rougeL: LCS "the cat on the mat" = 5 -> F=5/6
    # Example 2 (3 vs 6 tokens):
    #   rouge1: overlap 3 -> P=1, R=1/2, F=2/3
    #   rouge2: 2 of 2 pred bigrams, ref has 5 -> P=1, R=2/5, F=2*(2/5)/(7/5)=4/7
    #   rougeL: LCS 3 -> F=2/3
    got = m.rouge(preds, refs)
    assert set(got) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert got["rouge1"] == pytest.approx((5 / 6 + 2 / 3) / 2)
    assert got["rouge2"] == pytest.approx((3 / 5 + 4 / 7) / 2)
    assert got["rougeL"] == pytest.approx((5 / 6 + 2 / 3) / 2)
    # no newlines: each text is a single sentence, so rougeLsum == rougeL
    assert got["rougeLsum"] == pytest.approx(got["rougeL"])
    for key in got:
        assert m.compute(key, preds, refs) == pytest.approx(got[key])


def test_rouge_stemming():
    # Porter stemmer maps "running" -> "run" (tokens > 3 chars are stemmed), so the
    # unigrams match: F=1. Unstemmed they would share nothing (F=0).
    assert m.rouge(["running"], ["run"])["rouge1"] == pytest.approx(1.0)
    # Irregular forms are not conflated by the stemmer.
    assert m.rouge(["ran"], ["run"])["rouge1"] == pytest.approx(0.0)


def test_rouge_lsum_splits_on_newlines():
    pred = "dog ran\ncat sat"
    ref = "cat sat\ndog ran"
    # rougeL (newline = whitespace): ref "cat sat dog ran" vs pred "dog ran cat sat";
    #   LCS = 2 ("cat sat" or "dog ran") -> P=R=2/4, F=1/2
    # rougeLsum: ref sentences {cat sat}, {dog ran}; pred sentences {dog ran}, {cat sat}.
    #   union-LCS of "cat sat" with the pred sentences = {cat, sat} (2 hits),
    #   of "dog ran" = {dog, ran} (2 hits) -> 4 hits of 4 -> P=R=1, F=1
    got = m.rouge([pred], [ref])
    assert got["rougeL"] == pytest.approx(0.5)
    assert got["rougeLsum"] == pytest.approx(1.0)
    assert got["rouge1"] == pytest.approx(1.0)


# ----------------------------------------------------------------------- BLEU / chrF

BLEU_PREDS = ["the quick brown fox jumps over the lazy dog", "hello there"]
BLEU_REFS = ["the quick brown fox jumps over the lazy dog", "hello now friend"]


def test_corpus_bleu_by_hand():
    # Summed n-gram counts: sentence 1 is a 9-token exact match (9, 8, 7, 6 n-grams),
    # sentence 2 has 2 tokens, 1 matching unigram, 1 bigram (no match), no 3/4-grams.
    #   p1 = 10/11, p2 = 8/9, p3 = 7/7, p4 = 6/6
    #   hyp length 11 < ref length 12 -> BP = exp(1 - 12/11)
    expected = 100 * math.exp(1 - 12 / 11) * (10 / 11 * 8 / 9 * 1 * 1) ** 0.25
    assert m.corpus_bleu(BLEU_PREDS, BLEU_REFS) == pytest.approx(expected)


def test_sentence_bleu_mean_by_hand_and_differs_from_corpus_bleu():
    # Sentence 1: perfect -> 100.
    # Sentence 2: effective order 2 (no 3-grams in the hypothesis);
    #   p1 = 1/2 -> 50; p2 = 0/1, exp smoothing -> 100 / (2 * 1) = 50;
    #   BP = exp(1 - 3/2); BLEU = exp(-1/2) * sqrt(50 * 50) = 50 exp(-1/2)
    expected = (100 + 50 * math.exp(-0.5)) / 2  # ~65.2
    mean = m.sentence_bleu_mean(BLEU_PREDS, BLEU_REFS)
    assert mean == pytest.approx(expected)
    assert mean < m.corpus_bleu(BLEU_PREDS, BLEU_REFS) - 10  # corpus ~86.6


def test_bleu_perfect_match_is_100():
    sents = ["the quick brown fox jumps", "over the lazy dog again"]
    assert m.corpus_bleu(sents, sents) == pytest.approx(100.0)
    assert m.sentence_bleu_mean(sents, sents) == pytest.approx(100.0)
    assert m.compute("bleu", sents, sents) == pytest.approx(100.0)


def test_chrf_identical_is_100():
    sents = ["Ein kleiner Test.", "another sentence here"]
    assert m.chrf(sents, sents) == pytest.approx(100.0)


def test_sacrebleu_resampler_reproduces_corpus_scores():
    # bootstrap fast path: identity resample == full-corpus score
    idx = np.arange(len(BLEU_PREDS))[None, :]
    for name, fn in (("bleu", m.corpus_bleu), ("chrf", m.chrf)):
        resample = m.METRICS[name].resampler(BLEU_PREDS, BLEU_REFS)
        assert resample(idx)[0] == pytest.approx(fn(BLEU_PREDS, BLEU_REFS))
    # a resample repeating sentence 2 twice == corpus BLEU of that duplicated corpus
    resample = m.METRICS["bleu"].resampler(BLEU_PREDS, BLEU_REFS)
    dup = [0, 1, 1]
    assert resample(np.array([dup]))[0] == pytest.approx(
        m.corpus_bleu([BLEU_PREDS[i] for i in dup], [BLEU_REFS[i] for i in dup])
    )


# ------------------------------------------------------------------------ perplexity


def test_perplexity():
    assert m.perplexity(total_nll=math.log(4) * 3, n_tokens=3) == pytest.approx(4.0)
    assert m.perplexity(0.0, 10) == 1.0
    assert m.perplexity(1e6, 1) == math.inf


@pytest.mark.parametrize(("nll", "n"), [(1.0, 0), (-1.0, 3), (float("nan"), 3)])
def test_perplexity_rejects_bad_input(nll, n):
    with pytest.raises(ValueError):
        m.perplexity(nll, n)


# -------------------------------------------------------------------------- registry


def test_registry_names_and_flags():
    assert set(m.METRICS) == {
        "accuracy", "macro_f1", "exact_match", "token_f1",
        "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf",
    }  # fmt: skip
    for name, spec in m.METRICS.items():
        assert spec.name == name
        assert spec.higher_is_better
        assert spec.corpus == (name in {"macro_f1", "bleu", "chrf"})
        assert (spec.per_example is None) == spec.corpus
        assert spec.scale == (100 if name in {"bleu", "chrf"} else 1)


def test_per_example_scores_average_to_metric():
    preds = ["the cat sat", "a dog", "x"]
    refs = ["the cat sat on the mat", "dog", "y"]
    for spec in m.METRICS.values():
        if spec.per_example is not None:
            scores = spec.per_example(preds, refs)
            assert scores.shape == (3,)
            assert scores.mean() == pytest.approx(spec.fn(preds, refs))


def test_compute_matches_functions():
    assert m.compute("accuracy", PREDS, REFS) == pytest.approx(4 / 6)
    assert m.compute("macro_f1", PREDS, REFS) == pytest.approx(MACRO_F1)


def test_metric_spec_requires_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        m.MetricSpec("bad", m.accuracy)  # neither per_example nor corpus
    with pytest.raises(ValueError, match="exactly one"):
        m.MetricSpec("bad", m.accuracy, per_example=lambda p, r: np.ones(len(p)), corpus=True)


# ---------------------------------------------------------------------------- errors


def test_unknown_metric_names_metric_and_valid_names():
    with pytest.raises(ValueError, match=r"unknown metric 'bleurt'.*accuracy.*rougeLsum"):
        m.compute("bleurt", ["a"], ["a"])
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        m.bootstrap_ci("nope", ["a"], ["a"])


ALL_FUNCTIONS = [
    m.accuracy, m.macro_f1, m.per_class, m.exact_match, m.token_f1, m.rouge,
    m.corpus_bleu, m.sentence_bleu_mean, m.chrf,
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


def test_bootstrap_errors():
    with pytest.raises(ValueError, match="empty input: preds and refs"):
        m.bootstrap_ci("accuracy", [], [])
    with pytest.raises(ValueError, match="length mismatch"):
        m.bootstrap_ci("accuracy", ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty input: preds_a and refs"):
        m.paired_bootstrap_diff("accuracy", [], [], [])
    with pytest.raises(ValueError, match="length mismatch: preds_b has 1 items, refs has 2"):
        m.paired_bootstrap_diff("accuracy", ["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="n_resamples"):
        m.bootstrap_ci("accuracy", ["a"], ["a"], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        m.bootstrap_ci("accuracy", ["a"], ["a"], confidence=1.0)


# ------------------------------------------------------------------------- bootstrap


def _toy_generation_data(n: int = 60, seed: int = 1) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    words = ["cat", "dog", "sat", "on", "the", "mat", "ran", "fast", "home", "red"]
    refs, preds = [], []
    for _ in range(n):
        ref = list(rng.choice(words, size=6))
        pred = [w if rng.random() < 0.7 else str(rng.choice(words)) for w in ref]
        refs.append(" ".join(ref))
        preds.append(" ".join(pred))
    return preds, refs


def _toy_classification_data(n: int = 60, seed: int = 1) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    labels = ["pos", "neg", "neutral"]
    refs = [labels[i] for i in rng.integers(0, 3, n)]
    preds = [r if rng.random() < 0.7 else labels[rng.integers(0, 3)] for r in refs]
    return preds, refs


@pytest.mark.parametrize("name", sorted(m.METRICS))
def test_bootstrap_ci_contains_point_and_is_deterministic(name):
    if name in {"accuracy", "macro_f1"}:
        preds, refs = _toy_classification_data()
    else:
        preds, refs = _toy_generation_data()
    point, low, high = m.bootstrap_ci(name, preds, refs, n_resamples=300, seed=3)
    assert point == pytest.approx(m.compute(name, preds, refs))
    assert low <= point <= high
    assert low < high
    assert m.bootstrap_ci(name, preds, refs, n_resamples=300, seed=3) == (point, low, high)


def test_bootstrap_ci_depends_on_seed():
    preds, refs = _toy_generation_data()
    first = m.bootstrap_ci("token_f1", preds, refs, n_resamples=300, seed=3)
    second = m.bootstrap_ci("token_f1", preds, refs, n_resamples=300, seed=4)
    assert first[0] == second[0]
    assert first[1:] != second[1:]


def test_bootstrap_ci_single_example_is_degenerate():
    for name in ("accuracy", "macro_f1", "bleu", "rouge1"):
        point, low, high = m.bootstrap_ci(name, ["the cat sat down"], ["the cat sat up"])
        assert low == pytest.approx(point) and high == pytest.approx(point)


def test_bootstrap_ci_accepts_callable_and_spec():
    preds, refs = PREDS * 5, REFS * 5
    by_name = m.bootstrap_ci("accuracy", preds, refs, n_resamples=200)
    by_callable = m.bootstrap_ci(m.accuracy, preds, refs, n_resamples=200)  # looped path
    by_spec = m.bootstrap_ci(m.METRICS["accuracy"], preds, refs, n_resamples=200)
    assert by_callable == pytest.approx(by_name)
    assert by_spec == pytest.approx(by_name)


def test_macro_f1_bootstrap_matches_looped_sklearn():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    refs = [labels[i] for i in rng.integers(0, 4, 40)]
    preds = [labels[i] for i in rng.integers(0, 4, 40)]
    fixed = m.macro_f1_metric(labels)
    vectorised = m.bootstrap_ci(fixed, preds, refs, n_resamples=100, seed=5)
    looped = m.bootstrap_ci(fixed.fn, preds, refs, n_resamples=100, seed=5)
    assert vectorised == pytest.approx(looped)


@settings(max_examples=50, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.sampled_from("abcd"), st.sampled_from("abcde")), min_size=1, max_size=25
    ),
    seed=st.integers(0, 2**16),
)
def test_macro_f1_resampler_equals_sklearn_on_each_resample(pairs, seed):
    refs = [r for r, _ in pairs]
    preds = [p for _, p in pairs]
    labels = sorted(set(refs) | set(preds))
    idx = np.random.default_rng(seed).integers(0, len(pairs), size=(5, len(pairs)))
    idx[0] = np.arange(len(pairs))  # identity resample == full data
    got = m.METRICS["macro_f1"].resampler(preds, refs)(idx)
    for row, value in zip(idx, got):
        sub_p, sub_r = [preds[i] for i in row], [refs[i] for i in row]
        assert value == pytest.approx(m.macro_f1(sub_p, sub_r, labels=labels))
    assert got[0] == pytest.approx(m.macro_f1(preds, refs))


def test_macro_f1_bootstrap_is_fast():
    rng = np.random.default_rng(0)
    labels = [f"class{i}" for i in range(5)]
    refs = [labels[i] for i in rng.integers(0, 5, 200)]
    preds = [labels[i] for i in rng.integers(0, 5, 200)]
    start = time.perf_counter()
    m.bootstrap_ci("macro_f1", preds, refs, n_resamples=1000)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------ paired bootstrap


def test_paired_identical_predictions():
    preds, refs = _toy_generation_data()
    for name in ("accuracy", "bleu", "macro_f1"):
        out = m.paired_bootstrap_diff(name, preds, preds, refs, n_resamples=300)
        assert out["delta"] == 0.0
        assert out["low"] == 0.0 and out["high"] == 0.0  # only possible with paired indices
        assert out["p_value"] > 0.2
        assert out["n"] == len(refs)


def test_paired_large_consistent_improvement():
    refs = ["yes"] * 100
    preds_a = ["no"] * 80 + ["yes"] * 20  # accuracy 0.2
    preds_b = ["yes"] * 95 + ["no"] * 5  # accuracy 0.95
    out = m.paired_bootstrap_diff("accuracy", preds_a, preds_b, refs, n_resamples=1000)
    assert out["delta"] == pytest.approx(0.75)  # metric(b) - metric(a)
    assert 0 < out["low"] <= 0.75 <= out["high"]
    assert out["p_value"] < 0.01
    # swapping the systems flips the sign but not the p-value
    rev = m.paired_bootstrap_diff("accuracy", preds_b, preds_a, refs, n_resamples=1000)
    assert rev["delta"] == pytest.approx(-0.75)
    assert rev["low"] == pytest.approx(-out["high"]) and rev["high"] == pytest.approx(-out["low"])
    assert rev["p_value"] == out["p_value"]


def test_paired_interval_is_narrower_than_unpaired_for_correlated_systems():
    # b = a except for 10 extra correct answers: paired deltas vary little
    refs = ["y"] * 200
    preds_a = ["y"] * 100 + ["n"] * 100
    preds_b = ["y"] * 110 + ["n"] * 90
    out = m.paired_bootstrap_diff("accuracy", preds_a, preds_b, refs, n_resamples=500)
    _, lo_a, hi_a = m.bootstrap_ci("accuracy", preds_a, refs, n_resamples=500)
    assert out["high"] - out["low"] < (hi_a - lo_a) / 2


# Joint distribution of (A correct, B correct): correlated errors, true accuracies
# P(A) = 0.55 + 0.05 = 0.60 and P(B) = 0.55 + 0.15 = 0.70, true difference 0.10.
_JOINT = {(1, 1): 0.55, (1, 0): 0.05, (0, 1): 0.15, (0, 0): 0.25}
TRUE_DIFF = 0.10


def _paired_coverage(n_trials: int, n_examples: int, n_resamples: int, seed: int) -> float:
    """Fraction of simulated datasets whose paired 95% interval covers TRUE_DIFF."""
    rng = np.random.default_rng(seed)
    outcomes = list(_JOINT)
    cells = rng.choice(len(outcomes), p=list(_JOINT.values()), size=(n_trials, n_examples))
    correct = np.array(outcomes)[cells]  # (trials, examples, 2)
    refs = ["gold"] * n_examples
    covered = 0
    for trial in range(n_trials):
        a = ["gold" if c else "wrong" for c in correct[trial, :, 0]]
        b = ["gold" if c else "wrong" for c in correct[trial, :, 1]]
        out = m.paired_bootstrap_diff(
            "accuracy", a, b, refs, n_resamples=n_resamples, seed=trial
        )
        covered += out["low"] <= TRUE_DIFF <= out["high"]
    return covered / n_trials


def test_paired_bootstrap_coverage_simulation():
    coverage = _paired_coverage(n_trials=200, n_examples=200, n_resamples=500, seed=0)
    assert 0.90 <= coverage <= 0.99


@pytest.mark.slow
def test_paired_bootstrap_coverage_simulation_large():
    coverage = _paired_coverage(n_trials=2000, n_examples=300, n_resamples=1000, seed=1)
    # binomial s.e. at 2000 trials ~0.005
    assert 0.93 <= coverage <= 0.965
