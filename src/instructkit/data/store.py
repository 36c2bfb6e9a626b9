"""Tokenized examples stored once per run as memory-mapped arrays, and read without loading them whole.

    store = tokenize_split(run_dir / "train.jsonl", tokenizer, settings, cache_dir, num_proc=4)
    store.token_table()      # batching.TokenTable over np.memmap arrays: training slices what it batches
    store.class_ids          # per example, as sampler.class_ids_from_examples gives them

The split's JSONL file is read in chunks of CHUNK_LINES lines, each parsed and tokenized
(data/token_arrays.py: batched through the fast tokenizer, truncation and labels in numpy) by one of
`num_proc` worker processes (in this process when 1), a bounded number of chunks in flight; each chunk's
ids are appended to flat files, so memory holds a few chunks whatever the split's size. The folder:

    <cache_dir>/<key>/  input_ids.i32  labels.i32  offsets.i64  label_offsets.i64  prompt_length.i32
                        index.i64  class.i32  meta.json  (written last: a folder without it is not used)

`key` hashes the tokenizer (tokenize.tokenizer_hash), the template versions the examples name, the
tokenize settings and the file's sha256, so the store is reused while none of these changes. Token ids are
those of tokenize.tokenize_examples (the same encode functions): example i of the file (held-out examples
left out) is `index` i; an example that does not fit is dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from instructkit.data.batching import TokenTable
from instructkit.data.token_arrays import encode_chunk
from instructkit.data.tokenize import TokenizeSettings, TokenizeStats, tokenizer_hash
from instructkit.errors import DataError
from instructkit.io import json_problem, replace_folder, sha256_file, temp_folder_beside
from instructkit.progress import ProgressBar

CHUNK_LINES = 4_000
FORMAT = 8  # 2: an empty causal prompt is the prefix token (tokenize.encode_prompts); 3: BOS once; 4: a chat
# turn without the end-of-conversation tokens (chat_encode.conversation_end); 5: tool-call arguments in the
# form the template renders (chat_template.TemplateFeatures.arguments_text); 6: tool-call ids and names;
# 7: a completion tokenized as after its prompt (text_ids.continuation_ids); 8: seq2seq targets framed as
# the tokenizer frames a target text (data/seq2seq.py: BART's <s>)
ARRAYS = {"input_ids": np.int32, "labels": np.int32, "offsets": np.int64, "label_offsets": np.int64,
          "prompt_length": np.int32, "index": np.int64, "class": np.int32}
_SUFFIX = {np.int32: "i32", np.int64: "i64"}
_worker: dict[str, Any] = {}


@dataclass
class TokenStore:
    """A tokenized split on disk (module docstring); quacks enough like a `datasets.Dataset` for training
    (`len`, `column_names`, `store["index"]`)."""

    folder: Path
    stats: TokenizeStats
    rows: int
    examples: int

    column_names: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "prompt_length", "index")

    def array(self, name: str) -> np.ndarray:
        """The named array, memory-mapped read-only (an empty array for an empty store)."""
        dtype = ARRAYS[name]
        path = self.folder / f"{name}.{_SUFFIX[dtype]}"
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.column_names or name in ("input_ids", "labels"):
            raise KeyError(f"{name!r}: use token_table() for token ids")
        return self.array(name)

    def token_table(self) -> TokenTable:
        """The flat token table over the memory-mapped files (nothing is read until sliced)."""
        return TokenTable(self.array("input_ids"), self.array("offsets"), self.array("labels"),
                          self.array("label_offsets"))

    @property
    def class_ids(self) -> np.ndarray:
        """Class id per example (sampler.class_ids_from_examples): the label among the sorted labels of
        examples with answer choices; -1 without."""
        return self.array("class")


def store_key(path: Path, tokenizer: Any, settings: TokenizeSettings, versions: list[str]) -> str:
    """The cache key: tokenizer hash, template versions, settings and the file's sha256."""
    blob = json.dumps({"tokenizer": tokenizer_hash(tokenizer), "templates": sorted(set(versions)),
                       "settings": asdict(settings), "data": sha256_file(path), "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _template_versions(path: Path) -> list[str]:
    stats = path.parent / "stats.json"
    try:
        return sorted({str(t.get("version")) for t in json.loads(stats.read_text())["templates"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _line_chunks(path: Path, bar: ProgressBar | None) -> Iterator[tuple[int, list[bytes]]]:
    """(1-based number of the first line, CHUNK_LINES raw lines) over the file: parsing is the workers' job."""
    chunk: list[bytes] = []
    first = done = 0
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if not chunk:
                first = lineno
            chunk.append(raw)
            done += len(raw)
            if len(chunk) >= CHUNK_LINES:
                yield first, chunk
                chunk = []
                if bar is not None:
                    bar.update(completed=done)
    if chunk:
        yield first, chunk


def parse_examples(path: Path, first: int, lines: list[bytes]) -> list[dict]:
    """The examples of `lines` (line `first` onwards) without the held-out ones.

    Raises: DataError naming the file and the 1-based line that is not a JSON example."""
    examples = []
    for lineno, raw in enumerate(lines, first):
        if not raw.strip():
            continue
        try:
            example = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}: line {lineno}: not a JSON example: {json_problem(exc)}") from None
        if not isinstance(example, dict) or "prompt" not in example or "completion" not in example:
            raise DataError(f"{path}: line {lineno}: not an example (an object with prompt and completion)")
        if not example.get("held_out"):
            examples.append(example)
    return examples


def _label_of(example: dict) -> str | None:
    if not example.get("choices") or example.get("label") is None:
        return None
    return str(example["label"])


def encode_lines(tokenizer: Any, settings: TokenizeSettings, path: Path, first: int, lines: list[bytes]
                 ) -> dict[str, Any]:
    """encode_chunk of the examples of `lines`, with `examples` (their number) and `class_labels`
    (_label_of each example)."""
    examples = parse_examples(path, first, lines)
    return {**encode_chunk(tokenizer, settings, examples), "examples": len(examples),
            "class_labels": [_label_of(e) for e in examples]}


def _init_worker(tokenizer: Any, settings: TokenizeSettings, path: Path) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=tokenizer, settings=settings, path=path)


def _encode_in_worker(first: int, lines: list[bytes]) -> dict[str, Any]:
    return encode_lines(_worker["tokenizer"], _worker["settings"], _worker["path"], first, lines)


def _encoded(chunks: Iterator[tuple[int, list[bytes]]], path: Path, tokenizer: Any, settings: TokenizeSettings,
             num_proc: int) -> Iterator[dict[str, Any]]:
    """encode_lines per chunk, in order; by `num_proc` processes with 2 x num_proc chunks in flight."""
    if num_proc <= 1:
        for first, lines in chunks:
            yield encode_lines(tokenizer, settings, path, first, lines)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, settings, path)) as pool:
        pending: deque = deque()
        for first, lines in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (first, lines)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write(path: Path, target: Path, tokenizer: Any, settings: TokenizeSettings, num_proc: int,
           show_progress: bool) -> None:
    """Tokenize `path` into the folder `target` (written in full before meta.json)."""
    handles = {name: open(target / f"{name}.{_SUFFIX[dtype]}", "wb")  # noqa: SIM115 - closed in `finally`
               for name, dtype in ARRAYS.items()}
    stats = TokenizeStats()
    labels: dict[str, int] = {}
    token_end = label_end = rows = examples = 0
    bar = ProgressBar(f"tokenize {path.name}", total=path.stat().st_size) if show_progress else None
    try:
        np.zeros(1, np.int64).tofile(handles["offsets"])
        np.zeros(1, np.int64).tofile(handles["label_offsets"])
        for enc in _encoded(_line_chunks(path, bar), path, tokenizer, settings, max(1, num_proc)):
            (token_end + np.cumsum(enc["lengths"])).tofile(handles["offsets"])
            (label_end + np.cumsum(enc["label_lengths"])).tofile(handles["label_offsets"])
            token_end += int(enc["lengths"].sum())
            label_end += int(enc["label_lengths"].sum())
            for name in ("input_ids", "labels", "prompt_length"):
                enc[name].tofile(handles[name])
            (enc["index"] + examples).tofile(handles["index"])
            codes = [labels.setdefault(x, len(labels)) if x is not None else -1 for x in enc["class_labels"]]
            np.asarray(codes, np.int32).tofile(handles["class"])
            part: TokenizeStats = enc["stats"]
            for field in ("examples", "truncated", "dropped", "prompt_tokens", "completion_tokens"):
                setattr(stats, field, getattr(stats, field) + getattr(part, field))
            stats.dropped_ids = (stats.dropped_ids + part.dropped_ids)[:20]
            rows += len(enc["lengths"])
            examples += enc["examples"]
    finally:
        for handle in handles.values():
            handle.close()
        if bar is not None:
            bar.close()
    if labels:  # codes in order of appearance -> the index among the sorted labels
        order = np.empty(len(labels), np.int32)
        order[list(labels.values())] = np.argsort(np.argsort(list(labels.keys()))).astype(np.int32)
        codes = np.fromfile(target / "class.i32", dtype=np.int32)
        np.where(codes >= 0, order[np.maximum(codes, 0)], -1).astype(np.int32).tofile(target / "class.i32")
    (target / "meta.json").write_text(json.dumps({"rows": rows, "examples": examples, "stats": asdict(stats),
                                                  "source": str(path), "format": FORMAT}))


def open_store(folder: Path) -> TokenStore | None:
    """The store in `folder`, or None when it is not complete."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return TokenStore(folder, TokenizeStats(**meta["stats"]), int(meta["rows"]), int(meta["examples"]))


def tokenize_split(path: str | os.PathLike, tokenizer: Any, settings: TokenizeSettings,
                   cache_dir: str | os.PathLike, num_proc: int = 1, show_progress: bool = False) -> TokenStore:
    """The split file `path` tokenized into `cache_dir/<key>` (module docstring), or the store already there.

    Raises: DataError when the file is missing or a line is not an example (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (run `instructkit prepare` first)")
    folder = Path(cache_dir) / store_key(path, tokenizer, settings, _template_versions(path))
    found = open_store(folder)
    if found is not None:
        return found
    tmp = temp_folder_beside(folder)
    try:
        _write(path, tmp, tokenizer, settings, num_proc, show_progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, folder, keep_existing=True)
    store = open_store(folder)
    assert store is not None
    return store


def default_processes(requested: int | None) -> int:
    """`requested`, or every core this process may use."""
    if requested:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
