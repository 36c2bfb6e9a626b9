"""The base-vs-fine-tuned comparison report: ``report.json``, ``report.md`` and ``report.html``.

Inputs are what the evaluator wrote for each model (``eval.json`` as a dict, ``predictions.jsonl``
as a list of dicts), optionally the base model's k-shot evaluations, the training split (for the
baselines) and the training run's ``metrics.jsonl``. Everything is recomputed from the per-example
predictions, so that base and tuned are scored on exactly the same examples:

1. **Align** the two prediction lists on ``(template_id, source_id, index)``; examples present on one
   side only are dropped and counted (``n_unpaired``); a pair whose references differ means the two
   evaluations saw different data and raises :class:`~instructkit.errors.DataError`.
2. **Compare** per template and per task (``dataset/task``): for each metric of the template, base and
   tuned value with a percentile-bootstrap 95% CI, and ``delta = tuned - base`` with a PAIRED
   bootstrap CI and p-value (each resample draws one set of examples and scores both models on it,
   so the per-example correlation between the models cancels; with 200 examples and 1000 resamples
   that is 1000 index vectors of 200). macro-F1 averages over a fixed label set: the template's
   answer choices that occur as a reference or as either model's prediction, so base and tuned
   are averaged over the same classes even when one of them never predicts a class.
3. **Sections**: templates the model trained on ("seen"); held-out templates of trained tasks
   ("generalisation to unseen instructions"); tasks with no training example at all ("forgetting
   checks": did fine-tuning hurt or help a task it never saw?).
4. **Baselines** (majority, TF-IDF + logistic regression, lead sentence, copy source) scored with the
   same metrics and CIs; the **few-shot** baseline (base model with k in-context examples) beside
   the tuned model's zero-shot figure, with the mean prompt length each needs.
5. **Plots** (matplotlib, Agg canvas, no pyplot state): deltas with CIs, training curves, confusion
   matrices, headline metric per system. The HTML embeds them as ``data:image/png;base64`` URIs and
   references nothing outside the file.

The report's ``headline`` lists, per task, the main metric (macro_f1 for choice tasks, rougeL for
summarization and title generation, bleu for translation, token_f1 for extractive QA), its delta,
the CI and ``significant`` (the CI excludes 0).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructkit.errors import DataError
from instructkit.evaluate import metrics as M
from instructkit.evaluate.baselines import baseline_predictions, metric_spec, score_baselines
from instructkit.io import atomic_open, write_json

__all__ = ["ReportPaths", "align_predictions", "build_report", "model_card_rows"]

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
SEEN, UNSEEN, UNTRAINED = "seen", "unseen_instruction", "untrained_task"
SECTION_TITLES = {
    SEEN: "Trained instructions",
    UNSEEN: "Generalisation to unseen instructions",
    UNTRAINED: "Forgetting checks (tasks not trained at all)",
}
SECTION_NOTES = {
    SEEN: "Templates whose examples the model was fine-tuned on (test rows are unseen source rows).",
    UNSEEN: "Templates held out of training, for tasks the model did train on with other wordings.",
    UNTRAINED: "Tasks with no training example at all: a drop here is forgetting, a gain is transfer.",
}
MAIN_METRIC_BY_TASK = {
    "summarization": "rougeL",
    "title_generation": "rougeL",
    "translation": "bleu",
    "extractive_qa": "token_f1",
}
PROMPT_CHARS = 400  # example prompts are cut to this many characters in the report
N_EXAMPLES = 3  # wins and regressions shown per template
MAX_CONFUSION_LABELS = 12  # larger label sets are listed in the JSON but not plotted


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`build_report` wrote the report."""

    json: Path
    md: Path
    html: Path


# ====================================================================== alignment


@dataclass
class PairedTemplate:
    """Base and tuned predictions of one template, aligned example by example."""

    template_id: str
    keys: list[tuple] = field(default_factory=list)
    base: list[dict] = field(default_factory=list)
    tuned: list[dict] = field(default_factory=list)
    n_unpaired: int = 0


def _record_key(record: dict, side: str, i: int) -> tuple:
    """``(template_id, source_id, index)`` of a prediction record."""
    if "template_id" not in record:
        raise DataError(f"{side} predictions: record {i} has no 'template_id' field")
    return (str(record["template_id"]), str(record.get("source_id")), record.get("index"))


def _keyed(records: Sequence[dict], side: str) -> dict[tuple, dict]:
    """Map each record's key to the record; a repeated key is a DataError."""
    out: dict[tuple, dict] = {}
    for i, record in enumerate(records):
        key = _record_key(record, side, i)
        if key in out:
            raise DataError(f"{side} predictions: record {i} repeats (template_id, source_id, index) = {key}")
        out[key] = record
    return out


def _sort_key(key: tuple) -> tuple:
    """Order keys by template, then index (numbers before None), then source id."""
    tid, source, index = key
    return (tid, index is None, index if isinstance(index, (int, float)) else 0, str(index), source)


def align_predictions(
    base_predictions: Sequence[dict], tuned_predictions: Sequence[dict]
) -> dict[str, PairedTemplate]:
    """Pair base and tuned predictions by ``(template_id, source_id, index)``, whatever their order.

    Returns ``{template_id: PairedTemplate}`` with both lists in the same (sorted-by-index) order.
    Raises DataError when a pair's references differ (the evaluations saw different data).
    """
    base, tuned = _keyed(base_predictions, "base"), _keyed(tuned_predictions, "tuned")
    paired: dict[str, PairedTemplate] = {}
    for key in sorted(set(base) & set(tuned), key=_sort_key):
        b, t = base[key], tuned[key]
        if _text(b.get("reference")) != _text(t.get("reference")):
            raise DataError(
                f"template {key[0]!r}, source {key[1]!r}, index {key[2]}: base and tuned predictions have "
                f"different references ({b.get('reference')!r} vs {t.get('reference')!r}); "
                "were both models evaluated on the same data file?"
            )
        group = paired.setdefault(key[0], PairedTemplate(key[0]))
        group.keys.append(key)
        group.base.append(b)
        group.tuned.append(t)
    for key in set(base) ^ set(tuned):
        group = paired.get(key[0])
        if group is not None:
            group.n_unpaired += 1
    only = sorted({k[0] for k in set(base) ^ set(tuned)} - set(paired))
    if only:
        log.warning("templates with predictions from one model only (left out): %s", ", ".join(only))
    if not paired:
        raise DataError("base and tuned predictions share no (template_id, source_id, index) key")
    return paired


