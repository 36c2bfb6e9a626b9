"""Tokenized examples -> micro-batches: dynamic padding, length grouping, packing, class balance.

Words used below (the arithmetic for the default config: batch_size 8, grad_accum 1, 1 process):

- example: one row of the tokenized dataset (`input_ids`, `labels`; labels are -100 on the prompt).
- step group: the G = batch_size x grad_accum x world_size examples of ONE optimizer step (8 here).
  The sampler orders an epoch into step groups, so a step sees the same examples whatever the split
  into micro-batches and processes: (batch 8, accum 1), (batch 2, accum 4) and 2 processes x batch 4
  all train on the same 8 examples per step, and the token-normalised loss makes them equal.
- row: one sequence of a batch tensor. Padded: one example, right-padded. Packed (causal models only):
  several whole examples end to end, `position_ids` restarting at 0 for each, no attention mask; with
  `use_cache=False` transformers then gives each example its own causal attention (docs/MODELS.md).
- micro-batch: the rows of one forward/backward pass.

Causal targets are SHIFTED: position p predicts token p+1, so `target_mask[r, p]` is True where the
NEXT token carries a label of the same example, and `targets` are those next tokens in row-major order.
The first token of every example is never a target, so no position predicts across an example boundary.
The model computes logits only at `target_mask` (transformers' `logits_to_keep` accepts a boolean
[B, T] mask and returns [N, vocab] for its N True positions), which on instruction data (a 200-token
prompt, a 3-token answer) skips ~98% of the LM head.

Everything here is a deterministic function of (seed, epoch): resuming mid-epoch replays the plan and
skips the steps already done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100

Row = list[int]  # example indices laid end to end in one row (one index when padded)
MicroBatch = list[Row]  # the rows of one forward pass; [] is a placeholder (see `plan_step`)


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
        """From a `datasets.Dataset` with list columns `input_ids` and `labels` (row order kept)."""
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
# Class balance
# --------------------------------------------------------------------------------------------------


def class_weights(labels: Sequence[int]) -> dict[int, float]:
    """Inverse-frequency weight per class, normalised so the mean over EXAMPLES is 1.

    w_c = n / (C x n_c). E.g. 64 five-star and 4 x 9 other examples (n = 100, C = 5):
    w_5 = 100 / (5 x 64) = 0.3125, w_other = 100 / (5 x 9) = 2.22; mean over examples
    (64 x 0.3125 + 36 x 2.22) / 100 = 1. So the loss keeps its scale while each class contributes
    equally. Negative labels mean "no class" and are left out (their weight is 1).
    """
    values = np.asarray(labels, dtype=np.int64)
    values = values[values >= 0]
    if values.size == 0:
        return {}
    classes, counts = np.unique(values, return_counts=True)
    n, c = values.size, classes.size
    return {int(k): float(n / (c * m)) for k, m in zip(classes, counts)}


def class_ids_from_examples(examples: Sequence[dict]) -> list[int]:
    """Class id of each prepared example: its `label` among the sorted distinct labels of examples that
    have answer `choices` (classification templates); -1 for the others (generation tasks).

    E.g. labels "5", "1", "5", None -> ids 1, 0, 1, -1. Use the examples given to `tokenize_examples`:
    `train` maps dataset rows to them through the dataset's `index` column.
    """
    def label(ex: dict) -> str | None:
        if not ex.get("choices") or ex.get("label") is None:
            return None
        return str(ex["label"])

    labels = [label(ex) for ex in examples]
    vocabulary = {name: k for k, name in enumerate(sorted({x for x in labels if x is not None}))}
    return [vocabulary[x] if x is not None else -1 for x in labels]


def example_weights(labels: Sequence[int]) -> np.ndarray:
    """Per-example loss weight from `class_weights` (1.0 for examples without a class)."""
    weights = class_weights(labels)
    return np.array([weights.get(int(k), 1.0) for k in labels], dtype=np.float32)


def balanced_sampler(labels: Sequence[int], seed: int, epoch: int, size: int | None = None) -> np.ndarray:
    """An epoch of example indices (default: as many as examples) with every class equally likely.

    Each draw picks a class uniformly, then one of its examples uniformly (with replacement), so the
    rare classes are seen as often as the frequent one. Examples with a negative label form one more
    "class". Deterministic in (seed, epoch).
    """
    values = np.asarray(labels, dtype=np.int64)
    values = np.where(values < 0, -1, values)
    size = len(values) if size is None else size
    rng = np.random.default_rng([seed, epoch, 1])
    classes = np.unique(values)
    chosen = rng.integers(0, len(classes), size)
    out = np.empty(size, dtype=np.int64)
    for k, label in enumerate(classes):
        slots = np.flatnonzero(chosen == k)
        members = np.flatnonzero(values == label)
        out[slots] = members[rng.integers(0, len(members), len(slots))]
    return out


# --------------------------------------------------------------------------------------------------
# Sampler: an epoch -> step groups
# --------------------------------------------------------------------------------------------------


def length_grouped(
    order: np.ndarray, lengths: np.ndarray, group_size: int, rng: np.random.Generator, mega_groups: int = 50
) -> list[np.ndarray]:
    """Cut `order` into mega-batches of `mega_groups` x `group_size` examples, sort each by length
    (longest first), cut into groups, and shuffle the order of the groups.

    Examples in a group then have similar lengths (little padding) while the epoch stays random.
    """
    groups: list[np.ndarray] = []
    mega = group_size * mega_groups
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        groups.extend(chunk[i : i + group_size] for i in range(0, len(chunk), group_size))
    return [groups[i] for i in rng.permutation(len(groups))]


def step_groups(
    lengths: np.ndarray,
    group_size: int,
    seed: int,
    epoch: int,
    *,
    group_by_length: bool,
    sample_labels: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """The epoch's examples cut into groups of `group_size` (the last may be smaller), one per step.

    Order: a seeded permutation (or a `balanced_sampler` draw when `sample_labels` is given), then
    length grouping when asked. Deterministic in (seed, epoch, group_size).
    """
    rng = np.random.default_rng([seed, epoch, 0])
    if sample_labels is not None:
        order = balanced_sampler(sample_labels, seed, epoch)
    else:
        order = rng.permutation(len(lengths))
    if group_by_length:
        return length_grouped(order, lengths, group_size, rng)
    return [order[i : i + group_size] for i in range(0, len(order), group_size)]


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def first_fit_decreasing(indices: Sequence[int], lengths: np.ndarray, capacity: int) -> list[Row]:
    """Pack examples (never split) into rows of at most `capacity` tokens, longest first.

    An example longer than `capacity` gets a row of its own.
    """
    rows: list[Row] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda k: (-int(lengths[k]), k)):
        size = int(lengths[i])
        for r, free in enumerate(room):
            if size <= free:
                rows[r].append(int(i))
                room[r] -= size
                break
        else:
            rows.append([int(i)])
            room.append(capacity - size)
    return rows


def pack_group(
    indices: Sequence[int], lengths: np.ndarray, max_tokens: int, attention_tokens: float | None = None
) -> list[Row]:
    """Pack a step group's examples into rows, choosing the row width by estimated compute.

    A [R, W] batch costs about R x W x (1 + W / A) token-units: the linear layers cost the same per
    token, attention grows with the row width W, and A (`attention_tokens`) is the width at which
    attention per token costs as much as everything else (A ~ 600 for SmolLM2-135M on CPU, see
    `attention_tokens_of`). Candidate widths: the longest example x 1, 2, 4, ... and one row holding the
    whole group (padding-free, batch dim 1), capped at `max_tokens`. With A = None (attention free)
    the single padding-free row wins whenever it fits, which is plain packing. Measured on the
    SmolLM2 shape at 1 thread: one 2,048-token row took 1.5x the time of 8 rows of 256, and one
    1,473-token row 1.8x the time of the same examples in 3 rows of 508.
    """
    indices = [int(i) for i in indices]
    if not indices:
        return []
    longest = int(max(lengths[i] for i in indices))
    total = int(sum(lengths[i] for i in indices))
    cap = max(max_tokens, longest)
    widths = {min(total, cap)}
    width = longest
    while width < min(total, cap):
        widths.add(width)
        width *= 2
    best: tuple[float, int, list[Row]] | None = None
    for capacity in sorted(widths):
        rows = first_fit_decreasing(indices, lengths, capacity)
        actual = max(sum(int(lengths[i]) for i in row) for row in rows)
        cost = len(rows) * actual * (1.0 + (actual / attention_tokens if attention_tokens else 0.0))
        if best is None or cost < best[0] - 1e-9:
            best = (cost, capacity, rows)
    return best[2]


# Masked attention (packed rows need an explicit block mask) runs sdpa's memory-bound math path on CPU:
# measured on the SmolLM2-135M shape at 1 thread, it cost about 5x what its FLOPs predict (one 1,473-token
# row: 29.5 s per forward+backward; the same 8 examples in 3 rows of 508: 16.6 s).
ATTENTION_OVERHEAD = 5.0


def attention_tokens_of(config: Any, overhead: float = ATTENTION_OVERHEAD) -> float | None:
    """Row width at which attention costs as much per token as the rest of the model (see `pack_group`).

    Per token and layer, the linear layers cost ~6 x P_layer FLOPs (forward + backward) and attention
    ~12 x d x W (QK^T and AV, forward + backward) for a row of W tokens: equal at W = P_layer / (2 x d).
    Divided by the measured `overhead` of masked attention. SmolLM2-135M: P_layer = 3.54M, d = 576 ->
    3,072 by FLOPs, ~614 in practice. None when the config lacks the fields.
    """
    d = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)  # only checked: it cancels out
    ffn = getattr(config, "intermediate_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (d and layers and ffn and heads):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_layer = d * head_dim * (2 * heads + 2 * kv_heads) + 3 * d * ffn
    return per_layer / (2.0 * d) / overhead


# --------------------------------------------------------------------------------------------------
# Step plan: a step group -> micro-batches per process
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """How examples become micro-batches. Pure settings; `plan_epoch` does the work."""

    batch_size: int  # examples per micro-batch (padded); per process
    grad_accum: int = 1  # micro-batches per step (padded); packing fits the step into fewer
    world_size: int = 1
    packing: bool = False
    max_tokens: int | None = None  # packed micro-batch budget (default batch_size x longest example)
    attention_tokens: float | None = None  # see pack_group
    group_by_length: bool = True  # similar lengths per step (less padding; packing picks its row width)
    seed: int = 0

    @property
    def group_size(self) -> int:
        """Examples per optimizer step over all processes: 8 x 1 x 1 = 8 by default."""
        return self.batch_size * self.grad_accum * self.world_size


def plan_step(group: Sequence[int], lengths: np.ndarray, plan: BatchPlan) -> list[list[MicroBatch]]:
    """One step group -> for each process, its micro-batches (lists of rows).

    Padded: the group sorted by length is cut into world_size x grad_accum near-equal micro-batches;
    micro-batch j goes to process j % world_size. Packed: `pack_group` rows, dealt to the processes
    fullest first, then cut into micro-batches of max_tokens // width rows.
    With several processes every one gets the same number of micro-batches (FSDP needs equal forward
    counts); a process short of data gets empty placeholders `[]`, run as zero-weight dummies.
    With one process, empty micro-batches are dropped.
    """
    world = plan.world_size
    group = [int(i) for i in group]
    if plan.packing:
        max_tokens = plan.max_tokens or plan.batch_size * int(lengths.max())
        rows = pack_group(group, lengths, max_tokens, plan.attention_tokens)
        rows.sort(key=lambda row: -sum(int(lengths[i]) for i in row))
        width = max((sum(int(lengths[i]) for i in row) for row in rows), default=1)
        per_batch = max(1, max_tokens // width)
        ranks: list[list[MicroBatch]] = []
        for r in range(world):
            mine = rows[r::world]
            ranks.append([mine[i : i + per_batch] for i in range(0, len(mine), per_batch)])
    else:
        ordered = sorted(group, key=lambda k: (-int(lengths[k]), k))
        chunks = np.array_split(np.array(ordered, dtype=np.int64), world * plan.grad_accum)
        ranks = [[[[int(i)] for i in chunks[j]] for j in range(r, len(chunks), world)] for r in range(world)]
    if world == 1:
        return [[mb for mb in ranks[0] if mb]]
    most = max(len(mbs) for mbs in ranks)
    return [mbs + [[] for _ in range(most - len(mbs))] for mbs in ranks]


def plan_epoch(
    lengths: np.ndarray, plan: BatchPlan, epoch: int, sample_labels: Sequence[int] | None = None
) -> list[list[list[MicroBatch]]]:
    """All steps of an epoch: plan[step][rank] = that process's micro-batches. Same on every process."""
    groups = step_groups(
        lengths,
        plan.group_size,
        plan.seed,
        epoch,
        group_by_length=plan.group_by_length,
        sample_labels=sample_labels,
    )
    return [plan_step(group, lengths, plan) for group in groups]


