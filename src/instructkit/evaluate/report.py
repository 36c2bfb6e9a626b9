"""The base-vs-fine-tuned comparison report: ``report.json``, ``report.md`` and ``report.html``.

Inputs are what the evaluator wrote for each model (``eval.json`` as a dict, ``predictions.jsonl``
as a list of dicts), optionally the base model's k-shot evaluations, the training split (for the
baselines) and the training run's ``metrics.jsonl``. Everything is recomputed from the per-example
predictions, so that base and tuned are scored on exactly the same examples. :func:`build_report`
runs the steps, each in its own module:

1. **Align** the two prediction lists per (dataset, template) group and learn each group's facts and
   section (:mod:`instructkit.evaluate.pairing`);
2. **Compare** per template and per task with bootstrap CIs and the paired delta; the headline;
   baselines and the few-shot baseline (:mod:`instructkit.evaluate.compare`);
3. **Examples** (wins and regressions) and confusion counts (:mod:`instructkit.evaluate.examples`);
4. the training log's summary (:mod:`instructkit.evaluate.training_log`);
5. **Plots** as PNG bytes (:mod:`instructkit.evaluate.plots`);
6. **Render** Markdown and a self-contained HTML page from Jinja2 templates
   (:mod:`instructkit.evaluate.render`), then write the three files atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.evaluate.compare import (
    CONFIDENCE,
    compare_baselines,
    few_shot_rows,
    headline,
    task_entry,
    task_groups,
    template_entry,
)
from instructkit.evaluate.examples import choice_examples, confusion_counts, generation_examples
from instructkit.evaluate.pairing import (
    SECTIONS,
    align_predictions,
    assign_sections,
    macro_f1_labels,
    template_info,
)
from instructkit.evaluate.plots import plot_confusion, plot_deltas, plot_systems, plot_training
from instructkit.evaluate.render import render_html, render_markdown
from instructkit.evaluate.training_log import read_metrics_log, training_summary
from instructkit.io import atomic_open, write_json

__all__ = ["ReportPaths", "build_report"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`build_report` wrote the report."""

    json: Path
    md: Path
    html: Path


def _examples_by_template(*groups: Sequence[dict] | None) -> dict[str, dict]:
    """First example seen of each template, from the given example lists."""
    out: dict[str, dict] = {}
    for group in groups:
        for example in group or []:
            out.setdefault(str(example.get("template_id")), example)
    return out


def _few_shot_inputs(few_shot: dict | None) -> dict[int, tuple[dict, list[dict]]]:
    """Normalise ``{k: (eval json, predictions)}`` (keys may be strings after a JSON round trip)."""
    return {int(k): (v[0], list(v[1])) for k, v in (few_shot or {}).items()}


def build_report(
    *,
    base: dict,
    tuned: dict,
    base_predictions: list[dict],
    tuned_predictions: list[dict],
    train_examples: list[dict] | None = None,
    few_shot: dict[int, tuple[dict, list[dict]]] | None = None,
    metrics_log: Path | None = None,
    out_dir: Path,
    title: str = "Base vs fine-tuned",
    n_resamples: int = 1000,
    seed: int = 0,
    test_examples: list[dict] | None = None,
) -> ReportPaths:
    """Compare the base and the fine-tuned model; write report.json, report.md, report.html.

    Args:
        base, tuned: the evaluator's eval.json of each model (``templates`` entries give metric
            names, perplexity, mean prompt tokens, unparseable counts; ``model`` names the model).
        base_predictions, tuned_predictions: predictions.jsonl records of each model.
        train_examples: the training split (baselines; which tasks/templates were trained on).
            Examples flagged ``held_out`` are treated as not trained on.
        few_shot: ``{k: (eval json, predictions)}`` of the BASE model with k in-context examples.
        metrics_log: the training run's metrics.jsonl (curves; skipped when absent).
        out_dir: folder for the three files (written atomically).
        n_resamples, seed: bootstrap settings (the same for every interval).
        test_examples: optional test split, only to learn answer choices and metric names when the
            predictions do not carry them.

    Raises: DataError when the predictions cannot be paired (no ``template_id``, a repeated key,
    different references for one example, or no example in common; see ``align_predictions``).
    """
    pairs = align_predictions(base_predictions, tuned_predictions)
    known = _examples_by_template(test_examples, train_examples)
    infos = {tid: template_info(pair, (base, tuned), known) for tid, pair in pairs.items()}
    for tid, info in infos.items():
        info.f1_labels = macro_f1_labels(info.choices, pairs[tid])
    assign_sections(infos, train_examples)
    boot = {"n_resamples": n_resamples, "seed": seed}
    templates = {tid: template_entry(infos[tid], pairs[tid], base, tuned, **boot) for tid in pairs}
    tasks = {key: task_entry(key, tids, infos, pairs, **boot) for key, tids in task_groups(infos).items()}
    few = _few_shot_inputs(few_shot)
    records = read_metrics_log(metrics_log)
    report: dict[str, Any] = {
        "title": title,
        "models": {"base": base.get("model", "base"), "tuned": tuned.get("model", "tuned")},
        "split": tuned.get("split", base.get("split")),
        "settings": {"n_resamples": n_resamples, "seed": seed, "confidence": CONFIDENCE},
        "n_examples": sum(len(p.keys) for p in pairs.values()),
        "headline": headline(tasks, infos),
        "templates": templates,
        "tasks": tasks,
        "sections": {s: [t for t, i in infos.items() if i.section == s] for s in SECTIONS},
        "baselines": compare_baselines(infos, pairs, train_examples, **boot),
        "few_shot": {tid: few_shot_rows(infos[tid], pairs[tid], base, tuned, few, **boot) for tid in pairs}
        if few else {},
        "confusion": {tid: confusion_counts(infos[tid], pairs[tid]) for tid in pairs if infos[tid].choices},
        "examples": {tid: choice_examples(infos[tid], pairs[tid]) if infos[tid].choices
                     else generation_examples(pairs[tid]) for tid in pairs},
        "training": training_summary(records, metrics_log),
    }
    plots = {
        "deltas": plot_deltas(report), "systems": plot_systems(report), "training": plot_training(records),
    }
    for tid, matrix in report["confusion"].items():
        plots[f"confusion:{tid}"] = plot_confusion(tid, matrix)
    report["plots"] = sorted(k for k, v in plots.items() if v)
    out_dir = Path(out_dir)
    paths = ReportPaths(out_dir / "report.json", out_dir / "report.md", out_dir / "report.html")
    write_json(paths.json, report)
    with atomic_open(paths.md) as handle:
        handle.write(render_markdown(report))
    with atomic_open(paths.html) as handle:
        handle.write(render_html(report, plots))
    log.info("report written to %s", paths.html)
    return paths
