"""A pipeline step run in a second process while this one runs another.

`instructkit run` evaluates the base model beside training when training leaves CPU cores idle and memory
for a second model (see `pipeline.base_beside_training`): the two steps need only the prepared data, and on
a 2-core CPU with `train.threads: 1` the base evaluation otherwise waits for nothing on an idle core. The
GGUF conversion (`models.gguf_cache`) converts the tokenizer in one while it reads the weights.

    step = BackgroundStep("evaluate-base", evaluate_base, (config, run_dir), log_file=run_dir / "logs" / ...)
    step.start()
    ...                       # this process's own step (training)
    seconds = step.wait()     # the child's wall seconds; its error raised here
    seconds = step.finished() # or, without waiting: its seconds if it already finished well, else None
    step.stop()               # always: a child still running is stopped and waited for

The child is spawned (a fresh interpreter: torch's thread pools do not survive a fork), so `target` must be
a module-level function and its arguments picklable; a script that calls instructkit at import time must
guard it with `if __name__ == "__main__":`, as for any spawned process. The child writes its log and plain
progress lines to `log_file` (not to the terminal, where they would cut through this process's live
progress bar); its error is logged there too and raised in this process by `wait`: an `InstructkitError` as
itself (its message names the culprit, exit code 2), anything else as a `RuntimeError` carrying the child's
traceback. Ctrl-C reaches both processes (one process group). `stop` gives a child STOP_GRACE_S seconds to
end on its own (after Ctrl-C it is unwinding) before terminating it; its outputs are written atomically
file by file, and its step is only recorded as done once it reported success.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructkit.errors import InstructkitError

log = logging.getLogger("instructkit")

STOP_GRACE_S = 5.0
"""Seconds `stop` and `wait` give the child to end by itself before it is terminated."""


def _child(name: str, target: Callable[..., Any], args: tuple, level: int, log_file: str | None,
           conn: Any) -> None:
    """The child's entry point: logging and plain progress set up, `target(*args)`, the outcome sent."""
    start = time.perf_counter()
    try:
        _set_up(name, level, log_file)
        target(*args)
        outcome: tuple = ("ok", round(time.perf_counter() - start, 1))
    except KeyboardInterrupt:
        outcome = ("interrupted", None)
    except InstructkitError as exc:
        logging.getLogger("instructkit").error("step %s failed: %s", name, exc)
        outcome = ("error", exc)
    except BaseException:  # any other failure travels as text to the parent
        logging.getLogger("instructkit").exception("step %s failed", name)
        outcome = ("crash", traceback.format_exc())
    try:
        conn.send(outcome)
    except Exception:  # noqa: BLE001 - an error that does not pickle still reaches the parent as text
        conn.send(("crash", f"{type(outcome[1]).__name__}: {outcome[1]}"))
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


def _set_up(name: str, level: int, log_file: str | None) -> None:
    """Logging to `log_file` (stderr without one), libraries quiet as the command line makes them, plain
    progress lines, and an end with the parent."""
    import sys

    import datasets
    import transformers

    from instructkit import progress

    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{name}] %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec"):  # as the command line sets them
        logging.getLogger(noisy).setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    progress.plain_only()
    _exit_with_parent()


def _exit_with_parent() -> None:
    """End this child as soon as its parent is gone (killed without a chance to stop it: SIGKILL), so that
    no orphan keeps computing or writes into a run folder that a new run now owns."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class BackgroundStep:
    """`target(*args)` in a spawned child process, named `name` in its log lines (module docstring)."""

    def __init__(self, name: str, target: Callable[..., Any], args: tuple = (), *,
                 log_file: Path | None = None, beside: str = "the next step"):
        self.name, self.log_file, self.beside = name, log_file, beside
        self._outcome: tuple | None = None
        context = multiprocessing.get_context("spawn")
        self._receive, self._send = context.Pipe(duplex=False)
        level = logging.getLogger("instructkit").getEffectiveLevel()
        self._process = context.Process(target=_child, name=f"instructkit {name}", daemon=True,
                                        args=(name, target, args, level,
                                              str(log_file) if log_file else None, self._send))

    def start(self) -> None:
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._process.start()
        self._send.close()  # the child holds the sending end now
        where = f"; its log: {self.log_file}" if self.log_file else ""
        log.info("step %s runs beside %s, in process %d%s", self.name, self.beside, self._process.pid, where)

    def wait(self) -> float:
        """Wait for the child; its wall seconds. Raises what it raised (module docstring), or RuntimeError
        when it died without a word (killed, out of memory)."""
        if self._outcome is None:
            try:
                self._outcome = self._receive.recv()
            except EOFError:
                self._process.join(STOP_GRACE_S)
                raise RuntimeError(f"step {self.name} (process {self._process.pid}) ended with exit code "
                                   f"{self._process.exitcode} and no result") from None
        self.stop()
        outcome, value = self._outcome
        if outcome == "ok":
            return float(value)
        if outcome == "interrupted":
            raise KeyboardInterrupt
        if outcome == "error":
            raise value
        raise RuntimeError(f"step {self.name} failed in its process:\n{value}")

    def finished(self) -> float | None:
        """Without waiting: the child's wall seconds when it has already finished well, else None."""
        if self._outcome is None and self._process.pid is not None:
            try:
                if self._receive.poll():
                    self._outcome = self._receive.recv()
            except (EOFError, OSError):
                return None
        if self._outcome is not None and self._outcome[0] == "ok":
            return float(self._outcome[1])
        return None

    def stop(self) -> None:
        """Stop the child if it still runs (STOP_GRACE_S to end by itself first), and wait for it; idempotent."""
        if self._process.pid is None:
            return
        self._process.join(STOP_GRACE_S)
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
