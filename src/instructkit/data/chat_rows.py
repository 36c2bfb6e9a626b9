"""Reading one chat row: `messages` (role/content) or ShareGPT `conversations` (from/value), and `tools`.

    messages        [{role: system|user|assistant|tool, content}, ...]; content is text, or a list of
                    text parts ([{type: text, text}], OpenAI's content-part form), joined with "\n" as
                    vLLM's chat_utils joins them for text-only models (a non-text part is a bad row
                    naming its type); an assistant turn may carry
                    `tool_calls` ([{id, type: function, function: {name, arguments}}], arguments an object
                    or its JSON text, as OpenAI's API writes it) instead of content (a tool turn's
                    `tool_call_id` and `name` are kept), `weight: 0` (OpenAI's
                    fine-tuning format: context only, not learned; not on the final turn) and its reasoning
                    (`reasoning_content`, or `reasoning`: the fields of DeepSeek's and vLLM's APIs), which
                    becomes part of the turn's text as "<think>\n{reasoning}\n</think>\n\n{content}": the
                    form reasoning templates (Qwen3, DeepSeek-R1) read back into their reasoning field and
                    render as they would the field; any other template shows it as text, so it is learned
    conversations   ShareGPT: [{from, value}, ...] with from = human | gpt | system | function_call |
                    observation (also user, assistant, tool); an optional `system` column is a first
                    system turn. A function_call turn is the assistant calling a tool (its value is the
                    JSON {"name": ..., "arguments": {...}}), an observation turn is the tool's answer.
    tools           optional column: a list (or its JSON text) of function specs, either {name,
                    description, parameters} or {type: function, function: {...}}

The row becomes `messages` (the turns before the final assistant turn, in the form of data/chat.py),
`completion` (the final assistant turn: its text, or the JSON of its tool calls), `tools` (None when
there are none) and `prompt` (the plain-text form). A trailing end-of-sequence marker ("<|im_end|>") is
stripped from every assistant turn. Malformed rows name the file, line, turn and what is wrong; so do
empty user turns and empty assistant turns before the final one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from instructkit.data.chat import CHAT_ROLES, chat_prompt, message_text
from instructkit.data.table import Problems

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "function_call": "function_call",
                  "observation": "tool", "tool": "tool"}
"""ShareGPT `from` values -> roles (function_call: an assistant turn that calls a tool)."""


class _Bad(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def chat_column(has: Any) -> str:
    """The field a chat table's turns are read from: "messages" when `has("messages")`, else "conversations".

    `has(name)` says whether the table has a column for a field (the `columns:` mapping applied).
    """
    return "messages" if has("messages") else "conversations"


def _json_value(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _tool_calls(value: Any, where: str) -> list[dict]:
    """Normalized tool calls from a function_call value or an assistant turn's `tool_calls`."""
    value = _json_value(value)
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        function = item.get("function", item) if isinstance(item, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise _Bad("bad function call", f"{where}: a function call must be JSON "
                       f'{{"name": ..., "arguments": {{...}}}}, got {str(item)[:120]}')
        arguments = _json_value(function.get("arguments", {}))
        if not isinstance(arguments, dict):
            raise _Bad("bad function call", f"{where}: the arguments of function call {name!r} must be a JSON "
                       f"object, got {str(arguments)[:120]}")
        call_id = item.get("id") if isinstance(item, dict) else None
        calls.append({**({"id": call_id} if isinstance(call_id, str) and call_id else {}),
                      "type": "function", "function": {"name": name, "arguments": arguments}})
    if not calls:
        raise _Bad("bad function call", f"{where}: an empty function call")
    return calls


def _tools(value: Any, where: str) -> list[dict] | None:
    """The `tools` column as [{type: function, function: spec}], None when empty or absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = _json_value(value)
    if not isinstance(value, list):
        raise _Bad("bad tools", f"{where}: column 'tools' must be a list of function specs (or its JSON), "
                   f"got {str(value)[:120]}")
    tools = []
    for j, spec in enumerate(value):
        function = spec.get("function", spec) if isinstance(spec, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _Bad("bad tools", f"{where}: column 'tools': item {j + 1} must be a function spec with a "
                       f"'name', got {str(spec)[:120]}")
        tools.append({"type": "function", "function": function})
    return tools or None


TEXT_PARTS = ("text", "input_text", "output_text")
"""Content-part types that hold text (OpenAI chat completions: text; its Responses API: input/output_text)."""


def _content_text(content: Any, where: str) -> Any:
    """A turn's content as text: text parts joined with "\n" (module docstring); other values as they are."""
    if not isinstance(content, list):
        return content
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text") if isinstance(part, dict) else None
        if kind in TEXT_PARTS and not isinstance(text, str):
            raise _Bad("bad content part", f"{where}: content part {k + 1} of type {kind!r} must hold its text "
                       f"as a string in 'text', got {str(part)[:80]}")
        if kind not in TEXT_PARTS:
            shown = f"of type {kind!r}" if isinstance(kind, str) else repr(part)[:80]
            raise _Bad("non-text content", f"{where}: content part {k + 1} is {shown}; only text parts "
                       f"({{type: text | input_text | output_text, text: ...}}) can be trained on a text model")
        texts.append(text)
    return "\n".join(texts)


def _from_messages(value: list, where: str) -> list[dict]:
    turns = []
    for j, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        role = role.lower() if isinstance(role, str) else role
        content = message.get("content") if isinstance(message, dict) else None
        content = _content_text(content, f"{where}: column 'messages': turn {j + 1}")
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if role == "assistant" and calls and content is None:
            content = ""
        if role == "assistant" and isinstance(content, str):
            content = _with_reasoning(message, content, f"{where}: column 'messages': turn {j + 1}")
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise _Bad("bad messages", f"{where}: column 'messages': turn {j + 1} must be "
                       "{role: system|user|assistant|tool, content: text}, "
                       f"got {str(message)[:120]}")
        turn: dict = {"role": role, "content": content}
        if role == "tool":  # which call it answers, for templates that write it (chat_template.py)
            turn.update({k: message[k] for k in ("tool_call_id", "name") if isinstance(message.get(k), str)})
        if role == "assistant" and calls:
            turn["tool_calls"] = _tool_calls(calls, f"{where}: column 'messages': turn {j + 1}")
        weight = message.get("weight", 1)
        if role == "assistant" and (weight not in (0, 1) or isinstance(weight, bool)):
            raise _Bad("bad messages", f"{where}: column 'messages': turn {j + 1}: weight must be 0 (context only, "
                       f"not learned) or 1, got {weight!r}")
        if role == "assistant" and weight == 0:
            turn["weight"] = 0
        turns.append(turn)
    return turns


REASONING_FIELDS = ("reasoning_content", "reasoning")


def _with_reasoning(message: dict, content: str, where: str) -> str:
    """`content` with the turn's reasoning before it as a <think> block (module docstring); as it is without."""
    found = [(k, message[k]) for k in REASONING_FIELDS if message.get(k) not in (None, "")]
    if not found:
        return content
    key, reasoning = found[0]
    if not isinstance(reasoning, str) or len(found) > 1 or "</think>" in content:
        raise _Bad("bad reasoning", f"{where}: {key!r} must be text, alone, and the content must not hold a "
                   f"<think> block of its own, got {str(reasoning)[:120]}")
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.strip()}" if reasoning.strip() else content


