"""k-shot rank classification scores each choice followed by what follows every demonstration's answer in
the prompt (evaluate/fewshot.py `answer_end`), not by EOS: "\\n\\n" in a text prompt, the end-of-turn token
with a chat template (the demonstrations are earlier turns). Zero-shot keeps EOS; `choice_end: none`
scores the text alone. The separator is one constant for the prompt, the generation stop and the choice end.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, build_tiny_llama, overfit_causal

from instructkit.config import EvalConfig
from instructkit.data.chat import ChatPrompt
from instructkit.data.tokenize import TokenizeSettings, end_of_turn_id
from instructkit.evaluate.chat import eval_prompt
from instructkit.evaluate.evaluator import evaluate_examples
from instructkit.evaluate.fewshot import (
    DEMONSTRATION_END,
    _few_shot_prompt,
    answer_end,
    demonstration_answer_ids,
)
from instructkit.evaluate.scoring import _rank_items, rank_choices
from instructkit.evaluate.template_scoring import _score_by_rank

TEN = [str(i) for i in range(1, 11)]  # "1" is a prefix of "10"
PROMPT = "Predict the associated rating for the following review: {}\nRating:"
REVIEWS = [("great coffee, fast shipping", "10"), ("great kettle, quick and sturdy", "10"),
           ("great taste, great price", "10"), ("great brown sugar, lovely", "10"),
           ("the kettle leaks everywhere", "1"), ("bottle leaks, lazy seller", "1"),
           ("it leaks after a day", "1"), ("the lid leaks", "1")]
CFG = EvalConfig(bootstrap_resamples=100, batch_size=4)
SETTINGS = TokenizeSettings(max_length=128)


def rating(i: int, review: str, answer: str, source: str | None = None) -> dict:
    return {"prompt": PROMPT.format(review), "completion": answer, "choices": TEN, "label": answer,
            "task": "rating", "template_id": "reviews.rating", "template_version": "1", "dataset": "reviews",
            "source_id": source or f"reviews:{i}", "metrics": ["accuracy"]}


EXAMPLES = [rating(i, r, a) for i, (r, a) in enumerate(REVIEWS)]
DEMO = rating(99, "a bag of stale crackers", "3", source="pool:0")  # the one demonstration of every prompt


def k_shot_prompt(ex: dict) -> str:
    return _few_shot_prompt(ex, [DEMO], " ")


def summed_logprob(model, ids: list[int], n_prompt: int) -> float:
    """sum log p(ids[t] | ids[:t]) over t >= n_prompt, from one full forward pass."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return float(sum(logprobs[t - 1, ids[t]] for t in range(n_prompt, len(ids))))


# --------------------------------------------------------------------------------------------------
# One separator: prompt, generation stop, choice end
# --------------------------------------------------------------------------------------------------


def test_the_answer_end_is_the_demonstration_end_for_k_shot_text_prompts_only():
    assert DEMONSTRATION_END == "\n\n"
    assert k_shot_prompt(EXAMPLES[0]) == f"{DEMO['prompt']} 3{DEMONSTRATION_END}{EXAMPLES[0]['prompt']}"
    assert answer_end(1, chat=False, is_seq2seq=False) == DEMONSTRATION_END
    assert answer_end(0, chat=False, is_seq2seq=False) is None  # zero-shot: EOS
    assert answer_end(3, chat=True, is_seq2seq=False) is None  # chat: the end-of-turn token
    assert answer_end(3, chat=False, is_seq2seq=True) is None  # seq2seq: EOS


# --------------------------------------------------------------------------------------------------
# The exact ids scored
# --------------------------------------------------------------------------------------------------


