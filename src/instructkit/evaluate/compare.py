"""Score the paired predictions: base vs tuned per template and per task, beside baselines and few-shot.

Everything is recomputed from the per-example predictions, so that base and tuned are scored on
exactly the same examples (see :mod:`instructkit.evaluate.pairing`):

- **Compare** per (dataset, template) group and per task (``dataset/task``): for each metric of the
  template, base and tuned value with a percentile-bootstrap 95% CI, and ``delta = tuned - base`` with a
  PAIRED bootstrap CI and p-value (each resample draws one set of examples and scores both models on it,
  so the per-example correlation between the models cancels; with 200 examples and 1000 resamples
  that is 1000 index vectors of 200). The bootstrap resamples source rows (a cluster bootstrap): a task
  group pooling k templates rendered on the same rows draws rows with their k examples, and reports
  ``n_rows`` beside ``n`` (examples). For accuracy and exact match the delta also carries the exact
  McNemar p-value of the paired right/wrong outcomes (``mcnemar_p``, with the discordant counts), where
  every example is its own source row (independent pairs); None where rows repeat. macro-F1 averages
  over the classes among the references (``macro_f1_classes``, as in eval.json and the baselines).
- **Baselines** (majority, TF-IDF + logistic regression, lead sentence, copy source) scored with the
  same metrics and CIs; the **few-shot** baseline (base model with k in-context examples) beside
  the tuned model's zero-shot figure, with the mean prompt length each needs.

The report's ``headline`` lists, per task, the main metric (macro_f1 for choice tasks, rougeL for
summarization and title generation, bleu for translation, token_f1 for extractive QA), its delta,
the CI and ``significant`` (the CI excludes 0).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from instructkit.evaluate.baselines import baseline_predictions, metric_spec, score_baselines
from instructkit.evaluate.bootstrap import bootstrap_ci, mcnemar_exact, paired_bootstrap_diff, sign_flip_floor
from instructkit.evaluate.groups import cluster_ids, dataset_of
from instructkit.evaluate.metric_registry import HIGHER_IS_BETTER, get_metric, macro_f1_classes
from instructkit.evaluate.pairing import (
    SECTIONS,
    UNSEEN,
    PairedTemplate,
    TemplateInfo,
    as_choice,
    as_text,
    texts,
)
from instructkit.metric_direction import lower_is_better

__all__ = [
    "CONFIDENCE",
    "compare_baselines",
    "few_shot_rows",
    "headline",
    "improvement",
    "main_metric",
    "model_card_rows",
    "task_entry",
    "task_groups",
    "template_entry",
]

CONFIDENCE = 0.95
MAIN_METRIC_BY_TASK = {
    "summarization": "rougeL",
    "title_generation": "rougeL",
    "translation": "bleu",
    "extractive_qa": "token_f1",
}
MCNEMAR_METRICS = ("accuracy", "exact_match")  # right/wrong per example: the exact McNemar test applies


def _ci(value: float, low: float, high: float) -> dict[str, float]:
    return {"value": value, "low": low, "high": high}


def _compare_metrics(
    metric_names: Sequence[str],
    labels: Sequence[str] | None,
    refs: Sequence[str],
    base_preds: Sequence[str],
    tuned_preds: Sequence[str],
    *,
    n_resamples: int,
    seed: int,
    clusters: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{metric: {"base": ci, "tuned": ci, "delta": {delta, low, high, p_value, n, n_rows, ...}}}``.

    All three bootstraps use the same seed, hence the same resampled index sets; ``clusters`` (source-row
    codes, one per example; default: every example its own row) makes them resample rows. Accuracy-like
    metrics (``MCNEMAR_METRICS``) add ``mcnemar_p``, ``base_only`` and ``tuned_only`` (discordant
    pairs) when every example is its own row, else ``mcnemar_p`` None.
    """
    clusters = list(range(len(refs))) if clusters is None else list(clusters)
    independent = len(set(clusters)) == len(clusters)
    out: dict[str, dict[str, Any]] = {}
    for name in metric_names:
        spec = metric_spec(name, macro_f1_classes(refs, labels) if name == "macro_f1" else labels)
        if spec is None:
            continue
        kwargs = {"n_resamples": n_resamples, "confidence": CONFIDENCE, "seed": seed, "clusters": clusters}
        out[name] = {
            "base": _ci(*bootstrap_ci(spec, base_preds, refs, **kwargs)),
            "tuned": _ci(*bootstrap_ci(spec, tuned_preds, refs, **kwargs)),
            "delta": paired_bootstrap_diff(spec, base_preds, tuned_preds, refs, **kwargs),
        }
        delta = out[name]["delta"]
        delta["significant"] = _significant(delta)
        if name in MCNEMAR_METRICS:
            delta.update(_mcnemar(name, base_preds, tuned_preds, refs) if independent
                         else {"mcnemar_p": None})
    return out


def _mcnemar(name: str, base_preds: Sequence[str], tuned_preds: Sequence[str], refs: Sequence[str]
             ) -> dict[str, float]:
    """Exact McNemar test on the per-example right (1) / wrong (0) of an accuracy-like metric."""
    per_example = get_metric(name).per_example
    test = mcnemar_exact(per_example(base_preds, refs) > 0.5, per_example(tuned_preds, refs) > 0.5)
    return {"mcnemar_p": test["p_value"], "base_only": test["a_only"], "tuned_only": test["b_only"]}


def improvement(metric: str, delta: float) -> bool:
    """True when `delta` (tuned - base) of `metric` is a change for the better: up for accuracy or ROUGE, down
    for a lower-is-better metric (instructkit.metric_direction, from the metric's MetricSpec)."""
    return delta < 0 if lower_is_better(metric, declared=HIGHER_IS_BETTER) else delta > 0


def _significant(delta: dict[str, float]) -> bool:
    """The paired CI excludes 0, on enough units for any test to reach 1 - CONFIDENCE (six or more: on five
    or fewer the CI of a bootstrap can exclude 0 while no test could call the difference significant)."""
    units = delta.get("n_rows", delta["n"])
    return bool((delta["low"] > 0 or delta["high"] < 0) and sign_flip_floor(int(units)) < 1 - CONFIDENCE)


def template_entry(
    info: TemplateInfo, pair: PairedTemplate, base: dict, tuned: dict, *, n_resamples: int, seed: int
) -> dict[str, Any]:
    """report.json entry of one (dataset, template) group (``n``: examples, ``n_rows``: source rows)."""
    refs = texts(pair.base, "reference", info.choices)
    base_preds = texts(pair.base, "prediction", info.choices)
    tuned_preds = texts(pair.tuned, "prediction", info.choices)
    eval_b = base.get("templates", {}).get(info.key, {})
    eval_t = tuned.get("templates", {}).get(info.key, {})
    clusters = cluster_ids(pair.base)
    return {
        "template_id": info.template_id,
        "dataset": info.dataset,
        "task": info.task,
        "held_out": info.held_out,
        "section": info.section,
        "n": len(refs),
        "n_rows": len(set(clusters)),
        "n_unpaired": pair.n_unpaired,
        "labels": info.choices,
        "f1_labels": info.f1_labels,
        "metrics": _compare_metrics(info.metrics, info.f1_labels, refs, base_preds, tuned_preds,
                                    n_resamples=n_resamples, seed=seed, clusters=clusters),
        "perplexity": {"base": eval_b.get("perplexity"), "tuned": eval_t.get("perplexity")},
        "mean_prompt_tokens": {
            "base": eval_b.get("mean_prompt_tokens"), "tuned": eval_t.get("mean_prompt_tokens"),
        },
        "unparseable": {"base": eval_b.get("unparseable"), "tuned": eval_t.get("unparseable")},
        "cut_short": {"base": eval_b.get("cut_short"), "tuned": eval_t.get("cut_short")},
    }


def task_groups(infos: dict[str, TemplateInfo]) -> dict[str, list[str]]:
    """Report key -> template ids. Held-out templates of a trained task form their own group
    (``dataset/task (unseen instructions)``), so seen and unseen wordings are never pooled."""
    groups: dict[str, list[str]] = defaultdict(list)
    for tid, info in infos.items():
        key = info.task_key + (" (unseen instructions)" if info.section == UNSEEN else "")
        groups[key].append(tid)
    return dict(groups)


