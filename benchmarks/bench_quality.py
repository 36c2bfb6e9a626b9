"""Rating recipes that transfer: Fine Food in-domain and Amazon Fashion transfer, several seeds.

Trains SmolLM2-135M-Instruct on the Amazon Fine Food rating data (the setup of
examples/amazon_rating_baseline.yaml and ../shared/docs/BASELINES.md) with several recipes and seeds, and
evaluates every model on the Fine Food test split AND on every deduplicated Amazon Fashion row (a held-out
dataset through the same template, `held_out: true`: all its rows go to test). Rank classification over
"1".."5"; figures per dataset: accuracy, macro-F1 and the paired bootstrap interval of the gain over the base
model (the same examples, 1,000 resamples).

Recipes (`--list`):
  trainer             plain transformers Trainer as in BASELINES.md: fused AdamW lr 1e-4, batch 8, 3 epochs,
                      completion-only labels, DataCollatorForSeq2Seq padding, fp32, last weights
  baseline            examples/amazon_rating_baseline.yaml as shipped
  no_class_weighting  baseline with train.class_balance=none
  lr_1e-4             baseline with train.lr=1e-4
  epochs_3            baseline with train.epochs=3 and no early stopping (best validation weights kept)
  lean                baseline with the memory-lean settings: 8-bit AdamW (every matrix, the embedding
                      too), optimizer step in backward, chunked loss (64 tokens), no clipping
  adamw_8bit          baseline with 8-bit AdamW (every matrix) and the chunked loss only: the ordinary step,
                      gradients clipped as in the baseline (beside `lean`, it tells 8-bit states from lost
                      clipping)
  adamw_8bit_fp32_embedding  adamw_8bit with the embedding's moments in fp32 (train.embedding_optim_bits=32,
                      the default since; beside `adamw_8bit`, it tells the embedding's share of the loss)
  lean_fp32_embedding lean with the embedding's moments in fp32 (train.embedding_optim_bits=32, the default)
  lean_clipped        lean_fp32_embedding with the gradient clipping kept (the step in backward clips by
                      running forward and backward twice): the memory-lean settings as a user gets them

Every (recipe, seed) cell is saved to the JSON as soon as it ends and skipped on the next start (`--force`
redoes it), so the grid (CPU hours) can run in pieces; `--resume` continues an interrupted cell from its
latest checkpoint (every 10 minutes of training, in both kinds; its time = the interrupted run's training
time to that step + the rest):
  python benchmarks/bench_quality.py                                   # every recipe, seeds 0 1 2
  python benchmarks/bench_quality.py --recipes baseline,lean --seeds 0
The work folder keeps the prepared data, the base evaluation and each cell's run (delete it when done).
Each cell's and the base model's predictions (dataset, source row, reference, prediction) are also kept in
benchmarks/results/quality_predictions/, so the paired gains can be recomputed when the work folder is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EXAMPLE = ROOT / "examples" / "amazon_rating_baseline.yaml"
PREDICTIONS = ROOT / "benchmarks" / "results" / "quality_predictions"
MODEL = "smollm2-135m-instruct"
EIGHT_BIT = ["train.optimizer=adamw_8bit", "train.embedding_optim_bits=8"]  # every matrix's moments in 8 bits
LEAN = [*EIGHT_BIT, "train.optimizer_in_backward=true", "train.loss_chunk_tokens=64", "train.max_grad_norm=null"]
RECIPES: dict[str, tuple[str, list[str]]] = {
    "trainer": ("hf", []),
    "baseline": ("instructkit", []),
    "no_class_weighting": ("instructkit", ["train.class_balance=none"]),
    "lr_1e-4": ("instructkit", ["train.lr=1e-4"]),
    "epochs_3": ("instructkit", ["train.epochs=3", "train.early_stopping=null"]),
    "lean": ("instructkit", LEAN),
    "adamw_8bit": ("instructkit", [*EIGHT_BIT, "train.loss_chunk_tokens=64"]),
    "adamw_8bit_fp32_embedding": ("instructkit", ["train.optimizer=adamw_8bit", "train.embedding_optim_bits=32",
                                                  "train.loss_chunk_tokens=64"]),
    "lean_fp32_embedding": ("instructkit", ["train.optimizer=adamw_8bit", "train.embedding_optim_bits=32",
                                            *LEAN[2:]]),
    "lean_clipped": ("instructkit", ["train.optimizer=adamw_8bit", "train.embedding_optim_bits=32",
                                     "train.optimizer_in_backward=true", "train.loss_chunk_tokens=64"]),
}
DATASETS = ("amazon_fine_food", "amazon_fashion")
METRICS = ("accuracy", "macro_f1")
STARS = ["1", "2", "3", "4", "5"]


def bench_config(work: Path) -> Path:
    """The example config with absolute paths plus Amazon Fashion as a held-out dataset (same template)."""
    import yaml

    config = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    config["datasets"][0]["path"] = str(DATA / "amazon_fine_food" / "reviews.csv")
    config["datasets"].append({
        "path": str(DATA / "amazon_fashion" / "reviews.jsonl"), "name": "amazon_fashion",
        "schema": "amazon_fine_food", "templates": ["amazon_fine_food.predict_rating"],
        "columns": {"Text": "reviewText", "Score": "overall", "Summary": "summary", "ProductId": "asin"},
        "held_out": True, "skip_bad_rows": True})  # 16 rows have no reviewText
    config["eval"] = {"split": "test", "few_shot": []}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def instructkit(*args: str, cwd: Path, log: Path) -> float:
    """Run the CLI, its output appended to `log`; seconds of wall time. Raises CalledProcessError."""
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        subprocess.run([sys.executable, "-m", "instructkit", *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# The Trainer recipe (child process)
# --------------------------------------------------------------------------------------------------


SAVE_EVERY_SECONDS = 600.0  # the Trainer cell's checkpoints, as instructkit's train.save_every_minutes: 10


def trainer_checkpoint(out: Path) -> Path | None:
    """The Trainer cell's newest complete checkpoint (one whose `elapsed.json` was written last), or None."""
    done = [c for c in (out / "trainer").glob("checkpoint-*") if (c / "elapsed.json").is_file()]
    return max(done, key=lambda c: int(c.name.split("-")[1]), default=None)


