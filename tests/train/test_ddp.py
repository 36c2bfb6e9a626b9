"""Multi-process training on CPU (torchrun, gloo, DDP) and the FSDP example config (FSDP itself:
test_fsdp.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
