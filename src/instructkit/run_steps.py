"""The bodies of `instructkit run`'s steps (pipeline.py orders them) and of the single-step commands
`instructkit evaluate`, `compare` and `generate`: load a run's model, evaluate it into eval/<name>/, write
the report. `evaluate_base` is a module-level function so that it can also run in a second process beside
training (instructkit/background.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from instructkit.config import RunConfig
from instructkit.config_load import config_from_data, load_config
from instructkit.errors import InstructkitError
from instructkit.io import read_jsonl, write_json

log = logging.getLogger(__name__)


def tokenize_settings(config: RunConfig, is_seq2seq: bool):
    from instructkit.data.tokenize import TokenizeSettings

    return TokenizeSettings.from_model_config(config.model, is_seq2seq, loss_on=config.train.loss_on)


def load_run_model(config: RunConfig, name: str | None = None):
    from instructkit.models.load import load_model, set_threads

    set_threads(config.train.threads)
    model_cfg = config.model if name is None else config.model.model_copy(update={"name": name})
    return load_model(model_cfg)


def read_examples(run_dir: Path, split: str) -> list[dict]:
    from instructkit.data.build import load_examples

    return load_examples(run_dir, split)


def evaluate_into(loaded, examples: list[dict], config: RunConfig, out_dir: Path, *, k_shot: int = 0,
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


def few_shot_ks(config: RunConfig, examples: list[dict], pool: list[dict]) -> list[int]:
    """The k of `eval.few_shot` to run: none when no evaluated template has an example in the pool (e.g. only
    held-out templates are evaluated); the evaluator leaves out the templates the pool lacks."""
    if not config.eval.few_shot or not pool:
        return []
    pooled = {d.get("template_id") for d in pool}
    if not any(ex.get("template_id") in pooled for ex in examples):
        log.warning("no few-shot baseline: none of the evaluated templates has an example in the train split")
        return []
    return list(config.eval.few_shot)


def write_report(config: RunConfig, run_dir: Path, train_examples: list[dict], model_dir: Path) -> None:
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


def evaluate_step(model: str, data: Path, split: str | None = None, out_dir: Path | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """`instructkit evaluate`: eval.json + predictions.jsonl for one model (`split` None: eval.split)."""
    from instructkit.evaluate.evaluator import evaluate_run
    from instructkit.models.load import set_threads

    config = data_config(data, [*overrides, f"model.name={model}"])
    set_threads(config.train.threads)
    out = out_dir or ((data if data.is_dir() else data.parent) / "eval" / Path(model).name)
    evaluate_run(model, data, split or config.eval.split, out, config.eval, config.model, seed=config.split.seed)
    return out / "eval.json"


def data_config(data: Path, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """The settings to evaluate `data` with, `overrides` on top: a run folder's own (the prompt length, chat
    template and evaluation settings its model was trained and scored with) from its config.json
    (`instructkit run`), else the config `instructkit prepare` recorded in its stats.json; the defaults for
    a JSONL file. Raises ConfigError naming the file when the saved config no longer validates."""
    saved, stats = data / "config.json", data / "stats.json"
    if data.is_dir() and not saved.is_file() and stats.is_file():
        recorded = json.loads(stats.read_text()).get("config")
        if isinstance(recorded, dict):
            return config_from_data(recorded, list(overrides), source=f"{stats} (its config)")
    return load_config(saved if data.is_dir() and saved.is_file() else None, list(overrides))


def read_eval_data(data: Path, split: str) -> list[dict]:
    if not data.exists():
        raise InstructkitError(f"{data}: no such run directory or JSONL file")
    from instructkit.data.build import load_examples

    return load_examples(data, split)


def compare_step(base: str, tuned: str, data: Path, split: str | None = None, out_dir: Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """`instructkit compare`: evaluate both models (k-shot too) and write the report (`split` None:
    eval.split)."""
    config = data_config(data, overrides)
    run_dir = out_dir or (data if data.is_dir() else data.parent)
    examples = read_eval_data(data, split or config.eval.split)
    from instructkit.data.build import training_pool

    train_examples = training_pool(data) if data.is_dir() and (data / "train.jsonl").is_file() else []
    from instructkit.models.resolve import resolve_model_config

    for name in (base, tuned):  # a wrong --tuned fails now, not after the base evaluation
        resolve_model_config(config.model.model_copy(update={"name": name}))
    loaded = load_run_model(config, base)
    evaluate_into(loaded, examples, config, run_dir / "eval" / "base", label=f"{base} (base)")
    for k in few_shot_ks(config, examples, train_examples):
        evaluate_into(loaded, examples, config, run_dir / "eval" / f"base-k{k}", k_shot=k, pool=train_examples,
                       label=f"{base} (base, {k}-shot)")
    del loaded
    evaluate_into(load_run_model(config, tuned), examples, config, run_dir / "eval" / "tuned", label=tuned)
    write_report(config, run_dir, train_examples, Path(tuned))
    return run_dir / "report.html"


def generate_text(model: str, prompts: list[str], max_new_tokens: int = 64,
                  chat_template: bool | None = None) -> list[str]:
    """The model's continuation of the prompt words joined by spaces. `chat_template` None: as the saved
    instructkit model was trained (its instructkit_config.json: chat template and system prompt), else off."""
    from instructkit.evaluate.generate import generate
    from instructkit.models.export import saved_record

    trained = saved_record(Path(model)).get("train_config", {}).get("model", {}) if Path(model).is_dir() else {}
    overrides = [f"model.name={model}"]
    if chat_template is None:
        chat_template = bool(trained.get("chat_template"))
        if chat_template:
            log.info("prompt wrapped in the chat template, as %s was trained (--no-chat: the plain prompt)", model)
            if trained.get("system_prompt") is not None:
                overrides.append(f"model.system_prompt={json.dumps(trained['system_prompt'])}")
    config = load_config(None, [*overrides, f"model.chat_template={str(chat_template).lower()}"])
    loaded = load_run_model(config)
    settings = tokenize_settings(config, loaded.is_seq2seq)
    return generate(loaded.model, loaded.tokenizer, [" ".join(prompts)], settings, is_seq2seq=loaded.is_seq2seq,
                    max_new_tokens=max_new_tokens)


def evaluate_base(config: RunConfig, run_dir: Path, keep: list | None = None, test: list[dict] | None = None,
                  pool: list[dict] | None = None) -> None:
    """The run's evaluate-base step: the base model zero-shot (eval/base/) and k-shot (eval/base-k<k>/) on
    the evaluation split (`test`, read from `run_dir` when not given), the few-shot pool from the train split
    (`pool`, likewise); an earlier k-shot result that no longer applies is removed. `keep`: when given, the
    loaded model is appended (training reuses it)."""
    from instructkit.data.build import training_pool

    test = read_examples(run_dir, config.eval.split) if test is None else test  # capped per template later
    pool = training_pool(run_dir) if pool is None else pool
    loaded = load_run_model(config)
    if keep is not None:
        keep.append(loaded)
    evaluate_into(loaded, test, config, run_dir / "eval" / "base", label=f"{config.model.name} (base)")
    ks = few_shot_ks(config, test, pool)
    for k in config.eval.few_shot if not ks else []:  # no stale k-shot result from earlier data
        shutil.rmtree(run_dir / "eval" / f"base-k{k}", ignore_errors=True)
    for k in ks:
        evaluate_into(loaded, test, config, run_dir / "eval" / f"base-k{k}", k_shot=k, pool=pool,
                      label=f"{config.model.name} (base, {k}-shot)")
