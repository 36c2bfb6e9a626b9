"""The report's four plots as PNG bytes: deltas with CIs, training curves, confusion matrices, systems.

matplotlib on the Agg canvas, without pyplot state or a global backend switch. Each function returns
``None`` when it has nothing to draw. Values are drawn in points: fractions x100, 0-100 scores (BLEU,
chrF) as they are.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from instructkit.evaluate.compare import improvement, main_metric
from instructkit.evaluate.metric_registry import METRICS
from instructkit.evaluate.pairing import SEEN
from instructkit.evaluate.training_log import series, task_metric_keys

__all__ = ["MAX_CONFUSION_LABELS", "fraction_scale", "plot_confusion", "plot_deltas", "plot_systems",
           "plot_training"]

MAX_CONFUSION_LABELS = 12  # larger label sets are listed in the JSON but not plotted


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    """PNG bytes of a figure, without matplotlib's software/URL metadata."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _points(metric: str) -> float:
    """Multiplier to percentage points: fractions x100, 0-100 scores (BLEU, chrF) x1."""
    spec = METRICS.get(metric)
    return 1.0 if spec is not None and spec.scale == 100 else 100.0


def _delta_rows(report: dict[str, Any], main_only: bool) -> list[tuple[str, float, float, float, bool, bool]]:
    """(label, delta, low, high, significant, better) in points for the delta chart; `better`: the change is
    for the better in the metric's direction (compare.improvement)."""
    rows = []
    for tid, entry in report["templates"].items():
        names = list(entry["metrics"])
        if main_only:
            main = main_metric(names, entry["task"], bool(entry["labels"]))
            names = [main] if main else []
        for name in names:
            d = entry["metrics"][name]["delta"]
            k = _points(name)
            marker = "" if entry["section"] == SEEN else " †"
            label = f"{tid} · {name}{marker}"
            rows.append((label, d["delta"] * k, d["low"] * k, d["high"] * k, d["significant"],
                         improvement(name, d["delta"])))
    return rows


