"""Subprocess for the resume test: train the tiny Llama 12 steps, checkpointing every step.

    python tests/train/_resume_worker.py RUN_DIR [--resume] [--sleep SECONDS]

--sleep slows each step's validation so the parent can SIGKILL it mid-run. Writes RUN_DIR/final.safetensors.
"""

from __future__ import annotations

import argparse
import time

import _train_helpers  # noqa: F401  (sys.path for conftest and src)


def run(run_dir: str, resume: bool = False, sleep: float = 0.0, seed: int = 0):
    import torch
    from conftest import build_tiny_llama, build_tiny_tokenizer

    from instructkit.train.loop import TrainData, TrainOptions, train

    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed)
    dataset, settings = _train_helpers.tokenized(_train_helpers.make_examples(24), tokenizer)
    val, _ = _train_helpers.tokenized(_train_helpers.make_examples(4, seed=7), tokenizer)
    cfg = _train_helpers.train_config(batch_size=4, epochs=2, lr=3e-3, schedule="cosine", warmup_ratio=0.2,
                                      save_every=1, eval_every=1, packing=True)

    def validate(m):
        time.sleep(sleep)
        return {}

    train(model, tokenizer, TrainData(dataset, val), cfg, run_dir,
          TrainOptions(settings=settings, is_seq2seq=False, validate=validate, resume=resume, show_progress=False,
                       restore_best=False))
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    from pathlib import Path

    from safetensors.torch import save_file

    from instructkit.train.checkpoint import trainable_state

    trained = run(args.run_dir, args.resume, args.sleep)
    save_file(trainable_state(trained), str(Path(args.run_dir) / "final.safetensors"))
