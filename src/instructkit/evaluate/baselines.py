"""Trivial and classical baselines that sit beside the models in the comparison report.

A fine-tuned model is only impressive next to what a cheap method achieves on the same test
examples. Two families, both without torch:

* **classification** (templates with answer choices), trained on the TRAINING split:

  - ``majority``: always answer the most common training label of the template
    (on the rating data 64% of the reviews are five-star, so "always 5" scores accuracy 0.64 but
    macro-F1 only 0.156 = F1 of the "5" class (2 * 0.64 / 1.64 = 0.78) / 5 classes);
  - ``tfidf_lr``: TF-IDF over word 1-2 grams with sublinear tf (``1 + log(tf)``), then a
    logistic regression with ``class_weight="balanced"`` (each class weighted
    ``n / (n_classes * n_class)``, so rare stars count as much as the common one), fitted on the
    training prompts -> labels and predicting the test prompts.

  A template with no training example (a held-out instruction) borrows the pooled training
  examples of the same dataset and task whose label is one of its answer choices; if there are
  none, it is skipped and the reason is recorded.

* **generation**: the answer you get without any model.

  - ``lead_sentence`` (summarization, extractive QA): the first sentence of the main input;
  - ``first_10_words`` (title generation): the first 10 words of that first sentence;
  - ``copy_source`` (translation): the source text itself, unchanged (chrF rewards shared
    names and numbers, so this is not zero).

  The *main input* of a prompt (``instructkit.evaluate.main_input``) is the text that varies between
  the prompts of a template, e.g. the article of a summarization template.

:func:`baseline_predictions` runs both families; :func:`score_baselines` scores them with the same
metrics (and bootstrap confidence intervals) as the models.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from instructkit.errors import DataError
from instructkit.evaluate.bootstrap import bootstrap_ci
from instructkit.evaluate.main_input import first_sentence, main_inputs
from instructkit.evaluate.metric_registry import METRICS, MetricSpec, macro_f1_classes, macro_f1_metric

__all__ = [
    "BaselineResult",
    "baseline_predictions",
    "classification_baselines",
    "generation_baselines",
    "gold_choice",
    "score_baselines",
]

log = logging.getLogger(__name__)

TITLE_WORDS = 10  # gigaword headlines average ~8-9 words

# task family -> (baseline name, how to turn the main input into a prediction)
_GENERATION_TASKS: dict[str, str] = {
    "summarization": "lead_sentence",
    "extractive_qa": "lead_sentence",
    "title_generation": f"first_{TITLE_WORDS}_words",
    "translation": "copy_source",
}


# ------------------------------------------------------------------------- labels


def gold_choice(example: dict) -> str:
    """The answer choice an example's completion names.

    The completion may carry the leading space a template puts before the answer (" 5"); it is
    matched to the choices exactly, then stripped, then case-insensitively.
    Raises DataError (naming the template and source row) when it matches none.
    """
    completion = str(example.get("completion", example.get("reference", "")))
    choices = [str(c) for c in example.get("choices") or []]
    for candidate in (completion, completion.strip()):
        if candidate in choices:
            return candidate
    lowered = {c.strip().lower(): c for c in choices}
    match = lowered.get(completion.strip().lower())
    if match is None:
        raise DataError(
            f"template {example.get('template_id')!r}, source {example.get('source_id')!r}: completion "
            f"{completion!r} is not one of the answer choices {choices}"
        )
    return match


def _by_template(examples: Sequence[dict]) -> dict[str, list[dict]]:
    """Group examples by their report group (``group``: a (dataset, template) key, see
    ``instructkit.evaluate.groups``), else by template_id, keeping input order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for example in examples:
        groups[str(example.get("group") or example["template_id"])].append(example)
    return dict(groups)


def _majority(labels: Sequence[str], choices: Sequence[str]) -> str:
    """Most common label; ties go to the label listed first in ``choices`` (deterministic)."""
    counts = Counter(labels)
    best = max(counts.values())
    for choice in choices:
        if counts.get(choice, 0) == best:
            return choice
    return sorted(label for label, n in counts.items() if n == best)[0]


