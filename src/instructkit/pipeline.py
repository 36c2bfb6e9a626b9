"""`instructkit run`: prepare -> evaluate base -> train -> evaluate tuned -> compare -> save, in one run folder.

    runs/<name>/
      config.yaml                        the resolved configuration
      train.jsonl validation.jsonl test.jsonl stats.json            prepare
      eval/base/ eval/base-k1/ ...       eval.json + predictions.jsonl of the base model (zero- and few-shot)
      checkpoints/ metrics.jsonl         training (resumable)
      model/                             the instruct model (safetensors, tokenizer, model card)
      eval/tuned/                        the tuned model's evaluation
      report.json report.md report.html  base vs tuned, with baselines and plots
      steps/<step>.json                  what each finished step was computed from

Each step records a fingerprint of its inputs (the config sections it reads and the files it consumes)
and is skipped when that fingerprint is unchanged, so an interrupted run continues where it stopped.
Training itself resumes from its last good checkpoint. When a step that already ran would run again from
other settings or data, the earlier run is first kept whole beside the folder (runs/<name>.previous-<n>,
run_folder.py), so a finished run is never destroyed and the folder never mixes two runs; `--force`
replaces the earlier run and redoes everything. Ctrl-C ends with RunInterrupted, which says what is kept
and what the same command does next.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructkit import ranks
from instructkit.config import RunConfig, dump_config
from instructkit.config_load import load_config
from instructkit.errors import InstructkitError
from instructkit.io import read_jsonl, write_json
from instructkit.run_folder import (
    Steps,
    clear_run,
    keep_if_stale,
    keep_previous_run,
    new_run_folder,
    outputs,
    stash_prepared,
)
from instructkit.run_folder import digest as _digest
from instructkit.run_folder import file_digest as _file_digest

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
NOT_LEARNED = ("save_every", "save_every_minutes", "keep_checkpoints", "tensorboard")
"""Train settings that change how training is saved or logged, never the model: not in its fingerprint."""


@dataclass
class RunSummary:
    run_dir: Path
    model_dir: Path | None = None
    report: Path | None = None
    headline: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Step bookkeeping
# --------------------------------------------------------------------------------------------------


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `instructkit run` during step `step`; `done`: the steps finished or up to date;
    `cause`: the KeyboardInterrupt (a TrainingInterrupted from training says where training stopped)."""

    def __init__(self, step: str, done: list[str], cause: BaseException):
        self.step, self.done, self.cause = step, done, cause
        kept = f"; the finished steps ({', '.join(done)}) are kept" if done else ""
        if hasattr(cause, "continue_hint"):  # train/interrupt.TrainingInterrupted
            message = f"{cause}{kept}; {cause.continue_hint('run the same command again')}"
        else:
            message = (f"stopped during {step} (its outputs are written whole or not at all){kept}; run the same "
                       f"command again to redo {step} and go on")
        super().__init__(message)


def _timed(summary: RunSummary, steps: Steps, name: str, fingerprint: str, fn: Callable[[], Any]) -> bool:
    """Run `fn` unless the step is up to date; return True when it ran."""
    if steps.done(name, fingerprint):
        log.info("step %s is up to date: skipped", name)
        summary.skipped.append(name)
        return False
    log.info("step %s ...", name)
    start = time.perf_counter()
    try:
        fn()
    except KeyboardInterrupt as exc:
        raise RunInterrupted(name, [*summary.skipped, *summary.timings], exc) from None
    seconds = time.perf_counter() - start
    summary.timings[name] = round(seconds, 1)
    steps.mark(name, fingerprint, seconds)
    return True


# --------------------------------------------------------------------------------------------------
# Pieces shared by the commands
# --------------------------------------------------------------------------------------------------


def tokenize_settings(config: RunConfig, is_seq2seq: bool):
    from instructkit.data.tokenize import TokenizeSettings

    return TokenizeSettings.from_model_config(config.model, is_seq2seq, loss_on=config.train.loss_on)


def _load_model(config: RunConfig, name: str | None = None):
    from instructkit.models.load import load_model, set_threads

    set_threads(config.train.threads)
    model_cfg = config.model if name is None else config.model.model_copy(update={"name": name})
    return load_model(model_cfg)


