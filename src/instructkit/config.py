"""Typed configuration: the sections of one small YAML file, each key with its type, default and meaning.

    name: amazon-rating                # the run directory is <output_dir>/<name>
    datasets:                          # one entry per source (a mixture when several)
      - path: ../shared/data/amazon_fine_food/reviews.csv
        schema: amazon_fine_food
        templates: [amazon_fine_food.predict_rating]
    split: {seed: 0, validation: 0.1, test: 0.2}
    model: {name: smollm2-135m-instruct}
    train: {lr: 1e-4, epochs: 2}

Every key is overridable on the command line with a dotted key, list items by index:
`split.seed=3 datasets.0.path=/data/Reviews.csv`. Loading, overrides and the error messages are in
config_load.py; the `train` section is in config_train.py (imported here: every section is
`instructkit.config.<Name>`); the key reference docs/config.md is generated from the `description` of every
field (`python -m instructkit.config_docs`).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from instructkit.config_base import Section
from instructkit.config_train import EarlyStopping, LoraSettings, TrainConfig

__all__ = ["DatasetConfig", "EarlyStopping", "EvalConfig", "ExportConfig", "LoraSettings", "ModelConfig",
           "RunConfig", "Section", "SplitConfig", "TemplatesConfig", "TrainConfig", "dump_config"]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def check_delimiter(value: str) -> str:
    """`value` as a field separator (`datasets.N.delimiter`, `templates check --delimiter`).

    Raises: ValueError unless it is one character other than a quote or a line break.
    """
    if len(value) != 1 or value in "\"\r\n":
        raise ValueError("must be one character other than a quote or a line break")
    return value


class DatasetConfig(Section):
    """One data source and the templates that turn its rows into instruction examples."""

    path: str | None = Field(
        None, description="File or folder (CSV/TSV/JSON/JSONL/Parquet, .gz of a text format, a saved Hugging "
        "Face dataset), or 'demo' for the built-in demo reviews. A relative path is read from the config "
        "file's folder (given on the command line: from the current directory); the same holds for `files`, "
        "`parallel`, templates.files and a model.name that starts with ./ or ../.")
    files: dict[str, str] | None = Field(
        None, description="The dataset's own splits: {train: PATH, validation: PATH, test: PATH}; missing "
        "splits are carved from train.")
    name: str | None = Field(
        None, description="Name of this source in reports, source ids and mixtures (default: the schema, "
        "else the file name).")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "hf_disk", "parallel"] = Field(
        "auto", description="File format; 'auto' picks by suffix (a folder is a saved dataset). 'parallel': "
        "`path` is a stem read as `<stem>.<field>[.gz]`, one line-aligned text file per schema field.")
    schema_name: str | None = Field(
        None, alias="schema", description="Template schema the rows follow (e.g. amazon_fine_food). Not "
        "needed for data already in prompt/completion or chat `messages` form.")
    columns: dict[str, str | list[str]] = Field(
        default_factory=dict, description="Schema field -> column of this file, e.g. {review_body: Text}; a "
        "list gives candidates tried in order (SST-2 train calls its text `sentence`, its dev `content`).")
    parallel: dict[str, str] | None = Field(None, description="Line-aligned text files per field for "
        "translation data, e.g. {en: train.en.gz, de: train.de.gz}.")
    templates: list[str] | Literal["all"] = Field(
        "all", description="Template ids to render, or 'all' of the schema's templates.")
    templates_per_row: int | None = Field(
        None, ge=1, description="Training rows: render k of the chosen templates per row, sampled (seeded), "
        "fewer examples per epoch; validation and test rows always get every template. Default: every "
        "chosen template.")
    held_out_templates: list[str] = Field(
        default_factory=list, description="Template ids rendered only on validation and test rows, reported "
        "apart (unseen instructions).")
    held_out: bool = Field(
        False, description="Keep this whole dataset out of training: all its rows go to test (evaluation on an "
        "unseen dataset); validation loss and early stopping never see it.")
    weight: float = Field(
        1.0, gt=0, description="Relative share of the training examples in a mixture (1 and 1: half and half; "
        "a dataset short of its share is repeated, one over it subsampled). No effect with one dataset.")
    max_rows: int | None = Field(
        None, ge=1, description="Cap on source rows per file (after deduplication): a seeded random sample, "
        "so a dataset's own test file is not sampled away.")
    dedup_key: list[str] | None = Field(
        None, description="Fields identifying a duplicate row (default: the fields the chosen templates "
        "read); duplicates with different labels are all dropped.")
    group_by: str | None = Field(
        None, description="Column whose groups never straddle splits (e.g. ProductId); overrides "
        "split.group_by for this dataset.")
    encoding: str = Field(
        "utf-8", description="Text encoding of CSV/TSV/JSON files (a BOM is always accepted).")
    delimiter: str | None = Field(
        None, description="Field separator of delimited text, one character: e.g. ';' (a European Excel export) "
        "or '|'. Default: ',' for CSV (quoted as RFC 4180), tab for TSV (unquoted). Given, the dataset's .csv "
        "and .tsv files are read as CSV with this separator (another suffix, such as .txt: add `format: csv`); "
        "JSON and Parquet have none.")
    skip_bad_rows: bool = Field(
        False, description="Skip rows that fail (counted per reason in stats.json) instead of stopping at "
        "the first.")
    choices: list[str] | Literal["auto", "none"] = Field(
        "auto", description="Prompt/completion (or chat) data: the closed set of answers, scored by rank "
        "classification with accuracy and macro-F1 instead of free generation. 'auto' detects one when the "
        "most frequent completions covering >= 95% of the rows are at most 20 (>= 4 rows per answer on "
        "average; rarer completions are left out, counted) in prompt/completion data, never in chat data (free "
        "text unless declared); 'none': free text. The decision is in stats.json (`answers`).")
    metrics: list[str] | None = Field(
        None, description="Prompt/completion (or chat) data: metric names for its evaluation (default: "
        "accuracy and macro_f1 with choices, else rougeL). Templated data: a template's own metrics, or "
        "eval.metrics.")

    @field_validator("choices")
    @classmethod
    def _distinct_choices(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list):
            seen: dict[str, str] = {}
            for k, choice in enumerate(value):
                form = unicodedata.normalize("NFC", choice)
                if form in seen:
                    raise ValueError(f"choices {seen[form]!r} and {choice!r} (entry {k + 1}) are the same text (up "
                                     "to Unicode canonical equivalence, NFC): keep one")
                seen[form] = choice
        return value

    @field_validator("delimiter")
    @classmethod
    def _one_separator(cls, value: str | None) -> str | None:
        return None if value is None else check_delimiter(value)

    @model_validator(mode="after")
    def _delimited_format(self) -> DatasetConfig:
        if self.delimiter is not None and self.format not in ("auto", "csv", "tsv"):
            raise ValueError(f"delimiter is set but format {self.format!r} has no field separator "
                             "(it applies to CSV and TSV files)")
        return self


class SplitConfig(Section):
    """Splitting source rows (before templating) into train / validation / test."""

    seed: int = Field(
        0, description="Seed of the data side: row caps, the split, per-row template sampling, mixture "
        "resampling, and the evaluation subsets and bootstrap.")
    validation: float = Field(
        0.1, ge=0, lt=1, description="Fraction of source rows for validation (a row's examples from several "
        "templates stay in one split).")
    test: float = Field(0.2, ge=0, lt=1, description="Fraction of source rows for test.")
    stratify: bool = Field(
        True, description="Keep label proportions equal across splits when there is a label.")
    group_by: str | None = Field(
        None, description="Default group column for every dataset (a dataset's own group_by wins); whole "
        "groups go to one split.")
    prompt_leakage: Literal["drop", "report"] = Field(
        "drop", description="A training example whose prompt is also a validation or test prompt (of any "
        "template or dataset, e.g. a review re-posted under another headline): 'drop' leaves it out of "
        "train; 'report' keeps it. stats.json counts both (leaked_prompts, prompt_leakage).")
    streaming: Literal["auto", "on", "off"] = Field(
        "auto", description="Prepare in bounded memory: read each file twice in chunks (rows hashed for "
        "dedup, then rendered) and shuffle train on disk; the same split and files as in memory. 'auto': "
        "when the data files pass 64 MB.")
    text_match: Literal["exact", "normalized"] = Field(
        "exact", description="How dedup keys and the leakage guard's prompts compare: 'exact' (dedup keys up to "
        "Unicode canonical equivalence, NFC: 'cafe\u0301' = 'caf\u00e9'), or 'normalized' "
        "(Unicode NFKC, casefolded, whitespace runs one space, stripped: 'Great product!' = 'great  product! ').")

    @field_validator("streaming", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare `on` / `off` as true / false: `streaming: off` is meant
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError(f"validation + test = {self.validation + self.test} leaves no training rows")
        return self


class TemplatesConfig(Section):
    """Where templates come from: the built-in catalog and the user's own collections."""

    files: list[str] = Field(
        default_factory=list, description="User template collections (instructkit or PromptSource YAML) "
        "added to the built-in catalog.")
    builtin: bool = Field(True, description="Include the built-in template catalog (off: only `files`).")