def _text(value: Any) -> str:
    """A prediction or reference as text: None (unparseable) becomes ''."""
    return "" if value is None else str(value)


# =================================================================== template facts


@dataclass
class TemplateInfo:
    """What the report needs to know about one template."""

    template_id: str
    dataset: str
    task: str
    held_out: bool
    choices: list[str] | None
    metrics: list[str]
    section: str = SEEN
    f1_labels: list[str] | None = None  # the macro-F1 class set, fixed for every system (see _f1_labels)

    @property
    def task_key(self) -> str:
        return f"{self.dataset}/{self.task}"


def _choices_from_records(records: Sequence[dict]) -> list[str] | None:
    """Answer choices from ``choice_logprobs`` when it is a {choice: logprob} dict."""
    for record in records:
        logprobs = record.get("choice_logprobs")
        if isinstance(logprobs, dict) and logprobs:
            return [str(c) for c in logprobs]
    return None


def _is_choice_template(records: Sequence[dict]) -> bool:
    """Rank-classified or choice-mapped predictions carry ``choice_logprobs`` or ``correct``."""
    return any(r.get("choice_logprobs") is not None or r.get("correct") is not None for r in records)


def _first_field(entries: Sequence[dict], key: str) -> Any:
    """The first non-empty ``key`` among eval.json template entries."""
    return next((e[key] for e in entries if e.get(key)), None)


def _template_info(
    pair: PairedTemplate, evals: Sequence[dict], examples_by_tid: dict[str, dict]
) -> TemplateInfo:
    """Dataset, task, held-out flag, answer choices and metric names of one template.

    Choices come from an example of the template (test or train data) when one is given, else from
    the predictions' ``choice_logprobs`` keys, else (a choice template with no list anywhere) from
    the sorted union of references and both models' predictions, which is at least the same set
    for both models. Metric names come from the eval.json files (the evaluator's choice, including
    overrides), else from the examples' ``metrics`` field, else a default by kind.
    """
    tid, records = pair.template_id, pair.base + pair.tuned
    first = records[0]
    example = examples_by_tid.get(tid, {})
    entries = [e.get("templates", {}).get(tid, {}) for e in evals]
    dataset = str(first.get("dataset") or example.get("dataset") or _first_field(entries, "dataset")
                  or "data")
    task = str(first.get("task") or example.get("task") or _first_field(entries, "task") or "task")
    held_out = any(bool(r.get("held_out")) for r in records) or any(bool(e.get("held_out")) for e in entries)
    if example.get("choices"):
        choices = [str(c) for c in example["choices"]]
    else:
        choices = _choices_from_records(records)
    if choices is None and _is_choice_template(records):
        choices = sorted({_text(r.get(key)) for r in records for key in ("reference", "prediction")})
    metrics: list[str] = []
    for entry in entries:
        metrics += [m for m in entry.get("metrics", {}) if m not in metrics]
    if not metrics:
        metrics = list(example.get("metrics") or (["accuracy", "macro_f1"] if choices else ["rougeL"]))
    return TemplateInfo(tid, dataset, task, held_out, choices, metrics)


def _f1_labels(choices: list[str] | None, pair: PairedTemplate) -> list[str] | None:
    """The classes macro-F1 averages over, the same for base, tuned, few-shot and baselines.

    The answer choices that occur as a reference or as either model's prediction, in choice
    order. A choice that occurs nowhere would add F1 = 0 for every system alike (with 4 choices
    and one absent class, no model could score above 0.75), so it is left out; a choice that only
    one model predicts stays in, so both models are averaged over the same classes.
    """
    if not choices:
        return None
    seen = set()
    for records, key in ((pair.base, "reference"), (pair.base, "prediction"), (pair.tuned, "prediction")):
        seen.update(_texts(records, key, choices))
    return [c for c in choices if c in seen] or list(choices)


def _assign_sections(infos: dict[str, TemplateInfo], train_examples: Sequence[dict] | None) -> None:
    """Seen / unseen instruction / untrained task, per template (in place).

    A task (dataset/task) counts as trained when a training example of it was used (train
    examples flagged ``held_out`` were not trained on); without training examples, when one of its
    templates in the evaluation is not held out. A template is unseen when it is flagged held out
    or (given training examples) has none of its own.
    """
    trained_tasks: set[str] = set()
    trained_templates: set[str] = set()
    if train_examples:
        for e in train_examples:
            if not e.get("held_out"):
                trained_tasks.add(f"{e.get('dataset')}/{e.get('task')}")
                trained_templates.add(str(e.get("template_id")))
    else:
        trained_tasks = {i.task_key for i in infos.values() if not i.held_out}
    for info in infos.values():
        unseen = info.held_out or (bool(train_examples) and info.template_id not in trained_templates)
        if info.task_key not in trained_tasks:
            info.section = UNTRAINED
        else:
            info.section = UNSEEN if unseen else SEEN


# ======================================================================= comparison


def _as_choice(text: str, choices: Sequence[str] | None) -> str:
    """Map ``text`` to the answer choice it names (exact, stripped, case-insensitive), else keep it.

    References may carry the template's leading space (" 5") while predictions are choice texts.
    """
    if not choices or text in choices:
        return text
    stripped = text.strip()
    for choice in choices:
        if choice.strip() == stripped:
            return choice
    for choice in choices:
        if choice.strip().lower() == stripped.lower():
            return choice
    return text


