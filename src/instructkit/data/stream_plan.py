"""Plan one dataset in bounded memory: the split of plan.py computed from the hashes of pass 1.

    plan = plan_streamed(dataset, library, config)      # a DatasetPlan whose source is a StreamSource

Deduplication works on one 8-byte hash per row (data/stream_source.py) with numpy instead of a dict of
rows, with the rule of split.deduplicate: rows with the same key and label keep one row (in test, then
validation, then train, else the first), rows with the same key and different labels all go. Capping and
splitting call plan.cap_rows and split.split_rows on the kept row numbers, labels and group hashes, so for
the same rows the split is the one `plan_dataset` makes (tests/data/test_streaming.py compares them on the
shared data).
"""

from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

from instructkit.config import DatasetConfig, RunConfig
from instructkit.data.answers import OUTSIDE_DETECTED, Answers, decide_counts
from instructkit.data.chunks import CHUNK_ROWS
from instructkit.data.plan import DatasetPlan, cap_rows, dataset_templates, split_notes, template_notes
from instructkit.data.sources import dataset_name
from instructkit.data.split import DedupResult, split_rows
from instructkit.data.stream_source import GIVEN_NAMES, StreamSource, hash_values, scan_source
from instructkit.data.table import Problems
from instructkit.errors import ConfigError
from instructkit.templates.library import TemplateLibrary
from instructkit.templates.schema import label_key

log = logging.getLogger(__name__)


