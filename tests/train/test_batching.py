"""data/batching.py and data/sampler.py: padding, targets, packing, samplers, class balance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import make_examples, tokenized
from hypothesis import given, settings
from hypothesis import strategies as st

from instructkit.data.batching import (
    IGNORE_INDEX,
    TokenTable,
    collate_packed,
    collate_padded,
    collate_seq2seq,
)
from instructkit.data.sampler import (
    BatchPlan,
    balanced_sampler,
    class_weights,
    example_weights,
    first_fit_decreasing,
    one_row_attention,
    pack_group,
    plan_epoch,
    plan_eval,
    plan_step,
    step_groups,
)
from instructkit.data.tokenize import encode_completions


def _table(lengths, n_labels=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = [list(rng.integers(5, 400, n)) for n in lengths]
    labels = [[IGNORE_INDEX] * (len(x) - n_labels) + x[-n_labels:] for x in ids]
    return TokenTable.from_lists(ids, labels), ids, labels


# --------------------------------------------------------------------------------------------------
# Token table
# --------------------------------------------------------------------------------------------------


def test_token_table_from_dataset_keeps_rows_and_selection(tiny_tokenizer):
    dataset, _ = tokenized(make_examples(12), tiny_tokenizer)
    table = TokenTable.from_dataset(dataset)
    assert len(table) == 12
    for i in range(12):
        ids, labels = table.tokens(i)
        assert ids.tolist() == dataset[i]["input_ids"]
        assert labels.tolist() == dataset[i]["labels"]
    picked = dataset.select([7, 2, 9])
    sub = TokenTable.from_dataset(picked)
    assert [sub.tokens(k)[0].tolist() for k in range(3)] == [dataset[i]["input_ids"] for i in (7, 2, 9)]


def test_causal_collation_rejects_unaligned_labels():
    table = TokenTable.from_lists([[1, 2], [3, 4, 5]], [[1, 2], [3, 4]])
    assert not table.aligned
    with pytest.raises(ValueError, match="aligned"):
        collate_padded(table, [0, 1], pad_id=0)


# --------------------------------------------------------------------------------------------------
# What is learned: prompt -100, completion + EOS (causal, chat, seq2seq)
# --------------------------------------------------------------------------------------------------


def test_causal_batch_learns_completion_and_eos_only(tiny_tokenizer):
    examples = make_examples(6)
    dataset, settings = tokenized(examples, tiny_tokenizer)
    table = TokenTable.from_dataset(dataset)
    batch = collate_padded(table, list(range(6)), tiny_tokenizer.pad_token_id)
    eos = tiny_tokenizer.eos_token_id
    per_row = [batch.labels[r][batch.labels[r] != IGNORE_INDEX].tolist() for r in range(6)]
    for r, ex in enumerate(examples):
        expected = tiny_tokenizer(" " + ex["completion"], add_special_tokens=False)["input_ids"] + [eos]
        assert per_row[r] == expected
        prompt_len = dataset[r]["prompt_length"]
        assert (batch.labels[r, :prompt_len] == IGNORE_INDEX).all()
    # Targets are the next tokens: all label tokens of all rows, in row order.
    assert batch.targets.tolist() == [t for row in per_row for t in row]
    assert batch.n_targets == sum(len(r) for r in per_row)


def test_padding_is_right_side_with_pad_id_and_minus_100(tiny_tokenizer):
    table, ids, _ = _table([3, 7, 5])
    pad = tiny_tokenizer.pad_token_id
    batch = collate_padded(table, [0, 1, 2], pad)
    assert batch.inputs["input_ids"].shape == (3, 7)
    assert batch.inputs["input_ids"][0].tolist() == ids[0] + [pad] * 4
    assert batch.inputs["attention_mask"].tolist() == [[1] * 3 + [0] * 4, [1] * 7, [1] * 5 + [0] * 2]
    assert batch.labels[0, 3:].tolist() == [IGNORE_INDEX] * 4
    assert batch.n_tokens == 15


def test_chat_template_completion_ends_with_one_end_of_turn(tiny_tokenizer):
    examples = make_examples(4)
    dataset, settings = tokenized(examples, tiny_tokenizer, chat_template=True)
    table = TokenTable.from_dataset(dataset)
    batch = collate_padded(table, list(range(4)), tiny_tokenizer.pad_token_id)
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = tiny_tokenizer.eos_token_id
    for r in range(4):
        learned = batch.labels[r][batch.labels[r] != IGNORE_INDEX].tolist()
        assert learned[-1] == end_of_turn
        assert learned.count(end_of_turn) == 1 and eos not in learned
        expected = encode_completions(tiny_tokenizer, [examples[r]["completion"]], settings,
                                      prompts=[examples[r]["prompt"]])[0]
        assert learned == expected


def test_seq2seq_batch_pads_encoder_and_labels(tiny_tokenizer, tiny_t5):
    examples = make_examples(5)
    dataset, _ = tokenized(examples, tiny_tokenizer, seq2seq=True)
    table = TokenTable.from_dataset(dataset)
    pad = tiny_tokenizer.pad_token_id
    batch = collate_seq2seq(table, list(range(5)), pad)
    eos = tiny_tokenizer.eos_token_id
    for r, ex in enumerate(examples):
        expected = tiny_tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + [eos]
        row = batch.inputs["labels"][r]
        assert row[row != IGNORE_INDEX].tolist() == expected
        assert (row[len(expected):] == IGNORE_INDEX).all()
        n = len(dataset[r]["input_ids"])
        assert batch.inputs["attention_mask"][r].sum() == n
        assert (batch.inputs["input_ids"][r, n:] == pad).all()
    # The model derives decoder inputs from the labels: start token, then the labels shifted right.
    decoder = tiny_t5.prepare_decoder_input_ids_from_labels(labels=batch.inputs["labels"])
    assert (decoder[:, 0] == tiny_t5.config.decoder_start_token_id).all()
    first = batch.inputs["labels"][0]
    k = int((first != IGNORE_INDEX).sum())
    assert decoder[0, 1:k].tolist() == first[:k - 1].tolist()
    assert batch.targets.tolist() == batch.inputs["labels"][batch.inputs["labels"] != IGNORE_INDEX].tolist()


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def test_packed_row_restarts_positions_has_no_mask_and_batch_dim_1():
    table, ids, labels = _table([4, 6, 3])
    batch = collate_packed(table, [[0, 1, 2]], pad_id=0)
    assert batch.inputs["input_ids"].shape == (1, 13)
    assert "attention_mask" not in batch.inputs
    assert batch.inputs["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert batch.inputs["input_ids"][0].tolist() == ids[0] + ids[1] + ids[2]
    assert batch.n_tokens == 13


def test_packed_targets_never_cross_an_example_boundary():
    # Fully labelled examples: the only thing stopping a cross-boundary target is the collator.
    ids = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    table = TokenTable.from_lists(ids, ids)
    batch = collate_packed(table, [[0, 1, 2]], pad_id=0)
    starts = {0, 3, 5}
    positions = batch.target_positions.tolist()
    assert all(p + 1 not in starts for p in positions)  # nothing predicts an example's first token
    assert batch.targets.tolist() == [12, 13, 22, 32, 33, 34]


def test_packed_logits_equal_separate_examples(tiny_tokenizer, tiny_llama):
    """Attention never crosses examples: each example's logits in a packed row equal its own forward."""
    table, ids, _ = _table([7, 12, 3, 9, 15])
    rows = [[0, 1, 2], [3], [4]]  # rows of different fill: the shorter ones end in padding
    batch = collate_packed(table, rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        packed = tiny_llama(**batch.inputs, use_cache=False).logits
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                alone = tiny_llama(input_ids=torch.tensor([ids[i]]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, at:at + len(ids[i])], alone, rtol=1e-5, atol=1e-5)
                at += len(ids[i])


@pytest.mark.parametrize("packed", [False, True])
def test_logits_to_keep_mask_equals_full_logits_at_targets(tiny_tokenizer, tiny_llama, packed):
    table, _, _ = _table([7, 12, 3, 9], n_labels=2)
    pad = tiny_tokenizer.pad_token_id
    batch = collate_packed(table, [[0, 1], [2, 3]], pad) if packed else collate_padded(table, [0, 1, 2, 3], pad)
    with torch.no_grad():
        full = tiny_llama(**batch.inputs, use_cache=False).logits
        kept = tiny_llama(**batch.inputs, use_cache=False, logits_to_keep=batch.target_mask).logits
    kept = kept.reshape(-1, kept.shape[-1])
    assert kept.shape[0] == batch.n_targets == 8
    torch.testing.assert_close(kept, full.reshape(-1, full.shape[-1])[batch.target_positions], rtol=1e-5, atol=1e-5)


def test_first_fit_decreasing_never_splits_and_respects_capacity():
    lengths = np.array([5, 9, 3, 7, 2, 8, 4])
    rows = first_fit_decreasing(range(7), lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(lengths[row].sum() <= 10 for row in rows)
    assert len(rows) == 4  # 38 tokens in rows of 10 need at least 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40), st.integers(8, 256),
       st.one_of(st.none(), st.floats(16, 4096)))
def test_pack_group_places_every_example_once(lengths, max_tokens, attention):
    lengths = np.array(lengths)
    rows = pack_group(range(len(lengths)), lengths, max_tokens, attention)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert len(row) == 1 or lengths[row].sum() <= max(max_tokens, lengths.max())


def test_pack_group_without_attention_cost_is_one_padding_free_row():
    lengths = np.array([30, 50, 20, 40])
    assert len(pack_group(range(4), lengths, max_tokens=512, attention_tokens=None)) == 1
    # With a steep attention cost it prefers several narrow rows.
    assert len(pack_group(range(4), lengths, max_tokens=512, attention_tokens=10.0)) > 1


# --------------------------------------------------------------------------------------------------
# Samplers and step plans
# --------------------------------------------------------------------------------------------------


def test_length_grouped_sampler_is_seeded_and_groups_similar_lengths():
    lengths = np.random.default_rng(1).integers(5, 200, 400)
    a = step_groups(lengths, 8, seed=3, epoch=0, group_by_length=True)
    b = step_groups(lengths, 8, seed=3, epoch=0, group_by_length=True)
    c = step_groups(lengths, 8, seed=3, epoch=1, group_by_length=True)
    assert [g.tolist() for g in a] == [g.tolist() for g in b]
    assert [g.tolist() for g in a] != [g.tolist() for g in c]
    assert sorted(np.concatenate(a).tolist()) == list(range(400))
    spread = np.mean([np.ptp(lengths[g]) for g in a])
    random_groups = step_groups(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert spread < 0.5 * np.mean([np.ptp(lengths[g]) for g in random_groups])
    # Groups come from a sorted mega-batch but their order is shuffled (not longest-first overall).
    firsts = [lengths[g].max() for g in a]
    assert firsts != sorted(firsts, reverse=True)


@pytest.mark.parametrize("packing", [False, True])
def test_step_sees_the_same_examples_whatever_the_split(packing):
    lengths = np.random.default_rng(2).integers(5, 60, 37)
    configs = [BatchPlan(8, 1, 1, packing, 64), BatchPlan(2, 4, 1, packing, 64), BatchPlan(4, 1, 2, packing, 64),
               BatchPlan(1, 2, 4, packing, 64)]

    def examples_per_step(plan):
        return [sorted(i for rank in step for mb in rank for row in mb for i in row)
                for step in plan_epoch(lengths, plan, epoch=0)]

    reference = examples_per_step(configs[0])
    assert sorted(len(step) for step in reference) == [5, 8, 8, 8, 8]  # 37 = 4 x 8 + 5
    for plan in configs[1:]:
        assert examples_per_step(plan) == reference


@pytest.mark.parametrize("world", [1, 2])
def test_flash_attention_gets_one_packed_row_per_micro_batch(tiny_tokenizer, tiny_llama, world):
    """FlashAttention separates a packed row's examples by position_ids only in a ONE-row batch
    (transformers#39121, trl#3526): [R > 1, W] packed rows would attend across examples. With one_row each
    micro-batch is one row of the same examples, so the step, the token budget and the loss are unchanged."""
    from types import SimpleNamespace

    assert [one_row_attention(SimpleNamespace(_attn_implementation=name)) for name in
            ("flash_attention_2", "kernels-community/flash-attn3", "sdpa", "sdpa_varlen", None)] == \
        [True, True, False, False, False]
    lengths = np.random.default_rng(0).integers(5, 50, 512)
    rows_plan = BatchPlan(16, 4, world, packing=True, max_tokens=16 * 64)
    flash_plan = BatchPlan(16, 4, world, packing=True, max_tokens=16 * 64, one_row=True)

    def micro_batches(plan):
        return [mb for step in plan_epoch(lengths, plan, epoch=0) for rank in step for mb in rank if mb]

    shared = [mb for mb in micro_batches(rows_plan) if len(mb) > 1 and max(len(row) for row in mb) > 1]
    assert len(shared) >= 2  # without one_row: several rows of several examples in one tensor
    flat = micro_batches(flash_plan)
    assert {len(mb) for mb in flat} == {1}
    assert max(int(lengths[mb[0]].sum()) for mb in flat) <= 16 * 64
    steps = [[sorted(i for rank in step for mb in rank for row in mb for i in row) for step in plan_epoch(
        lengths, plan, epoch=0)] for plan in (rows_plan, flash_plan)]
    assert steps[0] == steps[1]
    assert {len(mb) for mb in plan_eval(lengths, flash_plan)[0] if mb} == {1}
    # the same examples as one row give the same summed loss (sdpa here: it separates rows of several too)
    table, _, _ = _table([int(x) for x in lengths[:40]], n_labels=3)
    mb = shared[0] if max(i for row in shared[0] for i in row) < 40 else [[0, 1, 2], [3, 4], [5, 6, 7]]
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        losses = []
        for rows in (mb, [[i for row in mb for i in row]]):
            batch = collate_packed(table, rows, pad)
            logits = tiny_llama(**batch.inputs, use_cache=False).logits[batch.target_mask]
            losses.append(torch.nn.functional.cross_entropy(logits, batch.targets, reduction="sum").item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_every_process_gets_the_same_number_of_micro_batches():
    lengths = np.array([50, 3, 4, 5, 6])  # one long example: the packed rows are very unequal
    for packing in (False, True):
        per_rank = plan_step(range(5), lengths, BatchPlan(1, 2, 4, packing, 60))
        assert len({len(mbs) for mbs in per_rank}) == 1
        assert sorted(i for mbs in per_rank for mb in mbs for row in mb for i in row) == list(range(5))
    assert all(len(mbs) == 1 for mbs in plan_eval(np.array([5, 6, 7]), BatchPlan(2, 1, 2)))


def test_balanced_sampler_equalises_classes_and_is_seeded():
    labels = [0] * 900 + [1] * 90 + [2] * 10
    draw = balanced_sampler(labels, seed=0, epoch=0)
    assert len(draw) == 1000
    assert np.array_equal(draw, balanced_sampler(labels, seed=0, epoch=0))
    assert not np.array_equal(draw, balanced_sampler(labels, seed=0, epoch=1))
    shares = np.bincount(np.asarray(labels)[draw], minlength=3) / 1000
    assert np.all(np.abs(shares - 1 / 3) < 0.05)


def test_class_weights_inverse_frequency_mean_one():
    labels = [5] * 64 + [1] * 9 + [2] * 9 + [3] * 9 + [4] * 9
    weights = class_weights(labels)
    assert weights[5] == pytest.approx(100 / (5 * 64))
    assert weights[1] == pytest.approx(100 / (5 * 9))
    assert example_weights(labels).mean() == pytest.approx(1.0)
    assert example_weights([0, 0, -1]).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_weighted_batch_carries_class_weights_per_target():
    table, _, _ = _table([5, 6, 7], n_labels=2)
    weights = np.array([0.5, 2.0, 1.0], dtype=np.float32)
    batch = collate_padded(table, [0, 1, 2], pad_id=0, weights=weights)
    assert batch.target_weights.tolist() == [0.5, 0.5, 2.0, 2.0, 1.0, 1.0]
    assert batch.weight_sum == pytest.approx(7.0)


def test_class_ids_from_examples_uses_labels_of_classification_examples():
    from instructkit.data.sampler import class_ids_from_examples

    examples = [{"label": "5", "choices": ["1", "5"]}, {"label": "1", "choices": ["1", "5"]},
                {"label": 5, "choices": ["1", "5"]}, {"label": "x", "choices": None}, {"completion": "free text"}]
    assert class_ids_from_examples(examples) == [1, 0, 1, -1, -1]


# --------------------------------------------------------------------------------------------------
# Buckets (accelerators): few distinct micro-batch shapes, little padding
# --------------------------------------------------------------------------------------------------


def test_round_up_and_bucket_caps():
    from instructkit.data.buckets import bucket_caps, round_up

    assert [round_up(812, 64), round_up(832, 64), round_up(833, 64), round_up(5, 1)] == [832, 832, 896, 5]
    # 4 groups of 8 holding 3,250 tokens: 4 x 768 = 3,072 and 2 x 832 + 2 x 768 = 3,200 are too small,
    # 3 x 832 + 768 = 3,264 holds them: three caps of 832, one of 768.
    caps = bucket_caps(3250, [8, 8, 8, 8], 64)
    assert sorted(caps) == [768, 832, 832, 832]
    # Unequal sizes share the total in proportion: 3 + 1 examples, 256 tokens -> shares 192 and 64.
    assert bucket_caps(256, [3, 1], 64) == [192, 64]


def test_fill_buckets_finds_the_exact_fit():
    from instructkit.data.buckets import fill_buckets

    # 256 tokens in 4 rows of 2: the only way to fill four 64-token rows exactly is these pairs.
    lengths = np.array([60, 4, 50, 14, 40, 24, 30, 34])
    rows = fill_buckets(range(8), lengths, [2, 2, 2, 2], 64)
    assert sorted(sorted(lengths[row].tolist()) for row in rows) == [[4, 60], [14, 50], [24, 40], [30, 34]]


def test_fill_buckets_repairs_what_greedy_leaves_over_the_cap():
    from instructkit.data.buckets import fill_buckets

    # 160 tokens in 2 rows of 3, multiple 32: caps 96 and 64 (shares of 80 round down to 64; one is raised).
    # Greedy, longest first into the most room: 54 -> A (room 42), 50 -> B (14), 24 -> A (18), 22 -> A
    # (18 > 14): A = {54, 24, 22} = 100, over its 96; 6 and 4 -> B = {50, 6, 4} = 60. Swapping 54 and 50
    # moves 4 tokens: {50, 24, 22} = 96 and {54, 6, 4} = 64, both exact.
    lengths = np.array([6, 4, 50, 24, 54, 22])
    rows = fill_buckets(range(6), lengths, [3, 3], 32)
    assert sorted(sorted(lengths[row].tolist()) for row in rows) == [[4, 6, 54], [22, 24, 50]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=4, max_size=80), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([16, 64]))
def test_fill_buckets_and_best_fit_partition_every_example_once(lengths, size, multiple):
    from instructkit.data.buckets import best_fit_rows, fill_buckets

    lengths = np.array(lengths)
    n = len(lengths) - len(lengths) % size
    rows = fill_buckets(range(n), lengths, [size] * (n // size), multiple)
    assert sorted(i for row in rows for i in row) == list(range(n))
    assert all(len(row) == size for row in rows)
    fitted = best_fit_rows(range(len(lengths)), lengths, size, multiple)
    assert sorted(i for row in fitted for i in row) == list(range(len(lengths)))
    assert all(len(row) == size for row in fitted[:-1]) and 1 <= len(fitted[-1]) <= size


def test_best_fit_rows_fills_each_row_to_its_bucket():
    from instructkit.data.buckets import best_fit_rows

    # Longest first: 100 + the shortest (10) needs 128, and 28 fills it exactly; then 54 + 10 = 64 exactly;
    # 50 + 36 = 86 is all that is left (bucket 128).
    lengths = np.array([10, 50, 54, 100, 28, 36])
    rows = best_fit_rows(range(6), lengths, 2, 64)
    assert [sorted(lengths[row].tolist()) for row in rows] == [[28, 100], [10, 54], [36, 50]]


def test_token_balanced_steps_are_rows_of_the_batch_and_cover_the_epoch():
    from instructkit.data.buckets import token_balanced

    lengths = np.random.default_rng(4).integers(20, 256, 203)
    order = np.random.default_rng(5).permutation(203)
    groups = token_balanced(order, lengths, 8, 2, 64, np.random.default_rng(6))
    assert sorted(np.concatenate(groups).tolist()) == list(range(203))
    # 203 = 101 rows of 2 + the order's last example, a row of its own at the very end: 25 steps of 8 + 3.
    assert [len(g) for g in groups] == [8] * 25 + [3]
    assert groups[-1][-1] == order[-1]
    again = token_balanced(order, lengths, 8, 2, 64, np.random.default_rng(6))
    assert [g.tolist() for g in again] == [g.tolist() for g in groups]
    with pytest.raises(ValueError, match="multiple of row_size"):
        token_balanced(order, lengths, 8, 3, 64, np.random.default_rng(6))


def _shapes_and_padding(lengths, plan, epoch):
    from instructkit.data.buckets import micro_batch_shape

    shapes, real, computed, seen = set(), 0, 0, []
    for step in plan_epoch(lengths, plan, epoch):
        for rank in step:
            for mb in rank:
                rows, width = micro_batch_shape(mb, lengths, plan.pad_to_multiple_of)
                shapes.add((rows, width))
                computed += rows * width
                real += sum(int(lengths[i]) for row in mb for i in row)
                seen += [i for row in mb for i in row]
    return shapes, 1 - real / computed, sorted(seen)


@pytest.mark.parametrize("batch,accum,world", [(8, 1, 1), (2, 4, 1), (4, 1, 2)])
def test_bucketed_plan_bounds_shapes_with_little_padding(batch, accum, world):
    lengths = np.random.default_rng(7).integers(30, 257, 700)  # 30..256 tokens, like short reviews
    plan = BatchPlan(batch, accum, world, packing=True, max_tokens=batch * 256, seed=0, pad_to_multiple_of=64)
    random_plan = BatchPlan(batch, accum, world, packing=True, max_tokens=batch * 256, seed=0,
                            group_by_length=False, pad_to_multiple_of=1)
    for epoch in (0, 1):
        shapes, padding, seen = _shapes_and_padding(lengths, plan, epoch)
        assert seen == list(range(700))  # every example once per epoch
        assert all(rows == 1 and (width % 64 == 0 or width == 1) for rows, width in shapes)  # 1: a dummy
        assert len(shapes) <= 8, shapes
        assert padding <= 0.05, padding
        # Without buckets the same epoch has several times as many shapes.
        assert len(_shapes_and_padding(lengths, random_plan, epoch)[0]) > 2 * len(shapes)


def test_collation_pads_to_the_bucket_and_the_padding_changes_nothing(tiny_tokenizer, tiny_llama):
    from instructkit.train.loss import batch_loss

    table, _, _ = _table([7, 12, 3, 9], n_labels=2)
    pad = tiny_tokenizer.pad_token_id
    exact = collate_packed(table, [[0, 1, 2, 3]], pad)
    padded = collate_packed(table, [[0, 1, 2, 3]], pad, pad_to_multiple_of=16)
    assert exact.inputs["input_ids"].shape == (1, 31)
    assert padded.inputs["input_ids"].shape == (1, 32)
    assert padded.inputs["position_ids"][0, 31].item() == 0  # the padding is a segment of its own
    assert padded.n_tokens == exact.n_tokens == 31 and padded.n_targets == exact.n_targets == 8
    with torch.no_grad():
        a = batch_loss(tiny_llama, exact, seq2seq=False, logits_at_labels=True)
        b = batch_loss(tiny_llama, padded, seq2seq=False, logits_at_labels=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    rows = collate_padded(table, [0, 1], pad, pad_to_multiple_of=16)
    assert rows.inputs["input_ids"].shape == (2, 16)
    assert rows.inputs["attention_mask"].sum().item() == 19


def test_step_shape_is_one_pair_or_a_list():
    from instructkit.data.buckets import record_shape, step_shape

    lengths = np.array([100, 30, 50])
    assert step_shape([[[0, 1]]], lengths, 64) == [1, 192]
    assert step_shape([[[0]], [[1], [2]]], lengths, 1) == [[1, 100], [2, 50]]
    assert step_shape([[]], lengths, 64) == [1, 1]  # a placeholder: the one-token dummy
    assert record_shape([(1, 832)]) == [1, 832]


def test_amazon_rating_epoch_plans_few_shapes_on_cuda(shared_data, tmp_path):
    """examples/amazon_rating_baseline.yaml, one epoch planned as on CUDA (train.pad_to_multiple_of auto
    -> 64): at most 8 distinct micro-batch shapes, at most 5% padding."""
    from transformers import AutoTokenizer

    from instructkit.config_load import load_config
    from instructkit.data.build import load_examples, prepare
    from instructkit.data.tokenize import TokenizeSettings, tokenize_examples
    from instructkit.models.resolve import ResolvedModel, resolve_model
    from instructkit.train.compile import pad_multiple

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "examples" / "amazon_rating_baseline.yaml", [f"output_dir={tmp_path}"])
    resolved = resolve_model(config.model, convert=False)
    if not isinstance(resolved, ResolvedModel) or not resolved.folder.is_dir():
        pytest.skip("the SmolLM2 tokenizer is not in the model cache (instructkit run converts it once)")
    prepare(config)
    tokenizer = AutoTokenizer.from_pretrained(resolved.folder)
    dataset, _ = tokenize_examples(load_examples(config.run_dir, "train"), tokenizer,
                                   TokenizeSettings.from_model_config(config.model, False))
    lengths = TokenTable.from_dataset(dataset).lengths
    cfg = config.train
    plan = BatchPlan(cfg.batch_size, cfg.grad_accum, 1, packing=cfg.packing,
                     max_tokens=cfg.batch_size * config.model.max_length, seed=cfg.seed,
                     pad_to_multiple_of=pad_multiple(cfg.pad_to_multiple_of, "cuda"))
    assert plan.pad_to_multiple_of == 64
    for epoch in (0, 1):
        shapes, padding, seen = _shapes_and_padding(lengths, plan, epoch)
        assert seen == list(range(len(lengths)))
        assert len(shapes) <= 8, shapes
        assert padding <= 0.05, padding
