"""Shared by the GGUF export tests: varied prompts, a tiny Gemma-3 (sentencepiece-style tokenizer), a tiny
Qwen2, greedy next tokens, reading a GGUF's metadata, and a Go text/template renderer for Modelfiles."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch

# 32 prompts: words, digits, punctuation, several spaces, tabs and newlines, accents, CJK, emoji, and the
# chat template's special tokens written in the text.
PROMPTS = [
    "Predict the associated rating for the following review: great coffee, fast shipping. Rating:",
    "Give a short sentence describing the following product review: the kettle leaks.",
    "Translate to German: a man rides a bike.",
    "Ein Mann fährt Fahrrad. Über die Brücke, naïve café, déjà vu.",
    "Summarize the dialogue. #Person1#: hello there. #Person2#: hi, how are you?",
    "The quick brown fox jumps over the lazy dog",
    "0123456789 1,234,567.89 3.14159 2024-11-30 007",
    "!?.,:;'\"()[]{} <> @#$%^&*_+=|\\/~`",
    "   leading spaces and trailing spaces   ",
    "tabs\there\tand\tthere",
    "line one\nline two\n\nline four",
    "\n\nstarts with newlines",
    "你好，世界。这是一个测试。",
    "日本語のテキストとカタカナ",
    "emoji 🙂👍🏽 and symbols ★ ✓ → ∞",
    "positive negative neutral yes no maybe",
    "World Sports Business Sci/Tech",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "<s>text between bos and eos</s>",
    "a",
    "Rating: 5",
    "UPPER CASE WORDS AND MiXeD CaSe",
    "can't won't it's we're they'll I'd you've",
    "hyphen-ated words and under_scores and dots.in.names",
    "https://example.com/path?query=1&other=two#frag",
    "email: someone@example.org, phone +1 (555) 010-9999",
    "def f(x):\n    return x ** 2  # code\n",
    "{\"json\": [1, 2, 3], \"key\": null}",
    "Review: Terrible. Broke after two days!!! 1/5 would not buy again...",
    "Sentence with     many      inner     spaces",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ",
    "The end of the prompt is here",
]

# Gemma-3's chat template (the string-content path of the real one).
GEMMA_CHAT = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)

# SmolLM2-135M-Instruct's chat template: ChatML that adds its own system turn when none is given.
SMOLLM2_CHAT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_gemma_tokenizer():
    """Gemma's tokenizer shape (BPE with byte fallback, spaces as "▁", <0xNN> byte tokens, pad/eos/bos/unk
    at ids 0-3, <start_of_turn>/<end_of_turn>), trained on a few lines in milliseconds."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.train_from_iterator(CORPUS * 20, trainer=trainers.BpeTrainer(vocab_size=700,
                                                                      special_tokens=specials + byte_tokens))
    spec = json.loads(tok.to_str())
    fast = GemmaTokenizer(vocab=spec["model"]["vocab"], merges=[tuple(m) for m in spec["model"]["merges"]])
    fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    fast.chat_template = GEMMA_CHAT
    return fast


def build_tiny_gemma3(tokenizer, seed: int = 0):
    """A random Gemma-3 text model: 6 layers (5 sliding, 1 full attention), head_dim 256 as llama.cpp
    assumes (query_pre_attn_scalar = head_dim), a sliding window of 8 tokens that the prompts exceed."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return Gemma3ForCausalLM(config).eval()


def build_tiny_qwen2(tokenizer, seed: int = 0):
    """A random Qwen2 (q/k/v biases, untied LM head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases, so a dropped bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def next_tokens(model, tokenizer, prompts=PROMPTS) -> list[int]:
    """The greedy next token after each prompt (one forward pass each, no padding)."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(int(model(input_ids=ids).logits[0, -1].argmax()))
    return out


def load_gguf(path: Path):
    """(model, tokenizer) that transformers builds from the GGUF file alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def gguf_fields(path: Path) -> dict:
    """Metadata key -> value, and "tensors" -> {name: quant type name}."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    fields["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields


GO_RENDERER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var msgs []Message
	if err := json.Unmarshal([]byte(os.Args[2]), &msgs); err != nil { panic(err) }
	t := template.Must(template.New("m").Parse(os.Args[1]))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": msgs}); err != nil { panic(err) }
}
"""


def build_go_renderer(folder: Path) -> Path | None:
    """A program rendering a Go text/template over {Messages: [...]} as Ollama does; None without Go."""
    go = shutil.which("go")
    if go is None:
        return None
    (folder / "main.go").write_text(GO_RENDERER)
    binary = folder / "render"
    subprocess.run([go, "build", "-o", str(binary), str(folder / "main.go")], check=True, cwd=folder,
                   env={"HOME": str(folder), "GOCACHE": str(folder / "cache"), "PATH": "/usr/bin:/bin",
                        "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}, timeout=300)
    return binary


def render_go(binary: Path, template: str, messages: list[dict]) -> str:
    return subprocess.run([str(binary), template, json.dumps(messages)], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def modelfile_directive(text: str, name: str) -> str | None:
    """The triple-quoted value of a Modelfile directive (TEMPLATE, SYSTEM, LICENSE)."""
    head = f'{name} """'
    if head not in text:
        return None
    return text.split(head, 1)[1].split('"""', 1)[0]
