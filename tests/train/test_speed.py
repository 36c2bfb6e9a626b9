"""Throughput settings: bucket multiples per device, the attention choice, `shape` in train records,
train.compile. The CUDA-only parts are tested on their decision logic (this machine has no GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _train_helpers import make_examples, tokenized, train_config
from conftest import build_tiny_llama

from instructkit.config import ModelConfig, TrainConfig
from instructkit.data.batching import TokenTable
from instructkit.data.buckets import micro_batch_shape, record_shape
from instructkit.data.sampler import BatchPlan, attention_tokens_of, plan_epoch
from instructkit.errors import ModelError
from instructkit.models.load import choose_attention, load_model, use_attention
from instructkit.train import compile as compile_module
from instructkit.train.compile import pad_multiple
from instructkit.train.loop import TrainData, TrainOptions, train

# --------------------------------------------------------------------------------------------------
# Bucket multiple per device
# --------------------------------------------------------------------------------------------------


def test_pad_multiple_defaults_to_64_on_cuda_and_exact_widths_elsewhere():
    assert TrainConfig().pad_to_multiple_of is None
    assert pad_multiple(None, "cuda") == 64
    assert pad_multiple(None, "cpu") == 1
    assert pad_multiple(None, "mps") == 1
    assert pad_multiple(16, "cpu") == 16 and pad_multiple(8, "cuda") == 8
    with pytest.raises(ValueError, match=">= 1"):
        pad_multiple(0, "cuda")
    with pytest.raises(ValueError):
        TrainConfig(pad_to_multiple_of=0)


# --------------------------------------------------------------------------------------------------
# Attention: model.attn_implementation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cuda,flash,dtype,model_type,expected", [
    (False, False, "fp32", "llama", ("sdpa_varlen", False)),  # CPU: each packed example on its own
    (False, False, "fp32", "gemma3_text", ("sdpa_varlen", False)),
    (False, False, "fp32", "t5", (None, False)),  # untested architectures: the model's default (sdpa)
    (False, True, "bf16", "llama", ("sdpa_varlen", False)),  # flash_attn is a CUDA library
    (True, False, "fp32", "llama", (None, True)),  # CUDA without flash_attn: sdpa, cuDNN attention off
    (True, False, "bf16", "llama", (None, True)),
    (True, True, "fp32", "llama", (None, True)),  # flash_attn refuses fp32 (evaluation runs without autocast)
    (True, True, "bf16", "llama", ("flash_attention_2", False)),  # varlen kernels: no per-shape plans
    (True, True, "fp16", "t5", ("flash_attention_2", False)),
])
def test_auto_attention_choice(cuda, flash, dtype, model_type, expected):
    implementation, cudnn_off, why = choose_attention("auto", cuda=cuda, flash_attn=flash, dtype=dtype,
                                                      model_type=model_type)
    assert (implementation, cudnn_off) == expected
    assert why.startswith("auto on CUDA" if cuda else "auto on CPU")


@pytest.mark.parametrize("requested", ["sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flex_attention"])
def test_an_explicit_attention_is_used_as_it_is(requested):
    for cuda in (False, True):
        assert choose_attention(requested, cuda=cuda, flash_attn=False, dtype="fp32")[:2] == (requested, False)


def test_auto_on_this_cpu_loads_sdpa_varlen_and_keeps_cudnn_attention(tiny_model_dir, tiny_t5_dir, caplog):
    assert not torch.cuda.is_available()
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with caplog.at_level("INFO", logger="instructkit.models.load"):
        assert use_attention("auto", "fp32") is None  # no model type: the model's default
        loaded = load_model(ModelConfig(name=str(tiny_model_dir)))
        t5 = load_model(ModelConfig(name=str(tiny_t5_dir)))
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    assert loaded.model.config._attn_implementation == "sdpa_varlen"
    assert t5.model.config._attn_implementation != "sdpa_varlen"
    assert "attention: sdpa_varlen (auto on CPU" in caplog.text


def test_the_attention_asked_for_reaches_the_model(tiny_model_dir):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), attn_implementation="eager"))
    assert loaded.model.config._attn_implementation == "eager"


def test_flash_attention_without_flash_attn_is_a_clear_model_error(tiny_model_dir):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(ModelError, match="cannot load the model"):
        load_model(ModelConfig(name=str(tiny_model_dir), attn_implementation="flash_attention_2"))


# --------------------------------------------------------------------------------------------------
# `shape` in the train records
# --------------------------------------------------------------------------------------------------


def _train(tokenizer, tmp_path, model=None, n=40, **overrides):
    dataset, settings = tokenized(make_examples(n, seed=3), tokenizer)
    cfg = train_config(**overrides)
    model = model or build_tiny_llama(tokenizer)
    result = train(model, tokenizer, TrainData(dataset), cfg, tmp_path / "run",
                   TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))
    return result, dataset, cfg, model


@pytest.mark.parametrize("multiple", [1, 16])
def test_train_records_carry_the_shape_of_the_collated_batch(tiny_tokenizer, tmp_path, multiple):
    result, dataset, cfg, model = _train(tiny_tokenizer, tmp_path, pad_to_multiple_of=multiple, max_steps=6)
    records = [r for r in result.history if r["event"] == "train"]
    lengths = TokenTable.from_dataset(dataset).lengths
    plan = BatchPlan(cfg.batch_size, cfg.grad_accum, 1, packing=True, max_tokens=cfg.batch_size * 64,
                     attention_tokens=attention_tokens_of(model.config), group_by_length=cfg.group_by_length,
                     seed=cfg.seed, pad_to_multiple_of=multiple)
    expected = [record_shape([micro_batch_shape(mb, lengths, multiple) for mb in step[0]])
                for step in plan_epoch(lengths, plan, 0)[:6]]
    assert [r["shape"] for r in records] == expected
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["shape"] for r in on_disk if r["event"] == "train"] == expected
    if multiple > 1:  # bucketed: one row per micro-batch, widths on the multiple
        assert all(shape[0] == 1 and shape[1] % multiple == 0 for shape in expected)
        # each step's width is its examples' tokens rounded up: nothing else is padding
        real = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + records, records)]
        assert all(0 <= shape[1] - t < multiple for shape, t in zip(expected, real))


# --------------------------------------------------------------------------------------------------
# train.compile
# --------------------------------------------------------------------------------------------------


def test_compile_trains_like_eager_with_a_bounded_number_of_graphs(tiny_tokenizer, tmp_path, monkeypatch):
    """train.compile on CPU: the same losses as eager, and the graphs stop growing once the width is
    symbolic (dynamic shapes), although every step has a new width."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    monkeypatch.setattr(compile_module, "BACKEND", counting)
    torch._dynamo.reset()
    steps = 6  # exact widths (multiple 1): a new [1, width] almost every step
    eager, *_ = _train(tiny_tokenizer, tmp_path / "eager", max_steps=steps)
    compiled, *_ = _train(tiny_tokenizer, tmp_path / "compiled", max_steps=steps, compile=True)
    widths = {r["shape"][1] for r in compiled.history if r["event"] == "train"}
    assert len(widths) >= 4, widths
    eager_losses = [r["loss"] for r in eager.history if r["event"] == "train"]
    compiled_losses = [r["loss"] for r in compiled.history if r["event"] == "train"]
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)
    # A forward is a few graphs (transformers breaks the graph at the label-position indexing); static
    # shapes would compile them again for every width, dynamic shapes once (plus one size-1 specialisation).
    assert 0 < len(graphs) <= 6 < 2 * len(widths), (graphs, widths)
    torch._dynamo.reset()