def _texts(records: Sequence[dict], key: str, choices: Sequence[str] | None) -> list[str]:
    """One field of each record as text, mapped onto the answer choices for choice templates."""
    return [_as_choice(_text(r.get(key)), choices) for r in records]


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
) -> dict[str, dict[str, Any]]:
    """``{metric: {"base": ci, "tuned": ci, "delta": {delta, low, high, p_value, n}}}``.

    All three bootstraps use the same seed, hence the same resampled index sets.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in metric_names:
        spec = metric_spec(name, labels)
        if spec is None:
            continue
        kwargs = {"n_resamples": n_resamples, "confidence": CONFIDENCE, "seed": seed}
        out[name] = {
            "base": _ci(*M.bootstrap_ci(spec, base_preds, refs, **kwargs)),
            "tuned": _ci(*M.bootstrap_ci(spec, tuned_preds, refs, **kwargs)),
            "delta": M.paired_bootstrap_diff(spec, base_preds, tuned_preds, refs, **kwargs),
        }
        out[name]["delta"]["significant"] = _significant(out[name]["delta"])
    return out


def _significant(delta: dict[str, float]) -> bool:
    """The paired CI excludes 0."""
    return bool(delta["low"] > 0 or delta["high"] < 0)


def _template_entry(
    info: TemplateInfo, pair: PairedTemplate, base: dict, tuned: dict, *, n_resamples: int, seed: int
) -> dict[str, Any]:
    """report.json entry of one template."""
    refs = _texts(pair.base, "reference", info.choices)
    base_preds = _texts(pair.base, "prediction", info.choices)
    tuned_preds = _texts(pair.tuned, "prediction", info.choices)
    eval_b = base.get("templates", {}).get(info.template_id, {})
    eval_t = tuned.get("templates", {}).get(info.template_id, {})
    return {
        "dataset": info.dataset,
        "task": info.task,
        "held_out": info.held_out,
        "section": info.section,
        "n": len(refs),
        "n_unpaired": pair.n_unpaired,
        "labels": info.choices,
        "f1_labels": info.f1_labels,
        "metrics": _compare_metrics(
            info.metrics, info.f1_labels, refs, base_preds, tuned_preds, n_resamples=n_resamples, seed=seed
        ),
        "perplexity": {"base": eval_b.get("perplexity"), "tuned": eval_t.get("perplexity")},
        "mean_prompt_tokens": {
            "base": eval_b.get("mean_prompt_tokens"), "tuned": eval_t.get("mean_prompt_tokens"),
        },
        "unparseable": {"base": eval_b.get("unparseable"), "tuned": eval_t.get("unparseable")},
    }


def _task_groups(infos: dict[str, TemplateInfo]) -> dict[str, list[str]]:
    """Report key -> template ids. Held-out templates of a trained task form their own group
    (``dataset/task (unseen instructions)``), so seen and unseen wordings are never pooled."""
    groups: dict[str, list[str]] = defaultdict(list)
    for tid, info in infos.items():
        key = info.task_key + (" (unseen instructions)" if info.section == UNSEEN else "")
        groups[key].append(tid)
    return dict(groups)


def _task_entry(
    key: str, tids: list[str], infos: dict[str, TemplateInfo], pairs: dict[str, PairedTemplate],
    *, n_resamples: int, seed: int,
) -> dict[str, Any]:
    """report.json entry of one task group: every metric over the pooled examples of the
    templates that list it; macro-F1 over the union of their answer choices."""
    first = infos[tids[0]]
    metric_names: list[str] = []
    for tid in tids:
        metric_names += [m for m in infos[tid].metrics if m not in metric_names]
    metrics: dict[str, Any] = {}
    n = 0
    for name in metric_names:
        members = [t for t in tids if name in infos[t].metrics]
        labels: list[str] | None = []
        for t in members:
            labels += [c for c in infos[t].f1_labels or [] if c not in labels]
        refs, base_preds, tuned_preds = [], [], []
        for t in members:
            choices = infos[t].choices
            refs += _texts(pairs[t].base, "reference", choices)
            base_preds += _texts(pairs[t].base, "prediction", choices)
            tuned_preds += _texts(pairs[t].tuned, "prediction", choices)
        n = max(n, len(refs))
        metrics.update(_compare_metrics([name], labels or None, refs, base_preds, tuned_preds,
                                        n_resamples=n_resamples, seed=seed))
    return {
        "dataset": first.dataset,
        "task": first.task,
        "section": first.section,
        "templates": tids,
        "n": n,
        "metrics": metrics,
    }


def _main_metric(metric_names: Sequence[str], task: str, is_choice: bool) -> str | None:
    """macro_f1 (else accuracy) for choice tasks; rougeL / bleu / token_f1 by task family; else the first."""
    preferred = ["macro_f1", "accuracy"] if is_choice else [MAIN_METRIC_BY_TASK.get(task, "")]
    for name in preferred:
        if name in metric_names:
            return name
    return metric_names[0] if metric_names else None


def _headline(tasks: dict[str, dict], infos: dict[str, TemplateInfo]) -> list[dict[str, Any]]:
    """One row per task group: main metric, base, tuned, delta and its CI, significant."""
    rows = []
    order = {SEEN: 0, UNSEEN: 1, UNTRAINED: 2}
    for key, entry in sorted(tasks.items(), key=lambda kv: (order[kv[1]["section"]], kv[0])):
        is_choice = any(infos[t].choices for t in entry["templates"])
        metric = _main_metric(list(entry["metrics"]), entry["task"], is_choice)
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
            "n": m["delta"]["n"],
            "significant": m["delta"]["significant"],
        })
    return rows


# ================================================================ baselines, few-shot


def _baseline_examples(infos: dict[str, TemplateInfo], pairs: dict[str, PairedTemplate]) -> list[dict]:
    """The aligned test examples as prepared-data records, so baselines score the same examples."""
    out = []
    for tid, pair in pairs.items():
        info = infos[tid]
        for record in pair.base:
            out.append({
                "prompt": _text(record.get("prompt")),
                "completion": _as_choice(_text(record.get("reference")), info.choices),
                "choices": info.choices,
                "template_id": tid,
                "dataset": info.dataset,
                "task": info.task,
                "source_id": record.get("source_id"),
            })
    return out


def _baselines(
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


def _few_shot_rows(
    info: TemplateInfo, pair: PairedTemplate, base: dict, tuned: dict,
    few_shot: dict[int, tuple[dict, list[dict]]], *, n_resamples: int, seed: int,
) -> list[dict[str, Any]]:
    """Rows "base zero-shot", "base k-shot" (each k), "tuned zero-shot" for one template: every
    metric with its CI, and the mean prompt length in tokens (demonstrations make prompts longer).

    A k-shot evaluation in which no example of the template got a demonstration (its template had no
    example in the pool: a held-out template is never in the train split) is left out rather than shown
    as k-shot; one where only some examples fell short says how many."""
    tid = info.template_id
    systems: list[tuple[str, int, dict, list[dict]]] = [("base zero-shot", 0, base, pair.base)]
    for k in sorted(few_shot, key=int):
        eval_k, preds_k = few_shot[k]
        records = [r for r in preds_k if str(r.get("template_id")) == tid]
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
        refs = _texts(records, "reference", info.choices)
        preds = _texts(records, "prediction", info.choices)
        metrics = {}
        for metric in info.metrics:
            spec = metric_spec(metric, info.f1_labels)
            if spec is not None:
                metrics[metric] = _ci(*M.bootstrap_ci(spec, preds, refs, n_resamples=n_resamples, seed=seed))
        rows.append({
            "system": name,
            "k": k,
            "n": len(refs),
            "metrics": metrics,
            "mean_prompt_tokens": evaluation.get("templates", {}).get(tid, {}).get("mean_prompt_tokens"),
        })
    return rows


# ========================================================================= examples


def _margin(record: dict, gold: str, choices: Sequence[str]) -> float | None:
    """log p(gold) - max log p(other choice) from ``choice_logprobs`` (dict or list), else None."""
    logprobs = record.get("choice_logprobs")
    if isinstance(logprobs, list) and len(logprobs) == len(choices):
        logprobs = dict(zip(choices, logprobs))
    if not isinstance(logprobs, dict) or gold not in logprobs or len(logprobs) < 2:
        return None
    try:
        others = [float(v) for c, v in logprobs.items() if c != gold]
        return float(logprobs[gold]) - max(others)
    except (TypeError, ValueError):
        return None


def _shown(record_b: dict, record_t: dict, gain: float | None) -> dict[str, Any]:
    """One example for the report: prompt cut to PROMPT_CHARS characters."""
    prompt = _text(record_b.get("prompt"))
    if len(prompt) > PROMPT_CHARS:
        prompt = prompt[: PROMPT_CHARS - 1] + "…"
    return {
        "source_id": record_b.get("source_id"),
        "index": record_b.get("index"),
        "prompt": prompt,
        "reference": _text(record_b.get("reference")),
        "base": _text(record_b.get("prediction")),
        "tuned": _text(record_t.get("prediction")),
        "gain": gain,
    }


def _choice_examples(info: TemplateInfo, pair: PairedTemplate) -> dict[str, list[dict]]:
    """Wins: tuned right, base wrong; regressions: the reverse. Ordered by the change in the
    gold choice's log-prob margin when ``choice_logprobs`` are present, else by example order."""
    refs = _texts(pair.base, "reference", info.choices)
    base_preds = _texts(pair.base, "prediction", info.choices)
    tuned_preds = _texts(pair.tuned, "prediction", info.choices)
    wins, losses = [], []
    for i, (ref, b, t) in enumerate(zip(refs, base_preds, tuned_preds)):
        if (b == ref) == (t == ref):
            continue
        mb = _margin(pair.base[i], ref, info.choices or [])
        mt = _margin(pair.tuned[i], ref, info.choices or [])
        gain = mt - mb if mb is not None and mt is not None else None
        (wins if t == ref else losses).append((i, gain))
    wins.sort(key=lambda x: -(x[1] if x[1] is not None else 0.0))
    losses.sort(key=lambda x: x[1] if x[1] is not None else 0.0)
    return {
        "wins": [_shown(pair.base[i], pair.tuned[i], g) for i, g in wins[:N_EXAMPLES]],
        "regressions": [_shown(pair.base[i], pair.tuned[i], g) for i, g in losses[:N_EXAMPLES]],
    }


