"""Deduplicate source rows, then split them into train / validation / test BEFORE templating.

Splitting source rows (not rendered examples) is what keeps a review out of both train and test when
it is rendered by several templates.

Deduplication (`deduplicate`) groups rows by a key (default: the fields the chosen templates read).
The label field is left out of the key, so that rows agreeing on everything but the label are found:
  - exact duplicates (same key, same label; 1, 1.0, "1" and "01" are one label): the first row is kept,
    the others dropped;
  - conflicting duplicates (same key, different labels, e.g. 5 sentences of SST-2 train): every row of
    the group is dropped. Keeping one would pick a label at random (noise), and keeping them all would
    train on contradictory targets and could put the same text in train and test (leakage).
When files give their own splits, a duplicate group spanning them keeps its row in the most
evaluation-side split (test, then validation, then train), so published test sets stay whole and the
training copies of test rows go.
Key texts, labels and `group_by` values are compared up to Unicode canonical equivalence (NFC:
"cafe\u0301" = "caf\u00e9", `canonical_text`), or key texts with `split.text_match: normalized` as `normalized_text` writes them
(Unicode NFKC, casefolded, whitespace runs as one space, stripped: "Great product!" and "great  product! "
plus a newline are one row); the leakage guard (leakage.py) compares prompts the same way.

Splitting (`split_rows`):
  - seeded: the same rows, seed and fractions give the same split;
  - stratified by label (when there is one and `stratify` is on): each class is shuffled and divided
    with largest-remainder rounding, under the constraint that the split sizes are the largest-remainder
    split of the whole (so every class lands within one row of its share in every split, and the split
    sizes are exact);
  - grouped (`group_by`): whole groups are placed, largest first, each into the split whose per-class
    deficit it reduces most; stratification is then best effort and the report gives the max deviation
    of label proportions in percentage points;
  - given splits (a dataset's own files) are kept; the missing ones are carved from the rows of the
    train file with their configured fraction of those rows (SST-2 train + dev as test: validation is
    10% of train, stratified);
  - a held-out dataset (evaluation only) has no train split: its rows go to validation and test in the
    ratio validation : test.
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from instructkit.templates.schema import label_key

SPLITS = ("train", "validation", "test")
_KEEP_PRIORITY = {"test": 0, "validation": 1, "train": 2, None: 3}


def _hashable(value: Any) -> Hashable:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return value


def canonical_text(value: Any) -> Any:
    """`value` as `split.text_match: exact` compares dedup keys: a text in Unicode NFC (canonically
    equivalent spellings, "cafe\u0301" and "caf\u00e9", are one text), the texts inside lists and dicts
    likewise; other values unchanged."""
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, list):
        return [canonical_text(v) for v in value]
    if isinstance(value, dict):
        return {k: canonical_text(v) for k, v in value.items()}
    return value


def normalized_text(value: Any) -> Any:
    """`value` as `split.text_match: normalized` compares it: a text in Unicode NFKC, casefolded, with every
    run of whitespace one space and none at either end; the texts inside lists and dicts (chat `messages`)
    likewise; other values unchanged."""
    if isinstance(value, str):
        return " ".join(unicodedata.normalize("NFKC", value).casefold().split())
    if isinstance(value, list):
        return [normalized_text(v) for v in value]
    if isinstance(value, dict):
        return {k: normalized_text(v) for k, v in value.items()}
    return value


def label_value(value: Any) -> Hashable:
    """A label as deduplication compares it: 1, 1.0, "1" and "01" are one label (`label_key`, the rule
    stratification and label maps use), so a row read from a CSV ("1") and its copy from a JSONL or Parquet
    file (1) are duplicates, not a conflict; lists and dicts as their JSON."""
    return _hashable(value) if isinstance(value, (list, dict)) else label_key(value)


# --------------------------------------------------------------------------------------------------
# Deduplication
# --------------------------------------------------------------------------------------------------


@dataclass
class DedupResult:
    """Which rows survive deduplication, and why the others went."""

    keep: list[int]
    """Indices of the rows kept, in their original order."""
    key: list[str]
    rows_in: int = 0
    exact_groups: int = 0
    """Keys that occurred more than once with one label."""
    exact_dropped: int = 0
    """Rows dropped as exact copies of a kept row."""
    conflicting_groups: int = 0
    """Keys that occurred with different labels (all their rows are dropped)."""
    conflicting_dropped: int = 0
    cross_split_dropped: int = 0
    """Of the dropped rows, those whose kept copy is in another given split."""
    conflicting_examples: list[dict] = field(default_factory=list)
    """The first row of the first few conflicting groups: its key fields, the labels, the group's size and
    where the row is (file and line)."""
    normalized: bool = False
    """Key texts compared as `normalized_text` writes them (`split.text_match: normalized`)."""

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "rows_in": self.rows_in,
            "rows_kept": len(self.keep),
            "unique_keys": len(self.keep) + self.conflicting_groups,
            "repeated_keys": self.exact_groups + self.conflicting_groups,
            "exact_duplicate_groups": self.exact_groups,
            "exact_duplicates_dropped": self.exact_dropped,
            "conflicting_label_groups": self.conflicting_groups,
            "conflicting_label_rows_dropped": self.conflicting_dropped,
            "cross_split_duplicates_dropped": self.cross_split_dropped,
            "conflicting_examples": self.conflicting_examples,
            "text_match": "normalized" if self.normalized else "exact",
            "policy": "exact duplicates: keep the first (in test, then validation, then train); "
            "conflicting labels: drop every row of the group",
        }


def deduplicate(
    rows: Sequence[Mapping[str, Any]],
    key: Sequence[str],
    label_field: str | None = None,
    given: Sequence[str | None] | None = None,
    max_examples: int = 5,
    *,
    normalize: bool = False,
    where: Callable[[int], str] | None = None,
) -> DedupResult:
    """Group rows by `key` (minus `label_field`) and drop duplicates as the module docstring says; with
    `normalize` the key values are compared as `normalized_text` writes them. `where(i)` names row i (file
    and line) in `conflicting_examples`."""
    fields = [f for f in key if f != label_field]
    if not fields:  # the key is the label alone: nothing sensible to deduplicate on
        return DedupResult(keep=list(range(len(rows))), key=list(key), rows_in=len(rows), normalized=normalize)
    groups: dict[Hashable, list[int]] = defaultdict(list)
    if len(fields) == 1:
        (only,) = fields
        values = (row.get(only) for row in rows)
        for i, value in enumerate(map(normalized_text if normalize else canonical_text, values)):
            groups[value if not isinstance(value, (list, dict)) else _hashable(value)].append(i)
    else:
        for i, row in enumerate(rows):
            values = [row.get(f) for f in fields]
            groups[tuple(_hashable(normalized_text(v) if normalize else canonical_text(v)) for v in values)].append(i)
    result = DedupResult(keep=[], key=list(key), rows_in=len(rows), normalized=normalize)
    keep = result.keep
    for members in groups.values():
        if len(members) == 1:
            keep.append(members[0])
            continue
        if label_field is not None:
            labels = {label_value(rows[i].get(label_field)) for i in members}
            if len(labels) > 1:
                result.conflicting_groups += 1
                result.conflicting_dropped += len(members)
                if len(result.conflicting_examples) < max_examples:
                    first = rows[members[0]]
                    result.conflicting_examples.append(
                        {
                            **{f: first.get(f) for f in fields},
                            label_field: sorted(map(str, labels)),
                            "rows": len(members),
                            **({"where": where(members[0])} if where is not None else {}),
                        }
                    )
                continue
        result.exact_groups += 1
        result.exact_dropped += len(members) - 1
        if given is not None:
            best = min(members, key=lambda i: (_KEEP_PRIORITY[given[i]], i))
            result.cross_split_dropped += sum(1 for i in members if given[i] != given[best])
        else:
            best = members[0]
        keep.append(best)
    keep.sort()
    return result


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


@dataclass
class SplitResult:
    """`assignment[i]` is the split of row i; `report` describes sizes and label balance."""

    assignment: list[str]
    report: dict

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.assignment) if s == split]


def largest_remainder(total: int, fractions: Sequence[float]) -> list[int]:
    """Integers summing to `total`, each within one of total * fraction (Hamilton's method)."""
    weight = sum(fractions)
    if total == 0 or weight <= 0:
        return [0] * len(fractions)
    exact = [total * f / weight for f in fractions]
    counts = [int(x) for x in exact]
    order = sorted(range(len(fractions)), key=lambda j: (-(exact[j] - counts[j]), j))
    for j in order[: total - sum(counts)]:
        counts[j] += 1
    return counts


def allocate(class_sizes: Sequence[int], fractions: Sequence[float], rng: random.Random) -> list[list[int]]:
    """Split each class's count across splits: cells[c][s].

    Row sums equal the class sizes, column sums equal `largest_remainder(sum, fractions)`, and every
    cell is floor or ceil of its exact share in all but rare corner cases (then the nearest feasible).
    """
    weight = sum(fractions)
    fractions = [f / weight for f in fractions]
    n_splits = len(fractions)
    totals = largest_remainder(sum(class_sizes), fractions)
    cells = [[int(n * f) for f in fractions] for n in class_sizes]
    row_left = [n - sum(row) for n, row in zip(class_sizes, cells)]
    col_left = [totals[s] - sum(row[s] for row in cells) for s in range(n_splits)]
    # give the remaining units to the cells with the largest remainders (ties broken at random, seeded)
    order = list(range(len(class_sizes)))
    rng.shuffle(order)
    units = sorted(
        ((c, s) for c in order for s in range(n_splits)),
        key=lambda cs: -(class_sizes[cs[0]] * fractions[cs[1]] - cells[cs[0]][cs[1]]),
    )
    for c, s in units:
        if row_left[c] > 0 and col_left[s] > 0 and class_sizes[c] * fractions[s] > cells[c][s]:
            cells[c][s] += 1
            row_left[c] -= 1
            col_left[s] -= 1
    for c in order:  # rare leftovers: any cell that keeps both sums right
        for s in range(n_splits):
            take = min(row_left[c], col_left[s])
            if take > 0:
                cells[c][s] += take
                row_left[c] -= take
                col_left[s] -= take
    return cells


def _carve_fractions(
    validation: float, test: float, held_out: bool, given_splits: set[str]
) -> dict[str, float]:
    """Fractions of the pool (rows without a given split) that go to each split."""
    carve = {
        "validation": 0.0 if "validation" in given_splits else validation,
        "test": 0.0 if "test" in given_splits else test,
    }
    if held_out:  # every row is scored on test; validation would only feed model selection, never with it
        return {"train": 0.0, "validation": 0.0, "test": 1.0}
    return {"train": 1.0 - carve["validation"] - carve["test"], **carve}


def split_rows(
    n: int,
    *,
    validation: float,
    test: float,
    seed: int = 0,
    labels: Sequence[Hashable] | None = None,
    groups: Sequence[Hashable] | None = None,
    given: Sequence[str | None] | None = None,
    stratify: bool = True,
    held_out: bool = False,
) -> SplitResult:
    """Assign each of `n` rows to train, validation or test (see the module docstring)."""
    rng = random.Random(f"split:{seed}")
    assignment: list[str | None] = [None] * n
    given_splits: set[str] = set()
    if given is not None:
        for i, split in enumerate(given):
            if split is None:
                continue
            given_splits.add(split)
            # rows given as train form the pool the missing splits are carved from
            if split != "train":
                assignment[i] = split
    pool = [i for i in range(n) if assignment[i] is None]
    fractions = _carve_fractions(validation, test, held_out, given_splits - {"train"})
    fr = [fractions[s] for s in SPLITS]
    use_labels = labels is not None and stratify
    classes: dict[Hashable, list[int]] = defaultdict(list)
    for i in pool:
        classes[labels[i] if use_labels else None].append(i)  # type: ignore[index]
    keys = sorted(classes, key=str)
    grouped = groups is not None
    if not grouped:
        cells = allocate([len(classes[k]) for k in keys], fr, rng)
        for k, row in zip(keys, cells):
            members = classes[k]
            rng.shuffle(members)
            start = 0
            for s, count in zip(SPLITS, row):
                for i in members[start : start + count]:
                    assignment[i] = s
                start += count
    else:
        _split_groups(pool, groups, labels if use_labels else None, fr, rng, assignment)  # type: ignore[arg-type]
    final: list[str] = assignment  # type: ignore[assignment]
    report = split_report(final, labels, groups, pool, given_splits - {"train"}, fractions)
    report["given_splits"] = sorted(given_splits)
    report.update(stratified=use_labels, grouped=grouped, seed=seed)
    return SplitResult(final, report)


def _split_groups(
    pool: list[int],
    groups: Sequence[Hashable],
    labels: Sequence[Hashable] | None,
    fr: Sequence[float],
    rng: random.Random,
    assignment: list[str | None],
) -> None:
    """Place whole groups, largest first, where they most reduce the per-class shortfall of a split."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i in pool:
        members[_hashable(groups[i])].append(i)
    class_of = (lambda i: labels[i]) if labels is not None else (lambda i: None)
    totals = Counter(class_of(i) for i in pool)
    # target[s][c]: rows of class c split s should get; deficit shrinks as groups are placed
    deficit = [{c: n * f for c, n in totals.items()} for f in fr]
    order = list(members)
    rng.shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: equal sizes stay in shuffled order
    for g in order:
        counts = Counter(class_of(i) for i in members[g])
        best, best_score = 0, None
        for s in range(len(fr)):
            if fr[s] <= 0:
                continue
            d = deficit[s]
            # reduction of the squared shortfall if the group goes to s (larger is better)
            score = sum(k * (2 * d[c] - k) for c, k in counts.items())
            score = (score, sum(d.values()))
            if best_score is None or score > best_score:
                best, best_score = s, score
        for c, k in counts.items():
            deficit[best][c] -= k
        split = SPLITS[best]
        for i in members[g]:
            assignment[i] = split


def split_report(
    assignment: Sequence[str],
    labels: Sequence[Hashable] | None,
    groups: Sequence[Hashable] | None,
    pool: Sequence[int],
    given_splits: set[str],
    fractions: Mapping[str, float],
) -> dict:
    """Sizes, label counts per split, and the max deviation of label proportions (percentage points)."""
    sizes = Counter(assignment)
    report: dict[str, Any] = {
        "sizes": {s: sizes.get(s, 0) for s in SPLITS},
        "given_splits": sorted(given_splits),
        "carved_fractions": {s: round(f, 6) for s, f in fractions.items()},
    }
    if labels is not None:
        per_split = {s: Counter() for s in SPLITS}
        for s, label in zip(assignment, labels):
            per_split[s][label] += 1
        total = Counter(labels)
        report["labels"] = {
            s: {str(k): v for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))}
            for s, c in per_split.items()
        }
        report["max_deviation_points"] = _max_deviation(per_split, total, SPLITS)
        pool_set = set(pool)
        carved = [s for s in SPLITS if s not in given_splits]
        if given_splits and pool:
            pool_counts = {s: Counter() for s in carved}
            for i in pool_set:
                pool_counts[assignment[i]][labels[i]] += 1
            report["max_deviation_points_carved"] = _max_deviation(
                pool_counts, Counter(labels[i] for i in pool_set), carved
            )
    if groups is not None:
        where: dict[Hashable, set[str]] = defaultdict(set)
        for s, g in zip(assignment, groups):
            where[_hashable(g)].add(s)
        report["groups"] = len(where)
        report["groups_in_several_splits"] = sum(1 for v in where.values() if len(v) > 1)
    return report


def _max_deviation(per_split: Mapping[str, Counter], total: Counter, splits: Sequence[str]) -> float:
    n = sum(total.values())
    worst = 0.0
    for s in splits:
        counts = per_split.get(s) or Counter()
        size = sum(counts.values())
        if size == 0 or n == 0:
            continue
        for c, k in total.items():
            worst = max(worst, abs(counts.get(c, 0) / size - k / n) * 100)
    return round(worst, 3)
