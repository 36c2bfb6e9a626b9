"""Perplexity of a rank-scored template reuses the reference choice's log-probability.

The rank pass already scores the reference completion (separator + completion + EOS after the whole
prompt) when it is one of the choices; evaluation takes its NLL from there instead of a second forward
pass. It must equal `completion_nll` (the training encoding) example for example, and fall back to it
where the prompt was cut for a longer choice or the choice is scored without EOS.
"""

from __future__ import annotations

import pytest

from instructkit.config import EvalConfig
from instructkit.data.tokenize import TokenizeSettings
from instructkit.evaluate.scoring import completion_nll
from instructkit.evaluate.template_scoring import _score_by_rank, _score_templates

RATINGS = ["1", "2", "3", "4", "5"]
PROMPTS = [
    "Predict the associated rating for the following review: great coffee, fast shipping. Rating:",
    "hi",
    "Rate it: the quick brown fox jumps over the lazy dog again and again and again.",
    "Stars?",
]
ANSWERS = ["5", "1", "3", "4"]


def _examples() -> list[dict]:
    return [{"prompt": p, "completion": a, "choices": RATINGS, "template_id": "t.rating", "task": "rating",
             "dataset": "d"} for p, a in zip(PROMPTS, ANSWERS)]


def _model(kind, tiny_llama, tiny_t5):
    return tiny_t5 if kind == "seq2seq" else tiny_llama


@pytest.mark.parametrize("kind", ["causal", "seq2seq", "chat"])
def test_rank_reference_nll_equals_completion_nll(kind, tiny_llama, tiny_t5, tiny_tokenizer):
    settings = TokenizeSettings(max_length=64, seq2seq=kind == "seq2seq", chat_template=kind == "chat")
    model, exs = _model(kind, tiny_llama, tiny_t5), _examples()
    scored = _score_by_rank(model, tiny_tokenizer, exs, list(range(len(exs))), PROMPTS, settings,
                            kind == "seq2seq", EvalConfig(batch_size=3))
    _, _, want = completion_nll(model, tiny_tokenizer, PROMPTS, ANSWERS, settings, kind == "seq2seq", batch_size=2)
    assert all(value is not None for value in scored.reference_nll)
    assert [value[0] for value in scored.reference_nll] == pytest.approx(want, abs=1e-4)
    # tokens: separator + digit + end of answer (the chat template's end-of-turn token and what follows it)
    single = completion_nll(model, tiny_tokenizer, PROMPTS[:1], ANSWERS[:1], settings, kind == "seq2seq")[1]
    assert scored.reference_nll[0][1] == single


def test_cut_prompt_and_choice_end_none_fall_back(tiny_llama, tiny_tokenizer):
    settings = TokenizeSettings(max_length=12)  # the long prompts are cut for the longest choice
    exs = _examples()
    scored = _score_by_rank(tiny_llama, tiny_tokenizer, exs, list(range(len(exs))), PROMPTS, settings, False,
                            EvalConfig(batch_size=4))
    assert scored.truncated >= 2
    assert scored.reference_nll[0] is None and scored.reference_nll[2] is None  # long prompts: cut
    assert scored.reference_nll[1] is not None  # "hi" fits whole
    no_eos = _score_by_rank(tiny_llama, tiny_tokenizer, exs, list(range(len(exs))), PROMPTS,
                            TokenizeSettings(max_length=64), False, EvalConfig(batch_size=4, choice_end="none"))
    assert no_eos.reference_nll == [None] * len(exs)


@pytest.mark.parametrize("max_length", [12, 64])
def test_template_perplexity_unchanged(max_length, tiny_llama, tiny_tokenizer):
    """The template's (total NLL, tokens) equal one completion_nll over every example, cut prompts or not."""
    settings = TokenizeSettings(max_length=max_length)
    exs = _examples()
    scored = _score_templates(tiny_llama, tiny_tokenizer, exs, list(range(len(exs))), dict(enumerate(PROMPTS)),
                              settings, False, EvalConfig(batch_size=4), None, 0, "rank", True)
    total, tokens, _ = completion_nll(tiny_llama, tiny_tokenizer, PROMPTS, ANSWERS, settings, False)
    (result,) = scored.values()
    assert result.nll[1] == tokens
    assert result.nll[0] == pytest.approx(total, abs=1e-4)
