"""Loading safety: no pickle unless asked, no model code from a folder unless asked, outputs stay in the run.

Each hostile folder carries a payload that would create a marker file if it ever ran (unpickling, or
importing the folder's Python module); the tests assert the marker never appears.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import _robust
from conftest import build_tiny_llama
from instructkit.config import ModelConfig
from instructkit.config_load import validate_config
from instructkit.errors import InstructkitError, ModelError
from instructkit.models.load import load_model


class _Payload:
    """Unpickling this runs os.system(touch MARKER): the classic malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _model_folder(src: Path, dst: Path, keep_safetensors: bool) -> Path:
    shutil.copytree(src, dst)
    if not keep_safetensors:
        for weights in dst.glob("*.safetensors"):
            weights.unlink()
    return dst


def _evil_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, handle)


def _load(folder: Path, **cfg) -> object:
    return load_model(ModelConfig(name=str(folder), **cfg), cache_dir=folder.parent / "cache")


# --------------------------------------------------------------------------------------------------
# Pickle weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.pt", "weights.ckpt", "model.pth"])
def test_pickle_only_folder_is_refused_without_allow_pickle(weights_name, tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = _model_folder(tiny_model_dir, tmp_path / "pickled", keep_safetensors=False)
    _evil_pickle(folder / weights_name, marker)
    with pytest.raises(ModelError, match=rf"{folder}.*only pickle weights.*{weights_name}.*allow_pickle"):
        _load(folder)
    assert not marker.exists(), "the pickle was loaded"
    _robust.blocked(f"malicious {weights_name} (os.system in __reduce__)", "model folder", "refused: pickle")


def test_safetensors_are_preferred_and_a_pickle_beside_them_is_never_opened(tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = _model_folder(tiny_model_dir, tmp_path / "both", keep_safetensors=True)
    _evil_pickle(folder / "pytorch_model.bin", marker)
    loaded = _load(folder)
    assert loaded.model is not None and not marker.exists()
    for allow in (True,):  # even with pickle allowed, safetensors win
        _load(folder, allow_pickle=allow)
        assert not marker.exists()
    _robust.blocked("malicious pytorch_model.bin beside model.safetensors", "model folder", "safetensors preferred")


def test_allow_pickle_is_an_explicit_opt_in_that_loads_a_genuine_state_dict(tiny_tokenizer, tiny_model_dir,
                                                                             tmp_path):
    folder = _model_folder(tiny_model_dir, tmp_path / "genuine-bin", keep_safetensors=False)
    model = build_tiny_llama(tiny_tokenizer)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="allow_pickle"):
        _load(folder)
    loaded = _load(folder, allow_pickle=True)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)


def test_adapter_folder_with_only_pickle_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "smollm2-135m-instruct",
                                                            "peft_type": "LORA"}))
    _evil_pickle(folder / "adapter_model.bin", marker)
    with pytest.raises(ModelError, match=rf"{folder}.*pickle.*allow_pickle"):
        _load(folder)
    assert not marker.exists()
    _robust.blocked("malicious adapter_model.bin", "adapter folder", "refused: pickle")


# --------------------------------------------------------------------------------------------------
# Remote code
# --------------------------------------------------------------------------------------------------

EVIL_MODULE = '''
from pathlib import Path
Path({marker!r}).write_text("imported")  # runs at import time
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def _remote_code_folder(tiny_model_dir: Path, dst: Path, marker: Path, model_type: str,
                        tokenizer_auto_map: bool) -> Path:
    folder = _model_folder(tiny_model_dir, dst, keep_safetensors=True)
    (folder / "modeling_evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_auto_map:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


@pytest.mark.parametrize("model_type,tokenizer_auto_map", [("evil", False), ("llama", False), ("llama", True),
                                                            ("evil", True)])
def test_custom_code_in_a_model_folder_never_runs_by_default(model_type, tokenizer_auto_map, tiny_model_dir,
                                                              tmp_path):
    marker = tmp_path / "imported"
    folder = _remote_code_folder(tiny_model_dir, tmp_path / f"remote-{model_type}-{tokenizer_auto_map}", marker,
                                 model_type, tokenizer_auto_map)
    assert ModelConfig().trust_remote_code is False  # the default
    try:
        loaded = _load(folder)
    except InstructkitError as exc:
        assert str(folder) in str(exc)
        if model_type == "evil":
            assert "trust_remote_code" in str(exc)
    else:  # a known architecture: loaded with the library's own class, the folder's code ignored
        assert type(loaded.model).__module__.startswith("transformers.")
    assert not marker.exists(), "the folder's Python code was imported"
    _robust.blocked(f"auto_map -> modeling_evil.py (model_type {model_type}, tokenizer auto_map "
                    f"{tokenizer_auto_map})", "model folder", "trust_remote_code off")


def test_hub_ids_never_download(tmp_path, monkeypatch):
    """An `org/name` not in the local cache is an error naming it, not a network request."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="never downloads|not in the local Hugging Face cache"):
        load_model(ModelConfig(name="some-org/some-model"), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["/definitely/not/here", "not-a-model", "README.md"])
def test_a_path_that_is_not_a_model_names_it(name, tmp_path):
    (tmp_path / "README.md").write_text("# not a model\n")
    target = str(tmp_path / name) if name == "README.md" else name
    with pytest.raises(ModelError, match=repr(target)[1:-1].split("/")[-1]):
        load_model(ModelConfig(name=target), cache_dir=tmp_path / "cache")


def test_folder_without_config_or_weights_names_it(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=rf"{empty} is not a model folder"):
        _load(empty)
    no_weights = _model_folder(tiny_model_dir, tmp_path / "no-weights", keep_safetensors=False)
    with pytest.raises(ModelError, match=rf"{no_weights} has no weights"):
        _load(no_weights)
    broken = _model_folder(tiny_model_dir, tmp_path / "broken-config", keep_safetensors=True)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=str(broken)):
        _load(broken)
    truncated = _model_folder(tiny_model_dir, tmp_path / "truncated-weights", keep_safetensors=True)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match=str(truncated)):
        _load(truncated)


# --------------------------------------------------------------------------------------------------
# Outputs stay inside the run directory
# --------------------------------------------------------------------------------------------------


def test_prepare_writes_only_inside_the_run_directory(tmp_path):
    from instructkit.data.build import prepare

    work = tmp_path / "work"
    work.mkdir()
    config = validate_config({"name": "contained", "output_dir": str(work / "runs"),
                              "datasets": [{"path": "demo", "templates": ["amazon_us_reviews.predict_rating"],
                                            "max_rows": 30}]})
    before = {p for p in tmp_path.rglob("*")}
    prepare(config)
    written = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in written if config.run_dir.resolve() not in p.resolve().parents
               and p.resolve() != config.run_dir.resolve() and p.resolve() not in config.run_dir.resolve().parents]
    assert not outside, f"written outside the run directory: {outside}"


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/etc", "..", "x/y"])
def test_run_names_that_would_escape_are_refused_everywhere(name, tmp_path):
    from instructkit.config_load import load_config

    with pytest.raises(InstructkitError, match="run name"):
        load_config(None, [f"name={name}", f"output_dir={tmp_path}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"name: {json.dumps(name)}\noutput_dir: {tmp_path}\n")
    with pytest.raises(InstructkitError, match="run name"):
        load_config(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
