"""Training throughput: instructkit's loop vs HF Trainer vs TRL SFTTrainer (defaults and tuned), same data.

    PYTHONPATH=src python benchmarks/bench_train.py                     # CPU, 1 thread: ~30 min on 2 idle cores
    PYTHONPATH=src python benchmarks/bench_train.py --steps 8 --repeats 2 --shape gemma3
    PYTHONPATH=src python benchmarks/bench_train.py --systems instructkit,instructkit_compile   # train.compile
    # GPU (bf16 autocast, fp32 master weights): save the tokenized inputs here, run them there
    PYTHONPATH=src python benchmarks/bench_train.py --save-inputs .devbench/smollm2 --per-dataset 128
    PYTHONPATH=src python benchmarks/bench_train.py --inputs .devbench/smollm2 --device cuda --precision bf16 \
        --epoch --repeats 1 --out gpu_results/train_gpu.json          (benchmarks/gpu_bench.sh does this)

What is compared (everything identical except the training loop):
- data: a fixed, seeded mixture of prepared examples from ../shared/data (Amazon Fine Food rating, DialogSum
  summary, Alpaca, SST-2 with options; --per-dataset each), tokenized ONCE in the parent with instructkit's
  tokenize_examples (SmolLM2 tokenizer, max_length 256, prompt cut from the left, completion + EOS, labels
  -100 on the prompt). Every system receives these exact token ids (TRL as pre-tokenized input_ids +
  completion_mask: its own text path only truncates keep_start, which would cut completions).
- model: the SmolLM2-135M shape (or Gemma-3-270M's, or Llama-3.2-1B's) with random weights from the same
  seed, fp32 weights; the baselines use sdpa (--attn), instructkit its own choice (below), unless
  --baselines-same-attention. (The 1B shape reads the SmolLM2 token ids: its vocabulary holds them.)
- optimisation: batch 8 examples per optimizer step, no accumulation, AdamW lr 1e-4, linear schedule
  without warmup, grad clip 1.0, seed 0, 1 torch thread.
- systems:
  instructkit           `train.loop.train` with its defaults (packing, logits at label positions, attention
                        chosen as model.attn_implementation auto does: sdpa_varlen on CPU, sdpa without cuDNN
                        attention on CUDA; on CUDA rows bucketed to multiples of 64).
  instructkit_compile   the same with train.compile: true (opt-in system: --systems ...,instructkit_compile).
  hf_trainer            transformers Trainer, DataCollatorForSeq2Seq padding (each step's examples padded
                        to its longest; the steps are length-grouped, see "Same steps").
  trl_sft               TRL SFTTrainer with TRL's defaults (gradient checkpointing ON, no packing),
                        completion_only_loss, max_length 256.
  trl_tuned             TRL SFTTrainer tuned: gradient checkpointing off, fp32 on CPU (bf16 autocast on GPU
                        like the others), padding-free batches (TRL's padding_free collator: a step's examples
                        end to end in one row, position_ids restarting), its chunked LM-head loss (TRL 1.16's
                        default loss path).

Same steps (default): every system trains on the same examples in each optimizer step, in the same order:
instructkit's plan (its seeded, length-grouped step groups of 8, the last of an epoch shorter), which the
Trainer and TRL read through a train dataloader of those groups (benchmarks/_same_steps.py); runs record
`examples_per_step`. --own-order lets each system draw its own batches instead (the Trainer's
group_by_length sampler, TRL's random sampler, and for trl_tuned BFD packs of <= 256 tokens, round(8 x mean
example tokens / 256) packs per step): throughput is alike, but the loss then measures the order as much as
the loop (issue 14: with the same 9 steps, the Trainer's order ended 2.5% lower than instructkit's, whose
first step drew the epoch's 3 shortest examples, 6 label tokens; on one plan the loops agree).

Each run is a FRESH subprocess (so peak RSS is per system); the runs are interleaved A B C D A B C D over
--repeats. Default (CPU): 1 untimed warm-up step + --steps timed steps; the figure per system is the median
over repeats of (real tokens of the timed steps / their seconds). --epoch (GPU): one whole epoch, warm-up
INCLUDED in the figure (tokens of the epoch / its seconds), and p99 / median of the step times after the first
10 steps.

Timing: instructkit reports each step's wall time (collate + forward/backward + optimizer); HF/TRL are timed
by callbacks from the start of the first step (on_step_begin) and the end of each step (on_step_end), so their
data loading between steps counts. Real tokens = non-padding input tokens of the examples each step processed.

Loss: every system's model is scored after training on the same yardstick, the mean cross-entropy of the
completion tokens of every example (fp32, no autocast); `ratios` compare it to instructkit's. With the same
steps (the default) every system has seen the very same batches, so a gap is the loop's; the default --steps 7
+ 1 warm-up step = 8 steps = the 59 examples once (7 steps of 8 and the epoch's last of 3).

MFU = FLOPs actually computed / seconds / peak FLOP/s, where
  FLOPs = 6 x N_body x real_tokens + 6 x V x d x lm_head_positions + 6 x L x d_attn x sum_i T_i^2
  (N_body = parameters without the input embedding and the LM head, which a lookup and the head term cover;
  lm_head_positions = the positions whose logits the system computed: instructkit's label positions when
  logits_at_labels ran, TRL's label positions on CUDA (its fused head scores only those there), else every
  real token; causal attention: QK^T and AV, 2 x T x d_attn FLOPs each per token forward, halved for
  causality, x3 with backward; d_attn = heads x head_dim). Padding is never counted. peak = best of 5 fp32
  torch.mm 2048^3 in the same process (CPU, 1 thread; GPU: 8192^3 in the run's precision). `mfu_6n` keeps the
  earlier convention (6 x all parameters x real tokens, the LM head at every token), which skipped work inflates.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _same_steps import instructkit_plan, planned, planned_steps, step_examples

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
RESULT = ROOT / "benchmarks" / "results" / "train.json"
SYSTEMS = ("instructkit", "hf_trainer", "trl_sft", "trl_tuned")
ALL_SYSTEMS = (*SYSTEMS, "instructkit_compile")
WARMUP_STEPS_EPOCH = 10  # --epoch: step times after these count for p99 / median
MODEL_TYPES = {"llama": "llama", "gemma3": "gemma3_text"}  # config.model_type of each SHAPES kind

# (name, file under DATA, schema, template)
SOURCES = [
    ("amazon_fine_food", "amazon_fine_food/reviews.csv", "amazon_fine_food", "amazon_fine_food.predict_rating"),
    ("dialogsum", "dialogsum/dialogsum.dev.jsonl", "dialogsum", "dialogsum.summarize_conversation"),
    ("alpaca", "alpaca/alpaca_en_demo.json", "alpaca", "alpaca.task_and_response"),
    ("sst2", "sst2/train.tsv", "sst2", "sst2.sentiment_with_options"),
]

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M: 134.5M parameters (28.3M of them the tied embedding, 49152 x 576).
    "smollm2": {"kind": "llama", "tokenizer": "smollm2-135m-instruct",
                "config": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                               tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                               rope_theta=100000.0, hidden_act="silu")},
    # Gemma-3-270M: 268M parameters (168M of them the tied embedding, 262144 x 640).
    "gemma3": {"kind": "gemma3", "tokenizer": "gemma-3-270m",
               "config": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                              tie_word_embeddings=True, max_position_embeddings=32768)},
    # Llama-3.2-1B: 1.24B parameters (263M of them the tied embedding, 128256 x 2048); GPU only in practice.
    "llama1b": {"kind": "llama", "tokenizer": "smollm2-135m-instruct",
                "config": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                               tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                               rope_theta=500000.0, hidden_act="silu")},
}


# --------------------------------------------------------------------------------------------------
# Shared helpers (parent and child)
# --------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM in /proc/self/status, kB) in MB."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def matmul_peak_flops(size: int = 2048, repeats: int = 5, device: str = "cpu", precision: str = "fp32") -> float:
    """Best of `repeats` torch.mm of two size x size matrices: 2 x size^3 FLOPs each (17.2 GFLOP at 2048).

    CPU: fp32 at 2048. GPU: the precision the systems compute in (bf16 under autocast) at 8192, where the
    product is large enough to reach the tensor cores' rate (synchronised around each product)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3 if device == "cuda" else 1):  # warm-up (and GPU clocks up)
        torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def build_model(shape: str, seed: int, layers: int | None, attn: str = "sdpa") -> Any:
    """Random-init model of the shape, seeded (identical weights in every system's process), fp32 weights."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    spec = SHAPES[shape]
    fields = dict(spec["config"])
    if layers:
        fields["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    if spec["kind"] == "llama":
        config = LlamaConfig(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        config._attn_implementation = attn
        model = LlamaForCausalLM(config)
    else:
        config = Gemma3TextConfig(**fields, bos_token_id=2, eos_token_id=1, pad_token_id=0)
        config._attn_implementation = attn
        model = Gemma3ForCausalLM(config)
    return model.float()


def unique_parameters(model: Any) -> int:
    """Parameters counted once (the tied embedding / LM head once): SmolLM2 shape -> 134,515,008."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def flop_shape(model: Any) -> dict[str, int]:
    """What the FLOP formula needs: parameters without the embedding and LM head, V, d, L, d_attn."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    excluded = embedding.numel() + (0 if head is embedding else head.numel())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"params": unique_parameters(model), "body_params": unique_parameters(model) - excluded,
            "vocab": int(head.shape[0]), "hidden": int(config.hidden_size), "layers": int(config.num_hidden_layers),
            "attn_dim": int(heads * head_dim)}


# --------------------------------------------------------------------------------------------------
# Parent: data
# --------------------------------------------------------------------------------------------------


def prepare_examples(per_dataset: int, seed: int, scratch: Path) -> list[dict]:
    """`per_dataset` seeded training examples from each of the four sources, shuffled together."""
    from instructkit.config import DatasetConfig, RunConfig
    from instructkit.data.build import load_examples, prepare

    datasets = [DatasetConfig(name=name, path=str(DATA / rel), schema=schema, templates=[template],
                              max_rows=max(100, 4 * per_dataset))
                for name, rel, schema, template in SOURCES]
    config = RunConfig(name="bench_train", output_dir=str(scratch), datasets=datasets)
    result = prepare(config, run_dir=scratch / "run")
    rows = load_examples(result.run_dir, "train")
    rng = random.Random(seed)
    picked: list[dict] = []
    for name, *_ in SOURCES:
        mine = sorted((r for r in rows if r["dataset"] == name), key=lambda r: r["source_id"])
        if len(mine) < per_dataset:
            raise SystemExit(f"{name}: only {len(mine)} training examples, need {per_dataset}")
        picked += rng.sample(mine, per_dataset)
    rng.shuffle(picked)
    return picked


def tokenizer_folder(shape: str) -> Path:
    from instructkit.config import ModelConfig
    from instructkit.models.resolve import resolve_model

    resolved = resolve_model(ModelConfig(name=SHAPES[shape]["tokenizer"]))
    return Path(resolved.folder)


def tokenize(examples: list[dict], folder: Path, max_length: int) -> tuple[list[dict], dict]:
    """instructkit's tokenization: input_ids, labels (-100 on the prompt), prompt_length."""
    from transformers import AutoTokenizer

    from instructkit.data.tokenize import TokenizeSettings, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    settings = TokenizeSettings(max_length=max_length, truncation="left")
    dataset, stats = tokenize_examples(examples, tokenizer, settings)
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"]),
             "prompt_length": int(r["prompt_length"])} for r in dataset]
    return rows, stats.to_dict()


