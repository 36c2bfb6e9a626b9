"""Tests for instructkit.evaluate.report: synthetic eval.json dicts and predictions, no models.

The synthetic evaluation has four templates:

* ``reviews.rating``        seen choice template (1-5 stars): base answers "5" to everything,
  tuned is right on 50 of 60 examples;
* ``reviews.rating_unseen`` held-out wording of the same task (generalisation section);
* ``news.headline``         seen generation template (title_generation, rougeL);
* ``mt.en_de``              translation task with no training example at all (forgetting check).
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from instructkit.errors import DataError
from instructkit.evaluate import generation_metrics as M
from instructkit.evaluate.compare import model_card_rows
from instructkit.evaluate.pairing import align_predictions
from instructkit.evaluate.report import build_report

N_RESAMPLES = 200  # enough for interval checks; keeps the module fast
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STARS = ["1", "2", "3", "4", "5"]
WORDS = ["great", "awful", "fine", "broken", "lovely", "slow", "fast", "cheap", "sturdy", "soft"]


# ------------------------------------------------------------------ synthetic data


def _review(rng: random.Random, star: str) -> str:
    return f"{' '.join(rng.choice(WORDS) for _ in range(6))} stars{star} review."


def _rating_records(
    tid: str, n: int, n_right: int, held_out: bool, seed: int
) -> tuple[list[dict], list[dict]]:
    """Base always says "5"; tuned is right on the first ``n_right`` and says "1" elsewhere."""
    rng = random.Random(seed)
    base, tuned = [], []
    for i in range(n):
        star = STARS[i % 5]
        common = {
            "index": i, "template_id": tid, "source_id": f"r{i}", "dataset": "reviews", "task": "rating",
            "prompt": f"Predict the rating: {_review(rng, star)}\nRating:", "reference": star,
            "held_out": held_out,
        }
        tuned_pred = star if i < n_right else ("1" if star != "1" else "2")
        base.append({**common, "prediction": "5", "correct": star == "5",
                     "choice_logprobs": {s: (-0.1 if s == "5" else -3.0) for s in STARS}})
        tuned.append({**common, "prediction": tuned_pred, "correct": tuned_pred == star,
                      "choice_logprobs": {s: (-0.1 if s == tuned_pred else -3.0) for s in STARS}})
    return base, tuned


HEADLINES = ["council approves new budget", "storm closes coastal roads", "team wins league title",
             "prices rise for third month", "museum reopens after repairs"]


OPENERS = ["Officials said", "Reports say", "On Monday"]
CLOSERS = ["More later.", "Details follow.", "Nobody was hurt.", "Reaction was mixed."]


def _headline_records(n: int) -> tuple[list[dict], list[dict]]:
    base, tuned = [], []
    for i in range(n):
        ref = HEADLINES[i % len(HEADLINES)]
        common = {"index": 100 + i, "template_id": "news.headline", "source_id": f"n{i}", "dataset": "news",
                  "task": "title_generation", "reference": ref, "held_out": False,
                  "prompt": f"Write a headline for this story:\n{OPENERS[i % 3]} the {ref} today. "
                            f"{CLOSERS[i % 4]}\n\nHeadline:"}
        base.append({**common, "prediction": "Officials said the news today"})
        tuned.append({**common, "prediction": ref if i % 4 else "news today"})
    return base, tuned


def _translation_records(n: int) -> tuple[list[dict], list[dict]]:
    base, tuned = [], []
    for i in range(n):
        common = {"index": 200 + i, "template_id": "mt.en_de", "source_id": f"m{i}", "dataset": "multi30k",
                  "task": "translation", "reference": f"Ein Hund läuft im Park {i}.", "held_out": True,
                  "prompt": f"Translate into German.\nEnglish: A dog runs in the park {i}.\nGerman:"}
        base.append({**common, "prediction": f"Ein Hund läuft im Park {i}." if i % 3 else "A dog runs."})
        tuned.append({**common, "prediction": f"Ein Hund rennt {i}." if i % 2 else "Hund."})
    return base, tuned


def _eval_json(model: str, templates: dict[str, dict]) -> dict:
    return {"model": model, "split": "test", "n": 0, "k_shot": 0, "templates": templates, "tasks": {}}


def _template_eval(dataset: str, task: str, held_out: bool, metrics: list[str], prompt_tokens: float) -> dict:
    return {"dataset": dataset, "task": task, "held_out": held_out, "n": 0,
            "metrics": {m: {"value": 0.0, "low": 0.0, "high": 0.0} for m in metrics},
            "perplexity": 3.5, "mean_prompt_tokens": prompt_tokens, "unparseable": 0}


def _train_examples() -> list[dict]:
    rng = random.Random(7)
    out = []
    for i in range(100):
        star = STARS[i % 5]
        out.append({"prompt": f"Predict the rating: {_review(rng, star)}\nRating:", "completion": f" {star}",
                    "choices": STARS, "task": "rating", "template_id": "reviews.rating", "source_id": f"t{i}",
                    "dataset": "reviews", "label": int(star), "metrics": ["accuracy", "macro_f1"]})
    for i in range(10):
        ref = HEADLINES[i % len(HEADLINES)]
        out.append({"prompt": f"Write a headline for this story:\nOfficials said the {ref}.\n\nHeadline:",
                    "completion": f" {ref}", "choices": None, "task": "title_generation",
                    "template_id": "news.headline", "source_id": f"h{i}", "dataset": "news", "label": None,
                    "metrics": ["rougeL"]})
    return out


def synthetic_evaluation() -> dict:
    """Base and tuned eval.json dicts, predictions, a few-shot evaluation and training examples."""
    rb, rt = _rating_records("reviews.rating", 60, 50, held_out=False, seed=1)
    ub, ut = _rating_records("reviews.rating_unseen", 30, 20, held_out=True, seed=2)
    hb, ht = _headline_records(20)
    mb, mt = _translation_records(15)
    templates = {
        "reviews.rating": _template_eval("reviews", "rating", False, ["accuracy", "macro_f1"], 40.0),
        "reviews.rating_unseen": _template_eval("reviews", "rating", True, ["accuracy", "macro_f1"], 45.0),
        "news.headline": _template_eval("news", "title_generation", False, ["rouge1", "rougeL"], 30.0),
        "mt.en_de": _template_eval("multi30k", "translation", True, ["bleu", "chrf"], 20.0),
    }
    few_b, _ = _rating_records("reviews.rating", 60, 0, held_out=False, seed=1)
    few_shot_preds = [{**r, "prediction": STARS[(i * 3) % 5]} for i, r in enumerate(few_b)]
    few_templates = {
        "reviews.rating": _template_eval("reviews", "rating", False, ["accuracy", "macro_f1"], 160.0),
    }
    return {
        "base": _eval_json("base-model", templates),
        "tuned": _eval_json("tuned-model", templates),
        "base_predictions": rb + ub + hb + mb,
        "tuned_predictions": rt + ut + ht + mt,
        "few_shot": {3: (_eval_json("base-model", few_templates), few_shot_preds)},
        "train_examples": _train_examples(),
    }


def _metrics_log(path: Path) -> Path:
    lines = []
    for step in range(1, 41):
        lines.append({"step": step, "epoch": step / 20, "loss": 2.0 / step ** 0.5, "lr": 1e-4,
                      "tokens": 100 * step})
        if step % 10 == 0:
            lines.append({"step": step, "val_loss": 1.0 / step ** 0.3, "val_ppl": 2.0, "macro_f1": step / 50,
                          "reviews.rating/macro_f1": step / 50})
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{broken json line\n")
    return path


@pytest.fixture(scope="module")
def evaluation() -> dict:
    return synthetic_evaluation()


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, evaluation) -> Path:
    out = tmp_path_factory.mktemp("report")
    build_report(**evaluation, metrics_log=_metrics_log(out / "metrics.jsonl"), out_dir=out,
                 title="Synthetic <base> & tuned", n_resamples=N_RESAMPLES, seed=0)
    return out


@pytest.fixture(scope="module")
def report(report_dir) -> dict:
    return json.loads((report_dir / "report.json").read_text())


# ---------------------------------------------------------------------------- HTML


class _Collector(HTMLParser):
    """Collects every tag with its attributes, and the text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html_text: str) -> _Collector:
    parser = _Collector()
    parser.feed(html_text)
    parser.close()
    return parser


