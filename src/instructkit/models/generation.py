"""Pad token and the token ids that end generation, set on the tokenizer and the model's generation_config."""

from __future__ import annotations

import logging
from typing import Any

from instructkit.data.tokenize import TokenizeSettings, stop_token_ids

logger = logging.getLogger(__name__)


def ensure_pad_token(tokenizer: Any, rows: int | None = None) -> None:
    """Batching needs a pad token; when the tokenizer has none, use EOS (labels never come from pad ids).

    `rows`: the model's input embedding rows. A pad token past them (one added to the tokenizer without
    resizing the embedding, llama-cookbook#189) is replaced by EOS too: every padded batch would index past
    the embedding (IndexError on the CPU, a device-side assert on CUDA)."""
    pad = tokenizer.pad_token_id
    if pad is not None and rows is not None and pad >= rows and tokenizer.eos_token is not None:
        logger.warning("the tokenizer's pad token %r has id %d but the model's embedding has %d rows; using "
                       "its EOS %r for padding", tokenizer.pad_token, pad, rows, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.pad_token is None and tokenizer.eos_token is not None:
        logger.info("tokenizer has no pad token; using its EOS %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


def configure_generation(model: Any, tokenizer: Any) -> None:
    """Set generation_config.eos_token_id (all stop ids) and pad_token_id from the tokenizer."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    try:
        ids = stop_token_ids(tokenizer, TokenizeSettings(chat_template=True), gen.eos_token_id)
    except ValueError:  # no EOS anywhere: leave the config as it is
        ids = []
    if ids:
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (ids[0] if ids else None)
    if pad is not None:
        gen.pad_token_id = int(pad)
