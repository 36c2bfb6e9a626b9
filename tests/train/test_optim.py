"""train.optimizer (adamw, adamw_8bit, adafactor) and train.optimizer_in_backward on tiny models: three steps
against a reference built straight from the libraries, in-backward against the ordinary step, exact resume."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import make_examples, tokenized, train_config, trainable_tensors
from conftest import build_tiny_llama
from transformers import LlamaForCausalLM

from instructkit import pipeline
from instructkit.config_load import validate_config
from instructkit.errors import ConfigError
from instructkit.train import optim as optim_module
from instructkit.train.checkpoint import latest_good_checkpoint
from instructkit.train.in_backward import InBackwardOptimizer
from instructkit.train.loop import TrainData, TrainOptions, train
from instructkit.train.optim import make_optimizer, optimizer_factory, param_groups
from instructkit.train.optim_state import join_state, split_state
from instructkit.train.sharding import check_processes

OPTIMIZERS = ["adamw", "adamw_8bit", "adafactor"]
bnb = pytest.importorskip("bitsandbytes", reason="adamw_8bit needs bitsandbytes (pip install '.[test]')")


def _run(model, tokenizer, dataset, settings, run_dir, cfg, **kwargs):
    data = TrainData(dataset, kwargs.pop("val_data", None))
    return train(model, tokenizer, data, cfg, run_dir,
                 TrainOptions(settings=settings, is_seq2seq=False, show_progress=False, **kwargs))


def _losses(result):
    return [r["loss"] for r in result.history if r["event"] == "train"]


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _reference_optimizer(name: str, groups):
    """The update rule straight from its library, not through instructkit."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=1e-3, foreach=False, fused=False)
    if name == "adamw_8bit":
        return torch.optim.AdamW(groups, lr=1e-3, foreach=False, fused=False)  # what 8 bits approximate
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)


