"""Issue 19, item 6: a task group pooling k templates rendered from the same source rows is resampled by
ROW (cluster bootstrap), not by example, and reports n as rows and examples.

The decisive case: identical per-row outcomes under 3 templates carry no more information than one
template, so with the same seed the pooled interval must equal the single-template interval (an example
bootstrap narrows it by about sqrt(3)).
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from _bigram import SCRIPT_SETTINGS, scripted_model

from instructkit.config import EvalConfig
from instructkit.evaluate import bootstrap as bs
from instructkit.evaluate.evaluator import evaluate_examples
from instructkit.evaluate.groups import cluster_ids
from instructkit.evaluate.report import build_report

STARS = ["1", "2", "3"]
N_ROWS = 40


def outcomes(seed: int = 0, n: int = N_ROWS) -> tuple[list[str], list[str], list[str]]:
    """refs, base and tuned predictions of n rows (tuned right more often)."""
    rng = random.Random(seed)
    refs = [rng.choice(STARS) for _ in range(n)]
    base = [r if rng.random() < 0.4 else rng.choice(STARS) for r in refs]
    tuned = [r if rng.random() < 0.8 else rng.choice(STARS) for r in refs]
    return refs, base, tuned


# --------------------------------------------------------------------------------------------------
# bootstrap.py
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_three_identical_templates_give_the_single_template_interval(metric):
    refs, base, tuned = outcomes()
    clusters = list(range(N_ROWS)) * 3  # template-major: rows 0..39 under each of 3 templates
    single = bs.bootstrap_ci(metric, tuned, refs, n_resamples=500, seed=7)
    pooled = bs.bootstrap_ci(metric, tuned * 3, refs * 3, n_resamples=500, seed=7, clusters=clusters)
    assert pooled == pytest.approx(single, abs=1e-12)
    single_d = bs.paired_bootstrap_diff(metric, base, tuned, refs, n_resamples=500, seed=7)
    pooled_d = bs.paired_bootstrap_diff(metric, base * 3, tuned * 3, refs * 3, n_resamples=500, seed=7,
                                        clusters=clusters)
    for key in ("delta", "low", "high", "p_value"):
        assert pooled_d[key] == pytest.approx(single_d[key], abs=1e-12)
    assert (pooled_d["n"], pooled_d["n_rows"]) == (3 * N_ROWS, N_ROWS)
    # The example bootstrap (the old behaviour) treats the 120 copies as independent: too narrow.
    naive = bs.bootstrap_ci(metric, tuned * 3, refs * 3, n_resamples=500, seed=7)
    assert (naive[2] - naive[1]) < 0.75 * (single[2] - single[1])  # about 1/sqrt(3) = 0.58


def test_singleton_clusters_draw_exactly_the_example_bootstrap():
    refs, _, tuned = outcomes(seed=3, n=57)
    assert bs.bootstrap_ci("accuracy", tuned, refs, seed=2, clusters=list(range(57))) == bs.bootstrap_ci(
        "accuracy", tuned, refs, seed=2)


def test_every_resample_holds_whole_rows_and_as_many_rows_as_the_data():
    """Rows of 1, 2 and 3 examples (a template that dropped some rows): each resample draws 6 rows with
    replacement and takes ALL examples of each drawn row."""
    sizes = [1, 2, 3, 3, 2, 1]
    clusters = [c for c, k in enumerate(sizes) for _ in range(k)]
    refs = [f"row{c}" for c in clusters]
    seen: list[Counter] = []

    def record(preds, refs_):
        seen.append(Counter(refs_))
        return 0.0

    bs.bootstrap_ci(record, refs, refs, n_resamples=300, seed=1, clusters=clusters)
    resamples = seen[1:]  # the first call is the point estimate on the full data
    assert len(resamples) == 300
    for counts in resamples:
        draws = {row: n / sizes[int(row[3:])] for row, n in counts.items()}
        assert all(d == int(d) for d in draws.values())  # whole rows only
        assert sum(draws.values()) == len(sizes)  # as many rows as the data
    assert len({tuple(sorted(c.items())) for c in resamples}) > 100  # and they do vary


def test_cluster_ids_by_dataset_and_source_row():
    records = [{"template_id": "a.x", "source_id": "s1", "dataset": "d"},
               {"template_id": "a.y", "source_id": "s1", "dataset": "d"},
               {"template_id": "a.x", "source_id": "s1", "dataset": "e"},  # another dataset's row s1
               {"template_id": "a.x", "source_id": None},
               {"template_id": "a.y", "source_id": None},
               {"template_id": "a.y", "source_id": "s2", "dataset": "d"}]
    assert cluster_ids(records) == [0, 0, 1, 2, 3, 4]


def test_bad_clusters_are_refused():
    with pytest.raises(ValueError, match="clusters has 2 items for 3 examples"):
        bs.bootstrap_ci("accuracy", ["a"] * 3, ["a"] * 3, clusters=[0, 1])


# --------------------------------------------------------------------------------------------------
# eval.json (evaluator) and report.json: pooled task groups
# --------------------------------------------------------------------------------------------------


def rows_under_templates(templates: list[str], refs: list[str], answers: list[str]) -> tuple[list, dict]:
    """Examples of each row under each template (template-major) and the scripted answer of each prompt:
    a row's answer is the same under every template (its prompt ends with the answer's code letter)."""
    code = {"1": "A", "2": "B", "3": "C"}
    examples, script = [], {}
    for t in templates:
        for i, (ref, answer) in enumerate(zip(refs, answers)):
            prompt = f"{t} wording: rate review {i}. Code {code[answer]}"
            examples.append({"prompt": prompt, "completion": ref, "choices": STARS, "task": "rating",
                             "template_id": f"reviews.{t}", "dataset": "reviews", "source_id": f"reviews:{i}",
                             "metrics": ["accuracy", "macro_f1"]})
            script[prompt] = answer
    return examples, script


def evaluate(tokenizer, templates: list[str], answers: list[str], refs: list[str]):
    examples, script = rows_under_templates(templates, refs, answers)
    return evaluate_examples(scripted_model(tokenizer, script), tokenizer, examples, SCRIPT_SETTINGS,
                             is_seq2seq=False, cfg=EvalConfig(bootstrap_resamples=400), seed=5,
                             with_perplexity=False)


def test_pooled_task_interval_in_eval_json_and_report(tiny_tokenizer, tmp_path):
    refs, base_answers, tuned_answers = outcomes(seed=11)
    one = ["rate"]
    three = ["rate", "stars", "score"]
    results = {}
    for name, templates in (("one", one), ("three", three)):
        base = evaluate(tiny_tokenizer, templates, base_answers, refs)
        tuned = evaluate(tiny_tokenizer, templates, tuned_answers, refs)
        out = tmp_path / name
        build_report(base=base.to_json(), tuned=tuned.to_json(), base_predictions=base.predictions,
                     tuned_predictions=tuned.predictions, out_dir=out, n_resamples=400, seed=5)
        results[name] = (tuned, json.loads((out / "report.json").read_text()))
    tuned_one, report_one = results["one"]
    tuned_three, report_three = results["three"]
    # eval.json: the pooled task of 3 templates = the single template's figures, n as rows and examples.
    task_one, task_three = tuned_one.tasks["reviews/rating"], tuned_three.tasks["reviews/rating"]
    assert (task_three["n"], task_three["n_rows"]) == (3 * N_ROWS, N_ROWS)
    assert (task_one["n"], task_one["n_rows"]) == (N_ROWS, N_ROWS)
    for metric in ("accuracy", "macro_f1"):
        assert task_three["metrics"][metric] == pytest.approx(task_one["metrics"][metric], abs=1e-12)
    # report.json: the same for base, tuned and the paired delta.
    entry_one, entry_three = report_one["tasks"]["reviews/rating"], report_three["tasks"]["reviews/rating"]
    assert (entry_three["n"], entry_three["n_rows"]) == (3 * N_ROWS, N_ROWS)
    for metric in ("accuracy", "macro_f1"):
        for side in ("base", "tuned"):
            assert entry_three["metrics"][metric][side] == pytest.approx(entry_one["metrics"][metric][side],
                                                                         abs=1e-12)
        for key in ("delta", "low", "high", "p_value"):
            assert entry_three["metrics"][metric]["delta"][key] == pytest.approx(
                entry_one["metrics"][metric]["delta"][key], abs=1e-12)
    # McNemar assumes independent pairs: given per template, not for the pooled rows.
    assert entry_one["metrics"]["accuracy"]["delta"]["mcnemar_p"] is not None
    assert entry_three["metrics"]["accuracy"]["delta"]["mcnemar_p"] is None
    [row] = report_three["headline"]
    assert (row["n"], row["n_rows"]) == (3 * N_ROWS, N_ROWS)
    markdown = (tmp_path / "three" / "report.md").read_text()
    assert f"{N_ROWS} rows ({3 * N_ROWS} examples)" in markdown
    assert np.isclose(entry_three["metrics"]["accuracy"]["tuned"]["value"],
                      np.mean([a == r for a, r in zip(tuned_answers, refs)]))