def plan_eval(lengths: np.ndarray, plan: BatchPlan) -> list[list[MicroBatch]]:
    """Validation micro-batches per process: every example once, sorted by length, no shuffling.

    Each process gets the same number of micro-batches (empty placeholders where short).
    """
    order = np.argsort(-lengths, kind="stable")
    size = plan.batch_size * plan.world_size
    per_rank: list[list[MicroBatch]] = [[] for _ in range(plan.world_size)]
    one = BatchPlan(plan.batch_size, 1, plan.world_size, plan.packing, plan.max_tokens, plan.attention_tokens)
    for start in range(0, len(order), size):
        for r, mbs in enumerate(plan_step(order[start : start + size], lengths, one)):
            per_rank[r].extend(mbs)
    if plan.world_size > 1:
        most = max(len(m) for m in per_rank)
        per_rank = [m + [[] for _ in range(most - len(m))] for m in per_rank]
    return per_rank


def plan_digest(steps: list) -> str:
    """sha256 of an epoch plan: a resumed run checks it replays the very same batches."""
    return hashlib.sha256(json.dumps(steps, separators=(",", ":")).encode()).hexdigest()


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
    table: TokenTable, indices: Sequence[int], pad_id: int, weights: np.ndarray | None = None
) -> Batch:
    """Causal, dynamic padding: right-pad to the longest example; labels padded with -100."""
    _require_aligned(table)
    lengths = table.lengths[list(indices)]
    width = int(lengths.max())
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
    table: TokenTable, rows: Sequence[Row], pad_id: int, weights: np.ndarray | None = None
) -> Batch:
    """Causal, packed: each row holds whole examples end to end, `position_ids` restart at 0 for each.

    No attention mask: transformers derives per-example causal attention from the restarts (with
    use_cache=False). Rows shorter than the widest are padded at the end; the padding is a segment of its
    own (positions restart there too), comes after every real token, and so is never attended to.
    With one row the batch is padding-free.
    """
    _require_aligned(table)
    fills = [int(table.lengths[row].sum()) for row in rows]
    width = max(fills)
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
    table: TokenTable, indices: Sequence[int], pad_id: int, weights: np.ndarray | None = None
) -> Batch:
    """Seq2seq: the table's `input_ids` feed the encoder and its `labels` are the decoder targets.

    Encoder ids padded with `pad_id` (+ attention_mask), labels padded with -100; the model derives
    its decoder inputs from the labels (shift right, -100 -> pad). Targets are not shifted.
    """
    sources = [table.tokens(i) for i in indices]
    width = max(len(x) for x, _ in sources)
    label_width = max(int((y != IGNORE_INDEX).sum()) for _, y in sources)
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
) -> Batch:
    """A planned micro-batch -> Batch: packed rows, padded rows (causal) or seq2seq; [] -> dummy."""
    if not micro_batch:
        return dummy_batch(pad_id, seq2seq)
    if seq2seq:
        return collate_seq2seq(table, [row[0] for row in micro_batch], pad_id, weights)
    if packed:
        return collate_packed(table, micro_batch, pad_id, weights)
    return collate_padded(table, [row[0] for row in micro_batch], pad_id, weights)
