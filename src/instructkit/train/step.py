"""One optimizer step over a window of micro-batches, with the loss normalised over the whole window.

  1. The window's label weight W (label tokens, or the sum of their class weights) is summed over all
     micro-batches and all processes BEFORE any backward pass.
  2. Each micro-batch's loss is sum(weight x cross-entropy over its label tokens) x world_size / W, so
     the gradients added over micro-batches and averaged by DDP over processes are exactly
     d/dw [sum over the window of weight x CE] / W. Hence (batch 8, accum 1) == (batch 2, accum 4) ==
     packed == 2 processes x batch 4, even when processes hold different numbers of label tokens.
  3. Clip, one .tolist() to read loss and grad norm (the only host sync), stop on NaN/Inf BEFORE the
     optimizer step, step, schedule (fp16: not after a step the grad scaler skipped for overflow).

With train.optimizer_in_backward (train/in_backward.py) the last micro-batch's backward applies the
update parameter by parameter: the loss is read (one more host sync) and checked BEFORE that backward,
so a NaN/Inf loss still stops with nothing applied. With max_grad_norm the window first runs once more,
measuring (in_backward.py: LOMO's exact clipping): a non-finite gradient norm then stops the step before
anything is applied; without clipping it can only be seen afterwards, when the update is already applied
(the error says so; the last checkpoint predates it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from instructkit.data.batching import Batch
from instructkit.data.buckets import record_shape
from instructkit.errors import TrainingError
from instructkit.train.allocator import release_free_memory
from instructkit.train.distributed import all_reduce_sum, distributed
from instructkit.train.loss import batch_loss
from instructkit.train.sharding import gradient_sync, plain_norm
from instructkit.train.state import Run


@dataclass
class StepStats:
    loss: float  # sum(weight x CE) / sum(weight) over the window, all processes
    grad_norm: float
    tokens: int  # non-padding input tokens, all processes
    label_tokens: int
    lr: float
    shape: list | None = None  # this process's input_ids [rows, width] (a list of them: several micro-batches)
    unweighted_loss: float | None = None  # with class weights: sum(CE) / label tokens, as validation measures it


def train_step(run: Run, batches: Sequence[Batch], step: int) -> StepStats:
    """One optimizer step over this process's micro-batches of one window (see the module docstring).

    `step` (1-based) only names the step in errors. Raises TrainingError when the window has no label
    token, or when the loss or the gradient norm is not finite (the step is then not applied).
    """
    model, optimizer, scheduler, accelerator = run.model, run.optimizer, run.scheduler, run.accelerator
    release = run.cfg.release_free_memory and accelerator.device.type == "cpu"
    max_grad_norm = run.cfg.max_grad_norm
    weight, tokens, labels = all_reduce_sum(accelerator, [
        sum(b.weight_sum for b in batches), sum(b.n_tokens for b in batches), sum(b.n_targets for b in batches)])
    if weight <= 0:
        raise TrainingError(f"step {step}: no label tokens in the whole step (completions empty?)")
    # DDP and FSDP2 average gradients over processes, so each process scales by world_size / W: the
    # average of world_size x (its share of the sum) / W is the sum over all processes / W.
    scale = accelerator.num_processes / weight
    window_loss = torch.zeros((), device=accelerator.device)
    weighted = run.weights is not None  # class-weighted loss: the same on every process
    plain: list[torch.Tensor] | None = [] if weighted else None
    in_backward = getattr(optimizer, "optimizer", optimizer) if run.cfg.optimizer_in_backward else None
    clip_coef = clip_total = None
    if in_backward is not None and max_grad_norm is not None:
        clip_total, clip_coef = _measure_clip_coef(run, batches, scale, step)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with _sync(run, last):
            part = _forward(run, batch, release, plain)
            if in_backward is not None and last:
                _check_loss_before_update(window_loss + part.detach().float(), weight, step)
                with in_backward.armed(clip_coef):
                    accelerator.backward(part * scale)
            else:
                accelerator.backward(part * scale)
        window_loss += part.detach().float()
    if in_backward is not None:  # clipped: the measured total, clip_grad_norm_'s to the bit
        grad_norm = clip_total if clip_total is not None else in_backward.grad_norm()
    else:
        # The norm is needed even without clipping: a finite loss can still give Inf/NaN gradients.
        # (max_norm=inf scales by exactly 1.0.)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    plain_sum = torch.stack(plain).sum() if plain else torch.zeros((), device=window_loss.device)
    readings = torch.stack([window_loss, plain_norm(grad_norm).float().to(window_loss.device),
                            plain_sum.float().to(window_loss.device)])
    if distributed(accelerator):
        torch.distributed.all_reduce(readings)
    loss_sum, norm_sum, unweighted_sum = readings.tolist()  # the step's one host sync
    loss = loss_sum / weight
    norm = norm_sum / accelerator.num_processes  # the same on every process after DDP's / FSDP2's reduction
    lr = scheduler.get_last_lr()[0]
    # fp16 with a grad scaler: it skips Inf steps by design; everywhere else Inf/NaN means divergence (accelerate
    # gives CPU fp16 no scaler: nothing would skip the step, and the Inf would reach the weights).
    scaled = getattr(accelerator, "scaler", None) is not None
    if not math.isfinite(loss) or (not math.isfinite(norm) and not scaled):
        applied = ("It was already applied (train.optimizer_in_backward), but no checkpoint was written after "
                   "it: resume from the last one. Lower train.lr, or turn train.optimizer_in_backward off and keep "
                   "train.max_grad_norm on." if in_backward is not None else "The step was not applied and no "
                   "checkpoint was written after it. Lower train.lr, keep train.max_grad_norm on, or use precision "
                   "fp32.")
        raise TrainingError(f"training diverged at step {step}: loss {loss}, gradient norm {norm} (lr {lr:.3g}). "
                            f"{applied}")
    optimizer.step()
    if math.isfinite(norm):  # fp16: a step the grad scaler skipped for overflow does not advance the schedule
        scheduler.step()  # (transformers#11106). Not step_was_skipped: fused AdamW skips inside its own step
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss, norm, int(tokens), int(labels), lr,
                     record_shape([list(b.inputs["input_ids"].shape) for b in batches]),
                     unweighted_sum / labels if weighted else None)


def _forward(run: Run, batch: Batch, release: bool, unweighted: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The micro-batch's summed loss (train/loss.batch_loss) under the accelerator's autocast; `unweighted`
    as batch_loss's."""
    with run.accelerator.autocast():
        part = batch_loss(run.model, batch, seq2seq=run.seq2seq, logits_at_labels=run.logits_at_labels,
                          chunk_tokens=run.cfg.loss_chunk_tokens, unweighted=unweighted)
    if release:  # freed memory of earlier steps and of this forward back to the system before the
        release_free_memory()  # backward, where the peak comes (train/allocator.py)
    return part


