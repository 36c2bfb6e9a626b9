"""The tokenized store (data/store.py): the ids of tokenize_examples, memory-mapped, reused while unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from instructkit.config import DatasetConfig, RunConfig
from instructkit.data import store as store_module
from instructkit.data.batching import TokenTable
from instructkit.data.build import load_examples, prepare
from instructkit.data.sampler import class_ids_from_examples
from instructkit.data.store import tokenize_split
from instructkit.data.tokenize import TokenizeSettings, tokenize_examples
from instructkit.errors import DataError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    config = RunConfig(name="store", output_dir=str(folder), datasets=[DatasetConfig(
        path="demo", templates=["amazon_us_reviews.predict_rating", "amazon_us_reviews.write_headline"],
        held_out_templates=["amazon_us_reviews.write_headline"])])
    prepare(config, folder / "run")
    return folder / "run"


def _same(store, dataset, stats_a, stats_b):
    table, ref = store.token_table(), TokenTable.from_dataset(dataset)
    assert isinstance(table.input_ids, np.memmap)
    assert len(store) == len(dataset) > 0
    for name in ("input_ids", "offsets", "labels", "label_offsets"):
        assert np.array_equal(getattr(table, name), getattr(ref, name)), name
    assert np.array_equal(store["index"], np.asarray(dataset["index"]))
    assert np.array_equal(store["prompt_length"], np.asarray(dataset["prompt_length"]))
    assert stats_a.to_dict() == stats_b.to_dict()


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("split", ["train", "validation"])
def test_store_holds_the_ids_of_tokenize_examples(run_dir, tiny_tokenizer, tmp_path, monkeypatch, chat, split):
    monkeypatch.setattr(store_module, "CHUNK_LINES", 7)  # several chunks
    settings = TokenizeSettings(max_length=48, chat_template=chat)  # some prompts cut, some dropped
    examples = [e for e in load_examples(run_dir, split) if not e.get("held_out")]
    dataset, stats = tokenize_examples(examples, tiny_tokenizer, settings)
    store = tokenize_split(run_dir / f"{split}.jsonl", tiny_tokenizer, settings, tmp_path / "cache")
    _same(store, dataset, store.stats, stats)
    assert store.examples == len(examples)
    assert store.class_ids.tolist() == class_ids_from_examples(examples)


def test_worker_processes_give_the_same_store(run_dir, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_LINES", 5)
    settings = TokenizeSettings(max_length=64)
    one = tokenize_split(run_dir / "train.jsonl", tiny_tokenizer, settings, tmp_path / "a", num_proc=1)
    two = tokenize_split(run_dir / "train.jsonl", tiny_tokenizer, settings, tmp_path / "b", num_proc=2)
    for name in store_module.ARRAYS:
        assert np.array_equal(one.array(name), two.array(name)), name


def test_store_is_reused_until_data_settings_or_tokenizer_change(run_dir, tiny_tokenizer, tmp_path, monkeypatch):
    settings = TokenizeSettings(max_length=64)
    cache = tmp_path / "cache"
    first = tokenize_split(run_dir / "train.jsonl", tiny_tokenizer, settings, cache)

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(store_module, "encode_chunk", fail)
    assert tokenize_split(run_dir / "train.jsonl", tiny_tokenizer, settings, cache).folder == first.folder
    monkeypatch.undo()
    other = tokenize_split(run_dir / "train.jsonl", tiny_tokenizer, TokenizeSettings(max_length=65), cache)
    assert other.folder != first.folder
    changed = tmp_path / "train.jsonl"
    lines = (run_dir / "train.jsonl").read_text().splitlines(keepends=True)
    changed.write_text("".join(lines[1:]))
    assert tokenize_split(changed, tiny_tokenizer, settings, cache).folder != first.folder
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                         bos_token="<s>", eos_token="<pad>", pad_token="<pad>")
    assert tokenize_split(run_dir / "train.jsonl", tokenizer, settings, cache).folder != first.folder


def test_a_bad_line_is_named(tiny_tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"train.jsonl: line 2: "):
        tokenize_split(path, tiny_tokenizer, TokenizeSettings(), tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # no half-written store left behind
