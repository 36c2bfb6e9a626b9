"""The bounded Jinja sandbox: the one environment (`ENV`) every template compiles, parses and renders in.

Rendering runs in Jinja's ImmutableSandboxedEnvironment with StrictUndefined. The sandbox alone blocks
access to Python internals but happily renders `{{ 'a' * 100000000 }}` or `range(10**9)` loops, so this
module adds bounds: string/list multiplication and padding methods are size-checked before they run,
`range()` draws from a per-render budget, recursion errors are caught, and the rendered text is capped.
It also bounds what the operators and literals Jinja compiles to plain Python would let through: `~`
concatenation, `%` and `str.format` widths, integer growth, list/dict literals (shared parts counted
per reference), macro results, and the total number of loop iterations, calls and operators per render.
The limits and checks are in `limits`; the bounded filters and PromptSource helpers in `filters`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from instructkit.errors import TemplateError
from instructkit.templates.filters import (
    BOUNDED_FILTERS,
    choice,
    highlight,
    most_frequent,
    permutation,
    reorder,
    to_letter,
)
from instructkit.templates.limits import (
    MAX_RENDER_CHARS,
    bounded_range,
    charge,
    check_bits,
    check_brace_format,
    check_percent_format,
    check_size,
    expanded_size,
    render_state,
    replaced_size,
)

_PADDING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})
_SIZED = (str, list, tuple, dict, set, frozenset)  # the results whose expanded size is checked


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
        charge()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    check_size(expanded_size(seq) * max(times, 0), "sequence multiplication")
            if isinstance(left, int) and isinstance(right, int):
                check_bits(left.bit_length() + right.bit_length(), "multiplication")
        elif operator == "**":
            if isinstance(right, int) and abs(right) > 64 and not (isinstance(left, int) and abs(left) <= 1):
                raise SecurityError("power with an exponent over 64 is not allowed in templates")
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                check_bits(left.bit_length() * right, "power")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            check_size(expanded_size(left) + expanded_size(right), "concatenation")
        elif operator == "%" and isinstance(left, str):
            check_percent_format(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        charge()
        name = getattr(__obj, "__name__", "")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and name in _PADDING_METHODS:
            width = args[0] if args else kwargs.get("width", kwargs.get("tabsize", 8))
            if isinstance(width, int):
                check_size(width * (len(owner) if name == "expandtabs" else 1), f"str.{name}")
        if isinstance(owner, str) and name == "replace" and len(args) >= 2:
            count = args[2] if len(args) > 2 else kwargs.get("count")
            check_size(replaced_size(owner, str(args[0]), str(args[1]), count), "str.replace")
        if isinstance(owner, str) and name == "join" and args:
            items = list(args[0])
            check_size(sum(len(str(x)) for x in items) + len(owner) * len(items), "str.join")
            args = (items, *args[1:])
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, _SIZED):  # e.g. a macro that doubles its output per level
            check_size(expanded_size(result), f"the result of {name or getattr(__obj, 'name', '') or 'a call'}()")
        return result

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            check_brace_format(fmt, args, kwargs)
            return wrapper(*args, **kwargs)

        return bounded

    def bounded_iter(self, iterable: Any) -> Iterator[Any]:
        """The items of a `for` loop, each charged to the operations budget."""
        for item in iterable:
            charge()
            yield item

    def bounded_concat(self, parts: tuple, markup: bool) -> str:
        """`a ~ b ~ c`, size-checked before the strings are built."""
        charge()
        check_size(sum(expanded_size(p) for p in parts), "~ concatenation")
        return markup_join(parts) if markup else str_join(parts)

    def bounded_literal(self, value: Any) -> Any:
        """A list, dict or tuple literal, size-checked (shared parts counted per reference)."""
        charge()
        check_size(expanded_size(value), "a list/dict literal")
        return value


def _make_environment() -> BoundedSandbox:
    env = BoundedSandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.globals["range"] = bounded_range
    del env.globals["lipsum"]  # lorem ipsum has no use in a prompt; lipsum(10**9) loops for hours
    env.globals.update(zip=zip, enumerate=enumerate, len=len, to_letter=to_letter)
    env.filters.update(
        choice=choice,
        most_frequent=most_frequent,
        highlight=highlight,
        permutation=permutation,
        reorder=reorder,
        to_letter=to_letter,
    )
    env.filters.update(BOUNDED_FILTERS)
    return env


ENV = _make_environment()


def compile_source(source: str, where: str) -> jinja2.Template:
    """Compile Jinja source; a syntax error becomes a TemplateError naming `where` and the line.

    Raises: TemplateError on a syntax error, nesting too deep to compile, or an error while Jinja folds
    constants.
    """
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


_JINJA_NAMES = frozenset({"self", "loop", "caller", "varargs", "kwargs", "super"})  # Jinja may resolve these


@dataclass(frozen=True)
class CompiledPart:
    """A compiled template part (instruction, completion or answer choices). A part that is only text,
    `{{ name }}` and `{{ name[key] }}` (`pieces`: the text; (name,) or (name, key) for the others) renders
    without Jinja: Jinja's code for it writes the text and `str(value)` (`str(obj[key])` through the
    sandbox's getitem, which is `obj[key]` when that succeeds), and so does `render`; any other part, a
    missing name, a failing or non-list/dict/tuple subscript, or an over-long result goes through
    `render_bounded`, errors included."""

    template: jinja2.Template
    pieces: tuple[str | tuple[str, ...], ...] | None

    def render(self, context: dict[str, Any], where: str) -> str:
        """The rendered part (as `render_bounded(self.template, context, where)`); errors as there."""
        if self.pieces is not None:
            text = _join_plain(self.pieces, context)
            if text is not None and len(text) <= MAX_RENDER_CHARS:
                return text
        return render_bounded(self.template, context, where)


def _join_plain(pieces: tuple[str | tuple[str, ...], ...], context: dict[str, Any]) -> str | None:
    out = []
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
            continue
        if any(name not in context for name in piece):
            return None
        value = context[piece[0]]
        if len(piece) == 2:
            if type(value) not in (dict, list, tuple):
                return None
            try:
                value = value[context[piece[1]]]
            except (TypeError, LookupError):
                return None
        out.append(str(value))
    return "".join(out)


def _plain_piece(node: nodes.Node) -> str | tuple[str, ...] | None:
    """The piece of an Output child (CompiledPart), or None when it needs Jinja."""
    if isinstance(node, nodes.TemplateData):
        return node.data
    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name not in _JINJA_NAMES:
        return (node.name,)
    if isinstance(node, nodes.Getitem) and node.ctx == "load":
        obj, key = _plain_piece(node.node), _plain_piece(node.arg)
        if isinstance(obj, tuple) and isinstance(key, tuple) and len(obj) == len(key) == 1:
            return obj + key
    return None


def compile_part(source: str, where: str) -> CompiledPart:
    """compile_source, with the pieces of a plain part (CompiledPart).

    Raises: TemplateError as compile_source."""
    template = compile_source(source, where)
    body = ENV.parse(source).body
    children = body[0].nodes if len(body) == 1 and isinstance(body[0], nodes.Output) else [None] * len(body)
    pieces = [_plain_piece(node) if node is not None else None for node in children]
    return CompiledPart(template, None if None in pieces else tuple(pieces))  # type: ignore[arg-type]


def fields_read(source: str) -> set[str]:
    """The top-level variables a Jinja source reads (best effort, static)."""
    try:
        return set(jinja2.meta.find_undeclared_variables(ENV.parse(source)))
    except (jinja2.TemplateError, RecursionError):  # syntax errors; errors while folding constants
        return set()


def _presence_tested(expr: nodes.Node) -> Iterator[str]:
    """Names an `if` test checks for presence: `x`, `not x`, `x is defined` / `x is none`, `x and/or y`."""
    if isinstance(expr, nodes.Name):
        yield expr.name
    elif isinstance(expr, nodes.Not):
        yield from _presence_tested(expr.node)
    elif isinstance(expr, (nodes.And, nodes.Or)):
        yield from _presence_tested(expr.left)
        yield from _presence_tested(expr.right)
    elif isinstance(expr, nodes.Test) and isinstance(expr.node, nodes.Name):
        yield expr.node.name


def fields_guarded(source: str) -> set[str]:
    """The variables a Jinja source tests for presence before use (best effort, static): the field is
    optional there. `{% if input %}`, `x if x else y`, `x or 'n/a'` and `x | default('')` guard `x`; a
    comparison (`{% if stars > 3 %}`) does not."""
    try:
        tree = ENV.parse(source)
    except (jinja2.TemplateError, RecursionError):
        return set()
    guarded: set[str] = set()
    for node in tree.find_all((nodes.If, nodes.CondExpr)):
        guarded.update(_presence_tested(node.test))
    for node in tree.find_all(nodes.Or):
        if isinstance(node.left, nodes.Name):
            guarded.add(node.left.name)
    for node in tree.find_all(nodes.Filter):
        if node.name in ("default", "d") and isinstance(node.node, nodes.Name):
            guarded.add(node.node.name)
    return guarded


def render_bounded(template: jinja2.Template, context: dict[str, Any], where: str) -> str:
    """Render with the sandbox, mapping every failure to a TemplateError naming `where`.

    `context` must already hold the environment's globals (see `Template.render`): the context is then
    shared rather than copied, which is most of the cost of rendering a short template.

    Raises: TemplateError for an undefined field, a sandbox refusal (a limit of `limits` passed), recursion
    too deep, memory exhausted, or any other runtime error in the template.
    """
    try:
        render_state.get()
        token = None
    except LookupError:  # not inside Template.render: this render gets its own budgets
        token = render_state.set({"range": 0, "seed": 0})
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
            render_state.reset(token)
