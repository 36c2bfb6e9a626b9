"""The tokenizer as GGUF metadata: vocabulary, token types, merges, special ids, chat template.

Two kinds of vocabulary, both BPE (`tokenizer.ggml.model`):

- "gpt2", byte-level BPE (SmolLM2, Qwen2, the test tokenizers): tokens in the byte alphabet, the merges,
  and `tokenizer.ggml.pre` naming the pre-tokenizer split (`pre_tokenizer_name`);
- "llama", sentencepiece-style BPE with byte fallback (Gemma): "▁" for spaces, `<0xNN>` byte tokens,
  scores (minus the rank of the merge that makes a token: llama.cpp merges the best-scored pair first, which
  is BPE's merge order) and the merges too (transformers' GGUF loader reads them).

Token types: CONTROL for special added tokens and those that look special (`looks_special`), USER_DEFINED
for other added tokens (their "▁" written as spaces, as llama.cpp reads them), UNKNOWN, BYTE, and
UNUSED for embedding rows the tokenizer has no token for (`[PAD<id>]`, as llama.cpp writes them).
Whether BOS/EOS are added is measured by encoding a text, not read from a flag, so llama.cpp tokenizes
as the tokenizer used in training did.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from instructkit.data.tokenize import TokenizeSettings, end_of_turn_id
from instructkit.errors import ModelError

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def backend_json(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's tokenizer.json as data. Raises: ModelError for a slow (Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"GGUF export needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} "
                         "has none")
    return json.loads(backend.to_str())


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer / decoder as a flat list (a Sequence unrolled)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get(key, []) for step in _steps(child, key)]
    return [node]


def vocab_kind(spec: dict[str, Any]) -> str:
    """"gpt2" (byte-level BPE) or "llama" (sentencepiece-style BPE with byte fallback).

    Raises: ModelError for any other tokenizer model (WordPiece, Unigram, ...).
    """
    model_type = spec.get("model", {}).get("type")
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    decoders = _steps(spec.get("decoder"), "decoders")
    if model_type == "BPE" and any(p.get("type") == "ByteLevel" for p in pre + decoders):
        return "gpt2"
    if model_type == "BPE" and spec["model"].get("byte_fallback"):
        return "llama"
    raise ModelError(f"GGUF export writes byte-level or sentencepiece-style BPE vocabularies; this tokenizer "
                     f"is {model_type or 'unknown'} (pre-tokenizer {[p.get('type') for p in pre]})")


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) of a byte-level tokenizer's split.

    ByteLevel with its own regex is GPT-2's split ("gpt-2": llama.cpp's spelling in llama-vocab.cpp, while
    `tokenizer.ggml.model` says "gpt2"; "gpt2" there makes llama.cpp refuse the file with "unknown
    pre-tokenizer type"); Digits + ByteLevel is "smollm"; a Split regex
    before ByteLevel is named as transformers' GGUF loader names it (llama-bpe, qwen2, ...).
    Raises: ModelError for a split llama.cpp would not reproduce.
    """
    steps = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    digits = kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
    if digits and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise ModelError(f"GGUF export: llama.cpp has no name for this tokenizer's pre-tokenizer {kinds} "
                     f"({json.dumps(spec.get('pre_tokenizer'))[:200]})")


def looks_special(token: str) -> bool:
    """An added token that tokenizer.json leaves non-special but llama.cpp's converter makes a control token
    (convert_hf_to_gguf.py `does_token_look_special`, llama.cpp#8228): <|...|>, <｜...｜>, <unused...>,
    <pad>, <mask>, <2mass>, [@BOS@]. Written USER_DEFINED, llama.cpp warns "control-looking token ... was
    not control-type" at load and prints the token's text in the output (Qwen2's <|fim_pad|> ...)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def token_table(tokenizer: Any, n_vocab: int, kind: str) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..n_vocab-1.

    Raises: ModelError when the tokenizer has ids past the model's embedding rows.
    """
    from gguf import TokenType

    by_id = {int(i): tok for tok, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= n_vocab:
        raise ModelError(f"the tokenizer has token id {max(by_id)} but the model's embedding has only "
                         f"{n_vocab} rows")
    added = tokenizer.added_tokens_decoder
    unk = tokenizer.unk_token_id
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif kind == "llama" and i == unk:
            tokens.append(token)
            types.append(TokenType.UNKNOWN)
        elif i in added and (added[i].special or looks_special(token)):
            tokens.append(token)
            types.append(TokenType.CONTROL)
        elif i in added:  # llama.cpp matches user-defined tokens on the raw text: spaces, not "▁"
            tokens.append(token.replace("\u2581", " "))
            types.append(TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            if kind == "llama" and BYTE_TOKEN.fullmatch(token):
                types.append(TokenType.BYTE)
            else:
                types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Sentencepiece scores from BPE merges: minus the rank of the first merge making each token, 0 for
    tokens no merge makes (characters, bytes, special tokens)."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when encoding a plain text, as measured."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bool(ids) and bos is not None and ids[0] == bos
    return adds_bos, len(ids) > 1 and eos is not None and ids[-1] == eos


def special_vocab(tokenizer: Any, config: Any, n_vocab: int) -> Any:
    """`gguf.SpecialVocab` read from the tokenizer saved to a scratch folder: merges, BOS/EOS/UNK/PAD ids,
    the chat template; then the measured add_bos/add_eos and the end-of-turn id (eot) set over it.
    Several named chat templates (a dict) become tokenizer.chat_template (the "default" one) and
    tokenizer.chat_template.<name>, as llama.cpp's converter writes them."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="instructkit-vocab-") as scratch:
        tokenizer.save_pretrained(scratch)
        config.to_json_file(str(Path(scratch) / "config.json"))
        vocab = gguf.SpecialVocab(scratch, load_merges=True, n_vocab=n_vocab)
    add_bos, add_eos = adds_special(tokenizer)
    vocab.add_special_token = {"bos": add_bos, "eos": add_eos}
    if tokenizer.pad_token_id is not None:
        vocab.special_token_ids["pad"] = int(tokenizer.pad_token_id)
    eot = end_of_turn_id(tokenizer, TokenizeSettings(chat_template=True))
    if eot is not None and eot != vocab.special_token_ids.get("eos"):
        vocab.special_token_ids["eot"] = eot
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: gguf-py's list form, as tokenizer_config.json
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        vocab.chat_template = template
    return vocab


def write_vocab(writer: Any, tokenizer: Any, config: Any) -> None:
    """Put the tokenizer into the GGUF metadata (see the module docstring).

    Raises: ModelError for a tokenizer kind or pre-tokenizer the export cannot write, or more tokens than
    the model's embedding rows.
    """
    spec = backend_json(tokenizer)
    kind = vocab_kind(spec)
    n_vocab = int(config.vocab_size)
    tokens, types = token_table(tokenizer, n_vocab, kind)
    special = special_vocab(tokenizer, config, n_vocab)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    else:
        writer.add_tokenizer_pre("default")
        normalizers = _steps(spec.get("normalizer"), "normalizers")
        writer.add_add_space_prefix(any(n.get("type") == "Prepend" for n in normalizers))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores(merge_scores(tokens, special.merges))
    special.add_to_gguf(writer, quiet=True)
