"""Two training runs pointed at the same run directory: the second refuses (the lock), the first is untouched.

Default: the first run is a forked child process training the tiny Llama (18 steps, a checkpoint each
step); while it holds the lock this process tries to train in the same folder, fresh and with --resume.
Slow: the same with two real `python -m instructkit train` processes on a saved tiny model, through the
CLI (exit code 2 and a message naming the folder and the other process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import _robust
import _robust_train as rt
from instructkit.errors import TrainingError
from instructkit.train.checkpoint import list_checkpoints, verify_folder

ROOT = Path(__file__).resolve().parents[2]


def _slow_validate(model) -> dict:
    time.sleep(0.08)  # stretch the first run so the second certainly starts while it trains
    return {}


@pytest.fixture(scope="module")
def warm(tiny_tokenizer, tmp_path_factory):
    """Pay the first-training costs (imports, first kernels: seconds) in this process BEFORE forking, so
    the second run reaches the lock in milliseconds instead of after the first run has finished."""
    rt.run(tiny_tokenizer, tmp_path_factory.mktemp("warm"), cfg=rt.config(max_steps=1))


@pytest.mark.timeout(180)
def test_second_run_in_the_same_folder_refuses_and_never_corrupts_the_first(tiny_tokenizer, warm, tmp_path):
    run_dir = tmp_path / "shared-run"
    final = tmp_path / "first-final.safetensors"
    cfg = rt.config(eval_every=1)

    def first() -> None:
        from safetensors.torch import save_file

        model = rt.run(tiny_tokenizer, run_dir, cfg=cfg, validate=_slow_validate)
        save_file(rt.weights(model), str(final))

    process = rt.start_child(first)
    try:
        assert rt.wait_for(lambda: (run_dir / "checkpoints" / "step-000002").is_dir(), process), \
            f"the first run did not start (exit {process.exitcode})"
        lock = run_dir / ".lock"
        assert lock.read_text().strip() == str(process.pid)
        for resume in (False, True):
            with pytest.raises(TrainingError, match=rf"{run_dir} is in use by another training run "
                                                    rf"\(process {process.pid}, lock file {lock}\)"):
                rt.run(tiny_tokenizer, run_dir, seed=1, resume=resume, cfg=cfg)
            assert lock.read_text().strip() == str(process.pid), "the refused run touched the lock"
        refused_while_running = process.is_alive()
    finally:
        process.join(120)
    assert refused_while_running, "the first run ended before the second tried: the test proved nothing"
    assert process.exitcode == 0, f"the first run failed (exit {process.exitcode})"

    # The first run is exactly what it would have been alone.
    from safetensors.torch import load_file

    alone = rt.run(tiny_tokenizer, tmp_path / "alone", cfg=cfg, validate=lambda m: {})
    assert not rt.same_weights(load_file(str(final)), rt.weights(alone))
    for folder in list_checkpoints(run_dir):
        assert verify_folder(folder) is None
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "train"]
    assert steps == list(range(1, rt.STEPS + 1))  # one writer: no duplicated or interleaved records
    assert not (run_dir / ".lock").exists()
    _robust.OTHER_TRIALS.append({"fault": "second run in the same folder (fresh and --resume)",
                                 "result": "TrainingError naming folder and pid; first run bitwise unchanged"})


def test_lock_of_a_dead_process_is_taken_over(tiny_tokenizer, tmp_path, caplog):
    """A run killed with SIGKILL leaves its lock; the next run takes it over (with a warning)."""
    run_dir = tmp_path / "stale"
    process = rt.start_child(lambda: time.sleep(60))
    run_dir.mkdir()
    (run_dir / ".lock").write_text(f"{process.pid}\n")
    assert rt.sigkill(process)
    with caplog.at_level("WARNING"):
        rt.run(tiny_tokenizer, run_dir, cfg=rt.config(max_steps=1))
    assert "stale lock" in caplog.text
    assert not (run_dir / ".lock").exists()


@pytest.mark.parametrize("content", ["", "not a pid\n", "0\n", "-5\n", "99999999999999999999\n"])
def test_unreadable_lock_contents_are_treated_as_stale(content, tiny_tokenizer, tmp_path):
    run_dir = tmp_path / "odd-lock"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(content)
    with _robust.time_limit(60, "training after an odd lock"):
        rt.run(tiny_tokenizer, run_dir, cfg=rt.config(max_steps=1))
    assert not (run_dir / ".lock").exists()
    _robust.tried("lock file contents")


# --------------------------------------------------------------------------------------------------
# Slow: two real CLI processes
# --------------------------------------------------------------------------------------------------


def _cli(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "instructkit", "train", str(config), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=config.parent)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_cli_train_processes_on_one_run_directory(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "completion": f"answer {i % 5}"}) + "\n"
                            for i in range(40)), encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(
        "name: shared\n"
        f"output_dir: {tmp_path / 'runs'}\n"
        "datasets: [{path: sft.jsonl}]\n"
        f"model: {{name: {tiny_model_dir}, max_length: 64}}\n"
        "train: {max_steps: 400, batch_size: 4, save_every: 1, eval_every: 1000, threads: 1, lr: 1.0e-3}\n",
        encoding="utf-8")
    run_dir = tmp_path / "runs" / "shared"
    first = _cli(config)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / ".lock").exists():
            assert first.poll() is None, first.communicate()[1].decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = _cli(config)
        out, err = second.communicate(timeout=300)
        message = err.decode(errors="replace")
        assert first.poll() is None, "the first run ended before the second reached the lock"
        assert second.returncode == 2, message[-3000:]
        assert "in use by another training run" in message and str(first.pid) in message and "shared" in message
    finally:
        first_out, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err.decode(errors="replace")[-3000:]
    assert (run_dir / "model" / "model.safetensors").is_file()
    for folder in list_checkpoints(run_dir):
        assert verify_folder(folder) is None
    _robust.OTHER_TRIALS.append({"fault": "two `instructkit train` processes on one run directory",
                                 "result": "second exits 2 naming the folder and pid; first completes"})


@pytest.mark.parametrize("command", ["run", "prepare"])
def test_run_and_prepare_refuse_a_folder_locked_by_a_live_process(command, tiny_model_dir, tmp_path, capsys):
    """The lock covers the whole pipeline: nothing is prepared or evaluated under a live run's lock."""
    from instructkit.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"name": "busy", "output_dir": str(tmp_path / "runs"),
                                  "datasets": [{"path": "demo", "schema": "amazon_us_reviews", "max_rows": 40,
                                                "templates": ["amazon_us_reviews.predict_rating"]}],
                                  "model": {"name": str(tiny_model_dir)}}))
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(f"{holder.pid}\n")
        assert main([command, str(config)]) == 2
        assert f"process {holder.pid}" in " ".join(capsys.readouterr().err.split())
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
