"""Render templates on the planned rows of each split and write the instruction examples of a run.

    prepare(config)  ->  <run_dir>/train.jsonl, validation.jsonl, test.jsonl, stats.json

Which rows, templates, splits and mixture: plan.py. Here each planned (dataset, row, template) job is
rendered into an `Example` line; the training file is shuffled (seeded) so the datasets and templates are
interleaved.

Writing is atomic: all four files are written to temporary names and renamed only when everything
succeeded, so a failure never leaves a partial or mixed set behind (stats.json is renamed last).

No validation or test prompt is a training prompt: the source rows are split before templating and
deduplicated, but two rows can still render the same prompt (the same review re-posted under another
headline is not a duplicate under a key that holds the headline, yet it gives the same rating prompt; two
datasets of a mixture can share texts). Validation and test are rendered first; a training example whose
prompt is one of theirs (any template, any dataset) is left out (`split.prompt_leakage: drop`, counted per
template in stats.json "prompt_leakage"), so the split itself stays exactly as seeded, stratified and
grouped. stats.json "leaked_prompts" counts the validation and test examples whose prompt is in the
written training set: 0 unless `prompt_leakage: report`. Prompts compare as `split.text_match` says.
Rendering failures (an undefined field, a prompt or completion that renders empty, a completion that is
not among the answer choices) stop with an error naming file, line and template, or with
`skip_bad_rows` are skipped and counted per reason in stats.json ("examples_skipped_by_reason").
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _encode_text  # ensure_ascii=False string encoder (C)
from pathlib import Path
from typing import Any

from instructkit.config import RunConfig
from instructkit.data.chat import CHAT_METRICS
from instructkit.data.examples import Example, LineEncoder, example_line
from instructkit.data.leakage import PromptLedger
from instructkit.data.plan import DatasetPlan, mix, plan_dataset, train_jobs
from instructkit.data.sources import dataset_name
from instructkit.data.split import SPLITS
from instructkit.data.stats import prepare_stats, skipped_summary
from instructkit.errors import ConfigError, DataError, TemplateError
from instructkit.io import atomic_open, read_jsonl
from instructkit.templates.library import TemplateLibrary
from instructkit.templates.sandbox import fields_read
from instructkit.templates.template import DEFAULT_METRICS, Rendered, Template, as_written_in

log = logging.getLogger(__name__)

AS_IS_TASK = "instruction_following"
"""Task family of data that comes already in prompt/completion or chat form."""
AS_IS_VERSION = "as-is"
_WRITE_BATCH = 4096
PREPARE_VERSION = 3
"""Raised when the same config and input files give other examples (2: a completion's trailing EOS marker
written by a template is dropped; a PromptSource `|||` inside a Jinja block; 3: texts, labels, group_by
values, answer choices and the leakage guard's prompts compare up to Unicode NFC): part of `instructkit run`'s
prepare fingerprint, so an earlier run prepares again (its later steps are kept when the files come out
the same)."""
STREAM_ABOVE_BYTES = 64 << 20
"""`split.streaming: auto` prepares in bounded memory (stream_build.py) when the data files pass this."""


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _render_checked(
    template: Template, row: dict, source_id: str, plan: DatasetPlan, index: int
) -> Rendered | None:
    """Render one example; a failure names file, line, template (and columns) or is counted when skipping."""
    try:
        rendered = template.render(row, seed=source_id)
    except TemplateError as exc:
        plan.problems.bad(
            f"render error ({template.id})", f"{plan.source.where(index)}: {exc}", TemplateError
        )
        return None
    if not rendered.prompt or not rendered.completion:
        part = "instruction" if not rendered.prompt else "completion"
        source = template.instruction if part == "instruction" else template.completion
        cols = sorted(fields_read(source) & set(row)) or sorted(template.fields_read)
        plan.problems.bad(
            f"empty {part} ({template.id})",
            f"{plan.source.where(index)}: template {template.id!r} renders an empty {part} "
            f"(columns read: {', '.join(cols)})",
            DataError,
        )
        return None
    if rendered.choices is not None and rendered.completion not in rendered.choices:
        plan.problems.bad(
            f"completion not in answer choices ({template.id})",
            f"{plan.source.where(index)}: template {template.id!r}: completion {rendered.completion!r} "
            f"is not one of the answer choices {list(rendered.choices)}",
            TemplateError,
        )
        return None
    return rendered


def _as_is_example(plan: DatasetPlan, row: dict, source_id: str) -> Example:
    kind = plan.source.kind
    closed = plan.answers is not None and plan.answers.choices is not None  # data/answers.py
    default_metrics = CHAT_METRICS if kind == "chat" else DEFAULT_METRICS[AS_IS_TASK]
    # a completion spelled apart from its choice but the same text up to NFC is trained and scored as the choice
    completion = as_written_in(plan.answers.choices, row["completion"]) if closed else row["completion"]
    return Example(
        prompt=row["prompt"],
        completion=completion,
        choices=plan.answers.choices if closed else None,
        task=plan.answers.task if closed else AS_IS_TASK,
        template_id=f"{plan.name}.{'chat' if kind == 'chat' else 'as_is'}",
        source_id=source_id,
        dataset=plan.name,
        template_version=AS_IS_VERSION,
        label=completion if closed else None,
        metrics=list(plan.config.metrics or (plan.answers.metrics if closed else default_metrics)),
        held_out=plan.held_out,
        messages=row.get("messages") if kind == "chat" else None,
        tools=row.get("tools") if kind == "chat" else None,
    )


def example_text(plan: DatasetPlan, row: dict, source_id: str, t: int, templates: Sequence[Template],
                 parts: Sequence[tuple], encoder: LineEncoder, index: int) -> tuple[str, str, str] | None:
    """(JSON line, prompt, template id) of row `index` rendered by template `t` (-1: data already in
    instruction form); None when the row is bad and skipped (counted in `plan.problems`)."""
    if t < 0:
        example = _as_is_example(plan, row, source_id)
        return example_line(example), example.prompt, example.template_id
    template = templates[t]
    rendered = _render_checked(template, row, source_id, plan, index)
    if rendered is None:
        return None
    enc = _encode_text
    a, b, c, choices = parts[t]
    completion = enc(rendered.completion)
    if rendered.choices is None:
        label = choices = "null"
    else:
        label = completion
        if choices is None:
            choices = encoder.choices(rendered.choices)
    line = (f'{{"prompt": {enc(rendered.prompt)}, "completion": {completion}, "choices": {choices}'
            f"{a}{enc(source_id)}{b}{label}{c}")
    return line, rendered.prompt, template.id


def template_parts(plan: DatasetPlan, split: str, encoder: LineEncoder) -> tuple[list[Template], list[tuple]]:
    """The templates a split of `plan` renders and their pre-encoded JSON parts."""
    templates = plan.train_templates if split == "train" else plan.eval_templates
    return templates, [encoder.parts(t, plan.name, plan.held_out or t.id in plan.held_out_ids) for t in templates]


def _write_jobs(
    handle: Any,
    plans: Sequence[DatasetPlan],
    jobs: Iterable[tuple[int, int, int]],
    split: str,
    encoder: LineEncoder,
    counts: dict[str, Counter],
    ledger: PromptLedger,
) -> int:
    """Render and write (dataset, row, template index) jobs; return the number of lines (the hot loop).

    A training example whose prompt the ledger holds from validation/test is left out (`ledger.keep`), and
    an earlier assistant turn of a training conversation whose prompt it holds is marked not to learn."""
    contexts = []
    for plan in plans:
        templates, parts = template_parts(plan, split, encoder)
        contexts.append((plan, plan.source.rows, plan.source.ids, templates, parts, counts[plan.name]))
    buffer: list[str] = []
    written = 0
    for k, r, t in jobs:
        plan, rows, ids, templates, parts, count = contexts[k]
        made = example_text(plan, rows[r], ids[r], t, templates, parts, encoder, r)
        if made is None or not ledger.keep(split, made[1], plan.name, made[2]):
            continue
        turns = ledger.turn_digests(rows[r].get("messages")) if split == "train" and t < 0 else []
        buffer.append(ledger.guard_turns(made[0], turns, plan.name, made[2]))
        count[made[2]] += 1
        if len(buffer) >= _WRITE_BATCH:
            handle.write("".join(buffer))
            written += len(buffer)
            buffer.clear()
    handle.write("".join(buffer))
    return written + len(buffer)


def _eval_jobs(plans: Sequence[DatasetPlan], split: str) -> Iterator[tuple[int, int, int]]:
    """Validation/test jobs: every row of the split with every template, dataset by dataset, in row order."""
    for k, plan in enumerate(plans):
        rows = plan.split_rows(split)
        if plan.schema is None:
            yield from ((k, r, -1) for r in rows)
            continue
        n = len(plan.eval_templates)
        yield from ((k, r, t) for r in rows for t in range(n))


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    """Where `prepare` wrote its files, how many examples each split has, and the stats it wrote."""

    run_dir: Path
    files: dict[str, Path]
    counts: dict[str, int]
    stats: dict
    seconds: float = 0.0


def prepare(
    config: RunConfig, run_dir: Path | None = None, library: TemplateLibrary | None = None
) -> PrepareResult:
    """Read, deduplicate, split and render every dataset of `config`; write the run's data files.

    Writes train.jsonl, validation.jsonl, test.jsonl and stats.json into `run_dir` (default
    `config.run_dir`) atomically: on any error nothing in `run_dir` changes.

    Raises: ConfigError without datasets or with two of the same name; DataError when the train split
    ends up empty, a file cannot be read or a row is bad; TemplateError when a template fails to render
    (bad rows only unless `skip_bad_rows`).
    """
    started = time.perf_counter()
    if not config.datasets:
        raise ConfigError("no datasets configured: add a `datasets:` entry (or `path: demo`)")
    if library is None:
        library = TemplateLibrary.load(config.templates.files, include_builtin=config.templates.builtin)
    run_dir = Path(run_dir) if run_dir is not None else config.run_dir
    names = [dataset_name(d) for d in config.datasets]
    dups = sorted(n for n, k in Counter(names).items() if k > 1)
    if dups:
        raise ConfigError(f"several datasets are named {', '.join(dups)}: give each a distinct `name:`")

    if streaming_wanted(config):
        from instructkit.data.stream_build import prepare_streamed  # bounded memory, the same files

        result = prepare_streamed(config, run_dir, library, started)
        log.info("prepared %s (streaming): %s in %.1fs", run_dir, result.counts, result.seconds)
        return _summarised(result)
    plans = [plan_dataset(d, library, config) for d in config.datasets]
    planned = time.perf_counter()
    seed = config.split.seed

    jobs = {p.name: train_jobs(p, seed) for p in plans}
    jobs, mixture = mix(jobs, {p.name: p.config.weight for p in plans}, seed)
    train_order = [(k, r, t) for k, p in enumerate(plans) for r, t in jobs[p.name]]
    random.Random(f"shuffle:{seed}").shuffle(train_order)

    encoder = LineEncoder()
    ledger = PromptLedger.of(config.split)
    counts: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    written: dict[str, int] = {}
    files = {s: run_dir / f"{s}.jsonl" for s in SPLITS}
    files["stats"] = run_dir / "stats.json"
    with contextlib.ExitStack() as stack:
        stats_handle = stack.enter_context(atomic_open(files["stats"]))  # entered first: renamed last
        handles = {s: stack.enter_context(atomic_open(files[s])) for s in SPLITS}
        for split in ("validation", "test"):  # first: their prompts are what train must not repeat
            written[split] = _write_jobs(
                handles[split], plans, _eval_jobs(plans, split), split, encoder, counts[split], ledger
            )
        written["train"] = _write_jobs(
            handles["train"], plans, train_order, "train", encoder, counts["train"], ledger
        )
        if written["train"] == 0 and not all(p.held_out for p in plans):
            # Raised inside the ExitStack: no output file is written.
            also = f"; {ledger.dropped.total()} left out as validation/test prompts" if ledger.dropped else ""
            raise DataError(
                f"{run_dir}: no training examples: the split of {', '.join(p.name for p in plans)} leaves the train split "
                f"empty (too few rows for the validation/test fractions, or every template held out){also}")
        for plan in plans:  # before _stats: a note when the guard left out much of a template
            plan.notes += ledger.notes(plan.name, counts["train"][plan.name])
        stats = prepare_stats(config, run_dir, plans, counts, written, mixture)
        stats["leaked_prompts"] = ledger.leaked()
        stats["prompt_leakage"] = ledger.report(config.split.prompt_leakage)
        stats["seconds"] = {
            "read_dedup_split": round(planned - started, 3),
            "render_write": round(time.perf_counter() - planned, 3),
        }
        json.dump(stats, stats_handle, indent=2, ensure_ascii=False, default=str)
        stats_handle.write("\n")
    seconds = time.perf_counter() - started
    log.info("prepared %s: %s in %.1fs", run_dir, ", ".join(f"{s} {written[s]}" for s in SPLITS), seconds)
    return _summarised(PrepareResult(run_dir=run_dir, files=files, counts=dict(written), stats=stats, seconds=seconds))


def _summarised(result: PrepareResult) -> PrepareResult:
    """Warn, once at the end, of every dataset that left rows or examples out (`skip_bad_rows`)."""
    for line in skipped_summary(result.stats):
        log.warning(line)
    return result


def streaming_wanted(config: RunConfig) -> bool:
    """`split.streaming`: on, off, or (auto) when the datasets' files pass STREAM_ABOVE_BYTES."""
    if config.split.streaming != "auto":
        return config.split.streaming == "on"
    total = 0
    for dataset in config.datasets:
        for value in [dataset.path, *(dataset.files or {}).values(), *(dataset.parallel or {}).values()]:
            path = Path(value) if value and value != "demo" else None
            if path is not None and path.is_file():
                total += path.stat().st_size
            elif path is not None and path.is_dir() and not dataset.files:
                total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total > STREAM_ABOVE_BYTES


# --------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------


def _split_path(run_dir_or_jsonl: str | Path, split: str) -> Path:
    path = Path(run_dir_or_jsonl)
    if path.is_dir():
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
        path = path / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path}: not found (run `instructkit prepare` first)")
    return path