def _from_sharegpt(value: list, system: Any, where: str) -> list[dict]:
    turns = []
    if isinstance(system, str) and system.strip():
        turns.append({"role": "system", "content": system})
    for j, message in enumerate(value):
        source = message.get("from") if isinstance(message, dict) else None
        role = SHAREGPT_ROLES.get(source.lower()) if isinstance(source, str) else None
        text = message.get("value") if isinstance(message, dict) else None
        if role is None or not isinstance(text, str):
            raise _Bad("bad conversations", f"{where}: column 'conversations': turn {j + 1} must be "
                       f"{{from: {'|'.join(sorted(SHAREGPT_ROLES))}, value: text}}, got {str(message)[:120]}")
        if role == "function_call":
            calls = _tool_calls(text, f"{where}: column 'conversations': turn {j + 1} (function_call)")
            turns.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            turns.append({"role": role, "content": text})
    return turns


def _check_order(turns: list[dict], column: str, where: str) -> None:
    for j, turn in enumerate(turns):
        if turn["role"] == "system" and any(t["role"] != "system" for t in turns[:j]):
            raise _Bad("system turn not first", f"{where}: column {column!r}: turn {j + 1} is a system turn "
                       "after the conversation started (system turns come first)")
        if turn["role"] == "tool":
            before = turns[j - 1] if j else None
            if before is None or not (before["role"] == "tool" or before.get("tool_calls")):
                raise _Bad("tool turn without a call", f"{where}: column {column!r}: turn {j + 1} is a tool "
                           "(observation) turn that does not follow a function call")
    if turns[-1]["role"] != "assistant":
        raise _Bad("no final assistant turn", f"{where}: column {column!r}: the conversation must end with "
                   "an assistant turn to learn")
    if not any(t["role"] == "user" for t in turns[:-1]):
        raise _Bad("no user turn", f"{where}: column {column!r}: no user turn before the final assistant turn")