def _measure_clip_coef(run: Run, batches: Sequence[Batch], scale: float,
                       step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In-backward clipping's first pass (train/in_backward.py): the window's forward and backward on a
    forked RNG, every complete gradient's norm recorded and the gradient freed, nothing updated; (the
    total gradient norm, the clip coefficient), 0-d tensors. Raises TrainingError when the gradient norm
    is not finite (nothing was applied)."""
    in_backward = getattr(run.optimizer, "optimizer", run.optimizer)
    device = run.accelerator.device
    release = run.cfg.release_free_memory and device.type == "cpu"
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        for i, batch in enumerate(batches):
            part = _forward(run, batch, release)
            with in_backward.measuring() if i == len(batches) - 1 else contextlib.nullcontext():
                run.accelerator.backward(part * scale)
    in_backward.zero_grad(set_to_none=True)  # nothing of the first pass may reach the second
    norm, coef = in_backward.clip_coef(run.model.parameters(), run.cfg.max_grad_norm)
    if not math.isfinite(norm.item()):
        raise TrainingError(f"training diverged at step {step}: gradient norm {norm.item()}. The step was not "
                            "applied and no checkpoint was written after it. Lower train.lr or use precision fp32.")
    return norm, coef


def _sync(run: Run, last: bool) -> contextlib.AbstractContextManager:
    """Gradients are reduced over processes on the window's last micro-batch only (DDP: no_sync before)."""
    if run.sharded:
        return gradient_sync(run.model, last)
    return contextlib.nullcontext() if last else run.accelerator.no_sync(run.model)


def _check_loss_before_update(window_loss: torch.Tensor, weight: float, step: int) -> None:
    """In-backward: stop on a NaN/Inf loss before the backward pass that applies the update."""
    loss = window_loss.item() / weight
    if not math.isfinite(loss):
        raise TrainingError(f"training diverged at step {step}: loss {loss}. The step was not applied and no "
                            "checkpoint was written after it. Lower train.lr or use precision fp32.")
