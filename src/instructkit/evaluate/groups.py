"""What the figures of an evaluation are computed over: (dataset, template) groups and source-row clusters.

Groups. Every figure is per dataset AND template. A template rendered on one dataset is keyed by its id
(`amazon_fine_food.predict_rating`), as always. A template rendered on several datasets of one evaluation
(a `held_out: true` review file read through the Fine Food schema and templates, or two review files
sharing a template) gives one group per dataset, keyed `<dataset>/<template_id>`
(`amazon_fine_food/amazon_fine_food.predict_rating`, `all_beauty/amazon_fine_food.predict_rating`), each
with its own n, held-out flag, metrics and report section. The evaluator (eval.json), the report
(report.json/md/html) and the model card use these keys, computed by the same function from the same
examples, so they agree.

Clusters. Examples rendered from the same source row (several templates of a task group, each applied to
every test row) are not independent: their outcomes are correlated. The bootstrap resamples source rows
(`(dataset, source_id)`), taking all of a row's examples together, and n is reported as rows and examples.
An example without a `source_id` is its own row.

Pure Python: no torch, no model code.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = [
    "cluster_ids",
    "dataset_of",
    "group_key",
    "group_keys",
    "shared_templates",
]


def dataset_of(record: dict) -> str:
    """The example's `dataset`, else the first dotted part of its template id (`reviews.rating` -> reviews)."""
    return str(record.get("dataset") or str(record["template_id"]).split(".")[0])


def shared_templates(records: Sequence[dict]) -> set[str]:
    """Template ids that occur with more than one dataset among `records`."""
    seen: dict[str, set[str]] = {}
    for record in records:
        seen.setdefault(str(record["template_id"]), set()).add(dataset_of(record))
    return {tid for tid, datasets in seen.items() if len(datasets) > 1}


def group_key(template_id: str, dataset: str, shared: Collection[str]) -> str:
    """`template_id`, or `<dataset>/<template_id>` when the template occurs with several datasets (`shared`)."""
    return f"{dataset}/{template_id}" if template_id in shared else template_id


def group_keys(records: Sequence[dict], shared: Collection[str] | None = None) -> list[str]:
    """The group key of each record; `shared` defaults to `shared_templates(records)`.

    Raises: KeyError when a record has no `template_id`.
    """
    shared = shared_templates(records) if shared is None else shared
    return [group_key(str(r["template_id"]), dataset_of(r), shared) for r in records]


def cluster_ids(records: Sequence[dict]) -> list[int]:
    """Source-row cluster of each record: 0, 1, 2 ... in first-seen order of `(dataset, source_id)`.

    Records with the same dataset and source id share a cluster; a record without a `source_id` (None or
    absent) is a cluster of its own. With one example per row the result is 0 .. n-1, so a cluster
    bootstrap draws exactly what an example bootstrap draws.
    """
    codes: dict[tuple[str, str], int] = {}
    out = []
    for i, record in enumerate(records):
        source = record.get("source_id")
        key = (dataset_of(record), str(source)) if source is not None else ("\x00", str(i))
        out.append(codes.setdefault(key, len(codes)))
    return out
