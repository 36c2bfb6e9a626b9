"""Files written so that a crash never leaves half an output, and the helpers every room shares.

- atomic writes: write to a temporary name in the same folder, fsync, rename; readers see the old file or
  the new one (`atomic_open`, `write_json`, `write_jsonl`);
- whole folders swapped into place the same way (`temp_folder_beside`, `replace_folder`);
- reading back: JSONL and YAML with errors that name the file and the 1-based line (`read_jsonl`,
  `iter_jsonl`, `read_yaml`);
- `sha256_file`, the content hash used by checkpoints, caches and provenance;
- `run_lock`, the one-run-per-folder lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from instructkit.errors import DataError, InstructkitError, TrainingError

logger = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync and rename it onto `path`.

    On an exception inside the block the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (a no-op where the OS cannot open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented UTF-8 JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one JSON object per line atomically; return the number of lines."""
    n = 0
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False))
            handle.write("\n")
            n += 1
    return n


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks (memory does not grow with the file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Folders swapped into place
# --------------------------------------------------------------------------------------------------


def temp_folder_beside(target: str | os.PathLike, prefix: str | None = None) -> Path:
    """A fresh hidden folder next to `target` (same file system, so the final rename is atomic).

    mkdtemp makes it private (0700); outputs are ordinary data, so it is opened up like `mkdir` would.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def replace_folder(tmp: str | os.PathLike, target: str | os.PathLike, *, keep_existing: bool = False,
                   aside: str | os.PathLike | None = None) -> Path:
    """Rename the finished folder `tmp` onto `target`, so `target` is always one complete folder.

    keep_existing=True (a cache): if `target` exists (another process finished first), keep it and drop
    `tmp`. Otherwise the old `target` is renamed to `aside` (default `.<name>.old-<random>` beside it),
    `tmp` renamed in, and the old folder deleted; a crash in between leaves `aside` for the caller's
    tidy-up to restore. Raises OSError when a rename fails for another reason.
    """
    tmp, target = Path(tmp), Path(target)
    if target.exists() and keep_existing:
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    old = None
    if target.exists():
        old = Path(aside) if aside is not None else target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if keep_existing and target.exists():  # lost a race to another process
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# Reading back, with the line at fault named
# --------------------------------------------------------------------------------------------------


def json_problem(exc: BaseException) -> str:
    """What json.loads refused beyond syntax: nesting too deep for the parser, an over-long integer."""
    if isinstance(exc, RecursionError):
        return "arrays or objects nested too deeply"
    return str(exc).split(";")[0]


def iter_jsonl(path: str | os.PathLike, *, skip_torn: bool = False,
               error: type[InstructkitError] = DataError) -> Iterator[dict]:
    """Yield the objects of a JSONL file one line at a time (blank lines skipped).

    Raises `error` (DataError by default) naming the file, the 1-based line and column of the first line
    that is not JSON; with `skip_torn`, such lines (a write cut by a crash) are logged and skipped instead.
    A missing file raises `error` too.
    """
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8", errors="replace" if skip_torn else "strict")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    loads = json.loads
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield loads(line)
            except json.JSONDecodeError as exc:
                if skip_torn:
                    logger.warning("%s line %d is not JSON; skipped", path, lineno)
                    continue
                raise error(f"{path}: line {lineno}: malformed JSON at column {exc.colno}: {exc.msg}") from None
            except (ValueError, RecursionError) as exc:  # a 5,000-digit number; arrays nested too deep
                if skip_torn:
                    logger.warning("%s line %d cannot be read; skipped", path, lineno)
                    continue
                raise error(f"{path}: line {lineno}: cannot read this JSON: {json_problem(exc)}") from None


def read_jsonl(path: str | os.PathLike, *, skip_torn: bool = False,
               error: type[InstructkitError] = DataError) -> list[dict]:
    """All objects of a JSONL file as a list; errors as `iter_jsonl`."""
    return list(iter_jsonl(path, skip_torn=skip_torn, error=error))


def read_yaml(path: str | os.PathLike, *, error: type[InstructkitError], what: str = "file",
              loader: type = None) -> Any:
    """Parse a YAML file with a safe loader (`yaml.SafeLoader` or a subclass of it).

    Raises `error` naming the file (and the 1-based line of a syntax error) when it is missing, not
    UTF-8, unreadable or not valid YAML. `what` names the kind of file in messages ("config file").
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except (OSError, ValueError) as exc:  # a folder, no permission, a NUL in the path
        raise error(f"{path}: cannot read the {what}: {exc}") from None
    try:
        return yaml.load(text, Loader=loader or yaml.SafeLoader)  # noqa: S506 - SafeLoader or a subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise error(f"{path}: invalid YAML: nested too deeply") from None


# --------------------------------------------------------------------------------------------------
# One run per folder
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # gone, or not a pid at all
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `run_dir/.lock` (created with O_CREAT|O_EXCL, holding our pid) for the block.

    A lock whose pid is no longer alive (a killed run) is taken over with a warning; a live one raises
    TrainingError naming the pid and the folder. Re-entrant: a lock this process already holds
    (`instructkit run` locks the whole run, then trains) is simply used.
    """
    path = Path(run_dir) / ".lock"
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip() or "0") == os.getpid():
            yield path
            return
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and _pid_alive(pid) and attempt == 0:
                raise TrainingError(
                    f"{run_dir} is in use by another training run (process {pid}, lock file {path}). "
                    "Wait for it to finish, use another run name, or delete the lock if that process is "
                    "not training.") from None
            logger.warning("taking over stale lock %s (process %s is not running)", path, pid or "?")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        break
    else:
        raise TrainingError(f"could not take the lock {path}")
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
