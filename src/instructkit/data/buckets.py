"""Bucketed shapes for accelerators: steps whose token counts land on a few row widths.

A GPU pays for every NEW micro-batch shape: cuDNN attention builds an execution plan per shape, and
torch.compile may recompile. With `train.pad_to_multiple_of` = m > 1 (default 64 on CUDA) and packing,
sampler.py plans every step as rows whose padded width is a multiple of m, and this module picks the
step groups so that those widths repeat:

- `fill_buckets` splits examples into groups of given sizes whose token sums land ON or just UNDER
  multiples of m. A random group of 8 Amazon reviews sums to anything between ~500 and ~1,300 tokens
  (14 widths per epoch at m = 64); balanced groups sum to 768 or 832, with < 1% padding.
- `token_balanced` does that over an epoch, one row (micro-batch) at a time, in chunks of
  `mega_groups` steps of a seeded order, so steps still differ from epoch to epoch.
- `micro_batch_shape` / `step_shape`: the [rows, width] a planned micro-batch collates to (the `shape`
  of each train record in metrics.jsonl).

Units: `lengths` is int [n_examples], tokens per example; widths and sums are in tokens.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np

Row = list[int]


def round_up(width: int, multiple: int) -> int:
    """`width` rounded up to a multiple of `multiple` (>= 1): round_up(812, 64) = 832; multiple 1 keeps it."""
    return -(-int(width) // multiple) * multiple


def bucket_caps(total: int, sizes: Sequence[int], multiple: int) -> list[int]:
    """Token caps, multiples of `multiple`, for groups of `sizes` examples holding `total` tokens in all.

    Each group's share of the total (total x size / n) is rounded down to a multiple, then the groups
    with the largest remainders get one multiple more until the caps add up to >= total, so the caps
    leave less than one multiple of room in all. E.g. 4 groups of 8, 3,250 tokens, m = 64: shares 812.5
    -> 768 each (3,072), 3 of them raised to 832 -> caps [832, 832, 832, 768] = 3,264.
    """
    n = sum(sizes)
    shares = [total * s / n for s in sizes]
    caps = [max(multiple, int(share // multiple) * multiple) for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda g: (caps[g] - shares[g], g))
    k = 0
    while sum(caps) < total:
        caps[by_remainder[k % len(caps)]] += multiple
        k += 1
    return caps


def fill_buckets(indices: Sequence[int], lengths: np.ndarray, sizes: Sequence[int], multiple: int,
                 caps: Sequence[int] | None = None) -> list[Row]:
    """Split `indices` into len(sizes) groups of exactly sizes[g] examples, each group's token sum at
    most its cap where possible (so its row, padded to a multiple, wastes little). Caps: `caps` when
    given, else `bucket_caps` of the total.

    Greedy: longest example first, into the open group (fewer than its size) with the most room left;
    then, while a group is over its cap, the swap between it and a group with room that removes the
    most overflow. A group still over its cap just takes the next multiple. Deterministic: ties go to
    the lower group index and the lower position in `indices`.
    Raises ValueError when sum(sizes) != len(indices).
    """
    items = np.asarray(indices, dtype=np.int64)
    if int(sum(sizes)) != len(items):
        raise ValueError(f"group sizes add up to {sum(sizes)}, but there are {len(items)} examples")
    sizes = [int(s) for s in sizes]
    if not len(items):
        return [[] for _ in sizes]
    lens = lengths[items].astype(np.int64)
    caps = np.array(caps if caps is not None else bucket_caps(int(lens.sum()), sizes, multiple), dtype=np.int64)
    sums = np.zeros(len(sizes), dtype=np.int64)
    group = np.full(len(items), -1, dtype=np.int64)
    counts = [0] * len(sizes)
    heap = [(-int(caps[g]), g) for g in range(len(sizes)) if sizes[g] > 0]
    heapq.heapify(heap)
    for j in sorted(range(len(items)), key=lambda j: (-int(lens[j]), j)):
        _, g = heapq.heappop(heap)
        group[j], sums[g], counts[g] = g, sums[g] + lens[j], counts[g] + 1
        if counts[g] < sizes[g]:
            heapq.heappush(heap, (-int(caps[g] - sums[g]), g))
    _repair(lens, group, sums, caps)
    return [[int(i) for i in items[group == g]] for g in range(len(sizes))]


def _repair(lens: np.ndarray, group: np.ndarray, sums: np.ndarray, caps: np.ndarray) -> None:
    """Swap single examples between an over-cap group and groups with room (in place), most overflow
    removed first; stop when no group is over, or no swap helps the over-cap groups left."""
    stuck = np.zeros(len(sums), dtype=bool)
    for _ in range(4 * len(sums) + 8):
        excess = np.where(stuck, 0, sums - caps)
        over = int(np.argmax(excess))
        if excess[over] <= 0:
            return
        room = caps - sums
        mine = np.flatnonzero(group == over)
        theirs = np.flatnonzero(room[group] > 0)
        diff = lens[mine][:, None] - lens[theirs][None, :]
        ok = (diff > 0) & (diff <= room[group[theirs]][None, :])
        if not ok.any():
            stuck[over] = True
            continue
        # most overflow removed, then the smallest move (keeps the other group's room)
        score = np.where(ok, np.minimum(diff, excess[over]) * (1 << 32) - diff, -1)
        a, b = np.unravel_index(int(np.argmax(score)), score.shape)
        ja, jb = mine[a], theirs[b]
        moved = int(lens[ja] - lens[jb])
        other = int(group[jb])
        group[ja], group[jb] = other, over
        sums[over] -= moved
        sums[other] += moved


def best_fit_rows(indices: Sequence[int], lengths: np.ndarray, row_size: int, multiple: int) -> list[Row]:
    """Rows of `row_size` examples (the last may be smaller), each filled to just under its own multiple.

    Row by row: the longest example left opens it, its cap is the multiple that holds it plus the
    row_size - 1 shortest left, then each slot takes the longest example that still leaves room for
    the shortest ones in the remaining slots. Little padding (the cap always fits, and is filled as
    far as the examples allow), but the widths follow the data: best for small rows (2-4 examples),
    where equal sums (`fill_buckets`) are out of reach.
    """
    items = sorted((int(lengths[i]), int(i)) for i in indices)  # ascending (length, index)
    rows: list[Row] = []
    while items:
        top = items.pop()
        row, slots = [top[1]], min(row_size - 1, len(items))
        room = round_up(top[0] + sum(x for x, _ in items[:slots]), multiple) - top[0]
        for k in range(slots, 0, -1):
            limit = room - sum(x for x, _ in items[: k - 1])
            j = max(k - 1, bisect.bisect_right(items, (limit, 1 << 62)) - 1)
            length, index = items.pop(j)
            row.append(index)
            room -= length
        rows.append(row)
    return rows


def padding(rows: Sequence[Row], lengths: np.ndarray, multiple: int) -> tuple[int, int]:
    """(padding tokens, distinct padded widths) of rows each padded to its own multiple."""
    sums = [int(sum(int(lengths[i]) for i in row)) for row in rows]
    widths = [round_up(x, multiple) for x in sums]
    return sum(widths) - sum(sums), len(set(widths))


def token_balanced(order: np.ndarray, lengths: np.ndarray, group_size: int, row_size: int, multiple: int,
                   rng: np.random.Generator, mega_groups: int = 50) -> list[np.ndarray]:
    """An epoch order -> step groups of `group_size` examples, made of rows of `row_size` examples whose
    token sums sit on multiples of `multiple`.

    The order is cut into chunks of `mega_groups` x `group_size` examples; each chunk is split into
    rows by `fill_buckets` (equal sums: few widths), or by `best_fit_rows` when that wastes less with
    at most 2 widths more (small rows, whose sums cannot be equal); the rows are shuffled and laid end
    to end, `group_size // row_size` rows a step (so `group[k * row_size:(k + 1) * row_size]` is row k).
    The last n % row_size examples of the order form one smaller row, at the very end. Measured on the
    Amazon rating epoch (698 examples, m = 64): rows of 8 -> 3 widths, 0.1% padding; rows of 2 ->
    4 widths, 3% (equal sums alone: 12%). Deterministic in (order, rng).
    Raises ValueError when group_size is not a multiple of row_size.
    """
    if group_size % row_size:
        raise ValueError(f"group_size {group_size} is not a multiple of row_size {row_size}")
    rem = len(order) % row_size
    body = order[: len(order) - rem]
    rows: list[Row] = []
    mega = group_size * mega_groups
    for start in range(0, len(body), mega):
        chunk = body[start : start + mega]
        equal = fill_buckets(chunk, lengths, [row_size] * (len(chunk) // row_size), multiple)
        fitted = best_fit_rows(chunk, lengths, row_size, multiple)
        (waste_e, widths_e), (waste_f, widths_f) = padding(equal, lengths, multiple), padding(fitted, lengths, multiple)
        rows.extend(fitted if waste_f < waste_e and widths_f <= widths_e + 2 else equal)
    flat = [i for k in rng.permutation(len(rows)) for i in rows[k]] + [int(i) for i in order[len(order) - rem :]]
    out = np.array(flat, dtype=np.int64)
    return [out[i : i + group_size] for i in range(0, len(out), group_size)]


def micro_batch_shape(micro_batch: Sequence[Row], lengths: np.ndarray, multiple: int = 1) -> list[int]:
    """[rows, width] of the input_ids a planned micro-batch collates to: one row per planned row (its
    examples end to end when packed), width = the fullest row rounded up to `multiple`. A placeholder
    micro-batch ([]) is the one-token dummy: [1, 1]."""
    if not micro_batch:
        return [1, 1]
    width = max(int(sum(int(lengths[i]) for i in row)) for row in micro_batch)
    return [len(micro_batch), round_up(width, multiple)]


def record_shape(shapes: Sequence[Sequence[int]]) -> list:
    """The `shape` of a train record from its micro-batches' [rows, width]: the one pair when the step
    ran one micro-batch on this process, else the list of them in order."""
    pairs = [[int(x) for x in shape] for shape in shapes]
    return pairs[0] if len(pairs) == 1 else pairs


def step_shape(micro_batches: Sequence[Sequence[Row]], lengths: np.ndarray, multiple: int = 1) -> list:
    """The `shape` a train record will carry for these planned micro-batches (`record_shape`)."""
    return record_shape([micro_batch_shape(mb, lengths, multiple) for mb in micro_batches])
