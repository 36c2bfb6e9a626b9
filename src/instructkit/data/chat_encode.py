"""A conversation -> token ids and labels, turn by turn, with the model's own chat template.

For assistant turns at indices i1 < i2 < ... of `messages`, the example is built incrementally:

    prompt of turn i   = apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True, tools=...)
    turn i rendered    = apply_chat_template(messages[:i + 1], tokenize=True, tools=...)
    answer of turn i   = the tokens `turn i rendered` adds to `prompt of turn i`, through the template's
                         end-of-turn token (the last special token it writes: <|im_end|>, <end_of_turn>);
                         a template that ends the turn with ordinary text (a plain `role: content` template)
                         gets the tokenizer's EOS inserted after the answer's text, so the model learns to stop

A template that writes something only after the LAST message (Phi-3's `{% else %}{{ eos_token }}`, when no
generation prompt is asked for) would glue it to every answer, since each turn is rendered as the last one:
the answer would learn "<|end|>\n</s>" and the next turn's prompt (which has no </s>) would not follow it. Those
end-of-conversation tokens (`conversation_end`: special or blank tokens the template writes after a final
assistant turn but not before a following user turn) are left off every turn's rendering, as in the middle
of a conversation; the answer ends at the template's own end-of-turn token (trl#5526: Phi-3's training
template's generation span is `content<|end|>`, the EOS outside it).

Every prompt is exactly what the model is sent at inference for that turn, and the labels are the answers
(`train.loss_on: all_assistant_turns`, the default) or the last one alone (`last_assistant_turn`); system,
user and tool turns, headers and the whitespace after an end-of-turn token are -100. An assistant turn
marked `"weight": 0` (the OpenAI fine-tuning format's key; data/leakage.py sets it on a training
conversation's earlier turn whose prompt is a validation or test prompt) is context only, never labelled;
so is an assistant turn before the first user turn (a ShareGPT greeting: it has no prompt);
the key itself never reaches the template. For a prefix-stable
template the ids equal `apply_chat_template(messages, tokenize=True)` up to the whitespace (and the
end-of-conversation tokens) the template writes after the final end-of-turn token.

A template that is NOT prefix-stable (the prompt of a turn does not start with the conversation rendered
so far, e.g. one that drops the reasoning of earlier assistant turns) gives one example per assistant
turn instead, each the prompt of that turn + its answer, so every turn is still trained on the exact
prompt the model will see. So does a template without an end-of-turn token: the EOS inserted after an
answer is not in the next turn's prompt as the template renders it.

A template whose generation prompt opens the reasoning block the model must write (DeepSeek-R1's distilled
models: "<｜Assistant｜><think>\n") while its rendered assistant turn drops the reasoning (`content.split(
'</think>')[-1]`) cannot show the turn after that prompt; the answer is then the turn's own text after the
opened block (its reasoning, "</think>", the reply: the form data/chat_rows.py gives `reasoning_content`; a
turn without reasoning closes the block at once, "\n</think>\n\n" + reply, Qwen3's empty block) and the
template's end-of-turn token: what the model writes when it is sent that prompt (`forced_reasoning`). Any
other assistant turn that does not start with its generation prompt cannot be trained: TemplateError.

Tools, and templates that cannot render them: chat_template.py. Over-long conversations: chat_truncate.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from instructkit.data.chat_template import adapt_messages, render, template_name
from instructkit.data.chat_truncate import fit_messages
from instructkit.errors import TemplateError

IGNORE_INDEX = -100
LossOn = Literal["all_assistant_turns", "last_assistant_turn"]


@dataclass
class ChatEncoded:
    """One training example of a conversation: `labels` is -100 except on the trained answers."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    """Tokens before the first trained answer."""
    truncated: bool = False


class NotPrefixStable(Exception):
    """The template renders a turn's prompt differently from the conversation rendered so far."""