# --------------------------------------------------------------------------------------------------
# Model, training, evaluation
# --------------------------------------------------------------------------------------------------


class ModelConfig(Section):
    """The model to fine-tune and how examples become its tokens."""

    name: str = Field(
        "smollm2-135m-instruct", description="Short name (smollm2-135m-instruct, gemma-3-270m), a local "
        "Hugging Face folder, a .gguf file, or a hub id in the local cache.")
    kind: Literal["auto", "causal", "seq2seq"] = Field(
        "auto", description="Decoder-only ('causal') or encoder-decoder ('seq2seq', e.g. T5); 'auto' reads "
        "config.json, and a kind that contradicts it is an error.")
    chat_template: bool = Field(
        False, description="Wrap prompt/completion in the tokenizer's chat template (user turn, assistant "
        "turn); for instruct models, causal only.")
    system_prompt: str | None = Field(
        None, description="System message for the chat template. null: none is sent, so the template's own "
        "default applies; '': an empty system turn.")
    max_length: int = Field(
        256, ge=8, description="Tokens per example, prompt + completion; the prompt is cut, never the "
        "completion (an example whose completion alone does not fit is dropped). Longer: more context, more "
        "memory and time per step.")
    truncation: Literal["left", "middle"] = Field(
        "left", description="Where to cut an over-long prompt: 'left' drops its start (keeping BOS), "
        "'middle' keeps both ends.")
    trust_remote_code: bool = Field(False, description="Run model code from the model folder (off: it is code).")
    allow_pickle: bool = Field(False, description="Allow loading .bin/.pt weights (pickle can run code).")
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flash_attention_3",
                                 "flex_attention"] = Field(
        "auto", description="Attention kernel (transformers' attn_implementation). 'auto': on CPU sdpa_varlen "
        "(instructkit's: each packed example attends on its own, no block mask; Llama and Gemma 3, else sdpa); "
        "on CUDA flash_attention_2 when flash_attn is installed and the weights load in bf16/fp16, else sdpa "
        "with cuDNN attention switched off for the process (it builds a plan per new batch shape, ~0.5 s "
        "each). The choice is logged. Other values are passed as they are.")

    @model_validator(mode="after")
    def _system_prompt_needs_chat(self) -> ModelConfig:
        if self.system_prompt is not None and not self.chat_template:  # else it would be silently unused
            raise ValueError("model.system_prompt is sent only through the chat template: set "
                             "model.chat_template: true, or drop model.system_prompt")
        return self


