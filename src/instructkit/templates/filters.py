"""The filters and globals templates get beyond plain Jinja's, all bounded.

- Jinja's filters that can grow their input (`center`, `indent`, `wordwrap`, `format`, `join`, `replace`,
  `batch`, `slice`), each with the growth checked first (`BOUNDED_FILTERS`), and `default` (`d`), which also
  replaces a missing value (null, NaN, empty text);
- PromptSource's custom filters and helpers (`choice`, `most_frequent`, `highlight`, `permutation`,
  `reorder`, `to_letter`), so its templates render unchanged; the random ones are seeded per render.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2 import filters as jinja_filters

from instructkit.templates.limits import (
    check_percent_format,
    check_size,
    expanded_size,
    replaced_size,
    rng,
)
from instructkit.templates.schema import missing_kind


# Jinja's filters that can grow their input, with the growth checked first. Each keeps the signature of
# the filter it wraps (jinja_filters.do_*), including the context Jinja passes in front.
def _center_filter(value: Any, width: int = 80) -> str:
    check_size(width if isinstance(width, int) else 0, "filter center")
    return jinja_filters.do_center(value, width)


def _indent_filter(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    # the indentation (`width` spaces, or the string given) goes in front of every line: lines x width more
    pad = width if isinstance(width, int) else len(str(width))
    text = str(s)
    check_size(len(text) + pad * (text.count("\n") + 1), "filter indent")
    return jinja_filters.do_indent(s, width, first, blank)


@jinja2.pass_environment
def _wordwrap_filter(environment: Any, s: Any, width: int = 79, break_long_words: bool = True,
                     wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
    check_size(width if isinstance(width, int) else 0, "filter wordwrap")
    if wrapstring is not None and isinstance(width, int):  # at most one break per `width` characters
        text = str(s)
        check_size(len(text) + len(str(wrapstring)) * (len(text) // max(width, 1) + 1), "filter wordwrap")
    return jinja_filters.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    check_percent_format(str(value), kwargs or args)
    return jinja_filters.do_format(value, *args, **kwargs)


@jinja2.pass_eval_context
def _join_filter(eval_ctx: Any, value: Any, d: str = "", attribute: str | int | None = None) -> str:
    items = value if isinstance(value, str) else list(value)
    check_size(expanded_size(items) + len(str(d)) * len(items), "filter join")
    return jinja_filters.sync_do_join(eval_ctx, items, d, attribute)


@jinja2.pass_eval_context
def _replace_filter(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    check_size(replaced_size(str(s), str(old), str(new), count), "filter replace")
    return jinja_filters.do_replace(eval_ctx, s, old, new, count)


def _batch_filter(value: Any, linecount: int, fill_with: Any = None) -> Any:
    check_size(linecount if isinstance(linecount, int) else 0, "filter batch")
    return jinja_filters.do_batch(value, linecount, fill_with)


def _slice_filter(value: Any, slices: int, fill_with: Any = None) -> Any:
    check_size(slices if isinstance(slices, int) else 0, "filter slice")
    return jinja_filters.sync_do_slice(value, slices, fill_with)


def default_filter(value: Any, default_value: Any = "", boolean: bool = False) -> Any:
    """Jinja's `default` (`d`), a missing value counting as undefined: null, NaN and empty text, the one rule
    of missing values in every format (data/rows.py), which reaches an optional field as "" or None. Plain
    Jinja gave `{{ votes | default('unknown') }}` "None" and `{{ input | default('none') }}` "" there."""
    if isinstance(value, jinja2.Undefined) or missing_kind(value) is not None or (boolean and not value):
        return default_value
    return value


BOUNDED_FILTERS = {
    "default": default_filter,
    "d": default_filter,
    "center": _center_filter,
    "indent": _indent_filter,
    "wordwrap": _wordwrap_filter,
    "format": _format_filter,
    "join": _join_filter,
    "replace": _replace_filter,
    "batch": _batch_filter,
    "slice": _slice_filter,
}


# PromptSource's custom filters and helpers, so its templates render unchanged.
@jinja2.pass_context  # a context filter is never constant-folded at compile time, so it stays random
def choice(_context: Any, choices: Sequence[Any]) -> Any:
    """PromptSource `choice`: a random element, seeded per (template, row) here."""
    return rng().choice(list(choices))


def most_frequent(items: Sequence[Any]) -> list[Any] | None:
    """PromptSource `most_frequent`: the items that occur most often."""
    if not items:
        return None
    counts = Counter(items).most_common()
    top = counts[0][1]
    return [item for item, count in counts if count == top]


def highlight(text: str) -> str:
    """PromptSource `highlight` (an HTML span used in its viewer)."""
    return "<span style='color: #F08080'>" + str(text) + "</span>"


@jinja2.pass_context
def permutation(_context: Any, items: Sequence[Any]) -> list[Any]:
    """A seeded random permutation of `items`."""
    items = list(items)
    rng().shuffle(items)
    return items


def reorder(items: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """`items` reordered by the index list `order`."""
    items = list(items)
    return [items[i] for i in order]


def to_letter(index: int) -> str:
    """0 -> 'A', 1 -> 'B', ... (option letters).

    Raises: ValueError when `index` is outside 0..25.
    """
    if not 0 <= int(index) < 26:
        raise ValueError(f"to_letter takes 0..25, got {index}")
    return chr(ord("A") + int(index))

