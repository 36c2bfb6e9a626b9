"""Tiny-model training runs for the fault-injection and concurrency tests (and their forked children).

One fixed run: 24 rating-like examples through THE tokenization (data/tokenize.tokenize_examples), the
tiny Llama of tests/conftest.py, batch 4 (6 steps per epoch), 3 epochs = 18 optimizer steps, a
checkpoint after every step, linear schedule with warmup (so the scheduler state matters on resume),
packing on. Everything deterministic at 1 thread.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _robust  # noqa: F401  (sys.path for conftest and src)

WORDS = ["great", "coffee", "fast", "shipping", "kettle", "leaks", "quick", "brown", "fox", "lazy", "dog", "the"]
STEPS = 18


def examples(n: int = 24, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        review = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        out.append({"prompt": f"Predict the rating for the following review: {review}\nRating:",
                    "completion": str(1 + i % 5), "task": "rating", "source_id": str(i)})
    return out


def tokenized(tokenizer: Any, n: int = 24, seed: int = 0) -> tuple[Any, Any]:
    from instructkit.data.tokenize import TokenizeSettings, tokenize_examples

    settings = TokenizeSettings(max_length=64)
    dataset, _ = tokenize_examples(examples(n, seed), tokenizer, settings)
    return dataset, settings


def config(**overrides: Any) -> Any:
    from instructkit.config import TrainConfig

    base = dict(lr=3e-3, epochs=3, batch_size=4, schedule="linear", warmup_ratio=0.1, seed=0, save_every=1,
                packing=True, keep_checkpoints=2)
    base.update(overrides)
    return TrainConfig(**base)


def run(tokenizer: Any, run_dir: Path, *, seed: int = 0, resume: bool = False, cfg: Any = None,
        model: Any = None, **kwargs: Any) -> Any:
    """Train the tiny Llama in `run_dir`; returns the model (its trainable weights are the result)."""
    import torch
    from conftest import build_tiny_llama

    from instructkit.train.loop import TrainData, TrainOptions, train

    torch.set_num_threads(1)
    dataset, settings = tokenized(tokenizer)
    model = model if model is not None else build_tiny_llama(tokenizer, seed=seed)
    kwargs.setdefault("show_progress", False)
    kwargs.setdefault("restore_best", False)
    train(model, tokenizer, TrainData(dataset, kwargs.pop("val_data", None)), cfg or config(), run_dir,
          TrainOptions(settings=settings, is_seq2seq=False, resume=resume, **kwargs))
    return model


def weights(model: Any) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_weights(a: dict, b: dict) -> list[str]:
    """Names of the tensors that are not bitwise equal (empty: identical)."""
    import torch

    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# --------------------------------------------------------------------------------------------------
# A training run in a forked child process (the parent has torch imported already: no start-up cost)
# --------------------------------------------------------------------------------------------------


def _child(target: Callable[[], None]) -> None:
    try:
        target()
    except BaseException as exc:  # noqa: BLE001 - report through the exit code; the parent checks it
        with contextlib.suppress(Exception):
            Path(os.environ.get("IK_CHILD_ERROR", "/dev/null")).write_text(f"{type(exc).__name__}: {exc}")
        os._exit(3 if type(exc).__name__ == "TrainingError" else 1)
    os._exit(0)


def start_child(target: Callable[[], None]) -> multiprocessing.Process:
    """Run `target` in a forked child (it exits 0 on success, 3 on TrainingError, 1 on anything else)."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(target,), daemon=True)
    process.start()
    return process


def sigkill(process: multiprocessing.Process) -> bool:
    """SIGKILL the child if it is still running; True when it was killed (not already finished)."""
    alive = process.is_alive()
    if alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    process.join(30)
    return alive and process.exitcode == -signal.SIGKILL


def wait_for(predicate: Callable[[], bool], process: multiprocessing.Process, timeout: float = 60.0,
             poll: float = 0.0005) -> bool:
    """Poll `predicate` until it holds (True) or the process ends or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if not process.is_alive():
            return predicate()
        time.sleep(poll)
    return False
