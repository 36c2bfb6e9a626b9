"""Pair the base and the tuned model's predictions, and work out what each template is.

1. **Align** the two prediction lists on ``(template_id, source_id, index)``; examples present on one
   side only are dropped and counted (``n_unpaired``); a pair whose references differ means the two
   evaluations saw different data and raises :class:`~instructkit.errors.DataError`. Pairs are grouped
   per (dataset, template) (:mod:`instructkit.evaluate.groups`, the evaluator's keys): a held-out dataset
   read through a trained template is its own group, never pooled into the trained dataset's.
2. **Template facts** (:class:`TemplateInfo`): dataset, task, held-out flag, answer choices, metric
   names, and the fixed macro-F1 class set (``macro_f1_classes``: the answer choices that occur as a
   reference), the same for base, tuned, few-shot and baselines, and the same as in eval.json.
3. **Sections**: templates the model trained on ("seen"); held-out templates of trained tasks
   ("generalisation to unseen instructions"); held-out datasets of tasks trained on other data
   ("generalisation to held-out datasets"); tasks with no training example at all ("forgetting
   checks": did fine-tuning hurt or help a task it never saw?).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from instructkit.errors import DataError
from instructkit.evaluate.groups import dataset_of, group_key, shared_templates
from instructkit.evaluate.metric_registry import macro_f1_classes

__all__ = [
    "SECTIONS",
    "SEEN",
    "UNSEEN",
    "UNSEEN_DATASET",
    "UNTRAINED",
    "PairedTemplate",
    "TemplateInfo",
    "align_predictions",
    "as_choice",
    "as_text",
    "assign_sections",
    "macro_f1_labels",
    "template_info",
    "texts",
]

log = logging.getLogger(__name__)

SEEN, UNSEEN, UNSEEN_DATASET, UNTRAINED = "seen", "unseen_instruction", "unseen_dataset", "untrained_task"
SECTIONS = (SEEN, UNSEEN, UNSEEN_DATASET, UNTRAINED)  # reading order


# ====================================================================== alignment


@dataclass
class PairedTemplate:
    """Base and tuned predictions of one (dataset, template) group, aligned example by example.

    ``key`` is the group's key in eval.json and the report (``template_id``, or ``<dataset>/<template_id>``
    for a template shared by several datasets); it defaults to ``template_id``.
    """

    template_id: str
    keys: list[tuple] = field(default_factory=list)
    base: list[dict] = field(default_factory=list)
    tuned: list[dict] = field(default_factory=list)
    n_unpaired: int = 0
    key: str = ""
    dataset: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or self.template_id


def _record_key(record: dict, side: str, i: int) -> tuple:
    """``(template_id, source_id, index)`` of a prediction record.

    Raises: DataError when the record has no ``template_id``.
    """
    if "template_id" not in record:
        raise DataError(f"{side} predictions: record {i} has no 'template_id' field")
    return (str(record["template_id"]), str(record.get("source_id")), record.get("index"))


def _keyed(records: Sequence[dict], side: str) -> dict[tuple, dict]:
    """Map each record's key to the record; a repeated key is a DataError."""
    out: dict[tuple, dict] = {}
    for i, record in enumerate(records):
        key = _record_key(record, side, i)
        if key in out:
            raise DataError(f"{side} predictions: record {i} repeats (template_id, source_id, index) = {key}")
        out[key] = record
    return out


def _sort_key(key: tuple) -> tuple:
    """Order keys by template, then index (numbers before None), then source id."""
    tid, source, index = key
    return (tid, index is None, index if isinstance(index, (int, float)) else 0, str(index), source)