# --------------------------------------------------------------------------------------------------
# Child: one system, one fresh process
# --------------------------------------------------------------------------------------------------


class CountingCollator:
    """Wraps a collator and records, per batch: real tokens, computed tokens (numel of input_ids), the sum of
    squared example lengths (attention FLOPs) and the label positions (next token labelled).

    Padded batches: examples = attention_mask rows. Padding-free batches (TRL BFD packing: one row, no
    attention_mask): examples = the runs between `position_ids` restarts."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.batches: list[dict[str, int]] = []

    def __call__(self, features: list[dict]) -> Any:
        batch = self.inner(features)
        if "attention_mask" in batch:
            lengths = batch["attention_mask"].sum(dim=1).long()
        else:
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
            import torch

            lengths = torch.tensor([b - a for a, b in itertools.pairwise(starts)])
        labels = batch["labels"]
        self.batches.append({"examples": len(lengths), "real": int(lengths.sum()),
                             "computed": int(batch["input_ids"].numel()),
                             "sq": int((lengths**2).sum()), "labels": int((labels[:, 1:] != -100).sum())})
        return batch


def step_timer_callback(begins: list[float], ends: list[float], losses: list[float]) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return StepTimer()


def hf_args(cls: Any, out: Path, steps: int | None, seed: int, batch: int, device: str = "cpu",
            precision: str = "fp32", sampling: str = "random", **extra: Any) -> Any:
    """TrainingArguments (or SFTConfig) shared by the HF systems; steps None = one epoch."""
    return cls(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
               max_steps=steps if steps is not None else -1, num_train_epochs=1, learning_rate=1e-4,
               weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, seed=seed,
               data_seed=seed, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
               use_cpu=device == "cpu", bf16=precision == "bf16", dataloader_num_workers=0,
               train_sampling_strategy=sampling, disable_tqdm=True, remove_unused_columns=False, **extra)


def timed(begins: list[float], ends: list[float], batches: list[dict[str, int]], losses: list[float],
          epoch: bool) -> dict:
    """Figures of an HF/TRL run. Default: steps 2..n, from the end of step 1 (warm-up) to the end of the last.
    epoch: every step, from the start of step 1. Batches are in the order the collator made them (accelerate
    fetches one ahead, so there may be one extra at the end)."""
    first = 0 if epoch else 1
    used = batches[first:len(ends)]
    start = begins[0] if epoch else ends[0]
    steps = [ends[0] - begins[0]] + [b - a for a, b in itertools.pairwise(ends)]
    return {"seconds": ends[-1] - start, "steps": len(ends) - first,
            "real_tokens": sum(b["real"] for b in used), "computed_tokens": sum(b["computed"] for b in used),
            "sum_sq_lengths": sum(b["sq"] for b in used), "label_positions": sum(b["labels"] for b in used),
            "step_seconds": [round(s, 4) for s in steps], "train_losses": [round(x, 5) for x in losses],
            "examples_per_step": [b["examples"] for b in batches[:len(ends)]]}


def run_hf(model: Any, tokenizer: Any, rows: list[dict], steps: int | None, args: argparse.Namespace,
           out: Path, groups: list[list[int]] | None) -> dict:
    """The Trainer, padded batches (DataCollatorForSeq2Seq): `groups` per step, else its group_by_length."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    data = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows],
                              "attention_mask": [[1] * len(r["input_ids"]) for r in rows]})
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, model=None, padding=True, label_pad_token_id=-100))
    begins: list[float] = []
    ends: list[float] = []
    losses: list[float] = []
    sampling = "group_by_length" if groups is None else "instructkit_plan"
    trainer = trainer_class(Trainer, groups)(
        model=model, args=hf_args(TrainingArguments, out, steps, args.seed, args.batch_size, args.device,
                                  args.precision, sampling="group_by_length"),
        train_dataset=data, data_collator=collator, processing_class=tokenizer,
        callbacks=[step_timer_callback(begins, ends, losses)])
    trainer.train()
    res = timed(begins, ends, collator.batches, losses, args.epoch)
    return {**res, "lm_head_positions": res["real_tokens"], "sampling": sampling}


