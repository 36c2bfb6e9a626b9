"""Metrics of scored templates: per-template and per-task summaries with bootstrap confidence intervals.

Every summary is per (dataset, template) group (`instructkit.evaluate.groups`): a held-out dataset read
through a trained dataset's template has its own entry, n and held-out flag. Metrics per group come from
the examples' `metrics` (or `cfg.metrics[template_id]`), each with a percentile-bootstrap 95% interval.
Per task, `tasks["<dataset>/<task>"]` pools the examples of that task's templates and gives the mean and
spread of the per-template values (the prompt sensitivity). The bootstrap resamples source rows (a
cluster bootstrap): a row rendered by k pooled templates is one draw with its k examples, so the pooled
interval is not narrowed by sqrt(k); `n_rows` counts the rows, `n` the examples. macro-F1 averages over
`macro_f1_classes` (the classes among the references), as the report and the baselines do.

Perplexity (from the reference completions' summed NLL) is reported in its own field, not bootstrapped.
`cut_short` counts the generated answers `max_new_tokens` cut before they ended (None for ranked
templates); they are scored as generated so far, so a template with many such answers is scored on
unfinished answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from instructkit.config import EvalConfig
from instructkit.errors import ConfigError
from instructkit.evaluate.bootstrap import bootstrap_ci
from instructkit.evaluate.groups import cluster_ids, dataset_of, group_keys
from instructkit.evaluate.metric_registry import METRICS, get_metric, macro_f1_classes, macro_f1_metric
from instructkit.evaluate.metrics import confusion, perplexity
from instructkit.evaluate.template_scoring import _Scored

NOT_BOOTSTRAPPED = {"perplexity"}  # reported in its own field, from log-likelihoods, not predictions


def _metric_names(exs: Sequence[dict], template_id: str, cfg: EvalConfig) -> list[str]:
    """cfg.metrics[template] if set, else the examples' own `metrics`, else the task family's defaults."""
    from instructkit.templates.template import DEFAULT_METRICS

    names = (cfg.metrics.get(template_id) or exs[0].get("metrics")
             or list(DEFAULT_METRICS.get(exs[0]["task"], ())))
    if not names:
        names = ["accuracy", "macro_f1"] if exs[0].get("choices") else ["rougeL"]
    for name in names:
        if name not in METRICS and name not in NOT_BOOTSTRAPPED:
            raise ConfigError(f"template {template_id!r}: unknown metric {name!r} "
                              f"(known: {', '.join(sorted(METRICS))})")
    return [n for n in names if n not in NOT_BOOTSTRAPPED]


def _metric_spec(name: str, labels: list[str] | None, refs: Sequence[str]) -> Any:
    """The registry metric; macro-F1 over `macro_f1_classes(refs, labels)` (the one class-set definition).

    Fixing the class set keeps an unparseable generated answer from becoming a class of its own.
    """
    if name == "macro_f1":
        return macro_f1_metric(macro_f1_classes(refs, labels))
    return get_metric(name)


def _metric_values(names: Sequence[str], labels: list[str] | None, preds: list[str], refs: list[str],
                   resamples: int | None, seed: int, clusters: list[int] | None = None
                   ) -> dict[str, dict[str, float]]:
    """{name: {"value", "low", "high"}}; without `resamples` (validation) low = high = value. `clusters`:
    source-row codes of the examples (cluster bootstrap)."""
    out = {}
    for name in names:
        spec = _metric_spec(name, labels, refs)
        if resamples:
            value, low, high = bootstrap_ci(spec, preds, refs, n_resamples=resamples, seed=seed,
                                            clusters=clusters)
        else:
            value = low = high = float(spec.fn(preds, refs))
        out[name] = {"value": value, "low": low, "high": high}
    return out


def _metric_names_by_template(examples: Sequence[dict], chosen: Sequence[int], cfg: EvalConfig
                              ) -> dict[str, list[str]]:
    """Metric names per (dataset, template) group key of the chosen examples."""
    picked = [examples[i] for i in chosen]
    by_group: dict[str, list[dict]] = {}
    for key, ex in zip(group_keys(picked), picked):
        by_group.setdefault(key, []).append(ex)
    return {key: _metric_names(exs, exs[0]["template_id"], cfg) for key, exs in by_group.items()}


def _total(counts: Any) -> int | None:
    """The sum of the counts that are not None; None when all are (no template generated)."""
    known = [c for c in counts if c is not None]
    return sum(known) if known else None


def _perplexity(nll: tuple[float, int] | None) -> float | None:
    if nll is None or nll[1] == 0:
        return None
    return perplexity(*nll)


def _template_summary(scored: _Scored, exs: Sequence[dict], names: list[str], resamples: int | None,
                      seed: int) -> dict[str, Any]:
    clusters = cluster_ids(scored.records)
    summary: dict[str, Any] = {
        "template_id": exs[0]["template_id"],
        "dataset": dataset_of(exs[0]),
        "task": exs[0]["task"],
        "held_out": bool(exs[0].get("held_out", False)),
        "n": len(scored.predictions),
        "n_rows": len(set(clusters)),
        "scored_by": "rank" if scored.records[0]["choice_logprobs"] is not None else "generation",
        "metrics": _metric_values(names, scored.labels, scored.predictions, scored.references, resamples,
                                  seed, clusters),
        "perplexity": _perplexity(scored.nll),
        "mean_prompt_tokens": float(np.mean(scored.prompt_tokens)),
        "truncated_prompts": scored.truncated,
        "unparseable": scored.unparseable,
        "cut_short": scored.cut_short,
    }
    if scored.labels is not None:
        labels = scored.labels
        summary["confusion"] = {"labels": labels,
                                "matrix": confusion(scored.predictions, scored.references, labels)}
    return summary


def _task_summaries(scored: dict[str, _Scored], summaries: dict[str, dict], names: dict[str, list[str]],
                    resamples: int | None, seed: int) -> dict[str, dict[str, Any]]:
    """Per (dataset, task): metrics pooled over the task's templates (cluster bootstrap over source rows),
    and the per-template mean and spread."""
    groups: dict[str, list[str]] = {}
    for tid, summary in summaries.items():
        groups.setdefault(f"{summary['dataset']}/{summary['task']}", []).append(tid)
    tasks = {}
    for key, tids in groups.items():
        shared = [n for n in names[tids[0]] if all(n in names[t] for t in tids)]
        preds = [p for t in tids for p in scored[t].predictions]
        refs = [r for t in tids for r in scored[t].references]
        labels = None
        if all(scored[t].labels is not None for t in tids):
            labels = list(dict.fromkeys(label for t in tids for label in scored[t].labels or []))
        nll = [scored[t].nll for t in tids if scored[t].nll is not None]
        per_template = {n: [summaries[t]["metrics"][n]["value"] for t in tids] for n in shared}
        clusters = cluster_ids([r for t in tids for r in scored[t].records])
        tasks[key] = {
            "dataset": summaries[tids[0]]["dataset"],
            "task": summaries[tids[0]]["task"],
            "templates": tids,
            "held_out": all(summaries[t]["held_out"] for t in tids),
            "n": len(preds),
            "n_rows": len(set(clusters)),
            "metrics": _metric_values(shared, labels, preds, refs, resamples, seed, clusters),
            "template_mean": {n: float(np.mean(v)) for n, v in per_template.items()},
            "template_std": {n: float(np.std(v)) for n, v in per_template.items()},
            "perplexity": _perplexity((sum(a for a, _ in nll), sum(b for _, b in nll))) if nll else None,
            "unparseable": sum(summaries[t]["unparseable"] for t in tids),
            "cut_short": _total(summaries[t]["cut_short"] for t in tids),
        }
    return tasks
