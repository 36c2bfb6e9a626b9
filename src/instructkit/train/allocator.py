"""Hand the C allocator's free memory back to the system (train.release_free_memory): before each CPU
backward pass (train/step.py) and, in-backward, before the largest parameter's update and after every 16 MB
of gradients applied (train/in_backward.py).

On CPU, PyTorch's tensors come from the C library's malloc. glibc keeps the blocks it gets back under its
mmap threshold (up to 32 MB: activations, per-layer gradients, optimizer-update temporaries) for reuse
instead of returning them, and the holes between long-lived tensors (8-bit optimizer states created in
the middle of the first backward pass) cannot shrink the heap. So the resident memory stays at the
high-water mark of everything the first step ever freed, and the next step's gradients come on top of it.
`malloc_trim(0)` returns every free page of every arena to the system; the next step faults back only
the pages it uses.

Measured (Gemma-3-270M, memory-lean + gradient checkpointing, batch 4 x 256, 1 thread; RSS marks around
forward and backward): 0.65 GB of the heap free but resident at the start of step 2; peak of step 2 3.89
GB without, 3.67 GB with a trim at the start of each step; CPU time per step 40.6 vs 41.9 s (noise on a
shared machine: one trim takes milliseconds). A fixed M_MMAP_THRESHOLD of 1 MB (every tensor over 1 MB
mapped and unmapped) gave 3.25 GB but 37% more CPU time per step (page faults), so it is not used.
The peak of an in-backward step comes at its largest update (the tied embedding's, last in backward), when
the whole backward's freed activations sit in the heap: hence the second trim. With both trims and the
single tied gradient (train/loss.py), bench_memory.py measured Gemma-3 lean + ckpt at 3.67 GB (4.57 GB
before), the HF Trainer at 9.04 GB in the same run (benchmarks/results/memory.json).
Elsewhere (no glibc: macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim from the running process's C library, or None (not Linux, not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool | None:
    """Return the C allocator's free pages to the system: True when some were returned, False when none
    were, None when the C library has no malloc_trim (nothing done). Never raises."""
    trim = _malloc_trim()
    return None if trim is None else bool(trim(0))
