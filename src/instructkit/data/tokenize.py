"""Prompt/completion -> token ids and labels. One function builds the inputs of training, rank scoring
and generation, so all three see the same tokens.

Causal models: `input_ids = prompt_ids + completion_ids`, `labels = [-100] * len(prompt_ids) + completion_ids`,
where the completion is tokenized on its own (`separator + completion`, default " ") and ends with EOS.
An empty prompt is the prefix token, BOS (else EOS), so the completion's first token is predicted too.
Labels never come from masking pad ids (SmolLM2's pad equals its EOS) nor from searching the token stream
for a response string.

With `chat_template=True` (instruct models) every example is a conversation rendered by the tokenizer's own
chat template (data/chat_encode.py): a chat example's `messages` (+ `tools`) followed by its completion as
the assistant turn, or [system_prompt], user = prompt, assistant = completion for a templated example. The
prompt of every assistant turn is `apply_chat_template(turns before it, add_generation_prompt=True)`, the
answer ends with the template's end-of-turn token (or EOS when the template writes none); training labels
every assistant turn (`loss_on: all_assistant_turns`) or the last; scoring and generation use the last.
A prompt given as `ChatPrompt` (data/chat.py) carries its conversation; plain text is one user turn.

Seq2seq models: `input_ids` = the prompt (encoder), `labels` = the completion as the tokenizer frames a
target text (BART: `<s>` in front) + EOS (decoder; `seq2seq_target_ids`).

Truncation never cuts the completion: the prompt is cut (from the left, keeping BOS, or from the middle)
and an example whose completion alone does not fit is dropped. Both are counted. A chat prompt is never cut
as tokens: whole earliest exchanges go first, then text inside the longest user content, never below
16 tokens; tool results are never cut (data/chat_truncate.py), so every example is a well-formed
conversation, or dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from instructkit.config import ModelConfig
from instructkit.data.chat import ChatPrompt, example_prompt, full_conversation
from instructkit.data.chat_encode import IGNORE_INDEX, LossOn, encode_conversation, special_ids, with_system
from instructkit.data.chat_encode import prompt_ids as chat_prompt_ids
from instructkit.data.seq2seq import seq2seq_target_ids
from instructkit.data.text_ids import continuation_ids, prefix_token_id, prompt_token_ids
from instructkit.data.text_ids import eos_id as _eos_id
from instructkit.data.tokenize_stats import TokenizeStats
from instructkit.io import replace_folder, sha256_file, temp_folder_beside


@dataclass(frozen=True)
class TokenizeSettings:
    """How prompt and completion become token ids; training, scoring and generation share one."""

    max_length: int = 256  # tokens of prompt + completion (+ EOS); the prompt is cut, never the completion
    truncation: Literal["left", "middle"] = "left"
    chat_template: bool = False
    system_prompt: str | None = None
    separator: str = " "
    seq2seq: bool = False
    loss_on: LossOn = "all_assistant_turns"  # chat training examples: every assistant turn, or the last

    @classmethod
    def from_model_config(cls, model: ModelConfig, is_seq2seq: bool,
                          loss_on: LossOn = "all_assistant_turns") -> TokenizeSettings:
        """The settings a run's `model:` section (and `train.loss_on`) asks for."""
        return cls(max_length=model.max_length, truncation=model.truncation, chat_template=model.chat_template,
                   system_prompt=model.system_prompt, seq2seq=is_seq2seq, loss_on=loss_on)

    @property
    def chat(self) -> bool:
        """Whether examples are rendered with the chat template (causal models only)."""
        return self.chat_template and not self.seq2seq


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool = False


# --------------------------------------------------------------------------------------------------
# Text -> pieces
# --------------------------------------------------------------------------------------------------


def chat_messages(prompt: str, settings: TokenizeSettings,
                  completion: str | None = None) -> tuple[list[dict], list | None]:
    """(messages, tools) of an example: a `ChatPrompt`'s turns or one user turn, the system prompt first
    when set and the conversation has none, and the assistant turn `completion` last when given."""
    if isinstance(prompt, ChatPrompt):
        messages, tools = list(prompt.messages), list(prompt.tools) if prompt.tools else None
    else:
        messages, tools = [{"role": "user", "content": prompt}], None
    messages = with_system(messages, settings.system_prompt)
    if completion is not None:
        messages = full_conversation(messages, completion, tools)
    return messages, tools


