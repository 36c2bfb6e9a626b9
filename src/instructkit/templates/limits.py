"""How much one render may build and do: the caps, the per-render budgets, and the checks that enforce them.

Jinja's sandbox alone blocks access to Python internals but happily renders `{{ 'a' * 100000000 }}` or
`range(10**9)` loops. The checks here run before an operation builds its result: sizes of strings and
containers (shared parts counted per reference), `%` and `str.format` widths, integer growth, the items
`range()` draws from a per-render budget, and the total number of loop iterations, calls and operators per
render. Each raises jinja2's SecurityError; `sandbox.render_bounded` turns that into a TemplateError.
"""

from __future__ import annotations

import contextvars
import random
import re
import string
from typing import Any

from jinja2.sandbox import SecurityError

MAX_RENDER_CHARS = 200_000
"""Cap on the rendered prompt or completion, in characters."""
MAX_RANGE_BUDGET = 10_000
"""Total number of items all `range()` calls of one render may produce."""
MAX_OPERATIONS = 100_000
"""Loop iterations + calls + operators one render may perform (a real template needs a few hundred)."""
MAX_INT_BITS = 10_000
"""Largest integer a template may compute with * or ** (about 3,000 decimal digits)."""

render_state: contextvars.ContextVar[dict] = contextvars.ContextVar("instructkit_render_state")
_CONTAINERS = (list, tuple, dict, set, frozenset)


def _state() -> dict:
    try:
        return render_state.get()
    except LookupError:  # rendering outside Template.render (e.g. a test of the environment)
        state = {"range": 0, "seed": 0}
        render_state.set(state)
        return state


def rng() -> random.Random:
    """The render's random generator, created on first use (most templates never need one)."""
    state = _state()
    if "rng" not in state:
        state["rng"] = random.Random(state["seed"])
    return state["rng"]


def check_size(n: int, what: str) -> None:
    """Refuse building something of `n` characters or items (`what` names it in the message).

    Raises: SecurityError when `n` is over MAX_RENDER_CHARS.
    """
    if n > MAX_RENDER_CHARS:
        raise SecurityError(f"{what} would produce {n:,} items, over the cap of {MAX_RENDER_CHARS:,}")


def bounded_range(*args: int) -> range:
    """`range(*args)`, its length drawn from the render's budget (the `range` templates see).

    Raises: SecurityError when this render's ranges together pass MAX_RANGE_BUDGET items.
    """
    r = range(*args)
    state = _state()
    state["range"] += len(r)
    if state["range"] > MAX_RANGE_BUDGET:
        raise SecurityError(f"range() budget of {MAX_RANGE_BUDGET:,} items per render exceeded")
    return r


def charge(n: int = 1) -> None:
    """Count loop iterations, calls and operators against the render's budget of MAX_OPERATIONS.

    Bounds CPU where nothing grows: `{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}` over a
    200,000-character `s` is 4e10 empty iterations; a macro calling itself twice per level is 2^depth calls.

    Raises: SecurityError when the render's count passes MAX_OPERATIONS.
    """
    state = _state()
    state["ops"] = ops = state.get("ops", 0) + n
    if ops > MAX_OPERATIONS:
        raise SecurityError(f"the template did more than {MAX_OPERATIONS:,} operations (loop iterations, calls, "
                            "operators) in one render")


def expanded_size(value: Any) -> int:
    """Characters and items `value` prints as: every reference to a shared part counts again.

    `[s, s]` with len(s) == 1,000 is 2,001. A `{% set ns.l = [ns.l, ns.l] %}` loop doubles it each time
    while memory stays small, until printing it needs 2^n characters; checking this size wherever a
    template builds a value keeps everything it builds under MAX_RENDER_CHARS. Container sizes are cached
    per render (by id, holding the object), so nesting costs O(new items) per step. The walk stops early
    once over the cap (the partial sum is then already too big).
    """
    if isinstance(value, (str, bytes, range)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 3 + 1  # decimal digits, about bits x log10(2)
    if not isinstance(value, _CONTAINERS):
        return 1
    cache = _state().setdefault("sizes", {})
    found = cache.get(id(value))
    if found is not None and found[0] is value:
        return found[1]
    total = 1
    for item in (x for kv in value.items() for x in kv) if isinstance(value, dict) else value:
        total += expanded_size(item)
        if total > MAX_RENDER_CHARS:
            break
    cache[id(value)] = (value, total)
    return total


def check_bits(bits: int, what: str) -> None:
    """Refuse computing an integer of `bits` bits (`what` names the operation).

    Raises: SecurityError when `bits` is over MAX_INT_BITS.
    """
    if bits > MAX_INT_BITS:
        raise SecurityError(f"{what} would produce a {bits:,}-bit integer, over the cap of {MAX_INT_BITS:,} bits")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_number(text: str, what: str) -> None:
    check_size(int(text) if len(text) <= 9 else MAX_RENDER_CHARS + 1, what)


def check_percent_format(fmt: str, args: Any) -> None:
    """`fmt % args`: '%1000000000s' would allocate a gigabyte before any output cap sees it.

    Raises: SecurityError when a width or precision, or the formatted size, is over MAX_RENDER_CHARS.
    """
    values = args if isinstance(args, tuple) else (args,)
    for match in _PERCENT_SPEC.finditer(fmt):
        for number in match.groups():
            if number == "*":
                for value in values:
                    if isinstance(value, int):
                        check_size(abs(value), "a '%*' width")
            elif number:
                _check_number(number, "a %-format width or precision")
    check_size(len(fmt) + expanded_size(args), "%-formatting")


def check_brace_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """`fmt.format(...)`: '{:>1000000000}' or '{0:{1}}' with a huge argument allocates it all at once.

    Raises: SecurityError when a width or precision, or the formatted size, is over MAX_RENDER_CHARS.
    """
    values = [*args, *kwargs.values()]
    if args and isinstance(args[0], dict):  # format_map(mapping)
        values += list(args[0].values())
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # malformed: str.format itself raises
    for _, _, spec, _ in fields:
        for number in _DIGITS.findall(spec or ""):
            _check_number(number, "a format width or precision")
        if spec and "{" in spec:  # a nested field takes its width from an argument
            for value in values:
                if isinstance(value, int):
                    check_size(abs(value), "a format width")
    check_size(len(fmt) + expanded_size(values), "str.format")


def replaced_size(s: str, old: str, new: str, count: Any = None) -> int:
    """len(s.replace(old, new, count)) without building it: '' as `old` matches len(s) + 1 times."""
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))
