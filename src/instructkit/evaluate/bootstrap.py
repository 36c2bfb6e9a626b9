"""Bootstrap confidence intervals over examples: one system (:func:`bootstrap_ci`) or the difference
of two systems on the same examples (:func:`paired_bootstrap_diff`); the exact McNemar test of two
systems' paired right/wrong outcomes (:func:`mcnemar_exact`).

Examples are resampled with replacement: each resample is one row of an index matrix of shape
(n_resamples, n), and the metric's resampler maps such a matrix to one metric value per row
(per-example scores averaged; macro-F1 from confusion counts; BLEU/chrF from summed sentence
statistics; any other callable re-run on every resample). The interval is the central percentile
interval of the resampled values, except for a mean of [0, 1] scores at 0 or 1, where no resample
differs: there the exact interval of all-or-none outcomes (:func:`all_or_none_interval`).

Cluster bootstrap (``clusters=``): when several examples come from one source row (k templates
rendered on the same rows and pooled), the rows are resampled, each with all of its examples, since
examples of one row are not independent: resampling them one by one narrows the interval by up to
sqrt(k). A resample then holds as many rows as the data (so its number of examples varies when rows
have different numbers of examples). With one example per row it draws exactly the example bootstrap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from instructkit.evaluate.metric_registry import MetricSpec, get_metric
from instructkit.evaluate.metrics import MetricFn, Resampler, _check_pair

__all__ = [
    "all_or_none_interval",
    "bootstrap_ci",
    "mcnemar_exact",
    "paired_bootstrap_diff",
    "sign_flip_floor",
]

MetricLike = str | MetricSpec | MetricFn

_MAX_INDEX_ELEMENTS = 1 << 22  # cap on one (rows, n) index matrix: 4M int64 = 32 MiB


def _as_spec(metric: MetricLike) -> MetricSpec:
    """A registry name, a MetricSpec, or a plain ``(preds, refs) -> float`` callable."""
    if isinstance(metric, MetricSpec):
        return metric
    if isinstance(metric, str):
        return get_metric(metric)
    if callable(metric):
        return MetricSpec(getattr(metric, "__name__", "custom"), metric, corpus=True)
    raise TypeError(f"metric must be a name, MetricSpec or callable, got {type(metric)!r}")


def _resampler(spec: MetricSpec, preds: Sequence[str], refs: Sequence[str]) -> Resampler:
    """Map an index matrix (R, n) to the metric on each of the R resamples."""
    if spec.per_example is not None:
        per_example = np.asarray(spec.per_example(preds, refs), dtype=float)
        return lambda idx: per_example[idx].mean(axis=1)
    if spec.resampler is not None:
        return spec.resampler(preds, refs)
    preds_list, refs_list = list(preds), list(refs)

    def loop(idx: np.ndarray) -> np.ndarray:
        return np.array(
            [spec.fn([preds_list[i] for i in row], [refs_list[i] for i in row]) for row in idx]
        )

    return loop


def _index_batches(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index matrices (rows = resamples of ``n`` examples drawn with
    replacement), in batches small enough to bound memory; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    rows_per_batch = max(1, _MAX_INDEX_ELEMENTS // n)
    for start in range(0, n_resamples, rows_per_batch):
        rows = min(rows_per_batch, n_resamples - start)
        yield rng.integers(0, n, size=(rows, n))


def _cluster_index_batches(clusters: Sequence[int], n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Index matrices of a cluster bootstrap: each row draws as many clusters as there are, with
    replacement, and lists the examples of every drawn cluster (cluster by cluster, in example order).

    ``clusters[i]`` is example i's cluster, coded 0 .. C-1. Rows of one batch that hold the same number of
    examples come as one matrix, so a batch may give several matrices; every draw is used once, in
    order. Deterministic in ``seed``; with C == n singleton clusters coded in example order, the draws
    are those of :func:`_index_batches`.
    """
    codes = np.asarray(clusters, dtype=np.int64)
    n_clusters = int(codes.max()) + 1
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=n_clusters)
    width = int(sizes.max())
    members = np.full((n_clusters, width), -1, dtype=np.int64)  # cluster -> its examples, -1 padded
    slot = np.arange(len(codes)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    members[codes[order], slot] = order
    rng = np.random.default_rng(seed)
    rows_per_batch = max(1, _MAX_INDEX_ELEMENTS // (n_clusters * width))
    for start in range(0, n_resamples, rows_per_batch):
        draws = rng.integers(0, n_clusters, size=(min(rows_per_batch, n_resamples - start), n_clusters))
        if width == 1:
            yield members[draws, 0]
            continue
        gathered = members[draws].reshape(draws.shape[0], -1)
        totals = sizes[draws].sum(axis=1)
        for total in np.unique(totals):
            block = gathered[totals == total]
            yield block[block >= 0].reshape(block.shape[0], int(total))


def _batches(n: int, n_resamples: int, seed: int, clusters: Sequence[int] | None) -> Iterator[np.ndarray]:
    """Example bootstrap (``clusters`` None) or cluster bootstrap index matrices."""
    if clusters is None:
        return _index_batches(n, n_resamples, seed)
    _check_clusters(n, clusters)
    return _cluster_index_batches(clusters, n_resamples, seed)


def _check_clusters(n: int, clusters: Sequence[int]) -> None:
    """Raise ValueError unless ``clusters`` is one non-negative code per example."""
    if len(clusters) != n:
        raise ValueError(f"clusters has {len(clusters)} items for {n} examples")
    if n and min(clusters) < 0:
        raise ValueError("clusters must be codes 0 .. C-1")


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    """Validate the resample count and the confidence level."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Central ``confidence`` percentile interval of ``samples``."""
    alpha = 1.0 - confidence
    low, high = np.quantile(samples, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    name_or_fn: MetricLike,
    preds: Sequence[str],
    refs: Sequence[str],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    clusters: Sequence[int] | None = None,
) -> tuple[float, float, float]:
    """Point estimate and percentile-bootstrap interval: ``(point, low, high)``.

    Examples are resampled with replacement ``n_resamples`` times. For per-example
    metrics the per-example score vector is computed once and averaged over each
    resample; macro-F1 is recomputed from per-resample confusion counts (over the classes
    each resample holds); BLEU/chrF from summed per-sentence statistics; a plain
    callable is re-run on every resample. A per-example metric in [0, 1] at 0 or 1 (every
    example right, or every one wrong) has no bootstrap spread: its interval is the exact
    :func:`all_or_none_interval` over the units (examples, or clusters) instead. ``clusters``
    (one code 0 .. C-1 per example, e.g. ``instructkit.evaluate.groups.cluster_ids``) resamples
    clusters (source rows) instead of examples.

    Raises: ValueError when ``n_resamples < 1``, ``confidence`` is not in (0, 1), ``preds``/``refs``
    differ in length or are empty, ``clusters`` is not one non-negative code per example, or a metric
    name is unknown; TypeError when ``preds`` or ``refs`` is a single string or ``name_or_fn`` is neither a
    name, a MetricSpec nor a callable.
    """
    _check_bootstrap_args(n_resamples, confidence)
    _check_pair(preds, refs)
    spec = _as_spec(name_or_fn)
    point = float(spec.fn(preds, refs))
    if spec.per_example is not None and spec.scale == 1 and point in (0.0, 1.0):
        if clusters is not None:
            _check_clusters(len(preds), clusters)
        units = len(set(clusters)) if clusters is not None else len(preds)
        return (point, *all_or_none_interval(point == 1.0, units, confidence))
    resample = _resampler(spec, preds, refs)
    samples = np.concatenate(
        [resample(idx) for idx in _batches(len(preds), n_resamples, seed, clusters)]
    )
    low, high = _percentile_interval(samples, confidence)
    return point, low, high


def all_or_none_interval(all_right: bool, units: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson exact interval of a proportion when every one of `units` units scored 1
    (`all_right`) or every one 0: ``[(alpha/2) ** (1/units), 1]`` or ``[0, 1 - (alpha/2) ** (1/units)]``,
    alpha = 1 - confidence (Clopper & Pearson 1934; the binomial quantiles at k = n or 0 in closed form).

    Every bootstrap resample of all-equal outcomes is that outcome, so the percentile interval is the
    point, [1, 1] on 4 examples as on 4,000 (EleutherAI/lm-evaluation-harness#4070: 0 +- 0 at any N).
    Used for a mean of per-example scores in [0, 1] (accuracy, exact match, token F1, ROUGE) whose every
    example sits at 0 or 1; `units` are the examples, or the source rows of a cluster bootstrap.

    Raises: ValueError when `units` < 1 or `confidence` is not in (0, 1).
    """
    if units < 1:
        raise ValueError(f"units must be at least 1, got {units}")
    _check_bootstrap_args(1, confidence)
    bound = ((1.0 - confidence) / 2) ** (1.0 / units)
    return (bound, 1.0) if all_right else (0.0, 1.0 - bound)


def _two_sided_p(delta: float, deltas: np.ndarray) -> float:
    """Twice the fraction of bootstrap deltas at or beyond 0 on the side opposite
    ``delta`` (ties at 0 count against the difference), capped at 1; 1 when ``delta == 0``."""
    if delta > 0:
        opposite = float(np.mean(deltas <= 0))
    elif delta < 0:
        opposite = float(np.mean(deltas >= 0))
    else:
        return 1.0
    return min(1.0, 2.0 * opposite)


def sign_flip_floor(units: int) -> float:
    """The smallest two-sided p-value a test of a paired difference can honestly claim on `units` independent
    units (examples, or the clusters resampled): the exact sign-flip test's 2 / 2**units, reached when every
    unit moves the same way; capped at 1. The bootstrap has too few distinct resamples on few units to know
    better: with one example every resample is that example, and its deltas all sit on one side of 0."""
    return min(1.0, 2.0 ** (1 - units))


def paired_bootstrap_diff(
    name: MetricLike,
    preds_a: Sequence[str],
    preds_b: Sequence[str],
    refs: Sequence[str],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    clusters: Sequence[int] | None = None,
) -> dict[str, float]:
    """Paired bootstrap of ``metric(b) - metric(a)`` on the same examples.

    Each resample draws one set of example indices and scores both systems on it,
    so per-example correlation between the systems cancels out.

    Returns a dict with ``delta`` (metric(b) - metric(a) on the full set), ``low`` and
    ``high`` (percentile interval of the resampled deltas), ``p_value`` (two-sided:
    twice the fraction of resampled deltas on the other side of 0 from ``delta``,
    ties included, capped at 1; its resolution is ``2 / n_resamples``, so 0.0 means
    below that; never below :func:`sign_flip_floor` of the units resampled, so 1 example gives 1, not 0),
    ``n`` (number of examples) and, with ``clusters`` (resample clusters, i.e. source
    rows, as in :func:`bootstrap_ci`), ``n_rows`` (number of clusters).

    Raises: as :func:`bootstrap_ci`, with ``preds_a``/``preds_b`` each checked against ``refs``.
    """
    _check_bootstrap_args(n_resamples, confidence)
    _check_pair(preds_a, refs, ("preds_a", "refs"))
    _check_pair(preds_b, refs, ("preds_b", "refs"))
    spec = _as_spec(name)
    delta = float(spec.fn(preds_b, refs) - spec.fn(preds_a, refs))
    resample_a = _resampler(spec, preds_a, refs)
    resample_b = _resampler(spec, preds_b, refs)
    deltas = np.concatenate(
        [
            resample_b(idx) - resample_a(idx)
            for idx in _batches(len(refs), n_resamples, seed, clusters)
        ]
    )
    low, high = _percentile_interval(deltas, confidence)
    out = {
        "delta": delta,
        "low": low,
        "high": high,
        "p_value": max(_two_sided_p(delta, deltas),
                       sign_flip_floor(len(set(clusters)) if clusters is not None else len(refs))),
        "n": len(refs),
    }
    if clusters is not None:
        out["n_rows"] = len(set(clusters))
    return out


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of two systems' paired right/wrong outcomes on the same examples.

    Only the discordant pairs carry information: ``a_only`` examples system a gets right and b wrong,
    ``b_only`` the reverse. Under the null hypothesis (equal accuracy) each discordant pair goes either
    way with probability 1/2, so ``p_value`` is the two-sided exact binomial test of ``b_only`` successes
    in ``a_only + b_only`` trials: ``min(1, 2 * P(X <= min(a_only, b_only)))``, X ~ Binomial(discordant,
    1/2), which for p = 1/2 equals ``scipy.stats.binomtest(...).pvalue`` (and statsmodels' exact
    ``mcnemar``) at a tenth of the cost; 1.0 without discordant pairs. Exact means conservative: with
    hundreds of discordant pairs it rejects a true null about 4.5-4.7% of the time at alpha 0.05. It
    assumes independent pairs: for examples pooled from the same source rows use the cluster bootstrap.

    Returns ``{"a_only", "b_only", "p_value"}`` (counts as floats).

    Raises: ValueError when the two sequences differ in length or are empty.
    """
    from scipy.stats import binom

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"mcnemar_exact needs two equally long, non-empty outcome lists; got {a.shape} and "
                         f"{b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else 2.0 * float(binom.cdf(min(a_only, b_only), discordant, 0.5))
    return {"a_only": float(a_only), "b_only": float(b_only), "p_value": min(1.0, p)}