def dedup_hashed(source: StreamSource, key: list[str], max_examples: int = 5) -> tuple[DedupResult, list[int]]:
    """`split.deduplicate` on the key hashes of `source` (normalised texts when `source.normalized`); and the
    first row of each conflicting group reported in `conflicting_examples` (its key fields are filled in
    during rendering)."""
    n = len(source)
    label_field = source.label_field
    result = DedupResult(keep=[], key=list(key), rows_in=n, normalized=source.normalized)
    if not [f for f in key if f != label_field]:
        result.keep = list(range(n))
        return result, []
    given = source.given_codes()
    _, inv, counts = np.unique(source.keys, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    groups = len(counts)
    conflict = np.zeros(groups, dtype=bool)
    pairs = None
    if source.labels is not None:
        width = max(len(source.label_values), 1)
        pairs = np.unique(inv.astype(np.int64) * width + source.labels)
        conflict = np.bincount(pairs // width, minlength=groups) > 1
    order = np.lexsort((np.arange(n), given, inv))  # by group, then keep priority, then row
    sorted_groups = inv[order]
    starts = np.concatenate([[True], sorted_groups[1:] != sorted_groups[:-1]])
    best = order[starts]  # best[g]: the row group g keeps
    result.keep = np.sort(best[~conflict]).tolist()
    exact = ~conflict & (counts > 1)
    result.exact_groups = int(exact.sum())
    result.exact_dropped = int((counts[exact] - 1).sum())
    members = exact[inv]
    result.cross_split_dropped = int((given[members] != given[best][inv][members]).sum())
    result.conflicting_groups = int(conflict.sum())
    result.conflicting_dropped = int(counts[conflict].sum())
    firsts: list[int] = []
    if result.conflicting_groups:
        first = np.full(groups, n, dtype=np.int64)
        np.minimum.at(first, inv, np.arange(n))
        chosen = np.flatnonzero(conflict)
        chosen = chosen[np.argsort(first[chosen], kind="stable")][:max_examples]
        width = max(len(source.label_values), 1)
        for g in chosen:
            codes = pairs[pairs // width == g] % width  # type: ignore[index,operator]
            labels = sorted(str(source.label_values[int(c)]) for c in codes)
            result.conflicting_examples.append({label_field: labels, "rows": int(counts[g]),
                                                "where": source.where(int(first[g]))})
            firsts.append(int(first[g]))
    return result, firsts


def _nfc_hash(text: str) -> int:
    """The completion hash stream_source keeps for `text` (of its NFC form)."""
    return int.from_bytes(hash_values([unicodedata.normalize("NFC", text)]), "little")


def streamed_answers(dataset: DatasetConfig, source: StreamSource, dedup: DedupResult, name: str) -> Answers:
    """plan.instruction_answers from the completion hashes (and the text of short completions): both are of
    the completion's NFC form, so a spelling canonically equivalent to a choice is that choice."""
    keep = np.asarray(dedup.keep, dtype=np.int64)
    hashes = source.completions[keep]
    values, counts = np.unique(hashes, return_counts=True)
    texts = source.completion_text
    declared = dataset.choices if isinstance(dataset.choices, list) else []
    named = {_nfc_hash(c): unicodedata.normalize("NFC", c) for c in declared}  # a long choice has no kept text
    tally = Counter({texts.get(int(h), named.get(int(h), int(h))): int(c) for h, c in zip(values, counts)})
    answers = decide_counts(tally, len(keep), dataset.choices, dataset.metrics, conversations=source.kind == "chat")
    if answers.choices is None:
        return answers
    allowed = np.array([_nfc_hash(c) for c in answers.choices], dtype=np.uint64)
    inside = np.isin(hashes, allowed)
    problems = Problems(dataset.skip_bad_rows)
    outside = keep[~inside]
    if answers.origin == "declared":
        for r, h in zip(outside.tolist(), hashes[~inside].tolist()):
            text = texts.get(h)
            shown = f" {text[:80]!r}" if text is not None else ""
            problems.bad("completion outside the declared choices", f"{source.where(r)}: completion{shown} "
                         f"is not one of the dataset's choices {answers.choices}")
    elif len(outside):
        source.skipped[OUTSIDE_DETECTED] += len(outside)
        log.warning("dataset %s: %d rows whose completion is outside the detected answer choices %s are "
                    "left out (see stats.json)", name, len(outside), answers.choices)
    source.skipped.update(problems.counts)
    source.skipped_samples.extend(problems.samples)
    dedup.keep = keep[inside].tolist()
    return answers


def plan_streamed(dataset: DatasetConfig, library: TemplateLibrary, config: RunConfig,
                  chunk_rows: int = CHUNK_ROWS, spill: Path | None = None) -> DatasetPlan:
    """plan.plan_dataset in bounded memory: pass 1 over the files, then dedup, cap and split on arrays.
    With `spill`, the checked rows are kept in that file for rendering (stream_source.StreamSource.spill).

    Raises: what plan_dataset raises.
    """
    split_cfg = config.split
    name = dataset_name(dataset)
    schema, train_templates, eval_templates, held_ids = dataset_templates(dataset, library)
    group_by = dataset.group_by or split_cfg.group_by
    required = list(dataset.dedup_key or []) + ([group_by] if group_by else [])
    if schema is not None and (dataset.choices != "auto" or dataset.metrics is not None):
        raise ConfigError(f"dataset {name!r}: `choices` and `metrics` are for prompt/completion data; a "
                          "template sets its own (eval.metrics overrides them per template)")

    def key_for(kind: str, label: str | None) -> list[str]:
        if dataset.dedup_key:
            return list(dataset.dedup_key)
        if schema is None:
            return ["messages", "completion"] if kind == "chat" else ["prompt", "completion"]
        reads: set[str] = set()
        for t in eval_templates:
            reads |= t.fields_read
        return sorted(reads & set(schema.fields)) if schema.fields else sorted(reads)

    source = scan_source(dataset, schema, templates=eval_templates, required=required, name=name,
                         schemas=library.schemas.values(), key_for=key_for, group_by=group_by,
                         chunk_rows=chunk_rows, spill=spill, normalize=split_cfg.text_match == "normalized")
    key = key_for(source.kind, source.label_field)
    dedup, firsts = dedup_hashed(source, key)
    answers = streamed_answers(dataset, source, dedup, name) if schema is None else None
    codes = source.given_codes()
    has_given = bool((codes != 3).any())
    given_all = [GIVEN_NAMES[int(c)] for c in codes] if has_given and dataset.max_rows is not None else None
    rows, capped = cap_rows(dedup.keep, given_all, dataset.max_rows, f"cap:{split_cfg.seed}:{name}")
    del given_all
    index = np.asarray(rows, dtype=np.int64)
    labels = None
    if source.label_field is not None and schema is not None:
        names = {label_key(k): v for k, v in (schema.label_map or {}).items()}
        by_code = [names.get(label_key(v), label_key(v)) for v in source.label_values]
        labels = [by_code[c] for c in source.labels[index].tolist()]
    groups = source.groups[index].tolist() if group_by else None
    given = [GIVEN_NAMES[c] for c in codes[index].tolist()] if has_given else None
    result = split_rows(len(rows), validation=split_cfg.validation, test=split_cfg.test, seed=split_cfg.seed,
                        labels=labels, groups=groups, given=given, stratify=split_cfg.stratify,
                        held_out=dataset.held_out)
    notes = list(source.notes) + template_notes(dataset, train_templates) + split_notes(result)
    plan = DatasetPlan(config=dataset, name=name, schema=schema, source=source, train_templates=train_templates,
                       eval_templates=eval_templates, held_out_ids=held_ids, dedup=dedup, split=result, rows=rows,
                       rows_capped=capped, problems=Problems(dataset.skip_bad_rows), answers=answers, notes=notes)
    plan.conflict_rows = firsts  # type: ignore[attr-defined]
    return plan
