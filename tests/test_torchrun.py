"""`torchrun --nproc_per_node 2 -m instructkit train CONFIG` end to end, as users launch it (CPU, gloo), for
ddp and fsdp: rank 0 prepares, tokenizes, validates and saves while the other process waits, and no file
is written by both processes (every write of both is recorded with a Python audit hook). The model
folder loads with plain transformers, instructkit blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# Loaded into every process of the launch (sitecustomize): records, per process, the files it opens for
# writing, renames onto or removes under AUDIT_ROOT, in AUDIT_LOG/<pid>.json at exit.
AUDIT = '''
import atexit, json, os, sys
_root, _log, _seen = os.environ["AUDIT_ROOT"], os.environ["AUDIT_LOG"], set()
def _hook(event, args):
    path = None
    if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        if (mode and any(c in mode for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            path = args[0]
    elif event in ("os.rename", "os.replace"):
        path = args[1]
    elif event in ("os.remove", "shutil.rmtree"):
        path = args[0]
    if isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(_root):
        _seen.add(os.path.abspath(os.fspath(path)))
def _dump():
    with open(os.path.join(_log, f"{os.getpid()}.json"), "w") as handle:
        json.dump(sorted(_seen), handle)
sys.addaudithook(_hook)
atexit.register(_dump)
'''


def _config(folder: Path, model_dir: Path, sharding: str) -> Path:
    config = {
        "name": sharding, "output_dir": str(folder / "runs"),
        "datasets": [{"path": "demo", "schema": "amazon_us_reviews", "max_rows": 40,
                      "templates": ["amazon_us_reviews.predict_rating", "amazon_us_reviews.describe_review"],
                      "templates_per_row": 1}],
        "split": {"seed": 0, "validation": 0.2, "test": 0.2},
        "model": {"name": str(model_dir), "max_length": 96},
        "train": {"lr": 3e-3, "max_steps": 4, "batch_size": 2, "threads": 1, "eval_every": 4, "save_every": 2,
                  "eval_max_examples": 6, "sharding": sharding,
                  # fsdp: FSDP2's bf16 MixedPrecisionPolicy and per-layer activation checkpointing, on CPU
                  "precision": "bf16" if sharding == "fsdp" else "fp32",
                  "gradient_checkpointing": sharding == "fsdp"},
        "eval": {"max_new_tokens": {"summarization": 4}, "few_shot": []},
    }
    path = folder / f"{sharding}.yaml"
    path.write_text(json.dumps(config))
    return path


def _launch(tmp_path: Path, config: Path, command: str = "train") -> tuple[subprocess.CompletedProcess, list]:
    hook, logs = tmp_path / "hook", tmp_path / "audit"
    hook.mkdir()
    logs.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "AUDIT_ROOT": str(tmp_path / "runs"), "AUDIT_LOG": str(logs),
           "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "instructkit", command, str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          check=False)
    return done, [json.loads(p.read_text()) for p in sorted(logs.glob("*.json"))]


def _loads_without_instructkit(model_dir: Path) -> float:
    code = ("import sys; sys.modules['instructkit'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n"
            f"AutoTokenizer.from_pretrained({str(model_dir)!r})\n"
            "print(model.model.embed_tokens.weight.double().sum().item())\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch has no gloo backend")
# ddp: slow (~60-80 s here), the launch path is the same as fsdp's; test_ddp.py covers DDP training by default
@pytest.mark.parametrize("sharding", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_torchrun_instructkit_train_is_rank_aware(tmp_path, tiny_model_dir, sharding):
    done, writes = _launch(tmp_path, _config(tmp_path, tiny_model_dir, sharding))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    run_dir = tmp_path / "runs" / sharding
    # Two training processes, each with its half of every step
    state = json.loads((run_dir / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["sampler"]["world_size"] == 2 and state["step"] == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["event"] == "eval"]  # loss and task metrics, generation too (fsdp too)
    assert [r["step"] for r in evals] == [4] and {"val_loss", "macro_f1", "rougeL"} <= set(evals[0]), evals
    # No file written by both: the launcher + 2 workers recorded, only rank 0 wrote the shared files
    assert len(writes) == 3, writes
    written = [set(w) for w in writes]
    both = sorted(path for i, a in enumerate(written) for b in written[i + 1:] for path in a & b)
    assert not both, both
    assert {str(run_dir / "train.jsonl"), str(run_dir / "metrics.jsonl")} <= set().union(*written)
    if sharding == "fsdp":  # the hook sees both workers: each wrote its own DCP shard
        shard = [sorted({Path(p).name for p in w if "/sharded/shard-" in p}) for w in written]
        assert sorted(shard) == [[], ["shard-00001-model-00001-of-00001.safetensors"],
                                 ["shard-00002-model-00001-of-00001.safetensors"]]
    assert len(list((run_dir / "cache" / "tokenized").iterdir())) == 2  # train + validation, tokenized once
    # One plain Hugging Face folder, consolidated, loadable without instructkit
    model_dir = run_dir / "model"
    assert sorted(p.name for p in model_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert (model_dir / "README.md").is_file() and (model_dir / "tokenizer.json").is_file()
    saved = load_file(str(model_dir / "model.safetensors"))
    assert _loads_without_instructkit(model_dir) == saved["model.embed_tokens.weight"].double().sum().item()
    if sharding == "fsdp":  # the saved weights are the two halves of the last sharded checkpoint, joined
        shards = sorted((run_dir / "checkpoints" / "step-000004" / "sharded").glob("*.safetensors"))
        halves = [load_file(str(p)) for p in shards]
        keys = [k for k in halves[0] if k.startswith("model.")]
        assert len(keys) == len(saved) > 10
        assert all(v.dtype == torch.float32 for v in saved.values())  # bf16 compute, fp32 master weights
        for key in keys:
            assert torch.equal(torch.cat([halves[0][key], halves[1][key]]), saved[key[len("model."):]]), key


@pytest.mark.slow  # prepare, two evaluations and the report besides training (~1-2 min on 2 shared cores)
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch has no gloo backend")
def test_torchrun_instructkit_run_evaluates_on_rank_0_only(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, "fsdp")
    done, writes = _launch(tmp_path, config, command="run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    run_dir = tmp_path / "runs" / "fsdp"
    assert (run_dir / "report.json").is_file() and (run_dir / "eval" / "tuned" / "eval.json").is_file()
    assert json.loads((run_dir / "train_result.json").read_text())["steps"] == 4
    written = [set(w) for w in writes]
    assert not sorted(path for i, a in enumerate(written) for b in written[i + 1:] for path in a & b)
    assert done.stdout.count("base vs fine-tuned") == 1  # the summary is printed once
