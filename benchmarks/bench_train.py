"""Training throughput: instructkit's loop vs HF Trainer vs TRL SFTTrainer, same data, same architecture.

    PYTHONPATH=src python benchmarks/bench_train.py                     # defaults: ~10-15 min on 2 cores
    PYTHONPATH=src python benchmarks/bench_train.py --steps 8 --repeats 3 --shape gemma3   # quiet machine
    # GPU (bf16 autocast, fp32 master weights): save the tokenized inputs here, run them there
    PYTHONPATH=src python benchmarks/bench_train.py --save-inputs .devbench/smollm2
    PYTHONPATH=src python benchmarks/bench_train.py --inputs .devbench/smollm2 --device cuda --precision bf16 \
        --steps 20 --repeats 2 --out benchmarks/results/train_gpu.json

What is compared (everything identical except the training loop):
- data: a fixed, seeded mixture of prepared examples from ../shared/data (Amazon Fine Food rating, DialogSum
  summary, Alpaca, SST-2 with options; --per-dataset each), tokenized ONCE in the parent with instructkit's
  tokenize_examples (SmolLM2 tokenizer, max_length 256, prompt cut from the left, completion + EOS, labels
  -100 on the prompt). All three systems receive these exact token ids (TRL as pre-tokenized
  input_ids + completion_mask: its own text path only truncates keep_start, which would cut completions).
- model: the SmolLM2-135M shape (or Gemma-3-270M's) with random weights from the same seed, fp32, sdpa.
- optimisation: batch 8 examples per optimizer step, no accumulation, AdamW lr 1e-4, linear schedule
  without warmup, grad clip 1.0, seed 0, 1 torch thread.
- instructkit: `train.loop.train` with its defaults (packing, logits at label positions only).
  HF Trainer: DataCollatorForSeq2Seq padding, no length grouping (train_sampling_strategy "random",
  transformers 5 name for group_by_length False). TRL: SFTTrainer,
  completion_only_loss=True, packing False, max_length 256.

Each run is a FRESH subprocess (so peak RSS is per system), runs 1 untimed warm-up step + --steps timed
steps; the runs are interleaved A B C A B C over --repeats. The figure per system is the median over
repeats of (real tokens of the timed steps / seconds of the timed steps).

Timing: instructkit reports each step's wall time (collate + forward/backward + optimizer); HF/TRL are
timed from the end of the warm-up step to the end of the last step (so their data loading and callbacks
between steps count). Real tokens = non-padding input tokens of the examples each step processed.

MFU = model FLOP/s / peak FLOP/s, where
  model FLOPs of a step = 6 x N x real_tokens + 6 x n_layers x hidden x sum_i T_i^2
  (N = unique parameters incl. the tied embedding, whose LM-head matmul it stands for; the attention term:
  QK^T and AV each 2 x T x d FLOPs per token forward at full width, halved for causal, x3 for backward =
  6 x L x d x T per token, averaged over an example's tokens -> 6 x L x d x T_i^2 per example), and peak =
  best of 5 fp32 torch.mm 2048x2048x2048 products (2 x 2048^3 FLOPs) in the same process and thread count.
  These are MODEL FLOPs: work a system skips (instructkit's LM head only at labels) counts as saved time,
  so MFU above 100% would be possible in principle.
"""

from __future__ import annotations

