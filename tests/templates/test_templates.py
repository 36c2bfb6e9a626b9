"""Template rendering, the sandbox bounds, versions, PromptSource import and the built-in catalog."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest

from instructkit.errors import TemplateError
from instructkit.templates.collection import load_collection
from instructkit.templates.library import TemplateLibrary, check_row
from instructkit.templates.schema import Schema
from instructkit.templates.template import TASK_FAMILIES, Template


def make(instruction: str, completion: str = "x", **kw) -> Template:
    return Template(id=kw.pop("id", "t.test"), name="test", dataset=kw.pop("dataset", "d"),
                    task=kw.pop("task", "generation"), instruction=instruction, completion=completion, **kw)


def test_render_basic_and_strip():
    t = make("Review: {{ review_body }}\nRating:", "{{ star_rating }}", answer_choices=("1", "2", "3", "4", "5"),
             task="rating")
    r = t.render({"review_body": "fine", "star_rating": 4})
    assert r.prompt == "Review: fine\nRating:"
    assert r.completion == "4"
    assert r.choices == ("1", "2", "3", "4", "5")


@pytest.mark.parametrize("choices", [("caf\u00e9", "bar"), "caf\u00e9|||bar"])
def test_label_spelled_decomposed_takes_the_choice_spelling(choices):
    # "cafe" + combining acute (NFD) is the choice "caf\u00e9" (NFC) up to canonical equivalence: the example's
    # completion must be the choice's spelling, or rank classification could never pick it
    t = make("Q: {{ q }}", "{{ label }}", answer_choices=choices, task="classification")
    decomposed = "cafe\u0301"
    assert decomposed != "caf\u00e9"
    r = t.render({"q": "x", "label": decomposed})
    assert r.completion == "caf\u00e9" and r.completion in r.choices
    # a label that is no choice even after normalisation stays as written (the data check then names it)
    assert t.render({"q": "x", "label": "tea"}).completion == "tea"


def test_undefined_field_names_template_and_field():
    t = make("{{ review_body }} {{ missing_field }}", id="amazon.x")
    with pytest.raises(TemplateError) as err:
        t.render({"review_body": "a"})
    assert "amazon.x" in str(err.value) and "missing_field" in str(err.value)


def test_syntax_error_names_template_and_line():
    with pytest.raises(TemplateError) as err:
        make("line one\n{{ review_body ", id="broken.one")
    assert "broken.one" in str(err.value) and "line 2" in str(err.value)


def test_unknown_task_family_rejected():
    with pytest.raises(TemplateError, match="unknown task family"):
        make("a", task="poetry")


def test_version_is_content_hash():
    a = make("Predict: {{ x }}")
    b = make("Predict: {{ x }}")
    c = make("Predict:  {{ x }}")
    assert a.version == b.version
    assert a.version != c.version


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ x.__class__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ namespace.__init__.__globals__['os'] }}",
        "{{ self.__init__.__globals__.__builtins__ }}",
        "{{ request.application.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ 'a' * 100000000 }}",
        "{{ [1] * 100000000 }}",
        "{% for i in range(100000000) %}{% endfor %}",
        "{% for i in range(5000) %}{% for j in range(5000) %}{% endfor %}{% endfor %}",
        "{{ 'a'.ljust(1000000000) }}",
        "{{ 'a' | center(1000000000) }}",
        "{{ 9 ** 9999999 }}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        "{{ ('a' * 150000) ~ ('b' * 150000) }}",
        "{% set d = {} %}{{ d.update({'a': 1}) }}",
    ],
)
def test_sandbox_refuses_or_bounds(payload):
    t = make(payload)
    with pytest.raises(TemplateError):
        t.render({"x": 1})


def test_rendered_size_capped_for_huge_field():
    t = make("{{ text }}")
    with pytest.raises(TemplateError, match="cap"):
        t.render({"text": "a" * 300_000})


NATIVE = textwrap.dedent(
    """
    schemas:
      - name: toy
        fields: {text: str, label: int}
        label_field: label
        label_map: {0: negative, 1: positive}
        samples:
          - {text: good, label: 1}
          - {text: bad, label: 0}
        templates:
          - id: toy.sentiment
            name: sentiment
            task: sentiment
            instruction: "Is this positive or negative? {{ text }}"
            completion: "{{ label_map[label] }}"
            answer_choices: [negative, positive]
    """
)


def test_native_collection_and_check(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(NATIVE)
    library = TemplateLibrary.from_files([path])
    assert library.check() == []
    assert library.get("toy.sentiment").render({"text": "ok", "label": 1}).completion == "positive"


@pytest.mark.parametrize(
    "edit, rule",
    [
        (lambda s: s.replace('"{{ label_map[label] }}"', '"{{ label }}"'), "target-not-in-choices"),
        (lambda s: s.replace("{{ text }}", "{{ txt }}"), "undefined-field"),
        (lambda s: s.replace('"Is this positive or negative? {{ text }}"', '"{{ \'\' }}"'), "empty-prompt"),
        (lambda s: s.replace("{text: bad, label: 0}", "{text: bad, label: 7}"), "label-outside-map"),
        (lambda s: s.replace("answer_choices: [negative, positive]", ""), "missing-choices"),
        (lambda s: s.replace("answer_choices: [negative, positive]",
                             "answer_choices: \"negative ||| positive ||| {{ 'positive' }}\""), "duplicate-choice"),
        (lambda s: s.replace("answer_choices: [negative, positive]",
                             "answer_choices: \"negative ||| positive ||| caf\\u00e9 ||| {{ 'cafe\\u0301' }}\""),
         "duplicate-choice"),
    ],
)
def test_check_rules_name_template_and_rule(tmp_path, edit, rule):
    path = tmp_path / "toy.yaml"
    path.write_text(edit(NATIVE))
    problems = TemplateLibrary.from_files([path]).check()
    assert problems, "the broken template should fail the check"
    assert any(p.rule == rule and p.template_id == "toy.sentiment" for p in problems), problems


def test_duplicate_ids_reported(tmp_path):
    (tmp_path / "a.yaml").write_text(NATIVE)
    (tmp_path / "b.yaml").write_text(NATIVE.replace("name: toy", "name: toy2"))
    problems = TemplateLibrary.from_files([tmp_path / "a.yaml", tmp_path / "b.yaml"]).check()
    assert [p.rule for p in problems].count("duplicate-id") == 1


@pytest.mark.parametrize("choices", ["[negative, positive, positive]", '[negative, "caf\\u00e9", "cafe\\u0301"]'])
def test_a_listed_choice_repeated_up_to_nfc_is_an_error(tmp_path, choices):
    path = tmp_path / "toy.yaml"
    path.write_text(NATIVE.replace("[negative, positive]", choices))
    with pytest.raises(TemplateError, match="repeated choice"):
        load_collection(path)


def test_unknown_key_suggests_nearest(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(NATIVE.replace("answer_choices:", "answer_choice:"))
    with pytest.raises(TemplateError, match="did you mean 'answer_choices'"):
        load_collection(path)


PROMPTSOURCE = textwrap.dedent(
    """\
    dataset: amazon_polarity
    templates:
      1e90a24a-1182-43dd-9445-22f2e56e5761: !Template
        answer_choices: Negative ||| Positive
        id: 1e90a24a-1182-43dd-9445-22f2e56e5761
        jinja: '{{ ["Title", "Headline"] | choice }}: {{title}}

          Review: {{content}}

          Is this review {{ answer_choices | join(" or ") }}? |||

          {{answer_choices[label]}} '
        metadata: !TemplateMetadata
          choices_in_prompt: true
          languages:
          - en
          metrics:
          - Accuracy
          original_task: true
        name: Is_this_review
        reference: ''
      2a1b2c3d-0000-0000-0000-000000000000: !Template
        answer_choices: null
        id: 2a1b2c3d-0000-0000-0000-000000000000
        jinja: 'Write a title for this review: {{content}} ||| {{title}}'
        metadata: !TemplateMetadata
          choices_in_prompt: false
          metrics:
          - ROUGE
          original_task: false
        name: Write a title
        reference: ''
    """
)


def test_promptsource_import_renders(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(PROMPTSOURCE)
    library = TemplateLibrary.from_files([path])
    t = library.get("amazon_polarity.is_this_review")
    assert t.task == "classification" and t.choices_in_prompt and t.effective_metrics == ("accuracy",)
    row = {"title": "Great", "content": "Loved it", "label": 1}
    r = t.render(row, seed=3)
    assert r.completion == "Positive"
    assert r.choices == ("Negative", "Positive")
    assert r.prompt.split(":")[0] in {"Title", "Headline"}
    assert "Is this review Negative or Positive?" in r.prompt
    # `choice` is seeded: the same row and seed always give the same pick, and seeds vary it.
    assert t.render(row, seed=3).prompt == r.prompt
    picks = {t.render(row, seed=s).prompt.split(":")[0] for s in range(20)}
    assert picks == {"Title", "Headline"}
    title = library.get("amazon_polarity.write_a_title")
    assert title.task == "summarization"
    assert title.render(row).completion == "Great"
    assert library.check(rows={"amazon_polarity": [row, {"title": "Bad", "content": "Broke", "label": 0}]}) == []


def test_promptsource_helpers(tmp_path):
    t = make("{{ most_frequent(['a','b','b']) if false else (['a','b','b'] | most_frequent) }} "
             "{{ 2 | to_letter }} {{ ['x','y','z'] | reorder([2,0,1]) | join(',') }} "
             "{{ ['p','q','r'] | permutation | sort | join('') }} {{ 'w' | highlight }}")
    out = t.render({}).prompt
    assert out.startswith("['b'] C z,x,y pqr <span")


def test_promptsource_bad_separator(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(PROMPTSOURCE.replace("? |||", "?"))
    with pytest.raises(TemplateError, match="'\\|\\|\\|'"):
        load_collection(path)


def test_schema_coerce_and_labels():
    schema = Schema(name="s", fields={"overall": "int", "text": "str", "ok": "bool"}, label_field="overall",
                    label_map={1: "1", 2: "2", 3: "3", 4: "4", 5: "5"})
    row = schema.coerce({"overall": 5.0, "text": "hi", "ok": "true"})
    assert row == {"overall": 5, "text": "hi", "ok": True}
    assert schema.check_label(row) is None
    assert "outside the label map" in schema.check_label({"overall": 6})
    with pytest.raises(ValueError, match="overall"):
        schema.coerce({"overall": "five"})


# ---------------------------------------------------------------------------------------------
# The built-in catalog
# ---------------------------------------------------------------------------------------------


def test_builtin_catalog_size_and_families():
    library = TemplateLibrary.builtin()
    assert len(library) >= 100
    assert len({t.dataset for t in library.templates.values()}) >= 20
    families = Counter(t.task for t in library.templates.values())
    assert len(families) >= 7
    assert set(families) <= set(TASK_FAMILIES)


def test_builtin_catalog_passes_check():
    problems = TemplateLibrary.builtin().check()
    assert problems == [], "\n".join(map(str, problems))


def test_required_amazon_templates():
    library = TemplateLibrary.builtin()
    wanted = {
        "Predict the associated rating for the following review: {{ review_body }}": ("rating", "{{ star_rating }}"),
        "Generate a {{ star_rating }}-star review for the following product: {{ product_title }}":
            ("generation", "{{ review_body }}"),
        "Give a short sentence describing the following product review: {{ review_body }}":
            ("summarization", "{{ review_headline }}"),
    }
    found = {t.instruction.strip(): (t.task, t.completion.strip()) for t in library.select(dataset="amazon_us_reviews")}
    for instruction, expected in wanted.items():
        assert found.get(instruction) == expected
    rating = library.get("amazon_us_reviews.predict_rating")
    assert rating.answer_choices == ("1", "2", "3", "4", "5")


def test_every_schema_has_several_templates_with_and_without_choices_in_prompt():
    library = TemplateLibrary.builtin()
    per_schema = Counter(t.dataset for t in library.templates.values())
    assert min(per_schema.values()) >= 3, per_schema
    choice_templates = [t for t in library.templates.values() if t.has_choices]
    assert any(t.choices_in_prompt for t in choice_templates)
    assert any(not t.choices_in_prompt for t in choice_templates)


def test_check_row_on_label_outside_map():
    library = TemplateLibrary.builtin()
    t = library.get("amazon_us_reviews.predict_rating")
    schema = library.schema("amazon_us_reviews")
    row = dict(schema.samples[0], star_rating=9)
    assert [p.rule for p in check_row(t, schema, row, 0)] == ["label-outside-map"]
