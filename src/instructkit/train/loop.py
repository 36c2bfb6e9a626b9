"""The training loop, read top to bottom: setup -> loop -> teardown.

    result = train(model, tokenizer, TrainData(train_ds, val_ds), cfg.train, run_dir,
                   TrainOptions(settings=settings, is_seq2seq=False, validate=my_metrics))

One process:         instructkit train CONFIG            (CPU: set train.threads; 1 is steadiest on 2 cores)
Two processes:       torchrun --nproc_per_node 2 -m instructkit train CONFIG      (gloo on CPU, NCCL on GPU)
Sharded (FSDP2):     the same with train.sharding=fsdp   (train/sharding.py; DCP checkpoints)

The arithmetic of one run (default config: batch_size 8, grad_accum 1, one process, SmolLM2):
  examples per optimizer step  G = batch_size x grad_accum x processes = 8  (data/sampler.py)
  steps per epoch              ceil(examples / G): 697 examples / 8 = 88
  total steps                  train.max_steps, else ceil(epochs x steps per epoch): 3 epochs = 264
Causal models pack each step's examples into rows (no padding; position_ids restart per example);
seq2seq pads. What one step does, and why (batch 8, accum 1) == (batch 2, accum 4) == 2 processes x
batch 4, is in train/step.py; the loss at label positions only is in train/loss.py.

Every `eval_every` steps (default: each epoch) and at the end: validation loss/perplexity and the
caller's `validate(model)` task metrics (train/tracking.py keeps the best weights in checkpoints/best;
early stopping is opt-in). Checkpoints every `save_every` steps (default: at each validation), every
`save_every_minutes` of wall time and on Ctrl-C or SIGTERM (train/interrupt.py) make resume exact
(train/checkpoint.py). Progress: a bar on a terminal, else a plain line every 30 s (instructkit.progress).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instructkit.config import TrainConfig
from instructkit.data.batching import TokenTable
from instructkit.data.sampler import (
    BatchPlan,
    attention_tokens_of,
    example_weights,
    one_row_attention,
    plan_eval,
)
from instructkit.data.tokenize import TokenizeSettings
from instructkit.errors import TrainingError
from instructkit.io import run_lock, write_json
from instructkit.models.attention import keeps_packed_examples_apart
from instructkit.train.checkpoint import best_dir
from instructkit.train.compile import compile_model, pad_multiple
from instructkit.train.disk import check_disk_space
from instructkit.train.distributed import broadcast, enable_activation_checkpointing, make_accelerator
from instructkit.train.interrupt import StopControl
from instructkit.train.loss import supports_logits_to_keep, validation_loss
from instructkit.train.optim import make_optimizer, make_scheduler
from instructkit.train.resume import resume_point
from instructkit.train.saving import checkpoint_due, save
from instructkit.train.sharding import check_processes, consolidated_model, resolve_sharding, shard_model
from instructkit.train.state import Run, TrainState, Validate
from instructkit.train.step import train_step
from instructkit.train.tracking import (
    MetricsLog,
    TrainMeter,
    check_early_stopping,
    keep_best,
    metric_lower_is_better,
    reload_best,
    track_best,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainData:
    """What to train on. `train`/`validation`: datasets from `tokenize_examples` (columns input_ids,
    labels, prompt_length, index). `class_ids[i]`: the class of the i-th example given to
    tokenize_examples (negative: none; data/sampler.class_ids_from_examples), needed when
    train.class_balance is "weighted" or "sampled"."""

    train: Any
    validation: Any = None
    class_ids: Sequence[int] | None = None


@dataclass(frozen=True)
class TrainOptions:
    """How to run `train` (everything but the data and the TrainConfig)."""

    settings: TokenizeSettings  # max_length sets the default token budget of a micro-batch
    is_seq2seq: bool
    validate: Validate | None = None  # task metrics of the unwrapped model, on the main process (fsdp: on all)
    validate_metrics: Mapping[str, bool] | None = None  # its keys, True where higher is better (checked up front)
    resume: bool = False  # continue from the newest verified checkpoint (fresh start, with a warning, if none)
    accelerator: Any = None  # default: make_accelerator(cfg)
    show_progress: bool = True
    free_space_fn: Callable[[Path], int] | None = None  # replaces the free-disk reading (tests)
    restore_best: bool = True  # end with the best validation weights instead of the last
    log_every: int = 1  # optimizer steps between train records in metrics.jsonl


@dataclass
class TrainResult:
    """What `train` did. The model passed in holds the best weights when `restore_best` (else the last)."""

    run_dir: Path
    steps: int  # optimizer steps done in total (including those before a resume)
    total_steps: int  # steps planned
    epochs: float  # steps / steps per epoch
    tokens: int  # non-padding input tokens trained on, all processes
    stopped_early: bool
    best_path: Path | None  # checkpoints/best: trainable weights (safetensors) + best.json
    best_metric: str | None
    best_value: float | None
    best_step: int | None
    last_checkpoint: Path | None
    history: list[dict[str, Any]]  # the records of metrics.jsonl
    train_seconds: float  # wall time of this call's optimizer steps (validation excluded)
    model: Any = None  # fsdp: the trained weights gathered into a plain module (main process; else None)
    greater_is_better: bool | None = None  # the direction best_metric was judged in (None: no best metric)

    @property
    def model_path(self) -> Path | None:
        """The weights to ship: the best, else the last checkpoint."""
        return self.best_path or self.last_checkpoint


def train(model: torch.nn.Module, tokenizer: Any, data: TrainData, cfg: TrainConfig, run_dir: str | os.PathLike,
          options: TrainOptions) -> TrainResult:
    """Fine-tune `model` on `data.train`; return what was done (the model is trained in place).

    Raises TrainingError when the run cannot start (no examples, lock held by a live run, not enough disk,
    a checkpoint that cannot be resumed exactly) or must stop (NaN/Inf loss: the step is not applied);
    ConfigError when train.early_stopping.metric is not among the metrics validation produces.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = options.accelerator or make_accelerator(cfg)
    with run_lock(run_dir) if accelerator.is_main_process else contextlib.nullcontext():
        # ---- setup: the batch plan, model + optimizer under accelerate, the resume point, the log ----
        run = setup(model, tokenizer, data, cfg, run_dir, dataclasses.replace(options, accelerator=accelerator))
        state, last_checkpoint = resume_point(run, options.resume)
        log = MetricsLog(run_dir, cfg.tensorboard, run.main, state.step if last_checkpoint else None)
        meter = TrainMeter(run, log, state.step, options.show_progress, options.log_every)
        rank = accelerator.process_index

        # ---- loop: epochs of planned steps until total_steps or early stopping ----------------------
        try:
            with StopControl(run, state, last_checkpoint) as stop:
                if state.pending_eval:  # Ctrl-C cut this step's validation short: it comes first
                    last_checkpoint = _after_step(run, state, log, stop, run.epoch_plan(state.epoch)) or last_checkpoint
                while state.step < run.total_steps and not state.stopped_early:
                    epoch_plan = run.epoch_plan(state.epoch)
                    for step_plan in epoch_plan[state.step_in_epoch:]:
                        started = time.perf_counter()
                        stats = train_step(run, run.batches(step_plan[rank]), state.step + 1)
                        state.step, state.step_in_epoch, state.tokens = (state.step + 1, state.step_in_epoch + 1,
                                                                         state.tokens + stats.tokens)
                        if state.step_in_epoch == len(epoch_plan):
                            state.epoch, state.step_in_epoch = state.epoch + 1, 0
                        meter.step(state, stats, time.perf_counter() - started)
                        last_checkpoint = _after_step(run, state, log, stop, epoch_plan) or last_checkpoint
                        if state.step >= run.total_steps or state.stopped_early:
                            break
        finally:
            meter.close()
            log.close()

        # ---- teardown: the best weights back in the model, the result on disk ------------------------
        return _finish(run, state, log, last_checkpoint, meter.train_seconds, options.restore_best)


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------


