"""Perplexity of a template reuses the pass that scored it: the reference choice's log-probability of a
rank-scored template, and generation's prompt pass (prompt + reference) of a generated one.

The rank pass already scores the reference completion (separator + completion + EOS after the whole
prompt) when it is one of the choices; generation's prompt pass scores it when given it. Evaluation takes
the NLL from there instead of a second forward pass. It must equal `completion_nll` (the training encoding)
example for example, and fall back to it where the prompt was cut, the choice is scored without EOS, or
the model is seq2seq; generated answers stay those of `generate`.
"""

from __future__ import annotations

import pytest

from instructkit.config import EvalConfig
from instructkit.data.tokenize import TokenizeSettings, encode_batch, encode_for_generation
from instructkit.evaluate.generate import generate
from instructkit.evaluate.scoring import completion_nll
from instructkit.evaluate.template_scoring import _score_by_generation, _score_by_rank, _score_templates

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


TITLES = ["Great coffee", "Hello there", "A fox, again", "Five stars at last"]


def _generation_examples() -> list[dict]:
    return [{"prompt": p, "completion": t, "template_id": "t.title", "task": "summarization", "dataset": "d"}
            for p, t in zip(PROMPTS, TITLES)]


def _generated(model, tokenizer, settings, kind, **cfg):
    exs = _generation_examples()
    return _score_by_generation(model, tokenizer, exs, list(range(len(exs))), PROMPTS, settings, kind == "seq2seq",
                                EvalConfig(batch_size=3, **cfg), 6, 0, classify=False, with_perplexity=True)


@pytest.mark.parametrize("kind", ["causal", "chat"])
def test_generation_reference_nll_equals_completion_nll(kind, tiny_llama, tiny_tokenizer):
    settings = TokenizeSettings(max_length=64, chat_template=kind == "chat")
    scored = _generated(tiny_llama, tiny_tokenizer, settings, kind)
    _, _, want = completion_nll(tiny_llama, tiny_tokenizer, PROMPTS, TITLES, settings, False, batch_size=2)
    assert all(value is not None for value in scored.reference_nll)
    assert [value[0] for value in scored.reference_nll] == pytest.approx(want, abs=1e-4)
    assert [value[1] for value in scored.reference_nll] == [
        completion_nll(tiny_llama, tiny_tokenizer, [p], [t], settings, False)[1] for p, t in zip(PROMPTS, TITLES)]
    # generation continues from the scoring pass's cache: the very answers of a plain `generate`
    assert scored.predictions == generate(tiny_llama, tiny_tokenizer, PROMPTS, settings, is_seq2seq=False,
                                          max_new_tokens=6, batch_size=3)


def test_generation_falls_back_for_cut_prompts_beams_and_seq2seq(tiny_llama, tiny_t5, tiny_tokenizer):
    settings = TokenizeSettings(max_length=14)
    cut = _generated(tiny_llama, tiny_tokenizer, settings, "causal")
    assert cut.truncated >= 2
    # A prompt is scored on the way only where generation feeds exactly the training encoding's prompt:
    # whole ("hi"), or cut to the same budget (the reference is as long as the 6 new tokens).
    fed = encode_for_generation(tiny_tokenizer, PROMPTS, settings, 6)
    trained = encode_batch(tiny_tokenizer, PROMPTS, TITLES, settings)
    same = [e is not None and e.input_ids[:e.prompt_length] == f for e, f in zip(trained, fed)]
    assert same[1] and not all(same)
    assert [value is not None for value in cut.reference_nll] == same
    _, _, want = completion_nll(tiny_llama, tiny_tokenizer, PROMPTS, TITLES, settings, False)
    assert [v[0] for v, s in zip(cut.reference_nll, same) if s] == pytest.approx(
        [w for w, s in zip(want, same) if s], abs=1e-4)
    beams = _generated(tiny_llama, tiny_tokenizer, TokenizeSettings(max_length=64), "causal", num_beams=2)
    assert beams.reference_nll == [None] * len(PROMPTS)
    seq2seq = _generated(tiny_t5, tiny_tokenizer, TokenizeSettings(max_length=64, seq2seq=True), "seq2seq")
    assert seq2seq.reference_nll == [None] * len(PROMPTS)


def test_a_cache_that_cannot_be_cut_back_only_costs_the_prefill(monkeypatch, tiny_llama, tiny_tokenizer):
    from transformers.cache_utils import DynamicCache

    def refuse(self, tokens):
        raise RuntimeError("sliding window full")

    monkeypatch.setattr(DynamicCache, "crop", refuse)
    _assert_nll_and_answers_as_without_reuse(tiny_llama, tiny_tokenizer)


@pytest.mark.parametrize(("kind", "max_length"), [("causal", 14), ("causal", 64), ("seq2seq", 64)])
def test_generated_template_perplexity_unchanged(kind, max_length, tiny_llama, tiny_t5, tiny_tokenizer):
    settings = TokenizeSettings(max_length=max_length, seq2seq=kind == "seq2seq")
    model, exs = _model(kind, tiny_llama, tiny_t5), _generation_examples()
    scored = _score_templates(model, tiny_tokenizer, exs, list(range(len(exs))), dict(enumerate(PROMPTS)),
                              settings, kind == "seq2seq", EvalConfig(batch_size=4), None, 0, "rank", True)
    total, tokens, _ = completion_nll(model, tiny_tokenizer, PROMPTS, TITLES, settings, kind == "seq2seq")
    (result,) = scored.values()
    assert result.nll[1] == tokens
    assert result.nll[0] == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("setting", [{"cache_implementation": "static"}, {"use_cache": False}])
def test_a_generation_config_with_its_own_cache_gets_no_reused_one(setting, tiny_llama, tiny_tokenizer):
    """transformers refuses a cache beside `cache_implementation`, and `use_cache: false` would feed the
    whole sequence on top of it: the prompt is encoded again, the NLL still comes from the scoring pass."""
    saved = {k: getattr(tiny_llama.generation_config, k) for k in setting}
    try:
        for key, value in setting.items():
            setattr(tiny_llama.generation_config, key, value)
        _assert_nll_and_answers_as_without_reuse(tiny_llama, tiny_tokenizer)
    finally:
        for key, value in saved.items():
            setattr(tiny_llama.generation_config, key, value)


def _assert_nll_and_answers_as_without_reuse(model, tokenizer) -> None:
    settings = TokenizeSettings(max_length=64)
    scored = _generated(model, tokenizer, settings, "causal")
    _, _, want = completion_nll(model, tokenizer, PROMPTS, TITLES, settings, False)
    assert [value[0] for value in scored.reference_nll] == pytest.approx(want, abs=1e-4)
    assert scored.predictions == generate(model, tokenizer, PROMPTS, settings, is_seq2seq=False,
                                          max_new_tokens=6, batch_size=3)
