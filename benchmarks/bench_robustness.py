"""Robustness figures: the tests/robustness suite under the default and the slow hypothesis profile.

    PYTHONPATH=src python benchmarks/bench_robustness.py                 # default, then slow (10-20 min, 2 cores)
    PYTHONPATH=src python benchmarks/bench_robustness.py --default-only  # the CI figures only (~1 min)

Each run is a pytest subprocess with INSTRUCTKIT_ROBUSTNESS_REPORT set, so the suite's session fixture
(tests/robustness/conftest.py) writes its counters: fuzzed inputs tried per target (each hypothesis
example counted once, at its first stage), outcomes (result vs InstructkitError), injection payloads
blocked, kill/resume trials with where each kill landed. The default run is `-m "not slow"` (what CI
runs); the slow run is `-m slow`: the slow case of every fuzz test (the slow hypothesis profile, ~10x the
examples), the budget-burning sandbox payloads in every slot, 12 more kill/resume trials, and two real
`instructkit train` processes on one run directory. Crashes found and fixed (and issues reported to
their owners) come from tests/robustness/_findings.py, written as they were found.

Result: benchmarks/results/robustness.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "robustness.json"
sys.path.insert(0, str(ROOT / "tests" / "robustness"))

from _findings import FINDINGS, REPORTED  # noqa: E402


def run_suite(profile: str, timeout: int) -> dict:
    """Run tests/robustness under `profile` ("default" or "slow"); return timings, outcome and counters."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "counts.json"
        env = {**os.environ, "INSTRUCTKIT_ROBUSTNESS_REPORT": str(report), "PYTHONPATH": str(ROOT / "src"),
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("HYPOTHESIS_PROFILE", None)
        markers = "slow" if profile == "slow" else "not slow"  # each fuzz test has a default and a slow case
        command = [sys.executable, "-m", "pytest", "tests/robustness", "-q", "-p", "no:cacheprovider", "-m", markers]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        summary = next((line for line in reversed(done.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", line)),
                       done.stdout[-300:])
        counts = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"profile": profile, "markers": markers, "seconds": round(seconds, 1), "returncode": done.returncode,
            "summary": summary.strip("= "), "failed": failed[:50], **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-only", action="store_true")
    args = parser.parse_args()

    runs = {"default": run_suite("default", timeout=1800)}
    print(f"default: {runs['default']['summary']} in {runs['default']['seconds']} s, "
          f"{runs['default'].get('inputs_tried_total')} inputs", flush=True)
    if not args.default_only:
        runs["slow"] = run_suite("slow", timeout=7200)
        print(f"slow: {runs['slow']['summary']} in {runs['slow']['seconds']} s, "
              f"{runs['slow'].get('inputs_tried_total')} inputs", flush=True)

    previous = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {}
    result = {
        "what": "tests/robustness under the default (CI) and slow hypothesis profiles",
        "command": "PYTHONPATH=src python benchmarks/bench_robustness.py",
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "inputs_tried": {name: run.get("inputs_tried_total") for name, run in runs.items()},
        "payloads_blocked": {name: run.get("payloads_blocked") for name, run in runs.items()},
        "kill_resume_trials": {name: {"trials": len(run.get("kill_resume_trials", [])),
                                      "bitwise_equal": sum(t["bitwise_equal"] for t in run.get("kill_resume_trials", []))}
                               for name, run in runs.items()},
        "crashes_found_and_fixed": FINDINGS,
        "reported_not_fixed": REPORTED,
        "runs": runs,
    }
    if "slow" not in runs and "slow" in previous.get("runs", {}):  # keep the last slow figures
        result["runs"]["slow"] = previous["runs"]["slow"]
        for key in ("inputs_tried", "payloads_blocked", "kill_resume_trials"):
            result[key]["slow"] = previous[key]["slow"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")
    if any(run["returncode"] != 0 for run in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
