"""models/load.py and resolve.py: loading folders and adapter folders, the safetensors-only rule, threads,
the real GGUF models (slow)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from _model_helpers import card_front_matter, logits_of

from instructkit.config import ModelConfig
from instructkit.errors import ModelError
from instructkit.models.load import load_model, set_threads
from instructkit.models.registry import MODEL_REGISTRY
from instructkit.models.resolve import readme_front_matter
from instructkit.models.save import save_instruct_model

# --------------------------------------------------------------------------------------------------
# Loading local folders
# --------------------------------------------------------------------------------------------------


def test_pad_token_past_the_embedding_falls_back_to_eos(tmp_path, caplog):
    """llama-cookbook#189: a tokenizer given a new pad token without resizing the embedding (pad id 505,
    505 rows) loaded as it was, and every padded batch indexed past the embedding. Padding now uses EOS,
    so a padded row runs, and the saved generation_config says pad = EOS."""
    from conftest import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with caplog.at_level(logging.WARNING, logger="instructkit.models.generation"):
        loaded = load_model(ModelConfig(name=str(tmp_path / "m")))
    rows = loaded.model.get_input_embeddings().num_embeddings
    assert (tokenizer.pad_token_id, rows) == (505, 505)
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id == 2
    assert loaded.model.generation_config.pad_token_id == 2
    assert "has 505 rows" in caplog.text
    batch = loaded.tokenizer(["a", "a longer text"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**batch).logits.shape[:2] == batch.input_ids.shape


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


def test_a_t5_without_decoder_start_token_id_takes_it_from_generation_config_or_is_refused(tmp_path,
                                                                                          tiny_tokenizer):
    """transformers#8218 / BARTpho#4: an encoder-decoder config without decoder_start_token_id (converted, or a
    T5Config built in transformers 5) loaded, then training stopped in the model's forward with an
    AttributeError. It now comes from generation_config.json when that names it, else loading is refused."""
    import json

    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tiny_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    folder = tmp_path / "t5"
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    assert "decoder_start_token_id" not in json.loads((folder / "config.json").read_text())
    with pytest.raises(ModelError, match="decoder_start_token_id") as info:
        load_model(ModelConfig(name=str(folder)))
    assert str(folder) in str(info.value)

    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "decoder_start_token_id": 3}))
    model = load_model(ModelConfig(name=str(folder))).model
    labels = torch.tensor([[7, 8, 2]])
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 2]]), labels=labels)  # the forward shifts the labels right
        decoder_in = model.prepare_decoder_input_ids_from_labels(labels=labels)
    assert decoder_in.tolist() == [[3, 7, 8]]


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


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        assert set_threads(None) == 1
        with pytest.raises(ValueError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_readme_front_matter_is_read_by_the_hub_library(tmp_path, tiny_model_dir):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\nbase_model: org/base\n---\n\n# a model\n", encoding="utf-8")
    assert readme_front_matter(card) == {"license": "mit", "base_model": "org/base"}
    card.write_text("# no metadata\n", encoding="utf-8")
    assert readme_front_matter(card) == {}
    card.write_text("---\nlicense: [unclosed\n---\n", encoding="utf-8")
    assert readme_front_matter(card) == {}
    card.write_text("---\n- a list\n---\n", encoding="utf-8")
    assert readme_front_matter(card) == {}
    assert readme_front_matter(tmp_path / "absent.md") == {}


# --------------------------------------------------------------------------------------------------
# Real models (GGUF from PyPI): slow
# --------------------------------------------------------------------------------------------------


def real_model_available(name: str) -> bool:
    from instructkit.models.registry import missing_modules

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
