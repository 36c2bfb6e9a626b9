"""Fault injection in training: SIGKILL at random moments, damaged checkpoints, no disk space, NaN/Inf.

Kill/resume trials: a child process (forked from this one, so it starts in milliseconds with torch
already imported) trains the tiny Llama 18 steps with a checkpoint after every step; it is SIGKILLed at
a random moment: uniformly in the run's duration, or the instant a checkpoint folder starts being
written (`checkpoints/.tmp-step-*`). Resuming in this process (from a model with another random init,
so everything must come from disk; the base init when the kill left no complete checkpoint) must end
bitwise equal to an uninterrupted run. Default profile: 3
trials; HYPOTHESIS_PROFILE=slow or -m slow: 12.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

import _robust
import _robust_train as rt
from conftest import build_tiny_llama
from instructkit.errors import TrainingError
from instructkit.train.checkpoint import (
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify_folder,
)


@pytest.fixture(scope="module")
def reference(tiny_tokenizer, tmp_path_factory):
    """The uninterrupted run: its final weights and how long it took (after a warm-up run)."""
    folder = tmp_path_factory.mktemp("reference")
    rt.run(tiny_tokenizer, folder / "warmup", cfg=rt.config(max_steps=2))  # first-use costs out of the timing
    start = time.perf_counter()
    model = rt.run(tiny_tokenizer, folder / "full")
    seconds = time.perf_counter() - start
    assert [p.name for p in list_checkpoints(folder / "full")] == ["step-000017", "step-000018"]
    return {"weights": rt.weights(model), "seconds": seconds}


def _phase(run_dir: Path, killed: bool) -> str:
    """Where the kill landed, read from what it left on disk."""
    root = run_dir / "checkpoints"
    if not killed:
        return "finished before the kill"
    if any(root.glob(".tmp-*")):
        return "during a checkpoint write"
    if any(root.glob(".old-*")):
        return "while replacing a checkpoint"
    if not list_checkpoints(run_dir):
        return "before the first checkpoint"
    return "inside a step (between checkpoints)"


def _trial(tokenizer, run_dir: Path, reference: dict, rng: random.Random, mode: str) -> dict:
    process = rt.start_child(lambda: rt.run(tokenizer, run_dir))
    started = time.perf_counter()
    if mode == "random time":
        process.join(rng.uniform(0.02, 0.9 * reference["seconds"]))
    else:  # the instant a checkpoint write is under way (plus up to 3 ms)
        step = rng.randint(1, rt.STEPS - 1)
        target = run_dir / "checkpoints" / f".tmp-step-{step:06d}-{process.pid}"
        rt.wait_for(target.exists, process, timeout=60)
        time.sleep(rng.uniform(0.0, 0.003))
    kill_after = time.perf_counter() - started
    killed = rt.sigkill(process)
    assert killed or process.exitcode == 0, f"the training child failed on its own (exit {process.exitcode})"
    phase = _phase(run_dir, killed)
    newest = list_checkpoints(run_dir)[-1].name if list_checkpoints(run_dir) else None
    good = latest_good_checkpoint(run_dir)
    if killed:
        assert (run_dir / ".lock").exists()  # a killed run leaves its lock: the resume must take it over
    # Another random init, so everything must come from the checkpoint; with no complete checkpoint the
    # run starts over from the base model, as a user's would (the same init as the reference).
    resumed = rt.run(tokenizer, run_dir, seed=5 if good is not None else 0, resume=True)
    differing = rt.same_weights(rt.weights(resumed), reference["weights"])
    record = {"mode": mode, "kill_after_s": round(kill_after, 4), "killed": killed, "phase": phase,
              "newest_checkpoint_at_kill": newest, "resumed_from": good.name if good else None,
              "bitwise_equal": not differing}
    _robust.KILL_TRIALS.append(record)
    assert not differing, f"resumed weights differ from the uninterrupted run: {differing[:4]} ({record})"
    assert not (run_dir / ".lock").exists()
    assert not any((run_dir / "checkpoints").glob(".tmp-*")), "a stale partial checkpoint was left behind"
    return record


def _run_trials(tiny_tokenizer, reference, tmp_path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        mode = "random time" if i % 2 == 0 else "during a checkpoint write"
        records.append(_trial(tiny_tokenizer, tmp_path / f"trial-{i}", reference, rng, mode))
    return records


@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(tiny_tokenizer, reference, tmp_path):
    records = _run_trials(tiny_tokenizer, reference, tmp_path, _robust.trials(default=3, slow=12), seed=0)
    assert sum(r["killed"] for r in records) >= len(records) - 1  # the kills landed mid-run


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_many_sigkill_trials(tiny_tokenizer, reference, tmp_path):
    """The slow profile's trials with fresh random moments (seeded by the clock, recorded in the JSON)."""
    seed = int(time.time())
    records = _run_trials(tiny_tokenizer, reference, tmp_path, 12, seed=seed)
    phases = {r["phase"] for r in records}
    assert "during a checkpoint write" in phases, phases


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints: detected by the manifest, the previous good one used
# --------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model.safetensors": lambda c: _truncate(c / "model.safetensors"),
    "flipped byte in optimizer.safetensors": lambda c: _flip_byte(c / "optimizer.safetensors"),
    "rng.safetensors deleted": lambda c: (c / "rng.safetensors").unlink(),
    "state.json edited": lambda c: (c / "state.json").write_text(
        (c / "state.json").read_text().replace('"step": 18', '"step": 17')),
    "manifest.json garbage": lambda c: (c / "manifest.json").write_bytes(b"\x00garbage{"),
    "manifest.json missing": lambda c: (c / "manifest.json").unlink(),
    "model.safetensors emptied": lambda c: (c / "model.safetensors").write_bytes(b""),
}