def trainer_class(cls: type, groups: list[list[int]] | None) -> Any:
    """`cls`, or (same steps) `cls` fed the planned step groups: a callable taking cls's keyword arguments."""
    if groups is None:
        return cls
    return functools.partial(planned(cls), step_groups=groups)


def completion_dataset(rows: list[dict]) -> Any:
    """Pre-tokenized prompt/completion for TRL: it builds labels from completion_mask."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                              "completion_mask": [[0] * r["prompt_length"] + [1] * (len(r["input_ids"]) - r["prompt_length"])
                                                  for r in rows]})


def trl_lm_head_positions(res: dict, device: str) -> int:
    """TRL's fused LM head scores only the labelled positions where Triton runs (CUDA), every position elsewhere."""
    import torch
    from trl.kernels.chunked_logprob import _use_triton  # which LM-head path ran

    return res["label_positions"] if _use_triton(torch.device(device)) else res["real_tokens"]


def run_trl(model: Any, tokenizer: Any, rows: list[dict], steps: int | None, args: argparse.Namespace,
            out: Path, groups: list[list[int]] | None) -> dict:
    """TRL with its defaults (gradient checkpointing on: SFTConfig's default), no packing; `groups` per step,
    else its random sampler."""
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = CountingCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    begins: list[float] = []
    ends: list[float] = []
    losses: list[float] = []
    config = hf_args(SFTConfig, out, steps, args.seed, args.batch_size, args.device, args.precision,
                     completion_only_loss=True, packing=False, max_length=args.max_length,
                     dataset_text_field="text")
    trainer = trainer_class(SFTTrainer, groups)(
        model=model, args=config, train_dataset=completion_dataset(rows), data_collator=collator,
        processing_class=tokenizer, callbacks=[step_timer_callback(begins, ends, losses)])
    trainer.train()
    res = timed(begins, ends, collator.batches, losses, args.epoch)
    return {**res, "lm_head_positions": trl_lm_head_positions(res, args.device),
            "gradient_checkpointing": bool(config.gradient_checkpointing),
            "sampling": "random" if groups is None else "instructkit_plan"}


