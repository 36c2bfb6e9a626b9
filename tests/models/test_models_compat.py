"""models/compat.py: a saved folder reads the same under transformers 4.x (vllm-project/vllm#42624: a
transformers-5 config loaded by 4.x silently used rope_theta 10000; its tokenizer class did not exist)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from _model_helpers import logits_of
from conftest import build_tiny_tokenizer

from instructkit.models.compat import legacy_config, legacy_tokenizer_config
from instructkit.models.save import save_instruct_model

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _saved(tmp_path, model_class, config_class, **config):
    """A tiny model of `model_class` (2 layers, width 64, 4 heads, 2 KV heads) with `config` on top and an
    added special token, saved by save_instruct_model: (model, tokenizer, folder)."""
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    model = model_class(config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)).eval()
    return model, tokenizer, save_instruct_model(model, tokenizer, tmp_path / "m", card={}, train_config=None)


def _saved_llama3(tmp_path):
    """A tiny Llama with Llama 3's RoPE (see `_saved`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _saved(tmp_path, LlamaForCausalLM, LlamaConfig, max_position_embeddings=512,
                  rope_parameters=LLAMA3_ROPE)


@pytest.mark.parametrize("config, expected", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "dtype": "float32"},
     {"rope_theta": 100000.0, "torch_dtype": "float32"}),
    ({"rope_parameters": LLAMA3_ROPE},
     {"rope_theta": 500000.0, "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # Gemma 3: one RoPE per layer type; 4.x names the sliding layers' base rope_local_base_freq
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
     {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_local_base_freq": 10000.0}),
])
def test_legacy_config_adds_the_transformers4_names(config, expected):
    got = legacy_config(config)
    assert {k: got[k] for k in expected} == expected
    assert got["rope_parameters"] == config["rope_parameters"]  # 5.x's own keys unchanged


def test_legacy_config_keeps_keys_already_set_and_reaches_nested_configs():
    config = {"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}, "rope_theta": 7.0,
              "text_config": {"model_type": "gemma3_text", "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 9.0}}}
    got = legacy_config(config)
    assert got["rope_theta"] == 7.0
    assert got["text_config"]["rope_theta"] == 9.0
    assert legacy_config({"model_type": "t5", "d_model": 8}) == {"model_type": "t5", "d_model": 8}


def test_legacy_tokenizer_config():
    got = legacy_tokenizer_config({"tokenizer_class": "TokenizersBackend", "is_local": True,
                                   "local_files_only": True, "extra_special_tokens": ["<a>", "<b>"],
                                   "eos_token": "</s>"})
    assert got == {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<a>", "<b>"],
                   "eos_token": "</s>"}
    kept = {"tokenizer_class": "Qwen2Tokenizer", "extra_special_tokens": {"image_token": "<img>"}}
    assert legacy_tokenizer_config(kept) == kept  # a named class 4.x knows; 4.x's own dict form


def test_saved_folder_carries_the_legacy_names_and_reloads_the_same(tmp_path):
    """A tuned model with a non-default RoPE (Llama 3's) saved through save_instruct_model: config.json holds
    rope_theta / rope_scaling beside rope_parameters, and transformers 5 still reads the same model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, out = _saved_llama3(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    assert config["torch_dtype"] == config["dtype"]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("tokenizer_class") != "TokenizersBackend"
    assert not {"is_local", "local_files_only"} & set(tokenizer_config)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    assert torch.equal(logits_of(reloaded, reloaded_tokenizer), logits_of(model, tokenizer))
    assert "<tool>" in reloaded_tokenizer.all_special_tokens
    assert reloaded_tokenizer("a <tool> b")["input_ids"] == tokenizer("a <tool> b")["input_ids"]


_PROBE = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
model, tokenizer = AutoModelForCausalLM.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer("the cat sat on the mat <tool>", return_tensors="pt")["input_ids"]
with torch.no_grad():
    print(json.dumps({"ids": ids[0].tolist(), "logits": model(ids).logits[0].tolist()}))
"""


def _saved_gemma3(tmp_path):
    """A tiny Gemma 3 text model: sliding and full attention layers, each with its RoPE, the full layers'
    linearly scaled as in Gemma 3's 4B-27B (see `_saved`)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _saved(tmp_path, Gemma3ForCausalLM, Gemma3TextConfig, head_dim=16, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}})


def _saved_qwen3(tmp_path):
    """A tiny Qwen3 (q/k norms; rope_theta 1e6 as Qwen3's releases; see `_saved`)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _saved(tmp_path, Qwen3ForCausalLM, Qwen3Config, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("INSTRUCTKIT_TRANSFORMERS4_PYTHON"),
                    reason="set INSTRUCTKIT_TRANSFORMERS4_PYTHON to a Python with torch and transformers 4.x "
                           "(e.g. a venv with torch==2.13.0 'transformers>=4.57,<5') to check loading under 4.x")
@pytest.mark.parametrize("saved", [_saved_llama3, _saved_gemma3, _saved_qwen3], ids=["llama3", "gemma3", "qwen3"])
def test_saved_folder_loads_the_same_under_transformers4(tmp_path, saved):
    """The folder saved by transformers 5, loaded by 4.x in another process: the same token ids and logits
    (with a non-default RoPE: 4.x without rope_theta / rope_scaling / rope_local_base_freq computes other
    positions)."""
    model, tokenizer, out = saved(tmp_path)
    result = subprocess.run([os.environ["INSTRUCTKIT_TRANSFORMERS4_PYTHON"], "-c", _PROBE, str(out)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    ids = tokenizer("the cat sat on the mat <tool>", return_tensors="pt")["input_ids"]
    assert got["ids"] == ids[0].tolist()
    with torch.no_grad():
        expected = model(ids).logits[0]
    assert torch.allclose(torch.tensor(got["logits"]), expected, atol=1e-5)
