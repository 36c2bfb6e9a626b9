"""A chunk of examples -> flat token arrays for the token store (data/store.py), exactly as
tokenize.encode_batch / tokenize_examples encode them.

Causal prompt/completion examples (no chat template) take the batched path: the prompts of the chunk go
through the fast tokenizer in one call, each distinct completion once (a classification task has a handful),
and truncation, the prompt mask (-100) and the flat layout are computed with numpy from the lengths, not
per example in Python. Chat and seq2seq examples take the per-example path (tokenize._training_rows,
tokenize.encode_batch + assemble). Both give the same dict:

    input_ids, labels   int32, all kept rows one after the other
    lengths, label_lengths   int64 per kept row (equal for causal models)
    prompt_length   int32 per kept row;  index   int64, the row's example position in the chunk
    stats   tokenize.TokenizeStats of the chunk (dropped_ids: the first 20 source ids)
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np

from instructkit.data.text_ids import continuation_ids, eos_id, prefix_token_id, prompt_token_ids
from instructkit.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    TokenizeSettings,
    TokenizeStats,
    _training_rows,
    encode_batch,
)

MAX_DROPPED_IDS = 20


def encode_chunk(tokenizer: Any, settings: TokenizeSettings, examples: list[dict]) -> dict[str, Any]:
    """Token ids of a chunk as flat arrays (module docstring), exactly as tokenize_examples encodes them."""
    if not settings.chat and not settings.seq2seq:
        return _causal_arrays(tokenizer, settings, examples)
    if settings.chat:
        encoded = [_training_rows(tokenizer, e, settings) for e in examples]
    else:
        encoded = [[e] for e in encode_batch(tokenizer, [e["prompt"] for e in examples],
                                             [e["completion"] for e in examples], settings)]
    return _rows_to_arrays(examples, encoded)


def _rows_to_arrays(examples: list[dict], encoded: list[list[Encoded | None]]) -> dict[str, Any]:
    stats = TokenizeStats()
    ids: list[int] = []
    labels: list[int] = []
    lengths, label_lengths, prompt_length, index = [], [], [], []
    for offset, pieces in enumerate(encoded):
        stats.examples += 1
        for enc in pieces:
            if enc is None:
                _count_dropped(stats, examples, [offset])
                continue
            stats.truncated += int(enc.truncated)
            stats.prompt_tokens += enc.prompt_length
            ids += enc.input_ids
            labels += enc.labels
            lengths.append(len(enc.input_ids))
            label_lengths.append(len(enc.labels))
            prompt_length.append(enc.prompt_length)
            index.append(offset)
    label_array = np.asarray(labels, np.int32)
    stats.completion_tokens = int((label_array != IGNORE_INDEX).sum())
    return {"input_ids": np.asarray(ids, np.int32), "labels": label_array,
            "lengths": np.asarray(lengths, np.int64), "label_lengths": np.asarray(label_lengths, np.int64),
            "prompt_length": np.asarray(prompt_length, np.int32), "index": np.asarray(index, np.int64),
            "stats": stats}


def _count_dropped(stats: TokenizeStats, examples: list[dict], offsets: Any) -> None:
    for offset in offsets:
        stats.dropped += 1
        if len(stats.dropped_ids) < MAX_DROPPED_IDS:
            stats.dropped_ids.append(str(examples[offset].get("source_id", offset)))


def _flat_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 ids, int64 length per text) of the distinct `texts`, in order; with special tokens, as
    prompts (`prompt_token_ids`: BOS once), else as completions (`continuation_ids`: as after a prompt)."""
    if not texts:
        ids = []
    elif add_special_tokens:
        ids = prompt_token_ids(tokenizer, texts)
    else:
        ids = continuation_ids(tokenizer, texts)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    return np.fromiter(chain.from_iterable(ids), np.int64, count=int(lengths.sum())), lengths


