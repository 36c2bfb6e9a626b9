"""Metric functions computed here (classification, extractive QA, perplexity) and the metrics' input contract.

Every metric takes ``preds`` and ``refs``: two equally long, non-empty sequences of
strings, one prediction and one reference per example (a single reference per example);
:func:`_check_pair` enforces this for every metric module.
Each function is named for exactly what it computes:

* classification: :func:`accuracy` (exact string equality), :func:`macro_f1`,
  :func:`per_class`, :func:`confusion`;
* extractive QA (SQuAD conventions): :func:`normalize_answer`, :func:`exact_match`,
  :func:`token_f1`;
* language modelling: :func:`perplexity`.

The generation metrics (ROUGE, BLEU, chrF) are in ``instructkit.evaluate.generation_metrics``, the
metric names in ``instructkit.evaluate.metric_registry``, confidence intervals in
``instructkit.evaluate.bootstrap``. Accuracy, F1 and exact match are fractions in [0, 1].
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "accuracy",
    "confusion",
    "exact_match",
    "macro_f1",
    "normalize_answer",
    "per_class",
    "perplexity",
    "token_f1",
]

MetricFn = Callable[[Sequence[str], Sequence[str]], float]
PerExampleFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
# A resampler is prepared once for (preds, refs); it then maps an index matrix of
# shape (n_resamples, n) to the metric value on each resample, shape (n_resamples,).
Resampler = Callable[[np.ndarray], np.ndarray]
ResamplerFactory = Callable[[Sequence[str], Sequence[str]], Resampler]


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
    """Fraction of examples whose prediction equals the reference exactly (up to Unicode canonical
    equivalence, NFC: "cafe\u0301" is "caf\u00e9"; no other normalisation).

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty.
    """
    return float(_accuracy_per_example(preds, refs).mean())


def _accuracy_per_example(preds: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """1.0 where ``pred == ref`` (exact string equality up to NFC), else 0.0."""
    _check_pair(preds, refs)
    return np.array([p == r or unicodedata.normalize("NFC", p) == unicodedata.normalize("NFC", r)
                     for p, r in zip(preds, refs)], dtype=float)


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

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty,
    or when ``labels`` is given empty or with duplicates.
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

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty,
    or when ``labels`` is given empty or with duplicates.
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
    ``labels`` are not counted.

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty, or when ``labels`` is empty or has duplicates.
    """
    _check_pair(preds, refs)
    label_list = _label_set(preds, refs, labels)
    k = len(label_list)
    ref_codes = _label_codes(refs, label_list)
    pred_codes = _label_codes(preds, label_list)
    keep = (ref_codes >= 0) & (pred_codes >= 0)
    flat = np.bincount(ref_codes[keep] * k + pred_codes[keep], minlength=k * k)
    return flat.reshape(k, k).tolist()


def _macro_f1_resampler(labels: Sequence[str] | None = None) -> ResamplerFactory:
    """Vectorised macro-F1 over many resamples, from per-resample confusion counts: on every resample the
    value the metric has on that resample's examples.

    The classes averaged are those of the resample, as the metric picks them on any data: with ``labels``
    (``macro_f1_metric``), the listed labels that occur among the resample's references; without, the
    labels occurring among its references or predictions (:func:`macro_f1`'s default). A class the
    resample does not hold has no F1 and is left out: counted as 0, as a fixed class set did, a perfect
    classifier with one rare class (1 of 20 references) had macro-F1 1.0 with a 95% interval
    [0.67, 1.0], the low end only the resamples that miss the class (Lightning-AI/torchmetrics#300). A
    prediction of a class left out still costs the recall of its example's true class.
    Per-class F1 is ``2 tp / (n_pred + n_ref)``, which equals sklearn's F1 with ``zero_division=0``;
    a resample holding no class of ``labels`` scores 0.
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
            n_ref, n_pred = count(r, r >= 0), count(p, p >= 0)
            denom = n_ref + n_pred
            f1 = np.divide(2.0 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)
            present = (n_ref if labels is not None else denom) > 0
            classes = present.sum(axis=1)
            total = (f1 * present).sum(axis=1)
            return np.divide(total, classes, out=np.zeros(total.shape), where=classes > 0)

        return scores

    return factory


# ------------------------------------------------------------- extractive QA (SQuAD)

# Scripts written without spaces between words: each character is a token (Thai, Lao, Myanmar, Khmer,
# Japanese kana, CJK ideographs). Hangul is written with spaces and keeps its words.
_HAN_KANA = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_SOUTHEAST_ASIAN = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"  # Thai, Lao, Myanmar, Khmer
_UNSPACED_RE = re.compile(f"([{_SOUTHEAST_ASIAN}{_HAN_KANA}])")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _punctuation(ch: str) -> bool:
    """ASCII punctuation (``string.punctuation``, symbols such as ``$`` included) or any Unicode punctuation
    character (general category P*: ``“ ” ’ – — 。 ， ¿``): MLQA's ``PUNCT`` set."""
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def normalize_answer(s: str) -> str:
    """SQuAD answer normalisation (the official SQuAD v1.1/v2.0 evaluation script's), with the punctuation of
    every script removed as MLQA's evaluation script (facebookresearch/MLQA, used by XQuAD and lighteval) does.

    In order:

    0. Unicode NFC, so a canonically equivalent spelling ("cafe\u0301" for "caf\u00e9") is the same answer;
    1. lowercase;
    2. delete punctuation, ASCII (``string.punctuation``) or Unicode (category P*: curly quotes,
       dashes, ``。``), without inserting a space, so ``"brown-fox"`` becomes ``"brownfox"`` and
       ``"“Paris”"`` ``"paris"``; on ASCII text exactly SQuAD's step (which keeps ``“Paris”``'s quotes, so
       a model writing typographic quotes or a full stop ``。`` missed an exact match);
    3. replace the whole words ``a``, ``an``, ``the`` with a space;
    4. split into words at whitespace, each character of a script written without spaces (CJK
       ideographs, kana, Thai, Lao, Myanmar, Khmer) a word of its own, as MLQA's "mixed segmentation"
       does for Chinese; join them with one space. Otherwise a Chinese answer was one token, so token F1
       of 北京市 against 北京 was 0, not 0.8.

    Example: ``normalize_answer("The Cat!") == "cat"``, ``normalize_answer("北京。") == "北 京"``.
    """
    text = unicodedata.normalize("NFC", s).lower()
    text = "".join(ch for ch in text if not _punctuation(ch))
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(_UNSPACED_RE.sub(r" \1 ", text).split())


def _exact_match_per_example(preds: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """1.0 where the normalised prediction equals the normalised reference."""
    _check_pair(preds, refs)
    return np.array(
        [normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)],
        dtype=float,
    )


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of examples equal after :func:`normalize_answer` (SQuAD exact match).

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty.
    """
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
    """Mean over examples of SQuAD token F1 (see :func:`_token_f1_single`).

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty.
    """
    return float(_token_f1_per_example(preds, refs).mean())


# --------------------------------------------------------------------- perplexity


def perplexity(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``: perplexity from a summed natural-log negative
    log-likelihood (nats) over ``n_tokens`` predicted tokens (a count). Returns ``inf`` on overflow.

    Raises: ValueError when ``n_tokens`` is not positive or ``total_nll`` is negative or NaN.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if math.isnan(total_nll) or total_nll < 0:
        raise ValueError(f"total_nll must be a non-negative number, got {total_nll}")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf
