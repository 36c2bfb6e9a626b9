"""Where a run starts: fresh (an earlier run's checkpoints removed) or from the newest verified checkpoint,
with the data position checked so the resumed run replays the very same batches.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from instructkit.data.sampler import plan_digest, plan_epoch
from instructkit.errors import TrainingError
from instructkit.train.checkpoint import (
    BEST_WEIGHTS,
    best_dir,
    checkpoints_dir,
    latest_good_checkpoint,
    load_checkpoint,
    save_best,
)
from instructkit.train.dcp_checkpoint import is_sharded_checkpoint, load_sharded
from instructkit.train.distributed import broadcast, restore_grad_scaler
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
            restore_grad_scaler(run.accelerator, saved["extra"].get("grad_scaler"), str(last_checkpoint))
            check_position(run, saved["sampler"], last_checkpoint)
            _restore_best(run, state, last_checkpoint)
            logger.info("resumed from %s (step %d of %d)", last_checkpoint, state.step, run.total_steps)
    if last_checkpoint is None and run.main and checkpoints_dir(run.run_dir).exists():
        logger.warning("starting fresh: removing the earlier run's checkpoints in %s", checkpoints_dir(run.run_dir))
        shutil.rmtree(checkpoints_dir(run.run_dir))
    run.accelerator.wait_for_everyone()
    return state, last_checkpoint


def _restore_best(run: Run, state: TrainState, checkpoint: Path) -> None:
    """Make checkpoints/best the best this checkpoint's state knows. It may hold another step's weights: the run
    was killed between the checkpoint and its best weights (written now, from the checkpoint), or a step after
    the checkpoint wrote a new best and was lost with the run (the checkpoint's best.safetensors goes back; no
    best: the folder goes). Otherwise the resumed run would end on weights of steps it never trained."""
    on_disk = broadcast(run.accelerator, best_step_on_disk(run) if run.main else None)  # one answer for all
    if on_disk == state.best_step:
        return
    if state.best_step == state.step:
        keep_best(run, state, checkpoint)
        return
    if run.main:
        if state.best_step is None:
            shutil.rmtree(best_dir(run.run_dir), ignore_errors=True)
        elif (checkpoint / BEST_WEIGHTS).is_file():
            save_best(run.run_dir, run.unwrapped, {"step": state.best_step, "metric": state.best_metric,
                                                   "value": state.best_value}, weights_from=checkpoint / BEST_WEIGHTS)
        else:
            logger.warning("resume: checkpoints/best holds step %s, but %s has step %s as the best and does not "
                           "keep its weights (an older checkpoint); checkpoints/best stays as it is", on_disk,
                           checkpoint, state.best_step)
    run.accelerator.wait_for_everyone()


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
            "group_size": plan.group_size, "world_size": plan.world_size, "batch_size": plan.batch_size,
            "grad_accum": plan.grad_accum, "packing": plan.packing, "examples": len(run.table),
            "total_steps": run.total_steps, "lengths_digest": lengths_digest(run.table.lengths),
            "plan_digest": plan_digest(epoch_plan) if state.step_in_epoch else None,
            "groups_digest": groups_digest(epoch_plan) if state.step_in_epoch else None}


def lengths_digest(lengths: Any) -> str:
    """sha256 of every training example's length in tokens: changed data or tokenization (of as many
    examples) shows here even where the batch plan's example indices stay the same."""
    return hashlib.sha256(np.asarray(lengths, dtype=np.int64).tobytes()).hexdigest()


def groups_digest(epoch_plan: list) -> str:
    """The examples of each step, whichever process or micro-batch trains them: equal under another number
    of processes or another batch_size x grad_accum with the same examples per step (group_size)."""
    return plan_digest([sorted(i for rank in step for mb in rank for row in mb for i in row) for step in epoch_plan])


def check_position(run: Run, saved: dict[str, Any], path: Path) -> None:
    """Raise TrainingError unless the saved data position replays the same steps now: the very same batches,
    or the same examples per step split otherwise over processes and micro-batches (world_size, batch_size x
    grad_accum with the same product: the token-normalised step is then equal up to float rounding)."""
    plan = run.plan
    now = {"seed": plan.seed, "group_size": plan.group_size, "packing": plan.packing, "examples": len(run.table)}
    changed = [f"{k} was {saved.get(k)}, now {v}" for k, v in now.items() if saved.get(k) != v]
    if saved.get("lengths_digest") not in (None, lengths_digest(run.table.lengths)):
        changed.append("the examples' lengths in tokens differ (the training data or its tokenization changed)")
    if changed:
        raise TrainingError(f"cannot resume exactly from {path}: " + ", ".join(changed)
                            + ". Resume with the same data and batch settings, or start a new run.")
    split = {"world_size": plan.world_size, "batch_size": plan.batch_size, "grad_accum": plan.grad_accum}
    resplit = {k: (saved[k], v) for k, v in split.items() if k in saved and saved[k] != v}
    same_batches = True
    if saved.get("plan_digest") or saved.get("groups_digest"):
        epoch_plan = plan_epoch(run.table.lengths, plan, saved["epoch"], run.sample_labels)
        same_batches = plan_digest(epoch_plan) == saved.get("plan_digest")
        same_groups = saved.get("groups_digest") is not None and groups_digest(epoch_plan) == saved["groups_digest"]
        if not same_groups and not same_batches:
            raise TrainingError(f"cannot resume exactly from {path}: the epoch's batches differ (the training data "
                                "or its tokenization changed)")
    if resplit or not same_batches:  # the same examples per step, split otherwise: equal up to float rounding
        what = ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in resplit.items()) or "another micro-batch layout"
        logger.warning("resume: %s processes now, %s when %s was written (%s); each step trains the same examples "
                       "(%s per step), so the run continues, equal up to rounding rather than bitwise",
                       plan.world_size, saved.get("world_size"), path, what, plan.group_size)
    if saved.get("total_steps") != run.total_steps:
        logger.warning("resume: the run now has %s steps instead of %s; the learning-rate schedule changes",
                       run.total_steps, saved.get("total_steps"))