def test_html_is_self_contained_with_png_data_uris(report_dir, report):
    parser = _parse((report_dir / "report.html").read_text(encoding="utf-8"))
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    # deltas, systems, training curves, confusion of both rating templates
    assert len(images) >= 5
    assert set(report["plots"]) >= {"deltas", "systems", "training", "confusion:reviews.rating"}
    for attrs in images:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
    for tag, attrs in parser.tags:
        assert tag not in {"script", "link", "iframe"}
        for name in ("src", "href"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(name) or ""), (tag, attrs)
    assert "http://" not in (report_dir / "report.html").read_text() and "https://" not in (
        report_dir / "report.html").read_text()


def test_html_escapes_text(report_dir):
    text = (report_dir / "report.html").read_text(encoding="utf-8")
    assert "Synthetic &lt;base&gt; &amp; tuned" in text
    assert "<base>" not in text


def test_paired_delta_inside_its_interval(report):
    for entries in (report["templates"], report["tasks"]):
        for entry in entries.values():
            for m in entry["metrics"].values():
                d = m["delta"]
                assert d["low"] <= d["delta"] <= d["high"]
                assert d["delta"] == pytest.approx(m["tuned"]["value"] - m["base"]["value"])
                assert m["base"]["low"] <= m["base"]["value"] <= m["base"]["high"]


def test_values_by_hand(report):
    rating = report["templates"]["reviews.rating"]["metrics"]
    # base says "5": right on the 12 five-star examples of 60 -> 0.2; tuned right on 50 -> 50/60
    assert rating["accuracy"]["base"]["value"] == pytest.approx(12 / 60)
    assert rating["accuracy"]["tuned"]["value"] == pytest.approx(50 / 60)
    assert rating["accuracy"]["delta"]["significant"] is True
    # macro-F1 over the fixed choices 1..5: base F1("5") = 2*12/(60+12) = 1/3, others 0 -> 1/15
    assert rating["macro_f1"]["base"]["value"] == pytest.approx((1 / 3) / 5)


def test_macro_f1_label_set_is_fixed_for_both_models(tmp_path):
    # Choices a, b, c, d. References a, a, b, b; base says a, a, c, a; tuned is always right.
    # Label set (issue 19, one definition everywhere: macro_f1_classes): the choices that occur as a
    # reference = [a, b]. It never depends on a model's predictions: base's "c" (no reference has it)
    # costs the recall of "b" but does not add a class to TUNED's average, as it did when the set was
    # "references or either model's predictions" ([a, b, c]: tuned 2/3 in report.json, 1 in eval.json).
    # "d" occurs nowhere and would add F1 = 0 to every system alike.
    #   base : a: tp=2, pred=3, ref=2 -> F1 = 4/5; b: tp=0 -> 0           -> (4/5) / 2 = 2/5
    #   tuned: a: 1; b: 1                                                  -> 1
    base, tuned = [], []
    for i, (ref, pred) in enumerate([("a", "a"), ("a", "a"), ("b", "c"), ("b", "a")]):
        common = {"index": i, "template_id": "t", "source_id": str(i), "dataset": "d",
                  "task": "classification", "prompt": "p", "reference": ref,
                  "choice_logprobs": {"a": -1.0, "b": -2.0, "c": -3.0, "d": -4.0}}
        base.append({**common, "prediction": pred})
        tuned.append({**common, "prediction": ref})
    templates = {"t": _template_eval("d", "classification", False, ["macro_f1"], 5.0)}
    build_report(base=_eval_json("b", templates), tuned=_eval_json("t", templates), base_predictions=base,
                 tuned_predictions=tuned, out_dir=tmp_path, n_resamples=N_RESAMPLES)
    report = json.loads((tmp_path / "report.json").read_text())
    entry = report["templates"]["t"]
    assert entry["labels"] == ["a", "b", "c", "d"] and entry["f1_labels"] == ["a", "b"]
    assert entry["metrics"]["macro_f1"]["base"]["value"] == pytest.approx(2 / 5)
    assert entry["metrics"]["macro_f1"]["tuned"]["value"] == pytest.approx(1.0)
    assert entry["metrics"]["macro_f1"]["delta"]["delta"] == pytest.approx(1.0 - 2 / 5)


