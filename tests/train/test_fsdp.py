"""train.sharding=fsdp (FSDP2) on 2 CPU processes (torchrun, gloo): the same losses as one process and as
DDP, sharded DCP checkpoints without pickle, bitwise resume after SIGKILL, and resharding 2 -> 1.

Each torchrun launch of the tiny Llama (6 steps, a checkpoint each) takes ~10-25 s on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import HERE, tokenized
from conftest import build_tiny_llama
from safetensors.torch import load_file

ROOT = HERE.parents[1]
WORKER = HERE / "_shard_worker.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch has no gloo backend")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def _torchrun(out_dir: Path, *flags: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), str(out_dir), *flags]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("event") == "train"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final.safetensors"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """The uninterrupted 2-process FSDP run: 6 steps, global batch 4, a checkpoint every step."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _ok(_torchrun(out, "--sharding", "fsdp"))
    return out


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """The same run, SIGKILLed after its step-4 checkpoint, in the middle of writing step 5's: rank 0 dies
    with both shards of step 5 on disk but not the state, RNG or manifest (torchrun then ends rank 1)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    done = _torchrun(out, "--sharding", "fsdp", "--kill-in-save", "5")
    assert done.returncode != 0 and "Signal 9 (SIGKILL)" in done.stderr + done.stdout, done.stderr[-3000:]
    return out


def _one_process(tiny_tokenizer, out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: one process, batch 4 = the 2 processes' global batch of 2 x 2."""
    import _ddp_worker
    import _shard_worker

    from instructkit.train.loop import TrainData, TrainOptions, train

    model = build_tiny_llama(tiny_tokenizer).train()
    dataset, settings = tokenized(_ddp_worker.examples(), tiny_tokenizer)
    single = train(model, tiny_tokenizer, TrainData(dataset), _shard_worker.config(4, None), out,
                   TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))
    losses = [r["loss"] for r in single.history if r["event"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    return losses, model.state_dict()


def _matches(run_dir: Path, losses: list[float], state: dict[str, torch.Tensor]) -> None:
    np.testing.assert_allclose(_losses(run_dir), losses, rtol=1e-4, atol=0)
    weights = _weights(run_dir)
    assert weights.keys() <= state.keys() and len(weights) > 10
    assert max((weights[k] - state[k]).abs().max().item() for k in weights) < 1e-4


def test_two_process_fsdp_matches_one_process(fsdp_run, tmp_path, tiny_tokenizer):
    _matches(fsdp_run, *_one_process(tiny_tokenizer, tmp_path / "one"))
    # FSDP really sharded: each process kept half of every AdamW moment
    shards = sorted((fsdp_run / "checkpoints" / "step-000006" / "sharded").iterdir())
    assert [p.name for p in shards] == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    halves = [load_file(str(p)) for p in shards]
    key = "optimizer.state.model.layers.0.mlp.up_proj.weight.exp_avg"
    assert halves[0][key].shape[0] + halves[1][key].shape[0] == 128  # intermediate_size, split on dim 0


@pytest.mark.slow  # one more 2-process launch (~30 s); test_ddp.py checks DDP against one process by default
def test_two_process_ddp_matches_one_process_over_the_same_6_steps(tmp_path, tiny_tokenizer):
    _ok(_torchrun(tmp_path / "ddp", "--sharding", "ddp"))
    _matches(tmp_path / "ddp", *_one_process(tiny_tokenizer, tmp_path / "one"))


def test_fsdp_checkpoint_is_sealed_and_pickle_free(fsdp_run):
    from instructkit.train.checkpoint import latest_good_checkpoint, verify_folder

    folder = fsdp_run / "checkpoints" / "step-000006"
    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    assert all(f.endswith((".safetensors", ".json")) for f in files), files  # no DCP .metadata (pickle)
    assert not any(p.read_bytes()[:1] == b"\x80" for p in folder.rglob("*") if p.is_file())  # pickle magic
    assert verify_folder(folder) is None
    shard = folder / "sharded" / "shard-00002-model-00001-of-00001.safetensors"
    damaged = fsdp_run.parent / "damaged"
    shutil.copytree(fsdp_run, damaged)
    target = damaged / "checkpoints" / "step-000006" / "sharded" / shard.name
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    assert "sha256" in verify_folder(target.parent.parent)
    assert latest_good_checkpoint(damaged).name == "step-000005"  # the damaged newest one is skipped


def test_fsdp_killed_after_step_4_resumes_bitwise(fsdp_run, killed_run, tmp_path):
    from instructkit.train.checkpoint import latest_good_checkpoint, list_checkpoints

    (partial,) = (killed_run / "checkpoints").glob(".tmp-step-000005-*")  # the half-written step 5
    assert len(list((partial / "sharded").iterdir())) == 2 and not (partial / "manifest.json").exists()
    assert [p.name for p in list_checkpoints(killed_run)] == ["step-000003", "step-000004"]
    assert latest_good_checkpoint(killed_run).name == "step-000004"
    resumed = tmp_path / "resumed"
    shutil.copytree(killed_run, resumed)
    _ok(_torchrun(resumed, "--sharding", "fsdp", "--resume"))
    assert not list((resumed / "checkpoints").glob(".tmp-*"))  # the partial write was cleared
    expected, got = _weights(fsdp_run), _weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bitwise
    assert _losses(resumed) == _losses(fsdp_run)


def test_fsdp_checkpoint_of_2_processes_resumes_on_1_without_pickle(fsdp_run, killed_run, tmp_path):
    """DCP reshards: one process (global batch 4 = batch 4) loads both halves; nothing is unpickled."""
    resumed = tmp_path / "one"
    shutil.copytree(killed_run, resumed)
    done = _torchrun(resumed, "--sharding", "fsdp", "--batch", "4", "--resume", "--no-pickle", nproc=1)
    _ok(done)
    assert "2 when" in done.stderr and "resume" in done.stderr  # the resharding warning
    np.testing.assert_allclose(_losses(resumed), _losses(fsdp_run), rtol=1e-5, atol=0)
    expected, got = _weights(fsdp_run), _weights(resumed)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-5


def test_fsdp_refuses_what_it_cannot_do():
    from instructkit.config import TrainConfig
    from instructkit.errors import TrainingError
    from instructkit.train.sharding import resolve_sharding

    with pytest.raises(ValueError, match="fp16"):
        TrainConfig(sharding="fsdp", precision="fp16")
    with pytest.raises(ValueError, match="LoRA"):
        TrainConfig(sharding="fsdp", lora={"enabled": True})
    assert resolve_sharding(TrainConfig(), 1) == "none"
    assert resolve_sharding(TrainConfig(), 2) == "ddp"
    with pytest.raises(TrainingError, match="sharding=none with 2 processes"):
        resolve_sharding(TrainConfig(sharding="none"), 2)
    with pytest.raises(TrainingError, match="train.sharding: fsdp"):
        resolve_sharding(TrainConfig(), 2, "DistributedType.DEEPSPEED")


def test_fsdp_without_a_launcher_says_how_to_launch(tiny_tokenizer, tmp_path):
    import _shard_worker

    from instructkit.errors import TrainingError
    from instructkit.train.loop import TrainData, TrainOptions, train

    dataset, settings = tokenized(_shard_worker._train_helpers.make_examples(4), tiny_tokenizer)
    with pytest.raises(TrainingError, match="torchrun"):
        train(build_tiny_llama(tiny_tokenizer), tiny_tokenizer, TrainData(dataset),
              _shard_worker.config(4, "fsdp"), tmp_path,
              TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))


@pytest.mark.slow  # one more 2-process launch (~30 s on 2 shared cores)
def test_fsdp_keeps_and_restores_the_best_weights_as_one_process_does(tmp_path, tiny_tokenizer):
    import _ddp_worker
    import _shard_worker

    from instructkit.train.loop import TrainData, TrainOptions, train

    _ok(_torchrun(tmp_path / "fsdp", "--sharding", "fsdp", "--val"))
    model = build_tiny_llama(tiny_tokenizer).train()
    dataset, settings = tokenized(_ddp_worker.examples(), tiny_tokenizer)
    val, _ = tokenized(_shard_worker.validation_examples(), tiny_tokenizer)
    cfg = _shard_worker.config(4, None, **_shard_worker.VAL)
    single = train(model, tiny_tokenizer, TrainData(dataset, val), cfg, tmp_path / "one",
                   TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))
    fsdp = json.loads((tmp_path / "fsdp" / "train_result.json").read_text())
    assert fsdp["best_metric"] == single.best_metric == "val_loss"
    assert fsdp["best_step"] == single.best_step and single.best_step < 6  # the best is not the last step
    np.testing.assert_allclose(fsdp["best_value"], single.best_value, rtol=1e-4)
    weights = _weights(tmp_path / "fsdp")  # the restored best weights, gathered
    assert max((weights[k] - model.state_dict()[k]).abs().max().item() for k in weights) < 1e-4
