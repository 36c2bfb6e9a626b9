"""The epoch plan: which examples share an optimizer step, and how a step is cut into micro-batches.

Words used below (the arithmetic for the default config: batch_size 8, grad_accum 1, 1 process):

- example: one row of the tokenized dataset; only its length in tokens matters here.
- step group: the G = batch_size x grad_accum x world_size examples of ONE optimizer step (8 here).
  The sampler orders an epoch into step groups, so a step sees the same examples whatever the split
  into micro-batches and processes: (batch 8, accum 1), (batch 2, accum 4) and 2 processes x batch 4
  all train on the same 8 examples per step, and the token-normalised loss makes them equal.
- row: the example indices of one sequence of a batch tensor. Padded: one example. Packed (causal
  models only): several whole examples end to end (collation: batching.py).
- micro-batch: the rows of one forward/backward pass.
- `lengths` (every function below): int array [n_examples], tokens per example; widths and budgets are
  in tokens too.

Also here: class balance (inverse-frequency loss weights, a class-balanced sampler). Everything is a
deterministic function of (seed, epoch): resuming mid-epoch replays the plan and skips the steps already
done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from instructkit.data.buckets import token_balanced

Row = list[int]  # example indices laid end to end in one row (one index when padded)
MicroBatch = list[Row]  # the rows of one forward pass; [] is a placeholder (see `plan_step`)


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
    """Per-example loss weight from `class_weights` (1.0 for examples without a class): float32 [n]."""
    weights = class_weights(labels)
    return np.array([weights.get(int(k), 1.0) for k in labels], dtype=np.float32)


def balanced_sampler(labels: Sequence[int], seed: int, epoch: int, size: int | None = None) -> np.ndarray:
    """An epoch of example indices (default: as many as examples) with every class equally likely.

    Each draw picks a class uniformly, then one of its examples uniformly (with replacement), so the
    rare classes are seen as often as the frequent one. Examples with a negative label form one more
    "class". Deterministic in (seed, epoch). `labels` [n_examples] -> int64 indices [size].
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
    balance_multiple: int = 1,
    row_size: int | None = None,
) -> list[np.ndarray]:
    """The epoch's examples cut into groups of `group_size` (the last may be smaller), one per step.

    Order: a seeded permutation (or a `balanced_sampler` draw when `sample_labels` is given), then
    length grouping when asked, or, with `balance_multiple` > 1 (packed rows on an accelerator),
    groups of rows of `row_size` examples whose sums sit on multiples of it (buckets.token_balanced;
    replaces length grouping). Deterministic in (seed, epoch, group_size).
    """
    rng = np.random.default_rng([seed, epoch, 0])
    if sample_labels is not None:
        order = balanced_sampler(sample_labels, seed, epoch)
    else:
        order = rng.permutation(len(lengths))
    if balance_multiple > 1:
        return token_balanced(order, lengths, group_size, row_size or group_size, balance_multiple, rng)
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
# Attention implementations that attend within each packed example (varlen: work sum_i T_i^2, no mask), so a
# wide row costs no more attention than narrow ones: models/attention.py (CPU) and FlashAttention.
VARLEN_ATTENTION = frozenset({"sdpa_varlen", "flash_attention_2", "flash_attention_3"})


def one_row_attention(config: Any) -> bool:
    """True when the model's attention is a FlashAttention kind ("flash_attention_2", "flash_attention_3", hub
    kernels such as "kernels-community/flash-attn3"): transformers then finds the examples of a packed row from
    `position_ids` only in a batch of ONE row (modeling_flash_attention_utils._is_packed_sequence needs batch
    size 1; transformers#39121); [R > 1, W] rows without an attention mask get one causal attention over each
    whole row, across its examples. `plan_step` then lays each packed micro-batch out as one row."""
    return "flash" in str(getattr(config, "_attn_implementation", None) or "")


def attention_tokens_of(config: Any, overhead: float = ATTENTION_OVERHEAD) -> float | None:
    """Row width at which attention costs as much per token as the rest of the model (see `pack_group`).

    Per token and layer, the linear layers cost ~6 x P_layer FLOPs (forward + backward) and attention
    ~12 x d x W (QK^T and AV, forward + backward) for a row of W tokens: equal at W = P_layer / (2 x d).
    Divided by the measured `overhead` of masked attention. SmolLM2-135M: P_layer = 3.54M, d = 576 ->
    3,072 by FLOPs, ~614 in practice. None when the config lacks the fields, or when the model attends
    within each example (VARLEN_ATTENTION): then one padding-free row is never dearer than several.
    """
    if getattr(config, "_attn_implementation", None) in VARLEN_ATTENTION:
        return None
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
    pad_to_multiple_of: int = 1  # row widths rounded up to this; > 1 with packing: bucketed rows (below)
    one_row: bool = False  # packed micro-batches laid out as one row each (FlashAttention: one_row_attention)

    @property
    def group_size(self) -> int:
        """Examples per optimizer step over all processes: 8 x 1 x 1 = 8 by default."""
        return self.batch_size * self.grad_accum * self.world_size


