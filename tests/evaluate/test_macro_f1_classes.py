"""Issue 19, item 7: ONE macro-F1 class set, used by the evaluator (eval.json), the report (report.json:
base, tuned, task groups) and the baselines, so the same predictions show the same macro-F1 everywhere.

The class set is `macro_f1_classes`: the answer choices that occur as a reference. The case below has a
class no model predicts ("3") and a class only the base model predicts and no reference has ("5"): the
old definitions averaged the tuned model over {1..4} in eval.json but over {1..5} in report.json.
"""

from __future__ import annotations

import json

import pytest
from _bigram import SCRIPT_SETTINGS, scripted_model
from sklearn.metrics import f1_score

from instructkit.config import EvalConfig
from instructkit.evaluate.baselines import BaselineResult, score_baselines
from instructkit.evaluate.evaluator import evaluate_examples
from instructkit.evaluate.metric_registry import macro_f1_classes
from instructkit.evaluate.report import build_report

TID = "reviews.rating"
STARS = ["1", "2", "3", "4", "5"]
REFS = list("111222333444")
BASE = list("115251125445")  # never "3"; "5" four times, and no reference is "5"
TUNED = list("111224241444")  # never "3", never "5"
# By hand over the classes {1, 2, 3, 4} (F1 = 2 tp / (predicted + referenced)):
#   base : 1: 2*2/(4+3) = 4/7; 2: 2*1/(2+3) = 2/5; 3: 0; 4: 2*2/(2+3) = 4/5
#   tuned: 1: 2*3/(4+3) = 6/7; 2: 2*2/(3+3) = 2/3; 3: 0; 4: 2*3/(5+3) = 3/4
BASE_F1 = (4 / 7 + 2 / 5 + 0 + 4 / 5) / 4
TUNED_F1 = (6 / 7 + 2 / 3 + 0 + 3 / 4) / 4


def examples() -> list[dict]:
    return [{"prompt": f"Rate review {i}. Code {'ABCDEFGHIJKL'[i]}", "completion": ref, "choices": STARS,
             "task": "rating", "template_id": TID, "dataset": "reviews", "source_id": f"reviews:{i}",
             "metrics": ["accuracy", "macro_f1"]} for i, ref in enumerate(REFS)]


def evaluate(tokenizer, answers: list[str]):
    exs = examples()
    model = scripted_model(tokenizer, {ex["prompt"]: a for ex, a in zip(exs, answers)})
    return evaluate_examples(model, tokenizer, exs, SCRIPT_SETTINGS, is_seq2seq=False,
                             cfg=EvalConfig(bootstrap_resamples=200), with_perplexity=False)


def test_class_set_is_the_choices_among_the_references():
    assert macro_f1_classes(REFS, STARS) == ["1", "2", "3", "4"]
    assert macro_f1_classes(["b", "z", "a"], ["a", "b", "c"]) == ["a", "b", "z"]  # choice order, then others
    assert macro_f1_classes(["y", "x", "y"]) == ["x", "y"]


def test_evaluator_report_and_baselines_agree(tiny_tokenizer, tmp_path):
    direct = [f1_score(REFS, p, labels=["1", "2", "3", "4"], average="macro", zero_division=0)
              for p in (BASE, TUNED)]
    assert direct == pytest.approx([BASE_F1, TUNED_F1])
    base, tuned = evaluate(tiny_tokenizer, BASE), evaluate(tiny_tokenizer, TUNED)
    assert [p["prediction"] for p in base.predictions] == BASE
    assert [p["prediction"] for p in tuned.predictions] == TUNED
    # 1. the evaluator (eval.json), per template and per task
    evaluator = [r.templates[TID]["metrics"]["macro_f1"]["value"] for r in (base, tuned)]
    evaluator_task = [r.tasks["reviews/rating"]["metrics"]["macro_f1"]["value"] for r in (base, tuned)]
    # 2. the report (report.json), per template and per task group
    train = [{**ex, "source_id": f"reviews:t{i}"} for i, ex in enumerate(examples())]
    build_report(base=base.to_json(), tuned=tuned.to_json(), base_predictions=base.predictions,
                 tuned_predictions=tuned.predictions, train_examples=train, out_dir=tmp_path, n_resamples=200)
    report = json.loads((tmp_path / "report.json").read_text())
    entry = report["templates"][TID]["metrics"]["macro_f1"]
    task = report["tasks"]["reviews/rating"]["metrics"]["macro_f1"]
    assert report["templates"][TID]["f1_labels"] == ["1", "2", "3", "4"]
    # 3. the baselines, scoring the same predictions as two "baselines"
    scores = score_baselines(BaselineResult(predictions={TID: {"base": BASE, "tuned": TUNED}},
                                            references={TID: REFS}),
                             {TID: ["macro_f1"]}, labels_by_template={TID: STARS}, n_resamples=200)
    baselines = [scores[TID][name]["macro_f1"]["value"] for name in ("base", "tuned")]
    for values in (evaluator, evaluator_task, [entry["base"]["value"], entry["tuned"]["value"]],
                   [task["base"]["value"], task["tuned"]["value"]], baselines):
        assert values == pytest.approx([BASE_F1, TUNED_F1], abs=1e-12)
    # The report's own majority baseline (always "1": 3 of each star in training) over the same classes.
    majority = report["baselines"]["scores"][TID]["majority"]["macro_f1"]["value"]
    assert majority == pytest.approx((2 * 3 / (12 + 3)) / 4)