def _chat_example(tokenizer: Any, prompt: str, completion: str, settings: TokenizeSettings,
                  truncate: bool = True) -> Encoded | None:
    """The last assistant turn of a chat example (scoring, generation), cut to `max_length` unless not."""
    messages, tools = chat_messages(prompt, settings, completion)
    encoded = encode_conversation(tokenizer, messages, tools, loss_on="last_assistant_turn",
                                  max_length=settings.max_length if truncate else 1 << 62,
                                  truncation=settings.truncation)[0]
    if encoded is None:
        return None
    return Encoded(encoded.input_ids, encoded.labels, encoded.prompt_length, encoded.truncated)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], settings: TokenizeSettings) -> list[list[int]]:
    """Prompt token ids (with the tokenizer's own special tokens, e.g. BOS), untruncated."""
    if settings.chat:
        return [chat_prompt_ids(tokenizer, *chat_messages(p, settings))[0] for p in prompts]
    ids = prompt_token_ids(tokenizer, prompts)
    if not settings.seq2seq:
        eos = tokenizer.eos_token_id
        # A causal prompt must not end with EOS (some tokenizers append it): the completion follows.
        ids = [x[:-1] if x and eos is not None and x[-1] == eos and len(x) > 1 else x for x in ids]
        # Nor be empty: no position would predict the answer's first token (lm-eval's prefix token).
        ids = [x if x else [prefix_token_id(tokenizer)] for x in ids]
    return [list(x) for x in ids]


def encode_completions(
    tokenizer: Any,
    completions: Sequence[str],
    settings: TokenizeSettings,
    prompts: Sequence[str] | None = None,
    add_eos: bool = True,
) -> list[list[int]]:
    """Completion token ids: `separator + completion` (+ EOS); with a chat template, the assistant turn.

    A causal completion is tokenized as it reads after its prompt (`text_ids.continuation_ids`: no
    SentencePiece start-of-text "▁", trl#598); a seq2seq one, which the decoder starts afresh, alone.
    """
    if settings.chat:
        if prompts is None:
            raise ValueError("chat completions need their prompts (the template may depend on them)")
        ids = []
        for p, c in zip(prompts, completions):
            enc = _chat_example(tokenizer, p, c, settings, truncate=False)
            answer = enc.input_ids[enc.prompt_length:]  # type: ignore[union-attr]
            ids.append(answer if add_eos else answer[:-1])  # scoring a choice: without the end-of-turn token
        return ids
    if settings.seq2seq:
        return seq2seq_target_ids(tokenizer, completions, add_eos)
    ids = continuation_ids(tokenizer, [settings.separator + c for c in completions])
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
    return int(ids[-1]) if ids and ids[-1] in special_ids(tokenizer) else None


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


def assemble_prompt(tokenizer: Any, prompt: str, prompt_ids: list[int], completion_ids: list[int],
                    settings: TokenizeSettings) -> Encoded | None:
    """`assemble(prompt_ids, completion_ids)`, except that a chat prompt is shortened by the conversation
    rule (module docstring) instead of cut as tokens; None when the completion leaves it no room."""
    if not settings.chat or len(prompt_ids) + len(completion_ids) <= settings.max_length:
        return assemble(prompt_ids, completion_ids, settings, tokenizer.bos_token_id)
    cut, _ = chat_prompt_ids(tokenizer, *chat_messages(prompt, settings),
                             budget=settings.max_length - len(completion_ids), truncation=settings.truncation)
    if len(cut) + len(completion_ids) > settings.max_length:
        return None
    return Encoded(cut + list(completion_ids), [IGNORE_INDEX] * len(cut) + list(completion_ids), len(cut),
                   truncated=True)


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
    """Tokenize many examples at once (the fast tokenizer batches); None marks a dropped example.

    A chat example is its conversation with the completion as the last assistant turn, that turn alone
    labelled (scoring and perplexity), shortened by the conversation rule (module docstring).
    """
    if settings.chat:
        encoded = [_chat_example(tokenizer, p, c, settings) for p, c in zip(prompts, completions)]
        if not add_eos:
            encoded = [e if e is None else Encoded(e.input_ids[:-1], e.labels[:-1], e.prompt_length, e.truncated)
                       for e in encoded]
        return encoded
    prompt_ids = encode_prompts(tokenizer, prompts, settings)
    completion_ids = encode_completions(tokenizer, completions, settings, prompts, add_eos=add_eos)
    bos = tokenizer.bos_token_id
    return [assemble(p, c, settings, bos) for p, c in zip(prompt_ids, completion_ids)]


