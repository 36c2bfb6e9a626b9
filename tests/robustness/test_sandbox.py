"""The template sandbox against server-side template injection and resource exhaustion.

Every payload is written into a real collection file, once in instructkit format and once as an
imported PromptSource `templates.yaml`, in the prompt and in the target, loaded with `load_collection`
and rendered on a row. The acceptable outcomes: a TemplateError naming the template (refused), never a
leak of Python internals, never a side effect (the marker file some payloads try to create), and never
more than a few seconds (pytest-timeout, 10 s per payload).
"""

from __future__ import annotations

import json

import pytest

import _robust
from instructkit.errors import ConfigError, TemplateError
from instructkit.templates.collection import load_collection
from instructkit.templates.limits import MAX_RENDER_CHARS
from instructkit.templates.template import Template

MARKER = "IK_MARKER_PATH"  # replaced by a per-test file path; a payload that runs code would create it

# (name, Jinja payload). Every one must be refused with a TemplateError. Python internals, then size.
PAYLOADS: list[tuple[str, str]] = [
    # Python internals
    ("class", "{{ ''.__class__ }}"),
    ("mro_subclasses", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("base_subclasses", "{{ ().__class__.__base__.__subclasses__() }}"),
    ("globals_via_cycler", "{{ cycler.__init__.__globals__.os.popen('touch IK_MARKER_PATH').read() }}"),
    ("globals_via_joiner", "{{ joiner.__init__.__globals__['os'].system('touch IK_MARKER_PATH') }}"),
    ("globals_via_namespace", "{{ namespace.__init__.__globals__.os.system('touch IK_MARKER_PATH') }}"),
    ("lipsum_globals", "{{ lipsum.__globals__['os'].popen('touch IK_MARKER_PATH').read() }}"),
    ("builtins", "{{ __builtins__.__import__('os').system('touch IK_MARKER_PATH') }}"),
    ("import_os", "{% import 'os' as os %}{{ os.system('touch IK_MARKER_PATH') }}"),
    ("subprocess_via_subclasses",
     "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
     "{{ c(['touch', 'IK_MARKER_PATH']) }}{% endif %}{% endfor %}"),
    ("self_globals", "{{ self.__init__.__globals__.__builtins__ }}"),
    ("self_module", "{{ self._TemplateReference__context.environment }}"),
    ("request_object", "{{ request.application.__globals__.__builtins__.__import__('os').popen('id').read() }}"),
    ("config_object", "{{ config.__class__.__init__.__globals__['os'].popen('id').read() }}"),
    ("config_items", "{{ config.items() }}"),
    ("attr_filter_class", "{{ ''|attr('__class__') }}"),
    ("attr_filter_chain", "{{ (''|attr('__class__')|attr('__mro__'))[1]|attr('__subclasses__')() }}"),
    ("attr_filter_escaped", "{{ ''|attr('\\x5f\\x5fclass\\x5f\\x5f') }}"),
    ("getitem_concat", "{{ ''['__cla' + 'ss__'] }}"),
    ("getitem_tilde", "{{ ''['__cla' ~ 'ss__'] }}"),
    ("getitem_join", "{{ ''[['__', 'class', '__']|join] }}"),
    ("format_attr_leak", "{{ '{0.__class__.__mro__}'.format('') }}"),
    ("format_map_leak", "{{ '{x.__class__}'.format_map({'x': ''}) }}"),
    ("format_filter_leak", "{{ '%s'|format(''.__class__) }}"),
    ("func_globals", "{{ range.__globals__ }}"),
    ("func_code", "{{ zip.__self__ }}"),
    ("dict_mutation", "{% set d = {} %}{{ d.update({'a': 1}) }}{{ d }}"),
    ("list_mutation", "{% set l = [] %}{{ l.append(1) }}"),
    ("loop_internals", "{% for x in [1] %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}"),
    ("map_attribute", "{{ ['']|map(attribute='__class__')|map(attribute='__mro__')|list|first|first }}"),
    ("sort_attribute", "{{ ['a', 'b']|sort(attribute='__class__.__name__') }}"),
    ("mro_via_namespace", "{% set ns = namespace(x='') %}{{ ns.x.__class__ }}"),
    # Size: string, list and number growth
    ("string_multiplication", "{{ 'a' * 100000000 }}"),
    ("list_multiplication", "{{ [1] * 100000000 }}"),
    ("tuple_multiplication", "{{ (1,) * 100000000 }}"),
    ("reverse_multiplication", "{{ 100000000 * 'a' }}"),
    ("doubling_tilde", "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}"),
    ("doubling_plus", "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}{{ ns.s|length }}"),
    ("doubling_nested_list", "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}"
                             "{% endfor %}{{ ns.l }}"),
    ("doubling_nested_dict", "{% set ns = namespace(d={}) %}{% for i in range(60) %}"
                             "{% set ns.d = {'a': ns.d, 'b': ns.d} %}{% endfor %}{{ ns.d|tojson|length }}"),
    ("doubling_macro", "{% macro f(n) %}{% if n < 60 %}{% set r = f(n + 1) %}{{ r }}{{ r }}{% else %}x{% endif %}"
                       "{% endmacro %}{{ f(0)|length }}"),
    ("int_squaring", "{% set ns = namespace(x=2) %}{% for i in range(60) %}{% set ns.x = ns.x * ns.x %}{% endfor %}"
                     "{{ ns.x > 0 }}"),
    ("int_power_tower", "{% set ns = namespace(x=10) %}{% for i in range(60) %}{% set ns.x = ns.x ** 64 %}"
                        "{% endfor %}{{ ns.x > 0 }}"),
    ("big_exponent", "{{ 2 ** 100000000 }}"),
    ("percent_width", "{{ '%1000000000s' % 'a' }}"),
    ("percent_star_width", "{{ '%*s' % (1000000000, 'a') }}"),
    ("percent_precision", "{{ '%.1000000000f' % 1.0 }}"),
    ("format_width", "{{ '{:>1000000000}'.format('a') }}"),
    ("format_nested_width", "{{ '{0:{1}}'.format('a', 1000000000) }}"),
    ("format_filter_width", "{{ '%1000000000s'|format('a') }}"),
    ("padding_method", "{{ 'a'.ljust(1000000000) }}"),
    ("zfill", "{{ '1'.zfill(1000000000) }}"),
    ("expandtabs", "{{ ('\t' * 1000).expandtabs(1000000) }}"),
    ("center_filter", "{{ 'a'|center(1000000000) }}"),
    ("indent_filter", "{{ 'a\nb'|indent(1000000000) }}"),
    ("wordwrap_filter", "{{ 'a b'|wordwrap(1000000000) }}"),
    ("indent_many_lines", "{{ ('a\n' * 100000)|indent(100000)|length }}"),
    ("wordwrap_long_wrapstring", "{{ ('a ' * 50000)|wordwrap(1, wrapstring='x' * 100000)|length }}"),
    ("replace_amplify", "{{ ('a' * 100000).replace('a', 'a' * 100000) }}"),
    ("replace_filter_amplify", "{{ ('a' * 100000)|replace('a', 'a' * 100000) }}"),
    ("join_amplify", "{{ ('x' * 100000)|join('y' * 100000) }}"),
    ("join_method_amplify", "{{ ('y' * 100000).join('x' * 100000) }}"),
    ("batch_fill", "{{ range(10)|batch(1000000000, 'x')|list|length }}"),
    ("slice_many", "{{ range(10)|slice(100000000)|list|length }}"),
    ("lipsum_huge", "{{ lipsum(1000000000) }}"),
    ("output_cap", "{% for i in range(5000) %}{{ 'x' * 100 }}{% endfor %}"),
]
SLOW_PAYLOADS: list[tuple[str, str]] = [  # Time: loops, recursion, calls (each burns its budget: ~0.1-1.5 s)
    ("range_huge", "{% for i in range(1000000000) %}x{% endfor %}"),
    ("range_length", "{{ range(10 ** 18)|length }}"),
    ("nested_ranges", "{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}done"),
    ("nested_string_loops", "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}done"),
    ("macro_recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ("macro_fork_bomb", "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
                        "{{ f(0) }}done"),
    ("recursive_loop_bomb", "{% for x in [1, 2] recursive %}{% if loop.depth < 60 %}{{ loop([1, 2]) }}{% endif %}"
                            "{% endfor %}done"),
    ("caller_recursion", "{% macro m() %}{{ caller() }}{% endmacro %}"
                         "{% macro f() %}{% call m() %}{{ f() }}{% endcall %}{% endmacro %}{{ f() }}"),
]


def _native_yaml(instruction: str, completion: str) -> str:
    return (
        "schemas:\n"
        "  - name: evil\n"
        "    fields: {text: str, label: str}\n"
        "    templates:\n"
        "      - id: evil.payload\n"
        "        task: generation\n"
        f"        instruction: {json.dumps(instruction)}\n"
        f"        completion: {json.dumps(completion)}\n"
    )


def _promptsource_yaml(jinja: str) -> str:
    return (
        "dataset: evil\n"
        "templates:\n"
        "  a1b2c3d4-0000-4000-8000-000000000000: !Template\n"
        "    answer_choices: null\n"
        "    id: a1b2c3d4-0000-4000-8000-000000000000\n"
        f"    jinja: {json.dumps(jinja)}\n"
        "    metadata: !TemplateMetadata\n"
        "      choices_in_prompt: false\n"
        "      metrics: [Other]\n"
        "      original_task: true\n"
        "    name: evil payload\n"
        "    reference: ''\n"
    )


def _collection(fmt: str, slot: str, payload: str) -> str:
    if fmt == "instructkit":
        return _native_yaml(payload, "{{ label }}") if slot == "prompt" else _native_yaml("{{ text }}", payload)
    jinja = f"{payload} ||| {{{{ label }}}}" if slot == "prompt" else f"{{{{ text }}}} ||| {payload}"
    return _promptsource_yaml(jinja)


def _cases() -> list:
    """Every payload x {instructkit, PromptSource} x {prompt, target}; the budget-burning ones run in the
    target slot only under -m slow (same mechanism, a second or so each)."""
    cases = []
    for group, payloads in (("size", PAYLOADS), ("time", SLOW_PAYLOADS)):
        for name, payload in payloads:
            for fmt in ("instructkit", "promptsource"):
                for slot in ("prompt", "target"):
                    marks = [pytest.mark.slow] if group == "time" and slot == "target" else []
                    cases.append(pytest.param(name, payload, fmt, slot, marks=marks, id=f"{name}-{fmt}-{slot}"))
    return cases


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name,payload,fmt,slot", _cases())
def test_payload_is_refused(name, payload, fmt, slot, tmp_path):
    marker = tmp_path / "pwned"
    source = payload.replace(MARKER, str(marker))
    path = tmp_path / "templates.yaml"
    path.write_text(_collection(fmt, slot, source), encoding="utf-8")
    _robust.tried("sandbox payload")
    try:
        _, templates = load_collection(path)
        (template,) = templates
        rendered = template.render({"text": "hello", "label": "yes"}, seed=0)
    except TemplateError as exc:
        message = str(exc)
        assert "evil" in message, f"the refusal does not name the template: {message}"
        how = message.split(": ", 2)[-1][:120]
    else:
        pytest.fail(f"payload {name!r} rendered instead of being refused: "
                    f"{(rendered.prompt + ' ||| ' + rendered.completion)[:300]!r}")
    assert not marker.exists(), "the payload ran code"
    _robust.blocked(f"{name} [{fmt}, {slot}]", str(path.name), how)


def test_refused_payloads_never_leak_internals_through_error_messages(tmp_path):
    """A refusal names the template; it does not dump module globals or object reprs of internals."""
    path = tmp_path / "t.yaml"
    path.write_text(_native_yaml("{{ cycler.__init__.__globals__ }}", "x"), encoding="utf-8")
    (template,) = load_collection(path)[1]
    with pytest.raises(TemplateError) as info:
        template.render({})
    assert "'os'" not in str(info.value) and "<module" not in str(info.value)


@pytest.mark.timeout(10)
def test_rendered_size_is_capped_for_huge_row_values():
    template = Template(id="cap.echo", name="echo", dataset="cap", task="generation",
                        instruction="Review: {{ text }}", completion="{{ label }}")
    fits = template.render({"text": "a" * (MAX_RENDER_CHARS - 100), "label": "x"})
    assert len(fits.prompt) == MAX_RENDER_CHARS - 100 + len("Review: ")
    with pytest.raises(TemplateError, match=r"cap\.echo.*over the cap"):
        template.render({"text": "a" * (MAX_RENDER_CHARS + 1), "label": "x"})
    _robust.blocked("row value over the rendered-size cap", "Template.render", "rendered text over the cap")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("doc", [
    "schemas: !!python/object/apply:os.system ['touch IK_MARKER_PATH']\n",
    "dataset: x\ntemplates: !!python/object/new:subprocess.Popen [['touch', 'IK_MARKER_PATH']]\n",
    "schemas:\n  - !!python/name:os.system\n",
])
def test_yaml_tags_that_construct_python_objects_are_refused(doc, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "templates.yaml"
    path.write_text(doc.replace(MARKER, str(marker)), encoding="utf-8")
    with pytest.raises(TemplateError, match=str(path).replace("\\", "\\\\")):
        load_collection(path)
    assert not marker.exists()
    _robust.blocked(doc.strip()[:60], "template collection YAML", "safe YAML loader")


@pytest.mark.timeout(10)
def test_config_yaml_tags_that_construct_python_objects_are_refused(tmp_path):
    from instructkit.config_load import load_config

    marker = tmp_path / "pwned"
    path = tmp_path / "config.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="config.yaml"):
        load_config(path)
    assert not marker.exists()
    _robust.blocked("!!python/object/apply in config", "config YAML", "yaml.safe_load")


# --------------------------------------------------------------------------------------------------
# The bounds must not break what real templates do (regression tests of the sandbox hardening)
# --------------------------------------------------------------------------------------------------

LEGIT = [
    ("{{ 'a' ~ text ~ 'b' }}", {"text": "-"}, "a-b"),
    ("{% for c in choices %}{{ loop.index }}. {{ c }}{% if not loop.last %}\n{% endif %}{% endfor %}",
     {"choices": ["x", "y", "z"]}, "1. x\n2. y\n3. z"),
    ("{% for c in choices %}{{ loop.length }}{% else %}none{% endfor %}", {"choices": []}, "none"),
    ("{% for a, b in pairs %}{{ a }}={{ b }};{% endfor %}", {"pairs": [("k", 1), ("l", 2)]}, "k=1;l=2;"),
    ("{% for x in tree recursive %}{{ x.n }}{% if x.kids %}({{ loop(x.kids) }}){% endif %}{% endfor %}",
     {"tree": [{"n": "a", "kids": [{"n": "b", "kids": []}]}]}, "a(b)"),
    ("{{ '%05.1f|%-4s|' % (3.14159, 'ab') }}", {}, "003.1|ab  |"),
    ("{{ '%(n)s-%(m)03d' % {'n': 'a', 'm': 7} }}", {}, "a-007"),
    ("{{ '[{:>6}]|{:.2f}|{name}'.format('r', 2.5, name='n') }}", {}, "[     r]|2.50|n"),
    ("{{ '%s and %s'|format('a', 'b') }}", {}, "a and b"),
    ("{{ ['a', 'b', 'c']|join(', ') }}", {}, "a, b, c"),
    ("{{ text|replace('\n', ' ') }}", {"text": "a\nb"}, "a b"),
    ("{{ text.replace('a', 'xy') }}", {"text": "banana"}, "bxynxynxy"),
    ("{{ 'aaa bbb ccc'|wordwrap(5) }}", {}, "aaa\nbbb\nccc"),
    ("[{{ 'x'|center(5) }}]|{{ 'a\nb'|indent(2) }}", {}, "[  x  ]|a\n  b"),
    ("{{ range(5)|batch(2, 0)|list }}", {}, "[[0, 1], [2, 3], [4, 0]]"),
    ("{{ range(5)|slice(2)|list }}", {}, "[[0, 1, 2], [3, 4]]"),
    ("{{ (2 ** 64) * 3 }} {{ [0] * 3 }} {{ 'ab' * 2 }}", {}, "55340232221128654848 [0, 0, 0] abab"),
    ("{{ {'k': [1, 2], 't': (3,)} }}", {}, "{'k': [1, 2], 't': (3,)}"),
    ("{% set ns = namespace(n=0) %}{% for i in range(100) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}",
     {}, "4950"),
    ("{% macro opt(i, c) %}{{ to_letter(i) }}) {{ c }}{% endmacro %}"
     "{% for c in choices %}{{ opt(loop.index0, c) }} {% endfor %}", {"choices": ["p", "q"]}, "A) p B) q"),
]


@pytest.mark.parametrize("source,row,expected", LEGIT)
def test_bounded_constructs_still_render_exactly(source, row, expected):
    template = Template(id="legit.t", name="t", dataset="legit", task="generation", instruction=source,
                        completion="ok")
    assert template.render(row).prompt == expected


def test_a_long_but_legit_loop_fits_the_budgets():
    """A template looping over 2,000 passages (a few operations each) is well inside the bounds."""
    template = Template(id="legit.passages", name="p", dataset="legit", task="generation",
                        instruction="{% for p in passages %}[{{ loop.index }}] {{ p|trim }}\n{% endfor %}",
                        completion="ok")
    rendered = template.render({"passages": [f" passage {i} " for i in range(2000)]})
    assert rendered.prompt.count("\n") == 1999 and rendered.prompt.startswith("[1] passage 0")


def test_growth_checks_are_exact_not_conservative():
    """The size checks estimate the real result: long legit text is not refused (a 70k-character review
    indented, wrapped, replaced and joined stays well under the cap)."""
    text = ("word " * 20 + "\n") * 700
    template = Template(id="legit.long", name="l", dataset="legit", task="generation",
                        instruction="{{ text|indent(4) }}{{ text|wordwrap(30, wrapstring='<br>')|length }}"
                                    "{{ text.replace('zzz', 'y' * 1000)|length }}{{ text.split()|join(' ')|length }}",
                        completion="ok")
    assert len(template.render({"text": text}).prompt) > len(text)


def test_budgets_are_per_render_not_per_process():
    """Rendering a loop-heavy template many times never exhausts a budget shared across renders."""
    template = Template(id="legit.loop", name="l", dataset="legit", task="generation",
                        instruction="{% for i in range(9000) %}{% endfor %}{{ text }}", completion="ok")
    for _ in range(30):  # 30 x 9,000 range items and iterations: over every budget if they accumulated
        assert template.render({"text": "t"}).prompt == "t"


def test_sandbox_payload_list_is_nontrivial():
    """Guards the parametrization above (a typo emptying PAYLOADS would make the suite pass vacuously)."""
    everything = PAYLOADS + SLOW_PAYLOADS
    assert len(everything) >= 70
    assert len({name for name, _ in everything}) == len(everything)

