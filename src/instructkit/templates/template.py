"""Template and Schema: sandboxed Jinja prompt + completion, answer choices and metadata.

Depends on jinja2 and the standard library only, so the template library is usable without torch.

Rendering runs in Jinja's ImmutableSandboxedEnvironment with StrictUndefined. The sandbox alone blocks
access to Python internals but happily renders `{{ 'a' * 100000000 }}` or `range(10**9)` loops, so this
module adds bounds: string/list multiplication and padding methods are size-checked before they run,
`range()` draws from a per-render budget, recursion errors are caught, and the rendered text is capped.
It also bounds what the operators and literals Jinja compiles to plain Python would let through: `~`
concatenation, `%` and `str.format` widths, integer growth, list/dict literals (shared parts counted
per reference), macro results, and the total number of loop iterations, calls and operators per render.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import random
import re
import string
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.meta
from jinja2 import filters as jinja_filters
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from instructkit.errors import TemplateError

MAX_RENDER_CHARS = 200_000
"""Cap on the rendered prompt or completion, in characters."""
MAX_RANGE_BUDGET = 10_000
"""Total number of items all `range()` calls of one render may produce."""
MAX_OPERATIONS = 100_000
"""Loop iterations + calls + operators one render may perform (a real template needs a few hundred)."""
MAX_INT_BITS = 10_000
"""Largest integer a template may compute with * or ** (about 3,000 decimal digits)."""
CHOICES_SEPARATOR = "|||"

TASK_FAMILIES = (
    "classification",
    "sentiment",
    "rating",
    "nli",
    "yes_no_qa",
    "generation",
    "summarization",
    "title_generation",
    "translation",
    "extractive_qa",
    "question_generation",
    "instruction_following",
)
CHOICE_FAMILIES = frozenset({"classification", "sentiment", "rating", "nli", "yes_no_qa"})
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    **{family: ("accuracy", "macro_f1") for family in CHOICE_FAMILIES},
    "summarization": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "title_generation": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "translation": ("bleu", "chrf"),
    "extractive_qa": ("exact_match", "token_f1"),
    "generation": ("rougeL",),
    "question_generation": ("rougeL",),
    "instruction_following": ("rougeL",),
}
FIELD_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}


# --------------------------------------------------------------------------------------------------
# The bounded sandbox
# --------------------------------------------------------------------------------------------------

_render_state: contextvars.ContextVar[dict] = contextvars.ContextVar("instructkit_render_state")
_PADDING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})
_CONTAINERS = (list, tuple, dict, set, frozenset)
_SIZED = (str, *_CONTAINERS)


def _state() -> dict:
    try:
        return _render_state.get()
    except LookupError:  # rendering outside Template.render (e.g. a test of the environment)
        state = {"range": 0, "seed": 0}
        _render_state.set(state)
        return state


def _rng() -> random.Random:
    """The render's random generator, created on first use (most templates never need one)."""
    state = _state()
    if "rng" not in state:
        state["rng"] = random.Random(state["seed"])
    return state["rng"]


def _check_size(n: int, what: str) -> None:
    if n > MAX_RENDER_CHARS:
        raise SecurityError(f"{what} would produce {n:,} items, over the cap of {MAX_RENDER_CHARS:,}")


def _bounded_range(*args: int) -> range:
    r = range(*args)
    state = _state()
    state["range"] += len(r)
    if state["range"] > MAX_RANGE_BUDGET:
        raise SecurityError(f"range() budget of {MAX_RANGE_BUDGET:,} items per render exceeded")
    return r


def _charge(n: int = 1) -> None:
    """Count loop iterations, calls and operators against the render's budget of MAX_OPERATIONS.

    Bounds CPU where nothing grows: `{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}` over a
    200,000-character `s` is 4e10 empty iterations; a macro calling itself twice per level is 2^depth calls.
    """
    state = _state()
    state["ops"] = ops = state.get("ops", 0) + n
    if ops > MAX_OPERATIONS:
        raise SecurityError(f"the template did more than {MAX_OPERATIONS:,} operations (loop iterations, calls, "
                            "operators) in one render")


def _expanded_size(value: Any) -> int:
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
        total += _expanded_size(item)
        if total > MAX_RENDER_CHARS:
            break
    cache[id(value)] = (value, total)
    return total


def _check_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise SecurityError(f"{what} would produce a {bits:,}-bit integer, over the cap of {MAX_INT_BITS:,} bits")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_number(text: str, what: str) -> None:
    _check_size(int(text) if len(text) <= 9 else MAX_RENDER_CHARS + 1, what)


