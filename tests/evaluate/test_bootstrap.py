"""Tests for instructkit.evaluate.bootstrap: bootstrap intervals and the paired bootstrap."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructkit.evaluate import bootstrap as bs
from instructkit.evaluate import metric_registry as reg
from instructkit.evaluate import metrics as m

# --------------------------------------------------------------------------- fixtures

# 3-class toy problem (worked out in test_metrics.py).
REFS = ["cat", "cat", "cat", "dog", "dog", "bird"]
PREDS = ["cat", "cat", "dog", "dog", "bird", "bird"]


# ---------------------------------------------------------------------------- errors


def test_bootstrap_errors():
    with pytest.raises(ValueError, match="empty input: preds and refs"):
        bs.bootstrap_ci("accuracy", [], [])
    with pytest.raises(ValueError, match="length mismatch"):
        bs.bootstrap_ci("accuracy", ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty input: preds_a and refs"):
        bs.paired_bootstrap_diff("accuracy", [], [], [])
    with pytest.raises(ValueError, match="length mismatch: preds_b has 1 items, refs has 2"):
        bs.paired_bootstrap_diff("accuracy", ["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="n_resamples"):
        bs.bootstrap_ci("accuracy", ["a"], ["a"], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bs.bootstrap_ci("accuracy", ["a"], ["a"], confidence=1.0)


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


@pytest.mark.parametrize("name", sorted(reg.METRICS))
def test_bootstrap_ci_contains_point_and_is_deterministic(name):
    if name in {"accuracy", "macro_f1"}:
        preds, refs = _toy_classification_data()
    else:
        preds, refs = _toy_generation_data()
    point, low, high = bs.bootstrap_ci(name, preds, refs, n_resamples=300, seed=3)
    assert point == pytest.approx(reg.compute(name, preds, refs))
    assert low <= point <= high
    assert low < high
    assert bs.bootstrap_ci(name, preds, refs, n_resamples=300, seed=3) == (point, low, high)


def test_bootstrap_ci_depends_on_seed():
    preds, refs = _toy_generation_data()
    first = bs.bootstrap_ci("token_f1", preds, refs, n_resamples=300, seed=3)
    second = bs.bootstrap_ci("token_f1", preds, refs, n_resamples=300, seed=4)
    assert first[0] == second[0]
    assert first[1:] != second[1:]


def test_bootstrap_ci_single_example_is_degenerate():
    # Corpus metrics and a per-example score strictly inside (0, 1): every resample is the one example.
    for name in ("macro_f1", "bleu", "rouge1"):
        point, low, high = bs.bootstrap_ci(name, ["the cat sat down"], ["the cat sat up"])
        assert low == pytest.approx(point) and high == pytest.approx(point)
    # accuracy 0 on one example: the exact all-wrong interval [0, 1 - 0.025] (lm-evaluation-harness#4070)
    assert bs.bootstrap_ci("accuracy", ["the cat sat down"], ["the cat sat up"]) == (0.0, 0.0, 0.975)


@pytest.mark.parametrize("n", [1, 4, 20, 400])
def test_all_right_or_all_wrong_gets_the_exact_interval_not_a_point(n):
    """EleutherAI/lm-evaluation-harness#4070: at 0 or 100% every resample equals the point, so the percentile
    bootstrap said [1, 1] on 4 examples as on 400. Clopper-Pearson at k = n: lower (0.025) ** (1/n)
    (n = 4: 0.398, n = 20: 0.832, n = 400: 0.9908); at k = 0 its mirror."""
    bound = 0.025 ** (1 / n)
    assert bs.bootstrap_ci("accuracy", ["a"] * n, ["a"] * n) == pytest.approx((1.0, bound, 1.0))
    assert bs.bootstrap_ci("exact_match", ["a"] * n, ["b"] * n) == pytest.approx((0.0, 0.0, 1 - bound))
    assert bs.bootstrap_ci("rougeL", ["the cat"] * n, ["the cat"] * n) == pytest.approx((1.0, bound, 1.0))
    # a cluster bootstrap counts source rows: n examples from 1 row are one unit
    assert bs.bootstrap_ci("accuracy", ["a"] * n, ["a"] * n, clusters=[0] * n) == pytest.approx(
        (1.0, 0.025, 1.0))
    # a corpus metric at 1 keeps its bootstrap interval (no per-example scores to count)
    assert bs.bootstrap_ci("bleu", ["a b c d"] * n, ["a b c d"] * n)[1] == pytest.approx(100.0)


def test_all_or_none_interval_is_clopper_pearson():
    from scipy.stats import binomtest

    for n in (3, 17):
        exact = binomtest(n, n).proportion_ci(0.95, method="exact")
        assert bs.all_or_none_interval(True, n) == pytest.approx((exact.low, exact.high))
        exact = binomtest(0, n).proportion_ci(0.9, method="exact")
        assert bs.all_or_none_interval(False, n, 0.9) == pytest.approx((exact.low, exact.high))
    with pytest.raises(ValueError, match="units must be at least 1"):
        bs.all_or_none_interval(True, 0)


def test_bootstrap_ci_accepts_callable_and_spec():
    preds, refs = PREDS * 5, REFS * 5
    by_name = bs.bootstrap_ci("accuracy", preds, refs, n_resamples=200)
    by_callable = bs.bootstrap_ci(m.accuracy, preds, refs, n_resamples=200)  # looped path
    by_spec = bs.bootstrap_ci(reg.METRICS["accuracy"], preds, refs, n_resamples=200)
    assert by_callable == pytest.approx(by_name)
    assert by_spec == pytest.approx(by_name)


def test_macro_f1_bootstrap_matches_looped_sklearn():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    refs = [labels[i] for i in rng.integers(0, 4, 40)]
    preds = [labels[i] for i in rng.integers(0, 4, 40)]
    fixed = reg.macro_f1_metric(labels)
    vectorised = bs.bootstrap_ci(fixed, preds, refs, n_resamples=100, seed=5)
    looped = bs.bootstrap_ci(fixed.fn, preds, refs, n_resamples=100, seed=5)
    assert vectorised == pytest.approx(looped)


@settings(max_examples=50, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.sampled_from("abcd"), st.sampled_from("abcde")), min_size=1, max_size=25
    ),
    seed=st.integers(0, 2**16),
)
def test_macro_f1_resampler_equals_sklearn_on_each_resample(pairs, seed):
    """Every resample is scored as the metric scores that data: the registry's macro_f1 over the labels of
    the resample's references and predictions, macro_f1_metric over its listed labels among the resample's
    references (a class the resample lacks is left out, not counted 0)."""
    refs = [r for r, _ in pairs]
    preds = [p for _, p in pairs]
    idx = np.random.default_rng(seed).integers(0, len(pairs), size=(5, len(pairs)))
    idx[0] = np.arange(len(pairs))  # identity resample == full data
    got = reg.METRICS["macro_f1"].resampler(preds, refs)(idx)
    fixed = reg.macro_f1_metric(reg.macro_f1_classes(refs, list("abcd")))
    got_fixed = fixed.resampler(preds, refs)(idx)
    for row, value, value_fixed in zip(idx, got, got_fixed):
        sub_p, sub_r = [preds[i] for i in row], [refs[i] for i in row]
        assert value == pytest.approx(m.macro_f1(sub_p, sub_r))
        classes = [c for c in "abcd" if c in sub_r]
        assert value_fixed == pytest.approx(m.macro_f1(sub_p, sub_r, labels=classes))
        assert value_fixed == pytest.approx(fixed.fn(sub_p, sub_r))
    assert got[0] == pytest.approx(m.macro_f1(preds, refs))
    assert got_fixed[0] == pytest.approx(fixed.fn(preds, refs))


def test_macro_f1_interval_of_a_perfect_classifier_with_a_rare_class():
    """Lightning-AI/torchmetrics#300: a class absent from a resample counted F1 = 0, so every answer right
    gave macro-F1 1.0 with the interval [0.67, 1.0] (the resamples missing the 1-in-20 class "c"); each
    resample is perfect, so the interval is [1, 1] as accuracy's is."""
    refs = ["a"] * 10 + ["b"] * 9 + ["c"]
    spec = reg.macro_f1_metric(reg.macro_f1_classes(refs, ["a", "b", "c"]))
    assert bs.bootstrap_ci(spec, refs, refs, n_resamples=500) == (1.0, 1.0, 1.0)
    assert bs.bootstrap_ci("macro_f1", refs, refs, n_resamples=500) == (1.0, 1.0, 1.0)
    # One "c" answered "a": F1(a) = 2*10/21, F1(b) = 1, F1(c) = 0 -> point (20/21 + 1) / 3 = 0.651; a
    # resample without the "c" example (about a third) is perfect: 1.0, where a counted-0 class made it 2/3.
    preds = refs[:-1] + ["a"]
    point, low, high = bs.bootstrap_ci(spec, preds, refs, n_resamples=500)
    assert point == pytest.approx((20 / 21 + 1) / 3)
    assert low < point and high == 1.0


