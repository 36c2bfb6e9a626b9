"""What the accelerator sees: the bucket multiple of row widths per device, and `train.compile`.

Every new micro-batch shape costs an accelerator something: cuDNN attention builds an execution plan
per (batch, heads, lengths, mask) shape, and a compiled model may recompile. So on CUDA row widths are
rounded up to a multiple of 64 by default (train.pad_to_multiple_of; data/buckets.py picks the steps
so that few widths occur), while the CPU keeps exact widths (its kernels have no per-shape cost, and
every padding token is paid in full).

`compile_model` compiles the model in place (`nn.Module.compile`: same module, same parameter names,
so checkpoints and the optimizer are unaffected) with dynamic shapes: the row width and the number of
label positions are symbolic, and Dynamo's guards on them (sizes >= 2 and the relations between
tensors) hold for every bucketed width, so one graph per code path serves the whole run instead of one
compilation per width. The first step of each path pays the compilation. A model on sdpa_varlen
(models/attention.py) is switched to transformers' sdpa first: sdpa_varlen reads each row's example
starts on the host, which would break the graph in every layer.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# Row-width multiple per device type when train.pad_to_multiple_of is not set.
DEFAULT_MULTIPLE = {"cuda": 64}
# Compilations allowed per code path before Dynamo falls back to eager (torch's default is 8): a run
# can meet a few code paths per batch kind (one-row vs several rows, full vs label-only logits).
RECOMPILE_LIMIT = 16
BACKEND = "inductor"  # torch.compile's default backend (tests swap in a counting one)


def pad_multiple(requested: int | None, device_type: str) -> int:
    """train.pad_to_multiple_of in effect: the configured value, else 64 on CUDA and 1 elsewhere.

    `device_type`: torch.device.type of the training device ("cuda", "cpu", "mps", ...).
    Raises ValueError when `requested` < 1.
    """
    if requested is None:
        return DEFAULT_MULTIPLE.get(device_type, 1)
    if requested < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {requested}")
    return int(requested)


def compile_model(model: Any, backend: Any = None) -> None:
    """Compile `model` in place for training with dynamic shapes (see the module docstring).

    `backend`: a torch.compile backend name or callable (default BACKEND, inductor). Logs what it did.
    """
    import torch

    backend = backend or BACKEND
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa_varlen":
        model.set_attn_implementation("sdpa")
        logger.info("train.compile: attention sdpa_varlen -> sdpa (traceable: no host reads per layer)")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    model.compile(backend=backend, dynamic=True)
    logger.info("train.compile: the model is compiled (backend %s, dynamic shapes); the first steps compile",
                backend if isinstance(backend, str) else getattr(backend, "__name__", "custom"))
