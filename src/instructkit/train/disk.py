"""Free disk space, checked before the first step: a run that cannot write its checkpoints stops at once."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from instructkit.errors import TrainingError


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
    """Raise TrainingError before training when `run_dir`'s file system has less free space than
    `required_disk_bytes`; `free_space_fn(path) -> bytes` replaces the reading (tests)."""
    free = (free_space_fn or (lambda p: shutil.disk_usage(p).free))(run_dir)
    needed = required_disk_bytes(model, keep)
    if free < needed:
        raise TrainingError(
            f"not enough disk space in {run_dir}: training needs about {needed / 1e9:.2f} GB "
            f"({keep} checkpoints + best + final model) but {free / 1e9:.2f} GB are free. Free some space, "
            "lower train.keep_checkpoints (>= 2) or use LoRA (train.lora.enabled=true).")