def test_macro_f1_bootstrap_is_fast():
    rng = np.random.default_rng(0)
    labels = [f"class{i}" for i in range(5)]
    refs = [labels[i] for i in rng.integers(0, 5, 200)]
    preds = [labels[i] for i in rng.integers(0, 5, 200)]
    start = time.perf_counter()
    bs.bootstrap_ci("macro_f1", preds, refs, n_resamples=1000)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------ paired bootstrap


def test_paired_identical_predictions():
    preds, refs = _toy_generation_data()
    for name in ("accuracy", "bleu", "macro_f1"):
        out = bs.paired_bootstrap_diff(name, preds, preds, refs, n_resamples=300)
        assert out["delta"] == 0.0
        assert out["low"] == 0.0 and out["high"] == 0.0  # only possible with paired indices
        assert out["p_value"] > 0.2
        assert out["n"] == len(refs)


def test_paired_large_consistent_improvement():
    refs = ["yes"] * 100
    preds_a = ["no"] * 80 + ["yes"] * 20  # accuracy 0.2
    preds_b = ["yes"] * 95 + ["no"] * 5  # accuracy 0.95
    out = bs.paired_bootstrap_diff("accuracy", preds_a, preds_b, refs, n_resamples=1000)
    assert out["delta"] == pytest.approx(0.75)  # metric(b) - metric(a)
    assert 0 < out["low"] <= 0.75 <= out["high"]
    assert out["p_value"] < 0.01
    # swapping the systems flips the sign but not the p-value
    rev = bs.paired_bootstrap_diff("accuracy", preds_b, preds_a, refs, n_resamples=1000)
    assert rev["delta"] == pytest.approx(-0.75)
    assert rev["low"] == pytest.approx(-out["high"]) and rev["high"] == pytest.approx(-out["low"])
    assert rev["p_value"] == out["p_value"]