def task_entry(
    key: str, tids: list[str], infos: dict[str, TemplateInfo], pairs: dict[str, PairedTemplate],
    *, n_resamples: int, seed: int,
) -> dict[str, Any]:
    """report.json entry of one task group: every metric over the pooled examples of the
    templates that list it, resampled by source row (cluster bootstrap: the templates of a group are
    rendered on the same rows); macro-F1 over ``macro_f1_classes`` of the pooled references and the
    union of the answer choices. ``n``: examples, ``n_rows``: source rows (of the largest metric pool)."""
    first = infos[tids[0]]
    metric_names: list[str] = []
    for tid in tids:
        metric_names += [m for m in infos[tid].metrics if m not in metric_names]
    metrics: dict[str, Any] = {}
    n = n_rows = 0
    for name in metric_names:
        members = [t for t in tids if name in infos[t].metrics]
        labels: list[str] | None = []
        for t in members:
            labels += [c for c in infos[t].choices or [] if c not in labels]
        refs, base_preds, tuned_preds = [], [], []
        for t in members:
            choices = infos[t].choices
            refs += texts(pairs[t].base, "reference", choices)
            base_preds += texts(pairs[t].base, "prediction", choices)
            tuned_preds += texts(pairs[t].tuned, "prediction", choices)
        clusters = cluster_ids([r for t in members for r in pairs[t].base])
        if len(refs) > n:
            n, n_rows = len(refs), len(set(clusters))
        metrics.update(_compare_metrics([name], labels or None, refs, base_preds, tuned_preds,
                                        n_resamples=n_resamples, seed=seed, clusters=clusters))
    return {
        "dataset": first.dataset,
        "task": first.task,
        "section": first.section,
        "templates": tids,
        "n": n,
        "n_rows": n_rows,
        "metrics": metrics,
    }


def main_metric(metric_names: Sequence[str], task: str, is_choice: bool) -> str | None:
    """macro_f1 (else accuracy) for choice tasks; rougeL / bleu / token_f1 by task family; else the first."""
    preferred = ["macro_f1", "accuracy"] if is_choice else [MAIN_METRIC_BY_TASK.get(task, "")]
    for name in preferred:
        if name in metric_names:
            return name
    return metric_names[0] if metric_names else None


def headline(tasks: dict[str, dict], infos: dict[str, TemplateInfo]) -> list[dict[str, Any]]:
    """One row per task group: main metric, base, tuned, delta and its CI, significant."""
    rows = []
    order = {section: i for i, section in enumerate(SECTIONS)}
    for key, entry in sorted(tasks.items(), key=lambda kv: (order[kv[1]["section"]], kv[0])):
        is_choice = any(infos[t].choices for t in entry["templates"])
        metric = main_metric(list(entry["metrics"]), entry["task"], is_choice)
        if metric is None:
            continue
        m = entry["metrics"][metric]
        rows.append({
            "task": key,
            "section": entry["section"],
            "metric": metric,
            "base": m["base"]["value"],
            "tuned": m["tuned"]["value"],
            "delta": m["delta"]["delta"],
            "low": m["delta"]["low"],
            "high": m["delta"]["high"],
            "p_value": m["delta"]["p_value"],
            "mcnemar_p": m["delta"].get("mcnemar_p"),
            "n": m["delta"]["n"],
            "n_rows": m["delta"].get("n_rows", m["delta"]["n"]),
            "significant": m["delta"]["significant"],
        })
    return rows


# ================================================================ baselines, few-shot


def _baseline_examples(infos: dict[str, TemplateInfo], pairs: dict[str, PairedTemplate]) -> list[dict]:
    """The aligned test examples as prepared-data records, so baselines score the same examples;
    ``group`` is the report key they are scored under, ``template_id`` the template they learn from."""
    out = []
    for key, pair in pairs.items():
        info = infos[key]
        for record in pair.base:
            out.append({
                "prompt": as_text(record.get("prompt")),
                "completion": as_choice(as_text(record.get("reference")), info.choices),
                "choices": info.choices,
                "template_id": info.template_id,
                "group": key,
                "dataset": info.dataset,
                "task": info.task,
                "source_id": record.get("source_id"),
            })
    return out


def compare_baselines(
    infos: dict[str, TemplateInfo], pairs: dict[str, PairedTemplate], train_examples: Sequence[dict] | None,
    *, n_resamples: int, seed: int,
) -> dict[str, Any]:
    """Scores of every applicable baseline (``scores``) and why some are missing (``skipped``)."""
    trained_on = [e for e in train_examples or [] if not e.get("held_out")]
    result = baseline_predictions(trained_on, _baseline_examples(infos, pairs), seed=seed)
    scores = score_baselines(
        result,
        {tid: info.metrics for tid, info in infos.items()},
        labels_by_template={tid: info.f1_labels for tid, info in infos.items() if info.f1_labels},
        n_resamples=n_resamples,
        seed=seed,
    )
    return {"scores": scores, "skipped": result.skipped}


