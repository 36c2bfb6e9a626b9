"""Evaluating chat data (evaluate/chat.py): the last assistant turn of each conversation is generated from
the conversation rendered by the chat template, scored with ROUGE-L and token F1, its perplexity taken on
that turn alone; k-shot demonstrations are earlier exchanges."""

from __future__ import annotations

import math

import pytest
from conftest import build_tiny_llama, build_tiny_tokenizer, overfit_causal

from instructkit.config import EvalConfig
from instructkit.data.chat import ChatPrompt
from instructkit.data.tokenize import IGNORE_INDEX, TokenizeSettings, encode_batch, encode_for_generation
from instructkit.evaluate.chat import eval_prompt
from instructkit.evaluate.evaluator import evaluate_examples, make_validation_fn
from instructkit.evaluate.generate import final_answer

MESSAGES = [
    {"role": "system", "content": "You are a terse support bot for Acme kettles."},
    {"role": "user", "content": "My kettle number 5 leaks. What should I do?"},
    {"role": "assistant", "content": "Tighten the lid seal on kettle 5."},
    {"role": "user", "content": "It still leaks."},
]


def chat_example(i: int, completion: str = "Replace the seal.") -> dict:
    return {"prompt": f"text form {i}", "completion": completion, "messages": MESSAGES, "choices": None,
            "task": "instruction_following", "template_id": "kettles.chat", "source_id": f"kettles:{i}",
            "dataset": "kettles", "metrics": ["rougeL", "token_f1"]}


def test_eval_prompt_of_a_chat_example_carries_its_conversation():
    prompt = eval_prompt(chat_example(0), [], " ")
    assert isinstance(prompt, ChatPrompt) and str(prompt) == "text form 0"
    assert list(prompt.messages) == MESSAGES
    plain = {"prompt": "Rate: good", "completion": "5", "template_id": "t", "source_id": "s"}
    assert eval_prompt(plain, [], " ") == "Rate: good" and not isinstance(eval_prompt(plain, [], " "), ChatPrompt)


def test_k_shot_demonstrations_are_earlier_exchanges_after_the_system_turn():
    demo = {"prompt": "d", "completion": "Descale it.", "source_id": "kettles:9",
            "messages": [MESSAGES[0], {"role": "user", "content": "It is slow."}]}
    prompt = eval_prompt(chat_example(0), [demo], " ")
    assert list(prompt.messages) == [MESSAGES[0], {"role": "user", "content": "It is slow."},
                                     {"role": "assistant", "content": "Descale it."}, *MESSAGES[1:]]


def test_generation_prompt_is_apply_chat_template_with_generation_prompt():
    tokenizer = build_tiny_tokenizer()
    settings = TokenizeSettings(max_length=512, chat_template=True)
    [fed] = encode_for_generation(tokenizer, [eval_prompt(chat_example(0), [], " ")], settings, max_new_tokens=16)
    assert fed == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)


def test_perplexity_inputs_label_the_last_turn_only():
    """Scoring encodes a chat example with only its last assistant turn labelled, whatever loss_on says."""
    tokenizer = build_tiny_tokenizer()
    settings = TokenizeSettings(max_length=512, chat_template=True, loss_on="all_assistant_turns")
    [encoded] = encode_batch(tokenizer, [eval_prompt(chat_example(0), [], " ")], ["Replace the seal."], settings)
    labelled = [x for x in encoded.labels if x != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Replace the seal.<|im_end|>"
    assert encoded.labels[-len(labelled):] == labelled  # at the end, as perplexity reads them


def test_evaluate_chat_examples_generates_the_last_turn_and_scores_rouge_and_token_f1():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    settings = TokenizeSettings(max_length=256, chat_template=True)
    examples = [chat_example(i, c) for i, c in enumerate(["Replace the seal.", "Call support.", "Buy kettle 6."])]
    result = evaluate_examples(model, tokenizer, examples, settings, is_seq2seq=False,
                               cfg=EvalConfig(max_new_tokens={"instruction_following": 6}, bootstrap_resamples=100))
    metrics = result.templates["kettles.chat"]["metrics"]
    assert {"rougeL", "token_f1"} <= set(metrics)
    assert all(0.0 <= metrics[m]["value"] <= 1.0 for m in ("rougeL", "token_f1"))
    assert [p["prompt"] for p in result.predictions] == ["text form 0", "text form 1", "text form 2"]
    assert [p["reference"] for p in result.predictions] == [ex["completion"] for ex in examples]
    validate = make_validation_fn(tokenizer, examples, settings, is_seq2seq=False,
                                  max_new_tokens_by_task={"instruction_following": 4})
    values = validate(model)
    assert set(values) >= {"rougeL", "token_f1", "kettles.chat/rougeL"} and not math.isnan(values["rougeL"])


# ChatML that writes an assistant turn as Qwen3's template writes the last one: a <think> block (empty when
# the turn has no reasoning) before the answer.
THINKING_CHATML = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' "
    "+ m['content'] + '<|im_end|>\\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_generated_reasoning_block_is_not_scored_as_the_answer():
    """lighteval#869, AutoRAG#1133: a model tuned with a reasoning template answers "<think>\\n\\n</think>\\n\\n
    Replace the seal." (the template writes the block before every answer); scored as it was, ROUGE-L of the
    exact answer was 0.75. The block is left out of the scored prediction (predictions.jsonl keeps what was
    generated), and out of a reference that has one."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])  # as in Qwen3: added tokens, not special ones
    tokenizer.chat_template = THINKING_CHATML
    settings = TokenizeSettings(max_length=256, chat_template=True)
    model = build_tiny_llama(tokenizer)
    example = chat_example(0, "Replace the seal.")
    # 200 steps (loss ~0.002): at 120 (loss 0.02) an AVX-512 CPU's rounding already gave "Realace the seal."
    loss = overfit_causal(model, tokenizer, [eval_prompt(example, [], " ")], [example["completion"]], settings,
                          steps=200)
    assert loss < 0.01
    result = evaluate_examples(model, tokenizer, [example], settings, is_seq2seq=False,
                               cfg=EvalConfig(max_new_tokens={"instruction_following": 24}, bootstrap_resamples=100))
    [record] = result.predictions
    assert record["prediction"] == "Replace the seal."
    assert record["generated"] == "<think>\n\n</think>\n\nReplace the seal."
    metrics = result.templates["kettles.chat"]["metrics"]
    assert metrics["rougeL"]["value"] == 1.0 and metrics["token_f1"]["value"] == 1.0
    reasoned = chat_example(0, "<think>\nThe seal is worn.\n</think>\n\nReplace the seal.")  # reasoning_content
    result = evaluate_examples(model, tokenizer, [reasoned], settings, is_seq2seq=False,
                               cfg=EvalConfig(max_new_tokens={"instruction_following": 24}, bootstrap_resamples=100))
    assert result.templates["kettles.chat"]["metrics"]["rougeL"]["value"] == 1.0


@pytest.mark.parametrize("text, answer", [
    ("<think>\nTwo and two.\n</think>\n\n4", "4"),
    ("  <think></think>4", "4"),
    ("Two and two.\n</think>\n\n4", "4"),  # the generation prompt opened the block
    ("<think>\nTwo and", ""),  # never closed: no answer reached
    ("4, not <think> nor </think>", "4, not <think> nor </think>"),
    ("Replace the seal.", "Replace the seal."),
])
def test_final_answer_leaves_out_the_reasoning_block(text, answer):
    assert final_answer(text) == answer
