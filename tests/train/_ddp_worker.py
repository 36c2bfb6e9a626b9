"""One process of the multi-process tests; run under torchrun (CPU, gloo, 1 thread per process).

    torchrun --standalone --nproc_per_node 2 tests/train/_ddp_worker.py OUT_DIR [--packing]
        [--steps N] [--sleep SECONDS]

Trains the tiny Llama on `examples()` with batch_size 2 per process (global batch 4) and writes
OUT_DIR/metrics.jsonl (main process), OUT_DIR/final.safetensors and OUT_DIR/dropout-RANK.json
(`record_dropout_mask`). --steps N trains N steps with no
scheduled checkpoint but the last; --sleep slows every forward pass (the parent signals the run mid-step).
A run stopped by a signal prints "rank R interrupted: ..." and exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys

import _train_helpers

COMPLETIONS = ["1", "the kettle leaks fast and the quick brown fox", "5", "great coffee fast shipping", "2",
               "the lazy dog", "3 4 5 1 2"]
STEPS = 5


def examples():
    return _train_helpers.make_examples(20, seed=4, completions=COMPLETIONS)


def config(per_process_batch: int, packing: bool):
    return _train_helpers.train_config(batch_size=per_process_batch, max_steps=STEPS, lr=3e-3, packing=packing,
                                       schedule="linear", warmup_ratio=0.2, group_by_length=True)


def record_dropout_mask(model, path: str) -> None:
    """At the first training forward, the dropout mask (p=0.5, 32 values) the process's generator would draw
    next (on a fork of it: training is unchanged) -> `path` as JSON."""
    import json

    import torch

    def hook(module, inputs):
        if module.training and not os.path.exists(path):
            with torch.random.fork_rng(devices=[]):
                mask = torch.nn.functional.dropout(torch.ones(32), 0.5, training=True)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump((mask > 0).int().tolist(), handle)

    model.register_forward_pre_hook(hook)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()

    import time

    import torch
    from accelerate import Accelerator
    from conftest import build_tiny_llama, build_tiny_tokenizer

    from instructkit.train.loop import TrainData, TrainOptions, train

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer).train()
    dataset, settings = _train_helpers.tokenized(examples(), tokenizer)
    cfg = config(2, args.packing)
    if args.steps:
        cfg = cfg.model_copy(update={"max_steps": args.steps, "save_every": 10 * args.steps,
                                     "save_every_minutes": None})
    os.makedirs(args.out_dir, exist_ok=True)
    record_dropout_mask(model, os.path.join(args.out_dir, f"dropout-{accelerator.process_index}.json"))
    if args.sleep:
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(args.sleep))
    from instructkit.train.interrupt import TrainingInterrupted

    try:
        result = train(model, tokenizer, TrainData(dataset), cfg, args.out_dir,
                       TrainOptions(settings=settings, is_seq2seq=False, accelerator=accelerator,
                                    show_progress=False))
    except TrainingInterrupted as stop:
        print(f"rank {accelerator.process_index} interrupted: {stop}", file=sys.stderr)
        sys.exit(130)
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        from instructkit.train.checkpoint import trainable_state

        save_file(trainable_state(model), os.path.join(args.out_dir, "final.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"done {result.steps} steps on {accelerator.num_processes} processes "
              f"distributed_type={accelerator.distributed_type}", file=sys.stderr)
    accelerator.end_training()


if __name__ == "__main__":
    main()
