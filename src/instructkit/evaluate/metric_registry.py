"""The named metrics: :data:`METRICS` maps metric names to :class:`MetricSpec` records.

:func:`get_metric` and :func:`compute` look a metric up by name; :func:`macro_f1_metric` builds a
macro-F1 spec over a fixed label set. Each spec also says how ``instructkit.evaluate.bootstrap``
resamples it.

Scales: accuracy, F1, exact match and ROUGE are fractions in [0, 1] (``scale=1``);
BLEU and chrF are on sacrebleu's 0-100 scale (``scale=100``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from instructkit.evaluate.generation_metrics import (
    ROUGE_KEYS,
    _bleu,
    _chrf,
    _rouge_key_mean,
    _rouge_key_per_example,
    _sacrebleu_resampler,
    chrf,
    corpus_bleu,
)
from instructkit.evaluate.metrics import (
    MetricFn,
    PerExampleFn,
    ResamplerFactory,
    _accuracy_per_example,
    _check_pair,
    _exact_match_per_example,
    _macro_f1_resampler,
    _token_f1_per_example,
    accuracy,
    exact_match,
    macro_f1,
    token_f1,
)

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "MetricSpec",
    "compute",
    "get_metric",
    "macro_f1_classes",
    "macro_f1_metric",
]


@dataclass(frozen=True)
class MetricSpec:
    """A named metric and how to bootstrap it.

    Attributes:
        name: registry name.
        fn: ``(preds, refs) -> float``, the metric on a whole dataset.
        per_example: ``(preds, refs) -> np.ndarray`` of per-example scores whose mean
            is ``fn``; ``None`` for corpus-level metrics.
        corpus: True when the metric is not a mean of per-example scores
            (BLEU, chrF, macro-F1); exactly one of ``corpus`` and ``per_example`` is set.
        higher_is_better: direction of improvement (False for an error rate such as TER): the one
            place a registered metric's direction is written (``HIGHER_IS_BETTER``).
        scale: 1 for fractions in [0, 1], 100 for 0-100 scores.
        resampler: optional fast path for the bootstrap of a corpus metric:
            ``(preds, refs) -> (index matrix (R, n) -> R scores)``. Without it the
            bootstrap calls ``fn`` once per resample.

    Raises: ValueError unless exactly one of ``corpus`` and ``per_example`` is set, or when
    ``scale`` is not 1 or 100.
    """

    name: str
    fn: MetricFn
    per_example: PerExampleFn | None = None
    corpus: bool = False
    higher_is_better: bool = True
    scale: Literal[1, 100] = 1
    resampler: ResamplerFactory | None = None

    def __post_init__(self) -> None:
        if self.corpus == (self.per_example is not None):
            raise ValueError(
                f"metric {self.name!r}: set exactly one of corpus=True or per_example"
            )
        if self.scale not in (1, 100):
            raise ValueError(f"metric {self.name!r}: scale must be 1 or 100, got {self.scale}")


def macro_f1_classes(refs: Sequence[str], choices: Sequence[str] | None = None) -> list[str]:
    """THE class set macro-F1 averages over, wherever a macro-F1 of predictions is reported: the
    evaluator's eval.json, the report (base, tuned, few-shot; per template and per task group) and the
    baselines.

    The classes that occur among the references: the answer ``choices`` that are some reference, in
    choice order, then any reference that is not a choice (sorted). It depends on the data only, never on
    a system's predictions, so every system on the same examples is averaged over the same classes and
    one model's macro-F1 is the same number in eval.json and report.json. A prediction of a class absent
    from the references still costs the recall of the example's true class; a choice that no reference
    has would add F1 = 0 (or an arbitrary convention) to every system alike, so it is left out.

    Example: choices 1..5, references {1, 2, 3}, a model that never predicts "3" and sometimes "5":
    classes = [1, 2, 3]; F1("3") = 0, "5" predictions count against the recall of their true class.
    """
    present = set(refs)
    listed = list(dict.fromkeys(choices or []))
    return [c for c in listed if c in present] + sorted(present - set(listed))


def macro_f1_metric(labels: Sequence[str]) -> MetricSpec:
    """A macro-F1 :class:`MetricSpec` over the classes of ``labels`` (e.g. ``macro_f1_classes``) that occur
    among the references it scores, usable with ``bootstrap_ci`` and ``paired_bootstrap_diff``
    (``instructkit.evaluate.bootstrap``). On the data the labels come from that is every label; on a
    bootstrap resample that misses a rare class, the class is left out instead of counting F1 = 0
    (``_macro_f1_resampler``), so every resample is scored as the data it is. No listed class among the
    references: 0."""
    label_list = list(labels)

    def fn(preds: Sequence[str], refs: Sequence[str]) -> float:
        present = set(refs)
        classes = [label for label in label_list if label in present]
        if not classes:
            _check_pair(preds, refs)
            return 0.0
        return macro_f1(preds, refs, labels=classes)

    return MetricSpec(
        "macro_f1", fn, corpus=True, resampler=_macro_f1_resampler(label_list)
    )


def _build_registry() -> dict[str, MetricSpec]:
    """All named metrics."""
    specs = [
        MetricSpec("accuracy", accuracy, per_example=_accuracy_per_example),
        MetricSpec("macro_f1", macro_f1, corpus=True, resampler=_macro_f1_resampler()),
        MetricSpec("exact_match", exact_match, per_example=_exact_match_per_example),
        MetricSpec("token_f1", token_f1, per_example=_token_f1_per_example),
        *(
            MetricSpec(key, _rouge_key_mean(key), per_example=_rouge_key_per_example(key))
            for key in ROUGE_KEYS
        ),
        MetricSpec(
            "bleu", corpus_bleu, corpus=True, scale=100, resampler=_sacrebleu_resampler(_bleu)
        ),
        MetricSpec("chrf", chrf, corpus=True, scale=100, resampler=_sacrebleu_resampler(_chrf)),
    ]
    return {spec.name: spec for spec in specs}


METRICS: dict[str, MetricSpec] = _build_registry()

HIGHER_IS_BETTER: dict[str, bool] = {name: spec.higher_is_better for name, spec in METRICS.items()}
"""Each registered metric's direction, as its spec declares it: the `declared` directions that
``instructkit.metric_direction.lower_is_better`` takes (validation, early stopping, the report)."""


def get_metric(name: str) -> MetricSpec:
    """The registered :class:`MetricSpec` called ``name``.

    Raises: ValueError (listing the valid names) when ``name`` is not registered.
    """
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(METRICS))
        raise ValueError(f"unknown metric {name!r}; valid names: {valid}") from None


def compute(name: str, preds: Sequence[str], refs: Sequence[str]) -> float:
    """Compute the registered metric ``name`` on ``preds`` against ``refs``.

    Raises: ValueError when ``name`` is not registered, and what the metric itself raises on bad input.
    """
    return get_metric(name).fn(preds, refs)
