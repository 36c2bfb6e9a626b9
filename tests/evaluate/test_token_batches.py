"""`token_batches`: the batch plan of evaluation passes (a row count for the longest prompts, a token budget
that lets shorter ones go more rows at a time, a padding cap)."""

from __future__ import annotations

import random

import pytest

from instructkit.evaluate.model_inputs import ROW_GROWTH, token_batches


def test_docstring_example():
    assert token_batches([153, 110, 60, 59, 58], 2, 400, 0.25) == [[0, 1], [2, 3, 4]]


def test_rows_only_when_the_budget_allows_no_more():
    # max_tokens below one full batch: plain chunks of max_rows, longest first.
    assert token_batches([5, 9, 7, 3, 8], 2, 0) == [[1, 4], [2, 0], [3]]


def test_short_prompts_fill_the_token_budget():
    # 16 rows of the longest allowed prompt (16 x 192 tokens) hold 51 rows of 60 tokens...
    assert [len(b) for b in token_batches([60] * 80, 16, 16 * 192)] == [51, 29]
    # ... and never more than ROW_GROWTH x 16 = 64 rows, however short (kept logits are rows x V).
    assert [len(b) for b in token_batches([5] * 150, 16, 16 * 192)] == [64, 64, 22]


def test_a_long_outlier_goes_with_few_rows():
    lengths = [153, 110, 109, 97, 95, 86, 85, 78, 77, 71, 70, 67, 64, 64, 64, 60, 59, 58]
    batches = token_batches(lengths, 16, 16 * 192, 0.25)
    # 4 rows pad 612 - 469 = 143 of 612 tokens (23%); a 5th (95) would pad 201 of 765 (26%)
    assert batches[0] == [0, 1, 2, 3]
    uncapped = token_batches(lengths, 16, 16 * 192, 1.0)
    assert uncapped == [list(range(18))]  # 18 x 153 = 2,754 <= 3,072 tokens: one batch


@pytest.mark.parametrize("seed", range(5))
def test_invariants_on_random_lengths(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 120))]
    max_rows, max_tokens, cap = rng.randint(1, 16), rng.randint(0, 3000), rng.choice([0.0, 0.25, 1.0])
    batches = token_batches(lengths, max_rows, max_tokens, cap)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each index exactly once
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first throughout
    for b in batches:
        width = lengths[b[0]]
        assert len(b) <= max_rows or (len(b) * width <= max_tokens and len(b) <= ROW_GROWTH * max_rows)
        assert len(b) * width - sum(lengths[i] for i in b) <= cap * len(b) * width + 1e-9


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_rows"):
        token_batches([1], 0, 10)
    with pytest.raises(ValueError, match="max_padding"):
        token_batches([1], 1, 10, 1.5)
