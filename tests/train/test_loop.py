"""train/loop.py on tiny models: loss normalisation, logits at labels, resume, lock, NaN, disk, early stopping."""

from __future__ import annotations

import json
import math
import re
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _train_helpers import make_examples, tokenized, train_config, trainable_tensors
from conftest import build_tiny_llama, build_tiny_t5
from safetensors.torch import load_file

from instructkit.config_load import load_config
from instructkit.data.sampler import example_weights
from instructkit.errors import ConfigError, TrainingError
from instructkit.metric_direction import lower_is_better
from instructkit.train.checkpoint import latest_good_checkpoint, list_checkpoints, load_checkpoint
from instructkit.data.batching import TokenTable, collate
from instructkit.train import loss as loss_module
from instructkit.train.loop import TrainData, TrainOptions, train
from instructkit.train.loss import batch_loss
from instructkit.train.optim import lr_factor, warmup_steps
from instructkit.train.tracking import improved


def _run(model, tokenizer, dataset, settings, run_dir, cfg, **kwargs):
    kwargs.setdefault("show_progress", False)
    data = TrainData(dataset, kwargs.pop("val_data", None), kwargs.pop("class_ids", None))
    return train(model, tokenizer, data, cfg, run_dir,
                 TrainOptions(settings=settings, is_seq2seq=kwargs.pop("is_seq2seq", False), **kwargs))


def _losses(result):
    return [r["loss"] for r in result.history if r["event"] == "train"]


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


# --------------------------------------------------------------------------------------------------
# Loss normalisation: the same step whatever the batching
# --------------------------------------------------------------------------------------------------


def test_first_step_loss_equals_transformers_mean_token_loss(tiny_tokenizer, tmp_path):
    """An independent reference: HF's own loss (mean CE over label tokens) on the padded batch."""
    dataset, settings = tokenized(make_examples(8), tiny_tokenizer)
    model = build_tiny_llama(tiny_tokenizer)
    ids = dataset["input_ids"]
    width = max(map(len, ids))
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        reference = model(
            input_ids=torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            attention_mask=torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            labels=torch.tensor([y + [-100] * (width - len(y)) for y in dataset["labels"]]),
        ).loss.item()
    for packing in (False, True):
        result = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / str(packing),
                      train_config(batch_size=8, max_steps=1, packing=packing))
        assert _losses(result)[0] == pytest.approx(reference, abs=1e-5)


def test_batch8_equals_batch2_accum4_equals_packed(tiny_tokenizer, tmp_path):
    """Two AdamW steps of 8 examples: per-step loss and final weights agree to 1e-5 in every layout."""
    dataset, settings = tokenized(make_examples(16), tiny_tokenizer)
    layouts = {
        "batch8": dict(batch_size=8, grad_accum=1, packing=False),
        "batch2_accum4": dict(batch_size=2, grad_accum=4, packing=False),
        "packed": dict(batch_size=8, grad_accum=1, packing=True),
        "packed_small_rows": dict(batch_size=4, grad_accum=2, packing=True, max_tokens_per_batch=40),
        "packed_full_logits": dict(batch_size=8, grad_accum=1, packing=True, logits_at_labels=False),
        "padded_full_logits": dict(batch_size=8, grad_accum=1, packing=False, logits_at_labels=False),
    }
    results = {}
    for name, layout in layouts.items():
        model = build_tiny_llama(tiny_tokenizer)
        result = _run(model, tiny_tokenizer, dataset, settings, tmp_path / name,
                      train_config(lr=1e-3, epochs=1, **layout))
        results[name] = (_losses(result), trainable_tensors(model))
    ref_losses, ref_weights = results["batch8"]
    assert len(ref_losses) == 2
    start = trainable_tensors(build_tiny_llama(tiny_tokenizer))
    assert max((ref_weights[k] - start[k]).abs().max().item() for k in start) > 1e-4  # it did train
    for name, (losses, weights) in results.items():
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5, err_msg=name)
        _assert_same_weights(weights, ref_weights, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_label_logits_paths_agree_with_full_logits(tiny_tokenizer, packed, monkeypatch):
    """Logits at labels via a [B, T] boolean mask (newer transformers) and via a 1-D column index (every
    transformers 5) give the full-logits loss, on multi-row batches where the two differ in shape."""
    dataset, _ = tokenized(make_examples(6), tiny_tokenizer)
    table = TokenTable.from_dataset(dataset)
    rows = [[0, 1], [2, 3], [4, 5]] if packed else [[i] for i in range(6)]
    batch = collate(table, rows, tiny_tokenizer.pad_token_id, seq2seq=False, packed=packed)
    assert batch.target_mask.shape[0] == (3 if packed else 6)
    model = build_tiny_llama(tiny_tokenizer)
    with torch.no_grad():
        full = batch_loss(model, batch, seq2seq=False, logits_at_labels=False).item()
        losses = {}
        for boolean in (True, False):
            monkeypatch.setattr(loss_module, "boolean_logits_to_keep", lambda b=boolean: b)
            losses[boolean] = batch_loss(model, batch, seq2seq=False, logits_at_labels=True).item()
    assert full > 0
    assert losses[True] == pytest.approx(full, abs=1e-5)
    assert losses[False] == pytest.approx(full, abs=1e-5)


def _t5_without_dropout(tokenizer):
    """The conftest T5 (seed 0) with dropout 0: random masks would differ between batch layouts."""
    from transformers import T5ForConditionalGeneration

    config = build_tiny_t5(tokenizer).config
    config.dropout_rate = 0.0
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config)


