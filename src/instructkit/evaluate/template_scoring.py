"""Scoring one template's examples with a model, into predictions and predictions.jsonl records.

How each template is scored (examples are grouped by dataset and `template_id`, see
`instructkit.evaluate.groups`):

* a template whose examples carry `choices` -> rank classification: every choice scored by its summed
  log-probability (mean per token with `cfg.length_normalized`), followed by the end of the answer unless
  `cfg.choice_end` is "none": as trained (EOS or the chat end-of-turn token), or in k-shot text prompts
  what follows every demonstration's answer, "\\n\\n" (`answer_end`, evaluate/fewshot.py); the prediction is
  the best choice's text.
* any other template -> greedy generation (beam / sampling per `cfg`), `max_new_tokens` by task family
  (`DEFAULT_MAX_NEW_TOKENS`, overridden by `cfg.max_new_tokens`, then by the `max_new_tokens_by_task`
  argument); a k-shot answer ends before the same `answer_end`.
* `classify_by="generate"` scores choice templates by generation instead, mapping the answer to a choice
  with `map_to_choice`; answers that name no choice count as wrong and are reported as `unparseable`.

Perplexity, when asked for, is that of the reference completions (+ EOS, as trained) given the prompts.
A rank-scored example whose reference is one of its choices, scored with EOS (or the end-of-turn token) and
with its whole prompt (not cut), already has it: the reference choice's summed log-probability is the same
tokens (prompt, separator + completion + EOS) as the training encoding, so its NLL is reused and only
the other examples go through `completion_nll` (a second forward pass over the whole template otherwise;
equal within float32 summation order, tested). Likewise a generated example whose prompt is fed whole
(causal model, no beam search): generation's prompt pass also scores the reference
(`generate.generate_scoring`), so `completion_nll` runs only for the prompts that were cut.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from instructkit.config import EvalConfig
from instructkit.data.split import canonical_text as _nfc_text
from instructkit.data.tokenize import (
    IGNORE_INDEX,
    TokenizeSettings,
    encode_batch,
    encode_for_generation,
    encode_prompts,
)
from instructkit.errors import DataError
from instructkit.evaluate.generate import Reference, final_answer, generate_scoring, map_to_choice
from instructkit.evaluate.groups import dataset_of, group_keys
from instructkit.evaluate.scoring import completion_nll, rank_choices
from instructkit.progress import ProgressBar

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
]

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "rating": 8, "classification": 8, "sentiment": 8, "nli": 8, "yes_no_qa": 8,
    "summarization": 64, "title_generation": 24, "translation": 96, "extractive_qa": 32,
    "generation": 128, "instruction_following": 128, "question_generation": 48,
}
FALLBACK_MAX_NEW_TOKENS = 64  # a task family not listed above


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
    # per example: (NLL in nats, label tokens) of the reference completion when ranking already computed it
    reference_nll: list[tuple[float, int] | None] | None = None
    cut_short: int | None = None  # generated answers max_new_tokens cut before they ended; None when ranked


# --------------------------------------------------------------------------------------------------
# Scoring one template
# --------------------------------------------------------------------------------------------------


def _record(index: int, ex: dict, prompt: str, prediction: str, **extra: Any) -> dict[str, Any]:
    """One line of predictions.jsonl; `prompt` is the prompt as given to the model (with demonstrations);
    `prediction` and the reference in NFC (`canonical_text`: predictions, references and classes are scored
    and kept so, and a canonically equivalent spelling, "cafe\u0301" for "caf\u00e9", is the same answer)."""
    return {
        "index": index,
        "template_id": ex["template_id"],
        "source_id": ex.get("source_id"),
        "dataset": dataset_of(ex),
        "task": ex["task"],
        "prompt": prompt,
        "reference": _nfc_text(ex["completion"]),
        "prediction": _nfc_text(prediction),
        "choice_logprobs": None,
        "correct": None,
        "held_out": bool(ex.get("held_out", False)),
        **extra,
    }


def _class_labels(exs: Sequence[dict]) -> list[str]:
    """The union of the examples' choices in NFC, in first-seen order."""
    labels: dict[str, None] = {}
    for ex in exs:
        for choice in ex.get("choices") or []:
            labels.setdefault(_nfc_text(choice), None)
    return list(labels)