@pytest.mark.timeout(120)
def test_damaged_newest_checkpoint_is_skipped_and_resume_is_exact(tiny_tokenizer, reference, tmp_path):
    base = tmp_path / "base"
    rt.run(tiny_tokenizer, base)
    import shutil

    for name, damage in DAMAGE.items():
        run_dir = tmp_path / name.replace(" ", "_")
        shutil.copytree(base, run_dir)
        newest, previous = list_checkpoints(run_dir)[-1], list_checkpoints(run_dir)[-2]
        damage(newest)
        problem = verify_folder(newest)
        assert problem is not None, f"{name}: not detected"
        with pytest.raises(TrainingError, match=newest.name):
            load_checkpoint(newest, build_tiny_llama(tiny_tokenizer))
        assert latest_good_checkpoint(run_dir) == previous
        resumed = rt.run(tiny_tokenizer, run_dir, seed=7, resume=True)  # redoes step 18 from step 17
        differing = rt.same_weights(rt.weights(resumed), reference["weights"])
        assert not differing, f"{name}: {differing[:3]}"
        assert verify_folder(list_checkpoints(run_dir)[-1]) is None  # the damaged one was rewritten whole
        _robust.OTHER_TRIALS.append({"fault": f"damaged checkpoint: {name}", "detected": problem,
                                     "resumed_from": previous.name, "bitwise_equal": True})


@pytest.mark.timeout(120)
def test_every_checkpoint_damaged_means_a_fresh_start_not_a_crash(tiny_tokenizer, reference, tmp_path, caplog):
    run_dir = tmp_path / "all-bad"
    rt.run(tiny_tokenizer, run_dir, cfg=rt.config(max_steps=3))
    for folder in list_checkpoints(run_dir):
        _flip_byte(folder / "model.safetensors")
    with caplog.at_level("WARNING"):
        resumed = rt.run(tiny_tokenizer, run_dir, resume=True)
    assert "no complete checkpoint" in caplog.text and "skipping checkpoint" in caplog.text
    assert not rt.same_weights(rt.weights(resumed), reference["weights"])
    _robust.OTHER_TRIALS.append({"fault": "every checkpoint damaged", "result": "warning, fresh start, exact"})


# --------------------------------------------------------------------------------------------------
# Disk space: checked before any work
# --------------------------------------------------------------------------------------------------