def test_seq2seq_batch4_equals_batch2_accum2(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(8), tiny_tokenizer, seq2seq=True)
    results = []
    for layout in (dict(batch_size=4, grad_accum=1), dict(batch_size=2, grad_accum=2)):
        model = _t5_without_dropout(tiny_tokenizer)
        result = _run(model, tiny_tokenizer, dataset, settings, tmp_path / str(layout["batch_size"]),
                      train_config(**layout), is_seq2seq=True)
        results.append((_losses(result), trainable_tensors(model)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=0, atol=1e-5)
    _assert_same_weights(results[0][1], results[1][1], atol=1e-5)
    assert results[0][0][0] > 0


def _per_example_ce(model, dataset) -> tuple[list[float], list[int]]:
    """Summed next-token CE over each example's label tokens, and their count, one forward each."""
    sums, counts = [], []
    with torch.no_grad():
        for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            sums.append(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item())
            counts.append(int((target != -100).sum()))
    return sums, counts


def test_class_weighted_loss_is_weighted_mean_over_label_tokens(tiny_tokenizer, tmp_path):
    examples = make_examples(8)
    dataset, settings = tokenized(examples, tiny_tokenizer)
    class_ids = [0, 0, 0, 0, 0, 1, 1, 2]
    sums, counts = _per_example_ce(build_tiny_llama(tiny_tokenizer), dataset)
    w = example_weights(class_ids)
    expected = float(np.dot(w, sums) / np.dot(w, counts))
    unweighted = sum(sums) / sum(counts)
    assert abs(expected - unweighted) > 1e-3  # the weighting matters on this data
    for packing, chunk in ((False, None), (True, None), (True, 3)):
        result = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings,
                      tmp_path / f"{packing}-{chunk}",
                      train_config(batch_size=4, grad_accum=2, max_steps=1, packing=packing, loss_chunk_tokens=chunk,
                                   class_balance="weighted"), class_ids=class_ids)
        assert _losses(result)[0] == pytest.approx(expected, abs=1e-5)
        # the loss comparable with validation's (unweighted) is logged beside it
        [record] = [r for r in result.history if r["event"] == "train"]
        assert record["unweighted_loss"] == pytest.approx(unweighted, abs=1e-5)
    plain = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "plain",
                 train_config(batch_size=4, grad_accum=2, max_steps=1))
    [record] = [r for r in plain.history if r["event"] == "train"]
    assert "unweighted_loss" not in record and record["loss"] == pytest.approx(unweighted, abs=1e-5)


def test_class_balance_needs_class_ids(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(4), tiny_tokenizer)
    with pytest.raises(TrainingError, match="class_ids"):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path,
             train_config(class_balance="sampled"))


