"""Tracking a run: the metrics log (JSONL, TensorBoard), the progress display, and the choice of the best
checkpoint with early stopping.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from instructkit.config import EarlyStopping
from instructkit.errors import TrainingError
from instructkit.train.checkpoint import save_best
from instructkit.train.state import Run, TrainState
from instructkit.io import read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


class MetricsLog:
    """run_dir/metrics.jsonl (one JSON object per event) and TensorBoard when asked and installed."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Keep what led to the checkpoint; steps after it are redone and logged again.
            # A run killed mid-write may leave a torn last line: keep the records that parse.
            self.history = [r for r in read_jsonl(self.path, skip_torn=True) if r.get("step", 0) <= resume_step]
            write_jsonl(self.path, self.history)
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                logger.warning("train.tensorboard is on but tensorboard is not installed "
                               "(pip install 'instructkit[tensorboard]'); logging to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = "eval" if record.get("event") == "eval" else "train"
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "event"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A rich progress bar (loss, tok/s, ETA) on the main process; nothing elsewhere."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
                                TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=total, completed=done, loss=float("nan"), tps=0.0)
        self.bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tokens_per_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return "loss" in name or "ppl" in name or "perplexity" in name


def choose_metric(early: EarlyStopping | None, record: dict[str, Any]) -> str | None:
    """The metric that picks the best checkpoint: the configured one, else macro_f1 when the task
    metrics have it, else validation loss."""
    if early is not None and early.metric:
        return early.metric
    for name in ("macro_f1", "val_loss"):
        if name in record:
            return name
    return None


def improved(metric: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """True when `value` beats `best` by more than `min_delta` in the metric's direction (the first finite
    value always does): loss and perplexity go down, task metrics go up."""
    if best is None:
        return math.isfinite(value)
    if lower_is_better(metric):
        return value < best - min_delta
    return value > best + min_delta


def track_best(run: Run, state: TrainState, record: dict[str, Any]) -> None:
    """Keep checkpoints/best when the chosen metric improved; count validations without improvement."""
    metric = state.best_metric or choose_metric(run.cfg.early_stopping, record)
    if metric is None or run.sharded:
        return
    if metric not in record:
        raise TrainingError(f"early-stopping metric {metric!r} is not among the validation metrics "
                            f"{sorted(k for k in record if k not in ('event', 'step', 'epoch'))}")
    state.best_metric = metric
    value = float(record[metric])
    early = run.cfg.early_stopping
    if improved(metric, value, state.best_value, early.min_delta if early else 0.0):
        state.best_value, state.best_step, state.bad_evals = value, state.step, 0
        if run.main:
            save_best(run.run_dir, run.unwrapped, {"step": state.step, "metric": metric, "value": value})
        run.accelerator.wait_for_everyone()
        return
    state.bad_evals += 1
    if early is not None and state.bad_evals >= early.patience:
        logger.info("early stopping at step %d: %s has not improved for %d validations (best %.4g at step %d)",
                    state.step, metric, state.bad_evals, state.best_value, state.best_step)
        state.stopped_early = True
