"""train/checkpoint.py: atomic safetensors/JSON checkpoints, verification, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _train_helpers import HERE, train_config
from conftest import build_tiny_llama
from safetensors.torch import load_file

from instructkit.errors import TrainingError
from instructkit.train.checkpoint import (
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
    verify_folder,
)
from instructkit.train.optim import make_optimizer, make_scheduler


def _trained_state(tokenizer, steps: int = 2):
    """A tiny Llama + AdamW + schedule after a few real updates (non-trivial optimizer state)."""
    model = build_tiny_llama(tokenizer)
    cfg = train_config(lr=1e-2, warmup_ratio=0.3, schedule="linear")
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=10)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_roundtrip_restores_weights_optimizer_scheduler_and_rng_exactly(tiny_tokenizer, tmp_path):
    model, optimizer, scheduler = _trained_state(tiny_tokenizer)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 7, model, optimizer, scheduler, {"epoch": 1, "step_in_epoch": 3},
                           extra={"note": "x"})
    assert path.name == "step-000007"
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))

    fresh = build_tiny_llama(tiny_tokenizer, seed=9)
    cfg = train_config(lr=1e-2, warmup_ratio=0.3, schedule="linear")
    fresh_opt = make_optimizer(fresh, cfg)
    fresh_sched = make_scheduler(fresh_opt, cfg, total_steps=10)
    random.seed(99)
    state = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert state["step"] == 7 and state["sampler"] == {"epoch": 1, "step_in_epoch": 3}
    assert state["extra"] == {"note": "x"}
    assert (random.random(), np.random.rand()) == expected_draws[:2]
    assert torch.equal(torch.rand(3), expected_draws[2])
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
    original, restored = optimizer.state_dict(), fresh_opt.state_dict()
    assert original["param_groups"] == restored["param_groups"]
    for index, entries in original["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, restored["state"][index][key])
    assert fresh_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 2
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_is_safetensors_and_json_only(tiny_tokenizer, tmp_path, monkeypatch):
    model, optimizer, scheduler = _trained_state(tiny_tokenizer, steps=1)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(pickle, "dump", refuse)
    monkeypatch.setattr(pickle, "dumps", refuse)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng.safetensors", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    # Tied embeddings are stored once; every trainable parameter is there.
    assert set(trainable_state(model)) == set(load_file(str(path / "model.safetensors")))


def test_keeps_only_the_newest_k_and_no_temporary_folders(tiny_tokenizer, tmp_path):
    model, optimizer, scheduler = _trained_state(tiny_tokenizer, steps=1)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_folders_left_by_a_kill_between_renames_are_restored_or_removed(tiny_tokenizer, tmp_path):
    """A kill inside _seal leaves `.old-<name>-<pid>`: put back when nothing replaced it, else removed."""
    model, optimizer, scheduler = _trained_state(tiny_tokenizer, steps=1)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, keep=2)
    root = tmp_path / "checkpoints"
    os.rename(root / "step-000002", root / ".old-step-000002-99999")  # killed before the new one moved in
    (root / "step-000001").rename(root / "tmp-copy")
    os.makedirs(root / ".old-step-000001-88888")  # killed after: step-000001 exists again below
    (root / "tmp-copy").rename(root / "step-000001")
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002", "step-000003"]
    assert verify_folder(root / "step-000002") is None  # restored whole
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest", "missing_file"])
def test_damaged_checkpoint_is_skipped_with_a_warning(tiny_tokenizer, tmp_path, caplog, damage):
    model, optimizer, scheduler = _trained_state(tiny_tokenizer, steps=1)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep=3)
    newest = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {}, keep=3)
    target = newest / "optimizer.safetensors"
    if damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        target.unlink()
    with caplog.at_level("WARNING"):
        assert latest_good_checkpoint(tmp_path).name == "step-000001"
    assert "step-000002" in caplog.text
    with pytest.raises(TrainingError, match="step-000002"):
        load_checkpoint(newest, build_tiny_llama(tiny_tokenizer))


def test_loading_into_a_different_model_names_the_mismatch(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, optimizer, scheduler = _trained_state(tiny_tokenizer, steps=1)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(TrainingError, match="does not fit this model|shape"):
        load_checkpoint(path, other)


def test_sigkilled_run_resumes_to_bitwise_equal_weights(tmp_path):
    """A real process is SIGKILLed after its 3rd checkpoint; the newest checkpoint is then corrupted.
    Resuming skips the corrupt one, restarts from the previous, and ends bitwise equal to a run
    that was never interrupted (CPU, fp32, 1 thread)."""
    sys.path.insert(0, str(HERE))
    from _resume_worker import run

    from instructkit.train.checkpoint import trainable_state

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cut = tmp_path / "cut"
    worker = subprocess.Popen([sys.executable, str(HERE / "_resume_worker.py"), str(cut), "--sleep", "0.4"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Meanwhile, the uninterrupted reference run in this process.
    reference = trainable_state(run(str(tmp_path / "full")))
    deadline = time.monotonic() + 180
    while not (cut / "checkpoints" / "step-000003").is_dir():
        if worker.poll() is not None or time.monotonic() > deadline:
            out = worker.stdout.read().decode(errors="replace") if worker.stdout else ""
            worker.kill()
            pytest.fail(f"worker ended (rc {worker.returncode}) before its 3rd checkpoint:\n{out[-3000:]}")
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    worker.stdout.close()
    assert worker.returncode == -signal.SIGKILL
    assert (cut / ".lock").exists()  # a killed run leaves its lock behind
    steps = [p.name for p in list_checkpoints(cut)]
    assert steps[-1] in ("step-000003", "step-000004") and "step-000012" not in steps

    newest = list_checkpoints(cut)[-1]
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    previous = list_checkpoints(cut)[-2]
    assert latest_good_checkpoint(cut) == previous

    resumed = trainable_state(run(str(cut), resume=True, seed=3))  # another init: all state from disk
    assert reference.keys() == resumed.keys()
    differing = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not differing, f"not bitwise equal: {differing[:5]}"
    assert not (cut / ".lock").exists()



@pytest.fixture(scope="module")
def fp16_runs(tmp_path_factory) -> dict:
    """tests/train/_fp16_scaler_worker.py's JSON: fp16 runs with a grad scaler, an overflow at step 2, one
    uninterrupted and one resumed from checkpoint 3 (its own process: one mixed-precision state a process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(HERE / "_fp16_scaler_worker.py"), str(tmp_path_factory.mktemp("fp16"))],
                          env=env, cwd=HERE, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fp16_loss_scale_is_resumed(fp16_runs):
    """transformers#11323 / #34053: the fp16 GradScaler's state (scale, growth tracker) is checkpointed. Without
    it the resumed run restarts at the initial scale, overflows where the uninterrupted run did not, skips that
    step and ends elsewhere; with it the resumed run ends bitwise equal."""
    out = fp16_runs
    assert out["reference_norms"][1] == float("inf")  # step 2 was skipped, the scale halved
    assert out["resumed"] == out["reference"]
    assert out["resumed_norms"] == out["reference_norms"]  # no overflow of its own after the resume
    assert out["worst"] == 0.0
    assert out["resumed_lrs"] == out["reference_lrs"]