def test_gradient_checkpointing_gives_the_same_step(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(8), tiny_tokenizer)
    out = []
    for flag in (False, True):
        model = build_tiny_llama(tiny_tokenizer)
        result = _run(model, tiny_tokenizer, dataset, settings, tmp_path / str(flag),
                      train_config(batch_size=8, max_steps=1, gradient_checkpointing=flag))
        out.append((_losses(result), trainable_tensors(model)))
    np.testing.assert_allclose(out[0][0], out[1][0], atol=1e-6)
    _assert_same_weights(out[0][1], out[1][1], atol=1e-6)


def test_lora_trains_only_the_adapter_and_checkpoints_it(tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    dataset, settings = tokenized(make_examples(8), tiny_tokenizer)
    model = get_peft_model(build_tiny_llama(tiny_tokenizer),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable_tensors(model)
    result = _run(model, tiny_tokenizer, dataset, settings, tmp_path, train_config(max_steps=2, lr=1e-2))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    after = trainable_tensors(model)
    assert any(not torch.equal(after[k], before[k]) for k in after)
    saved = load_file(str(result.last_checkpoint / "model.safetensors"))
    assert saved.keys() == after.keys() and all("lora_" in k for k in saved)


# --------------------------------------------------------------------------------------------------
# Resume, lock, NaN, disk
# --------------------------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tiny_tokenizer, tmp_path):
    """Stop mid-epoch (an exception at step 8's validation), resume: weights equal bitwise."""
    dataset, settings = tokenized(make_examples(24), tiny_tokenizer)
    val, _ = tokenized(make_examples(6, seed=9), tiny_tokenizer)
    cfg = train_config(batch_size=4, epochs=2, lr=3e-3, schedule="linear", warmup_ratio=0.2, eval_every=4,
                       save_every=1, packing=True)

    calls = []

    def validate(model):
        calls.append(1)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise _Interrupt()
        return {"score": float(len(calls) % 3)}

    interrupt_at = None
    full = build_tiny_llama(tiny_tokenizer)
    reference = _run(full, tiny_tokenizer, dataset, settings, tmp_path / "full", cfg, val_data=val, validate=validate,
                     restore_best=False)
    assert reference.steps == 12

    calls.clear()
    interrupt_at = 2  # the validation at step 8: checkpoint 7 is the newest
    with pytest.raises(_Interrupt):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg,
             val_data=val, validate=validate, restore_best=False)
    assert latest_good_checkpoint(tmp_path / "cut").name == "step-000007"
    assert not (tmp_path / "cut" / ".lock").exists()

    calls[:] = [1]  # the resumed run has done one validation already
    interrupt_at = None
    resumed_model = build_tiny_llama(tiny_tokenizer, seed=5)  # different init: everything must come from disk
    resumed = _run(resumed_model, tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg, val_data=val,
                   validate=validate, resume=True, restore_best=False)
    assert resumed.steps == 12
    final, expected = trainable_tensors(resumed_model), trainable_tensors(full)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert _losses(resumed) == _losses(reference)  # metrics.jsonl: steps 1-7 kept, 8-12 redone
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["event"] == "train"] == list(range(1, 13))
    assert resumed.best_step == reference.best_step and resumed.best_value == reference.best_value


def test_resume_refuses_changed_batch_settings(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(12), tiny_tokenizer)
    _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path,
         train_config(batch_size=4, max_steps=2, save_every=1))
    with pytest.raises(TrainingError, match="group_size was 4, now 2"):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path,
             train_config(batch_size=2, max_steps=4), resume=True)


@pytest.mark.parametrize("layout", [{"batch_size": 2, "grad_accum": 4}, {"batch_size": 8, "grad_accum": 1}],
                         ids=["batch2_accum4", "batch8_accum1"])
