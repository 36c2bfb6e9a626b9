"""Evaluate a model on prepared examples: per-template metrics with bootstrap confidence intervals.

    result = evaluate_examples(model, tokenizer, examples, settings, is_seq2seq=False, cfg=EvalConfig())
    result.to_json()      # {"model", "split", "n", "k_shot", "templates": {...}, "tasks": {...}}
    result.predictions    # one dict per example: prompt, reference, prediction, correct, ...

    evaluate_run("smollm2-135m-instruct", Path("runs/demo"), "test", Path("runs/demo/eval/base"),
                 EvalConfig(), ModelConfig())   # writes eval.json + predictions.jsonl

How each template is scored (examples are grouped by `template_id`):

* a template whose examples carry `choices` -> rank classification: every choice scored by its summed
  log-probability (mean per token with `cfg.length_normalized`); the prediction is the best choice's text.
* any other template -> greedy generation (beam / sampling per `cfg`), `max_new_tokens` by task family
  (`DEFAULT_MAX_NEW_TOKENS`, overridden by `cfg.max_new_tokens`, then by the `max_new_tokens_by_task`
  argument).
* `classify_by="generate"` scores choice templates by generation instead, mapping the answer to a choice
  with `map_to_choice`; answers that name no choice count as wrong and are reported as `unparseable`.

Metrics per template come from the examples' `metrics` (or `cfg.metrics[template_id]`), each with a
percentile-bootstrap 95% interval over examples. Per task, `tasks["<dataset>/<task>"]` pools the examples
of that task's templates (interval over the pooled examples: a source row rendered by several templates
appears several times, so these pooled intervals are somewhat optimistic) and gives the mean and spread
of the per-template values (the prompt sensitivity). Perplexity is that of the reference completions
(+ EOS, as trained) given the prompts.

k-shot: `k` examples of the same template drawn from `few_shot_pool` (seeded per example, never the same
source row) are prepended as "prompt completion\\n\\n" blocks. The prompt is cut from the left like any
prompt, so a long prompt can lose demonstrations: `truncated_prompts` counts the examples cut. A template
with no example in the pool (a held-out one) is left out of a k-shot evaluation.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from instructkit.config import EvalConfig, ModelConfig
from instructkit.data.tokenize import TokenizeSettings, encode_for_generation, encode_prompts
from instructkit.errors import ConfigError, DataError, TemplateError
from instructkit.evaluate import metrics as M
from instructkit.evaluate.scoring import completion_nll, generate, map_to_choice, rank_choices

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "EvalResult",
    "evaluate_examples",
    "evaluate_run",
    "make_validation_fn",
]

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "rating": 8, "classification": 8, "sentiment": 8, "nli": 8, "yes_no_qa": 8,
    "summarization": 64, "title_generation": 24, "translation": 96, "extractive_qa": 32,
    "generation": 128, "instruction_following": 128, "question_generation": 48,
}
FALLBACK_MAX_NEW_TOKENS = 64  # a task family not listed above
REQUIRED_FIELDS = ("prompt", "completion", "template_id", "task")
NOT_BOOTSTRAPPED = {"perplexity"}  # reported in its own field, from log-likelihoods, not predictions


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Everything one evaluation produced: per-template and per-task summaries plus every prediction."""

    model: str
    split: str
    k_shot: int
    templates: dict[str, dict[str, Any]]
    tasks: dict[str, dict[str, Any]]
    predictions: list[dict[str, Any]] = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.predictions)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "split": self.split,
            "n": self.n,
            "k_shot": self.k_shot,
            "settings": self.settings,
            "templates": self.templates,
            "tasks": self.tasks,
        }


@dataclass
class _Scored:
    """One template's outputs before metrics: predictions, references, and how the prompts were fed."""

    template_id: str
    indices: list[int]
    predictions: list[str]
    references: list[str]
    labels: list[str] | None  # the class set for choice templates, else None
    records: list[dict[str, Any]]
    prompt_tokens: list[int]
    truncated: int
    unparseable: int
    nll: tuple[float, int] | None = None


# --------------------------------------------------------------------------------------------------
# Inputs: checks, caps, demonstrations
# --------------------------------------------------------------------------------------------------


