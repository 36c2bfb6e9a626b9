"""train.packing on architectures whose attention ignores the position_ids restarts of a packed row.

A packed row has no attention mask: the examples are kept apart only when the model turns the restarts into
per-example attention (transformers' packed-sequence masks, FlashAttention's varlen, sdpa_varlen). OPT and
BLOOM in transformers 5 do not: one causal attention over the whole row, each example reading the ones before
it (the leak of modelscope/ms-swift#4439). Training then must fall back to padded rows.
"""

from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch
from _train_helpers import make_examples, tokenized, train_config

from instructkit.models.attention import keeps_packed_examples_apart, register
from instructkit.train.loop import TrainData, TrainOptions, train


def _tiny(kind: str, tokenizer, attn: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2},
             "opt": {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "word_embed_proj_dim": 32},
             "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 4},
             "gpt_bigcode": {"n_embd": 32, "n_layer": 2, "n_head": 4},
             "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4},
             "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2}}[kind]
    config = AutoConfig.for_model(kind, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **sizes)
    if attn == "sdpa_varlen":
        register()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


@pytest.mark.parametrize("kind, attn, apart", [("llama", "sdpa", True), ("llama", "eager", True),
                                               ("llama", "sdpa_varlen", True), ("opt", "sdpa", False),
                                               ("opt", "sdpa_varlen", True), ("bloom", "eager", False),
                                               ("gpt_bigcode", "sdpa", True), ("gpt_bigcode", "sdpa_varlen", False)])
@pytest.mark.parametrize("one_row", [False, True])
def test_the_probe_tells_which_attention_keeps_packed_examples_apart(tiny_tokenizer, kind, attn, apart, one_row):
    model = _tiny(kind, tiny_tokenizer, attn)
    model.train()
    assert keeps_packed_examples_apart(model, one_row) is apart
    assert model.training  # put back as it was


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_the_probe_keeps_packing_for_a_bf16_model(tiny_tokenizer, kind):
    # the example alone runs in other shapes than the packed rows, which in bf16 round differently
    assert keeps_packed_examples_apart(_tiny(kind, tiny_tokenizer).to(torch.bfloat16), one_row=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert keeps_packed_examples_apart(_tiny(kind, tiny_tokenizer), one_row=True)


class _PositionsThroughTheRow(torch.nn.Module):
    """A model that keeps each packed example's attention apart but numbers its positions through the row
    (as position embeddings taken from the row's length, not from position_ids, do). Over GPT-2's learned
    absolute position embeddings that changes what each example reads; over RoPE it would not (rotary
    attention sees relative positions only, and the probe rightly passes it)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids, use_cache=False):
        rows = []
        for ids, pos in zip(input_ids, position_ids):
            starts = [*torch.nonzero(pos == 0).flatten().tolist(), len(pos)]
            rows.append(torch.cat([self.inner(input_ids=ids[None, a:b], position_ids=torch.arange(a, b)[None],
                                              use_cache=use_cache).logits[0] for a, b in pairwise(starts)]))
        return SimpleNamespace(logits=torch.stack(rows))


@pytest.mark.parametrize("one_row", [False, True])
def test_the_probe_tells_a_model_that_numbers_positions_through_the_row(tiny_tokenizer, one_row, caplog):
    inner = _tiny("gpt2", tiny_tokenizer)
    assert keeps_packed_examples_apart(inner, one_row)
    assert keeps_packed_examples_apart(_PositionsThroughTheRow(_tiny("llama", tiny_tokenizer)), one_row)
    with caplog.at_level("WARNING", logger="instructkit"):
        assert not keeps_packed_examples_apart(_PositionsThroughTheRow(inner), one_row)
    assert "numbers positions through a packed row" in caplog.text


def test_packing_falls_back_to_padded_rows_when_attention_crosses_examples(tiny_tokenizer, tmp_path):
    """OPT, packing on: the steps are those of padded rows (packed, each example's loss would read its
    neighbours'); a Llama keeps packing (its packed steps differ from padded ones by rounding only)."""
    dataset, settings = tokenized(make_examples(12), tiny_tokenizer)
    for kind in ("opt", "llama"):
        losses = {}
        for packing in (True, False):
            result = train(_tiny(kind, tiny_tokenizer), tiny_tokenizer, TrainData(dataset),
                           train_config(max_steps=2, packing=packing), tmp_path / f"{kind}-{packing}",
                           TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))
            losses[packing] = [r["loss"] for r in result.history if r["event"] == "train"]
        assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=0), kind
