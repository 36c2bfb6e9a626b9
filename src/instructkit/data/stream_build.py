"""`prepare` in bounded memory: the files of build.prepare, written from two passes over each data file.

    prepare_streamed(config, run_dir, library)  ->  the PrepareResult of build.prepare

Pass 1 plans every dataset from row hashes (stream_plan.py). Pass 2 reads each dataset again and renders
the rows of its split: validation and test examples go straight to their files (dataset by dataset, in row
order, as in memory); a training example goes, with its place in the shuffled training order, its
dataset, template and prompt digest, into one of the bucket files of a temporary folder (bucket = place //
BUCKET_LINES). Last, each bucket is read, sorted by place and appended to train.jsonl, leaving out a
training example whose prompt is a validation or test prompt (leakage.py): all of those are known by then.
So train.jsonl holds the examples, in the order, of the in-memory path, while memory holds at most one
bucket. The training order is the in-memory one: the same seeded shuffle of the same job list, applied as
a permutation of job numbers.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from instructkit.config import RunConfig
from instructkit.data.build import PrepareResult, example_text, template_parts
from instructkit.data.chunks import CHUNK_ROWS
from instructkit.data.examples import LineEncoder
from instructkit.data.leakage import PromptLedger
from instructkit.data.plan import DatasetPlan, mix
from instructkit.data.split import SPLITS
from instructkit.data.stats import prepare_stats
from instructkit.data.stream_plan import plan_streamed
from instructkit.errors import DataError
from instructkit.io import atomic_open
from instructkit.templates.library import TemplateLibrary

BUCKET_LINES = 100_000
"""Training examples per bucket file: the most train lines held in memory at once."""
_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}


def train_job_arrays(plan: DatasetPlan, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """plan.train_jobs as two arrays (source row, template index), in the same order."""
    empty = np.zeros(0, np.int64)
    if plan.held_out:
        return empty, empty
    assignment = np.array([_SPLIT_CODE[s] for s in plan.split.assignment], dtype=np.int8)
    rows = np.asarray(plan.rows, dtype=np.int64)[assignment == 0]
    if plan.schema is None:
        return rows, np.full(len(rows), -1, np.int64)
    n = len(plan.train_templates)
    if n == 0:
        return empty, empty
    k = plan.config.templates_per_row
    if k is None or k >= n:
        return np.repeat(rows, n), np.tile(np.arange(n, dtype=np.int64), len(rows))
    rng = random.Random(f"templates:{seed}:{plan.name}")
    picks = [sorted(rng.sample(range(n), k)) for _ in range(len(rows))]
    return np.repeat(rows, k), np.array(picks, dtype=np.int64).reshape(-1)


def train_places(plans: list[DatasetPlan], seed: int) -> tuple[list[tuple[np.ndarray, ...]], dict, int]:
    """Per dataset: (rows, templates, places in train.jsonl) of its mixed training jobs; the mixture
    report; the number of training jobs. The places are those of build.prepare's seeded shuffle."""
    arrays = [train_job_arrays(p, seed) for p in plans]
    picked, mixture = mix({p.name: list(range(len(a[0]))) for p, a in zip(plans, arrays)},
                          {p.name: p.config.weight for p in plans}, seed)
    chosen = [np.asarray(picked[p.name], dtype=np.int64) for p in plans]
    total = sum(len(c) for c in chosen)
    order = list(range(total))
    random.Random(f"shuffle:{seed}").shuffle(order)
    place = np.empty(total, dtype=np.int64)
    place[np.asarray(order, dtype=np.int64)] = np.arange(total, dtype=np.int64)
    del order
    jobs, start = [], 0
    for (rows, templates), c in zip(arrays, chosen):
        where = place[start:start + len(c)]
        start += len(c)
        r, t = rows[c], templates[c]
        sort = np.lexsort((where, t, r))
        jobs.append((r[sort], t[sort], where[sort]))
    return jobs, mixture, total


class _Bucket(list):
    """The lines waiting to be appended to one bucket file."""

    def __init__(self, handle) -> None:
        super().__init__()
        self.handle = handle

    def flush(self) -> None:
        self.handle.write("".join(self))
        self.clear()


