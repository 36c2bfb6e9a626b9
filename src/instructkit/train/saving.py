"""When the loop writes a checkpoint, and which kind: whole tensors from the main process (none, ddp:
train/checkpoint.py) or DCP shards from every process (fsdp: train/dcp_checkpoint.py)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from instructkit.train.checkpoint import best_dir, checkpoints_dir, save_checkpoint
from instructkit.train.dcp_checkpoint import save_sharded
from instructkit.train.distributed import gather_rng, grad_scaler_state
from instructkit.train.resume import data_position
from instructkit.train.state import Run, TrainState
from instructkit.train.tracking import best_step_on_disk


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
    best = _earlier_best(run, state)
    if run.sharded:
        return save_sharded(run, state.step, position, extra, best)
    rng = gather_rng(run.accelerator)
    path = None
    if run.main:
        path = save_checkpoint(run.run_dir, state.step, run.unwrapped,
                               getattr(run.optimizer, "optimizer", run.optimizer), run.scheduler,
                               position, rng, extra, keep=run.cfg.keep_checkpoints, best_weights=best)
    run.accelerator.wait_for_everyone()
    return path or (checkpoints_dir(run.run_dir) / f"step-{state.step:06d}")


def _earlier_best(run: Run, state: TrainState) -> Path | None:
    """checkpoints/best's weights file when they are this state's best from an earlier step (the checkpoint
    links them: resume.py puts them back if a later step, lost with the run, replaced them); None when the
    best is this step's (the checkpoint's own weights) or there is none."""
    if not run.main or state.best_step is None or state.best_step == state.step:
        return None
    return best_dir(run.run_dir) / "model.safetensors" if best_step_on_disk(run) == state.best_step else None
