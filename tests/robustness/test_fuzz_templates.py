"""Fuzzing templates: random Jinja-ish source, random collections (instructkit and PromptSource YAML),
random rows through Schema.coerce and Template.render.

Acceptable outcomes only: a correct result, or an InstructkitError naming the culprit (the file, the
template id, the field). Anything else fails with the input that caused it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import strategies as st

import _robust
from _robust import expect_clean, fuzz_test, time_limit
from instructkit.errors import TemplateError
from instructkit.templates.collection import load_collection
from instructkit.templates.library import TemplateLibrary
from instructkit.templates.limits import MAX_RENDER_CHARS
from instructkit.templates.schema import FIELD_TYPES, Schema
from instructkit.templates.template import TASK_FAMILIES, Template

# Hypothesis warns about the large reprs of the recursive strategies; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

FIELDS = ["text", "label", "n", "items", "flag", "missing", "answer_choices", "row"]
FRAGMENTS = [
    "{{", "}}", "{%", "%}", "{#", "#}", "{{ ", " }}", "{%-", "-%}", "{% if ", "{% elif ", "{% else %}", "{% endif %}",
    "{% for x in ", "{% for k, v in ", " recursive", "{% endfor %}", "{% set y = ", "{% set ns = namespace(a=1) %}",
    "{% set ns.a = ", "{% macro m(a, b=2) %}", "{% endmacro %}", "{{ m(", "{% call m(1) %}", "{% endcall %}",
    "{% raw %}", "{% endraw %}", "{% filter upper %}", "{% endfilter %}", "{% with a = 1 %}", "{% endwith %}",
    "{% break %}", "{% include 'x' %}", "{% extends 'y' %}", "{% block b %}", "{% endblock %}", "{% do x %}",
    "(", ")", "[", "]", "{", "}", ",", ":", ".", "|", "|||", "||| ", "'", '"', "\\", "\n", " ",
    "|upper", "|length", "|join(', ')", "|default('d')", "|attr('__class__')", "|replace('a', 'bb')",
    "|format(1)", "|int", "|float", "|string", "|list", "|first", "|last", "|choice", "|to_letter", "|trim",
    "|wordwrap(3)", "|center(9)", "|indent(2)", "|batch(2)", "|slice(2)", "|tojson", "|sum", "|unique",
    "|most_frequent", "|permutation", "|reorder([1, 0])", "|highlight", "|dictsort", "|map('upper')",
    "|selectattr('x')", "|e", "|safe", "|round", "|abs", "|random", "|wordcount", "|title",
    ".split()", ".strip()", ".upper()", ".format(1)", ".__class__", "['__class__']", ".items()", ".keys()",
    " ~ ", " + ", " - ", " * ", " / ", " // ", " % ", " ** ", " and ", " or ", " not ", " is defined",
    " is none", " in ", " == ", " != ", " < ", " if ", " else ",
    "'a'", "'%s'", "'{}'", "1", "0", "-1", "2.5", "99999", "10 ** 6", "none", "true", "[1, 2, 3]", "{'k': 'v'}",
    "range(", "range(3)", "loop.index", "loop.length", "loop.cycle('a', 'b')", "loop(", "namespace(",
    "cycler('a', 'b')", "joiner()", "zip(", "enumerate(", "len(", "to_letter(", "caller()", "self", "varargs",
    "x", "y", "m", "ns.a", *FIELDS,
]

jinja_ish = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=25).map("".join)

_atoms = st.sampled_from(["text", "label", "n", "items", "flag", "row", "'lit'", "3", "-2", "2.5", "[1, 'b']",
                          "{'k': 1}", "none", "true", "range(4)", "missing", "answer_choices"])
_OPS = [" ~ ", " + ", " * ", " - ", " % ", " // ", " ** ", " and ", " or ", " == ", " in "]
_FILTERS = ["upper", "length", "string", "list", "first", "join(' ')", "default('d')", "int", "trim",
            "replace('a', 'b')", "format('x')", "batch(2)|list", "sum", "tojson", "choice", "reverse|list",
            "wordwrap(4)", "center(6)", "unique|list", "sort", "dictsort", "map('string')|list"]
expressions = st.recursive(
    _atoms,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(_OPS), inner).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
        st.tuples(inner, st.sampled_from(_FILTERS)).map(lambda t: f"({t[0]}|{t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(inner, st.sampled_from(["split()", "upper()", "strip()", "items()", "format(1)"])).map(
            lambda t: f"{t[0]}.{t[1]}"),
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    ),
    max_leaves=6,
)
statements = st.recursive(
    st.one_of(expressions.map(lambda e: "{{ " + e + " }}"), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.tuples(expressions, inner).map(lambda t: f"{{% if {t[0]} %}}{t[1]}{{% endif %}}"),
        st.tuples(expressions, inner).map(lambda t: f"{{% for x in {t[0]} %}}{{{{ x }}}}{t[1]}{{% endfor %}}"),
        st.tuples(expressions, inner).map(lambda t: f"{{% set y = {t[0]} %}}{t[1]}{{{{ y }}}}"),
        st.lists(inner, max_size=3).map("".join),
    ),
    max_leaves=5,
)
template_source = st.one_of(jinja_ish, statements)

odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "\u2028", "\ufeff", "\U0001F600" * 3, "a" * 5000, "{{ text }}", "|||",
                     "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "NaN", "None", "5.0"]),
)
scalars = st.one_of(odd_text, st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
                    st.integers(min_value=10**30, max_value=10**40))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)
rows = st.dictionaries(st.sampled_from(FIELDS + ["extra", "Text", ""]), values, max_size=8)


def _template(instruction: str, completion: str = "{{ label }}", choices=None, task: str = "generation") -> Template:
    return Template(id="fuzz.t", name="fuzz", dataset="fuzz", task=task, instruction=instruction,
                    completion=completion, answer_choices=choices, origin="fuzz.yaml")


def _check_rendered(rendered) -> None:
    assert isinstance(rendered.prompt, str) and isinstance(rendered.completion, str)
    assert len(rendered.prompt) <= MAX_RENDER_CHARS and len(rendered.completion) <= MAX_RENDER_CHARS
    if rendered.choices is not None:
        assert all(isinstance(c, str) for c in rendered.choices)


# --------------------------------------------------------------------------------------------------
# Jinja source
# --------------------------------------------------------------------------------------------------


@fuzz_test(default=200, slow=3000,
           source=template_source, target=template_source, row=rows, choices=st.none() | template_source)
def test_random_jinja_source_compiles_and_renders_or_is_a_template_error(source, target, row, choices):
    choices_source = None if choices is None else choices + " ||| b"
    with time_limit(8, "a fuzzed template"):
        with expect_clean("jinja source: compile", ["fuzz.t"], (source, target, choices_source)) as out:
            template = _template(source, target, choices_source,
                                 task="classification" if choices_source else "generation")
        if out["error"] is not None:
            return
        with expect_clean("jinja source: render", ["fuzz.t"], (source, target, choices_source, row),
                          count=False) as out:
            rendered = template.render(row, seed="s")
        if out["error"] is None:
            _check_rendered(rendered)
            assert template.render(row, seed="s") == rendered  # deterministic per seed


@fuzz_test(default=100, slow=1500,
           source=template_source)
def test_fields_read_is_total_and_names_only_identifiers(source):
    """`fields_read` (used to pick required columns) never raises, whatever the source."""
    _robust.tried("jinja source: fields_read")
    with time_limit(8, "fields_read"):
        try:
            template = _template(source)
        except TemplateError:
            return
        names = template.fields_read
    assert all(isinstance(n, str) and n.isidentifier() for n in names)


@pytest.mark.parametrize("source", [
    "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "{{ " + "[" * 3000 + "]" * 3000 + " }}",
    "{% if 1 %}" * 2000 + "x" + "{% endif %}" * 2000,
    "{{ 1" + " + 1" * 20000 + " }}",
    "{{ text" + "|upper" * 5000 + " }}",
])
def test_deeply_nested_source_is_a_template_error(source):
    with pytest.raises(TemplateError, match=r"fuzz\.t.*nested too deeply"):
        _template(source)
    _robust.tried("jinja source: deep nesting")


@pytest.mark.parametrize("source", ["{% if ('lit'['lit'] and text) %}{% endif %}", "{{ ('a'['b'] or 1) }}"])
def test_constant_folding_errors_are_template_errors(source):
    """Found by the slow profile: Jinja evaluates constant sub-expressions while compiling."""
    with pytest.raises(TemplateError, match=r"fuzz\.t"):
        _template(source)


def test_fields_read_survives_constant_folding_errors():
    """Found by the slow profile: jinja2.meta compiles (and folds) too; `fields_read` must not raise."""
    template = _template("{% if ('lit'['lit'] ~ text) %}{% endif %}")
    assert template.fields_read == {"label"}  # the completion's field; the instruction: unknown, not a crash


# --------------------------------------------------------------------------------------------------
# Collections: instructkit YAML and PromptSource YAML, through load_collection and TemplateLibrary.check
# --------------------------------------------------------------------------------------------------

_keyish = st.one_of(st.sampled_from(["name", "fields", "templates", "samples", "label_field", "label_map",
                                     "description", "source", "id", "task", "instruction", "completion",
                                     "answer_choices", "choices_in_prompt", "metrics", "reference", "bogus"]),
                    st.text(max_size=6))
_field_types = st.one_of(st.sampled_from(list(FIELD_TYPES)), st.sampled_from(["string", "", "int8"]),
                         st.integers(), st.none(), st.lists(st.integers(), max_size=2))
_template_entry = st.fixed_dictionaries(
    {"id": st.one_of(st.text(min_size=1, max_size=8), st.integers(), st.none()),
     "task": st.one_of(st.sampled_from(TASK_FAMILIES), st.text(max_size=6), st.none()),
     "instruction": st.one_of(template_source, st.integers(), st.none()),
     "completion": st.one_of(template_source, st.none())},
    optional={"answer_choices": st.one_of(st.lists(odd_text, max_size=4), template_source, st.integers(),
                                          st.none()),
              "metrics": st.one_of(st.lists(st.text(max_size=6), max_size=3), st.integers(), st.text(max_size=4)),
              "choices_in_prompt": values, "reference": values, "name": values},
).flatmap(lambda d: st.dictionaries(_keyish, values, max_size=2).map(lambda extra: {**extra, **d}))
_schema_entry = st.fixed_dictionaries(
    {"name": st.one_of(st.text(min_size=1, max_size=8), st.integers(), st.none())},
    optional={"fields": st.one_of(st.dictionaries(st.sampled_from(FIELDS), _field_types, max_size=4), values),
              "templates": st.one_of(st.lists(st.one_of(_template_entry, values), max_size=3), values),
              "samples": st.one_of(st.lists(st.one_of(rows, values), max_size=3), values),
              "label_field": st.one_of(st.sampled_from(FIELDS), values),
              "label_map": st.one_of(st.dictionaries(st.integers(0, 5), odd_text, max_size=3), values),
              "description": values},
)
native_docs = st.one_of(
    st.fixed_dictionaries({"schemas": st.lists(st.one_of(_schema_entry, values), max_size=3)}),
    st.fixed_dictionaries({"schemas": values}),
    values,
)


def _ps_doc(entries: list[dict], dataset, subset) -> str:
    lines = [f"dataset: {json.dumps(dataset)}"]
    if subset is not None:
        lines.append(f"subset: {json.dumps(subset)}")
    lines.append("templates:")
    for i, entry in enumerate(entries):
        lines.append(f"  t{i}: !Template")
        for key, value in entry.items():
            if key == "metadata" and isinstance(value, dict):
                lines.append("    metadata: !TemplateMetadata")
                lines += [f"      {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
            else:
                lines.append(f"    {json.dumps(key)}: {json.dumps(value)}")
        if not entry:
            lines[-1] += " {}"
    return "\n".join(lines) + "\n"


_ps_entry = st.fixed_dictionaries(
    {},
    optional={
        "jinja": st.one_of(st.tuples(template_source, template_source).map(lambda t: f"{t[0]} ||| {t[1]}"),
                           template_source, st.integers()),
        "answer_choices": st.one_of(st.none(), template_source.map(lambda s: s + " ||| no"), st.integers()),
        "name": st.one_of(st.text(max_size=10), st.integers()),
        "id": st.text(max_size=6),
        "reference": st.one_of(st.text(max_size=6), st.none()),
        "metadata": st.one_of(
            st.fixed_dictionaries({}, optional={
                "metrics": st.one_of(st.lists(st.sampled_from(["Accuracy", "ROUGE", "BLEU", "Squad", "Other",
                                                               "nonsense"]), max_size=3), st.integers(),
                                     st.text(max_size=5)),
                "choices_in_prompt": st.one_of(st.booleans(), st.none(), st.integers()),
                "original_task": st.booleans()}),
            st.integers(), st.text(max_size=5), st.none()),
    },
)
promptsource_docs = st.builds(_ps_doc, st.lists(_ps_entry, max_size=3),
                              st.one_of(st.text(max_size=8), st.integers()), st.one_of(st.none(), st.text(max_size=5)))


def _load_and_check(path: Path, target: str) -> None:
    with expect_clean(target, [str(path)], path.read_text(encoding="utf-8", errors="replace")) as out:
        schemas, templates = load_collection(path)
    if out["error"] is not None:
        return
    assert all(isinstance(t, Template) for t in templates)
    with expect_clean(target + ": library check", [str(path)], path.read_text(encoding="utf-8"),
                      count=False) as out:
        library = TemplateLibrary(schemas, templates)
        problems = library.check()
    if out["error"] is None:
        assert all(p.template_id for p in problems)


@fuzz_test(default=100, slow=1500,
           doc=native_docs)
def test_random_instructkit_collections_load_or_name_the_file(doc):
    with tempfile.TemporaryDirectory() as tmp, time_limit(8, "a fuzzed collection"):
        path = Path(tmp) / "collection.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        _load_and_check(path, "collection: instructkit")


@fuzz_test(default=100, slow=1500,
           doc=promptsource_docs)
def test_random_promptsource_collections_load_or_name_the_file(doc):
    with tempfile.TemporaryDirectory() as tmp, time_limit(8, "a fuzzed PromptSource file"):
        path = Path(tmp) / "templates.yaml"
        path.write_text(doc, encoding="utf-8")
        _load_and_check(path, "collection: promptsource")


VALID_NATIVE = """schemas:
  - name: reviews
    fields: {text: str, stars: int}
    label_field: stars
    label_map: {1: bad, 5: good}
    samples:
      - {text: "fine kettle", stars: 5}
    templates:
      - id: reviews.rate
        task: rating
        instruction: "Rate: {{ text }}"
        completion: "{{ label_map[stars] }}"
        answer_choices: [bad, good]
