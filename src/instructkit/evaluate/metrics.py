"""Evaluation metrics for instruction fine-tuning, with bootstrap confidence intervals.

Every metric takes ``preds`` and ``refs``: two equally long, non-empty sequences of
strings, one prediction and one reference per example (a single reference per example).
Each function is named for exactly what it computes:

* classification: :func:`accuracy` (exact string equality), :func:`macro_f1`,
  :func:`per_class`, :func:`confusion`;
* extractive QA (SQuAD conventions): :func:`normalize_answer`, :func:`exact_match`,
  :func:`token_f1`;
* generation: :func:`rouge` (rouge-score), :func:`corpus_bleu`,
  :func:`sentence_bleu_mean`, :func:`chrf` (sacrebleu);
* language modelling: :func:`perplexity`.

:data:`METRICS` maps metric names to :class:`MetricSpec` records; :func:`compute`
looks a metric up by name. :func:`bootstrap_ci` gives a percentile-bootstrap
confidence interval over examples, and :func:`paired_bootstrap_diff` compares two
systems on the same examples with a paired bootstrap.

Scales: accuracy, F1, exact match and ROUGE are fractions in [0, 1] (``scale=1``);
BLEU and chrF are on sacrebleu's 0-100 scale (``scale=100``).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Union

import numpy as np

__all__ = [
    "MetricSpec",
    "METRICS",
    "accuracy",
    "bootstrap_ci",
    "chrf",
    "compute",
    "confusion",
    "corpus_bleu",
    "exact_match",
    "get_metric",
    "macro_f1",
    "macro_f1_metric",
    "normalize_answer",
    "paired_bootstrap_diff",
    "per_class",
    "perplexity",
    "rouge",
    "sentence_bleu_mean",
    "token_f1",
]

MetricFn = Callable[[Sequence[str], Sequence[str]], float]
PerExampleFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
# A resampler is prepared once for (preds, refs); it then maps an index matrix of
# shape (n_resamples, n) to the metric value on each resample, shape (n_resamples,).
Resampler = Callable[[np.ndarray], np.ndarray]
ResamplerFactory = Callable[[Sequence[str], Sequence[str]], Resampler]

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# --------------------------------------------------------------------------- inputs


def _check_pair(
    preds: Sequence[str], refs: Sequence[str], names: tuple[str, str] = ("preds", "refs")
) -> None:
    """Raise if ``preds``/``refs`` are bare strings, of different lengths, or empty."""
    for value, name in zip((preds, refs), names):
        if isinstance(value, str):
            raise TypeError(f"{name} must be a sequence of strings, not a single string")
    if len(preds) != len(refs):
        raise ValueError(
            f"length mismatch: {names[0]} has {len(preds)} items, {names[1]} has {len(refs)}"
        )
    if len(preds) == 0:
        raise ValueError(f"empty input: {names[0]} and {names[1]} contain no examples")


# ------------------------------------------------------------------- classification


def accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of examples whose prediction equals the reference exactly (no normalisation)."""
    return float(_accuracy_per_example(preds, refs).mean())


def _accuracy_per_example(preds: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """1.0 where ``pred == ref`` (exact string equality), else 0.0."""
    _check_pair(preds, refs)
    return np.array([p == r for p, r in zip(preds, refs)], dtype=float)


def _label_set(
    preds: Sequence[str], refs: Sequence[str], labels: Sequence[str] | None
) -> list[str]:
    """The given labels, or the sorted union of the labels in ``refs`` and ``preds``."""
    if labels is None:
        return sorted(set(refs) | set(preds))
    labels = list(labels)
    if not labels:
        raise ValueError("empty input: labels is empty")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels contains duplicates: {labels}")
    return labels


def macro_f1(
    preds: Sequence[str], refs: Sequence[str], labels: Sequence[str] | None = None
) -> float:
    """Unweighted mean of per-class F1 over ``labels``.

    ``labels`` defaults to the sorted union of the labels seen in ``refs`` and
    ``preds``; a label that is never predicted correctly (including one that only
    appears in ``preds``, or one in ``labels`` that appears nowhere) contributes
    F1 = 0. Computed with ``sklearn.metrics.f1_score(average="macro",
    zero_division=0)``.
    """
    from sklearn.metrics import f1_score

    _check_pair(preds, refs)
    label_list = _label_set(preds, refs, labels)
    return float(
        f1_score(
            list(refs), list(preds), labels=label_list, average="macro", zero_division=0
        )
    )


def per_class(
    preds: Sequence[str], refs: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support (number of references) for each label.

    ``labels`` defaults to the sorted union of ``refs`` and ``preds``; ill-defined
    ratios (e.g. precision of a never-predicted label) are 0.
    """
    from sklearn.metrics import precision_recall_fscore_support

    _check_pair(preds, refs)
    label_list = _label_set(preds, refs, labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        list(refs), list(preds), labels=label_list, zero_division=0
    )
    return {
        label: {
            "precision": float(p),
            "recall": float(r),
            "f1": float(f),
            "support": int(s),
        }
        for label, p, r, f, s in zip(label_list, precision, recall, f1, support)
    }


def _label_codes(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Index of each value in ``labels``; -1 for values outside the label set."""
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index.get(v, -1) for v in values], dtype=np.int64)