def _check_examples(examples: Sequence[dict], where: str) -> None:
    """Every example has the fields scoring needs; else a DataError naming `where`, the example, the field."""
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise DataError(f"{where}: example {i + 1} is not a JSON object")
        for name in REQUIRED_FIELDS:
            if not isinstance(ex.get(name), str):
                problem = "lacks the field" if name not in ex else "has a non-text value in the field"
                raise DataError(f"{where}: example {i + 1} {problem} {name!r} "
                                f"(prepared examples need {', '.join(REQUIRED_FIELDS)})")
        choices = ex.get("choices")
        valid = isinstance(choices, list) and all(isinstance(c, str) for c in choices)
        if choices is not None and not valid:
            raise DataError(f"{where}: example {i + 1} ({ex['template_id']}): 'choices' must be a list of "
                            f"strings or null")


def _cap_per_template(examples: Sequence[dict], cap: int | None, seed: int) -> list[int]:
    """Indices of at most `cap` examples per template, a fixed seeded subset, in the original order."""
    if cap is None:
        return list(range(len(examples)))
    by_template: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_template.setdefault(ex["template_id"], []).append(i)
    rng = random.Random(seed)
    keep = []
    for indices in by_template.values():
        keep += indices if len(indices) <= cap else rng.sample(indices, cap)
    return sorted(keep)


def _demonstrations(ex: dict, pool: dict[str, list[dict]], k: int, seed: int) -> list[dict]:
    """k pool examples of the same template, none from the same source row; seeded by the example itself.

    The draw depends only on (seed, template, source_id, prompt), not on the order of the evaluation set,
    so the same example gets the same demonstrations in every run.
    """
    candidates = [d for d in pool.get(ex["template_id"], []) if d.get("source_id") != ex.get("source_id")]
    rng = random.Random(f"{seed}|{ex['template_id']}|{ex.get('source_id')}|{ex['prompt']}")
    return rng.sample(candidates, min(k, len(candidates)))


def _few_shot_prompt(ex: dict, demos: Sequence[dict], separator: str) -> str:
    """"P1 C1\\n\\nP2 C2\\n\\nPROMPT": each demonstration as its prompt, the separator and its completion."""
    return "".join(f"{d['prompt']}{separator}{d['completion']}\n\n" for d in demos) + ex["prompt"]


# --------------------------------------------------------------------------------------------------
# Scoring one template
# --------------------------------------------------------------------------------------------------


def _record(index: int, ex: dict, prompt: str, prediction: str, **extra: Any) -> dict[str, Any]:
    """One line of predictions.jsonl; `prompt` is the prompt as given to the model (with demonstrations)."""
    return {
        "index": index,
        "template_id": ex["template_id"],
        "source_id": ex.get("source_id"),
        "dataset": _dataset(ex),
        "task": ex["task"],
        "prompt": prompt,
        "reference": ex["completion"],
        "prediction": prediction,
        "choice_logprobs": None,
        "correct": None,
        "held_out": bool(ex.get("held_out", False)),
        **extra,
    }


def _dataset(ex: dict) -> str:
    return ex.get("dataset") or ex["template_id"].split(".")[0]


def _class_labels(exs: Sequence[dict]) -> list[str]:
    """The union of the examples' choices, in first-seen order."""
    labels: dict[str, None] = {}
    for ex in exs:
        for choice in ex.get("choices") or []:
            labels.setdefault(choice, None)
    return list(labels)


