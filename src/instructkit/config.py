"""Typed configuration: one small sectioned YAML file, every key overridable on the command line.

    name: amazon-rating                # the run directory is <output_dir>/<name>
    datasets:                          # one entry per source (a mixture when several)
      - path: ../shared/data/amazon_fine_food/reviews.csv
        schema: amazon_fine_food
        templates: [amazon_fine_food.predict_rating]
    split: {seed: 0, validation: 0.1, test: 0.2}
    model: {name: smollm2-135m-instruct}
    train: {lr: 1e-4, epochs: 2}

Overrides use dotted keys, list items by index: `split.seed=3 datasets.0.path=/data/Reviews.csv`.
Unknown keys are errors that suggest the nearest valid key.
"""

from __future__ import annotations

import difflib
import glob
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from instructkit.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


class DatasetConfig(Section):
    """One data source and the templates that turn its rows into instruction examples."""

    path: str | None = Field(None, description="File or folder (CSV/TSV/JSON/JSONL/Parquet/saved HF dataset). "
                             "'demo' for the built-in demo reviews.")
    files: dict[str, str] | None = Field(
        None, description="The dataset's own splits: {train: PATH, validation: PATH, test: PATH}; "
        "missing splits are carved from train.")
    name: str | None = Field(None, description="Name of this source in reports and mixtures (default: schema).")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "hf_disk", "parallel"] = "auto"
    schema_name: str | None = Field(
        None, alias="schema", description="Template schema the rows follow (e.g. amazon_fine_food). "
        "Not needed for data already in prompt/completion or chat `messages` form.")
    columns: dict[str, str | list[str]] = Field(
        default_factory=dict, description="Schema field -> column of this file, e.g. {review_body: Text}; a list "
        "gives candidates tried in order (SST-2 train calls its text `sentence`, its dev `content`).")
    parallel: dict[str, str] | None = Field(
        None, description="Line-aligned text files per field for translation data, e.g. {en: train.en.gz, de: train.de.gz}.")
    templates: list[str] | Literal["all"] = Field("all", description="Template ids, or 'all' of the schema.")
    templates_per_row: int | None = Field(None, ge=1, description="Sample k templates per row (seeded); "
                                          "default: every chosen template.")
    held_out_templates: list[str] = Field(default_factory=list,
                                          description="Templates kept out of training (evaluated separately).")
    held_out: bool = Field(False, description="Keep this whole dataset out of training (evaluation only).")
    weight: float = Field(1.0, gt=0, description="Relative share of training examples in a mixture.")
    max_rows: int | None = Field(None, ge=1, description="Cap on source rows per file (after deduplication): "
                                 "a seeded random sample, so a dataset's own test file is not sampled away.")
    dedup_key: list[str] | None = Field(None, description="Fields identifying a duplicate row "
                                        "(default: the fields the chosen templates read).")
    group_by: str | None = Field(None, description="Column whose groups never straddle splits (e.g. ProductId).")
    encoding: str = Field("utf-8", description="Text encoding of CSV/TSV/JSON files (a BOM is always accepted).")
    skip_bad_rows: bool = Field(False, description="Skip rows that fail (reported in stats.json) "
                                "instead of stopping at the first.")