import argparse
import json
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

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
RESULT = ROOT / "benchmarks" / "results" / "train.json"
SYSTEMS = ("instructkit", "hf_trainer", "trl_sft")

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
    """Wraps a collator and records, per batch, real tokens (attention_mask sum), computed tokens
    (numel of input_ids) and sum of squared example lengths (for the attention FLOPs)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.batches: list[dict[str, int]] = []

    def __call__(self, features: list[dict]) -> Any:
        batch = self.inner(features)
        mask = batch["attention_mask"]
        lengths = mask.sum(dim=1)
        self.batches.append({"real": int(lengths.sum()), "computed": int(batch["input_ids"].numel()),
                             "sq": int((lengths.long() ** 2).sum())})
        return batch


def step_timer_callback(marks: list[float]) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            marks.append(time.perf_counter())

    return StepTimer()


def hf_args(cls: Any, out: Path, steps: int, seed: int, batch: int, device: str = "cpu", precision: str = "fp32",
            **extra: Any) -> Any:
    return cls(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
               max_steps=steps, learning_rate=1e-4, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0,
               max_grad_norm=1.0, seed=seed, data_seed=seed, logging_steps=10**6, save_strategy="no",
               eval_strategy="no", report_to="none", use_cpu=device == "cpu", bf16=precision == "bf16",
               dataloader_num_workers=0,
               train_sampling_strategy="random", disable_tqdm=True, remove_unused_columns=False, **extra)


def run_hf(model: Any, tokenizer: Any, rows: list[dict], steps: int, seed: int, batch: int, out: Path,
           device: str = "cpu", precision: str = "fp32") -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    data = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows],
                              "attention_mask": [[1] * len(r["input_ids"]) for r in rows]})
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, model=None, padding=True, label_pad_token_id=-100))
    marks: list[float] = []
    trainer = Trainer(model=model, args=hf_args(TrainingArguments, out, steps, seed, batch, device, precision),
                      train_dataset=data,
                      data_collator=collator, processing_class=tokenizer, callbacks=[step_timer_callback(marks)])
    trainer.train()
    return timed_from_marks(marks, collator.batches)


def run_trl(model: Any, tokenizer: Any, rows: list[dict], steps: int, seed: int, batch: int, out: Path,
            max_length: int, device: str = "cpu", precision: str = "fp32") -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    # Pre-tokenized prompt/completion: TRL builds labels from completion_mask (completion_only_loss).
    data = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                              "completion_mask": [[0] * r["prompt_length"] + [1] * (len(r["input_ids"]) - r["prompt_length"])
                                                  for r in rows]})
    collator = CountingCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    marks: list[float] = []
    args = hf_args(SFTConfig, out, steps, seed, batch, device, precision, completion_only_loss=True, packing=False,
                   max_length=max_length, dataset_text_field="text")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                         processing_class=tokenizer, callbacks=[step_timer_callback(marks)])
    trainer.train()
    return timed_from_marks(marks, collator.batches)


def timed_from_marks(marks: list[float], batches: list[dict[str, int]]) -> dict:
    """Steps 2..n timed from the end of step 1 (warm-up) to the end of the last step. Batches are in the
    order the collator made them (accelerate fetches one ahead, so there may be one extra at the end)."""
    timed = batches[1:len(marks)]
    return {"seconds": marks[-1] - marks[0], "steps": len(marks) - 1,
            "real_tokens": sum(b["real"] for b in timed), "computed_tokens": sum(b["computed"] for b in timed),
            "sum_sq_lengths": sum(b["sq"] for b in timed),
            "step_seconds": [round(b - a, 3) for a, b in zip(marks, marks[1:])]}


def run_instructkit(model: Any, tokenizer: Any, rows: list[dict], steps: int, seed: int, batch: int, out: Path,
                    max_length: int, precision: str = "fp32") -> dict:
    from datasets import Dataset

    from instructkit.config import TrainConfig
    from instructkit.data.batching import TokenTable, collate
    from instructkit.data.sampler import BatchPlan, attention_tokens_of, plan_epoch
    from instructkit.data.tokenize import TokenizeSettings
    from instructkit.train.loop import TrainData, TrainOptions, train

    data = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows],
                              "prompt_length": [r["prompt_length"] for r in rows], "index": list(range(len(rows)))})
    cfg = TrainConfig(lr=1e-4, max_steps=steps, schedule="linear", warmup_ratio=0.0, max_grad_norm=1.0, seed=seed,
                      batch_size=batch, grad_accum=1, threads=1, eval_every=10**6, save_every=10**6,
                      precision=precision)
    at_end: dict[str, float] = {}

    def validate(_model: Any) -> dict[str, float]:  # called after the last step, before the final checkpoint
        at_end["rss_mb"] = peak_rss_mb()
        return {}

    result = train(model, tokenizer, TrainData(data), cfg, out,
                   TrainOptions(settings=TokenizeSettings(max_length=max_length), is_seq2seq=False, validate=validate,
                                show_progress=False, log_every=1))
    records = [r for r in result.history if r.get("event") == "train"]
    # tokens_per_s of a one-step window = that step's tokens / its seconds.
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + records, records)]
    seconds = [t / r["tokens_per_s"] for t, r in zip(tokens, records)]
    # Replay the loop's plan (same BatchPlan as train() builds) to count computed (padded) tokens per step.
    table = TokenTable.from_dataset(data)
    plan = BatchPlan(batch_size=batch, grad_accum=1, world_size=1, packing=cfg.packing,
                     max_tokens=cfg.max_tokens_per_batch or batch * max_length,
                     attention_tokens=attention_tokens_of(model.config), group_by_length=cfg.group_by_length,
                     seed=seed)
    pad_id = tokenizer.pad_token_id
    computed, sq = [], []
    replay: list = []
    epoch = 0
    while len(replay) < steps:  # the run crosses epochs when steps > examples / batch
        replay += plan_epoch(table.lengths, plan, epoch, None)
        epoch += 1
    for step_plan in replay[:steps]:
        examples = [i for mb in step_plan[0] for row in mb for i in row]
        batches = [collate(table, mb, pad_id, seq2seq=False, packed=cfg.packing) for mb in step_plan[0]]
        computed.append(sum(int(b.inputs["input_ids"].numel()) for b in batches))
        sq.append(sum(int(table.lengths[i]) ** 2 for i in examples))
    return {"seconds": sum(seconds[1:]), "steps": len(records) - 1, "real_tokens": sum(tokens[1:]),
            "computed_tokens": sum(computed[1:]), "sum_sq_lengths": sum(sq[1:]),
            "step_seconds": [round(s, 3) for s in seconds], "peak_rss_mb_before_final_checkpoint": at_end.get("rss_mb"),
            "packing": cfg.packing, "logits_at_labels": cfg.logits_at_labels, "group_by_length": cfg.group_by_length}


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
    model = build_model(args.shape, args.seed, args.layers, args.attn)
    n_params = unique_parameters(model)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total_steps = args.steps + 1
    with tempfile.TemporaryDirectory(prefix=f"bench_train_{args.child}_") as tmp:
        out = Path(tmp)
        if args.child == "instructkit":
            res = run_instructkit(model, tokenizer, rows, total_steps, args.seed, args.batch_size, out, args.max_length,
                                  args.precision)
        elif args.child == "hf_trainer":
            res = run_hf(model, tokenizer, rows, total_steps, args.seed, args.batch_size, out, args.device,
                         args.precision)
        else:
            res = run_trl(model, tokenizer, rows, total_steps, args.seed, args.batch_size, out, args.max_length,
                          args.device, args.precision)
    if args.device == "cuda":
        res.update(peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20, gpu=torch.cuda.get_device_name())
    res.update(system=args.child, peak_rss_mb=peak_rss_mb(), matmul_flops=peak, params=n_params,
               layers=model.config.num_hidden_layers, hidden=model.config.hidden_size,
               process_seconds=time.perf_counter() - started, torch_threads=torch.get_num_threads())
    Path(args.result).write_text(json.dumps(res))
    return 0


# --------------------------------------------------------------------------------------------------
# Parent: interleave, aggregate, write
# --------------------------------------------------------------------------------------------------


def figures(run: dict) -> dict:
    """tok/s, padding fraction and MFU of one run (see the module docstring for the FLOPs)."""
    tps = run["real_tokens"] / run["seconds"]
    flops = 6 * run["params"] * run["real_tokens"] + 6 * run["layers"] * run["hidden"] * run["sum_sq_lengths"]
    return {"tokens_per_s": tps, "padding_fraction": 1 - run["real_tokens"] / run["computed_tokens"],
            "mfu": flops / run["seconds"] / run["matmul_flops"],
            "seq_len_mean_token_weighted": run["sum_sq_lengths"] / run["real_tokens"]}


def summarize(runs: list[dict]) -> dict:
    per = [figures(r) for r in runs]
    med = lambda key: statistics.median(p[key] for p in per)  # noqa: E731
    gpu = {"peak_gpu_mb": round(max(r["peak_gpu_mb"] for r in runs), 1)} if "peak_gpu_mb" in runs[0] else {}
    return {"tokens_per_s": round(med("tokens_per_s"), 2), "padding_fraction": round(med("padding_fraction"), 4),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1), **gpu, "mfu": round(med("mfu"), 4),
            "tokens_per_s_runs": [round(p["tokens_per_s"], 2) for p in per],
            "mfu_runs": [round(p["mfu"], 4) for p in per],
            "matmul_gflops_runs": [round(r["matmul_flops"] / 1e9, 2) for r in runs],
            "seq_len_mean_token_weighted": round(med("seq_len_mean_token_weighted"), 1),
            "runs": runs}


def machine() -> dict:
    names = []
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "accelerate", "datasets", "trl"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run (after 1 warm-up step)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds A B C")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--per-dataset", type=int, default=16, help="examples per source dataset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--layers", type=int, default=None, help="override n_layers (smoke tests only)")
    p.add_argument("--out", default=str(RESULT))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast with fp32 master weights in every system (GPU)")
    p.add_argument("--attn", default="sdpa", help="attention implementation for every system (sdpa, eager, "
                   "flex_attention); packed batches need one that honours position_ids")
    p.add_argument("--save-inputs", help="write the tokenized examples and the tokenizer to this folder and stop "
                   "(for a machine without ../shared)")
    p.add_argument("--inputs", help="read the examples and tokenizer written by --save-inputs")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
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


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return child(args)
    command = " ".join(["PYTHONPATH=src", "python", "benchmarks/bench_train.py", *sys.argv[1:]])
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.time()
    systems = [s for s in args.systems.split(",") if s]
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
                cmd = [sys.executable, __file__, "--child", system, "--data", str(data), "--tokenizer", str(folder),
                       "--result", str(result), "--shape", args.shape, "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                       "--seed", str(args.seed), "--device", args.device, "--precision", args.precision,
                       "--attn", args.attn] + (["--layers", str(args.layers)] if args.layers else [])
                load_before = os.getloadavg()[0]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"{system} run {rep} failed (exit {proc.returncode})")
                run = json.loads(result.read_text())
                run["load_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                runs[system].append(run)
                loads.append({"system": system, "repeat": rep, "load_1min": run["load_1min_before_after"]})
                f = figures(run)
                gpu_mem = f", peak GPU {run['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in run else ""
                print(f"{system} #{rep}: {f['tokens_per_s']:.1f} tok/s, padding {f['padding_fraction']:.3f}, "
                      f"peak RSS {run['peak_rss_mb']:.0f} MB{gpu_mem}, MFU {f['mfu']:.3f}, "
                      f"load {run['load_1min_before_after']}", flush=True)
    summary = {s: summarize(r) for s, r in runs.items()}
    ratios = {}
    if "instructkit" in summary:
        ik = summary["instructkit"]
        if "hf_trainer" in summary:
            hf = summary["hf_trainer"]
            ratios["instructkit_over_hf_tokens_per_s"] = round(ik["tokens_per_s"] / hf["tokens_per_s"], 3)
            ratios["instructkit_over_hf_peak_rss"] = round(ik["peak_rss_mb"] / hf["peak_rss_mb"], 3)
        if "trl_sft" in summary:
            ratios["instructkit_over_trl_tokens_per_s"] = round(ik["tokens_per_s"] / summary["trl_sft"]["tokens_per_s"], 3)
        ratios["instructkit_mfu"] = ik["mfu"]
    goals = {"instructkit_over_hf_tokens_per_s": ">= 1.5", "instructkit_over_trl_tokens_per_s": ">= 3",
             "instructkit_mfu": ">= 0.70", "instructkit_over_hf_peak_rss": "<= 1.0"}
    met = {}
    for key, goal in goals.items():
        if key in ratios:
            op, bound = goal.split()
            met[key] = ratios[key] >= float(bound) if op == ">=" else ratios[key] <= float(bound)
    report = {
        "benchmark": "train step throughput: instructkit vs HF Trainer vs TRL SFTTrainer",
        "command": command,
        "settings": {"shape": args.shape, "layers_override": args.layers, "steps_timed": args.steps,
                     "warmup_steps_untimed": 1, "repeats": args.repeats, "per_dataset": args.per_dataset,
                     "batch_size": args.batch_size, "grad_accum": 1, "max_length": args.max_length, "lr": 1e-4,
                     "optimizer": "AdamW (HF/TRL: Trainer default optim; instructkit: fused AdamW)",
                     "precision": args.precision, "device": args.device, "attn_implementation": args.attn,
                     "torch_threads": 1, "seed": args.seed,
                     "sources": [s[3] for s in SOURCES], "examples": len(rows), "tokenize_stats": tok_stats},
        "formulas": {
            "tokens_per_s": "non-padding input tokens of the timed steps / seconds of the timed steps; median over repeats",
            "padding_fraction": "1 - real tokens / tokens in the input_ids tensors computed",
            "model_flops": "6 x N x real_tokens + 6 x n_layers x hidden x sum_i T_i^2 (causal attention: per token "
                           "2*2*L*T*d/2 forward x3 fwd+bwd = 6*L*d*T; N = unique params incl. tied embedding)",
            "mfu": "model FLOPs / seconds / best-of-5 torch.mm FLOP/s in the same process (CPU: fp32 2048^3 at "
                   "1 thread; GPU: 8192^3 in the run's precision)",
            "peak_rss_mb": "VmHWM of the child process at its end (max over repeats); instructkit's includes its "
                           "final checkpoint save, see runs[].peak_rss_mb_before_final_checkpoint",
            "timing": "instructkit: its per-step wall time (collate + fwd/bwd + optimizer) from metrics history; "
                      "HF/TRL: end of warm-up step to end of last step (on_step_end callback)",
        },
        "results": {s: {k: v for k, v in d.items() if k != "runs"} for s, d in summary.items()},
        "ratios": ratios, "goals": goals, "goals_met": met,
        "machine": {**machine(), "load_average_at_start": load_start,
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "load_per_run": loads,
                    "note": "1-minute load average before/after each run in load_per_run (about 1.0 = this "
                            "benchmark alone on the machine; higher = other jobs: expect noise)"},
        "versions": versions(),
        "wall_seconds": round(time.time() - started, 1),
        "runs": {s: d["runs"] for s, d in summary.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from instructkit.io import write_json

    write_json(out, report)
    print(json.dumps({"results": report["results"], "ratios": ratios, "goals_met": met}, indent=1, default=str)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
