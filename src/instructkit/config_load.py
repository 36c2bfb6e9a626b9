"""Loading a config: the YAML file, dotted command-line overrides, relative data paths, and the errors.

    load_config("run.yaml", ["split.seed=3", "datasets.0.path=/data/Reviews.csv", "train.lr=3e-5"])

Overrides use dotted keys, list items by index; the value is parsed as YAML (`train.packing=false` is a
boolean, `eval.few_shot=[1]` a list). Unknown keys are errors that suggest the nearest valid key, or, for a
name another fine-tuning tool uses (`learning_rate`, `num_train_epochs`, ...), the instructkit key that
holds that setting (`OTHER_TOOL_NAMES`).
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from instructkit.config import RunConfig
from instructkit.errors import ConfigError
from instructkit.io import read_yaml

# Names the Hugging Face Trainer (TrainingArguments, which TRL's SFTConfig extends), TRL and axolotl give to
# settings instructkit has: an unknown key with one of these names gets an error naming the instructkit
# key instead of the nearest spelling. Errors, not aliases: one setting keeps one name, so a file, the
# config.json saved with its run and an override agree (with an alias, `lr` in the file and
# `train.learning_rate=3e-5` on the command line would both be given and one would silently lose), and
# most of these names mean something a little different here (the notes).
# name: (tool, instructkit key or None when there is none, how it differs; "" when it means the same)
TRAINER = "the Hugging Face Trainer"
OTHER_TOOL_NAMES: dict[str, tuple[str, str | None, str]] = {
    "learning_rate": (TRAINER, "train.lr", ""),
    "num_train_epochs": (TRAINER, "train.epochs", ""),
    "max_steps": (TRAINER, "train.max_steps", ""),
    "per_device_train_batch_size": (TRAINER, "train.batch_size",
                                    "with packing, train.max_tokens_per_batch sizes the forward passes"),
    "per_device_eval_batch_size": (TRAINER, "eval.batch_size",
                                   "rows of the longest prompts; shorter ones batch more"),
    "gradient_accumulation_steps": (TRAINER, "train.grad_accum",
                                    "with packing, train.max_tokens_per_batch sizes the forward passes"),
    "warmup_ratio": (TRAINER, "train.warmup_ratio", "rounded to the nearest step (the Trainer rounds up)"),
    "warmup_steps": (TRAINER, "train.warmup_ratio", "a fraction of the steps, not a count"),
    "lr_scheduler_type": (TRAINER, "train.schedule",
                          "linear, cosine or constant, each after the warm-up"),
    "weight_decay": (TRAINER, "train.weight_decay", ""),
    "max_grad_norm": (TRAINER, "train.max_grad_norm", ""),
    "seed": (TRAINER, "train.seed", "split.seed seeds the data split"),
    "optim": (TRAINER, "train.optimizer", "adamw (fused), adamw_8bit (bitsandbytes) or adafactor"),
    "output_dir": (TRAINER, "output_dir", "top level; the run folder is <output_dir>/<name>"),
    "logging_steps": (TRAINER, None, "every optimizer step is logged to metrics.jsonl"),
    "eval_strategy": (TRAINER, "train.eval_every", "null: at each epoch end"),
    "evaluation_strategy": (TRAINER, "train.eval_every", "null: at each epoch end"),
    "eval_steps": (TRAINER, "train.eval_every", ""),
    "save_strategy": (TRAINER, "train.save_every", "null: at each validation"),
    "save_steps": (TRAINER, "train.save_every", ""),
    "save_total_limit": (TRAINER, "train.keep_checkpoints",
                         "at least 2; the best weights are kept apart"),
    "load_best_model_at_end": (TRAINER, None, "the best validation weights are always restored at the end"),
    "metric_for_best_model": (TRAINER, "train.early_stopping.metric",
                              "it also turns early stopping on"),
    "early_stopping_patience": (TRAINER, "train.early_stopping.patience", ""),
    "greater_is_better": (TRAINER, "train.early_stopping.greater_is_better", ""),
    "bf16": (TRAINER, "train.precision=bf16", ""),
    "fp16": (TRAINER, "train.precision=fp16", ""),
    "gradient_checkpointing": (TRAINER, "train.gradient_checkpointing", ""),
    "group_by_length": (TRAINER, "train.group_by_length", ""),
    "report_to": (TRAINER, "train.tensorboard", "metrics.jsonl is always written"),
    "generation_max_length": (TRAINER, "eval.max_new_tokens",
                              "new tokens per task family, e.g. {summarization: 64}"),
    "generation_num_beams": (TRAINER, "eval.num_beams", ""),
    "fsdp": (TRAINER, "train.sharding=fsdp", "PyTorch FSDP2 (fully_shard) under torchrun"),
    "deepspeed": (TRAINER, "train.sharding=fsdp", "FSDP2 is the supported sharding (ZeRO-3's role)"),
    "model_name_or_path": ("TRL", "model.name", ""),
    "max_seq_length": ("TRL", "model.max_length", "the prompt is cut, never the completion"),
    "max_length": ("TRL", "model.max_length", "the prompt is cut, never the completion"),
    "packing": ("TRL", "train.packing", ""),
    "completion_only_loss": ("TRL", None, "the loss is always on the completion only"),
    "use_peft": ("TRL", "train.lora.enabled", ""),
    "lora_r": ("TRL", "train.lora.r", ""),
    "lora_alpha": ("TRL", "train.lora.alpha", ""),
    "lora_dropout": ("TRL", "train.lora.dropout", ""),
    "lora_target_modules": ("TRL", "train.lora.target_modules", ""),
    "base_model": ("axolotl", "model.name", ""),
    "sequence_len": ("axolotl", "model.max_length", "the prompt is cut, never the completion"),
    "micro_batch_size": ("axolotl", "train.batch_size",
                         "with packing, train.max_tokens_per_batch sizes the forward passes"),
    "num_epochs": ("axolotl", "train.epochs", ""),
    "sample_packing": ("axolotl", "train.packing", ""),
    "lr_scheduler": ("axolotl", "train.schedule", "linear, cosine or constant, each after the warm-up"),
    "val_set_size": ("axolotl", "split.validation", "a fraction of the source rows"),
    "adapter": ("axolotl", "train.lora.enabled=true", "LoRA only, no QLoRA"),
    "train_on_inputs": ("axolotl", None, "the loss is always on the completion only"),
    "eval_batch_size": ("axolotl", "eval.batch_size", "rows of the longest prompts; shorter ones batch more"),
    "chat_template": ("axolotl", "model.chat_template", "true: the tokenizer's own template"),
    "streaming": ("datasets", "split.streaming", "auto streams data files over 64 MB"),
}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001); the value is parsed as YAML.

    Raises: ConfigError when `text` has no `=` or no key.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.strip().split("."), value


def apply_override(data: dict, keys: list[str], value: Any, text: str) -> None:
    """Set `data[keys[0]][keys[1]]... = value` in place, creating sections (and list items at the end).

    Raises: ConfigError (naming the override `text`) when a key goes through a scalar, a list is indexed
    by a name or past its end, or a section is empty.
    """
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {text!r}: {'.'.join(keys[:i])} is {node!r}, not a section or list")
        if isinstance(node, list):
            if not key.isdigit():
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:i])} is a list; use an index like .0")
            index = int(key)
            if index > len(node):
                raise ConfigError(f"override {text!r}: index {index} is past the end of a list of {len(node)}")
            if index == len(node):
                node.append({} if not last else value)
            if last:
                node[index] = value
            node = node[index]
        else:
            if last:
                node[key] = value
            else:
                if key == "datasets" and key not in node:
                    node[key] = []
                node = node.setdefault(key, {})
                if node is None:
                    raise ConfigError(f"override {text!r}: {key} is empty")


def _other_tool_hint(loc: tuple) -> str:
    """For an unknown key named as another tool names a setting: which instructkit key holds it."""
    name = loc[-1] if loc else None
    if not isinstance(name, str) or name not in OTHER_TOOL_NAMES:
        return ""
    tool, key, note = OTHER_TOOL_NAMES[name]
    use = f"use {key}" if key else "instructkit has no such key"
    return f": {name!r} is {tool}'s name: {use}" + (f" ({note})" if note else "")


def _suggest(loc: tuple, model: type[BaseModel]) -> str:
    """The nearest valid key for an unknown key at `loc`."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part) or next(
            (f for f in cls.model_fields.values() if f.alias == part), None)
        if field is None:
            return ""
        cls = _section_type(field.annotation)
    if cls is None:
        return ""
    names = [f.alias or n for n, f in cls.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(names)})"


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def validate_config(data: dict, source: str = "config") -> RunConfig:
    """Validate plain config data (a parsed YAML mapping) into a RunConfig.

    Raises: ConfigError naming `source` and every offending dotted key: an unknown key (with the nearest
    valid key, or the instructkit key for another tool's name), a wrong type or an out-of-range value.
    """
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
            if error["type"] == "extra_forbidden":
                hint = _other_tool_hint(error["loc"]) or _suggest(error["loc"], RunConfig)
                lines.append(f"unknown key {loc!r}{hint}")
            else:
                lines.append(f"{loc}: {error['msg']} (got {error.get('input')!r})"[:400])
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


