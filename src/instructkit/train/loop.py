"""The training loop: one readable function over `accelerate`, top to bottom.

    result = train(model, tokenizer, train_data, val_data, cfg.train, run_dir,
                   settings=settings, is_seq2seq=False, validate=my_metrics, resume=False)

One process:         instructkit train CONFIG            (CPU: set train.threads; 1 is steadiest on 2 cores)
Two processes, CPU:  torchrun --nproc_per_node 2 -m instructkit train CONFIG      (gloo, DDP)
GPUs, FSDP / ZeRO-3: accelerate launch --config_file examples/accelerate/fsdp.yaml -m instructkit train ...

What one optimizer step does (default config: batch_size 8, grad_accum 1, one process, SmolLM2):
  1. The sampler hands this step G = batch_size x grad_accum x processes = 8 examples (data/batching.py).
     Causal models pack them into rows (no padding; position_ids restart per example); seq2seq pads.
  2. The window's label weight W (label tokens, or the sum of their class weights) is summed over all
     micro-batches and all processes BEFORE any backward pass.
  3. Each micro-batch's loss is sum(weight x cross-entropy over its label tokens) x world_size / W, so
     the gradients added over micro-batches and averaged by DDP over processes are exactly
     d/dw [sum over the window of weight x CE] / W. Hence (batch 8, accum 1) == (batch 2, accum 4) ==
     packed == 2 processes x batch 4, even when processes hold different numbers of label tokens.
  4. Logits are computed only at positions whose next token is a label (`logits_to_keep` with a boolean
     mask, or a 1-D column index on transformers releases without one): 3 label tokens in a 200-token prompt skip ~98% of the 49k-wide LM head.
  5. Clip, one .tolist() to read loss and grad norm (the only host sync), stop on NaN/Inf BEFORE the
     optimizer step, step, schedule.
Every `eval_every` steps (default: each epoch) and at the end: validation loss/perplexity and the
caller's `validate(model)` task metrics; the best weights are kept in checkpoints/best; early stopping is
opt-in. Checkpoints every `save_every` steps (default: at each validation) make resume exact.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from instructkit.config import EarlyStopping, TrainConfig
from instructkit.data.batching import (
    Batch,
    BatchPlan,
    TokenTable,
    attention_tokens_of,
    collate,
    example_weights,
    plan_digest,
    plan_epoch,
    plan_eval,
)
from instructkit.data.tokenize import TokenizeSettings
from instructkit.errors import TrainingError
from instructkit.io import read_jsonl, write_json, write_jsonl
from instructkit.train.checkpoint import (
    best_dir,
    capture_rng,
    checkpoints_dir,
    latest_good_checkpoint,
    load_best,
    load_checkpoint,
    save_best,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

Validate = Callable[[torch.nn.Module], dict[str, float]]


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

    @property
    def model_path(self) -> Path | None:
        """The weights to ship: the best, else the last checkpoint."""
        return self.best_path or self.last_checkpoint


@dataclass
class _State:
    """Everything the loop carries between steps; saved in checkpoints as `sampler` + `extra`."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False


# --------------------------------------------------------------------------------------------------
# Run directory: lock, disk space, metrics log
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # gone, or not a pid at all
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold `run_dir/.lock` (created with O_CREAT|O_EXCL, holding our pid) for the block.

    A lock whose pid is no longer alive (a killed run) is taken over with a warning; a live one makes
    this run stop with TrainingError naming the pid and the folder. Re-entrant: a lock this process
    already holds (`instructkit run` locks the whole run, then trains) is simply used.
    """
    path = run_dir / ".lock"
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip() or "0") == os.getpid():
            yield path
            return
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and _pid_alive(pid) and attempt == 0:
                raise TrainingError(
                    f"{run_dir} is in use by another training run (process {pid}, lock file {path}). "
                    "Wait for it to finish, use another run name, or delete the lock if that process is "
                    "not training.") from None
            logger.warning("taking over stale lock %s (process %s is not running)", path, pid or "?")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        break
    else:
        raise TrainingError(f"could not take the lock {path}")
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def required_disk_bytes(model: torch.nn.Module, keep: int) -> int:
    """Bytes the run will write, fp32.

    A checkpoint holds the trainable weights (4 bytes each) and AdamW's two moments (8 bytes): 12 bytes
    per trainable parameter. `keep` are kept and one more exists while the newest is written: (keep + 1)
    checkpoints. Plus checkpoints/best (4 bytes per trainable parameter) and the final model (4 bytes per
    parameter). SmolLM2-135M, full fine-tuning, keep 2: 3 x 1.62 GB + 0.54 + 0.54 = 5.9 GB.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (keep + 1) * 12 * trainable + 4 * trainable + 4 * total