def _score_by_rank(model: Any, tokenizer: Any, exs: list[dict], indices: list[int], prompts: list[str],
                   settings: TokenizeSettings, is_seq2seq: bool, cfg: EvalConfig) -> _Scored:
    try:
        scores = rank_choices(model, tokenizer, prompts, [ex["choices"] for ex in exs], settings,
                              is_seq2seq=is_seq2seq, batch_size=cfg.batch_size,
                              length_normalized=cfg.length_normalized)
    except ValueError as exc:  # a choice too long for max_length, an empty choice list
        # "example 3" counts within this template's batch: name the example of the input instead.
        message = re.sub(r"example (\d+)", lambda m: f"example {indices[int(m.group(1))] + 1}", str(exc))
        raise DataError(f"template {exs[0]['template_id']!r}: {message}") from None
    preds, records = [], []
    for i, ex, prompt, s in zip(indices, exs, prompts, scores):
        pred = ex["choices"][s.predicted]
        preds.append(pred)
        records.append(_record(i, ex, prompt, pred, correct=pred == ex["completion"],
                               choice_logprobs=dict(zip(ex["choices"], s.logprobs))))
    return _Scored(exs[0]["template_id"], indices, preds, [ex["completion"] for ex in exs],
                   _class_labels(exs), records, [s.prompt_tokens for s in scores],
                   sum(s.truncated for s in scores), 0)


def _score_by_generation(model: Any, tokenizer: Any, exs: list[dict], indices: list[int], prompts: list[str],
                         settings: TokenizeSettings, is_seq2seq: bool, cfg: EvalConfig, max_new_tokens: int,
                         seed: int, classify: bool) -> _Scored:
    texts = generate(model, tokenizer, prompts, settings, is_seq2seq=is_seq2seq,
                     max_new_tokens=max_new_tokens, batch_size=cfg.batch_size, num_beams=cfg.num_beams,
                     do_sample=cfg.do_sample, seed=seed)
    fed = encode_for_generation(tokenizer, prompts, settings, max_new_tokens)
    full = encode_prompts(tokenizer, prompts, settings)
    preds, records, unparseable = [], [], 0
    for i, ex, prompt, text in zip(indices, exs, prompts, texts):
        if classify:
            mapped = map_to_choice(text, ex["choices"])
            unparseable += mapped is None
            pred = text if mapped is None else mapped
            preds.append(pred)
            records.append(_record(i, ex, prompt, pred, generated=text, correct=mapped == ex["completion"]))
        else:
            preds.append(text)
            records.append(_record(i, ex, prompt, text))
    return _Scored(exs[0]["template_id"], indices, preds, [ex["completion"] for ex in exs],
                   _class_labels(exs) if classify else None, records, [len(x) for x in fed],
                   sum(len(a) < len(b) for a, b in zip(fed, full)), unparseable)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def _metric_names(exs: Sequence[dict], template_id: str, cfg: EvalConfig) -> list[str]:
    """cfg.metrics[template] if set, else the examples' own `metrics`, else the task family's defaults."""
    from instructkit.templates.template import DEFAULT_METRICS

    names = (cfg.metrics.get(template_id) or exs[0].get("metrics")
             or list(DEFAULT_METRICS.get(exs[0]["task"], ())))
    if not names:
        names = ["accuracy", "macro_f1"] if exs[0].get("choices") else ["rougeL"]
    for name in names:
        if name not in M.METRICS and name not in NOT_BOOTSTRAPPED:
            raise ConfigError(f"template {template_id!r}: unknown metric {name!r} "
                              f"(known: {', '.join(sorted(M.METRICS))})")
    return [n for n in names if n not in NOT_BOOTSTRAPPED]


def _metric_spec(name: str, labels: list[str] | None, preds: Sequence[str], refs: Sequence[str]) -> Any:
    """The registry metric; macro-F1 of a choice template over the classes seen in refs and valid preds.

    Fixing the class set keeps an unparseable generated answer from becoming a class of its own.
    """
    if name == "macro_f1" and labels is not None:
        seen = set(refs) | {p for p in preds if p in labels}
        return M.macro_f1_metric([c for c in labels if c in seen] + sorted(set(refs) - set(labels)))
    return M.get_metric(name)


def _metric_values(names: Sequence[str], labels: list[str] | None, preds: list[str], refs: list[str],
                   resamples: int | None, seed: int) -> dict[str, dict[str, float]]:
    """{name: {"value", "low", "high"}}; without `resamples` (validation) low = high = value."""
    out = {}
    for name in names:
        spec = _metric_spec(name, labels, preds, refs)
        if resamples:
            value, low, high = M.bootstrap_ci(spec, preds, refs, n_resamples=resamples, seed=seed)
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
    return M.perplexity(*nll)


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
                                "matrix": M.confusion(scored.predictions, scored.references, labels)}
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


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------