def setup(model: torch.nn.Module, tokenizer: Any, data: TrainData, cfg: TrainConfig, run_dir: Path,
          options: TrainOptions) -> Run:
    """Build the batch plan, the optimizer and schedule, and prepare model + optimizer with the accelerator.

    Raises TrainingError for an empty train split, missing class ids, or too little free disk, and
    TrainingError / ConfigError for early stopping that validation cannot measure (tracking.check_early_stopping).
    """
    from accelerate.utils import set_seed

    # Seed + process index (accelerate#236): dropout masks differ between processes as between the
    # micro-batches of one process; one process keeps cfg.seed. DDP copies rank 0's weights, FSDP2 keeps what
    # each process loaded, and the batch plan has its own generators: no rank-shared draw comes after this.
    set_seed(cfg.seed, device_specific=True)
    accelerator, seq2seq = options.accelerator, options.is_seq2seq
    table = TokenTable.from_dataset(data.train)
    if len(table) == 0:
        raise TrainingError("no training examples (the train split is empty after tokenization)")
    weights, sample_labels = _class_balance(cfg, data.class_ids, data.train)
    logits_at_labels = cfg.logits_at_labels and not seq2seq and supports_logits_to_keep(model)
    if cfg.logits_at_labels and not seq2seq and not logits_at_labels:
        logger.warning("this model's forward has no logits_to_keep: computing full logits")
    if cfg.compile:  # before the plan: compiling may change the attention, which sets the row widths
        compile_model(model)
    plan = BatchPlan(
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, world_size=accelerator.num_processes,
        packing=cfg.packing and not seq2seq,
        max_tokens=cfg.max_tokens_per_batch or cfg.batch_size * options.settings.max_length,
        attention_tokens=attention_tokens_of(getattr(model, "config", None)),
        group_by_length=cfg.group_by_length, seed=cfg.seed,
        pad_to_multiple_of=pad_multiple(cfg.pad_to_multiple_of, accelerator.device.type),
        one_row=one_row_attention(getattr(model, "config", None)))
    steps_per_epoch = math.ceil(len(table) / plan.group_size)
    if accelerator.is_main_process:
        check_disk_space(run_dir, model, cfg.keep_checkpoints, options.free_space_fn)

    check_processes(cfg, accelerator.num_processes)
    has_val = data.validation is not None and len(data.validation) > 0
    check_early_stopping(cfg, has_val, options.validate, options.validate_metrics)
    sharding = resolve_sharding(cfg, accelerator.num_processes, str(accelerator.distributed_type))
    model.train()
    if cfg.gradient_checkpointing:  # per decoder layer, before FSDP2 wraps the layers
        enable_activation_checkpointing(model)
    if sharding == "fsdp":  # FSDP2 before the optimizer: it must hold the sharded parameters
        model = shard_model(model, cfg, accelerator.device, accelerator.num_processes)
    unwrapped = model
    optimizer = make_optimizer(model, cfg)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    if sharding != "fsdp":
        model, optimizer = accelerator.prepare(model, optimizer)
    if plan.packing and not broadcast(accelerator, keeps_packed_examples_apart(unwrapped, plan.one_row)):
        plan = dataclasses.replace(plan, packing=False)  # on its device now (FlashAttention runs on CUDA only)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Run(cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=model, unwrapped=unwrapped,
               optimizer=optimizer, scheduler=scheduler, table=table,
               val_table=TokenTable.from_dataset(data.validation) if has_val else None, plan=plan,
               weights=weights, sample_labels=sample_labels, pad_id=pad_id, seq2seq=seq2seq,
               logits_at_labels=logits_at_labels, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               validate=options.validate, sharding=sharding, validate_metrics=options.validate_metrics)


