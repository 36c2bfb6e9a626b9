"""Render the report dict as ``report.md`` and ``report.html`` from the Jinja2 templates in
``report_templates/``.

This module formats the report's numbers into table rows of text (fractions to 3 decimals, 0-100 scores
to 1, intervals as ``value [low, high]``, ``*`` when a paired CI excludes 0, n as ``rows (examples)``
where a source row gives several examples, the exact McNemar p beside the bootstrap p for accuracy);
the templates lay them out. ``report.html.j2`` is rendered with autoescaping on, so every title, table cell and example text is
HTML-escaped by Jinja2; ``report.md.j2`` is not (Markdown cells only get ``|`` escaped and newlines
flattened). The HTML page is one self-contained file: inline CSS (``report.css``), plots embedded as
``data:image/png;base64`` URIs, no script and no link to anything outside the file.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from instructkit.evaluate.compare import improvement, main_metric
from instructkit.evaluate.examples import PROMPT_CHARS
from instructkit.evaluate.metric_registry import METRICS
from instructkit.evaluate.pairing import SECTIONS, SEEN, UNSEEN, UNSEEN_DATASET, UNTRAINED

__all__ = ["SECTION_NOTES", "SECTION_TITLES", "render_html", "render_markdown"]

SECTION_TITLES = {
    SEEN: "Trained instructions",
    UNSEEN: "Generalisation to unseen instructions",
    UNSEEN_DATASET: "Generalisation to held-out datasets",
    UNTRAINED: "Forgetting checks (tasks not trained at all)",
}
SECTION_NOTES = {
    SEEN: "Templates whose examples the model was fine-tuned on (test rows are unseen source rows).",
    UNSEEN: "Templates held out of training, for tasks the model did train on with other wordings.",
    UNSEEN_DATASET: "Datasets held out of training (held_out: true), for task families or templates the model "
                    "did train on with other data; each dataset has its own rows and n, never pooled with a "
                    "trained dataset.",
    UNTRAINED: "Tasks with no training example at all: a drop here is forgetting, a gain is transfer.",
}


# ====================================================================== formatting


def _fmt(value: Any, metric: str | None = None, signed: bool = False, digits: int | None = None) -> str:
    """0.755 for fractions, 23.4 for 0-100 scores; '-' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    spec = METRICS.get(metric or "")
    if digits is None:
        digits = 1 if spec is not None and spec.scale == 100 else 3
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_ci(ci: dict[str, float], metric: str) -> str:
    return f"{_fmt(ci['value'], metric)} [{_fmt(ci['low'], metric)}, {_fmt(ci['high'], metric)}]"


def _fmt_delta(d: dict[str, Any], metric: str) -> str:
    star = " *" if d.get("significant") else ""
    low, high = _fmt(d["low"], metric, True), _fmt(d["high"], metric, True)
    return f"{_fmt(d['delta'], metric, True)} [{low}, {high}]{star}"


def _fmt_p(p: float, n_resamples: int) -> str:
    """p-value to 3 decimals; 0 means "below the bootstrap's resolution 2 / n_resamples"."""
    return f"<{2 / n_resamples:.3f}" if p == 0 else f"{p:.3f}"


def _fmt_n(n: int, n_rows: int | None) -> str:
    """"872" when every example is its own source row, else "872 rows (2616 examples)"."""
    return str(n) if n_rows is None or n_rows == n else f"{n_rows} rows ({n} examples)"


def _fmt_mcnemar(d: dict[str, Any]) -> str:
    """The exact McNemar p of an accuracy delta to 3 decimals (as 1.2e-05 below 0.001); '-' when none."""
    p = d.get("mcnemar_p")
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _comparison_rows(entries: dict[str, dict], n_resamples: int, second: str = "task") -> list[list[str]]:
    """Table rows: name, task (or section), metric, n, base [CI], tuned [CI], delta [CI], p, McNemar p."""
    rows = []
    for name, entry in entries.items():
        for metric, m in entry["metrics"].items():
            rows.append([
                name,
                f"{entry['dataset']}/{entry['task']}" if second == "task"
                else SECTION_TITLES[entry["section"]],
                metric, _fmt_n(m["delta"]["n"], m["delta"].get("n_rows")),
                _fmt_ci(m["base"], metric), _fmt_ci(m["tuned"], metric),
                _fmt_delta(m["delta"], metric), _fmt_p(m["delta"]["p_value"], n_resamples),
                _fmt_mcnemar(m["delta"]),
            ])
    return rows


