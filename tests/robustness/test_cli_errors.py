"""Every error a user can hit through the command line: exit code 2 and one message naming the culprit.

`instructkit.cli.main([...])` is run in-process on bad inputs; stderr (capsys) must name the file, line,
key, column, template or model at fault, and carry no traceback.
"""

from __future__ import annotations

import json

import _robust
import pytest

from instructkit.cli import main

GOOD_ROWS = "".join(json.dumps({"prompt": f"question {i}?", "completion": f"answer {i}"}) + "\n"
                    for i in range(20))

FILES = {
    "bad.yaml": "name: x\ntrain: [unclosed\n",
    "tabs.yaml": "name: x\ntrain:\n\tlr: 1\n",
    "unknown.yaml": "name: x\ntrain: {bach_size: 8}\n",
    "range.yaml": "name: x\ntrain: {lr: -1}\n",
    "list.yaml": "- just\n- a list\n",
    "escape.yaml": "name: ../../etc\n",
    "tpl.yaml": "name: x\noutput_dir: runs\n"
                "datasets: [{path: demo, templates: [amazon_us_reviews.predict_ratin]}]\n",
    "schema.yaml": "name: x\noutput_dir: runs\ndatasets: [{path: demo, schema: amazon_us_reviewz}]\n",
    "wrong_schema_tpl.yaml": "name: x\noutput_dir: runs\ndatasets: [{path: demo, schema: amazon_us_reviews, "
                             "templates: [sst2.sentiment_with_options]}]\n",
    "missing_data.yaml": "name: x\noutput_dir: runs\ndatasets: [{path: reviews.csv, schema: amazon_us_reviews}]\n",
    "reviews2.csv": "Text,star_rating\nhello,5\n",
    "col.yaml": "name: x\noutput_dir: runs\ndatasets: [{path: reviews2.csv, schema: amazon_us_reviews, "
                "templates: [amazon_us_reviews.predict_rating], columns: {review_body: Txt}}]\n",
    "ragged.csv": "review_body,star_rating\ngood,5\nbad,1,extra\n",
    "ragged.yaml": "name: x\noutput_dir: runs\ndatasets: [{path: ragged.csv, schema: amazon_us_reviews, "
                   "templates: [amazon_us_reviews.predict_rating]}]\n",
    "label.csv": "review_body,star_rating\ngood,5\nbad,7\n",
    "label.yaml": "name: x\noutput_dir: runs\ndatasets: [{path: label.csv, schema: amazon_us_reviews, "
                  "templates: [amazon_us_reviews.predict_rating]}]\n",
    "bad.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e", "compl\n',
    "jsonl.yaml": "name: x\noutput_dir: runs\ndatasets: [{path: bad.jsonl}]\n",
    "empty.jsonl": "",
    "empty.yaml": "name: x\noutput_dir: runs\ndatasets: [{path: empty.jsonl}]\n",
    "noform.jsonl": '{"text": "a", "stars": 1}\n',
    "noform.yaml": "name: x\noutput_dir: runs\ndatasets: [{path: noform.jsonl}]\n",
    "good.jsonl": GOOD_ROWS,
    "good.yaml": "name: good\noutput_dir: runs\ndatasets: [{path: good.jsonl}]\n",
    "notrain.yaml": "name: notrain\noutput_dir: runs\ndatasets: [{path: good.jsonl}]\n"
                    "split: {validation: 0.5, test: 0.49}\n",
    "evil_templates.yaml": "schemas:\n  - name: evil\n    templates:\n      - {id: evil.t, task: generation, "
                           "instruction: \"{{ ''.__class__ }}\", completion: x}\n    samples: [{a: 1}]\n",
    "notjinja.yaml": "schemas:\n  - name: s\n    templates:\n      - {id: s.t, task: generation, "
                     "instruction: \"{{ unclosed\", completion: x}\n",
    "README.md": "# not a model\n",
}

