"""Apply templates to split source rows and write the instruction examples of a run.

    prepare(config)  ->  <run_dir>/train.jsonl, validation.jsonl, test.jsonl, stats.json

Steps, per dataset: read and check rows (sources.py) -> deduplicate -> cap at `max_rows` (a seeded
sample of at most that many rows from each file, so a dataset's own test file is not sampled away with
train) -> split the SOURCE ROWS (split.py) -> render templates on the rows of each split. A source row
therefore lands in one split whatever the number of templates; all its examples carry its `source_id`.

Templates per row: every chosen template, or `templates_per_row: k` of them sampled per training row
(seeded by the split seed and the dataset name). Validation and test rows get every chosen template, so
per-template scores are measured on the same rows.

Held out: templates in `held_out_templates` are rendered only on validation and test rows; a dataset
with `held_out: true` has no training rows at all (its rows go to validation and test). Their examples
carry `"held_out": true` so evaluation can report them separately (generalisation to unseen prompts or
unseen datasets).

Mixtures (several datasets): `weight` is each dataset's share of the TRAINING examples. The training set
keeps the number of examples the datasets give together; a dataset whose share is smaller than what it
has is subsampled (seeded, without replacement), one whose share is larger is repeated: every example
`target // have` times plus a seeded random `target % have` of them. Weights 1, 1 therefore mean half
and half; for examples-proportional mixing set each weight to the dataset's size, and cap a huge
dataset with `max_rows` (T5's examples-proportional mixing with a cap). With one dataset the weight does
nothing. Validation and test are never resampled. The training file is shuffled (seeded) so the
datasets and templates are interleaved.

Writing is atomic: all four files are written to temporary names and renamed only when everything
succeeded, so a failure never leaves a partial or mixed set behind (stats.json is renamed last).
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
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _encode_text  # ensure_ascii=False string encoder (C)
from pathlib import Path
from typing import Any

from instructkit.config import DatasetConfig, RunConfig, dump_config
from instructkit.data.sources import DEMO_SCHEMA, Problems, Source, dataset_name, json_problem, load_source
from instructkit.data.split import (
    SPLITS,
    DedupResult,
    SplitResult,
    deduplicate,
    largest_remainder,
    split_rows,
)
from instructkit.errors import ConfigError, DataError, TemplateError
from instructkit.io import atomic_open
from instructkit.templates.library import TemplateLibrary
from instructkit.templates.template import (
    DEFAULT_METRICS,
    Rendered,
    Schema,
    Template,
    fields_read,
    label_key,
)

log = logging.getLogger(__name__)

AS_IS_TASK = "instruction_following"
"""Task family of data that comes already in prompt/completion or chat form."""
AS_IS_VERSION = "as-is"
_WRITE_BATCH = 4096


# --------------------------------------------------------------------------------------------------
# The example record
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Example:
    """One instruction example: a line of train/validation/test.jsonl."""

    prompt: str
    completion: str
    choices: list[str] | None
    """The rendered answer choices for classification-like templates (rank classification), else None."""
    task: str
    template_id: str
    source_id: str
    """Stable id of the source row ("<dataset>:<index>" or "<dataset>:<split>:<index>")."""
    dataset: str
    template_version: str
    label: str | None = None
    """The completion when the template has answer choices, else None."""
    metrics: list[str] = field(default_factory=list)
    held_out: bool = False
    """Held-out template or dataset (validation/test only); written only when true."""
    messages: list[dict] | None = None
    """Chat turns before the completion (chat data only); written only when present."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "completion": self.completion,
            "choices": self.choices,
            "task": self.task,
            "template_id": self.template_id,
            "source_id": self.source_id,
            "dataset": self.dataset,
            "template_version": self.template_version,
            "label": self.label,
            "metrics": self.metrics,
        }
        if self.held_out:
            out["held_out"] = True
        if self.messages is not None:
            out["messages"] = self.messages
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        return cls(**{k: data.get(k) for k in cls.__slots__ if k in data})  # type: ignore[attr-defined]

    @classmethod
    def from_rendered(
        cls, rendered: Rendered, template: Template, source_id: str, dataset: str, held_out: bool = False
    ) -> Example:
        choices = list(rendered.choices) if rendered.choices is not None else None
        return cls(
            prompt=rendered.prompt,
            completion=rendered.completion,
            choices=choices,
            task=template.task,
            template_id=template.id,
            source_id=source_id,
            dataset=dataset,
            template_version=template.version,
            label=rendered.completion if choices is not None else None,
            metrics=list(template.effective_metrics),
            held_out=held_out,
        )


