"""Subprocess for the fp16 loss-scale resume test (accelerate keeps one mixed-precision state per process).

    python tests/train/_fp16_scaler_worker.py WORK_DIR [--cpu-fp16]

Accelerate runs CPU fp16 unscaled; here it gets what it does on CUDA, fp16 autocast and a GradScaler
(growth every 2 good steps, so the scale moves within a few steps). Step 2's gradient is made Inf once: the
scaler skips it and halves its scale. Two runs of 6 steps (linear schedule, a checkpoint every step): one
uninterrupted, one stopped in step 4's backward and resumed from checkpoint 3 with a fresh scaler (as a
new process has). Prints JSON: both final scaler states, the largest weight difference, both runs' gradient
norms and learning rates.

--cpu-fp16: accelerate's own CPU fp16 instead (no autocast, no scaler), the same Inf at step 2, a checkpoint
every step. Prints JSON: the error, the checkpoints written and whether each one's weights are finite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _train_helpers as h


def cpu_fp16(work: Path) -> None:
    import torch
    from conftest import build_tiny_llama, build_tiny_tokenizer
    from safetensors.torch import load_file

    from instructkit.errors import TrainingError
    from instructkit.train.checkpoint import list_checkpoints
    from instructkit.train.loop import TrainData, TrainOptions, train

    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer()
    dataset, settings = h.tokenized(h.make_examples(24), tokenizer)
    model = build_tiny_llama(tokenizer)
    backwards = []

    def overflow(grad):
        backwards.append(1)
        return grad * float("inf") if len(backwards) == 2 else grad

    model.model.norm.weight.register_hook(overflow)
    error = None
    try:
        cfg = h.train_config(batch_size=4, max_steps=4, packing=False, precision="fp16", save_every=1)
        train(model, tokenizer, TrainData(dataset), cfg, work,
              TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))
    except TrainingError as exc:
        error = str(exc)
    print(json.dumps({"error": error, "checkpoints": {p.name: all(bool(torch.isfinite(t).all()) for t in load_file(
        str(p / "model.safetensors")).values()) for p in list_checkpoints(work)}}))


def main(work: Path) -> None:
    import torch
    from accelerate import Accelerator
    from conftest import build_tiny_llama, build_tiny_tokenizer

    from instructkit.train.loop import TrainData, TrainOptions, train

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp = True
    tokenizer = build_tiny_tokenizer()
    dataset, settings = h.tokenized(h.make_examples(24), tokenizer)

    class Stop(Exception):
        pass

    def run(run_dir: Path, resume: bool = False, overflow_at: int = 2, stop_at: int = 0):
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
        model = build_tiny_llama(tokenizer, seed=5 if resume else 0)
        backwards = []

        def overflow(grad):
            backwards.append(1)
            if len(backwards) == stop_at:
                raise Stop()
            return grad * float("inf") if len(backwards) == overflow_at else grad

        model.model.norm.weight.register_hook(overflow)
        cfg = h.train_config(batch_size=4, max_steps=6, packing=False, precision="fp16", schedule="linear",
                             save_every=1)
        try:
            train(model, tokenizer, TrainData(dataset), cfg, run_dir,
                  TrainOptions(settings=settings, is_seq2seq=False, show_progress=False, resume=resume,
                               accelerator=accelerator))
        except Stop:
            return None, None
        records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if r["event"] == "train"]
        return dict(model.named_parameters()), (accelerator.scaler.state_dict(), records)

    reference, (ref_scaler, ref_records) = run(work / "full")
    run(work / "cut", stop_at=4)  # stopped in step 4's backward: checkpoint 3 is the newest
    resumed, (scaler, records) = run(work / "cut", resume=True, overflow_at=0)  # step 2's skip is behind it
    worst = max((reference[k] - resumed[k]).abs().max().item() for k in reference)
    print(json.dumps({"reference": ref_scaler, "resumed": scaler, "worst": worst,
                      "reference_norms": [r["grad_norm"] for r in ref_records],
                      "resumed_norms": [r["grad_norm"] for r in records],
                      "reference_lrs": [r["lr"] for r in ref_records], "resumed_lrs": [r["lr"] for r in records]}))


if __name__ == "__main__":
    (cpu_fp16 if "--cpu-fp16" in sys.argv else main)(Path(sys.argv[1]))