def _examples(run_dir: Path, split: str) -> list[dict]:
    from instructkit.data.build import load_examples

    return load_examples(run_dir, split)


def _evaluate_into(loaded, examples: list[dict], config: RunConfig, out_dir: Path, *, k_shot: int = 0,
                   pool: list[dict] | None = None, label: str) -> None:
    from instructkit.evaluate.evaluator import evaluate_examples

    settings = tokenize_settings(config, loaded.is_seq2seq)
    result = evaluate_examples(loaded.model, loaded.tokenizer, examples, settings, is_seq2seq=loaded.is_seq2seq,
                               cfg=config.eval, few_shot_pool=pool, k_shot=k_shot, seed=config.split.seed)
    payload = result.to_json()
    payload["model"] = label
    write_json(out_dir / "eval.json", payload)
    from instructkit.io import write_jsonl

    write_jsonl(out_dir / "predictions.jsonl", result.predictions)


def _few_shot_ks(config: RunConfig, examples: list[dict], pool: list[dict]) -> list[int]:
    """The k of `eval.few_shot` to run: none when no evaluated template has an example in the pool (e.g. only
    held-out templates are evaluated); the evaluator leaves out the templates the pool lacks."""
    if not config.eval.few_shot or not pool:
        return []
    pooled = {d.get("template_id") for d in pool}
    if not any(ex.get("template_id") in pooled for ex in examples):
        log.warning("no few-shot baseline: none of the evaluated templates has an example in the train split")
        return []
    return list(config.eval.few_shot)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(config_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
        force: bool = False) -> RunSummary:
    """The whole job. Without a config: the built-in demo (SmolLM2-135M-Instruct on the demo reviews)."""
    config = load_config(config_path or DEFAULT_CONFIG, overrides)
    run_dir = config.run_dir
    from instructkit.io import run_lock

    if not ranks.is_main():  # under a launcher: rank 0 runs the steps, the others only train with it
        go, resume = ranks.share(None)
        if go:
            train_step(config, resume=resume)
        ranks.barrier()
        return RunSummary(run_dir=run_dir)
    # A first attempt that fails before any step finished (a bad data path) leaves no folder behind.
    with new_run_folder(run_dir), run_lock(run_dir):  # a second run on the same folder refuses at once
        return _run_locked(config, run_dir, force)