def check_disk_space(run_dir: Path, model: torch.nn.Module, keep: int,
                     free_space_fn: Callable[[Path], int] | None = None) -> None:
    free = (free_space_fn or (lambda p: shutil.disk_usage(p).free))(run_dir)
    needed = required_disk_bytes(model, keep)
    if free < needed:
        raise TrainingError(
            f"not enough disk space in {run_dir}: training needs about {needed / 1e9:.2f} GB "
            f"({keep} checkpoints + best + final model) but {free / 1e9:.2f} GB are free. Free some space, "
            "lower train.keep_checkpoints (>= 2) or use LoRA (train.lora.enabled=true).")


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


# --------------------------------------------------------------------------------------------------
# Optimiser, schedule, seeds
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors).

    fused=True (one kernel for all parameters; supported on CPU since torch 2.4) when the device allows.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise TrainingError("the model has no trainable parameters (all frozen?)")
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, ValueError) as exc:
        logger.info("fused AdamW unavailable here (%s); using the default implementation", exc)
        return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Warmup rises (step + 1) / (warmup + 1), so step 0 already learns; then linear decays to 0 at `total`,
    cosine follows half a cosine, constant stays 1. total 100, warmup 5: steps 0..4 -> 1/6 .. 5/6,
    step 5 -> 1.0, step 99 (linear) -> 1 - 94/95 = 0.011.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup, cfg.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (non-reentrant: works with frozen inputs and LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def make_accelerator(cfg: TrainConfig) -> Any:
    """An Accelerator for cfg.precision; devices and processes come from the launcher (torchrun/accelerate)."""
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision])
    except ValueError as exc:  # accelerate keeps one state per process
        raise TrainingError(f"train.precision={cfg.precision}: {exc} (or pass your own accelerator=)") from None


# --------------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in one process)
# --------------------------------------------------------------------------------------------------


def _distributed(accelerator: Any) -> bool:
    return accelerator.num_processes > 1 and torch.distributed.is_initialized()


def all_reduce_sum(accelerator: Any, values: Sequence[float]) -> list[float]:
    """Sum Python numbers over processes (float64); returns them unchanged in one process."""
    if not _distributed(accelerator):
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _broadcast(accelerator: Any, obj: Any) -> Any:
    if not _distributed(accelerator):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather_rng(accelerator: Any) -> list[dict[str, Any]]:
    mine = capture_rng()
    if not _distributed(accelerator):
        return [mine]
    out: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, mine)
    return out


