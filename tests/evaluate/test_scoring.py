"""Scoring against direct computations: rank classification and perplexity.

The references here are deliberately naive: one unpadded full forward pass per (prompt, choice) pair,
one prompt at a time. The code under test batches, pads, reuses the prompt's KV cache and keeps logits
only where they are needed; it must agree with the naive version.
"""

from __future__ import annotations

import math

import pytest
import torch

from instructkit.data.tokenize import (
    TokenizeSettings,
    encode_batch,
    encode_completions,
    encode_prompts,
    truncate_prompt,
)
from instructkit.evaluate.model_inputs import token_batches
from instructkit.evaluate.scoring import MAX_PADDING, completion_nll, rank_choices

PROMPTS = [
    "Predict the associated rating for the following review: great coffee, fast shipping. Rating:",
    "hi",
    "Translate to German: a man rides a bike. The quick brown fox jumps over the lazy dog again and again.",
    "Summarize the dialogue.",
]
# After the separator, " 1" .. " 4" are a space token then a digit (one shared first token, as in the real
# tokenizers); the tiny tokenizer learned " 5" as a single token, so RATINGS mixes 1- and 2-token choices.
SHARED = ["1", "2", "3", "4"]
RATINGS = ["1", "2", "3", "4", "5"]
WORDS = ["negative", "positive", "Sci/Tech", "zebra"]  # 1, 2, 3 and 4 tokens after the separator
# [space, positive] and [space, z, e, bra]: a shared prefix, then 1 and 3 tokens of their own
PREFIXED = ["positive", "zebra"]


# --------------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------------


def reference_causal(model, tokenizer, prompt, choices, settings, add_eos=False):
    """Summed log p(choice | prompt), one full forward of prompt + choice per choice.

    The prompt is cut to leave room for the longest choice (the documented rule), written out here with
    the tokenizer's primitives.
    """
    prompt_ids = encode_prompts(tokenizer, [prompt], settings)[0]
    choice_ids = encode_completions(tokenizer, choices, settings, [prompt] * len(choices), add_eos=add_eos)
    budget = settings.max_length - max(len(c) for c in choice_ids)
    bos = tokenizer.bos_token_id
    keep_bos = bos is not None and prompt_ids[:1] == [bos]
    cut = truncate_prompt(prompt_ids, budget, settings.truncation, keep_bos)
    sums = []
    for c in choice_ids:
        ids = torch.tensor([cut + c])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        sums.append(sum(float(logprobs[len(cut) - 1 + t, tok]) for t, tok in enumerate(c)))
    return sums, [len(c) for c in choice_ids], len(cut) < len(prompt_ids)


def reference_seq2seq(model, tokenizer, prompt, choices, settings):
    """Summed log p(choice | prompt) for T5: the model's own loss on labels = choice, times its length."""
    prompt_ids = encode_prompts(tokenizer, [prompt], settings)[0]
    cut = prompt_ids
    if len(prompt_ids) > settings.max_length:  # training's seq2seq cut: keep the last max_length tokens...
        cut = prompt_ids[len(prompt_ids) - settings.max_length:]
        if cut[-1] != prompt_ids[-1]:  # ...and the encoder's closing token
            cut = cut[:-1] + prompt_ids[-1:]
    choice_ids = encode_completions(tokenizer, choices, settings, add_eos=False)
    sums = []
    for c in choice_ids:
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([cut]), labels=torch.tensor([c])).loss
        sums.append(-float(loss) * len(c))
    return sums


# --------------------------------------------------------------------------------------------------
# Rank classification
# --------------------------------------------------------------------------------------------------


def test_choice_tokenizations_cover_both_paths(tiny_tokenizer):
    """The tiny tokenizer splits the test choices so that every code path of rank_choices runs."""
    ids = encode_completions(tiny_tokenizer, SHARED + RATINGS[4:] + WORDS, TokenizeSettings(), add_eos=False)
    assert len({c[0] for c in ids[:4]}) == 1 and all(len(c) == 2 for c in ids[:4])  # one pass suffices
    assert len(ids[4]) == 1
    assert [len(c) for c in ids[5:]] == [1, 2, 3, 4]  # second pass over the prompt's cache needed
    shared = encode_completions(tiny_tokenizer, PREFIXED, TokenizeSettings(), add_eos=False)
    assert shared[0][0] == shared[1][0] and [len(c) for c in shared] == [2, 4]


@pytest.mark.parametrize("choices", [SHARED, RATINGS, WORDS, PREFIXED],
                         ids=["shared-first-token", "ratings", "words", "shared-prefix-then-long"])
def test_rank_equals_full_forward_causal(tiny_llama, tiny_tokenizer, choices):
    # max_length 24 cuts the third prompt (about 40 tokens) from the left.
    settings = TokenizeSettings(max_length=24)
    scores = rank_choices(tiny_llama, tiny_tokenizer, PROMPTS, [choices] * len(PROMPTS), settings,
                          is_seq2seq=False, batch_size=3, include_eos=False)
    truncated = []
    for prompt, got in zip(PROMPTS, scores):
        want, counts, was_cut = reference_causal(tiny_llama, tiny_tokenizer, prompt, choices, settings)
        assert got.logprobs == pytest.approx(want, abs=1e-4)
        assert got.n_tokens == counts
        assert got.predicted == got.predicted_by_sum == max(range(len(want)), key=want.__getitem__)
        assert got.truncated == was_cut
        truncated.append(was_cut)
    assert truncated == [False, False, True, False]


