"""Issue 19, item 8: the exact McNemar p-value beside the paired bootstrap for accuracy deltas.

Checked against scipy's exact binomial test on the discordant pairs, by hand, in report.json, and by
simulation: on 1,000 seeded null datasets (both systems equally accurate) the tests reject at 4-6% at
alpha 0.05.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from instructkit.evaluate import bootstrap as bs
from instructkit.evaluate.report import build_report

ALPHA = 0.05


def test_mcnemar_exact_by_hand_and_against_scipy_binomtest():
    # 1 pair only a is right, 9 only b: p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    a = [1] + [0] * 9 + [1] * 5 + [0] * 3
    b = [0] + [1] * 9 + [1] * 5 + [0] * 3
    out = bs.mcnemar_exact(a, b)
    assert (out["a_only"], out["b_only"]) == (1, 9)
    assert out["p_value"] == pytest.approx(22 / 1024, rel=1e-12)
    assert bs.mcnemar_exact([1, 0, 1], [1, 0, 1])["p_value"] == 1.0  # no discordant pair
    for a_only, b_only in [(0, 1), (3, 3), (4, 5), (10, 30), (70, 41), (500, 560)]:
        x = [True] * a_only + [False] * b_only
        y = [False] * a_only + [True] * b_only
        want = binomtest(b_only, a_only + b_only, 0.5).pvalue
        assert bs.mcnemar_exact(x, y)["p_value"] == pytest.approx(want, rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError, match="equally long"):
        bs.mcnemar_exact([1, 0], [1])


def null_outcomes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired right/wrong of two equally accurate systems (55%): both right 0.30, only a 0.25, only b 0.25,
    both wrong 0.20."""
    u = rng.random(n)
    return u < 0.55, (u < 0.30) | ((u >= 0.55) & (u < 0.80))


def test_mcnemar_rejects_4_to_6_percent_of_null_datasets():
    rng = np.random.default_rng(0)
    p_values = np.array([bs.mcnemar_exact(*null_outcomes(rng, 4000))["p_value"] for _ in range(1000)])
    rate = float(np.mean(p_values < ALPHA))
    assert 0.04 <= rate <= 0.06, rate
    # The exact test's true size here (discordant count m ~ Bin(4000, 1/2), about 2000): slightly under
    # alpha, as an exact test of a discrete statistic is; the simulation's standard error is 0.7 points.
    ms = np.arange(1800, 2201)
    size = 0.0
    for m, weight in zip(ms, binom.pmf(ms, 4000, 0.5)):
        ks = np.arange(m + 1)
        rejects = 2 * binom.cdf(np.minimum(ks, m - ks), m, 0.5) < ALPHA
        size += weight * binom.pmf(ks, m, 0.5)[rejects].sum()
    assert 0.045 <= size <= 0.05, size


@pytest.mark.slow
def test_paired_bootstrap_rejects_4_to_6_percent_of_null_datasets():
    """The report's other test, the paired bootstrap (1000 resamples, CI excludes 0), on 1,000 null
    datasets of 200 examples (about 20 s)."""
    rng = np.random.default_rng(0)
    rejected = 0
    for i in range(1000):
        a, b = null_outcomes(rng, 200)
        d = bs.paired_bootstrap_diff("accuracy", np.where(a, "y", "n").tolist(), np.where(b, "y", "n").tolist(),
                                     ["y"] * 200, n_resamples=1000, seed=i)
        rejected += d["low"] > 0 or d["high"] < 0
    assert 0.04 <= rejected / 1000 <= 0.06, rejected


def test_report_gives_mcnemar_beside_the_bootstrap_for_accuracy(tmp_path):
    """40 examples: both right 20, only base 3, only tuned 12, both wrong 5."""
    cells = ["both"] * 20 + ["base"] * 3 + ["tuned"] * 12 + ["none"] * 5
    base, tuned = [], []
    for i, cell in enumerate(cells):
        common = {"index": i, "template_id": "t.x", "source_id": f"d:{i}", "dataset": "d", "task": "sentiment",
                  "prompt": f"p{i}", "reference": "yes", "choice_logprobs": {"yes": -1.0, "no": -2.0}}
        base.append({**common, "prediction": "yes" if cell in ("both", "base") else "no"})
        tuned.append({**common, "prediction": "yes" if cell in ("both", "tuned") else "no"})
    evaluation = {"model": "m", "split": "test", "templates": {}, "tasks": {}}
    build_report(base=evaluation, tuned=evaluation, base_predictions=base, tuned_predictions=tuned,
                 out_dir=tmp_path, n_resamples=300)
    report = json.loads((tmp_path / "report.json").read_text())
    delta = report["templates"]["t.x"]["metrics"]["accuracy"]["delta"]
    assert (delta["base_only"], delta["tuned_only"]) == (3, 12)
    assert delta["mcnemar_p"] == pytest.approx(binomtest(12, 15, 0.5).pvalue)  # 2 * P(X <= 3 | 15) = 0.0352
    assert delta["mcnemar_p"] == pytest.approx(2 * sum(binom.pmf(k, 15, 0.5) for k in range(4)))
    assert "p_value" in delta  # the bootstrap's, beside it
    assert "mcnemar_p" not in report["templates"]["t.x"]["metrics"]["macro_f1"]["delta"]
    markdown = (tmp_path / "report.md").read_text()
    assert "p McNemar" in markdown and f"{delta['mcnemar_p']:.3f}" in markdown
