"""The main input of a template's prompts (the document, the source text) and its first sentence.

The *main input* of a prompt is found without knowing the template: the text that all the
prompts of a template share at the start and at the end is the instruction (cut back to
whitespace, so a shared "The" of "The cat" / "Then" stays), the rest varies from example to
example. Of that varying part we take the longest block between blank lines (the document
rather than, say, a short question), drop a header line ending in ":" ("Dialogue:") and, from
a one-line block, a short "Label: " prefix. Example, template
``"Article: {{ article }}\\n\\nWhat are the key takeaways?\\nTakeaways:"`` over two prompts:
shared start ``"Article: "``, shared end ``"\\n\\nWhat are the key takeaways?\\nTakeaways:"``,
main input = the article. With a single prompt there is nothing to compare, so only the
block/header rules apply.

:func:`first_sentence` cuts a text at its first sentence end or line break (the lead-sentence baselines).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from instructkit.evaluate.metrics import _HAN_KANA, _SOUTHEAST_ASIAN

__all__ = [
    "SENTENCE_END",
    "first_sentence",
    "main_inputs",
    "split_sentences",
]

LEAD_MAX_WORDS = 40  # a "sentence" that runs on (no full stop in a dialogue) is cut here
_WORD_RE = re.compile(f"[{_SOUTHEAST_ASIAN}{_HAN_KANA}]|[^\\s{_SOUTHEAST_ASIAN}{_HAN_KANA}]+")


def _cut_back_to_space(text: str, n: int) -> int:
    """Largest ``k <= n`` such that ``text[:k]`` is empty or ends in whitespace.

    A shared start must end between words: two documents opening "The cat" and "Then" share
    "The", and two sentences ending "bike." and "snow." share ".", which belong to the text.
    """
    if n >= len(text):
        return n
    k = n
    while k > 0 and not text[k - 1].isspace():
        k -= 1
    return k


def _cut_forward_to_space(text: str, start: int) -> int:
    """Smallest ``k >= start`` such that ``text[k:]`` is empty or starts with whitespace."""
    k = start
    while 0 < k < len(text) and not text[k].isspace():
        k += 1
    return k


def _shared_ends(prompts: Sequence[str]) -> tuple[int, int]:
    """Lengths of the start and the end that every prompt shares, cut back to whitespace.

    ``os.path.commonprefix`` works on any list of strings (character by character); the shared
    end is the common prefix of the reversed strings. The two never overlap: their sum is capped
    at the shortest prompt's length.
    """
    if len(prompts) < 2:
        return 0, 0
    head = len(os.path.commonprefix(list(prompts)))
    tail = len(os.path.commonprefix([p[::-1] for p in prompts]))
    tail = min(tail, min(len(p) for p in prompts) - head)
    head = min(_cut_back_to_space(p, head) for p in prompts)
    tail = min(len(p) - _cut_forward_to_space(p, len(p) - tail) for p in prompts)
    return head, tail


_LABEL_PREFIX = re.compile(r"^[A-Z][\w ]{0,30}?:\s+")  # "Article: ", "Opening sentence: "


def _main_block(varying: str) -> str:
    """Longest blank-line-separated block, minus a header line ending in ':' and a 'Label: ' prefix."""
    blocks = [b.strip() for b in re.split(r"\n\s*\n", varying) if b.strip()]
    if not blocks:
        return varying.strip()
    block = max(blocks, key=len)  # the first of equally long blocks
    lines = block.split("\n")
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):
        block = "\n".join(lines[1:]).strip()
    if "\n" not in block and len(block.split()) > 3:  # not a dialogue's "Name: ..." lines
        block = _LABEL_PREFIX.sub("", block, count=1)
    return block.strip().strip('"').strip()


def main_inputs(prompts: Sequence[str]) -> list[str]:
    """The main input of each prompt of ONE template (see the module docstring)."""
    head, tail = _shared_ends(prompts)
    return [_main_block(p[head : len(p) - tail]) for p in prompts]


SENTENCE_END = r"(?<=[.!?\u2026\u037e\u0589\u061f\u06d4\u0964\uff0e])\s+|(?<=[\u3002\uff01\uff1f])\s*"
"""Where a sentence ends (a regular expression matching the gap after it): after . ! ? (or the ellipsis,
Greek and Armenian question marks, Arabic ؟ and ۔, Devanagari ।, full-width ．) before whitespace, and
after an ideographic or full-width stop 。！？, which no space follows in Chinese or Japanese text."""
_SENTENCE_END = re.compile(SENTENCE_END + r"|\n")
_ABBREVIATION = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Mx|Dr|Prof|Sr|Jr|St|Mt|Gen|Col|Capt|Lt|Sgt|Rev|Hon|Gov|Sen|Rep|Pres|vs|etc|approx|"
    r"Inc|Ltd|Corp|Co|Fig|Eq|Vol|pp|cf|al|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)|"
    r"(?<![\w.])[^\W\d_]|(?:\b[^\W\d_]\.)+[^\W\d_])\.$", re.IGNORECASE)
"""A word whose full stop is not a sentence end: a title or common abbreviation ("Dr.", "etc."), an initial
("J."), or a dotted one ("e.g.", "U.S.")."""


def sentence_gaps(text: str, pattern: re.Pattern = _SENTENCE_END) -> list[tuple[int, int]]:
    """(start, end) of each gap in `text` that `pattern` (`SENTENCE_END`, with line breaks by default) matches
    and that ends a sentence: a full stop after an abbreviation (`_ABBREVIATION`: "Dr. Smith", "J. K.
    Rowling", "e.g. this") does not, as with Punkt's abbreviation list (Kiss & Strunk 2006,
    nltk.tokenize.punkt) but fixed, not trained (no trained parameters are at hand offline). A lowercase
    word after a full stop still starts a sentence (lowercased datasets such as XSum). Known limit: a single
    capital letter before a full stop is read as an initial ("Plan B. Then" stays one sentence)."""
    gaps = []
    for gap in pattern.finditer(text):
        before = text[:gap.start()]
        if before.endswith(".") and "\n" not in gap.group() and _ABBREVIATION.search(before[-12:]):
            continue
        gaps.append(gap.span())
    return gaps


def split_sentences(text: str, pattern: re.Pattern = _SENTENCE_END) -> list[str]:
    """The non-empty sentences of `text` (stripped), cut at `sentence_gaps`."""
    text, parts, start = text.strip(), [], 0
    for gap_start, gap_end in sentence_gaps(text, pattern):
        parts.append(text[start:gap_start])
        start = gap_end
    parts.append(text[start:])
    return [part for part in parts if part]


def first_sentence(text: str, max_words: int = LEAD_MAX_WORDS) -> str:
    """Text up to its first sentence end (`SENTENCE_END`) or line break, whichever comes first; at most
    ``max_words`` words, each character of a script written without spaces (Chinese, Japanese, Thai ...)
    counting as a word. Without the ideographic stop and that count a Chinese article was one sentence of
    one word: the lead baseline was the whole article.

    >>> first_sentence("The cat sat. Then it left.")
    'The cat sat.'
    >>> first_sentence("今天很好。我们走吧。")
    '今天很好。'
    """
    sentence = next(iter(split_sentences(text)), "")
    words = list(_WORD_RE.finditer(sentence))
    if len(words) <= max_words:
        return " ".join(sentence.split())
    return " ".join(sentence[:words[max_words - 1].end()].split())
