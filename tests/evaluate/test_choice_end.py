"""Issue 19, item 1: choices that are prefixes of others ("1" of "10") must be able to win.

Without the end of the answer, score("10") = score("1") + log p("0" | ..., "1") <= score("1") for ANY
model. Rank classification therefore scores each choice followed by the end of the answer the model was
trained to produce (EOS, or the chat end-of-turn token): `eval.choice_end: eos`, the default, used by
evaluation and by the validation function that drives early stopping and the best checkpoint.
`eval.choice_end: none` keeps lm-evaluation-harness's `acc` (sum of the continuation's log-probabilities
given the context), checked here against a direct computation of lm-eval's formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from _bigram import Bigram, bigram_table
from conftest import build_tiny_llama

from instructkit.config import EvalConfig
from instructkit.data.tokenize import TokenizeSettings, encode_completions, encode_prompts, end_of_turn_id
from instructkit.evaluate.evaluator import evaluate_examples, make_validation_fn
from instructkit.evaluate.generate import generate
from instructkit.evaluate.scoring import rank_choices

TEN = [str(i) for i in range(1, 11)]  # "1" .. "10": "1" is a prefix of "10"
PROMPT = "Predict the associated rating for the following review: {}\nRating:"
GREAT = ["great coffee, fast shipping", "great kettle, quick and sturdy", "great taste, great price",
         "great brown sugar, lovely"]
LEAKS = ["the kettle leaks everywhere", "bottle leaks, lazy seller", "it leaks after a day", "the lid leaks"]


def review_examples() -> list[dict]:
    """The issue's 8 prompts: four "great ..." reviews -> "10", four "... leaks ..." -> "1"."""
    out = []
    for i, (review, answer) in enumerate([(r, "10") for r in GREAT] + [(r, "1") for r in LEAKS]):
        out.append({"prompt": PROMPT.format(review), "completion": answer, "choices": TEN, "label": answer,
                    "task": "rating", "template_id": "reviews.predict_rating", "dataset": "reviews",
                    "source_id": f"reviews:{i}", "metrics": ["accuracy", "macro_f1"]})
    return out


# --------------------------------------------------------------------------------------------------
# Hand-set log-probabilities: a bigram model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True], ids=["eos", "chat-end-of-turn"])
def test_prefix_choice_wins_only_with_the_end_of_the_answer(tiny_tokenizer, chat):
    tok = tiny_tokenizer
    settings = TokenizeSettings(max_length=64, chat_template=chat)
    prompt = PROMPT.format(GREAT[0])
    plain = encode_completions(tok, ["1", "10"], settings, [prompt] * 2, add_eos=False)
    ended = encode_completions(tok, ["1", "10"], settings, [prompt] * 2, add_eos=True)
    end = end_of_turn_id(tok, settings) if chat else tok.eos_token_id
    one, zero = plain[1][-2], plain[1][-1]
    assert plain[1] == plain[0] + [zero] and ended == [plain[0] + [end], plain[1] + [end]]
    # After "1": "0" is likely (0.7), the end unlikely (0.1); after "0" the answer ends (0.9).
    rows = {one: {zero: 0.7, end: 0.1}, zero: {end: 0.9}}
    first = plain[0][0]  # the space token (plain) or "1" (chat: no separator)
    if first != one:
        rows[first] = {one: 0.8}
    model = Bigram(bigram_table(len(tok), rows, default={first: 0.6}))
    last = encode_prompts(tok, [prompt], settings)[0][-1]
    assert last not in rows  # the prompt ends with an ordinary token: the default row

    def by_hand(ids: list[int]) -> float:
        table, prev, total = model.logprobs.detach().double(), last, 0.0
        for t in ids:
            total, prev = total + float(table[prev, t]), t
        return total

    with_end = rank_choices(model, tok, [prompt], [TEN], settings, is_seq2seq=False)[0]
    without = rank_choices(model, tok, [prompt], [TEN], settings, is_seq2seq=False, include_eos=False)[0]
    ids_end = encode_completions(tok, TEN, settings, [prompt] * 10, add_eos=True)
    ids_plain = encode_completions(tok, TEN, settings, [prompt] * 10, add_eos=False)
    assert with_end.logprobs == pytest.approx([by_hand(c) for c in ids_end], abs=1e-4)
    assert without.logprobs == pytest.approx([by_hand(c) for c in ids_plain], abs=1e-4)
    # score("10" + end) = log(p_first * 0.7 * 0.9) > score("1" + end) = log(p_first * 0.1)
    assert with_end.logprobs[9] - with_end.logprobs[0] == pytest.approx(math.log(0.63 / 0.1), abs=1e-4)
    assert TEN[with_end.predicted] == "10"
    # Without the end, "10" pays log p("0") on top of "1"'s score: it cannot win.
    assert without.logprobs[9] - without.logprobs[0] == pytest.approx(math.log(0.7), abs=1e-4)
    assert TEN[without.predicted] == "1"


def test_default_is_the_end_of_the_answer():
    assert EvalConfig().choice_end == "eos"
    import inspect

    assert inspect.signature(rank_choices).parameters["include_eos"].default is True
    assert inspect.signature(make_validation_fn).parameters["choice_end"].default == "eos"


# --------------------------------------------------------------------------------------------------
# choice_end: none == lm-evaluation-harness `acc`
# --------------------------------------------------------------------------------------------------


