"""Prompt templates as data: sandboxed Jinja, schemas, the built-in catalog, PromptSource import.

This subpackage depends on jinja2 and PyYAML only (no torch), so it is useful on its own.
"""

from instructkit.templates.library import Problem, TemplateLibrary, load_collection
from instructkit.templates.template import (
    DEFAULT_METRICS,
    MAX_RENDER_CHARS,
    TASK_FAMILIES,
    Rendered,
    Schema,
    Template,
)

__all__ = [
    "DEFAULT_METRICS",
    "MAX_RENDER_CHARS",
    "TASK_FAMILIES",
    "Problem",
    "Rendered",
    "Schema",
    "Template",
    "TemplateLibrary",
    "load_collection",
]