COMPARISON_HEADERS = ["{name}", "{second}", "metric", "n", "base [95% CI]", "tuned [95% CI]",
                      "Δ tuned-base [95% CI]", "p", "p McNemar"]


def _comparison_headers(name: str, second: str) -> list[str]:
    return [h.format(name=name, second=second) for h in COMPARISON_HEADERS]


def _headline_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[h["task"], SECTION_TITLES[h["section"]], h["metric"], _fmt(h["base"], h["metric"]),
             _fmt(h["tuned"], h["metric"]),
             _fmt_delta({"delta": h["delta"], "low": h["low"], "high": h["high"],
                         "significant": h["significant"]}, h["metric"]),
             _fmt_p(h["p_value"], report["settings"]["n_resamples"]), _fmt_mcnemar(h),
             _fmt_n(h["n"], h.get("n_rows")), "yes" if h["significant"] else "no"]
            for h in report["headline"]]


HEADLINE_HEADERS = ["task", "section", "metric", "base", "tuned", "Δ [95% CI]", "p", "p McNemar", "n",
                    "significant"]


def _detail_rows(report: dict[str, Any]) -> list[list[str]]:
    """Per template: n, unpaired, perplexity and mean prompt tokens for each model, unparseable, and the
    generated answers max_new_tokens cut short ('-' for ranked templates and reports from before it)."""
    rows = []
    for tid, e in report["templates"].items():
        cut = e.get("cut_short") or {}
        rows.append([tid, _fmt_n(e["n"], e.get("n_rows")), str(e["n_unpaired"]),
                     _fmt(e["perplexity"]["base"]), _fmt(e["perplexity"]["tuned"]),
                     _fmt(e["mean_prompt_tokens"]["base"], digits=1),
                     _fmt(e["unparseable"]["base"], digits=0),
                     _fmt(e["unparseable"]["tuned"], digits=0),
                     _fmt(cut.get("base"), digits=0), _fmt(cut.get("tuned"), digits=0)])
    return rows


DETAIL_HEADERS = ["template", "n", "unpaired", "perplexity base", "perplexity tuned", "mean prompt tokens",
                  "unparseable base", "unparseable tuned", "cut short base", "cut short tuned"]


def _baseline_systems(report: dict[str, Any]) -> list[str]:
    """Names of the baselines that scored at least one template, in first-seen order."""
    names: list[str] = []
    for by_name in report["baselines"]["scores"].values():
        names += [n for n in by_name if n not in names]
    return names


