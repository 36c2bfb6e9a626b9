"""The run folder's bookkeeping for `instructkit run`: which step is done from which inputs, and keeping an
earlier run whole when new settings would replace part of it.

    runs/<name>/steps/<step>.json           {"fingerprint", "seconds", "finished"}: the step is done
    runs/<name>/steps/<step>.started.json   the inputs a step (training) last started from

A step is skipped when its recorded fingerprint equals the new one. When a step that has already run (or
started) would run again from other inputs (a changed setting or data), the earlier run is kept whole
beside the folder, as `runs/<name>.previous-<n>/`: the outputs of the steps that run again move there,
those that stay (the prepared data, a base evaluation that is still up to date, ...) are linked or copied
there, with the earlier config.json. So the run folder never mixes files from two runs, and a finished
run is never destroyed; `--force` replaces the earlier run instead (its outputs are deleted first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from instructkit.io import write_json

log = logging.getLogger(__name__)

STEPS = ("prepare", "evaluate-base", "train", "evaluate-tuned", "compare")

STEP_OUTPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("train.jsonl", "validation.jsonl", "test.jsonl", "stats.json"),
    "evaluate-base": ("eval/base", "eval/base-k*", "eval/base.log"),
    "train": ("checkpoints", "metrics.jsonl", "tensorboard", "train_result.json", "tokenize_stats.json", "model"),
    "evaluate-tuned": ("eval/tuned",),
    "compare": ("report.json", "report.md", "report.html", "summary.json"),
}
"""What each step writes into the run folder (globs relative to it)."""

LINK_MIN_BYTES = 1 << 20
"""Files at least this big are hard-linked into a kept run instead of copied: weights and data files,
which are only ever replaced whole (atomic renames), never rewritten in place."""


def digest(obj: Any) -> str:
    """A short content hash of JSON-able data (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_digest(path: Path) -> str:
    """A short content hash of a file's bytes."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()[:20]


class Steps:
    """Records which steps are done and from what inputs (`steps/<name>.json`)."""

    def __init__(self, run_dir: Path, force: bool):
        self.folder = run_dir / "steps"
        self.force = force

    def _read(self, path: Path) -> str | None:
        try:
            return json.loads(path.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def done(self, name: str, fingerprint: str) -> bool:
        return not self.force and self._read(self.folder / f"{name}.json") == fingerprint

    def recorded(self, name: str) -> set[str]:
        """The fingerprints this step finished or last started from (empty: it never ran here)."""
        found = {self._read(self.folder / f"{name}.json"), self._read(self.folder / f"{name}.started.json")}
        return {f for f in found if f is not None}

    def mark(self, name: str, fingerprint: str, seconds: float) -> None:
        write_json(self.folder / f"{name}.json", {"fingerprint": fingerprint, "seconds": round(seconds, 2),
                                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def begin(self, name: str, fingerprint: str) -> bool:
        """Record that `name` started from these inputs; True when an unfinished start had the same ones.

        Training uses it to tell an interrupted run (resume from its checkpoints) from a changed
        configuration (start fresh: the checkpoints belong to other settings or data).
        """
        path = self.folder / f"{name}.started.json"
        same = not self.force and self._read(path) == fingerprint
        write_json(path, {"fingerprint": fingerprint, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return same


def stale_steps(steps: Steps, fingerprints: dict[str, str]) -> list[str]:
    """The steps that ran (or started) here from other inputs than `fingerprints` now gives, with the steps
    that read their outputs: evaluate-tuned reads train and evaluate-base, compare reads both evaluations."""
    stale = [name for name, fp in fingerprints.items() if steps.recorded(name) - {fp}]
    if {"train", "evaluate-base"} & set(stale):
        stale += [name for name in ("evaluate-tuned", "compare") if steps.recorded(name)]
    return [name for name in STEPS if name in stale]


def outputs(run_dir: Path, names: list[str] | tuple[str, ...], records: bool = True) -> list[Path]:
    """The existing outputs of these steps, plus (`records`) their records in steps/."""
    found: list[Path] = []
    for name in names:
        for pattern in STEP_OUTPUTS[name]:
            found += sorted(run_dir.glob(pattern))
        if records:
            found += [p for p in (run_dir / "steps" / f"{name}.json", run_dir / "steps" / f"{name}.started.json")
                      if p.exists()]
    return found


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy_file, dirs_exist_ok=True)
    else:
        _link_or_copy_file(source, target)


def _link_or_copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    if os.path.getsize(source) >= LINK_MIN_BYTES:
        try:
            os.link(source, target)
            return
        except OSError:  # a file system without hard links
            pass
    shutil.copy2(source, target)


def _archive_path(run_dir: Path) -> Path:
    n = 1
    while (run_dir.parent / f"{run_dir.name}.previous-{n}").exists():
        n += 1
    return run_dir.parent / f"{run_dir.name}.previous-{n}"


def keep_previous_run(run_dir: Path, rerun: list[str], old_config: bytes | None,
                      prepared: Path | None = None, keep_started: bool = False) -> Path | None:
    """Keep the earlier run whole as `<run_dir>.previous-<n>/` before the steps `rerun` run again.

    Their outputs (and records) move there; every other step's outputs are linked or copied there (the
    prepared data from `prepared`, a folder `stash_prepared` filled before prepare ran again, when given),
    with `old_config` as its config.json. `keep_started`: the `<step>.started.json` records stay (the
    training that is starting now wrote them). Returns the new folder, or None when `rerun` left no output
    here. Raises OSError when a file cannot be moved or copied (the disk is full, no permission).
    """
    moving = [p for p in outputs(run_dir, rerun) if not (keep_started and p.name.endswith(".started.json"))]
    if not moving:
        return None
    keep = _archive_path(run_dir)
    keep.mkdir(parents=True)
    for path in moving:
        target = keep / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    staying = [name for name in STEPS if name not in rerun]
    for path in outputs(run_dir, staying):
        source = path
        if prepared is not None and path.parent == run_dir and (prepared / path.name).exists():
            source = prepared / path.name
        _link_or_copy(source, keep / path.relative_to(run_dir))
    if old_config is not None:
        (keep / "config.json").write_bytes(old_config)
    (keep / "KEPT.txt").write_text(
        f"The run formerly in {run_dir}, kept {time.strftime('%Y-%m-%d %H:%M:%S')} because these steps were run "
        f"again there with other settings or data: {', '.join(rerun)}.\n"
        f"Its config is config.json here. Delete this folder when you no longer need it.\n", encoding="utf-8")
    log.warning("%s: %s will run again with other settings or data; the earlier run is kept whole in %s "
                "(delete it when no longer needed)", run_dir, ", ".join(rerun), keep)
    return keep


def keep_if_stale(run_dir: Path, steps: Steps, fingerprints: dict[str, str], old_config: bytes | None,
                  prepared: Path | None) -> Path | None:
    """`keep_previous_run` for the steps that ran here from other inputs than `fingerprints` (none: nothing
    happens); the `prepared` stash is removed either way. Returns the folder the earlier run went to."""
    try:
        stale = stale_steps(steps, fingerprints)
        return keep_previous_run(run_dir, stale, old_config, prepared) if stale and not steps.force else None
    finally:
        if prepared is not None:
            shutil.rmtree(prepared, ignore_errors=True)


def stash_prepared(run_dir: Path) -> Path | None:
    """Link the prepared data into `<run_dir>/.previous-prepare/` before prepare runs again, so the earlier
    run can still be kept whole with it (`keep_previous_run`). None when there is nothing prepared."""
    files = [run_dir / name for name in STEP_OUTPUTS["prepare"] if (run_dir / name).is_file()]
    if not files:
        return None
    folder = run_dir / ".previous-prepare"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for path in files:
        _link_or_copy_file(path, folder / path.name)
    return folder


def clear_run(run_dir: Path) -> list[Path]:
    """`--force`: delete every step's outputs and records (the config, lock and caches stay); return them."""
    gone = outputs(run_dir, list(STEPS))
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return gone


@contextlib.contextmanager
def new_run_folder(run_dir: Path) -> Iterator[Path]:
    """Create `run_dir` (and its missing parents) for the block; when the block fails before any step of
    a run finished there (a bad data path, a template error in prepare), remove what it created, so a
    failed first attempt leaves nothing behind. A folder that existed before is never removed."""
    run_dir = Path(run_dir)
    created = []
    for folder in [run_dir, *run_dir.parents]:
        if folder.exists():
            break
        created.append(folder)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir
    except BaseException:
        if created and not any((run_dir / "steps").glob("*.json")) and not (run_dir / "train.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in created[1:]:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
        raise