def train_hf(data: Path, out: Path, seed: int, threads: int, resume: bool = False) -> dict:
    """BASELINES.md's Trainer run on instructkit's tokenization of the same train split; saves `out`.

    A checkpoint (Trainer's own: weights, optimizer, scheduler, RNG states) every SAVE_EVERY_SECONDS of
    training, with the training seconds so far in its `elapsed.json`; `resume` continues from the newest
    (Trainer skips the batches already seen), and `train_seconds` is then the sum of both parts."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from instructkit.config import ModelConfig
    from instructkit.data.build import load_examples
    from instructkit.data.tokenize import TokenizeSettings, tokenize_examples
    from instructkit.models.load import load_model

    torch.set_num_threads(threads)
    model_cfg = ModelConfig(name=MODEL, max_length=256)
    loaded = load_model(model_cfg)
    tokenized, _ = tokenize_examples(load_examples(data, "train"), loaded.tokenizer,
                                     TokenizeSettings.from_model_config(model_cfg, False))
    rows = Dataset.from_dict({"input_ids": tokenized["input_ids"], "labels": tokenized["labels"],
                              "attention_mask": [[1] * len(x) for x in tokenized["input_ids"]]})
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=8, num_train_epochs=3, learning_rate=1e-4,
        optim="adamw_torch_fused", seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, logging_steps=20, disable_tqdm=True, remove_unused_columns=False,
        save_total_limit=1, save_only_model=False)
    checkpoint = trainer_checkpoint(out) if resume else None
    before = json.loads((checkpoint / "elapsed.json").read_text(encoding="utf-8"))["train_seconds"] \
        if checkpoint else 0.0
    start = time.perf_counter()

    class EveryTenMinutes(TrainerCallback):
        """Asks for a checkpoint when SAVE_EVERY_SECONDS passed since the last one, then records in it the
        training seconds so far (after Trainer wrote it: its presence marks the checkpoint complete)."""

        last = start

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.last >= SAVE_EVERY_SECONDS and state.global_step < state.max_steps:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.last = time.perf_counter()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / "elapsed.json").write_text(json.dumps(
                {"step": state.global_step, "train_seconds": before + self.last - start}), encoding="utf-8")

    collator = DataCollatorForSeq2Seq(loaded.tokenizer, model=None, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=loaded.model, args=args, train_dataset=rows, data_collator=collator,
                      callbacks=[EveryTenMinutes()])
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = before + time.perf_counter() - start
    loaded.model.save_pretrained(out / "model", safe_serialization=True)
    loaded.tokenizer.save_pretrained(out / "model")
    shutil.rmtree(out / "trainer", ignore_errors=True)  # its checkpoint (1.6 GB): the cell is complete
    resumed = {"resumed_from_step": int(checkpoint.name.split("-")[1]), "train_wall_seconds_before_resume":
               round(before, 1)} if checkpoint else {}
    return {"train_seconds": round(seconds, 1), "steps": trainer.state.global_step, **resumed}


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def by_dataset(predictions: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for p in predictions:
        groups.setdefault(p["dataset"], []).append(p)
    return groups


def keep_predictions(folder: Path, name: str) -> None:
    """Copy an evaluation's predictions, four fields a row, to PREDICTIONS/`name`.jsonl."""
    from instructkit.io import read_jsonl, write_jsonl

    rows = sorted(read_jsonl(folder / "predictions.jsonl"), key=lambda p: (p["dataset"], p["source_id"]))
    write_jsonl(PREDICTIONS / f"{name}.jsonl", ({k: p[k] for k in ("dataset", "source_id", "reference",
                                                                     "prediction")} for p in rows))


