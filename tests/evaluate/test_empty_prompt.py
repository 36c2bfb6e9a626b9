"""An empty causal prompt is the prefix token (BOS, else EOS), as lm-evaluation-harness scores an empty
context: the answer's first token then has a position to be predicted from.

Before, a tokenizer without BOS (GPT-2, SmolLM2, Qwen; the tiny one here) encoded "" as no tokens: alone,
rank scoring, perplexity and generation failed on a zero-width batch; beside other prompts, the first
answer token was read off a padding column, so its score depended on the batch.
"""

from __future__ import annotations

import pytest
import torch

from instructkit.data.tokenize import TokenizeSettings, encode_completions, encode_prompts, prefix_token_id
from instructkit.evaluate.generate import generate
from instructkit.evaluate.scoring import completion_nll, rank_choices

SETTINGS = TokenizeSettings(max_length=64)


def full_forward(model, context, answer):
    """Summed log p(answer | context), one unpadded forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([context + answer])).logits[0].float(), -1)
    return sum(float(logprobs[len(context) - 1 + t, tok]) for t, tok in enumerate(answer))


def test_an_empty_prompt_is_the_prefix_token(tiny_tokenizer):
    assert tiny_tokenizer("")["input_ids"] == []  # this tokenizer adds no BOS
    bos = tiny_tokenizer.bos_token_id
    assert prefix_token_id(tiny_tokenizer) == bos
    assert encode_prompts(tiny_tokenizer, ["", "hi"], SETTINGS) == [[bos], tiny_tokenizer("hi")["input_ids"]]


def test_rank_and_nll_of_an_empty_prompt_alone_and_in_a_batch(tiny_llama, tiny_tokenizer):
    bos = tiny_tokenizer.bos_token_id
    choices = ["yes", "no"]
    answers = encode_completions(tiny_tokenizer, choices, SETTINGS, add_eos=True)
    want = [full_forward(tiny_llama, [bos], a) for a in answers]
    [alone] = rank_choices(tiny_llama, tiny_tokenizer, [""], [choices], SETTINGS, is_seq2seq=False)
    batched = rank_choices(tiny_llama, tiny_tokenizer, ["", "hi"], [choices] * 2, SETTINGS, is_seq2seq=False)
    assert alone.logprobs == pytest.approx(want, abs=1e-4)
    assert batched[0].logprobs == pytest.approx(want, abs=1e-4)
    assert alone.n_tokens == [len(a) for a in answers] and alone.prompt_tokens == 1

    total, tokens, _ = completion_nll(tiny_llama, tiny_tokenizer, [""], ["yes"], SETTINGS, False)
    _, _, per_example = completion_nll(tiny_llama, tiny_tokenizer, ["", "hi"], ["yes", "yes"], SETTINGS, False)
    assert tokens == len(answers[0])
    assert total == pytest.approx(-want[0], abs=1e-4)
    assert per_example[0] == pytest.approx(-want[0], abs=1e-4)


def test_generation_from_an_empty_prompt_alone_equals_batched(tiny_tokenizer):
    from conftest import build_tiny_llama

    tiny_llama = build_tiny_llama(tiny_tokenizer, seed=1)  # seed 0 answers BOS with BOS: an empty answer
    alone = generate(tiny_llama, tiny_tokenizer, [""], SETTINGS, is_seq2seq=False, max_new_tokens=4)
    batched = generate(tiny_llama, tiny_tokenizer, ["", "hi there"], SETTINGS, is_seq2seq=False,
                       max_new_tokens=4, batch_size=2)
    bos = tiny_tokenizer.bos_token_id
    with torch.no_grad():
        greedy = tiny_llama.generate(torch.tensor([[bos]]), max_new_tokens=4, do_sample=False,
                                     eos_token_id=tiny_tokenizer.eos_token_id,
                                     pad_token_id=tiny_tokenizer.pad_token_id)[0, 1:].tolist()
    eos = tiny_tokenizer.eos_token_id
    want = tiny_tokenizer.decode(greedy[:greedy.index(eos)] if eos in greedy else greedy,
                                 skip_special_tokens=True).strip()
    assert greedy[0] != bos and want  # a real answer, not an empty string
    assert alone == [want] and batched[0] == want
