"""Model inputs in batches, shared by rank classification, generation and perplexity.

Tokenize settings follow the model kind (`for_model`); batches are padded with the tokenizer's pad id
(else its EOS id); examples go through the model longest first in `token_batches` (a row count for the
longest prompts; shorter prompts go more rows at a time within the longest batch's tokens), so the rows of
one batch have similar lengths; `token_logprobs` turns logits into the log-probability of given tokens.

Padding: causal batches are LEFT-padded with explicit `position_ids` (0 at each example's first real token),
so every row ends at the last column and a padded row computes what the unpadded one does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from instructkit.data.tokenize import TokenizeSettings


def settings_for_model(settings: TokenizeSettings, is_seq2seq: bool) -> TokenizeSettings:
    """The settings with `seq2seq` matching the model (the model decides, not the caller's default)."""
    return settings if settings.seq2seq == is_seq2seq else replace(settings, seq2seq=is_seq2seq)


def tokenizer_pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (SmolLM2's pad IS its EOS; padding is masked anyway).

    Raises ValueError when the tokenizer has neither.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return int(pad)


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter, where its inputs go."""
    return next(model.parameters()).device


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), left-padded: every row ends at the last column.

    Positions count real tokens only: a row [pad, pad, a, b, c] gets positions [0, 0, 0, 1, 2], so its
    tokens sit where they would without padding.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def right_pad(rows: Sequence[Sequence[int]], pad_value: int, device: torch.device,
               width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), right-padded to `width` (default: the longest row)."""
    width = max([len(r) for r in rows] + [1]) if width is None else width
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def index_chunks(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), max(size, 1)):
        yield list(indices[start:start + size])


ROW_GROWTH = 4  # token_batches: at most this many times eval.batch_size rows in one batch


def token_batches(lengths: Sequence[int], batch_size: int, *, growth: int = ROW_GROWTH,
                  max_padding: float = 1.0) -> list[list[int]]:
    """Indices in batches, longest first: `batch_size` rows of the longest prompts, more of shorter ones.

    The first batch holds the `batch_size` longest rows, batch_size x L tokens (L = the longest length). A
    later batch takes more than `batch_size` rows while rows x its width stays within those batch_size x L
    tokens, up to `growth` x batch_size rows: no batch holds more tokens than the first, and per-row buffers
    (kept logits, rows x V) stay within `growth` x what `batch_size` rows take (growth 1: plain chunks of
    `batch_size`). A batch also ends before the next row would make its padding more than `max_padding` of
    its padded tokens (1.0: no limit), so a long outlier goes with few rows instead of widening a full batch.

    Lengths [153, 110, 60, 59, 58, 40], batch_size 2 -> [[0, 1], [2, 3, 4, 5]] (2 x 153 = 306 tokens, 43 of
    them padding; 4 x 60 = 240 <= 306); with growth 1: [[0, 1], [2, 3], [4, 5]].

    Raises: ValueError when `batch_size` or `growth` < 1, or `max_padding` is not in [0, 1].
    """
    if batch_size < 1 or growth < 1:
        raise ValueError(f"batch_size and growth must be >= 1, got {batch_size} and {growth}")
    if not 0.0 <= max_padding <= 1.0:
        raise ValueError(f"max_padding must be in [0, 1], got {max_padding}")
    if not lengths:
        return []
    budget = batch_size * max(max(int(n) for n in lengths), 1)
    batches: list[list[int]] = []
    batch: list[int] = []
    width = real = 0
    for i in longest_first(lengths):
        n = max(int(lengths[i]), 1)
        if batch:
            rows = len(batch) + 1
            fits = rows <= batch_size or (rows * width <= budget and rows <= growth * batch_size)
            if fits and rows * width - (real + n) <= max_padding * rows * width:
                batch.append(i)
                real += n
                continue
            batches.append(batch)
        batch, width, real = [i], n, n
    batches.append(batch)
    return batches


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices sorted by length, longest first: rows of one batch have similar lengths (little padding)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position: log_softmax over the vocabulary, then gather.

    logits (..., V), targets (...) -> (...). The full log-softmax lives only for this batch's kept
    positions; nothing of vocabulary size is kept across batches.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
