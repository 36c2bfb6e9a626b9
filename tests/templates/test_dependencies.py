"""The templates subpackage stands alone: jinja2, PyYAML, the stdlib, instructkit.errors and instructkit.io."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import instructkit.templates

TEMPLATES_DIR = Path(instructkit.templates.__file__).parent
MODULES = sorted(f"instructkit.templates.{p.stem}" for p in TEMPLATES_DIR.glob("*.py") if p.stem != "__init__")
ALLOWED_INSTRUCTKIT = {"instructkit", "instructkit.errors", "instructkit.io"}


def test_importing_every_templates_module_loads_no_ml_stack_and_no_other_room():
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heavy = [m for m in out if m.split(".")[0] in {"torch", "transformers", "datasets", "numpy", "accelerate"}]
    assert not heavy, heavy
    other_rooms = [m for m in out if m.startswith("instructkit") and m not in ALLOWED_INSTRUCTKIT
                   and not m.startswith("instructkit.templates")]
    assert not other_rooms, other_rooms


def test_library_import_does_not_load_torch():
    code = "import instructkit.templates.library, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_templates_sources_import_only_allowed_packages():
    allowed_top = {"jinja2", "yaml", "instructkit", *sys.stdlib_module_names}
    for path in sorted(TEMPLATES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed_top, f"{path.name} imports {name}"
                if name.startswith("instructkit"):
                    assert name in ALLOWED_INSTRUCTKIT or name.startswith("instructkit.templates"), (
                        f"{path.name} imports {name}")
