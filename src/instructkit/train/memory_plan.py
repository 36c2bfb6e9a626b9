"""From an estimate to advice: the memory estimate of a run configuration, the changes that bring it under
a budget (`instructkit estimate-memory CONFIG --budget 4GB`), and the measurements it is calibrated with.
The accounting itself is in train/memory.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

from instructkit.config import LoraSettings, RunConfig
from instructkit.io import iter_jsonl
from instructkit.train.memory import GB, EstimateInputs, MemoryEstimate, estimate_from_inputs, estimate_memory

# --------------------------------------------------------------------------------------------------
# Advice
# --------------------------------------------------------------------------------------------------


def plan_for_budget(estimate: MemoryEstimate, budget_bytes: int) -> list[str]:
    """Changes that bring the estimate under `budget_bytes`, largest saving first ([] when it fits).

    Each change is estimated on its own from the same inputs; "(fits alone)" marks the ones that suffice.
    """
    if estimate.total <= budget_bytes:
        return []
    inputs = estimate.inputs
    options: list[tuple[int, str, MemoryEstimate]] = []

    def consider(changed: EstimateInputs, text: str) -> None:
        new = estimate_from_inputs(changed)
        saving = estimate.total - new.total
        if saving > 0:
            options.append((saving, text, new))

    if not inputs.gradient_checkpointing:
        consider(dataclasses.replace(inputs, gradient_checkpointing=True),
                 "turn on gradient checkpointing (train.gradient_checkpointing=true; recomputes the forward "
                 "in backward, ~30% slower)")
    if not inputs.logits_at_labels:
        consider(dataclasses.replace(inputs, logits_at_labels=True),
                 "compute logits only at labelled positions (train.logits_at_labels=true)")
    if not inputs.loss_chunk_tokens:
        consider(dataclasses.replace(inputs, loss_chunk_tokens=LADDER_CHUNK_TOKENS),
                 f"run the LM head and loss {LADDER_CHUNK_TOKENS} labelled positions at a time "
                 f"(train.loss_chunk_tokens={LADDER_CHUNK_TOKENS})")
    if not inputs.optimizer_in_backward and inputs.precision != "fp16":
        consider(dataclasses.replace(inputs, optimizer_in_backward=True),
                 "apply each gradient as soon as it is complete (train.optimizer_in_backward=true; grad_accum "
                 "1; clipping then runs forward and backward twice a step)")
    if inputs.optimizer == "adamw":
        consider(dataclasses.replace(inputs, optimizer="adamw_8bit"),
                 "keep AdamW's moments in 8 bits (train.optimizer=adamw_8bit; a slower update on CPU)")
    if inputs.optimizer == "adamw_8bit" and inputs.embedding_optim_bits == 32 and inputs.lora is None:
        consider(dataclasses.replace(inputs, embedding_optim_bits=8),
                 "keep the embeddings' moments in 8 bits too (train.embedding_optim_bits=8)")
    if inputs.lora is None:
        lora = LoraSettings(enabled=True, dropout=0.0)  # dropout copies every adapted input: costly
        consider(dataclasses.replace(inputs, lora=lora),
                 f"train LoRA adapters instead of all weights (train.lora.enabled=true, r={lora.r}, "
                 "train.lora.dropout=0: gradients and optimizer state only for the adapters)")
    smaller = smaller_batch(inputs, budget_bytes)
    if smaller is not None:
        factor = inputs.batch_tokens // smaller.batch_tokens
        consider(smaller, f"a {factor}x smaller micro-batch ({inputs.batch_tokens} -> {smaller.batch_tokens} "
                          f"tokens: train.batch_size / {factor}) with train.grad_accum x {factor} (same "
                          "effective batch)")
    if inputs.precision == "fp32":
        consider(dataclasses.replace(inputs, precision="bf16"),
                 "on a GPU: train.precision=bf16 (halves activations; on this CPU bf16 is ~1.6x slower)")

    options.sort(key=lambda item: -item[0])
    advice = [
        f"{text}: saves {saving / GB:.2f} GB -> {new.total / GB:.2f} GB"
        f"{' (fits alone)' if new.total <= budget_bytes else ''}"
        for saving, text, new in options
    ]
    combined = inputs
    for _, _, new in options:
        combined = merge_changes(combined, new.inputs)
    final = estimate_from_inputs(combined)
    if final.total > budget_bytes:
        advice.append(f"even with all of these the estimate is {final.total / GB:.2f} GB, over the budget of "
                      f"{budget_bytes / GB:.2f} GB: use a smaller model or shorter sequences "
                      "(model.max_length)")
    return advice


LADDER_CHUNK_TOKENS = 128


def cheapest_fit(estimate: MemoryEstimate, budget_bytes: int) -> tuple[list[str], MemoryEstimate] | None:
    """The first setting that fits `budget_bytes`, each rung adding to the last, in this order of preference
    (cost in speed or quality): as configured, chunked loss, optimizer in backward (one micro-batch a step
    only: with more the gradients are kept anyway, memory.in_backward_saves), 8-bit AdamW states, gradient
    checkpointing, then a smaller micro-batch (halved until it fits; more micro-batches a step, so without
    the in-backward rung's override, which then saves nothing). Returns (config overrides, its estimate), or
    None when even the last rung does not fit.
    """
    inputs, overrides = estimate.inputs, []
    rungs: list[tuple[dict, list[str]]] = [({}, [])]
    if not inputs.loss_chunk_tokens:
        rungs.append(({"loss_chunk_tokens": LADDER_CHUNK_TOKENS}, [f"train.loss_chunk_tokens={LADDER_CHUNK_TOKENS}"]))
    if not inputs.optimizer_in_backward and inputs.micro_batches == 1 and inputs.precision != "fp16":
        rungs.append(({"optimizer_in_backward": True}, ["train.optimizer_in_backward=true"]))
    if inputs.optimizer == "adamw":
        rungs.append(({"optimizer": "adamw_8bit"}, ["train.optimizer=adamw_8bit"]))
    if inputs.embedding_optim_bits == 32 and inputs.shape.embedding_params and inputs.lora is None:
        rungs.append(({"embedding_optim_bits": 8}, ["train.embedding_optim_bits=8"]))
    if not inputs.gradient_checkpointing:
        rungs.append(({"gradient_checkpointing": True}, ["train.gradient_checkpointing=true"]))
    for changes, texts in rungs:
        inputs, overrides = dataclasses.replace(inputs, **changes), overrides + texts
        new = estimate_from_inputs(inputs)
        if new.total <= budget_bytes:
            return overrides, new
    if "train.optimizer_in_backward=true" in overrides:  # a smaller micro-batch means several a step
        overrides.remove("train.optimizer_in_backward=true")
        inputs = dataclasses.replace(inputs, optimizer_in_backward=False)
    smaller = smaller_batch(inputs, budget_bytes)
    if smaller is not None and estimate_from_inputs(smaller).total <= budget_bytes:
        factor = inputs.batch_tokens // smaller.batch_tokens
        return overrides + [(f"train.batch_size / {factor} (or max_tokens_per_batch / {factor}) with "
                            f"train.grad_accum x {factor}")], estimate_from_inputs(smaller)
    return None


def smaller_batch(inputs: EstimateInputs, budget_bytes: int) -> EstimateInputs | None:
    """Halve the micro-batch until it fits or is one sequence long (the step then takes `factor` times as many
    micro-batches: grad_accum x factor); None when it cannot shrink."""
    factor, best = 1, None
    while inputs.batch_tokens // (factor * 2) >= max(inputs.seq_len, 1):
        factor *= 2
        best = dataclasses.replace(
            inputs, batch_tokens=inputs.batch_tokens // factor,
            labelled_tokens=max(1, inputs.labelled_tokens // factor), micro_batches=inputs.micro_batches * factor)
        if estimate_from_inputs(best).total <= budget_bytes:
            break
    return best


def merge_changes(base: EstimateInputs, changed: EstimateInputs) -> EstimateInputs:
    """Apply to `base` every setting in which `changed` differs from the estimate it was derived from."""
    updates = {}
    for name in ("gradient_checkpointing", "logits_at_labels", "lora", "precision", "optimizer_in_backward",
                 "loss_chunk_tokens", "optimizer", "embedding_optim_bits"):
        value = getattr(changed, name)
        if value != getattr(base, name) and value not in (False, None, "fp32", "adamw"):
            updates[name] = value
    if changed.batch_tokens < base.batch_tokens:
        updates["batch_tokens"] = changed.batch_tokens
        updates["labelled_tokens"] = changed.labelled_tokens
        updates["micro_batches"] = changed.micro_batches
    return dataclasses.replace(base, **updates)


# --------------------------------------------------------------------------------------------------
# From a run configuration
# --------------------------------------------------------------------------------------------------


def estimate_for_run(config: RunConfig, *, cache_dir: str | os.PathLike | None = None,
                     labelled_tokens: int | None = None) -> MemoryEstimate:
    """The estimate for `config` without loading weights (config.json or the registry's shape constants).

    Micro-batch tokens: train.max_tokens_per_batch when packing (default batch_size x max_length), else
    batch_size x max_length (padding to the longest). Micro-batches a step: grad_accum, or packed, as many as
    the step's batch_size x grad_accum longest examples need (at most grad_accum at the default budget). Labelled tokens per micro-batch, unless given: from the
    prepared train.jsonl in the run directory when it exists (95th percentile completion length, at ~3
    characters a token, + EOS, x examples per micro-batch), else a quarter of the tokens.
    """
    from instructkit.models.resolve import resolve_model_config

    hf_config = resolve_model_config(config.model, cache_dir)
    train, max_length = config.train, config.model.max_length
    seq2seq = bool(getattr(hf_config, "is_encoder_decoder", False))
    micro_batches = train.grad_accum
    if train.packing and not seq2seq:
        batch_tokens = train.max_tokens_per_batch or train.batch_size * max_length
        micro_batches = -(-train.batch_size * train.grad_accum * max_length // batch_tokens)
    else:
        batch_tokens = train.batch_size * max_length
    if labelled_tokens is None:
        labelled_tokens = guess_labelled_tokens(config.run_dir / "train.jsonl", batch_tokens,
                                                train.batch_size, max_length)
    return estimate_memory(
        hf_config,
        batch_tokens=batch_tokens,
        seq_len=max_length,
        labelled_tokens=labelled_tokens,
        precision=train.precision,
        gradient_checkpointing=train.gradient_checkpointing,
        lora=train.lora if train.lora.enabled else None,
        logits_at_labels=train.logits_at_labels and not seq2seq,
        optimizer=train.optimizer,
        optimizer_in_backward=train.optimizer_in_backward,  # saves nothing at micro_batches > 1
        micro_batches=micro_batches,
        loss_chunk_tokens=None if seq2seq else train.loss_chunk_tokens,
        embedding_optim_bits=train.embedding_optim_bits,
    )


def guess_labelled_tokens(train_jsonl: Path, batch_tokens: int, batch_size: int, max_length: int) -> int:
    """Labelled positions in a bad-case micro-batch (see estimate_for_run)."""
    if not train_jsonl.is_file():
        return max(1, batch_tokens // 4)
    lengths, example_tokens = [], []
    for n, row in enumerate(iter_jsonl(train_jsonl, skip_torn=True)):  # the first 5,000 rows suffice
        if n >= 5000:
            break
        completion = math.ceil(len(row.get("completion", "")) / 3) + 1
        lengths.append(min(completion, max_length))
        example_tokens.append(min(completion + math.ceil(len(row.get("prompt", "")) / 3), max_length))
    if not lengths:
        return max(1, batch_tokens // 4)
    lengths.sort()
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    mean_example = max(1, sum(example_tokens) // len(example_tokens))
    examples = max(batch_size, batch_tokens // mean_example)
    return min(batch_tokens, p95 * examples)


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------

_OVERHEAD_SCRIPT = r"""
import torch, transformers, accelerate, datasets, peft
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(1)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
opt = torch.optim.AdamW(model.parameters(), fused=True)
ids = torch.randint(0, 64, (2, 8))
model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
opt.step()
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""


def system_memory_bytes() -> int | None:
    """Physical memory of this machine (the default budget of `estimate-memory`); None where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def measure_framework_overhead(timeout: float = 300) -> int:
    """Peak RSS (bytes) of a fresh Python that imports the training stack and runs a tiny step (Linux).

    Read from /proc/self/status VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork time over
    into the child's ru_maxrss, so a child of a process holding a model would report that model too.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _OVERHEAD_SCRIPT], capture_output=True, text=True,
                         timeout=timeout, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


