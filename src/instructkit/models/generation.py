"""Pad token and the token ids that end generation, set on the tokenizer and the model's generation_config."""

from __future__ import annotations

import logging
import re
from typing import Any

from instructkit.data.tokenize import TokenizeSettings, stop_token_ids
from instructkit.errors import ModelError

logger = logging.getLogger(__name__)

FLAG_LINE = re.compile(r"^- `(\w+)`:", re.MULTILINE)  # one line per flag of GenerationConfig.validate's error


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
    """Set generation_config.eos_token_id (all stop ids) and pad_token_id from the tokenizer, and unset the
    flags its generation mode ignores (`drop_ignored_flags`), so that the model saves.

    Raises: ModelError when transformers refuses the generation config for another reason.
    """
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
    drop_ignored_flags(gen)


def drop_ignored_flags(gen: Any) -> list[str]:
    """Unset (to GenerationConfig's default, None) the flags `gen`'s generation mode ignores; return their names.

    transformers' `GenerationConfig.validate(strict=True)` names them: sampling flags (temperature, top_p, ...)
    without do_sample, beam flags (length_penalty, early_stopping) with one beam, output flags without
    return_dict_in_generate. `save_pretrained` refuses a config changed since it was loaded that holds any
    (transformers#29988): a base model whose generation_config.json sets temperature 0.9 and top_p 0.6 without
    do_sample (Vicuna, Llama-2-chat copies) was tuned, then failed at its save, since `configure_generation`
    changes the config. The flags had no effect, so generation is unchanged (greedy stays greedy).
    Raises: ModelError when the config is invalid for another reason (transformers' message).
    """
    try:
        gen.validate(strict=True)
        return []
    except ValueError as exc:
        names = [name for name in FLAG_LINE.findall(str(exc)) if hasattr(gen, name)]
        if not names:
            raise ModelError(f"the model's generation config cannot be saved: {exc}") from None
    default = type(gen)()
    logger.warning("generation_config: %s had no effect in its generation mode (transformers ignores them); "
                   "unset, so that the model can be saved", ", ".join(f"{n}={getattr(gen, n)!r}" for n in names))
    for name in names:
        setattr(gen, name, getattr(default, name))
    try:
        gen.validate(strict=True)
    except ValueError as exc:
        raise ModelError(f"the model's generation config cannot be saved: {exc}") from None
    return names
