"""No validation or test prompt in training: the prompts written per split, and the training examples
left out because their prompt is a validation or test prompt (see build.py).

A multi-turn training conversation also learns each earlier assistant turn on the turns before it
(`train.loss_on: all_assistant_turns`), so those prompts count too: an earlier assistant turn whose
prompt (`chat_prompt` of the turns before it) is a validation or test prompt is marked `"weight": 0` (the
OpenAI fine-tuning format's key for an assistant turn not to learn; data/chat_encode.py leaves it
unlabelled, as context only) and counted in stats.json "prompt_leakage" "train_turns_unlabelled".

Prompts are kept as 16-byte BLAKE2b digests (a run of a million examples holds some 100 MB less than the
texts); two different prompts share a digest with probability about n^2 / 2^129. With `split.text_match:
normalized` a prompt is digested as split.normalized_text writes it (NFKC, casefolded, whitespace collapsed),
so a training prompt that differs from a test prompt only in case or whitespace is a test prompt too.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from instructkit.config import SplitConfig
from instructkit.data.chat import chat_prompt
from instructkit.data.split import canonical_text, normalized_text

NOTE_SHARE = 0.1
"""A dataset note is added when the guard leaves out more than this share of a template's training examples."""


def prompt_digest(prompt: str, normalize: bool = False) -> bytes:
    """The 16-byte BLAKE2b digest a prompt is kept as: of its `normalized_text` with `normalize`, else of
    its NFC form (`canonical_text`: canonically equivalent spellings are one prompt)."""
    prompt = normalized_text(prompt) if normalize else canonical_text(prompt)
    return hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def earlier_turn_digests(messages: Sequence[Mapping[str, Any]] | None, normalize: bool = False
                         ) -> list[tuple[int, bytes]]:
    """(index, prompt digest) of each assistant turn in `messages` (a chat example's turns before its final
    one) that follows a user turn: the prompts it is learned on with all_assistant_turns."""
    out = []
    for i, message in enumerate(messages or ()):
        if message["role"] == "assistant" and any(m["role"] == "user" for m in messages[:i]):
            out.append((i, prompt_digest(chat_prompt(messages[:i]), normalize)))
    return out


def unlabel_turns(line: str, turns: Sequence[int]) -> str:
    """The JSONL line of a chat example with its `messages` at `turns` marked "weight": 0."""
    example = json.loads(line)
    for i in turns:
        example["messages"][i]["weight"] = 0
    return json.dumps(example, ensure_ascii=False) + "\n"


class PromptLedger:
    """Validation and test prompts (rendered first) and the training prompts written after them.

    With `drop` a training example whose prompt is a validation or test prompt, of any template or
    dataset, is left out and counted per (dataset, template); without it, it is kept and only counted in
    `leaked`. With `normalize` prompts are compared as `normalized_text` writes them.
    """

    def __init__(self, drop: bool, normalize: bool = False):
        self.drop = drop
        self.normalize = normalize
        self.held: dict[str, Counter[bytes]] = {"validation": Counter(), "test": Counter()}
        self.held_any: set[bytes] = set()
        self.train: set[bytes] = set()
        self.dropped: Counter[tuple[str, str]] = Counter()
        """Training examples left out, by (dataset, template id)."""
        self.unlabelled: Counter[tuple[str, str]] = Counter()
        """Earlier assistant turns of kept training conversations marked not to learn, by (dataset, template)."""

    @classmethod
    def of(cls, split: SplitConfig) -> PromptLedger:
        """The ledger of `split.prompt_leakage` and `split.text_match`."""
        return cls(drop=split.prompt_leakage == "drop", normalize=split.text_match == "normalized")

    def digest(self, prompt: str) -> bytes:
        """The digest `prompt` is recorded as."""
        return prompt_digest(prompt, self.normalize)

    def turn_digests(self, messages: Sequence[Mapping[str, Any]] | None) -> list[tuple[int, bytes]]:
        """`earlier_turn_digests` as this ledger compares prompts."""
        return earlier_turn_digests(messages, self.normalize)

    def keep(self, split: str, prompt: str, dataset: str, template_id: str) -> bool:
        """Record `prompt` of `split`; False for a training example to leave out.

        Validation and test examples must all be recorded before the first training one.
        """
        return self.keep_digest(split, self.digest(prompt), dataset, template_id)

    def keep_digest(self, split: str, digest: bytes, dataset: str, template_id: str) -> bool:
        """`keep` for a prompt known by its `prompt_digest`."""
        if split != "train":
            self.held[split][digest] += 1
            self.held_any.add(digest)
        elif self.drop and digest in self.held_any:
            self.dropped[dataset, template_id] += 1
            return False
        else:
            self.train.add(digest)
        return True

    def held_turns(self, turns: Sequence[tuple[int, bytes]], dataset: str, template_id: str) -> list[int]:
        """Of a kept training conversation's `earlier_turn_digests`, the turns to mark not to learn: those
        whose prompt is a validation or test prompt (with `drop`; recorded as training prompts otherwise)."""
        held = [i for i, digest in turns if self.drop and digest in self.held_any]
        self.unlabelled[dataset, template_id] += len(held)
        self.train.update(digest for i, digest in turns if i not in held)
        return held

    def guard_turns(self, line: str, turns: Sequence[tuple[int, bytes]], dataset: str, template_id: str) -> str:
        """`line`, a kept training example, with those of its `earlier_turn_digests` that `held_turns`
        names marked "weight": 0."""
        held = self.held_turns(turns, dataset, template_id) if turns else []
        return unlabel_turns(line, held) if held else line

    def leaked(self) -> dict[str, int]:
        """{"validation": n, "test": n}: examples of that split whose prompt is a written training prompt."""
        train = self.train
        return {s: sum(n for d, n in c.items() if d in train) for s, c in self.held.items()}

    def report(self, policy: str) -> dict:
        """stats.json "prompt_leakage": the policy and the training examples it left out, per template."""
        by_template: Counter[str] = Counter()
        for (_, template_id), n in self.dropped.items():
            by_template[template_id] += n
        return {
            "policy": policy,
            "text_match": "normalized" if self.normalize else "exact",
            "train_examples_dropped": self.dropped.total(),
            "train_examples_dropped_by_template": dict(sorted(by_template.items())),
            "train_turns_unlabelled": self.unlabelled.total(),
        }

    def notes(self, dataset: str, written: Counter[str]) -> list[str]:
        """Notes for `dataset`: templates that lost over NOTE_SHARE of their training examples to the guard.

        `written` counts the training examples written per template id."""
        notes = []
        for (name, template_id), n in sorted(self.dropped.items()):
            total = n + written.get(template_id, 0)
            if name == dataset and n > NOTE_SHARE * total:
                notes.append(
                    f"{n} of {total} training examples of {template_id} left out: their prompt is also a "
                    "validation or test prompt (the same input in rows the dedup key tells apart, or a prompt "
                    "that reads few fields); `split.prompt_leakage: report` keeps them"
                )
        return notes
