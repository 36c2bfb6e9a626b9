"""instructkit/background.py: a step in a spawned child process; its result, its errors and stopping it."""

from __future__ import annotations

import io
import operator
import os
import sys
import time

import pytest

from instructkit import progress
from instructkit.background import BackgroundStep
from instructkit.config_load import load_config
from instructkit.errors import ConfigError


def test_a_finished_child_gives_its_wall_seconds():
    step = BackgroundStep("nap", time.sleep, (0.2,))
    step.start()
    seconds = step.wait()
    step.stop()
    assert 0.2 <= seconds < 30


def test_an_instructkit_error_in_the_child_is_raised_as_itself(tmp_path):
    missing = tmp_path / "missing.yaml"
    step = BackgroundStep("load", load_config, (str(missing),))
    step.start()
    with pytest.raises(ConfigError, match="missing.yaml") as info:
        step.wait()
    step.stop()
    assert info.value.exit_code == 2


def test_any_other_failure_comes_back_with_the_childs_traceback():
    step = BackgroundStep("divide", operator.truediv, (1, 0))
    step.start()
    with pytest.raises(RuntimeError, match="step divide failed in its process") as info:
        step.wait()
    step.stop()
    assert "ZeroDivisionError" in str(info.value)


def test_finished_tells_without_waiting(tmp_path):
    log_file = tmp_path / "logs" / "nap.log"
    step = BackgroundStep("nap", time.sleep, (0.2,), log_file=log_file)
    step.start()
    assert step.finished() is None  # still asleep
    deadline = time.monotonic() + 60
    while step.finished() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert step.finished() is not None
    assert step.wait() == step.finished()
    step.stop()
    failing = BackgroundStep("load", load_config, (str(tmp_path / "missing.yaml"),), log_file=log_file)
    failing.start()
    with pytest.raises(ConfigError):
        failing.wait()
    assert failing.finished() is None  # finished, but not well
    assert "step load failed" in log_file.read_text()  # the child's own log says it at once


def test_stop_ends_a_running_child():
    step = BackgroundStep("long nap", time.sleep, (60,))
    step.start()
    pid = step._process.pid
    step.stop()
    step.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_plain_only_makes_later_bars_write_lines_even_on_a_terminal(monkeypatch):
    monkeypatch.setitem(progress._live, "plain", False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress.ProgressBar("x", total=3, enabled=False).tty
    progress.plain_only()
    assert not progress.ProgressBar("x", total=3, enabled=False).tty
