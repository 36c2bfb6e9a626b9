"""Issue 19, item 5: every figure is per dataset AND template.

Fine Food is trained with `amazon_fine_food.predict_rating`; a second review file (`all_beauty`,
`held_out: true`) goes through the same schema and template. Its test examples must get their own rows
(eval.json, report.json/md/html, model card), their own n and held-out flag, and their own report
section, never pooled into Fine Food's. The models are scripted (`_bigram.scripted_model`): each prompt's
answer is set by hand, so every figure below is counted by hand.
"""

from __future__ import annotations

import json

import pytest
from _bigram import SCRIPT_SETTINGS, scripted_model

from instructkit.config import EvalConfig
from instructkit.evaluate.compare import model_card_rows
from instructkit.evaluate.evaluator import evaluate_examples
from instructkit.evaluate.report import build_report

TID = "amazon_fine_food.predict_rating"
STARS = ["1", "2", "3", "4", "5"]
FOOD, BEAUTY = f"amazon_fine_food/{TID}", f"all_beauty/{TID}"
# (dataset, held out, reference, base answer, tuned answer); each prompt ends with its own code letter.
ROWS = [
    ("amazon_fine_food", False, "5", "5", "5"),
    ("amazon_fine_food", False, "4", "4", "4"),
    ("amazon_fine_food", False, "1", "1", "1"),
    ("amazon_fine_food", False, "2", "5", "2"),
    ("amazon_fine_food", False, "3", "5", "3"),
    ("all_beauty", True, "5", "5", "5"),
    ("all_beauty", True, "1", "5", "1"),
    ("all_beauty", True, "2", "5", "4"),
]


def held_out_examples() -> list[dict]:
    out = []
    for i, (dataset, held_out, star, _, _) in enumerate(ROWS):
        ex = {"prompt": f"Predict the associated rating for the following review: review {i}. Code {'ABCDEFGH'[i]}",
              "completion": star, "choices": STARS, "label": star, "task": "rating", "template_id": TID,
              "source_id": f"{dataset}:{i}", "dataset": dataset, "metrics": ["accuracy", "macro_f1"]}
        if held_out:
            ex["held_out"] = True
        out.append(ex)
    return out


def train_examples() -> list[dict]:
    return [{"prompt": f"Predict the associated rating for the following review: train {i}.",
             "completion": star, "choices": STARS, "label": star, "task": "rating", "template_id": TID,
             "source_id": f"amazon_fine_food:t{i}", "dataset": "amazon_fine_food",
             "metrics": ["accuracy", "macro_f1"]} for i, star in enumerate("5545531245")]


def evaluate(tokenizer, which: int, examples: list[dict] | None = None, **cfg):
    """Evaluate the scripted base (which=3) or tuned (which=4) model of ROWS."""
    examples = examples or held_out_examples()
    model = scripted_model(tokenizer, {ex["prompt"]: row[which] for ex, row in zip(examples, ROWS)})
    return evaluate_examples(model, tokenizer, examples, SCRIPT_SETTINGS, is_seq2seq=False,
                             cfg=EvalConfig(bootstrap_resamples=200, **cfg), with_perplexity=False)


@pytest.fixture(scope="module")
def evaluations(tiny_tokenizer):
    return evaluate(tiny_tokenizer, 3), evaluate(tiny_tokenizer, 4)


def test_eval_json_has_one_entry_per_dataset_and_template(evaluations):
    base, _ = evaluations
    assert set(base.templates) == {FOOD, BEAUTY}
    food, beauty = base.templates[FOOD], base.templates[BEAUTY]
    assert (food["dataset"], food["template_id"], food["n"], food["held_out"]) == ("amazon_fine_food", TID, 5, False)
    assert (beauty["dataset"], beauty["template_id"], beauty["n"], beauty["held_out"]) == ("all_beauty", TID, 3, True)
    assert [p["prediction"] for p in base.predictions] == [row[3] for row in ROWS]
    assert food["metrics"]["accuracy"]["value"] == pytest.approx(3 / 5)  # Fine Food: 3 of its own 5
    assert beauty["metrics"]["accuracy"]["value"] == pytest.approx(1 / 3)  # held out: 1 of its own 3
    assert set(base.tasks) == {"amazon_fine_food/rating", "all_beauty/rating"}
    assert (base.tasks["all_beauty/rating"]["n"], base.tasks["all_beauty/rating"]["held_out"]) == (3, True)
    assert (base.tasks["amazon_fine_food/rating"]["n"], base.tasks["amazon_fine_food/rating"]["held_out"]) == (
        5, False)


