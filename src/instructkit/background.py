"""A pipeline step run in a second process while this one runs another.

`instructkit run` evaluates the base model beside training when training leaves a CPU core idle (see
`pipeline.base_beside_training`): the two steps need only the prepared data, and on a 2-core CPU with
`train.threads: 1` the base evaluation otherwise waits for nothing on an idle core.

    step = BackgroundStep("evaluate-base", evaluate_base, (config, run_dir))
    step.start()
    ...                       # this process's own step (training)
    seconds = step.wait()     # the child's wall seconds; its error raised here
    step.stop()               # after an error or Ctrl-C here: the child is stopped and waited for

The child is spawned (a fresh interpreter: torch's thread pools do not survive a fork), so `target` must be
a module-level function and its arguments picklable. It logs to stderr with the step's name in each line
and shows plain progress lines (two live progress bars cannot share one terminal). An error in the child
is raised in this process by `wait`: an `InstructkitError` as itself (its message names the culprit, exit
code 2), anything else as a `RuntimeError` carrying the child's traceback. Ctrl-C reaches both processes
(one process group); the child's outputs are written whole or not at all, so a stopped child leaves nothing
half-written.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import traceback
from collections.abc import Callable
from typing import Any

from instructkit.errors import InstructkitError

log = logging.getLogger("instructkit")


def _child(name: str, target: Callable[..., Any], args: tuple, level: int, conn: Any) -> None:
    """The child's entry point: logging and plain progress set up, `target(*args)`, the outcome sent."""
    import sys

    from instructkit import progress

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{name}] %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec"):  # as the command line sets them
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    progress.plain_only()
    _exit_with_parent()
    start = time.perf_counter()
    try:
        target(*args)
        conn.send(("ok", round(time.perf_counter() - start, 1)))
    except KeyboardInterrupt:
        conn.send(("interrupted", None))
    except InstructkitError as exc:
        conn.send(("error", exc))
    except BaseException:  # noqa: BLE001 - any other failure travels as text to the parent
        conn.send(("crash", traceback.format_exc()))
    finally:
        conn.close()


def _exit_with_parent() -> None:
    """End this child as soon as its parent is gone (killed without a chance to stop it: SIGKILL), so that
    no orphan keeps computing or writes into a run folder that a new run now owns."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class BackgroundStep:
    """`target(*args)` in a spawned child process, named `name` in its log lines (module docstring)."""

    def __init__(self, name: str, target: Callable[..., Any], args: tuple = ()):
        self.name = name
        context = multiprocessing.get_context("spawn")
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_child, name=f"instructkit {name}", daemon=True,
                                        args=(name, target, args, logging.getLogger("instructkit")
                                              .getEffectiveLevel(), send))
        self._send = send

    def start(self) -> None:
        self._process.start()
        self._send.close()  # the child holds the sending end now
        log.info("step %s runs beside the next step, in process %d", self.name, self._process.pid)

    def wait(self) -> float:
        """Wait for the child; its wall seconds. Raises what it raised (module docstring), or RuntimeError
        when it died without a word (killed, out of memory)."""
        try:
            outcome, value = self._receive.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"step {self.name} (process {self._process.pid}) ended with exit code "
                               f"{self._process.exitcode} and no result") from None
        self._process.join()
        if outcome == "ok":
            return float(value)
        if outcome == "interrupted":
            raise KeyboardInterrupt
        if outcome == "error":
            raise value
        raise RuntimeError(f"step {self.name} failed in its process:\n{value}")

    def stop(self) -> None:
        """Stop the child if it still runs, and wait for it (idempotent)."""
        if self._process.pid is not None and self._process.is_alive():
            self._process.terminate()
        if self._process.pid is not None:
            self._process.join()