def test_rank_prompt_cut_equals_training_cut_for_equal_length_choices(tiny_llama, tiny_tokenizer):
    """With " 1" .. " 4" the scored context is token for token the training input (encode_batch)."""
    settings = TokenizeSettings(max_length=24)
    prompt = PROMPTS[2]
    [got] = rank_choices(tiny_llama, tiny_tokenizer, [prompt], [SHARED], settings, is_seq2seq=False,
                         include_eos=False)
    encoded = encode_batch(tiny_tokenizer, [prompt] * 4, SHARED, settings, add_eos=False)
    assert encoded[0].truncated
    for enc, value in zip(encoded, got.logprobs):
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_llama(torch.tensor([enc.input_ids])).logits[0], -1)
        completion = range(enc.prompt_length, len(enc.input_ids))
        want = sum(float(logprobs[t - 1, enc.input_ids[t]]) for t in completion)
        assert value == pytest.approx(want, abs=1e-4)
    assert got.prompt_tokens == encoded[0].prompt_length


def forward_widths(model):
    """Record (rows, tokens) of every forward of the decoder body; the caller removes the hook."""
    widths = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        widths.append(tuple(ids.shape))

    return widths, model.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_rank_encodes_each_prompt_once(tiny_llama, tiny_tokenizer):
    """4 prompts x 4 choices sharing a first token: each prompt in ONE forward (batches as `token_batches`
    plans them); longer choices add one pass over their own tokens only (never the prompt again)."""
    settings = TokenizeSettings(max_length=64)
    lengths = [len(x) for x in encode_prompts(tiny_tokenizer, PROMPTS, settings)]
    shared = [n + 1 for n in lengths]  # prompt + the shared space token
    batches = token_batches(shared, 4, max_padding=MAX_PADDING)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    widths, handle = forward_widths(tiny_llama)
    try:
        rank_choices(tiny_llama, tiny_tokenizer, PROMPTS, [SHARED] * 4, settings, is_seq2seq=False,
                     batch_size=4, include_eos=False)
        # prompt + the shared space token, then nothing
        assert widths == [(len(b), max(lengths[i] for i in b) + 1) for b in batches]
        widths.clear()
        rank_choices(tiny_llama, tiny_tokenizer, PROMPTS, [WORDS] * 4, settings, is_seq2seq=False,
                     batch_size=4, include_eos=False)
        # Pass 1: the prompts (no shared prefix here). Pass 2: the batch's 3 choices per prompt with 2+
        # tokens, as many rows as the first batch's tokens of copied cache allow, each row its own tokens
        # but the last (zebra: 3): never the prompt again.
        batches = token_batches(lengths, 4, max_padding=MAX_PADDING)
        expected = []
        for b in batches:
            width = max(lengths[i] for i in b)
            per_pass = max(1, min(4 * max(lengths) // width, 4 * 4))
            rows = 3 * len(b)
            expected += [(len(b), width)] + [(min(per_pass, rows - k), 3) for k in range(0, rows, per_pass)]
        assert widths == expected
    finally:
        handle.remove()


def test_rank_scores_do_not_depend_on_batching(tiny_llama, tiny_tokenizer):
    """Token-budget batches (many short prompts together, a long one alone) score as one prompt at a time."""
    settings = TokenizeSettings(max_length=64)
    prompts = PROMPTS * 3
    batched = rank_choices(tiny_llama, tiny_tokenizer, prompts, [WORDS] * len(prompts), settings,
                           is_seq2seq=False, batch_size=2, include_eos=True)
    single = [rank_choices(tiny_llama, tiny_tokenizer, [p], [WORDS], settings, is_seq2seq=False,
                           batch_size=1, include_eos=True)[0] for p in prompts]
    for got, want in zip(batched, single):
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        assert got.predicted == want.predicted


def test_rank_with_eos_and_mixed_choice_lists(tiny_llama, tiny_tokenizer):
    """include_eos scores EOS too; each prompt may bring its own number of choices."""
    settings = TokenizeSettings(max_length=32)
    choice_lists = [RATINGS, WORDS, ["yes", "no"], ["a"]]
    scores = rank_choices(tiny_llama, tiny_tokenizer, PROMPTS, choice_lists, settings, is_seq2seq=False,
                          batch_size=4, include_eos=True)
    for prompt, choices, got in zip(PROMPTS, choice_lists, scores):
        want, counts, _ = reference_causal(tiny_llama, tiny_tokenizer, prompt, choices, settings,
                                           add_eos=True)
        assert got.logprobs == pytest.approx(want, abs=1e-4)
        assert got.n_tokens == counts


def test_rank_with_chat_template(tiny_llama, tiny_tokenizer):
    settings = TokenizeSettings(max_length=48, chat_template=True)
    scores = rank_choices(tiny_llama, tiny_tokenizer, PROMPTS[:2], [WORDS, RATINGS], settings,
                          is_seq2seq=False, include_eos=False)
    for prompt, choices, got in zip(PROMPTS[:2], [WORDS, RATINGS], scores):
        want, _, _ = reference_causal(tiny_llama, tiny_tokenizer, prompt, choices, settings)
        assert got.logprobs == pytest.approx(want, abs=1e-4)


def test_rank_length_normalized(tiny_llama, tiny_tokenizer):
    settings = TokenizeSettings(max_length=64)
    plain = rank_choices(tiny_llama, tiny_tokenizer, PROMPTS, [WORDS] * 4, settings, is_seq2seq=False,
                         include_eos=False)
    normed = rank_choices(tiny_llama, tiny_tokenizer, PROMPTS, [WORDS] * 4, settings, is_seq2seq=False,
                          length_normalized=True, include_eos=False)
    for a, b, prompt in zip(plain, normed, PROMPTS):
        want, counts, _ = reference_causal(tiny_llama, tiny_tokenizer, prompt, WORDS, settings)
        means = [w / n for w, n in zip(want, counts)]
        assert b.mean_logprobs == pytest.approx(means, abs=1e-4)
        assert b.predicted == b.predicted_by_mean == max(range(len(means)), key=means.__getitem__)
        assert a.predicted == a.predicted_by_sum
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    # The choices span 1 to 4 tokens: summed scores favour the short ones, means must not always agree.
    assert any(s.predicted_by_sum != s.predicted_by_mean for s in normed)


def test_rank_equals_full_forward_seq2seq(tiny_t5, tiny_tokenizer):
    settings = TokenizeSettings(max_length=24, seq2seq=True)
    for choices in (RATINGS, WORDS):
        scores = rank_choices(tiny_t5, tiny_tokenizer, PROMPTS, [choices] * 4, settings, is_seq2seq=True,
                              batch_size=3, include_eos=False)
        for prompt, got in zip(PROMPTS, scores):
            want = reference_seq2seq(tiny_t5, tiny_tokenizer, prompt, choices, settings)
            assert got.logprobs == pytest.approx(want, abs=1e-4)
        assert [s.truncated for s in scores] == [False, False, True, False]


def test_rank_choice_too_long_names_example(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match="example 0"):
        rank_choices(tiny_llama, tiny_tokenizer, ["hi"], [["word " * 20]], TokenizeSettings(max_length=8),
                     is_seq2seq=False)


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------

COMPLETIONS = ["5", "Ein Mann fährt Fahrrad.", "hello there", "a greeting between two friends"]


def reference_nll(model, tokenizer, prompt, completion, settings):
    """NLL of completion + EOS from one full unpadded forward over the training encoding."""
    [enc] = encode_batch(tokenizer, [prompt], [completion], settings)
    with torch.no_grad():
        if settings.seq2seq:
            loss = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss
            return float(loss) * len(enc.labels), len(enc.labels)
        logprobs = torch.log_softmax(model(torch.tensor([enc.input_ids])).logits[0], -1)
    nll = -sum(float(logprobs[t - 1, enc.input_ids[t]]) for t in range(enc.prompt_length, len(enc.input_ids)))
    return nll, len(enc.input_ids) - enc.prompt_length


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_completion_nll_equals_direct_computation(tiny_llama, tiny_t5, tiny_tokenizer, kind):
    seq2seq = kind == "seq2seq"
    model = tiny_t5 if seq2seq else tiny_llama
    settings = TokenizeSettings(max_length=24, seq2seq=seq2seq)
    total, tokens, per_example = completion_nll(model, tiny_tokenizer, PROMPTS, COMPLETIONS, settings,
                                                seq2seq, batch_size=3)
    wants = [reference_nll(model, tiny_tokenizer, p, c, settings) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert per_example == pytest.approx([w for w, _ in wants], abs=1e-3)
    assert tokens == sum(n for _, n in wants)
    assert total == pytest.approx(sum(w for w, _ in wants), abs=1e-3)


def test_completion_nll_skips_what_does_not_fit(tiny_llama, tiny_tokenizer):
    settings = TokenizeSettings(max_length=8)
    total, tokens, per_example = completion_nll(tiny_llama, tiny_tokenizer, ["hi", "hi"],
                                                ["1", "a very long completion that cannot fit"], settings,
                                                False)
    assert math.isnan(per_example[1]) and not math.isnan(per_example[0])
    assert total == pytest.approx(per_example[0]) and tokens == 3  # space, "1", EOS


def test_classes_spelled_apart_up_to_nfc_are_one_class():
    from instructkit.evaluate.template_scoring import _class_labels, _record

    composed, decomposed = "caf\u00e9", "cafe\u0301"
    exs = [{"choices": [composed, "tea"]}, {"choices": [decomposed, "tea"]}]
    assert _class_labels(exs) == [composed, "tea"]  # was three classes, one never predicted
    record = _record(0, {"template_id": "t", "task": "classification", "completion": decomposed}, "p", decomposed)
    assert (record["reference"], record["prediction"]) == (composed, composed)
