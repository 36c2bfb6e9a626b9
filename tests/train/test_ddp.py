"""Multi-process training on CPU (torchrun, gloo, DDP) and the FSDP example config (FSDP itself:
test_fsdp.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _train_helpers import HERE, tokenized, trainable_tensors
from conftest import build_tiny_llama

ROOT = HERE.parents[1]
EXAMPLES = ROOT / "examples"


def _torchrun(out_dir: Path, *flags: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HERE / "_ddp_worker.py"), str(out_dir), *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _single_process(tokenizer, tmp_path: Path, packing: bool):
    """The reference: one process, batch 4 = the 2 processes' global batch of 2 x 2."""
    sys.path.insert(0, str(HERE))
    import _ddp_worker

    from instructkit.train.loop import TrainData, TrainOptions, train

    model = build_tiny_llama(tokenizer).train()
    (tmp_path / "single").mkdir()
    _ddp_worker.record_dropout_mask(model, str(tmp_path / "single" / "dropout-0.json"))
    dataset, settings = tokenized(_ddp_worker.examples(), tokenizer)
    result = train(model, tokenizer, TrainData(dataset), _ddp_worker.config(4, packing), tmp_path / "single",
                   TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))
    return [r["loss"] for r in result.history], trainable_tensors(model), dataset


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_unequal_label_tokens_per_rank(dataset, packing: bool) -> None:
    """The point of the test: the processes hold different numbers of label tokens in some step."""
    from instructkit.data.batching import TokenTable
    from instructkit.data.sampler import BatchPlan, plan_epoch

    table = TokenTable.from_dataset(dataset)
    counts = table.label_counts()
    steps = plan_epoch(table.lengths, BatchPlan(2, 1, 2, packing, 2 * 64, group_by_length=True), epoch=0)
    per_rank = [[sum(int(counts[i]) for mb in rank for row in mb for i in row) for rank in step] for step in steps]
    assert any(a != b for a, b in per_rank), per_rank


@pytest.mark.parametrize("packing", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_processes_match_one_process_at_the_same_global_batch(tiny_tokenizer, tmp_path, packing):
    flags = ["--packing"] if packing else []
    done = _torchrun(tmp_path / "ddp", *flags)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 processes" in done.stderr
    single_losses, single_weights, dataset = _single_process(tiny_tokenizer, tmp_path, packing)
    _check_unequal_label_tokens_per_rank(dataset, packing)
    ddp_losses = _losses(tmp_path / "ddp")
    assert len(ddp_losses) == len(single_losses) == 5
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=1e-5, atol=0)
    from safetensors.torch import load_file

    ddp_weights = load_file(str(tmp_path / "ddp" / "final.safetensors"))
    assert ddp_weights.keys() == single_weights.keys()
    worst = max((ddp_weights[k] - single_weights[k]).abs().max().item() for k in ddp_weights)
    assert worst < 1e-5
    assert (tmp_path / "ddp" / "checkpoints" / "step-000005" / "manifest.json").is_file()
    # accelerate#236: each process draws its own dropout masks (seed + rank); one process keeps train.seed's
    masks = [json.loads((tmp_path / run / f"dropout-{r}.json").read_text())
             for run, r in (("ddp", 0), ("ddp", 1), ("single", 0))]
    assert masks[0] != masks[1] and masks[0] == masks[2]


# --------------------------------------------------------------------------------------------------
# The sharded example config (FSDP2 is the supported sharding; the DeepSpeed configs are gone)
# --------------------------------------------------------------------------------------------------


def test_fsdp_example_config_is_launched_with_torchrun():
    from instructkit.config_load import load_config

    text = (EXAMPLES / "fsdp.yaml").read_text()
    assert "torchrun --nproc_per_node 2 -m instructkit train examples/fsdp.yaml" in text.splitlines()[1]
    config = load_config(EXAMPLES / "fsdp.yaml")
    assert config.train.sharding == "fsdp" and config.train.precision == "bf16"
    assert config.train.gradient_checkpointing
    assert not (EXAMPLES / "deepspeed_zero3.yaml").exists() and not (EXAMPLES / "accelerate").exists()


@pytest.mark.slow  # a 2-process launch signalled mid-run (~1-2 min on 2 shared cores)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_torchrun_checkpoints_the_step_in_flight_on_every_process(tmp_path, sig):
    """pytorch/pytorch#68258: torchrun forwards SIGTERM (and Ctrl-C's SIGINT) to its workers, then SIGKILLs them
    after 30 s. With SIGTERM the workers died mid-step without a checkpoint; now both finish the step, write
    its checkpoint together and stop (exit 130), as with Ctrl-C."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_ddp_worker.py"), str(out), "--steps", "40", "--sleep", "0.2"]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()[-3000:]
            time.sleep(0.1)
        launcher.send_signal(sig)
        log = launcher.communicate(timeout=120)[0]
    finally:
        launcher.kill()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= steps[-1] < 40, log[-3000:]
    from instructkit.train.checkpoint import list_checkpoints, verify_folder

    (checkpoint,) = list_checkpoints(out)  # no scheduled checkpoint before step 40: this one is the signal's
    assert checkpoint.name == f"step-{steps[-1]:06d}" and verify_folder(checkpoint) is None, log[-3000:]
    # two processes write to one pipe: their lines may come out joined ("rank 0 interrupted: ...rank 1 ...")
    assert sorted(re.findall(r"(rank \d+) interrupted: ", log)) == ["rank 0", "rank 1"], log[-3000:]
