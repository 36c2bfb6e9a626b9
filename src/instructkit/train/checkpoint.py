"""Atomic checkpoints for exact resume. No pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `run_dir/checkpoints/step-000123/` (train.sharding=fsdp: model and optimizer as
DCP shards instead, train/dcp_checkpoint.py):

    model.safetensors       the trainable parameters by name (LoRA: the adapter only; tied weights once)
    optimizer.safetensors   optimizer state tensors, key "<param index>.<name>" (AdamW: step, exp_avg, exp_avg_sq)
    optimizer.json          param_groups, non-tensor state, and the parameter name of every index
    rng.safetensors         torch RNG state (uint8) of every process: "torch.<rank>" (+ "cuda.<rank>.<device>")
    state.json              step, scheduler state, data position (epoch, step in epoch, sampler seed, plan
                            digest), python and numpy RNG state per process, caller extras (the loop: its
                            TrainState and the fp16 loss scale)
    best.safetensors        checkpoints/best's weights when the best step is an earlier one (a hard link): a
                            resume puts back the best this state knows, not one a later, lost step wrote
    manifest.json           sha256 and size of every file above; written last

It is written to `checkpoints/.tmp-step-000123-<pid>/`, every file fsynced, then the folder is renamed into
place, so a crash leaves either no checkpoint or a complete one. A checkpoint without a manifest, with a
missing or truncated file or a hash mismatch is skipped by `latest_good_checkpoint` with a warning. After
a new checkpoint is complete, all but the newest `keep` are deleted.

Size of a full fine-tuning checkpoint (fp32): weights 4 bytes + AdamW's two moments 8 bytes per trainable
parameter = 12 bytes x 135M = 1.6 GB for SmolLM2-135M; with LoRA (r=16, ~5M parameters) about 60 MB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from instructkit.errors import TrainingError
from instructkit.io import fsync_dir, replace_folder, sha256_file
from instructkit.train.optim_state import join_state, split_state

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
BEST = "best"
BEST_WEIGHTS = "best.safetensors"  # in a checkpoint: the weights of its state's best step (see the docstring)
_STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = 1


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# --------------------------------------------------------------------------------------------------
# RNG state (python, numpy, torch) <-> JSON + tensors
# --------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG state: python and numpy as JSON-ready values, torch as uint8 tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Model and optimizer tensors
# --------------------------------------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes, by name (shared/tied parameters appear once)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved tensors into the model's trainable parameters; the name sets must match exactly.

    Raises TrainingError naming `source` when a parameter is missing, unexpected, or of another shape.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise TrainingError(
            f"{source} does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} (a different model, or LoRA "
            "switched on/off since it was written?)")
    with torch.no_grad():
        for name, p in params.items():
            saved = tensors[name]
            if saved.shape != p.shape:
                raise TrainingError(f"{source}: {name} has shape {tuple(saved.shape)}, the model {tuple(p.shape)}")
            p.copy_(saved)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name of every optimizer parameter, in the optimizer's index order (0, 1, ...)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise TrainingError("the optimizer holds a parameter that is not in the model")
            out.append(names[id(p)])
    return out


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors for safetensors, JSON for everything else; train/optim_state.py)."""
    sd = optimizer.state_dict()
    tensors, scalars = split_state(sd["state"])
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = join_state(tensors, meta["scalars"])
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """A LambdaLR's state as JSON (its lr functions are code, rebuilt by the caller)."""
    state = dict(scheduler.state_dict())
    state.pop("lr_lambdas", None)
    return _jsonable(state)