def test_alignment_by_key_when_predictions_are_shuffled(tmp_path, evaluation):
    shuffled = list(evaluation["tuned_predictions"])
    random.Random(3).shuffle(shuffled)
    pairs = align_predictions(evaluation["base_predictions"], shuffled)
    for pair in pairs.values():
        for b, t, key in zip(pair.base, pair.tuned, pair.keys):
            key_of = (lambda r: (r["template_id"], r["source_id"], r["index"]))
            assert key_of(b) == key_of(t) == key
    build_report(base=evaluation["base"], tuned=evaluation["tuned"],
                 base_predictions=evaluation["base_predictions"], tuned_predictions=shuffled,
                 out_dir=tmp_path, n_resamples=N_RESAMPLES)
    report = json.loads((tmp_path / "report.json").read_text())
    # an index-wise (unaligned) comparison would almost never give tuned accuracy 50/60
    accuracy = report["templates"]["reviews.rating"]["metrics"]["accuracy"]
    assert accuracy["tuned"]["value"] == pytest.approx(50 / 60)


def test_alignment_drops_unpaired_and_refuses_different_references(evaluation):
    tuned = evaluation["tuned_predictions"][1:]  # first rating example only in base
    pairs = align_predictions(evaluation["base_predictions"], tuned)
    assert pairs["reviews.rating"].n_unpaired == 1 and len(pairs["reviews.rating"].keys) == 59
    changed = [dict(r) for r in evaluation["tuned_predictions"]]
    changed[5]["reference"] = "something else"
    with pytest.raises(DataError, match="reviews.rating.*different references"):
        align_predictions(evaluation["base_predictions"], changed)
    with pytest.raises(DataError, match="template_id"):
        align_predictions([{"source_id": "x"}], [{"source_id": "x"}])


def test_sections_held_out_and_forgetting(report, report_dir):
    assert report["templates"]["reviews.rating"]["section"] == "seen"
    assert report["templates"]["reviews.rating_unseen"]["section"] == "unseen_instruction"
    assert report["templates"]["mt.en_de"]["section"] == "untrained_task"
    assert report["sections"]["unseen_instruction"] == ["reviews.rating_unseen"]
    assert "reviews/rating (unseen instructions)" in report["tasks"]
    md = (report_dir / "report.md").read_text()
    html_text = (report_dir / "report.html").read_text()
    for text in (md, html_text):
        assert "Generalisation to unseen instructions" in text
        assert "Forgetting checks" in text


def test_no_held_out_section_without_held_out_examples(tmp_path, evaluation):
    keep = {"reviews.rating", "news.headline"}
    base = [r for r in evaluation["base_predictions"] if r["template_id"] in keep]
    tuned = [r for r in evaluation["tuned_predictions"] if r["template_id"] in keep]
    build_report(base=evaluation["base"], tuned=evaluation["tuned"], base_predictions=base,
                 tuned_predictions=tuned, out_dir=tmp_path, n_resamples=N_RESAMPLES)
    assert "Generalisation to unseen instructions" not in (tmp_path / "report.md").read_text()


def test_headline_main_metric_per_task(report):
    rows = {row["task"]: row for row in report["headline"]}
    assert rows["reviews/rating"]["metric"] == "macro_f1"
    assert rows["news/title_generation"]["metric"] == "rougeL"
    assert rows["multi30k/translation"]["metric"] == "bleu"
    for row in rows.values():
        assert row["significant"] == (row["low"] > 0 or row["high"] < 0)
    assert rows["reviews/rating"]["significant"] and rows["reviews/rating"]["delta"] > 0