def _generation_examples(pair: PairedTemplate) -> dict[str, list[dict]]:
    """Largest per-example rougeL gains (tuned - base) and losses."""
    per_example = M.get_metric("rougeL").per_example
    refs = _texts(pair.base, "reference", None)
    gains = per_example(_texts(pair.tuned, "prediction", None), refs) - per_example(
        _texts(pair.base, "prediction", None), refs
    )
    order = sorted(range(len(refs)), key=lambda i: (-gains[i], i))
    wins = [i for i in order if gains[i] > 0][:N_EXAMPLES]
    losses = [i for i in reversed(order) if gains[i] < 0][:N_EXAMPLES]
    return {
        "wins": [_shown(pair.base[i], pair.tuned[i], float(gains[i])) for i in wins],
        "regressions": [_shown(pair.base[i], pair.tuned[i], float(gains[i])) for i in losses],
    }


def _confusion(info: TemplateInfo, pair: PairedTemplate) -> dict[str, Any]:
    """Confusion counts over the template's answer choices, base and tuned."""
    labels = list(info.choices or [])
    refs = _texts(pair.base, "reference", labels)
    return {
        "labels": labels,
        "base": M.confusion(_texts(pair.base, "prediction", labels), refs, labels),
        "tuned": M.confusion(_texts(pair.tuned, "prediction", labels), refs, labels),
    }


# ===================================================================== training log


LOG_COUNTERS = {"step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "val_loss", "val_ppl", "time",
                "elapsed", "elapsed_s", "grad_norm", "examples", "wall_s"}


def read_metrics_log(path: Path | None) -> list[dict]:
    """Records of ``metrics.jsonl`` that have a step; unreadable lines (a crash mid-write) skipped."""
    if path is None:
        return []
    path = Path(path)
    if not path.is_file():
        log.warning("training log %s not found; no training curves", path)
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON; skipped", path, number)
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records.append(record)
    return records


def _series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry a finite number under ``key``."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r["step"]))
            ys.append(float(v))
    return xs, ys


def _task_metric_keys(records: Sequence[dict]) -> list[str]:
    """Flat validation task metrics in the log ("macro_f1", "rougeL"; not per-template "t/macro_f1")."""
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if k in LOG_COUNTERS or "/" in k or k in keys or not numeric:
                continue
            if k in M.METRICS or k.startswith("val_"):
                keys.append(k)
    return keys