def _score_by_rank(model: Any, tokenizer: Any, exs: list[dict], indices: list[int], prompts: list[str],
                   settings: TokenizeSettings, is_seq2seq: bool, cfg: EvalConfig,
                   progress: Callable[[int], None] | None = None, answer_end: str | None = None) -> _Scored:
    try:
        scores = rank_choices(model, tokenizer, prompts, [ex["choices"] for ex in exs], settings,
                              is_seq2seq=is_seq2seq, batch_size=cfg.batch_size,
                              length_normalized=cfg.length_normalized, include_eos=cfg.choice_end == "eos",
                              demonstration_end=answer_end, progress=progress)
    except ValueError as exc:  # a choice too long for max_length, an empty choice list
        # "example 3" counts within this template's batch: name the example of the input instead.
        message = re.sub(r"example (\d+)", lambda m: f"example {indices[int(m.group(1))] + 1}", str(exc))
        raise DataError(f"template {exs[0]['template_id']!r}: {message}") from None
    trained_end = cfg.choice_end == "eos" and answer_end is None  # the choice ends as in the training encoding
    preds, records, reference_nll = [], [], []
    for i, ex, prompt, s in zip(indices, exs, prompts, scores):
        pred = _nfc_text(ex["choices"][s.predicted])
        preds.append(pred)
        records.append(_record(i, ex, prompt, pred, correct=pred == _nfc_text(ex["completion"]),
                               choice_logprobs=dict(zip(ex["choices"], s.logprobs))))
        if trained_end and not s.truncated and ex["completion"] in ex["choices"]:
            j = ex["choices"].index(ex["completion"])
            reference_nll.append((-s.logprobs[j], s.n_tokens[j]))
        else:
            reference_nll.append(None)
    return _Scored(exs[0]["template_id"], indices, preds, [_nfc_text(ex["completion"]) for ex in exs],
                   _class_labels(exs), records, [s.prompt_tokens for s in scores],
                   sum(s.truncated for s in scores), 0, reference_nll=reference_nll)


def _references(tokenizer: Any, exs: list[dict], prompts: list[str], fed: list[list[int]],
                settings: TokenizeSettings) -> list[Reference | None]:
    """The reference answers generation can score on the way (`generate_scoring`): the training encoding's
    answer where its prompt is exactly the prompt generation feeds (nothing cut), else None."""
    encoded = encode_batch(tokenizer, prompts, [ex["completion"] for ex in exs], settings)
    out: list[Reference | None] = []
    for enc, ids in zip(encoded, fed):
        reusable = enc is not None and enc.input_ids[:enc.prompt_length] == ids \
            and all(x == IGNORE_INDEX for x in enc.labels[:enc.prompt_length])
        out.append(Reference(enc.input_ids[enc.prompt_length:], [x != IGNORE_INDEX for x in
                                                                 enc.labels[enc.prompt_length:]])
                   if reusable else None)
    return out


def _score_by_generation(model: Any, tokenizer: Any, exs: list[dict], indices: list[int], prompts: list[str],
                         settings: TokenizeSettings, is_seq2seq: bool, cfg: EvalConfig, max_new_tokens: int,
                         seed: int, classify: bool, progress: Callable[[int], None] | None = None,
                         with_perplexity: bool = False, stop_strings: Sequence[str] = ()) -> _Scored:
    fed = encode_for_generation(tokenizer, prompts, settings, max_new_tokens)
    references = _references(tokenizer, exs, prompts, fed, settings) \
        if with_perplexity and not is_seq2seq and cfg.num_beams == 1 else None
    out = generate_scoring(
        model, tokenizer, prompts, settings, is_seq2seq=is_seq2seq, max_new_tokens=max_new_tokens,
        references=references, batch_size=cfg.batch_size, num_beams=cfg.num_beams, do_sample=cfg.do_sample,
        seed=seed, stop_strings=stop_strings, progress=progress)
    full = encode_prompts(tokenizer, prompts, settings)
    preds, records, unparseable = [], [], 0
    for i, ex, prompt, generated, cut in zip(indices, exs, prompts, out.answers, out.cut_short):
        text = final_answer(generated)  # scored without a reasoning block; predictions.jsonl keeps it
        if classify:
            mapped = map_to_choice(text, ex["choices"])
            unparseable += mapped is None
            pred = _nfc_text(text if mapped is None else mapped)
            preds.append(pred)
            records.append(_record(i, ex, prompt, pred, generated=generated,
                                   correct=mapped is not None and pred == _nfc_text(ex["completion"]),
                                   cut_short=cut))
        else:
            preds.append(_nfc_text(text))
            records.append(_record(i, ex, prompt, text, cut_short=cut,
                                   **({"generated": generated} if text != generated else {})))
    _warn_cut_short(exs, sum(out.cut_short), max_new_tokens)
    return _Scored(exs[0]["template_id"], indices, preds, [_nfc_text(final_answer(ex["completion"])) for ex in exs],
                   _class_labels(exs) if classify else None, records, [len(x) for x in fed],
                   sum(len(a) < len(b) for a, b in zip(fed, full)), unparseable, reference_nll=out.reference_nll,
                   cut_short=sum(out.cut_short))


