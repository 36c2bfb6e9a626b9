"""models/lora.py: LoRA wrapping, merged and adapter-alone saves; the seq2seq save round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _model_helpers import PROMPT, card_front_matter, logits_of, lora_with_nonzero_update

from instructkit.config import LoraSettings, ModelConfig
from instructkit.errors import ModelError
from instructkit.models.load import load_model
from instructkit.models.lora import is_peft_model, wrap_lora
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


def test_is_peft_model_tells_wrapped_from_plain(tiny_llama):
    assert not is_peft_model(tiny_llama)
    assert is_peft_model(wrap_lora(tiny_llama, LoraSettings(enabled=True, r=4)))


def test_is_peft_model_does_not_import_peft():
    # A full fine-tune never needs peft: asking at model save must not pay its import (seconds on a first run).
    code = ("import sys, torch\nfrom instructkit.models.lora import is_peft_model\n"
            "assert is_peft_model(torch.nn.Linear(2, 2)) is False\nprint('peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_wrap_lora_bad_target_is_a_model_error(tiny_llama):
    with pytest.raises(ModelError, match="target_modules"):
        wrap_lora(tiny_llama, LoraSettings(enabled=True, target_modules=["no_such_layer"]))


@pytest.mark.parametrize("target, adapted", [
    ("q_proj", {"q_proj"}),  # one name: a list of one (peft alone reads it as a full-name regex: no match)
    ("self_attn.v_proj", {"v_proj"}),
    (r".*self_attn\.(q|k)_proj", {"q_proj", "k_proj"}),  # a regular expression stays one
])
def test_lora_target_modules_as_one_string(tiny_llama, target, adapted):
    model = wrap_lora(tiny_llama, LoraSettings(enabled=True, r=2, target_modules=target))
    assert {n.split(".")[-4] for n, _ in model.named_parameters() if n.endswith("lora_A.default.weight")} == adapted


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_same_seed_gives_bitwise_identical_adapters_whatever_was_drawn_before(tiny_tokenizer):
    """Issue 19 item 3: the adapters are drawn from the run's seed, not from wherever the global RNG stands."""
    from conftest import build_tiny_llama

    settings = LoraSettings(enabled=True, r=4)
    torch.manual_seed(123)
    first = adapter_tensors(wrap_lora(build_tiny_llama(tiny_tokenizer), settings, seed=7))
    model = build_tiny_llama(tiny_tokenizer)
    torch.rand(1000)  # the global generator moves on: tokenization, validation set-up, another model
    state = torch.random.get_rng_state()
    again = adapter_tensors(wrap_lora(model, settings, seed=7))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left as it was
    other = adapter_tensors(wrap_lora(build_tiny_llama(tiny_tokenizer), settings, seed=8))
    assert first.keys() == again.keys() == other.keys() and len(first) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    assert all(torch.equal(first[n], again[n]) for n in first)
    lora_a = [n for n in first if "lora_A" in n]
    assert all(first[n].abs().sum() > 0 and not torch.equal(first[n], other[n]) for n in lora_a)
    assert all(torch.count_nonzero(first[n]) == 0 for n in first if "lora_B" in n)  # B starts at zero


@pytest.mark.slow  # a second interpreter imports torch, transformers and peft: ~10 s idle, a minute loaded
def test_same_seed_gives_the_same_adapters_in_a_fresh_process(tmp_path, tiny_model_dir):
    """A fresh interpreter (another hash seed, other draws before wrapping) gives the same adapter bytes."""
    from safetensors.torch import load_file, save_file

    script = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from transformers import AutoModelForCausalLM\n"
        "from instructkit.config import LoraSettings\n"
        "from instructkit.models.lora import wrap_lora\n"
        "torch.set_num_threads(1)\n"
        "torch.rand(int(sys.argv[3]))\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "wrapped = wrap_lora(model, LoraSettings(enabled=True, r=4), seed=7)\n"
        "save_file({n: p.detach().contiguous() for n, p in wrapped.named_parameters() if 'lora_' in n}, sys.argv[2])\n"
    )
    import os
    import subprocess
    import sys

    out = tmp_path / "fresh.safetensors"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(out), "17"], check=True, env=env)
    from transformers import AutoModelForCausalLM

    torch.rand(5)
    here = wrap_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(enabled=True, r=4), seed=7)
    save_file({n: p.detach().contiguous() for n, p in here.named_parameters() if "lora_" in n},
              tmp_path / "here.safetensors")
    fresh, mine = load_file(out), load_file(tmp_path / "here.safetensors")
    assert fresh.keys() == mine.keys() and fresh
    assert all(torch.equal(fresh[n], mine[n]) for n in fresh)


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