def _check_percent_format(fmt: str, args: Any) -> None:
    """`fmt % args`: '%1000000000s' would allocate a gigabyte before any output cap sees it."""
    values = args if isinstance(args, tuple) else (args,)
    for match in _PERCENT_SPEC.finditer(fmt):
        for number in match.groups():
            if number == "*":
                for value in values:
                    if isinstance(value, int):
                        _check_size(abs(value), "a '%*' width")
            elif number:
                _check_number(number, "a %-format width or precision")
    _check_size(len(fmt) + _expanded_size(args), "%-formatting")


def _check_brace_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """`fmt.format(...)`: '{:>1000000000}' or '{0:{1}}' with a huge argument allocates it all at once."""
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
                    _check_size(abs(value), "a format width")
    _check_size(len(fmt) + _expanded_size(values), "str.format")


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, routing what the sandbox cannot see through BoundedSandbox methods.

    `a ~ b` (compiled to a plain str.join), the items of a `for` loop, and list/dict/tuple literals do not
    pass through `call_binop` or `call`; here they go through `bounded_concat`, `bounded_iter` and
    `bounded_literal`.
    """

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        if frame.eval_ctx.volatile:
            markup = "context.eval_ctx.volatile"
        else:
            markup = "True" if frame.eval_ctx.autoescape else "False"
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(f"), {markup})")

    def visit_For(self, node: nodes.For, frame: Any) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None,
                               lineno=node.iter.lineno)
        super().visit_For(node, frame)

    def _literal(self, visit: Any, node: nodes.Expr, frame: Any) -> None:
        self.write("environment.bounded_literal(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Any) -> None:
        self._literal(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Any) -> None:
        self._literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Any) -> None:
        if node.ctx == "load":
            self._literal(super().visit_Tuple, node, frame)
        else:  # an assignment target: `{% for a, b in pairs %}`
            super().visit_Tuple(node, frame)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment that also bounds the size of what a template can build and the work
    it can do: every value it builds stays under MAX_RENDER_CHARS (characters and items, shared parts
    counted per reference), integers under MAX_INT_BITS, and loop iterations + calls + operators under
    MAX_OPERATIONS per render."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})  # intercepted ones are never constant-folded
    code_generator_class = _BoundedCodeGenerator

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _charge()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    _check_size(_expanded_size(seq) * max(times, 0), "sequence multiplication")
            if isinstance(left, int) and isinstance(right, int):
                _check_bits(left.bit_length() + right.bit_length(), "multiplication")
        elif operator == "**":
            if isinstance(right, int) and abs(right) > 64 and not (isinstance(left, int) and abs(left) <= 1):
                raise SecurityError("power with an exponent over 64 is not allowed in templates")
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                _check_bits(left.bit_length() * right, "power")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check_size(_expanded_size(left) + _expanded_size(right), "concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _charge()
        name = getattr(__obj, "__name__", "")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and name in _PADDING_METHODS:
            width = args[0] if args else kwargs.get("width", kwargs.get("tabsize", 8))
            if isinstance(width, int):
                _check_size(width * (len(owner) if name == "expandtabs" else 1), f"str.{name}")
        if isinstance(owner, str) and name == "replace" and len(args) >= 2:
            count = args[2] if len(args) > 2 else kwargs.get("count")
            _check_size(_replaced_size(owner, str(args[0]), str(args[1]), count), "str.replace")
        if isinstance(owner, str) and name == "join" and args:
            items = list(args[0])
            _check_size(sum(len(str(x)) for x in items) + len(owner) * len(items), "str.join")
            args = (items, *args[1:])
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, _SIZED):  # e.g. a macro that doubles its output per level
            _check_size(_expanded_size(result), f"the result of {name or getattr(__obj, 'name', '') or 'a call'}()")
        return result

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_brace_format(fmt, args, kwargs)
            return wrapper(*args, **kwargs)

        return bounded

    def bounded_iter(self, iterable: Any) -> Iterator[Any]:
        """The items of a `for` loop, each charged to the operations budget."""
        for item in iterable:
            _charge()
            yield item

    def bounded_concat(self, parts: tuple, markup: bool) -> str:
        """`a ~ b ~ c`, size-checked before the strings are built."""
        _charge()
        _check_size(sum(_expanded_size(p) for p in parts), "~ concatenation")
        return markup_join(parts) if markup else str_join(parts)

    def bounded_literal(self, value: Any) -> Any:
        """A list, dict or tuple literal, size-checked (shared parts counted per reference)."""
        _charge()
        _check_size(_expanded_size(value), "a list/dict literal")
        return value


# Jinja's filters that can grow their input, with the growth checked first. Each keeps the signature of
# the filter it wraps (jinja_filters.do_*), including the context Jinja passes in front.
def _center_filter(value: Any, width: int = 80) -> str:
    _check_size(width if isinstance(width, int) else 0, "filter center")
    return jinja_filters.do_center(value, width)


def _indent_filter(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    # the indentation (`width` spaces, or the string given) goes in front of every line: lines x width more
    pad = width if isinstance(width, int) else len(str(width))
    text = str(s)
    _check_size(len(text) + pad * (text.count("\n") + 1), "filter indent")
    return jinja_filters.do_indent(s, width, first, blank)


@jinja2.pass_environment
def _wordwrap_filter(environment: Any, s: Any, width: int = 79, break_long_words: bool = True,
                     wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
    _check_size(width if isinstance(width, int) else 0, "filter wordwrap")
    if wrapstring is not None and isinstance(width, int):  # at most one break per `width` characters
        text = str(s)
        _check_size(len(text) + len(str(wrapstring)) * (len(text) // max(width, 1) + 1), "filter wordwrap")
    return jinja_filters.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_percent_format(str(value), kwargs or args)
    return jinja_filters.do_format(value, *args, **kwargs)


@jinja2.pass_eval_context
def _join_filter(eval_ctx: Any, value: Any, d: str = "", attribute: str | int | None = None) -> str:
    items = value if isinstance(value, str) else list(value)
    _check_size(_expanded_size(items) + len(str(d)) * len(items), "filter join")
    return jinja_filters.sync_do_join(eval_ctx, items, d, attribute)


def _replaced_size(s: str, old: str, new: str, count: Any = None) -> int:
    """len(s.replace(old, new, count)) without building it: '' as `old` matches len(s) + 1 times."""
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


@jinja2.pass_eval_context
def _replace_filter(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    _check_size(_replaced_size(str(s), str(old), str(new), count), "filter replace")
    return jinja_filters.do_replace(eval_ctx, s, old, new, count)


def _batch_filter(value: Any, linecount: int, fill_with: Any = None) -> Any:
    _check_size(linecount if isinstance(linecount, int) else 0, "filter batch")
    return jinja_filters.do_batch(value, linecount, fill_with)


def _slice_filter(value: Any, slices: int, fill_with: Any = None) -> Any:
    _check_size(slices if isinstance(slices, int) else 0, "filter slice")
    return jinja_filters.sync_do_slice(value, slices, fill_with)


_BOUNDED_FILTERS = {
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
def _choice(_context: Any, choices: Sequence[Any]) -> Any:
    """PromptSource `choice`: a random element, seeded per (template, row) here."""
    return _rng().choice(list(choices))


def _most_frequent(items: Sequence[Any]) -> list[Any] | None:
    """PromptSource `most_frequent`: the items that occur most often."""
    if not items:
        return None
    counts = Counter(items).most_common()
    top = counts[0][1]
    return [item for item, count in counts if count == top]


def _highlight(text: str) -> str:
    """PromptSource `highlight` (an HTML span used in its viewer)."""
    return "<span style='color: #F08080'>" + str(text) + "</span>"


@jinja2.pass_context
def _permutation(_context: Any, items: Sequence[Any]) -> list[Any]:
    """A seeded random permutation of `items`."""
    items = list(items)
    _rng().shuffle(items)
    return items


def _reorder(items: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """`items` reordered by the index list `order`."""
    items = list(items)
    return [items[i] for i in order]


def _to_letter(index: int) -> str:
    """0 -> 'A', 1 -> 'B', ... (option letters)."""
    if not 0 <= int(index) < 26:
        raise ValueError(f"to_letter takes 0..25, got {index}")
    return chr(ord("A") + int(index))


def _make_environment() -> BoundedSandbox:
    env = BoundedSandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.globals["range"] = _bounded_range
    del env.globals["lipsum"]  # lorem ipsum has no use in a prompt; lipsum(10**9) loops for hours
    env.globals.update(zip=zip, enumerate=enumerate, len=len, to_letter=_to_letter)
    env.filters.update(
        choice=_choice,
        most_frequent=_most_frequent,
        highlight=_highlight,
        permutation=_permutation,
        reorder=_reorder,
        to_letter=_to_letter,
    )
    env.filters.update(_BOUNDED_FILTERS)
    return env


ENV = _make_environment()


def compile_source(source: str, where: str) -> jinja2.Template:
    """Compile Jinja source; a syntax error becomes a TemplateError naming `where` and the line."""
    try:
        template = ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{where}: Jinja syntax error on line {exc.lineno}: {exc.message}") from None
    except RecursionError:  # e.g. thousands of nested brackets: the parser and compiler recurse per level
        raise TemplateError(f"{where}: the template is nested too deeply to compile") from None
    except jinja2.TemplateError as exc:  # Jinja folds constants while compiling: `'a'['b'] and x` fails there
        raise TemplateError(f"{where}: {type(exc).__name__} while compiling: {exc}") from None
    # Jinja reads a template's globals (a ChainMap by default) on every render; a plain dict is faster.
    template.globals = dict(template.globals)
    return template


def fields_read(source: str) -> set[str]:
    """The top-level variables a Jinja source reads (best effort, static)."""
    try:
        return set(jinja2.meta.find_undeclared_variables(ENV.parse(source)))
    except (jinja2.TemplateError, RecursionError):  # syntax errors; errors while folding constants
        return set()


def render_bounded(template: jinja2.Template, context: dict[str, Any], where: str) -> str:
    """Render with the sandbox, mapping every failure to a TemplateError naming `where`.

    `context` must already hold the environment's globals (see `Template.render`): the context is then
    shared rather than copied, which is most of the cost of rendering a short template.
    """
    try:
        _render_state.get()
        token = None
    except LookupError:  # not inside Template.render: this render gets its own budgets
        token = _render_state.set({"range": 0, "seed": 0})
    try:
        pieces = []
        total = 0
        for piece in template.root_render_func(template.new_context(context, shared=True)):
            total += len(piece)
            if total > MAX_RENDER_CHARS:
                raise SecurityError(f"rendered text is over the cap of {MAX_RENDER_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{where}: undefined field: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateError(f"{where}: refused by the template sandbox: {exc}") from None
    except RecursionError:
        raise TemplateError(f"{where}: template recursion too deep") from None
    except MemoryError:
        raise TemplateError(f"{where}: template ran out of memory") from None
    except TemplateError:
        raise
    except Exception as exc:  # noqa: BLE001 - any runtime error in user Jinja is the template's fault
        raise TemplateError(f"{where}: {type(exc).__name__}: {exc}") from None
    finally:
        if token is not None:
            _render_state.reset(token)


# --------------------------------------------------------------------------------------------------
# Schema and Template
# --------------------------------------------------------------------------------------------------


def label_key(value: Any) -> str:
    """Canonical form of a label value for comparing with label-map keys: 5, 5.0 and "5" agree."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            return text
        return str(int(number)) if number.is_integer() else text
    return str(value)


