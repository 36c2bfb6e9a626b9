"""The house rules of docs/architecture.md, checked on the source: one-way imports between rooms, files of
one job (at most 450 lines), and a training loop whose helpers stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "instructkit"
MAX_LINES = 450

# room -> instructkit modules it must never import (prefix match on the dotted name)
FORBIDDEN = {
    "templates": ["instructkit.data", "instructkit.train", "instructkit.evaluate", "instructkit.models",
                  "instructkit.config", "instructkit.pipeline", "instructkit.cli"],
    "data": ["instructkit.train", "instructkit.evaluate", "instructkit.models", "instructkit.pipeline",
             "instructkit.cli"],
    "models": ["instructkit.train", "instructkit.evaluate", "instructkit.pipeline", "instructkit.cli"],
    "train": ["instructkit.evaluate", "instructkit.pipeline", "instructkit.cli"],
    "evaluate": ["instructkit.train", "instructkit.pipeline", "instructkit.cli"],
}
# pure-number modules of evaluate/: no model code
PURE = ["evaluate/metrics.py", "evaluate/bootstrap.py", "evaluate/metric_registry.py", "evaluate/groups.py",
        "evaluate/generation_metrics.py"]
MODEL_CODE = ("torch", "transformers", "instructkit.models", "instructkit.data.tokenize")


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_no_source_file_is_over_the_limit():
    long = {str(p.relative_to(SRC)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_one_way(room):
    bad = []
    for path in sorted((SRC / room).rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[room]):
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, "\n".join(bad)


def test_metrics_are_pure_numbers():
    bad = [f"{rel} imports {name}" for rel in PURE for name in _imports(SRC / rel)
           if any(name == m or name.startswith(m + ".") for m in MODEL_CODE)]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_entry_points():
    bad = []
    for path in _sources():
        if path.name in ("cli.py", "__main__.py"):
            continue
        for name in _imports(path):
            entry = ("instructkit.cli", "instructkit.cli_templates", "instructkit.pipeline")
            if name in entry or name.startswith(tuple(f"{e}." for e in entry)):
                if not (path.name == "cli.py"):
                    bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, "\n".join(bad)


def test_training_loop_reads_top_to_bottom():
    """train/loop.py: at most 350 lines; no function there takes more than 6 parameters or runs over 60 lines."""
    path = SRC / "train" / "loop.py"
    assert len(path.read_text().splitlines()) <= 350
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            params = [a for a in params if a.arg not in ("self", "cls")]
            count = len(params) + bool(args.vararg) + bool(args.kwarg)
            assert count <= 6, f"{node.name} takes {count} parameters"
            assert node.end_lineno - node.lineno + 1 <= 60, f"{node.name} runs over 60 lines"


@pytest.mark.parametrize("argv", [["templates", "list"], ["templates", "show", "amazon_us_reviews.predict_rating"],
                                  ["templates", "check"], ["--help"], ["train", "--help"]])
def test_light_commands_do_not_import_torch(argv):
    """`templates ...` and `--help` answer without torch, transformers or datasets (well under a second)."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "from instructkit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            f"        main({argv!r})\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate', 'peft') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1:] in ([], [""]), f"{argv} imported {done.stdout.strip()}"
