"""Shared by the train tests and their subprocess workers: fixed examples, tokenized datasets, configs."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
SRC = TESTS.parent / "src"
for path in (str(TESTS), str(SRC)):
    if path not in sys.path:
        sys.path.insert(0, path)

WORDS = ["great", "coffee", "fast", "shipping", "the", "kettle", "leaks", "quick", "brown", "fox", "lazy", "dog"]


def make_examples(n: int, seed: int = 0, completions: list[str] | None = None) -> list[dict]:
    """Rating-like examples with prompts of varied length and completions of 1-3 words."""
    import random

    rng = random.Random(seed)
    answers = completions or ["1", "2", "3", "4", "5", "great coffee", "the kettle leaks fast"]
    out = []
    for i in range(n):
        review = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))
        out.append({"prompt": f"Predict the rating for the following review: {review}\nRating:",
                    "completion": answers[i % len(answers)], "task": "rating", "source_id": str(i)})
    return out


def tokenized(examples: list[dict], tokenizer, max_length: int = 64, seq2seq: bool = False,
              chat_template: bool = False):
    """(dataset, settings) through THE tokenization (data/tokenize.tokenize_examples)."""
    from instructkit.data.tokenize import TokenizeSettings, tokenize_examples

    settings = TokenizeSettings(max_length=max_length, seq2seq=seq2seq, chat_template=chat_template)
    dataset, _ = tokenize_examples(examples, tokenizer, settings)
    return dataset, settings


def train_config(**overrides):
    """A TrainConfig for tiny models: deterministic, no warmup, no length-grouping surprises."""
    from instructkit.config import TrainConfig

    base = {"lr": 1e-3, "epochs": 1, "batch_size": 4, "warmup_ratio": 0.0, "seed": 0, "schedule": "constant"}
    base.update(overrides)
    return TrainConfig(**base)


def trainable_tensors(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