def _run_locked(config: RunConfig, run_dir: Path, force: bool) -> RunSummary:
    old_config = (run_dir / "config.json").read_bytes() if (run_dir / "config.json").is_file() else None
    if force and (gone := clear_run(run_dir)):  # --force replaces the earlier run
        log.warning("--force: the earlier run in %s is replaced (%d outputs deleted)", run_dir, len(gone))
    write_json(run_dir / "config.json", dump_config(config))
    summary = RunSummary(run_dir=run_dir)
    steps = Steps(run_dir, force)
    cfg = dump_config(config)

    # 1. prepare: source rows -> split -> templated examples.
    from instructkit.data.build import prepare, training_pool

    prep_fp = _digest({"datasets": cfg["datasets"], "split": cfg["split"], "templates": cfg["templates"],
                       "inputs": _input_digests(config)})
    # Later fingerprints include the digests of the prepared files, so a re-prepare that writes the same
    # examples (e.g. after a config field was added) keeps the base evaluation and training.
    # The data an earlier run was prepared from, linked aside in case that run must be kept whole.
    prepared = None if steps.done("prepare", prep_fp) or not steps.recorded("prepare") else stash_prepared(run_dir)
    _timed(summary, steps, "prepare", prep_fp, lambda: prepare(config, run_dir))
    data_fp = _digest([_file_digest(run_dir / f"{s}.jsonl") for s in ("train", "validation", "test")])
    eval_fp = _digest({"eval": cfg["eval"], "model": cfg["model"], "data": data_fp})
    # Validation ranks choices as evaluation does (early stopping and the best checkpoint depend on it).
    ranking = {k: cfg["eval"][k] for k in ("choice_end", "length_normalized")}
    learned = {k: v for k, v in cfg["train"].items() if k not in NOT_LEARNED}
    train_fp = _digest({"train": learned, "model": cfg["model"], "data": data_fp, "ranking": ranking})
    # Steps that ran here from other settings or data: the earlier run is kept whole beside this folder.
    keep_if_stale(run_dir, steps, {"evaluate-base": eval_fp, "train": train_fp}, old_config, prepared)

    # 2. the base model, zero-shot and k-shot, on the evaluation split.
    test = _examples(run_dir, config.eval.split)  # evaluate_examples caps it per template (eval.max_examples)
    train_examples = training_pool(run_dir)
    base_loaded: list[Any] = []

    def evaluate_base() -> None:
        loaded = _load_model(config)
        base_loaded.append(loaded)
        _evaluate_into(loaded, test, config, run_dir / "eval" / "base", label=f"{config.model.name} (base)")
        ks = _few_shot_ks(config, test, train_examples)
        for k in config.eval.few_shot if not ks else []:  # no stale k-shot result from earlier data
            shutil.rmtree(run_dir / "eval" / f"base-k{k}", ignore_errors=True)
        for k in ks:
            _evaluate_into(loaded, test, config, run_dir / "eval" / f"base-k{k}", k_shot=k, pool=train_examples,
                           label=f"{config.model.name} (base, {k}-shot)")

    _timed(summary, steps, "evaluate-base", eval_fp, evaluate_base)

    # 3. train (resumes from the last good checkpoint when interrupted).
    model_dir = run_dir / "model"

    def train() -> None:
        # Resume only what this very configuration started; other settings or data start fresh.
        resume = ranks.share((True, steps.begin("train", train_fp)))[1]  # the other processes train too
        train_step(config, resume=resume, preloaded=base_loaded[0] if base_loaded else None)
        base_loaded.clear()

    if not _timed(summary, steps, "train", train_fp, train):  # evaluate-tuned's fingerprint has its digest
        ranks.share((False, False))  # up to date: the other processes have nothing to train
    summary.model_dir = model_dir

    # 4. the tuned model.
    tuned_fp = _digest({"eval": eval_fp, "model": _file_digest(model_dir / "model.safetensors")
                        if (model_dir / "model.safetensors").is_file() else train_fp})
    _timed(summary, steps, "evaluate-tuned", tuned_fp,
           lambda: _evaluate_into(_load_model(config, str(model_dir)), test, config, run_dir / "eval" / "tuned",
                                  label=f"{config.model.name} (fine-tuned)"))

    # 5. compare, and put the metrics into the model card.
    report_fp = _digest({"tuned": tuned_fp, "base": eval_fp})
    _timed(summary, steps, "compare", report_fp, lambda: _compare(config, run_dir, train_examples, model_dir))
    if config.export.gguf:  # 6. GGUF (and Ollama Modelfile) of the tuned model, when asked
        from instructkit.models.export import export_run_model

        _timed(summary, steps, "export", _digest({"export": cfg["export"], "model": tuned_fp}),
               lambda: export_run_model(model_dir, run_dir / "export", config.name, config.export))
    summary.report = run_dir / "report.html"
    report_json = run_dir / "report.json"
    if report_json.is_file():
        summary.headline = json.loads(report_json.read_text()).get("headline", [])
    write_json(run_dir / "summary.json", {"timings": summary.timings, "skipped": summary.skipped,
                                          "headline": summary.headline})
    ranks.barrier()  # the other processes waited here
    return summary


def _input_digests(config: RunConfig) -> dict[str, str]:
    out = {}
    for entry in config.datasets:
        paths = [entry.path] if entry.path and entry.path != "demo" else []
        paths += list((entry.files or {}).values()) + list((entry.parallel or {}).values())
        for p in paths:
            path = Path(p)
            if path.is_file():
                stat = path.stat()
                out[str(path)] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return out


def _compare(config: RunConfig, run_dir: Path, train_examples: list[dict], model_dir: Path) -> None:
    from instructkit.evaluate.compare import model_card_rows
    from instructkit.evaluate.report import build_report
    from instructkit.models.card import update_model_card_metrics

    def load(name: str) -> tuple[dict, list[dict]]:
        folder = run_dir / "eval" / name
        return json.loads((folder / "eval.json").read_text()), read_jsonl(folder / "predictions.jsonl")

    base, base_preds = load("base")
    tuned, tuned_preds = load("tuned")
    few_shot = {k: load(f"base-k{k}") for k in config.eval.few_shot if (run_dir / "eval" / f"base-k{k}").is_dir()}
    metrics_log = run_dir / "metrics.jsonl"
    build_report(base=base, tuned=tuned, base_predictions=base_preds, tuned_predictions=tuned_preds,
                 train_examples=train_examples if config.eval.baselines else None, few_shot=few_shot,
                 metrics_log=metrics_log if metrics_log.is_file() else None, out_dir=run_dir,
                 title=f"{config.name}: {config.model.name} base vs fine-tuned",
                 n_resamples=config.eval.bootstrap_resamples, seed=config.split.seed)
    if (model_dir / "README.md").is_file():
        update_model_card_metrics(model_dir, model_card_rows(json.loads((run_dir / "report.json").read_text())))