def _strip_markers(turns: list[dict], eos: Counter) -> None:
    from instructkit.data.rows import strip_eos

    for turn in turns:
        if turn["role"] == "assistant":
            text, marker = strip_eos(turn["content"])
            if marker:
                eos[marker] += 1
            turn["content"] = text


def parse_chat(row: Mapping[str, Any], where: str, eos: Counter) -> tuple[list[dict], list[dict] | None]:
    """(all turns, tools) of a chat row, EOS markers stripped from assistant turns (counted in `eos`).

    Raises: _Bad (reason, message naming `where`, the column and the turn) for malformed turns or tools.
    """
    column = "messages" if row.get("messages") is not None else "conversations"
    value = _json_value(row.get(column))
    if not isinstance(value, list) or not value:
        shape = "{role, content}" if column == "messages" else "{from, value}"
        raise _Bad(f"bad {column}", f"{where}: column {column!r} must be a non-empty list of {shape}")
    turns = _from_messages(value, where) if column == "messages" else _from_sharegpt(value, row.get("system"),
                                                                                    where)
    tools = _tools(row.get("tools"), where)
    if tools is None and any(t.get("tool_calls") for t in turns):
        raise _Bad("function call without tools", f"{where}: column {column!r}: the conversation calls a "
                   "function but the row has no 'tools' listing it")
    listed = {t["function"]["name"] for t in tools or ()}
    for j, turn in enumerate(turns):
        for call in turn.get("tool_calls") or ():
            if call["function"]["name"] not in listed:
                raise _Bad("function not in tools", f"{where}: column {column!r}: turn {j + 1} calls "
                           f"{call['function']['name']!r}, which the row's 'tools' do not list "
                           f"({', '.join(sorted(listed))})")
    _check_order(turns, column, where)
    _strip_markers(turns, eos)
    _check_texts(turns, column, where)
    return turns, tools


def _check_texts(turns: list[dict], column: str, where: str) -> None:
    """An empty user turn, or an empty assistant turn before the final one (a reply to learn, or the
    context of a later one), is a bad row; the final assistant turn is checked by chat_row."""
    for j, turn in enumerate(turns[:-1]):
        empty = not turn["content"].strip() and not turn.get("tool_calls")
        if empty and turn["role"] in ("user", "assistant"):
            raise _Bad("empty turn", f"{where}: column {column!r}: turn {j + 1} ({turn['role']}) is empty")
    if turns[-1].get("weight") == 0:
        raise _Bad("final turn not learned", f"{where}: column {column!r}: the final assistant turn has weight "
                   "0; an example must learn its final turn (drop the row, or end it at the last turn to learn)")


def chat_row(row: dict, where: str, problems: Problems, eos: Counter) -> dict | None:
    """Set a chat row's `messages` (turns before the final assistant turn), `completion`, `tools`, `prompt`.

    None when the row is bad and skipped. Raises: DataError through `problems` naming file, line, column
    and turn for malformed turns or tools, a conversation without a user turn or final assistant turn, or
    an empty final turn (unless skipping).
    """
    try:
        turns, tools = parse_chat(row, where, eos)
    except _Bad as bad:
        problems.bad(bad.reason, bad.message)
        return None
    completion = message_text(turns[-1])
    if not completion:
        column = "messages" if row.get("messages") is not None else "conversations"
        problems.bad("empty completion", f"{where}: column {column!r}: the final assistant turn is empty")
        return None
    context = turns[:-1]
    row["messages"] = context
    row["tools"] = tools
    row["prompt"] = chat_prompt(context)
    row["completion"] = completion
    return row