class EvalConfig(Section):
    """Evaluating the base and the fine-tuned model, and the comparison report."""

    split: Literal["validation", "test"] = Field(
        "test", description="Split the models are evaluated and compared on.")
    max_examples: int | None = Field(
        None, ge=1, description="Cap per template (a fixed, seeded subset, the same for every model); lower "
        "is faster, with wider intervals.")
    batch_size: int = Field(
        16, ge=1, description="Examples per pass of the longest prompts when scoring and generating (and in "
        "validation); shorter ones go up to 4x as many within those tokens. Lower it to save memory.")
    metrics: dict[str, list[str]] = Field(
        default_factory=dict, description="Template id -> metric names, replacing the template's own.")
    length_normalized: bool = Field(
        False, description="Rank choices by mean instead of summed log-probability.")
    choice_end: Literal["eos", "none"] = Field(
        "eos", description="What follows each choice in rank classification (evaluation, validation, early "
        "stopping): 'eos' scores the end of an answer, so a prefix of another choice (\"1\" of \"10\") can win: "
        "EOS or the chat end-of-turn token as trained; k-shot, what ends each demonstration's answer, the blank "
        "line \"\\n\\n\" (with a chat template its end-of-turn token). 'none': the text alone (lm-eval's acc).")
    max_new_tokens: dict[str, int] = Field(
        default_factory=dict, description="Task family -> generation length in tokens, over the defaults "
        "(rating 8, summarization 64, ...).")
    num_beams: int = Field(1, ge=1, description="Beam width for generation (1: greedy); more is slower.")
    do_sample: bool = Field(False, description="Sample answers (seeded) instead of greedy or beam search.")
    few_shot: list[int] = Field(
        default_factory=lambda: [1, 3], description="k in-context examples for the few-shot baseline of the "
        "base model ([] to skip).")
    bootstrap_resamples: int = Field(
        1000, ge=100, description="Bootstrap resamples of the 95% confidence intervals: more is steadier, "
        "slower.")
    baselines: bool = Field(
        True, description="Put trivial and classical baselines (majority class, TF-IDF + logistic "
        "regression, lead sentence, ...) beside the models in the report.")
    base_beside_training: bool = Field(True, description="`instructkit run`: evaluate the base model in a "
        "second process during training when it leaves CPU cores and memory idle (no GPU, train.threads set, x 2 <= cores).")