def test_k_shot_choice_ids_end_with_the_separator_zero_shot_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    k_shot, zero = k_shot_prompt(EXAMPLES[0]), EXAMPLES[0]["prompt"]
    [item] = _rank_items(tok, [k_shot], [TEN], SETTINGS, include_eos=True, demonstration_end=DEMONSTRATION_END)
    separator = tok(DEMONSTRATION_END, add_special_tokens=False)["input_ids"]
    for choice, ids in zip(TEN, item.choice_ids):
        assert item.prompt_ids + ids == tok(f"{k_shot} {choice}{DEMONSTRATION_END}")["input_ids"]
        assert ids[-len(separator):] == separator and tok.eos_token_id not in ids
    [item] = _rank_items(tok, [zero], [TEN], SETTINGS, include_eos=True)
    for choice, ids in zip(TEN, item.choice_ids):
        assert item.prompt_ids + ids == tok(f"{zero} {choice}")["input_ids"] + [tok.eos_token_id]
    [item] = _rank_items(tok, [k_shot], [TEN], SETTINGS, include_eos=False, demonstration_end=DEMONSTRATION_END)
    for choice, ids in zip(TEN, item.choice_ids):  # choice_end: none: the text alone
        assert item.prompt_ids + ids == tok(f"{k_shot} {choice}")["input_ids"]


def test_evaluation_scores_k_shot_choices_with_the_separator(tiny_tokenizer):
    """eval.json's choice log-probabilities = a full forward pass over prompt + choice + separator (k-shot),
    prompt + choice + EOS (zero-shot)."""
    tok, model = tiny_tokenizer, build_tiny_llama(tiny_tokenizer, seed=5)
    exs = EXAMPLES[:2] + EXAMPLES[4:6]
    for k in (1, 0):
        result = evaluate_examples(model, tok, exs, SETTINGS, is_seq2seq=False, cfg=CFG, few_shot_pool=[DEMO],
                                   k_shot=k, with_perplexity=False)
        for record, ex in zip(result.predictions, exs):
            prompt = k_shot_prompt(ex) if k else ex["prompt"]
            assert record["prompt"] == prompt
            n_prompt = len(tok(prompt)["input_ids"])
            for choice in TEN:
                ids = tok(f"{prompt} {choice}{DEMONSTRATION_END}")["input_ids"] if k else \
                    tok(f"{prompt} {choice}")["input_ids"] + [tok.eos_token_id]
                assert record["choice_logprobs"][choice] == pytest.approx(summed_logprob(model, ids, n_prompt),
                                                                         abs=1e-4)
    # The reference's k-shot score ends with "\n\n": not the training encoding's (+ EOS), so perplexity
    # takes its own pass instead of reusing it.
    prompts = [k_shot_prompt(ex) for ex in exs]
    scored = _score_by_rank(model, tok, exs, list(range(4)), prompts, SETTINGS, False, CFG,
                            answer_end=DEMONSTRATION_END)
    assert scored.reference_nll == [None] * 4
    zero_shot = _score_by_rank(model, tok, exs, list(range(4)), [ex["prompt"] for ex in exs], SETTINGS, False, CFG)
    assert all(value is not None for value in zero_shot.reference_nll)


