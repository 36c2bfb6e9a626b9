"""The `train` section of a run's config: TrainConfig and its nested sections `train.lora` and
`train.early_stopping` (config.py holds the other sections and RunConfig; the key reference docs/config.md
is generated from the `description` of every field, `python -m instructkit.config_docs`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from instructkit.config_base import Section


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
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]; one name alone, q_proj, is "
        "the same as [q_proj]), 'all-linear': every linear layer but the LM head, or a regular expression "
        "that peft matches against the full module names (e.g. '.*self_attn.(q|v)_proj').")
    merge: bool = Field(
        True, description="Merge the adapter into the saved model (else save the adapter alone).")

    @field_validator("target_modules")
    @classmethod
    def _one_name_is_a_list(cls, value: list[str] | str) -> list[str] | str:
        """A plain name ("q_proj", "self_attn.q_proj") is a list of one: peft reads a string as a regular
        expression over the FULL module name, so "q_proj" alone matched no layer and the run stopped."""
        if isinstance(value, str) and value != "all-linear" and re.fullmatch(r"[A-Za-z_][\w.]*", value):
            return [value]
        return value


class EarlyStopping(Section):
    """Stop training when the validation metric stops improving (the best weights are kept either way)."""

    metric: str | None = Field(
        None, description="Metric that picks the best weights and stops training: val_loss, val_ppl, a task "
        "metric (macro_f1, rougeL, ...: the mean over templates) or '<template_id>/<metric>'; a name validation "
        "does not produce is an error before training (default: macro_f1 when the task metrics have it, else "
        "validation loss).")
    greater_is_better: bool | None = Field(
        None, description="Direction of `metric`: true when a higher value is better, false when a lower one "
        "is (an error rate such as TER, WER or MAE). null: the metric's own definition (task metrics, val_loss, "
        "val_ppl), else its name: ending in loss, ppl or perplexity is lower-is-better, any other higher. "
        "Needs `metric`.")
    patience: int = Field(3, ge=1, description="Validations without improvement before stopping.")
    min_delta: float = Field(
        0.0, description="Smallest change of the metric that counts as an improvement, in the metric's own "
        "units.")

    @model_validator(mode="after")
    def _direction_needs_metric(self) -> EarlyStopping:
        if self.greater_is_better is not None and self.metric is None:  # else it would be silently unused
            raise ValueError("train.early_stopping.greater_is_better needs train.early_stopping.metric, the "
                             "metric whose direction it gives (the default metric's direction is known)")
        return self


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
        "split has split.seed). Under several processes each draws its dropout from seed + its rank.")
    # Batching
    batch_size: int = Field(
        8, ge=1, description="Examples per micro-batch (per process); an optimizer step sees batch_size x "
        "grad_accum x processes examples. Lower it to save memory.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step: a bigger step for the same memory, more "
        "passes per step (batch_size 8 x 1 and 2 x 4 train alike).")
    packing: bool = Field(
        True, description="Causal models: pack examples into rows without padding (position_ids restart per "
        "example; attention never crosses examples). A model whose attention ignores the restarts (OPT, BLOOM: "
        "checked at set-up) trains on padded rows instead, with a warning.")
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
        "none", description="Classification data: 'weighted' loss (each class counts equally; metrics.jsonl "
        "then logs `unweighted_loss` beside the weighted `loss`, the one to compare with the unweighted "
        "`val_loss`), 'sampled' (classes drawn equally often, with replacement), or 'none' (the data as it is).")
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
        200, ge=0, description="Cap on the fixed validation subset for task metrics: more is steadier, "
        "slower to validate (0: no task metrics, validation loss only).")
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