def align_predictions(
    base_predictions: Sequence[dict], tuned_predictions: Sequence[dict]
) -> dict[str, PairedTemplate]:
    """Pair base and tuned predictions by ``(template_id, source_id, index)``, whatever their order.

    Returns ``{group key: PairedTemplate}`` (one per dataset and template, keyed as in eval.json, see
    :mod:`instructkit.evaluate.groups`) with both lists in the same (sorted-by-index) order.

    Raises: DataError when a record has no ``template_id``, when one side repeats a key, when a pair's
    references differ (the evaluations saw different data), or when the two sides share no key.
    """
    base, tuned = _keyed(base_predictions, "base"), _keyed(tuned_predictions, "tuned")
    shared = shared_templates([*base.values(), *tuned.values()])

    def group_of(key: tuple) -> tuple[str, str]:
        record = base.get(key) or tuned[key]
        return group_key(key[0], dataset_of(record), shared), dataset_of(record)

    paired: dict[str, PairedTemplate] = {}
    for key in sorted(set(base) & set(tuned), key=_sort_key):
        b, t = base[key], tuned[key]
        if as_text(b.get("reference")) != as_text(t.get("reference")):
            raise DataError(
                f"template {key[0]!r}, source {key[1]!r}, index {key[2]}: base and tuned predictions have "
                f"different references ({b.get('reference')!r} vs {t.get('reference')!r}); "
                "were both models evaluated on the same data file?"
            )
        name, dataset = group_of(key)
        group = paired.setdefault(name, PairedTemplate(key[0], key=name, dataset=dataset))
        group.keys.append(key)
        group.base.append(b)
        group.tuned.append(t)
    for key in set(base) ^ set(tuned):
        group = paired.get(group_of(key)[0])
        if group is not None:
            group.n_unpaired += 1
    only = sorted({group_of(k)[0] for k in set(base) ^ set(tuned)} - set(paired))
    if only:
        log.warning("templates with predictions from one model only (left out): %s", ", ".join(only))
    if not paired:
        raise DataError("base and tuned predictions share no (template_id, source_id, index) key")
    return paired


def as_text(value: Any) -> str:
    """A prediction or reference as text: None (unparseable) becomes ''."""
    return "" if value is None else str(value)


def as_choice(text: str, choices: Sequence[str] | None) -> str:
    """Map ``text`` to the answer choice it names (exact, stripped, case-insensitive), else keep it.

    References may carry the template's leading space (" 5") while predictions are choice texts.
    """
    if not choices or text in choices:
        return text
    stripped = text.strip()
    for choice in choices:
        if choice.strip() == stripped:
            return choice
    for choice in choices:
        if choice.strip().lower() == stripped.lower():
            return choice
    return text


def texts(records: Sequence[dict], key: str, choices: Sequence[str] | None) -> list[str]:
    """One field of each record as text, mapped onto the answer choices for choice templates."""
    return [as_choice(as_text(r.get(key)), choices) for r in records]


# =================================================================== template facts


@dataclass
class TemplateInfo:
    """What the report needs to know about one (dataset, template) group; ``key`` is its report key
    (default ``template_id``)."""

    template_id: str
    dataset: str
    task: str
    held_out: bool
    choices: list[str] | None
    metrics: list[str]
    section: str = SEEN
    f1_labels: list[str] | None = None  # the macro-F1 class set, fixed for every system (see macro_f1_labels)
    key: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or self.template_id

    @property
    def task_key(self) -> str:
        return f"{self.dataset}/{self.task}"


def _choices_from_records(records: Sequence[dict]) -> list[str] | None:
    """Answer choices from ``choice_logprobs`` when it is a {choice: logprob} dict."""
    for record in records:
        logprobs = record.get("choice_logprobs")
        if isinstance(logprobs, dict) and logprobs:
            return [str(c) for c in logprobs]
    return None


def _is_choice_template(records: Sequence[dict]) -> bool:
    """Rank-classified or choice-mapped predictions carry ``choice_logprobs`` or ``correct``."""
    return any(r.get("choice_logprobs") is not None or r.get("correct") is not None for r in records)


def _first_field(entries: Sequence[dict], key: str) -> Any:
    """The first non-empty ``key`` among eval.json template entries."""
    return next((e[key] for e in entries if e.get(key)), None)


