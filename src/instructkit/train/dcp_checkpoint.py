"""Sharded checkpoints (train.sharding=fsdp) with `torch.distributed.checkpoint` (DCP). No pickle on disk.

    checkpoints/step-000004/
      sharded/shard-0000<r+1>-model-00001-of-00001.safetensors   rank r's pieces of the weights and AdamW
                              state ("model.<name>", "optimizer.state.<name>.<exp_avg|exp_avg_sq|step>"),
                              each with its offset in the full tensor in the safetensors header (JSON)
      optimizer.json          the optimizer's non-tensor entries (param_groups: lr, betas, ...) by name
      rng.safetensors state.json   RNG of every process, scheduler, data position (as unsharded checkpoints)
      manifest.json           sha256 and size of every file above, sharded/ included; written last

Each process writes only its own shard file, through DCP's `HuggingFaceStorageWriter(save_distributed=True)`;
rank 0 writes the rest, then seals (manifest, fsync, rename of `.tmp-step-*` into place) exactly as
train/checkpoint.py does, so a kill leaves a complete checkpoint or none. The run folder must be one
folder every process sees (a shared filesystem across nodes): rank 0 hashes every shard.

DCP metadata and pickle: DCP's default `FileSystemWriter` keeps its metadata (which piece of which tensor
is where) in a `.metadata` file written with `pickle.dump` and read with `pickle.load` (torch 2.13,
torch/distributed/checkpoint/filesystem.py), so loading one would unpickle. The Hugging Face storage
writer/reader of DCP keep that metadata as JSON in each safetensors header ("DCP_SHARDING_INFO": the
offsets) and rebuild it from there on load, so nothing here needs pickle: tensors are safetensors,
everything else JSON. Loading reshards: each process reads the pieces overlapping its own shard, so a
checkpoint of 2 processes resumes on 1 (or 4), and an unsharded run (none/ddp) can load it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from instructkit.errors import TrainingError
from instructkit.train.checkpoint import (
    _jsonable,
    _prune,
    _seal,
    _tidy,
    _write_json,
    checkpoints_dir,
    read_state,
    step_dir_name,
    verify_folder,
    write_state,
)
from instructkit.train.distributed import broadcast, gather_rng

SHARDED = "sharded"


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _state_dicts(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors keyed "model.<name>" / "optimizer.<key>", the optimizer's non-tensor entries).

    Weights: the trainable parameters by name (tied weights once, as named_parameters lists them); the
    values are this process's DTensor shards under FSDP2, whole tensors otherwise.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {f"model.{k}": v for k, v in get_model_state_dict(model).items() if k in names}
    optim = get_optimizer_state_dict(model, optimizer, options=_options())
    tensors = {f"optimizer.{k}": v for k, v in optim.items() if isinstance(v, torch.Tensor)}
    return {**weights, **tensors}, {k: v for k, v in optim.items() if not isinstance(v, torch.Tensor)}


def save_sharded(run: Any, step: int, sampler_state: dict[str, Any], extra: dict[str, Any],
                 best_weights: Path | None = None) -> Path:
    """Write `checkpoints/step-<step>` from every process (a collective) and return its path
    (`best_weights`: checkpoint.write_state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    root = checkpoints_dir(run.run_dir)
    folder = None
    if run.main:
        root.mkdir(parents=True, exist_ok=True)
        _tidy(root)
        folder = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        (folder / SHARDED).mkdir(parents=True)
    folder = Path(broadcast(run.accelerator, str(folder) if folder else None))
    tensors, scalars = _state_dicts(run.unwrapped, getattr(run.optimizer, "optimizer", run.optimizer))
    # Each process writes shard-<rank+1>; the call returns once every process's file is written.
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDED), save_distributed=True))
    rng = gather_rng(run.accelerator)
    target = root / step_dir_name(step)
    if run.main:
        _write_json(folder / "optimizer.json", {"scalars": _jsonable(scalars), "world_size":
                                                run.accelerator.num_processes})
        write_state(folder, step, run.scheduler, sampler_state, rng, extra, best_weights)
        target = _seal(folder, target, {"step": step, "sharded": run.accelerator.num_processes})
        _prune(root, run.cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()
    return target


def load_sharded(path: Path, run: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG from a DCP checkpoint, on any number of
    processes; returns state.json. Raises TrainingError when the folder fails verification or does not
    fit the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if run.main and (problem := verify_folder(path)) is not None:
        raise TrainingError(f"checkpoint {path} is damaged: {problem}")
    model, optimizer = run.unwrapped, getattr(run.optimizer, "optimizer", run.optimizer)
    tensors, _ = _state_dicts(model, optimizer)  # the layout to fill, initialised (optimizer state too)
    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / SHARDED)))
    except (RuntimeError, KeyError, ValueError) as exc:  # DCP wraps a missing key or shape in CheckpointException
        raise TrainingError(f"checkpoint {path} does not fit this model and optimizer: {exc}") from None
    saved = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))["scalars"]
    optim = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    optim.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    set_model_state_dict(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                         options=_strict_false())
    set_optimizer_state_dict(model, optimizer, optim, options=_options())
    return read_state(path, run.scheduler, run.accelerator.process_index, restore_rng_state=True)


def _strict_false() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)  # tied weights are saved once (the LM head follows the embedding)
