"""Time one optimizer step per update rule on the same tensors, side by side in one process.

What the memory-lean setting's step time hinges on (see README "Memory of a full fine-tune"): the cost of
an optimizer update per parameter value on this CPU, for instructkit's `train.optimizer` choices and the
low-bit optimizers of the two libraries the memory issue names (bitsandbytes, torchao). Each candidate gets
fresh parameters and gradients of the same shapes, one warm-up step (torch.compile's, for torchao, is
reported as `first_step_s`), then `--repeats` timed steps; the minimum is reported, in seconds and in
nanoseconds per value. A library that is not installed is recorded as skipped, with the reason.

    PYTHONPATH=src python benchmarks/bench_optim_step.py                 # 12 x 2048 x 2048 (50.3 M values)
    PYTHONPATH=src python benchmarks/bench_optim_step.py --shape embedding   # 262,144 x 640 (Gemma 3's)

Writes benchmarks/results/optim_step.json (one entry per shape, replaced on each run of that shape).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from instructkit.errors import InstructkitError

RESULT = Path(__file__).parent / "results" / "optim_step.json"
SHAPES = {"matrices": [(2048, 2048)] * 12, "embedding": [(262_144, 640)]}
LR = 1e-4


def _candidates() -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    from instructkit.config import TrainConfig
    from instructkit.train.optim import optimizer_factory

    def instructkit(name: str, **over: object) -> Callable:
        cfg = TrainConfig(optimizer=name, lr=LR, **over)

        def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            groups = [{"params": params, "weight_decay": cfg.weight_decay}]
            return optimizer_factory(cfg.optimizer, cfg.lr)(groups)
        return build

    def bnb_adamw8bit(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=LR)

    def torchao(cls_name: str) -> Callable:
        def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            import torchao.optim

            return getattr(torchao.optim, cls_name)(params, lr=LR)
        return build

    return {
        "instructkit adamw (torch fused AdamW)": instructkit("adamw"),
        "instructkit adamw_8bit (bitsandbytes, sliced)": instructkit("adamw_8bit"),
        "instructkit adafactor (transformers)": instructkit("adafactor"),
        "bitsandbytes AdamW8bit (unsliced)": bnb_adamw8bit,
        "torchao AdamW8bit": torchao("AdamW8bit"),
        "torchao AdamWFp8": torchao("AdamWFp8"),
    }


def _time(build: Callable, shapes: list[tuple[int, int]], repeats: int) -> dict:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    try:
        optimizer = build(params)
    except (ImportError, ModuleNotFoundError) as exc:
        return {"skipped": f"not installed: {exc}"}
    except InstructkitError as exc:  # our own refusal, e.g. the ConfigError naming the missing extra
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    start = time.perf_counter()
    optimizer.step()
    first = time.perf_counter() - start
    steps = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        steps.append(time.perf_counter() - start)
    values = sum(p.numel() for p in params)
    best = min(steps)
    return {"first_step_s": round(first, 3), "step_s": [round(s, 4) for s in steps],
            "min_step_s": round(best, 4), "ns_per_value": round(best / values * 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="matrices")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="comma-separated substrings of candidate names")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES[args.shape]
    runs = {}
    for name, build in _candidates().items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        runs[name] = _time(build, shapes, args.repeats)
        print(f"{name}: {runs[name]}", flush=True)
        gc.collect()
    fused = runs.get("instructkit adamw (torch fused AdamW)", {}).get("min_step_s")
    for run in runs.values():
        if fused and "min_step_s" in run:
            run["over_fused_adamw"] = round(run["min_step_s"] / fused, 1)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result[args.shape] = {
        "command": f"PYTHONPATH=src python benchmarks/bench_optim_step.py --shape {args.shape}",
        "shapes": shapes, "values": sum(a * b for a, b in shapes), "threads": args.threads,
        "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min": round(os.getloadavg()[0], 2), "when": time.strftime("%Y-%m-%d %H:%M"),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