def encode_for_generation(
    tokenizer: Any, prompts: Sequence[str], settings: TokenizeSettings, max_new_tokens: int
) -> list[list[int]]:
    """Prompt ids for generation, cut exactly as in training so that prompt + answer fits max_length.

    A chat prompt is shortened by the conversation rule (whole earliest exchanges, then inside the longest
    user content), never cut as tokens.
    """
    if settings.chat:
        budget = max(settings.max_length - max_new_tokens, 2)
        return [chat_prompt_ids(tokenizer, *chat_messages(p, settings), budget=budget,
                                truncation=settings.truncation)[0] for p in prompts]
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
            "format": 9,  # 2: chat by turn; 3: empty prompt BOS; 4: BOS once; 5: no chat-end EOS; 6-7: tools;
            # 8: a completion tokenized as after its prompt (text_ids.continuation_ids); 9: seq2seq targets
            # framed by the tokenizer (text_target)
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
        if ex.get("messages") or ex.get("tools"):
            digest.update(json.dumps([ex.get("messages"), ex.get("tools")], sort_keys=True).encode())
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

    With a chat template, a chat example (with `messages`) is its whole conversation with every assistant
    turn labelled (`settings.loss_on`), and gives one row per assistant turn when the template is not
    prefix-stable (data/chat_encode.py); `index` is the example's position either way. With `cache_dir`, the result is saved under the fingerprint and reused by later calls with the same
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
        if settings.chat:
            encoded = [_training_rows(tokenizer, e, settings) for e in chunk]
        else:
            encoded = [[e] for e in encode_batch(tokenizer, [e["prompt"] for e in chunk],
                                                 [e["completion"] for e in chunk], settings)]
        for offset, pieces in enumerate(encoded):
            stats.examples += 1
            for enc in pieces:
                if enc is None:
                    stats.dropped += 1
                    stats.dropped_ids.append(str(chunk[offset].get("source_id", start + offset)))
                    continue
                _add_row(columns, stats, enc, start + offset)
    dataset = datasets.Dataset.from_dict(columns)  # datasets 5 has no fingerprint argument here
    if cached is not None:
        tmp = temp_folder_beside(cached)
        dataset.save_to_disk(str(tmp / "data"))
        (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
        replace_folder(tmp, cached)
        dataset = datasets.load_from_disk(str(cached / "data"))
    return dataset, stats


def _training_rows(tokenizer: Any, example: dict, settings: TokenizeSettings) -> list[Encoded | None]:
    """The training rows of one example with a chat template (None: a row that does not fit)."""
    prompt = example_prompt(example)
    messages, tools = chat_messages(prompt, settings, example["completion"])
    encoded = encode_conversation(tokenizer, messages, tools, max_length=settings.max_length, loss_on=settings.loss_on,
                                  truncation=settings.truncation, source=f"example {example.get('source_id', '?')}")
    return [None if e is None else Encoded(e.input_ids, e.labels, e.prompt_length, e.truncated) for e in encoded]


def _add_row(columns: dict[str, list], stats: TokenizeStats, enc: Encoded, index: int) -> None:
    stats.truncated += int(enc.truncated)
    stats.prompt_tokens += enc.prompt_length
    stats.completion_tokens += sum(1 for x in enc.labels if x != IGNORE_INDEX)
    columns["input_ids"].append(enc.input_ids)
    columns["labels"].append(enc.labels)
    columns["prompt_length"].append(enc.prompt_length)
    columns["index"].append(index)
