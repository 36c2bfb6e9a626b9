"""Template: one sandboxed Jinja prompt + completion with its answer choices and metadata; the task families
and their default metrics.

Depends on jinja2 and the standard library only, so the template library is usable without torch.
Rendering goes through the bounded sandbox (`sandbox.render_bounded`; a part of text and `{{ name }}`
only is joined without Jinja, to the same string: `sandbox.CompiledPart`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from instructkit.errors import TemplateError
from instructkit.templates.limits import render_state
from instructkit.templates.sandbox import ENV, compile_part, fields_guarded, fields_read
from instructkit.templates.schema import label_key

CHOICES_SEPARATOR = "|||"

KNOWN_EOS_MARKERS = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "<eos>",
)
"""End-of-sequence markers stripped from the end of completions and answer choices, rendered or ready-made:
tokenization appends the tokenizer's own EOS (or the chat template's end-of-turn token)."""


def strip_eos(text: str) -> tuple[str, str | None]:
    """`text` without surrounding whitespace and one trailing known EOS marker (and the marker found)."""
    text = text.strip()
    for marker in KNOWN_EOS_MARKERS:
        if text.endswith(marker):
            return text[: -len(marker)].rstrip(), marker
    return text, None


TASK_FAMILIES = (
    "classification",
    "sentiment",
    "rating",
    "nli",
    "yes_no_qa",
    "generation",
    "summarization",
    "title_generation",
    "translation",
    "extractive_qa",
    "question_generation",
    "instruction_following",
)
CHOICE_FAMILIES = frozenset({"classification", "sentiment", "rating", "nli", "yes_no_qa"})
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    **{family: ("accuracy", "macro_f1") for family in CHOICE_FAMILIES},
    "summarization": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "title_generation": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "translation": ("bleu", "chrf"),
    "extractive_qa": ("exact_match", "token_f1"),
    "generation": ("rougeL",),
    "question_generation": ("rougeL",),
    "instruction_following": ("rougeL",),
}


class LabelMap(dict):
    """A template's `label_map` as rendering reads it: a label is looked up as it is, else by `label_key`,
    the form the data check compares (5, 5.0 and "5" agree; "cafe\u0301" and "caf\u00e9" agree), so a row
    the check passes renders. A label under no key stays missing (KeyError: undefined in the template).
    Built once per template."""

    def __init__(self, names: Mapping[Any, str]):
        super().__init__(names)
        self._by_key = {label_key(k): v for k, v in names.items()}

    def __missing__(self, key: Any) -> Any:
        return self._by_key[label_key(key)]


@functools.lru_cache(maxsize=64)
def _spelling_of(choices: tuple[str, ...]) -> dict[str, str]:
    """Each choice by its NFC form; a form two choices share leads to neither."""
    forms = [unicodedata.normalize("NFC", c) for c in choices]
    return {f: c for f, c in zip(forms, choices) if forms.count(f) == 1}


def as_written_in(choices: Sequence[str] | None, completion: str) -> str:
    """`completion` as spelled in `choices` when it is the same text up to Unicode canonical equivalence
    (NFC: a label stored decomposed, "Cafe\u0301", against the choice "Caf\u00e9"), else unchanged
    (also when two choices are that text: neither is picked).

    The two spellings look the same but tokenize differently, so rank classification would never pick
    the label's spelling; the choice's is the one the model is trained and scored on. Cost: one NFC of
    `completion` when it is not a choice as written (the choices' forms are computed once per set).
    """
    if choices is None or completion in choices:
        return completion
    return _spelling_of(tuple(choices)).get(unicodedata.normalize("NFC", completion), completion)


@dataclass(frozen=True)
class Rendered:
    prompt: str
    completion: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Template:
    """One prompt template: a Jinja instruction and completion over the fields of a schema.

    Raises (on construction): TemplateError for a task outside TASK_FAMILIES, or Jinja that does not compile.
    """

    id: str
    name: str
    dataset: str
    task: str
    instruction: str
    completion: str
    answer_choices: tuple[str, ...] | str | None = None
    choices_in_prompt: bool = False
    metrics: tuple[str, ...] = ()
    reference: str = ""
    label_map: dict[Any, str] | None = None
    origin: str = "<builtin>"
    _compiled: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if self.task not in TASK_FAMILIES:
            raise TemplateError(
                f"{self.origin}: template {self.id!r}: unknown task family {self.task!r} "
                f"(one of {', '.join(TASK_FAMILIES)})"
            )
        where = f"{self.origin}: template {self.id!r}"
        self._compiled["instruction"] = compile_part(self.instruction, f"{where} (instruction)")
        self._compiled["completion"] = compile_part(self.completion, f"{where} (completion)")
        if isinstance(self.answer_choices, str):
            self._compiled["choices"] = compile_part(self.answer_choices, f"{where} (answer_choices)")
        if self.label_map is not None:
            self._compiled["label_map"] = LabelMap(self.label_map)

    @property
    def version(self) -> str:
        """The hash of the template's content: changes whenever anything that affects rendering does."""
        content = {
            "id": self.id,
            "dataset": self.dataset,
            "task": self.task,
            "instruction": self.instruction,
            "completion": self.completion,
            "answer_choices": self.answer_choices,
            "choices_in_prompt": self.choices_in_prompt,
            "label_map": {label_key(k): v for k, v in (self.label_map or {}).items()},
        }
        blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def effective_metrics(self) -> tuple[str, ...]:
        return self.metrics or DEFAULT_METRICS.get(self.task, ("rougeL",))

    @property
    def has_choices(self) -> bool:
        return self.answer_choices is not None

    @functools.cached_property
    def fields_read(self) -> frozenset[str]:
        """The row fields the instruction, completion and choices read (parsed once)."""
        sources = [self.instruction, self.completion]
        if isinstance(self.answer_choices, str):
            sources.append(self.answer_choices)
        names: set[str] = set()
        for source in sources:
            names |= fields_read(source)
        return frozenset(names - {"answer_choices", "label_map"} - set(ENV.globals))

    @functools.cached_property
    def fields_optional(self) -> frozenset[str]:
        """The fields it reads only after testing them for presence (`{% if input %}`): they may be missing."""
        sources = [self.instruction, self.completion]
        if isinstance(self.answer_choices, str):
            sources.append(self.answer_choices)
        return frozenset(self.fields_read & set().union(*(fields_guarded(s) for s in sources)))

    def render(self, row: Mapping[str, Any], seed: int | str = 0) -> Rendered:
        """Render the prompt, completion and answer choices for one row, stripped of surrounding whitespace;
        the completion and each `|||` choice also of one trailing EOS marker (`KNOWN_EOS_MARKERS`).

        `seed` makes the random helpers (`choice`, `permutation`) reproducible per row.

        Raises: TemplateError naming the template and the part (instruction, completion, answer_choices)
        when rendering fails (see `render_bounded`).
        """
        token = render_state.set({"range": 0, "seed": f"{self.id}:{seed}"})
        try:
            context = {**ENV.globals, **row}
            where = f"template {self.id!r}"
            if self.label_map is not None:
                context["label_map"] = self._compiled["label_map"]
            choices = self._render_choices(context, where)
            if choices is not None:
                context["answer_choices"] = list(choices)
            prompt = self._compiled["instruction"].render(context, f"{where} (instruction)")
            completion = self._compiled["completion"].render(context, f"{where} (completion)")
        finally:
            render_state.reset(token)
        # a completion written "{{ output }}</s>" would end with EOS twice, and never equal a generated
        # answer (TRL appends EOS only "if not text.endswith(eos_token)", trl#3091)
        return Rendered(prompt.strip(), as_written_in(choices, strip_eos(completion)[0]), choices)

    def _render_choices(self, context: dict[str, Any], where: str) -> tuple[str, ...] | None:
        if self.answer_choices is None:
            return None
        if isinstance(self.answer_choices, str):
            text = self._compiled["choices"].render(context, f"{where} (answer_choices)")
            return tuple(strip_eos(part)[0] for part in text.split(CHOICES_SEPARATOR))
        return tuple(self.answer_choices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "dataset": self.dataset,
            "task": self.task,
            "instruction": self.instruction,
            "completion": self.completion,
            "answer_choices": list(self.answer_choices)
            if isinstance(self.answer_choices, tuple)
            else self.answer_choices,
            "choices_in_prompt": self.choices_in_prompt,
            "metrics": list(self.effective_metrics),
            "reference": self.reference,
            "version": self.version,
            "origin": self.origin,
        }
