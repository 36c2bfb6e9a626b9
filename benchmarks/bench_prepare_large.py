"""Preparation and training at scale: a 1,000,000-row review CSV (~500 MB), one template.

    PYTHONPATH=src python benchmarks/bench_prepare.py --large [--rows N] [--train] [--keep]

The CSV is generated under a temporary folder from the 1,000 shared Fine Food rows (../shared/data):
row i is shared row i % 1000 with Id i + 1 and " (batch i // 1000)" after its Text, so every row is
distinct and the label balance is the shared file's. Then, each in a fresh process whose peak RSS is read
from the kernel (wait4 rusage):

    instructkit prepare <config>                  (split.streaming auto: the file passes 64 MB)
    instructkit train <config> train.max_steps=1  (tiny model) - with --train: first start, then a second
                                                  start with the tokenized cache in place

Figures go to benchmarks/results/prepare_large.json; the CSV is deleted unless --keep.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
FOOD = DATA / "amazon_fine_food" / "reviews.csv"
ROWS = 1_000_000
TEMPLATE = "amazon_fine_food.predict_rating"
GOALS = {"prepare_rss_gb": 1.0, "prepare_seconds": 90, "train_rss_gb": 2.5, "train_seconds": 240,
         "train_cached_seconds": 20}


def make_csv(path: Path, rows: int) -> int:
    """The generated review CSV (module docstring); its size in bytes."""
    with open(FOOD, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        base = list(reader)
    text = header.index("Text")
    with open(path, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        for i in range(rows):
            row = list(base[i % len(base)])
            row[0] = str(i + 1)
            row[text] = f"{row[text]} (batch {i // len(base)})"
            writer.writerow(row)
    return path.stat().st_size


def _tiny_model(folder: Path) -> None:
    """The tests' tiny Llama (2 layers, width 64) and byte-level BPE tokenizer, saved to `folder`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(folder)
    build_tiny_llama(tokenizer).save_pretrained(folder)


def _first_step(metrics: Path, since: float) -> bool:
    """Whether `metrics` (metrics.jsonl) holds a training step written after `since`."""
    try:
        return metrics.stat().st_mtime >= since and '"event": "train"' in metrics.read_text()
    except OSError:
        return False


def measure(command: list[str], env: dict, metrics: Path | None = None) -> dict:
    """Run `command`; its wall seconds, CPU seconds (its worker processes included), peak RSS (GB, from
    wait4: the largest of the process and its workers) and exit status. On a shared machine the CPU
    seconds say more than the wall seconds; the 1-minute load average at its start and end says how shared."""
    start, since, load = time.perf_counter(), time.time(), os.getloadavg()[0]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        first_step = None
        while True:  # until it ends; meanwhile, the moment metrics.jsonl shows the first optimizer step
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if metrics is not None and first_step is None and _first_step(metrics, since):
                first_step = round(time.perf_counter() - start, 2)
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read().decode(errors="replace")
    extra = {"first_step_seconds": first_step} if metrics is not None else {}
    return {"seconds": round(seconds, 2), **extra, "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 1024 / 1024, 3),
            "exit": os.waitstatus_to_exitcode(status), "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
            "output_tail": output[-1500:]}


def main(argv: list[str]) -> int:
    if not FOOD.exists():
        print(f"skipped: {FOOD} not found (../shared/data beside the project)")
        return 0
    rows = int(argv[argv.index("--rows") + 1]) if "--rows" in argv else ROWS
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-large-"))
    out: dict = {"benchmark": f"prepare (and train) a {rows:,}-row review CSV, one template ({TEMPLATE})",
                 "rows": rows, "goals": GOALS}
    try:
        csv_path = tmp / "reviews.csv"
        start = time.perf_counter()
        out["csv_bytes"] = make_csv(csv_path, rows)
        out["csv_seconds"] = round(time.perf_counter() - start, 1)
        model_dir = tmp / "tiny-llama"
        _tiny_model(model_dir)
        config = tmp / "large.yaml"
        config.write_text(json.dumps({
            "name": "large", "output_dir": str(tmp / "runs"),
            "datasets": [{"path": str(csv_path), "schema": "amazon_fine_food", "templates": [TEMPLATE]}],
            "split": {"seed": 0, "validation": 0.01, "test": 0.01},
            "model": {"name": str(model_dir), "max_length": 256},
            "train": {"max_steps": 1, "batch_size": 8, "threads": 1, "eval_max_examples": 16},
        }))
        cli = [sys.executable, "-m", "instructkit"]
        out["prepare"] = measure([*cli, "prepare", str(config)], env)
        stats = json.loads((tmp / "runs" / "large" / "stats.json").read_text())
        out["prepare"]["examples"] = stats["examples"]
        out["prepare"]["streaming"] = stats.get("streaming")
        out["prepare"]["stages_seconds"] = stats["seconds"]
        if "--train" in argv:
            metrics = tmp / "runs" / "large" / "metrics.jsonl"
            out["train_first"] = measure([*cli, "train", str(config)], env, metrics)
            out["train_cached"] = measure([*cli, "train", str(config)], env, metrics)
    finally:
        if "--keep" not in argv:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            out["kept"] = str(tmp)
    out["machine"] = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                      "platform": platform.platform()}
    results = ROOT / "benchmarks" / "results" / "prepare_large.json"
    from instructkit.io import write_json

    write_json(results, out)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "output_tail"} if isinstance(v, dict) else v
                      for k, v in out.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
