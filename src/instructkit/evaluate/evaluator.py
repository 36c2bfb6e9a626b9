"""Evaluate a model on prepared examples: per-template metrics with bootstrap confidence intervals.

    result = evaluate_examples(model, tokenizer, examples, settings, is_seq2seq=False, cfg=EvalConfig())
    result.to_json()      # {"model", "split", "n", "k_shot", "templates": {...}, "tasks": {...}}
    result.predictions    # one dict per example: prompt, reference, prediction, correct, ...

    evaluate_run("smollm2-135m-instruct", Path("runs/demo"), "test", Path("runs/demo/eval/base"),
                 EvalConfig(), ModelConfig())   # writes eval.json + predictions.jsonl

Examples are grouped by dataset and `template_id` (`instructkit.evaluate.groups`: a held-out dataset read
through a trained dataset's template is its own group, with its own n and held-out flag) and scored group
by group (`instructkit.evaluate.template_scoring`: rank classification for templates with choices, each
choice followed by the trained end of the answer unless `eval.choice_end: none`; generation for the
others). Each group's metrics, and those of the examples of each task pooled, get bootstrap intervals
over source rows (`instructkit.evaluate.summary`).
k-shot demonstrations are drawn and prepended by `instructkit.evaluate.fewshot`; a template with no
example in the pool (a held-out one) is left out of a k-shot evaluation. An answer ends there as every
demonstration's answer does (`fewshot.answer_end`): in a text prompt at "\\n\\n", where generation stops
and which each ranked choice is scored with instead of EOS; with a chat template (demonstrations are
earlier turns) and for seq2seq models as trained.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from instructkit.config import EvalConfig, ModelConfig
from instructkit.data.tokenize import TokenizeSettings
from instructkit.errors import ConfigError, DataError, TemplateError
from instructkit.evaluate import SCORING_VERSION
from instructkit.evaluate.chat import eval_prompt
from instructkit.evaluate.fewshot import _demonstrations, answer_end
from instructkit.evaluate.generation_metrics import installed_mecab
from instructkit.evaluate.groups import group_keys
from instructkit.evaluate.metric_registry import HIGHER_IS_BETTER
from instructkit.evaluate.summary import (
    _metric_names_by_template,
    _metric_values,
    _task_summaries,
    _template_summary,
)
from instructkit.evaluate.template_scoring import _score_templates

logger = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "ValidationFn",
    "evaluate_examples",
    "evaluate_run",
    "make_validation_fn",
]

REQUIRED_FIELDS = ("prompt", "completion", "template_id", "task")


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


# --------------------------------------------------------------------------------------------------
# Inputs: checks, caps
# --------------------------------------------------------------------------------------------------


def _check_examples(examples: Sequence[dict], where: str) -> None:
    """Every example has the fields scoring needs, and an example with choices has its completion among them;
    else a DataError naming `where`, the example, the template and the field or completion."""
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
        if choices and ex["completion"] not in choices:  # lm-evaluation-harness#811: a gold outside the options
            raise DataError(f"{where}: example {i + 1} ({ex['template_id']}): completion {ex['completion']!r} is "
                            f"not one of its choices {choices}, so no prediction could be right; correct the "
                            f"completion or the choices (they compare exactly)")


def _cap_per_template(examples: Sequence[dict], cap: int | None, seed: int) -> list[int]:
    """Indices of at most `cap` examples per (dataset, template) group, a fixed seeded subset, in the
    original order."""
    if cap is None:
        return list(range(len(examples)))
    by_template: dict[str, list[int]] = {}
    for i, key in enumerate(group_keys(examples)):
        by_template.setdefault(key, []).append(i)
    rng = random.Random(seed)
    keep = []
    for indices in by_template.values():
        keep += indices if len(indices) <= cap else rng.sample(indices, cap)
    return sorted(keep)


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------


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

    Raises: DataError when `examples` is empty, an example lacks a required field, has malformed
    choices or a completion that is not one of its choices, a choice leaves no room for its prompt within `settings.max_length`, or (k-shot) no evaluated
    template has an example in the pool; ConfigError when `k_shot` is set without `few_shot_pool` or a
    template names an unknown metric.
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
        prompts[i] = eval_prompt(ex, demos[i], settings.separator)  # chat examples: their conversation
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
                                      max_new_tokens_by_task, seed, classify_by, with_perplexity,
                                      answer_end=answer_end(k_shot, settings.chat, is_seq2seq))
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
                  "length_normalized": cfg.length_normalized, "choice_end": cfg.choice_end,
                  "num_beams": cfg.num_beams,
                  "do_sample": cfg.do_sample, "classify_by": classify_by, "seed": seed,
                  "bootstrap_resamples": cfg.bootstrap_resamples,
                  "short_of_demonstrations": short, "scoring_version": SCORING_VERSION,
                  "bleu_mecab": list(installed_mecab())},
    )


@dataclass(frozen=True)
class ValidationFn:
    """`validate(model) -> {metric: value}` for the training loop, and `metrics`: every key it returns, True
    where higher is better (the metric's MetricSpec), known before the first validation so that training
    checks train.early_stopping.metric up front (`TrainOptions(validate=fn, validate_metrics=fn.metrics)`)."""

    run: Callable[[Any], dict[str, float]]
    metrics: dict[str, bool]

    def __call__(self, model: Any) -> dict[str, float]:
        return self.run(model)


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
    choice_end: Literal["eos", "none"] = "eos",
    length_normalized: bool = False,
) -> ValidationFn:
    """A `validate(model) -> {metric: value}` for the training loop, on a FIXED seeded subset; its
    `metrics` name every key it returns, with the metric's direction (`ValidationFn`).

    The subset (at most `max_examples`, drawn once here) is the same at every validation, so successive
    values are comparable. Returned keys: each metric averaged over the templates that report it
    ("macro_f1", "accuracy", "rougeL", ...) and per (dataset, template) group ("<template_id>/macro_f1",
    "<dataset>/<template_id>/macro_f1" for a template shared by datasets). Choice templates are ranked
    exactly as evaluation ranks them (`choice_end`, `length_normalized`: pass the run's `eval.choice_end`
    and `eval.length_normalized`), so validation, early stopping and the best checkpoint agree with the
    evaluation; the others generate (`max_new_tokens` per task family, as in evaluation), so
    generation-based metrics are included. No bootstrap and no perplexity: the loop has its own loss.

    Raises: DataError when an example lacks a required field, has malformed choices or a completion outside
    them (here), or when a
    choice leaves no room for its prompt (at validation); ConfigError when a template names an unknown
    metric (here, not mid-training).
    """
    _check_examples(examples, "validation examples")
    rng = random.Random(seed)
    subset_idx = sorted(rng.sample(range(len(examples)), min(max_examples, len(examples))))
    subset = [examples[i] for i in subset_idx]
    cfg = EvalConfig(batch_size=batch_size, choice_end=choice_end, length_normalized=length_normalized)
    names = _metric_names_by_template(subset, range(len(subset)), cfg)  # checked now, not mid-training
    prompts = {i: eval_prompt(ex, [], settings.separator) for i, ex in enumerate(subset)}  # chat: conversations

    def validate(model: Any) -> dict[str, float]:
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                scored = _score_templates(model, tokenizer, subset, list(range(len(subset))), prompts, settings,
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

    directions = {key: HIGHER_IS_BETTER[name] for tid, metric_names in names.items() for name in metric_names
                  for key in (f"{tid}/{name}", name)}
    return ValidationFn(validate, directions)


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
    """(model, tokenizer, is_seq2seq) from a name/path through `instructkit.models.load.load_model`, or an
    already loaded object with `.model`, `.tokenizer`, `.is_seq2seq`."""
    if hasattr(model_spec, "model") and hasattr(model_spec, "tokenizer"):
        return model_spec.model, model_spec.tokenizer, bool(model_spec.is_seq2seq)
    from instructkit.models.load import load_model

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

    Raises: DataError when the data file is missing, the split has no examples or an example is malformed;
    TemplateError when examples without `metrics` name a template the library lacks; ConfigError as
    `evaluate_examples`; whatever `instructkit.models.load.load_model` raises for a model it cannot load.
    """
    from instructkit.data.build import load_examples, training_pool
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
        pool = training_pool(pool_path)  # bounded: a seeded sample per template of a large split
        _check_examples(pool, str(pool_path))
    model, tokenizer, is_seq2seq = _load(model_spec, model_cfg)
    settings = TokenizeSettings.from_model_config(model_cfg, is_seq2seq)
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
