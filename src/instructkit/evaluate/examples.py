"""Pick the examples the report shows (wins and regressions of tuning) and count confusion matrices.

Choice templates: a win is an example the tuned model gets right and the base model wrong, a
regression the reverse, ordered by the change in the gold choice's log-prob margin. Generation
templates: the largest per-example rougeL gains and losses. Prompts are cut to ``PROMPT_CHARS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from instructkit.evaluate.metric_registry import get_metric
from instructkit.evaluate.metrics import confusion
from instructkit.evaluate.pairing import PairedTemplate, TemplateInfo, as_text, texts

__all__ = ["N_EXAMPLES", "PROMPT_CHARS", "choice_examples", "confusion_counts", "generation_examples"]

PROMPT_CHARS = 400  # example prompts are cut to this many characters in the report
N_EXAMPLES = 3  # wins and regressions shown per template


def _margin(record: dict, gold: str, choices: Sequence[str]) -> float | None:
    """log p(gold) - max log p(other choice) from ``choice_logprobs`` (dict or list), else None."""
    logprobs = record.get("choice_logprobs")
    if isinstance(logprobs, list) and len(logprobs) == len(choices):
        logprobs = dict(zip(choices, logprobs))
    if not isinstance(logprobs, dict) or gold not in logprobs or len(logprobs) < 2:
        return None
    try:
        others = [float(v) for c, v in logprobs.items() if c != gold]
        return float(logprobs[gold]) - max(others)
    except (TypeError, ValueError):
        return None


def _shown(record_b: dict, record_t: dict, gain: float | None) -> dict[str, Any]:
    """One example for the report: prompt cut to PROMPT_CHARS characters."""
    prompt = as_text(record_b.get("prompt"))
    if len(prompt) > PROMPT_CHARS:
        prompt = prompt[: PROMPT_CHARS - 1] + "…"
    return {
        "source_id": record_b.get("source_id"),
        "index": record_b.get("index"),
        "prompt": prompt,
        "reference": as_text(record_b.get("reference")),
        "base": as_text(record_b.get("prediction")),
        "tuned": as_text(record_t.get("prediction")),
        "gain": gain,
    }


def choice_examples(info: TemplateInfo, pair: PairedTemplate) -> dict[str, list[dict]]:
    """Wins: tuned right, base wrong; regressions: the reverse. Ordered by the change in the
    gold choice's log-prob margin when ``choice_logprobs`` are present, else by example order."""
    refs = texts(pair.base, "reference", info.choices)
    base_preds = texts(pair.base, "prediction", info.choices)
    tuned_preds = texts(pair.tuned, "prediction", info.choices)
    wins, losses = [], []
    for i, (ref, b, t) in enumerate(zip(refs, base_preds, tuned_preds)):
        if (b == ref) == (t == ref):
            continue
        mb = _margin(pair.base[i], ref, info.choices or [])
        mt = _margin(pair.tuned[i], ref, info.choices or [])
        gain = mt - mb if mb is not None and mt is not None else None
        (wins if t == ref else losses).append((i, gain))
    wins.sort(key=lambda x: -(x[1] if x[1] is not None else 0.0))
    losses.sort(key=lambda x: x[1] if x[1] is not None else 0.0)
    return {
        "wins": [_shown(pair.base[i], pair.tuned[i], g) for i, g in wins[:N_EXAMPLES]],
        "regressions": [_shown(pair.base[i], pair.tuned[i], g) for i, g in losses[:N_EXAMPLES]],
    }


def generation_examples(pair: PairedTemplate) -> dict[str, list[dict]]:
    """Largest per-example rougeL gains (tuned - base) and losses."""
    per_example = get_metric("rougeL").per_example
    refs = texts(pair.base, "reference", None)
    gains = per_example(texts(pair.tuned, "prediction", None), refs) - per_example(
        texts(pair.base, "prediction", None), refs
    )
    order = sorted(range(len(refs)), key=lambda i: (-gains[i], i))
    wins = [i for i in order if gains[i] > 0][:N_EXAMPLES]
    losses = [i for i in reversed(order) if gains[i] < 0][:N_EXAMPLES]
    return {
        "wins": [_shown(pair.base[i], pair.tuned[i], float(gains[i])) for i in wins],
        "regressions": [_shown(pair.base[i], pair.tuned[i], float(gains[i])) for i in losses],
    }


def confusion_counts(info: TemplateInfo, pair: PairedTemplate) -> dict[str, Any]:
    """Confusion counts over the template's answer choices, base and tuned."""
    labels = list(info.choices or [])
    refs = texts(pair.base, "reference", labels)
    return {
        "labels": labels,
        "base": confusion(texts(pair.base, "prediction", labels), refs, labels),
        "tuned": confusion(texts(pair.tuned, "prediction", labels), refs, labels),
    }
