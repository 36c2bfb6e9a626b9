"""Wrap a model with peft LoRA adapters, and tell a peft model apart."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from instructkit.config import LoraSettings
from instructkit.errors import ModelError


def wrap_lora(model: Any, settings: LoraSettings, seed: int | None = None) -> Any:
    """Wrap `model` in a peft LoRA model: only the adapters train (r x (in + out) parameters per linear).

    `target_modules: all-linear` adapts every linear layer except the LM head.
    `seed` (the run's `train.seed`): the adapters' random initialisation (LoRA A: Kaiming-uniform, B: zeros)
    is drawn from torch's generators seeded with it, inside `torch.random.fork_rng`, so the same seed gives
    bitwise-identical adapters whatever was drawn before; the CPU generator is restored afterwards.
    None draws from the global generator as it stands (the caller seeds).
    Raises: ModelError when peft refuses `settings.target_modules` (no such layer).
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM,
    )
    # fork_rng restores the CPU generator (and the CUDA ones when CUDA is up) on exit; manual_seed seeds all
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise ModelError(f"train.lora.target_modules={settings.target_modules!r}: {exc}") from None


def is_peft_model(model: Any) -> bool:
    """True for a peft-wrapped model. Only a process that imported peft can hold one, so peft is not
    imported here (that import alone took 8.6 s of an uncompiled first run on the 2-core host, at every
    model save of a full fine-tune)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merge_lora(model: Any) -> Any:
    """`model.merge_and_unload()` that keeps the model the adapter was trained as, tied embeddings included.

    With tied embeddings (tie_word_embeddings: the LM head and the input embedding share one weight), an
    adapter on either of them (target_modules naming lm_head or embed_tokens) would be merged into the
    shared weight and so change the other one too: the saved model differed from the trained one
    (peft#2018; a tiny Llama with LoRA on lm_head: logits off by 19). The adapted layer gets its own copy
    of the weight first and the config says the embeddings are untied, so both are saved and reload apart.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if inputs is not None and outputs is not None and inputs.weight is outputs.weight:
        adapted = [m for m in (outputs, inputs) if isinstance(m, LoraLayer)]
        if adapted:
            layer = adapted[0].get_base_layer()
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone(),
                                              requires_grad=layer.weight.requires_grad)
            for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
                config.tie_word_embeddings = False
    return model.merge_and_unload()


def pin_base_path(model: Any) -> None:
    """Name the base model in each adapter's config (adapter_config.json's base_model_name_or_path, which
    peft's AutoPeftModel loads the base by) by an absolute path when it is a local path: peft records the
    base's `name_or_path` as it was typed, so a base loaded as `models/base` named nothing (or another
    model) from any other working directory (trl#341). Hub ids and absolute paths are left as they are."""
    for config in getattr(model, "peft_config", {}).values():
        name = config.base_model_name_or_path
        if name and not Path(name).expanduser().is_absolute() and Path(name).expanduser().exists():
            config.base_model_name_or_path = str(Path(name).expanduser().resolve())