def test_an_adapter_of_a_base_given_by_relative_path_loads_from_another_directory(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    """trl#341: an adapter saved alone named its base as typed (`base`, relative to the working directory then),
    in instructkit_config.json and in adapter_config.json; loaded from any other directory, by load_model or by
    the card's code (peft's AutoPeftModelForCausalLM), the base was not found, or another `base` was used.
    Both now name it by its absolute path."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "base")
    monkeypatch.chdir(project)
    loaded = load_model(ModelConfig(name="base"))
    wrapped = lora_with_nonzero_update(loaded.model)
    tuned_logits = logits_of(wrapped, loaded.tokenizer)
    out = save_instruct_model(wrapped, loaded.tokenizer, project / "adapter",
                              card={"provenance": loaded.provenance}, train_config=None, merge_lora=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = load_model(ModelConfig(name=str(out)))
    assert torch.allclose(logits_of(again.model, again.tokenizer), tuned_logits, atol=1e-5)
    scope = {}
    exec(card_loading_code(out), scope)  # noqa: S102 - the card's own code, as a reader runs it
    assert torch.allclose(logits_of(scope["model"], loaded.tokenizer), tuned_logits, atol=1e-5)


def card_loading_code(folder) -> str:
    """The model card's Python loading code, PATH replaced by `folder`."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    return text.split("```python\n", 1)[1].split("```", 1)[0].replace("PATH", str(folder))


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_the_card_code_loads_an_adapter_with_its_stop_tokens(kind, tmp_path, tiny_model_dir, tiny_t5_dir):
    """An adapter saved alone: the card's code (AutoPeftModelForCausalLM) refused a T5 adapter ('Expected target
    PEFT class: PeftModelForSeq2SeqLM'), and for a causal one gave the base model's generation config: stop at
    </s> only, not at the chat template's <|im_end|> the adapter learned to end answers with, so generate ran
    past the answer (cf. LlamaFactory#7943). Run as written, the code now gives the saved config's stop ids and
    the tuned logits."""
    folder = tiny_model_dir if kind == "causal" else tiny_t5_dir
    loaded = load_model(ModelConfig(name=str(folder)))
    wrapped = lora_with_nonzero_update(loaded.model)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    extra = {} if kind == "causal" else {"decoder_input_ids": torch.tensor([[loaded.tokenizer.pad_token_id, 5]])}
    with torch.no_grad():
        tuned = wrapped(input_ids=ids, **extra).logits
    out = save_instruct_model(wrapped, loaded.tokenizer, tmp_path / "adapter",
                              card={"provenance": loaded.provenance}, train_config=None, merge_lora=False)
    scope = {}
    exec(card_loading_code(out), scope)  # noqa: S102 - the card's own code, as a reader runs it
    model, tokenizer = scope["model"], loaded.tokenizer
    eos, end_of_turn = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [eos, end_of_turn]
    assert scope["tokenizer"].convert_tokens_to_ids("<|im_end|>") == end_of_turn
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, **extra).logits, tuned, atol=1e-5)


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


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
@pytest.mark.parametrize("merge", [True, False])
def test_lora_on_a_tied_head_or_embedding_saves_the_trained_model(target, merge, tmp_path, tiny_model_dir):
    """peft#2018: merging an adapter on a tied LM head (or input embedding) wrote it into the shared
    weight, so the saved model was not the trained one (lm_head: logits off by 19). Merged at save time
    or from the adapter saved alone, the reload now gives the trained logits, the head and embedding apart."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    loaded = load_model(ModelConfig(name=str(tiny_model_dir)))
    assert loaded.model.config.tie_word_embeddings
    wrapped = wrap_lora(loaded.model, LoraSettings(enabled=True, r=4, target_modules=["q_proj", target]), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name and not param.any():  # B of a linear, A of an embedding start at zero
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    tuned_logits = logits_of(wrapped.eval(), loaded.tokenizer)
    out = save_instruct_model(wrapped, loaded.tokenizer, tmp_path / "model", card={"provenance": loaded.provenance},
                              train_config=None, merge_lora=merge)
    if merge:
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        with safe_open(str(out / "model.safetensors"), "pt") as handle:
            assert "lm_head.weight" in handle.keys()  # noqa: SIM118 - safe_open has no __contains__
        assert reloaded.config.tie_word_embeddings is False
    else:
        reloaded = load_model(ModelConfig(name=str(out))).model
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(logits_of(reloaded, loaded.tokenizer), tuned_logits, atol=1e-5)
