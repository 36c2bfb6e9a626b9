"""Tokenized examples -> micro-batch tensors: the flat token table, dynamic padding, packed rows, seq2seq.

Which examples go into which micro-batch is planned by sampler.py; here a planned micro-batch becomes
tensors. A row is one sequence of a batch tensor. Padded: one example, right-padded. Packed (causal
models only): several whole examples end to end, `position_ids` restarting at 0 for each, no attention
mask; with `use_cache=False` transformers then gives each example its own causal attention
(docs/MODELS.md).

Causal targets are SHIFTED: position p predicts token p+1, so `target_mask[r, p]` is True where the
NEXT token carries a label of the same example, and `targets` are those next tokens in row-major order.
The first token of every example is never a target, so no position predicts across an example boundary.
The model computes logits only at `target_mask` (transformers' `logits_to_keep` accepts a boolean
[B, T] mask and returns [N, vocab] for its N True positions), which on instruction data (a 200-token
prompt, a 3-token answer) skips ~98% of the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from instructkit.data.buckets import round_up
from instructkit.data.sampler import MicroBatch, Row
from instructkit.data.tokenize import IGNORE_INDEX



# --------------------------------------------------------------------------------------------------
# The tokenized examples as three flat arrays (no per-example Python lists)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTable:
    """All examples' tokens end to end: example i is `input_ids[offsets[i]:offsets[i + 1]]` and
    `labels[label_offsets[i]:label_offsets[i + 1]]`.

    Causal data has labels aligned with input_ids (same offsets); seq2seq labels are the decoder
    targets, with their own lengths. Built once from the Arrow columns of a `datasets.Dataset` (no
    Python list per example), so a collator only slices numpy arrays.
    """

    input_ids: np.ndarray  # int64 [total_tokens]
    offsets: np.ndarray  # int64 [n_examples + 1]
    labels: np.ndarray  # int64 [total_label_tokens], -100 where no label
    label_offsets: np.ndarray  # int64 [n_examples + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def aligned(self) -> bool:
        """True when every example has as many labels as input ids (causal data)."""
        return np.array_equal(self.offsets, self.label_offsets)

    def label_counts(self) -> np.ndarray:
        """Label tokens per example (completion + EOS)."""
        labelled = np.concatenate([[0], np.cumsum(self.labels != IGNORE_INDEX)])
        return labelled[self.label_offsets[1:]] - labelled[self.label_offsets[:-1]]

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return (self.input_ids[self.offsets[i]:self.offsets[i + 1]],
                self.labels[self.label_offsets[i]:self.label_offsets[i + 1]])

    @classmethod
    def from_lists(cls, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> TokenTable:
        """From per-example token lists. Raises: ValueError when the counts differ or an example is empty."""
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} input_ids rows but {len(labels)} labels rows")
        lengths = np.array([len(x) for x in input_ids], dtype=np.int64)
        label_lengths = np.array([len(x) for x in labels], dtype=np.int64)
        return cls._build(
            np.fromiter((t for x in input_ids for t in x), dtype=np.int64, count=int(lengths.sum())),
            np.fromiter((t for x in labels for t in x), dtype=np.int64, count=int(label_lengths.sum())),
            lengths,
            label_lengths,
        )

    @classmethod
    def from_dataset(cls, dataset: Any) -> TokenTable:
        """From a `datasets.Dataset` with list columns `input_ids` and `labels` (row order kept).

        A tokenized store (data/store.py) gives its memory-mapped table as it is.

        Raises: ValueError when an example has no tokens.
        """
        if hasattr(dataset, "token_table"):
            return dataset.token_table()
        import pyarrow.compute as pc

        table = dataset.with_format("arrow")[:]  # honours a .select()/.shuffle() indices mapping
        arrays = []
        for name in ("input_ids", "labels"):
            column = table.column(name).combine_chunks()
            arrays.append((column.flatten().to_numpy(zero_copy_only=False).astype(np.int64),
                           pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)))
        (ids, lengths), (labels, label_lengths) = arrays
        return cls._build(ids, labels, lengths, label_lengths)

    @classmethod
    def _build(cls, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, label_lengths: np.ndarray
               ) -> TokenTable:
        if len(lengths) and lengths.min() < 1:
            raise ValueError(f"example {int(np.argmin(lengths))} has no tokens")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        label_offsets = np.concatenate([[0], np.cumsum(label_lengths)]).astype(np.int64)
        return cls(ids, offsets, labels, label_offsets)


# --------------------------------------------------------------------------------------------------
# Collation: rows -> tensors
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch. `inputs` are the model's keyword arguments; the rest builds the loss.

    `target_mask` [B, T] is True where a position predicts a label (causal: the NEXT token's label;
    seq2seq: the decoder position's own label); `targets` [N] are those labels in row-major order,
    `target_weights` [N] their class weights (None: all 1). `weight_sum` = sum of the weights
    (= `n_targets` without weights): the loss normaliser's share of this micro-batch.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    target_mask: torch.Tensor
    targets: torch.Tensor
    target_weights: torch.Tensor | None
    n_tokens: int  # non-padding input tokens
    n_targets: int
    weight_sum: float
    dummy: bool = False  # a zero-weight placeholder that only keeps processes in step

    @property
    def target_positions(self) -> torch.Tensor:
        """Indices into the flattened [B x T] sequence of the positions in `target_mask`."""
        return self.target_mask.reshape(-1).nonzero().squeeze(1)


def _shifted_targets(
    labels: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Causal: position p predicts labels[p + 1]. Returns (mask [B, T], targets [N], weights [N])."""
    shifted = np.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    target_weights = None
    if weights is not None:
        next_weights = np.zeros_like(weights)
        next_weights[:, :-1] = weights[:, 1:]
        target_weights = next_weights[mask]
    return mask, shifted[mask], target_weights


