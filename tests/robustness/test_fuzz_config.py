"""Fuzzing configs: random YAML (unknown keys, wrong types, out-of-range values) and random dotted
overrides through `load_config`.

Acceptable outcomes only: a RunConfig, or a ConfigError naming the file and the offending key (or the
override). An accepted config must keep its run directory inside output_dir.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import strategies as st

import _robust
from _robust import expect_clean, fuzz_test, time_limit
from pydantic import BaseModel

from instructkit.config import DatasetConfig, RunConfig, dump_config
from instructkit.config_load import load_config, validate_config
from instructkit.errors import ConfigError, DataError, InstructkitError, TemplateError

def _keys(model) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


# Every key of every section, read from the config models themselves, so a new key is fuzzed too.
SECTIONS = {name: (_keys(field.annotation) if isinstance(field.annotation, type)
                   and issubclass(field.annotation, BaseModel) else None)
            for name, field in RunConfig.model_fields.items() if name != "datasets"}
DATASET_KEYS = _keys(DatasetConfig)
TYPOS = ["lr_", "Lr", "epoch", "batchsize", "bach_size", "modle", "trian", "datset", "valdation", "seed ", "", "x"]

scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["fp32", "bf16", "linear", "cosine", "auto", "causal", "seq2seq", "left",
                                          "all", "demo", "test", "validation", "1e-4", "1e400", "nan", "-1", "0",
                                          "all-linear", "weighted", "jsonl"]),
)
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=6)


@st.composite
def section(draw, keys: list[str]):
    chosen = draw(st.lists(st.sampled_from(keys + TYPOS), max_size=5, unique=True))
    return {k: draw(value) for k in chosen}


@st.composite
def config_docs(draw):
    doc: dict = {}
    for name, keys in SECTIONS.items():
        if not draw(st.booleans()):
            continue
        if keys is None:
            doc[name] = draw(st.one_of(st.text(max_size=10), scalar, st.sampled_from(
                ["run", "a/b", "..", ".", "../escape", "a\\b", "", "~", "x" * 300, "ok name", "dots..ok"])))
        else:
            doc[name] = draw(st.one_of(section(keys), value))
    if draw(st.booleans()):
        doc["datasets"] = draw(st.one_of(st.lists(st.one_of(section(DATASET_KEYS), value), max_size=3), value))
    if draw(st.booleans()):
        doc[draw(st.sampled_from(TYPOS))] = draw(value)
    return doc


override_keys = st.one_of(
    st.builds(lambda s, k: f"{s}.{k}", st.sampled_from([s for s, k in SECTIONS.items() if k]),
              st.sampled_from(sum((k for k in SECTIONS.values() if k), []) + TYPOS)),
    st.builds(lambda i, k: f"datasets.{i}.{k}", st.integers(0, 3), st.sampled_from(DATASET_KEYS + TYPOS)),
    st.sampled_from(["name", "output_dir", "train", "datasets", "datasets.0", "train.lora.r", "train.lora.bogus",
                     "train.early_stopping.patience", "eval.metrics.x", "model.name.x", "", ".", "a..b",
                     "datasets.x", "datasets.-1.path"]),
    st.text(max_size=12),
)
override_values = st.one_of(st.sampled_from(["1", "0", "-1", "1e-4", "true", "null", "[1, 2]", "{a: 1}", "nan",
                                             ".inf", "'quoted'", "[unclosed", "{bad", "a: b: c", "!!binary x", "",
                                             "../x", "*alias", "&anchor x"]),
                            st.text(max_size=10))
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values),
                               st.text(max_size=10)), max_size=4)


def _check_accepted(config: RunConfig, source: Path) -> None:
    """Invariants of every accepted config."""
    assert isinstance(config, RunConfig)
    out = Path(config.output_dir).resolve()
    assert config.run_dir.resolve().parent == out, "the run directory escapes output_dir"
    assert validate_config(dump_config(config), "roundtrip") == config


@fuzz_test(default=150, slow=2500,
           doc=config_docs(), ovr=overrides)
def test_random_configs_load_or_name_file_and_key(doc, ovr):
    with tempfile.TemporaryDirectory() as tmp, time_limit(8, "load_config"):
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        culprits = [str(path), *ovr] + (["override"] if ovr else [])
        with expect_clean("config: random YAML + overrides", culprits, (doc, ovr)) as out:
            config = load_config(path, ovr)
        if out["error"] is None:
            _check_accepted(config, path)
            return
        message = str(out["error"])
        if "invalid configuration" in message:  # a validation error must point at a key
            named = [k for k in [*doc, *(o.split("=", 1)[0].split(".")[0] for o in ovr)] if str(k) in message]
            assert named or "(top level)" in message, message


@fuzz_test(default=100, slow=2000,
           ovr=overrides)
def test_random_overrides_on_defaults_apply_or_name_the_override(ovr):
    with time_limit(8, "overrides"), \
            expect_clean("config: overrides on defaults", ["defaults", "override", *ovr], ovr) as out:
        config = load_config(None, ovr)
    if out["error"] is None:
        _check_accepted(config, Path("defaults"))


@fuzz_test(default=100, slow=2000,
           text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                         st.lists(st.sampled_from(["train:", "  lr: 1", "\t", "- a", "name: x", ": :", "{", "}",
                                                   "&a", "*a", "!!python/object:os.system", "---", "...", "? x",
                                                   "datasets:", "  - path: x", "%YAML 1.1", "'", '"']),
                                  max_size=10).map("\n".join)))
def test_random_yaml_text_loads_or_names_the_file(text):
    with tempfile.TemporaryDirectory() as tmp, time_limit(8, "load_config on text"):
        path = Path(tmp) / "odd.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        with expect_clean("config: random YAML text", [str(path)], text) as out:
            config = load_config(path)
        if out["error"] is None:
            _check_accepted(config, path)


# --------------------------------------------------------------------------------------------------
# Regression tests and the run-directory rule
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc,ovr", [
    ("datasets: 5\n", ["datasets.0.path=x"]),
    ("train: 5\n", ["train.lr=1"]),
    ("datasets: [null]\n", ["datasets.0.path=x"]),
    ("datasets: [5]\n", ["datasets.0.path=x"]),
    ("", ["datasets.0.files=5", "datasets.0.files.x=1"]),
])
def test_override_through_a_scalar_is_a_config_error(doc, ovr, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(doc, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"override '.*': .* is .*not a section"):
        load_config(path, ovr)


def test_deep_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("train: " + "[" * 3000 + "]" * 3000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path}.*nested too deeply"):
        load_config(path)
    # unparsable as YAML: stays text
    config = load_config(None, ["model.chat_template=true", "model.system_prompt=" + "[" * 3000])
    assert config.model.system_prompt.startswith("[[[")


@pytest.mark.parametrize("name", ["a/b", "../escape", "..", ".", "a\\b", "", "/abs", "a\x00b", "tab\there", "x" * 256,
                                  "é" * 128])
def test_run_name_cannot_escape_or_break_the_run_directory(name, tmp_path):
    with pytest.raises(ConfigError, match="run name"):
        validate_config({"name": name, "output_dir": str(tmp_path)})
    _robust.blocked(f"run name {name[:40]!r}", "config name", "refused by RunConfig")


@fuzz_test(default=100, slow=2000,
           name=st.text(min_size=1, max_size=40))
def test_every_accepted_run_name_stays_inside_output_dir(name):
    with tempfile.TemporaryDirectory() as tmp:
        with expect_clean("config: run names", ["run name", "name"], name) as out:
            config = validate_config({"name": name, "output_dir": tmp})
        if out["error"] is None:
            run_dir = config.run_dir
            assert run_dir.resolve().parent == Path(tmp).resolve()
            run_dir.mkdir()  # the name is usable as a folder
            assert run_dir.is_dir()


def test_output_dir_with_nul_is_refused():
    with pytest.raises(ConfigError, match="output_dir"):
        validate_config({"output_dir": "runs\x00x"})


def test_paths_with_nul_characters_are_instructkit_errors(tmp_path):
    from instructkit.data.build import prepare
    from instructkit.templates.collection import load_collection

    config = validate_config({"name": "nul", "output_dir": str(tmp_path),
                              "datasets": [{"path": "reviews\x00.jsonl", "schema": "amazon_us_reviews"}]})
    with pytest.raises(DataError, match="reviews"):
        prepare(config)
    with pytest.raises(TemplateError, match="t.yaml"):
        load_collection("t.yaml\x00")
    with pytest.raises(InstructkitError):
        load_config(tmp_path)  # a folder, not a file


@pytest.mark.parametrize("key,value,what", [
    ("train.lr", "-1", "greater than 0"), ("train.batch_size", "0", "greater than or equal to 1"),
    ("split.validation", "1.5", "less than 1"), ("split", "{test: 0.9}", "leaves no training rows"),
    ("train.keep_checkpoints", "1", "greater than or equal to 2"), ("model.max_length", "4", "8"),
    ("train.precision", "fp8", "fp32"), ("train.lr", "fast", "valid number"), ("eval.num_beams", "0", "1"),
    ("train.lora.r", "0", "1"), ("datasets.0.weight", "0", "greater than 0"),
])
def test_out_of_range_values_name_the_key(key, value, what):
    ovr = [f"{key}={value}"] + (["datasets.0.path=demo"] if key.startswith("datasets") else [])
    with pytest.raises(ConfigError) as info:
        load_config(None, ovr)
    message = str(info.value)
    assert key in message and what in message, message


@pytest.mark.parametrize("key,unknown,suggestion", [
    ("train.bach_size", "train.bach_size", "batch_size"), ("trian.lr", "trian", "train"),
    ("model.nmae", "model.nmae", "name"), ("datasets.0.shcema", "datasets.0.shcema", "schema")])
def test_unknown_keys_suggest_the_nearest(key, unknown, suggestion):
    ovr = [f"{key}=1"] + (["datasets.0.path=demo"] if key.startswith("datasets") else [])
    with pytest.raises(ConfigError, match=rf"unknown key '{unknown}'.*{suggestion}"):
        load_config(None, ovr)
