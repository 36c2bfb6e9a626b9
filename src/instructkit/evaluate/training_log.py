"""Read the training run's ``metrics.jsonl`` for the report: records, per-key series and a summary (with
the best checkpoint that ``train_result.json`` beside the log names).

A record counts when it has a numeric ``step``; a line that is not JSON (a crash mid-write) is skipped.
Validation task metrics are the flat keys that name a metric ("macro_f1", "rougeL") or start with
``val_``; per-template keys ("t/macro_f1"), the training counters and counts (``val_label_tokens``) are
not plotted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instructkit.evaluate.metric_registry import HIGHER_IS_BETTER, METRICS
from instructkit.io import iter_jsonl
from instructkit.metric_direction import lower_is_better

__all__ = ["best_checkpoint", "best_value", "is_counter", "read_metrics_log", "series", "task_metric_keys",
           "training_summary"]

log = logging.getLogger(__name__)

LOG_COUNTERS = {"step", "epoch", "loss", "unweighted_loss", "lr", "tokens", "tokens_per_s", "val_loss", "val_ppl", "time",
                "elapsed", "elapsed_s", "grad_norm", "examples", "wall_s", "label_tokens", "val_label_tokens"}
COUNT_SUFFIXES = ("_tokens", "_examples", "_count", "_per_s", "_seconds")
"""Keys that count things (tokens, examples, seconds), never task metrics: `val_label_tokens` is 120, not
a score, and must not share an axis with accuracy."""


def is_counter(key: str) -> bool:
    """True for the log's counters and counts (`val_label_tokens`, `n_examples`), never a task metric."""
    return key in LOG_COUNTERS or key.endswith(COUNT_SUFFIXES) or key.startswith("n_")


def read_metrics_log(path: Path | None) -> list[dict]:
    """Records of ``metrics.jsonl`` that have a step; unreadable lines (a crash mid-write) skipped.

    A missing file gives ``[]`` (with a warning); nothing is raised for unreadable lines.
    """
    if path is None:
        return []
    path = Path(path)
    if not path.is_file():
        log.warning("training log %s not found; no training curves", path)
        return []
    return [record for record in iter_jsonl(path, skip_torn=True)
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float))]


def series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry a finite number under ``key``."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r["step"]))
            ys.append(float(v))
    return xs, ys


def task_metric_keys(records: Sequence[dict]) -> list[str]:
    """Flat validation task metrics in the log ("macro_f1", "rougeL"; not per-template "t/macro_f1")."""
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if is_counter(k) or "/" in k or k in keys or not numeric:
                continue
            if k in METRICS or k.startswith("val_"):
                keys.append(k)
    return keys


def best_value(records: Sequence[dict], key: str, lower: bool) -> dict[str, float] | None:
    """{"step", "value"} of the best logged value of `key` (`lower`: lower is better; the first of equals)."""
    steps, values = series(records, key)
    if not values:
        return None
    best = (min if lower else max)(range(len(values)), key=lambda i: values[i])
    return {"step": steps[best], "value": values[best]}


def best_checkpoint(path: Path | None) -> dict[str, Any] | None:
    """The weights training kept, from ``train_result.json`` beside the log: {"metric", "step", "value",
    "greater_is_better"} (the direction training judged the metric in; for a file written before training
    recorded it, the metric's own: instructkit.metric_direction). None without a readable best."""
    try:
        result = json.loads((Path(path).parent / "train_result.json").read_text(encoding="utf-8"))
        metric, step, value = str(result["best_metric"]), float(result["best_step"]), float(result["best_value"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    higher = result.get("greater_is_better")
    if not isinstance(higher, bool):
        higher = not lower_is_better(metric, declared=HIGHER_IS_BETTER)
    return {"metric": metric, "step": step, "value": value, "greater_is_better": higher}


def training_summary(records: Sequence[dict], path: Path | None) -> dict[str, Any] | None:
    """Last step, final training loss (and, with class weights, the final unweighted loss: the one validation's
    loss compares with), best validation loss (step and value), and the best checkpoint (`best_checkpoint`)
    when training recorded one."""
    if not records:
        return None if path is None else {"path": str(path), "n_records": 0}
    _, losses = series(records, "loss")
    summary: dict[str, Any] = {
        "path": str(path),
        "n_records": len(records),
        "last_step": max(float(r["step"]) for r in records),
        "final_loss": losses[-1] if losses else None,
        "final_unweighted_loss": (series(records, "unweighted_loss")[1] or [None])[-1],
        "task_metrics": task_metric_keys(records),
    }
    best_loss = best_value(records, "val_loss", lower_is_better("val_loss", declared=HIGHER_IS_BETTER))
    if best_loss:
        summary["best_val_loss"] = best_loss
    checkpoint = best_checkpoint(path) if path is not None else None
    if checkpoint:
        summary["best_checkpoint"] = checkpoint
    return summary
