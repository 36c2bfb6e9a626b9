"""The decoder targets of a seq2seq (encoder-decoder) model, framed as its tokenizer frames a target text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def seq2seq_target_ids(tokenizer: Any, completions: Sequence[str], add_eos: bool = True) -> list[list[int]]:
    """Decoder targets of a seq2seq model: each completion framed as the tokenizer frames a target text
    (`tokenizer(text_target=...)`, special tokens included: BART's `<s> ... </s>`, T5's `... </s>`), ending
    with EOS exactly once (with none when not `add_eos`).

    The framing is what the model's generation expects: BART's generation config forces `<s>` as the first
    generated token (`forced_bos_token_id`, transformers#15559, #7961: labels `<s> tok </s>`, decoder inputs
    `</s> <s> tok`). Targets without it trained the decoder on inputs that generation never sends: a tiny
    BART fine-tuned to "Ein Mann fährt Fahrrad." generated "Mann fährt Fahrrad.".
    Raises: ValueError when `add_eos` and the tokenizer has no EOS token.
    """
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("the tokenizer has no EOS token: completions must end with one")
    framed = tokenizer(text_target=list(completions), add_special_tokens=True)["input_ids"]
    out = []
    for ids in framed:
        ids = list(ids)
        if ids and eos is not None and ids[-1] == eos:
            ids = ids[:-1]
        out.append(ids + [eos] if add_eos else ids)
    return out