@dataclass(frozen=True)
class Schema:
    """A dataset layout: its fields with types, the label field and label map, sample rows."""

    name: str
    fields: dict[str, str]
    description: str = ""
    source: str = ""
    label_field: str | None = None
    label_map: dict[Any, str] | None = None
    samples: tuple[dict, ...] = ()
    origin: str = "<builtin>"

    def coerce(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Convert the declared fields of `row` to their declared types.

        Raises ValueError naming the field when a value cannot be converted (the caller adds the
        file and row). Fields not declared pass through unchanged.
        """
        out = dict(row)
        for name, type_name in self.fields.items():
            if name not in out or out[name] is None:
                continue
            out[name] = _coerce_value(out[name], type_name, name)
        return out

    def check_label(self, row: Mapping[str, Any]) -> str | None:
        """A problem description when the row's label is outside the label map, else None."""
        if not self.label_field or not self.label_map or self.label_field not in row:
            return None
        value = row[self.label_field]
        keys = {label_key(k) for k in self.label_map}
        if label_key(value) not in keys:
            allowed = ", ".join(sorted(keys))
            return f"label {self.label_field}={value!r} is outside the label map ({allowed})"
        return None

    def label_name(self, value: Any) -> str:
        """The label map's name for a coded label value (the value itself without a map)."""
        if self.label_map:
            lookup = {label_key(k): v for k, v in self.label_map.items()}
            return lookup.get(label_key(value), str(value))
        return label_key(value)


def _coerce_value(value: Any, type_name: str, name: str) -> Any:
    if type_name == "str":
        if isinstance(value, (dict, list)):
            raise ValueError(f"field {name!r} should be text, got {type(value).__name__}")
        return value if isinstance(value, str) else label_key(value) if isinstance(value, float) else str(value)
    if type_name == "int":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"field {name!r} should be an integer, got {value!r}") from None
        if not number.is_integer():
            raise ValueError(f"field {name!r} should be an integer, got {value!r}")
        return int(number)
    if type_name == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"field {name!r} should be a number, got {value!r}") from None
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"true", "1", "yes", "1.0"}:
            return True
        if text in {"false", "0", "no", "0.0"}:
            return False
        raise ValueError(f"field {name!r} should be true/false, got {value!r}")
    if type_name in ("list", "dict"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        if not isinstance(value, FIELD_TYPES[type_name]):
            raise ValueError(f"field {name!r} should be a {type_name}, got {type(value).__name__}")
        return value
    raise ValueError(f"unknown field type {type_name!r} for field {name!r}")


@dataclass(frozen=True)
class Rendered:
    prompt: str
    completion: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Template:
    """One prompt template: a Jinja instruction and completion over the fields of a schema."""

    id: str
    name: str
    dataset: str
    task: str
    instruction: str
    completion: str
    answer_choices: tuple[str, ...] | str | None = None
    choices_in_prompt: bool = False
    metrics: tuple[str, ...] = ()
    reference: str = ""
    label_map: dict[Any, str] | None = None
    origin: str = "<builtin>"
    _compiled: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if self.task not in TASK_FAMILIES:
            raise TemplateError(
                f"{self.origin}: template {self.id!r}: unknown task family {self.task!r} "
                f"(one of {', '.join(TASK_FAMILIES)})"
            )
        where = f"{self.origin}: template {self.id!r}"
        self._compiled["instruction"] = compile_source(self.instruction, f"{where} (instruction)")
        self._compiled["completion"] = compile_source(self.completion, f"{where} (completion)")
        if isinstance(self.answer_choices, str):
            self._compiled["choices"] = compile_source(self.answer_choices, f"{where} (answer_choices)")

    @property
    def version(self) -> str:
        """The hash of the template's content: changes whenever anything that affects rendering does."""
        content = {
            "id": self.id,
            "dataset": self.dataset,
            "task": self.task,
            "instruction": self.instruction,
            "completion": self.completion,
            "answer_choices": self.answer_choices,
            "choices_in_prompt": self.choices_in_prompt,
            "label_map": {label_key(k): v for k, v in (self.label_map or {}).items()},
        }
        blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def effective_metrics(self) -> tuple[str, ...]:
        return self.metrics or DEFAULT_METRICS.get(self.task, ("rougeL",))

    @property
    def has_choices(self) -> bool:
        return self.answer_choices is not None

    @functools.cached_property
    def fields_read(self) -> frozenset[str]:
        """The row fields the instruction, completion and choices read (parsed once)."""
        sources = [self.instruction, self.completion]
        if isinstance(self.answer_choices, str):
            sources.append(self.answer_choices)
        names: set[str] = set()
        for source in sources:
            names |= fields_read(source)
        return frozenset(names - {"answer_choices", "label_map"} - set(ENV.globals))

    def render(self, row: Mapping[str, Any], seed: int | str = 0) -> Rendered:
        """Render the prompt, completion and answer choices for one row.

        `seed` makes the random helpers (`choice`, `permutation`) reproducible per row.
        """
        token = _render_state.set({"range": 0, "seed": f"{self.id}:{seed}"})
        try:
            context = {**ENV.globals, **row}
            where = f"template {self.id!r}"
            if self.label_map is not None:
                context["label_map"] = self.label_map
            choices = self._render_choices(context, where)
            if choices is not None:
                context["answer_choices"] = list(choices)
            prompt = render_bounded(self._compiled["instruction"], context, f"{where} (instruction)")
            completion = render_bounded(self._compiled["completion"], context, f"{where} (completion)")
        finally:
            _render_state.reset(token)
        return Rendered(prompt.strip(), completion.strip(), choices)

    def _render_choices(self, context: dict[str, Any], where: str) -> tuple[str, ...] | None:
        if self.answer_choices is None:
            return None
        if isinstance(self.answer_choices, str):
            text = render_bounded(self._compiled["choices"], context, f"{where} (answer_choices)")
            return tuple(part.strip() for part in text.split(CHOICES_SEPARATOR))
        return tuple(self.answer_choices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "dataset": self.dataset,
            "task": self.task,
            "instruction": self.instruction,
            "completion": self.completion,
            "answer_choices": list(self.answer_choices)
            if isinstance(self.answer_choices, tuple)
            else self.answer_choices,
            "choices_in_prompt": self.choices_in_prompt,
            "metrics": list(self.effective_metrics),
            "reference": self.reference,
            "version": self.version,
            "origin": self.origin,
        }
