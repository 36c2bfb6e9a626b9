"""Preparation in bounded memory (split.streaming): the files, split and messages of the in-memory path.

Chunks of 7 rows and buckets of 50 training lines make every shared file span many chunks and buckets.
Peak memory is measured by benchmarks/bench_prepare.py --large, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.config import DatasetConfig, RunConfig, SplitConfig
from instructkit.config_load import load_config
from instructkit.data import build, chunks, stream_build
from instructkit.data.build import prepare
from instructkit.data.chunks import read_chunks
from instructkit.data.plan import plan_dataset
from instructkit.data.stream_plan import plan_streamed
from instructkit.data.table import Problems
from instructkit.errors import DataError
from instructkit.templates.library import TemplateLibrary

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VOLATILE = ("seconds", "streaming", "run_dir", "config")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(stream_build, "CHUNK_ROWS", 7)
    monkeypatch.setattr(stream_build, "BUCKET_LINES", 50)


def _with(config: RunConfig, streaming: str) -> RunConfig:
    return config.model_copy(update={"split": config.split.model_copy(update={"streaming": streaming})})


def _both(config: RunConfig, tmp_path: Path) -> tuple[Path, Path]:
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    prepare(_with(config, "off"), memory)
    result = prepare(_with(config, "on"), streamed)
    assert "streaming" in result.stats
    return memory, streamed


def _assert_same_run(memory: Path, streamed: Path) -> None:
    for split in ("train", "validation", "test"):
        assert (memory / f"{split}.jsonl").read_bytes() == (streamed / f"{split}.jsonl").read_bytes(), split
    a, b = (json.loads((d / "stats.json").read_text()) for d in (memory, streamed))
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}


@pytest.mark.parametrize("name", [
    "amazon_reviews",  # stratified, dedup_key, templates_per_row, a held-out template
    "amazon_reviews_2018",  # grouped by asin, bad rows skipped, duplicates
    "conversations",  # chat data, two datasets mixed by weight
    "translation",  # parallel line-aligned .gz files
    "alpaca",  # a JSON array, unstratified
    pytest.param("mixture", marks=pytest.mark.slow),  # four datasets, given splits, a held-out dataset
    pytest.param("sst2", marks=pytest.mark.slow),  # given train/test files, max_rows
])
def test_streaming_writes_the_files_of_the_in_memory_path(name, shared_data, tmp_path):
    config = load_config(EXAMPLES / f"{name}.yaml", [])
    _assert_same_run(*_both(config, tmp_path))


@pytest.mark.slow
def test_streaming_sst2_whole_with_conflicting_duplicates(shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(stream_build, "CHUNK_ROWS", 5000)
    monkeypatch.setattr(stream_build, "BUCKET_LINES", 20_000)
    config = RunConfig(name="sst2", datasets=[DatasetConfig(
        files={"train": str(shared_data / "sst2" / "train.tsv"), "validation": str(shared_data / "sst2" / "dev.tsv")},
        schema="sst2", columns={"sentence": ["sentence", "content"]},
        templates=["sst2.sentiment_with_options", "sst2.feeling_no_options", "sst2.favorable_yes_no"])],
        split=SplitConfig(seed=1, validation=0.05, test=0.1))
    memory, streamed = _both(config, tmp_path)
    _assert_same_run(memory, streamed)
    stats = json.loads((streamed / "stats.json").read_text())
    assert stats["datasets"]["sst2"]["duplicates"]["conflicting_label_groups"] > 0


def test_streamed_plan_is_the_in_memory_split(shared_data):
    """Same rows kept, same assignment, same dedup and split reports: grouped and stratified."""
    library = TemplateLibrary.builtin()
    config = load_config(EXAMPLES / "amazon_reviews_2018.yaml", [])
    config = config.model_copy(update={"split": config.split.model_copy(update={"seed": 5})})
    dataset = config.datasets[0]
    memory = plan_dataset(dataset, library, config)
    streamed = plan_streamed(dataset, library, config, chunk_rows=11)
    assert streamed.rows == memory.rows
    assert streamed.split.assignment == memory.split.assignment
    assert streamed.split.report == memory.split.report
    assert streamed.split.report["groups_in_several_splits"] == 0
    a, b = memory.dedup.to_dict(), streamed.dedup.to_dict()
    a.pop("conflicting_examples"), b.pop("conflicting_examples")  # b's are filled in while rendering
    assert a == b
    assert [streamed.source.source_id(r) for r in streamed.rows] == [memory.source.ids[r] for r in memory.rows]


def _error(config: RunConfig, tmp_path: Path, streaming: str) -> str:
    with pytest.raises(DataError) as info:
        prepare(_with(config, streaming), tmp_path / streaming)
    assert not (tmp_path / streaming / "train.jsonl").exists()
    return str(info.value)


@pytest.mark.parametrize("damage, expected", [
    (lambda text: text.replace("\n18,", "\n18,x,", 1), r"reviews.csv: line \d+: 11 fields"),
    (lambda text: text.replace("\n25,", "\n25,\udcff", 1), r"reviews.csv: line \d+: not valid utf-8"),
    (lambda text: text.replace(",5,", ",,", 40), r"reviews.csv: line \d+: column 'Score' is missing"),
])
def test_errors_name_the_file_and_line_as_in_memory(shared_data, tmp_path, damage, expected):
    text = (shared_data / "amazon_fine_food" / "reviews.csv").read_text(encoding="utf-8-sig")
    path = tmp_path / "reviews.csv"
    path.write_bytes(damage(text).encode("utf-8", "surrogateescape"))
    config = RunConfig(name="bad", datasets=[DatasetConfig(
        path=str(path), schema="amazon_fine_food", templates=["amazon_fine_food.predict_rating"])])
    streamed, memory = _error(config, tmp_path, "on"), _error(config, tmp_path, "off")
    assert streamed == memory
    assert pytest.importorskip("re").search(expected, streamed), streamed


def _rows(n: int, offset: int = 0) -> dict:
    return {"prompt": [f"question {i}?" for i in range(offset, offset + n)],
            "completion": [f"answer {i % 3}" for i in range(offset, offset + n)]}


def test_saved_datasetdict_keeps_its_splits_and_is_read_batch_by_batch(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(_rows(120)),
                          "test": datasets.Dataset.from_dict(_rows(30, 500))}).save_to_disk(str(folder))

    def no_load(*args, **kwargs):
        raise AssertionError("load_from_disk materialises nothing here, and is not called")

    monkeypatch.setattr(datasets, "load_from_disk", no_load)
    tables = read_chunks(folder, "hf_disk", "utf-8", Problems(False), chunk_rows=16)
    assert set(tables) == {"train", "test"}
    sizes = [len(t.rows) for t in tables["train"]()]
    assert max(sizes) <= 16 and sum(sizes) == 120
    config = RunConfig(name="saved", datasets=[DatasetConfig(path=str(folder))],
                       split=SplitConfig(validation=0.1, test=0.2))
    memory, streamed = _both(config, tmp_path)
    _assert_same_run(memory, streamed)
    stats = json.loads((streamed / "stats.json").read_text())
    assert stats["splits"]["test"]["examples"] == 30  # the saved test split, not carved
    assert stats["datasets"]["saved"]["split"]["given_splits"] == ["test", "train"]


def test_parquet_shard_folder_is_read_by_split(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    folder = tmp_path / "shards" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.table(_rows(50)), folder / "train-00000-of-00002.parquet", row_group_size=10)
    pq.write_table(pa.table(_rows(50, 50)), folder / "train-00001-of-00002.parquet", row_group_size=10)
    pq.write_table(pa.table(_rows(20, 900)), folder / "validation-00000-of-00001.parquet")
    tables = read_chunks(tmp_path / "shards", "hf_disk", "utf-8", Problems(False), chunk_rows=8)
    assert set(tables) == {"train", "validation"}
    train = list(tables["train"]())
    assert max(len(t.rows) for t in train) <= 8 and sum(len(t.rows) for t in train) == 100
    assert train[-1].where(len(train[-1].rows) - 1) == "row 50"  # rows are named within their shard
    config = RunConfig(name="shards", datasets=[DatasetConfig(path=str(tmp_path / "shards"))],
                       split=SplitConfig(validation=0.1, test=0.2))
    memory, streamed = _both(config, tmp_path)
    _assert_same_run(memory, streamed)
    stats = json.loads((streamed / "stats.json").read_text())
    assert stats["splits"]["validation"]["examples"] == 20
    assert stats["splits"]["train"]["source_rows"]["shards"] + stats["splits"]["test"]["source_rows"]["shards"] == 100


def test_auto_streams_above_the_size_threshold(tmp_path, monkeypatch, shared_data):
    config = RunConfig(name="auto", datasets=[DatasetConfig(
        path=str(shared_data / "amazon_fine_food" / "reviews.csv"), schema="amazon_fine_food",
        templates=["amazon_fine_food.predict_rating"])])
    assert "streaming" not in prepare(config, tmp_path / "small").stats
    monkeypatch.setattr(build, "STREAM_ABOVE_BYTES", 1000)
    assert "streaming" in prepare(config, tmp_path / "large").stats


def test_text_lines_name_a_bad_byte_as_the_whole_file_decoder(tmp_path):
    from instructkit.data.readers_text import decode_text

    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError) as whole:
        decode_text(path.read_bytes(), path)
    with pytest.raises(DataError, match=r"a.jsonl: line 2: not valid utf-8 text: byte 0xff at byte offset 16 "
                                        r"\(byte 8 of the line\)") as streamed:
        list(chunks.text_lines(path, "utf-8"))
    assert str(streamed.value) == str(whole.value)