"""
VALID_PS = """dataset: imdb
templates:
  2c4f: !Template
    answer_choices: negative ||| positive
    id: 2c4f
    jinja: '{{text}} Did the reviewer like it? ||| {{ answer_choices [label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics:
      - Accuracy
      original_task: true
    name: liked
    reference: ''
"""


@fuzz_test(default=100, slow=2000,
           which=st.sampled_from(["native", "ps"]), data=st.data())
def test_mutated_collection_text_loads_or_names_the_file(which, data):
    """Byte-level damage to a valid file: truncation, deleted/duplicated/swapped lines, inserted garbage."""
    text = VALID_NATIVE if which == "native" else VALID_PS
    lines = text.splitlines(keepends=True)
    op = data.draw(st.sampled_from(["truncate", "delete", "duplicate", "insert", "replace_char", "indent"]))
    if op == "truncate":
        text = text[: data.draw(st.integers(0, len(text)))]
    elif op == "delete":
        del lines[data.draw(st.integers(0, len(lines) - 1))]
        text = "".join(lines)
    elif op == "duplicate":
        i = data.draw(st.integers(0, len(lines) - 1))
        text = "".join(lines[: i + 1] + lines[i:])
    elif op == "insert":
        i = data.draw(st.integers(0, len(text)))
        text = text[:i] + data.draw(st.one_of(st.text(max_size=6), st.sampled_from(FRAGMENTS))) + text[i:]
    elif op == "replace_char":
        i = data.draw(st.integers(0, len(text) - 1))
        text = text[:i] + data.draw(st.sampled_from(list(":-[]{}'\"|&*!%@`#\t\n "))) + text[i + 1:]
    else:
        i = data.draw(st.integers(0, len(lines) - 1))
        lines[i] = "  " + lines[i]
        text = "".join(lines)
    with tempfile.TemporaryDirectory() as tmp, time_limit(8, "a mutated collection"):
        path = Path(tmp) / "templates.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _load_and_check(path, f"collection: mutated {which}")


@pytest.mark.parametrize("doc", [
    "dataset: d\ntemplates:\n  a: !Template\n    jinja: 'x ||| y'\n    metadata: 5\n",
    "dataset: d\ntemplates:\n  a: !Template\n    jinja: 'x ||| y'\n    metadata: !TemplateMetadata\n      metrics: 7\n",
    "schemas:\n  - name: s\n    samples: [1, 2]\n",
    "schemas:\n  - name: s\n    samples: 5\n",
    "schemas:\n  - name: s\n    fields: {a: [1]}\n",
    "schemas:\n  - name: s\n    fields: {a: str}\n    label_field: [1]\n",
    "schemas:\n  - name: s\n    templates: 5\n",
    "schemas:\n  - name: s\n    templates: [{id: s.t, task: generation, instruction: x, completion: y, metrics: 5}]\n",
    "schemas:\n  - name: s\n    &anchor: 5\n",  # found by the slow profile: a null key crashed the key check
    "schemas:\n  - name: s\n    templates: [{id: s.t, task: generation, instruction: x, completion: y, 7: 1}]\n",
])
def test_malformed_collection_values_are_template_errors(doc, tmp_path):
    """Regression: each of these crashed with TypeError/AttributeError before (see _findings.py)."""
    path = tmp_path / "c.yaml"
    path.write_text(doc, encoding="utf-8")
    with pytest.raises(TemplateError, match=str(path)):
        schemas, templates = load_collection(path)
        TemplateLibrary(schemas, templates).check()


def test_unreadable_collection_files_name_the_file(tmp_path):
    cases = {
        "missing.yaml": None,
        "latin1.yaml": "schemas: []\n# caf\xe9\n".encode("latin-1"),
        "binary.yaml": bytes(range(256)),
        "bom.yaml": "\ufeffschemas: []\n".encode(),
        "empty.yaml": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with expect_clean("collection: unreadable file", [str(path)], name):
            load_collection(path)
    assert load_collection(tmp_path / "bom.yaml") == ([], [])


# --------------------------------------------------------------------------------------------------
# Rows: Schema.coerce and the built-in templates
# --------------------------------------------------------------------------------------------------

BUILTIN = TemplateLibrary.builtin()
_BUILTIN_TEMPLATES = sorted(BUILTIN.templates)


@fuzz_test(default=200, slow=2500,
           template_id=st.sampled_from(_BUILTIN_TEMPLATES), data=st.data())
def test_odd_rows_through_coerce_and_builtin_templates(template_id, data):
    """Rows of a built-in schema with odd values, missing and extra columns, wrong types.

    Schema.coerce's contract: the converted row, or ValueError naming the field (its callers add file and
    line). Template.render: the rendered strings, or a TemplateError naming the template.
    """
    template = BUILTIN.get(template_id)
    schema = BUILTIN.schemas[template.dataset]
    base = dict(data.draw(st.sampled_from(schema.samples))) if schema.samples else {}
    for name in data.draw(st.lists(st.sampled_from(sorted(schema.fields) or ["x"]), max_size=3, unique=True)):
        if data.draw(st.booleans()):
            base.pop(name, None)  # a missing column
        else:
            base[name] = data.draw(values)  # an odd value
    base.update(data.draw(st.dictionaries(st.text(max_size=5), values, max_size=2)))  # extra columns
    _robust.tried("rows: Schema.coerce")
    try:
        row = schema.coerce(base)
    except ValueError as exc:
        assert any(repr(f) in str(exc) for f in schema.fields), f"coerce's error names no field: {exc}"
        _robust.OUTCOMES["rows: Schema.coerce:error"] += 1
        return
    except Exception as exc:  # noqa: BLE001
        raise _robust.UnexpectedCrash(f"Schema.coerce raised {type(exc).__name__}: {exc}\n  row: {base!r:.500}")
    _robust.OUTCOMES["rows: Schema.coerce:ok"] += 1
    assert isinstance(schema.check_label(row), (str, type(None)))
    with time_limit(8, "a built-in template"), \
            expect_clean("rows: built-in render", [template_id], base, count=False) as out:
        rendered = template.render(row, seed=0)
    if out["error"] is None:
        _check_rendered(rendered)


@fuzz_test(default=100, slow=1500,
           fields=st.dictionaries(st.sampled_from(FIELDS), st.sampled_from(list(FIELD_TYPES)), min_size=1, max_size=5),
           row=rows)
def test_coerce_with_random_schemas_converts_or_names_the_field(fields, row):
    schema = Schema(name="fuzz", fields=fields)
    _robust.tried("rows: random schema coerce")
    try:
        out = schema.coerce(row)
    except ValueError as exc:
        assert any(repr(f) in str(exc) for f in fields), str(exc)
        return
    for name, type_name in fields.items():
        if row.get(name) is not None:
            assert isinstance(out[name], FIELD_TYPES[type_name]), (name, type_name, out[name])