# (argv, the culprit stderr must name). "{tmp}" is the test folder.
CASES = [
    (["prepare", "missing.yaml"], "missing.yaml: config file not found"),
    (["prepare", "bad.yaml"], "bad.yaml: line 3: invalid YAML"),
    (["prepare", "tabs.yaml"], "tabs.yaml: line 3: invalid YAML"),
    (["prepare", "unknown.yaml"], "unknown key 'train.bach_size' (did you mean 'batch_size'?)"),
    (["prepare", "range.yaml"], "train.lr: Input should be greater than 0"),
    (["prepare", "list.yaml"], "list.yaml: a config must be a mapping"),
    (["prepare", "escape.yaml"], "run name '../../etc' must be a plain folder name"),
    (["prepare", "good.yaml", "train.lr"], "unexpected argument 'train.lr'"),
    (["prepare", "good.yaml", "split.seed=x"], "split.seed: Input should be a valid integer"),
    (["prepare", "good.yaml", "datasets.7.path=x"], "index 7 is past the end"),
    (["prepare", "tpl.yaml"], "unknown template id 'amazon_us_reviews.predict_ratin'; did you mean"),
    (["prepare", "schema.yaml"], "unknown dataset schema 'amazon_us_reviewz'"),
    (["prepare", "wrong_schema_tpl.yaml"], "template 'sst2.sentiment_with_options' is for schema 'sst2'"),
    (["prepare", "missing_data.yaml"], "reviews.csv: file not found; did you mean"),
    (["prepare", "col.yaml"], "reviews2.csv: no column 'Txt' for field 'review_body'"),
    (["prepare", "ragged.yaml"], "ragged.csv: line 3: 3 fields, but the header (line 1) has 2"),
    (["prepare", "label.yaml"],
     "label.csv: line 3: column 'star_rating': label star_rating=7 is outside the label map (1, 2, 3, 4, 5)"),
    (["prepare", "jsonl.yaml"], "bad.jsonl: line 3: malformed JSON"),
    (["prepare", "empty.yaml"], "empty.jsonl: the file is empty"),
    (["prepare", "noform.yaml"], "noform.jsonl: dataset 'noform' has no `schema:`"),
    (["train", "good.yaml", "model.name={tmp}/not-a-model"], "unknown model '{tmp}/not-a-model'"),
    (["train", "good.yaml", "model.name=README.md"], "model path README.md is a file but not a .gguf file"),
    (["train", "good.yaml", "model.name={tmp}"], "{tmp} is not a model folder: it has no config.json"),
    (["train", "good.yaml", "model.name=nobody/nothing"],
     "hub id 'nobody/nothing' is not in the local Hugging Face cache"),
    (["train", "notrain.yaml", "model.name={model}"], "runs/notrain: no training examples"),
    (["evaluate", "--model", "{tmp}/nomodel", "--data", "runs/good"], "unknown model '{tmp}/nomodel'"),
    (["evaluate", "--model", "{model}", "--data", "runs/nothere"], "runs/nothere"),
    (["evaluate", "--model", "{model}", "--data", "runs/good", "--split", "bogus"], "bogus"),
    (["evaluate", "--model", "{model}", "--data", "runs/good", "--split", "validation"],
     "the 'validation' split has no examples"),
    (["compare", "--base", "/nope", "--tuned", "{model}", "--data", "runs/good"], "unknown model '/nope'"),
    (["compare", "--base", "{model}", "--tuned", "{tmp}/typo", "--data", "runs/good"], "unknown model '{tmp}/typo'"),
    (["generate", "--model", "{tmp}/nomodel", "hello"], "unknown model '{tmp}/nomodel'"),
    (["templates", "show", "amazon_us_reviews.predict_ratin"],
     "unknown template id 'amazon_us_reviews.predict_ratin'"),
    (["templates", "check", "missing.yaml"], "missing.yaml: template file not found"),
    (["templates", "check", "notjinja.yaml"], "template 's.t' (instruction): Jinja syntax error on line 1"),
    (["templates", "list", "--templates", "bad.yaml"], "bad.yaml: line 3: invalid YAML"),
    (["templates", "check", "--data", "missing.csv", "--schema", "amazon_us_reviews"],
     "missing.csv: file not found"),
    (["estimate-memory", "bad.yaml"], "bad.yaml: line 3: invalid YAML"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    """A folder with every bad input, and a prepared run `runs/good` whose validation split is empty."""
    folder = tmp_path_factory.mktemp("cli")
    for name, text in FILES.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("argv,culprit", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_cli_error_exits_2_and_names_the_culprit(argv, culprit, workspace, tiny_model_dir, capsys,
                                                 monkeypatch):
    monkeypatch.chdir(workspace)
    if not (workspace / "runs" / "good" / "test.jsonl").is_file():
        assert main(["prepare", "good.yaml"]) == 0
        (workspace / "runs" / "good" / "validation.jsonl").write_text("")
        capsys.readouterr()
    fill = {"tmp": str(workspace), "model": str(tiny_model_dir)}
    argv = [a.format(**fill) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    _robust.tried("cli: error paths")
    assert code == 2, f"exit code {code} for {argv}:\n{err[-2000:]}"
    assert culprit.format(**fill) in " ".join(err.split()), f"stderr does not name {culprit!r}:\n{err[-2000:]}"
    assert "Traceback" not in err


def test_templates_check_reports_sandbox_refusals_as_problems(workspace, capsys, monkeypatch):
    """A hostile template in a user collection fails `templates check` (exit 1) naming it; nothing runs."""
    monkeypatch.chdir(workspace)
    code = main(["templates", "check", "evil_templates.yaml"])
    out = capsys.readouterr().out
    assert code == 1 and "evil.t" in out and "unsafe" in out


def test_compare_checks_tuned_before_evaluating_the_base(workspace, tiny_model_dir, capsys, monkeypatch):
    """A typo in --tuned is reported at once, not after the (minutes-long) base evaluation."""
    monkeypatch.chdir(workspace)
    if not (workspace / "runs" / "good" / "test.jsonl").is_file():
        assert main(["prepare", "good.yaml"]) == 0
    assert main(["compare", "--base", str(tiny_model_dir), "--tuned", str(workspace / "typo"),
                 "--data", "runs/good"]) == 2
    assert "typo" in capsys.readouterr().err
    assert not (workspace / "runs" / "good" / "eval" / "base").exists()
