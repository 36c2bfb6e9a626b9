"""Which way a metric improves: the one answer for the best weights and early stopping (train/tracking.py)
and for the report's best validation value and its coloured differences (evaluate/).

In this order:

1. an explicit setting: `train.early_stopping.greater_is_better` for the metric it names (transformers'
   `greater_is_better`), for a metric whose name says nothing ("ter", "wer", "mae", "score");
2. the direction declared where the metric is defined, passed as `declared` ({name: higher is better}):
   `MetricSpec.higher_is_better` of every metric in evaluate/metric_registry.py (validation's task metrics
   and the report's), the training loop's own `val_loss` and `val_ppl` (train/tracking.LOOP_METRICS);
3. the metric's own name: the part after the last "/" (task metrics come as "<dataset>/<template_id>/<metric>",
   and a dataset or template named "apple_reviews" or "glossary_qa" says nothing of the direction) ending in
   "loss", "ppl" or "perplexity" is lower-is-better; any other name higher-is-better.

No torch and no instructkit import: train/ and evaluate/ both use it and never import each other.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["LOWER_IS_BETTER_SUFFIXES", "declared_direction", "lower_is_better"]

LOWER_IS_BETTER_SUFFIXES = ("loss", "ppl", "perplexity")


def declared_direction(metric: str, declared: Mapping[str, bool] | None) -> bool | None:
    """True / False when `declared` gives the metric's direction (higher is better?) under its full name or
    its own name (after the last "/"); None when it does not."""
    for key in (metric, metric.rsplit("/", 1)[-1]):
        if declared and key in declared:
            return bool(declared[key])
    return None


def lower_is_better(metric: str, greater_is_better: bool | None = None,
                    declared: Mapping[str, bool] | None = None) -> bool:
    """True when a lower value of `metric` is the better one: `greater_is_better` when set, else the
    `declared` direction ({name: higher is better}), else the name (module docstring).

    >>> lower_is_better("val_loss"), lower_is_better("macro_f1"), lower_is_better("ter")
    (True, False, False)
    >>> lower_is_better("ter", greater_is_better=False), lower_is_better("t/ter", declared={"ter": False})
    (True, True)
    """
    if greater_is_better is not None:
        return not greater_is_better
    higher = declared_direction(metric, declared)
    if higher is not None:
        return not higher
    return metric.rsplit("/", 1)[-1].lower().endswith(LOWER_IS_BETTER_SUFFIXES)
