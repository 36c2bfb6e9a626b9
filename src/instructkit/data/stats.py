"""stats.json of a prepared run, and the end-of-prepare summary of what was left out.

    prepare_stats(...)   -> the dict written as <run_dir>/stats.json
    skipped_summary(stats) -> one line per dataset that skipped rows or examples (`skip_bad_rows`)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from instructkit.config import RunConfig, dump_config
from instructkit.data.plan import DatasetPlan
from instructkit.data.split import SPLITS


def prepare_stats(
    config: RunConfig,
    run_dir: Path,
    plans: list[DatasetPlan],
    counts: dict[str, dict[str, Counter]],
    written: dict[str, int],
    mixture: dict[str, dict],
) -> dict:
    """The content of a prepared run's stats.json (both the in-memory and the streamed prepare)."""
    datasets: dict[str, Any] = {}
    for plan in plans:
        source = plan.source
        skipped = dict(source.skipped)
        datasets[plan.name] = {
            "kind": source.kind,
            "schema": plan.schema.name if plan.schema else None,
            "files": source.files,
            "rows_read": source.rows_read,
            "rows_skipped": sum(skipped.values()),
            "rows_skipped_by_reason": skipped,
            "rows_skipped_samples": source.skipped_samples,
            "duplicates": plan.dedup.to_dict(),
            "rows_capped": plan.rows_capped,
            "rows_used": len(plan.rows),
            "split": plan.split.report,
            "examples_skipped": sum(plan.problems.counts.values()),
            "examples_skipped_by_reason": dict(plan.problems.counts),
            "examples_skipped_samples": plan.problems.samples,
            "held_out": plan.held_out,
            "templates": [t.id for t in plan.train_templates] if not plan.held_out else [],
            "held_out_templates": sorted(
                plan.held_out_ids | ({t.id for t in plan.eval_templates} if plan.held_out else set())
            ),
            "templates_per_row": plan.config.templates_per_row,
            "weight": plan.config.weight,
            "notes": plan.notes,
            "answers": plan.answers.to_dict() if plan.answers is not None else None,
        }
    splits: dict[str, Any] = {}
    for split in SPLITS:
        by_dataset = {name: sum(c.values()) for name, c in counts[split].items() if c}
        by_template: Counter = Counter()
        for c in counts[split].values():
            by_template.update(c)
        held = 0
        for plan in plans:
            for tid, n in counts[split].get(plan.name, Counter()).items():
                if plan.held_out or tid in plan.held_out_ids:
                    held += n
        splits[split] = {
            "examples": written[split],
            "held_out_examples": held,
            "source_rows": {p.name: p.split.report["sizes"][split] for p in plans},
            "by_dataset": by_dataset,
            "by_template": dict(sorted(by_template.items())),
            "labels": {p.name: p.split.report["labels"][split] for p in plans if "labels" in p.split.report},
        }
    templates: dict[str, Any] = {}
    for plan in plans:
        for t in plan.eval_templates:
            templates[t.id] = {
                "version": t.version,
                "schema": t.dataset,
                "task": t.task,
                "origin": t.origin,
                "held_out": plan.held_out or t.id in plan.held_out_ids,
            }
    deviation = [p.split.report.get("max_deviation_points") for p in plans]
    return {
        "run_dir": str(run_dir),
        "examples": written,
        "splits": splits,
        "datasets": datasets,
        "mixture": mixture,
        "stratification_max_deviation_points": max((d for d in deviation if d is not None), default=None),
        "templates": templates,
        "config": dump_config(config),
    }


def skipped_summary(stats: dict) -> list[str]:
    """One line per dataset of `stats` (prepare_stats) that left rows or examples out, e.g.
    "dataset 'reviews': 3 of 120 rows skipped (2 missing value, 1 bad JSON); 1 example skipped (1 empty
    completion); see stats.json". Reasons are stats.json's "rows_skipped_by_reason" and
    "examples_skipped_by_reason", most frequent first. Empty when nothing was skipped."""
    lines = []
    for name, entry in stats.get("datasets", {}).items():
        parts = []
        for what, total, reasons in (
            ("row", entry.get("rows_skipped", 0), entry.get("rows_skipped_by_reason", {})),
            ("example", entry.get("examples_skipped", 0), entry.get("examples_skipped_by_reason", {})),
        ):
            if not total:
                continue
            of = f" of {entry.get('rows_read', 0)}" if what == "row" else ""
            why = ", ".join(f"{n} {reason}" for reason, n in Counter(reasons).most_common())
            parts.append(f"{total}{of} {what}{'s' if total != 1 or of else ''} skipped ({why})")
        if parts:
            lines.append(f"dataset {name!r}: " + "; ".join(parts) + f"; see {stats.get('run_dir', '.')}/stats.json")
    return lines