def _class_balance(cfg: TrainConfig, class_ids: Sequence[int] | None, train_data: Any
                   ) -> tuple[np.ndarray | None, list[int] | None]:
    """(per-row loss weights, per-row labels for the balanced sampler) for cfg.class_balance.

    `class_ids` follow the examples given to tokenize_examples; the dataset's `index` column says which
    example each row is (tokenization may drop examples).
    """
    if cfg.class_balance == "none":
        return None, None
    if class_ids is None:
        raise TrainingError(f"train.class_balance={cfg.class_balance} needs the class of every training example "
                            "(class_ids); this data has none (not a classification template?)")
    columns = getattr(train_data, "column_names", None) or []
    index = list(train_data["index"]) if "index" in columns else list(range(len(train_data)))
    if index and len(class_ids) <= max(index):
        raise TrainingError(f"class_ids has {len(class_ids)} entries but the training data refers to example "
                            f"{max(index)}: pass one class id per example given to tokenize_examples")
    ids = [int(class_ids[i]) for i in index]
    if cfg.class_balance == "weighted":
        return example_weights(ids), None
    return None, ids


# --------------------------------------------------------------------------------------------------
# Inside the loop: validation, checkpoints
# --------------------------------------------------------------------------------------------------


def _validate(run: Run, state: TrainState, log: MetricsLog, stop: StopControl) -> bool:
    """Validation loss + task metrics, logged; best weights kept; early stopping decided.

    Returns False (nothing done) when there is neither a validation split nor a `validate` callable.
    Raises TrainingError when the early-stopping metric is not among the validation metrics.
    """
    if run.val_table is None and run.validate is None:
        return False
    record: dict[str, Any] = {"event": "eval", "step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4)}
    run.model.eval()
    try:
        with stop.abortable():  # a first Ctrl-C ends the validation (one process): it is redone on resume
            if run.val_table is not None:
                eval_plan = plan_eval(run.val_table.lengths, run.plan)[run.accelerator.process_index]
                loss, n = validation_loss(run, eval_plan)
                record.update(val_loss=loss, val_ppl=math.exp(min(loss, 700.0)), val_label_tokens=n)
            if run.validate is not None:  # fsdp: every process runs it (each forward needs them all)
                task = run.validate(run.unwrapped) if run.main or run.sharded else None
                record.update({k: float(v) for k, v in (broadcast(run.accelerator, task) or {}).items()})
    finally:
        run.model.train()
    log.write(record)
    track_best(run, state, record)
    return True


def _after_step(run: Run, state: TrainState, log: MetricsLog, stop: StopControl, epoch_plan: list) -> Path | None:
    """The validation and checkpoint due after a step (the new checkpoint, or None); on Ctrl-C a checkpoint
    of this step, then TrainingInterrupted (train/interrupt.py)."""
    last = state.step >= run.total_steps
    due = state.step % run.eval_every == 0 or last or state.pending_eval
    state.pending_eval = False
    interrupted, timed = stop.after_step()
    try:
        validated = not interrupted and due and _validate(run, state, log, stop)
    except KeyboardInterrupt:  # the first Ctrl-C, during validation: redone on resume
        validated, interrupted = False, True
    if interrupted:
        state.pending_eval = due and not validated
        path = save(run, state, epoch_plan)
        stop.saved(path, state.step)
        raise stop.interrupted(written_now=path is not None) from None
    path = None
    if timed or checkpoint_due(run, state, last, validated):
        path = save(run, state, epoch_plan)
        stop.saved(path, state.step)
    if validated and state.best_step == state.step:
        keep_best(run, state, path)  # after the checkpoint, whose weights it links
    return path


# --------------------------------------------------------------------------------------------------
# Teardown
# --------------------------------------------------------------------------------------------------


def _finish(run: Run, state: TrainState, log: MetricsLog, last_checkpoint: Path | None, train_seconds: float,
            restore_best: bool) -> TrainResult:
    """Restore the best weights when asked, write train_result.json on the main process, return the result."""
    best = best_dir(run.run_dir) if state.best_step is not None else None
    run.accelerator.wait_for_everyone()
    if best is not None and restore_best and best.is_dir() and state.best_step != state.step:
        reload_best(run, best)
        logger.info("restored the best weights (step %d, %s = %.4g)", state.best_step, state.best_metric,
                    state.best_value)
    higher = None if state.best_metric is None else not metric_lower_is_better(run, state.best_metric)
    result = TrainResult(
        run_dir=run.run_dir, steps=state.step, total_steps=run.total_steps,
        epochs=state.step / run.steps_per_epoch, tokens=state.tokens, stopped_early=state.stopped_early,
        best_path=best, best_metric=state.best_metric, best_value=state.best_value, best_step=state.best_step,
        last_checkpoint=last_checkpoint, history=log.history, train_seconds=train_seconds,
        model=consolidated_model(run.model, run.main) if run.sharded else None, greater_is_better=higher)
    if run.main:
        write_json(run.run_dir / "train_result.json",
                   {k: v for k, v in asdict(dataclasses.replace(result, model=None)).items() if k != "history"})
    return result