def test_resume_with_the_same_global_batch_split_otherwise_continues_the_same_steps(tiny_tokenizer, tmp_path,
                                                                                     layout, caplog):
    """transformers#43708: a checkpoint of (batch 4, accum 2) resumed with another split of the same 8 examples
    per step trains the same steps (equal up to rounding), instead of being refused as changed data."""
    dataset, settings = tokenized(make_examples(24), tiny_tokenizer)
    base = {"max_steps": 3, "packing": False, "group_by_length": False, "save_every": 1}
    full = build_tiny_llama(tiny_tokenizer)
    reference = _run(full, tiny_tokenizer, dataset, settings, tmp_path / "full",
                     train_config(batch_size=4, grad_accum=2, **base))
    cut = tmp_path / "cut"

    calls = []

    def stop_after_one(model):  # the validation of step 2 stops the run: checkpoint 1 is the newest
        calls.append(1)
        if len(calls) == 2:
            raise _Interrupt()
        return {}

    with pytest.raises(_Interrupt):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, cut,
             train_config(batch_size=4, grad_accum=2, eval_every=1, **base), validate=stop_after_one)
    assert latest_good_checkpoint(cut).name == "step-000001"
    model = build_tiny_llama(tiny_tokenizer, seed=5)
    resumed = _run(model, tiny_tokenizer, dataset, settings, cut, train_config(**layout, **base), resume=True)
    assert resumed.steps == 3 and "grad_accum was 2" in caplog.text
    np.testing.assert_allclose(_losses(resumed), _losses(reference), rtol=0, atol=1e-5)
    _assert_same_weights(trainable_tensors(model), trainable_tensors(full), atol=1e-5)
    # other data of as many examples is still refused, whatever the split
    other, _ = tokenized(make_examples(24, seed=3), tiny_tokenizer)
    with pytest.raises(TrainingError, match="lengths in tokens differ"):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, other, settings, cut, train_config(**layout, **base),
             resume=True)


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tiny_tokenizer, tmp_path, caplog):
    dataset, settings = tokenized(make_examples(4), tiny_tokenizer)
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / ".lock").write_text(f"{other.pid}\n")
        with pytest.raises(TrainingError, match=rf"process {other.pid}.*{tmp_path.name}|{tmp_path}.*{other.pid}"):
            _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path, train_config())
        assert (tmp_path / ".lock").read_text().strip() == str(other.pid)  # not ours to delete
    finally:
        other.kill()
        other.wait()
    # Now that process is gone: its lock is stale and is taken over with a warning.
    with caplog.at_level("WARNING"):
        result = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path, train_config())
    assert result.steps == 1
    assert "stale lock" in caplog.text
    assert not (tmp_path / ".lock").exists()


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(16), tiny_tokenizer)
    model = build_tiny_llama(tiny_tokenizer)
    # lr 1e30: the first step is finite but sends the weights to ~1e30; a later forward overflows.
    with pytest.raises(TrainingError, match=r"diverged at step \d+") as info:
        _run(model, tiny_tokenizer, dataset, settings, tmp_path,
             train_config(lr=1e30, max_grad_norm=None, max_steps=4, save_every=1))
    bad = int(re.search(r"step (\d+)", str(info.value)).group(1))
    assert bad >= 2
    assert list_checkpoints(tmp_path)[-1].name == f"step-{bad - 1:06d}"  # nothing written after the NaN
    good = latest_good_checkpoint(tmp_path)
    assert good.name == f"step-{bad - 1:06d}"
    fresh = build_tiny_llama(tiny_tokenizer)
    state = load_checkpoint(good, fresh)
    assert state["step"] == bad - 1
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert not (tmp_path / ".lock").exists()


def test_disk_space_check_uses_the_substituted_reading(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(4), tiny_tokenizer)
    with pytest.raises(TrainingError, match=r"needs about .* GB .* but 0\.00 GB are free"):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "small",
             train_config(), free_space_fn=lambda path: 1000)
    assert not (tmp_path / "small" / "checkpoints").exists()
    result = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "big",
                  train_config(), free_space_fn=lambda path: 10**12)
    assert result.steps == 1


# --------------------------------------------------------------------------------------------------
# Validation, early stopping, best checkpoint
# --------------------------------------------------------------------------------------------------


