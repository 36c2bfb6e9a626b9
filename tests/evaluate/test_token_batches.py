"""`token_batches`: the batch plan of evaluation passes (`batch_size` rows of the longest prompts, more
rows of shorter ones within the first batch's tokens, a padding cap)."""

from __future__ import annotations

import random

import pytest

from instructkit.evaluate.model_inputs import ROW_GROWTH, token_batches


def test_docstring_example():
    assert token_batches([153, 110, 60, 59, 58, 40], 2) == [[0, 1], [2, 3, 4, 5]]
    assert token_batches([153, 110, 60, 59, 58, 40], 2, growth=1) == [[0, 1], [2, 3], [4, 5]]


def test_plain_chunks_when_lengths_are_equal_or_growth_is_1():
    assert token_batches([7] * 5, 2) == [[0, 1], [2, 3], [4]]
    assert token_batches([5, 9, 7, 3, 8], 2, growth=1) == [[1, 4], [2, 0], [3]]
    assert token_batches([], 4) == []


def test_short_prompts_fill_the_first_batch_tokens_up_to_the_row_cap():
    lengths = [160] + [60] * 80
    # The first batch (16 x 160 = 2,560 tokens) holds the outlier and 15 others; then 2,560 // 60 = 42 rows.
    assert [len(b) for b in token_batches(lengths, 16)] == [16, 42, 23]
    # Never more than ROW_GROWTH x 16 = 64 rows, however short (kept logits are rows x V).
    assert [len(b) for b in token_batches([192] + [5] * 150, 16)] == [16, 64, 64, 7]


def test_a_long_outlier_goes_with_few_rows():
    lengths = [153, 110, 109, 97, 95, 86, 85, 78, 77, 71, 70, 67, 64, 64, 64, 60, 59, 58]
    # 4 rows pad 612 - 469 = 143 of 612 tokens (23%); a 5th (95) would pad 201 of 765 (26%)
    assert token_batches(lengths, 16, max_padding=0.25)[0] == [0, 1, 2, 3]
    assert token_batches(lengths, 16) == [list(range(16)), [16, 17]]  # no cap: 16 rows of the longest


@pytest.mark.parametrize("seed", range(6))
def test_invariants_on_random_lengths(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 120))]
    batch_size, growth = rng.randint(1, 16), rng.choice([1, 2, ROW_GROWTH])
    cap = rng.choice([0.0, 0.25, 1.0])
    batches = token_batches(lengths, batch_size, growth=growth, max_padding=cap)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # each index exactly once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first throughout
    budget = batch_size * max(lengths)

    def allowed(rows):  # the rules a batch of these rows must meet
        width = lengths[rows[0]]
        padding = len(rows) * width - sum(lengths[i] for i in rows)
        grown_ok = len(rows) * width <= budget and len(rows) <= growth * batch_size
        size_ok = len(rows) <= batch_size or grown_ok
        return size_ok and padding <= cap * len(rows) * width + 1e-9

    for k, b in enumerate(batches):
        assert allowed(b)
        if k + 1 < len(batches):  # as full as the rules allow: the next index would break one
            assert not allowed(b + [batches[k + 1][0]])


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size and growth"):
        token_batches([1], 0)
    with pytest.raises(ValueError, match="batch_size and growth"):
        token_batches([1], 1, growth=0)
    with pytest.raises(ValueError, match="max_padding"):
        token_batches([1], 1, max_padding=1.5)
