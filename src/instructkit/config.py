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
config_load.py; the key reference docs/config.md is generated from the `description` of every field
here (`python -m instructkit.config_docs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


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
    parallel: dict[str, str] | None = Field(
        None, description="Line-aligned text files per field for translation data, e.g. {en: train.en.gz, "
        "de: train.de.gz}.")
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
        1.0, gt=0, description="Relative share of the training examples in a mixture (1 and 1: half and "
        "half; a dataset short of its share is repeated, one over it subsampled). No effect with one "
        "dataset.")
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


class LoraSettings(Section):
    """LoRA adapters (peft): only r x (in + out) parameters per adapted linear layer are trained."""

    enabled: bool = Field(
        False, description="Train LoRA adapters instead of all weights: gradients and AdamW state only for "
        "the adapters (far less memory), often a little lower quality.")
    r: int = Field(
        16, ge=1, description="Adapter rank: r x (in + out) parameters per adapted layer; higher adapts more "
        "and costs more.")
    alpha: int = Field(
        32, ge=1, description="LoRA scale numerator: the adapter's update is multiplied by alpha / r.")
    dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the adapter inputs (0 also saves the memory of its mask).")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]), or 'all-linear': every "
        "linear layer but the LM head.")
    merge: bool = Field(
        True, description="Merge the adapter into the saved model (else save the adapter alone).")


class EarlyStopping(Section):
    """Stop training when the validation metric stops improving (the best weights are kept either way)."""

    metric: str | None = Field(
        None, description="Metric that picks the best weights and stops training (default: macro_f1 when the "
        "task metrics have it, else validation loss).")
    patience: int = Field(3, ge=1, description="Validations without improvement before stopping.")
    min_delta: float = Field(
        0.0, description="Smallest change of the metric that counts as an improvement, in the metric's own "
        "units.")


class TrainConfig(Section):
    """Supervised fine-tuning: optimiser, batching, memory, validation and checkpoints."""

    # Optimisation
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"] = Field(
        "adamw", description="Update rule: 'adamw' (fused torch AdamW, two fp32 moments: 8 bytes per "
        "trainable parameter), 'adamw_8bit' (bitsandbytes AdamW8bit, moments in 8 bits: ~2 bytes; pip install "
        "'instructkit[lowbit]'; ~15x slower update on CPU), 'adafactor' (transformers Adafactor at a fixed lr, "
        "factored second moment, no first moment: ~0 bytes).")
    embedding_optim_bits: Literal[8, 32] = Field(
        32, description="adamw_8bit: bits of the embedding matrices' moments (nn.Embedding weights, a tied LM "
        "head included). 32, as transformers' Trainer and bitsandbytes' StableEmbedding do: +6 bytes per "
        "embedding value (SmolLM2-135M +0.17 GB, Gemma 3 270M +1.0 GB). 8: every matrix in 8 bits.")
    optimizer_in_backward: bool = Field(
        False, description="Apply the optimizer to each parameter as soon as its gradient is complete in "
        "backward and free that gradient, so the gradients never exist all at once (torchtune's approach). "
        "One process only. With max_grad_norm each step's forward and backward run twice, the first measuring "
        "the global norm (exact clipping, as LOMO does); max_grad_norm: null runs them once, unclipped. "
        "With grad_accum > 1 or a step of several micro-batches the earlier gradients are kept until the last "
        "micro-batch (same result, no saving for that step).")
    loss_chunk_tokens: int | None = Field(
        None, ge=1, description="Causal models: run the LM head and cross-entropy over the labelled positions "
        "this many at a time, each chunk's logits recomputed in backward, so the positions x vocabulary "
        "logits are never held whole (null: all at once). 128-512 suits large vocabularies (Gemma 3: 262k).")
    release_free_memory: bool = Field(
        True, description="CPU training: return the C allocator's free pages to the system (glibc malloc_trim) "
        "before each backward pass and, with optimizer_in_backward, before the largest parameter's update and after "
        "every 16 MB of gradients applied, so freed activations, gradients and temporaries do not stay resident at "
        "the peak. No effect on GPU or without glibc.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate, reached after warm-up; then `schedule` applies.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW decoupled weight decay of the weight matrices (biases and norms are "
        "never decayed).")
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training examples (a fraction allowed); max_steps wins.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (replaces epochs).")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="lr after warm-up: linear decay to 0, half a cosine to 0, or constant.")
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Fraction of the optimizer steps over which the lr rises linearly, "
        "rounded to the nearest step and at least 1 when above 0 (the HF Trainer rounds up).")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this before each step (null: no clipping).")
    seed: int = Field(
        0, description="Seed of training randomness: batch order, dropout, LoRA initialisation (the data "
        "split has split.seed).")
    # Batching
    batch_size: int = Field(
        8, ge=1, description="Examples per micro-batch (per process); an optimizer step sees batch_size x "
        "grad_accum x processes examples. Lower it to save memory.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step: a bigger step for the same memory, more "
        "passes per step (batch_size 8 x 1 and 2 x 4 train alike).")
    packing: bool = Field(
        True, description="Causal models: pack examples into rows without padding (position_ids restart per "
        "example; attention never crosses examples).")
    max_tokens_per_batch: int | None = Field(
        None, ge=8, description="With packing: micro-batch token budget, rows x padded width per forward "
        "pass (default batch_size x model.max_length); lower it to save memory.")
    group_by_length: bool = Field(
        True, description="Give a step examples of similar length (less padding, faster); the steps stay in "
        "random order. With packing and pad_to_multiple_of > 1, steps are token-balanced instead.")
    pad_to_multiple_of: int | None = Field(
        None, ge=1, description="Round every micro-batch's width (tokens per row) up to a multiple of this, "
        "so an accelerator sees few distinct shapes. With packing and a value > 1, each micro-batch is one "
        "row of batch_size examples chosen so its tokens land just under a multiple (< 1% padding on the "
        "Amazon rating data). Default: 64 on CUDA, 1 (exact widths) elsewhere.")
    loss_on: Literal["all_assistant_turns", "last_assistant_turn"] = Field(
        "all_assistant_turns", description="Chat data with `model.chat_template`: learn every assistant turn "
        "of a conversation (each on the exact prompt the template renders before it), or only the last one.")
    class_balance: Literal["none", "weighted", "sampled"] = Field(
        "none", description="Classification data: 'weighted' loss (each class counts equally), 'sampled' "
        "(classes drawn equally often, with replacement), or 'none' (the data as it is).")
    # Memory management
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32, or bf16/fp16 mixed precision through accelerate (GPUs); on CPU keep fp32 "
        "(bf16 measured 1.6x slower).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower.")
    sharding: Literal["none", "ddp", "fsdp"] | None = Field(
        None, description="Several processes (torchrun): 'ddp' (whole model per process), 'fsdp' (FSDP2: "
        "parameters, gradients and AdamW state split over the processes; sharded DCP checkpoints) or 'none' "
        "(one process). Default: ddp under a launcher with several processes, else none.")
    compile: bool = Field(
        False, description="torch.compile the model for training, with dynamic shapes: one graph serves every "
        "row width (the first steps pay the compilation). See README for the measured CPU effect.")
    logits_at_labels: bool = Field(
        True, description="Run the LM head only where labels are (causal models): saves time and the tokens "
        "x vocabulary logits.")
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="LoRA adapters (off: full fine-tuning).")
    tokenize_processes: int | None = Field(
        None, ge=1, description="Processes that tokenize a split into the run's memory-mapped cache "
        "(default: every core this process may use; 1: in this process).")
    threads: int | None = Field(
        None, ge=1, description="torch threads for training and evaluation (default: torch's choice; 1 is "
        "steadiest on 2 cores).")
    # Validation and checkpoints
    eval_every: int | None = Field(
        None, ge=1, description="Validate (loss + task metrics) every N optimizer steps and at the end "
        "(default: each epoch end).")
    eval_max_examples: int = Field(
        200, ge=1, description="Cap on the fixed validation subset for task metrics: more is steadier, "
        "slower to validate.")
    save_every: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (default: at each validation).")
    save_every_minutes: float | None = Field(
        10.0, gt=0, description="Also checkpoint when this many minutes of wall time passed since the last "
        "checkpoint (or the start), so a long epoch never holds all the work unsaved (null: off). Ctrl-C "
        "always writes one at the step in flight.")
    keep_checkpoints: int = Field(
        2, ge=2, description="Newest resumable checkpoints kept on disk (a full SmolLM2-135M one is 1.6 GB); "
        "the best weights are kept apart.")
    early_stopping: EarlyStopping | None = Field(
        None, description="Stop when the validation metric stops improving (null: train to the end).")
    tensorboard: bool = Field(
        False, description="Also write TensorBoard logs to <run_dir>/tensorboard (metrics.jsonl is always "
        "written).")

    @model_validator(mode="after")
    def _in_backward_limits(self) -> TrainConfig:
        if self.sharding == "fsdp" and (self.precision == "fp16" or self.lora.enabled):
            raise ValueError("train.sharding=fsdp supports fp32 and bf16 full fine-tuning: not "
                             + ("train.precision=fp16 (use bf16)" if self.precision == "fp16" else
                                "LoRA (train.lora.enabled; use ddp: the adapter is small)"))
        if self.optimizer_in_backward and self.precision == "fp16":
            raise ValueError("train.optimizer_in_backward=true does not work with train.precision=fp16 (the "
                             "gradient scaler must unscale all gradients before any update); use bf16 or fp32")
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
