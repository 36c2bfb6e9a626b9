"""Plan each dataset of a run: which source rows, which templates, which split, and the training mixture.

Steps, per dataset: read and check rows (sources.py) -> deduplicate -> cap at `max_rows` (a seeded
sample of at most that many rows from each file, so a dataset's own test file is not sampled away with
train) -> split the SOURCE ROWS (split.py); build.py then renders templates on the rows of each split. A
source row therefore lands in one split whatever the number of templates; all its examples carry its
`source_id`.

Templates per row: every chosen template, or `templates_per_row: k` of them sampled per training row
(seeded by the split seed and the dataset name). Validation and test rows get every chosen template, so
per-template scores are measured on the same rows.

Held out: templates in `held_out_templates` are rendered only on validation and test rows; a dataset
with `held_out: true` has no training rows at all (its rows go to test, except rows of a file given as
validation: model selection never sees them). Their examples
carry `"held_out": true` so evaluation can report them separately (generalisation to unseen prompts or
unseen datasets).

Mixtures (several datasets): `weight` is each dataset's share of the TRAINING examples. The training set
keeps the number of examples the datasets give together; a dataset whose share is smaller than what it
has is subsampled (seeded, without replacement), one whose share is larger is repeated: every example
`target // have` times plus a seeded random `target % have` of them. Weights 1, 1 therefore mean half
and half; for examples-proportional mixing set each weight to the dataset's size, and cap a huge
dataset with `max_rows` (T5's examples-proportional mixing with a cap). With one dataset the weight does
nothing. Validation and test are never resampled.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from instructkit.config import DatasetConfig, RunConfig
from instructkit.data.answers import OUTSIDE_DETECTED, Answers, decide_answers
from instructkit.data.sources import DEMO_SCHEMA, Source, dataset_name, load_source
from instructkit.data.split import (
    DedupResult,
    SplitResult,
    canonical_text,
    deduplicate,
    largest_remainder,
    split_rows,
)
from instructkit.data.table import Problems
from instructkit.errors import ConfigError, TemplateError
from instructkit.templates.library import TemplateLibrary
from instructkit.templates.schema import Schema, label_key
from instructkit.templates.template import Template, as_written_in

log = logging.getLogger(__name__)



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
    answers: Answers | None = None
    """Instruction-form data: its answers (a closed set of choices, or free text); data/answers.py."""

    @property
    def held_out(self) -> bool:
        return self.config.held_out

    def split_rows(self, split: str) -> list[int]:
        return [r for r, s in zip(self.rows, self.split.assignment) if s == split]


def select_templates(
    dataset: DatasetConfig, library: TemplateLibrary
) -> tuple[Schema | None, list[Template], list[Template]]:
    """The dataset's schema, its chosen templates and its held-out templates.

    Raises: ConfigError when the templates span several schemas, held_out_templates has no schema, or
    nothing is selected; TemplateError for a template of another schema or a schema without templates.
    """
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


def dataset_templates(dataset: DatasetConfig, library: TemplateLibrary
                      ) -> tuple[Schema | None, list[Template], list[Template], set[str]]:
    """(schema, training templates, evaluation templates, held-out template ids) of one dataset: held-out
    templates are rendered on validation and test rows only. Raises: what `select_templates` raises."""
    schema, chosen, held = select_templates(dataset, library)
    held_ids = {t.id for t in held}
    return (schema, [t for t in chosen if t.id not in held_ids], chosen + [t for t in held if t not in chosen],
            held_ids)


def split_notes(result: SplitResult) -> list[str]:
    """Notes (and warnings) for a split that a positive fraction left empty: 0.2 of 3 rows is 0.6, which
    the exact split sizes round to none (a tiny dataset: there is nothing to evaluate on, or to validate)."""
    report, notes = result.report, []
    for split in ("validation", "test"):
        fraction = report["carved_fractions"][split]
        if fraction > 0 and split not in report["given_splits"] and report["sizes"][split] == 0:
            given = [s for s in report["given_splits"] if s != "train"]  # given train rows are the pool
            pool = sum(report["sizes"].values()) - sum(report["sizes"][s] for s in given)
            notes.append(f"{split}: no rows: {fraction:g} of {pool} rows rounds to none (add rows, or raise "
                         f"split.{split})")
            log.warning("%s", notes[-1])
    return notes


def template_notes(dataset: DatasetConfig, train_templates: list[Template]) -> list[str]:
    """Notes for stats.json when the template settings leave nothing to choose."""
    notes = []
    if dataset.held_out_templates and not train_templates and not dataset.held_out:
        notes.append("every template is held out: this dataset adds no training examples")
    if dataset.templates_per_row and dataset.templates_per_row >= len(train_templates) and train_templates:
        notes.append(f"templates_per_row={dataset.templates_per_row} >= {len(train_templates)} training "
                     "templates: every template is used")
    return notes


def plan_dataset(dataset: DatasetConfig, library: TemplateLibrary, config: RunConfig) -> DatasetPlan:
    """Read, deduplicate, cap and split one dataset.

    Raises: what `select_templates` and `load_source` raise (ConfigError, TemplateError, DataError).
    """
    split_cfg = config.split
    name = dataset_name(dataset)
    schema, train_templates, eval_templates, held_ids = dataset_templates(dataset, library)
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
    dedup = deduplicate(source.rows, key, label_field, source.given, normalize=split_cfg.text_match == "normalized",
                        where=source.where)
    answers = instruction_answers(dataset, source, dedup, schema, name)
    rows, capped = cap_rows(dedup.keep, source.given, dataset.max_rows, f"cap:{split_cfg.seed}:{name}")
    all_rows = source.rows
    labels = None
    if label_field is not None and schema is not None:
        names = {label_key(k): v for k, v in (schema.label_map or {}).items()}
        labels = []
        for r in rows:
            value = label_key(all_rows[r][label_field])
            labels.append(names.get(value, value))
    groups = [canonical_text(all_rows[r].get(group_by)) for r in rows] if group_by else None
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
    notes += template_notes(dataset, train_templates) + split_notes(result)
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
        answers=answers,
        notes=notes,
    )


def instruction_answers(dataset: DatasetConfig, source: Source, dedup: DedupResult, schema: Schema | None,
                        name: str) -> Answers | None:
    """The answers of instruction-form data (None for templated data), decided on the deduplicated rows;
    rows whose completion is outside the choices leave `dedup.keep` (declared choices: a bad row).

    Raises: ConfigError when templated data sets `choices` or `metrics`; DataError naming file and line
    for a completion outside declared choices, unless `skip_bad_rows`.
    """
    if schema is not None:
        if dataset.choices != "auto" or dataset.metrics is not None:
            raise ConfigError(f"dataset {name!r}: `choices` and `metrics` are for prompt/completion data; a "
                              "template sets its own (eval.metrics overrides them per template)")
        return None
    answers = decide_answers([source.rows[r]["completion"] for r in dedup.keep], dataset.choices, dataset.metrics,
                             conversations=source.kind == "chat")
    if answers.choices is None:
        return answers
    allowed, problems, kept = set(answers.choices), Problems(dataset.skip_bad_rows), []
    for r in dedup.keep:
        completion = source.rows[r]["completion"]
        if as_written_in(answers.choices, completion) in allowed:  # a choice, or one up to NFC
            kept.append(r)
        elif answers.origin == "declared":
            problems.bad("completion outside the declared choices", f"{source.where(r)}: completion "
                         f"{completion[:80]!r} is not one of the dataset's choices {answers.choices}")
        else:
            source.skipped[OUTSIDE_DETECTED] += 1
    source.skipped.update(problems.counts)
    source.skipped_samples.extend(problems.samples)
    if len(kept) < len(dedup.keep) and answers.origin == "detected":
        log.warning("dataset %s: %d rows whose completion is outside the detected answer choices %s are left "
                    "out (see stats.json)", name, len(dedup.keep) - len(kept), answers.choices)
    dedup.keep = kept
    return answers


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