# AdamW8bit vs fp32 AdamW: bitsandbytes' own optimizer tests accept atol 3e-3 / rtol 1e-3 between the 8-bit
# blockwise and the 32-bit update of the same parameters (tests/test_optim.py there); after 3 steps of lr 1e-3
# the difference here stays far below that.
TOLERANCE = {"adamw": 1e-5, "adamw_8bit": 3e-3, "adafactor": 1e-5}  # 1e-5: 1% of one lr-sized step
LOSS_TOLERANCE = {"adamw": 1e-5, "adamw_8bit": 1e-3, "adafactor": 1e-5}  # 8 bits: step 3 measured 1.7e-4 off


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_three_steps_match_the_reference_optimizer(tiny_tokenizer, tmp_path, name):
    """Loss of each step = transformers' mean token loss; weights = the library optimizer's after 3 steps."""
    dataset, settings = tokenized(make_examples(8), tiny_tokenizer)
    ids, labels, pad = dataset["input_ids"], dataset["labels"], tiny_tokenizer.pad_token_id
    width = max(map(len, ids))
    batch = {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
             "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
             "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels])}
    reference = build_tiny_llama(tiny_tokenizer)
    reference.train()
    ref_opt = _reference_optimizer(name, param_groups(reference, 0.1))
    ref_losses = []
    for _ in range(3):
        loss = reference(**batch).loss
        loss.backward()
        ref_losses.append(loss.item())
        ref_opt.step()
        ref_opt.zero_grad()

    model = build_tiny_llama(tiny_tokenizer)
    start = trainable_tensors(model)
    result = _run(model, tiny_tokenizer, dataset, settings, tmp_path,
                  train_config(optimizer=name, batch_size=8, max_steps=3, weight_decay=0.1, max_grad_norm=None))
    assert _losses(result)[0] == pytest.approx(ref_losses[0], abs=1e-5)  # before any update
    assert _losses(result) == pytest.approx(ref_losses, abs=LOSS_TOLERANCE[name])
    weights = trainable_tensors(model)
    assert _worst(weights, start) > 1e-3  # it did train
    assert _worst(weights, trainable_tensors(reference)) <= TOLERANCE[name]


@pytest.mark.parametrize("clip", [None, 0.05], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("layout", [{"batch_size": 8, "grad_accum": 1, "packing": True},
                                    {"batch_size": 4, "grad_accum": 2, "packing": False},
                                    {"batch_size": 8, "gradient_checkpointing": True},
                                    {"batch_size": 8, "loss_chunk_tokens": 16}],
                         ids=["packed", "accum2", "checkpointing", "chunked"])
def test_in_backward_gives_the_ordinary_step_bitwise(tiny_tokenizer, tmp_path, name, layout, clip):
    """Each parameter updated in backward as soon as its gradient is complete = the ordinary step, bit for bit,
    including grad_accum 2 (the update waits for the last micro-batch) and gradient checkpointing (a layer is
    recomputed before any of its parameters is updated); with max_grad_norm, the two-pass clipping (a first
    pass measures the global norm) = the ordinary step clipped by torch.nn.utils.clip_grad_norm_."""
    dataset, settings = tokenized(make_examples(16), tiny_tokenizer)
    out = {}
    for in_backward in (False, True):
        model = build_tiny_llama(tiny_tokenizer)
        cfg = train_config(optimizer=name, optimizer_in_backward=in_backward, max_grad_norm=clip, max_steps=3,
                           weight_decay=0.1, schedule="linear", warmup_ratio=0.3, **layout)
        result = _run(model, tiny_tokenizer, dataset, settings, tmp_path / str(in_backward), cfg)
        out[in_backward] = (result, trainable_tensors(model))
    (ordinary, w_ordinary), (in_bwd, w_in_bwd) = out[False], out[True]
    assert _losses(in_bwd) == _losses(ordinary)
    assert all(torch.equal(w_in_bwd[k], w_ordinary[k]) for k in w_ordinary)
    norms = [[r["grad_norm"] for r in res.history if r["event"] == "train"] for res in (ordinary, in_bwd)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)  # the hooks' norm reading is the global norm
    if clip is not None:
        assert norms[1] == norms[0]  # clipped: the measured total is clip_grad_norm_'s, to the bit
        assert min(norms[0]) > 2 * clip  # the clipping did act on every step


class _ConditionalLlama(LlamaForCausalLM):
    """A Llama with a bias added to the embeddings of micro-batches of 4+ rows only: a parameter that gets a
    gradient in some micro-batches of a window and not in others (as an MoE expert does)."""

    def __init__(self, config):
        super().__init__(config)
        self.wide_bias = torch.nn.Parameter(torch.zeros(config.hidden_size))
        self.rows_seen: list[int] = []

    def forward(self, input_ids=None, **kwargs):
        self.rows_seen.append(input_ids.shape[0])
        embeds = self.get_input_embeddings()(input_ids)
        if input_ids.shape[0] >= 4:
            embeds = embeds + self.wide_bias
        return super().forward(inputs_embeds=embeds, **kwargs)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["unclipped", "clipped"])
def test_in_backward_applies_a_parameter_unused_in_the_last_micro_batch(tiny_tokenizer, tmp_path, clip):
    """A gradient from an earlier micro-batch only fires no hook in the last backward: leaving armed() /
    measuring() applies and measures it, so the update (and, clipped, every other parameter's through the
    global norm) is the ordinary step's bit for bit."""
    dataset, settings = tokenized(make_examples(10), tiny_tokenizer)
    out = {}
    for in_backward in (False, True):
        base = build_tiny_llama(tiny_tokenizer)
        model = _ConditionalLlama(base.config)
        model.load_state_dict(base.state_dict(), strict=False)
        cfg = train_config(optimizer_in_backward=in_backward, max_grad_norm=clip, max_steps=1, batch_size=4,
                           grad_accum=3, packing=False)
        result = _run(model, tiny_tokenizer, dataset, settings, tmp_path / str(in_backward), cfg)
        out[in_backward] = (result, trainable_tensors(model), model)
    (ordinary, w_ordinary, model), (in_bwd, w_in_bwd, _) = out[False], out[True]
    window = model.rows_seen[-3:]
    assert window[0] >= 4 > window[-1]  # the bias is used in the window, but not in its last micro-batch
    assert w_ordinary["wide_bias"].abs().max() > 0  # and the ordinary step moved it
    assert _losses(in_bwd) == _losses(ordinary)
    assert all(torch.equal(w_in_bwd[k], w_ordinary[k]) for k in w_ordinary)
    assert all(p.grad is None for p in out[True][2].parameters())


def test_in_backward_mixture_of_experts_equals_the_ordinary_step(tiny_tokenizer, tmp_path):
    """The real case of the test above: Switch Transformers' experts run only for the tokens routed to them,
    so with 1-row micro-batches an expert hit early in a window is missing from its last backward."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    dataset, settings = tokenized(make_examples(8), tiny_tokenizer, seq2seq=True)
    out = {}
    for in_backward in (False, True):
        torch.manual_seed(0)
        config = SwitchTransformersConfig(
            vocab_size=len(tiny_tokenizer), d_model=32, d_kv=8, d_ff=64, expert_capacity=64, num_layers=2,
            num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=4,
            num_experts=16, dropout_rate=0.0, pad_token_id=tiny_tokenizer.pad_token_id,
            eos_token_id=tiny_tokenizer.eos_token_id, decoder_start_token_id=tiny_tokenizer.pad_token_id)
        model = SwitchTransformersForConditionalGeneration(config)
        cfg = train_config(optimizer_in_backward=in_backward, max_grad_norm=1.0, max_steps=2, batch_size=1,
                           grad_accum=4, lr=1e-2)
        data = TrainData(dataset, None)
        result = train(model, tiny_tokenizer, data, cfg, tmp_path / str(in_backward),
                       TrainOptions(settings=settings, is_seq2seq=True, show_progress=False))
        out[in_backward] = (_losses(result), trainable_tensors(model))
    assert out[True][0] == out[False][0]
    assert all(torch.equal(out[True][1][k], out[False][1][k]) for k in out[False][1])


def test_in_backward_clip_coef_groups_norms_as_clip_grad_norm_does():
    """Mixed dtypes (a bf16 model with fp32 modules kept, as transformers does for T5's `wo`): the total
    norm is torch.nn.utils.get_total_norm's to the bit, which stacks the per-tensor norms by dtype group."""
    torch.manual_seed(0)
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
    params = [torch.nn.Parameter(torch.zeros(7 + i, dtype=dtype)) for i, dtype in enumerate(dtypes)]
    optimizer = InBackwardOptimizer([{"params": params}], lambda groups: torch.optim.SGD(groups, lr=0.1))
    for _ in range(200):
        grads = [torch.randn(p.shape) * 10 ** torch.empty(()).uniform_(-3, 3).item() for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.dtype)
        expected = torch.nn.utils.get_total_norm([p.grad for p in params])
        with optimizer.measuring():  # no backward ran: leaving the block measures every gradient held
            pass
        assert all(p.grad is None for p in params)
        total, coef = optimizer.clip_coef(params, 1.0)
        assert torch.equal(total, expected)
        assert torch.equal(coef, torch.clamp(1.0 / (expected + 1e-6), max=1.0))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)  # measuring updates nothing


def test_in_backward_clipping_replays_dropout(tiny_tokenizer, tmp_path):
    """The measuring pass runs on a forked RNG, so the updating pass draws the same dropout masks as the
    ordinary step: weights equal bit for bit with attention dropout 0.3."""
    dataset, settings = tokenized(make_examples(8), tiny_tokenizer)
    weights, losses = [], []
    for in_backward, dropout in ((False, 0.0), (False, 0.3), (True, 0.3)):
        model = build_tiny_llama(tiny_tokenizer)
        layers = [m for m in model.modules() if hasattr(m, "attention_dropout")]
        assert layers
        for layer in layers:
            layer.attention_dropout = dropout
        cfg = train_config(optimizer_in_backward=in_backward, max_grad_norm=0.05, max_steps=2, batch_size=8)
        losses.append(_losses(_run(model, tiny_tokenizer, dataset, settings, tmp_path / f"{in_backward}{dropout}",
                                   cfg)))
        weights.append(trainable_tensors(model))
    assert losses[0] != losses[1]  # the dropout draws count
    assert losses[1] == losses[2]
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("in_backward", [False, True], ids=["ordinary", "in_backward"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bitwise_exact(tiny_tokenizer, tmp_path, name, in_backward):
    """Stopped after step 3's checkpoint and resumed: the same weights, bit for bit, as an uninterrupted run."""
    dataset, settings = tokenized(make_examples(24), tiny_tokenizer)
    val, _ = tokenized(make_examples(4, seed=9), tiny_tokenizer)
    cfg = train_config(optimizer=name, optimizer_in_backward=in_backward, max_grad_norm=None, batch_size=4,
                       max_steps=6, save_every=1, eval_every=4, schedule="linear", warmup_ratio=0.2)
    calls = []

    def validate(model):
        calls.append(1)
        if stop and len(calls) == 1:
            raise _Interrupt()  # step 4's validation: checkpoint 3 is the newest
        return {"score": 0.0}

    stop = False
    full = build_tiny_llama(tiny_tokenizer)
    reference = _run(full, tiny_tokenizer, dataset, settings, tmp_path / "full", cfg, val_data=val,
                     validate=validate, restore_best=False)
    stop, calls[:] = True, []
    with pytest.raises(_Interrupt):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg,
             val_data=val, validate=validate, restore_best=False)
    assert latest_good_checkpoint(tmp_path / "cut").name == "step-000003"
    stop = False
    resumed_model = build_tiny_llama(tiny_tokenizer, seed=5)  # everything must come from the checkpoint
    resumed = _run(resumed_model, tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg, val_data=val,
                   validate=validate, resume=True, restore_best=False)
    assert resumed.steps == 6
    final, expected = trainable_tensors(resumed_model), trainable_tensors(full)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert _losses(resumed) == _losses(reference)


def _three_steps_on_the_same_random_gradients(models, ours, references):
    """models[0] stepped by `ours`, models[1] by the `references`, each step on the same random gradients."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
            q.grad = p.grad.clone()
        ours.step()
        for reference in references:
            reference.step()


def _library_references(groups, embedding=None, embedding_bits=8):
    """What LowBitAdamW must equal, bit for bit: bitsandbytes' AdamW8bit on the tensors it keeps in 8 bits
    (>= 4,096 values), torch's fused AdamW on those whose moments are fp32 (smaller ones, and `embedding`
    when `embedding_bits` is 32)."""
    def pick(keep):
        picked = [{**g, "params": [p for p in g["params"] if keep(p)]} for g in groups]
        return [g for g in picked if g["params"]]

    eight = pick(lambda p: p.numel() >= 4096 and (p is not embedding or embedding_bits == 8))
    fp32 = pick(lambda p: p.numel() < 4096 or (p is embedding and embedding_bits == 32))
    return [bnb.optim.AdamW8bit(eight, lr=1e-3), torch.optim.AdamW(fp32, lr=1e-3, fused=True)]


def test_sliced_8bit_update_equals_bitsandbytes_whole_tensor_update(tiny_tokenizer, monkeypatch):
    """LowBitAdamW's slice-by-slice CPU update (bounded memory) = bitsandbytes' AdamW8bit, bit for bit, also
    on tensors whose size is not a multiple of the 256-value block (the 511 x 64 embedding rows here); the
    small tensors bitsandbytes keeps in fp32 = torch's fused AdamW, states included."""
    monkeypatch.setattr(optim_module, "SLICE_VALUES", 1024)
    models = [build_tiny_llama(tiny_tokenizer) for _ in range(2)]
    groups = [param_groups(m, 0.1) for m in models]
    ours = optimizer_factory("adamw_8bit", 1e-3)(groups[0])
    references = _library_references(groups[1])
    assert any(p.numel() > 1024 and p.numel() % 256 for p in models[0].parameters())
    _three_steps_on_the_same_random_gradients(models, ours, references)
    eight, fp32 = references
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
        if q in eight.state:
            assert all(torch.equal(a, b) for a, b in zip(ours.state[p].values(), eight.state[q].values())
                       if isinstance(a, torch.Tensor))
        else:
            assert torch.equal(ours.state[p]["state1"], fp32.state[q]["exp_avg"])
            assert torch.equal(ours.state[p]["state2"], fp32.state[q]["exp_avg_sq"])
            assert ours.state[p]["step"] == fp32.state[q]["step"].item() == 3


@pytest.mark.parametrize("bits", [32, 8])
def test_embedding_moments_keep_the_bits_asked_for(tiny_tokenizer, monkeypatch, bits):
    """train.embedding_optim_bits: the (tied) embedding's moments are fp32 by default, as transformers'
    Trainer registers for nn.Embedding under bitsandbytes; its update = torch's fused AdamW on that tensor
    bit for bit, the other matrices' = AdamW8bit's. With 8, the embedding is 8-bit too."""
    monkeypatch.setattr(optim_module, "SLICE_VALUES", 1024)
    models = [build_tiny_llama(tiny_tokenizer) for _ in range(2)]
    ours = make_optimizer(models[0], train_config(optimizer="adamw_8bit", lr=1e-3, weight_decay=0.1,
                                                  embedding_optim_bits=bits))
    embedding = models[0].get_input_embeddings().weight
    assert embedding is models[0].get_output_embeddings().weight and embedding.numel() > 1024
    references = _library_references(param_groups(models[1], 0.1), models[1].get_input_embeddings().weight, bits)
    _three_steps_on_the_same_random_gradients(models, ours, references)
    assert ours.state[embedding]["state1"].dtype == (torch.float32 if bits == 32 else torch.uint8)
    big = [p for p in models[0].parameters() if p is not embedding and p.numel() >= 4096]
    assert big and all(ours.state[p]["state1"].dtype == torch.uint8 for p in big)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_in_backward_state_dict_is_the_ordinary_optimizers(tiny_tokenizer, name):
    """The in-backward optimizer's state_dict has the ordinary optimizer's layout and values, and survives the
    checkpoint's safetensors/JSON split (shared bitsandbytes quantization maps included) unchanged."""
    models = [build_tiny_llama(tiny_tokenizer) for _ in range(2)]
    ordinary = make_optimizer(models[0], train_config(optimizer=name))
    in_bwd = make_optimizer(models[1], train_config(optimizer=name, optimizer_in_backward=True, max_grad_norm=None))
    assert isinstance(in_bwd, InBackwardOptimizer)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for model, opt in ((models[0], ordinary), (models[1], in_bwd)):
        for _ in range(2):
            if opt is in_bwd:
                with opt.armed():
                    model(input_ids=ids, labels=ids).loss.backward()
            else:
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
    a, b = ordinary.state_dict(), in_bwd.state_dict()
    assert a["param_groups"] == b["param_groups"]
    tensors, scalars = split_state(b["state"])
    restored = join_state(tensors, scalars)
    for state in (b["state"], restored):
        assert a["state"].keys() == state.keys()
        for index, entries in a["state"].items():
            _assert_same_nested(entries, state[index])
    fresh = make_optimizer(build_tiny_llama(tiny_tokenizer),
                           train_config(optimizer=name, optimizer_in_backward=True, max_grad_norm=None))
    fresh.load_state_dict({"state": restored, "param_groups": b["param_groups"]})
    for index, entries in fresh.state_dict()["state"].items():
        _assert_same_nested(a["state"][index], entries)


def _assert_same_nested(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_nested(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_in_backward_refuses_fp16_naming_both_keys_and_accepts_clipping():
    assert validate_config({"train": {"optimizer_in_backward": True}}).train.max_grad_norm == 1.0
    with pytest.raises(ConfigError, match=r"(?s)optimizer_in_backward.*precision=fp16"):
        validate_config({"train": {"optimizer_in_backward": True, "max_grad_norm": None, "precision": "fp16"}})
    assert validate_config({"train": {"optimizer_in_backward": True, "max_grad_norm": None,
                                      "grad_accum": 4}}).train.grad_accum == 4


def test_in_backward_under_several_processes_is_refused_before_any_step(tmp_path, monkeypatch):
    """Launched with WORLD_SIZE 2, `instructkit run` refuses the step in backward (exit 2, naming the key and
    the process count) before it prepares, evaluates or creates anything."""
    on = validate_config({"train": {"optimizer_in_backward": True}}).train
    check_processes(on, 1)
    check_processes(validate_config({}).train, 2)
    with pytest.raises(ConfigError, match=r"optimizer_in_backward=true.*launched with 2"):
        check_processes(on, 2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="optimizer_in_backward") as error:
        pipeline.run(None, ["train.optimizer_in_backward=true"])
    assert error.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_in_backward_divergence_says_whether_the_step_was_applied(tiny_tokenizer, tmp_path):
    """lr 1e30: step 2's loss is finite but its gradients are not. In backward, each update is applied before
    the global norm is known, so the error says the step was applied; no checkpoint follows it and the last
    one holds finite weights. (A NaN loss is caught before the backward pass: nothing applied.)"""
    import re

    from instructkit.errors import TrainingError
    from instructkit.train.checkpoint import latest_good_checkpoint, list_checkpoints, load_checkpoint

    dataset, settings = tokenized(make_examples(16), tiny_tokenizer)
    with pytest.raises(TrainingError, match=r"diverged at step \d+: .*It was already applied") as info:
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path,
             train_config(lr=1e30, max_grad_norm=None, optimizer_in_backward=True, max_steps=4, save_every=1))
    bad = int(re.search(r"step (\d+)", str(info.value)).group(1))
    assert list_checkpoints(tmp_path)[-1].name == latest_good_checkpoint(tmp_path).name == f"step-{bad - 1:06d}"
    fresh = build_tiny_llama(tiny_tokenizer)
    load_checkpoint(latest_good_checkpoint(tmp_path), fresh)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_in_backward_clipping_stops_a_divergent_step_before_applying_it(tiny_tokenizer, tmp_path):
    """With max_grad_norm the measuring pass sees the non-finite norm (or the loss check a non-finite loss)
    before any update of that step: the error says it was not applied, and the weights in memory are the
    last checkpoint's."""
    from instructkit.errors import TrainingError
    from instructkit.train.checkpoint import latest_good_checkpoint, load_checkpoint

    dataset, settings = tokenized(make_examples(16), tiny_tokenizer)
    model = build_tiny_llama(tiny_tokenizer)
    with pytest.raises(TrainingError, match=r"diverged at step \d+: .*The step was not applied"):
        _run(model, tiny_tokenizer, dataset, settings, tmp_path,
             train_config(lr=1e30, max_grad_norm=1.0, optimizer_in_backward=True, max_steps=4, save_every=1))
    saved = build_tiny_llama(tiny_tokenizer)
    load_checkpoint(latest_good_checkpoint(tmp_path), saved)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved.parameters()))


