"""The training-curve plot never puts a count on the axis of 0-1 metrics (issue: `val_label_tokens`, 120,
flattened accuracy and macro-F1 to zero)."""

from __future__ import annotations

from instructkit.evaluate.plots import fraction_scale, plot_training, training_figure
from instructkit.evaluate.training_log import is_counter, task_metric_keys

RECORDS = [
    {"event": "train", "step": 1, "loss": 2.0, "tokens": 900, "label_tokens": 40, "tokens_per_s": 850.0},
    {"event": "eval", "step": 2, "val_loss": 1.5, "val_ppl": 4.48, "val_label_tokens": 120, "accuracy": 0.35,
     "macro_f1": 0.30, "bleu": 11.5, "val_token_f1": 0.4, "n_examples": 40},
    {"event": "train", "step": 3, "loss": 1.2, "tokens": 1900, "label_tokens": 38, "tokens_per_s": 840.0},
    {"event": "eval", "step": 4, "val_loss": 1.1, "val_ppl": 3.0, "val_label_tokens": 120, "accuracy": 0.5,
     "macro_f1": 0.45, "bleu": 14.0, "val_token_f1": 0.5, "n_examples": 40},
]


def _panels(records):
    fig = training_figure(records)
    return {ax.get_title(): ({line.get_label() for line in ax.get_lines()}, ax.get_ylim()) for ax in fig.axes}


def test_counts_are_not_task_metrics():
    assert task_metric_keys(RECORDS) == ["accuracy", "macro_f1", "bleu", "val_token_f1"]
    assert all(is_counter(k) for k in ("val_label_tokens", "label_tokens", "n_examples", "tokens_per_s"))
    assert not any(is_counter(k) for k in ("accuracy", "macro_f1", "bleu", "val_token_f1"))


def test_each_scale_has_its_own_axis_and_counts_none():
    panels = _panels(RECORDS)
    assert set(panels) == {"Loss", "Validation task metrics (0-1)", "Validation task metrics (other scales)"}
    fractions, ylim = panels["Validation task metrics (0-1)"]
    assert fractions == {"accuracy", "macro_f1", "val_token_f1"}
    assert ylim == (-0.02, 1.02)
    assert panels["Validation task metrics (other scales)"][0] == {"bleu"}
    drawn = set().union(*(labels for labels, _ in panels.values()))
    assert not drawn & {"val_label_tokens", "n_examples", "label_tokens", "tokens_per_s"}
    assert plot_training(RECORDS)[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_fraction_metrics_give_one_metric_panel():
    records = [{k: v for k, v in r.items() if k != "bleu"} for r in RECORDS]
    assert set(_panels(records)) == {"Loss", "Validation task metrics (0-1)"}


def test_fraction_scale_by_registry_then_by_values():
    assert fraction_scale(RECORDS, "accuracy") and not fraction_scale(RECORDS, "bleu")
    assert fraction_scale(RECORDS, "val_token_f1")  # unknown name, logged values in [0, 1]
    assert not fraction_scale([{"step": 1, "val_score": 3.5}], "val_score")


def test_class_weighted_training_also_draws_the_loss_validation_measures():
    assert _panels(RECORDS)["Loss"][0] == {"train loss", "validation loss"}
    weighted = [{**r, "unweighted_loss": r["loss"] - 0.3} if r["event"] == "train" else r for r in RECORDS]
    assert _panels(weighted)["Loss"][0] == {"train loss (class-weighted)", "train loss (unweighted, as validation)",
                                            "validation loss"}
    assert "unweighted_loss" not in task_metric_keys(weighted)
