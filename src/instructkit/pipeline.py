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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructkit import ranks
from instructkit.background import BackgroundStep
from instructkit.config import RunConfig, dump_config
from instructkit.config_load import load_config
from instructkit.errors import InstructkitError
from instructkit.evaluate import SCORING_VERSION
from instructkit.io import write_json
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
from instructkit.run_steps import (
    evaluate_base,
    evaluate_into,
    load_run_model,
    read_examples,
    tokenize_settings,
    write_report,
)

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
# The run
# --------------------------------------------------------------------------------------------------


def run(config_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
        force: bool = False) -> RunSummary:
    """The whole job. Without a config: the built-in demo (SmolLM2-135M-Instruct on the demo reviews)."""
    config = load_config(config_path or DEFAULT_CONFIG, overrides)
    run_dir = config.run_dir
    from instructkit.io import run_lock
    from instructkit.train.sharding import check_processes

    check_processes(config.train)  # before any step: a launch the settings cannot run is refused at once

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
    from instructkit.data.build import PREPARE_VERSION, prepare, training_pool

    prep_fp = _digest({"datasets": cfg["datasets"], "split": cfg["split"], "templates": cfg["templates"],
                       "inputs": _input_digests(config), "version": PREPARE_VERSION})
    # Later fingerprints include the digests of the prepared files, so a re-prepare that writes the same
    # examples (e.g. after a config field was added) keeps the base evaluation and training.
    # The data an earlier run was prepared from, linked aside in case that run must be kept whole.
    prepared = None if steps.done("prepare", prep_fp) or not steps.recorded("prepare") else stash_prepared(run_dir)
    _timed(summary, steps, "prepare", prep_fp, lambda: prepare(config, run_dir))
    data_fp = _digest([_file_digest(run_dir / f"{s}.jsonl") for s in ("train", "validation", "test")])
    scoring = {k: v for k, v in cfg["eval"].items() if k != "base_beside_training"}  # where, not what
    test = read_examples(run_dir, config.eval.split)  # evaluate_examples caps it per template (eval.max_examples)
    eval_fp = evaluation_fingerprint(scoring, cfg["model"], data_fp, test)
    # Validation ranks choices as evaluation does (early stopping and the best checkpoint depend on it).
    ranking = {k: cfg["eval"][k] for k in ("choice_end", "length_normalized")}
    learned = {k: v for k, v in cfg["train"].items() if k not in NOT_LEARNED}
    train_fp = _digest({"train": learned, "model": cfg["model"], "data": data_fp, "ranking": ranking})
    # Steps that ran here from other settings or data: the earlier run is kept whole beside this folder.
    keep_if_stale(run_dir, steps, {"evaluate-base": eval_fp, "train": train_fp}, old_config, prepared)

    # 2. the base model, zero-shot and k-shot, on the evaluation split: beside training when training leaves
    #    CPU cores idle (a second process), else before it (training then reuses the loaded model).
    train_examples = training_pool(run_dir)
    base_loaded: list[Any] = []
    beside = None
    if not steps.done("evaluate-base", eval_fp) and not steps.done("train", train_fp) \
            and base_beside_training(config):
        beside = BackgroundStep("evaluate-base", evaluate_base, (config, run_dir),
                                log_file=run_dir / "eval" / "base.log")
    else:
        _timed(summary, steps, "evaluate-base", eval_fp,
               lambda: evaluate_base(config, run_dir, base_loaded, test, train_examples))

    # 3. train (resumes from the last good checkpoint when interrupted).
    model_dir = run_dir / "model"

    def train() -> None:
        # Resume only what this very configuration started; other settings or data start fresh.
        resume = ranks.share((True, steps.begin("train", train_fp)))[1]  # the other processes train too
        train_step(config, resume=resume, preloaded=base_loaded[0] if base_loaded else None)
        base_loaded.clear()

    try:
        if beside is not None:
            beside.start()
        trained = _timed(summary, steps, "train", train_fp, train)
        if beside is not None:
            _finish_beside(summary, steps, beside, eval_fp)
    except BaseException:
        if beside is not None and (seconds := beside.finished()) is not None:  # done before training stopped
            steps.mark("evaluate-base", eval_fp, seconds)
        raise
    finally:
        if beside is not None:
            beside.stop()
    if not trained:  # evaluate-tuned's fingerprint has its digest
        ranks.share((False, False))  # up to date: the other processes have nothing to train
    summary.model_dir = model_dir

    # 4. the tuned model.
    tuned_fp = _digest({"eval": eval_fp, "model": _file_digest(model_dir / "model.safetensors")
                        if (model_dir / "model.safetensors").is_file() else train_fp})
    _timed(summary, steps, "evaluate-tuned", tuned_fp,
           lambda: evaluate_into(load_run_model(config, str(model_dir)), test, config, run_dir / "eval" / "tuned",
                                 label=f"{config.model.name} (fine-tuned)"))

    # 5. compare, and put the metrics into the model card.
    report_fp = _digest({"tuned": tuned_fp, "base": eval_fp})
    _timed(summary, steps, "compare", report_fp, lambda: write_report(config, run_dir, train_examples, model_dir))
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


