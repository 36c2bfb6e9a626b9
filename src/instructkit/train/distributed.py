"""The execution engine: `accelerate` for devices, processes and mixed precision, and the few collectives
the loop needs (sums, a broadcast, RNG states). Each is a no-op in one process.

Launch: `torchrun --nproc_per_node 2 -m instructkit train CONFIG` (CPU: gloo; CUDA: NCCL) or `accelerate
launch`; `train.sharding` picks DDP or FSDP2 (train/sharding.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from instructkit.config import TrainConfig
from instructkit.data.batching import Batch
from instructkit.errors import TrainingError
from instructkit.train.checkpoint import capture_rng

logger = logging.getLogger(__name__)


def make_accelerator(cfg: TrainConfig) -> Any:
    """An Accelerator for cfg.precision; devices and processes come from the launcher (torchrun/accelerate).
    Under train.sharding=fsdp FSDP2's MixedPrecisionPolicy does the casting, so accelerate's is off.

    Raises TrainingError when accelerate refuses the precision (e.g. a second, different mixed-precision
    state in one process).
    """
    from accelerate import Accelerator

    from instructkit.ranks import cpu_only, start

    start()  # the process group (several processes), with the long wait for rank 0's evaluations
    precision = "fp32" if cfg.sharding == "fsdp" else cfg.precision
    try:
        accelerator = Accelerator(cpu=cpu_only(), mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision])
    except ValueError as exc:  # accelerate keeps one state per process
        raise TrainingError(f"train.precision={cfg.precision}: {exc} (or pass your own accelerator=)") from None
    if precision == "fp16" and accelerator.scaler is None:
        logger.warning("train.precision=fp16 on %s: accelerate runs it without autocast or loss scaling, so this run "
                       "trains in fp32 (bf16 is the mixed precision CPUs have)", accelerator.device.type)
    return accelerator


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (non-reentrant: works with frozen inputs and LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def grad_scaler_state(accelerator: Any) -> dict[str, Any] | None:
    """fp16's loss scale (GradScaler: scale, growth tracker, factors) as JSON, or None without a scaler. A
    checkpoint keeps it: a resumed run restarting at the initial 65,536 overflows and skips steps that the
    uninterrupted run applied."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return {k: float(v) if k in ("scale", "growth_factor", "backoff_factor") else int(v)
            for k, v in scaler.state_dict().items()}


def restore_grad_scaler(accelerator: Any, state: dict[str, Any] | None, source: str) -> None:
    """Put a checkpoint's `grad_scaler_state` back (a warning when it has none for this fp16 run)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    if state is None:
        logger.warning("resume: %s has no fp16 loss scale (written by another precision or an older version); "
                       "the scale starts again at %s", source, scaler.get_scale())
        return
    scaler.load_state_dict(state)


def distributed(accelerator: Any) -> bool:
    return accelerator.num_processes > 1 and torch.distributed.is_initialized()


def all_reduce_sum(accelerator: Any, values: Sequence[float]) -> list[float]:
    """Sum Python numbers over processes (float64); returns them unchanged in one process."""
    if not distributed(accelerator):
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def broadcast(accelerator: Any, obj: Any) -> Any:
    if not distributed(accelerator):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_rng(accelerator: Any) -> list[dict[str, Any]]:
    mine = capture_rng()
    if not distributed(accelerator):
        return [mine]
    out: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, mine)
    return out


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move a collated batch to `device` (in place; a no-op on CPU, where batches are built)."""
    if device.type == "cpu":
        return batch
    batch.inputs = {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()}
    batch.target_mask = batch.target_mask.to(device, non_blocking=True)
    batch.targets = batch.targets.to(device, non_blocking=True)
    if batch.target_weights is not None:
        batch.target_weights = batch.target_weights.to(device, non_blocking=True)
    return batch
