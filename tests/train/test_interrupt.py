"""Ctrl-C and wall-clock checkpoints (train/interrupt.py), and the progress a user sees off a terminal
(instructkit/progress.py).

Ctrl-C is a real SIGINT raised inside the run (`signal.raise_signal`) from a forward hook (during an
optimizer step) or from the validation callable, so the loop's own handler sees it exactly as from a
keyboard."""

from __future__ import annotations

import json
import logging
import signal
from types import SimpleNamespace

import pytest
import torch
from _train_helpers import make_examples, tokenized, train_config, trainable_tensors
from conftest import build_tiny_llama

from instructkit.progress import ProgressBar, format_seconds, plain_line
from instructkit.train.checkpoint import latest_good_checkpoint, list_checkpoints
from instructkit.train.interrupt import StopControl, TrainingInterrupted
from instructkit.train.loop import TrainData, TrainOptions, train


def _run(model, tokenizer, dataset, settings, run_dir, cfg, **kwargs):
    val = kwargs.pop("val_data", None)
    kwargs.setdefault("show_progress", False)
    return train(model, tokenizer, TrainData(dataset, val), cfg, run_dir,
                 TrainOptions(settings=settings, is_seq2seq=False, **kwargs))


def _sigint_at_training_forward(model, calls: list[int], count: int = 1) -> None:
    """Raise SIGINT `count` times inside the training forward pass number calls[0] (1-based)."""
    seen = [0]

    def hook(module, args, output):
        if module.training:
            seen[0] += 1
            if seen[0] == calls[0]:
                for _ in range(count):
                    signal.raise_signal(signal.SIGINT)

    model.register_forward_hook(hook)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def data(tiny_tokenizer):
    dataset, settings = tokenized(make_examples(24), tiny_tokenizer)
    val, _ = tokenized(make_examples(6, seed=9), tiny_tokenizer)
    # 24 examples / 4 = 6 steps per epoch, 12 in all; validation (and a checkpoint) every 4 steps
    cfg = train_config(batch_size=4, epochs=2, lr=3e-3, schedule="linear", warmup_ratio=0.2, eval_every=4)
    return dataset, val, settings, cfg


def test_ctrl_c_during_a_step_checkpoints_that_step_and_resume_is_exact(tiny_tokenizer, tmp_path, data):
    """The issue's case: Ctrl-C at step 6 of 12 with no `save_every`: a checkpoint of step 6 is written,
    the exception says so, and the resumed run ends with the uninterrupted run's weights and losses."""
    dataset, val, settings, cfg = data
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or a background job, else Python's
    reference_model = build_tiny_llama(tiny_tokenizer)
    reference = _run(reference_model, tiny_tokenizer, dataset, settings, tmp_path / "full", cfg, val_data=val,
                     restore_best=False)

    model = build_tiny_llama(tiny_tokenizer)
    _sigint_at_training_forward(model, [6])  # one forward per step here (batch 4, packed, no accumulation)
    with pytest.raises(TrainingInterrupted) as caught:
        _run(model, tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg, val_data=val, restore_best=False)
    stop = caught.value
    assert (stop.step, stop.total_steps, stop.checkpoint_step, stop.written_now) == (6, 12, 6, True)
    assert latest_good_checkpoint(tmp_path / "cut") == stop.checkpoint
    assert stop.checkpoint.name == "step-000006"
    assert str(stop) == f"training stopped at step 6 of 12; checkpoint written at step 6 ({stop.checkpoint})"
    assert stop.continue_hint("run the same command again") == "run the same command again to continue from step 6"
    assert not (tmp_path / "cut" / ".lock").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is put back

    resumed_model = build_tiny_llama(tiny_tokenizer, seed=5)
    resumed = _run(resumed_model, tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg, val_data=val,
                   resume=True, restore_best=False)
    assert resumed.steps == 12
    expected, final = trainable_tensors(reference_model), trainable_tensors(resumed_model)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert [r["loss"] for r in _records(tmp_path / "cut") if r["event"] == "train"] == \
        [r["loss"] for r in reference.history if r["event"] == "train"]


