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

__all__ = [
    "first_sentence",
    "main_inputs",
]

LEAD_MAX_WORDS = 40  # a "sentence" that runs on (no full stop in a dialogue) is cut here


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


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")


def first_sentence(text: str, max_words: int = LEAD_MAX_WORDS) -> str:
    """Text up to the first '.', '!' or '?' followed by whitespace, or the first line break,
    whichever comes first; at most ``max_words`` words.

    >>> first_sentence("The cat sat. Then it left.")
    'The cat sat.'
    """
    sentence = _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
    return " ".join(sentence.split()[:max_words])
