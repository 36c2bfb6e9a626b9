"""GGUF export (pure Python) and the Ollama Modelfile.

Round trips: transformers loads each exported file back (`from_pretrained(dir, gguf_file=...)`) and must
give the same tokenizer ids on 32 varied prompts and the same greedy next token (all 32 at f32/f16, at
least 30 of 32 at bf16/q8_0) on tiny random Llama, Gemma-3 and Qwen2 models; the real SmolLM2 and Gemma-3
run under -m slow, and llama-cpp-python (when installed) must complete the demo prompt as transformers does.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from _export_helpers import (
    PROMPTS,
    SMOLLM2_CHAT,
    build_gemma_tokenizer,
    build_go_renderer,
    build_tiny_gemma3,
    build_tiny_qwen2,
    gguf_fields,
    load_gguf,
    modelfile_directive,
    next_tokens,
    render_go,
)
from _model_helpers import lora_with_nonzero_update
from conftest import CHATML, build_tiny_llama, build_tiny_t5, build_tiny_tokenizer

from instructkit.cli import main
from instructkit.errors import ModelError
from instructkit.models.export import export_model
from instructkit.models.export_vocab import pre_tokenizer_name
from instructkit.models.ollama import PROBE, chat_format, render_modelfile
from instructkit.models.save import save_instruct_model

QUANTS = ("f32", "f16", "bf16", "q8_0")
MIN_SAME = {"f32": 32, "f16": 32, "bf16": 30, "q8_0": 30}


def save(model, tokenizer, folder: Path, **kwargs) -> Path:
    save_instruct_model(model, tokenizer, folder, card={"provenance": {"name": "tiny", "license_id": "mit"}},
                        train_config=None, **kwargs)
    return folder


def only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------------
# Round trips on tiny models (default run)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """name -> (saved folder, model and tokenizer as instructkit loads them from it).

    The tokenizer is the reloaded one: for a qwen2 folder transformers gives Qwen2Tokenizer, whose split
    differs from the tokenizer object that was saved."""
    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model

    root = tmp_path_factory.mktemp("export-src")
    bpe = build_tiny_tokenizer()
    gemma_tok = build_gemma_tokenizer()
    built = {"llama": (build_tiny_llama(bpe), bpe), "gemma3": (build_tiny_gemma3(gemma_tok), gemma_tok),
             "qwen2": (build_tiny_qwen2(bpe), bpe)}
    out = {}
    for name, (model, tok) in built.items():
        loaded = load_model(ModelConfig(name=str(save(model, tok, root / name))))
        out[name] = (root / name, loaded.model.eval(), loaded.tokenizer)
    return out


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """(arch, quant) -> (GGUF path, model and tokenizer transformers loaded from it)."""
    out = {}
    for arch, (folder, _, _) in tiny_models.items():
        for quant in QUANTS:
            path = tmp_path_factory.mktemp(f"gguf-{arch}-{quant}") / f"{arch}.{quant}.gguf"
            export_model(folder, path, quant=quant)
            out[arch, quant] = (path, *load_gguf(path))
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_tokenizer_round_trip_gives_the_same_ids_on_32_varied_prompts(arch, tiny_models, exported):
    _, _, tokenizer = tiny_models[arch]
    _, _, back = exported[arch, "q8_0"]
    assert len(PROMPTS) == 32 and len(set(PROMPTS)) == 32
    for prompt in PROMPTS:
        assert back(prompt).input_ids == tokenizer(prompt).input_ids, prompt
    assert back.chat_template == tokenizer.chat_template
    assert (back.bos_token, back.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert (back.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            == tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("quant", QUANTS)
def test_greedy_next_token_survives_the_round_trip(arch, quant, tiny_models, exported):
    _, model, tokenizer = tiny_models[arch]
    _, back, _ = exported[arch, quant]
    expected = next_tokens(model, tokenizer)
    got = next_tokens(back, tokenizer)
    same = sum(a == b for a, b in zip(expected, got))
    assert same >= MIN_SAME[quant], f"{arch} {quant}: {same}/32 greedy next tokens agree"


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_f32_export_reproduces_the_logits(arch, tiny_models, exported):
    """f32 is lossless: any mistake in names, q/k permutation, norm shift or biases would show here."""
    _, model, tokenizer = tiny_models[arch]
    _, back, _ = exported[arch, "f32"]
    ids = tokenizer(PROMPTS[0] + " " + PROMPTS[10], return_tensors="pt").input_ids
    assert ids.shape[1] > 8  # longer than Gemma's sliding window
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_conversion_is_the_same_with_the_tokenizer_in_a_second_process(arch, exported, tmp_path):
    """The cache folder `convert_gguf` writes: the same files, bytes and tensors whether the tokenizer is
    converted in this process or in a spawned one, and what transformers reads from the GGUF itself."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from instructkit.models.gguf_cache import convert_gguf

    path, model, tokenizer = exported[arch, "f32"]
    folders = {child: convert_gguf(path, tmp_path / f"child-{child}", {"source": "test"},
                                   tokenizer_in_child=child) for child in (False, True)}
    names = sorted(p.name for p in folders[False].iterdir())
    assert names == sorted(p.name for p in folders[True].iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in set(names) - {"model.safetensors"}:
        assert (folders[False] / name).read_bytes() == (folders[True] / name).read_bytes(), name
    weights = {child: load_file(folder / "model.safetensors") for child, folder in folders.items()}
    reference = model.state_dict()
    assert weights[False].keys() == weights[True].keys() and weights[True].keys() <= reference.keys()
    for key, value in weights[True].items():
        assert torch.equal(value, weights[False][key]) and torch.equal(value, reference[key]), key
    back = AutoTokenizer.from_pretrained(folders[True])
    assert [back(p).input_ids for p in PROMPTS] == [tokenizer(p).input_ids for p in PROMPTS]
    assert back.chat_template == tokenizer.chat_template and back.pad_token is not None


@pytest.mark.parametrize("child", [False, True])
def test_unreadable_gguf_names_the_file_and_leaves_no_folder(child, tmp_path):
    from instructkit.models.gguf_cache import convert_gguf

    bad = tmp_path / "src" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"not a gguf file" * 100)
    with pytest.raises(ModelError, match=r"cannot read GGUF file .*broken\.gguf"):
        convert_gguf(bad, tmp_path / "cache" / "x", {}, tokenizer_in_child=child)
    assert list((tmp_path / "cache").iterdir()) == []