def _max_new_tokens(task: str, cfg: EvalConfig, override: dict[str, int] | None) -> int:
    table = {**DEFAULT_MAX_NEW_TOKENS, **cfg.max_new_tokens, **(override or {})}
    return table.get(task, FALLBACK_MAX_NEW_TOKENS)


def _score_templates(model: Any, tokenizer: Any, examples: Sequence[dict], chosen: list[int],
                     prompts: dict[int, str], settings: TokenizeSettings, is_seq2seq: bool, cfg: EvalConfig,
                     max_new_tokens_by_task: dict[str, int] | None, seed: int, classify_by: str,
                     with_perplexity: bool) -> dict[str, _Scored]:
    """Score the chosen examples, template by template (in first-seen order)."""
    by_template: dict[str, list[int]] = {}
    for i in chosen:
        by_template.setdefault(examples[i]["template_id"], []).append(i)
    scored = {}
    for tid, indices in by_template.items():
        exs = [examples[i] for i in indices]
        texts = [prompts[i] for i in indices]
        has_choices = all(ex.get("choices") for ex in exs)
        logger.info("evaluating %s: %d examples by %s", tid, len(exs),
                    "rank" if has_choices and classify_by == "rank" else "generation")
        if has_choices and classify_by == "rank":
            result = _score_by_rank(model, tokenizer, exs, indices, texts, settings, is_seq2seq, cfg)
        else:
            result = _score_by_generation(model, tokenizer, exs, indices, texts, settings, is_seq2seq, cfg,
                                          _max_new_tokens(exs[0]["task"], cfg, max_new_tokens_by_task), seed,
                                          classify=has_choices)
        if with_perplexity:
            total, tokens, _ = completion_nll(model, tokenizer, texts, [ex["completion"] for ex in exs],
                                              settings, is_seq2seq, batch_size=cfg.batch_size)
            result.nll = (total, tokens)
        scored[tid] = result
    return scored


def _model_name(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)


def evaluate_examples(
    model: Any,
    tokenizer: Any,
    examples: list[dict],
    settings: TokenizeSettings,
    *,
    is_seq2seq: bool,
    cfg: EvalConfig,
    max_new_tokens_by_task: dict[str, int] | None = None,
    few_shot_pool: list[dict] | None = None,
    k_shot: int = 0,
    seed: int = 0,
    classify_by: Literal["rank", "generate"] = "rank",
    with_perplexity: bool = True,
    model_name: str | None = None,
    split: str | None = None,
) -> EvalResult:
    """Score `examples` (at most `cfg.max_examples` per template) and compute every template's metrics.

    The model is put in eval mode and restored. `examples` are prepared example dicts (see the module
    docstring); `few_shot_pool` (usually the train split) supplies k-shot demonstrations.
    """
    import torch

    _check_examples(examples, "examples")
    if not examples:
        raise DataError("no examples to evaluate")
    if k_shot and not few_shot_pool:
        raise ConfigError(f"{k_shot}-shot evaluation needs a pool of demonstration examples (the train "
                          "split)")
    chosen = _cap_per_template(examples, cfg.max_examples, seed)
    names = _metric_names_by_template(examples, chosen, cfg)  # unknown metric names fail before scoring
    pool: dict[str, list[dict]] = {}
    for d in few_shot_pool or []:
        pool.setdefault(d.get("template_id", ""), []).append(d)
    if k_shot:
        # A template with no example in the pool (a held-out template is never in the train split) would be
        # scored zero-shot under a k-shot name: leave it out of the k-shot evaluation.
        absent = sorted({examples[i]["template_id"] for i in chosen} - set(pool))
        if absent:
            logger.info("%d-shot: skipping %s (no example of it in the demonstration pool)", k_shot,
                        ", ".join(absent))
            chosen = [i for i in chosen if examples[i]["template_id"] in pool]
        if not chosen:
            raise DataError(f"{k_shot}-shot evaluation: no evaluated template has an example in the "
                            "demonstration pool (the train split)")
    prompts, demos = {}, {}
    for i in chosen:
        ex = examples[i]
        demos[i] = _demonstrations(ex, pool, k_shot, seed) if k_shot else []
        prompts[i] = _few_shot_prompt(ex, demos[i], settings.separator)
    short = sum(len(d) < k_shot for d in demos.values())
    if short:
        lacking = sorted({examples[i]["template_id"] for i, d in demos.items() if len(d) < k_shot})
        logger.warning("%d examples got fewer than %d demonstrations: too few pool examples of %s", short, k_shot,
                       ", ".join(lacking))

    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            scored = _score_templates(model, tokenizer, examples, chosen, prompts, settings, is_seq2seq, cfg,
                                      max_new_tokens_by_task, seed, classify_by, with_perplexity)
    finally:
        model.train(was_training)

    summaries = {
        tid: _template_summary(s, [examples[i] for i in s.indices], names[tid], cfg.bootstrap_resamples, seed)
        for tid, s in scored.items()
    }
    records = sorted((r for s in scored.values() for r in s.records), key=lambda r: r["index"])
    if k_shot:
        for r in records:
            r["demonstrations"] = [d.get("source_id") for d in demos[r["index"]]]
    return EvalResult(
        model=model_name or _model_name(model),
        split=split or cfg.split,
        k_shot=k_shot,
        templates=summaries,
        tasks=_task_summaries(scored, summaries, names, cfg.bootstrap_resamples, seed),
        predictions=records,
        settings={"max_length": settings.max_length, "chat_template": settings.chat_template,
                  "length_normalized": cfg.length_normalized, "num_beams": cfg.num_beams,
                  "do_sample": cfg.do_sample, "classify_by": classify_by, "seed": seed,
                  "bootstrap_resamples": cfg.bootstrap_resamples,
                  "short_of_demonstrations": short},
    )