def _training_summary(records: Sequence[dict], path: Path | None) -> dict[str, Any] | None:
    """Last step, final training loss, best validation loss (step and value)."""
    if not records:
        return None if path is None else {"path": str(path), "n_records": 0}
    steps, losses = _series(records, "loss")
    vsteps, vlosses = _series(records, "val_loss")
    summary: dict[str, Any] = {
        "path": str(path),
        "n_records": len(records),
        "last_step": max(float(r["step"]) for r in records),
        "final_loss": losses[-1] if losses else None,
        "task_metrics": _task_metric_keys(records),
    }
    if vlosses:
        best = min(range(len(vlosses)), key=lambda i: vlosses[i])
        summary["best_val_loss"] = {"step": vsteps[best], "value": vlosses[best]}
    return summary


# ============================================================================ plots


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    """PNG bytes of a figure, without matplotlib's software/URL metadata."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _points(metric: str) -> float:
    """Multiplier to percentage points: fractions x100, 0-100 scores (BLEU, chrF) x1."""
    spec = M.METRICS.get(metric)
    return 1.0 if spec is not None and spec.scale == 100 else 100.0


def _delta_rows(report: dict[str, Any], main_only: bool) -> list[tuple[str, float, float, float, bool]]:
    """(label, delta, low, high, significant) in points for the delta chart."""
    rows = []
    for tid, entry in report["templates"].items():
        names = list(entry["metrics"])
        if main_only:
            main = _main_metric(names, entry["task"], bool(entry["labels"]))
            names = [main] if main else []
        for name in names:
            d = entry["metrics"][name]["delta"]
            k = _points(name)
            marker = "" if entry["section"] == SEEN else " †"
            label = f"{tid} · {name}{marker}"
            rows.append((label, d["delta"] * k, d["low"] * k, d["high"] * k, d["significant"]))
    return rows


def plot_deltas(report: dict[str, Any]) -> bytes | None:
    """Horizontal bars: delta (tuned - base) per template and metric, with the paired 95% CI.

    Green / red when the CI excludes 0 (better / worse), grey otherwise. With more than 40 bars
    only each template's main metric is drawn.
    """
    rows = _delta_rows(report, main_only=False)
    if len(rows) > 40:
        rows = _delta_rows(report, main_only=True)
    if not rows:
        return None
    fig = _figure(9, 1.2 + 0.32 * len(rows))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    deltas = [r[1] for r in rows]
    err = [[max(0.0, r[1] - r[2]) for r in rows], [max(0.0, r[3] - r[1]) for r in rows]]
    colours = ["#2e7d32" if r[4] and r[1] > 0 else "#c62828" if r[4] else "#9e9e9e" for r in rows]
    ax.barh(ys, deltas, xerr=err, color=colours, ecolor="#333333", capsize=3, height=0.6)
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("tuned - base (points: fractions x100; BLEU/chrF as is), 95% paired bootstrap CI")
    ax.set_title("Change from fine-tuning († = held-out template or task)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def plot_training(records: Sequence[dict]) -> bytes | None:
    """Training loss and validation loss per step; validation task metrics in a second panel."""
    steps, losses = _series(records, "loss")
    vsteps, vlosses = _series(records, "val_loss")
    metric_keys = _task_metric_keys(records)
    if not losses and not vlosses and not metric_keys:
        return None
    panels = 2 if metric_keys else 1
    fig = _figure(5.5 * panels, 3.6)
    ax = fig.add_subplot(1, panels, 1)
    if losses:
        ax.plot(steps, losses, label="train loss", color="#1565c0", linewidth=1)
    if vlosses:
        ax.plot(vsteps, vlosses, label="validation loss", color="#ef6c00", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / label token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if metric_keys:
        ax2 = fig.add_subplot(1, panels, 2)
        for key in metric_keys:
            xs, ys = _series(records, key)
            ax2.plot(xs, ys, marker="o", linewidth=1.5, label=key)
        ax2.set_xlabel("optimizer step")
        ax2.set_title("Validation task metrics")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_confusion(tid: str, confusion: dict[str, Any]) -> bytes | None:
    """Base and tuned confusion matrices side by side (rows: reference, columns: prediction)."""
    labels = confusion["labels"]
    if not labels or len(labels) > MAX_CONFUSION_LABELS:
        return None
    import numpy as np

    size = 0.9 + 0.32 * len(labels)  # inches per matrix: 5 labels -> 2.5
    fig = _figure(2 * size + 1.5, size + 0.8)
    for i, side in enumerate(("base", "tuned")):
        ax = fig.add_subplot(1, 2, i + 1)
        matrix = np.asarray(confusion[side], dtype=float)
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1.0, matrix.max()))
        for (r, c), count in np.ndenumerate(matrix):
            colour = "white" if count > 0.6 * matrix.max() and count > 0 else "black"
            ax.text(c, r, f"{int(count)}", ha="center", va="center", fontsize=8, color=colour)
        ticks = range(len(labels))
        short = [label if len(label) <= 10 else label[:9] + "…" for label in labels]
        ax.set_xticks(ticks, short, fontsize=8, rotation=45 if max(map(len, short)) > 3 else 0)
        ax.set_yticks(ticks, short, fontsize=8)
        ax.set_xlabel("predicted")
        if i == 0:
            ax.set_ylabel("reference")
        ax.set_title(side)
    fig.suptitle(tid, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _system_scores(report: dict[str, Any]) -> list[tuple[str, str, dict[str, tuple[float, float, float]]]]:
    """(template, main metric, {system: (value, low, high) in points}) for the systems chart."""
    out = []
    for tid, entry in report["templates"].items():
        metric = _main_metric(list(entry["metrics"]), entry["task"], bool(entry["labels"]))
        if metric is None:
            continue
        k = _points(metric)
        systems: dict[str, tuple[float, float, float]] = {}
        rows = report["few_shot"].get(tid) or [
            {"system": "base zero-shot", "metrics": {metric: entry["metrics"][metric]["base"]}},
            {"system": "tuned zero-shot", "metrics": {metric: entry["metrics"][metric]["tuned"]}},
        ]
        for row in rows:
            m = row["metrics"].get(metric)
            if m:
                systems[row["system"]] = (m["value"] * k, m["low"] * k, m["high"] * k)
        for name, scores in report["baselines"]["scores"].get(tid, {}).items():
            if metric in scores:
                m = scores[metric]
                systems[name] = (m["value"] * k, m["low"] * k, m["high"] * k)
        out.append((tid, metric, systems))
    return out


_SYSTEM_COLOURS = ["#90a4ae", "#64b5f6", "#1e88e5", "#0d47a1", "#2e7d32", "#f9a825", "#8d6e63", "#ab47bc"]


def plot_systems(report: dict[str, Any]) -> bytes | None:
    """Horizontal bars grouped by template: its main metric for base (zero- and k-shot), tuned and
    the baselines, with 95% CIs; each system keeps one colour. Shows at a glance whether tuning
    beats the cheap alternatives. At most 30 templates are drawn."""
    data = _system_scores(report)[:30]
    if not data:
        return None
    systems: list[str] = []
    for _, _, scores in data:
        systems += [s for s in scores if s not in systems]
    colour = {s: _SYSTEM_COLOURS[i % len(_SYSTEM_COLOURS)] for i, s in enumerate(systems)}
    n_bars = sum(len(scores) for _, _, scores in data)
    fig = _figure(9, 1.4 + 0.24 * n_bars + 0.25 * len(data))
    ax = fig.add_subplot()
    y, ticks, labels, seen = 0.0, [], [], set()
    for tid, metric, scores in reversed(data):
        group = list(scores.items())[::-1]
        ticks.append(y + (len(group) - 1) / 2)
        labels.append(f"{tid} · {metric}")
        for system, (v, lo, hi) in group:
            ax.barh(y, v, height=0.8, xerr=[[max(0.0, v - lo)], [max(0.0, hi - v)]], capsize=2,
                    ecolor="#555555", color=colour[system], label=None if system in seen else system)
            seen.add(system)
            y += 1
        y += 0.8  # gap between templates
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("main metric (points: fractions x100; BLEU/chrF as is), 95% bootstrap CI")
    ax.set_title("Base, few-shot, fine-tuned and baselines")
    handles, names = ax.get_legend_handles_labels()
    order = [names.index(s) for s in systems if s in names]
    ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


# ====================================================================== formatting


def _fmt(value: Any, metric: str | None = None, signed: bool = False, digits: int | None = None) -> str:
    """0.755 for fractions, 23.4 for 0-100 scores; '-' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    spec = M.METRICS.get(metric or "")
    if digits is None:
        digits = 1 if spec is not None and spec.scale == 100 else 3
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_ci(ci: dict[str, float], metric: str) -> str:
    return f"{_fmt(ci['value'], metric)} [{_fmt(ci['low'], metric)}, {_fmt(ci['high'], metric)}]"


