"""`templates check` compares the label map with the answer choices (issue: dropping "optimism" from a
template's choices still passed on sample rows that happened to lack it), and `templates list` never cuts
an id."""

from __future__ import annotations

import re

from instructkit.cli import main
from instructkit.templates.library import TemplateLibrary

EMOTION = """\
schemas:
  - name: tweet_eval_emotion
    fields: {text: str, label: int}
    label_field: label
    label_map: {0: anger, 1: joy, 2: optimism, 3: sadness}
    samples:
      - {text: "I can't believe they cancelled the show", label: 0}
      - {text: "Best day at the beach with friends", label: 1}
    templates:
      - id: tweet_eval_emotion.which_emotion
        name: Which emotion
        task: classification
        instruction: "Which emotion does this tweet express? {{ text }}"
        completion: "{{ label_map[label] }}"
        answer_choices: %s
        metrics: [accuracy, macro_f1]
"""


def _collection(tmp_path, choices: str):
    path = tmp_path / "emotion.yaml"
    path.write_text(EMOTION % choices)
    return path


def test_a_label_missing_from_the_choices_fails_though_the_samples_lack_it(tmp_path, capsys):
    path = _collection(tmp_path, '["anger", "joy", "sadness"]')
    library = TemplateLibrary.load([path], include_builtin=False)
    problems = library.check()
    assert [(p.template_id, p.rule) for p in problems] == [("tweet_eval_emotion.which_emotion",
                                                            "label-not-in-choices")]
    assert str(problems[0]) == (
        "tweet_eval_emotion.which_emotion: [label-not-in-choices] label label=2 ('optimism' in the label map) "
        "renders the completion 'optimism', which is not one of the answer choices ['anger', 'joy', 'sadness']")
    assert main(["templates", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "label-not-in-choices" in out and "'optimism'" in out


def test_every_label_among_the_choices_passes(tmp_path, capsys):
    path = _collection(tmp_path, '["anger", "joy", "optimism", "sadness"]')
    assert TemplateLibrary.load([path], include_builtin=False).check() == []
    assert main(["templates", "check", str(path)]) == 0
    assert "OK: 1 templates pass" in capsys.readouterr().out


def test_the_label_map_is_checked_on_real_data_rows_too(tmp_path):
    path = _collection(tmp_path, '["anger", "joy", "sadness"]')
    library = TemplateLibrary.load([path], include_builtin=False)
    rows = {"tweet_eval_emotion": [{"text": "so angry", "label": 0}, {"text": "hooray", "label": 1}]}
    assert [p.rule for p in library.check(rows=rows)] == ["label-not-in-choices"]


def test_templates_list_never_cuts_ids_when_piped(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    ids = list(TemplateLibrary.builtin().templates)
    assert main(["templates", "list"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    shown = set(re.findall(r"[\w./-]+", out))
    assert [i for i in ids if i not in shown] == []


def test_templates_list_on_a_narrow_terminal_keeps_whole_ids(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    ids = list(TemplateLibrary.builtin().templates)
    assert main(["templates", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "…" not in "\n".join(lines)
    assert [i for i in ids if i not in {line.strip() for line in lines}] == []  # each id whole on its line
