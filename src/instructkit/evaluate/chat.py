"""Evaluating chat data: the last assistant turn of each held-out conversation, generated and scored.

A prepared chat example keeps the turns before its last assistant turn (`messages`, `tools`) and that
turn as `completion`. Its evaluation prompt is a `ChatPrompt` carrying the conversation, so generation,
perplexity and validation render it with the model's chat template exactly as training rendered it
(`apply_chat_template(messages, add_generation_prompt=True)`), and generation stops at the template's
end-of-turn token (data/tokenize.py `stop_token_ids`). Chat examples are scored with ROUGE-L and token F1
(`CHAT_METRICS`, set on the examples when they are prepared).

k-shot: each demonstration conversation (its turns but the system turn, and its answer) comes before the
example's own turns, after the example's system turn: earlier exchanges of one chat. A templated example's
demonstrations are exchanges too (user: its prompt, assistant: its completion), so with a chat template
every demonstration's answer is an assistant turn closed by the end-of-turn token, the end the answer is
generated to and its choices are scored with (evaluate/fewshot.py); without one, the text form (the string
value) holds the demonstrations as "\\n\\n"-ended blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from instructkit.data.chat import ChatPrompt, full_conversation
from instructkit.evaluate.fewshot import _few_shot_prompt


def eval_prompt(example: dict, demos: Sequence[dict], separator: str) -> str:
    """The prompt an example is evaluated on: a `ChatPrompt` for chat examples and for k-shot prompts (the
    demonstrations as earlier exchanges), else the text prompt.

    The string value is always the text form (`_few_shot_prompt`: demonstrations prepended), which
    predictions.jsonl shows and a model without a chat template is given.
    """
    text = _few_shot_prompt(example, demos, separator)
    messages = example.get("messages") or ([{"role": "user", "content": example["prompt"]}] if demos else None)
    if not messages:
        return text
    system = [m for m in messages if m["role"] == "system"]
    shots: list[dict] = []
    for demo in demos:
        turns = demo.get("messages") or [{"role": "user", "content": demo["prompt"]}]
        shots += full_conversation([m for m in turns if m["role"] != "system"], demo["completion"],
                                   demo.get("tools"))
    return ChatPrompt(system + shots + [m for m in messages if m["role"] != "system"], example.get("tools"),
                      text=text)
