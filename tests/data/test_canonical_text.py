"""Texts the same up to Unicode canonical equivalence (NFC: "cafe" + combining acute and "caf\u00e9") are one text
wherever preparation compares texts exactly (`split.text_match: exact`): dedup keys and labels, group_by
values and the leakage guard's prompts, in the in-memory and the streamed path alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.config import DatasetConfig, RunConfig, SplitConfig
from instructkit.data.build import load_examples, prepare
from instructkit.errors import TemplateError
from instructkit.templates.library import TemplateLibrary

NFC, NFD = "caf\u00e9", "cafe\u0301"
STREAMING = pytest.mark.parametrize("streaming", ["off", "on"])


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(tmp_path: Path, datasets: list[DatasetConfig], **split) -> tuple[dict, dict[str, list[dict]]]:
    config = RunConfig(name="nfc", output_dir=str(tmp_path / "runs"), datasets=datasets,
                       split=SplitConfig(seed=0, **split))
    result = prepare(config, library=TemplateLibrary([], []))
    return result.stats, {s: load_examples(config.run_dir, s) for s in ("train", "validation", "test")}


DRINKS_YAML = """
schemas:
  - name: drinks
    fields: {text: str, drink: str}
    label_field: drink
    templates:
      - id: drinks.name
        task: classification
        instruction: "Which drink? {{ text }}"
        completion: "{{ drink }}"
        answer_choices: ["caf\u00e9", "tea"]
"""


@STREAMING
def test_a_row_and_its_copy_spelled_apart_are_duplicates_not_a_label_conflict(tmp_path, streaming):
    # the copy spells text and label decomposed: the keys matched (NFC) while the labels did not, and both
    # rows were dropped as conflicting
    (tmp_path / "drinks.yaml").write_text(DRINKS_YAML)
    library = TemplateLibrary.load([tmp_path / "drinks.yaml"], include_builtin=False)
    rows = [{"text": f"Order {i}: un {NFC}", "drink": NFC} for i in range(20)]
    rows += [{"text": f"Order {i}: un {NFD}", "drink": NFD} for i in range(20)]
    rows += [{"text": f"Order {i}: un th\u00e9", "drink": "tea"} for i in range(20)]
    config = RunConfig(name="nfc", output_dir=str(tmp_path / "runs"), split=SplitConfig(seed=0, streaming=streaming),
                       datasets=[DatasetConfig(name="orders", path=_jsonl(tmp_path / "orders.jsonl", rows),
                                                       schema="drinks")])
    dedup = prepare(config, library=library).stats["datasets"]["orders"]["duplicates"]
    assert (dedup["exact_duplicates_dropped"], dedup["conflicting_label_groups"]) == (20, 0)
    examples = [ex for s in ("train", "validation", "test") for ex in load_examples(config.run_dir, s)]
    assert len(examples) == 40 and sorted({ex["completion"] for ex in examples}) == [NFC, "tea"]


@STREAMING
def test_a_group_spelled_apart_is_one_group(tmp_path, streaming):
    rows = [{"prompt": f"Review {i}", "completion": "yes" if i % 2 else "no",
             "shop": [NFC, NFD, "x", "y", "z"][i % 5]} for i in range(50)]
    stats, examples = _prepare(tmp_path, [DatasetConfig(path=_jsonl(tmp_path / "shops.jsonl", rows),
                                                        group_by="shop")],
                               streaming=streaming, validation=0.2, test=0.2)
    assert stats["datasets"]["shops"]["split"]["groups"] == 4
    cafe_prompts = {f"Review {i}" for i in range(50) if i % 5 < 2}
    holding = [s for s, rows in examples.items() if any(ex["prompt"] in cafe_prompts for ex in rows)]
    assert len(holding) == 1, holding  # the 20 rows of the café shop in one split, whichever spelling


@STREAMING
def test_a_test_prompt_spelled_apart_in_training_is_a_leak(tmp_path, streaming):
    train = [{"prompt": f"Is the {NFD} open on day {i}?", "completion": "no"} for i in range(4)]
    train += [{"prompt": f"Other question {i}", "completion": "yes"} for i in range(4)]
    test = [{"prompt": f"Is the {NFC} open on day 0?", "completion": "yes"}]
    datasets = [DatasetConfig(name="train", path=_jsonl(tmp_path / "train.jsonl", train)),
                DatasetConfig(name="probe", path=_jsonl(tmp_path / "probe.jsonl", test), held_out=True)]
    stats, examples = _prepare(tmp_path, datasets, streaming=streaming, validation=0, test=0,
                               prompt_leakage="drop")
    assert stats["prompt_leakage"]["train_examples_dropped"] == 1
    assert f"Is the {NFD} open on day 0?" not in {ex["prompt"] for ex in examples["train"]}


@pytest.mark.parametrize("key, row", [(NFC, NFD), (NFD, NFC)])
def test_a_label_the_label_map_holds_up_to_nfc_renders_its_name(tmp_path, key, row):
    # the data check compares labels by label_key (NFC); rendering looked the raw label up and failed with
    # "undefined field" naming the template, for a row the check had passed
    (tmp_path / "mapped.yaml").write_text(f"""
schemas:
  - name: mapped
    fields: {{text: str, drink: str}}
    label_field: drink
    label_map: {{"{key}": Coffee, tea: Tea}}
    templates:
      - id: mapped.name
        task: classification
        instruction: "Which drink? {{{{ text }}}}"
        completion: "{{{{ label_map[drink] }}}}"
        answer_choices: [Coffee, Tea]
""")
    library = TemplateLibrary.load([tmp_path / "mapped.yaml"], include_builtin=False)
    template = library.get("mapped.name")
    assert template.render({"text": "un caf\u00e9", "drink": row}).completion == "Coffee"
    assert template.render({"text": "un th\u00e9", "drink": "tea"}).completion == "Tea"
    with pytest.raises(TemplateError, match="undefined"):
        template.render({"text": "water", "drink": "water"})


@STREAMING
def test_classlabel_names_spelled_apart_from_the_label_map_still_place_the_ids(tmp_path, streaming):
    # a Hugging Face ClassLabel whose ids 0-1 are named "tea", "cafe\u0301" against a label map coding
    # café 1 and tea 2: the ids are read by their names, up to NFC (was: "not names in the label map")
    import datasets

    (tmp_path / "coded.yaml").write_text("""
schemas:
  - name: coded
    fields: {text: str, drink: int}
    label_field: drink
    label_map: {1: "caf\\u00e9", 2: tea}
    templates:
      - id: coded.name
        task: classification
        instruction: "Which drink? {{ text }}"
        completion: "{{ label_map[drink] }}"
        answer_choices: ["caf\\u00e9", tea]
""")
    library = TemplateLibrary.load([tmp_path / "coded.yaml"], include_builtin=False)
    features = datasets.Features({"drink": datasets.ClassLabel(names=["tea", NFD]), "text": datasets.Value("string")})
    rows = {"drink": [i % 2 for i in range(20)], "text": [f"{['tea', 'coffee'][i % 2]} order {i}" for i in range(20)]}
    path = tmp_path / "coded.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    config = RunConfig(name="nfc", output_dir=str(tmp_path / "runs"), split=SplitConfig(seed=0, streaming=streaming),
                       datasets=[DatasetConfig(name="coded", path=str(path), schema="coded")])
    prepare(config, library=library)
    examples = [ex for s in ("train", "validation", "test") for ex in load_examples(config.run_dir, s)]
    assert len(examples) == 20
    assert all(("coffee" in ex["prompt"]) == (ex["completion"] == NFC) for ex in examples)