def _sharded(accelerator: Any) -> bool:
    """FSDP / DeepSpeed: parameters are split over processes (no exact checkpoints here)."""
    kind = str(getattr(accelerator, "distributed_type", ""))
    return "FSDP" in kind or "DEEPSPEED" in kind


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    """True when the (base) model's forward takes `logits_to_keep` (Llama, Gemma3, ... in transformers 5)."""
    import inspect

    base = model
    while True:
        inner = getattr(base, "module", None) or (base.get_base_model() if hasattr(base, "get_base_model") else None)
        if inner is None or inner is base:
            break
        base = inner
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@functools.cache
def boolean_logits_to_keep() -> bool:
    """True when transformers takes a [B, T] boolean `logits_to_keep` (its `slice_logits_to_keep` helper,
    transformers >= 5.2x); older 5.x releases index `hidden_states[:, logits_to_keep]` and need a 1-D index."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def batch_loss(model: torch.nn.Module, batch: Batch, *, seq2seq: bool, logits_at_labels: bool) -> torch.Tensor:
    """Sum over the batch's target tokens of weight x cross-entropy: a scalar, NOT yet normalised.

    Causal with `logits_at_labels`: the model returns logits only where `target_mask` is True ([N, V]).
    Otherwise the full [B, T, V] logits are computed and the same positions picked. Seq2seq: the model
    builds decoder inputs from `labels`; every label position is a target.
    """
    if seq2seq or not logits_at_labels:
        logits = model(**batch.inputs, use_cache=False).logits[batch.target_mask]
    elif boolean_logits_to_keep() and batch.target_mask.shape[0] > 1:
        logits = model(**batch.inputs, use_cache=False, logits_to_keep=batch.target_mask).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        # The columns labelled in any row, as a 1-D index (every transformers 5 release takes it); on a
        # packed one-row batch these are exactly the labelled positions.
        columns = batch.target_mask.any(dim=0).nonzero().squeeze(1)
        logits = model(**batch.inputs, use_cache=False, logits_to_keep=columns).logits
        logits = logits[batch.target_mask[:, columns]]
    if batch.target_weights is None:
        loss = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
    else:
        loss = (F.cross_entropy(logits.float(), batch.targets, reduction="none") * batch.target_weights).sum()
    return loss * 0.0 if batch.dummy else loss


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    batch.inputs = {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()}
    batch.target_mask = batch.target_mask.to(device, non_blocking=True)
    batch.targets = batch.targets.to(device, non_blocking=True)
    if batch.target_weights is not None:
        batch.target_weights = batch.target_weights.to(device, non_blocking=True)
    return batch


@dataclass
class StepStats:
    loss: float  # sum(weight x CE) / sum(weight) over the window, all processes
    grad_norm: float
    tokens: int  # non-padding input tokens, all processes
    label_tokens: int
    lr: float


def train_step(model: torch.nn.Module, batches: Sequence[Batch], optimizer: Any, scheduler: Any, accelerator: Any,
               *, seq2seq: bool, logits_at_labels: bool, max_grad_norm: float | None, step: int) -> StepStats:
    """One optimizer step over this process's micro-batches (see the module docstring, steps 2-5)."""
    weight, tokens, labels = all_reduce_sum(accelerator, [
        sum(b.weight_sum for b in batches), sum(b.n_tokens for b in batches), sum(b.n_targets for b in batches)])
    if weight <= 0:
        raise TrainingError(f"step {step}: no label tokens in the whole step (completions empty?)")
    # DDP averages gradients over processes, so each process scales by world_size / W: the average of
    # world_size x (its share of the sum) / W is the sum over all processes / W.
    scale = accelerator.num_processes / weight
    window_loss = torch.zeros((), device=accelerator.device)
    deepspeed = "DEEPSPEED" in str(accelerator.distributed_type)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        if deepspeed:  # DeepSpeed steps its engine inside backward at the boundary (untested: not installed here)
            accelerator.gradient_state._set_sync_gradients(last)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                part = batch_loss(model, batch, seq2seq=seq2seq, logits_at_labels=logits_at_labels)
            accelerator.backward(part * scale)
        window_loss += part.detach().float()
    # The norm is needed even without clipping: a finite loss can still give Inf/NaN gradients.
    # (max_norm=inf scales by exactly 1.0.)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    readings = torch.stack([window_loss, torch.as_tensor(grad_norm).float().to(window_loss.device)])
    if _distributed(accelerator):
        torch.distributed.all_reduce(readings)
    loss_sum, norm_sum = readings.tolist()  # the step's one host sync
    loss = loss_sum / weight
    norm = norm_sum / accelerator.num_processes  # the same on every process after DDP's all-reduce
    lr = scheduler.get_last_lr()[0]
    # fp16: the grad scaler skips Inf steps by design; everywhere else Inf/NaN means divergence.
    if not math.isfinite(loss) or (not math.isfinite(norm) and accelerator.mixed_precision != "fp16"):
        raise TrainingError(
            f"training diverged at step {step}: loss {loss}, gradient norm {norm} (lr {lr:.3g}). The step was "
            "not applied and no checkpoint was written after it. Lower train.lr, keep train.max_grad_norm on, "
            "or use precision fp32.")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss, norm, int(tokens), int(labels), lr)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, table: TokenTable, micro_batches: Sequence[Sequence], pad_id: int,
                    accelerator: Any, *, seq2seq: bool, packed: bool, logits_at_labels: bool) -> tuple[float, int]:
    """Token-weighted mean cross-entropy of the label tokens over all processes, and their count.

    Only the logits at labels are computed (or kept, one micro-batch at a time): no full-vocabulary
    logits for the whole split.
    """
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    for mb in micro_batches:
        batch = _to_device(collate(table, list(mb), pad_id, seq2seq=seq2seq, packed=packed), accelerator.device)
        with accelerator.autocast():
            total += batch_loss(model, batch, seq2seq=seq2seq, logits_at_labels=logits_at_labels).double()
        count += batch.n_targets
    loss_sum, n = all_reduce_sum(accelerator, [total.item(), count])
    return (loss_sum / n if n else float("nan")), int(n)


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


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train(
    model: torch.nn.Module,
    tokenizer: Any,
    train_data: Any,
    val_data: Any,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    settings: TokenizeSettings,
    is_seq2seq: bool,
    validate: Validate | None = None,
    resume: bool = False,
    accelerator: Any = None,
    class_ids: Sequence[int] | None = None,
    show_progress: bool = True,
    free_space_fn: Callable[[Path], int] | None = None,
    restore_best: bool = True,
    log_every: int = 1,
) -> TrainResult:
    """Fine-tune `model` on `train_data` (from `tokenize_examples`: input_ids, labels, prompt_length, index).

    `class_ids[i]` is the class of the i-th example given to tokenize_examples (negative: none; see
    data/batching.class_ids_from_examples), needed when cfg.class_balance is "weighted" (loss weights,
    data/batching.class_weights) or "sampled" (balanced_sampler).
    `validate(model)` returns task metrics (e.g. {"macro_f1": 0.5}); it runs on the main process with
    the unwrapped model. `resume=True` continues from the newest verified checkpoint in run_dir (starts
    fresh, with a warning, when there is none). `free_space_fn(path) -> bytes` replaces the disk reading.
    With `restore_best` the model ends with the best validation weights.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or make_accelerator(cfg)
    lock = run_lock(run_dir) if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        return _train(model, tokenizer, train_data, val_data, cfg, run_dir, settings=settings,
                      seq2seq=is_seq2seq, validate=validate, resume=resume, accelerator=accelerator,
                      class_ids=class_ids, show_progress=show_progress, free_space_fn=free_space_fn,
                      restore_best=restore_best, log_every=log_every)


def _train(model, tokenizer, train_data, val_data, cfg: TrainConfig, run_dir: Path, *, settings, seq2seq,
           validate, resume, accelerator, class_ids, show_progress, free_space_fn, restore_best,
           log_every) -> TrainResult:
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    sharded = _sharded(accelerator)
    seed_everything(cfg.seed)

    # ---- Data: flat token arrays, class balance, the batch plan ---------------------------------
    table = TokenTable.from_dataset(train_data)
    if len(table) == 0:
        raise TrainingError("no training examples (the train split is empty after tokenization)")
    val_table = TokenTable.from_dataset(val_data) if val_data is not None and len(val_data) else None
    weights, sample_labels = _class_balance(cfg, class_ids, train_data)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed = cfg.packing and not seq2seq
    logits_at_labels = cfg.logits_at_labels and not seq2seq and supports_logits_to_keep(model)
    if cfg.logits_at_labels and not seq2seq and not logits_at_labels:
        logger.warning("this model's forward has no logits_to_keep: computing full logits")
    plan = BatchPlan(
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, world_size=world, packing=packed,
        max_tokens=cfg.max_tokens_per_batch or cfg.batch_size * settings.max_length,
        attention_tokens=attention_tokens_of(getattr(model, "config", None)),
        group_by_length=cfg.group_by_length, seed=cfg.seed)
    # Steps per epoch: ceil(examples / G), e.g. 697 examples / 8 = 88 steps; 3 epochs = 264 steps.
    steps_per_epoch = math.ceil(len(table) / plan.group_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every or steps_per_epoch
    save_every = cfg.save_every or eval_every
    if main:
        check_disk_space(run_dir, model, cfg.keep_checkpoints, free_space_fn)

    # ---- Model, optimiser, schedule ---------------------------------------------------------------
    model.train()
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    unwrapped = model
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_optimizer = getattr(optimizer, "optimizer", optimizer)
    if sharded:
        unwrapped = model  # parameters live in the wrapper; no exact checkpoints (see _save)
        logger.warning("FSDP/DeepSpeed: periodic checkpoints, best-model selection and task validation are "
                       "off (exact resume needs unsharded state); the final weights come from the wrapper")

    # ---- Resume -----------------------------------------------------------------------------------
    state = _State()
    last_checkpoint: Path | None = None
    if resume:
        if sharded:
            raise TrainingError("--resume is not supported with FSDP/DeepSpeed in instructkit yet; "
                                "restart the run without --resume or train with DDP")
        found = _broadcast(accelerator, str(latest_good_checkpoint(run_dir) or "") if main else None)
        if not found:
            logger.warning("resume: no complete checkpoint in %s; starting from the beginning", run_dir)
        else:
            last_checkpoint = Path(found)
            saved = load_checkpoint(last_checkpoint, unwrapped, raw_optimizer, scheduler, rank=rank)
            state = _State(**saved["extra"]["state"])
            _check_position(saved["sampler"], plan, table, total_steps, sample_labels, last_checkpoint)
            logger.info("resumed from %s (step %d of %d)", last_checkpoint, state.step, total_steps)
    if last_checkpoint is None and main and checkpoints_dir(run_dir).exists():
        # A fresh start owns the folder: an earlier run's step-N would otherwise outrank the new ones.
        logger.warning("starting fresh: removing the earlier run's checkpoints in %s", checkpoints_dir(run_dir))
        shutil.rmtree(checkpoints_dir(run_dir))
    accelerator.wait_for_everyone()
    log = MetricsLog(run_dir, cfg.tensorboard, main, state.step if last_checkpoint else None)
    eval_plan = plan_eval(val_table.lengths, plan)[rank] if val_table is not None else []

    # ---- Steps ------------------------------------------------------------------------------------
    progress = Progress(total_steps, state.step, show_progress and main)
    train_seconds = 0.0
    window_tokens, window_seconds = 0, 0.0  # tok/s over training steps only (no validation, no saving)
    try:
        while state.step < total_steps and not state.stopped_early:
            epoch_plan = plan_epoch(table.lengths, plan, state.epoch, sample_labels)
            for step_plan in epoch_plan[state.step_in_epoch:]:
                started = time.perf_counter()
                batches = [_to_device(collate(table, mb, pad_id, seq2seq=seq2seq, packed=packed, weights=weights),
                                      accelerator.device) for mb in step_plan[rank]]
                stats = train_step(model, batches, optimizer, scheduler, accelerator, seq2seq=seq2seq,
                                   logits_at_labels=logits_at_labels, max_grad_norm=cfg.max_grad_norm,
                                   step=state.step + 1)
                elapsed = time.perf_counter() - started
                train_seconds += elapsed
                window_seconds += elapsed
                state.step += 1
                state.step_in_epoch += 1
                state.tokens += stats.tokens
                window_tokens += stats.tokens
                if state.step_in_epoch == len(epoch_plan):
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                last = state.step >= total_steps

                if state.step % log_every == 0 or last:
                    rate = window_tokens / max(window_seconds, 1e-9)
                    log.write({"event": "train", "step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                               "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                               "tokens": state.tokens, "label_tokens": stats.label_tokens,
                               "tokens_per_s": round(rate, 2)})
                    progress.update(state.step, stats.loss, rate)
                    window_tokens, window_seconds = 0, 0.0

                evaluated = False
                if (state.step % eval_every == 0 or last) and (val_table is not None or validate is not None):
                    _validate_and_track(model, unwrapped, val_table, eval_plan, pad_id, accelerator, validate, cfg,
                                        state, log, run_dir, seq2seq=seq2seq, packed=packed,
                                        logits_at_labels=logits_at_labels, sharded=sharded,
                                        steps_per_epoch=steps_per_epoch)
                    evaluated = True
                if not sharded and (state.step % save_every == 0 or last or state.stopped_early
                                    or (evaluated and cfg.save_every is None)):
                    last_checkpoint = _save(run_dir, unwrapped, raw_optimizer, scheduler, accelerator, state, plan,
                                            epoch_plan, total_steps, len(table), cfg.keep_checkpoints)
                if last or state.stopped_early:
                    break
    finally:
        progress.close()
        log.close()

    best = best_dir(run_dir) if state.best_step is not None and not sharded else None
    accelerator.wait_for_everyone()
    if best is not None and restore_best and best.is_dir() and state.best_step != state.step:
        load_best(best, unwrapped)
        logger.info("restored the best weights (step %d, %s = %.4g)", state.best_step, state.best_metric,
                    state.best_value)
    result = TrainResult(
        run_dir=run_dir, steps=state.step, total_steps=total_steps, epochs=state.step / steps_per_epoch,
        tokens=state.tokens, stopped_early=state.stopped_early, best_path=best,
        best_metric=state.best_metric, best_value=state.best_value, best_step=state.best_step,
        last_checkpoint=last_checkpoint, history=log.history, train_seconds=train_seconds)
    if main:
        write_json(run_dir / "train_result.json", {k: v for k, v in asdict(result).items() if k != "history"})
    return result


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


def _position(state: _State, plan: BatchPlan, epoch_plan: list, total_steps: int, n: int) -> dict[str, Any]:
    """The data position a resumed run restarts from (plus what must not have changed)."""
    return {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "seed": plan.seed,
            "group_size": plan.group_size, "world_size": plan.world_size, "packing": plan.packing,
            "examples": n, "total_steps": total_steps,
            "plan_digest": plan_digest(epoch_plan) if state.step_in_epoch else None}


def _check_position(saved: dict[str, Any], plan: BatchPlan, table: TokenTable, total_steps: int,
                    sample_labels: list[int] | None, path: Path) -> None:
    now = {"seed": plan.seed, "group_size": plan.group_size, "world_size": plan.world_size,
           "packing": plan.packing, "examples": len(table)}
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        raise TrainingError(f"cannot resume exactly from {path}: "
                            + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in changed.items())
                            + ". Resume with the same data and batch settings, or start a new run.")
    if saved.get("plan_digest"):
        digest = plan_digest(plan_epoch(table.lengths, plan, saved["epoch"], sample_labels))
        if digest != saved["plan_digest"]:
            raise TrainingError(f"cannot resume exactly from {path}: the epoch's batches differ (the training data "
                                "or its tokenization changed)")
    if saved.get("total_steps") != total_steps:
        logger.warning("resume: the run now has %s steps instead of %s; the learning-rate schedule changes",
                       total_steps, saved.get("total_steps"))


def _save(run_dir: Path, model, optimizer, scheduler, accelerator, state: _State, plan: BatchPlan,
          epoch_plan: list, total_steps: int, n_examples: int, keep: int) -> Path:
    """Checkpoint on the main process (every process's RNG state included); others wait."""
    rng = _gather_rng(accelerator)
    path = None
    if accelerator.is_main_process:
        path = save_checkpoint(run_dir, state.step, model, optimizer, scheduler,
                               _position(state, plan, epoch_plan, total_steps, n_examples),
                               rng, {"state": asdict(state)}, keep=keep)
    accelerator.wait_for_everyone()
    return path or (run_dir / "checkpoints" / f"step-{state.step:06d}")


def _validate_and_track(model, unwrapped, val_table, eval_plan, pad_id, accelerator, validate, cfg: TrainConfig,
                        state: _State, log: MetricsLog, run_dir: Path, *, seq2seq, packed, logits_at_labels, sharded,
                        steps_per_epoch) -> None:
    """Validation loss + task metrics, logged; best weights kept; early stopping decided."""
    record: dict[str, Any] = {"event": "eval", "step": state.step, "epoch": round(state.step / steps_per_epoch, 4)}
    model.eval()
    try:
        if val_table is not None:
            loss, n = validation_loss(model, val_table, eval_plan, pad_id, accelerator, seq2seq=seq2seq,
                                      packed=packed, logits_at_labels=logits_at_labels)
            record.update(val_loss=loss, val_ppl=math.exp(min(loss, 700.0)), val_label_tokens=n)
        if validate is not None and not sharded:
            task = validate(unwrapped) if accelerator.is_main_process else None
            record.update({k: float(v) for k, v in (_broadcast(accelerator, task) or {}).items()})
    finally:
        model.train()
    log.write(record)

    metric = state.best_metric or choose_metric(cfg.early_stopping, record)
    if metric is None or sharded:
        return
    if metric not in record:
        raise TrainingError(f"early-stopping metric {metric!r} is not among the validation metrics "
                            f"{sorted(k for k in record if k not in ('event', 'step', 'epoch'))}")
    state.best_metric = metric
    value = float(record[metric])
    delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
    if state.best_value is None:
        improved = math.isfinite(value)
    elif lower_is_better(metric):
        improved = value < state.best_value - delta
    else:
        improved = value > state.best_value + delta
    if improved:
        state.best_value, state.best_step, state.bad_evals = value, state.step, 0
        if accelerator.is_main_process:
            save_best(run_dir, unwrapped, {"step": state.step, "metric": metric, "value": value})
        accelerator.wait_for_everyone()
    else:
        state.bad_evals += 1
        if cfg.early_stopping is not None and state.bad_evals >= cfg.early_stopping.patience:
            logger.info("early stopping at step %d: %s has not improved for %d validations (best %.4g at step %d)",
                        state.step, metric, state.bad_evals, state.best_value, state.best_step)
            state.stopped_early = True