def plan_step(group: Sequence[int], lengths: np.ndarray, plan: BatchPlan) -> list[list[MicroBatch]]:
    """One step group -> for each process, its micro-batches (lists of rows).

    Padded: the group sorted by length is cut into world_size x grad_accum near-equal micro-batches;
    micro-batch j goes to process j % world_size. Packed: `pack_group` rows, dealt to the processes
    fullest first, then cut into micro-batches of max_tokens // width rows. Packed with
    pad_to_multiple_of m > 1 (accelerators): `bucketed_rows` instead, one row per micro-batch (rows of
    different widths never share a tensor, so the shapes stay few: [1, multiple of m]).
    With several processes every one gets the same number of micro-batches (FSDP needs equal forward
    counts); a process short of data gets empty placeholders `[]`, run as zero-weight dummies.
    With one process, empty micro-batches are dropped. Packed with plan.one_row (FlashAttention), the rows
    of each micro-batch are joined end to end into one row (no more tokens than the micro-batch had).
    """
    world = plan.world_size
    group = [int(i) for i in group]
    if plan.packing:
        max_tokens = plan.max_tokens or plan.batch_size * int(lengths.max())
        bucketed = plan.pad_to_multiple_of > 1
        if bucketed:
            rows = bucketed_rows(group, lengths, plan, max_tokens)
        else:
            rows = pack_group(group, lengths, max_tokens, plan.attention_tokens)
        rows.sort(key=lambda row: -sum(int(lengths[i]) for i in row))
        per_batch = max(1, max_tokens // max((sum(int(lengths[i]) for i in row) for row in rows), default=1))
        ranks: list[list[MicroBatch]] = []
        for r in range(world):
            mine = rows[r::world]
            ranks.append([[row] for row in mine] if bucketed
                         else [mine[i : i + per_batch] for i in range(0, len(mine), per_batch)])
        if plan.one_row:
            ranks = [[[[i for row in mb for i in row]] for mb in mbs] for mbs in ranks]
    else:
        ordered = sorted(group, key=lambda k: (-int(lengths[k]), k))
        chunks = np.array_split(np.array(ordered, dtype=np.int64), world * plan.grad_accum)
        ranks = [[[[int(i)] for i in chunks[j]] for j in range(r, len(chunks), world)] for r in range(world)]
    if world == 1:
        return [[mb for mb in ranks[0] if mb]]
    most = max(len(mbs) for mbs in ranks)
    return [mbs + [[] for _ in range(most - len(mbs))] for mbs in ranks]


def bucketed_rows(group: Sequence[int], lengths: np.ndarray, plan: BatchPlan, max_tokens: int) -> list[Row]:
    """Packed rows of one step group on an accelerator: its consecutive runs of plan.batch_size examples,
    which `plan_epoch` balanced so each row's sum sits on (or just under) a multiple of
    plan.pad_to_multiple_of. One row per micro-batch by default: the step's 8 examples end to end,
    padding-free but for the rounding. A row over `max_tokens` (a budget below batch_size examples)
    sends the group to `first_fit_decreasing` at that capacity instead.
    """
    rows = [list(group[i : i + plan.batch_size]) for i in range(0, len(group), plan.batch_size)]
    if max(sum(int(lengths[i]) for i in row) for row in rows) > max_tokens:
        rows = first_fit_decreasing(group, lengths, max_tokens)
    return rows


class EpochPlan(Sequence):
    """The steps of an epoch, each planned (`plan_step`) when it is read: a million-example epoch starts
    without planning 125,000 steps first. Reads like the list of steps: len, [step], [start:] (a plan
    of the rest), iteration; `plan_digest` gives the digest of the list."""

    def __init__(self, groups: list[np.ndarray], lengths: np.ndarray, plan: BatchPlan):
        self.groups, self.lengths, self.plan = groups, lengths, plan

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, step):
        if isinstance(step, slice):
            return EpochPlan(self.groups[step], self.lengths, self.plan)
        return plan_step(self.groups[step], self.lengths, self.plan)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))


def plan_epoch(
    lengths: np.ndarray, plan: BatchPlan, epoch: int, sample_labels: Sequence[int] | None = None
) -> EpochPlan:
    """All steps of an epoch: plan[step][rank] = that process's micro-batches. Same on every process.
    Steps are planned as they are read (`EpochPlan`)."""
    groups = step_groups(
        lengths,
        plan.group_size,
        plan.seed,
        epoch,
        group_by_length=plan.group_by_length,
        sample_labels=sample_labels,
        balance_multiple=plan.pad_to_multiple_of if plan.packing else 1,
        row_size=plan.batch_size,
    )
    return EpochPlan(groups, lengths, plan)


def plan_eval(lengths: np.ndarray, plan: BatchPlan) -> list[list[MicroBatch]]:
    """Validation micro-batches per process: every example once, sorted by length, no shuffling.

    Each process gets the same number of micro-batches (empty placeholders where short).
    """
    order = np.argsort(-lengths, kind="stable")
    size = plan.batch_size * plan.world_size
    per_rank: list[list[MicroBatch]] = [[] for _ in range(plan.world_size)]
    one = BatchPlan(plan.batch_size, 1, plan.world_size, plan.packing, plan.max_tokens, plan.attention_tokens,
                    pad_to_multiple_of=plan.pad_to_multiple_of, one_row=plan.one_row)
    for start in range(0, len(order), size):
        for r, mbs in enumerate(plan_step(order[start : start + size], lengths, one)):
            per_rank[r].extend(mbs)
    if plan.world_size > 1:
        most = max(len(m) for m in per_rank)
        per_rank = [m + [[] for _ in range(most - len(m))] for m in per_rank]
    return per_rank


def plan_digest(steps: list) -> str:
    """sha256 of an epoch plan: a resumed run checks it replays the very same batches."""
    digest = hashlib.sha256()
    encode = json.JSONEncoder(separators=(",", ":")).encode
    digest.update(b"[")  # the digest of json.dumps(list(steps)), step by step
    for k, step in enumerate(steps):
        digest.update((b"," if k else b"") + encode(step).encode())
    digest.update(b"]")
    return digest.hexdigest()