# --------------------------------------------------------------------------------------------------
# Single steps (also used by the CLI commands)
# --------------------------------------------------------------------------------------------------


def train_step(config: RunConfig, resume: bool = False, preloaded: Any = None) -> Path:
    """Prepare if needed, tokenize, train, save the instruct model to <run_dir>/model."""
    from instructkit.evaluate.evaluator import make_validation_fn
    from instructkit.models.card import data_sources
    from instructkit.models.lora import wrap_lora
    from instructkit.models.save import save_instruct_model
    from instructkit.train.loop import TrainData, TrainOptions, train

    run_dir = config.run_dir
    # Rank 0 (alone without a launcher) keeps an earlier model aside, prepares, fills the download / GGUF
    # and tokenize caches; the other processes then read what it wrote (instructkit/ranks.py).
    with ranks.main_first():
        loaded, val_examples, train_ds, val_ds = _train_inputs(config, resume, preloaded)
    settings = tokenize_settings(config, loaded.is_seq2seq)
    validate = make_validation_fn(loaded.tokenizer, val_examples, settings, is_seq2seq=loaded.is_seq2seq,
                                  max_examples=config.train.eval_max_examples, seed=config.split.seed,
                                  batch_size=config.eval.batch_size,
                                  max_new_tokens_by_task=config.eval.max_new_tokens or None,
                                  choice_end=config.eval.choice_end,
                                  length_normalized=config.eval.length_normalized) \
        if val_examples else None
    model = loaded.model
    if config.train.lora.enabled:
        model = wrap_lora(model, config.train.lora, seed=config.train.seed)  # adapters drawn from train.seed
    class_ids = train_ds.class_ids if config.train.class_balance != "none" else None  # from the token store
    result = train(model, loaded.tokenizer, TrainData(train_ds, val_ds, class_ids), config.train, run_dir,
                   TrainOptions(settings=settings, is_seq2seq=loaded.is_seq2seq, validate=validate, resume=resume,
                                show_progress=True))
    card = {**getattr(loaded, "provenance", {}), "data_sources": data_sources(config.datasets),
            "seed": config.train.seed, "run": config.name}
    final = getattr(result, "model", None)
    ranks.main_only(save_instruct_model, model if final is None else final, loaded.tokenizer, run_dir / "model", card=card,
                    train_config=dump_config(config), merge_lora=config.train.lora.merge)  # fsdp: gathered
    return run_dir / "model"


def _train_inputs(config: RunConfig, resume: bool, preloaded: Any) -> tuple:
    """(loaded model, validation examples, the train and validation token stores) for `train_step`.

    The splits are tokenized once per run into memory-mapped arrays (data/store.py) and read from there:
    the training examples are never loaded whole. Held-out examples are left out of both stores."""
    from instructkit.data.build import prepare
    from instructkit.data.store import default_processes, tokenize_split

    run_dir, later = config.run_dir, ["train", "evaluate-tuned", "compare"]
    if ranks.is_main() and not resume and outputs(run_dir, later, records=False):  # an earlier model: kept
        config_file = run_dir / "config.json"
        keep_previous_run(run_dir, later, config_file.read_bytes() if config_file.is_file() else None,
                          keep_started=True)
    if not (run_dir / "train.jsonl").is_file():
        prepare(config, run_dir)
    loaded = preloaded or _load_model(config)
    settings = tokenize_settings(config, loaded.is_seq2seq)
    val_examples = [ex for ex in _examples(run_dir, "validation") if not ex.get("held_out")]
    cache, procs = run_dir / "cache" / "tokenized", default_processes(config.train.tokenize_processes)
    train_ds = tokenize_split(run_dir / "train.jsonl", loaded.tokenizer, settings, cache, procs,
                              show_progress=ranks.is_main())
    if not train_ds.examples:
        raise InstructkitError(f"{run_dir / 'train.jsonl'}: no training examples")
    val_ds = tokenize_split(run_dir / "validation.jsonl", loaded.tokenizer, settings, cache, procs)
    if ranks.is_main():
        write_json(run_dir / "tokenize_stats.json", train_ds.stats.to_dict())
    return loaded, val_examples, train_ds, val_ds


