"""Load model + tokenizer from a resolved folder: safetensors only unless allowed, dtypes, threads.

A LoRA adapter saved alone loads its base model (by the name recorded at save time), applies and merges.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from instructkit.config import ModelConfig
from instructkit.errors import ModelError
from instructkit.models.card import CONFIG_FILE
from instructkit.models.generation import configure_generation, ensure_pad_token
from instructkit.models.gguf_cache import clear_quantizer
from instructkit.models.resolve import (
    ResolvedModel,
    check_model_folder,
    read_hf_config,
    read_provenance,
    resolve_model,
)

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
    """The torch dtype of fp32/bf16/fp16 (or float32/bfloat16/float16).

    Raises: ModelError for any other name.
    """
    import torch

    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return getattr(torch, DTYPES[name])


def load_model(cfg: ModelConfig, *, cache_dir: str | os.PathLike | None = None,
               dtype: str = "fp32") -> LoadedModel:
    """Load model + tokenizer named by `cfg.name` (what a name may be: `instructkit.models.resolve`).

    A built-in short name or a .gguf file is converted once into the cache (default `default_cache_dir()`).
    Weights load from safetensors only, unless `cfg.allow_pickle` (pickle can run code). `dtype`: fp32 is
    the CPU default; bf16/fp16 are for GPUs.

    Raises: ModelError when the name cannot be resolved or the folder cannot be loaded (see `load_folder`).
    """
    resolved = resolve_model(cfg, cache_dir)
    assert isinstance(resolved, ResolvedModel)
    if resolved.adapter:
        return load_adapter_folder(resolved.folder, cfg, cache_dir=cache_dir, dtype=dtype)
    return load_folder(resolved.folder, cfg, resolved.provenance, dtype=dtype)


def choose_attention(requested: str, *, cuda: bool, flash_attn: bool, dtype: str,
                     model_type: str | None = None) -> tuple[str | None, bool, str]:
    """model.attn_implementation -> (the attn_implementation to load with, None for the model's own
    default; whether to switch cuDNN attention off; why), for a CUDA machine or not.

    'auto' on CPU: sdpa_varlen (models/attention.py: each packed example attends on its own, no mask)
    for the architectures it is tested on, else the model's default (sdpa). On CUDA: flash_attention_2
    when `flash_attn` is importable and the weights load in bf16/fp16 (its varlen kernels take packed
    rows as they are; it refuses the fp32 tensors evaluation without autocast would give it); else sdpa
    with cuDNN attention off: since PyTorch 2.10 sdpa prefers cuDNN on H100/H200, which builds an
    execution plan for every new (batch, heads, lengths, mask) shape, forward and backward (~0.5 s each),
    so every new packed width stalled a step; flash and memory-efficient kernels have no such cost.
    Any other value is used as it is.
    """
    from instructkit.models.attention import NAME, VARLEN_MODEL_TYPES

    if requested != "auto":
        return requested, False, "model.attn_implementation"
    if not cuda:
        if model_type in VARLEN_MODEL_TYPES:
            return NAME, False, f"auto on CPU: {NAME}, sdpa per packed example (no block mask)"
        return None, False, f"auto on CPU: the model's default (sdpa; {NAME} is tested on {sorted(VARLEN_MODEL_TYPES)})"
    if flash_attn and DTYPES.get(dtype) in ("bfloat16", "float16"):
        return "flash_attention_2", False, "auto on CUDA: flash_attn installed, bf16/fp16 weights (varlen kernels)"
    return None, True, ("auto on CUDA: sdpa with cuDNN attention off (it plans per new shape); install flash_attn "
                        "and load bf16 weights for flash_attention_2")


def use_attention(requested: str, dtype: str, model_type: str | None = None) -> str | None:
    """Apply `choose_attention` on this machine (switching cuDNN attention off process-wide when it says
    so, registering sdpa_varlen when chosen), log the choice, and return the attn_implementation to load
    with (None: the model's default)."""
    import torch

    from instructkit.models.attention import NAME, register

    implementation, cudnn_off, why = choose_attention(
        requested, cuda=torch.cuda.is_available(), flash_attn=importlib.util.find_spec("flash_attn") is not None,
        dtype=dtype, model_type=model_type)
    if cudnn_off:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if implementation == NAME:
        register()
    logger.info("attention: %s (%s)", implementation or "the model's default", why)
    return implementation


def detect_seq2seq(config: Any, kind: str, folder: Path) -> bool:
    """Encoder-decoder (T5) or decoder-only, from config.json unless `kind` says.

    Raises: ModelError when `kind` (causal/seq2seq) contradicts config.json.
    """
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
    """True: load safetensors; False: load pickle (only with allow_pickle).

    Raises: ModelError when the folder has only pickle weights and not `allow_pickle`, or no weights.
    """
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
    """The folder's tokenizer. Raises: ModelError when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                             local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{folder}: cannot load the tokenizer ({exc}); save it beside the model with "
                         "tokenizer.save_pretrained(folder)") from None


def embedding_rows(model: Any) -> int | None:
    """Rows of the model's input embedding (the token ids it can take), None when it has none."""
    embedding = model.get_input_embeddings()
    return getattr(embedding, "num_embeddings", None)


def load_folder(folder: Path, cfg: ModelConfig, provenance: dict[str, Any] | None = None, *,
                dtype: str = "fp32") -> LoadedModel:
    """Load a Hugging Face model folder (config.json + weights + tokenizer).

    The attention kernel follows `cfg.attn_implementation` (`use_attention`).
    Raises: ModelError when config.json, the weights (pickle refused unless `cfg.allow_pickle`; missing,
    truncated) or the tokenizer cannot be read, `cfg.kind` contradicts the config, the model cannot
    use the attention implementation asked for (e.g. flash_attention_2 without flash_attn), or an
    encoder-decoder names no decoder start token (`set_decoder_start`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    folder = Path(folder)
    check_model_folder(folder)
    config = read_hf_config(folder, cfg.trust_remote_code)
    seq2seq = detect_seq2seq(config, cfg.kind, folder)
    use_safetensors = check_weights(folder, cfg.allow_pickle)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    attention = use_attention(cfg.attn_implementation, dtype, getattr(config, "model_type", None))
    try:
        model = auto.from_pretrained(
            folder, dtype=torch_dtype(dtype), use_safetensors=use_safetensors,
            trust_remote_code=cfg.trust_remote_code, local_files_only=True,
            **({"attn_implementation": attention} if attention else {}),
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError) as exc:  # e.g. truncated
        raise ModelError(f"{folder}: cannot load the model: {exc}") from None
    clear_quantizer(model)
    if seq2seq:
        set_decoder_start(model, folder)
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    ensure_pad_token(tokenizer, embedding_rows(model))
    configure_generation(model, tokenizer)
    prov = provenance if provenance is not None else read_provenance(folder, cfg.name)
    prov = {**prov, "kind": "seq2seq" if seq2seq else "causal"}
    return LoadedModel(model, tokenizer, seq2seq, str(folder), prov)


def set_decoder_start(model: Any, folder: Path) -> int:
    """The decoder's first input id of an encoder-decoder model, on `model.config` (where its forward, which
    shifts the labels right behind it, and rank scoring read it): config.json's `decoder_start_token_id`, else
    its generation_config.json's. Returned.

    Raises: ModelError when neither names it: training would stop in the model's forward with an
    AttributeError / ValueError, generation with "decoder_start_token_id or bos_token_id has to be defined"
    (transformers#8218; configs converted without it, BARTpho#4; a T5Config built in transformers 5 has none).
    """
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ModelError(f"{folder}/config.json has no decoder_start_token_id: the decoder's first input is "
                         "unknown. Add it to config.json (T5: its pad id, usually 0; BART: its EOS id, 2)")
    model.config.decoder_start_token_id = int(start)
    return int(start)


def load_adapter_folder(folder: Path, cfg: ModelConfig, *, cache_dir: str | os.PathLike | None = None,
                        dtype: str = "fp32") -> LoadedModel:
    """A LoRA adapter saved alone: load its base model (the name recorded at save time), apply, merge.

    Raises: ModelError when the adapter weights are missing, no base model is named, the base cannot be
    loaded, or the adapter does not fit it.
    """
    from peft import PeftModel

    from instructkit.models.lora import merge_lora

    check_weights(folder, cfg.allow_pickle, adapter=True)
    adapter_cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    saved_path = folder / CONFIG_FILE
    saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else {}
    base_name = (saved.get("provenance") or {}).get("requested") or adapter_cfg.get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{folder}/adapter_config.json does not name its base model")
    base = load_model(cfg.model_copy(update={"name": base_name}), cache_dir=cache_dir, dtype=dtype)
    try:
        merged = merge_lora(PeftModel.from_pretrained(base.model, folder))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot apply the adapter to {base_name}: {exc}") from None
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code) if has_tokenizer else base.tokenizer
    ensure_pad_token(tokenizer, embedding_rows(merged))
    configure_generation(merged, tokenizer)
    prov = {**base.provenance, "adapter": str(folder)}
    return LoadedModel(merged, tokenizer, base.is_seq2seq, str(folder), prov)


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (None keeps torch's choice); return the count in effect.

    On a shared 2-core CPU, 1 thread was steadier and often faster than 2.
    Raises: ValueError when `n` < 1.
    """
    import torch

    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()