def test_metadata_has_the_chat_template_special_tokens_and_quant_types(tiny_models, exported):
    _, model, tokenizer = tiny_models["llama"]
    fields = gguf_fields(exported["llama", "q8_0"][0])
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == 7  # LlamaFileType.MOSTLY_Q8_0
    assert fields["tokenizer.chat_template"] == CHATML
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp's names
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.convert_tokens_to_ids("<s>")
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("</s>")
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.convert_tokens_to_ids("<pad>")
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the tokenizer adds no BOS to a text
    assert len(fields["tokenizer.ggml.tokens"]) == model.config.vocab_size
    types = fields["tokenizer.ggml.token_type"]
    assert {types[tokenizer.convert_tokens_to_ids(t)] for t in ("<s>", "</s>", "<|im_start|>")} == {3}  # CONTROL
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.attention.head_count_kv"] == 2
    tensors = fields["tensors"]
    assert tensors["blk.0.attn_q.weight"] == "Q8_0" and tensors["token_embd.weight"] == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"] == "F32" and tensors["output_norm.weight"] == "F32"
    assert "output.weight" not in tensors  # tied to the embedding, as in the model


def test_gemma3_metadata_is_what_llama_cpp_reads(tiny_models, exported):
    _, _, tokenizer = tiny_models["gemma3"]
    fields = gguf_fields(exported["gemma3", "f16"][0])
    assert fields["general.architecture"] == "gemma3"
    assert fields["tokenizer.ggml.model"] == "llama"  # sentencepiece-style
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["gemma3.attention.key_length"] == 256 and fields["gemma3.attention.sliding_window"] == 8
    assert fields["gemma3.rope.freq_base"] == 1_000_000.0
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == 6  # BYTE
    assert types[tokenizer.convert_tokens_to_ids("<unk>")] == 2  # UNKNOWN
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    scores = fields["tokenizer.ggml.scores"]
    merged = tokenizer.tokenize("over the lazy")[0]  # a token BPE merges build ("over▁the▁")
    assert len(merged) > 1 and scores[tokenizer.convert_tokens_to_ids(merged)] < 0
    assert scores[tokenizer.convert_tokens_to_ids("<bos>")] == scores[tokenizer.convert_tokens_to_ids("<0x0A>")] == 0