def _require_aligned(table: TokenTable) -> None:
    if not table.aligned:
        raise ValueError("causal batches need labels aligned with input_ids (this looks like seq2seq data)")


def _finish(
    inputs: dict[str, np.ndarray],
    labels: np.ndarray,
    mask: np.ndarray,
    targets: np.ndarray,
    target_weights: np.ndarray | None,
    n_tokens: int,
) -> Batch:
    weight_sum = (
        float(target_weights.sum(dtype=np.float64)) if target_weights is not None else float(len(targets))
    )
    return Batch(
        inputs={k: torch.from_numpy(v) for k, v in inputs.items()},
        labels=torch.from_numpy(labels),
        target_mask=torch.from_numpy(mask),
        targets=torch.from_numpy(targets),
        target_weights=torch.from_numpy(target_weights) if target_weights is not None else None,
        n_tokens=n_tokens,
        n_targets=int(len(targets)),
        weight_sum=weight_sum,
    )


def collate_padded(
    table: TokenTable, indices: Sequence[int], pad_id: int, weights: np.ndarray | None = None,
    pad_to_multiple_of: int = 1,
) -> Batch:
    """Causal, dynamic padding: right-pad to the longest example; labels padded with -100.

    Tensors are [B, T]: B = len(indices), T = the longest example's tokens rounded up to
    `pad_to_multiple_of`. `weights` [n_examples] are per-example loss weights. Raises: ValueError when
    labels are not aligned with input_ids (seq2seq data).
    """
    _require_aligned(table)
    lengths = table.lengths[list(indices)]
    width = round_up(int(lengths.max()), pad_to_multiple_of)
    ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    labels = np.full((len(indices), width), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((len(indices), width), dtype=np.int64)
    token_weights = np.zeros((len(indices), width), dtype=np.float32) if weights is not None else None
    for r, i in enumerate(indices):
        x, y = table.tokens(i)
        ids[r, : len(x)] = x
        labels[r, : len(y)] = y
        labels[r, 0] = IGNORE_INDEX  # nothing predicts the first token
        attention[r, : len(x)] = 1
        if token_weights is not None:
            token_weights[r, : len(x)] = weights[i]
    mask, targets, target_weights = _shifted_targets(labels, token_weights)
    return _finish(
        {"input_ids": ids, "attention_mask": attention},
        labels,
        mask,
        targets,
        target_weights,
        int(lengths.sum()),
    )


def collate_packed(
    table: TokenTable, rows: Sequence[Row], pad_id: int, weights: np.ndarray | None = None,
    pad_to_multiple_of: int = 1,
) -> Batch:
    """Causal, packed: each row holds whole examples end to end, `position_ids` restart at 0 for each.

    No attention mask: transformers derives per-example causal attention from the restarts (with
    use_cache=False). Rows shorter than the widest are padded at the end; the padding is a segment of its
    own (positions restart there too), comes after every real token, and so is never attended to.
    With one row the batch is padding-free. Tensors are [R, W]: R = len(rows), W = the fullest row's
    tokens rounded up to `pad_to_multiple_of` (the bucket; the rounding is padding of the same kind).
    Raises: ValueError when labels are not aligned with input_ids (seq2seq data).
    """
    _require_aligned(table)
    fills = [int(table.lengths[row].sum()) for row in rows]
    width = round_up(max(fills), pad_to_multiple_of)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    token_weights = np.zeros((len(rows), width), dtype=np.float32) if weights is not None else None
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = table.tokens(i)
            n = len(x)
            ids[r, at : at + n] = x
            labels[r, at : at + n] = y
            labels[r, at] = IGNORE_INDEX  # an example's first token is never predicted from the previous one
            positions[r, at : at + n] = np.arange(n)
            if token_weights is not None:
                token_weights[r, at : at + n] = weights[i]
            at += n
        positions[r, at:] = np.arange(width - at)
    mask, targets, target_weights = _shifted_targets(labels, token_weights)
    return _finish(
        {"input_ids": ids, "position_ids": positions}, labels, mask, targets, target_weights, sum(fills)
    )


def collate_seq2seq(
    table: TokenTable, indices: Sequence[int], pad_id: int, weights: np.ndarray | None = None,
    pad_to_multiple_of: int = 1,
) -> Batch:
    """Seq2seq: the table's `input_ids` feed the encoder and its `labels` are the decoder targets.

    Encoder ids padded with `pad_id` (+ attention_mask), labels padded with -100; the model derives
    its decoder inputs from the labels (shift right, -100 -> pad). Targets are not shifted.
    `input_ids` [B, T] (T = the longest source), `labels` [B, L] (L = the most label tokens), both
    rounded up to `pad_to_multiple_of`.
    """
    sources = [table.tokens(i) for i in indices]
    width = round_up(max(len(x) for x, _ in sources), pad_to_multiple_of)
    label_width = round_up(max(int((y != IGNORE_INDEX).sum()) for _, y in sources), pad_to_multiple_of)
    ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(indices), width), dtype=np.int64)
    labels = np.full((len(indices), label_width), IGNORE_INDEX, dtype=np.int64)
    label_weights = np.zeros((len(indices), label_width), dtype=np.float32) if weights is not None else None
    for r, (i, (x, y)) in enumerate(zip(indices, sources)):
        ids[r, : len(x)] = x
        attention[r, : len(x)] = 1
        kept = y[y != IGNORE_INDEX]
        labels[r, : len(kept)] = kept
        if label_weights is not None:
            label_weights[r, : len(kept)] = weights[i]
    mask = labels != IGNORE_INDEX
    target_weights = label_weights[mask] if label_weights is not None else None
    return _finish(
        {"input_ids": ids, "attention_mask": attention, "labels": labels},
        labels,
        mask,
        labels[mask],
        target_weights,
        int(sum(len(x) for x, _ in sources)),
    )