def make_validation_fn(
    tokenizer: Any,
    examples: list[dict],
    settings: TokenizeSettings,
    *,
    is_seq2seq: bool,
    max_examples: int = 200,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens_by_task: dict[str, int] | None = None,
) -> Callable[[Any], dict[str, float]]:
    """A `validate(model) -> {metric: value}` for the training loop, on a FIXED seeded subset.

    The subset (at most `max_examples`, drawn once here) is the same at every validation, so successive
    values are comparable. Returned keys: each metric averaged over the templates that report it
    ("macro_f1", "accuracy", "rougeL", ...) and per template ("<template_id>/macro_f1"). Choice templates
    are ranked; the others generate (`max_new_tokens` per task family, as in evaluation), so
    generation-based metrics are included. No bootstrap and no perplexity: the loop has its own loss.
    """
    _check_examples(examples, "validation examples")
    rng = random.Random(seed)
    subset_idx = sorted(rng.sample(range(len(examples)), min(max_examples, len(examples))))
    subset = [examples[i] for i in subset_idx]
    cfg = EvalConfig(batch_size=batch_size)
    names = _metric_names_by_template(subset, range(len(subset)), cfg)  # checked now, not mid-training

    def validate(model: Any) -> dict[str, float]:
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                scored = _score_templates(model, tokenizer, subset, list(range(len(subset))),
                                          {i: ex["prompt"] for i, ex in enumerate(subset)}, settings,
                                          is_seq2seq, cfg, max_new_tokens_by_task, seed, "rank",
                                          with_perplexity=False)
        finally:
            model.train(was_training)
        out: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {}
        for tid, s in scored.items():
            for name, v in _metric_values(names[tid], s.labels, s.predictions, s.references, None, seed).items():
                out[f"{tid}/{name}"] = v["value"]
                per_metric.setdefault(name, []).append(v["value"])
        out.update({name: float(np.mean(values)) for name, values in per_metric.items()})
        return out

    return validate


# --------------------------------------------------------------------------------------------------
# From files: a run directory or a JSONL file, to eval.json + predictions.jsonl
# --------------------------------------------------------------------------------------------------