def test_cap_is_per_dataset_and_template(tiny_tokenizer):
    capped = evaluate(tiny_tokenizer, 3, max_examples=2)
    assert {k: v["n"] for k, v in capped.templates.items()} == {FOOD: 2, BEAUTY: 2}


def test_report_and_model_card_have_their_own_rows_and_section(evaluations, tmp_path):
    base, tuned = evaluations
    build_report(base=base.to_json(), tuned=tuned.to_json(), base_predictions=base.predictions,
                 tuned_predictions=tuned.predictions, train_examples=train_examples(), out_dir=tmp_path,
                 n_resamples=200)
    report = json.loads((tmp_path / "report.json").read_text())
    food, beauty = report["templates"][FOOD], report["templates"][BEAUTY]
    assert (food["n"], food["held_out"], food["section"]) == (5, False, "seen")
    assert (beauty["n"], beauty["held_out"], beauty["section"]) == (3, True, "unseen_dataset")
    assert food["metrics"]["accuracy"]["base"]["value"] == pytest.approx(3 / 5)
    assert food["metrics"]["accuracy"]["tuned"]["value"] == pytest.approx(1.0)
    assert beauty["metrics"]["accuracy"]["base"]["value"] == pytest.approx(1 / 3)
    assert beauty["metrics"]["accuracy"]["tuned"]["value"] == pytest.approx(2 / 3)
    assert report["sections"]["unseen_dataset"] == [BEAUTY] and report["sections"]["seen"] == [FOOD]
    assert report["tasks"]["all_beauty/rating"]["n"] == 3 and report["tasks"]["amazon_fine_food/rating"]["n"] == 5
    assert {h["task"]: h["n"] for h in report["headline"]} == {"amazon_fine_food/rating": 5, "all_beauty/rating": 3}
    # Baselines: the held-out dataset is scored on its own 3 examples, trained on the template's examples.
    majority = report["baselines"]["scores"]
    assert majority[BEAUTY]["majority"]["accuracy"]["value"] == pytest.approx(1 / 3)  # always "5"
    assert majority[FOOD]["majority"]["accuracy"]["value"] == pytest.approx(1 / 5)
    markdown = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for text in (markdown, html):
        assert "Generalisation to held-out datasets" in text
    section = markdown.split("## Generalisation to held-out datasets")[1].split("## ")[0]
    assert f"| {BEAUTY} | all_beauty/rating | accuracy | 3 |" in section and FOOD not in section
    rows = {(r["template"], r["metric"]): r for r in model_card_rows(report)}
    assert (rows[(BEAUTY, "accuracy")]["n"], rows[(BEAUTY, "accuracy")]["held_out"]) == (3, True)
    assert (rows[(FOOD, "accuracy")]["n"], rows[(FOOD, "accuracy")]["held_out"]) == (5, False)
    assert rows[(BEAUTY, "accuracy")]["dataset"] == "all_beauty" and rows[(BEAUTY, "accuracy")]["template_id"] == TID


def test_a_template_of_one_dataset_keeps_its_plain_id(tiny_tokenizer):
    """No shared template: the keys stay the template ids (eval.json and the report as before)."""
    examples = [ex for ex in held_out_examples() if ex["dataset"] == "amazon_fine_food"]
    result = evaluate(tiny_tokenizer, 3, examples)
    assert list(result.templates) == [TID] and result.templates[TID]["n"] == 5
