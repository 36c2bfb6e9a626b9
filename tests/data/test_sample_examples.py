"""sample_examples: the evaluation's training pool, read streaming and capped per template."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from instructkit.data.build import load_examples, sample_examples
from instructkit.errors import DataError


def _write(path, counts: dict[str, int]) -> list[dict]:
    rows = []
    for i in range(max(counts.values())):
        for tid, n in counts.items():
            if i < n:
                rows.append({"prompt": f"{tid} {i}", "completion": str(i % 3), "template_id": tid})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def test_small_split_is_load_examples(tmp_path):
    _write(tmp_path / "train.jsonl", {"a": 7, "b": 3})
    pool, total = sample_examples(tmp_path, "train", per_template=7)
    assert pool == load_examples(tmp_path, "train") and total == 10


def test_capped_per_template_in_file_order_and_seeded(tmp_path):
    rows = _write(tmp_path / "train.jsonl", {"a": 50, "b": 4})
    pool, total = sample_examples(tmp_path, "train", per_template=5, seed=1)
    assert total == 54
    assert Counter(e["template_id"] for e in pool) == {"a": 5, "b": 4}
    positions = [rows.index(e) for e in pool]
    assert positions == sorted(positions)  # file order
    assert pool == sample_examples(tmp_path, "train", per_template=5, seed=1)[0]
    assert pool != sample_examples(tmp_path, "train", per_template=5, seed=2)[0]


def test_reservoir_is_uniform(tmp_path):
    """Every example of a template is kept with probability cap / n (algorithm R)."""
    _write(tmp_path / "train.jsonl", {"a": 20})
    seeds = 1500
    hits = Counter(e["prompt"] for seed in range(seeds)
                   for e in sample_examples(tmp_path, "train", per_template=5, seed=seed)[0])
    assert len(hits) == 20
    # p = 0.25, sd of a frequency over 1500 draws = 0.011: 0.05 is 4.5 sd
    assert all(abs(n / seeds - 0.25) < 0.05 for n in hits.values())


def test_bad_line_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"template_id": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl.*2"):
        sample_examples(tmp_path, "train")
    with pytest.raises(DataError, match="unknown split"):
        sample_examples(tmp_path, "dev")