def test_baselines_beside_models(report):
    scores = report["baselines"]["scores"]
    majority = scores["reviews.rating"]["majority"]["accuracy"]
    # training labels are balanced 20 x 5 -> tie broken by choice order: "1"; 12 of 60 test examples are "1"
    assert majority["value"] == pytest.approx(12 / 60)
    assert majority["low"] <= majority["value"] <= majority["high"]
    assert "tfidf_lr" in scores["reviews.rating"]
    # held-out wording borrows the pooled rating examples of the same dataset/task
    assert "majority" in scores["reviews.rating_unseen"]
    assert "first_10_words" in scores["news.headline"]
    assert "copy_source" in scores["mt.en_de"]


def test_few_shot_rows_with_prompt_length(report):
    rows = report["few_shot"]["reviews.rating"]
    assert [r["system"] for r in rows] == ["base zero-shot", "base 3-shot", "tuned zero-shot"]
    assert [r["mean_prompt_tokens"] for r in rows] == [40.0, 160.0, 40.0]
    # the 3-shot predictions cycle 1,4,2,5,3 against refs 1,2,3,4,5: right when 3i = i mod 5, i.e. i % 5 == 0
    assert rows[1]["metrics"]["accuracy"]["value"] == pytest.approx(12 / 60)


def test_k_shot_rows_say_when_the_pool_had_no_demonstrations(tmp_path, evaluation):
    """A held-out template has no example in the train split, so its "k-shot" prompts had no demonstration:
    no k-shot row for it (it would be the zero-shot result under a k-shot name). Partly short: labelled."""
    few_b, _ = _rating_records("reviews.rating", 60, 0, held_out=False, seed=1)
    unseen_b, _ = _rating_records("reviews.rating_unseen", 30, 0, held_out=True, seed=2)
    preds = ([{**r, "prediction": "3", "demonstrations": ([] if i < 6 else [f"d{i}"])} for i, r in enumerate(few_b)]
             + [{**r, "demonstrations": []} for r in unseen_b])
    few_templates = {tid: _template_eval("reviews", "rating", tid.endswith("unseen"), ["accuracy", "macro_f1"], 45.0)
                     for tid in ("reviews.rating", "reviews.rating_unseen")}
    args = {**evaluation, "few_shot": {1: (_eval_json("base-model", few_templates), preds)}}
    build_report(**args, out_dir=tmp_path, n_resamples=N_RESAMPLES, seed=0)
    few = json.loads((tmp_path / "report.json").read_text())["few_shot"]
    assert [r["system"] for r in few["reviews.rating_unseen"]] == ["base zero-shot", "tuned zero-shot"]
    assert [r["system"] for r in few["reviews.rating"]] == [
        "base zero-shot", "base 1-shot (6 of 60 short of demonstrations)", "tuned zero-shot"]
    markdown = (tmp_path / "report.md").read_text()
    assert "reviews.rating_unseen | base 1-shot" not in markdown
    assert "base 1-shot (6 of 60 short of demonstrations)" in markdown


def test_examples_wins_and_regressions(report):
    rating = report["examples"]["reviews.rating"]
    assert rating["wins"] and all(e["tuned"] == e["reference"] != e["base"] for e in rating["wins"])
    assert rating["regressions"]
    assert all(e["base"] == e["reference"] != e["tuned"] for e in rating["regressions"])
    headline = report["examples"]["news.headline"]
    assert all(e["gain"] > 0 for e in headline["wins"])
    assert headline["wins"][0]["gain"] >= headline["wins"][-1]["gain"]