def test_paired_interval_is_narrower_than_unpaired_for_correlated_systems():
    # b = a except for 10 extra correct answers: paired deltas vary little
    refs = ["y"] * 200
    preds_a = ["y"] * 100 + ["n"] * 100
    preds_b = ["y"] * 110 + ["n"] * 90
    out = bs.paired_bootstrap_diff("accuracy", preds_a, preds_b, refs, n_resamples=500)
    _, lo_a, hi_a = bs.bootstrap_ci("accuracy", preds_a, refs, n_resamples=500)
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
        out = bs.paired_bootstrap_diff(
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


# ------------------------------------------------------------------------ few units


@pytest.mark.parametrize(("n", "floor"), [(1, 1.0), (2, 0.5), (3, 0.25), (5, 0.0625), (6, 0.03125), (7, 0.015625)])
def test_a_paired_p_value_never_beats_the_sign_flip_test_on_few_examples(n, floor):
    """Every example worse (or better) in b: the bootstrap alone said p 0.0 with an interval [-1, -1] on one
    example; no test on n paired examples can go below 2 / 2**n."""
    refs, a, b = ["y"] * n, ["y"] * n, ["n"] * n
    out = bs.paired_bootstrap_diff("accuracy", a, b, refs, n_resamples=500)
    assert out["delta"] == -1.0
    assert out["p_value"] == pytest.approx(floor)
    assert bs.sign_flip_floor(n) == pytest.approx(floor)


def test_the_floor_counts_clusters_not_examples():
    """Ten examples from two source rows: two units, so p is at least 2 / 2**2 (ten examples alone: 2 / 2**10)."""
    refs, a, b = ["y"] * 10, ["y"] * 10, ["n"] * 10
    out = bs.paired_bootstrap_diff("accuracy", a, b, refs, n_resamples=300, clusters=[0] * 5 + [1] * 5)
    assert out["p_value"] == 0.5 and out["n_rows"] == 2


def test_the_floor_leaves_large_samples_alone():
    refs = ["yes"] * 100
    a, b = ["no"] * 80 + ["yes"] * 20, ["yes"] * 95 + ["no"] * 5
    out = bs.paired_bootstrap_diff("accuracy", a, b, refs, n_resamples=1000)
    assert out["p_value"] == pytest.approx(2.0 ** -99)  # the bootstrap's 0.0 (below 2 / 1000), floored


@pytest.mark.parametrize(("n", "significant"), [(1, False), (5, False), (6, True), (40, True)])
def test_a_difference_on_five_or_fewer_examples_is_never_significant(n, significant):
    from instructkit.evaluate.compare import _compare_metrics

    refs = ["y"] * n
    out = _compare_metrics(["accuracy"], None, refs, ["n"] * n, ["y"] * n, n_resamples=300, seed=0)
    delta = out["accuracy"]["delta"]
    assert (delta["low"], delta["high"]) == (1.0, 1.0)  # every resample: +1
    assert delta["significant"] is significant