def _early_stop_on(tokenizer, run_dir, metric: str, values: list[float], early: dict, **kwargs):
    """Train 8 steps validating after each: `validate` returns the next of `values` under `metric` and keeps
    the weights it saw (snapshots[i]: at the i-th validation, step i). Returns (result, model, snapshots)."""
    dataset, settings = tokenized(make_examples(16), tokenizer)
    val, _ = tokenized(make_examples(4, seed=3), tokenizer)
    scripted, snapshots = iter(values), {}
    model = build_tiny_llama(tokenizer)

    def validate(m):
        snapshots[len(snapshots) + 1] = trainable_tensors(m)
        return {metric: next(scripted)}

    cfg = train_config(batch_size=2, epochs=1, eval_every=1, early_stopping={"metric": metric, **early})
    result = _run(model, tokenizer, dataset, settings, run_dir, cfg, val_data=val, validate=validate, **kwargs)
    return result, model, snapshots


def _assert_kept(result, model, snapshot: dict) -> None:
    """checkpoints/best holds `snapshot`'s weights, and the model ends with them (restored)."""
    best = load_file(str(result.best_path / "model.safetensors"))
    assert all(torch.equal(best[k], snapshot[k]) for k in best)
    assert all(torch.equal(p, snapshot[n]) for n, p in trainable_tensors(model).items())


def test_early_stopping_after_patience_keeps_the_best_weights(tiny_tokenizer, tmp_path):
    result, model, snapshots = _early_stop_on(tiny_tokenizer, tmp_path, "score", [0.2, 0.5, 0.4, 0.45, 0.9, 0.9],
                                              {"patience": 2})
    assert result.stopped_early and result.steps == 4  # best at 2, then 0.4 and 0.45: 2 without improvement
    assert (result.best_step, result.best_metric, result.best_value) == (2, "score", 0.5)
    _assert_kept(result, model, snapshots[2])
    evals = [r for r in result.history if r["event"] == "eval"]
    assert [r["score"] for r in evals] == [0.2, 0.5, 0.4, 0.45]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)


def test_resume_keeps_the_best_its_checkpoint_knows_not_a_lost_later_one(tiny_tokenizer, tmp_path):
    """transformers#22172 (PR#26739) family, best-model bookkeeping across a resume: checkpoints every 4 steps,
    validation every 2. Step 2 is the best when checkpoint 4 is written; step 6 writes a better best, then the
    run dies at step 8. Resumed from checkpoint 4 to step 5 (a shortened run), the best it knows is step 2: it
    must end on step 2's weights, not on step 6's from steps it never trained."""
    dataset, settings = tokenized(make_examples(32), tiny_tokenizer)
    scores, snapshots, calls = {2: 0.5, 4: 0.4, 6: 0.9}, {}, []

    def validate(m):  # run 1 validates at steps 2, 4, 6 and dies at 8; the resumed run at its last step, 5
        calls.append(1)
        step = [2, 4, 6, 8, 5][len(calls) - 1]
        if step == 8:
            raise _Interrupt()
        snapshots[step] = trainable_tensors(m)
        return {"score": scores.get(step, 0.2)}

    def cfg(steps):
        return train_config(batch_size=2, max_steps=steps, eval_every=2, save_every=4, packing=False,
                            early_stopping={"metric": "score", "patience": 10, "greater_is_better": True})

    with pytest.raises(_Interrupt):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path, cfg(8), validate=validate)
    assert latest_good_checkpoint(tmp_path).name == "step-000004"
    assert json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text())["step"] == 6  # the lost step's
    model = build_tiny_llama(tiny_tokenizer, seed=5)
    result = _run(model, tiny_tokenizer, dataset, settings, tmp_path, cfg(5), validate=validate, resume=True)
    assert sorted(snapshots) == [2, 4, 5, 6] and result.steps == 5
    assert (result.best_step, result.best_value) == (2, 0.5)
    assert json.loads((result.best_path / "best.json").read_text())["step"] == 2
    _assert_kept(result, model, snapshots[2])