def dummy_batch(pad_id: int, seq2seq: bool) -> Batch:
    """A one-token placeholder whose loss is multiplied by 0 (keeps processes in lock step)."""
    one = np.array([[pad_id]], dtype=np.int64)
    inputs = {"input_ids": one, "attention_mask": np.ones_like(one)}
    if seq2seq:
        inputs["labels"] = one.copy()
    batch = _finish(inputs, one.copy(), np.ones_like(one, dtype=bool), np.array([pad_id]), None, 0)
    batch.n_targets, batch.weight_sum, batch.dummy = 0, 0.0, True
    return batch


def collate(
    table: TokenTable,
    micro_batch: MicroBatch,
    pad_id: int,
    *,
    seq2seq: bool,
    packed: bool,
    weights: np.ndarray | None = None,
    pad_to_multiple_of: int = 1,
) -> Batch:
    """A planned micro-batch -> Batch: packed rows, padded rows (causal) or seq2seq; [] -> dummy.
    Widths are rounded up to `pad_to_multiple_of` (train.pad_to_multiple_of: buckets on accelerators).

    Raises: ValueError for causal collation of labels not aligned with input_ids.
    """
    if not micro_batch:
        return dummy_batch(pad_id, seq2seq)
    if seq2seq:
        return collate_seq2seq(table, [row[0] for row in micro_batch], pad_id, weights, pad_to_multiple_of)
    if packed:
        return collate_packed(table, micro_batch, pad_id, weights, pad_to_multiple_of)
    return collate_padded(table, [row[0] for row in micro_batch], pad_id, weights, pad_to_multiple_of)
