"""models/export_vocab.py and ollama.py: the GGUF token table and chat templates as llama.cpp's
convert_hf_to_gguf.py writes them; what a Modelfile cannot quote."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

from _export_helpers import build_gemma_tokenizer, gguf_fields
from conftest import build_tiny_llama, build_tiny_tokenizer
from tokenizers import AddedToken

from instructkit.models.export import write_gguf

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType


def test_added_tokens_that_look_special_are_control_and_user_defined_spaces_are_bare(tmp_path):
    """llama.cpp#8228 (convert_hf_to_gguf.py does_token_look_special): an added token that tokenizer.json
    leaves non-special but spells like a control token (<|fim_pad|>, <pad>, <unused3>, as in Qwen2 and Gemma)
    is CONTROL, else llama.cpp warns "control-looking token ... was not control-type" and prints it; a
    user-defined token is written with bare spaces, not "▁", since llama.cpp matches it on the raw text."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=False) for t in ("<|fim_pad|>", "<unused3>", "<think>",
                                                                  "▁▁▁▁", "hello world")])
    model = build_tiny_llama(tokenizer)
    out = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, out, "f32")
    fields = gguf_fields(out)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|fim_pad|>", "<unused3>", "<think>", "▁▁▁▁",
                                                           "hello world", "<|im_end|>")}
    assert [types[ids[t]] for t in ("<|fim_pad|>", "<unused3>", "<|im_end|>")] == [CONTROL] * 3
    assert [types[ids[t]] for t in ("<think>", "▁▁▁▁", "hello world")] == [USER_DEFINED] * 3
    assert [tokens[ids[t]] for t in ("<|fim_pad|>", "<think>", "▁▁▁▁", "hello world")] == [
        "<|fim_pad|>", "<think>", "    ", "hello world"]


def test_gemma_user_defined_whitespace_token_is_written_with_spaces():
    from instructkit.models.export_vocab import token_table

    tokenizer = build_gemma_tokenizer()
    tokenizer.add_tokens([AddedToken("▁▁", special=False, normalized=False)])
    n = len(tokenizer)
    tokens, types = token_table(tokenizer, n, "llama")
    i = tokenizer.convert_tokens_to_ids("▁▁")
    assert (tokens[i], types[i]) == ("  ", USER_DEFINED)
    j = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert (tokens[j], types[j]) == ("<end_of_turn>", CONTROL)


def test_several_named_chat_templates_are_written_as_llama_cpp_reads_them(tmp_path):
    """A tokenizer with named chat templates (a dict, e.g. default + tool_use) stopped the export with
    AttributeError "'str' object has no attribute 'get'"; they are now tokenizer.chat_template (the default)
    and tokenizer.chat_template.tool_use, listed in tokenizer.chat_templates (gguf-py's list form)."""
    from conftest import CHATML

    tokenizer = build_tiny_tokenizer()
    tools = CHATML + "{# tools #}"
    tokenizer.chat_template = {"default": CHATML, "tool_use": tools}
    out = tmp_path / "m.gguf"
    write_gguf(build_tiny_llama(tokenizer), tokenizer, out, "f16")
    fields = gguf_fields(out)
    assert fields["tokenizer.chat_template"] == CHATML
    assert fields["tokenizer.chat_template.tool_use"] == tools
    assert fields["tokenizer.chat_templates"] == ["tool_use"]


def test_a_system_prompt_a_modelfile_cannot_quote_is_not_dropped_silently(tmp_path, caplog):
    """Ollama's Modelfile parser has no escapes: a value ends at its first triple quote. A run system prompt
    holding one was left out of the Modelfile without a word; it is still not written (it cannot be), but
    the Modelfile says so in a comment and the export warns."""
    import logging

    from instructkit.models.ollama import render_modelfile

    tokenizer = build_tiny_tokenizer()
    config = build_tiny_llama(tokenizer).config
    with caplog.at_level(logging.WARNING, logger="instructkit.models.ollama"):
        text = render_modelfile(tokenizer, config, tmp_path / "m.gguf", system_prompt='Quote as """x""".')
    assert "SYSTEM" not in text.replace("system prompt", "")
    assert '# the system prompt the model was tuned with holds """' in text
    assert "cannot quote" in caplog.text
    plain = render_modelfile(tokenizer, config, tmp_path / "m.gguf", system_prompt='Say "hi".')
    assert 'SYSTEM """Say "hi"."""' in plain


@pytest.mark.parametrize("chat", [True, False])
def test_the_modelfile_switches_ollamas_repeat_penalty_off(chat, tmp_path):
    """ollama#17679: Ollama's server default repeat_penalty 1.1 reached every model whose Modelfile leaves it
    unset, at temperature 0 too, so `ollama run` of the export did not answer greedily as instructkit evaluated
    it (a penalized repeat changes the argmax: a label said twice, JSON, code). The Modelfile now sets it to 1
    (no penalty), with or without a chat template."""
    from instructkit.models.ollama import render_modelfile

    tokenizer = build_tiny_tokenizer()
    config = build_tiny_llama(tokenizer).config
    text = render_modelfile(tokenizer, config, tmp_path / "m.gguf", chat=chat)
    parameters = dict(line.split()[1:3] for line in text.splitlines() if line.startswith("PARAMETER ")
                      and not line.startswith("PARAMETER stop"))
    assert parameters == {"temperature": "0", "repeat_penalty": "1", "num_ctx": "512"}