class _LineEncoder:
    """JSON lines for rendered examples, identical to `json.dumps(Example.to_dict(), ensure_ascii=False)`.

    Everything that depends only on the template (task, id, version, metrics, static choices) is encoded
    once per template; per example only prompt, completion and source id are encoded.
    """

    def __init__(self) -> None:
        self._parts: dict[tuple[str, str, bool], tuple[str, str, str, str | None]] = {}
        self._choices: dict[tuple[str, ...], str] = {}

    def parts(self, template: Template, dataset: str, held_out: bool) -> tuple[str, str, str, str | None]:
        key = (template.id, dataset, held_out)
        found = self._parts.get(key)
        if found is None:
            enc = _encode_text
            a = f', "task": {enc(template.task)}, "template_id": {enc(template.id)}, "source_id": '
            b = f', "dataset": {enc(dataset)}, "template_version": {enc(template.version)}, "label": '
            metrics = json.dumps(list(template.effective_metrics), ensure_ascii=False)
            c = f', "metrics": {metrics}' + (', "held_out": true' if held_out else "") + "}\n"
            static = None
            if isinstance(template.answer_choices, tuple):
                static = json.dumps(list(template.answer_choices), ensure_ascii=False)
            elif template.answer_choices is None:
                static = "null"
            found = self._parts[key] = (a, b, c, static)
        return found

    def choices(self, choices: tuple[str, ...]) -> str:
        found = self._choices.get(choices)
        if found is None:
            found = self._choices[choices] = json.dumps(list(choices), ensure_ascii=False)
        return found