@pytest.mark.parametrize("greater_is_better, declared, best_step, steps", [
    (False, None, 2, 4),  # best 0.5 at step 2, then 0.6 and 0.7: 2 validations without improvement
    (None, {"ter": False}, 2, 4),  # the direction validate declares (a metric's definition)
    (None, None, 1, 3),  # by its name "ter" is higher-is-better: 0.8 at step 1 kept, the worst weights
])
def test_lower_is_better_custom_metric_keeps_the_lowest_step_and_stops_on_rising_values(
        tiny_tokenizer, tmp_path, greater_is_better, declared, best_step, steps):
    """"ter" says nothing of its direction by name: train.early_stopping.greater_is_better=false, or the
    direction validate declares, makes the lowest value the best and rising values no improvement."""
    values = [0.8, 0.5, 0.6, 0.7, 0.1, 0.1]
    result, model, snapshots = _early_stop_on(tiny_tokenizer, tmp_path, "ter", values,
                                              {"patience": 2, "greater_is_better": greater_is_better},
                                              validate_metrics=declared)
    assert result.stopped_early and result.steps == steps
    assert (result.best_step, result.best_metric, result.best_value) == (best_step, "ter", values[best_step - 1])
    _assert_kept(result, model, snapshots[best_step])
    recorded = json.loads((tmp_path / "train_result.json").read_text())
    assert recorded["best_metric"] == "ter" and recorded["greater_is_better"] is (best_step == 1)


def test_direction_without_a_metric_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.greater_is_better needs train\.early_stopping"
                                          r"\.metric") as info:
        load_config(None, ["train.early_stopping.greater_is_better=false"])
    assert info.value.exit_code == 2
    config = load_config(None, ["train.early_stopping.metric=ter", "train.early_stopping.greater_is_better=false"])
    assert config.train.early_stopping.greater_is_better is False
    with pytest.raises(ConfigError, match="use train.early_stopping.greater_is_better"):  # the Trainer's place
        load_config(None, ["train.greater_is_better=false"])


@pytest.mark.parametrize("metric, declared, hint", [
    ("macro_f1", None, "it produces val_loss, val_ppl"),  # no task metrics at all
    ("scor", {"score": True, "t/score": True}, "did you mean 'score'"),
    ("t2/score", {"score": True, "t/score": True}, "per template e.g. 't/score'"),
])
def test_early_stopping_metric_validation_never_produces_is_a_config_error_before_the_first_step(
        tiny_tokenizer, tmp_path, metric, declared, hint):
    dataset, settings = tokenized(make_examples(16), tiny_tokenizer)
    val, _ = tokenized(make_examples(4, seed=3), tiny_tokenizer)
    cfg = train_config(batch_size=2, epochs=1, early_stopping={"metric": metric, "greater_is_better": False})
    with pytest.raises(ConfigError, match=rf"train\.early_stopping\.metric='{re.escape(metric)}' is not a metric "
                                          rf"validation produces.*{re.escape(hint)}") as info:
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path, cfg, val_data=val,
             validate=(lambda m: dict.fromkeys(declared, 1.0)) if declared else None, validate_metrics=declared)
    assert info.value.exit_code == 2
    log = tmp_path / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert records == [] and list_checkpoints(tmp_path) == []


@pytest.mark.parametrize("metric, validate", [("val_loss", None), (None, None), ("val_loss", "score")])
def test_early_stopping_that_nothing_measures_is_refused_before_the_first_step(tiny_tokenizer, tmp_path, metric,
                                                                                validate):
    """No validation split: early stopping was silently ignored (8 steps, no error), or, with task metrics
    only and metric val_loss, failed at the first validation after a whole epoch (8 steps)."""
    dataset, settings = tokenized(make_examples(16), tiny_tokenizer)

    def measure(m):
        return {validate: 1.0}

    cfg = train_config(batch_size=2, epochs=1, early_stopping={"metric": metric, "patience": 2})
    with pytest.raises(TrainingError, match="early_stopping"):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path, cfg,
             validate=measure if validate else None)
    log = tmp_path / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert [r for r in records if r["event"] == "train"] == [] and list_checkpoints(tmp_path) == []