def _fmt_delta(d: dict[str, Any], metric: str) -> str:
    star = " *" if d.get("significant") else ""
    low, high = _fmt(d["low"], metric, True), _fmt(d["high"], metric, True)
    return f"{_fmt(d['delta'], metric, True)} [{low}, {high}]{star}"


def _fmt_p(p: float, n_resamples: int) -> str:
    """p-value to 3 decimals; 0 means "below the bootstrap's resolution 2 / n_resamples"."""
    return f"<{2 / n_resamples:.3f}" if p == 0 else f"{p:.3f}"


def _comparison_rows(entries: dict[str, dict], n_resamples: int, second: str = "task") -> list[list[str]]:
    """Table rows: name, task (or section), metric, n, base [CI], tuned [CI], delta [CI], p."""
    rows = []
    for name, entry in entries.items():
        for metric, m in entry["metrics"].items():
            rows.append([
                name,
                f"{entry['dataset']}/{entry['task']}" if second == "task"
                else SECTION_TITLES[entry["section"]],
                metric, str(m["delta"]["n"]),
                _fmt_ci(m["base"], metric), _fmt_ci(m["tuned"], metric),
                _fmt_delta(m["delta"], metric), _fmt_p(m["delta"]["p_value"], n_resamples),
            ])
    return rows


COMPARISON_HEADERS = ["{name}", "{second}", "metric", "n", "base [95% CI]", "tuned [95% CI]",
                      "Δ tuned-base [95% CI]", "p"]


def _comparison_headers(name: str, second: str) -> list[str]:
    return [h.format(name=name, second=second) for h in COMPARISON_HEADERS]


def _headline_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[h["task"], SECTION_TITLES[h["section"]], h["metric"], _fmt(h["base"], h["metric"]),
             _fmt(h["tuned"], h["metric"]),
             _fmt_delta({"delta": h["delta"], "low": h["low"], "high": h["high"],
                         "significant": h["significant"]}, h["metric"]),
             _fmt_p(h["p_value"], report["settings"]["n_resamples"]), str(h["n"]),
             "yes" if h["significant"] else "no"]
            for h in report["headline"]]


HEADLINE_HEADERS = ["task", "section", "metric", "base", "tuned", "Δ [95% CI]", "p", "n", "significant"]


def _detail_rows(report: dict[str, Any]) -> list[list[str]]:
    """Per template: n, unpaired, perplexity and mean prompt tokens for each model, unparseable."""
    rows = []
    for tid, e in report["templates"].items():
        rows.append([tid, str(e["n"]), str(e["n_unpaired"]),
                     _fmt(e["perplexity"]["base"]), _fmt(e["perplexity"]["tuned"]),
                     _fmt(e["mean_prompt_tokens"]["base"], digits=1),
                     _fmt(e["unparseable"]["base"], digits=0),
                     _fmt(e["unparseable"]["tuned"], digits=0)])
    return rows


DETAIL_HEADERS = ["template", "n", "unpaired", "perplexity base", "perplexity tuned", "mean prompt tokens",
                  "unparseable base", "unparseable tuned"]


def _baseline_systems(report: dict[str, Any]) -> list[str]:
    """Names of the baselines that scored at least one template, in first-seen order."""
    names: list[str] = []
    for by_name in report["baselines"]["scores"].values():
        names += [n for n in by_name if n not in names]
    return names


