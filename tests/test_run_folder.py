"""The run folder never mixes two runs and a finished run is never destroyed (instructkit/run_folder.py),
the one rule for relative paths (config_load.PATH_RULE), and a failed first prepare leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.config_load import PATH_RULE, load_config
from instructkit.run_folder import (
    LINK_MIN_BYTES,
    Steps,
    clear_run,
    keep_if_stale,
    keep_previous_run,
    new_run_folder,
    stale_steps,
    stash_prepared,
)

# --------------------------------------------------------------------------------------------------
# A finished run, written by hand: what each step leaves in the folder
# --------------------------------------------------------------------------------------------------

FINGERPRINTS = {"prepare": "p1", "evaluate-base": "e1", "train": "t1", "evaluate-tuned": "u1", "compare": "c1"}


def finished_run(run_dir: Path, data: bytes = b"x" * LINK_MIN_BYTES) -> Path:
    files = {
        "train.jsonl": data, "validation.jsonl": b"v\n", "test.jsonl": b"t\n", "stats.json": b"{}",
        "eval/base/eval.json": b'{"model": "base"}', "checkpoints/step-000004/model.safetensors": b"ckpt",
        "metrics.jsonl": b'{"step": 1}\n', "train_result.json": b"{}", "model/model.safetensors": b"old weights",
        "model/README.md": b"card", "eval/tuned/eval.json": b'{"model": "tuned"}', "report.json": b"{}",
        "report.html": b"<html>", "config.json": b'{"train": {"lr": 0.003}}',
    }
    for name, content in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(content)
    steps = Steps(run_dir, force=False)
    for name, fp in FINGERPRINTS.items():
        steps.mark(name, fp, 1.0)
    steps.begin("train", "t1")
    return run_dir


def test_stale_steps_follow_what_reads_their_outputs(tmp_path):
    steps = Steps(finished_run(tmp_path / "run"), force=False)
    assert stale_steps(steps, {"evaluate-base": "e1", "train": "t1"}) == []
    assert stale_steps(steps, {"evaluate-base": "e1", "train": "t2"}) == ["train", "evaluate-tuned", "compare"]
    assert stale_steps(steps, {"evaluate-base": "e2", "train": "t1"}) == ["evaluate-base", "evaluate-tuned",
                                                                          "compare"]


def test_a_changed_training_setting_keeps_the_finished_run_whole_beside(tmp_path):
    run_dir = finished_run(tmp_path / "run")
    kept = keep_if_stale(run_dir, Steps(run_dir, force=False), {"evaluate-base": "e1", "train": "t2"},
                         old_config=b'{"train": {"lr": 0.003}}', prepared=None)
    assert kept == tmp_path / "run.previous-1"
    # the earlier run, whole: its model, checkpoints, log, report and records, with its own config
    assert (kept / "model" / "model.safetensors").read_bytes() == b"old weights"
    assert (kept / "checkpoints" / "step-000004" / "model.safetensors").read_bytes() == b"ckpt"
    for name in ("metrics.jsonl", "report.json", "report.html", "eval/tuned/eval.json", "eval/base/eval.json",
                 "stats.json", "train.jsonl", "steps/train.json", "steps/compare.json", "steps/prepare.json"):
        assert (kept / name).is_file(), name
    assert json.loads((kept / "config.json").read_text()) == {"train": {"lr": 0.003}}
    assert "train, evaluate-tuned, compare" in (kept / "KEPT.txt").read_text()
    # the big data file is linked, not copied; the small ones are copies
    assert os.stat(kept / "train.jsonl").st_ino == os.stat(run_dir / "train.jsonl").st_ino
    assert os.stat(kept / "stats.json").st_ino != os.stat(run_dir / "stats.json").st_ino
    # the run folder keeps only what is still up to date: no model, report or log of the earlier run
    for name in ("model", "checkpoints", "metrics.jsonl", "report.json", "eval/tuned", "steps/train.json",
                 "steps/train.started.json", "steps/evaluate-tuned.json"):
        assert not (run_dir / name).exists(), name
    for name in ("train.jsonl", "eval/base/eval.json", "steps/prepare.json", "steps/evaluate-base.json"):
        assert (run_dir / name).exists(), name
    # a second change keeps the next one beside it too
    finished_run(run_dir)
    assert keep_if_stale(run_dir, Steps(run_dir, force=False), {"evaluate-base": "e1", "train": "t3"}, None,
                         None) == tmp_path / "run.previous-2"


def test_data_prepared_again_keeps_the_earlier_data_with_the_earlier_run(tmp_path):
    run_dir = finished_run(tmp_path / "run", data=b"old examples\n")
    stash = stash_prepared(run_dir)
    (run_dir / "train.jsonl").write_bytes(b"new examples\n")  # prepare ran again from other data
    kept = keep_if_stale(run_dir, Steps(run_dir, force=False), {"evaluate-base": "e2", "train": "t2"}, None, stash)
    assert (kept / "train.jsonl").read_bytes() == b"old examples\n"
    assert (run_dir / "train.jsonl").read_bytes() == b"new examples\n"
    assert not stash.exists()
    assert not (kept / "config.json").exists()  # none was given


def test_nothing_is_kept_when_nothing_changed(tmp_path):
    run_dir = finished_run(tmp_path / "run")
    stash = stash_prepared(run_dir)
    assert keep_if_stale(run_dir, Steps(run_dir, force=False), {"evaluate-base": "e1", "train": "t1"}, None,
                         stash) is None
    assert not stash.exists() and not (tmp_path / "run.previous-1").exists()
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_training_again_from_the_start_keeps_the_earlier_model_and_its_started_record(tmp_path):
    """`instructkit train` without --resume on a folder with a model: the model goes beside; the started
    record of the training that begins now stays."""
    run_dir = finished_run(tmp_path / "run")
    kept = keep_previous_run(run_dir, ["train", "evaluate-tuned", "compare"], None, keep_started=True)
    assert (kept / "model" / "model.safetensors").read_bytes() == b"old weights"
    assert (run_dir / "steps" / "train.started.json").is_file()
    assert not (run_dir / "steps" / "train.json").exists()


def test_force_replaces_the_earlier_run(tmp_path):
    run_dir = finished_run(tmp_path / "run")
    gone = clear_run(run_dir)
    assert {p.name for p in gone} >= {"model", "checkpoints", "report.json", "train.jsonl", "train.json"}
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "eval", "steps"]
    assert list((run_dir / "steps").iterdir()) == [] and list((run_dir / "eval").iterdir()) == []


def test_a_failed_first_attempt_leaves_no_folder_but_an_existing_one_stays(tmp_path):
    run_dir = tmp_path / "runs" / "new"
    with pytest.raises(ValueError), new_run_folder(run_dir):
        (run_dir / "config.json").write_text("{}")
        raise ValueError("bad data")
    assert not (tmp_path / "runs").exists()
    run_dir.mkdir(parents=True)
    (run_dir / "keep.txt").write_text("mine")
    with pytest.raises(ValueError), new_run_folder(run_dir):
        raise ValueError("bad data")
    assert (run_dir / "keep.txt").read_text() == "mine"
    other = tmp_path / "runs" / "started"
    with pytest.raises(KeyboardInterrupt), new_run_folder(other):
        (other / "train.jsonl").write_text("{}\n")  # prepare finished: the folder is worth keeping
        raise KeyboardInterrupt
    assert (other / "train.jsonl").is_file()


# --------------------------------------------------------------------------------------------------
# Relative paths: one rule, the absolute path in the error
# --------------------------------------------------------------------------------------------------


def test_relative_paths_in_a_file_are_read_from_its_folder_even_when_the_cwd_has_one(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (tmp_path / "data.csv").write_text("a\n1\n")  # the same name in the current directory: not used
    monkeypatch.chdir(tmp_path)
    config_file = project / "sub" / "run.yaml"
    config_file.write_text("datasets:\n  - {path: data.csv, schema: sst2}\n"
                           "  - {files: {train: ../t.tsv, test: ~/x.tsv}, schema: sst2, name: b}\n"
                           "templates: {files: [../mine.yaml]}\nmodel: {name: ./my-model}\n")
    config = load_config(config_file)
    assert config.datasets[0].path == str(project / "sub" / "data.csv")
    assert config.datasets[1].files == {"train": str(project / "t.tsv"), "test": os.path.expanduser("~/x.tsv")}
    assert config.templates.files == [str(project / "mine.yaml")]
    assert config.model.name == str(project / "sub" / "my-model")
    assert load_config(None, ["model.name=smollm2-135m-instruct"]).model.name == "smollm2-135m-instruct"


def test_relative_paths_on_the_command_line_are_read_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    config_file = tmp_path / "sub" / "run.yaml"
    config_file.write_text("datasets:\n  - {path: demo}\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file, ["datasets.0.path=rows.csv", "datasets.0.schema=sst2"])
    assert config.datasets[0].path == str(tmp_path / "rows.csv")
    assert load_config(config_file).datasets[0].path == "demo"


def test_prepare_from_another_folder_names_the_absolute_path_and_the_rule_and_leaves_nothing(
        tmp_path, monkeypatch, capsys):
    """The issue's case: `cd /tmp && instructkit prepare <project>/examples/x.yaml` whose data is missing."""
    project = tmp_path / "project"
    (project / "examples").mkdir(parents=True)
    config_file = project / "examples" / "reviews.yaml"
    config_file.write_text("name: reviews\noutput_dir: runs\n"
                           "datasets:\n  - {path: ../shared/data/reviews.csv, schema: amazon_fine_food}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["prepare", str(config_file)]) == 2
    err = capsys.readouterr().err
    tried = project / "shared" / "data" / "reviews.csv"
    assert f"{tried}: file not found" in err
    assert PATH_RULE in " ".join(err.split())
    assert list(elsewhere.iterdir()) == []  # no empty run folder (nor runs/) left behind