def test_validation_loss_is_token_weighted_and_best_by_val_loss_by_default(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(8), tiny_tokenizer)
    val, _ = tokenized(make_examples(5, seed=4), tiny_tokenizer)
    model = build_tiny_llama(tiny_tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(val["input_ids"], val["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    cfg = train_config(batch_size=8, max_steps=1, lr=1e-9, eval_every=1)
    result = _run(model, tiny_tokenizer, dataset, settings, tmp_path, cfg, val_data=val)
    record = [r for r in result.history if r["event"] == "eval"][0]
    assert record["val_loss"] == pytest.approx(total / count, abs=1e-4)  # lr 1e-9: the initial model
    assert record["val_label_tokens"] == count
    assert result.best_metric == "val_loss"


def test_metric_direction_and_schedule():
    assert lower_is_better("val_loss") and lower_is_better("val_ppl") and not lower_is_better("macro_f1")
    # the direction comes from the metric's own name, not from a dataset or template id around it
    names = ["apple_reviews/sentiment/macro_f1", "glossary_qa/accuracy", "dpplus/rougeL", "qa/val_loss",
             "eval_news_loss", "val_perplexity"]
    assert [lower_is_better(n) for n in names] == [False, False, False, True, True, True]
    assert [improved(0.9, 0.5, lower_is_better(n)) for n in names[:3]] == [True, True, True]
    assert [improved(0.9, 0.5, lower_is_better(n)) for n in names[3:]] == [False, False, False]
    # an explicit direction wins over the name, then a declared one (the metric's definition) over the name
    assert lower_is_better("ter", greater_is_better=False) and not lower_is_better("val_loss", greater_is_better=True)
    assert lower_is_better("t/ter", declared={"ter": False}) and not lower_is_better("mae", declared={"x": False})
    assert [round(lr_factor(s, 100, 5, "linear"), 4) for s in (0, 4, 5, 99)] == [0.1667, 0.8333, 1.0, 0.0105]
    assert lr_factor(52, 100, 5, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert lr_factor(99, 100, 0, "constant") == 1.0
    # a positive warmup_ratio keeps at least one warmup step (0.05 x 9 and 0.05 x 10 rounded to 0 before)
    assert [warmup_steps(0.05, n) for n in (1, 9, 10, 264)] == [1, 1, 1, 13]
    assert warmup_steps(0.0, 264) == 0


def test_metrics_log_has_step_loss_lr_and_throughput(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(8), tiny_tokenizer)
    _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path, train_config(batch_size=2))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for record in lines:
        assert {"epoch", "loss", "lr", "tokens", "tokens_per_s", "label_tokens"} <= record.keys()
    assert lines[-1]["tokens"] == sum(len(x) for x in dataset["input_ids"])
    assert lines[-1]["epoch"] == 1.0


def test_log_every_records_the_mean_loss_of_its_window_not_the_last_step(tiny_tokenizer, tmp_path):
    """With log_every=2 each record's loss is the mean of the window's step losses (the Trainer's logging
    convention) and label_tokens their sum; the last, shorter window is logged too."""
    dataset, settings = tokenized(make_examples(10), tiny_tokenizer)
    cfg = train_config(batch_size=2)
    every = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "a", cfg)
    windowed = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "b", cfg,
                    log_every=2)
    steps = [r for r in every.history if r["event"] == "train"]
    logged = [r for r in windowed.history if r["event"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in logged] == [2, 4, 5]
    assert len({r["loss"] for r in steps}) == 5  # the steps differ, so the last step's loss would show
    for record, window in zip(logged, [steps[0:2], steps[2:4], steps[4:5]]):
        assert record["loss"] == pytest.approx(sum(r["loss"] for r in window) / len(window), abs=1e-6)
        assert record["label_tokens"] == sum(r["label_tokens"] for r in window)
        assert record["lr"] == window[-1]["lr"] and record["grad_norm"] == pytest.approx(window[-1]["grad_norm"])


# --------------------------------------------------------------------------------------------------
# A model that learned: overfit, save, reload with plain transformers, generate, stop at EOS
# --------------------------------------------------------------------------------------------------


def test_overfit_tiny_model_generates_completion_and_stops(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.data.tokenize import encode_for_generation

    completions = ["great coffee", "the kettle leaks", "5", "fast shipping"]
    examples = make_examples(4, seed=11, completions=completions)
    dataset, settings = tokenized(examples, tiny_tokenizer)
    model = build_tiny_llama(tiny_tokenizer)
    result = _run(model, tiny_tokenizer, dataset, settings, tmp_path / "run",
                  train_config(batch_size=4, max_steps=150, lr=3e-3, warmup_ratio=0.05, schedule="linear"))
    assert _losses(result)[-1] < 0.05
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    max_new = 16
    prompts = encode_for_generation(tokenizer, [e["prompt"] for e in examples], settings, max_new)
    for prompt, expected in zip(prompts, completions):
        out = reloaded.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(prompt):].tolist()
        assert new[-1] == tokenizer.eos_token_id and len(new) < max_new
        assert tokenizer.decode(new[:-1]).strip() == expected


def test_class_ids_follow_examples_through_dropped_rows(tiny_tokenizer, tmp_path):
    """Tokenization drops an example whose completion cannot fit; class ids still line up by `index`."""
    examples = make_examples(6)
    examples[2]["completion"] = " ".join(["the kettle leaks"] * 40)  # longer than max_length: dropped
    dataset, settings = tokenized(examples, tiny_tokenizer)
    assert len(dataset) == 5 and 2 not in dataset["index"]
    class_ids = [0, 1, 9, 0, 1, 0]
    result = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "w",
                  train_config(batch_size=5, max_steps=1, class_balance="weighted"), class_ids=class_ids)
    sums, counts = _per_example_ce(build_tiny_llama(tiny_tokenizer), dataset)
    w = example_weights([class_ids[i] for i in dataset["index"]])  # rows -> examples 0, 1, 3, 4, 5
    assert _losses(result)[0] == pytest.approx(float(np.dot(w, sums) / np.dot(w, counts)), abs=1e-5)
    with pytest.raises(TrainingError, match="refers to example 5"):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "x",
             train_config(class_balance="sampled"), class_ids=class_ids[:5])
    result = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "s",
                  train_config(batch_size=5, max_steps=2, class_balance="sampled"), class_ids=class_ids)
    assert result.steps == 2