def test_in_backward_releases_memory_by_gradient_bytes(tiny_tokenizer, monkeypatch):
    """train.release_free_memory in-backward: a release before the largest parameter's update and one each
    time RELEASE_EVERY_BYTES of gradients have been applied since the last; none when the setting is off.
    The measuring pass of clipping frees gradients too, so it releases every RELEASE_EVERY_BYTES as well."""
    from instructkit.train import in_backward

    def releases(enabled: bool, every: int, measuring: bool = False) -> tuple[int, int]:
        calls: list[int] = []
        monkeypatch.setattr(in_backward, "release_free_memory", lambda: calls.append(1))
        monkeypatch.setattr(in_backward, "RELEASE_EVERY_BYTES", every)
        model = build_tiny_llama(tiny_tokenizer)
        opt = make_optimizer(model, train_config(optimizer_in_backward=True, max_grad_norm=None,
                                                 release_free_memory=enabled))
        with opt.measuring() if measuring else opt.armed():
            model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss.backward()
        assert all(p.grad is None for p in model.parameters())
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return len(calls), grad_bytes

    calls, grad_bytes = releases(True, 2**40)
    assert calls == 1  # only before the largest parameter (the threshold is never reached)
    every = grad_bytes // 4
    calls, _ = releases(True, every)
    # the largest parameter's release resets the count, so 3 to 5 periodic releases plus that one
    assert 4 <= calls <= 6
    assert releases(False, every)[0] == 0
    assert 3 <= releases(True, every, measuring=True)[0] <= 4  # no update, so no release before one