def test_ctrl_c_during_validation_stops_it_and_the_resumed_run_redoes_it(tiny_tokenizer, tmp_path, data):
    dataset, val, settings, cfg = data
    calls: list[int] = []
    interrupt_at = [None]

    def validate(model):
        calls.append(1)
        if len(calls) == interrupt_at[0]:
            signal.raise_signal(signal.SIGINT)  # the handler raises at once: validation is cut short
            raise AssertionError("the validation should have been stopped")
        return {"score": float(len(calls) % 3)}

    reference_model = build_tiny_llama(tiny_tokenizer)
    reference = _run(reference_model, tiny_tokenizer, dataset, settings, tmp_path / "full", cfg, val_data=val,
                     validate=validate, restore_best=False)
    calls.clear()
    interrupt_at[0] = 2  # the validation at step 8
    with pytest.raises(TrainingInterrupted) as caught:
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg,
             val_data=val, validate=validate, restore_best=False)
    assert (caught.value.step, caught.value.checkpoint_step) == (8, 8)
    assert [r["step"] for r in _records(tmp_path / "cut") if r["event"] == "eval"] == [4]  # 8 was cut short

    calls[:] = [1]  # as in the cut run: one validation done before the interrupted one
    interrupt_at[0] = None
    resumed_model = build_tiny_llama(tiny_tokenizer, seed=5)
    resumed = _run(resumed_model, tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg, val_data=val,
                   validate=validate, resume=True, restore_best=False)
    assert [r["step"] for r in _records(tmp_path / "cut") if r["event"] == "eval"] == [4, 8, 12]
    assert [r for r in _records(tmp_path / "cut") if r["event"] == "eval"] == \
        [r for r in reference.history if r["event"] == "eval"]
    assert (resumed.best_step, resumed.best_value) == (reference.best_step, reference.best_value)
    expected, final = trainable_tensors(reference_model), trainable_tensors(resumed_model)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_second_ctrl_c_stops_at_once_and_names_the_last_checkpoint(tiny_tokenizer, tmp_path, data):
    dataset, val, settings, cfg = data
    model = build_tiny_llama(tiny_tokenizer)
    _sigint_at_training_forward(model, [6], count=2)
    with pytest.raises(TrainingInterrupted) as caught:
        _run(model, tiny_tokenizer, dataset, settings, tmp_path, cfg, val_data=val)
    stop = caught.value
    assert (stop.step, stop.checkpoint_step, stop.written_now) == (5, 4, False)  # step 6 never finished
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004"]
    assert str(stop) == f"training stopped at step 5 of 12; checkpoint kept from before at step 4 ({stop.checkpoint})"
    assert stop.continue_hint("run it again") == "run it again to continue from step 4"


def test_ctrl_c_with_no_checkpoint_possible_says_training_starts_over():
    stop = TrainingInterrupted(step=0, total_steps=18, checkpoint=None, checkpoint_step=None, written_now=False)
    assert str(stop) == "training stopped at step 0 of 18; no checkpoint exists, so training will start over"
    assert stop.continue_hint("run the same command again") == \
        "run the same command again to start training over (no checkpoint to continue from)"


def test_checkpoints_follow_the_wall_clock_interval(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(12), tiny_tokenizer)  # 3 steps per epoch
    by_steps = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "steps",
                    train_config(batch_size=4, max_steps=5, save_every_minutes=None))
    assert [p.name for p in list_checkpoints(tmp_path / "steps")] == ["step-000003", "step-000005"]
    _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path / "clock",
         train_config(batch_size=4, max_steps=5, save_every_minutes=1e-9))  # due after every step
    assert [p.name for p in list_checkpoints(tmp_path / "clock")] == ["step-000004", "step-000005"]
    assert by_steps.steps == 5


def _stub_run(minutes: float | None) -> SimpleNamespace:
    accelerator = SimpleNamespace(num_processes=1, is_main_process=True)
    return SimpleNamespace(cfg=SimpleNamespace(save_every_minutes=minutes), sharded=False, main=True,
                           accelerator=accelerator, total_steps=18)


def test_wall_clock_checkpoint_is_due_after_the_interval_since_the_last_save():
    now = [100.0]
    control = StopControl(_stub_run(10), SimpleNamespace(step=0), None, clock=lambda: now[0])
    now[0] = 100.0 + 599.0
    assert control.after_step() == (False, False)
    now[0] = 100.0 + 600.0
    assert control.after_step() == (False, True)
    control.saved(None, 7)
    assert control.after_step() == (False, False)  # counted again from the save
    now[0] += 600.0
    assert control.after_step() == (False, True)
    off = StopControl(_stub_run(None), SimpleNamespace(step=0), None, clock=lambda: now[0])
    now[0] += 10_000.0
    assert off.after_step() == (False, False)


