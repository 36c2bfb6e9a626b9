"""Batched generation: answers to prompts, cut at stop tokens, and the answer choice an answer names.

`generate` decodes greedily by default (beam search or seeded sampling on request), in batches of
`batch_size` of the longest prompts (more of shorter ones), each prompt cut as in training so that
prompt + answer fits `max_length`. It stops at EOS, at the
chat template's end-of-turn token (`stop_token_ids`) or at any EOS id of the model's generation_config.
`map_to_choice` turns a generated answer into the choice it names, for classification by generation.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from instructkit.data.tokenize import TokenizeSettings, encode_for_generation, stop_token_ids
from instructkit.evaluate.model_inputs import (
    left_pad,
    model_device,
    right_pad,
    settings_for_model,
    token_batches,
    token_logprobs,
    tokenizer_pad_id,
)

__all__ = [
    "Generated",
    "Reference",
    "final_answer",
    "generate",
    "generate_scoring",
    "map_to_choice",
]


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def _with_model_stops(stops: list[int], model: Any) -> list[int]:
    """`stops` plus the model's own generation_config EOS ids (e.g. an instruct model's end-of-turn)."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for tok in own if isinstance(own, (list, tuple)) else [own]:
        if tok is not None and int(tok) not in stops:
            stops = stops + [int(tok)]
    return stops