def _baseline_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per template and metric: base, tuned, then each baseline, every value [CI]."""
    rows = []
    names = _baseline_systems(report)
    for tid, entry in report["templates"].items():
        baselines = report["baselines"]["scores"].get(tid, {})
        if not baselines:
            continue
        for metric, m in entry["metrics"].items():
            cells = [_fmt_ci(baselines[n][metric], metric) if metric in baselines.get(n, {}) else "-"
                     for n in names]
            rows.append([tid, metric, _fmt_ci(m["base"], metric), _fmt_ci(m["tuned"], metric), *cells])
    return rows


def _baseline_headers(report: dict[str, Any]) -> list[str]:
    return ["template", "metric", "base (zero-shot)", "tuned", *_baseline_systems(report)]


def _few_shot_table(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for tid, systems in report["few_shot"].items():
        if not any(row["k"] > 0 for row in systems):
            continue  # no k-shot evaluation of this template: nothing to compare
        entry = report["templates"][tid]
        metric = _main_metric(list(entry["metrics"]), entry["task"], bool(entry["labels"]))
        for row in systems:
            m = row["metrics"].get(metric)
            rows.append([tid, row["system"], metric or "-", _fmt_ci(m, metric) if m else "-",
                         _fmt(row["mean_prompt_tokens"], digits=1), str(row["n"])])
    return rows


FEW_SHOT_HEADERS = ["template", "system", "metric", "value [95% CI]", "mean prompt tokens", "n"]


# ========================================================================= markdown


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sections_in(report: dict[str, Any], key: str) -> list[tuple[str, dict[str, dict]]]:
    """(section, {name: entry}) for the sections that have entries, in reading order."""
    out = []
    for section in (SEEN, UNSEEN, UNTRAINED):
        entries = {k: v for k, v in report[key].items() if v["section"] == section}
        if entries:
            out.append((section, entries))
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the report's tables in Markdown (for the README and the model card)."""
    resamples = report["settings"]["n_resamples"]
    parts = [f"# {report['title']}", "",
             f"Base: `{report['models']['base']}` · tuned: `{report['models']['tuned']}` · "
             f"{report['n_examples']} paired examples · 95% CIs from {report['settings']['n_resamples']} "
             "bootstrap resamples (Δ: paired bootstrap; * = CI excludes 0).", ""]
    parts += ["## Headline", "", _md_table(HEADLINE_HEADERS, _headline_rows(report)), ""]
    for section, entries in _sections_in(report, "templates"):
        parts += [f"## {SECTION_TITLES[section]}", "", SECTION_NOTES[section], "",
                  _md_table(_comparison_headers("template", "task"), _comparison_rows(entries, resamples)),
                  ""]
    parts += ["## Per task", "",
              _md_table(_comparison_headers("task group", "section"),
                        _comparison_rows(report["tasks"], resamples, second="section")), ""]
    if _baseline_rows(report):
        parts += ["## Baselines", "", "Each value with its 95% bootstrap CI, on the same test examples.", "",
                  _md_table(_baseline_headers(report), _baseline_rows(report)), ""]
    if report["baselines"]["skipped"]:
        parts += [f"- skipped `{k}`: {v}" for k, v in report["baselines"]["skipped"].items()] + [""]
    if _few_shot_table(report):
        parts += ["## Few-shot baseline", "",
                  "The base model with k in-context examples needs longer prompts.", "",
                  _md_table(FEW_SHOT_HEADERS, _few_shot_table(report)), ""]
    parts += ["## Details", "", _md_table(DETAIL_HEADERS, _detail_rows(report)), ""]
    if report["training"]:
        t = report["training"]
        best = t.get("best_val_loss")
        parts += ["## Training", "",
                  f"{t.get('n_records', 0)} log records; last step {_fmt(t.get('last_step'), digits=0)}; "
                  f"final training loss {_fmt(t.get('final_loss'))}"
                  + (f"; best validation loss {_fmt(best['value'])} at step {best['step']:.0f}"
                     if best else "")
                  + ".", ""]
    return "\n".join(parts)


