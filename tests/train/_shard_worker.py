"""One process of the sharding tests; run under torchrun (CPU, gloo, 1 thread per process) or alone.

    torchrun --standalone --nproc_per_node 2 tests/train/_shard_worker.py OUT_DIR --sharding fsdp
        [--batch 2] [--resume] [--kill-in-save STEP] [--no-pickle] [--val] [--precision bf16]

Trains the tiny Llama STEPS steps on `_ddp_worker.examples()` (global batch 4: --batch 2 on 2 processes,
--batch 4 on one), checkpointing every step. Writes OUT_DIR/metrics.jsonl and, on the main process,
OUT_DIR/final.safetensors (every weight, gathered). --kill-in-save N: rank 0 SIGKILLs itself in the middle
of writing the step-N checkpoint (both shards written; state, RNG and manifest not yet). --no-pickle:
pickle.load(s) and torch.load raise while resuming.
--val: validation loss every step; the run ends with the best weights (checkpoints/best).
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys

import _train_helpers

STEPS = 6


def config(batch: int, sharding: str | None, **overrides):
    settings = {"batch_size": batch, "max_steps": STEPS, "lr": 3e-3, "schedule": "linear",
                "warmup_ratio": 0.2, "group_by_length": True, "save_every": 1, "sharding": sharding,
                "save_every_minutes": None}
    return _train_helpers.train_config(**{**settings, **overrides})


def validation_examples():
    return _train_helpers.make_examples(6, seed=7, completions=["zebra quantum", "xylophone"])


VAL = {"eval_every": 1, "lr": 3e-2}  # --val: validation loss lowest at step 2 of 6 (measured: 6.04, then up)


def _kill_in_save(step: int) -> None:
    from instructkit.train import dcp_checkpoint

    original = dcp_checkpoint.write_state

    def die_then_write(folder, at_step, *args):
        if at_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(folder, at_step, *args)

    dcp_checkpoint.write_state = die_then_write


def _forbid_pickle() -> None:
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load used pickle")

    pickle.load = pickle.loads = torch.load = refuse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--sharding", default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--no-pickle", action="store_true")
    parser.add_argument("--val", action="store_true")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    import _ddp_worker
    import torch
    from conftest import build_tiny_llama, build_tiny_tokenizer
    from safetensors.torch import save_file

    from instructkit.train.loop import TrainData, TrainOptions, train

    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer).train()
    dataset, settings = _train_helpers.tokenized(_ddp_worker.examples(), tokenizer)
    val = _train_helpers.tokenized(validation_examples(), tokenizer)[0] if args.val else None
    if args.kill_in_save is not None:
        _kill_in_save(args.kill_in_save)
    if args.no_pickle:
        _forbid_pickle()
    cfg = config(args.batch, args.sharding, precision=args.precision, **(VAL if args.val else {}))
    result = train(model, tokenizer, TrainData(dataset, val), cfg, args.out_dir,
                   TrainOptions(settings=settings, is_seq2seq=False, show_progress=False, resume=args.resume))
    final = result.model if result.model is not None else model
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.detach().contiguous() for k, v in final.state_dict().items() if "lm_head" not in k},
                  os.path.join(args.out_dir, "final.safetensors"))
        print(f"done {result.steps} steps on {os.environ.get('WORLD_SIZE', '1')} processes", file=sys.stderr)


if __name__ == "__main__":
    main()