def test_long_prompt_is_truncated_and_escaped(tmp_path):
    long_prompt = "<script>alert(1)</script> " + "word " * 200
    base = [{"index": 0, "template_id": "g", "source_id": "0", "dataset": "d", "task": "summarization",
             "prompt": long_prompt, "reference": "a b c", "prediction": "x"}]
    tuned = [{**base[0], "prediction": "a b c"}]
    templates = {"g": _template_eval("d", "summarization", False, ["rougeL"], 5.0)}
    build_report(base=_eval_json("b", templates), tuned=_eval_json("t", templates), base_predictions=base,
                 tuned_predictions=tuned, out_dir=tmp_path, n_resamples=N_RESAMPLES)
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["examples"]["g"]["wins"][0]["prompt"]) == 400
    text = (tmp_path / "report.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_training_summary_and_missing_log(report, tmp_path, evaluation):
    training = report["training"]
    assert training["n_records"] == 44 and training["last_step"] == 40
    assert training["best_val_loss"]["step"] == 40  # val loss falls monotonically
    assert training["task_metrics"] == ["macro_f1"]
    build_report(**evaluation, metrics_log=tmp_path / "absent.jsonl", out_dir=tmp_path,
                 n_resamples=N_RESAMPLES)
    report2 = json.loads((tmp_path / "report.json").read_text())
    assert "training" not in report2["plots"]
    assert training["final_unweighted_loss"] is None


def test_class_weighted_training_reports_the_unweighted_final_loss_too(tmp_path, evaluation):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [
        {"event": "train", "step": 1, "loss": 2.5, "unweighted_loss": 2.0},
        {"event": "train", "step": 2, "loss": 1.25, "unweighted_loss": 0.75},
        {"event": "eval", "step": 2, "val_loss": 0.8}]))
    build_report(**evaluation, metrics_log=log, out_dir=tmp_path / "out", n_resamples=N_RESAMPLES)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["training"]["final_loss"] == 1.25 and report["training"]["final_unweighted_loss"] == 0.75
    md = (tmp_path / "out" / "report.md").read_text()
    assert "final training loss 1.250 (class-weighted; unweighted, as validation measures it: 0.750)" in md


def test_markdown_tables_and_model_card_rows(report, report_dir):
    md = (report_dir / "report.md").read_text()
    assert "## Headline" in md and "| reviews/rating |" in md
    rows = model_card_rows(report)
    by_key = {(r["template"], r["metric"]): r for r in rows}
    r = by_key[("reviews.rating", "accuracy")]
    assert r["tuned"] == pytest.approx(50 / 60) and r["base"] == pytest.approx(12 / 60)
    assert r["ci_low"] <= r["delta"] <= r["ci_high"]
    assert len(rows) == sum(len(e["metrics"]) for e in report["templates"].values())


def test_report_files_written_atomically_leave_no_temp_files(report_dir):
    assert not [p.name for p in report_dir.iterdir() if p.name.startswith(".")]


def test_per_task_matches_pooled_computation(report, evaluation):
    # The reviews/rating group has one seen template: its numbers equal the template's.
    assert report["tasks"]["reviews/rating"]["metrics"]["accuracy"]["tuned"]["value"] == pytest.approx(
        report["templates"]["reviews.rating"]["metrics"]["accuracy"]["tuned"]["value"])
    preds = [r["prediction"] for r in evaluation["tuned_predictions"] if r["template_id"] == "mt.en_de"]
    refs = [r["reference"] for r in evaluation["tuned_predictions"] if r["template_id"] == "mt.en_de"]
    assert report["tasks"]["multi30k/translation"]["metrics"]["bleu"]["tuned"]["value"] == pytest.approx(
        M.corpus_bleu(preds, refs))


# ------------------------------------------------------------------ browser render

CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", f"--screenshot={shot}",
           (report_dir / "report.html").resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 50_000  # a blank page compresses to a few kB
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# ------------------------------------------------------------------ direction of a metric


