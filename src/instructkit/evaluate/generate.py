"""Batched generation: answers to prompts, cut at stop tokens, and the answer choice an answer names.

`generate` decodes greedily by default (beam search or seeded sampling on request), `batch_size` prompts at
a time, each prompt cut as in training so that prompt + answer fits `max_length`. It stops at EOS, at the
chat template's end-of-turn token (`stop_token_ids`) or at any EOS id of the model's generation_config.
`map_to_choice` turns a generated answer into the choice it names, for classification by generation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from instructkit.data.tokenize import TokenizeSettings, encode_for_generation, stop_token_ids
from instructkit.evaluate.model_inputs import (
    index_chunks,
    left_pad,
    longest_first,
    model_device,
    right_pad,
    settings_for_model,
    tokenizer_pad_id,
)

__all__ = [
    "generate",
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


def _cut_at_stop(tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The tokens before the first stop token."""
    out = []
    for tok in tokens:
        if tok in stops:
            break
        out.append(tok)
    return out


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
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers to `prompts`, `batch_size` at a time: greedy by default, stopping at EOS / end-of-turn
    (`stop_token_ids`) or any EOS id the model's generation_config lists.

    Prompts are cut as in training so that prompt + answer fits `max_length`
    (`encode_for_generation`), left-padded for causal models. Only the new tokens are decoded (special
    tokens skipped, whitespace stripped). Sampling is seeded: the same call gives the same answers, and the
    global torch random state is left as it was. `max_new_tokens` counts tokens.

    Raises: ValueError when the tokenizer has no EOS token, or neither a pad nor an EOS token.
    """
    settings = settings_for_model(settings, is_seq2seq)
    prompt_ids = encode_for_generation(tokenizer, prompts, settings, max_new_tokens)
    stops = _with_model_stops(stop_token_ids(tokenizer, settings), model)
    pad_id = tokenizer_pad_id(tokenizer)
    config = _generation_config(model, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                do_sample=do_sample, stops=stops, pad_id=pad_id)
    device = model_device(model)
    answers = [""] * len(prompt_ids)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in index_chunks(longest_first([len(p) for p in prompt_ids]), batch_size):
            rows = [prompt_ids[i] for i in batch]
            if is_seq2seq:
                ids, mask = right_pad(rows, pad_id, device)
            else:
                ids, mask, _ = left_pad(rows, pad_id, device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            # Causal output = the (padded) prompt then the new tokens; seq2seq output = decoder start + new.
            new = out[:, ids.shape[1]:] if not is_seq2seq else out[:, 1:]
            for i, tokens in zip(batch, new.tolist()):
                answers[i] = tokenizer.decode(_cut_at_stop(tokens, stops), skip_special_tokens=True).strip()
            if progress is not None:  # a progress display: n prompts done
                progress(len(batch))
    return answers


# --------------------------------------------------------------------------------------------------
# Mapping a generated answer to a class
# --------------------------------------------------------------------------------------------------

_EDGE_PUNCT = " \t\r\n\"'`.,;:!?()[]{}*"


def _norm(text: str) -> str:
    return text.strip().strip(_EDGE_PUNCT).casefold()


def map_to_choice(text: str, choices: Sequence[str]) -> str | None:
    """The choice a generated answer names, or None when it names none (counted as unparseable).

    In order: (1) the whole answer equals a choice, ignoring case and edge punctuation ("Positive." ->
    "positive"); (2) the answer starts with a choice followed by a non-word character ("5 stars" -> "5",
    "yes, it does" -> "yes"), the longest such choice winning ("not entailment" over "not"); (3) the first
    word equals a choice ("**4** stars" -> "4").
    """
    answer = _norm(text)
    if not answer:
        return None
    normalized = [(_norm(c), c) for c in choices]
    for norm, choice in normalized:
        if norm and answer == norm:
            return choice
    leading = [(norm, choice) for norm, choice in normalized
               if norm and answer.startswith(norm) and not re.match(r"\w", answer[len(norm):len(norm) + 1])]
    if leading:
        return max(leading, key=lambda pair: len(pair[0]))[1]
    first_word = _norm(answer.split()[0]) if answer.split() else ""
    for norm, choice in normalized:
        if norm and first_word == norm:
            return choice
    return None