def example_line(example: Example) -> str:
    """The JSONL line of an example (general path: chat messages, ready-made data)."""
    return json.dumps(example.to_dict(), ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------------
# Planning: which rows, which templates, which split
# --------------------------------------------------------------------------------------------------


@dataclass
class DatasetPlan:
    """One dataset after reading, deduplication, capping and splitting."""

    config: DatasetConfig
    name: str
    schema: Schema | None
    source: Source
    train_templates: list[Template]
    eval_templates: list[Template]
    held_out_ids: set[str]
    dedup: DedupResult
    split: SplitResult
    rows: list[int]
    """Indices into source.rows of the rows used (after dedup and cap); `split.assignment` is parallel."""
    rows_capped: int = 0
    problems: Problems = field(default_factory=lambda: Problems(False))
    notes: list[str] = field(default_factory=list)

    @property
    def held_out(self) -> bool:
        return self.config.held_out

    def split_rows(self, split: str) -> list[int]:
        return [r for r, s in zip(self.rows, self.split.assignment) if s == split]


def select_templates(
    dataset: DatasetConfig, library: TemplateLibrary
) -> tuple[Schema | None, list[Template], list[Template]]:
    """The dataset's schema, its chosen templates and its held-out templates."""
    schema_name = dataset.schema_name
    ids = None if dataset.templates == "all" else list(dataset.templates)
    if schema_name is None and dataset.path == "demo" and not dataset.files:
        schema_name = DEMO_SCHEMA
    if schema_name is None and ids:
        owners = {library.get(i).dataset for i in ids}
        if len(owners) != 1:
            raise ConfigError(
                f"dataset {dataset_name(dataset)!r}: templates of several schemas {sorted(owners)}; "
                "set `schema:`"
            )
        schema_name = owners.pop()
    if schema_name is None:
        if dataset.held_out_templates:
            raise ConfigError(f"dataset {dataset_name(dataset)!r}: held_out_templates needs a `schema:`")
        return None, [], []
    schema = library.schema(schema_name)

    def of_schema(template_id: str) -> Template:
        template = library.get(template_id)
        if template.dataset != schema_name:
            raise TemplateError(
                f"dataset {dataset_name(dataset)!r}: template {template_id!r} is for schema "
                f"{template.dataset!r}, "
                f"not {schema_name!r}"
            )
        return template

    if ids is None:
        chosen = library.select(dataset=schema_name)
        if not chosen:
            raise TemplateError(f"schema {schema_name!r} has no templates; list some with `templates:`")
    else:
        chosen = [of_schema(i) for i in dict.fromkeys(ids)]
    held = [of_schema(i) for i in dict.fromkeys(dataset.held_out_templates)]
    if not chosen and not held:
        raise ConfigError(f"dataset {dataset_name(dataset)!r}: `templates:` selects no template")
    return schema, chosen, held


def plan_dataset(dataset: DatasetConfig, library: TemplateLibrary, config: RunConfig) -> DatasetPlan:
    """Read, deduplicate, cap and split one dataset."""
    split_cfg = config.split
    name = dataset_name(dataset)
    schema, chosen, held = select_templates(dataset, library)
    held_ids = {t.id for t in held}
    train_templates = [t for t in chosen if t.id not in held_ids]
    eval_templates = chosen + [t for t in held if t not in chosen]
    group_by = dataset.group_by or split_cfg.group_by
    required = list(dataset.dedup_key or []) + ([group_by] if group_by else [])
    source = load_source(
        dataset,
        schema,
        templates=eval_templates,
        required=required,
        name=name,
        schemas=library.schemas.values(),
    )
    notes = list(source.notes)
    if dataset.dedup_key:
        key = list(dataset.dedup_key)
    elif schema is None:
        key = ["messages", "completion"] if source.kind == "chat" else ["prompt", "completion"]
    else:
        reads: set[str] = set()
        for t in eval_templates:
            reads |= t.fields_read
        key = sorted(reads & set(schema.fields)) if schema.fields else sorted(reads)
    label_field = source.label_field
    dedup = deduplicate(source.rows, key, label_field, source.given)
    rows, capped = cap_rows(dedup.keep, source.given, dataset.max_rows, f"cap:{split_cfg.seed}:{name}")
    all_rows = source.rows
    labels = None
    if label_field is not None and schema is not None:
        names = {label_key(k): v for k, v in (schema.label_map or {}).items()}
        labels = []
        for r in rows:
            value = label_key(all_rows[r][label_field])
            labels.append(names.get(value, value))
    groups = [all_rows[r].get(group_by) for r in rows] if group_by else None
    given = [source.given[r] for r in rows] if source.given is not None else None
    result = split_rows(
        len(rows),
        validation=split_cfg.validation,
        test=split_cfg.test,
        seed=split_cfg.seed,
        labels=labels,
        groups=groups,
        given=given,
        stratify=split_cfg.stratify,
        held_out=dataset.held_out,
    )
    if dataset.held_out_templates and not train_templates and not dataset.held_out:
        notes.append("every template is held out: this dataset adds no training examples")
    if dataset.templates_per_row and dataset.templates_per_row >= len(train_templates) and train_templates:
        notes.append(
            f"templates_per_row={dataset.templates_per_row} >= {len(train_templates)} training "
            "templates: every template is used"
        )
    return DatasetPlan(
        config=dataset,
        name=name,
        schema=schema,
        source=source,
        train_templates=train_templates,
        eval_templates=eval_templates,
        held_out_ids=held_ids,
        dedup=dedup,
        split=result,
        rows=rows,
        rows_capped=capped,
        problems=Problems(dataset.skip_bad_rows),
        notes=notes,
    )


def cap_rows(
    rows: list[int], given: Sequence[str | None] | None, max_rows: int | None, seed: str
) -> tuple[list[int], int]:
    """At most `max_rows` rows from each file (each given split), a seeded random sample; and how many went.

    Capping per file keeps a dataset's own test file instead of sampling it away together with train.
    """
    if max_rows is None:
        return rows, 0
    by_split: dict[str | None, list[int]] = defaultdict(list)
    for r in rows:
        by_split[given[r] if given is not None else None].append(r)
    rng = random.Random(seed)
    kept: list[int] = []
    for split in sorted(by_split, key=str):
        members = by_split[split]
        kept += rng.sample(members, max_rows) if len(members) > max_rows else members
    kept.sort()
    return kept, len(rows) - len(kept)


def train_jobs(plan: DatasetPlan, seed: int) -> list[tuple[int, int]]:
    """(source row, template index) pairs of the training examples of one dataset (index -1: as-is data)."""
    if plan.held_out:
        return []
    rows = plan.split_rows("train")
    if plan.schema is None:
        return [(r, -1) for r in rows]
    n = len(plan.train_templates)
    if n == 0:
        return []
    k = plan.config.templates_per_row
    if k is None or k >= n:
        return [(r, t) for r in rows for t in range(n)]
    rng = random.Random(f"templates:{seed}:{plan.name}")
    jobs = []
    for r in rows:
        for t in sorted(rng.sample(range(n), k)):
            jobs.append((r, t))
    return jobs


def mix(
    jobs: dict[str, list], weights: dict[str, float], seed: int
) -> tuple[dict[str, list], dict[str, dict]]:
    """Resample each dataset's training jobs so the shares follow `weights` (see the module docstring)."""
    report: dict[str, dict] = {}
    active = [name for name, j in jobs.items() if j]
    if len(active) < 2:
        return jobs, {name: {"examples": len(j), "share": 1.0 if j else 0.0} for name, j in jobs.items()}
    total = sum(len(jobs[name]) for name in active)
    targets = dict(zip(active, largest_remainder(total, [weights[name] for name in active])))
    out: dict[str, list] = {}
    for name, have in jobs.items():
        if name not in targets:
            out[name] = have
            continue
        target = targets[name]
        rng = random.Random(f"mix:{seed}:{name}")
        n = len(have)
        if target <= n:
            picked = [have[i] for i in sorted(rng.sample(range(n), target))]
        else:
            picked = have * (target // n) + [have[i] for i in sorted(rng.sample(range(n), target % n))]
        out[name] = picked
        report[name] = {
            "weight": weights[name],
            "examples_before": n,
            "examples_after": target,
            "share": round(target / total, 6),
            "factor": round(target / n, 4),
        }
        if target > 3 * n:
            log.warning("dataset %s repeated %.1fx to reach its weight share", name, target / n)
    return out, report


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
    return Example(
        prompt=row["prompt"],
        completion=row["completion"],
        choices=None,
        task=AS_IS_TASK,
        template_id=f"{plan.name}.{'chat' if kind == 'chat' else 'as_is'}",
        source_id=source_id,
        dataset=plan.name,
        template_version=AS_IS_VERSION,
        label=None,
        metrics=list(DEFAULT_METRICS[AS_IS_TASK]),
        held_out=plan.held_out,
        messages=row.get("messages") if kind == "chat" else None,
    )


def _write_jobs(
    handle: Any,
    plans: Sequence[DatasetPlan],
    jobs: Iterable[tuple[int, int, int]],
    split: str,
    encoder: _LineEncoder,
    counts: dict[str, Counter],
) -> int:
    """Render and write (dataset, row, template index) jobs; return the number of lines (the hot loop)."""
    enc = _encode_text
    contexts = []
    for plan in plans:
        templates = plan.train_templates if split == "train" else plan.eval_templates
        parts = [encoder.parts(t, plan.name, plan.held_out or t.id in plan.held_out_ids) for t in templates]
        contexts.append((plan, plan.source.rows, plan.source.ids, templates, parts, counts[plan.name]))
    buffer: list[str] = []
    written = 0
    for k, r, t in jobs:
        plan, rows, ids, templates, parts, count = contexts[k]
        source_id = ids[r]
        if t < 0:  # data already in instruction form
            example = _as_is_example(plan, rows[r], source_id)
            buffer.append(example_line(example))
            count[example.template_id] += 1
        else:
            template = templates[t]
            rendered = _render_checked(template, rows[r], source_id, plan, r)
            if rendered is None:
                continue
            a, b, c, choices = parts[t]
            completion = enc(rendered.completion)
            if rendered.choices is None:
                label = choices = "null"
            else:
                label = completion
                if choices is None:
                    choices = encoder.choices(rendered.choices)
            buffer.append(
                f'{{"prompt": {enc(rendered.prompt)}, "completion": {completion}, "choices": {choices}'
                f"{a}{enc(source_id)}{b}{label}{c}"
            )
            count[template.id] += 1
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

    plans = [plan_dataset(d, library, config) for d in config.datasets]
    planned = time.perf_counter()
    seed = config.split.seed

    jobs = {p.name: train_jobs(p, seed) for p in plans}
    jobs, mixture = mix(jobs, {p.name: p.config.weight for p in plans}, seed)
    train_order = [(k, r, t) for k, p in enumerate(plans) for r, t in jobs[p.name]]
    random.Random(f"shuffle:{seed}").shuffle(train_order)

    encoder = _LineEncoder()
    counts: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    written: dict[str, int] = {}
    files = {s: run_dir / f"{s}.jsonl" for s in SPLITS}
    files["stats"] = run_dir / "stats.json"
    with contextlib.ExitStack() as stack:
        stats_handle = stack.enter_context(atomic_open(files["stats"]))  # entered first: renamed last
        handles = {s: stack.enter_context(atomic_open(files[s])) for s in SPLITS}
        written["train"] = _write_jobs(
            handles["train"], plans, train_order, "train", encoder, counts["train"]
        )
        if written["train"] == 0 and not all(p.held_out for p in plans):
            # Raised inside the ExitStack: no output file is written.
            raise DataError(
                f"{run_dir}: no training examples: the split of {', '.join(p.name for p in plans)} leaves the train split "
                "empty (too few rows for the validation/test fractions, or every template held out)")
        for split in ("validation", "test"):
            written[split] = _write_jobs(
                handles[split], plans, _eval_jobs(plans, split), split, encoder, counts[split]
            )
        stats = _stats(config, run_dir, plans, counts, written, mixture)
        stats["seconds"] = {
            "read_dedup_split": round(planned - started, 3),
            "render_write": round(time.perf_counter() - planned, 3),
        }
        json.dump(stats, stats_handle, indent=2, ensure_ascii=False, default=str)
        stats_handle.write("\n")
    seconds = time.perf_counter() - started
    log.info("prepared %s: %s in %.1fs", run_dir, ", ".join(f"{s} {written[s]}" for s in SPLITS), seconds)
    return PrepareResult(run_dir=run_dir, files=files, counts=dict(written), stats=stats, seconds=seconds)


def _stats(
    config: RunConfig,
    run_dir: Path,
    plans: list[DatasetPlan],
    counts: dict[str, dict[str, Counter]],
    written: dict[str, int],
    mixture: dict[str, dict],
) -> dict:
    datasets: dict[str, Any] = {}
    for plan in plans:
        source = plan.source
        skipped = dict(source.skipped)
        datasets[plan.name] = {
            "kind": source.kind,
            "schema": plan.schema.name if plan.schema else None,
            "files": source.files,
            "rows_read": source.rows_read,
            "rows_skipped": sum(skipped.values()),
            "rows_skipped_by_reason": skipped,
            "rows_skipped_samples": source.skipped_samples,
            "duplicates": plan.dedup.to_dict(),
            "rows_capped": plan.rows_capped,
            "rows_used": len(plan.rows),
            "split": plan.split.report,
            "examples_skipped": sum(plan.problems.counts.values()),
            "examples_skipped_by_reason": dict(plan.problems.counts),
            "examples_skipped_samples": plan.problems.samples,
            "held_out": plan.held_out,
            "templates": [t.id for t in plan.train_templates] if not plan.held_out else [],
            "held_out_templates": sorted(
                plan.held_out_ids | ({t.id for t in plan.eval_templates} if plan.held_out else set())
            ),
            "templates_per_row": plan.config.templates_per_row,
            "weight": plan.config.weight,
            "notes": plan.notes,
        }
    splits: dict[str, Any] = {}
    for split in SPLITS:
        by_dataset = {name: sum(c.values()) for name, c in counts[split].items() if c}
        by_template: Counter = Counter()
        for c in counts[split].values():
            by_template.update(c)
        held = 0
        for plan in plans:
            for tid, n in counts[split].get(plan.name, Counter()).items():
                if plan.held_out or tid in plan.held_out_ids:
                    held += n
        splits[split] = {
            "examples": written[split],
            "held_out_examples": held,
            "source_rows": {p.name: p.split.report["sizes"][split] for p in plans},
            "by_dataset": by_dataset,
            "by_template": dict(sorted(by_template.items())),
            "labels": {p.name: p.split.report["labels"][split] for p in plans if "labels" in p.split.report},
        }
    templates: dict[str, Any] = {}
    for plan in plans:
        for t in plan.eval_templates:
            templates[t.id] = {
                "version": t.version,
                "schema": t.dataset,
                "task": t.task,
                "origin": t.origin,
                "held_out": plan.held_out or t.id in plan.held_out_ids,
            }
    deviation = [p.split.report.get("max_deviation_points") for p in plans]
    return {
        "run_dir": str(run_dir),
        "examples": written,
        "splits": splits,
        "datasets": datasets,
        "mixture": mixture,
        "stratification_max_deviation_points": max((d for d in deviation if d is not None), default=None),
        "templates": templates,
        "config": dump_config(config),
    }


# --------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------


def load_examples(run_dir_or_jsonl: str | Path, split: str = "train") -> list[dict]:
    """The examples of `split` from a run folder (or the rows of one .jsonl file) as dicts."""
    path = Path(run_dir_or_jsonl)
    if path.is_dir():
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
        path = path / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path}: not found (run `instructkit prepare` first)")
    out: list[dict] = []
    loads = json.loads
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                out.append(loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno}: malformed JSON at column {exc.colno}: {exc.msg}"
                ) from None
            except (ValueError, RecursionError) as exc:  # a 5,000-digit number; arrays nested too deep
                raise DataError(f"{path}: line {lineno}: cannot read this JSON: {json_problem(exc)}") from None
    return out