# ============================================================================= html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #212121; line-height: 1.4; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 2px solid #e0e0e0; padding-bottom: .2rem; margin-top: 2.2rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .85rem; }
th, td { border: 1px solid #e0e0e0; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.up { color: #1b5e20; font-weight: 600; } td.down { color: #b71c1c; font-weight: 600; }
.note { color: #616161; font-size: .9rem; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
img.half { display: inline-block; max-width: 48%; vertical-align: top; margin-right: 1%; }
.ex td { max-width: 420px; white-space: pre-wrap; word-break: break-word;
         font-family: ui-monospace, monospace; font-size: .78rem; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> str:
    """A table; a cell may be ``(text, css_class)``; everything is HTML-escaped."""
    out = [f'<table class="{_esc(css)}">' if css else "<table>",
           "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + "</tr>"]
    for row in rows:
        cells = []
        for cell in row:
            text, cls = cell if isinstance(cell, tuple) else (cell, "")
            cells.append(f'<td class="{_esc(cls)}">{_esc(text)}</td>' if cls else f"<td>{_esc(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(png: bytes | None, alt: str, css: str = "") -> str:
    """An <img> whose source is the PNG itself, base64-encoded in a data URI."""
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{_esc(css)}"' if css else ""
    return f'<img alt="{_esc(alt)}"{cls} src="data:image/png;base64,{data}">'


def _styled_comparison(entries: dict[str, dict], n_resamples: int, second: str = "task") -> list[list[Any]]:
    """Comparison rows with numeric cells right-aligned and significant deltas coloured."""
    rows = []
    for raw, (name, entry) in zip(_comparison_rows(entries, n_resamples, second), _flat_metrics(entries)):
        d = entry["delta"]
        cls = "num up" if d["significant"] and d["delta"] > 0 else "num down" if d["significant"] else "num"
        rows.append([raw[0], raw[1], raw[2], (raw[3], "num"), (raw[4], "num"), (raw[5], "num"),
                     (raw[6], cls), (raw[7], "num")])
    return rows


def _flat_metrics(entries: dict[str, dict]) -> list[tuple[str, dict]]:
    return [(name, m) for name, entry in entries.items() for m in entry["metrics"].values()]


def _html_examples(report: dict[str, Any]) -> str:
    parts = []
    for tid, ex in report["examples"].items():
        for kind, title in (("wins", "tuned better"), ("regressions", "base better")):
            if ex[kind]:
                rows = [[e["prompt"], e["reference"], e["base"], e["tuned"],
                         (_fmt(e["gain"], digits=2), "num")] for e in ex[kind]]
                gain = "Δ margin" if report["templates"][tid]["labels"] else "Δ rougeL"
                parts += [f"<h3>{_esc(tid)}: {title}</h3>",
                          _html_table(["prompt", "reference", "base", "tuned", gain], rows, css="ex")]
    return "\n".join(parts) if parts else '<p class="note">No example where the two models differ.</p>'


def render_html(report: dict[str, Any], plots: dict[str, bytes | None]) -> str:
    """report.html: one self-contained file (inline CSS, plots as PNG data URIs, no script, no link)."""
    resamples = report["settings"]["n_resamples"]
    p = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
         f"<title>{_esc(report['title'])}</title>", f"<style>{_CSS}</style></head><body>",
         f"<h1>{_esc(report['title'])}</h1>",
         f'<p class="note">Base: <code>{_esc(report["models"]["base"])}</code> · tuned: '
         f'<code>{_esc(report["models"]["tuned"])}</code> · {report["n_examples"]} paired examples · '
         f'95% CIs from {report["settings"]["n_resamples"]} bootstrap resamples; Δ uses a paired bootstrap '
         "(both models scored on the same resampled examples); * and colour = CI excludes 0.</p>"]
    headline = []
    for raw, h in zip(_headline_rows(report), report["headline"]):
        cls = "num up" if h["significant"] and h["delta"] > 0 else "num down" if h["significant"] else "num"
        headline.append([raw[0], raw[1], raw[2], (raw[3], "num"), (raw[4], "num"), (raw[5], cls),
                         (raw[6], "num"), (raw[7], "num"), raw[8]])
    p += ["<h2>Headline</h2>", _html_table(HEADLINE_HEADERS, headline), _img(plots.get("deltas"), "deltas")]
    for section, entries in _sections_in(report, "templates"):
        p += [f"<h2>{_esc(SECTION_TITLES[section])}</h2>",
              f'<p class="note">{_esc(SECTION_NOTES[section])}</p>',
              _html_table(_comparison_headers("template", "task"), _styled_comparison(entries, resamples))]
    p += ["<h2>Per task</h2>",
          _html_table(_comparison_headers("task group", "section"),
                      _styled_comparison(report["tasks"], resamples, second="section"))]
    p += ["<h2>Baselines and few-shot</h2>", _img(plots.get("systems"), "systems")]
    if _baseline_rows(report):
        p += ['<p class="note">Each value with its 95% bootstrap CI, on the same test examples.</p>',
              _html_table(_baseline_headers(report), [[r[0], r[1], *((c, "num") for c in r[2:])]
                                                      for r in _baseline_rows(report)])]
    if report["baselines"]["skipped"]:
        items = report["baselines"]["skipped"].items()
        p.append('<ul class="note">' + "".join(
            f"<li>skipped <code>{_esc(k)}</code>: {_esc(v)}</li>" for k, v in items) + "</ul>")
    if _few_shot_table(report):
        p += ["<h3>Few-shot baseline (base model with k in-context examples)</h3>",
              _html_table(FEW_SHOT_HEADERS, _few_shot_table(report))]
    confusions = [(tid, plots.get(f"confusion:{tid}")) for tid in report["confusion"]]
    if any(png for _, png in confusions):
        p += ["<h2>Confusion matrices</h2>"]
        p += [_img(png, f"confusion {tid}", "half") for tid, png in confusions]
    if plots.get("training"):
        p += ["<h2>Training</h2>", _img(plots["training"], "training curves")]
    p += ["<h2>Examples</h2>", '<p class="note">Choice tasks: examples where only one model is right '
          "(Δ margin: change in log p(reference) minus the best other choice's, when choice log-probs are "
          "known). Generation: largest per-example rougeL gain and loss. Prompts cut to "
          f"{PROMPT_CHARS} characters.</p>", _html_examples(report)]
    p += ["<h2>Details</h2>", _html_table(DETAIL_HEADERS, _detail_rows(report)), "</body></html>"]
    return "\n".join(x for x in p if x)


# ========================================================================== build


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
    """
    pairs = align_predictions(base_predictions, tuned_predictions)
    known = _examples_by_template(test_examples, train_examples)
    infos = {tid: _template_info(pair, (base, tuned), known) for tid, pair in pairs.items()}
    for tid, info in infos.items():
        info.f1_labels = _f1_labels(info.choices, pairs[tid])
    _assign_sections(infos, train_examples)
    boot = {"n_resamples": n_resamples, "seed": seed}
    templates = {tid: _template_entry(infos[tid], pairs[tid], base, tuned, **boot) for tid in pairs}
    tasks = {key: _task_entry(key, tids, infos, pairs, **boot) for key, tids in _task_groups(infos).items()}
    few = _few_shot_inputs(few_shot)
    records = read_metrics_log(metrics_log)
    report: dict[str, Any] = {
        "title": title,
        "models": {"base": base.get("model", "base"), "tuned": tuned.get("model", "tuned")},
        "split": tuned.get("split", base.get("split")),
        "settings": {"n_resamples": n_resamples, "seed": seed, "confidence": CONFIDENCE},
        "n_examples": sum(len(p.keys) for p in pairs.values()),
        "headline": _headline(tasks, infos),
        "templates": templates,
        "tasks": tasks,
        "sections": {s: [t for t, i in infos.items() if i.section == s] for s in (SEEN, UNSEEN, UNTRAINED)},
        "baselines": _baselines(infos, pairs, train_examples, **boot),
        "few_shot": {tid: _few_shot_rows(infos[tid], pairs[tid], base, tuned, few, **boot) for tid in pairs}
        if few else {},
        "confusion": {tid: _confusion(infos[tid], pairs[tid]) for tid in pairs if infos[tid].choices},
        "examples": {tid: _choice_examples(infos[tid], pairs[tid]) if infos[tid].choices
                     else _generation_examples(pairs[tid]) for tid in pairs},
        "training": _training_summary(records, metrics_log),
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


def model_card_rows(report_json: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the model card's metrics table: one per template and metric.

    Keys: ``name`` ("template · metric"), ``template``, ``metric``, ``section``, ``base``, ``tuned``,
    ``value`` (= tuned), ``value_low``/``value_high`` (tuned 95% CI), ``delta``, ``ci_low``/``ci_high``
    (paired 95% CI of the delta), ``significant``, ``n``.
    """
    rows = []
    for tid, entry in report_json.get("templates", {}).items():
        for metric, m in entry.get("metrics", {}).items():
            rows.append({
                "name": f"{tid} · {metric}",
                "template": tid,
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
            })
    return rows