def _tfidf_lr(
    train_prompts: Sequence[str], train_labels: Sequence[str], test_prompts: Sequence[str], seed: int
) -> list[str]:
    """TF-IDF (word 1-2 grams, sublinear tf) + class-balanced logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed),
    )
    model.fit(list(train_prompts), list(train_labels))
    return [str(p) for p in model.predict(list(test_prompts))]


def _training_pool(
    tid: str, test_group: list[dict], train_by_tid: dict[str, list[dict]], train: Sequence[dict]
) -> tuple[list[dict], str]:
    """The training examples a template's baselines learn from, and where they come from.

    Its own training examples when it has any (those of its template, whatever the dataset of the
    test group: a held-out dataset read through a trained template is served by that template's
    training examples, as the model was); otherwise (held-out template) the training examples of the
    same dataset and task whose gold label is one of its answer choices.
    """
    first = test_group[0]
    template_id = str(first.get("template_id", tid))
    if template_id in train_by_tid:
        return train_by_tid[template_id], "template"
    choices = set(str(c) for c in first.get("choices") or [])
    pooled = []
    for example in train:
        if example.get("dataset") != first.get("dataset") or example.get("task") != first.get("task"):
            continue
        if not example.get("choices"):
            continue
        label = gold_choice(example)
        if label in choices:
            pooled.append(example)
    return pooled, "pooled dataset/task"


def _classification_baselines(
    train_examples: Sequence[dict], test_examples: Sequence[dict], seed: int
) -> tuple[dict[str, dict[str, list[str]]], dict[str, str]]:
    """Predictions of the classification baselines and the reasons for skipped templates.

    Training examples flagged ``held_out`` are ignored: the model never trained on them either.
    """
    train_examples = [e for e in train_examples if not e.get("held_out")]
    train_by_tid: dict[str, list[dict]] = defaultdict(list)
    for example in train_examples:
        if example.get("choices"):
            train_by_tid[str(example["template_id"])].append(example)
    predictions: dict[str, dict[str, list[str]]] = {}
    skipped: dict[str, str] = {}
    for tid, group in _by_template([e for e in test_examples if e.get("choices")]).items():
        pool, origin = _training_pool(tid, group, train_by_tid, train_examples)
        if not pool:
            first = group[0]
            skipped[tid] = (
                f"no training examples of template {tid!r} nor of {first.get('dataset')}/"
                f"{first.get('task')} with its answer choices"
            )
            log.info("classification baselines skipped for %s: %s", tid, skipped[tid])
            continue
        choices = [str(c) for c in group[0]["choices"]]
        labels = [gold_choice(e) for e in pool]
        majority = _majority(labels, choices)
        predictions[tid] = {"majority": [majority] * len(group)}
        if len(set(labels)) < 2:
            skipped[f"{tid}:tfidf_lr"] = f"only one class ({majority!r}) in the training examples"
        else:
            predictions[tid]["tfidf_lr"] = _tfidf_lr(
                [e["prompt"] for e in pool], labels, [e["prompt"] for e in group], seed
            )
        if origin != "template":
            log.info("baselines of held-out template %s trained on %d pooled examples", tid, len(pool))
    return predictions, skipped


def classification_baselines(
    train_examples: Sequence[dict], test_examples: Sequence[dict], *, seed: int = 0
) -> dict[str, dict[str, list[str]]]:
    """``{template_id: {"majority": [...], "tfidf_lr": [...]}}`` for every template with choices.

    ``predictions[tid][name][i]`` is the answer for the i-th example of template ``tid`` in
    ``test_examples`` order. Templates that cannot be served are left out (see
    :func:`baseline_predictions` for the reasons).

    Raises: DataError when a choice example's completion is not one of its answer choices.
    """
    return _classification_baselines(train_examples, test_examples, seed)[0]


# --------------------------------------------------------------------- generation


def _generation_prediction(name: str, main_input: str) -> str:
    """Apply the named trivial baseline to a main input."""
    if name == "copy_source":
        return main_input
    if name == "lead_sentence":
        return first_sentence(main_input)
    if name == f"first_{TITLE_WORDS}_words":
        return first_sentence(main_input, max_words=TITLE_WORDS)
    raise ValueError(f"unknown generation baseline {name!r}")


def generation_baselines(test_examples: Sequence[dict]) -> dict[str, dict[str, list[str]]]:
    """``{template_id: {name: [prediction, ...]}}`` for generation templates whose task has a
    trivial baseline (summarization, extractive_qa, title_generation, translation); other
    generation tasks (open generation, instruction following, question generation) have none."""
    predictions: dict[str, dict[str, list[str]]] = {}
    for tid, group in _by_template([e for e in test_examples if not e.get("choices")]).items():
        name = _GENERATION_TASKS.get(str(group[0].get("task")))
        if name is None:
            continue
        inputs = main_inputs([str(e["prompt"]) for e in group])
        predictions[tid] = {name: [_generation_prediction(name, text) for text in inputs]}
    return predictions


# ------------------------------------------------------------------ run and score


@dataclass
class BaselineResult:
    """Baseline predictions for the test examples, and what could not be run.

    Attributes:
        predictions: ``{template_id: {baseline name: [prediction per test example]}}``.
        references: ``{template_id: [reference per test example]}`` in the same order (the gold
            choice for choice templates, the stripped completion otherwise).
        skipped: ``{template_id or "template_id:baseline": reason}``.
    """

    predictions: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _reference(example: dict) -> str:
    """Gold choice for choice templates, the stripped completion otherwise."""
    if example.get("choices"):
        return gold_choice(example)
    return str(example.get("completion", example.get("reference", ""))).strip()


def baseline_predictions(
    train_examples: Sequence[dict] | None, test_examples: Sequence[dict], *, seed: int = 0
) -> BaselineResult:
    """Run every baseline that applies; classification ones need ``train_examples``.

    Raises: DataError when a choice example's completion is not one of its answer choices.
    """
    result = BaselineResult()
    if train_examples:
        result.predictions, result.skipped = _classification_baselines(train_examples, test_examples, seed)
    else:
        for tid in _by_template([e for e in test_examples if e.get("choices")]):
            result.skipped[tid] = "no training examples given"
    result.predictions.update(generation_baselines(test_examples))
    for tid, group in _by_template(test_examples).items():
        if tid in result.predictions:
            result.references[tid] = [_reference(e) for e in group]
    return result


def score_baselines(
    result: BaselineResult,
    metrics_by_template: dict[str, list[str]],
    *,
    labels_by_template: dict[str, list[str]] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{template_id: {baseline: {metric: {"value", "low", "high"}}}}``: each metric with its
    percentile-bootstrap 95% CI. macro_f1 averages over ``macro_f1_classes(references, choices)`` (the
    one class-set definition, as for the models), with the template's answer choices (or class set) from
    ``labels_by_template`` when it has them.

    Raises: ValueError when a template's predictions and references differ in length or are empty.
    """
    labels_by_template = labels_by_template or {}
    scores: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for tid, by_name in result.predictions.items():
        refs = result.references[tid]
        for name, preds in by_name.items():
            for metric in metrics_by_template.get(tid, []):
                classes = macro_f1_classes(refs, labels_by_template.get(tid)) if metric == "macro_f1" else None
                spec = metric_spec(metric, classes)
                if spec is None:
                    continue
                value, low, high = bootstrap_ci(spec, preds, refs, n_resamples=n_resamples, seed=seed)
                scores.setdefault(tid, {}).setdefault(name, {})[metric] = {
                    "value": value, "low": low, "high": high,
                }
    return scores


def metric_spec(name: str, labels: Sequence[str] | None = None) -> MetricSpec | None:
    """The MetricSpec for ``name``: macro_f1 over a fixed label set when ``labels`` is given;
    ``None`` (with a log line) for a name the metrics registry does not know (e.g. perplexity,
    which is reported separately)."""
    if name == "macro_f1" and labels:
        return macro_f1_metric(labels)
    if name not in METRICS:
        log.info("metric %r is not a per-prediction metric; not bootstrapped", name)
        return None
    return METRICS[name]