_SPECIAL: dict[int, tuple[Any, set[int]]] = {}


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (end-of-turn candidates), computed once per tokenizer.

    Added tokens count only when marked special: Gemma's vocabulary adds "\n" as a plain added token.
    """
    found = _SPECIAL.get(id(tokenizer))
    if found is None or found[0] is not tokenizer:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        ids = set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}
        found = _SPECIAL[id(tokenizer)] = (tokenizer, ids)
    return found[1]


_END: dict[int, tuple[Any, list[int]]] = {}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading ids `a` and `b` share."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def conversation_end(tokenizer: Any) -> list[int]:
    """The tokens the chat template writes after a final assistant turn but not when a user turn follows it
    (Phi-3: [EOS]); [] for most templates. Only special or blank tokens count: a template that renders the
    last turn otherwise (Qwen3's empty <think> block) has no such end. Probed once per tokenizer."""
    found = _END.get(id(tokenizer))
    if found is not None and found[0] is tokenizer:
        return found[1]
    user, answer = {"role": "user", "content": "zq7 question"}, {"role": "assistant", "content": "zq7 answer"}
    try:
        last = list(render(tokenizer, [user, answer], None, False))
        more = list(render(tokenizer, [user, answer, {"role": "user", "content": "zq7 again"}], None, False))
    except TemplateError:
        last, more = [], []
    end = last[common_prefix(last, more):]
    special = special_ids(tokenizer)
    if not any(t in special for t in end) or any(t not in special and tokenizer.decode([t]).strip() for t in end):
        end = []
    _END[id(tokenizer)] = (tokenizer, end)
    return end


def render_turn(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: list[dict] | None,
                start: int) -> list[int]:
    """Ids of `messages` (ending with an assistant turn, whose tokens begin at `start`) as the template renders
    them in the middle of a conversation: less the `conversation_end` tokens, when the turn keeps an
    end-of-turn token of its own."""
    ids = list(render(tokenizer, messages, tools, False))
    end = conversation_end(tokenizer)
    if end and ids[-len(end):] == end and any(t in special_ids(tokenizer) for t in ids[start:-len(end)]):
        return ids[:-len(end)]
    return ids


def split_answer(tokenizer: Any, part: list[int]) -> tuple[list[int], list[int]]:
    """(answer through its end-of-turn token, the masked rest) of the tokens an assistant turn adds.

    The end of the turn is the last special token of `part`; without one, the answer is `part` less its
    trailing whitespace tokens, plus the tokenizer's EOS.

    Raises: TemplateError when the template writes no end token and the tokenizer has no EOS.
    """
    special = special_ids(tokenizer)
    for k in range(len(part) - 1, -1, -1):
        if part[k] in special:
            return part[:k + 1], part[k + 1:]
    n = len(part)
    while n > 0 and not tokenizer.decode(part[n - 1:n]).strip():
        n -= 1
    if tokenizer.eos_token_id is None:
        raise TemplateError(f"{template_name(tokenizer)} ends an assistant turn with no special token and the "
                            "tokenizer has no EOS token: completions would have no end")
    return part[:n] + [int(tokenizer.eos_token_id)], part[n:]


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def forced_reasoning(tokenizer: Any, head: list[int], full: list[int], content: str,
                     i: int) -> tuple[list[int], list[int]]:
    """(answer through its end-of-turn token, the masked rest) of assistant turn `i` (text `content`) for a
    template whose generation prompt `head` opens a reasoning block that the rendered turn `full` lacks
    (module docstring): the ids of what the model writes after `head`, then the turn's end-of-turn token.

    Raises: TemplateError when `head` and `full` differ otherwise (the turn cannot be trained on the prompt
    the model is sent).
    """
    k = common_prefix(head, full)
    opened = tokenizer.decode(head[k:])
    if opened.strip() != THINK_OPEN:
        raise TemplateError(f"{template_name(tokenizer)} renders assistant turn {i + 1} not as a continuation "
                            "of its generation prompt (add_generation_prompt=True): the turn cannot be "
                            "trained on the prompt the model is sent")
    text = content.lstrip()
    if text.startswith(THINK_OPEN):
        written = text[len(THINK_OPEN):].lstrip(" \t").removeprefix("\n") if opened.endswith("\n") else \
            text[len(THINK_OPEN):]
    else:
        written = ("\n" if opened.endswith("\n") else "\n\n") + THINK_CLOSE + "\n\n" + text
    rendered, rest = split_answer(tokenizer, full[k:])
    end = rendered[-1:] if rendered and rendered[-1] in special_ids(tokenizer) else [int(tokenizer.eos_token_id)]
    return tokenizer.encode(written, add_special_tokens=False) + end, rest


def assistant_turns(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def opening(messages: Sequence[Mapping[str, Any]], i: int) -> bool:
    """Whether assistant turn `i` comes before any user turn (a ShareGPT greeting): context, never learned,
    since it has no prompt to be learned on (and templates refuse to render an empty conversation)."""
    return not any(m["role"] == "user" for m in messages[:i])


def unlearned(messages: Sequence[Mapping[str, Any]]) -> set[int]:
    """Ordinals (0 = first) among the assistant turns of `messages` of those marked "weight": 0."""
    turns = [m for m in messages if m["role"] == "assistant"]
    return {n for n, m in enumerate(turns) if m.get("weight", 1) == 0}


def _encode(tokenizer: Any, messages: list[dict], tools: list[dict] | None, loss_on: LossOn,
            skip: set[int] = frozenset()) -> ChatEncoded:
    """Turn-by-turn ids/labels of `messages` (already adapted to the template; the assistant turns whose
    ordinals are in `skip` are not labelled). See the module docstring.

    Raises: NotPrefixStable (only when several turns are trained); TemplateError.
    """
    turns = assistant_turns(messages)
    if not turns:
        raise TemplateError("a conversation to train on needs an assistant turn")
    if loss_on == "last_assistant_turn":
        turns = turns[-1:]
    else:
        turns = [i for n, i in enumerate(turns) if n == len(turns) - 1 or n not in skip and not opening(messages, i)]
    ids: list[int] = []
    labels: list[int] = []
    prompt_length = None
    for n, i in enumerate(turns):
        head = list(render(tokenizer, messages[:i], tools, True))
        if head[:len(ids)] != ids:
            raise NotPrefixStable(f"turn {i + 1}")
        labels += [IGNORE_INDEX] * (len(head) - len(ids))
        ids = head
        full = render_turn(tokenizer, messages[:i + 1], tools, len(head))
        if full[:len(head)] == head:
            answer, rest = split_answer(tokenizer, full[len(head):])
        else:
            answer, rest = forced_reasoning(tokenizer, head, full, messages[i]["content"], i)
        if prompt_length is None:
            prompt_length = len(ids)
        ids = ids + answer
        labels += answer
        if n < len(turns) - 1:
            ids += rest
            labels += [IGNORE_INDEX] * len(rest)
    return ChatEncoded(ids, labels, prompt_length or 0)


def with_system(messages: Sequence[Mapping[str, Any]], system_prompt: str | None) -> list[dict]:
    """`messages`, with a first system turn `system_prompt` when it is set and they have none."""
    out = [dict(m) for m in messages]
    if system_prompt is not None and not (out and out[0]["role"] == "system"):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    max_length: int,
    loss_on: LossOn = "all_assistant_turns",
    truncation: str = "left",
    source: str | None = None,
) -> list[ChatEncoded | None]:
    """Training examples of one conversation (ending with an assistant turn), each within `max_length`.

    One example, or one per assistant turn for a template that is not prefix-stable (module docstring).
    An over-long one is shortened by whole earliest exchanges, then inside the longest user content
    (chat_truncate.py; `truncated` set); None marks one that cannot fit (its last exchange does not, with
    every user content at its minimum: answers and tool results are never cut).

    Raises: TemplateError when the tokenizer has no chat template, the template cannot render the
    conversation, or renders an assistant turn not after its generation prompt; it names `source` (which
    example: a conversation the template refuses, e.g. two user turns in a row for a template that
    requires alternation, must be findable in the data).
    """
    messages = [dict(m) for m in messages]
    tools = list(tools) if tools else None

    def encode(msgs: list[dict], mode: LossOn) -> ChatEncoded:
        try:
            adapted, tools_arg = adapt_messages(tokenizer, msgs, tools)  # assistant turns kept one to one
            return _encode(tokenizer, adapted, tools_arg, mode, unlearned(msgs))
        except TemplateError as exc:
            raise TemplateError(f"{source}: {exc}" if source else str(exc)) from None

    try:
        pieces = [(messages, loss_on, encode(messages, loss_on))]
    except NotPrefixStable:
        pieces = []
        turns = assistant_turns(messages)
        for i in turns if loss_on == "all_assistant_turns" else turns[-1:]:
            if i != turns[-1] and (messages[i].get("weight", 1) == 0 or opening(messages, i)):
                continue
            piece = messages[:i + 1]
            pieces.append((piece, "last_assistant_turn", encode(piece, "last_assistant_turn")))
    out: list[ChatEncoded | None] = []
    for piece, mode, encoded in pieces:
        if len(encoded.input_ids) <= max_length:
            out.append(encoded)
            continue
        fitted, _, fits = fit_messages(tokenizer, piece, lambda msgs, mode=mode: len(encode(msgs, mode).input_ids),
                                       max_length, truncation)
        if not fits:
            out.append(None)
            continue
        result = encode(fitted, mode)
        result.truncated = True
        out.append(result)
    return out


def prompt_ids(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    budget: int | None = None,
    truncation: str = "left",
) -> tuple[list[int], bool]:
    """(ids of `apply_chat_template(messages, add_generation_prompt=True)`, whether it was shortened).

    With `budget`, an over-long conversation is shortened as in training (chat_truncate.py); one that
    cannot fit comes in the shortest form the rule makes (over the budget). Raises: TemplateError as
    `encode_conversation`.
    """
    messages = [dict(m) for m in messages]

    def ids_of(msgs: list[dict]) -> list[int]:
        adapted, tools_arg = adapt_messages(tokenizer, msgs, tools)
        return list(render(tokenizer, adapted, tools_arg, True))

    ids = ids_of(messages)
    if budget is None or len(ids) <= budget:
        return ids, False
    fitted, _, _ = fit_messages(tokenizer, messages, lambda m: len(ids_of(m)), budget, truncation)
    return ids_of(fitted), True
