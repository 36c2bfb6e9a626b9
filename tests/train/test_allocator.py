"""train.release_free_memory: glibc's free heap pages go back to the system before each step."""

from __future__ import annotations

import subprocess
import sys

import pytest

from instructkit.config import TrainConfig
from instructkit.train.allocator import release_free_memory

# A child process, so the heap is only this probe's: 2,000 freed 64 KB tensors (under glibc's mmap
# threshold, so heap blocks), each followed by a small live tensor, leave 2,000 holes that free() cannot
# return (no block is at the top of the heap) and that stay resident until trimmed. (With one live tensor
# after all of them, that tensor sometimes landed in an earlier hole, the blocks were then the heap's top
# and free() returned them itself: 154 MB before and 148 MB after in 6 runs of 10.)
PROBE = """
import torch
from instructkit.train.allocator import release_free_memory
def anon_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:"))
blocks, pins = [], []
for _ in range(2000):
    blocks.append(torch.ones(16 * 1024))
    pins.append(torch.ones(16))
del blocks
before = anon_kb()
released = release_free_memory()
print(before, anon_kb(), released)
"""


def test_default_is_on():
    assert TrainConfig().release_free_memory is True


@pytest.mark.skipif(release_free_memory() is None, reason="no glibc malloc_trim here")
def test_freed_heap_blocks_leave_the_resident_set():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    before_kb, after_kb, released = out.stdout.split()
    assert released == "True"
    assert int(before_kb) - int(after_kb) > 100_000  # of the 128 MB freed, most returned
