"""Export a saved instruct model to one GGUF file (llama.cpp, Ollama, LM Studio), in pure Python.

    export_model("runs/demo/model", "smollm2-tuned.q8_0.gguf", quant="q8_0", ollama=True)

The `gguf` package (llama.cpp's own gguf-py) writes the file: `TensorNameMap` gives the GGUF tensor names,
`SpecialVocab` the merges and special tokens, `gguf.quants` quantizes in numpy (Q8_0 bit-exact with ggml).
No compiler, no llama.cpp checkout, no download. What is written follows llama.cpp's convert_hf_to_gguf.py:

- weights: Llama's q/k projections permuted to llama.cpp's rotary layout (transformers' GGUF loader undoes
  it); Gemma-3's RMSNorm weights stored as 1 + w; norms and biases stay F32; a LoRA adapter saved alone is
  loaded onto its base and merged first (`models.load`);
- metadata: the architecture's hyper-parameters, the vocabulary (`models.export_vocab`), BOS/EOS/PAD and
  end-of-turn ids, whether BOS/EOS are added, and the chat template.

Quant types: f32, f16, bf16, q8_0 (`QUANT_TYPES`). K-quants (Q4_K_M ...) need llama.cpp's compiled
`llama-quantize`; run it on an f16 export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.errors import ModelError
from instructkit.io import fsync_dir
from instructkit.models.card import CONFIG_FILE

logger = logging.getLogger(__name__)

# name -> (GGMLQuantizationType member, LlamaFileType member) of the 2-D weights
QUANT_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers `model_type` becomes a GGUF architecture (see convert_hf_to_gguf.py)."""

    gguf_arch: str  # gguf.MODEL_ARCH member
    permute_qk: bool = False  # llama.cpp's rotary layout for q/k (LlamaModel.permute)
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's RMSNorm multiplies by 1 + w)
    rope_dims: bool = False  # write rope.dimension_count (= head_dim)
    head_lengths: bool = False  # write attention.key_length / value_length (= head_dim)


ARCHITECTURES = {
    "llama": ArchSpec("LLAMA", permute_qk=True, rope_dims=True),
    "qwen2": ArchSpec("QWEN2"),
    "gemma3_text": ArchSpec("GEMMA3", norm_shift=1.0, head_lengths=True),
}


@dataclass
class ExportResult:
    """What `export_model` wrote: the GGUF file, its quant type, wall seconds (loading included), size in
    bytes, and the Modelfile (None without `ollama`)."""

    gguf: Path
    quant: str
    seconds: float
    bytes: int
    modelfile: Path | None = None


def check_quant(quant: str) -> str:
    """The quant type in lower case. Raises: ModelError naming it and the supported ones."""
    name = str(quant).strip().lower()
    if name not in QUANT_TYPES:
        raise ModelError(f"unsupported GGUF quant type {quant!r}: use one of {', '.join(QUANT_TYPES)}. "
                         "K-quants (q4_k_m ...) need llama.cpp's compiled llama-quantize: export f16, then "
                         "run it.")
    return name


def check_saved_model(folder: str | os.PathLike) -> Path:
    """`folder` when it holds an instruct model saved by instructkit (its instructkit_config.json).

    Raises: ModelError when it is missing, a file, or not a saved instruct model (naming a saved model
    inside it, e.g. a run folder's model/, when there is one).
    """
    path = Path(folder)
    if not path.exists():
        raise ModelError(f"model folder {path} not found")
    if not path.is_dir():
        raise ModelError(f"{path} is a file, not a model folder: give the folder `instructkit run` or "
                         "`instructkit train` saved (it holds instructkit_config.json)")
    if not (path / CONFIG_FILE).is_file():
        inside = sorted(p.parent for p in path.glob(f"*/{CONFIG_FILE}"))
        hint = f" Did you mean {inside[0]}?" if inside else ""
        raise ModelError(f"{path} is not an instruct model saved by instructkit (no {CONFIG_FILE}).{hint}")
    return path