def test_report_names_the_kept_checkpoint_with_its_direction(tmp_path, evaluation):
    """train_result.json beside the log says which weights training kept and in which direction it judged
    their metric (a lower-is-better "ter" set by train.early_stopping.greater_is_better=false)."""
    log = _metrics_log(tmp_path / "metrics.jsonl")
    (tmp_path / "train_result.json").write_text(json.dumps(
        {"best_metric": "ter", "best_step": 20, "best_value": 0.31, "greater_is_better": False}))
    build_report(**evaluation, metrics_log=log, out_dir=tmp_path, n_resamples=N_RESAMPLES)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["training"]["best_checkpoint"] == {"metric": "ter", "step": 20.0, "value": 0.31,
                                                     "greater_is_better": False}
    assert report["training"]["best_val_loss"]["step"] == 40  # the lowest validation loss, as before
    text = "weights kept: the best checkpoint, ter 0.310 at step 20, lower is better"
    assert text in (tmp_path / "report.md").read_text()
    assert text in (tmp_path / "report.html").read_text().lower()


@pytest.mark.parametrize("metric, higher", [("val_loss", False), ("macro_f1", True), ("t/val_ppl", False)])
def test_kept_checkpoint_of_an_older_run_takes_the_metric_definition(tmp_path, metric, higher):
    from instructkit.evaluate.training_log import best_checkpoint

    (tmp_path / "train_result.json").write_text(json.dumps({"best_metric": metric, "best_step": 3, "best_value": 1}))
    assert best_checkpoint(tmp_path / "metrics.jsonl")["greater_is_better"] is higher
    (tmp_path / "train_result.json").write_text(json.dumps({"best_metric": None, "best_step": None}))
    assert best_checkpoint(tmp_path / "metrics.jsonl") is None


def test_a_significant_change_is_coloured_by_the_metric_direction(monkeypatch):
    """Green for a change for the better, red for the worse, in the metric's own direction: a registered
    lower-is-better metric (its MetricSpec says so) that falls is an improvement."""
    from instructkit.evaluate import plots, render
    from instructkit.evaluate.metric_registry import HIGHER_IS_BETTER
    from instructkit.evaluate.pairing import SEEN

    monkeypatch.setitem(HIGHER_IS_BETTER, "ter", False)
    assert render._delta_class("ter", True, -0.1) == "num up" and render._delta_class("ter", True, 0.1) == "num down"
    assert render._delta_class("accuracy", True, -0.1) == "num down"
    assert render._delta_class("accuracy", True, 0.1) == "num up" and render._delta_class("ter", False, -0.1) == "num"
    delta = {"delta": -0.1, "low": -0.2, "high": -0.05, "significant": True}
    report = {"templates": {"t": {"metrics": {"ter": {"delta": delta}, "accuracy": {"delta": delta}},
                                  "task": "translation", "labels": [], "section": SEEN}}}
    assert [row[5] for row in plots._delta_rows(report, main_only=False)] == [True, False]


def test_detail_table_counts_answers_cut_at_max_new_tokens(tmp_path):
    """eval.json's cut_short (lm-evaluation-harness#3400) reaches report.json and the detail table: 3 of the
    base model's headlines were cut short, none of the tuned one's; ranked templates show '-'."""
    evaluation = synthetic_evaluation()
    evaluation["base"] = json.loads(json.dumps(evaluation["base"]))  # its own copy: the two share templates
    evaluation["base"]["templates"]["news.headline"]["cut_short"] = 3
    evaluation["tuned"]["templates"]["news.headline"]["cut_short"] = 0
    build_report(**evaluation, out_dir=tmp_path, n_resamples=N_RESAMPLES, seed=0)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["templates"]["news.headline"]["cut_short"] == {"base": 3, "tuned": 0}
    assert report["templates"]["reviews.rating"]["cut_short"] == {"base": None, "tuned": None}
    md = (tmp_path / "report.md").read_text()
    assert "cut short base | cut short tuned |" in md
    detail = [line for line in md.splitlines() if line.startswith("| news.headline |") and "3.500" in line]
    assert detail and detail[0].endswith("| 3 | 0 |")
    rating = [line for line in md.splitlines() if line.startswith("| reviews.rating |") and "3.500" in line]
    assert rating and rating[0].endswith("| - | - |")
