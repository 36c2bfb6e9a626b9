"""Typed configs: YAML loading, dotted overrides, clear errors with the nearest valid key."""

from __future__ import annotations

import pytest

from instructkit.config import DatasetConfig, RunConfig, load_config
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
