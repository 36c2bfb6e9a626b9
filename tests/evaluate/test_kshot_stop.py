"""A generated k-shot answer ends at the "\\n\\n" that ends every demonstration (lm-evaluation-harness's
`until`): a base model that goes on with a made-up next demonstration is scored on its answer alone."""

from __future__ import annotations

import pytest

from instructkit.config import EvalConfig
from instructkit.data.tokenize import TokenizeSettings
from instructkit.evaluate.evaluator import evaluate_examples
from instructkit.evaluate.generate import generate

SETTINGS = TokenizeSettings(max_length=96)
CFG = EvalConfig(bootstrap_resamples=100, batch_size=2)


def describe(i: int, text: str, headline: str) -> dict:
    return {"prompt": f"Describe the review: {text}.", "completion": headline, "choices": None,
            "task": "summarization", "template_id": "shop.describe", "template_version": "1",
            "source_id": f"shop:{i}", "dataset": "shop", "label": None, "metrics": ["rougeL"]}


DEMO = describe(0, "the kettle leaks", "kettle leaks")
EXAMPLE = describe(1, "a man rides a bike", "a bike")
K_SHOT_PROMPT = f"{DEMO['prompt']} {DEMO['completion']}\n\n{EXAMPLE['prompt']}"  # evaluate/fewshot.py
RAMBLE = "a bike\n\nDescribe the review: great coffee."  # the answer, then a made-up next demonstration


@pytest.fixture(scope="module")
def rambling_llama(tiny_tokenizer):
    """A tiny Llama overfitted to answer the 1-shot prompt with RAMBLE."""
    from conftest import build_tiny_llama, overfit_causal

    model = build_tiny_llama(tiny_tokenizer, seed=3)
    assert overfit_causal(model, tiny_tokenizer, [K_SHOT_PROMPT], [RAMBLE], SETTINGS, steps=60) < 0.05
    return model


def test_generation_cuts_at_stop_strings(rambling_llama, tiny_tokenizer):
    kwargs = {"is_seq2seq": False, "max_new_tokens": 24}
    assert generate(rambling_llama, tiny_tokenizer, [K_SHOT_PROMPT], SETTINGS, **kwargs) == [RAMBLE]
    assert generate(rambling_llama, tiny_tokenizer, [K_SHOT_PROMPT], SETTINGS, stop_strings=["\n\n"],
                    **kwargs) == ["a bike"]


def test_k_shot_answers_end_at_the_demonstration_end(rambling_llama, tiny_tokenizer):
    result = evaluate_examples(rambling_llama, tiny_tokenizer, [EXAMPLE], SETTINGS, is_seq2seq=False, cfg=CFG,
                               max_new_tokens_by_task={"summarization": 24}, few_shot_pool=[DEMO], k_shot=1,
                               with_perplexity=False)
    [record] = result.predictions
    assert record["prompt"] == K_SHOT_PROMPT
    # Before: the prediction was RAMBLE, rougeL 2 * (2/7 * 1) / (2/7 + 1) = 4/9.
    assert record["prediction"] == "a bike"
    assert result.templates["shop.describe"]["metrics"]["rougeL"]["value"] == pytest.approx(1.0)