def _data_file(data: Path, split: str) -> Path:
    """<run dir>/<split>.jsonl, or the JSONL file itself."""
    data = Path(data)
    path = data / f"{split}.jsonl" if data.is_dir() else data
    if not path.is_file():
        where = f"run directory {data} has no {split}.jsonl" if data.is_dir() else "no such file"
        raise DataError(f"{path}: {where} (run `instructkit prepare` first, or pass a prepared .jsonl file)")
    return path


def _fill_metrics_from_library(examples: list[dict], path: Path, cfg: EvalConfig) -> None:
    """Examples written without a `metrics` field take their template's metrics from the template library."""
    missing = {ex["template_id"] for ex in examples
               if "metrics" not in ex and ex["template_id"] not in cfg.metrics}
    if not missing:
        return
    from instructkit.templates.library import TemplateLibrary

    library = TemplateLibrary.builtin()
    found = {}
    for tid in sorted(missing):
        try:
            found[tid] = list(library.get(tid).effective_metrics)
        except TemplateError as exc:
            raise TemplateError(f"{path}: examples of template {tid!r} have no 'metrics' field and the "
                                f"template is not in the library ({exc}); add 'metrics' to the examples or "
                                f"set eval.metrics for it") from None
    for ex in examples:
        if "metrics" not in ex and ex["template_id"] in found:
            ex["metrics"] = found[ex["template_id"]]


def _load(model_spec: Any, model_cfg: ModelConfig) -> tuple[Any, Any, bool]:
    """(model, tokenizer, is_seq2seq) from a name/path through `instructkit.models.load_model`, or an
    already loaded object with `.model`, `.tokenizer`, `.is_seq2seq`."""
    if hasattr(model_spec, "model") and hasattr(model_spec, "tokenizer"):
        return model_spec.model, model_spec.tokenizer, bool(model_spec.is_seq2seq)
    from instructkit.models import load_model

    cfg = model_cfg if model_spec is None else model_cfg.model_copy(update={"name": str(model_spec)})
    loaded = load_model(cfg)
    return loaded.model, loaded.tokenizer, bool(loaded.is_seq2seq)


def evaluate_run(
    model_spec: Any,
    data: Path,
    split: str,
    out_dir: Path,
    cfg: EvalConfig,
    model_cfg: ModelConfig,
    *,
    k_shot: int = 0,
    few_shot_data: Path | None = None,
    seed: int = 0,
) -> EvalResult:
    """Evaluate a model on `<run dir>/<split>.jsonl` (or a .jsonl file); write eval.json + predictions.jsonl.

    `model_spec`: a short name, folder or .gguf path (loaded with `model_cfg`'s settings), or a loaded
    model object. k-shot demonstrations come from `few_shot_data` (default: the run directory's
    train.jsonl). Bad input raises InstructkitError subclasses naming the file, example and field.
    """
    from instructkit.data.build import load_examples
    from instructkit.io import write_json, write_jsonl

    path = _data_file(Path(data), split)
    examples = load_examples(path, split)
    if not examples:
        raise DataError(f"{path}: the {split!r} split has no examples")
    _check_examples(examples, str(path))
    _fill_metrics_from_library(examples, path, cfg)
    pool = None
    if k_shot:
        pool_path = Path(few_shot_data) if few_shot_data else _data_file(Path(data), "train")
        pool = load_examples(pool_path, "train")
        _check_examples(pool, str(pool_path))
    model, tokenizer, is_seq2seq = _load(model_spec, model_cfg)
    settings = TokenizeSettings(max_length=model_cfg.max_length, truncation=model_cfg.truncation,
                                chat_template=model_cfg.chat_template, system_prompt=model_cfg.system_prompt,
                                seq2seq=is_seq2seq)
    name = str(model_spec) if isinstance(model_spec, (str, Path)) else None
    try:
        result = evaluate_examples(model, tokenizer, examples, settings, is_seq2seq=is_seq2seq, cfg=cfg,
                                   few_shot_pool=pool, k_shot=k_shot, seed=seed, model_name=name, split=split)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    out_dir = Path(out_dir)
    write_json(out_dir / "eval.json", result.to_json())
    write_jsonl(out_dir / "predictions.jsonl", result.predictions)
    logger.info("wrote %s and %s", out_dir / "eval.json", out_dir / "predictions.jsonl")
    return result

