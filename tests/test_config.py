"""Typed configs: YAML loading, dotted overrides, errors naming the right key, the generated reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from instructkit.config import DatasetConfig, RunConfig
from instructkit.config_docs import REGENERATE, config_sections, render_config_reference
from instructkit.config_load import OTHER_TOOL_NAMES, load_config
from instructkit.errors import ConfigError
from instructkit.pipeline import DEFAULT_CONFIG


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_default_config_loads():
    config = load_config(DEFAULT_CONFIG)
    assert config.datasets[0].path == "demo"
    assert config.model.name == "smollm2-135m-instruct"
    assert config.model.trust_remote_code is False


def test_overrides_nested_and_list_items(tmp_path):
    path = write(tmp_path, "datasets:\n  - {path: a.csv, schema: sst2}\n")
    config = load_config(path, ["split.seed=3", "datasets.0.path=/data/x.csv", "train.lr=1e-4",
                                "datasets.1.path=demo", "datasets.1.schema=amazon_us_reviews", "train.packing=false"])
    assert config.split.seed == 3
    assert config.datasets[0].path == "/data/x.csv"
    assert config.datasets[1].schema_name == "amazon_us_reviews"
    assert config.train.lr == pytest.approx(1e-4)
    assert config.train.packing is False


@pytest.mark.parametrize(
    "text, override, expected",
    [
        ("trian: {lr: 1}\n", None, "unknown key 'trian' (did you mean 'train'?)"),
        ("train: {lrr: 1}\n", None, "unknown key 'train.lrr' (did you mean 'lr'?)"),
        ("datasets:\n  - {path: a, shema: sst2}\n", None, "did you mean 'schema'?"),
        ("train: {lr: fast}\n", None, "train.lr"),
        ("train: {batch_size: 0}\n", None, "train.batch_size"),
        ("split: {validation: 0.6, test: 0.5}\n", None, "leaves no training rows"),
        ("name: ../escape\n", None, "plain folder name"),
        ("model: {system_prompt: Be brief.}\n", None, "model.system_prompt is sent only through the chat template"),
        ("model: {system_prompt: ''}\n", None, "set model.chat_template: true"),
        ("name: \"a\\x01b\"\n", None, "no control characters"),
        ("", "train.lr", "must look like key.subkey=value"),
        ("", "datasets.5.path=x", "past the end"),
        ("- just\n- a list\n", None, "must be a mapping"),
        ("train: {lr: [1\n", None, "invalid YAML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, override, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override] if override else [])
    assert expected in str(err.value)
    if override is None:
        assert str(path) in str(err.value)


def test_a_system_prompt_with_the_chat_template_is_kept(tmp_path):
    config = load_config(write(tmp_path, "model: {chat_template: true, system_prompt: ''}\n"))
    assert config.model.system_prompt == ""


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_data_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "data.csv").write_text("a\n1\n")
    config = load_config(write(tmp_path, "datasets:\n  - {path: data.csv, schema: sst2}\n"))
    assert config.datasets[0].path == str(tmp_path / "data.csv")


def test_run_dir():
    config = RunConfig(name="x", output_dir="out")
    assert str(config.run_dir) == "out/x"
    assert DatasetConfig(path="a", schema="sst2").schema_name == "sst2"


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=nan", "datasets.0.weight=1e400"])
def test_non_finite_numbers_are_config_errors_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_config(None, ["datasets.0.path=demo", "datasets.0.schema=amazon_us_reviews", override])


# --------------------------------------------------------------------------------------------------
# Names other tools use
# --------------------------------------------------------------------------------------------------

TRAINER = "is the Hugging Face Trainer's name"
PACKED = "(with packing, train.max_tokens_per_batch sizes the forward passes)"
CUT = "(the prompt is cut, never the completion)"


@pytest.mark.parametrize("section, name, says", [
    ("train", "learning_rate", f"{TRAINER}: use train.lr"),
    ("train", "gradient_accumulation_steps", f"{TRAINER}: use train.grad_accum {PACKED}"),
    ("train", "num_train_epochs", f"{TRAINER}: use train.epochs"),
    ("train", "per_device_train_batch_size", f"{TRAINER}: use train.batch_size {PACKED}"),
    ("train", "max_seq_length", f"is TRL's name: use model.max_length {CUT}"),
    (None, "learning_rate", f"{TRAINER}: use train.lr"),
    ("model", "seed", f"{TRAINER}: use train.seed (split.seed seeds the data split)"),
])
@pytest.mark.parametrize("how", ["yaml", "override"])
def test_other_tools_names_name_the_instructkit_key(tmp_path, section, name, says, how):
    dotted = f"{section}.{name}" if section else name
    expected = f"unknown key {dotted!r}: {name!r} {says}"
    if how == "yaml":
        path = write(tmp_path, f"{section}: {{{name}: 3}}\n" if section else f"{name}: 3\n")
        overrides = []
    else:
        path = write(tmp_path, "train: {lr: 1.0e-4}\n")
        overrides = [f"{dotted}=3"]
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert message.endswith(expected), message
    assert message.startswith(f"{path}: invalid configuration")
    assert "did you mean" not in message
    assert err.value.exit_code == 2
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, [f"{dotted}=3"])


def _all_keys() -> set[str]:
    return {f"{path}.{field.alias or name}".lstrip(".")
            for path, model in config_sections() for name, field in model.model_fields.items()}


def test_other_tools_names_point_at_real_keys():
    keys = _all_keys()
    assert "train.lora.r" in keys and "datasets[].schema" in keys
    for name, (tool, key, _note) in OTHER_TOOL_NAMES.items():
        assert key is None or key.split("=")[0] in keys, (name, key)
        assert tool


def test_typos_still_get_the_nearest_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch' \(did you mean 'epochs'\?\)"):
        load_config(None, ["train.epoch=1"])


# --------------------------------------------------------------------------------------------------
# The generated reference
# --------------------------------------------------------------------------------------------------


def test_every_config_field_has_a_description():
    missing = [f"{path}.{name}".lstrip(".") for path, model in config_sections()
               for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"config fields without description=: {missing}"
    assert all((model.__doc__ or "").strip() for _, model in config_sections())


def test_docs_config_md_is_generated_from_the_models():
    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    expected = render_config_reference()
    actual = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    assert actual == expected, f"{doc} is stale: regenerate it with `{REGENERATE}`"
    for path, _ in config_sections():
        assert f"## `{path}`" in expected or not path
    assert "| `lr` | `float` | `0.0001` | Peak learning rate, reached after warm-up" in expected
    assert "| `learning_rate` | Hugging Face Trainer | `train.lr` |" in expected


def test_config_docs_main_writes_the_reference(tmp_path):
    from instructkit.config_docs import main

    out = tmp_path / "config.md"
    assert main([str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_config_reference()
