"""Prompt/completion -> token ids and labels. One function builds the inputs of training, rank scoring
and generation, so all three see the same tokens.

Causal models: `input_ids = prompt_ids + completion_ids`, `labels = [-100] * len(prompt_ids) + completion_ids`,
where the completion is tokenized on its own (`separator + completion`, default " ") and ends with EOS.
Labels never come from masking pad ids (SmolLM2's pad equals its EOS) nor from searching the token stream
for a response string.

With `chat_template=True` (instruct models) the prompt is the user turn up to the assistant header (the
template's generation prompt), the completion is the assistant text plus the template's end-of-turn token;
no second EOS is added.

Seq2seq models: `input_ids` = the prompt (encoder), `labels` = completion + EOS (decoder).

Truncation never cuts the completion: the prompt is cut (from the left, keeping BOS, or from the middle)
and an example whose completion alone does not fit is dropped. Both are counted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from instructkit.config import ModelConfig
from instructkit.io import replace_folder, sha256_file, temp_folder_beside

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizeSettings:
    """How prompt and completion become token ids; training, scoring and generation share one."""

    max_length: int = 256  # tokens of prompt + completion (+ EOS); the prompt is cut, never the completion
    truncation: Literal["left", "middle"] = "left"
    chat_template: bool = False
    system_prompt: str | None = None
    separator: str = " "
    seq2seq: bool = False

    @classmethod
    def from_model_config(cls, model: ModelConfig, is_seq2seq: bool) -> TokenizeSettings:
        """The settings a run's `model:` section asks for."""
        return cls(max_length=model.max_length, truncation=model.truncation, chat_template=model.chat_template,
                   system_prompt=model.system_prompt, seq2seq=is_seq2seq)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool = False


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dropped_ids"] = out["dropped_ids"][:20]
        return out


# --------------------------------------------------------------------------------------------------
# Text -> pieces
# --------------------------------------------------------------------------------------------------


def _chat_messages(prompt: str, settings: TokenizeSettings) -> list[dict[str, str]]:
    messages = []
    if settings.system_prompt is not None:
        messages.append({"role": "system", "content": settings.system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


def chat_texts(tokenizer: Any, prompt: str, completion: str, settings: TokenizeSettings) -> tuple[str, str]:
    """(prompt text up to the assistant header, assistant text + end-of-turn) from the chat template."""
    messages = _chat_messages(prompt, settings)
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": completion}], add_generation_prompt=False, tokenize=False
    )
    if not full.startswith(head):
        raise ValueError("the chat template's generation prompt is not a prefix of the full conversation")
    # The template ends the turn with its end-of-turn token, often followed by a newline: keep the token.
    return head, full[len(head):].rstrip()


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: completions must end with one")
    return int(eos)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], settings: TokenizeSettings) -> list[list[int]]:
    """Prompt token ids (with the tokenizer's own special tokens, e.g. BOS), untruncated."""
    if settings.chat_template and not settings.seq2seq:
        texts = [chat_texts(tokenizer, p, "", settings)[0] for p in prompts]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if not settings.seq2seq:
        eos = tokenizer.eos_token_id
        # A causal prompt must not end with EOS (some tokenizers append it): the completion follows.
        ids = [x[:-1] if x and eos is not None and x[-1] == eos and len(x) > 1 else x for x in ids]
    return [list(x) for x in ids]


def encode_completions(
    tokenizer: Any,
    completions: Sequence[str],
    settings: TokenizeSettings,
    prompts: Sequence[str] | None = None,
    add_eos: bool = True,
) -> list[list[int]]:
    """Completion token ids: `separator + completion` (+ EOS); with a chat template, the assistant turn."""
    if settings.chat_template and not settings.seq2seq:
        if prompts is None:
            raise ValueError("chat completions need their prompts (the template may depend on them)")
        texts = [chat_texts(tokenizer, p, c, settings)[1] for p, c in zip(prompts, completions)]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if not add_eos:  # scoring a choice: drop the end-of-turn token
            ids = [x[:-1] for x in ids]
        return [list(x) for x in ids]
    sep = "" if settings.seq2seq else settings.separator
    ids = tokenizer([sep + c for c in completions], add_special_tokens=False)["input_ids"]
    if add_eos:
        eos = _eos_id(tokenizer)
        return [list(x) + [eos] for x in ids]
    return [list(x) for x in ids]


