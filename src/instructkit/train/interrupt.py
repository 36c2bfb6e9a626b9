"""When the loop stops to write a checkpoint: Ctrl-C or SIGTERM, and a wall-clock interval.

Ctrl-C (SIGINT) during training does not kill the step in flight: the first one asks the loop to stop
after the current optimizer step, write a checkpoint there and raise `TrainingInterrupted`, which says
which step the next run continues from. During a validation (one process) the first Ctrl-C cuts the
validation short instead: the checkpoint of that step is written and the resumed run redoes the
validation first (`TrainState.pending_eval`), so a resumed run ends exactly as an uninterrupted one. A
second Ctrl-C stops at once, without a new checkpoint.

SIGTERM does what a first Ctrl-C does. It is how a run is told to end by everything but a keyboard:
torchrun forwards the SIGTERM it receives to every worker (and Ctrl-C as SIGINT; its workers run in
their own session, so only torchrun sees the terminal's), then SIGKILLs them after its grace period
(`--shutdown-timeout`, TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default; pytorch/pytorch#68258), as SLURM's
scancel/preemption, Kubernetes and `kill` do. With Python's default handler SIGTERM killed the worker in
the middle of a step and the work since the last checkpoint was lost. A further SIGTERM (a scheduler may
signal both the launcher and its workers) changes nothing: the grace period's SIGKILL is the hard stop.

`train.save_every_minutes` writes a checkpoint when that much wall time passed since the last one (or
since the start), so a long epoch never holds all the work unsaved. With several processes the main
process's clock and any process's Ctrl-C are agreed on with one all-reduce per step, so every process
saves and stops at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from instructkit.train.distributed import all_reduce_sum, distributed
from instructkit.train.state import Run, TrainState

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)  # the signals that stop training with a checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training. `step`: the optimizer steps done; `checkpoint`: the newest good
    checkpoint (None: none exists, a new run starts over) and `checkpoint_step` its step; `written_now`:
    that checkpoint was written on this interrupt."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path | None, checkpoint_step: int | None,
                 written_now: bool):
        self.step, self.total_steps = step, total_steps
        self.checkpoint, self.checkpoint_step, self.written_now = checkpoint, checkpoint_step, written_now
        super().__init__(self.describe())

    def describe(self) -> str:
        """What happened, e.g. 'training stopped at step 6 of 18; checkpoint written at step 6 (PATH)'."""
        where = f"training stopped at step {self.step} of {self.total_steps}"
        if self.checkpoint is None:
            return f"{where}; no checkpoint exists, so training will start over"
        how = "written" if self.written_now else "kept from before"
        return f"{where}; checkpoint {how} at step {self.checkpoint_step} ({self.checkpoint})"

    def continue_hint(self, resume_how: str) -> str:
        """`resume_how` (e.g. 'run the same command again') completed with where the next run begins."""
        if self.checkpoint is None:
            return f"{resume_how} to start training over (no checkpoint to continue from)"
        return f"{resume_how} to continue from step {self.checkpoint_step}"


class StopControl:
    """Ctrl-C / SIGTERM handling and wall-clock checkpoints for one `train` call (a context manager).

    `state` is the loop's TrainState (read when a second Ctrl-C stops at once); `checkpoint` the newest
    good checkpoint so far. The SIGINT and SIGTERM handlers are installed only in the main thread (elsewhere
    Ctrl-C raises KeyboardInterrupt as usual) and the previous ones are put back on exit.
    """

    def __init__(self, run: Run, state: TrainState, checkpoint: Path | None,
                 clock: Callable[[], float] = time.monotonic):
        self.run, self.state = run, state
        self.checkpoint = checkpoint
        self.checkpoint_step = state.step if checkpoint is not None else None
        self.clock = clock
        minutes = run.cfg.save_every_minutes
        self.interval_s = minutes * 60.0 if minutes else None
        self.last_save = clock()
        self.requested = False  # a first Ctrl-C arrived
        self.hard = False  # a second one: stop at once
        self._abortable = False
        self._previous: Any = None

    # -- the signal handler -------------------------------------------------------------------------
    def __enter__(self) -> StopControl:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in (self._previous or {}).items():
            signal.signal(sig, previous)
        self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.requested:
            if signum != signal.SIGINT:  # a repeated SIGTERM: the checkpoint under way is the point
                logger.warning("%s: already stopping after step %d", name, self.state.step + 1)
                return
            self.hard = True
            raise self.interrupted(written_now=False)
        self.requested = True
        if self._abortable:
            logger.warning("%s: stopping the validation of step %d and writing a checkpoint there "
                           "(Ctrl-C again stops at once, without one)", name, self.state.step)
            raise KeyboardInterrupt
        logger.warning("%s: finishing step %d of %d, then writing a checkpoint there "
                       "(Ctrl-C again stops at once, without one)", name, self.state.step + 1, self.run.total_steps)

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        """A block (validation) that a first Ctrl-C cuts short with KeyboardInterrupt; one process only
        (with several, a process leaving a collective early would hang the others)."""
        self._abortable = not distributed(self.run.accelerator)
        try:
            yield
        finally:
            self._abortable = False

    # -- decisions after each step -----------------------------------------------------------------
    def after_step(self) -> tuple[bool, bool]:
        """(stop now, a wall-clock checkpoint is due), the same on every process."""
        timed = self.interval_s is not None and self.run.main and self.clock() - self.last_save >= self.interval_s
        if not distributed(self.run.accelerator):
            return self.requested, timed
        stop, due = all_reduce_sum(self.run.accelerator, [float(self.requested), float(timed)])
        return stop > 0, due > 0

    def saved(self, path: Path | None, step: int) -> None:
        """A checkpoint of `step` was written at `path` (None: none was written)."""
        self.last_save = self.clock()
        if path is not None:
            self.checkpoint, self.checkpoint_step = path, step

    def interrupted(self, written_now: bool) -> TrainingInterrupted:
        """The exception that ends training after Ctrl-C (raised by the caller)."""
        return TrainingInterrupted(self.state.step, self.run.total_steps, self.checkpoint, self.checkpoint_step,
                                   written_now)