def _render_dataset(k: int, plan: DatasetPlan, jobs: tuple[np.ndarray, ...], handles: dict, buckets: list,
                    encoder: LineEncoder, counts: dict, ledger: PromptLedger) -> dict[str, int]:
    """Pass 2 over one dataset: validation/test lines written, training lines put in their buckets."""
    source = plan.source
    n = len(source)
    split_of = np.full(n, -1, dtype=np.int8)
    split_of[np.asarray(plan.rows, dtype=np.int64)] = [_SPLIT_CODE[s] for s in plan.split.assignment]
    firsts = {p: i for i, p in enumerate(getattr(plan, "conflict_rows", []))}
    wanted = split_of >= 0
    wanted[list(firsts)] = True
    job_rows, job_templates, job_places = jobs
    evals = {s: template_parts(plan, s, encoder) for s in ("validation", "test")}
    train_templates, train_parts = template_parts(plan, "train", encoder)
    key_fields = [f for f in plan.dedup.key if f != source.label_field]
    written = {"validation": 0, "test": 0}
    j, n_jobs = 0, len(job_rows)
    for p, row in source.walk(wanted):
        if p in firsts:
            slot = plan.dedup.conflicting_examples[firsts[p]]
            plan.dedup.conflicting_examples[firsts[p]] = {**{f: row.get(f) for f in key_fields}, **slot}
        split = SPLITS[split_of[p]] if split_of[p] >= 0 else None
        if split is None:
            continue
        source_id = source.source_id(p)
        if split != "train":
            templates, parts = evals[split]
            for t in range(len(templates)) if plan.schema is not None else (-1,):
                made = example_text(plan, row, source_id, t, templates, parts, encoder, p)
                if made is not None and ledger.keep(split, made[1], plan.name, made[2]):
                    handles[split].write(made[0])
                    counts[split][plan.name][made[2]] += 1
                    written[split] += 1
            continue
        while j < n_jobs and job_rows[j] < p:
            j += 1
        while j < n_jobs and job_rows[j] == p:
            t = int(job_templates[j])
            made = example_text(plan, row, source_id, t, train_templates, train_parts, encoder, p)
            turns = ",".join(f"{i}:{d.hex()}" for i, d in ledger.turn_digests(row.get("messages"))) if t < 0 else ""
            head = (f"{k}\t{made[2]}\t{ledger.digest(made[1]).hex()}\t{turns or '-'}\t"
                    if made is not None else "")
            while j < n_jobs and job_rows[j] == p and job_templates[j] == t:
                if made is not None:
                    place = int(job_places[j])
                    buffer = buckets[place // BUCKET_LINES]
                    buffer.append(f"{place}\t{head}{made[0]}")
                    if len(buffer) >= 512:
                        buffer.flush()
                j += 1
    return written


def _merge_buckets(folder: Path, n_buckets: int, handle, plans: list[DatasetPlan], counts: dict,
                   ledger: PromptLedger) -> int:
    """train.jsonl from the buckets, in place order, without the examples whose prompt is held out."""
    written = 0
    for b in range(n_buckets):
        with open(folder / f"{b}.tsv", encoding="utf-8") as bucket:
            records = [line.split("\t", 5) for line in bucket]
        records.sort(key=lambda r: int(r[0]))
        out = []
        for _, k, template_id, digest, turns, line in records:
            name = plans[int(k)].name
            if ledger.keep_digest("train", bytes.fromhex(digest), name, template_id):
                pairs = [(int(i), bytes.fromhex(d)) for i, d in (x.split(":") for x in turns.split(","))
                         ] if turns != "-" else []
                line = ledger.guard_turns(line, pairs, name, template_id)
                out.append(line)
                counts["train"][name][template_id] += 1
        handle.write("".join(out))
        written += len(out)
        del records, out
    return written


def prepare_streamed(config: RunConfig, run_dir: Path, library: TemplateLibrary, started: float) -> PrepareResult:
    """build.prepare in bounded memory (module docstring); the same files, stats and errors.

    Raises: what build.prepare raises.
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".prepare-", dir=run_dir))
    try:
        return _prepare_in(config, run_dir, library, started, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # nothing changes on an error
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _prepare_in(config: RunConfig, run_dir: Path, library: TemplateLibrary, started: float, folder: Path
                ) -> PrepareResult:
    """prepare_streamed with its temporary files (row spills, train buckets) in `folder`."""
    plans = [plan_streamed(d, library, config, CHUNK_ROWS, folder / f"rows-{k}.marshal")
             for k, d in enumerate(config.datasets)]
    planned = time.perf_counter()
    seed = config.split.seed
    jobs, mixture, total = train_places(plans, seed)
    encoder = LineEncoder()
    ledger = PromptLedger.of(config.split)
    counts: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    written: dict[str, int] = {"validation": 0, "test": 0}
    files = {s: run_dir / f"{s}.jsonl" for s in SPLITS}
    files["stats"] = run_dir / "stats.json"
    n_buckets = max(1, -(-total // BUCKET_LINES))
    with contextlib.ExitStack() as stack:
        stats_handle = stack.enter_context(atomic_open(files["stats"]))  # entered first: renamed last
        handles = {s: stack.enter_context(atomic_open(files[s])) for s in SPLITS}
        with contextlib.ExitStack() as bucket_stack:
            buckets = [_Bucket(bucket_stack.enter_context(open(folder / f"{b}.tsv", "w", encoding="utf-8")))
                       for b in range(n_buckets)]
            for k, plan in enumerate(plans):
                done = _render_dataset(k, plan, jobs[k], handles, buckets, encoder, counts, ledger)
                for s, n in done.items():
                    written[s] += n
            for bucket in buckets:
                bucket.flush()
        written["train"] = _merge_buckets(folder, n_buckets, handles["train"], plans, counts, ledger)
        if written["train"] == 0 and not all(p.held_out for p in plans):
            also = f"; {ledger.dropped.total()} left out as validation/test prompts" if ledger.dropped else ""
            raise DataError(
                f"{run_dir}: no training examples: the split of {', '.join(p.name for p in plans)} leaves the "
                f"train split empty (too few rows for the validation/test fractions, or every template held "
                f"out){also}")
        for plan in plans:
            plan.notes += ledger.notes(plan.name, counts["train"][plan.name])
        stats = prepare_stats(config, run_dir, plans, counts, written, mixture)
        stats["leaked_prompts"] = ledger.leaked()
        stats["prompt_leakage"] = ledger.report(config.split.prompt_leakage)
        stats["seconds"] = {"read_dedup_split": round(planned - started, 3),
                            "render_write": round(time.perf_counter() - planned, 3)}
        stats["streaming"] = {"buckets": n_buckets, "bucket_lines": BUCKET_LINES}
        json.dump(stats, stats_handle, indent=2, ensure_ascii=False, default=str)
        stats_handle.write("\n")
    seconds = time.perf_counter() - started
    return PrepareResult(run_dir=run_dir, files=files, counts=dict(written), stats=stats, seconds=seconds)