def test_config_default_checkpoints_every_ten_minutes():
    from instructkit.config import TrainConfig

    assert TrainConfig().save_every_minutes == 10.0


# --------------------------------------------------------------------------------------------------
# Progress off a terminal
# --------------------------------------------------------------------------------------------------


def test_plain_progress_line_every_interval_with_eta(caplog):
    now = [0.0]
    with caplog.at_level(logging.INFO, logger="instructkit.progress"):
        bar = ProgressBar("train", total=264, done=0, tty=False, every_s=30.0, clock=lambda: now[0])
        now[0] = 10.0
        bar.update(completed=4, info="loss 2.0000  900 tok/s")
        assert caplog.messages == []  # not yet 30 s
        now[0] = 30.0
        bar.update(completed=12, info="loss 1.2345  850 tok/s")
        now[0] = 45.0
        bar.update(completed=18)
        now[0] = 60.0
        bar.update(completed=24, info="loss 1.1000  800 tok/s")
        bar.close()
    # 12 steps in 30 s: 0.4 steps/s, 252 to go: 630 s
    assert caplog.messages == [
        "train: 12/264 (5%) loss 1.2345  850 tok/s; elapsed 30s, ETA 10m30s",
        "train: 24/264 (9%) loss 1.1000  800 tok/s; elapsed 1m00s, ETA 10m00s",
    ]  # no final line at close: nothing happened since the last one


def test_plain_progress_of_a_resumed_run_counts_its_own_rate(caplog):
    now = [0.0]
    with caplog.at_level(logging.INFO, logger="instructkit.progress"):
        bar = ProgressBar("train", total=100, done=50, tty=False, every_s=30.0, clock=lambda: now[0])
        now[0] = 40.0
        bar.update(completed=60)  # 10 steps in 40 s since the resume: 40 left take 160 s
    assert caplog.messages == ["train: 60/100 (60%); elapsed 40s, ETA 2m40s"]


def test_plain_line_and_seconds_format():
    assert format_seconds(3725.0) == "1h02m05s"
    assert format_seconds(62.4) == "1m02s"
    assert format_seconds(5.4) == "5s"
    assert format_seconds(float("nan")) == "?"
    assert plain_line("evaluate", 0, 80, "", 3.0, None) == "evaluate: 0/80 (0%); elapsed 3s, ETA ?"
    assert plain_line("evaluate", 80, 80, "", 95.0, 0.84) == "evaluate: 80/80 (100%); elapsed 1m35s, ETA 0s"


def test_training_off_a_terminal_logs_plain_progress_lines(tiny_tokenizer, tmp_path, caplog):
    dataset, settings = tokenized(make_examples(8), tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="instructkit.progress"):
        _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path,
             train_config(batch_size=4), show_progress=True)
    lines = [m for m in caplog.messages if m.startswith("train: ")]
    assert lines and lines[-1].startswith("train: 2/2 (100%) loss ")
    assert lines[-1].endswith("ETA 0s")


# --------------------------------------------------------------------------------------------------
# The best weights: linked from the same step's checkpoint, restored after a kill in between
# --------------------------------------------------------------------------------------------------


def test_best_weights_are_linked_from_the_checkpoint_of_their_step(tiny_tokenizer, tmp_path, data):
    import os

    from instructkit.train.checkpoint import best_dir, verify_folder

    dataset, val, settings, cfg = data
    result = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path, cfg, val_data=val)
    best = best_dir(tmp_path) / "model.safetensors"
    checkpoint = tmp_path / "checkpoints" / f"step-{result.best_step:06d}" / "model.safetensors"
    assert checkpoint.is_file() and os.stat(best).st_ino == os.stat(checkpoint).st_ino  # one file, not two
    assert verify_folder(best_dir(tmp_path)) is None
    assert json.loads((best_dir(tmp_path) / "best.json").read_text())["step"] == result.best_step


def test_a_kill_between_a_checkpoint_and_its_best_weights_is_repaired_on_resume(tiny_tokenizer, tmp_path, data):
    import shutil

    from safetensors.torch import load_file

    from instructkit.train.checkpoint import best_dir

    dataset, val, settings, _ = data
    cfg = train_config(batch_size=4, max_steps=4, eval_every=4, lr=3e-3)
    first = _run(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, settings, tmp_path, cfg, val_data=val)
    assert first.best_step == 4
    shutil.rmtree(best_dir(tmp_path))  # as if killed after checkpoints/step-000004 was sealed
    resumed = _run(build_tiny_llama(tiny_tokenizer, seed=5), tiny_tokenizer, dataset, settings, tmp_path, cfg,
                   val_data=val, resume=True)
    assert resumed.best_step == 4
    assert json.loads((best_dir(tmp_path) / "best.json").read_text())["step"] == 4
    best = load_file(str(best_dir(tmp_path) / "model.safetensors"))
    saved = load_file(str(tmp_path / "checkpoints" / "step-000004" / "model.safetensors"))
    assert best.keys() == saved.keys() and all(torch.equal(best[k], saved[k]) for k in saved)