def trl_tuned_batch(rows: list[dict], batch: int, max_length: int) -> int:
    """Packs per step so a step holds about the tokens of `batch` examples: round(batch x mean / max_length)."""
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    return max(1, round(batch * mean / max_length))


def run_trl_tuned(model: Any, tokenizer: Any, rows: list[dict], steps: int | None, args: argparse.Namespace,
                  out: Path, groups: list[list[int]] | None) -> dict:
    """TRL tuned: no gradient checkpointing, fp32 on CPU, padding-free batches, chunked loss. Same steps
    (`groups`): each step's examples flattened into one padding-free row (TRL's padding_free collator, the
    one its BFD packing uses; the inputs are already cut to max_length). Own order (None): BFD packs of
    <= max_length tokens, `trl_tuned_batch` packs per step, drawn at random."""
    from trl import SFTConfig, SFTTrainer

    packs = trl_tuned_batch(rows, args.batch_size, args.max_length) if groups is None else args.batch_size
    packing = ({"packing": True, "packing_strategy": "bfd", "max_length": args.max_length} if groups is None
               else {"packing": False, "max_length": None})
    begins: list[float] = []
    ends: list[float] = []
    losses: list[float] = []
    config = hf_args(SFTConfig, out, steps, args.seed, packs, args.device, args.precision,
                     completion_only_loss=True, padding_free=True, gradient_checkpointing=False, loss_type="nll",
                     dataset_text_field="text", **packing)
    trainer = trainer_class(SFTTrainer, groups)(
        model=model, args=config, train_dataset=completion_dataset(rows), processing_class=tokenizer,
        callbacks=[step_timer_callback(begins, ends, losses)])
    # Padding-free TRL refuses a custom collator, so the counting wrapper goes around the one it built.
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    trainer.train()
    res = timed(begins, ends, collator.batches, losses, args.epoch)
    return {**res, "lm_head_positions": trl_lm_head_positions(res, args.device),
            "packs_per_step": packs if groups is None else None, "packs": len(trainer.train_dataset),
            "padding_free": bool(trainer.padding_free), "sampling": "bfd_random" if groups is None
            else "instructkit_plan"}


