"""An optimizer's per-parameter state <-> (tensors for safetensors, JSON-ready values): no pickle.

    state {0: {"step": 3, "__bnb_optimizer_quant_state__": {"state1": uint8 [...], "qmap1": ...}}}
    -> tensors {"0.__bnb_optimizer_quant_state__.state1": ..., ...}, scalars {"0": {"step": 3, ...}}

Nested dicts (bitsandbytes keeps its 8-bit state in one) become dotted tensor keys; torch's, bitsandbytes'
and transformers' state keys contain no dot. A tensor sharing memory with one already taken (bitsandbytes
hands every parameter the same quantization map) is copied, since safetensors refuses shared tensors.
Both directions are exact: tensors keep dtype and bits, JSON floats round-trip exactly.
"""

from __future__ import annotations

from typing import Any

import torch


def split_state(state: dict[Any, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """optimizer.state_dict()["state"] -> (tensors by dotted key, everything else nested by index)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()

    def split(prefix: str, entries: dict, out: dict) -> None:
        for key, value in entries.items():
            if isinstance(value, dict):
                split(f"{prefix}.{key}", value, out.setdefault(key, {}))
            elif isinstance(value, torch.Tensor):
                value = value.detach().contiguous()
                shared = value.numel() > 0 and value.data_ptr() in seen
                tensors[f"{prefix}.{key}"] = value.clone() if shared else value
                seen.add(value.data_ptr())
            else:
                out[key] = value

    for index, entries in state.items():
        split(str(index), entries, scalars.setdefault(str(index), {}))
    return tensors, scalars


def join_state(tensors: dict[str, torch.Tensor], scalars: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The inverse of split_state: {param index: state} for optimizer.load_state_dict."""
    state: dict[int, dict[str, Any]] = {int(index): entries for index, entries in scalars.items()}
    for key, value in tensors.items():
        index, *path, name = key.split(".")
        entries = state.setdefault(int(index), {})
        for part in path:
            entries = entries.setdefault(part, {})
        entries[name] = value
    return state
