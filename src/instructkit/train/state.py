"""The records the training loop shares: `TrainState` (what changes between steps, saved in checkpoints)
and `Run` (what `loop.setup` built and every helper only reads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instructkit.config import TrainConfig
from instructkit.data.batching import TokenTable, collate
from instructkit.data.sampler import BatchPlan, plan_epoch
from instructkit.train.distributed import to_device

Validate = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class TrainState:
    """Everything the loop changes between steps; saved in checkpoints (`extra.state`)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    pending_eval: bool = False  # Ctrl-C cut this step's validation short: the resumed run does it first


@dataclass(frozen=True)
class Run:
    """What `setup` built and the loop only reads."""

    cfg: TrainConfig
    run_dir: Path
    accelerator: Any
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes), or FSDP2-sharded
    unwrapped: torch.nn.Module  # the module whose weights are checkpointed and validated
    optimizer: Any  # as prepared by accelerate; `.optimizer` is the torch optimizer when wrapped
    scheduler: Any
    table: TokenTable
    val_table: TokenTable | None
    plan: BatchPlan
    weights: np.ndarray | None  # per-row loss weights (class_balance "weighted")
    sample_labels: list[int] | None  # per-row classes (class_balance "sampled")
    pad_id: int
    seq2seq: bool
    logits_at_labels: bool
    steps_per_epoch: int
    total_steps: int
    validate: Validate | None
    sharding: str = "none"  # train.sharding as resolved: none, ddp or fsdp (train/sharding.py)
    validate_metrics: Mapping[str, bool] | None = None  # the keys `validate` returns, True where higher is better

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        """FSDP2: parameters are DTensor shards; checkpoints are DCP shards (train/dcp_checkpoint.py)."""
        return self.sharding == "fsdp"

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every or self.steps_per_epoch

    def epoch_plan(self, epoch: int) -> list:
        """The planned steps of `epoch` (data/sampler.plan_epoch): per step, per process, micro-batches."""
        return plan_epoch(self.table.lengths, self.plan, epoch, self.sample_labels)

    def batches(self, micro_batches: Sequence[Sequence[Any]]) -> list:
        """Collate this process's micro-batches (rows of example indices) and move them to its device."""
        return [to_device(collate(self.table, mb, self.pad_id, seq2seq=self.seq2seq, packed=self.plan.packing,
                                  weights=self.weights, pad_to_multiple_of=self.plan.pad_to_multiple_of),
                          self.accelerator.device) for mb in micro_batches]