def test_fresh_start_replaces_an_earlier_runs_checkpoints(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(16), tiny_tokenizer)
    _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path,
         train_config(batch_size=2, save_every=1))  # 8 steps: step-000007, step-000008 kept
    result = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path,
                  train_config(batch_size=4, save_every=1))  # no resume: 4 steps from scratch
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert latest_good_checkpoint(tmp_path) == result.last_checkpoint


def test_tensorboard_missing_is_a_warning_not_a_failure(tiny_tokenizer, tmp_path, caplog):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    dataset, settings = tokenized(make_examples(4), tiny_tokenizer)
    with caplog.at_level("WARNING"):
        result = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path,
                      train_config(tensorboard=True))
    assert result.steps == 1 and "tensorboard" in caplog.text


@pytest.mark.slow
def test_bf16_autocast_trains_on_cpu(tmp_path):
    """bf16 needs its own process: accelerate keeps one mixed-precision state per process."""
    import os
    import sys

    from _train_helpers import HERE

    code = (
        "import _train_helpers as h, torch, json, sys\n"
        "from conftest import build_tiny_llama, build_tiny_tokenizer\n"
        "from instructkit.train.loop import TrainData, TrainOptions, train\n"
        "torch.set_num_threads(1)\n"
        "tok = build_tiny_tokenizer(); model = build_tiny_llama(tok)\n"
        "ds, s = h.tokenized(h.make_examples(8), tok)\n"
        "r = train(model, tok, TrainData(ds, ds),\n"
        "          h.train_config(precision='bf16', max_steps=3, batch_size=4, eval_every=3), sys.argv[1],\n"
        "          TrainOptions(settings=s, is_seq2seq=False, show_progress=False))\n"
        "print(json.dumps([x.get('loss', x.get('val_loss')) for x in r.history]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=HERE, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    values = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