class SplitConfig(Section):
    """Splitting source rows (before templating) into train / validation / test."""

    seed: int = 0
    validation: float = Field(0.1, ge=0, lt=1, description="Fraction of rows for validation.")
    test: float = Field(0.2, ge=0, lt=1, description="Fraction of rows for test.")
    stratify: bool = Field(True, description="Keep label proportions equal across splits when there is a label.")
    group_by: str | None = Field(None, description="Default group column for every dataset.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError(f"validation + test = {self.validation + self.test} leaves no training rows")
        return self


class TemplatesConfig(Section):
    files: list[str] = Field(default_factory=list, description="User template collections (instructkit "
                             "or PromptSource YAML) added to the built-in catalog.")
    builtin: bool = True


# --------------------------------------------------------------------------------------------------
# Model, training, evaluation
# --------------------------------------------------------------------------------------------------


class ModelConfig(Section):
    name: str = Field("smollm2-135m-instruct", description="Short name (smollm2-135m-instruct, gemma-3-270m), "
                      "a local Hugging Face folder, a .gguf file, or a hub id in the local cache.")
    kind: Literal["auto", "causal", "seq2seq"] = "auto"
    chat_template: bool = Field(False, description="Wrap prompt/completion in the tokenizer's chat template.")
    system_prompt: str | None = Field(None, description="System prompt for the chat template ('' = none; "
                                      "None = the template's default).")
    max_length: int = Field(256, ge=8, description="Tokens per example; the prompt is cut, never the completion.")
    truncation: Literal["left", "middle"] = Field("left", description="Where to cut an over-long prompt.")
    trust_remote_code: bool = Field(False, description="Run model code from the model folder (off: it is code).")
    allow_pickle: bool = Field(False, description="Allow loading .bin/.pt weights (pickle can run code).")


class LoraSettings(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    merge: bool = Field(True, description="Merge the adapter into the saved model (else save the adapter alone).")


class EarlyStopping(Section):
    metric: str | None = Field(None, description="Metric to watch (default: macro_f1 for classification "
                               "templates, else validation loss).")
    patience: int = Field(3, ge=1, description="Validations without improvement before stopping.")
    min_delta: float = 0.0


class TrainConfig(Section):
    # Optimisation
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    # Batching
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    packing: bool = Field(True, description="Causal models: pack examples into rows without padding "
                          "(position_ids restart per example; attention never crosses examples).")
    max_tokens_per_batch: int | None = Field(None, ge=8, description="With packing: tokens per packed micro-batch "
                                             "(default batch_size x max_length).")
    group_by_length: bool = True
    class_balance: Literal["none", "weighted", "sampled"] = Field(
        "none", description="For classification data: class-weighted loss or balanced sampling.")
    # Memory management
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32 on CPU (bf16 measured 1.6x slower).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower.")
    logits_at_labels: bool = Field(True, description="Run the LM head only where labels are.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice).")
    # Validation and checkpoints
    eval_every: int | None = Field(None, ge=1, description="Validate every N steps (default: each epoch end).")
    eval_max_examples: int = Field(200, ge=1, description="Cap on the fixed validation subset for task metrics.")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: at each validation).")
    keep_checkpoints: int = Field(2, ge=2)
    early_stopping: EarlyStopping | None = None
    tensorboard: bool = False


class EvalConfig(Section):
    split: Literal["validation", "test"] = "test"
    max_examples: int | None = Field(None, ge=1, description="Cap per template (a fixed, seeded subset).")
    batch_size: int = Field(16, ge=1)
    metrics: dict[str, list[str]] = Field(default_factory=dict, description="Template id -> metrics override.")
    length_normalized: bool = Field(False, description="Rank choices by mean instead of summed log-probability.")
    max_new_tokens: dict[str, int] = Field(default_factory=dict, description="Task family -> generation length.")
    num_beams: int = Field(1, ge=1)
    do_sample: bool = False
    few_shot: list[int] = Field(default_factory=lambda: [1, 3], description="k in-context examples for the "
                                "few-shot baseline of the base model ([] to skip).")
    bootstrap_resamples: int = Field(1000, ge=100)
    baselines: bool = True


class RunConfig(Section):
    name: str = "demo"
    output_dir: str = "runs"
    datasets: list[DatasetConfig] = Field(default_factory=list)
    split: SplitConfig = Field(default_factory=SplitConfig)
    templates: TemplatesConfig = Field(default_factory=TemplatesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value or value in {".", ".."}:
            raise ValueError(f"run name {value!r} must be a plain folder name")
        if any(ord(c) < 32 for c in value) or len(value.encode("utf-8", "surrogatepass")) > 255:
            raise ValueError(f"run name {value[:80]!r} must be a plain folder name (no control characters, "
                             "at most 255 bytes)")
        return value

    @field_validator("output_dir")
    @classmethod
    def _valid_dir(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError(f"output_dir {value[:80]!r} contains a NUL character")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------------
# Loading, overrides, errors
# --------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001); the value is parsed as YAML."""
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
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
            if error["type"] == "extra_forbidden":
                lines.append(f"unknown key {loc!r}{_suggest(error['loc'], RunConfig)}")
            else:
                lines.append(f"{loc}: {error['msg']} (got {error.get('input')!r})"[:400])
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides.

    Relative data paths in the file are resolved against the config file's folder when they exist
    there, else against the current directory.
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (UnicodeDecodeError, OSError, ValueError) as exc:  # a folder, no permission, a NUL in the path
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections (name, datasets, train, ...)")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value, text)
    if path is not None:
        _resolve_paths(data, Path(path).parent)
    return validate_config(data, source)


def _resolve_paths(data: dict, base: Path) -> None:
    def resolve(p: Any) -> Any:
        if not isinstance(p, str) or p == "demo" or os.path.isabs(p) or os.path.exists(p):
            return p
        candidate = base / p
        # a `format: parallel` stem (multi30k/train -> train.en.gz, train.de.gz) exists only with a suffix
        stem = candidate.parent.is_dir() and any(candidate.parent.glob(glob.escape(candidate.name) + ".*"))
        return str(candidate) if candidate.exists() or stem else p

    datasets = data.get("datasets")
    for entry in datasets if isinstance(datasets, list) else []:  # other types: validation names them
        if not isinstance(entry, dict):
            continue
        if "path" in entry:
            entry["path"] = resolve(entry["path"])
        for key in ("files", "parallel"):
            if isinstance(entry.get(key), dict):
                entry[key] = {k: resolve(v) for k, v in entry[key].items()}
    templates = data.get("templates")
    if isinstance(templates, dict) and isinstance(templates.get("files"), list):
        templates["files"] = [resolve(f) for f in templates["files"]]


def dump_config(config: RunConfig) -> dict:
    return config.model_dump(mode="json", by_alias=True)