def confusion(
    preds: Sequence[str], refs: Sequence[str], labels: Sequence[str]
) -> list[list[int]]:
    """Confusion counts: ``matrix[i][j]`` = examples with reference ``labels[i]``
    predicted as ``labels[j]``. Examples whose reference or prediction is not in
    ``labels`` are not counted."""
    _check_pair(preds, refs)
    label_list = _label_set(preds, refs, labels)
    k = len(label_list)
    ref_codes = _label_codes(refs, label_list)
    pred_codes = _label_codes(preds, label_list)
    keep = (ref_codes >= 0) & (pred_codes >= 0)
    flat = np.bincount(ref_codes[keep] * k + pred_codes[keep], minlength=k * k)
    return flat.reshape(k, k).tolist()


def _macro_f1_resampler(labels: Sequence[str] | None = None) -> ResamplerFactory:
    """Vectorised macro-F1 over many resamples, from per-resample confusion counts.

    The label set is fixed on the full data (``labels`` or the sorted union of
    ``refs`` and ``preds``), so a class absent from a resample counts as F1 = 0,
    exactly as :func:`macro_f1` treats a listed label that never occurs.
    Per-class F1 is ``2 tp / (n_pred + n_ref)`` (0 when both counts are 0), which
    equals sklearn's F1 with ``zero_division=0``.
    """

    def factory(preds: Sequence[str], refs: Sequence[str]) -> Resampler:
        label_list = _label_set(preds, refs, labels)
        k = len(label_list)
        ref_codes = _label_codes(refs, label_list)
        pred_codes = _label_codes(preds, label_list)

        def scores(idx: np.ndarray) -> np.ndarray:
            r, p = ref_codes[idx], pred_codes[idx]
            offsets = np.arange(idx.shape[0])[:, None] * k

            def count(codes: np.ndarray, mask: np.ndarray) -> np.ndarray:
                flat = np.bincount((offsets + codes)[mask], minlength=idx.shape[0] * k)
                return flat.reshape(idx.shape[0], k)

            tp = count(r, (r == p) & (r >= 0))
            denom = count(r, r >= 0) + count(p, p >= 0)
            f1 = np.divide(2.0 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)
            return f1.mean(axis=1)

        return scores

    return factory


# ------------------------------------------------------------- extractive QA (SQuAD)

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD answer normalisation (as in the official SQuAD v1.1/v2.0 evaluation script).

    In order:

    1. lowercase;
    2. delete ASCII punctuation (``string.punctuation``) without inserting a space,
       so ``"brown-fox"`` becomes ``"brownfox"``;
    3. replace the whole words ``a``, ``an``, ``the`` with a space;
    4. collapse runs of whitespace to one space and strip both ends.

    Example: ``normalize_answer("The Cat!") == "cat"``.
    """
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _exact_match_per_example(preds: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """1.0 where the normalised prediction equals the normalised reference."""
    _check_pair(preds, refs)
    return np.array(
        [normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)],
        dtype=float,
    )


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of examples equal after :func:`normalize_answer` (SQuAD exact match)."""
    return float(_exact_match_per_example(preds, refs).mean())