def sample_examples(run_dir_or_jsonl: str | Path, split: str = "train", *, per_template: int = 10_000,
                    seed: int = 0) -> tuple[list[dict], int]:
    """(a seeded sample of at most `per_template` examples of each template, the number of examples read),
    streaming: memory holds the sample, never the split.

    Templates with at most `per_template` examples are kept whole, so for such a split the sample is
    `load_examples(...)` itself (same examples, same order). Larger ones are reservoir-sampled (Vitter's
    algorithm R, one `random.Random(seed)` over the file); the sample keeps file order.
    For what needs training examples only as a pool: the few-shot demonstrations and the classification
    baselines of an evaluation. Raises as `load_examples`.
    """
    from instructkit.io import iter_jsonl

    rng = random.Random(seed)
    kept: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    seen: Counter[str] = Counter()
    total = 0
    for total, example in enumerate(iter_jsonl(_split_path(run_dir_or_jsonl, split)), start=1):
        key = str(example.get("template_id"))
        seen[key] += 1
        if seen[key] <= per_template:
            kept[key].append((total, example))
        else:
            slot = rng.randrange(seen[key])
            if slot < per_template:
                kept[key][slot] = (total, example)
    ordered = sorted((item for items in kept.values() for item in items), key=lambda item: item[0])
    return [example for _, example in ordered], total


TRAINING_POOL_PER_TEMPLATE = 10_000
"""Training examples per template an evaluation draws on (few-shot demonstrations, classification baselines)."""


def training_pool(run_dir_or_jsonl: str | Path) -> list[dict]:
    """The training examples an evaluation draws on: `sample_examples` of the train split (or of one .jsonl
    file), at most TRAINING_POOL_PER_TEMPLATE per template (all of them below that), logged when sampled."""
    pool, total = sample_examples(run_dir_or_jsonl, "train", per_template=TRAINING_POOL_PER_TEMPLATE)
    if len(pool) < total:
        log.info("few-shot pool and baselines: a seeded sample of %d of the %d training examples "
                 "(at most %d per template)", len(pool), total, TRAINING_POOL_PER_TEMPLATE)
    return pool


def load_examples(run_dir_or_jsonl: str | Path, split: str = "train") -> list[dict]:
    """The examples of `split` from a run folder (or the rows of one .jsonl file) as dicts.

    Raises: DataError for an unknown split, a missing file, or a malformed line (named by number).
    """
    return read_jsonl(_split_path(run_dir_or_jsonl, split))
