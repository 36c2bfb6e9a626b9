"""Fitting a conversation into a token budget without damaging its scaffolding.

A rendered chat is never cut as a token stream (that would drop the system block or a turn header and
glue a special token to the middle of a text). Instead the MESSAGES are shortened and rendered again:

1. whole earliest exchanges go first: an exchange is a user turn and every turn up to the next user turn
   (assistant answers, tool calls, tool answers); system turns and the last exchange are always kept;
2. then text is cut inside the longest user content (by tokens: its start with `truncation: left`, its
   middle with `truncation: middle`), repeated until the conversation fits; a user content keeps at
   least MIN_KEEP_TOKENS tokens (a shorter one is not cut), so no question is emptied.

Assistant turns and tool results are never cut (half a JSON result is no result, and an answer learned
from it would be learned from what the tool did not say): an example whose system turn and last exchange
do not fit with every user content at its minimum does not fit at all (training drops and counts it; a
generation prompt is then sent in that shortest form, over the budget).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

CUTTABLE_ROLES = ("user",)
MIN_KEEP_TOKENS = 16
"""Tokens a cut user content keeps at least (module docstring)."""
_MAX_ROUNDS = 64


def cut_text(tokenizer: Any, text: str, drop: int, mode: str) -> str:
    """`text` less `drop` of its tokens: its first ones (`left`) or those in its middle (`middle`)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(len(ids) - drop, 0)
    if keep == 0:
        return ""
    if mode == "middle":
        head = keep // 2
        kept = ids[:head] + ids[len(ids) - (keep - head):]
    else:
        kept = ids[len(ids) - keep:]
    # A cut inside a multi-byte character decodes to U+FFFD at the edge: drop it.
    return tokenizer.decode(kept, skip_special_tokens=False).strip("\ufffd")


def _exchange_starts(messages: Sequence[dict]) -> list[int]:
    return [j for j, m in enumerate(messages) if m["role"] == "user"]


def fit_messages(
    tokenizer: Any,
    messages: Sequence[dict],
    measure: Callable[[list[dict]], int],
    budget: int,
    mode: str = "left",
) -> tuple[list[dict], bool, bool]:
    """(messages, whether anything was cut, whether they render within `budget` tokens).

    When nothing fits, the messages are the shortest this rule makes (system turns and the last exchange,
    user contents at MIN_KEEP_TOKENS) and the last value is False: training drops such an example.

    `measure(messages)` is the token count of the rendering that must fit (a training example, or a
    generation prompt). Follows the module docstring: earliest exchanges first, then inside the longest
    user/tool content.
    """
    current = [dict(m) for m in messages]
    if measure(current) <= budget:
        return current, False, True
    system = [m for m in current if m["role"] == "system"]
    body = [m for m in current if m["role"] != "system"]
    starts = _exchange_starts(body)
    for start in [s for s in starts if s > 0]:
        current = system + body[start:]
        if measure(current) <= budget:
            return current, True, True
    for _ in range(_MAX_ROUNDS):
        over = measure(current) - budget
        if over <= 0:
            return current, True, True
        sizes = [(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]), j)
                 for j, m in enumerate(current) if m["role"] in CUTTABLE_ROLES and m["content"]]
        sizes = [(size, j) for size, j in sizes if size > MIN_KEEP_TOKENS]
        if not sizes:
            return current, True, False
        size, j = max(sizes)
        # Re-tokenizing the rendered conversation can shift a token: the next round cuts what is still over.
        drop = min(over, size - MIN_KEEP_TOKENS)
        current[j] = {**current[j], "content": cut_text(tokenizer, current[j]["content"], drop, mode)}
    return current, True, measure(current) <= budget