def test_the_separator_is_tokenized_as_the_demonstrations_have_it():
    """A byte-level BPE that merges "\\n\\n" (SmolLM2's ĊĊ) does so at the end of a text, not before the next
    prompt: the demonstrations show Ċ Ċ, and a choice is scored with Ċ Ċ too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS * 20 + ["Rating: 5\n\n"] * 200, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="<pad>")
    ex = EXAMPLES[0]
    prompt = k_shot_prompt(ex)
    merged = tok(" 3" + DEMONSTRATION_END, add_special_tokens=False)["input_ids"]
    in_prompt = tok(f"{DEMO['prompt']} 3{DEMONSTRATION_END}P", add_special_tokens=False)["input_ids"]
    assert merged[-1] != in_prompt[-2]  # the tokenizer has the merge: the test means something
    [ids] = demonstration_answer_ids(tok, [" 3"], DEMONSTRATION_END, [prompt])
    assert ids == in_prompt[len(tok(DEMO["prompt"])["input_ids"]):-1]  # " 3" Ċ Ċ as the demonstration has it
    [item] = _rank_items(tok, [prompt], [["3", "10"]], SETTINGS, include_eos=True,
                         demonstration_end=DEMONSTRATION_END)
    # Each choice as it would be if it were one more demonstration, followed by the next prompt.
    for choice, ids in zip(["3", "10"], item.choice_ids):
        shown = tok(f"{prompt} {choice}{DEMONSTRATION_END}{ex['prompt']}")["input_ids"]
        assert shown[:len(item.prompt_ids) + len(ids)] == item.prompt_ids + ids


# --------------------------------------------------------------------------------------------------
# Chat templates: demonstrations are earlier turns, the end is the end-of-turn token
# --------------------------------------------------------------------------------------------------


def test_chat_k_shot_demonstrations_are_turns_and_choices_end_with_the_end_of_turn(tiny_tokenizer):
    tok, model = tiny_tokenizer, build_tiny_llama(tiny_tokenizer, seed=6)
    settings = TokenizeSettings(max_length=256, chat_template=True)
    ex = EXAMPLES[0]
    prompt = eval_prompt(ex, [DEMO], " ")
    turns = [{"role": "user", "content": DEMO["prompt"]}, {"role": "assistant", "content": "3"},
             {"role": "user", "content": ex["prompt"]}]
    assert isinstance(prompt, ChatPrompt) and list(prompt.messages) == turns
    assert str(prompt) == k_shot_prompt(ex)  # the text form: what a model without a chat template is given
    end = end_of_turn_id(tok, settings)
    fed = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    demo_answer = tok("3", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(fed)) if fed[i:i + len(demo_answer)] == demo_answer)
    assert fed[at + len(demo_answer)] == end  # in the prompt the demonstration's answer ends its turn
    result = evaluate_examples(model, tok, [ex], settings, is_seq2seq=False, cfg=CFG, few_shot_pool=[DEMO],
                               k_shot=1, with_perplexity=False)
    [record] = result.predictions
    for choice in TEN:
        whole = tok.apply_chat_template(turns + [{"role": "assistant", "content": choice}], tokenize=True,
                                        return_dict=False)
        ids = whole[:len(whole) - whole[::-1].index(end)]  # through the answer's end-of-turn token
        assert ids[:len(fed)] == fed and ids[-1] == end
        assert record["choice_logprobs"][choice] == pytest.approx(summed_logprob(model, ids, len(fed)), abs=1e-4)
    with pytest.raises(ValueError, match="demonstration_end"):
        rank_choices(model, tok, [prompt], [TEN], settings, is_seq2seq=False, demonstration_end="\n\n")


# --------------------------------------------------------------------------------------------------
# Behaviour: a model that writes "answer\n\n" after the demonstrations ranks the right choice
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def continuing_llama(tiny_tokenizer):
    """A tiny Llama overfitted to answer each 1-shot prompt as the demonstration does: the answer, "\\n\\n",
    then the next demonstration (EOS only far after the answer)."""
    model = build_tiny_llama(tiny_tokenizer, seed=1)
    prompts = [k_shot_prompt(ex) for ex in EXAMPLES]
    completions = [f"{ex['completion']}{DEMONSTRATION_END}Predict the" for ex in EXAMPLES]
    assert overfit_causal(model, tiny_tokenizer, prompts, completions, SETTINGS, steps=80) < 0.05
    return model


def test_overfit_model_ranks_the_right_choice_k_shot(continuing_llama, tiny_tokenizer):
    answers = [ex["completion"] for ex in EXAMPLES]
    kwargs = {"is_seq2seq": False, "few_shot_pool": [DEMO], "k_shot": 1, "with_perplexity": False}
    result = evaluate_examples(continuing_llama, tiny_tokenizer, EXAMPLES, SETTINGS, cfg=CFG, **kwargs)
    assert [p["prediction"] for p in result.predictions] == answers
    assert result.templates["reviews.rating"]["metrics"]["accuracy"]["value"] == 1.0
    # The text alone cannot rank "10" over its prefix "1" (score("10") = score("1") + log p("0") for any model).
    alone = evaluate_examples(continuing_llama, tiny_tokenizer, EXAMPLES, SETTINGS,
                              cfg=EvalConfig(bootstrap_resamples=100, choice_end="none"), **kwargs)
    assert [p["prediction"] for p in alone.predictions] == ["1"] * 8
    # The old end, EOS, never follows an answer in these prompts: here it ranked every prompt "1" as well.
    prompts = [k_shot_prompt(ex) for ex in EXAMPLES]
    with_eos = rank_choices(continuing_llama, tiny_tokenizer, prompts, [TEN] * 8, SETTINGS, is_seq2seq=False)
    assert [TEN[s.predicted] for s in with_eos] == ["1"] * 8
