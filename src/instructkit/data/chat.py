"""Chat data: the roles a conversation may use, its plain-text form, and the prompt that carries it.

A conversation is a list of messages in the Hugging Face form that `tokenizer.apply_chat_template` takes:

    {"role": "system" | "user" | "assistant" | "tool", "content": text}
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                          "function": {"name": ..., "arguments": {...}}}]}

plus an optional `tools` list of function specs ({"type": "function", "function": {name, description,
parameters}}). Prepared chat examples keep the turns before the last assistant turn as `messages`, the last
assistant turn as `completion` (a tool call as its JSON text, `tool_call_text`) and `tools` when there are
some. Reading rows (`messages` or ShareGPT `conversations`) is chat_rows.py; token ids are chat_encode.py.

`ChatPrompt` is a prompt that is a conversation: its string value is the plain-text form (reports,
predictions.jsonl, models without a chat template), its `messages` and `tools` go to the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
CHAT_METRICS = ("rougeL", "token_f1")
"""Metrics of chat examples (the last assistant turn, generated): ROUGE-L and SQuAD token F1."""


def tool_call_text(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The JSON text of tool calls, one `{"name": ..., "arguments": {...}}` object per line.

    This is how a function call is written as the completion of an example, and as the assistant's text
    for chat templates that do not render `tool_calls` themselves (chat_template.py).
    """
    lines = []
    for call in tool_calls:
        function = call.get("function", call)
        lines.append(json.dumps({"name": function.get("name"), "arguments": function.get("arguments", {})},
                                ensure_ascii=False))
    return "\n".join(lines)


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one message: its content, or the JSON of its tool calls (after any content)."""
    content = (message.get("content") or "").strip()
    calls = message.get("tool_calls")
    if calls:
        return f"{content}\n{tool_call_text(calls)}" if content else tool_call_text(calls)
    return content


def chat_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text prompt for the turns before the final assistant turn.

    A single user message (no system prompt) is the prompt as it is; otherwise the turns are written as
    "role: content" lines ending with "assistant:". Tokenization uses `messages` with the model's chat
    template when it has one; this text is for models without one and for reports.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return message_text(messages[0])
    lines = [f"{m['role']}: {message_text(m)}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def full_conversation(messages: Sequence[Mapping[str, Any]], completion: str,
                      tools: Sequence[Mapping[str, Any]] | None = None) -> list[dict]:
    """`messages` followed by the assistant turn `completion`.

    A completion that ends with the JSON text of calls to functions among `tools` (`tool_call_text`, after
    any text: `message_text`) is the assistant turn it was read from, text and calls, so a template that
    renders `tool_calls` gets them back as calls.
    """
    last: dict = {"role": "assistant", "content": completion}
    lines = completion.strip().splitlines()
    for start in range(len(lines)) if tools else ():  # the text before the calls, if any (`message_text`)
        calls = parse_tool_calls("\n".join(lines[start:]), tools)
        if calls:
            last = {"role": "assistant", "content": "\n".join(lines[:start]).strip(), "tool_calls": calls}
            break
    return [dict(m) for m in messages] + [last]


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]] | None) -> list[dict] | None:
    """The tool calls `text` is the JSON of (one object per line, each naming one of `tools`), else None."""
    names = {(t.get("function") or t).get("name") for t in tools or ()}
    calls = []
    for line in text.strip().splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            return None
        if not isinstance(value, dict) or set(value) != {"name", "arguments"} or value["name"] not in names:
            return None
        calls.append({"type": "function", "function": {"name": value["name"], "arguments": value["arguments"]}})
    return calls or None


class ChatPrompt(str):
    """A prompt that is a conversation: the turns before the answer (`messages`) and the `tools`.

    The string value is the plain-text form (`chat_prompt`), so reports and JSON files show it and code
    that only knows text still works; with a chat template, tokenization renders `messages` and `tools`
    with `apply_chat_template` instead (data/tokenize.py). Any string operation gives a plain `str`.
    """

    messages: tuple[dict, ...]
    tools: tuple[dict, ...] | None

    def __new__(  # noqa: PYI034 - typing.Self needs Python 3.11
        cls, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
        text: str | None = None,
    ) -> ChatPrompt:
        obj = super().__new__(cls, chat_prompt(messages) if text is None else text)
        obj.messages = tuple(dict(m) for m in messages)
        obj.tools = tuple(dict(t) for t in tools) if tools else None
        return obj

    def __getnewargs__(self) -> tuple:  # type: ignore[override]  # pickling keeps the conversation
        return (self.messages, self.tools, str(self))


def example_prompt(example: Mapping[str, Any]) -> str:
    """The prompt of a prepared example: a `ChatPrompt` when it has `messages`, else its `prompt` text."""
    messages = example.get("messages")
    if messages:
        return ChatPrompt(messages, example.get("tools"), text=example.get("prompt"))
    return example["prompt"]