def _generation_config(model: Any, *, max_new_tokens: int, num_beams: int, do_sample: bool,
                       stops: list[int], pad_id: int) -> Any:
    """The model's own generation config (sampling temperature etc.), with our length, stops and mode."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.min_new_tokens = None
    config.min_length = 0
    config.num_beams = num_beams
    config.do_sample = do_sample
    config.eos_token_id = stops
    config.pad_token_id = pad_id
    config.num_return_sequences = 1
    if not do_sample:  # greedy / beam: sampling knobs would only raise warnings
        config.temperature = None
        config.top_p = None
        config.top_k = None
    return config


def _cut_at_text(text: str, stop_strings: Sequence[str]) -> str:
    """`text` before the first occurrence of any of `stop_strings` (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return text[:min(ends)] if ends else text


def _cut_at_stop(tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The tokens before the first stop token."""
    out = []
    for tok in tokens:
        if tok in stops:
            break
        out.append(tok)
    return out


@dataclass(frozen=True)
class Generated:
    """What `generate_scoring` returns: `answers` (text, cut and stripped); `reference_nll` per prompt,
    (summed NLL in nats, label tokens) of its reference or None; `cut_short` per prompt, True where
    decoding stopped at `max_new_tokens` (no stop token, no stop string): the answer was cut, not ended."""

    answers: list[str]
    reference_nll: list[tuple[float, int] | None]
    cut_short: list[bool]


@dataclass(frozen=True)
class Reference:
    """A reference answer to score while generating: its token ids after the prompt as training encodes
    them (`encode_batch`: completion + EOS, or the assistant turn) and which of them are labels."""

    ids: list[int]
    labelled: list[bool]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: TokenizeSettings,
    *,
    is_seq2seq: bool,
    max_new_tokens: int,
    batch_size: int = 16,
    num_beams: int = 1,
    do_sample: bool = False,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers to `prompts`, longest first in batches: greedy by default, stopping at EOS / end-of-turn
    (`stop_token_ids`) or any EOS id the model's generation_config lists.

    A batch holds `batch_size` rows of the longest prompts and more rows of shorter ones (up to 4 x
    batch_size) within the first batch's tokens of prompt + `max_new_tokens` (`token_batches`): a decoding
    step costs about the same for 16 rows as for 40 on a CPU (the weights are read once per step), so
    fewer, fuller batches take fewer steps, and no batch's key/value cache outgrows the first one's.

    Prompts are cut as in training so that prompt + answer fits `max_length`
    (`encode_for_generation`), left-padded for causal models. Only the new tokens are decoded (special
    tokens skipped, cut before the first of `stop_strings`, e.g. the "\\n\\n" that ends a k-shot
    demonstration, whitespace stripped). Sampling is seeded: the same call gives the same answers, and the
    global torch random state is left as it was (samples depend on how the prompts are batched, as in any
    batched sampler: another batch_size or max_new_tokens draws others). `max_new_tokens` counts tokens.

    Raises: ValueError when the tokenizer has no EOS token, or neither a pad nor an EOS token.
    """
    return generate_scoring(model, tokenizer, prompts, settings, is_seq2seq=is_seq2seq,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams,
                            do_sample=do_sample, seed=seed, stop_strings=stop_strings, progress=progress).answers


def generate_scoring(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: TokenizeSettings,
    *,
    is_seq2seq: bool,
    max_new_tokens: int,
    references: Sequence[Reference | None] | None = None,
    batch_size: int = 16,
    num_beams: int = 1,
    do_sample: bool = False,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
) -> Generated:
    """`generate`, the summed NLL (nats) and label count of each given reference answer, and which answers
    `max_new_tokens` cut short (`Generated`).

    A causal model's prompt is encoded once for both: one forward pass over prompt + reference gives the
    reference's log-probabilities (the logits of its positions only) and the prompt's key/value cache,
    which generation then continues from (cut back to the prompt, less its last token, which generation
    feeds again). That pass replaces the second forward over every prompt that scoring the references
    separately (`scoring.completion_nll`) costs. The caller passes a reference only where generation's
    prompt ids equal the training encoding's prompt (nothing cut). None where no reference was given, and
    for every example with seq2seq models or beam search: the caller scores those separately. Where the
    cache cannot be cut back (a sliding window already full, no cache returned) or the model's generation
    config asks for its own cache implementation or for none, generation encodes the prompt again (the
    NLL still counts). Answers are those of `generate` within float32 summation order (the prompt's keys
    and values come from a wider pass: a near-tie in greedy decoding could go the other way).
    """
    settings = settings_for_model(settings, is_seq2seq)
    prompt_ids = encode_for_generation(tokenizer, prompts, settings, max_new_tokens)
    stops = _with_model_stops(stop_token_ids(tokenizer, settings), model)
    pad_id = tokenizer_pad_id(tokenizer)
    config = _generation_config(model, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                do_sample=do_sample, stops=stops, pad_id=pad_id)
    device = model_device(model)
    answers = [""] * len(prompt_ids)
    cut_short = [False] * len(prompt_ids)
    scored: list[tuple[float, int] | None] = [None] * len(prompt_ids)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lengths = [len(p) + max_new_tokens for p in prompt_ids]  # the widest pass: decoding, or ...
        for i, ref in enumerate(references or []):
            if ref:  # ... prompt + reference in the scoring pass
                lengths[i] = max(lengths[i], len(prompt_ids[i]) + len(ref.ids))
        for batch in token_batches(lengths, batch_size):
            rows = [prompt_ids[i] for i in batch]
            if is_seq2seq:
                ids, mask = right_pad(rows, pad_id, device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            else:
                ids, mask, _ = left_pad(rows, pad_id, device)
                refs = [references[i] if references else None for i in batch]
                cache = None
                if num_beams == 1 and any(refs):
                    cache, nll = _score_references(model, ids, mask, refs, pad_id)
                    if config.cache_implementation is not None or config.use_cache is False:
                        cache = None  # the model's config asks for its own cache, or for none
                    for i, value in zip(batch, nll):
                        scored[i] = value
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, cache=cache)
            # Causal output = the (padded) prompt then the new tokens; seq2seq output = decoder start + new.
            new = out[:, ids.shape[1]:] if not is_seq2seq else out[:, 1:]
            for i, tokens in zip(batch, new.tolist()):
                kept = _cut_at_stop(tokens, stops)
                text = tokenizer.decode(kept, skip_special_tokens=True)
                answer = _cut_at_text(text, stop_strings)
                cut_short[i] = len(kept) >= max_new_tokens and answer == text  # no stop: the limit ended it
                answers[i] = answer.strip()
            if progress is not None:  # a progress display: n prompts done
                progress(len(batch))
    return Generated(answers, scored, cut_short)


def _score_references(model: Any, ids: torch.Tensor, mask: torch.Tensor, refs: list[Reference | None],
                      pad_id: int) -> tuple[Any, list[tuple[float, int] | None]]:
    """One forward over [left-padded prompts | references, right-padded]: (the key/value cache cut back to
    the prompts less their last token, or None when it cannot be cut; per row (NLL, labels) or None).

    ids, mask: [B, P]. The logits kept are those of columns P-1 .. P+R-2, which predict the R reference
    columns; positions count real tokens, as `left_pad` gives them."""
    width = max(len(r.ids) if r else 0 for r in refs)
    tail = torch.full((len(refs), width), pad_id, dtype=torch.long)
    tail_mask = torch.zeros((len(refs), width), dtype=torch.long)
    labelled = torch.zeros((len(refs), width), dtype=torch.bool)
    for row, ref in enumerate(refs):
        if ref:
            tail[row, :len(ref.ids)] = torch.tensor(ref.ids, dtype=torch.long)
            tail_mask[row, :len(ref.ids)] = 1
            labelled[row, :len(ref.ids)] = torch.tensor(ref.labelled, dtype=torch.bool)
    full_mask = torch.cat([mask, tail_mask.to(mask.device)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_width = ids.shape[1]
    predicting = torch.arange(prompt_width - 1, prompt_width + width - 1, device=ids.device)
    out = model(input_ids=torch.cat([ids, tail.to(ids.device)], dim=1), attention_mask=full_mask,
                position_ids=positions, use_cache=True, logits_to_keep=predicting)
    valid = labelled.to(ids.device)
    token_lp = token_logprobs(out.logits, tail.to(ids.device)) * valid
    nll = [(-float(total), int(count)) if ref else None
           for ref, total, count in zip(refs, token_lp.sum(-1).tolist(), valid.sum(-1).tolist())]
    cache = getattr(out, "cache", None)
    try:
        cache.crop(-(width + 1))  # keep the prompts less their last column: generation feeds it again
    except (AttributeError, RuntimeError, ValueError):  # no cache, or a full sliding window: not cut back
        cache = None
    return cache, nll


# --------------------------------------------------------------------------------------------------
# Mapping a generated answer to a class
# --------------------------------------------------------------------------------------------------

_EDGE_CATEGORIES = ("Pi", "Pf", "Ps", "Pe", "Po")  # quotes, brackets, other punctuation (not dashes: "-1")


def _edge(ch: str) -> bool:
    """Whitespace, a backtick or punctuation an answer is wrapped in, of any script: ASCII ". , ; : ! ? * ( ) " '",
    typographic quotes “ ” « », CJK brackets and stops 「 」 。 ！. Not a dash, so "-1" stays itself."""
    return ch.isspace() or ch == "`" or unicodedata.category(ch) in _EDGE_CATEGORIES


def _norm(text: str) -> str:
    """NFKC (full-width ５ and Ｙｅｓ are 5 and Yes), edge punctuation and whitespace off both ends, casefolded."""
    text = unicodedata.normalize("NFKC", text)
    start, end = 0, len(text)
    while start < end and _edge(text[start]):
        start += 1
    while end > start and _edge(text[end - 1]):
        end -= 1
    return text[start:end].casefold()


def final_answer(text: str) -> str:
    """`text` without the reasoning before its answer: what follows the last "</think>" when the text opens
    with "<think>" or holds a "</think>" alone (the generation prompt opened the block); "" when a "<think>"
    block never closes (the answer was never reached). Other text comes back as it is.

    Reasoning templates (Qwen3) write a <think> block, empty or not, before every answer, so a tuned model
    generates one; scored as it is, ROUGE and token F1 count "think" as answer words and a choice is not
    found (lighteval#869: remove thinking from all evals; AutoRAG#1133: ROUGE drops on <think> tags).
    """
    stripped = text.lstrip()
    if "</think>" in text and (stripped.startswith("<think>") or "<think>" not in text):
        return text.rsplit("</think>", 1)[1].strip()
    return "" if stripped.startswith("<think>") else text


def _names_at_start(answer: str, norm: str) -> bool:
    """`answer` starts with the choice `norm` followed by a non-word character, and not by the rest of a
    number: "4.5" and "4,5" (a decimal comma) are other numbers than "4" (the integer-part kind of
    stanford-crfm/helm#4289); "4. Great" and "4, good" name it."""
    if not norm or not answer.startswith(norm):
        return False
    rest = answer[len(norm):len(norm) + 2]
    if re.match(r"\w", rest):
        return False
    return not (norm[-1].isdigit() and re.match(r"[.,]\d", rest))


def map_to_choice(text: str, choices: Sequence[str]) -> str | None:
    """The choice a generated answer names, or None when it names none (counted as unparseable).

    In order: (1) the whole answer equals a choice, ignoring case, full-width forms (NFKC) and the punctuation
    around it, of any script ("Positive." -> "positive", "“positive”", "「はい」", "５" -> "5"); (2) the answer
    starts with a choice followed by a non-word character that does not continue a number ("5 stars" -> "5",
    "yes, it does" -> "yes"; "4.5" names no choice), the longest such choice winning ("not entailment" over
    "not"); (3) the first word equals a choice ("**4** stars" -> "4"). A hedge names none: a choice found by
    (2) or (3) followed by another choice after "/", "|", "-", "or", "to" or "vs" ("positive/negative", "4 or 5
    stars", "4-5"), or after ",", ";", "&", "+" or "and" when the other choice ends the answer or the list
    ("positive, negative", "yes and no"; "yes, no doubt" is a yes). "4/5" with 5 the highest numeric choice
    is a score out of 5, not a hedge. Crediting the first choice a hedge names scored "positive/negative"
    as correct for every positive review. (4) Failing those, what follows the last "answer is" / "answer:"
    ("Let me think. The answer is 4." -> "4"; lm-evaluation-harness's "The answer is" regex filters).
    """
    choice = _named(text, choices)
    if choice is None and (said := list(_ANSWER_IS.finditer(text := unicodedata.normalize("NFKC", text)))):
        choice = _named(text[said[-1].end():], choices)
    return choice


_ANSWER_IS = re.compile(r"\banswer\b(?:\s+(?:is|would be|will be))?\s*[:=\-]?", re.IGNORECASE)


def _named(text: str, choices: Sequence[str]) -> str | None:
    """map_to_choice's rules (1)-(3) on the whole of `text`."""
    answer = _norm(text)
    if not answer:
        return None
    normalized = [(_norm(c), c) for c in choices]
    for norm, choice in normalized:
        if norm and answer == norm:
            return choice
    leading = [(norm, choice) for norm, choice in normalized if _names_at_start(answer, norm)]
    if leading:
        norm, choice = max(leading, key=lambda pair: len(pair[0]))
        return None if _hedged(answer[len(norm):], norm, normalized) else choice
    words = answer.split(maxsplit=1)
    first_word = _norm(words[0]) if words else ""
    for norm, choice in normalized:
        if norm and first_word == norm:
            return None if _hedged(words[1] if len(words) > 1 else "", norm, normalized) else choice
    return None


_STRONG_HEDGE = re.compile(r"\s*(?:[/|\-\u2013\u2014]|(?:or|to|vs)\b\.?)\s*")
_WEAK_HEDGE = re.compile(r"\s*(?:[,;&+]|and\b)\s*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_CLOSING = "*_`'\"\u2019\u201d)]"
_OPENING = "*_`'\"\u2018\u201c(["


def _hedged(rest: str, named: str, normalized: Sequence[tuple[str, str]]) -> bool:
    """`rest` (what follows the choice `named` in a normalised answer) names another choice as an
    alternative (map_to_choice's hedge rule); markup and quotes around either choice are ignored."""
    rest = rest.lstrip(_CLOSING)
    for pattern, strong in ((_STRONG_HEDGE, True), (_WEAK_HEDGE, False)):
        if not (match := pattern.match(rest)):
            continue
        tail = rest[match.end():].lstrip(_OPENING)
        for norm, _ in normalized:
            if not norm or norm == named or not (tail == norm or _names_at_start(tail, norm)):
                continue
            after = tail[len(norm):]
            if not strong and _norm(after) and not (_STRONG_HEDGE.match(after) or _WEAK_HEDGE.match(after)):
                continue  # "yes, no doubt": the other choice starts a phrase, not an alternative
            if match.group().strip() == "/" and _out_of(named, norm, normalized):
                continue
            return True
    return False


def _out_of(named: str, other: str, normalized: Sequence[tuple[str, str]]) -> bool:
    """"4/5": `other` is the highest numeric choice and `named` a number no higher (a score out of it)."""
    numbers = [float(n) for n, _ in normalized if _NUMBER.fullmatch(n)]
    if not numbers or not _NUMBER.fullmatch(named) or not _NUMBER.fullmatch(other):
        return False
    return float(other) == max(numbers) and float(named) <= float(other)