def _distinct(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """(the distinct texts in order of appearance, the position of each text among them)."""
    where: dict[str, int] = {}
    positions = np.fromiter((where.setdefault(t, len(where)) for t in texts), np.int64, count=len(texts))
    return list(where), positions


def _causal_arrays(tokenizer: Any, settings: TokenizeSettings, examples: list[dict]) -> dict[str, Any]:
    """tokenize.encode_batch + assemble for causal examples, a chunk at once.

    Each kept row is three slices: the prompt's head [0, h), its tail [lp - t, lp) and the completion,
    where h + t = the kept prompt length: all of it when it fits, else (left) BOS + the last budget - 1
    tokens or the last budget tokens, (middle) the first budget // 2 and the last budget - budget // 2.
    """
    n = len(examples)
    prompts, prompt_of = _distinct([e["prompt"] for e in examples])
    completions, completion_of = _distinct([settings.separator + e["completion"] for e in examples])
    flat_p, len_p = _flat_ids(tokenizer, prompts, True)
    flat_c, len_c = _flat_ids(tokenizer, completions, False)
    start_p = np.cumsum(len_p) - len_p
    eos, bos = eos_id(tokenizer), tokenizer.bos_token_id
    # a causal prompt does not end with EOS (encode_prompts): drop a trailing one unless it is all there is
    ends_eos = (len_p > 1) & (flat_p[np.maximum(start_p + len_p - 1, 0)] == eos) if len(flat_p) else len_p < 0
    len_p = len_p - ends_eos
    empty = len_p == 0  # an empty prompt is the prefix token (encode_prompts)
    flat_p = np.insert(flat_p, start_p[empty], prefix_token_id(tokenizer))
    start_p = start_p + np.cumsum(empty) - empty
    len_p = np.where(empty, 1, len_p)
    flat_c = np.insert(flat_c, np.cumsum(len_c), eos)  # every completion ends with EOS
    len_c = len_c + 1
    start_c = np.cumsum(len_c) - len_c + len(flat_p)

    lp, ps = len_p[prompt_of], start_p[prompt_of]
    lc, cs = len_c[completion_of], start_c[completion_of]
    first = flat_p[np.minimum(ps, max(len(flat_p) - 1, 0))] if len(flat_p) else np.zeros(n, np.int64)
    keep_first = (lp > 0) & (first == bos) if bos is not None else np.zeros(n, bool)
    budget = settings.max_length - lc
    kept = budget >= np.where(keep_first, 2, 1)
    cut = lp > budget
    if settings.truncation == "middle":
        head = np.where(cut, budget // 2, lp)
    else:
        head = np.where(cut, keep_first.astype(np.int64), lp)
    tail = np.where(cut, budget - head, 0)

    stats = TokenizeStats(examples=n)
    _count_dropped(stats, examples, np.flatnonzero(~kept).tolist())
    head, tail, lp, ps, lc, cs, cut = (x[kept] for x in (head, tail, lp, ps, lc, cs, cut))
    starts = np.stack([ps, ps + lp - tail, cs], axis=1).ravel()
    sizes = np.stack([head, tail, lc], axis=1).ravel()
    out_starts = np.cumsum(sizes) - sizes
    gather = np.arange(int(sizes.sum()), dtype=np.int64) + np.repeat(starts - out_starts, sizes)
    input_ids = np.concatenate([flat_p, flat_c])[gather].astype(np.int32)
    labels = np.where(np.repeat(np.tile([True, True, False], len(lp)), sizes), IGNORE_INDEX, input_ids)
    prompt_length = head + tail
    stats.truncated = int(cut.sum())
    stats.prompt_tokens = int(prompt_length.sum())
    stats.completion_tokens = int(lc.sum())
    lengths = prompt_length + lc
    return {"input_ids": input_ids, "labels": labels.astype(np.int32), "lengths": lengths,
            "label_lengths": lengths.copy(), "prompt_length": prompt_length.astype(np.int32),
            "index": np.flatnonzero(kept).astype(np.int64), "stats": stats}
