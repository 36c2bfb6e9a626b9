"""models/lora.py: LoRA wrapping, merged and adapter-alone saves; the seq2seq save round trip."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import PROMPT, card_front_matter, logits_of, lora_with_nonzero_update

from instructkit.config import LoraSettings, ModelConfig
from instructkit.errors import ModelError
from instructkit.models.load import load_model
from instructkit.models.lora import wrap_lora
from instructkit.models.save import save_instruct_model

# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def test_wrap_lora_trains_only_adapters(tiny_llama):
    total = sum(p.numel() for p in tiny_llama.parameters())
    wrapped = wrap_lora(tiny_llama, LoraSettings(enabled=True, r=4))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear on a 2-layer Llama: 7 Linears per layer, r x (in + out) each; the LM head is not adapted.
    expected = 0
    for module in tiny_llama.model.layers:
        attn, mlp = module.self_attn, module.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            expected += 4 * (linear.in_features + linear.out_features)
    assert sum(p.numel() for n, p in wrapped.named_parameters() if p.requires_grad) == expected
    assert sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" not in n) == total


def test_wrap_lora_bad_target_is_a_model_error(tiny_llama):
    with pytest.raises(ModelError, match="target_modules"):
        wrap_lora(tiny_llama, LoraSettings(enabled=True, target_modules=["no_such_layer"]))


def test_lora_merge_saves_a_plain_model(tmp_path, tiny_llama, tiny_tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base_logits = logits_of(tiny_llama, tiny_tokenizer)
    wrapped = lora_with_nonzero_update(tiny_llama)
    tuned_logits = logits_of(wrapped, tiny_tokenizer)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)  # the adapter does something

    out = save_instruct_model(wrapped, tiny_tokenizer, tmp_path / "merged", card={}, train_config=None)
    assert not (out / "adapter_config.json").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert not any("lora" in key for key in handle.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits_of(reloaded, tiny_tokenizer), tuned_logits, atol=1e-5)


def test_lora_adapter_alone_reloads_through_load_model(tmp_path, tiny_model_dir):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir)))
    wrapped = lora_with_nonzero_update(loaded.model)
    tuned_logits = logits_of(wrapped, loaded.tokenizer)
    out = save_instruct_model(wrapped, loaded.tokenizer, tmp_path / "adapter",
                              card={"provenance": loaded.provenance}, train_config=None, merge_lora=False)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= names
    assert "model.safetensors" not in names
    assert card_front_matter(out)["library_name"] == "peft"

    again = load_model(ModelConfig(name=str(out)))
    assert again.provenance["adapter"] == str(out)
    assert torch.allclose(logits_of(again.model, again.tokenizer), tuned_logits, atol=1e-5)


def test_seq2seq_save_round_trip(tmp_path, tiny_t5_dir):
    from transformers import AutoModelForSeq2SeqLM

    loaded = load_model(ModelConfig(name=str(tiny_t5_dir)))
    out = save_instruct_model(loaded.model, loaded.tokenizer, tmp_path / "t5", card={}, train_config=None)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    decoder = torch.tensor([[loaded.tokenizer.pad_token_id, 5, 6]])
    with torch.no_grad():
        a = loaded.model(input_ids=ids, decoder_input_ids=decoder).logits
        b = reloaded(input_ids=ids, decoder_input_ids=decoder).logits
    assert torch.equal(a, b)
    assert card_front_matter(out)["pipeline_tag"] == "text2text-generation"