def test_a_step_the_fp16_scaler_skips_does_not_advance_the_schedule(fp16_runs):
    """transformers#11106: the overflow step 2 updates nothing, so step 3 trains at step 2's lr; the linear
    schedule (6 steps, no warmup) then goes on from there."""
    np.testing.assert_allclose(fp16_runs["reference_lrs"], [1e-3 * f for f in (1, 5 / 6, 5 / 6, 4 / 6, 3 / 6, 2 / 6)],
                               rtol=1e-12)


def test_fp16_without_a_grad_scaler_still_stops_before_an_inf_step(tmp_path):
    """accelerate#101 (fp16 asked, not applied) meets the NaN/Inf guard: accelerate runs CPU fp16 with no scaler,
    yet the guard let a non-finite gradient through as if a scaler would skip it; the Inf reached the weights
    and checkpoint 2 saved them. Now the run stops at step 2 with checkpoint 1, finite, as the newest."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(HERE / "_fp16_scaler_worker.py"), str(tmp_path), "--cpu-fp16"],
                          env=env, cwd=HERE, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["error"] is not None and "diverged at step 2" in out["error"] and "not applied" in out["error"]
    assert out["checkpoints"] == {"step-000001": True}
    assert "trains in fp32" in done.stderr


def test_a_rank_the_checkpoint_has_no_rng_for_keeps_its_own(tmp_path):
    """accelerate#236 on resume: a checkpoint of 1 process resumed on 2 gave rank 1 a copy of rank 0's RNG, so
    both drew the same dropout masks; rank 1 now keeps the generator set-up seeded for it (seed + rank)."""
    from instructkit.train.checkpoint import capture_rng, read_state, write_state

    torch.manual_seed(0)
    write_state(tmp_path, 3, None, {}, [capture_rng()], {})
    saved = torch.get_rng_state()
    torch.manual_seed(1)  # rank 1's own, from set-up
    own = torch.get_rng_state()
    assert read_state(tmp_path, None, rank=1, restore_rng_state=True)["step"] == 3
    assert torch.equal(torch.get_rng_state(), own)
    read_state(tmp_path, None, rank=0, restore_rng_state=True)
    assert torch.equal(torch.get_rng_state(), saved)
