"""Tests for instructkit.evaluate.metric_registry.

Expected values are worked out by hand in the comments next to each assertion,
not obtained by running the wrapped libraries on the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from instructkit.evaluate import bootstrap as bs
from instructkit.evaluate import metric_registry as reg
from instructkit.evaluate import metrics as m

# --------------------------------------------------------------------------- fixtures

# 3-class toy problem (as in test_metrics.py).
REFS = ["cat", "cat", "cat", "dog", "dog", "bird"]
PREDS = ["cat", "cat", "dog", "dog", "bird", "bird"]
# Per class (tp / #predicted / #references):
#   cat : tp=2, pred=2, ref=3 -> P=2/2=1,   R=2/3, F1=2*1*(2/3)/(1+2/3) = 4/5
#   dog : tp=1, pred=2, ref=2 -> P=1/2,     R=1/2, F1=1/2
#   bird: tp=1, pred=2, ref=1 -> P=1/2,     R=1,   F1=2*(1/2)*1/(3/2) = 2/3
# macro-F1 = (4/5 + 1/2 + 2/3) / 3 = (24 + 15 + 20) / 30 / 3 = 59/90
MACRO_F1 = 59 / 90


# -------------------------------------------------------------------------- registry


def test_registry_names_and_flags():
    assert set(reg.METRICS) == {
        "accuracy", "macro_f1", "exact_match", "token_f1",
        "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf",
    }  # fmt: skip
    for name, spec in reg.METRICS.items():
        assert spec.name == name
        assert spec.higher_is_better
        assert spec.corpus == (name in {"macro_f1", "bleu", "chrf"})
        assert (spec.per_example is None) == spec.corpus
        assert spec.scale == (100 if name in {"bleu", "chrf"} else 1)


def test_per_example_scores_average_to_metric():
    preds = ["the cat sat", "a dog", "x"]
    refs = ["the cat sat on the mat", "dog", "y"]
    for spec in reg.METRICS.values():
        if spec.per_example is not None:
            scores = spec.per_example(preds, refs)
            assert scores.shape == (3,)
            assert scores.mean() == pytest.approx(spec.fn(preds, refs))


def test_compute_matches_functions():
    assert reg.compute("accuracy", PREDS, REFS) == pytest.approx(4 / 6)
    assert reg.compute("macro_f1", PREDS, REFS) == pytest.approx(MACRO_F1)


def test_metric_spec_requires_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        reg.MetricSpec("bad", m.accuracy)  # neither per_example nor corpus
    with pytest.raises(ValueError, match="exactly one"):
        reg.MetricSpec("bad", m.accuracy, per_example=lambda p, r: np.ones(len(p)), corpus=True)


# ---------------------------------------------------------------------------- errors


def test_unknown_metric_names_metric_and_valid_names():
    with pytest.raises(ValueError, match=r"unknown metric 'bleurt'.*accuracy.*rougeLsum"):
        reg.compute("bleurt", ["a"], ["a"])
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        bs.bootstrap_ci("nope", ["a"], ["a"])