def predictions(name: str) -> list[dict] | None:
    """The kept predictions of a cell (`recipe-sSEED`) or of `base`; None when there are none."""
    from instructkit.io import read_jsonl

    path = PREDICTIONS / f"{name}.jsonl"
    return list(read_jsonl(path)) if path.is_file() else None


def figures(tuned: list[dict], base: list[dict] | None) -> dict[str, dict]:
    """Per dataset: n, each metric of the tuned model and, when the base model's predictions are given, the
    paired bootstrap gain over it (same examples, 1,000 resamples)."""
    from instructkit.evaluate.bootstrap import paired_bootstrap_diff
    from instructkit.evaluate.metric_registry import get_metric, macro_f1_classes, macro_f1_metric

    out = {}
    tuned_groups = by_dataset(tuned)
    base_groups = by_dataset(base) if base is not None else None
    for dataset in DATASETS:
        t = tuned_groups[dataset]
        refs = [p["reference"] for p in t]
        specs = {"accuracy": get_metric("accuracy"), "macro_f1": macro_f1_metric(macro_f1_classes(refs, STARS))}
        row: dict[str, Any] = {"n": len(t)}
        for metric, spec in specs.items():
            row[metric] = round(float(spec.fn([p["prediction"] for p in t], refs)), 4)
        if base_groups is not None:
            b = base_groups[dataset]
            if [p["source_id"] for p in b] != [p["source_id"] for p in t]:
                raise SystemExit(f"{dataset}: base and tuned predictions are not on the same examples")
            for metric, spec in specs.items():
                gain = paired_bootstrap_diff(spec, [p["prediction"] for p in b], [p["prediction"] for p in t],
                                             refs)
                row[f"{metric}_gain_over_base"] = {k: round(float(gain[k]), 4) for k in ("delta", "low", "high")}
        out[dataset] = row
    return out


def versus(cells: dict[str, dict], reference: str) -> dict[str, dict]:
    """Per recipe other than `reference`: the paired bootstrap difference (recipe minus `reference`, same
    examples, 1,000 resamples) of each metric per dataset at every seed both have kept predictions for, and
    `pooled`: those seeds' predictions stacked (resamples the examples; the seeds are held fixed, so it is
    not a between-seed interval)."""
    from instructkit.evaluate.bootstrap import paired_bootstrap_diff
    from instructkit.evaluate.metric_registry import get_metric, macro_f1_classes, macro_f1_metric

    out: dict[str, dict] = {}
    for recipe in RECIPES:
        seeds = sorted(c["seed"] for c in cells.values() if c["recipe"] == recipe
                       and predictions(f"{recipe}-s{c['seed']}") and predictions(f"{reference}-s{c['seed']}"))
        if recipe == reference or not seeds:
            continue
        pairs = {seed: (by_dataset(predictions(f"{reference}-s{seed}")), by_dataset(predictions(f"{recipe}-s{seed}")))
                 for seed in seeds}
        row: dict[str, Any] = {"seeds": seeds}
        for dataset in DATASETS:
            gold = [p["reference"] for p in pairs[seeds[0]][0][dataset]]
            specs = {"accuracy": get_metric("accuracy"), "macro_f1": macro_f1_metric(macro_f1_classes(gold, STARS))}
            stacked: dict[str, list] = {"ref": [], "new": [], "gold": []}
            per: dict[str, dict] = {m: {} for m in specs}
            for seed, (ref, new) in pairs.items():
                a, b = ref[dataset], new[dataset]
                if [p["source_id"] for p in a] != [p["source_id"] for p in b]:
                    raise SystemExit(f"{dataset}: {reference} and {recipe} s{seed} are not on the same examples")
                stacked["ref"] += [p["prediction"] for p in a]
                stacked["new"] += [p["prediction"] for p in b]
                stacked["gold"] += [p["reference"] for p in a]
                for metric, spec in specs.items():
                    diff = paired_bootstrap_diff(spec, [p["prediction"] for p in a], [p["prediction"] for p in b],
                                                 [p["reference"] for p in a])
                    per[metric][f"s{seed}"] = {k: round(float(diff[k]), 4) for k in ("delta", "low", "high")}
            for metric, spec in specs.items():
                if len(seeds) > 1:
                    diff = paired_bootstrap_diff(spec, stacked["ref"], stacked["new"], stacked["gold"])
                    per[metric]["pooled"] = {k: round(float(diff[k]), 4) for k in ("delta", "low", "high")}
            row[dataset] = per
        out[f"{recipe} - {reference}"] = row
    return out