def template_info(
    pair: PairedTemplate, evals: Sequence[dict], examples_by_tid: dict[str, dict]
) -> TemplateInfo:
    """Dataset, task, held-out flag, answer choices and metric names of one (dataset, template) group.

    Choices come from an example of the template (test or train data) when one is given, else from
    the predictions' ``choice_logprobs`` keys, else (a choice template with no list anywhere) from
    the sorted union of references and both models' predictions, which is at least the same set
    for both models. Metric names come from the eval.json files (the evaluator's choice, including
    overrides), else from the examples' ``metrics`` field, else a default by kind.
    """
    tid, records = pair.template_id, pair.base + pair.tuned
    first = records[0]
    example = examples_by_tid.get(tid, {})
    entries = [e.get("templates", {}).get(pair.key, {}) for e in evals]
    dataset = str(first.get("dataset") or example.get("dataset") or _first_field(entries, "dataset")
                  or "data")
    task = str(first.get("task") or example.get("task") or _first_field(entries, "task") or "task")
    held_out = any(bool(r.get("held_out")) for r in records) or any(bool(e.get("held_out")) for e in entries)
    if example.get("choices"):
        choices = [str(c) for c in example["choices"]]
    else:
        choices = _choices_from_records(records)
    if choices is None and _is_choice_template(records):
        choices = sorted({as_text(r.get(key)) for r in records for key in ("reference", "prediction")})
    metrics: list[str] = []
    for entry in entries:
        metrics += [m for m in entry.get("metrics", {}) if m not in metrics]
    if not metrics:
        metrics = list(example.get("metrics") or (["accuracy", "macro_f1"] if choices else ["rougeL"]))
    return TemplateInfo(tid, dataset, task, held_out, choices, metrics, key=pair.key)


def macro_f1_labels(choices: list[str] | None, pair: PairedTemplate) -> list[str] | None:
    """The classes macro-F1 averages over, the same for base, tuned, few-shot and baselines, and the
    same as the evaluator's (eval.json): ``macro_f1_classes`` of the references, i.e. the answer choices
    that occur as a reference, in choice order. It never depends on a model's predictions, so a class
    one model predicts and no reference has does not change the other model's figure. None for a
    template without answer choices.
    """
    if not choices:
        return None
    return macro_f1_classes(texts(pair.base, "reference", choices), choices)


def assign_sections(infos: dict[str, TemplateInfo], train_examples: Sequence[dict] | None) -> None:
    """Seen / unseen instruction / held-out dataset / untrained task, per group (in place).

    A task (dataset/task) counts as trained when a training example of it was used (train
    examples flagged ``held_out`` were not trained on); without training examples, when one of its
    groups in the evaluation is not held out. A template is unseen when it is flagged held out
    or (given training examples) has none of its own. A group of an untrained dataset/task whose
    dataset had no training example at all, but whose task family (``rating``) or template the model
    trained on with other data, is a held-out dataset (``unseen_dataset``); anything else untrained is
    a forgetting check (``untrained_task``).
    """
    trained = [e for e in train_examples or [] if not e.get("held_out")]
    if trained:
        trained_tasks = {f"{e.get('dataset')}/{e.get('task')}" for e in trained}
        trained_templates = {str(e.get("template_id")) for e in trained}
        trained_datasets = {str(e.get("dataset")) for e in trained}
        trained_families = {str(e.get("task")) for e in trained}
    else:
        used = [i for i in infos.values() if not i.held_out]
        trained_tasks = {i.task_key for i in used}
        trained_templates = {i.template_id for i in used}
        trained_datasets = {i.dataset for i in used}
        trained_families = {i.task for i in used}
    for info in infos.values():
        unseen = info.held_out or (bool(train_examples) and info.template_id not in trained_templates)
        if info.task_key in trained_tasks:
            info.section = UNSEEN if unseen else SEEN
        elif info.dataset not in trained_datasets and (
                info.task in trained_families or info.template_id in trained_templates):
            info.section = UNSEEN_DATASET
        else:
            info.section = UNTRAINED