def _warn_cut_short(exs: list[dict], cut: int, max_new_tokens: int) -> None:
    """Warn that `cut` answers of this template reached `max_new_tokens` without ending: they are scored cut
    short (a reasoning block never closed scores as no answer at all; lm-evaluation-harness#3400)."""
    if cut:
        logger.warning("%s: %d of %d generated answers reached max_new_tokens=%d without ending (no EOS or end of "
                       "turn) and are scored cut short; raise eval.max_new_tokens.%s if answers need more",
                       exs[0]["template_id"], cut, len(exs), max_new_tokens, exs[0]["task"])


def _reference_nll(model: Any, tokenizer: Any, exs: list[dict], prompts: list[str],
                   known: list[tuple[float, int] | None] | None, settings: TokenizeSettings, is_seq2seq: bool,
                   batch_size: int) -> tuple[float, int]:
    """(total NLL in nats, label tokens) of the reference completions: the ones ranking computed, plus
    `completion_nll` over the rest (module docstring)."""
    known = known or [None] * len(exs)
    rest = [k for k, value in enumerate(known) if value is None]
    total = sum(value[0] for value in known if value is not None)
    tokens = sum(value[1] for value in known if value is not None)
    if rest:
        more, more_tokens, _ = completion_nll(model, tokenizer, [prompts[k] for k in rest],
                                              [exs[k]["completion"] for k in rest], settings, is_seq2seq,
                                              batch_size=batch_size)
        total, tokens = total + more, tokens + more_tokens
    return total, tokens


def _max_new_tokens(task: str, cfg: EvalConfig, override: dict[str, int] | None) -> int:
    table = {**DEFAULT_MAX_NEW_TOKENS, **cfg.max_new_tokens, **(override or {})}
    return table.get(task, FALLBACK_MAX_NEW_TOKENS)


def _score_templates(model: Any, tokenizer: Any, examples: Sequence[dict], chosen: list[int],
                     prompts: dict[int, str], settings: TokenizeSettings, is_seq2seq: bool, cfg: EvalConfig,
                     max_new_tokens_by_task: dict[str, int] | None, seed: int, classify_by: str,
                     with_perplexity: bool, answer_end: str | None = None) -> dict[str, _Scored]:
    """Score the chosen examples, (dataset, template) group by group (in first-seen order), keyed by
    `instructkit.evaluate.groups.group_keys`. `answer_end` (k-shot text prompts, `fewshot.answer_end`):
    generated answers end before it and ranked choices are scored followed by it instead of EOS."""
    by_template: dict[str, list[int]] = {}
    for i, key in zip(chosen, group_keys([examples[i] for i in chosen])):
        by_template.setdefault(key, []).append(i)
    scored = {}
    bar = ProgressBar("evaluate", len(chosen))  # one bar over every template (plain lines off a terminal)
    tick = lambda n: bar.update(advance=n)
    try:
        for tid, indices in by_template.items():
            exs = [examples[i] for i in indices]
            texts = [prompts[i] for i in indices]
            has_choices = all(ex.get("choices") for ex in exs)
            logger.info("evaluating %s: %d examples by %s", tid, len(exs),
                        "rank" if has_choices and classify_by == "rank" else "generation")
            bar.update(info=tid)
            if has_choices and classify_by == "rank":
                result = _score_by_rank(model, tokenizer, exs, indices, texts, settings, is_seq2seq, cfg, tick,
                                        answer_end)
            else:
                result = _score_by_generation(model, tokenizer, exs, indices, texts, settings, is_seq2seq, cfg,
                                              _max_new_tokens(exs[0]["task"], cfg, max_new_tokens_by_task), seed,
                                              classify=has_choices, progress=tick, with_perplexity=with_perplexity,
                                              stop_strings=(answer_end,) if answer_end else ())
            if with_perplexity:
                result.nll = _reference_nll(model, tokenizer, exs, texts, result.reference_nll, settings,
                                            is_seq2seq, cfg.batch_size)
            scored[tid] = result
    finally:
        bar.update(info="")
        bar.close()
    return scored
