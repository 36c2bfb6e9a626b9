"""Prompt templates as data: sandboxed Jinja, schemas, the built-in catalog, PromptSource import.

This subpackage depends on jinja2 and PyYAML only (no torch), so it is useful on its own.

Modules: `template` (Template, task families), `schema` (Schema, field types), `library`
(TemplateLibrary, check_row), `collection` (reading collection files), `promptsource` (PromptSource
files), `sandbox` (the bounded Jinja environment), `limits` (its caps and checks), `filters` (bounded
and PromptSource filters).
"""