def _token_f1_single(pred: str, ref: str) -> float:
    """SQuAD token F1 between two answers, on :func:`normalize_answer` tokens.

    Overlap counts each token at most ``min(count in pred, count in ref)`` times.
    If either side has no tokens, F1 is 1.0 when both are empty and 0.0 otherwise
    (the SQuAD v2.0 convention).
    """
    pred_tokens = normalize_answer(pred).split()
    ref_tokens = normalize_answer(ref).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _token_f1_per_example(preds: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """SQuAD token F1 of each example."""
    _check_pair(preds, refs)
    return np.array([_token_f1_single(p, r) for p, r in zip(preds, refs)], dtype=float)


def token_f1(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean over examples of SQuAD token F1 (see :func:`_token_f1_single`)."""
    return float(_token_f1_per_example(preds, refs).mean())


# --------------------------------------------------------------------------- ROUGE


@lru_cache(maxsize=None)
def _rouge_scorer(keys: tuple[str, ...]):  # -> rouge_score.rouge_scorer.RougeScorer
    """A cached ``RougeScorer`` for ``keys`` with the Porter stemmer enabled."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(keys), use_stemmer=True)


def _rouge_per_example(
    preds: Sequence[str], refs: Sequence[str], keys: tuple[str, ...] = ROUGE_KEYS
) -> dict[str, np.ndarray]:
    """ROUGE F-measure of each example for each key in ``keys``."""
    _check_pair(preds, refs)
    scorer = _rouge_scorer(keys)
    rows = [scorer.score(r, p) for p, r in zip(preds, refs)]  # score(target, prediction)
    return {key: np.array([row[key].fmeasure for row in rows], dtype=float) for key in keys}


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (in [0, 1]) ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``.

    Computed per example with ``rouge_score.rouge_scorer.RougeScorer(..., use_stemmer=True)``
    and averaged over examples. That scorer's tokenizer lowercases, turns every
    character outside ``[a-z0-9]`` into a space (so non-Latin text yields no tokens and
    scores 0), and Porter-stems tokens longer than 3 characters ("running" -> "run").

    * ``rouge1`` / ``rouge2``: unigram / bigram overlap F-measure (clipped counts).
    * ``rougeL``: longest common subsequence over the whole text; newlines are
      ordinary whitespace.
    * ``rougeLsum``: summary-level LCS. Both texts are split into sentences on
      ``"\\n"`` (empty lines dropped) and, for each reference sentence, the union of
      its LCS with every predicted sentence is counted (without double counting).
      Without newlines each text is one sentence and ``rougeLsum == rougeL``; put one
      sentence per line to get the summary-level score.
    """
    per_example = _rouge_per_example(preds, refs, ROUGE_KEYS)
    return {key: float(values.mean()) for key, values in per_example.items()}


def _rouge_key_per_example(key: str) -> PerExampleFn:
    """Per-example F-measure function for one ROUGE key."""

    def per_example(preds: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        return _rouge_per_example(preds, refs, (key,))[key]

    per_example.__name__ = f"{key}_per_example"
    return per_example


def _rouge_key_mean(key: str) -> MetricFn:
    """Mean F-measure function for one ROUGE key."""

    def mean(preds: Sequence[str], refs: Sequence[str]) -> float:
        return float(_rouge_per_example(preds, refs, (key,))[key].mean())

    mean.__name__ = key
    mean.__doc__ = f"Mean {key} F-measure over examples (see :func:`rouge`)."
    return mean


# --------------------------------------------------------------------- BLEU / chrF


def _bleu(sentence_level: bool = False):  # -> sacrebleu.metrics.BLEU
    """sacrebleu BLEU with default settings (13a tokenizer, exp smoothing); at
    sentence level ``effective_order=True`` as ``sacrebleu.sentence_bleu`` uses."""
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=sentence_level)


def _chrf():  # -> sacrebleu.metrics.CHRF
    """sacrebleu chrF with default settings (char order 6, no word n-grams, beta 2)."""
    from sacrebleu.metrics import CHRF

    return CHRF()


def corpus_bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100): n-gram counts and lengths are summed over all
    examples before the precisions and the brevity penalty are computed."""
    _check_pair(preds, refs)
    return float(_bleu().corpus_score(list(preds), [list(refs)]).score)


def sentence_bleu_mean(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Unweighted mean over examples of sacrebleu sentence BLEU (0-100).

    Sentence BLEU uses effective n-gram order and exp smoothing, so this is not
    :func:`corpus_bleu` and is usually different from it.
    """
    _check_pair(preds, refs)
    bleu = _bleu(sentence_level=True)
    return float(np.mean([bleu.sentence_score(p, [r]).score for p, r in zip(preds, refs)]))


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus chrF (0-100), character n-gram statistics summed over examples."""
    _check_pair(preds, refs)
    return float(_chrf().corpus_score(list(preds), [list(refs)]).score)


def _sacrebleu_resampler(make_metric: Callable[[], object]) -> ResamplerFactory:
    """Resample a sacrebleu corpus metric from per-sentence sufficient statistics.

    Uses the same (underscore-prefixed) statistics hooks that sacrebleu's own
    paired-bootstrap significance test uses: per-sentence statistics are summed over
    each resample and the score is recomputed from the sums, which equals calling
    ``corpus_score`` on the resampled corpus without re-tokenising it.
    """

    def factory(preds: Sequence[str], refs: Sequence[str]) -> Resampler:
        metric = make_metric()
        stats = np.asarray(
            metric._extract_corpus_statistics(list(preds), [list(refs)]), dtype=np.int64
        )

        def scores(idx: np.ndarray) -> np.ndarray:
            sums = stats[idx].sum(axis=1)
            return np.array([metric._compute_score_from_stats(row).score for row in sums])

        return scores

    return factory


# --------------------------------------------------------------------- perplexity


def perplexity(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``: perplexity from a summed natural-log negative
    log-likelihood over ``n_tokens`` predicted tokens. Returns ``inf`` on overflow."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if math.isnan(total_nll) or total_nll < 0:
        raise ValueError(f"total_nll must be a non-negative number, got {total_nll}")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf


# ----------------------------------------------------------------------- registry


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
        higher_is_better: direction of improvement.
        scale: 1 for fractions in [0, 1], 100 for 0-100 scores.
        resampler: optional fast path for the bootstrap of a corpus metric:
            ``(preds, refs) -> (index matrix (R, n) -> R scores)``. Without it the
            bootstrap calls ``fn`` once per resample.
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


def macro_f1_metric(labels: Sequence[str]) -> MetricSpec:
    """A macro-F1 :class:`MetricSpec` over a fixed label set (e.g. a task's classes),
    usable with :func:`bootstrap_ci` and :func:`paired_bootstrap_diff`."""
    label_list = list(labels)

    def fn(preds: Sequence[str], refs: Sequence[str]) -> float:
        return macro_f1(preds, refs, labels=label_list)

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


def get_metric(name: str) -> MetricSpec:
    """The registered :class:`MetricSpec` called ``name``; ValueError if unknown."""
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(METRICS))
        raise ValueError(f"unknown metric {name!r}; valid names: {valid}") from None


def compute(name: str, preds: Sequence[str], refs: Sequence[str]) -> float:
    """Compute the registered metric ``name`` on ``preds`` against ``refs``."""
    return get_metric(name).fn(preds, refs)


# ----------------------------------------------------------------------- bootstrap

MetricLike = Union[str, MetricSpec, MetricFn]

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
) -> tuple[float, float, float]:
    """Point estimate and percentile-bootstrap interval: ``(point, low, high)``.

    Examples are resampled with replacement ``n_resamples`` times. For per-example
    metrics the per-example score vector is computed once and averaged over each
    resample; macro-F1 is recomputed from per-resample confusion counts (label set
    fixed on the full data); BLEU/chrF from summed per-sentence statistics; a plain
    callable is re-run on every resample. With one example the interval is
    degenerate: ``(point, point, point)``.
    """
    _check_bootstrap_args(n_resamples, confidence)
    _check_pair(preds, refs)
    spec = _as_spec(name_or_fn)
    point = float(spec.fn(preds, refs))
    resample = _resampler(spec, preds, refs)
    samples = np.concatenate(
        [resample(idx) for idx in _index_batches(len(preds), n_resamples, seed)]
    )
    low, high = _percentile_interval(samples, confidence)
    return point, low, high


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


def paired_bootstrap_diff(
    name: MetricLike,
    preds_a: Sequence[str],
    preds_b: Sequence[str],
    refs: Sequence[str],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of ``metric(b) - metric(a)`` on the same examples.

    Each resample draws one set of example indices and scores both systems on it,
    so per-example correlation between the systems cancels out.

    Returns a dict with ``delta`` (metric(b) - metric(a) on the full set), ``low`` and
    ``high`` (percentile interval of the resampled deltas), ``p_value`` (two-sided:
    twice the fraction of resampled deltas on the other side of 0 from ``delta``,
    ties included, capped at 1; its resolution is ``2 / n_resamples``, so 0.0 means
    below that) and ``n`` (number of examples).
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
            for idx in _index_batches(len(refs), n_resamples, seed)
        ]
    )
    low, high = _percentile_interval(deltas, confidence)
    return {
        "delta": delta,
        "low": low,
        "high": high,
        "p_value": _two_sided_p(delta, deltas),
        "n": len(refs),
    }