def saved_record(folder: Path) -> dict[str, Any]:
    """The saved model's instructkit_config.json ({} when unreadable)."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """The output path, refused when it exists (unless `force`) or is a folder. Raises: ModelError."""
    out = Path(path)
    if out.is_dir():
        raise ModelError(f"output {out} is a folder; give a file name such as {out / 'model.q8_0.gguf'}")
    if out.exists() and not force:
        raise ModelError(f"output {out} already exists; pass --force (export: force) to replace it")
    return out


def arch_spec(config: Any) -> ArchSpec:
    """The export recipe of a transformers config. Raises: ModelError for an architecture not mapped."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = ", ".join(getattr(config, "architectures", None) or []) or "?"
        raise ModelError(f"GGUF export does not know architecture {model_type!r} ({names}); it supports "
                         f"{', '.join(ARCHITECTURES)} (Llama/SmolLM2, Qwen2, Gemma-3 text)")
    return ARCHITECTURES[model_type]


def rope_theta(config: Any, layer_type: str | None = None) -> float:
    """rope_theta of a config (transformers 5 keeps it in rope_parameters, per layer type for Gemma-3).

    Raises: ModelError when the rotary embedding is scaled (not written by this exporter).
    """
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ModelError(f"rope scaling {rope_type!r} is not supported by the GGUF export (default rope "
                         "only)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelError(f"{config.model_type}: config has no rope_theta")
    return float(theta)


def check_gemma3(config: Any) -> None:
    """What llama.cpp hard-codes for Gemma-3 text models must hold. Raises: ModelError naming the field."""
    head_dim = config.head_dim
    expected_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                      for i in range(config.num_hidden_layers)]
    problems = []
    if float(config.query_pre_attn_scalar) != float(head_dim):
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim {head_dim}")
    if list(getattr(config, "layer_types", expected_types)) != expected_types:
        problems.append("layer_types is not the 5 sliding : 1 full pattern")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        problems.append("attn_logit_softcapping is set")
    if rope_theta(config, "sliding_attention") != 10000.0:
        problems.append("the sliding layers' rope_theta is not 10000")
    if problems:
        raise ModelError("this Gemma-3 config cannot be exported for llama.cpp: " + "; ".join(problems))


def write_hparams(writer: Any, config: Any, spec: ArchSpec) -> None:
    """The architecture's hyper-parameters, under llama.cpp's keys."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if spec.gguf_arch == "GEMMA3":
        check_gemma3(config)
        writer.add_rope_freq_base(rope_theta(config, "full_attention"))
        writer.add_sliding_window(config.sliding_window)
        if getattr(config, "final_logit_softcapping", None) is not None:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
    else:
        if getattr(config, "use_sliding_window", False):
            raise ModelError(f"{config.model_type}: use_sliding_window is not supported by the GGUF export")
        writer.add_rope_freq_base(rope_theta(config))
    if spec.rope_dims:
        writer.add_rope_dimension_count(head_dim)
    if spec.head_lengths or head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def permute_qk(weights: Any, n_head: int) -> Any:
    """llama.cpp's rotary layout of a q/k projection (convert_hf_to_gguf.py `LlamaModel.permute`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(model: Any, spec: ArchSpec) -> Iterator[tuple[str, Any]]:
    """(GGUF name, float32 numpy array) for every weight, in state-dict order; a tied LM head is left out.

    Raises: ModelError when a weight has no GGUF name.
    """
    import gguf
    import torch

    config = model.config
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.gguf_arch), config.num_hidden_layers)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: no GGUF name for weight {hf_name!r} of {config.model_type}")
        with torch.no_grad():
            data = tensor.detach().to(torch.float32).cpu().numpy()
        if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, heads)
        elif spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, kv_heads)
        if spec.norm_shift and hf_name.endswith("norm.weight"):
            data = data + spec.norm_shift
        yield name, data


