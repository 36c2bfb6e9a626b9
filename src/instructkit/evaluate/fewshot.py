"""k-shot prompts: demonstrations of the same template prepended to an example's prompt.

`k` examples of the same template drawn from `few_shot_pool` (seeded per example, never the same
source row) are prepended as "prompt completion\\n\\n" blocks. The prompt is cut from the left like any
prompt, so a long prompt can lose demonstrations: `truncated_prompts` counts the examples cut. A template
with no example in the pool (a held-out one) is left out of a k-shot evaluation. A generated answer ends
before its first "\\n\\n", the end of a demonstration (evaluator._demonstration_end; not for chat or seq2seq).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def _demonstrations(ex: dict, pool: dict[str, list[dict]], k: int, seed: int) -> list[dict]:
    """k pool examples of the same template, none from the same source row; seeded by the example itself.

    The draw depends only on (seed, template, source_id, prompt), not on the order of the evaluation set,
    so the same example gets the same demonstrations in every run.
    """
    candidates = [d for d in pool.get(ex["template_id"], []) if d.get("source_id") != ex.get("source_id")]
    rng = random.Random(f"{seed}|{ex['template_id']}|{ex.get('source_id')}|{ex['prompt']}")
    return rng.sample(candidates, min(k, len(candidates)))


def _few_shot_prompt(ex: dict, demos: Sequence[dict], separator: str) -> str:
    """"P1 C1\\n\\nP2 C2\\n\\nPROMPT": each demonstration as its prompt, the separator and its completion."""
    return "".join(f"{d['prompt']}{separator}{d['completion']}\n\n" for d in demos) + ex["prompt"]
