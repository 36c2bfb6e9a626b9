"""Memory of a full fine-tune: HF Trainer vs instructkit default vs instructkit memory-lean, and
`instructkit estimate-memory`'s prediction for every instructkit run.

    PYTHONPATH=src python benchmarks/bench_memory.py                 # everything: ~1.5 h on 2 busy cores
    PYTHONPATH=src python benchmarks/bench_memory.py --only smollm2   # one model
    PYTHONPATH=src python benchmarks/bench_memory.py --estimate-only # recompute the estimates of a saved run
    PYTHONPATH=src python benchmarks/bench_memory.py --ab gemma3 --ab-settings default,lean,lean_ckpt
                                                                     # step times, the settings in turn

What runs (each in a FRESH subprocess, one at a time, 1 torch thread, fp32, peak RSS = VmHWM of the child):
- data: DialogSum dev dialogues as "Summarize the dialogue" examples (summary-length completions), tokenized
  once in the parent with instructkit's tokenize_examples at max_length 256 (prompt cut from the left); only
  examples of exactly 256 tokens are kept, so a step of B examples is B x 256 tokens in every system (no
  padding). Step i trains on examples [B i, B (i + 1)) in every system (the Trainer's sampler is
  sequential).
- models: SmolLM2-135M-Instruct and Gemma-3-270M with their real weights (the registry's GGUF packages,
  dequantized to fp32), and a Qwen2.5-1.5B-shape model with random weights from its config alone (ids from
  the SmolLM2 tokenizer: token identity does not matter for memory).
- systems: `hf_trainer` (transformers Trainer, its default fused fp32 AdamW, full logits, no checkpoints);
  instructkit's own step (train/loop.setup + train/step.train_step: the training code, without the final
  checkpoint) with `default` settings; `inbwd_chunked` (optimizer_in_backward + loss_chunk_tokens, fp32
  AdamW); `lean` (adamw_8bit, embedding moments in 8 bits too, + optimizer_in_backward + loss_chunk_tokens);
  `lean_ckpt` (lean + gradient checkpointing: what the 1.5B shape needs to stay under 14 GB, its activations
  alone being 6 GB); `lean_fp32_embedding` (lean with the embedding's moments in fp32, adamw_8bit's default;
  --ab only). No gradient clipping anywhere (in-backward clipping runs each step twice), lr 1e-5 constant.
- figures: peak RSS of the child; step time = median of the steps after the first (the first builds the
  optimizer state), in wall seconds and in CPU seconds of the child (time.process_time: on a machine shared
  with other work the CPU time is the steadier measure of the work a step does); the estimate of
  train/memory.py for the same inputs beside each instructkit run.
- grid (item 6 of the memory issue): SmolLM2 and Gemma x {default, inbwd_chunked, lean} x batch {2, 4}.
  Gemma also runs `lean_ckpt`; the Qwen2.5-1.5B shape runs `lean_ckpt` at batch 4 only, and the Trainer's and
  the default's peaks there are estimated (16 bytes a parameter is 24.7 GB: more than this 23 GB machine
  holds). The Trainer runs last: it needs the most memory on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data" / "dialogsum" / "dialogsum.dev.jsonl").resolve()
RESULT = ROOT / "benchmarks" / "results" / "memory.json"
MAX_LENGTH = 256
CHUNK = 64  # train.loss_chunk_tokens of the chunked runs
SETTINGS = {
    "default": {},
    "inbwd_chunked": {"optimizer_in_backward": True, "loss_chunk_tokens": CHUNK},
    "lean": {"optimizer": "adamw_8bit", "optimizer_in_backward": True, "loss_chunk_tokens": CHUNK,
             "embedding_optim_bits": 8},
    "lean_ckpt": {"optimizer": "adamw_8bit", "optimizer_in_backward": True, "loss_chunk_tokens": CHUNK,
                  "embedding_optim_bits": 8, "gradient_checkpointing": True},
    # lean as a user gets it: the embedding's moments in fp32 (train.embedding_optim_bits' default)
    "lean_fp32_embedding": {"optimizer": "adamw_8bit", "optimizer_in_backward": True, "loss_chunk_tokens": CHUNK},
}
QWEN_1_5B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
             "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
             "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1000000.0,
             "rms_norm_eps": 1e-6}
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma-3-270m", "qwen1.5b": None}


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


# --------------------------------------------------------------------------------------------------
# The parent: data, the run list, estimates, the JSON
# --------------------------------------------------------------------------------------------------


def prepare_tokens(model_key: str, out: Path, examples: int) -> Path:
    """Tokenize DialogSum examples with the model's tokenizer (SmolLM2's for the random Qwen shape)."""
    from instructkit.config import ModelConfig
    from instructkit.data.tokenize import TokenizeSettings, tokenize_examples
    from instructkit.models.load import load_tokenizer
    from instructkit.models.resolve import resolve_model

    name = MODELS[model_key] or MODELS["smollm2"]
    tokenizer = load_tokenizer(resolve_model(ModelConfig(name=name)).folder, False)
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    prepared = [{"prompt": f"Summarize the dialogue.\n{r['dialogue']}\nSummary:", "completion": " " + r["summary"],
                 "task": "summarization", "source_id": r["fname"]} for r in rows]
    dataset, _ = tokenize_examples(prepared, tokenizer, TokenizeSettings(max_length=MAX_LENGTH))
    kept = [i for i in range(len(dataset)) if len(dataset[i]["input_ids"]) == MAX_LENGTH][:examples]
    if len(kept) < examples:
        raise SystemExit(f"only {len(kept)} DialogSum examples reach {MAX_LENGTH} tokens; {examples} needed")
    path = out / f"{model_key}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"input_ids": dataset[i]["input_ids"], "labels": dataset[i]["labels"]}) + "\n" for i in kept)
    return path


def runs_to_do(only: list[str] | None) -> list[dict[str, Any]]:
    """The goals' runs first, then the rest of the grid, the biggest last (on a machine shared with other work)."""
    def ik(model, setting, batch=4):
        return {"system": "instructkit", "setting": setting, "model": model, "batch": batch}

    runs = [ik("gemma3", "lean"), ik("gemma3", "default"), {"system": "hf_trainer", "model": "smollm2", "batch": 4},
            ik("smollm2", "default"), ik("smollm2", "lean"), ik("gemma3", "lean_ckpt")]
    grid = ("default", "inbwd_chunked", "lean")
    runs += [ik(m, s, b) for m in ("smollm2", "gemma3") for b in (4, 2) for s in grid if ik(m, s, b) not in runs]
    runs += [{"system": "hf_trainer", "model": "gemma3", "batch": 4}, ik("qwen1.5b", "lean_ckpt")]
    return [r for r in runs if not only or r["model"] in only]


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("system", "setting", "model", "batch"))


