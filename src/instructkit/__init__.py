"""instructkit: instruction fine-tuning of language models, end to end.

Prompt templates (a validated built-in library, your own YAML and PromptSource files), leakage-safe data
preparation, supervised fine-tuning with completion-only loss, evaluation with confidence intervals and a
base-vs-tuned report, and a saved Hugging Face model.

The public API is re-exported here; heavy modules (torch, transformers) load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "InstructkitError": "instructkit.errors",
    "RunConfig": "instructkit.config",
    "load_config": "instructkit.config_load",
    "Template": "instructkit.templates.template",
    "TemplateLibrary": "instructkit.templates.library",
    "prepare": "instructkit.data.build",
    "load_examples": "instructkit.data.build",
    "TokenizeSettings": "instructkit.data.tokenize",
    "load_model": "instructkit.models.load",
    "save_instruct_model": "instructkit.models.save",
    "train": "instructkit.train.loop",
    "evaluate_examples": "instructkit.evaluate.evaluator",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'instructkit' has no attribute {name!r}")
