"""A template part of text and `{{ name }}` only renders without Jinja (sandbox.CompiledPart) to exactly
the string, and the errors, of the sandboxed Jinja render."""

from __future__ import annotations

import re

import pytest

from instructkit.errors import TemplateError
from instructkit.templates.library import TemplateLibrary
from instructkit.templates.limits import MAX_RENDER_CHARS
from instructkit.templates.sandbox import ENV, compile_part, render_bounded


def _both(source: str, row: dict) -> tuple[str, str]:
    part = compile_part(source, "test")
    context = {**ENV.globals, **row}
    return part.render(context, "test"), render_bounded(part.template, context, "test")


@pytest.mark.parametrize("source", ["", "plain text only", "Review: {{ Text }}\nRating:", "{{ a }}{{ b }}",
                                    "  {{ a }}  \n\n{{ b }} tail\n", "{{ self }}", "{{ range }}",
                                    "{{ m[a] }}", "{{ l[a] }} / {{ t[a] }}", "{{ a[a] }}"])
@pytest.mark.parametrize("a", ["x", "", 5, 5.0, -1.5, None, True, ["p", 1], {"k": "v"}, "{{ b }}"])
def test_plain_parts_render_as_jinja_does(source, a):
    row = {"Text": a, "a": a, "b": "second", "self": "a field named self", "m": {"x": "ex", 5: "five", None: 0},
           "l": ["zero", "one"], "t": ("tz", "to")}
    try:
        jinja = _both(source, row)[1]
    except TemplateError as exc:  # e.g. a list index that is no int: the same error both ways
        with pytest.raises(TemplateError, match=re.escape(str(exc))):
            compile_part(source, "test").render({**ENV.globals, **row}, "test")
        return
    assert compile_part(source, "test").render({**ENV.globals, **row}, "test") == jinja


def test_which_parts_are_plain():
    assert compile_part("A {{ x }} b", "t").pieces == ("A ", ("x",), " b")
    assert compile_part("", "t").pieces == ()
    assert compile_part("{{ label_map[label] }}!", "t").pieces == (("label_map", "label"), "!")
    for source in ["{{ x | trim }}", "{{ x[0] }}", "{{ x.y }}", "{% if x %}a{% endif %}", "{{ x ~ y }}",
                   "{{ self }}", "{{ 'lit' }}", "{% set y = 1 %}{{ y }}"]:
        assert compile_part(source, "t").pieces is None, source


def test_missing_field_and_size_cap_raise_as_jinja():
    with pytest.raises(TemplateError, match="undefined field"):
        compile_part("a {{ nope }}", "t").render(dict(ENV.globals), "t")
    big = {**ENV.globals, "x": "y" * (MAX_RENDER_CHARS + 1)}
    with pytest.raises(TemplateError, match="cap"):
        compile_part("{{ x }}", "t").render(big, "t")


def test_every_builtin_template_renders_its_samples_as_before():
    library = TemplateLibrary.builtin()
    plain = 0
    for template in library.templates.values():
        schema = library.schemas.get(template.dataset)
        for row in schema.samples if schema is not None else ():
            context = {**ENV.globals, **schema.coerce(row), "label_map": template.label_map,
                       "answer_choices": list(template.answer_choices or [])}
            for name in ("instruction", "completion"):
                part = template._compiled[name]
                plain += part.pieces is not None
                try:
                    want = render_bounded(part.template, context, "t")
                except TemplateError:
                    continue
                assert part.render(context, "t") == want, (template.id, name)
    assert plain > 0
