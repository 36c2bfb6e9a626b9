"""Progress of long steps (training, evaluation) that a user can see wherever the output goes.

    bar = ProgressBar("train", total=264, done=0)
    bar.update(completed=12, info="loss 1.2345  850 tok/s")
    bar.close()

On a terminal (stderr is a TTY) it is a rich progress bar; bars opened while another is live (the task
metrics of a validation inside training) become extra lines of the same display, since rich allows one
live display at a time. Anywhere else (nohup, CI, a log file) it is a plain log line every
`every_s` seconds and one at the end:

    train: 12/264 (5%) loss 1.2345  850 tok/s; elapsed 1m02s, ETA 21m40s

Shared by train/ and evaluate/ (neither imports the other); no torch.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("instructkit.progress")

PLAIN_EVERY_S = 30.0
"""Seconds between the plain progress lines written when stderr is not a terminal."""

_live: dict[str, Any] = {"display": None, "users": 0, "plain": False}


def plain_only() -> None:
    """Every later bar of this process writes plain lines, even on a terminal (a process that shares the
    terminal with another one's live display: instructkit/background.py)."""
    _live["plain"] = True


def format_seconds(seconds: float) -> str:
    """3725.0 -> '1h02m05s', 62.0 -> '1m02s', 5.4 -> '5s' (whole seconds; '?' when not finite)."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def plain_line(label: str, completed: int, total: int, info: str, elapsed: float, rate: float | None) -> str:
    """One progress line: `label: 12/264 (5%) info; elapsed 1m02s, ETA 21m40s`.

    `rate`: units per second since this bar started (None or 0: the ETA is unknown, '?').
    """
    percent = 100.0 * completed / total if total else 100.0
    remaining = max(total - completed, 0)
    eta = remaining / rate if rate else float("nan")
    text = f"{label}: {completed}/{total} ({percent:.0f}%)"
    if info:
        text += f" {info}"
    return f"{text}; elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta) if remaining else '0s'}"


class ProgressBar:
    """A progress display for `total` units of work, starting at `done` (a resumed run).

    `enabled=False`: nothing is shown. `tty`: None reads `sys.stderr.isatty()`. `clock` and `every_s` set
    the plain lines' timing (tests pass a fake clock).
    """

    def __init__(self, label: str, total: int, done: int = 0, *, enabled: bool = True, tty: bool | None = None,
                 every_s: float = PLAIN_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.completed, self.info = label, int(total), int(done), ""
        self.enabled = enabled and total > 0
        self.tty = (sys.stderr.isatty() and not _live["plain"]) if tty is None else tty
        self.every_s, self.clock = every_s, clock
        self.started = self.last_line = clock()
        self.start_completed = self.lined = self.completed
        self.task = None
        self.closed = False
        if self.enabled and self.tty:
            self._open_rich()

    def _open_rich(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if _live["display"] is None:
            _live["display"] = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                        transient=False)
            _live["display"].start()
        _live["users"] += 1
        self.task = _live["display"].add_task(self.label, total=self.total, completed=self.completed, info="")

    def update(self, completed: int | None = None, advance: int = 0, info: str | None = None,
               label: str | None = None) -> None:
        """Set `completed` (or add `advance`) units; `info` replaces the text after the count."""
        if not self.enabled or self.closed:
            return
        self.completed = int(completed) if completed is not None else self.completed + int(advance)
        if info is not None:
            self.info = info
        if label is not None:
            self.label = label
        if self.task is not None:
            _live["display"].update(self.task, completed=self.completed, info=self.info, description=self.label)
            return
        now = self.clock()
        if now - self.last_line >= self.every_s:
            self.last_line, self.lined = now, self.completed
            logger.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The plain progress line as of `now` (default: the clock)."""
        now = self.clock() if now is None else now
        elapsed = now - self.started
        done = self.completed - self.start_completed
        return plain_line(self.label, self.completed, self.total, self.info, elapsed,
                          done / elapsed if elapsed > 0 and done > 0 else None)

    def close(self) -> None:
        """End the display: the rich task is removed (the display stops with its last user); a plain bar
        writes its final line when there was progress since its last line."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        if self.task is not None:
            display = _live["display"]
            _live["users"] -= 1
            if _live["users"] <= 0:
                display.stop()
                _live["display"], _live["users"] = None, 0
            else:
                display.remove_task(self.task)
            return
        if self.completed != self.lined:
            logger.info(self.line())

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
