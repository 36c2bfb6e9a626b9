"""GGUF export: time and file size per quant type for the real SmolLM2-135M-Instruct (and Gemma-3-270M
when its package is installed), 1 thread.

    PYTHONPATH=src python benchmarks/bench_export.py

The model is loaded once through the registry and saved as an instruct model (as a run saves it); each
quant type is then exported from that folder by `export_model`, which loads the folder again, writes the
vocabulary and quantizes the weights in numpy. Reported: wall seconds and CPU seconds of the process (the
machine is shared: CPU time is the steadier figure), file size. Result: benchmarks/results/export.json.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from instructkit.config import ModelConfig
from instructkit.errors import ModelError
from instructkit.io import write_json
from instructkit.models.export import QUANT_TYPES, export_model
from instructkit.models.load import load_model, set_threads
from instructkit.models.save import save_instruct_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]


def bench_model(name: str, tmp: Path) -> dict | None:
    try:
        loaded = load_model(ModelConfig(name=name))
    except ModelError as exc:
        print(f"skipped {name}: {exc}")
        return None
    folder = tmp / name
    save_instruct_model(loaded.model, loaded.tokenizer, folder, card={"provenance": loaded.provenance},
                        train_config=None)
    params = sum(p.numel() for p in loaded.model.parameters())
    del loaded
    rows = {}
    for quant in QUANT_TYPES:
        out = tmp / f"{name}.{quant}.gguf"
        wall, cpu = time.perf_counter(), time.process_time()
        export_model(folder, out, quant=quant)
        rows[quant] = {"seconds": round(time.perf_counter() - wall, 2),
                       "cpu_seconds": round(time.process_time() - cpu, 2),
                       "bytes": out.stat().st_size, "MB": round(out.stat().st_size / 1e6, 1)}
        print(name, quant, rows[quant], flush=True)
        out.unlink()
    return {"parameters": params, "quants": rows}


def main() -> int:
    set_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for name in MODELS:
            row = bench_model(name, Path(tmp))
            if row is not None:
                results[name] = row
    write_json(ROOT / "benchmarks" / "results" / "export.json", {
        "benchmark": "export_model(saved instruct model -> GGUF), per quant type, 1 thread",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python {sys.version.split()[0]}",
        "models": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
