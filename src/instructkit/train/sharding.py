"""`train.sharding`: how the model is spread over the processes of a launcher (PyTorch's own engine).

    none   one process: the model as it is
    ddp    every process holds the whole model; DistributedDataParallel (through accelerate) averages
           the gradients (the default under a launcher with several processes)
    fsdp   FSDP2: `torch.distributed.fsdp.fully_shard` on each decoder layer, then on the root, so each
           process keeps 1/N of every parameter, gradient and AdamW moment (DTensor, sharded on dim 0);
           a layer's weights are gathered just before it runs and freed after (reshard_after_forward)

Launch: `torchrun --nproc_per_node N -m instructkit train CONFIG` (CPU: gloo; CUDA: NCCL; the backend is
accelerate's choice). Under fsdp, `train.precision` bf16 becomes FSDP's MixedPrecisionPolicy (bf16
compute, fp32 gradient reduction, fp32 master weights); fp16 is refused (it needs a sharded gradient
scaler); `train.gradient_checkpointing` recomputes each decoder layer in backward. Checkpoints are DCP
shards (train/dcp_checkpoint.py); the best weights (checkpoints/best) and the final model are gathered
whole onto rank 0 (`full_weights`, `consolidated_model`). Task metrics during validation run on every
process (each forward needs them all; transformers' generate keeps them stepping together), rank 0's
numbers count. Everything here runs on CPU with gloo (tests/train/test_fsdp.py, tests/test_torchrun.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from instructkit.config import TrainConfig
from instructkit.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

SHARDINGS = ("none", "ddp", "fsdp")


def launched_processes() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_processes(cfg: TrainConfig, processes: int | None = None) -> None:
    """Refuse, before any work, the settings that cannot run in `processes` (default: the launcher's).

    Raises ConfigError (exit 2) for train.optimizer_in_backward under several processes: each gradient
    would be applied before DDP averages it. `instructkit run` / `train` call it before any step, and
    train/loop.train with its accelerator's process count.
    """
    processes = launched_processes() if processes is None else processes
    if cfg.optimizer_in_backward and processes > 1:
        raise ConfigError(f"train.optimizer_in_backward=true runs in one process only, and this run was launched "
                          f"with {processes} (WORLD_SIZE): each gradient would be applied before DDP averages it. "
                          "Set train.optimizer_in_backward=false for multi-process training, or launch one process")


def resolve_sharding(cfg: TrainConfig, processes: int, distributed_type: str = "") -> str:
    """`cfg.sharding`, or its default: ddp with several processes, else none.

    Raises TrainingError for `none` under several processes, and for an accelerate launcher config that
    asks for accelerate's own FSDP or DeepSpeed (train.sharding is the one switch).
    """
    if "FSDP" in distributed_type or "DEEPSPEED" in distributed_type:
        raise TrainingError(f"the launcher asks for {distributed_type.rsplit('.', 1)[-1]}; instructkit shards with "
                            "PyTorch FSDP2 itself: set train.sharding: fsdp and launch with `torchrun "
                            "--nproc_per_node N -m instructkit train CONFIG` (or `accelerate launch` without an "
                            "FSDP/DeepSpeed config)")
    sharding = cfg.sharding or ("ddp" if processes > 1 else "none")
    if sharding == "none" and processes > 1:
        raise TrainingError(f"train.sharding=none with {processes} processes: each would train its own copy. "
                            "Use ddp or fsdp, or launch one process")
    return sharding


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's MixedPrecisionPolicy for train.precision (fp32: none; bf16: bf16 compute, fp32 reduction)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp16":
        raise TrainingError("train.sharding=fsdp with train.precision=fp16 is not supported (it needs a sharded "
                            "gradient scaler): use bf16 or fp32")
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class the model names in `_no_split_modules`
    (transformers: e.g. LlamaDecoderLayer, Gemma3DecoderLayer). Raises TrainingError when there are none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise TrainingError(f"train.sharding=fsdp: cannot find the decoder layers of {type(model).__name__} "
                            f"(_no_split_modules={sorted(names)}); use ddp")
    return layers


def shard_model(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, processes: int) -> torch.nn.Module:
    """Apply FSDP2 in place: `fully_shard` each decoder layer, then the root (embeddings, norm, LM head).

    Call before building the optimizer (it must hold the sharded DTensor parameters). Raises
    TrainingError for what FSDP2 here cannot do (LoRA adapters, fp16, in-backward optimizer steps).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if cfg.lora.enabled:
        raise TrainingError("train.sharding=fsdp with LoRA is not supported: LoRA trains a small adapter, so "
                            "keep the base model whole with ddp")
    if cfg.optimizer_in_backward:
        raise TrainingError("train.sharding=fsdp with train.optimizer_in_backward=true is not supported")
    if not torch.distributed.is_initialized():
        raise TrainingError("train.sharding=fsdp needs a process group: launch with torchrun "
                            "(torchrun --nproc_per_node N -m instructkit train CONFIG; N may be 1)")
    policy = mixed_precision_policy(cfg.precision)
    mesh = init_device_mesh(device.type, (processes,))
    model.to(device)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    model._is_fsdp_managed_module = True  # transformers' generate then keeps every process stepping together
    logger.info("FSDP2: %d decoder layers + root sharded over %d processes (%s)", len(layers),
                processes, cfg.precision)
    return model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP2: reduce-scatter gradients only on the window's last micro-batch (the others accumulate)."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def plain_norm(norm: Any) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP2's clip_grad_norm_ returns a DTensor: gather its value)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else torch.as_tensor(norm)


def full_weights(model: torch.nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    """The trainable weights gathered whole on the main process, on CPU (None elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {name for name, p in model.named_parameters() if p.requires_grad}  # tied weights once
    return {k: v for k, v in full.items() if k in names} if main else None


def load_full_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
    """The inverse of `full_weights`: the main process's whole tensors scattered into every process's
    shards (the others pass None); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors or {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=False))


def _unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class: fully_shard swaps in a subclass `FSDP<Name>` of (FSDPModule, class)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def consolidated_model(model: torch.nn.Module, main: bool) -> torch.nn.Module | None:
    """The sharded model's weights gathered into a plain module of its own class, on the main process
    (None on the others). A collective: every process calls it. Memory: one full copy, on CPU, on rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    dtype = next(iter(full.values())).dtype
    plain = _unsharded_class(model)(copy.deepcopy(model.config)).to(dtype)
    try:
        plain.load_state_dict(full)
    except RuntimeError as exc:
        raise TrainingError(f"the gathered weights do not fit {type(plain).__name__}: {exc}") from None
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain
