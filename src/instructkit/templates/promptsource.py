"""PromptSource `templates.yaml` files read as they are.

Such a file has `dataset:`/`subset:` and a `templates:` mapping of `!Template` objects with
`!TemplateMetadata`, the prompt and target in one `jinja` string split by `|||`. Its metric names map to
instructkit's, and the task family is guessed from the answer choices and metrics. The YAML tags are
read by `collection.load_collection`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2

from instructkit.errors import TemplateError
from instructkit.templates.sandbox import ENV
from instructkit.templates.schema import Schema
from instructkit.templates.template import CHOICES_SEPARATOR, Template

# PromptSource metric names -> ours, and the task family they imply.
_PS_METRICS = {
    "accuracy": "accuracy",
    "rouge": "rougeL",
    "bleu": "bleu",
    "squad": "exact_match",
    "other": None,
    "auc": None,
    "pearson correlation": None,
    "spearman correlation": None,
    "edit distance": None,
}


def load_promptsource(data: dict, origin: str) -> tuple[list[Schema], list[Template]]:
    """The schema (no declared fields) and templates of a parsed PromptSource file; `origin` names it.

    A '|||' inside a Jinja block is read as PromptSource reads it (`_prompt_and_target`).

    Raises: TemplateError naming the template when it has no `jinja`, not exactly one '|||', metadata that
    is not a mapping with a `metrics` list, or Jinja that does not compile.
    """
    dataset = str(data.get("dataset") or Path(origin).parent.name or "promptsource")
    subset = data.get("subset")
    schema_name = f"{dataset}/{subset}" if subset else dataset
    templates: list[Template] = []
    for key, raw in data["templates"].items():
        where = f"{origin}: PromptSource template {key!r}"
        if not isinstance(raw, dict) or "jinja" not in raw:
            raise TemplateError(f"{where}: expected a !Template with a `jinja` field")
        jinja = str(raw["jinja"])
        parts = jinja.split(CHOICES_SEPARATOR)
        if len(parts) != 2:
            raise TemplateError(
                f"{where}: `jinja` must hold one '|||' between prompt and target, found {len(parts) - 1}"
            )
        parts = _prompt_and_target(jinja, parts)
        meta = raw.get("metadata") or {}
        if not isinstance(meta, dict) or not isinstance(meta.get("metrics") or [], list):
            raise TemplateError(f"{where}: `metadata` must be a !TemplateMetadata mapping with a `metrics` list")
        ps_metrics = [str(m).lower() for m in meta.get("metrics") or []]
        metrics = tuple(dict.fromkeys(m for m in (_PS_METRICS.get(x) for x in ps_metrics) if m))
        choices = raw.get("answer_choices")
        task = _promptsource_task(choices, ps_metrics)
        name = str(raw.get("name", key))
        slug = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower() or str(key)
        template = Template(
            id=f"{schema_name}.{slug}",
            name=name,
            dataset=schema_name,
            task=task,
            instruction=parts[0],
            completion=parts[1],
            answer_choices=str(choices) if choices else None,
            choices_in_prompt=bool(meta.get("choices_in_prompt", False)),
            metrics=metrics,
            reference=str(raw.get("reference", "") or f"PromptSource template {raw.get('id', key)}"),
            origin=origin,
        )
        templates.append(template)
    # PromptSource files declare no schema: the fields are what the templates read, of any type.
    schema = Schema(name=schema_name, fields={}, description=f"imported from {origin}", origin=origin)
    return [schema], templates


_TARGET_MARK = "|||instructkit-promptsource-target|||"  # what the '|||' of a block-spanning template renders as


def _prompt_and_target(jinja: str, parts: list[str]) -> list[str]:
    """The instruction and completion sources of a PromptSource `jinja`: its two sides of '|||', or, where
    the '|||' lies inside a block (`{% if answer[0] != "n/a" %}... ||| {{question}}{% endif %}`, as in
    PromptSource's zest file) so that a side alone is not valid Jinja, the whole template rendered and cut at
    the '|||' for each, as PromptSource's `Template.apply` does: both render empty where the block writes
    nothing (an empty prompt: a bad row, skipped with `skip_bad_rows`)."""
    try:
        for part in parts:
            ENV.parse(part)
        return parts
    except jinja2.TemplateSyntaxError:
        pass
    mark = repr(_TARGET_MARK)
    whole = "{% set ps_rendered %}" + jinja.replace(CHOICES_SEPARATOR, _TARGET_MARK) + "{% endset %}"
    return [whole + f"{{{{ ps_rendered.split({mark})[{side}] if {mark} in ps_rendered else '' }}}}"
            for side in (0, 1)]


def _promptsource_task(choices: Any, metrics: list[str]) -> str:
    if choices:
        return "classification"
    if "squad" in metrics:
        return "extractive_qa"
    if "bleu" in metrics:
        return "translation"
    if "rouge" in metrics:
        return "summarization"
    return "generation"