def end_of_turn_id(tokenizer: Any, settings: TokenizeSettings) -> int | None:
    """The special token the chat template closes an assistant turn with (<|im_end|>, <end_of_turn>).

    Found the way training learns it: the last token of an encoded assistant turn
    (`encode_completions(..., add_eos=True)`). None when no chat template is in use (`settings`, or the
    tokenizer has none), for seq2seq, when the template cannot render a plain user/assistant exchange, or
    when the turn ends with an ordinary token (a `role: content` template): an ordinary token is no stop.
    """
    if not settings.chat_template or settings.seq2seq or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        ids = encode_completions(tokenizer, ["x"], settings, ["x"], add_eos=True)[0]
    except Exception:  # noqa: BLE001 - any template error means: no end-of-turn token to stop at
        return None
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return int(ids[-1]) if ids and ids[-1] in special else None


def stop_token_ids(tokenizer: Any, settings: TokenizeSettings, existing: Any = None) -> list[int]:
    """Token ids that end an answer, in this order without repeats: `existing` (an int or a list, e.g. a
    model's generation_config.eos_token_id), the tokenizer's EOS, the chat template's end-of-turn token.

    Raises: ValueError when there is none (generation would never stop).
    """
    ids: list[int] = []
    for value in (existing, tokenizer.eos_token_id, end_of_turn_id(tokenizer, settings)):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    if not ids:
        raise ValueError("the tokenizer has no EOS token: generation would never stop")
    return ids


def truncate_prompt(ids: list[int], budget: int, mode: str, keep_first: bool) -> list[int]:
    """Cut `ids` to `budget` tokens from the left (keeping a leading BOS) or from the middle."""
    if len(ids) <= budget:
        return ids
    if budget <= 0:
        return []
    if mode == "middle":
        head = budget // 2
        return ids[:head] + ids[len(ids) - (budget - head):]
    if keep_first and budget >= 2:
        return ids[:1] + ids[len(ids) - (budget - 1):]
    return ids[len(ids) - budget:]


def assemble(
    prompt_ids: list[int], completion_ids: list[int], settings: TokenizeSettings, bos_id: int | None
) -> Encoded | None:
    """Join prompt and completion under `max_length`; None when the completion alone does not fit."""
    if settings.seq2seq:
        if len(completion_ids) > settings.max_length or not prompt_ids:
            return None
        cut = _cut_encoder_input(prompt_ids, settings)
        return Encoded(cut, list(completion_ids), len(cut), truncated=len(cut) < len(prompt_ids))
    budget = settings.max_length - len(completion_ids)
    min_prompt = 2 if (bos_id is not None and prompt_ids[:1] == [bos_id]) else 1
    if budget < min_prompt:
        return None
    keep_first = bos_id is not None and prompt_ids[:1] == [bos_id]
    cut = truncate_prompt(prompt_ids, budget, settings.truncation, keep_first)
    return Encoded(
        input_ids=cut + list(completion_ids),
        labels=[IGNORE_INDEX] * len(cut) + list(completion_ids),
        prompt_length=len(cut),
        truncated=len(cut) < len(prompt_ids),
    )


def encode_example(tokenizer: Any, prompt: str, completion: str, settings: TokenizeSettings) -> Encoded | None:
    """Tokenize one example for training (also used by rank scoring and generation, via its parts)."""
    return encode_batch(tokenizer, [prompt], [completion], settings)[0]


def encode_batch(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    settings: TokenizeSettings,
    add_eos: bool = True,
) -> list[Encoded | None]:
    """Tokenize many examples at once (the fast tokenizer batches); None marks a dropped example."""
    prompt_ids = encode_prompts(tokenizer, prompts, settings)
    completion_ids = encode_completions(tokenizer, completions, settings, prompts, add_eos=add_eos)
    bos = tokenizer.bos_token_id
    return [assemble(p, c, settings, bos) for p, c in zip(prompt_ids, completion_ids)]


