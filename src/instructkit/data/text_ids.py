"""Text -> token ids for the two pieces of a causal example: the prompt (with the tokenizer's special
tokens, BOS once) and the text that follows it (a completion, a ranked choice), tokenized as it reads
after other text.

Why "after other text": a SentencePiece tokenizer in its legacy form (Llama-2, Mistral-7B-v0.1, TinyLlama,
Yi: a `Prepend("▁")` normaliser in tokenizer.json) marks the start of every text it is given with "▁", so
" yes" on its own is `▁ ▁yes` (Llama-2's ids 29871 4874) while "Answer: yes" ends with `▁yes` (4874).
A completion tokenized alone trained the model to answer with a lone "▁" no text ever has (the "29871"
of trl#598/#622 and DataCollatorForCompletionOnlyLM's "response template not found", trl#980, #1183), and
rank scoring scored choices in that form. `continuation_ids` tokenizes `ANCHOR + text` and takes the
anchor's tokens off, as transformers' own non-legacy Llama tokenizer does with its unk token
(`tokenize(unk_token + text)[len(unk):]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ANCHOR = "\n"
"""The text `continuation_ids` puts before a text: a newline, which no tokenizer here merges with a
following space or letter (a byte-level BPE, SentencePiece and tiktoken-style splits all end a piece at it)."""


def continuation_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as it reads after other text, without special tokens.

    `ANCHOR + text` is tokenized and the anchor's own tokens taken off its front. Where they are not its
    front (the text's first characters merged with the anchor, e.g. a text starting with a newline under a
    tokenizer that joins "\\n\\n"), the text is tokenized alone. For a tokenizer that does not mark a text's
    start (GPT-2-style byte-level BPE, tiktoken, Gemma) the ids equal `tokenizer(text)` without special
    tokens; for a legacy SentencePiece one they lose the spurious leading "▁" (module docstring).
    """
    texts = list(texts)
    if not texts:
        return []
    anchor = list(tokenizer(ANCHOR, add_special_tokens=False)["input_ids"])
    anchored = tokenizer([ANCHOR + t for t in texts], add_special_tokens=False,
                         return_attention_mask=False)["input_ids"]
    out: list[list[int] | None] = [list(ids[len(anchor):]) if list(ids[:len(anchor)]) == anchor else None
                                   for ids in anchored]
    alone = [i for i, ids in enumerate(out) if ids is None]
    if alone:
        plain = tokenizer([texts[i] for i in alone], add_special_tokens=False,
                          return_attention_mask=False)["input_ids"]
        for i, ids in zip(alone, plain):
            out[i] = list(ids)
    return out  # type: ignore[return-value]


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt ids with the tokenizer's special tokens, BOS once: text starting with BOS gets no second (trl#1400)."""
    ids = tokenizer(list(prompts), add_special_tokens=True, return_attention_mask=False)["input_ids"]
    bos, text = tokenizer.bos_token_id, tokenizer.bos_token or "\0"
    adds = bos is not None and tokenizer("")["input_ids"][:1] == [bos]  # the tokenizer puts BOS in front
    return [x[1:] if adds and x[:2] == [bos, bos] and p.startswith(text) else x for p, x in zip(prompts, ids)]


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id. Raises: ValueError when it has none (completions must end with one)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: completions must end with one")
    return int(eos)


def prefix_token_id(tokenizer: Any) -> int:
    """The token an empty causal prompt is encoded as: BOS, else EOS (lm-evaluation-harness's prefix token).

    A tokenizer without BOS (GPT-2, SmolLM2, Qwen) encodes "" as no tokens; the answer's first token would
    then have no position to be predicted from (scoring read a padding column or failed on an empty batch).
    """
    return int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else eos_id(tokenizer)