def base_beside_training(config: RunConfig) -> bool:
    """Whether evaluate-base runs in a second process beside training (`eval.base_beside_training`): one
    process (no launcher), no CUDA device, train.threads set with 2 x train.threads <= the CPU cores this
    process may use (unset, torch takes every core), no earlier training outputs to keep aside first
    (`_train_inputs` moves them, eval/base with them), and room for a second model: training's estimated
    peak (`estimate-memory`) + 2 x the weights + the framework's overhead <= 80% of this machine's memory."""
    from instructkit.data.store import default_processes
    from instructkit.train.memory_plan import estimate_for_run, system_memory_bytes

    threads = config.train.threads
    if not config.eval.base_beside_training or ranks.world_size() > 1 or threads is None \
            or 2 * threads > default_processes(None) \
            or outputs(config.run_dir, ["train", "evaluate-tuned", "compare"], records=False):
        return False
    import torch

    memory = system_memory_bytes()
    if torch.cuda.is_available() or memory is None:
        return False
    try:
        estimate = estimate_for_run(config)
    except InstructkitError:  # the model does not resolve: evaluating in turn says why
        return False
    return estimate.total + 2 * estimate.weights + estimate.overhead <= 0.8 * memory


def _finish_beside(summary: RunSummary, steps: Steps, beside: BackgroundStep, fingerprint: str) -> None:
    """Wait for the evaluate-base process (`BackgroundStep.wait`) and record the step as `_timed` does."""
    try:
        seconds = beside.wait()
    except KeyboardInterrupt as exc:
        raise RunInterrupted("evaluate-base", [*summary.skipped, *summary.timings], exc) from None
    summary.timings["evaluate-base"] = seconds
    steps.mark("evaluate-base", fingerprint, seconds)


def evaluation_fingerprint(scoring: dict, model: dict, data_fp: str, examples: list[dict]) -> str:
    """What an evaluation of `examples` (the evaluated split) depends on: the eval settings, the model, the
    prepared data, the scoring version and, where BLEU is scored (an example's metrics or `eval.metrics` name
    it), the MeCab tokenizers installed, on which Japanese and Korean BLEU depend."""
    from instructkit.evaluate.generation_metrics import installed_mecab

    named = [m for ex in examples for m in ex.get("metrics") or ()]
    named += [m for ms in (scoring.get("metrics") or {}).values() for m in ms]
    bleu = "bleu" in named
    return _digest({"eval": scoring, "model": model, "data": data_fp, "scoring": SCORING_VERSION,
                    **({"bleu_mecab": installed_mecab()} if bleu else {})})


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
    from instructkit.train.sharding import check_processes

    check_processes(config.train)
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
        if val_examples and config.train.eval_max_examples else None  # 0: validation loss only
    model = loaded.model
    if config.train.lora.enabled:
        model = wrap_lora(model, config.train.lora, seed=config.train.seed)  # adapters drawn from train.seed
    class_ids = train_ds.class_ids if config.train.class_balance != "none" else None  # from the token store
    result = train(model, loaded.tokenizer, TrainData(train_ds, val_ds, class_ids), config.train, run_dir,
                   TrainOptions(settings=settings, is_seq2seq=loaded.is_seq2seq, validate=validate, resume=resume,
                                show_progress=True, validate_metrics=validate.metrics if validate else None))
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
    loaded = preloaded or load_run_model(config)
    settings = tokenize_settings(config, loaded.is_seq2seq)
    val_examples = [ex for ex in read_examples(run_dir, "validation") if not ex.get("held_out")]
    cache, procs = run_dir / "cache" / "tokenized", default_processes(config.train.tokenize_processes)
    train_ds = tokenize_split(run_dir / "train.jsonl", loaded.tokenizer, settings, cache, procs,
                              show_progress=ranks.is_main())
    if not train_ds.examples:
        raise InstructkitError(f"{run_dir / 'train.jsonl'}: no training examples")
    val_ds = tokenize_split(run_dir / "validation.jsonl", loaded.tokenizer, settings, cache, procs)
    if ranks.is_main():
        write_json(run_dir / "tokenize_stats.json", train_ds.stats.to_dict())
        if note := train_ds.stats.dropped_note(settings.max_length):
            log.warning("%s", note)
    return loaded, val_examples, train_ds, val_ds


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
