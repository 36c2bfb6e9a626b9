"""The `instructkit` command line: parses arguments, calls the Python API, prints results.

    instructkit run [CONFIG.yaml] [key=value ...] [--force]     the whole job (default: built-in demo)
    instructkit templates list [--dataset D] [--task T] [--format table|json]
    instructkit templates show ID
    instructkit templates check [FILES ...] [--data FILE --schema S]
    instructkit prepare CONFIG.yaml [key=value ...]
    instructkit train CONFIG.yaml [--resume] [key=value ...]
    instructkit evaluate --model PATH_OR_NAME --data RUN_DIR_OR_JSONL [--split test]
    instructkit compare --base B --tuned T --data RUN_DIR_OR_JSONL
    instructkit generate --model PATH "prompt"
    instructkit estimate-memory CONFIG.yaml [--budget 8GB]
    instructkit export MODEL_DIR --gguf OUT.gguf [--quant f32|f16|bf16|q8_0] [--ollama] [--force]

Every user error (bad config, data, template, model path) prints one message and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from instructkit import ranks
from instructkit.cli_templates import (
    cmd_templates_check,
    cmd_templates_list,
    cmd_templates_show,
    make_console,
)
from instructkit.errors import InstructkitError

log = logging.getLogger("instructkit")


_console = make_console


def _one_separator(value: str) -> str:
    """`--delimiter`'s value, checked as datasets.N.delimiter checks it (argparse exits 2 otherwise)."""
    from instructkit.config import check_delimiter

    try:
        return check_delimiter(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, got {value!r}") from None


def _split_config_args(values: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key=value ...]` -> (config path or None, overrides)."""
    config = None
    overrides = []
    for value in values:
        if "=" in value and not Path(value).exists():
            overrides.append(value)
        elif config is None:
            config = value
        else:
            raise InstructkitError(f"unexpected argument {value!r}: give one config file, then key=value overrides")
    return config, overrides


def _load(values: list[str]):
    from instructkit.config_load import load_config

    path, overrides = _split_config_args(values)
    return load_config(path, overrides)


# --------------------------------------------------------------------------------------------------
# pipeline steps
# --------------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from instructkit.data.build import prepare
    from instructkit.io import run_lock
    from instructkit.run_folder import new_run_folder

    config = _load(args.config)
    # never rewrite the split under a run that is using it; a failed first prepare leaves no folder behind
    with new_run_folder(config.run_dir), run_lock(config.run_dir):
        result = prepare(config)
    _console().print(f"prepared {result.run_dir}: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from instructkit import pipeline
    from instructkit.run_folder import new_run_folder

    config = _load(args.config)
    ranks.start()  # under torchrun: rank 0 prepares, tokenizes and saves; the others wait for it, then read
    # a failed first attempt leaves no folder behind
    with new_run_folder(config.run_dir) if ranks.is_main() else contextlib.nullcontext():
        out = pipeline.train_step(config, resume=args.resume)
    if ranks.is_main():
        _console().print(f"model saved to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from instructkit import run_steps

    result = run_steps.evaluate_step(args.model, Path(args.data), split=args.split,
                                     out_dir=Path(args.out) if args.out else None, overrides=args.set or [])
    _console().print(f"wrote {result}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from instructkit import run_steps

    report = run_steps.compare_step(args.base, args.tuned, Path(args.data), split=args.split,
                                    out_dir=Path(args.out) if args.out else None, overrides=args.set or [])
    _console().print(f"report: {report}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from instructkit import run_steps

    for text in run_steps.generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens,
                                        chat_template=args.chat):
        print(text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from instructkit import pipeline

    path, overrides = _split_config_args(args.config)
    ranks.start()  # under torchrun: rank 0 runs every step; the others train with it (pipeline.run)
    summary = pipeline.run(path, overrides, force=args.force)
    if ranks.is_main():  # under torchrun the others only trained
        pipeline.print_summary(summary, _console())
    return 0


def _parse_bytes(text: str) -> int:
    """'8GB' -> 8e9 bytes (decimal units, as the estimate prints them; '8GiB' is binary)."""
    value = text.strip().lower().removesuffix("b")
    binary = value.endswith("i")
    value = value.removesuffix("i")
    scale = {"k": 1, "m": 2, "g": 3, "t": 4}
    try:
        if value and value[-1] in scale:
            return int(float(value[:-1]) * (1024 if binary else 1000) ** scale[value[-1]])
        return int(float(value))
    except ValueError:
        raise InstructkitError(f"--budget {text!r}: expected a size like 8GB or 7.5GiB") from None


def cmd_export(args: argparse.Namespace) -> int:
    from instructkit.models.export import export_model

    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer's per-file INFO lines are noise here
    result = export_model(args.model_dir, args.gguf, quant=args.quant, ollama=args.ollama, force=args.force)
    console = _console()
    size = f"{result.bytes / 1e6:.1f} MB"
    console.print(f"wrote {result.gguf} ({result.quant}, {size}) in {result.seconds:.1f} s", markup=False)
    if result.modelfile is not None:
        folder, name = result.modelfile.parent, result.modelfile.name
        console.print(f"wrote {result.modelfile}; create the Ollama model with:\n"
                      f"    cd {folder} && ollama create NAME -f {name}", markup=False)
    return 0


def cmd_estimate_memory(args: argparse.Namespace) -> int:
    from instructkit.train.memory_plan import (
        cheapest_fit,
        estimate_for_run,
        plan_for_budget,
        system_memory_bytes,
    )

    config = _load(args.config)
    estimate = estimate_for_run(config)
    console = _console()
    console.print(estimate.describe(), markup=False)
    budget = _parse_bytes(args.budget) if args.budget else system_memory_bytes()
    console.print(f"budget: {budget / 1e9:.1f} GB" + ("" if args.budget else " (this machine's memory)"))
    fit = cheapest_fit(estimate, budget)
    if fit is not None and fit[0]:
        console.print(f"cheapest setting that fits ({fit[1].total / 1e9:.2f} GB): {' '.join(fit[0])}", markup=False)
    elif fit is None:
        console.print("no setting of train.* fits: also see below", markup=False)
    for line in plan_for_budget(estimate, budget):
        console.print(f"- {line}", markup=False)
    return 0


# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructkit", description="Instruction fine-tuning of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="prepare -> evaluate base -> train -> evaluate tuned -> compare -> save")
    run.add_argument("config", nargs="*", help="CONFIG.yaml (default: the built-in demo) and key=value overrides")
    run.add_argument("--force", action="store_true", help="redo every step, replacing the earlier run in the "
                     "folder (without it, changed settings keep the earlier run beside, as <name>.previous-N)")
    run.set_defaults(func=cmd_run)

    templates = sub.add_parser("templates", help="browse and validate prompt templates")
    tsub = templates.add_subparsers(dest="templates_command", required=True)
    tl = tsub.add_parser("list", help="list templates")
    tl.add_argument("--dataset")
    tl.add_argument("--task")
    tl.add_argument("--format", choices=["table", "json"], default="table")
    tl.add_argument("--templates", nargs="*", default=[], help="extra collection files")
    tl.set_defaults(func=cmd_templates_list, light=True)
    ts = tsub.add_parser("show", help="show one template and a rendered example")
    ts.add_argument("id")
    ts.add_argument("--templates", nargs="*", default=[], help="extra collection files")
    ts.set_defaults(func=cmd_templates_show, light=True)
    tc = tsub.add_parser("check", help="render every template on sample rows; exit 0 only if all pass")
    tc.add_argument("files", nargs="*", help="collection files (default: the built-in catalog)")
    tc.add_argument("--data", help="a data file whose rows to render the templates on")
    tc.add_argument("--schema", help="the schema the --data rows follow")
    tc.add_argument("--column", action="append", help="field=column mapping for --data (repeatable)")
    tc.add_argument("--limit", type=int, default=None, help="check at most this many rows of --data")
    tc.add_argument("--format", default="auto", help="format of --data (csv, tsv, json, jsonl, parquet, hf_disk, "
                    "parallel); default: from the file name")
    tc.add_argument("--delimiter", default=None, type=_one_separator, help="field separator of a CSV/TSV --data "
                    "file, one character (as datasets.N.delimiter), e.g. ';'")
    tc.set_defaults(func=cmd_templates_check, light=True)

    prepare = sub.add_parser("prepare", help="turn data files into train/validation/test instruction data")
    prepare.add_argument("config", nargs="+", help="CONFIG.yaml and key=value overrides")
    prepare.set_defaults(func=cmd_prepare, light=True)  # reads and writes data: no torch, transformers, datasets

    train = sub.add_parser("train", help="fine-tune (prepares the data first if needed)")
    train.add_argument("config", nargs="+", help="CONFIG.yaml and key=value overrides")
    train.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a model on prepared data")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True, help="run directory or JSONL file")
    evaluate.add_argument("--split", help="default: the run's eval.split (test)")
    evaluate.add_argument("--out", help="output folder (default: beside the data)")
    evaluate.add_argument("--set", nargs="*", help="config overrides, e.g. eval.max_examples=100")
    evaluate.set_defaults(func=cmd_evaluate)

    compare = sub.add_parser("compare", help="base vs tuned report (JSON, Markdown, HTML)")
    compare.add_argument("--base", required=True)
    compare.add_argument("--tuned", required=True)
    compare.add_argument("--data", required=True, help="run directory or JSONL file")
    compare.add_argument("--split", help="default: the run's eval.split (test)")
    compare.add_argument("--out", help="output folder (default: the run directory)")
    compare.add_argument("--set", nargs="*", help="config overrides")
    compare.set_defaults(func=cmd_compare)

    generate = sub.add_parser("generate", help="try a model on a prompt")
    generate.add_argument("--model", required=True)
    generate.add_argument("prompt", nargs="+")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                          help="wrap the prompt in the chat template (default: as the saved instructkit model was "
                          "trained; off for other models)")
    generate.set_defaults(func=cmd_generate)

    memory = sub.add_parser("estimate-memory", help="predict the peak memory of a planned run")
    memory.add_argument("config", nargs="+", help="CONFIG.yaml and key=value overrides")
    memory.add_argument("--budget", help="memory budget, e.g. 8GB: print the cheapest setting that fits (as configured, "
                        "then adding chunked loss, optimizer in backward, 8-bit AdamW, gradient checkpointing, a "
                        "smaller micro-batch) and what each change saves")
    memory.set_defaults(func=cmd_estimate_memory)

    export = sub.add_parser("export", help="write a saved model as a GGUF file (llama.cpp, Ollama)")
    export.add_argument("model_dir", help="the model folder a run saved (e.g. runs/demo/model)")
    export.add_argument("--gguf", required=True, help="output .gguf file")
    export.add_argument("--quant", default="q8_0", help="f32, f16, bf16 or q8_0 (default: q8_0)")
    export.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the GGUF")
    export.add_argument("--force", action="store_true", help="replace existing output files")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    configure_logging(args.verbose)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "light", False):  # `templates ...`, `prepare` and --help never import torch or datasets
        _quiet_library_progress_bars()
    try:
        return args.func(args)
    except InstructkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"interrupted: {_interrupted(args, exc)}", file=sys.stderr)
        return 130


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser`'s arguments, with a command's list positional (config and overrides, a prompt's words, files)
    allowed on both sides of its options: `train CONFIG --resume key=value` as its usage says. argparse alone
    stops the list at the first option and rejects the rest. Exits 2 (argparse's error) on anything else
    unknown."""
    args, extra = parser.parse_known_args(argv)
    listed = next((n for n in ("config", "prompt", "files") if isinstance(getattr(args, n, None), list)), None)
    if extra and (listed is None or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(args, listed).extend(extra)
    return args


def _interrupted(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    """What Ctrl-C left and what running the command again will do."""
    if hasattr(exc, "continue_hint"):  # train/interrupt.TrainingInterrupted, from `instructkit train`
        resumable = exc.checkpoint is not None and not args.resume
        how = "run the same command with --resume" if resumable else "run the same command again"
        return f"{exc}; {exc.continue_hint(how)}"
    if str(exc):  # pipeline.RunInterrupted says which step stopped and what is kept
        return str(exc)
    if args.command == "run":
        return "run the same command again: finished steps are kept, the interrupted one is redone"
    return "stopped; outputs are written whole or not at all, so nothing half-written was left"


def _quiet_library_progress_bars() -> None:
    """instructkit shows its own progress; the per-shard bars of datasets/transformers are noise."""
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def configure_logging(verbose: bool) -> None:
    """Root logging: INFO (DEBUG with --verbose) on rank 0. Under a launcher the other processes log WARNING
    and above only, each line prefixed [rank N]: their INFO lines repeated rank 0's once per process
    (transformers' Trainer: log_level_replica "warning"; accelerate's get_logger: main process only)."""
    level = logging.DEBUG if verbose else logging.INFO
    if ranks.is_main():
        logging.basicConfig(level=level, handlers=[_log_handler()])
    else:
        logging.basicConfig(level=max(level, logging.WARNING), handlers=[_log_handler(f"[rank {ranks.rank()}] ")])


def _log_handler(prefix: str = "") -> logging.Handler:
    """Rich log lines on a terminal; elsewhere (nohup, CI, a log file) one plain line per message, with the
    time, so progress lines stay whole and greppable. `prefix` starts every message."""
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, console=_console_err())
        handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s " + prefix + "%(message)s", "%H:%M:%S"))
    return handler


def _console_err():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


if __name__ == "__main__":
    sys.exit(main())