class ExportConfig(Section):
    """Export of the fine-tuned model at the end of `instructkit run` (also: `instructkit export`)."""

    gguf: Literal["f32", "f16", "bf16", "q8_0"] | None = Field(
        None, description="Write <run_dir>/export/<name>.<quant>.gguf for llama.cpp, Ollama and LM Studio "
        "at this quant type (f32, f16, bf16 or q8_0; pure Python, needs the gguf extra); null: no export.")
    ollama: bool = Field(
        False, description="Also write an Ollama Modelfile beside the GGUF (chat template, stop tokens); "
        "needs `gguf`.")

    @model_validator(mode="after")
    def _ollama_needs_gguf(self) -> ExportConfig:
        if self.ollama and self.gguf is None:
            raise ValueError("export.ollama needs export.gguf (Ollama reads GGUF files), e.g. export.gguf=q8_0")
        return self


class RunConfig(Section):
    """A whole run: the data, the model, training and evaluation (one YAML file)."""

    name: str = Field("demo", description="Run name: the run folder is <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Folder holding the run folders; a relative one is in the "
                            "current directory (results go where you run, unlike input paths, which are read "
                            "from the config file's folder).")
    datasets: list[DatasetConfig] = Field(
        default_factory=list, description="Data sources, one entry each (several make a mixture).")
    split: SplitConfig = Field(default_factory=SplitConfig, description="How source rows are split.")
    templates: TemplatesConfig = Field(default_factory=TemplatesConfig, description="Template collections.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model and its tokenization.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and the report.")
    export: ExportConfig = Field(
        default_factory=ExportConfig, description="GGUF / Ollama export of the fine-tuned model.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if (not value or "/" in value or "\\" in value or value in {".", ".."} or any(ord(c) < 32 for c in value)
                or len(value.encode("utf-8", "surrogatepass")) > 255):
            raise ValueError(f"run name {value[:80]!r} must be a plain folder name (no / or \\, no control "
                             "characters, at most 255 bytes)")
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


def dump_config(config: RunConfig) -> dict:
    """The config as plain JSON data under the YAML key names (`schema`, not schema_name)."""
    return config.model_dump(mode="json", by_alias=True)
