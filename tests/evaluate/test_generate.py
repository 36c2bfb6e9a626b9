"""Generation against direct computations: batched equals one at a time, stop tokens, answer mapping.

The references are deliberately naive: one prompt at a time, unpadded.
"""

from __future__ import annotations

import pytest
import torch

from instructkit.data.tokenize import (
    TokenizeSettings,
    encode_for_generation,
    encode_prompts,
    stop_token_ids,
)
from instructkit.evaluate.generate import generate, map_to_choice
from instructkit.evaluate.model_inputs import token_batches

PROMPTS = [
    "Predict the associated rating for the following review: great coffee, fast shipping. Rating:",
    "hi",
    "Translate to German: a man rides a bike. The quick brown fox jumps over the lazy dog again and again.",
    "Summarize the dialogue.",
]


# --------------------------------------------------------------------------------------------------
# Generation on a model that has learned its answers
# --------------------------------------------------------------------------------------------------

TRAIN_PAIRS = [
    ("Predict the rating: great coffee, fast shipping.", "5"),
    ("Translate to German: a man rides a bike.", "Ein Mann fährt Fahrrad."),
    ("hi", "hello there"),
    ("Summarize the dialogue. #Person1#: hello there. #Person2#: hi, how are you?", "a greeting"),
]


def overfit(model, tokenizer, settings, steps=80):
    """Plain AdamW on prompt + completion + EOS, labels -100 on the prompt, until it recites the answers."""
    from conftest import overfit_causal

    return overfit_causal(model, tokenizer, [p for p, _ in TRAIN_PAIRS], [c for _, c in TRAIN_PAIRS], settings,
                          steps)


@pytest.fixture(scope="module")
def learned_llama(tiny_tokenizer):
    from conftest import build_tiny_llama

    model = build_tiny_llama(tiny_tokenizer, seed=1)
    loss = overfit(model, tiny_tokenizer, TokenizeSettings(max_length=64))
    assert loss < 0.05, f"the tiny model did not learn its answers (loss {loss})"
    return model


def test_generation_recites_answers_and_stops_at_eos(learned_llama, tiny_tokenizer):
    settings = TokenizeSettings(max_length=64)
    prompts = [p for p, _ in TRAIN_PAIRS]
    answers = generate(learned_llama, tiny_tokenizer, prompts, settings, is_seq2seq=False, max_new_tokens=24,
                       batch_size=4)
    assert answers == [c for _, c in TRAIN_PAIRS]
    # It stopped: the answers are far shorter than 24 new tokens; recompute the raw continuation to see EOS.
    ids = encode_prompts(tiny_tokenizer, [prompts[0]], settings)[0]
    out = learned_llama.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    assert tiny_tokenizer.eos_token_id in new and len(new) < 24


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_batched_equals_one_at_a_time(learned_llama, tiny_tokenizer, num_beams):
    settings = TokenizeSettings(max_length=64)
    # Unseen prompts of very different lengths: the model produces varied continuations, not just EOS.
    prompts = [p for p, _ in TRAIN_PAIRS] + ["The quick brown fox", "Rating: 5 World Sports Business"]
    # batch_size 2: short prompts go more than 2 at a time (token_batches), so grown batches are covered.
    lengths = [len(ids) + 12 for ids in encode_for_generation(tiny_tokenizer, prompts, settings, 12)]
    assert max(len(b) for b in token_batches(lengths, 2)) > 2
    batched = generate(learned_llama, tiny_tokenizer, prompts, settings, is_seq2seq=False, max_new_tokens=12,
                       batch_size=2, num_beams=num_beams)
    single = [generate(learned_llama, tiny_tokenizer, [p], settings, is_seq2seq=False, max_new_tokens=12,
                       batch_size=1, num_beams=num_beams)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) >= 4


def test_generation_seq2seq_batched_equals_one_at_a_time(tiny_t5, tiny_tokenizer):
    settings = TokenizeSettings(max_length=32, seq2seq=True)
    batched = generate(tiny_t5, tiny_tokenizer, PROMPTS, settings, is_seq2seq=True, max_new_tokens=6,
                       batch_size=4)
    single = [generate(tiny_t5, tiny_tokenizer, [p], settings, is_seq2seq=True, max_new_tokens=6)[0]
              for p in PROMPTS]
    assert batched == single
    assert all(isinstance(a, str) and a == a.strip() for a in batched)


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_llama, tiny_tokenizer):
    settings = TokenizeSettings(max_length=64)

    def sample(seed):
        return generate(tiny_llama, tiny_tokenizer, PROMPTS, settings, is_seq2seq=False, max_new_tokens=8,
                        do_sample=True, seed=seed)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample(7)
    assert torch.equal(torch.get_rng_state(), before)
    assert a == sample(7) and a != sample(8)


def test_stop_tokens_include_end_of_turn_with_chat_template(tiny_tokenizer):
    plain = stop_token_ids(tiny_tokenizer, TokenizeSettings())
    chat = stop_token_ids(tiny_tokenizer, TokenizeSettings(chat_template=True))
    assert plain == [tiny_tokenizer.eos_token_id]
    assert chat == [tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]


# --------------------------------------------------------------------------------------------------
# Mapping generated text to a choice
# --------------------------------------------------------------------------------------------------


