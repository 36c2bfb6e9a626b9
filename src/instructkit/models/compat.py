"""Make a saved model folder load the same under transformers 4.x as under the 5.x that wrote it.

transformers 5 writes RoPE settings only inside `rope_parameters`, the dtype as `dtype`, and a tokenizer
loaded from tokenizer.json as class "TokenizersBackend". transformers 4 (still bundled by vLLM, TGI and
many notebooks) does not read `rope_parameters`: it builds the model with its default `rope_theta` (10000)
without a warning, so a model tuned with rope_theta 100000 (SmolLM2) or 500000 (Llama 3) loads with other
weights' meaning and generates worse text (vllm-project/vllm#42624); and it refuses the tokenizer class
("Tokenizer class TokenizersBackend does not exist"). `add_legacy_fields` writes the 4.x names beside the
5.x ones, with the same values, so both read the same model:

    config.json            rope_theta (+ rope_scaling unless default, partial_rotary_factor,
                           rope_local_base_freq for per-layer-type RoPE as in Gemma 3), torch_dtype
    tokenizer_config.json  tokenizer_class PreTrainedTokenizerFast (what TokenizersBackend is called in 4.x,
                           an alias of it in 5.x); a list-valued extra_special_tokens (5.x) is also written
                           as additional_special_tokens (4.x reads extra_special_tokens as a dict); the
                           loading arguments is_local / local_files_only that 5.x stores are dropped

Keys already present are kept as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructkit.io import write_json

_LOADING_ARGUMENTS = ("is_local", "local_files_only")


def add_legacy_fields(folder: str | Path) -> None:
    """Rewrite `folder`'s config.json and tokenizer_config.json (those present) with the transformers-4 names
    of their settings (module docstring). Raises: OSError when a file cannot be rewritten."""
    folder = Path(folder)
    for name, edit in (("config.json", legacy_config), ("tokenizer_config.json", legacy_tokenizer_config)):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            edited = edit(data)
            if edited != data:
                write_json(path, edited)


def legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (config.json content) with rope_theta / rope_scaling / partial_rotary_factor /
    rope_local_base_freq from `rope_parameters` and torch_dtype from `dtype`, in it and in every nested
    sub-config (text_config, decoder, ...), where not already set."""
    out = {key: legacy_config(value) if isinstance(value, dict) and "model_type" in value else value
           for key, value in config.items()}
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and rope:
        per_layer_type = all(isinstance(v, dict) for v in rope.values())
        main = rope.get("full_attention", next(iter(rope.values()))) if per_layer_type else rope
        legacy = {}
        if "rope_theta" in main:
            legacy["rope_theta"] = main["rope_theta"]
        if main.get("rope_type", "default") != "default":
            legacy["rope_scaling"] = {k: v for k, v in main.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if "partial_rotary_factor" in main:
            legacy["partial_rotary_factor"] = main["partial_rotary_factor"]
        local = rope.get("sliding_attention") if per_layer_type else None
        if isinstance(local, dict) and "rope_theta" in local:
            legacy["rope_local_base_freq"] = local["rope_theta"]
        for key, value in legacy.items():
            if out.get(key) is None:
                out[key] = value
    if "dtype" in out and out.get("torch_dtype") is None:
        out["torch_dtype"] = out["dtype"]
    return out


def legacy_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (tokenizer_config.json content) readable by transformers 4.x (module docstring)."""
    out = {key: value for key, value in config.items() if key not in _LOADING_ARGUMENTS}
    if out.get("tokenizer_class") == "TokenizersBackend":
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        if extra and "additional_special_tokens" not in out:
            out["additional_special_tokens"] = extra
        del out["extra_special_tokens"]
    return out
