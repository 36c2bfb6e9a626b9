"""Robustness suite: hypothesis profiles, the counters report, and the shared tiny-model builders.

Hypothesis profiles (registered in _robust.py):
    instructkit-robust        default: bounded so the suite's default tests take < 60 s; derandomized
    instructkit-robust-slow   ~10x the examples: the `slow` case of every fuzz test (marked slow), or every
                              case when HYPOTHESIS_PROFILE=slow

    PYTHONPATH=src python -m pytest tests/robustness -q -m "not slow"       # CI: default profile
    PYTHONPATH=src python -m pytest tests/robustness -q -m slow             # the slow profile, long trials
    INSTRUCTKIT_ROBUSTNESS_REPORT=counts.json PYTHONPATH=src python -m pytest tests/robustness -q

Note on the module name: pytest imports every conftest.py outside a package as the module `conftest`,
so while this directory is collected `import conftest` finds THIS file. The plain builders of
tests/conftest.py are re-exported here so `from conftest import build_tiny_llama` keeps working for
every test module collected after this one.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

import _robust

_ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
_spec = importlib.util.spec_from_file_location("_instructkit_tests_root_conftest", _ROOT_CONFTEST)
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)  # type: ignore[union-attr]

# Every plain public name of tests/conftest.py (builders, constants), not its fixtures: pytest registers
# those from that file itself, and a second copy here would build the session fixtures twice.
for _name, _value in vars(_root).items():
    if not _name.startswith(("_", "pytest_")) and not hasattr(_value, "_fixture_function_marker") \
            and _name not in globals():
        globals()[_name] = _value
build_tiny_llama = _root.build_tiny_llama  # named for readers and linters; the loop above already set them
build_tiny_t5 = _root.build_tiny_t5
build_tiny_tokenizer = _root.build_tiny_tokenizer

REPORT_ENV = "INSTRUCTKIT_ROBUSTNESS_REPORT"


@pytest.fixture(scope="session", autouse=True)
def robustness_report():
    """At the end of the session, write the counters to $INSTRUCTKIT_ROBUSTNESS_REPORT (when set)."""
    yield
    target = os.environ.get(REPORT_ENV)
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_robust.report(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