def test_disk_space_check_fires_before_any_forward_pass(tiny_tokenizer, tmp_path):
    model = build_tiny_llama(tiny_tokenizer)
    before = rt.weights(model)
    forwards: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    readings: list[Path] = []

    def free_space(path: Path) -> int:
        readings.append(Path(path))
        return 10_000  # 10 kB free

    run_dir = tmp_path / "full-disk"
    try:
        with pytest.raises(TrainingError, match=rf"not enough disk space in {run_dir}.*needs about .* GB"):
            rt.run(tiny_tokenizer, run_dir, model=model, free_space_fn=free_space)
    finally:
        handle.remove()
    assert readings == [run_dir]
    assert not forwards, "the model ran before the disk-space check"
    assert not rt.same_weights(rt.weights(model), before)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / ".lock").exists()
    _robust.OTHER_TRIALS.append({"fault": "10 kB free disk", "result": "TrainingError before the first forward"})


def test_enough_disk_space_by_the_substituted_reading_trains(tiny_tokenizer, tmp_path):
    """The estimate is a real number of bytes: a reading just above it trains, just below it refuses."""
    from instructkit.train.disk import required_disk_bytes

    needed = required_disk_bytes(build_tiny_llama(tiny_tokenizer), keep=2)
    assert needed > 0
    rt.run(tiny_tokenizer, tmp_path / "ok", cfg=rt.config(max_steps=1), free_space_fn=lambda p: needed)
    with pytest.raises(TrainingError, match="disk space"):
        rt.run(tiny_tokenizer, tmp_path / "short", cfg=rt.config(max_steps=1), free_space_fn=lambda p: needed - 1)


# --------------------------------------------------------------------------------------------------
# NaN / Inf loss: stop before the step is applied, the last good checkpoint intact
# --------------------------------------------------------------------------------------------------


def _poison_at(model, step: int, value: float):
    """A forward hook on the final norm that returns `value` activations from training forward `step` on."""
    calls = {"n": 0}

    def hook(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] >= step:
                return output * value if value != 0 else output
        return None

    return model.model.norm.register_forward_hook(hook)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_loss_stops_with_the_last_good_checkpoint_intact(poison, tiny_tokenizer, reference, tmp_path):
    run_dir = tmp_path / "diverged"
    model = build_tiny_llama(tiny_tokenizer)
    handle = _poison_at(model, step=6, value=poison)
    try:
        with pytest.raises(TrainingError, match=r"diverged at step 6: loss (nan|inf)"):
            rt.run(tiny_tokenizer, run_dir, model=model)
    finally:
        handle.remove()
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the poisoned step was applied"
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == ["step-000004", "step-000005"]  # keep 2; nothing written for step 6
    for folder in list_checkpoints(run_dir):
        assert verify_folder(folder) is None
    good = latest_good_checkpoint(run_dir)
    fresh = build_tiny_llama(tiny_tokenizer, seed=3)
    assert load_checkpoint(good, fresh)["step"] == 5
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in metrics if r["event"] == "train")
    assert not (run_dir / ".lock").exists()
    if math.isnan(poison):  # the fault was transient: resuming from the intact checkpoint is exact
        resumed = rt.run(tiny_tokenizer, run_dir, seed=9, resume=True)
        assert not rt.same_weights(rt.weights(resumed), reference["weights"])
    _robust.OTHER_TRIALS.append({"fault": f"{poison} activations at step 6", "result":
                                 "TrainingError at step 6, checkpoints 4-5 intact"
                                 + (", resume exact" if math.isnan(poison) else "")})


def test_resume_survives_a_torn_last_line_in_metrics_jsonl(tiny_tokenizer, tmp_path):
    """A crash (power loss, full disk) mid-append can leave half a line at the end of metrics.jsonl; the
    resumed run keeps the records that parse and logs the rest again."""
    run_dir = tmp_path / "torn"
    rt.run(tiny_tokenizer, run_dir, cfg=rt.config(max_steps=4))
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"event": "train", "st')
    rt.run(tiny_tokenizer, run_dir, cfg=rt.config(max_steps=6), resume=True)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
