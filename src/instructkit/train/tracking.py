"""Tracking a run: the metrics log (JSONL, TensorBoard), throughput and the progress display (`TrainMeter`),
and the choice of the best checkpoint with early stopping (its set-up check, the metric's direction).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from instructkit.config import EarlyStopping, TrainConfig
from instructkit.errors import ConfigError, TrainingError
from instructkit.io import read_jsonl, write_jsonl
from instructkit.metric_direction import declared_direction, lower_is_better
from instructkit.progress import ProgressBar
from instructkit.train.checkpoint import best_dir, load_best, read_best, save_best
from instructkit.train.sharding import full_weights, load_full_weights
from instructkit.train.state import Run, TrainState, Validate

logger = logging.getLogger(__name__)

LOOP_METRICS = {"val_loss": False, "val_ppl": False}
"""The validation metrics the loop computes itself (loop.py `_validate`), True where higher is better."""


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


class TrainMeter:
    """Throughput, the train records of metrics.jsonl and the progress display of one `train` call.

    Tokens per second count the optimizer steps only (validation and checkpoints excluded); a record is
    written every `log_every` steps and at the last. A record's `loss` is the mean of the step losses since
    the previous record (transformers.Trainer's logging convention) and `label_tokens` their sum; `lr`,
    `grad_norm` and `shape` are the last step's. With class weights (`train.class_balance: weighted`) `loss`
    is the weighted loss training minimises and `unweighted_loss` the plain mean cross-entropy, the one to
    compare with `val_loss` (validation is unweighted). The display is a progress bar on a terminal, else a
    plain line every 30 s (instructkit.progress).
    """

    def __init__(self, run: Run, log: MetricsLog, done: int, show: bool, log_every: int = 1):
        self.run, self.log, self.log_every = run, log, log_every
        self.bar = ProgressBar("train", run.total_steps, done, enabled=show and run.main)
        self.train_seconds, self.window_tokens, self.window_seconds = 0.0, 0, 0.0
        self.window_losses: list[float] = []
        self.window_unweighted: list[float] = []
        self.window_label_tokens = 0

    def step(self, state: TrainState, stats: Any, seconds: float) -> None:
        """Account one optimizer step that took `seconds` (StepStats from train/step.py)."""
        self.train_seconds += seconds
        self.window_seconds += seconds
        self.window_tokens += stats.tokens
        self.window_losses.append(stats.loss)
        if stats.unweighted_loss is not None:
            self.window_unweighted.append(stats.unweighted_loss)
        self.window_label_tokens += stats.label_tokens
        if state.step % self.log_every and state.step < self.run.total_steps:
            return
        rate = self.window_tokens / max(self.window_seconds, 1e-9)
        epoch = round(state.step / self.run.steps_per_epoch, 4)
        loss = sum(self.window_losses) / len(self.window_losses)
        self.log.write({"event": "train", "step": state.step, "epoch": epoch,
                        "loss": loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens": state.tokens,
                        "label_tokens": self.window_label_tokens, "tokens_per_s": round(rate, 2),
                        "shape": stats.shape,
                        **({"unweighted_loss": sum(self.window_unweighted) / len(self.window_unweighted)}
                           if self.window_unweighted else {})})
        self.bar.update(completed=state.step, info=f"loss {loss:.4f}  {rate:,.0f} tok/s")
        self.window_tokens, self.window_seconds, self.window_label_tokens = 0, 0.0, 0
        self.window_losses, self.window_unweighted = [], []

    def close(self) -> None:
        self.bar.close()


def choose_metric(early: EarlyStopping | None, record: dict[str, Any]) -> str | None:
    """The metric that picks the best checkpoint: the configured one, else macro_f1 when the task
    metrics have it, else validation loss."""
    if early is not None and early.metric:
        return early.metric
    for name in ("macro_f1", "val_loss"):
        if name in record:
            return name
    return None


def metric_lower_is_better(run: Run, metric: str) -> bool:
    """The direction `metric` is judged in (instructkit.metric_direction): train.early_stopping.greater_is_better
    for the metric it names, else the direction `validate` declares (its `validate_metrics`) or the loop's own
    (`LOOP_METRICS`), else the metric's name."""
    early = run.cfg.early_stopping
    setting = early.greater_is_better if early is not None and early.metric == metric else None
    return lower_is_better(metric, setting, {**LOOP_METRICS, **(run.validate_metrics or {})})


def improved(value: float, best: float | None, lower: bool, min_delta: float = 0.0) -> bool:
    """True when `value` beats `best` by more than `min_delta` in the metric's direction (`lower`: lower is
    better; `metric_lower_is_better`); the first finite value always does."""
    if best is None:
        return math.isfinite(value)
    if lower:
        return value < best - min_delta
    return value > best + min_delta


def check_early_stopping(cfg: TrainConfig, has_val: bool, validate: Validate | None,
                         validate_metrics: Mapping[str, bool] | None) -> None:
    """Raise before the first step when train.early_stopping cannot be measured, which would otherwise be
    silently ignored (no validation at all) or fail at the first validation, an epoch into the run by
    default: TrainingError for a validation-loss metric without a validation split, ConfigError for a
    metric that validation does not produce. Validation's metrics are known without `validate` (val_loss,
    val_ppl) or when it declares them (`validate_metrics`; make_validation_fn does); a plain callable's are
    checked at the first validation."""
    early = cfg.early_stopping
    if early is None:
        return
    if not has_val and validate is None:
        raise TrainingError("train.early_stopping is set but this run has no validation split and no task metrics "
                            "to measure it: give validation data, or remove train.early_stopping")
    if early.metric in LOOP_METRICS and not has_val:
        raise TrainingError(f"train.early_stopping.metric={early.metric!r} needs a validation split; this run has "
                            "none (only task metrics): give validation data, or pick a task metric")
    if early.metric is None or (validate is not None and validate_metrics is None):
        return
    known = {**(LOOP_METRICS if has_val else {}), **(validate_metrics or {})}
    if early.metric not in known:
        close = difflib.get_close_matches(early.metric, list(known), n=1)
        per_template = next((k for k in known if "/" in k), None)
        raise ConfigError(f"train.early_stopping.metric={early.metric!r} is not a metric validation produces"
                          + (f" (did you mean {close[0]!r}?)" if close else "") + ": it produces "
                          + (", ".join(sorted(k for k in known if "/" not in k)) or "no metric of that kind")
                          + (f", and per template e.g. {per_template!r}" if per_template else "")
                          + ("; train.eval_max_examples is 0: no task metrics" if not cfg.eval_max_examples else ""))
    declared = declared_direction(early.metric, known)
    if early.greater_is_better is not None and declared is not None and early.greater_is_better != declared:
        logger.warning("train.early_stopping.greater_is_better=%s for %s, whose definition says the opposite: "
                       "the setting wins", early.greater_is_better, early.metric)


def keep_best(run: Run, state: TrainState, checkpoint: Path | None) -> None:
    """Write checkpoints/best for the current step (`track_best` found it the best so far), linking the
    weights of `checkpoint` (this step's) when one was just written: 0.54 GB less to write per
    improvement for SmolLM2-135M."""
    info = {"step": state.step, "metric": state.best_metric, "value": state.best_value}
    if run.sharded:  # FSDP2: the shards gathered whole onto the main process (every process takes part)
        tensors = full_weights(run.model, run.main)
        if run.main:
            save_best(run.run_dir, run.unwrapped, info, tensors=tensors)
    elif run.main:
        save_best(run.run_dir, run.unwrapped, info, weights_from=checkpoint)
    run.accelerator.wait_for_everyone()


def reload_best(run: Run, path: Path) -> None:
    """Put checkpoints/best's weights back into the model (FSDP2: read on the main process, scattered)."""
    if run.sharded:
        load_full_weights(run.model, read_best(path) if run.main else None)
    else:
        load_best(path, run.unwrapped)


def best_step_on_disk(run: Run) -> int | None:
    """The step of the weights in checkpoints/best (None: none, or unreadable)."""
    try:
        return int(json.loads((best_dir(run.run_dir) / "best.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def track_best(run: Run, state: TrainState, record: dict[str, Any]) -> None:
    """Note the step when the chosen metric improved (`keep_best` writes its weights); count validations
    without improvement and decide early stopping."""
    metric = state.best_metric or choose_metric(run.cfg.early_stopping, record)
    if metric is None:
        return
    if metric not in record:
        raise TrainingError(f"early-stopping metric {metric!r} is not among the validation metrics "
                            f"{sorted(k for k in record if k not in ('event', 'step', 'epoch'))}")
    state.best_metric = metric
    value = float(record[metric])
    early = run.cfg.early_stopping
    if improved(value, state.best_value, metric_lower_is_better(run, metric), early.min_delta if early else 0.0):
        state.best_value, state.best_step, state.bad_evals = value, state.step, 0
        return  # the weights are written by keep_best, after this step's checkpoint (whose weights it links)
    state.bad_evals += 1
    if early is not None and state.bad_evals >= early.patience:
        logger.info("early stopping at step %d: %s has not improved for %d validations (best %.4g at step %d)",
                    state.step, metric, state.bad_evals, state.best_value, state.best_step)
        state.stopped_early = True