def quantized(name: str, data: Any, quant: str) -> tuple[Any, Any]:
    """(array, GGMLQuantizationType) as written: 1-D tensors and norms stay F32 (as llama.cpp does);
    a row length that is not a multiple of the block size falls back to F16."""
    import gguf
    import numpy as np

    qtype = getattr(gguf.GGMLQuantizationType, QUANT_TYPES[quant][0])
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(np.ascontiguousarray(data), qtype), qtype
    except gguf.quants.QuantError:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(model: Any, tokenizer: Any, out: Path, quant: str, *, name: str | None = None,
               license_id: str | None = None) -> None:
    """Write `model` + `tokenizer` as one GGUF file at `out`, atomically (a temporary file beside it, then
    a rename): a failure leaves `out` as it was and no temporary file behind.

    Raises: ModelError for an architecture, configuration or tokenizer the export cannot write;
    OSError when writing fails.
    """
    import gguf

    from instructkit.models.export_vocab import write_vocab

    quant = check_quant(quant)
    spec = arch_spec(model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, spec.gguf_arch)])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        if name:
            writer.add_name(name)
        if license_id:
            writer.add_license(license_id)
        write_hparams(writer, model.config, spec)
        writer.add_file_type(getattr(gguf.LlamaFileType, QUANT_TYPES[quant][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, tokenizer, model.config)
        for tensor_name, data in gguf_tensors(model, spec):
            array, qtype = quantized(tensor_name, data, quant)
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def export_model(model_dir: str | os.PathLike, out: str | os.PathLike, *, quant: str = "q8_0",
                 ollama: bool = False, force: bool = False) -> ExportResult:
    """Export the instruct model saved in `model_dir` to the GGUF file `out` (and, with `ollama`, a
    Modelfile beside it). Everything is checked before anything is written; each file is written to a
    temporary name and renamed, so a failure leaves nothing half-written.

    Raises: ModelError (exit 2) for an unsupported quant type, a folder that is not a saved instruct model,
    an output that exists without `force`, an architecture or tokenizer the export does not know, or a
    missing `gguf` package.
    """
    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model
    from instructkit.models.ollama import modelfile_path, render_modelfile
    from instructkit.models.resolve import resolve_model_config

    quant = check_quant(quant)
    folder = check_saved_model(model_dir)
    out = check_output(out, force)
    modelfile = check_output(modelfile_path(out), force) if ollama else None
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("GGUF export needs the gguf package: pip install 'instructkit[gguf]'") from None
    cfg = ModelConfig(name=str(folder))
    arch_spec(resolve_model_config(cfg))  # an unknown architecture fails before the weights load
    start = time.perf_counter()
    loaded = load_model(cfg)
    prov = loaded.provenance
    model_cfg = (saved_record(folder).get("train_config") or {}).get("model") or {}
    text = render_modelfile(loaded.tokenizer, loaded.model.config, out, prov,
                            chat=model_cfg.get("chat_template", True),
                            system_prompt=model_cfg.get("system_prompt")) if modelfile else None
    write_gguf(loaded.model, loaded.tokenizer, out, quant,
               name=f"{prov.get('base_model') or prov.get('name') or folder.name} (instructkit)",
               license_id=prov.get("license_id"))
    if modelfile is not None and text is not None:
        from instructkit.io import atomic_open

        with atomic_open(modelfile) as handle:
            handle.write(text)
    seconds = time.perf_counter() - start
    logger.info("exported %s (%s, %.1f MB) in %.1f s", out, quant, out.stat().st_size / 1e6, seconds)
    return ExportResult(out, quant, round(seconds, 2), out.stat().st_size, modelfile)


def export_run_model(model_dir: Path, folder: Path, name: str, settings: Any) -> ExportResult:
    """The export at the end of `instructkit run`: `folder/<name>.<settings.gguf>.gguf` (+ Modelfile with
    `settings.ollama`), replacing the run's earlier export. Raises: ModelError as `export_model` does."""
    return export_model(model_dir, Path(folder) / f"{name}.{settings.gguf}.gguf", quant=settings.gguf,
                        ollama=settings.ollama, force=True)