def instructkit_config(args: argparse.Namespace, steps: int | None, compile_model: bool = False) -> Any:
    """instructkit's TrainConfig in this benchmark (its defaults but for the shared optimisation settings)."""
    from instructkit.config import TrainConfig

    return TrainConfig(lr=1e-4, max_steps=steps, epochs=1, schedule="linear", warmup_ratio=0.0, max_grad_norm=1.0,
                       seed=args.seed, batch_size=args.batch_size, grad_accum=1, threads=1, eval_every=10**6,
                       save_every=10**6, precision=args.precision, compile=compile_model)


def shared_steps(model: Any, rows: list[dict], steps: int | None, args: argparse.Namespace) -> list | None:
    """instructkit's plan of the run's steps (_same_steps), or None with --own-order."""
    if args.own_order:
        return None
    plan, _ = instructkit_plan([len(r["input_ids"]) for r in rows], args.batch_size, args.max_length, args.seed,
                               args.device, model.config, instructkit_config(args, steps))
    return planned_steps([len(r["input_ids"]) for r in rows], plan, steps)


def run_instructkit(model: Any, tokenizer: Any, rows: list[dict], steps: int | None, args: argparse.Namespace,
                    out: Path, compile_model: bool = False) -> dict:
    from datasets import Dataset

    from instructkit.data.buckets import micro_batch_shape, record_shape
    from instructkit.data.tokenize import TokenizeSettings
    from instructkit.train.loop import TrainData, TrainOptions, train

    data = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows],
                              "prompt_length": [r["prompt_length"] for r in rows], "index": list(range(len(rows)))})
    cfg = instructkit_config(args, steps, compile_model)
    at_end: dict[str, float] = {}

    def validate(_model: Any) -> dict[str, float]:  # called after the last step, before the final checkpoint
        at_end["rss_mb"] = peak_rss_mb()
        return {}

    result = train(model, tokenizer, TrainData(data), cfg, out,
                   TrainOptions(settings=TokenizeSettings(max_length=args.max_length), is_seq2seq=False,
                                validate=validate, show_progress=False, log_every=1))
    records = [r for r in result.history if r.get("event") == "train"]
    # tokens_per_s of a one-step window = that step's tokens / its seconds.
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + records, records)]
    seconds = [t / r["tokens_per_s"] for t, r in zip(tokens, records)]
    shapes = [r["shape"] if isinstance(r["shape"][0], list) else [r["shape"]] for r in records]
    computed = [sum(rows_ * width for rows_, width in s) for s in shapes]
    # Replay the loop's plan (the BatchPlan train() builds) for the examples of each step (attention FLOPs);
    # the other systems read the same plan (shared_steps) unless --own-order.
    lengths = [len(r["input_ids"]) for r in rows]
    plan, multiple = instructkit_plan(lengths, args.batch_size, args.max_length, args.seed, args.device,
                                      model.config, cfg)
    replay = planned_steps(lengths, plan, len(records))
    sq, replayed_shapes = [], []
    for step_plan in replay:
        sq.append(sum(int(lengths[i]) ** 2 for mb in step_plan[0] for row in mb for i in row))
        replayed_shapes.append(record_shape([micro_batch_shape(mb, lengths, multiple) for mb in step_plan[0]]))
    if replayed_shapes != [r["shape"] for r in records]:
        raise SystemExit("the replayed plan does not match the shapes the run recorded")
    first = 0 if args.epoch else 1
    label_positions = sum(r["label_tokens"] for r in records[first:])
    real = sum(tokens[first:])
    return {"seconds": sum(seconds[first:]), "steps": len(records) - first, "real_tokens": real,
            "computed_tokens": sum(computed[first:]), "sum_sq_lengths": sum(sq[first:]),
            "label_positions": label_positions,
            "lm_head_positions": label_positions if cfg.logits_at_labels else real,
            "step_seconds": [round(s, 4) for s in seconds], "train_losses": [round(r["loss"], 5) for r in records],
            "shapes": sorted({json.dumps(r["shape"]) for r in records}),
            "examples_per_step": [len(g) for g in step_examples(replay)],
            "peak_rss_mb_before_final_checkpoint": at_end.get("rss_mb"), "packing": cfg.packing,
            "logits_at_labels": cfg.logits_at_labels, "pad_to_multiple_of": multiple, "compile": compile_model}


