"""`instructkit templates check` on real rows of every data set in ../shared/data, with its schema."""

from __future__ import annotations

import pytest

from instructkit.cli import main

CASES = [
    ("amazon_fine_food/reviews.csv", "amazon_fine_food", []),
    ("amazon_fashion/reviews.jsonl", "amazon_reviews_2018", []),
    ("sst2/train.tsv", "sst2", []),
    ("sst2/dev.tsv", "sst2", ["--column", "sentence=content"]),
    ("ag_news/ag_news.csv", "ag_news", []),
    ("dialogsum/dialogsum.dev.jsonl", "dialogsum", []),
    ("alpaca/alpaca_en_demo.json", "alpaca", []),
    ("alpaca/seed_tasks.jsonl", "self_instruct_seed", []),
    ("multi30k/val", "multi30k", ["--format", "parallel"]),
]


@pytest.mark.parametrize("path, schema, extra", CASES, ids=[c[0] for c in CASES])
def test_catalog_templates_pass_on_real_rows(shared_data, capsys, path, schema, extra):
    limit = ["--limit", "5000"] if path.startswith("sst2/train") else []
    code = main(["templates", "check", "--data", str(shared_data / path), "--schema", schema, *extra, *limit])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "templates pass on" in out


def test_rows_lacking_a_field_are_counted_not_failed(shared_data, capsys):
    """16 Amazon 2018 rows have no reviewText: reported as data rows skipped, the templates still pass."""
    assert main(["templates", "check", "--data", str(shared_data / "amazon_fashion/reviews.jsonl"),
                 "--schema", "amazon_reviews_2018"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "amazon_reviews_2018.predict_rating: 16 rows lack 'reviewText'" in out


def test_check_fails_naming_template_and_rule(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "schemas:\n  - name: toy\n    fields: {text: str, label: int}\n    label_map: {0: no, 1: yes}\n"
        "    label_field: label\n    samples: [{text: a, label: 1}]\n    templates:\n"
        "      - {id: toy.t, task: classification, instruction: '{{ text }}', completion: '{{ label }}',"
        " answer_choices: ['no', 'yes']}\n"
    )
    assert main(["templates", "check", str(bad)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "toy.t" in out and "target-not-in-choices" in out