def summarize(cells: dict[str, dict]) -> dict[str, dict]:
    """Per recipe: seeds, mean and sd of each metric per dataset, mean and least training seconds, and the
    training time over the Trainer recipe's quietest cell (mean over seeds, and quietest over quietest)."""
    summary: dict[str, dict] = {}
    for recipe in RECIPES:
        runs = [c for key, c in sorted(cells.items()) if key.split("/")[0] == recipe]
        if not runs:
            continue
        row: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for dataset in DATASETS:
            for metric in METRICS:
                values = [r["figures"][dataset][metric] for r in runs]
                row[f"{dataset}.{metric}"] = {"mean": round(statistics.fmean(values), 4),
                                              "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None}
        row["train_wall_seconds_mean"] = round(statistics.fmean(r["train_wall_seconds"] for r in runs), 1)
        row["train_wall_seconds_min"] = round(min(r["train_wall_seconds"] for r in runs), 1)
        summary[recipe] = row
    if "trainer" in summary:
        # Cells ran on a shared machine, some beside other work, which only ever adds time. The Trainer's
        # reference is its quietest cell (the least contended: every Trainer seed does the same 264 steps);
        # a recipe is charged its mean over seeds, contended cells included, so the ratio errs against it.
        reference = summary["trainer"]["train_wall_seconds_min"]
        for recipe, row in summary.items():
            row["train_time_over_trainer"] = round(row["train_wall_seconds_mean"] / reference, 3)
            row["quietest_train_time_over_trainer"] = round(row["train_wall_seconds_min"] / reference, 3)
    return summary


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------


_PROGRESS = re.compile(r"train: (\d+)/\d+ .*; elapsed ((?:\d+h)?(?:\d+m)?\d+s)")


def logged_train_seconds(log: Path, step: int) -> float:
    """Training seconds an interrupted run's progress lines (`train: 147/264 ...; elapsed 1h24m46s`) in
    `log` give at the last line at or before `step`. Raises SystemExit when none does."""
    seconds = None
    for match in _PROGRESS.finditer(log.read_text(encoding="utf-8")):
        if int(match.group(1)) <= step:
            h, m, s = (re.search(rf"(\d+){u}", match.group(2)) for u in "hms")
            seconds = sum(int(x.group(1)) * k for x, k in ((h, 3600), (m, 60), (s, 1)) if x)
    if seconds is None:
        raise SystemExit(f"{log}: no progress line at or before step {step}")
    return float(seconds)


def run_cell(recipe: str, seed: int, work: Path, config: Path, threads: int, resume: bool = False) -> dict:
    kind, overrides = RECIPES[recipe]
    name = f"{recipe}-s{seed}"
    run_dir = work / "runs" / name
    log = work / f"{name}.log"
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*")) if resume and kind != "hf" else []
    before: dict[str, Any] = {}
    if checkpoints:
        step = int(checkpoints[-1].name.split("-")[1])
        before = {"resumed_from_step": step, "train_wall_seconds_before_resume": logged_train_seconds(log, step)}
    if kind == "hf":
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child-trainer", str(run_dir), "--seeds", str(seed),
                        "--threads", str(threads), "--work", str(work), *(["--resume"] if resume else [])],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        trained = json.loads((run_dir / "trainer_result.json").read_text(encoding="utf-8"))
        wall = time.perf_counter() - start + trained.get("train_wall_seconds_before_resume", 0.0)
    else:
        wall = instructkit("train", str(config), *(["--resume"] if before else []), f"name={name}",
                           f"train.seed={seed}", f"train.threads={threads}", *overrides, cwd=work, log=log)
        wall += before.get("train_wall_seconds_before_resume", 0.0)
        result = json.loads((run_dir / "train_result.json").read_text(encoding="utf-8"))
        trained = {k: result.get(k) for k in ("train_seconds", "steps", "epochs", "stopped_early", "best_step",
                                              "best_metric", "best_value")}
    instructkit("evaluate", "--model", str(run_dir / "model"), "--data", str(work / "runs" / "data"),
                "--split", "test", "--out", str(run_dir / "eval-test"), "--set", f"train.threads={threads}",
                cwd=work, log=log)
    keep_predictions(run_dir / "eval-test", name)
    return {"recipe": recipe, "seed": seed, "overrides": overrides, "train_wall_seconds": round(wall, 1), **trained,
            **before}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names (see --list)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (the split keeps seed 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "instructkit-bench" / "quality",
                   help="folder for the prepared data, the base evaluation and the runs")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    p.add_argument("--force", action="store_true", help="redo cells already in --out")
    p.add_argument("--report", action="store_true", help="only recompute the JSON from the kept predictions")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted cell from its latest checkpoint")
    p.add_argument("--no-base", action="store_true", help="skip the base model's evaluation (no gains yet)")
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    p.add_argument("--child-trainer", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list:
        for name, (kind, overrides) in RECIPES.items():
            print(f"{name:20} {kind:12} {' '.join(overrides)}")
        return 0
    if args.child_trainer:
        result = train_hf(args.work / "runs" / "data", args.child_trainer, int(args.seeds), args.threads,
                          args.resume)
        (args.child_trainer / "trainer_result.json").write_text(json.dumps(result), encoding="utf-8")
        return 0
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    if not (DATA / "amazon_fine_food" / "reviews.csv").is_file() or not (DATA / "amazon_fashion").is_dir():
        raise SystemExit(f"skipped: the Fine Food and Amazon Fashion data are not in {DATA}")
    from instructkit.io import write_json

    args.work.mkdir(parents=True, exist_ok=True)
    config = bench_config(args.work)
    log = args.work / "data.log"
    instructkit("prepare", str(config), "name=data", cwd=args.work, log=log)
    saved = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    cells: dict[str, dict] = saved.get("cells", {})

    def save() -> None:
        """Figures of every cell whose predictions are kept (gains once the base model's are there too)."""
        base = predictions("base")
        for cell in cells.values():
            tuned = predictions(f"{cell['recipe']}-s{cell['seed']}")
            if tuned is not None:
                cell["figures"] = figures(tuned, base)
        write_json(args.out, {
            "benchmark": __doc__.split("\n")[0], "model": MODEL, "threads": args.threads,
            "base": {d: {m: v for m, v in row.items() if m in ("n", *METRICS)}
                     for d, row in figures(base, None).items()} if base is not None else None,
            "recipes": {r: " ".join(o) or kind for r, (kind, o) in RECIPES.items()},
            "summary": summarize(cells),
            "paired": {**versus(cells, "baseline"), **versus(cells, "trainer")},
            "cells": dict(sorted(cells.items()))})

    for seed in [int(s) for s in args.seeds.split(",") if s] if not args.report else []:
        for recipe in recipes:
            key = f"{recipe}/s{seed}"
            if key in cells and not args.force:
                continue
            print(f"{time.strftime('%H:%M:%S')} {key} ...", flush=True)
            cells[key] = {**run_cell(recipe, seed, args.work, config, args.threads, args.resume),
                          "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
            save()
            print(f"{time.strftime('%H:%M:%S')} {key}: {json.dumps(cells[key]['figures'])}", flush=True)
    if not args.no_base and predictions("base") is None:  # after the cells: the tuned figures come
        # first; the gains over the base model need this one evaluation of it
        instructkit("evaluate", "--model", MODEL, "--data", str(args.work / "runs" / "data"), "--split", "test",
                    "--out", str(args.work / "base"), "--set", f"train.threads={args.threads}", cwd=args.work,
                    log=log)
        keep_predictions(args.work / "base", "base")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
