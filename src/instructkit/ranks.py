"""Processes under a launcher (`torchrun --nproc_per_node N -m instructkit ...`): who is rank 0, and the
waits that keep them from writing the same file.

Rank 0 prepares the data, tokenizes into the cache, evaluates, saves the model and writes the run's
records; the others wait at a barrier (`main_first`, `main_only`) and then read what rank 0 wrote. Only
training runs on every process. The process group is accelerate's (gloo on CPU, NCCL on CUDA), started
once by `start()` with a long timeout, since the others may wait while rank 0 evaluates the base model.
One process (no launcher): everything here is a no-op. Torch is imported only with several processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

WAIT = timedelta(hours=6)  # how long the others may wait at a barrier (rank 0 evaluating, saving)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (RANK, set by torchrun / accelerate launch; 0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def cpu_only() -> bool:
    """Several processes and no CUDA device: accelerate must be told (cpu=True: gloo), or each process trains
    alone (DistributedType.NO). One process keeps accelerate's own device choice (CUDA, MPS, CPU)."""
    if world_size() == 1:
        return False
    import torch

    return not torch.cuda.is_available()


def start() -> None:
    """Join the launcher's process group (several processes only)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=cpu_only(), timeout=WAIT)


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed

        start()
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. prepare, tokenize into the cache); the others run it after, when
    its files exist (they then read them instead of writing)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def main_only(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(...)` on rank 0 (its result; None elsewhere), every process leaving together."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


def share(obj: Any) -> Any:
    """Rank 0's `obj` on every process (JSON-like values)."""
    if world_size() == 1:
        return obj
    import torch.distributed

    start()
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