def run_child(run: dict[str, Any], tokens: Path, steps: int, timeout: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, __file__, "--child", json.dumps(run), "--tokens", str(tokens), "--steps", str(steps)]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**run, "error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}
    return {**run, **json.loads(lines[-1]), "wall_s": round(time.time() - started, 1)}


def estimate_for(run: dict[str, Any]) -> dict[str, Any]:
    """train/memory.py's estimate for an instructkit run (same inputs), or the Trainer's (full logits)."""
    from transformers import AutoConfig

    from instructkit.config import ModelConfig
    from instructkit.models.resolve import resolve_model_config
    from instructkit.train.memory import estimate_memory

    if run["model"] == "qwen1.5b":
        shape = dict(QWEN_1_5B)
        config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    else:
        config = resolve_model_config(ModelConfig(name=MODELS[run["model"]]))
    setting = SETTINGS.get(run.get("setting", "default"), {})
    labelled = run.get("labelled_tokens_max") or run["batch"] * MAX_LENGTH // 4
    est = estimate_memory(config, batch_tokens=run["batch"] * MAX_LENGTH, seq_len=MAX_LENGTH,
                          labelled_tokens=labelled, optimizer=setting.get("optimizer", "adamw"),
                          optimizer_in_backward=setting.get("optimizer_in_backward", False),
                          loss_chunk_tokens=setting.get("loss_chunk_tokens"),
                          gradient_checkpointing=setting.get("gradient_checkpointing", False),
                          embedding_optim_bits=setting.get("embedding_optim_bits", 32),
                          logits_at_labels=run["system"] != "hf_trainer")
    return {"estimate_bytes": est.total, "logits_bytes": est.logits, "parts": est.to_dict()}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios measured side by side, and estimate / measured for every instructkit run."""
    def find(model, system, setting=None, batch=4):
        return next((r for r in results if r["model"] == model and r["system"] == system and r["batch"] == batch
                     and r.get("setting") == setting and "peak_rss_bytes" in r), None)

    ratios: dict[str, Any] = {}
    for model in ("smollm2", "gemma3"):
        trainer, default, lean = find(model, "hf_trainer"), find(model, "instructkit", "default"), \
            find(model, "instructkit", "lean")
        lean_ckpt = find(model, "instructkit", "lean_ckpt")
        if trainer and lean_ckpt:
            ratios[f"{model}_lean_ckpt_over_trainer_peak"] = round(
                lean_ckpt["peak_rss_bytes"] / trainer["peak_rss_bytes"], 3)
        if default and lean_ckpt:
            ratios[f"{model}_lean_ckpt_over_default_step_time"] = round(lean_ckpt["step_s"] / default["step_s"], 3)
        if trainer and lean:
            ratios[f"{model}_lean_over_trainer_peak"] = round(lean["peak_rss_bytes"] / trainer["peak_rss_bytes"], 3)
        if trainer and default:
            ratios[f"{model}_default_over_trainer_peak"] = round(default["peak_rss_bytes"] / trainer["peak_rss_bytes"], 3)
        if default and lean:
            ratios[f"{model}_lean_over_default_step_time"] = round(lean["step_s"] / default["step_s"], 3)
            if "step_cpu_s" in lean and "step_cpu_s" in default:
                ratios[f"{model}_lean_over_default_step_cpu_time"] = round(lean["step_cpu_s"]
                                                                          / default["step_cpu_s"], 3)
        if lean and "estimate" in lean:
            ratios[f"{model}_lean_logits_share_of_peak"] = round(lean["estimate"]["logits_bytes"]
                                                                 / lean["peak_rss_bytes"], 4)
    results = [r for r in results if "estimate" in r or r["system"] != "instructkit"]
    grid = [{"model": r["model"], "setting": r["setting"], "batch": r["batch"],
             "measured_gb": round(r["peak_rss_bytes"] / 1e9, 2),
             "estimate_gb": round(r["estimate"]["estimate_bytes"] / 1e9, 2),
             "estimate_over_measured": round(r["estimate"]["estimate_bytes"] / r["peak_rss_bytes"], 3)}
            for r in results if r["system"] == "instructkit" and "peak_rss_bytes" in r]
    return {"ratios": ratios, "estimate_vs_measured": grid,
            "worst_estimate_error": max((abs(g["estimate_over_measured"] - 1) for g in grid), default=None)}


def speed_ab(args: argparse.Namespace) -> None:
    """default and lean children alternately on the same batches: their step times side by side."""
    out = Path(args.out)
    payload = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {"runs": []}
    work = Path(tempfile.mkdtemp(prefix="bench_memory_ab_"))
    section = payload.get("speed_ab", {})
    for model in args.ab.split(","):
        tokens = prepare_tokens(model, work, 4 * args.steps)
        times: dict[str, list] = {name: [] for name in args.ab_settings.split(",")}
        for _ in range(args.repeats):
            for setting in times:
                result = run_child({"system": "instructkit", "setting": setting, "model": model, "batch": 4}, tokens,
                                   args.steps, args.timeout)
                print(f"[bench_memory] ab {model} {setting}: {result.get('step_s')} s, {result.get('step_cpu_s')} "
                      "cpu s", flush=True)
                times[setting].append({"step_s": result.get("step_s"), "step_cpu_s": result.get("step_cpu_s"),
                                       "peak_rss_bytes": result.get("peak_rss_bytes")})
        medians = {k: statistics.median(r["step_s"] for r in v) for k, v in times.items()}
        cpu = {k: statistics.median(r["step_cpu_s"] for r in v) for k, v in times.items()}
        section[model] = {"runs": times, "load_average_1min": round(os.getloadavg()[0], 2)}
        for name in times:
            if name != "default" and "default" in times:
                section[model][f"{name}_over_default_step_s"] = round(medians[name] / medians["default"], 3)
                section[model][f"{name}_over_default_step_cpu_s"] = round(cpu[name] / cpu["default"], 3)
        payload["speed_ab"] = section
        write(out, payload, args)


def parent(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.ab:
        speed_ab(args)
        return
    if args.estimate_only:
        payload = json.loads(out.read_text(encoding="utf-8"))
        for run in payload["runs"]:
            if "peak_rss_bytes" in run or run["model"] == "qwen1.5b":
                run["estimate"] = estimate_for(run)
    else:
        only = args.only.split(",") if args.only else None
        todo = runs_to_do(only)
        work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
        previous = json.loads(out.read_text(encoding="utf-8"))["runs"] if out.is_file() and args.resume else []
        results = [r for r in previous if "peak_rss_bytes" in r]
        kept = {k: v for k, v in json.loads(out.read_text(encoding="utf-8")).items()
                if k == "speed_ab"} if out.is_file() else {}
        todo = [run for run in todo if not any(same_run(run, r) for r in results)]
        tokens = {m: prepare_tokens(m, work, 4 * args.steps) for m in {r["model"] for r in todo}}
        for run in todo:
            print(f"[bench_memory] {run}", flush=True)
            result = run_child(run, tokens[run["model"]], args.steps, args.timeout)
            if result["system"] == "instructkit" and ("peak_rss_bytes" in result or result["model"] == "qwen1.5b"):
                try:
                    result["estimate"] = estimate_for(result)
                except Exception as exc:  # noqa: BLE001 - recomputed by --estimate-only
                    result["estimate_error"] = repr(exc)
            print(f"[bench_memory]   -> {({k: v for k, v in result.items() if k not in ('estimate', 'losses')})}",
                  flush=True)
            results.append(result)
            write(out, {**kept, "runs": results}, args)
        payload = {**kept, "runs": results}
    payload["qwen1.5b_trainer_and_default_estimates"] = {  # too big to measure here
        name: round(estimate_for({"model": "qwen1.5b", "system": system, "setting": "default", "batch": 4,
                                  "labelled_tokens_max": 4 * 64})["estimate_bytes"] / 1e9, 2)
        for name, system in (("hf_trainer_gb", "hf_trainer"), ("instructkit_default_gb", "instructkit"))}
    write(out, payload, args)


def write(out: Path, payload: dict[str, Any], args: argparse.Namespace) -> None:
    import torch

    payload = {k: v for k, v in payload.items() if k not in ("benchmark", "command", "settings", "summary")}
    full = {"benchmark": "peak RSS and step time of a full fine-tune: HF Trainer vs instructkit default vs lean",
            "command": "PYTHONPATH=src python benchmarks/bench_memory.py " + " ".join(sys.argv[1:]),
            "settings": {"max_length": MAX_LENGTH, "steps": args.steps, "loss_chunk_tokens": CHUNK,
                         "settings": SETTINGS, "threads": 1, "precision": "fp32", "lr": 1e-5,
                         "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores"},
            "summary": summarise(payload["runs"]), **payload}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# The child: one system, one model, `steps` steps, one JSON line
# --------------------------------------------------------------------------------------------------


def load(model_key: str):
    import torch

    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model, load_tokenizer
    from instructkit.models.resolve import resolve_model

    if model_key == "qwen1.5b":
        from transformers import AutoConfig, AutoModelForCausalLM

        shape = dict(QWEN_1_5B)
        config = AutoConfig.for_model(shape.pop("model_type"), **shape, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        return model, load_tokenizer(resolve_model(ModelConfig(name=MODELS["smollm2"])).folder, False)
    loaded = load_model(ModelConfig(name=MODELS[model_key]))
    return loaded.model, loaded.tokenizer


def child(run: dict[str, Any], tokens: Path, steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in tokens.read_text(encoding="utf-8").splitlines()]
    batch = run["batch"]
    rows = rows[: batch * steps]
    labelled = [sum(sum(1 for y in r["labels"][1:] if y != -100) for r in rows[i * batch:(i + 1) * batch])
                for i in range(steps)]
    model, tokenizer = load(run["model"])
    model.train()
    after_load = peak_rss()
    if run["system"] == "hf_trainer":
        times, cpu, losses = trainer_steps(model, tokenizer, rows, batch, steps)
    else:
        times, cpu, losses = instructkit_steps(model, tokenizer, rows, batch, steps, SETTINGS[run["setting"]])
    return {"peak_rss_bytes": peak_rss(), "peak_after_load_bytes": after_load, "step_times_s": times,
            "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0], "step_cpu_s_each": cpu,
            "step_cpu_s": statistics.median(cpu[1:]) if len(cpu) > 1 else cpu[0], "losses": losses,
            "labelled_tokens": labelled, "labelled_tokens_max": max(labelled)}


def instructkit_steps(model, tokenizer, rows, batch, steps, setting):
    import dataclasses

    from datasets import Dataset

    from instructkit.config import TrainConfig
    from instructkit.data.tokenize import TokenizeSettings
    from instructkit.train.distributed import make_accelerator
    from instructkit.train.loop import TrainData, TrainOptions, setup
    from instructkit.train.step import train_step

    cfg = TrainConfig(lr=1e-5, schedule="constant", warmup_ratio=0.0, batch_size=batch, max_steps=steps,
                      max_grad_norm=None, group_by_length=False, **setting)
    data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"], "prompt_length":
                               sum(1 for y in r["labels"] if y == -100), "index": i} for i, r in enumerate(rows)])
    options = TrainOptions(settings=TokenizeSettings(max_length=MAX_LENGTH), is_seq2seq=False,
                           show_progress=False, free_space_fn=lambda path: 10**15)
    with tempfile.TemporaryDirectory() as run_dir:
        run = setup(model, tokenizer, TrainData(data), cfg, Path(run_dir),
                    dataclasses.replace(options, accelerator=make_accelerator(cfg)))
        times, cpu, losses = [], [], []
        for step in range(steps):
            micro_batch = [list(range(step * batch, (step + 1) * batch))]  # one packed row of batch x 256
            started, cpu_started = time.perf_counter(), time.process_time()
            stats = train_step(run, run.batches([micro_batch]), step + 1)
            times.append(round(time.perf_counter() - started, 3))
            cpu.append(round(time.process_time() - cpu_started, 3))
            losses.append(stats.loss)
    return times, cpu, losses


def trainer_steps(model, tokenizer, rows, batch, steps):
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    data = Dataset.from_list([{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
                               "labels": r["labels"]} for r in rows])
    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                                 learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=0.0,
                                 save_strategy="no", report_to=[], logging_steps=1, use_cpu=True,
                                 train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                          callbacks=[Clock()])
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    times = [round(marks[i + 1][0] - marks[i][0], 3) for i in range(0, len(marks) - 1, 2)]
    cpu = [round(marks[i + 1][1] - marks[i][1], 3) for i in range(0, len(marks) - 1, 2)]
    return times, cpu, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", help="comma-separated models: smollm2, gemma3, qwen1.5b")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per child")
    parser.add_argument("--estimate-only", action="store_true", help="recompute estimates of --out's runs")
    parser.add_argument("--resume", action="store_true", help="keep --out's measured runs, do the others")
    parser.add_argument("--ab", help="comma-separated models: time the --ab-settings (batch 4) in turn, "
                        "A B A B, --repeats times, into --out's speed_ab (the step-time ratio, side by side)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ab-settings", default="default,lean",
                        help="comma-separated settings timed in turn by --ab (default, inbwd_chunked, lean, lean_ckpt)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), Path(args.tokens), args.steps)), flush=True)
    else:
        parent(args)


if __name__ == "__main__":
    main()
