"""Tests for instructkit.evaluate.render: the HTML page escapes every text it shows (Jinja2 autoescape),
the Markdown page does not HTML-escape."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from instructkit.evaluate.report import build_report

SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def _eval_json(model: str, templates: dict[str, dict]) -> dict:
    return {"model": model, "split": "test", "n": 0, "k_shot": 0, "templates": templates, "tasks": {}}


def _template_eval(dataset: str, task: str, metrics: list[str]) -> dict:
    return {"dataset": dataset, "task": task, "held_out": False, "n": 0,
            "metrics": {m: {"value": 0.0, "low": 0.0, "high": 0.0} for m in metrics},
            "perplexity": 3.5, "mean_prompt_tokens": 12.0, "unparseable": 0}


def _hostile_evaluation() -> dict:
    """A choice template whose id is a script tag, and a generation template whose prompts and base
    predictions are; the tuned model wins examples of both, so they are shown in the report."""
    base, tuned = [], []
    for i in range(8):
        ref = "yes" if i % 2 else "no"
        common = {"index": i, "template_id": SCRIPT, "source_id": f"c{i}", "dataset": "d", "task": "classification",
                  "prompt": f"{SCRIPT} Is this fine? ({i})", "reference": ref,
                  "choice_logprobs": {"yes": -0.5, "no": -1.0}}
        base.append({**common, "prediction": "yes"})
        tuned.append({**common, "prediction": ref})
    for i in range(4):
        common = {"index": 10 + i, "template_id": "gen", "source_id": f"g{i}", "dataset": "d", "task": "summarization",
                  "prompt": f"Summarize: {SCRIPT} the cat sat on the mat {i}.", "reference": "the cat sat"}
        base.append({**common, "prediction": SCRIPT})
        tuned.append({**common, "prediction": "the cat sat"})
    templates = {SCRIPT: _template_eval("d", "classification", ["accuracy", "macro_f1"]),
                 "gen": _template_eval("d", "summarization", ["rougeL"])}
    return {"base": _eval_json("base", templates), "tuned": _eval_json("tuned", templates),
            "base_predictions": base, "tuned_predictions": tuned}


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_html_escapes_script_in_prompts_predictions_and_template_ids(tmp_path):
    build_report(**_hostile_evaluation(), out_dir=tmp_path, title=f"Report {SCRIPT}", n_resamples=50)
    report = json.loads((tmp_path / "report.json").read_text())
    shown = report["examples"][SCRIPT]["wins"] + report["examples"]["gen"]["wins"]
    assert shown and all(SCRIPT in e["prompt"] for e in shown)
    assert any(e["base"] == SCRIPT for e in report["examples"]["gen"]["wins"])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert ESCAPED in page
    assert SCRIPT not in page and "<script" not in page
    assert f"<h3>{ESCAPED}: tuned better</h3>" in page  # the template id in the examples heading
    assert f"<title>Report {ESCAPED}</title>" in page
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags and parser.tags.count("img") >= 3  # deltas, systems, confusion


def test_markdown_is_not_html_escaped(tmp_path):
    build_report(**_hostile_evaluation(), out_dir=tmp_path, n_resamples=50)
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert f"| {SCRIPT} | d/classification | accuracy |" in markdown
    assert "&lt;" not in markdown
