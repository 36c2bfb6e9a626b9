"""k-shot prompts: demonstrations of the same template prepended to an example's prompt.

`k` examples of the same template drawn from `few_shot_pool` (seeded per example, never the same
source row) are prepended as "prompt completion\\n\\n" blocks. The prompt is cut from the left like any
prompt, so a long prompt can lose demonstrations: `truncated_prompts` counts the examples cut. A template
with no example in the pool (a held-out one) is left out of a k-shot evaluation.

The end of an answer is what follows every demonstration's answer, one rule for the prompt, generation and
rank classification (`answer_end`):

* a text prompt of a causal model: `DEMONSTRATION_END` ("\\n\\n", lm-evaluation-harness's
  `fewshot_delimiter`) ends each demonstration (`_few_shot_prompt`). A generated answer ends before its
  first "\\n\\n" (its `until`): a base model goes on with a made-up next demonstration otherwise. A ranked
  choice is scored followed by "\\n\\n", not by EOS: EOS never follows an answer in the prompt, "\\n\\n"
  always does. Its tokens are those a demonstration's end has in the prompt, where the next prompt follows
  it (`demonstration_answer_ids`): with a byte-level BPE "\\n\\n" at the end of a text is one token
  (SmolLM2: ĊĊ), before "Predict" two (Ċ Ċ), and the demonstrations show the model the two.
* a chat template (model.chat_template): the demonstrations are earlier exchanges of the conversation
  (evaluate/chat.py `eval_prompt`), each answer an assistant turn closed by the template's end-of-turn
  token; the answer is one more assistant turn and ends with that token, as in zero-shot evaluation.
* seq2seq: the demonstrations are encoder input; the decoder writes only the answer, which ends with EOS
  as trained.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from instructkit.data.text_ids import continuation_ids

DEMONSTRATION_END = "\n\n"
"""What follows each demonstration's answer in a k-shot text prompt: the prompt's demonstration separator,
generation's stop string and the end of every ranked choice (module docstring)."""
NEXT_PROMPT_CHARS = 32  # demonstration_answer_ids: this much of the next prompt settles the tokens before it


def _demonstrations(ex: dict, pool: dict[str, list[dict]], k: int, seed: int) -> list[dict]:
    """k pool examples of the same template, none from the same source row; seeded by the example itself.

    The draw depends only on (seed, template, source_id, prompt), not on the order of the evaluation set,
    so the same example gets the same demonstrations in every run.
    """
    candidates = [d for d in pool.get(ex["template_id"], []) if d.get("source_id") != ex.get("source_id")]
    rng = random.Random(f"{seed}|{ex['template_id']}|{ex.get('source_id')}|{ex['prompt']}")
    return rng.sample(candidates, min(k, len(candidates)))


def _few_shot_prompt(ex: dict, demos: Sequence[dict], separator: str) -> str:
    """"P1 C1\\n\\nP2 C2\\n\\nPROMPT": each demonstration as its prompt, the separator, its completion and
    `DEMONSTRATION_END`."""
    return "".join(f"{d['prompt']}{separator}{d['completion']}{DEMONSTRATION_END}" for d in demos) + ex["prompt"]


def answer_end(k_shot: int, chat: bool, is_seq2seq: bool) -> str | None:
    """The text an answer ends with in this evaluation's prompts: `DEMONSTRATION_END` for k-shot text
    prompts of a causal model; None where the answer ends as trained (zero-shot, chat, seq2seq: EOS or
    the end-of-turn token). Generation stops at it; rank classification scores it after every choice."""
    return DEMONSTRATION_END if k_shot and not chat and not is_seq2seq else None


def demonstration_answer_ids(tokenizer: Any, texts: Sequence[str], end: str, next_prompts: Sequence[str]
                             ) -> list[list[int]]:
    """Token ids of each `text + end` as a demonstration has them: followed by the next prompt.

    `next_prompts`: what follows `end`; rank scoring passes each k-shot prompt, whose start (the first
    demonstration's prompt) is how every block of it starts, all of one template. `text + end + next` is
    tokenized and the tokens of `next` (its first `NEXT_PROMPT_CHARS` characters) taken off its end. Where
    those are not a suffix (a token spans `end` and the next prompt), `text + end` alone is tokenized: the
    prompt has no clean end there either. Every piece is tokenized as it reads after other text
    (`continuation_ids`: no SentencePiece start-of-text "▁", trl#598), as in the prompt.
    """
    nexts = [str(p)[:NEXT_PROMPT_CHARS] for p in next_prompts]
    ended = [t + end for t in texts]
    whole = continuation_ids(tokenizer, [t + n for t, n in zip(ended, nexts)])
    tails = continuation_ids(tokenizer, nexts)
    out: list[list[int] | None] = []
    for ids, tail in zip(whole, tails):
        cut = len(ids) - len(tail)
        out.append(list(ids[:cut]) if tail and 0 < cut and list(ids[cut:]) == list(tail) else None)
    unclean = [i for i, ids in enumerate(out) if ids is None]
    if unclean:
        for i, ids in zip(unclean, continuation_ids(tokenizer, [ended[i] for i in unclean])):
            out[i] = list(ids)
    return out  # type: ignore[return-value]