def test_qwen2_keeps_its_untied_head_and_biases(exported):
    tensors = gguf_fields(exported["qwen2", "q8_0"][0])["tensors"]
    assert tensors["output.weight"] == "Q8_0"
    assert tensors["blk.1.attn_k.bias"] == "F32"


def test_lora_adapter_saved_alone_is_exported_merged(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lora = lora_with_nonzero_update(base)
    folder = tmp_path / "adapter"
    save_instruct_model(lora, tiny_tokenizer, folder, merge_lora=False, train_config=None,
                        card={"provenance": {"name": str(tiny_model_dir), "requested": str(tiny_model_dir)}})
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    merged = lora.merge_and_unload().eval()
    export_model(folder, tmp_path / "lora.f32.gguf", quant="f32")
    back, _ = load_gguf(tmp_path / "lora.f32.gguf")
    ids = tiny_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        got, want, before = back(input_ids=ids).logits, merged(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - before).abs().max() > 1e-2  # the adapter's update is in the file


# --------------------------------------------------------------------------------------------------
# Command line, errors, nothing half-written
# --------------------------------------------------------------------------------------------------


def test_cli_export_writes_gguf_and_modelfile(tmp_path, tiny_models, capsys):
    folder = tiny_models["llama"][0]
    out = tmp_path / "out" / "tiny.q8_0.gguf"
    assert main(["export", str(folder), "--gguf", str(out), "--quant", "Q8_0", "--ollama"]) == 0
    assert out.is_file() and (out.parent / "Modelfile").is_file()
    assert "ollama create" in capsys.readouterr().out
    assert only_files(out.parent) == ["Modelfile", "tiny.q8_0.gguf"]  # no temporary file left


def test_errors_exit_2_naming_the_culprit_and_write_nothing(tmp_path, tiny_models, tiny_model_dir, capsys):
    folder = tiny_models["llama"][0]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"

    def fails(args: list[str], *needles: str) -> None:
        capsys.readouterr()
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (needle, err)

    fails([str(folder), "--gguf", str(out), "--quant", "q4_k_m"], "'q4_k_m'", "f32, f16, bf16, q8_0")
    fails([str(tiny_model_dir), "--gguf", str(out)], str(tiny_model_dir), "instructkit_config.json")
    fails([str(tmp_path / "nope"), "--gguf", str(out)], str(tmp_path / "nope"), "not found")
    t5 = save(build_tiny_t5(tiny_models["llama"][2]), tiny_models["llama"][2], tmp_path / "t5")
    fails([str(t5), "--gguf", str(out)], "'t5'", "T5ForConditionalGeneration", "llama")
    assert only_files(out_dir) == []
    out.write_bytes(b"an older file")
    fails([str(folder), "--gguf", str(out)], str(out), "--force")
    assert out.read_bytes() == b"an older file"
    (out_dir / "Modelfile").write_text("mine")
    other = out_dir / "other.gguf"
    fails([str(folder), "--gguf", str(other), "--ollama"], str(out_dir / "Modelfile"), "--force")
    assert only_files(out_dir) == ["Modelfile", "m.gguf"] and (out_dir / "Modelfile").read_text() == "mine"
    assert main(["export", str(folder), "--gguf", str(out), "--quant", "f16", "--force"]) == 0
    assert gguf_fields(out)["general.file_type"] == 1


def test_a_run_folder_is_refused_with_a_hint_to_its_model(tmp_path, tiny_models):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save(tiny_models["llama"][1], tiny_models["llama"][2], run_dir / "model")
    with pytest.raises(ModelError, match=f"Did you mean {run_dir / 'model'}"):
        export_model(run_dir, tmp_path / "x.gguf")


def test_failure_while_writing_leaves_no_file(tmp_path, tiny_tokenizer):
    """A model with fewer embedding rows than the tokenizer has tokens fails inside the writer: the output
    is not created and the temporary file beside it is removed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = save(LlamaForCausalLM(config), tiny_tokenizer, tmp_path / "small-vocab")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    last = len(tiny_tokenizer) - 1
    with pytest.raises(ModelError, match=f"token id {last} but the model's embedding has only 400 rows"):
        export_model(folder, out_dir / "m.gguf")
    assert only_files(out_dir) == []


def test_pre_tokenizer_names():
    # llama.cpp spells GPT-2's split "gpt-2" (a "gpt2" pre-tokenizer made it refuse the file)
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    qwen2 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["qwen2"]}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": qwen2}) == "qwen2"
    with pytest.raises(ModelError, match="no name for this tokenizer's pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


# --------------------------------------------------------------------------------------------------
# The Ollama Modelfile
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    binary = build_go_renderer(tmp_path_factory.mktemp("go"))
    if binary is None:
        pytest.skip("Go is not installed: the Modelfile TEMPLATE is checked with Go's text/template")
    return binary


CONVERSATIONS = [PROBE, PROBE[1:], PROBE[1:2],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rate: great. Rating:"}]]


@pytest.mark.parametrize("kind", ["chatml", "gemma", "smollm2"])
def test_modelfile_template_renders_as_the_jinja_chat_template(kind, tmp_path, go_renderer):
    """Ollama runs TEMPLATE as a Go text/template over .Messages (with SYSTEM put first when the request
    has no system message); llama.cpp adds BOS itself. That must equal the Jinja rendering."""
    tokenizer = build_gemma_tokenizer() if kind == "gemma" else build_tiny_tokenizer()
    if kind == "smollm2":
        tokenizer.chat_template = SMOLLM2_CHAT
    text = render_modelfile(tokenizer, build_tiny_llama(build_tiny_tokenizer()).config, tmp_path / "m.gguf")
    template = modelfile_directive(text, "TEMPLATE")
    system = modelfile_directive(text, "SYSTEM")
    assert template is not None
    assert system == ("You are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      if kind == "smollm2" else None)
    bos = tokenizer.bos_token if kind == "gemma" else ""
    for messages in CONVERSATIONS:
        jinja = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        sent = messages if system is None or messages[0]["role"] == "system" else \
            [{"role": "system", "content": system}, *messages]
        assert bos + render_go(go_renderer, template, sent) == jinja


def test_modelfile_names_the_gguf_stops_and_parameters(tmp_path, tiny_models):
    folder = tiny_models["gemma3"][0]
    (folder / "LICENSE").write_text("Gemma Terms of Use (test copy)")
    result = export_model(folder, tmp_path / "g.q8_0.gguf", ollama=True)
    text = result.modelfile.read_text()
    assert "FROM ./g.q8_0.gguf\n" in text and "ollama create g -f Modelfile" in text
    assert 'PARAMETER stop "<end_of_turn>"' in text and 'PARAMETER stop "<eos>"' in text
    assert "PARAMETER temperature 0\n" in text and "PARAMETER num_ctx 512\n" in text
    assert "<start_of_turn>model" in modelfile_directive(text, "TEMPLATE")
    (folder / "LICENSE").unlink()


def test_unknown_chat_template_gets_no_template_line(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert chat_format(tokenizer).family is None
    text = render_modelfile(tokenizer, build_tiny_llama(tokenizer).config, tmp_path / "m.gguf")
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "")
    assert "not recognised" in caplog.text


def test_plain_prompt_model_and_run_system_prompt_reach_the_modelfile(tmp_path, tiny_tokenizer):
    """A run with model.chat_template=false tuned on plain prompts: TEMPLATE {{ .Prompt }}; a run with
    model.system_prompt tuned with that system turn: it becomes SYSTEM."""
    model = build_tiny_llama(tiny_tokenizer)
    plain = tmp_path / "plain"
    save_instruct_model(model, tiny_tokenizer, plain, card={}, train_config={"model": {"chat_template": False}})
    text = export_model(plain, plain.parent / "p" / "p.gguf", quant="f16", ollama=True).modelfile.read_text()
    assert modelfile_directive(text, "TEMPLATE") == "{{ .Prompt }}" and "SYSTEM" not in text
    assert "Tuned on plain prompts" in (plain / "README.md").read_text()
    unknown = tmp_path / "unknown"  # saved without its run's settings: the card claims nothing about prompting
    save_instruct_model(model, tiny_tokenizer, unknown, card={}, train_config=None)
    assert "## Prompting" not in (unknown / "README.md").read_text()
    system = tmp_path / "system"
    save_instruct_model(model, tiny_tokenizer, system, card={},
                        train_config={"model": {"chat_template": True, "system_prompt": "Answer with a number."}})
    text = export_model(system, system.parent / "s" / "s.gguf", quant="f16", ollama=True).modelfile.read_text()
    assert modelfile_directive(text, "SYSTEM") == "Answer with a number."
    assert "<|im_start|>" in modelfile_directive(text, "TEMPLATE")


def test_saved_folder_prompts_as_training_did_with_the_run_system_prompt(tmp_path, tiny_tokenizer):
    """Loaded by plain transformers, the saved folder renders a conversation without a system turn with the
    run's model.system_prompt first, as training did: the same ids; its own system turn is kept, and the
    tokenizer in memory is left as it was. An empty system prompt stays empty in the Modelfile."""
    from transformers import AutoTokenizer

    from instructkit.data.tokenize import TokenizeSettings, encode_for_generation

    model = build_tiny_llama(tiny_tokenizer)
    original = tiny_tokenizer.chat_template
    for k, system in enumerate(("Answer with a number.", 'Say "hi"\nthen \\ {{ x }} {% raw %} é', "")):
        out = tmp_path / f"s{k}"
        save_instruct_model(model, tiny_tokenizer, out, card={},
                            train_config={"model": {"chat_template": True, "system_prompt": system}})
        assert tiny_tokenizer.chat_template == original
        saved = AutoTokenizer.from_pretrained(out)
        settings = TokenizeSettings(max_length=256, chat_template=True, system_prompt=system)
        [trained] = encode_for_generation(tiny_tokenizer, ["How many legs has a cat?"], settings, max_new_tokens=8)
        plain = saved.apply_chat_template([{"role": "user", "content": "How many legs has a cat?"}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
        assert plain == trained
        own = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
        assert saved.apply_chat_template(own, tokenize=False) == tiny_tokenizer.apply_chat_template(own, tokenize=False)
        assert repr(system) in (out / "README.md").read_text()
    text = export_model(out, out.parent / "e" / "e.gguf", quant="f16", ollama=True).modelfile.read_text()
    assert "SYSTEM" not in text.replace("no SYSTEM", "") and "empty system prompt" in text


# --------------------------------------------------------------------------------------------------
# `instructkit run ... export: {gguf: q8_0}`
# --------------------------------------------------------------------------------------------------


def test_run_ends_with_the_export(tmp_path, tiny_model_dir):
    import json

    from transformers import AutoModelForCausalLM

    config = {
        "name": "exp", "output_dir": str(tmp_path / "runs"),
        "datasets": [{"path": "demo", "schema": "amazon_us_reviews", "max_rows": 30,
                      "templates": ["amazon_us_reviews.predict_rating"]}],
        "model": {"name": str(tiny_model_dir), "max_length": 96},
        "train": {"max_steps": 2, "batch_size": 4, "threads": 1, "lr": 1e-3},
        "eval": {"few_shot": [], "bootstrap_resamples": 100, "max_examples": 4, "baselines": False},
        "export": {"gguf": "q8_0", "ollama": True},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config))
    assert main(["run", str(path)]) == 0
    gguf_path = tmp_path / "runs" / "exp" / "export" / "exp.q8_0.gguf"
    assert gguf_fields(gguf_path)["general.file_type"] == 7
    assert (gguf_path.parent / "Modelfile").is_file()
    back, back_tok = load_gguf(gguf_path)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "exp" / "model").eval()
    assert next_tokens(back, back_tok) == next_tokens(tuned, back_tok)


# --------------------------------------------------------------------------------------------------
# Real models (-m slow)
# --------------------------------------------------------------------------------------------------


def real_saved_model(name: str, folder: Path) -> tuple[Path, object]:
    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model

    try:
        loaded = load_model(ModelConfig(name=name))
    except ModelError as exc:
        pytest.skip(f"{name} is not installed: {exc}")
    save_instruct_model(loaded.model, loaded.tokenizer, folder, card={"provenance": loaded.provenance},
                        train_config=None)
    return folder, loaded


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_real_model_round_trip(name, tmp_path):
    folder, loaded = real_saved_model(name, tmp_path / "model")
    expected = next_tokens(loaded.model, loaded.tokenizer)
    for quant in ("f16", "q8_0"):
        out = tmp_path / f"{name}.{quant}.gguf"
        start = time.perf_counter()
        export_model(folder, out, quant=quant, ollama=quant == "q8_0")
        seconds = time.perf_counter() - start
        if name.startswith("smollm2") and quant == "q8_0":
            assert seconds < 60, f"SmolLM2-135M q8_0 export took {seconds:.1f} s"
        back, back_tok = load_gguf(out)
        for prompt in PROMPTS:
            assert back_tok(prompt).input_ids == loaded.tokenizer(prompt).input_ids, prompt
        same = sum(a == b for a, b in zip(expected, next_tokens(back, loaded.tokenizer)))
        assert same >= MIN_SAME[quant], f"{name} {quant}: {same}/32 greedy next tokens agree"


@pytest.mark.slow
def test_llama_cpp_completes_the_demo_prompt_as_transformers_does(tmp_path):
    """llama.cpp (through llama-cpp-python) reads the exported SmolLM2 q8_0 file: same prompt token ids and
    the same greedy completion of the demo rating prompt as transformers on the same file."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (optional; pip install llama-cpp-python builds llama.cpp)")
    import json

    from llama_cpp import Llama

    from instructkit.templates.library import TemplateLibrary

    folder, loaded = real_saved_model("smollm2-135m-instruct", tmp_path / "model")
    out = tmp_path / "smollm2.q8_0.gguf"
    export_model(folder, out, quant="q8_0")
    library = TemplateLibrary.builtin()
    demo = Path(__file__).parents[2] / "src" / "instructkit" / "demo" / "reviews.jsonl"
    row = library.schema("amazon_us_reviews").coerce(json.loads(demo.read_text().splitlines()[0]))
    question = library.get("amazon_us_reviews.predict_rating").render(row).prompt
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                  add_generation_prompt=True)
    back, back_tok = load_gguf(out)
    ids = back_tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        hf = back.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    llm = Llama(model_path=str(out), n_ctx=1024, n_threads=1, verbose=False)
    cpp_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert cpp_ids == ids[0].tolist()
    cpp: list[int] = []
    for token in llm.generate(cpp_ids, temp=0.0, top_k=1, reset=True):
        cpp.append(int(token))
        if token == back_tok.eos_token_id or len(cpp) == 8:
            break
    assert cpp == hf, (back_tok.decode(cpp), back_tok.decode(hf))
