"""Chat data: the roles a conversation may use, and the plain-text prompt of its turns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CHAT_ROLES = frozenset({"system", "user", "assistant"})


def chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """Plain-text prompt for the turns before the final assistant turn.

    A single user message (no system prompt) is the prompt as it is; otherwise the turns are written as
    "role: content" lines ending with "assistant:". Tokenization uses `messages` with the model's chat
    template when it has one; this text is for models without one and for reports.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"].strip()
    lines = [f"{m['role']}: {m['content'].strip()}" for m in messages]
    return "\n".join(lines) + "\nassistant:"