def encode_for_generation(
    tokenizer: Any, prompts: Sequence[str], settings: TokenizeSettings, max_new_tokens: int
) -> list[list[int]]:
    """Prompt ids for generation, cut exactly as in training so that prompt + answer fits max_length."""
    ids = encode_prompts(tokenizer, prompts, settings)
    if settings.seq2seq:  # the encoder input is cut exactly as `assemble` cuts it for training
        return [_cut_encoder_input(x, settings) for x in ids]
    bos = tokenizer.bos_token_id
    budget = max(settings.max_length - max_new_tokens, 2)
    return [truncate_prompt(x, budget, settings.truncation, bos is not None and x[:1] == [bos]) for x in ids]


def _cut_encoder_input(prompt_ids: list[int], settings: TokenizeSettings) -> list[int]:
    cut = truncate_prompt(prompt_ids, settings.max_length, settings.truncation, keep_first=False)
    if len(cut) < len(prompt_ids) and prompt_ids[-1] != cut[-1]:
        cut = cut[:-1] + prompt_ids[-1:]  # keep the encoder's closing token (e.g. T5's </s>)
    return cut


# --------------------------------------------------------------------------------------------------
# Whole datasets, cached by a fingerprint of (tokenizer file, template versions, settings)
# --------------------------------------------------------------------------------------------------


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's file (tokenizer.json) when it came from a folder; else of its JSON."""
    folder = getattr(tokenizer, "name_or_path", "") or ""
    candidate = Path(folder) / "tokenizer.json"
    digest = hashlib.sha256()
    if folder and candidate.is_file():
        digest.update(sha256_file(candidate).encode())
    else:
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(getattr(tokenizer, "chat_template", None) or "").encode())
    digest.update(str((tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return digest.hexdigest()


def cache_fingerprint(tokenizer: Any, template_versions: Sequence[str], settings: TokenizeSettings,
                      data_digest: str) -> str:
    """The tokenized-data cache key: tokenizer file hash + template versions + settings + data digest."""
    blob = json.dumps(
        {
            "tokenizer": tokenizer_hash(tokenizer),
            "templates": sorted(set(template_versions)),
            "settings": asdict(settings),
            "data": data_digest,
            "format": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def examples_digest(examples: Sequence[dict]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex["prompt"].encode())
        digest.update(b"\x00")
        digest.update(ex["completion"].encode())
        digest.update(b"\x01")
    return digest.hexdigest()


def tokenize_examples(
    examples: Sequence[dict],
    tokenizer: Any,
    settings: TokenizeSettings,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 1000,
) -> tuple[Any, TokenizeStats]:
    """Tokenize examples into a `datasets.Dataset` with input_ids, labels, prompt_length, index.

    With `cache_dir`, the result is saved under the fingerprint and reused by later calls with the same
    tokenizer, templates, settings and data.
    """
    import datasets

    fingerprint = cache_fingerprint(
        tokenizer, [ex.get("template_version", "") for ex in examples], settings, examples_digest(examples)
    )
    cached = Path(cache_dir) / fingerprint if cache_dir else None
    if cached is not None and (cached / "stats.json").is_file():
        stats = TokenizeStats(**json.loads((cached / "stats.json").read_text()))
        return datasets.load_from_disk(str(cached / "data")), stats

    stats = TokenizeStats()
    columns: dict[str, list] = {"input_ids": [], "labels": [], "prompt_length": [], "index": []}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        encoded = encode_batch(tokenizer, [e["prompt"] for e in chunk], [e["completion"] for e in chunk], settings)
        for offset, enc in enumerate(encoded):
            stats.examples += 1
            if enc is None:
                stats.dropped += 1
                stats.dropped_ids.append(str(chunk[offset].get("source_id", start + offset)))
                continue
            stats.truncated += int(enc.truncated)
            stats.prompt_tokens += enc.prompt_length
            stats.completion_tokens += sum(1 for x in enc.labels if x != IGNORE_INDEX)
            columns["input_ids"].append(enc.input_ids)
            columns["labels"].append(enc.labels)
            columns["prompt_length"].append(enc.prompt_length)
            columns["index"].append(start + offset)
    dataset = datasets.Dataset.from_dict(columns)  # datasets 5 has no fingerprint argument here
    if cached is not None:
        tmp = temp_folder_beside(cached)
        dataset.save_to_disk(str(tmp / "data"))
        (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
        replace_folder(tmp, cached)
        dataset = datasets.load_from_disk(str(cached / "data"))
    return dataset, stats