def load_scheduler_state(scheduler: Any, state: dict[str, Any]) -> None:
    full = dict(state)
    if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: keep the functions it was built with
        full["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(full)


# --------------------------------------------------------------------------------------------------
# Files with hashes
# --------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes `source`'s bytes: a hard link (never rewritten in place, so it stays valid), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        _fsync_file(target)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


def _seal(folder: Path, target: Path, info: dict[str, Any]) -> Path:
    """Write the manifest (hash of every file), fsync, and rename `folder` onto `target`."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):  # sharded/ (DCP) included
        files[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    _write_json(folder / "manifest.json", {"format": FORMAT, **info, "files": files})
    for sub in [p for p in folder.rglob("*") if p.is_dir()] + [folder]:
        fsync_dir(sub)
    # a target that exists (e.g. a corrupt step-N left by a killed run, rewritten after resuming from
    # N-1) is moved aside under a name `_tidy` recognises, so a kill mid-swap loses nothing
    return replace_folder(folder, target, aside=target.with_name(f".old-{target.name}-{os.getpid()}"))


def _tidy(root: Path) -> None:
    """Clear what a process killed mid-write left: `.tmp-*` (never sealed) and `.old-<name>-<pid>` (moved
    aside by `_seal`; put back when the kill came before its replacement was renamed in, else removed)."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(root.glob(".old-*")):
        name = old.name[len(".old-"):].rsplit("-", 1)[0]
        target = root / name
        if name and not target.exists():
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def verify_folder(path: Path) -> str | None:
    """None if every file listed in the manifest is present with its size and sha256; else the problem."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (an interrupted write?)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != meta["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
        if sha256_file(file) != meta["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupt)"
    return None


# --------------------------------------------------------------------------------------------------
# Save / find / load
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler_state: dict[str, Any],
    rng_state: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    best_weights: Path | None = None,
) -> Path:
    """Write `checkpoints/step-<step>` atomically and keep only the newest `keep` checkpoints.

    `model` is the unwrapped model (no DDP wrapper). `rng_state` is one process's `capture_rng()` or a
    list with one per process (rank order); default: this process's. `best_weights`: see `write_state`.
    Returns the checkpoint folder.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _tidy(root)
    folder = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    folder.mkdir()

    _write_tensors(folder / "model.safetensors", trainable_state(model))
    opt_tensors, opt_meta = _optimizer_split(optimizer)
    opt_meta["param_names"] = _param_names(model, optimizer)
    _write_tensors(folder / "optimizer.safetensors", opt_tensors)
    _write_json(folder / "optimizer.json", opt_meta)

    write_state(folder, step, scheduler, sampler_state, rng_state, extra, best_weights)
    target = _seal(folder, root / step_dir_name(step), {"step": step})
    _prune(root, keep)
    return target


def write_state(folder: Path, step: int, scheduler: Any, sampler_state: dict[str, Any],
                rng_state: dict[str, Any] | Sequence[dict[str, Any]] | None, extra: dict[str, Any] | None,
                best_weights: Path | None = None) -> None:
    """rng.safetensors (torch RNG of every process) + state.json (step, scheduler, data position, python and
    numpy RNG per process, extras): the part of a checkpoint that does not depend on how weights are kept;
    plus `best_weights` (a weights file: checkpoints/best's) linked as best.safetensors."""
    if best_weights is not None:
        link_or_copy(best_weights, folder / BEST_WEIGHTS)
    states = [capture_rng()] if rng_state is None else (
        [rng_state] if isinstance(rng_state, dict) else list(rng_state))
    rng_tensors: dict[str, torch.Tensor] = {}
    for rank, state in enumerate(states):
        rng_tensors[f"torch.{rank}"] = state["torch"]
        for device, cuda_state in enumerate(state.get("cuda") or []):
            rng_tensors[f"cuda.{rank}.{device}"] = cuda_state
    _write_tensors(folder / "rng.safetensors", rng_tensors)
    _write_json(folder / "state.json", {
        "step": step,
        "scheduler": scheduler_state(scheduler) if scheduler is not None else None,
        "sampler": _jsonable(sampler_state),
        "rng": [{"python": s["python"], "numpy": s["numpy"]} for s in states],
        "extra": _jsonable(extra or {}),
    })


def read_state(path: Path, scheduler: Any, rank: int, restore_rng_state: bool) -> dict[str, Any]:
    """Restore the scheduler and this process's RNG (rank `rank`) from `write_state`'s files; returns
    state.json. A rank the checkpoint has no RNG for (resumed on more processes) keeps its own, seeded per
    process at set-up: a copy of rank 0's would give two processes the same dropout masks."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if scheduler is not None and state.get("scheduler") is not None:
        load_scheduler_state(scheduler, state["scheduler"])
    if restore_rng_state and rank < len(state["rng"]):
        rng = load_file(str(path / "rng.safetensors"))
        ranks, mine = state["rng"], rank
        restore_rng({
            **ranks[mine],
            "torch": rng[f"torch.{mine}"],
            "cuda": [rng[k] for k in sorted(k for k in rng if k.startswith(f"cuda.{mine}."))],
        })
    return state


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """step-* folders, oldest first (verified or not)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_good_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose manifest verifies; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_folder(path)
        if problem is None:
            return path
        logger.warning("skipping checkpoint %s: %s", path, problem)
    return None


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    rank: int = 0,
    restore_rng_state: bool = True,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG state from a checkpoint folder.

    Returns state.json's content: {"step", "sampler" (the data position), "extra", ...}. Verifies the
    manifest first and raises TrainingError naming the file when it does not.
    """
    path = Path(path)
    problem = verify_folder(path)
    if problem is not None:
        raise TrainingError(f"checkpoint {path} is damaged: {problem}")
    load_trainable_state(model, load_file(str(path / "model.safetensors")), str(path / "model.safetensors"))
    if optimizer is not None:
        meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        names = _param_names(model, optimizer)
        if names != meta["param_names"]:
            raise TrainingError(f"{path / 'optimizer.json'}: the optimizer's parameters differ from this run's "
                                f"({len(meta['param_names'])} saved, {len(names)} now)")
        optimizer.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), meta))
    return read_state(path, scheduler, rank, restore_rng_state)


# --------------------------------------------------------------------------------------------------
# The best model's weights
# --------------------------------------------------------------------------------------------------


def best_dir(run_dir: str | os.PathLike) -> Path:
    return checkpoints_dir(run_dir) / BEST


def save_best(run_dir: str | os.PathLike, model: torch.nn.Module, info: dict[str, Any],
              weights_from: str | os.PathLike | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `checkpoints/best/` (trainable weights in safetensors + best.json) atomically, replacing it.

    `weights_from`: a checkpoint of this very step, whose model.safetensors (the same bytes) is hard-linked
    instead of written again (checkpoint files are never rewritten in place, so the link stays valid when
    the checkpoint is pruned), or a weights file (a checkpoint's best.safetensors); copied where links are not
    possible. `tensors`: the weights to write instead of the model's (FSDP2: gathered from the shards).
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _tidy(root)
    folder = root / f".tmp-best-{os.getpid()}"
    folder.mkdir()
    try:
        if weights_from is None:
            raise FileNotFoundError
        source = Path(weights_from)
        link_or_copy(source if source.is_file() else source / "model.safetensors", folder / "model.safetensors")
    except OSError:
        _write_tensors(folder / "model.safetensors", trainable_state(model) if tensors is None else tensors)
    _write_json(folder / "best.json", _jsonable(info))
    return _seal(folder, best_dir(run_dir), {"best": _jsonable(info)})


def read_best(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of `checkpoints/best/`, verified first (TrainingError when damaged)."""
    path = Path(path)
    problem = verify_folder(path)
    if problem is not None:
        raise TrainingError(f"best checkpoint {path} is damaged: {problem}")
    return load_file(str(path / "model.safetensors"))


def load_best(path: str | os.PathLike, model: torch.nn.Module) -> dict[str, Any]:
    """Load `checkpoints/best/` weights into the model; returns best.json (step, metric, value).

    Raises TrainingError when the folder fails verification (missing file, size or sha256 mismatch).
    """
    load_trainable_state(model, read_best(path), str(Path(path) / "model.safetensors"))
    with contextlib.suppress(FileNotFoundError):
        return json.loads((path / "best.json").read_text(encoding="utf-8"))
    return {}
