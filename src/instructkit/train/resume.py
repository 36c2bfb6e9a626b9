"""Where a run starts: fresh (an earlier run's checkpoints removed) or from the newest verified checkpoint,
with the data position checked so the resumed run replays the very same batches.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from instructkit.data.sampler import plan_digest, plan_epoch
from instructkit.errors import TrainingError
from instructkit.train.checkpoint import checkpoints_dir, latest_good_checkpoint, load_checkpoint
from instructkit.train.dcp_checkpoint import is_sharded_checkpoint, load_sharded
from instructkit.train.distributed import broadcast
from instructkit.train.state import Run, TrainState
from instructkit.train.tracking import best_step_on_disk, keep_best

logger = logging.getLogger(__name__)


def resume_point(run: Run, resume: bool) -> tuple[TrainState, Path | None]:
    """The state to start from and the checkpoint it came from (None: a fresh start).

    A fresh start owns the folder: an earlier run's checkpoints are removed, since its step-N would
    otherwise outrank the new ones. Raises TrainingError when the checkpoint cannot be resumed exactly.
    """
    state, last_checkpoint = TrainState(), None
    if resume:
        found = broadcast(run.accelerator, str(latest_good_checkpoint(run.run_dir) or "") if run.main else None)
        if not found:
            logger.warning("resume: no complete checkpoint in %s; starting from the beginning", run.run_dir)
        else:
            last_checkpoint = Path(found)
            saved = _load(run, last_checkpoint)
            state = TrainState(**saved["extra"]["state"])
            check_position(run, saved["sampler"], last_checkpoint)
            if state.best_step == state.step and best_step_on_disk(run) != state.step:
                keep_best(run, state, last_checkpoint)  # killed between this checkpoint and its best weights
            logger.info("resumed from %s (step %d of %d)", last_checkpoint, state.step, run.total_steps)
    if last_checkpoint is None and run.main and checkpoints_dir(run.run_dir).exists():
        logger.warning("starting fresh: removing the earlier run's checkpoints in %s", checkpoints_dir(run.run_dir))
        shutil.rmtree(checkpoints_dir(run.run_dir))
    run.accelerator.wait_for_everyone()
    return state, last_checkpoint


def _load(run: Run, path: Path) -> dict[str, Any]:
    """Load a checkpoint of either kind: DCP shards (fsdp; any sharding can read them) or whole tensors."""
    if is_sharded_checkpoint(path):
        return load_sharded(path, run)
    if run.sharded:
        raise TrainingError(f"cannot resume train.sharding=fsdp from {path}: it was written by an unsharded run "
                            "(none/ddp); resume with the sharding it was written with")
    return load_checkpoint(path, run.unwrapped, getattr(run.optimizer, "optimizer", run.optimizer), run.scheduler,
                           rank=run.accelerator.process_index)


def data_position(run: Run, state: TrainState, epoch_plan: list) -> dict[str, Any]:
    """The data position a resumed run restarts from (plus what must not have changed)."""
    plan = run.plan
    return {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "seed": plan.seed,
            "group_size": plan.group_size, "world_size": plan.world_size, "packing": plan.packing,
            "examples": len(run.table), "total_steps": run.total_steps,
            "plan_digest": plan_digest(epoch_plan) if state.step_in_epoch else None,
            "groups_digest": groups_digest(epoch_plan) if state.step_in_epoch else None}


def groups_digest(epoch_plan: list) -> str:
    """The examples of each step, whichever process trains them: equal under another number of processes
    with the same examples per step (group_size)."""
    return plan_digest([sorted(i for rank in step for mb in rank for row in mb for i in row) for step in epoch_plan])


def check_position(run: Run, saved: dict[str, Any], path: Path) -> None:
    """Raise TrainingError unless the saved data position replays the very same batches now."""
    plan = run.plan
    now = {"seed": plan.seed, "group_size": plan.group_size, "packing": plan.packing, "examples": len(run.table)}
    resharded = saved.get("world_size") != plan.world_size
    if resharded:  # the same examples per step, split over other processes: equal up to float rounding
        logger.warning("resume: %s processes now, %s when %s was written; each step trains the same examples "
                       "(%s per step), so the run continues, equal up to rounding rather than bitwise",
                       plan.world_size, saved.get("world_size"), path, plan.group_size)
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        raise TrainingError(f"cannot resume exactly from {path}: "
                            + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in changed.items())
                            + ". Resume with the same data and batch settings, or start a new run.")
    key = "groups_digest" if resharded else "plan_digest"
    if saved.get(key) or (resharded and saved.get("plan_digest")):
        epoch_plan = plan_epoch(run.table.lengths, plan, saved["epoch"], run.sample_labels)
        digest = (groups_digest if resharded else plan_digest)(epoch_plan)
        if digest != saved.get(key):
            raise TrainingError(f"cannot resume exactly from {path}: the epoch's batches differ (the training data "
                                "or its tokenization changed)")
    if saved.get("total_steps") != run.total_steps:
        logger.warning("resume: the run now has %s steps instead of %s; the learning-rate schedule changes",
                       run.total_steps, saved.get("total_steps"))
