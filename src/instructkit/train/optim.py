"""The optimizer and the learning-rate schedule.

AdamW (fused on CPU and CUDA where torch allows) without weight decay on 1-D tensors (biases, norms), and
the schedule as a multiplier of the peak lr per optimizer step: warm-up, then linear, cosine or constant.
"""

from __future__ import annotations

import logging
import math

import torch

from instructkit.config import TrainConfig
from instructkit.errors import TrainingError

logger = logging.getLogger(__name__)


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