def yardstick_loss(model: Any, rows: list[dict], device: str) -> float:
    """Mean cross-entropy of the completion tokens of `rows`, one example at a time (fp32, no autocast)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]], device=device)
            labels = torch.tensor(r["labels"][1:], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / max(count, 1)


def child(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    started = time.perf_counter()
    if args.device == "cuda":
        peak = matmul_peak_flops(8192, 5, "cuda", args.precision)
    else:
        peak = matmul_peak_flops(precision="fp32")
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    attention = args.attn
    if args.child.startswith("instructkit") or args.baselines_same_attention:
        # what instructkit's loader does for model.attn_implementation: auto (CPU: sdpa_varlen; CUDA: sdpa with
        # cuDNN attention off, or flash_attention_2 for bf16 weights when flash_attn is installed)
        from instructkit.models.load import use_attention

        attention = use_attention("auto", "fp32", MODEL_TYPES[SHAPES[args.shape]["kind"]]) or args.attn
    model = build_model(args.shape, args.seed, args.layers, attention)
    shape = flop_shape(model)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = None if args.epoch else args.steps + 1
    runner = {"hf_trainer": run_hf, "trl_sft": run_trl, "trl_tuned": run_trl_tuned}
    with tempfile.TemporaryDirectory(prefix=f"bench_train_{args.child}_") as tmp:
        out = Path(tmp)
        if args.child.startswith("instructkit"):
            res = run_instructkit(model, tokenizer, rows, steps, args, out,
                                  compile_model=args.child == "instructkit_compile")
        else:
            shared = shared_steps(model, rows, steps, args)
            res = runner[args.child](model, tokenizer, rows, steps, args, out,
                                     None if shared is None else step_examples(shared))
    res["yardstick_loss"] = yardstick_loss(model, rows, args.device)
    if args.device == "cuda":
        res.update(peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20, gpu=torch.cuda.get_device_name(),
                   cudnn_sdpa_enabled=torch.backends.cuda.cudnn_sdp_enabled())
    res.update(system=args.child, peak_rss_mb=peak_rss_mb(), matmul_flops=peak, **shape,
               attn_implementation=model.config._attn_implementation,
               process_seconds=time.perf_counter() - started, torch_threads=torch.get_num_threads())
    Path(args.result).write_text(json.dumps(res))
    return 0


# --------------------------------------------------------------------------------------------------
# Parent: interleave, aggregate, write
# --------------------------------------------------------------------------------------------------


def flops_computed(run: dict) -> float:
    """FLOPs the run actually computed on real tokens (module docstring)."""
    return (6 * run["body_params"] * run["real_tokens"] + 6 * run["vocab"] * run["hidden"] * run["lm_head_positions"]
            + 6 * run["layers"] * run["attn_dim"] * run["sum_sq_lengths"])


def figures(run: dict) -> dict:
    """tok/s, padding fraction, MFU (computed FLOPs, and the earlier 6N convention) and step-time tail."""
    tps = run["real_tokens"] / run["seconds"]
    flops_6n = 6 * run["params"] * run["real_tokens"] + 6 * run["layers"] * run["hidden"] * run["sum_sq_lengths"]
    after = run["step_seconds"][WARMUP_STEPS_EPOCH:]
    tail = {}
    if len(after) >= 2:
        ordered = sorted(after)
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        tail = {"p99_over_median_step_after_warmup": p99 / statistics.median(after)}
    return {"tokens_per_s": tps, "padding_fraction": 1 - run["real_tokens"] / run["computed_tokens"],
            "mfu": flops_computed(run) / run["seconds"] / run["matmul_flops"],
            "mfu_6n": flops_6n / run["seconds"] / run["matmul_flops"],
            "seq_len_mean_token_weighted": run["sum_sq_lengths"] / run["real_tokens"], **tail}


def summarize(runs: list[dict]) -> dict:
    per = [figures(r) for r in runs]
    med = lambda key: statistics.median(p[key] for p in per)
    gpu = {"peak_gpu_mb": round(max(r["peak_gpu_mb"] for r in runs), 1)} if "peak_gpu_mb" in runs[0] else {}
    tail = ({"p99_over_median_step_after_warmup": round(med("p99_over_median_step_after_warmup"), 3)}
            if all("p99_over_median_step_after_warmup" in p for p in per) else {})
    return {"tokens_per_s": round(med("tokens_per_s"), 2), "padding_fraction": round(med("padding_fraction"), 4),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1), **gpu, "mfu": round(med("mfu"), 4),
            "mfu_6n": round(med("mfu_6n"), 4), **tail,
            "yardstick_loss": round(statistics.median(r["yardstick_loss"] for r in runs), 5),
            "final_train_loss": round(statistics.median(r["train_losses"][-1] for r in runs), 5),
            "tokens_per_s_runs": [round(p["tokens_per_s"], 2) for p in per],
            "mfu_runs": [round(p["mfu"], 4) for p in per],
            "matmul_gflops_runs": [round(r["matmul_flops"] / 1e9, 2) for r in runs],
            "seq_len_mean_token_weighted": round(med("seq_len_mean_token_weighted"), 1),
            "runs": runs}


def ratios_and_goals(summary: dict, epoch: bool) -> tuple[dict, dict, dict]:
    """instructkit over each baseline (tokens/s, yardstick loss, peak RSS) and the issue's goals."""
    ratios: dict[str, float] = {}
    ik = summary.get("instructkit")
    if ik is None:
        return ratios, {}, {}
    for name, key in (("hf", "hf_trainer"), ("trl", "trl_sft"), ("trl_tuned", "trl_tuned"),
                      ("compiled", "instructkit_compile")):
        if key in summary:
            other = summary[key]
            ratios[f"instructkit_over_{name}_tokens_per_s"] = round(ik["tokens_per_s"] / other["tokens_per_s"], 3)
            ratios[f"instructkit_over_{name}_yardstick_loss"] = round(ik["yardstick_loss"] / other["yardstick_loss"], 4)
    if "hf_trainer" in summary:
        ratios["instructkit_over_hf_peak_rss"] = round(ik["peak_rss_mb"] / summary["hf_trainer"]["peak_rss_mb"], 3)
    ratios["instructkit_mfu"] = ik["mfu"]
    if "p99_over_median_step_after_warmup" in ik:
        ratios["instructkit_p99_over_median_step"] = ik["p99_over_median_step_after_warmup"]
    if epoch:  # the GPU goals (issue 14)
        goals = {"instructkit_over_hf_tokens_per_s": ">= 1.3", "instructkit_over_trl_tuned_tokens_per_s": ">= 1.1",
                 "instructkit_p99_over_median_step": "<= 1.25"}
    else:  # the CPU goals, 1 thread
        goals = {"instructkit_over_hf_tokens_per_s": ">= 2.5", "instructkit_over_trl_tuned_tokens_per_s": ">= 2.0",
                 "instructkit_over_hf_yardstick_loss": "within 0.01", "instructkit_over_trl_tuned_yardstick_loss":
                 "within 0.01", "instructkit_over_hf_peak_rss": "<= 1.0"}
    met = {}
    for key, goal in goals.items():
        if key in ratios:
            op, bound = goal.split()
            value, bound = ratios[key], float(bound)
            met[key] = (value >= bound if op == ">=" else value <= bound if op == "<=" else abs(value - 1) <= bound)
    return ratios, goals, met


