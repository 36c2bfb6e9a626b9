"""When the loop writes a checkpoint, and which kind: whole tensors from the main process (none, ddp:
train/checkpoint.py) or DCP shards from every process (fsdp: train/dcp_checkpoint.py)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from instructkit.train.checkpoint import checkpoints_dir, save_checkpoint
from instructkit.train.dcp_checkpoint import save_sharded
from instructkit.train.distributed import gather_rng, grad_scaler_state
from instructkit.train.resume import data_position
from instructkit.train.state import Run, TrainState


def checkpoint_due(run: Run, state: TrainState, last: bool, validated: bool) -> bool:
    """Every `save_every` steps (default: at each validation), at the end and on early stopping."""
    every = run.cfg.save_every or run.eval_every
    return (state.step % every == 0 or last or state.stopped_early
            or (validated and run.cfg.save_every is None))


def save(run: Run, state: TrainState, epoch_plan: list) -> Path:
    """Checkpoint this step (every process's RNG state included); every process calls it and returns
    once the checkpoint is complete."""
    position = data_position(run, state, epoch_plan)
    extra = {"state": asdict(state), "grad_scaler": grad_scaler_state(run.accelerator)}
    if run.sharded:
        return save_sharded(run, state.step, position, extra)
    rng = gather_rng(run.accelerator)
    path = None
    if run.main:
        path = save_checkpoint(run.run_dir, state.step, run.unwrapped,
                               getattr(run.optimizer, "optimizer", run.optimizer), run.scheduler,
                               position, rng, extra, keep=run.cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()
    return path or (checkpoints_dir(run.run_dir) / f"step-{state.step:06d}")
