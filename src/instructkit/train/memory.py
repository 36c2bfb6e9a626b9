"""How much memory will fine-tuning take? An estimate from the model's shape, and what to change when it
does not fit.

    instructkit estimate-memory CONFIG.yaml      ->  estimate_for_run(config) + plan_for_budget(...)

All figures are bytes of one process's peak resident memory (RSS) during training (fp32 weights, AdamW).
Worked example, SmolLM2-135M (134.5 M parameters, hidden 576, MLP 1536, 30 layers, 9 heads of 64, 3 KV
heads, vocab 49,152), one micro-batch of 4 x 256 = 1,024 tokens, fp32, logits only at the 12 labelled
positions:

    weights      134.5 M x 4 B                                        = 0.54 GB
    gradients    134.5 M x 4 B                                        = 0.54 GB
    AdamW        2 states (exp_avg, exp_avg_sq) x 134.5 M x 4 B        = 1.08 GB
    activations  12,480 floats/token/layer x 4 B x 1,024 tokens x 30 layers
                 + final norm                                         = 1.54 GB
                 (checkpointing: 30 layer inputs of 576 floats + one layer recomputed = 0.13 GB)
    logits       12 positions x 49,152 x 4 B x 4 copies                = 0.01 GB
                 (at all 1,024 positions: 0.81 GB)

How these add up to the peak, as measured (tests/train/test_memory.py):

- The optimizer state exists from the first step on; the weights always.
- The C allocator keeps the small tensors it frees (activations, per-layer gradients: under glibc's 32 MB
  mmap threshold) for reuse instead of returning them to the system. So in RSS the gradients do not
  reuse the activations' memory: backward ends with the gradients on top of the (retained) activations.
- Tensors of 32 MB and more (the vocab-sized logits) are returned to the system when freed. The loss's
  copies of the logits exist before the gradients do, so the two overlap: the larger one counts.

    peak = framework + (1 + ALLOCATOR_SLACK) x (weights + optimizer + activations
                                                + max(loss phase, gradient phase))

    loss phase     = max(4 copies of the logits, 2 copies + the LM head's weight gradient)
    gradient phase = gradients (+ one vocab x hidden matrix with tied embeddings: the embedding's own
                     gradient, made last and added to the LM head's; not with the chunked loss)

The memory-lean settings change three terms (train/optim.py, train/in_backward.py, train/loss.py):

    optimizer      adamw 8 B a parameter; adamw_8bit 2 B + 8 B per 256 values (fp32 moments, 8 B, for
                   tensors under 4,096 values and, unless embedding_optim_bits 8, the embeddings);
                   adafactor 4 B x (rows + columns) of each matrix
    in backward    gradient phase = the largest gradient (+ a tied LM head's, alive through backward) +
                   the update's temporaries, instead of all gradients; only with ONE micro-batch a step
                   (`micro_batches`): with more, every gradient exists after the first (train/in_backward.py)
    chunked loss   logits of one chunk of positions; loss phase = 4 chunk copies + the LM head's gradient
                   (one buffer the chunks add into)
    temporaries    of the update: 5 fp32 copies of a 1 M-value slice (adamw_8bit), 3 of the largest
                   tensor (adafactor), none (fused adamw)

`framework` is the RSS of a Python with torch, transformers, accelerate, datasets and peft loaded and a
tiny step run (FRAMEWORK_OVERHEAD_BYTES, measured); ALLOCATOR_SLACK covers allocator fragmentation.
Calibrated against real AdamW steps (random weights of the real shapes, 4 x 256 tokens, 3 labelled tokens a
row, fp32, 1 thread, 4 steps, peak RSS of a child process):

    shape           checkpointing   logits      estimate   measured   estimate/measured
    SmolLM2-135M    off             all          4.93 GB    4.83 GB   1.02
    SmolLM2-135M    off             at labels    4.76 GB    4.33 GB   1.10
    SmolLM2-135M    on              all          3.35 GB    3.55 GB   0.94
    SmolLM2-135M    on              at labels    3.18 GB    3.33 GB   0.95
    Gemma-3-270M    off             all         10.76 GB    9.84 GB   1.09
    Gemma-3-270M    off             at labels    7.90 GB    7.62 GB   1.04
    Gemma-3-270M    on              all          9.07 GB    8.77 GB   1.03
    Gemma-3-270M    on              at labels    6.22 GB    6.50 GB   0.96

    SmolLM2-135M shape, LoRA r=16 on all Linears, no checkpointing, logits at labels:
    LoRA dropout 0                                               3.64 GB    3.53 GB   1.03
    LoRA dropout 0.05                                            4.50 GB    4.46 GB   1.01

Note the LoRA rows: at this batch LoRA with dropout takes *more* memory than full fine-tuning (4.46 vs
4.33 GB measured): the gradients and optimizer state it saves (1.6 GB) are outweighed by the activations
it adds, the adapters' outputs and dropout's copy of every adapted layer's input (see
lora_activation_per_token_layer). LoRA pays off when weights and optimizer state dominate: larger
models, checkpointing on, dropout 0.

Not calibrated here (no GPU; bf16 is slow on this CPU): bf16/fp16 autocast. Its terms follow the same
accounting: half-width activations plus autocast's half copies of the weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from instructkit.config import LoraSettings, ModelConfig
from instructkit.train.memory_shape import MIN_8BIT_SIZE, ModelShape, hf_config_numbers, model_shape  # noqa: F401

logger = logging.getLogger(__name__)

GB = 1e9
FP32 = 4
HALF = 2

# Peak RSS of `import torch, transformers, accelerate, datasets, peft` + a tiny Llama forward/backward + fused
# AdamW step, measured by measure_framework_overhead() on the 2-core CPU machine (torch 2.13 CPU,
# transformers 5.24): 0.50 GB (torch + transformers + the Llama modelling code alone: 0.39 GB).
FRAMEWORK_OVERHEAD_BYTES = int(0.50 * GB)
# Fragmentation: what the calibration runs held beyond the modelled tensors, as a fraction of them:
# 1-9% without gradient checkpointing (freed activations partly reused for gradients), 18-20% with.
# 12% puts all eight calibration runs within 10% of their measured peak (table above).
ALLOCATOR_SLACK = 0.12
# Softmax cross-entropy in fp32 holds up to 4 vocab-sized tensors per position at its peak: the logits,
# the log-softmax (saved for backward), the gradient arriving at the log-softmax, the gradient of the logits.
LOGIT_COPIES = 4
# Optimizer temporaries during one update, in fp32 copies of the tensor being updated (or of one slice):
# bitsandbytes' CPU AdamW8bit dequantizes both moments and copies gradient and weights (measured 5.4 copies of a
# 168 M-value tensor, 3.6 GB); instructkit runs it on slices of SLICE_VALUES values (train/optim.py). Adafactor
# builds the squared gradient, the factored estimate and the update at full size. Fused AdamW needs none.
OPTIMIZER_TEMP_COPIES = {"adamw": 0, "sgd": 0, "adamw_8bit": 5, "adafactor": 3}
SLICE_VALUES = 1 << 20  # = train/optim.SLICE_VALUES (not imported: this module loads without torch)

Precision = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw_8bit", "adafactor", "sgd"]


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstimateInputs:
    shape: ModelShape
    batch_tokens: int
    seq_len: int
    labelled_tokens: int
    precision: Precision = "fp32"
    optimizer: Optimizer = "adamw"
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None
    logits_at_labels: bool = True
    overhead_bytes: int = FRAMEWORK_OVERHEAD_BYTES
    optimizer_in_backward: bool = False
    loss_chunk_tokens: int | None = None
    embedding_optim_bits: int = 32
    micro_batches: int = 1  # forward/backward passes per optimizer step (grad_accum, packed steps split)


def in_backward_saves(inputs: EstimateInputs) -> bool:
    """Whether train.optimizer_in_backward frees gradients during backward: with several micro-batches a step
    every gradient exists once the first backward has run (the hooks are armed only in the last), so the
    gradients are all kept, as in the ordinary step (the grad-accumulation caveat of torchtune's optimizer in
    backward, which refuses gradient_accumulation_steps > 1)."""
    return inputs.optimizer_in_backward and inputs.micro_batches == 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of peak resident memory of one training step, by part, and the inputs they came from."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    slack: int
    total: int
    trainable_params: int
    inputs: EstimateInputs = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        parts = {k: getattr(self, k) for k in ("weights", "gradients", "optimizer", "activations", "logits",
                                                "overhead", "slack", "total", "trainable_params")}
        inputs = self.inputs
        parts["inputs"] = {
            "params": inputs.shape.params, "batch_tokens": inputs.batch_tokens, "seq_len": inputs.seq_len,
            "labelled_tokens": inputs.labelled_tokens, "precision": inputs.precision,
            "optimizer": inputs.optimizer, "gradient_checkpointing": inputs.gradient_checkpointing,
            "lora_r": inputs.lora.r if inputs.lora else None, "logits_at_labels": inputs.logits_at_labels,
            "optimizer_in_backward": inputs.optimizer_in_backward, "loss_chunk_tokens": inputs.loss_chunk_tokens,
            "embedding_optim_bits": inputs.embedding_optim_bits, "micro_batches": inputs.micro_batches,
        }
        return parts

    def describe(self) -> str:
        """A plain-text table of the breakdown (GB = 10^9 bytes), for the command line to print."""
        i = self.inputs
        rows = [
            ("weights", self.weights, f"{i.shape.params / 1e6:.1f} M params"),
            ("gradients", self.gradients, f"{self.trainable_params / 1e6:.2f} M trainable" + (
                f"; in-backward saves nothing at {i.micro_batches} micro-batches a step" if i.optimizer_in_backward
                and not in_backward_saves(i) else "")),
            ("optimizer state", self.optimizer, i.optimizer),
            ("activations", self.activations, (f"{i.batch_tokens} tokens/micro-batch, "
                                              f"checkpointing {'on' if i.gradient_checkpointing else 'off'}")),
            ("logits", self.logits, f"{logit_positions(i)} positions x vocab {i.shape.vocab}"),
            ("framework", self.overhead, "torch + transformers loaded"),
            ("allocator slack", self.slack, f"{ALLOCATOR_SLACK:.0%} of live tensors"),
        ]
        lines = [f"{name:<16} {value / GB:7.2f} GB   {note}" for name, value, note in rows]
        lines.append(f"{'peak (estimate)':<16} {self.total / GB:7.2f} GB   = framework + weights + "
                     "optimizer + activations + max(logits, gradients) + slack")
        return "\n".join(lines)


def activation_floats_per_token_layer(shape: ModelShape) -> int:
    """Floats one decoder layer keeps for backward, per token (no checkpointing, no dropout, SDPA).

    Llama-style layer (x = residual input, H hidden, I MLP width, nh / nkv heads, hd head dim):

        x (saved by the first norm)                               H
        first RMSNorm: normalised x, output (input of q/k/v)      2H
        q, k, v after RoPE, saved by attention                    3 nh hd   (K/V repeated to nh heads when
                                                                           a padding mask is present)
        attention output + its reshaped copy (o_proj input)       2 nh hd
        residual after attention                                  H
        second RMSNorm: normalised, output (MLP input)            2H
        MLP: gate, act(gate), up, act(gate) * up                  4I
                                                                  ---------------------------
                                                                  6H + 5 nh hd + 4I

    Each extra hidden-size norm (Gemma 3's norms after attention and after the MLP) saves its input and
    its normalised value: +2H. Per-head q/k norms: +2 (nh + nkv) hd. SmolLM2: 6*576 + 5*576 + 4*1536 = 12,480.
    """
    h, i, hd = shape.hidden, shape.intermediate, shape.head_dim
    floats = 6 * h + 5 * shape.heads * hd + 4 * i
    floats += 2 * h * shape.extra_norms
    if shape.qk_norm:
        floats += 2 * (shape.heads + shape.kv_heads) * hd
    return floats


def activation_bytes(inputs: EstimateInputs) -> int:
    """All layers' saved activations for one micro-batch (bf16/fp16 autocast: 2 bytes a float).

    Checkpointing keeps only each layer's input (H floats per token per layer) and recomputes one layer at
    a time in backward, so: layers x H + one layer's full activations.
    With eager attention each layer also keeps its attention probabilities and scores: 2 x heads x seq_len
    floats per token.
    """
    shape, tokens = inputs.shape, inputs.batch_tokens
    width = FP32 if inputs.precision == "fp32" else HALF
    per_layer = activation_floats_per_token_layer(shape)
    if shape.eager_attention:
        per_layer += 2 * shape.heads * inputs.seq_len
    extra_bytes = 0
    if inputs.lora is not None:
        lora_floats, mask_bytes = lora_activation_per_token_layer(shape, inputs.lora)
        per_layer += lora_floats
        extra_bytes = mask_bytes * tokens * (1 if inputs.gradient_checkpointing else shape.layers)
    final_norm = 2 * shape.hidden  # the final norm's input and normalised value
    if inputs.gradient_checkpointing:
        floats = shape.layers * shape.hidden + per_layer + final_norm
    else:
        floats = shape.layers * per_layer + final_norm
    return floats * tokens * width + extra_bytes


def lora_activation_per_token_layer(shape: ModelShape, lora: LoraSettings) -> tuple[int, int]:
    """(floats, bytes) LoRA adds per token per layer, for each adapted Linear (in -> out):

        A's output, saved by B                                         r floats
        B's output and the sum with the base output: temporaries, not  out floats
          saved, but measured to stay resident (allocated between saved tensors: fragmentation)
        with dropout > 0: the dropped-out copy of the input            in floats
          and its mask                                                 in bytes

    SmolLM2, all-linear, r=16, dropout 0.05: 7 x 16 + 5,184 + 4,992 floats + 4,992 bytes.
    """
    adapted = shape.lora_targets(lora)
    layers = max(shape.layers, 1)
    inputs = sum(d_in for _, d_in, _ in adapted) // layers
    outputs = sum(d_out for _, _, d_out in adapted) // layers
    floats = lora.r * len(adapted) // layers + outputs + (inputs if lora.dropout > 0 else 0)
    return floats, inputs if lora.dropout > 0 else 0


def logit_positions(inputs: EstimateInputs) -> int:
    """Positions whose logits exist at once: the labelled ones (logits_to_keep) or every token; with
    loss_chunk_tokens, one chunk of them."""
    positions = min(inputs.labelled_tokens, inputs.batch_tokens) if inputs.logits_at_labels else inputs.batch_tokens
    return min(positions, inputs.loss_chunk_tokens) if inputs.loss_chunk_tokens else positions


def loss_phase_bytes(inputs: EstimateInputs) -> int:
    """Memory on top of the activations while the loss is differentiated: all LOGIT_COPIES of the logits,
    or, a moment later, two copies (logits, their gradient) plus the LM head's weight gradient. Chunked: one
    chunk's copies beside the one head-gradient buffer the chunks add into (train/loss.py)."""
    one_copy = logit_positions(inputs) * inputs.shape.vocab * FP32
    head_gradient = inputs.shape.lm_head_params * FP32 if inputs.lora is None else 0
    if inputs.loss_chunk_tokens:
        return LOGIT_COPIES * one_copy + head_gradient
    return max(LOGIT_COPIES * one_copy, 2 * one_copy + head_gradient)


def trainable_count(inputs: EstimateInputs) -> int:
    return inputs.shape.lora_params(inputs.lora) if inputs.lora is not None else inputs.shape.params


def gradient_phase_bytes(inputs: EstimateInputs) -> int:
    """The gradients alive at the end of backward, or during the update, whichever is more.

    Ordinary step: all gradients; with tied embeddings the embedding's dense vocab x hidden gradient is
    made last and added to the LM head's (one more vocab x hidden matrix for a moment), except with the
    chunked loss, whose head adds into .grad and whose embedding gives sparse rows (train/loss.py); the
    update then adds the optimizer's temporaries. In-backward: each gradient is applied and freed as soon
    as it is complete, so only the largest one is alive (a tied LM head's, from the start of backward to its
    end) with the optimizer's temporaries.
    """
    shape = inputs.shape
    full = inputs.lora is None
    tied_extra = shape.lm_head_params if shape.tied_embeddings and full and not inputs.loss_chunk_tokens else 0
    if in_backward_saves(inputs):
        largest = shape.largest_param if full else max(
            (inputs.lora.r * max(d_in, d_out) for _, d_in, d_out in shape.lora_targets(inputs.lora)), default=0)
        return (largest + tied_extra) * FP32 + optimizer_temp_bytes(inputs)
    trainable = trainable_count(inputs)
    return max((trainable + tied_extra) * FP32, trainable * FP32 + optimizer_temp_bytes(inputs))


def optimizer_state_bytes(inputs: EstimateInputs) -> int:
    """adamw: 2 fp32 moments. adamw_8bit: 2 bytes a value + a float32 absmax per 256 values and moment;
    tensors under 4,096 values, and the embeddings with embedding_optim_bits 32, keep fp32 moments.
    adafactor: rows + columns of each matrix (fp32), the whole of each 1-D tensor. sgd: 1 momentum."""
    trainable, shape = trainable_count(inputs), inputs.shape
    small = shape.small_params if inputs.lora is None else 0
    if inputs.optimizer == "adamw_8bit":
        large = trainable - small
        blocks = shape.quant_blocks if inputs.lora is None else -(-large // 256)
        if inputs.lora is None and inputs.embedding_optim_bits == 32:
            large -= shape.embedding_params
            blocks -= -(-shape.embedding_params // 256)
            small += shape.embedding_params
        return 2 * large + 2 * FP32 * blocks + 2 * FP32 * small
    if inputs.optimizer == "adafactor":
        return (shape.factored_state if inputs.lora is None else trainable // 8) * FP32
    return {"adamw": 2, "sgd": 1}[inputs.optimizer] * trainable * FP32


def optimizer_temp_bytes(inputs: EstimateInputs) -> int:
    """The update's temporaries (OPTIMIZER_TEMP_COPIES fp32 copies of the largest tensor or slice)."""
    largest = inputs.shape.largest_param if inputs.lora is None else trainable_count(inputs)
    if inputs.optimizer == "adamw_8bit":
        largest = min(largest, SLICE_VALUES)
    return OPTIMIZER_TEMP_COPIES[inputs.optimizer] * largest * FP32


def logit_bytes(inputs: EstimateInputs) -> int:
    """positions x vocab x 4 bytes x LOGIT_COPIES (the loss is computed in fp32 whatever the precision)."""
    return logit_positions(inputs) * inputs.shape.vocab * FP32 * LOGIT_COPIES


def estimate_memory(
    model_config_or_hf_config: Any,
    *,
    batch_tokens: int,
    seq_len: int,
    labelled_tokens: int | None = None,
    precision: Precision = "fp32",
    optimizer: Optimizer = "adamw",
    gradient_checkpointing: bool = False,
    lora: LoraSettings | None = None,
    logits_at_labels: bool = True,
    overhead_bytes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    optimizer_in_backward: bool = False,
    loss_chunk_tokens: int | None = None,
    embedding_optim_bits: int = 32,
    micro_batches: int = 1,
) -> MemoryEstimate:
    """Peak memory of a training step. See the module docstring for the arithmetic.

    model_config_or_hf_config: an instructkit ModelConfig (resolved without loading weights), a transformers
        config, or a ModelShape.
    batch_tokens: tokens in one micro-batch (batch_size x padded length, or the packed row length).
    seq_len: longest sequence (only matters for eager attention).
    labelled_tokens: positions carrying a label in the micro-batch (default: all of them).
    precision: fp32 (weights, activations fp32); bf16/fp16 = autocast: fp32 master weights + a half copy
        of each weight cached by autocast, half activations.
    optimizer: adamw (2 fp32 states per trainable parameter; fused, so no per-step temporaries), adamw_8bit,
        adafactor (train.optimizer; see optimizer_state_bytes) or sgd with momentum (1 state).
    lora: LoRA settings (enabled or not): only the adapters get gradients and optimizer state.
    optimizer_in_backward, loss_chunk_tokens, embedding_optim_bits: as train.* (see gradient_phase_bytes,
        loss_phase_bytes, optimizer_state_bytes).
    micro_batches: forward/backward passes per optimizer step; in-backward saves gradients only at 1
        (in_backward_saves).
    """
    shape = as_shape(model_config_or_hf_config, cache_dir)
    inputs = EstimateInputs(
        shape=shape,
        batch_tokens=int(batch_tokens),
        seq_len=int(seq_len),
        labelled_tokens=int(labelled_tokens if labelled_tokens is not None else batch_tokens),
        precision=precision,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        lora=lora if lora is not None and lora.enabled else None,
        logits_at_labels=logits_at_labels,
        overhead_bytes=FRAMEWORK_OVERHEAD_BYTES if overhead_bytes is None else int(overhead_bytes),
        optimizer_in_backward=optimizer_in_backward,
        loss_chunk_tokens=loss_chunk_tokens,
        embedding_optim_bits=embedding_optim_bits,
        micro_batches=int(micro_batches),
    )
    return estimate_from_inputs(inputs)


def estimate_from_inputs(inputs: EstimateInputs) -> MemoryEstimate:
    """The breakdown and the peak (see the module docstring for why the peak has this form)."""
    shape = inputs.shape
    adapters = shape.lora_params(inputs.lora) if inputs.lora is not None else 0
    trainable = adapters if inputs.lora is not None else shape.params
    weights = (shape.params + adapters) * FP32
    if inputs.precision != "fp32":
        weights += shape.params * HALF  # autocast's cached half copies of the weights
    gradients = trainable * FP32
    if in_backward_saves(inputs):  # at most the largest at once (see gradient_phase_bytes)
        gradients = min(gradients, gradient_phase_bytes(inputs) - optimizer_temp_bytes(inputs))
    optimizer = optimizer_state_bytes(inputs)
    activations = activation_bytes(inputs)
    logits = logit_bytes(inputs)
    live = weights + optimizer + activations + max(loss_phase_bytes(inputs), gradient_phase_bytes(inputs))
    slack = int(ALLOCATOR_SLACK * live)
    return MemoryEstimate(
        weights=weights, gradients=gradients, optimizer=optimizer, activations=activations, logits=logits,
        overhead=inputs.overhead_bytes, slack=slack, total=inputs.overhead_bytes + live + slack,
        trainable_params=trainable, inputs=inputs,
    )


def as_shape(model: Any, cache_dir: str | os.PathLike | None = None) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, ModelConfig):
        from instructkit.models.resolve import resolve_model_config

        model = resolve_model_config(model, cache_dir)
    return model_shape(model)