def few_shot_rows(
    info: TemplateInfo, pair: PairedTemplate, base: dict, tuned: dict,
    few_shot: dict[int, tuple[dict, list[dict]]], *, n_resamples: int, seed: int,
) -> list[dict[str, Any]]:
    """Rows "base zero-shot", "base k-shot" (each k), "tuned zero-shot" for one template: every
    metric with its CI, and the mean prompt length in tokens (demonstrations make prompts longer).

    A k-shot evaluation in which no example of the template got a demonstration (its template had no
    example in the pool: a held-out template is never in the train split) is left out rather than shown
    as k-shot; one where only some examples fell short says how many."""
    tid = info.key
    systems: list[tuple[str, int, dict, list[dict]]] = [("base zero-shot", 0, base, pair.base)]
    for k in sorted(few_shot, key=int):
        eval_k, preds_k = few_shot[k]
        shared = info.key != info.template_id  # a template of several datasets: this dataset's records
        records = [r for r in preds_k if str(r.get("template_id")) == info.template_id
                   and (not shared or dataset_of(r) == info.dataset)]
        if not records:
            continue
        name = f"base {int(k)}-shot"
        if any("demonstrations" in r for r in records):  # predictions that list their demonstrations
            if not any(r.get("demonstrations") for r in records):
                continue  # the pool had no example of this template (e.g. a held-out one): not a k-shot run
            short = sum(len(r.get("demonstrations") or []) < int(k) for r in records)
            if short:
                name += f" ({short} of {len(records)} short of demonstrations)"
        systems.append((name, int(k), eval_k, records))
    systems.append(("tuned zero-shot", 0, tuned, pair.tuned))
    rows = []
    for name, k, evaluation, records in systems:
        refs = texts(records, "reference", info.choices)
        preds = texts(records, "prediction", info.choices)
        metrics = {}
        for metric in info.metrics:
            spec = metric_spec(metric, macro_f1_classes(refs, info.choices) if metric == "macro_f1" else None)
            if spec is not None:
                metrics[metric] = _ci(*bootstrap_ci(spec, preds, refs, n_resamples=n_resamples, seed=seed,
                                                    clusters=cluster_ids(records)))
        rows.append({
            "system": name,
            "k": k,
            "n": len(refs),
            "metrics": metrics,
            "mean_prompt_tokens": evaluation.get("templates", {}).get(tid, {}).get("mean_prompt_tokens"),
        })
    return rows


# ======================================================================= model card


def model_card_rows(report_json: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the model card's metrics table: one per (dataset, template) group and metric.

    Keys: ``name`` ("group · metric"), ``template`` (the group key: the template id, or
    ``<dataset>/<template_id>`` for a template shared by datasets), ``template_id``, ``dataset``,
    ``held_out``, ``metric``, ``section``, ``base``, ``tuned``, ``value`` (= tuned),
    ``value_low``/``value_high`` (tuned 95% CI), ``delta``, ``ci_low``/``ci_high`` (paired 95% CI of the
    delta), ``significant``, ``n`` (examples), ``n_rows`` (source rows).
    """
    rows = []
    for tid, entry in report_json.get("templates", {}).items():
        for metric, m in entry.get("metrics", {}).items():
            rows.append({
                "name": f"{tid} · {metric}",
                "template": tid,
                "template_id": entry.get("template_id", tid),
                "dataset": entry.get("dataset"),
                "held_out": entry.get("held_out"),
                "metric": metric,
                "section": entry.get("section"),
                "base": m["base"]["value"],
                "tuned": m["tuned"]["value"],
                "value": m["tuned"]["value"],
                "value_low": m["tuned"]["low"],
                "value_high": m["tuned"]["high"],
                "delta": m["delta"]["delta"],
                "ci_low": m["delta"]["low"],
                "ci_high": m["delta"]["high"],
                "significant": m["delta"]["significant"],
                "n": m["delta"]["n"],
                "n_rows": m["delta"].get("n_rows", m["delta"]["n"]),
            })
    return rows
