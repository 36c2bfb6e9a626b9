"""The example record: one line of train/validation/test.jsonl, and the fast encoder of those lines."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _encode_text  # ensure_ascii=False string encoder (C)
from typing import Any

from instructkit.templates.template import Rendered, Template


@dataclass(slots=True)
class Example:
    """One instruction example: a line of train/validation/test.jsonl."""

    prompt: str
    completion: str
    choices: list[str] | None
    """The rendered answer choices for classification-like templates (rank classification), else None."""
    task: str
    template_id: str
    source_id: str
    """Stable id of the source row ("<dataset>:<index>" or "<dataset>:<split>:<index>")."""
    dataset: str
    template_version: str
    label: str | None = None
    """The completion when the template has answer choices, else None."""
    metrics: list[str] = field(default_factory=list)
    held_out: bool = False
    """Held-out template or dataset (validation/test only); written only when true."""
    messages: list[dict] | None = None
    """Chat turns before the completion (chat data only); written only when present."""
    tools: list[dict] | None = None
    """Function specs the conversation may call (chat data with tool calls only); written only when present."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "completion": self.completion,
            "choices": self.choices,
            "task": self.task,
            "template_id": self.template_id,
            "source_id": self.source_id,
            "dataset": self.dataset,
            "template_version": self.template_version,
            "label": self.label,
            "metrics": self.metrics,
        }
        if self.held_out:
            out["held_out"] = True
        if self.messages is not None:
            out["messages"] = self.messages
        if self.tools:
            out["tools"] = self.tools
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        return cls(**{k: data.get(k) for k in cls.__slots__ if k in data})  # type: ignore[attr-defined]

    @classmethod
    def from_rendered(
        cls, rendered: Rendered, template: Template, source_id: str, dataset: str, held_out: bool = False
    ) -> Example:
        choices = list(rendered.choices) if rendered.choices is not None else None
        return cls(
            prompt=rendered.prompt,
            completion=rendered.completion,
            choices=choices,
            task=template.task,
            template_id=template.id,
            source_id=source_id,
            dataset=dataset,
            template_version=template.version,
            label=rendered.completion if choices is not None else None,
            metrics=list(template.effective_metrics),
            held_out=held_out,
        )


class LineEncoder:
    """JSON lines for rendered examples, identical to `json.dumps(Example.to_dict(), ensure_ascii=False)`.

    Everything that depends only on the template (task, id, version, metrics, static choices) is encoded
    once per template; per example only prompt, completion and source id are encoded.
    """

    def __init__(self) -> None:
        self._parts: dict[tuple[str, str, bool], tuple[str, str, str, str | None]] = {}
        self._choices: dict[tuple[str, ...], str] = {}

    def parts(self, template: Template, dataset: str, held_out: bool) -> tuple[str, str, str, str | None]:
        key = (template.id, dataset, held_out)
        found = self._parts.get(key)
        if found is None:
            enc = _encode_text
            a = f', "task": {enc(template.task)}, "template_id": {enc(template.id)}, "source_id": '
            b = f', "dataset": {enc(dataset)}, "template_version": {enc(template.version)}, "label": '
            metrics = json.dumps(list(template.effective_metrics), ensure_ascii=False)
            c = f', "metrics": {metrics}' + (', "held_out": true' if held_out else "") + "}\n"
            static = None
            if isinstance(template.answer_choices, tuple):
                static = json.dumps(list(template.answer_choices), ensure_ascii=False)
            elif template.answer_choices is None:
                static = "null"
            found = self._parts[key] = (a, b, c, static)
        return found

    def choices(self, choices: tuple[str, ...]) -> str:
        found = self._choices.get(choices)
        if found is None:
            found = self._choices[choices] = json.dumps(list(choices), ensure_ascii=False)
        return found


def example_line(example: Example) -> str:
    """The JSONL line of an example (general path: chat messages, ready-made data)."""
    return json.dumps(example.to_dict(), ensure_ascii=False) + "\n"
