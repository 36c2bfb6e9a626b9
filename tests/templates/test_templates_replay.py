"""Other tools' public template bug reports, replayed against instructkit (one section per report)."""

from __future__ import annotations

import textwrap

from instructkit.templates.library import TemplateLibrary

# --------------------------------------------------------------------------------------------------
# bigscience-workshop/promptsource PR #73 (templates/zest/templates.yaml): PromptSource renders a template
# whole and splits the text at '|||', so a '|||' may sit inside a block: `{% if answer[0] != "n/a" %}...
# ||| {{question}}{% endif %}`. Split as source, neither side was valid Jinja: the whole file was refused
# ("Jinja syntax error ... looking for the following tags: 'elif' or 'else' or 'endif'").
# --------------------------------------------------------------------------------------------------

ZEST = textwrap.dedent(
    """\
    dataset: zest
    templates:
      846cc8ff-0527-4b2f-8da4-46613e915ff5: !Template
        answer_choices: null
        id: 846cc8ff-0527-4b2f-8da4-46613e915ff5
        jinja: '{% if answer[0] != "n/a" %}{{context}}

          Based on the previous passage, generate a question which has the following passage
          for an answer {{answer[0]}}.

          |||

          {{question}}

          {% endif %}'
        metadata: !TemplateMetadata
          choices_in_prompt: null
          metrics: []
        name: generate_the_question
        reference: Generate the question
      cd563834-49ee-495d-ac46-99f0264e58d5: !Template
        answer_choices: null
        id: cd563834-49ee-495d-ac46-99f0264e58d5
        jinja: 'What should be their answer based on this context: {{context}}|||

          {% if answer[0] == "n/a" %}

          I don''t know

          {% else %}

          {{answer[0]}}

          {% endif %}'
        metadata: !TemplateMetadata
          choices_in_prompt: null
          metrics: []
        name: teacher_student
        reference: I don't know answer
    """
)


def test_a_promptsource_separator_inside_a_block_is_read_as_promptsource_reads_it(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(ZEST)
    library = TemplateLibrary.from_files([path])
    spanning = library.get("zest.generate_the_question")
    row = {"context": "Otters hold hands ||| while asleep.", "answer": ["hands"], "question": "What do otters hold?"}
    rendered = spanning.render(row)
    assert rendered.prompt == ("Otters hold hands ||| while asleep.\nBased on the previous passage, generate a "
                               "question which has the following passage for an answer hands.")
    assert rendered.completion == "What do otters hold?"
    # where the block writes nothing, both sides are empty (PromptSource skips the row; here a bad row)
    empty = spanning.render({**row, "answer": ["n/a"]})
    assert (empty.prompt, empty.completion) == ("", "")
    assert spanning.fields_read == {"context", "answer", "question"}
    # a template whose sides are valid Jinja on their own is split as before
    plain = library.get("zest.teacher_student")
    assert plain.instruction == "What should be their answer based on this context: {{context}}"
    assert plain.render({**row, "answer": ["n/a"]}).completion == "I don't know"