def _baseline_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per template and metric: base, tuned, then each baseline, every value [CI]."""
    rows = []
    names = _baseline_systems(report)
    for tid, entry in report["templates"].items():
        baselines = report["baselines"]["scores"].get(tid, {})
        if not baselines:
            continue
        for metric, m in entry["metrics"].items():
            cells = [_fmt_ci(baselines[n][metric], metric) if metric in baselines.get(n, {}) else "-"
                     for n in names]
            rows.append([tid, metric, _fmt_ci(m["base"], metric), _fmt_ci(m["tuned"], metric), *cells])
    return rows


def _baseline_headers(report: dict[str, Any]) -> list[str]:
    return ["template", "metric", "base (zero-shot)", "tuned", *_baseline_systems(report)]


def _few_shot_table(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for tid, systems in report["few_shot"].items():
        if not any(row["k"] > 0 for row in systems):
            continue  # no k-shot evaluation of this template: nothing to compare
        entry = report["templates"][tid]
        metric = main_metric(list(entry["metrics"]), entry["task"], bool(entry["labels"]))
        for row in systems:
            m = row["metrics"].get(metric)
            rows.append([tid, row["system"], metric or "-", _fmt_ci(m, metric) if m else "-",
                         _fmt(row["mean_prompt_tokens"], digits=1), str(row["n"])])
    return rows


FEW_SHOT_HEADERS = ["template", "system", "metric", "value [95% CI]", "mean prompt tokens", "n"]


def _sections_in(report: dict[str, Any], key: str) -> list[tuple[str, dict[str, dict]]]:
    """(section, {name: entry}) for the sections that have entries, in reading order."""
    out = []
    for section in SECTIONS:
        entries = {k: v for k, v in report[key].items() if v["section"] == section}
        if entries:
            out.append((section, entries))
    return out


# ====================================================================== templates


def _md_cell(text: Any) -> str:
    """A Markdown table cell: ``|`` escaped, newlines flattened to spaces."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _b64encode(png: bytes) -> str:
    """PNG bytes as base64 text, for a ``data:image/png;base64,`` URI."""
    return base64.b64encode(png).decode("ascii")


_TEMPLATES = Environment(
    loader=PackageLoader("instructkit.evaluate", "report_templates"),
    # report.html.j2 (and report.html) are escaped; report.md.j2 and report.css are not
    autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default=False),
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=StrictUndefined,
)
_TEMPLATES.filters["md_cell"] = _md_cell
_TEMPLATES.filters["b64encode"] = _b64encode


def _common(report: dict[str, Any]) -> dict[str, Any]:
    """Template variables shared by the Markdown and the HTML page (cells as text)."""
    return {
        "title": report["title"],
        "models": report["models"],
        "n_examples": report["n_examples"],
        "n_resamples": report["settings"]["n_resamples"],
        "headline_headers": HEADLINE_HEADERS,
        "template_headers": _comparison_headers("template", "task"),
        "task_headers": _comparison_headers("task group", "section"),
        "baseline_headers": _baseline_headers(report),
        "baseline_rows": _baseline_rows(report),
        "skipped": list(report["baselines"]["skipped"].items()),
        "few_shot_headers": FEW_SHOT_HEADERS,
        "few_shot_rows": _few_shot_table(report),
        "detail_headers": DETAIL_HEADERS,
        "detail_rows": _detail_rows(report),
    }


def _training(report: dict[str, Any]) -> dict[str, Any] | None:
    """The training summary as text: log size, last step, final loss, best validation loss, and the best
    checkpoint with the direction its metric was judged in ("macro_f1 0.512 at step 40, higher is better")."""
    t = report.get("training")
    if not t:
        return None
    best, kept = t.get("best_val_loss"), t.get("best_checkpoint")
    return {
        "n_records": t.get("n_records", 0),
        "last_step": _fmt(t.get("last_step"), digits=0),
        "final_loss": _fmt(t.get("final_loss")) + (
            f" (class-weighted; unweighted, as validation measures it: {_fmt(t['final_unweighted_loss'])})"
            if t.get("final_unweighted_loss") is not None else ""),
        "best": {"value": _fmt(best["value"]), "step": f"{best['step']:.0f}"} if best else None,
        "checkpoint": f"{kept['metric']} {_fmt(kept['value'], kept['metric'])} at step {kept['step']:.0f}, "
                      f"{'higher' if kept['greater_is_better'] else 'lower'} is better" if kept else None,
    }


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the report's tables in Markdown (for the README and the model card)."""
    resamples = report["settings"]["n_resamples"]
    return _TEMPLATES.get_template("report.md.j2").render(
        **_common(report),
        headline_rows=_headline_rows(report),
        sections=[{"title": SECTION_TITLES[section], "note": SECTION_NOTES[section],
                   "rows": _comparison_rows(entries, resamples)}
                  for section, entries in _sections_in(report, "templates")],
        task_rows=_comparison_rows(report["tasks"], resamples, second="section"),
        training=_training(report),
    )