STARS = ["1", "2", "3", "4", "5"]
SENTIMENT = ["positive", "negative", "neutral"]


@pytest.mark.parametrize("text, choices, expected", [
    ("5", STARS, "5"),
    (" 5 stars", STARS, "5"),
    ("5/5", STARS, "5"),
    ("**4** stars", STARS, "4"),
    ("Positive.", SENTIMENT, "positive"),
    ("NEGATIVE", SENTIMENT, "negative"),
    ("positive, clearly", SENTIMENT, "positive"),
    ("\"neutral\"", SENTIMENT, "neutral"),
    ("55", STARS, None),
    ("positively great", SENTIMENT, None),
    ("I think it is 5", STARS, None),
    ("", STARS, None),
    ("   ", STARS, None),
])
def test_map_to_choice(text, choices, expected):
    assert map_to_choice(text, choices) == expected


@pytest.mark.parametrize("text, choices, expected", [
    ("\u201cpositive\u201d", SENTIMENT, "positive"),  # typographic quotes
    ("\u00abnegative\u00bb", SENTIMENT, "negative"),  # guillemets
    ("\u300c\u306f\u3044\u300d", ["\u306f\u3044", "\u3044\u3044\u3048"], "\u306f\u3044"),  # 「はい」
    ("positive\u3002", SENTIMENT, "positive"),  # ideographic full stop
    ("\uff15", STARS, "5"),  # full-width digit 5
    ("\uff39\uff45\uff53", ["yes", "no"], "yes"),  # full-width Yes
    ("`5`", STARS, "5"),
    ("-1", ["1", "-1"], "-1"),  # a dash is part of the answer, not punctuation around it
    ("1", ["1", "-1"], "1"),
])
def test_map_to_choice_reads_punctuation_and_widths_of_every_script(text, choices, expected):
    """The answer-naming kind of deepset-ai/haystack#2508: only ASCII edge punctuation was taken off, so a
    model quoting its answer “positive” or writing a full-width ５ (CJK input methods) was unparseable."""
    assert map_to_choice(text, choices) == expected


@pytest.mark.parametrize("text, expected", [
    ("4.5", None), ("4,5", None), ("3.5 stars", None), ("4.5/5", None),  # other numbers than 4 or 3
    ("4. Great", "4"), ("4, good", "4"), ("5.", "5"), ("4 stars", "4"),  # a stop or comma after the choice
])
def test_map_to_choice_does_not_read_a_decimal_as_its_integer_part(text, expected):
    """The integer-part kind of stanford-crfm/helm#4289: "4.5" began with the choice "4" followed by a
    non-word character, so a half-star answer was credited as 4 stars."""
    assert map_to_choice(text, STARS) == expected


@pytest.mark.parametrize("text, choices, expected", [
    ("positive/negative", SENTIMENT, None), ("Positive or negative", SENTIMENT, None),
    ("positive, negative or neutral", SENTIMENT, None), ("\"positive\" / \"negative\"", SENTIMENT, None),
    ("positive; negative.", SENTIMENT, None), ("4 or 5 stars", STARS, None), ("4-5", STARS, None),
    ("4 \u2013 5 stars", STARS, None), ("4 to 5", STARS, None), ("**4** or **5**", STARS, None),
    ("yes and no", ["yes", "no"], None), ("entailment or not entailment", ["entailment", "not entailment"], None),
    # not hedges: a score out of the top choice, the other choice starting a phrase, one choice only
    ("4/5", STARS, "4"), ("4/5 stars", STARS, "4"), ("5/5", STARS, "5"), ("5/4", STARS, None),
    ("yes, no doubt", ["yes", "no"], "yes"), ("Yes, and no wonder", ["yes", "no"], "yes"),
    ("4 stars, 5 is too much", STARS, "4"), ("4-star review", STARS, "4"), ("positive, clearly", SENTIMENT, "positive"),
])
def test_map_to_choice_a_hedge_names_no_choice(text, choices, expected):
    """A generated answer naming two choices as alternatives was credited with the first ("positive/negative"
    scored right on every positive review): it names none (counted unparseable)."""
    assert map_to_choice(text, choices) == expected


@pytest.mark.parametrize("text, choices, expected", [
    ("Let me think. The answer is 4.", STARS, "4"), ("Answer: positive", SENTIMENT, "positive"),
    ("The review is glowing, so my answer would be **5** stars", STARS, "5"),
    ("Answer: 4, no, final answer: 2", STARS, "2"), ("The answer is\uff1a \uff15", STARS, "5"),  # the last one said
    ("The answer is 4 or 5", STARS, None), ("The answer is 4.5", STARS, None), ("I think it is 5", STARS, None),
])
def test_map_to_choice_reads_the_choice_after_the_answer_is(text, choices, expected):
    """A chat model's "... The answer is 4." named no choice (it does not start with one): what follows the
    last "answer is" / "answer:" is read by the same rules (lm-evaluation-harness's "The answer is" filters)."""
    assert map_to_choice(text, choices) == expected


def test_map_to_choice_prefers_longest_leading_choice():
    nli = ["entailment", "not", "not entailment"]
    assert map_to_choice("not entailment, because", nli) == "not entailment"
    assert map_to_choice("Sci/Tech news", ["World", "Sports", "Business", "Sci/Tech"]) == "Sci/Tech"
