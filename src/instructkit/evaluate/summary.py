"""Metrics of scored templates: per-template and per-task summaries with bootstrap confidence intervals.

Metrics per template come from the examples' `metrics` (or `cfg.metrics[template_id]`), each with a
percentile-bootstrap 95% interval over examples. Per task, `tasks["<dataset>/<task>"]` pools the examples
of that task's templates (interval over the pooled examples: a source row rendered by several templates
appears several times, so these pooled intervals are somewhat optimistic) and gives the mean and spread
of the per-template values (the prompt sensitivity).

Perplexity (from the reference completions' summed NLL) is reported in its own field, not bootstrapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from instructkit.config import EvalConfig
from instructkit.errors import ConfigError
from instructkit.evaluate.bootstrap import bootstrap_ci
from instructkit.evaluate.metric_registry import METRICS, get_metric, macro_f1_metric
from instructkit.evaluate.metrics import confusion, perplexity
from instructkit.evaluate.template_scoring import _dataset, _Scored

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


def _metric_spec(name: str, labels: list[str] | None, preds: Sequence[str], refs: Sequence[str]) -> Any:
    """The registry metric; macro-F1 of a choice template over the classes seen in refs and valid preds.

    Fixing the class set keeps an unparseable generated answer from becoming a class of its own.
    """
    if name == "macro_f1" and labels is not None:
        seen = set(refs) | {p for p in preds if p in labels}
        return macro_f1_metric([c for c in labels if c in seen] + sorted(set(refs) - set(labels)))
    return get_metric(name)


def _metric_values(names: Sequence[str], labels: list[str] | None, preds: list[str], refs: list[str],
                   resamples: int | None, seed: int) -> dict[str, dict[str, float]]:
    """{name: {"value", "low", "high"}}; without `resamples` (validation) low = high = value."""
    out = {}
    for name in names:
        spec = _metric_spec(name, labels, preds, refs)
        if resamples:
            value, low, high = bootstrap_ci(spec, preds, refs, n_resamples=resamples, seed=seed)
        else:
            value = low = high = float(spec.fn(preds, refs))
        out[name] = {"value": value, "low": low, "high": high}
    return out


def _metric_names_by_template(examples: Sequence[dict], chosen: Sequence[int], cfg: EvalConfig
                              ) -> dict[str, list[str]]:
    by_template: dict[str, list[dict]] = {}
    for i in chosen:
        by_template.setdefault(examples[i]["template_id"], []).append(examples[i])
    return {tid: _metric_names(exs, tid, cfg) for tid, exs in by_template.items()}


def _perplexity(nll: tuple[float, int] | None) -> float | None:
    if nll is None or nll[1] == 0:
        return None
    return perplexity(*nll)


def _template_summary(scored: _Scored, exs: Sequence[dict], names: list[str], resamples: int | None,
                      seed: int) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "dataset": _dataset(exs[0]),
        "task": exs[0]["task"],
        "held_out": bool(exs[0].get("held_out", False)),
        "n": len(scored.predictions),
        "scored_by": "rank" if scored.records[0]["choice_logprobs"] is not None else "generation",
        "metrics": _metric_values(names, scored.labels, scored.predictions, scored.references, resamples,
                                  seed),
        "perplexity": _perplexity(scored.nll),
        "mean_prompt_tokens": float(np.mean(scored.prompt_tokens)),
        "truncated_prompts": scored.truncated,
        "unparseable": scored.unparseable,
    }
    if scored.labels is not None:
        labels = scored.labels
        summary["confusion"] = {"labels": labels,
                                "matrix": confusion(scored.predictions, scored.references, labels)}
    return summary


def _task_summaries(scored: dict[str, _Scored], summaries: dict[str, dict], names: dict[str, list[str]],
                    resamples: int | None, seed: int) -> dict[str, dict[str, Any]]:
    """Per (dataset, task): metrics pooled over the task's templates, and the per-template mean and spread."""
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
        tasks[key] = {
            "dataset": summaries[tids[0]]["dataset"],
            "task": summaries[tids[0]]["task"],
            "templates": tids,
            "held_out": all(summaries[t]["held_out"] for t in tids),
            "n": len(preds),
            "metrics": _metric_values(shared, labels, preds, refs, resamples, seed),
            "template_mean": {n: float(np.mean(v)) for n, v in per_template.items()},
            "template_std": {n: float(np.std(v)) for n, v in per_template.items()},
            "perplexity": _perplexity((sum(a for a, _ in nll), sum(b for _, b in nll))) if nll else None,
            "unparseable": sum(summaries[t]["unparseable"] for t in tids),
        }
    return tasks