def machine() -> dict:
    names = []
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "accelerate", "datasets", "trl", "flash_attn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=7, help="timed optimizer steps per run (after 1 warm-up step)")
    p.add_argument("--epoch", action="store_true", help="run one whole epoch per system, warm-up included in "
                   "the figure; report p99/median step time after the first 10 steps (the GPU benchmark)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds A B C D")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--per-dataset", type=int, default=16, help="examples per source dataset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (smoke tests only)")
    p.add_argument("--out", default=str(RESULT))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast with fp32 master weights in every system (GPU)")
    p.add_argument("--attn", default="sdpa", help="attention implementation of the baselines (instructkit uses "
                   "its model.attn_implementation auto choice: sdpa_varlen on CPU, sdpa without cuDNN on CUDA)")
    p.add_argument("--own-order", action="store_true",
                   help="let each system draw its own batches (the Trainer's group_by_length, TRL's random order "
                   "and BFD packs) instead of instructkit's step groups for all: the loss then differs by order")
    p.add_argument("--baselines-same-attention", action="store_true",
                   help="give the baselines instructkit's auto attention choice too")
    p.add_argument("--save-inputs", help="write the tokenized examples and the tokenizer to this folder and stop "
                   "(for a machine without ../shared)")
    p.add_argument("--inputs", help="read the examples and tokenizer written by --save-inputs")
    p.add_argument("--child", choices=ALL_SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def save_inputs(folder: Path, data: Path, tokenizer: Path, tok_stats: dict, args: argparse.Namespace) -> int:
    """The tokenized examples + the tokenizer files, for a machine that has neither ../shared nor the model."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data, folder / "tokens.jsonl")
    (folder / "tokenizer").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, folder / "tokenizer" / name)
    (folder / "inputs.json").write_text(json.dumps({"shape": args.shape, "per_dataset": args.per_dataset,
                                                    "max_length": args.max_length, "seed": args.seed,
                                                    "tokenize_stats": tok_stats}))
    print(f"wrote {folder}")
    return 0


def child_command(args: argparse.Namespace, system: str, data: Path, folder: Path, result: Path) -> list[str]:
    cmd = [sys.executable, __file__, "--child", system, "--data", str(data), "--tokenizer", str(folder),
           "--result", str(result), "--shape", args.shape, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--seed", str(args.seed),
           "--device", args.device, "--precision", args.precision, "--attn", args.attn]
    cmd += ["--layers", str(args.layers)] if args.layers else []
    cmd += ["--epoch"] if args.epoch else []
    cmd += ["--baselines-same-attention"] if args.baselines_same_attention else []
    cmd += ["--own-order"] if args.own_order else []
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return child(args)
    command = " ".join(["PYTHONPATH=src", "python", "benchmarks/bench_train.py", *(argv or sys.argv[1:])])
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.time()
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(ALL_SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        scratch = Path(tmp)
        if args.inputs:
            saved = Path(args.inputs)
            folder, data = saved / "tokenizer", saved / "tokens.jsonl"
            rows = [json.loads(line) for line in data.read_text().splitlines()]
            tok_stats = json.loads((saved / "inputs.json").read_text())["tokenize_stats"]
        else:
            examples = prepare_examples(args.per_dataset, args.seed, scratch)
            folder = tokenizer_folder(args.shape)
            rows, tok_stats = tokenize(examples, folder, args.max_length)
            data = scratch / "tokens.jsonl"
            data.write_text("\n".join(json.dumps(r) for r in rows))
        if args.save_inputs:
            return save_inputs(Path(args.save_inputs), data, folder, tok_stats, args)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p))
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        loads: list[dict] = []
        for rep in range(args.repeats):
            for system in systems:
                result = scratch / f"{system}_{rep}.json"
                load_before = os.getloadavg()[0]
                proc = subprocess.run(child_command(args, system, data, folder, result), env=env,
                                      capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"{system} run {rep} failed (exit {proc.returncode})")
                run = json.loads(result.read_text())
                run["load_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                runs[system].append(run)
                loads.append({"system": system, "repeat": rep, "load_1min": run["load_1min_before_after"]})
                f = figures(run)
                gpu_mem = f", peak GPU {run['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in run else ""
                tail = (f", p99/median step {f['p99_over_median_step_after_warmup']:.2f}"
                        if "p99_over_median_step_after_warmup" in f else "")
                print(f"{system} #{rep}: {f['tokens_per_s']:.1f} tok/s over {run['steps']} steps, padding "
                      f"{f['padding_fraction']:.3f}, peak RSS {run['peak_rss_mb']:.0f} MB{gpu_mem}, MFU {f['mfu']:.3f}"
                      f"{tail}, yardstick loss {run['yardstick_loss']:.4f}, load {run['load_1min_before_after']}",
                      flush=True)
    summary = {s: summarize(r) for s, r in runs.items()}
    ratios, goals, met = ratios_and_goals(summary, args.epoch)
    report = {
        "benchmark": "train throughput: instructkit vs HF Trainer vs TRL SFTTrainer (defaults and tuned)",
        "command": command,
        "settings": {"shape": args.shape, "layers_override": args.layers, "epoch": args.epoch,
                     "steps_timed": None if args.epoch else args.steps,
                     "warmup_steps_untimed": 0 if args.epoch else 1, "repeats": args.repeats,
                     "per_dataset": args.per_dataset, "batch_size": args.batch_size, "grad_accum": 1,
                     "max_length": args.max_length, "lr": 1e-4,
                     "optimizer": "AdamW (HF/TRL: Trainer default optim; instructkit: fused AdamW)",
                     "precision": args.precision, "device": args.device, "attn_implementation_baselines": args.attn,
                     "baselines_same_attention": args.baselines_same_attention, "torch_threads": 1, "seed": args.seed,
                     "sources": [s[3] for s in SOURCES], "examples": len(rows), "tokenize_stats": tok_stats,
                     "same_steps": not args.own_order,
                     "trl_tuned_packs_per_step": (trl_tuned_batch(rows, args.batch_size, args.max_length)
                                                  if args.own_order else None),
                     "yardstick_examples": len(rows)},
        "formulas": {
            "tokens_per_s": "non-padding input tokens / seconds of the timed steps (--epoch: of every step, warm-up "
                            "included); median over repeats",
            "padding_fraction": "1 - real tokens / tokens in the input_ids tensors computed",
            "flops_computed": "6 x N_body x real_tokens + 6 x V x d x lm_head_positions + 6 x L x d_attn x "
                              "sum_i T_i^2 (see the module docstring)",
            "mfu": "flops_computed / seconds / best-of-5 torch.mm FLOP/s in the same process",
            "mfu_6n": "the earlier convention: 6 x N x real_tokens + 6 x L x d x sum_i T_i^2",
            "yardstick_loss": "mean CE of the completion tokens of every example after training, fp32",
            "peak_rss_mb": "VmHWM of the child process at its end (max over repeats); instructkit's includes its "
                           "final checkpoint save, see runs[].peak_rss_mb_before_final_checkpoint",
            "p99_over_median_step_after_warmup": f"step times after the first {WARMUP_STEPS_EPOCH} steps",
        },
        "results": {s: {k: v for k, v in d.items() if k != "runs"} for s, d in summary.items()},
        "ratios": ratios, "goals": goals, "goals_met": met,
        "machine": {**machine(), "load_average_at_start": load_start,
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "load_per_run": loads,
                    "note": "1-minute load average before/after each run in load_per_run (1.0 = this benchmark "
                            "alone on the machine; higher = other jobs: expect noise)"},
        "versions": versions(),
        "wall_seconds": round(time.time() - started, 1),
        "runs": {s: d["runs"] for s, d in summary.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from instructkit.io import write_json

    write_json(out, report)
    print(json.dumps({"results": report["results"], "ratios": ratios, "goals_met": met}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