PATH_RULE = ("relative paths in a config file are read from the config file's folder, those given on the "
             "command line from the current directory")
"""The one rule for relative input paths (data files, template collections, a model folder written as
./name or ../name); output_dir is where results go and stays relative to the current directory."""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides.

    Input paths become absolute by `PATH_RULE`: a relative path written in the file is read from the
    file's folder, one given as an override from the current directory (datasets.*.path, .files.*,
    .parallel.*, templates.files, and model.name when it starts with ./ or ../; `~` is expanded).

    Raises: ConfigError when the file is missing, unreadable, not YAML or not a mapping, when an override
    is malformed, and when validation fails (see `validate_config`).
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_yaml(path, error=ConfigError, what="config file") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections (name, datasets, train, ...)")
        _resolve_paths(data, Path(os.path.abspath(path)).parent)
    return config_from_data(data, overrides, source)


def config_from_data(data: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> RunConfig:
    """`load_config` for a mapping already read (e.g. the config a run recorded), named `source` in errors;
    its relative paths are read from the current directory. Raises ConfigError as `load_config`."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value, text)
    _resolve_paths(data, Path(os.getcwd()))  # the overrides' paths (the file's are absolute by now)
    return validate_config(data, source)


def resolve_path(value: Any, base: Path) -> Any:
    """`value` as an absolute, normalised path when it is a relative path string (`~` expanded); 'demo',
    absolute paths and non-strings are returned as they are."""
    if not isinstance(value, str) or not value or value == "demo" or "\x00" in value:
        return value
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(base / value)


def _resolve_paths(data: dict, base: Path) -> None:
    datasets = data.get("datasets")
    for entry in datasets if isinstance(datasets, list) else []:  # other types: validation names them
        if not isinstance(entry, dict):
            continue
        if "path" in entry:
            entry["path"] = resolve_path(entry["path"], base)
        for key in ("files", "parallel"):
            if isinstance(entry.get(key), dict):
                entry[key] = {k: resolve_path(v, base) for k, v in entry[key].items()}
    templates = data.get("templates")
    if isinstance(templates, dict) and isinstance(templates.get("files"), list):
        templates["files"] = [resolve_path(f, base) for f in templates["files"]]
    model = data.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    if isinstance(name, str) and name.startswith(("./", "../", "~", ".\\", "..\\")):
        model["name"] = resolve_path(name, base)