def plot_deltas(report: dict[str, Any]) -> bytes | None:
    """Horizontal bars: delta (tuned - base) per template and metric, with the paired 95% CI.

    Green / red when the CI excludes 0 (better / worse in the metric's direction), grey otherwise. With
    more than 40 bars only each template's main metric is drawn.
    """
    rows = _delta_rows(report, main_only=False)
    if len(rows) > 40:
        rows = _delta_rows(report, main_only=True)
    if not rows:
        return None
    fig = _figure(9, 1.2 + 0.32 * len(rows))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    deltas = [r[1] for r in rows]
    err = [[max(0.0, r[1] - r[2]) for r in rows], [max(0.0, r[3] - r[1]) for r in rows]]
    colours = ["#2e7d32" if r[4] and r[5] else "#c62828" if r[4] else "#9e9e9e" for r in rows]
    ax.barh(ys, deltas, xerr=err, color=colours, ecolor="#333333", capsize=3, height=0.6)
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("tuned - base (points: fractions x100; BLEU/chrF as is), 95% paired bootstrap CI")
    ax.set_title("Change from fine-tuning († = held-out template or task)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def fraction_scale(records: Sequence[dict], key: str) -> bool:
    """True when `key` is a score in [0, 1] (accuracy, macro-F1, ROUGE; an unknown key whose logged values
    all lie in [0, 1]); False for 0-100 scores (BLEU, chrF) and anything else."""
    spec = METRICS.get(key)
    if spec is not None:
        return spec.scale == 1
    _, values = series(records, key)
    return bool(values) and all(0.0 <= v <= 1.0 for v in values)


def plot_training(records: Sequence[dict]) -> bytes | None:
    """Training loss and validation loss per step (with class weights, the training loss both weighted, as
    minimised, and unweighted, as validation measures it); validation task metrics beside it, one panel per scale:
    scores in [0, 1] on a 0-1 axis, other scales (BLEU, chrF: 0-100) on their own. Counts
    (`val_label_tokens`) are never drawn (training_log.is_counter)."""
    fig = training_figure(records)
    return None if fig is None else _png(fig)


def training_figure(records: Sequence[dict]):
    """The matplotlib Figure of `plot_training` (None: nothing to draw)."""
    steps, losses = series(records, "loss")
    usteps, ulosses = series(records, "unweighted_loss")
    vsteps, vlosses = series(records, "val_loss")
    metric_keys = task_metric_keys(records)
    if not losses and not vlosses and not metric_keys:
        return None
    fractions = [k for k in metric_keys if fraction_scale(records, k)]
    others = [k for k in metric_keys if k not in fractions]
    groups = [(keys, title) for keys, title in ((fractions, "Validation task metrics (0-1)"),
                                                 (others, "Validation task metrics (other scales)")) if keys]
    panels = 1 + len(groups)
    fig = _figure(5.5 * panels, 3.6)
    ax = fig.add_subplot(1, panels, 1)
    if losses:
        weighted = " (class-weighted)" if ulosses else ""
        ax.plot(steps, losses, label=f"train loss{weighted}", color="#1565c0", linewidth=1,
                alpha=0.5 if ulosses else 1.0)
    if ulosses:
        ax.plot(usteps, ulosses, label="train loss (unweighted, as validation)", color="#2e7d32", linewidth=1)
    if vlosses:
        ax.plot(vsteps, vlosses, label="validation loss", color="#ef6c00", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / label token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for i, (keys, title) in enumerate(groups):
        axis = fig.add_subplot(1, panels, i + 2)
        for key in keys:
            xs, ys = series(records, key)
            axis.plot(xs, ys, marker="o", linewidth=1.5, label=key)
        if keys is fractions:
            axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion(tid: str, confusion: dict[str, Any]) -> bytes | None:
    """Base and tuned confusion matrices side by side (rows: reference, columns: prediction)."""
    labels = confusion["labels"]
    if not labels or len(labels) > MAX_CONFUSION_LABELS:
        return None
    import numpy as np

    size = 0.9 + 0.32 * len(labels)  # inches per matrix: 5 labels -> 2.5
    fig = _figure(2 * size + 1.5, size + 0.8)
    for i, side in enumerate(("base", "tuned")):
        ax = fig.add_subplot(1, 2, i + 1)
        matrix = np.asarray(confusion[side], dtype=float)
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1.0, matrix.max()))
        for (r, c), count in np.ndenumerate(matrix):
            colour = "white" if count > 0.6 * matrix.max() and count > 0 else "black"
            ax.text(c, r, f"{int(count)}", ha="center", va="center", fontsize=8, color=colour)
        ticks = range(len(labels))
        short = [label if len(label) <= 10 else label[:9] + "…" for label in labels]
        ax.set_xticks(ticks, short, fontsize=8, rotation=45 if max(map(len, short)) > 3 else 0)
        ax.set_yticks(ticks, short, fontsize=8)
        ax.set_xlabel("predicted")
        if i == 0:
            ax.set_ylabel("reference")
        ax.set_title(side)
    fig.suptitle(tid, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _system_scores(report: dict[str, Any]) -> list[tuple[str, str, dict[str, tuple[float, float, float]]]]:
    """(template, main metric, {system: (value, low, high) in points}) for the systems chart."""
    out = []
    for tid, entry in report["templates"].items():
        metric = main_metric(list(entry["metrics"]), entry["task"], bool(entry["labels"]))
        if metric is None:
            continue
        k = _points(metric)
        systems: dict[str, tuple[float, float, float]] = {}
        rows = report["few_shot"].get(tid) or [
            {"system": "base zero-shot", "metrics": {metric: entry["metrics"][metric]["base"]}},
            {"system": "tuned zero-shot", "metrics": {metric: entry["metrics"][metric]["tuned"]}},
        ]
        for row in rows:
            m = row["metrics"].get(metric)
            if m:
                systems[row["system"]] = (m["value"] * k, m["low"] * k, m["high"] * k)
        for name, scores in report["baselines"]["scores"].get(tid, {}).items():
            if metric in scores:
                m = scores[metric]
                systems[name] = (m["value"] * k, m["low"] * k, m["high"] * k)
        out.append((tid, metric, systems))
    return out


_SYSTEM_COLOURS = ["#90a4ae", "#64b5f6", "#1e88e5", "#0d47a1", "#2e7d32", "#f9a825", "#8d6e63", "#ab47bc"]


def plot_systems(report: dict[str, Any]) -> bytes | None:
    """Horizontal bars grouped by template: its main metric for base (zero- and k-shot), tuned and
    the baselines, with 95% CIs; each system keeps one colour. Shows at a glance whether tuning
    beats the cheap alternatives. At most 30 templates are drawn."""
    data = _system_scores(report)[:30]
    if not data:
        return None
    systems: list[str] = []
    for _, _, scores in data:
        systems += [s for s in scores if s not in systems]
    colour = {s: _SYSTEM_COLOURS[i % len(_SYSTEM_COLOURS)] for i, s in enumerate(systems)}
    n_bars = sum(len(scores) for _, _, scores in data)
    fig = _figure(9, 1.4 + 0.24 * n_bars + 0.25 * len(data))
    ax = fig.add_subplot()
    y, ticks, labels, seen = 0.0, [], [], set()
    for tid, metric, scores in reversed(data):
        group = list(scores.items())[::-1]
        ticks.append(y + (len(group) - 1) / 2)
        labels.append(f"{tid} · {metric}")
        for system, (v, lo, hi) in group:
            ax.barh(y, v, height=0.8, xerr=[[max(0.0, v - lo)], [max(0.0, hi - v)]], capsize=2,
                    ecolor="#555555", color=colour[system], label=None if system in seen else system)
            seen.add(system)
            y += 1
        y += 0.8  # gap between templates
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("main metric (points: fractions x100; BLEU/chrF as is), 95% bootstrap CI")
    ax.set_title("Base, few-shot, fine-tuned and baselines")
    handles, names = ax.get_legend_handles_labels()
    order = [names.index(s) for s in systems if s in names]
    ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