# ============================================================================= html


def _delta_class(metric: str, significant: bool, delta: float) -> str:
    """CSS class of a delta cell, coloured when its CI excludes 0: "up" (green) for a change for the better in
    the metric's direction, "down" (red) for one for the worse (compare.improvement)."""
    if not significant:
        return "num"
    return "num up" if improvement(metric, delta) else "num down"


def _cells(row: Sequence[Any]) -> list[tuple[Any, str]]:
    """A row of ``(text, css_class)`` cells; a plain cell gets no class."""
    return [cell if isinstance(cell, tuple) else (cell, "") for cell in row]


def _styled_comparison(entries: dict[str, dict], n_resamples: int, second: str = "task") -> list[list[Any]]:
    """Comparison rows with numeric cells right-aligned and significant deltas coloured."""
    rows = []
    for raw, (name, entry) in zip(_comparison_rows(entries, n_resamples, second), _flat_metrics(entries)):
        d = entry["delta"]
        cls = _delta_class(raw[2], d["significant"], d["delta"])
        rows.append(_cells([raw[0], raw[1], raw[2], (raw[3], "num"), (raw[4], "num"), (raw[5], "num"),
                            (raw[6], cls), (raw[7], "num"), (raw[8], "num")]))
    return rows


def _flat_metrics(entries: dict[str, dict]) -> list[tuple[str, dict]]:
    return [(name, m) for name, entry in entries.items() for m in entry["metrics"].values()]


def _example_tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One table per template and kind (wins, regressions) that has examples."""
    tables = []
    for tid, ex in report["examples"].items():
        for kind, title in (("wins", "tuned better"), ("regressions", "base better")):
            if ex[kind]:
                rows = [_cells([e["prompt"], e["reference"], e["base"], e["tuned"],
                                (_fmt(e["gain"], digits=2), "num")]) for e in ex[kind]]
                gain = "Δ margin" if report["templates"][tid]["labels"] else "Δ rougeL"
                tables.append({"title": f"{tid}: {title}", "rows": rows,
                               "headers": ["prompt", "reference", "base", "tuned", gain]})
    return tables


def render_html(report: dict[str, Any], plots: dict[str, bytes | None]) -> str:
    """report.html: one self-contained file (inline CSS, plots as PNG data URIs, no script, no link).

    ``plots`` maps ``deltas``, ``systems``, ``training`` and ``confusion:<template id>`` to PNG bytes
    (``None`` or absent: not drawn).
    """
    resamples = report["settings"]["n_resamples"]
    headline = []
    for raw, h in zip(_headline_rows(report), report["headline"]):
        cls = _delta_class(h["metric"], h["significant"], h["delta"])
        headline.append(_cells([raw[0], raw[1], raw[2], (raw[3], "num"), (raw[4], "num"), (raw[5], cls),
                                (raw[6], "num"), (raw[7], "num"), (raw[8], "num"), raw[9]]))
    common = _common(report)
    common["baseline_rows"] = [_cells([r[0], r[1], *((c, "num") for c in r[2:])])
                               for r in common["baseline_rows"]]
    common["few_shot_rows"] = [_cells(r) for r in common["few_shot_rows"]]
    common["detail_rows"] = [_cells(r) for r in common["detail_rows"]]
    return _TEMPLATES.get_template("report.html.j2").render(
        **common,
        headline_rows=headline,
        sections=[{"title": SECTION_TITLES[section], "note": SECTION_NOTES[section],
                   "rows": _styled_comparison(entries, resamples)}
                  for section, entries in _sections_in(report, "templates")],
        task_rows=_styled_comparison(report["tasks"], resamples, second="section"),
        plots={name: plots.get(name) for name in ("deltas", "systems", "training")},
        training=_training(report),
        confusions=[(tid, plots[f"confusion:{tid}"]) for tid in report["confusion"]
                    if plots.get(f"confusion:{tid}")],
        examples=_example_tables(report),
        prompt_chars=PROMPT_CHARS,
    )