def lm_eval_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-evaluation-harness's loglikelihood of `continuation` given `context`, written out directly
    (TemplateLM._encode_pair + HFLM._loglikelihood_tokens): trailing spaces of the context move to the
    continuation; the continuation's tokens are those of the WHOLE string after the context's; the model
    reads (context + continuation)[:-1]; the score is the sum of the continuation tokens' log-probs."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_enc = tokenizer.encode(context, add_special_tokens=False)
    continuation_enc = whole[len(context_enc):]
    inputs = torch.tensor([(context_enc + continuation_enc)[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(inputs).logits[0].float(), dim=-1)
    tail = logprobs[-len(continuation_enc):]
    return float(sum(tail[i, t] for i, t in enumerate(continuation_enc)))


@pytest.mark.parametrize("choices", [TEN, ["negative", "positive"]], ids=["1-10", "words"])
def test_choice_end_none_agrees_with_lm_eval_acc(tiny_tokenizer, choices):
    model = build_tiny_llama(tiny_tokenizer, seed=3)
    prompts = [ex["prompt"] for ex in review_examples()]
    settings = TokenizeSettings(max_length=128)
    scores = rank_choices(model, tiny_tokenizer, prompts, [choices] * len(prompts), settings,
                          is_seq2seq=False, include_eos=False, batch_size=3)
    for prompt, got in zip(prompts, scores):
        # lm-eval multiple choice: continuation = target_delimiter " " + choice; acc = argmax.
        want = [lm_eval_loglikelihood(model, tiny_tokenizer, prompt, " " + c) for c in choices]
        assert got.logprobs == pytest.approx(want, abs=2e-5)
        assert got.predicted == max(range(len(want)), key=want.__getitem__)
        if choices is TEN:  # the fault, for ANY model: "10" never beats "1" without the end
            assert got.logprobs[9] <= got.logprobs[0]


# --------------------------------------------------------------------------------------------------
# The case: a tiny model overfitted on 8 prompts with the project's own train()
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit(tiny_tokenizer, tmp_path_factory):
    """Tiny Llama trained (train/loop.py, 30 AdamW steps of all 8 examples) until it answers them."""
    from instructkit.config import TrainConfig
    from instructkit.data.tokenize import tokenize_examples
    from instructkit.train.loop import TrainData, TrainOptions, train

    examples = review_examples()
    model = build_tiny_llama(tiny_tokenizer)
    settings = TokenizeSettings(max_length=64)
    dataset, _ = tokenize_examples(examples, tiny_tokenizer, settings)  # the training encoding (+ EOS)
    cfg = TrainConfig(lr=5e-3, batch_size=8, max_steps=30, epochs=100, warmup_ratio=0.0, seed=0,
                      schedule="constant")
    train(model, tiny_tokenizer, TrainData(dataset, None, None), cfg, tmp_path_factory.mktemp("overfit"),
          TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))
    return model.eval(), settings, examples


def test_overfit_model_generates_10_and_rank_eos_agrees(overfit, tiny_tokenizer):
    model, settings, examples = overfit
    prompts = [ex["prompt"] for ex in examples]
    greedy = generate(model, tiny_tokenizer, prompts, settings, is_seq2seq=False, max_new_tokens=4)
    assert [g.strip() for g in greedy] == ["10"] * 4 + ["1"] * 4
    with_end = rank_choices(model, tiny_tokenizer, prompts, [TEN] * 8, settings, is_seq2seq=False)
    assert [TEN[s.predicted] for s in with_end] == ["10"] * 4 + ["1"] * 4
    without = rank_choices(model, tiny_tokenizer, prompts, [TEN] * 8, settings, is_seq2seq=False,
                           include_eos=False)
    assert [TEN[s.predicted] for s in without] == ["1"] * 8  # the old fault


@pytest.mark.parametrize("choice_end", ["eos", "none"])
def test_overfit_model_evaluation_and_validation(overfit, tiny_tokenizer, choice_end):
    """eval.json figures and the validation metrics (early stopping, best checkpoint) follow choice_end."""
    model, settings, examples = overfit
    cfg = EvalConfig(choice_end=choice_end, bootstrap_resamples=100)
    result = evaluate_examples(model, tiny_tokenizer, examples, settings, is_seq2seq=False, cfg=cfg,
                               with_perplexity=False)
    metrics = result.templates["reviews.predict_rating"]["metrics"]
    validate = make_validation_fn(tiny_tokenizer, examples, settings, is_seq2seq=False, choice_end=choice_end)
    values = validate(model)
    assert result.settings["choice_end"] == choice_end
    if choice_end == "eos":
        assert [p["prediction"] for p in result.predictions] == ["10"] * 4 + ["1"] * 4
        assert metrics["accuracy"]["value"] == 1.0 and metrics["macro_f1"]["value"] == 1.0
        assert values["accuracy"] == 1.0 and values["macro_f1"] == 1.0
    else:
        # Every prompt ranked "1": accuracy 4/8; F1("1") = 2*4/(8+4) = 2/3, F1("10") = 0 -> 1/3.
        assert [p["prediction"] for p in result.predictions] == ["1"] * 8
        assert metrics["accuracy"]["value"] == 0.5
        assert metrics["macro_f1"]["value"] == pytest.approx(1 / 3)
        assert values["accuracy"] == 0.5 and values["macro_f1"] == pytest.approx(1 / 3)