def evaluate_step(model: str, data: Path, split: str = "test", out_dir: Path | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """`instructkit evaluate`: eval.json + predictions.jsonl for one model."""
    from instructkit.evaluate.evaluator import evaluate_run
    from instructkit.models.load import set_threads

    config = load_config(None, list(overrides) + [f"model.name={model}"])
    set_threads(config.train.threads)
    out = out_dir or ((data if data.is_dir() else data.parent) / "eval" / Path(model).name)
    evaluate_run(model, data, split, out, config.eval, config.model, seed=config.split.seed)
    return out / "eval.json"


def _read_eval_data(data: Path, split: str) -> list[dict]:
    if not data.exists():
        raise InstructkitError(f"{data}: no such run directory or JSONL file")
    from instructkit.data.build import load_examples

    return load_examples(data, split)


def compare_step(base: str, tuned: str, data: Path, split: str = "test", out_dir: Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """`instructkit compare`: evaluate both models (k-shot too) and write the report."""
    config = load_config(None, list(overrides))
    run_dir = out_dir or (data if data.is_dir() else data.parent)
    examples = _read_eval_data(data, split)
    from instructkit.data.build import training_pool

    train_examples = training_pool(data) if data.is_dir() and (data / "train.jsonl").is_file() else []
    from instructkit.models.resolve import resolve_model_config

    for name in (base, tuned):  # a wrong --tuned fails now, not after the base evaluation
        resolve_model_config(config.model.model_copy(update={"name": name}))
    loaded = _load_model(config, base)
    _evaluate_into(loaded, examples, config, run_dir / "eval" / "base", label=f"{base} (base)")
    for k in _few_shot_ks(config, examples, train_examples):
        _evaluate_into(loaded, examples, config, run_dir / "eval" / f"base-k{k}", k_shot=k, pool=train_examples,
                       label=f"{base} (base, {k}-shot)")
    del loaded
    _evaluate_into(_load_model(config, tuned), examples, config, run_dir / "eval" / "tuned", label=tuned)
    _compare(config, run_dir, train_examples, Path(tuned))
    return run_dir / "report.html"


def generate_text(model: str, prompts: list[str], max_new_tokens: int = 64, chat_template: bool = False) -> list[str]:
    from instructkit.evaluate.generate import generate

    config = load_config(None, [f"model.name={model}", f"model.chat_template={str(chat_template).lower()}"])
    loaded = _load_model(config)
    settings = tokenize_settings(config, loaded.is_seq2seq)
    return generate(loaded.model, loaded.tokenizer, [" ".join(prompts)], settings, is_seq2seq=loaded.is_seq2seq,
                    max_new_tokens=max_new_tokens)


def print_summary(summary: RunSummary, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{summary.run_dir.name}: base vs fine-tuned")
    for column in ("task", "metric", "base", "tuned", "delta [95% CI]"):
        table.add_column(column)
    for row in summary.headline:
        ci = f"{row.get('delta', 0):+.3f} [{row.get('low', 0):+.3f}, {row.get('high', 0):+.3f}]"
        table.add_row(str(row.get("task")), str(row.get("metric")), f"{row.get('base', float('nan')):.3f}",
                      f"{row.get('tuned', float('nan')):.3f}", ci + (" *" if row.get("significant") else ""))
    console.print(table)
    console.print(f"model:   {summary.model_dir}")
    console.print(f"report:  {summary.report}")
    console.print(f"logs:    {summary.run_dir / 'metrics.jsonl'}")
    if summary.timings:
        console.print("time:    " + ", ".join(f"{k} {v:.0f}s" for k, v in summary.timings.items()))
    if summary.skipped:
        console.print("up to date (skipped): " + ", ".join(summary.skipped))