# --------------------------------------------------------------------------------------------------
# What the command line says after Ctrl-C
# --------------------------------------------------------------------------------------------------


def test_the_cli_message_says_what_the_next_command_does(tmp_path):
    from argparse import Namespace
    from pathlib import Path

    from instructkit.cli import _interrupted
    from instructkit.pipeline import RunInterrupted

    path = Path("runs/demo/checkpoints/step-000006")
    written = TrainingInterrupted(6, 18, path, 6, written_now=True)
    assert _interrupted(Namespace(command="train", resume=False), written) == (
        f"training stopped at step 6 of 18; checkpoint written at step 6 ({path}); run the same command with "
        "--resume to continue from step 6")
    none = TrainingInterrupted(2, 18, None, None, written_now=False)
    assert _interrupted(Namespace(command="train", resume=False), none) == (
        "training stopped at step 2 of 18; no checkpoint exists, so training will start over; run the same "
        "command again to start training over (no checkpoint to continue from)")
    in_run = RunInterrupted("train", ["prepare", "evaluate-base"], written)
    assert _interrupted(Namespace(command="run", resume=None), in_run) == (
        f"training stopped at step 6 of 18; checkpoint written at step 6 ({path}); the finished steps (prepare, "
        "evaluate-base) are kept; run the same command again to continue from step 6")
    in_eval = RunInterrupted("evaluate-base", ["prepare"], KeyboardInterrupt())
    assert _interrupted(Namespace(command="run", resume=None), in_eval) == (
        "stopped during evaluate-base (its outputs are written whole or not at all); the finished steps "
        "(prepare) are kept; run the same command again to redo evaluate-base and go on")


def test_sigterm_checkpoints_the_step_in_flight_as_a_first_ctrl_c_does(tiny_tokenizer, tmp_path, data):
    """pytorch/pytorch#68258, Lightning#1455: torchrun, SLURM, Kubernetes and `kill` end a run with SIGTERM
    (SIGKILL after a grace period). Python's default handler killed the process mid-step and the work since
    the last checkpoint was lost; now the step in flight finishes and is checkpointed, a repeated SIGTERM
    changes nothing, and the handler in place before training is put back."""
    dataset, val, settings, cfg = data

    def default_handler(signum, frame):  # stands for SIGTERM's default (killing pytest would end the suite)
        raise AssertionError("SIGTERM reached the handler in place before training")

    before = signal.signal(signal.SIGTERM, default_handler)
    try:
        reference_model = build_tiny_llama(tiny_tokenizer)
        _run(reference_model, tiny_tokenizer, dataset, settings, tmp_path / "full", cfg, val_data=val,
             restore_best=False)
        model = build_tiny_llama(tiny_tokenizer)
        seen = [0]

        def hook(module, args, output):
            if module.training:
                seen[0] += 1
                if seen[0] == 6:
                    signal.raise_signal(signal.SIGTERM)
                    signal.raise_signal(signal.SIGTERM)  # the scheduler signals the launcher and its workers

        model.register_forward_hook(hook)
        with pytest.raises(TrainingInterrupted) as caught:
            _run(model, tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg, val_data=val, restore_best=False)
        stop = caught.value
        assert (stop.step, stop.checkpoint_step, stop.written_now) == (6, 6, True)
        assert stop.checkpoint.name == "step-000006" and latest_good_checkpoint(tmp_path / "cut") == stop.checkpoint
        assert signal.getsignal(signal.SIGTERM) is default_handler
        resumed_model = build_tiny_llama(tiny_tokenizer, seed=5)
        _run(resumed_model, tiny_tokenizer, dataset, settings, tmp_path / "cut", cfg, val_data=val, resume=True,
             restore_best=False)
        expected, final = trainable_tensors(reference_model), trainable_tensors(resumed_model)
        assert all(torch.equal(final[k], expected[k]) for k in expected)
    finally:
        signal.signal(signal.SIGTERM, before)
