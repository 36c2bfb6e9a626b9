"""`instructkit run` end to end on a tiny model: every step, the report, skip-when-up-to-date, and a run
killed (SIGKILL or Ctrl-C) during training that continues from its checkpoint to the same report numbers."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructkit import pipeline
from instructkit.cli import main
from instructkit.evaluate import SCORING_VERSION

ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, model_dir: Path, name: str, **train) -> Path:
    train_cfg = {"lr": 3e-3, "epochs": 1, "batch_size": 4, "threads": 1, "eval_every": 6, "save_every": 1,
                 "eval_max_examples": 8, **train}
    config = {
        "name": name,
        "output_dir": str(folder / "runs"),
        "datasets": [{"path": "demo", "schema": "amazon_us_reviews", "max_rows": 60,
                      "templates": ["amazon_us_reviews.predict_rating", "amazon_us_reviews.describe_review"],
                      "templates_per_row": 1}],
        "split": {"seed": 0, "validation": 0.2, "test": 0.2},
        "model": {"name": str(model_dir), "max_length": 128},
        "train": train_cfg,
        "eval": {"few_shot": [1], "bootstrap_resamples": 200, "max_new_tokens": {"summarization": 8}},
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def headline(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "report.json").read_text())["headline"]


def test_run_end_to_end_then_skips_up_to_date_steps(tmp_path, tiny_model_dir, capsys, caplog, monkeypatch):
    config = write_config(tmp_path, tiny_model_dir, "e2e")
    caplog.set_level(logging.INFO, logger="instructkit")
    assert main(["run", str(config)]) == 0
    beside = (os.cpu_count() or 1) >= 2 and len(os.sched_getaffinity(0)) >= 2  # train.threads 1
    assert ("step evaluate-base runs beside the next step" in caplog.text) == beside
    run_dir = tmp_path / "runs" / "e2e"
    for name in ("train.jsonl", "test.jsonl", "stats.json", "metrics.jsonl", "report.json", "report.md",
                 "report.html", "eval/base/eval.json", "eval/base-k1/eval.json", "eval/tuned/predictions.jsonl",
                 "model/model.safetensors", "model/README.md"):
        assert (run_dir / name).is_file(), name
    rows = headline(run_dir)
    assert {r["metric"] for r in rows} == {"macro_f1", "rougeL"}
    assert all(r["low"] <= r["delta"] <= r["high"] for r in rows)
    card = (run_dir / "model" / "README.md").read_text()
    assert "macro_f1" in card  # the model card carries the final metrics table
    # A second run finds every step up to date and changes nothing.
    before = (run_dir / "report.json").read_text()
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "up to date (skipped): prepare, evaluate-base, train, evaluate-tuned, compare" in " ".join(out.split())
    assert (run_dir / "report.json").read_text() == before
    # `instructkit evaluate` on the run folder scores with the run's own settings (config.json: 128-token
    # prompts, 8 new tokens for summaries), not the defaults (256, 64): the run's predictions again, for the
    # tuned model and for the base model (evaluated beside training in a second process, on 2+ cores).
    for model, name in ((run_dir / "model", "tuned"), (tiny_model_dir, "base")):
        out = tmp_path / f"standalone-{name}"
        assert main(["evaluate", "--model", str(model), "--data", str(run_dir), "--out", str(out)]) == 0
        assert json.loads((out / "eval.json").read_text())["settings"]["max_length"] == 128
        assert _predictions(out) == _predictions(run_dir / "eval" / name)
        ours, run = (json.loads((folder / "eval.json").read_text())["templates"]
                     for folder in (out, run_dir / "eval" / name))
        assert {t: v["perplexity"] for t, v in ours.items()} == {t: v["perplexity"] for t, v in run.items()}
    # Evaluations an earlier scoring version wrote are not up to date: they run again (kept beside), training
    # does not.
    assert json.loads((run_dir / "eval/base/eval.json").read_text())["settings"]["scoring_version"] == \
        SCORING_VERSION
    monkeypatch.setattr(pipeline, "SCORING_VERSION", SCORING_VERSION + 1)
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "up to date (skipped): prepare, train" in out and "evaluate-base" not in out.split("skipped")[1]
    assert (tmp_path / "runs" / "e2e.previous-1" / "eval" / "base" / "eval.json").is_file()
    assert json.loads((run_dir / "report.json").read_text())["headline"] == json.loads(before)["headline"]
    # Other MeCab tokenizers installed change no figure of a run that scores no BLEU: nothing runs again.
    from instructkit.evaluate import generation_metrics

    assert json.loads((run_dir / "eval/base/eval.json").read_text())["settings"]["bleu_mecab"] == \
        list(generation_metrics.installed_mecab())
    monkeypatch.setattr(generation_metrics, "installed_mecab", lambda: ("ja-mecab",))
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "up to date (skipped): prepare, evaluate-base, train, evaluate-tuned, compare" in out
    # Data an earlier rendering version prepared is prepared again; the same files keep every later step.
    from instructkit.data import build

    monkeypatch.setattr(build, "PREPARE_VERSION", build.PREPARE_VERSION + 1)
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "time: prepare" in out and "up to date (skipped): evaluate-base, train, evaluate-tuned, compare" in out


def _predictions(folder: Path) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return [(row["index"], row["prediction"]) for row in rows]


def test_evaluation_fingerprint_holds_the_mecab_tokenizers_only_where_bleu_is_scored(monkeypatch):
    from instructkit.evaluate import generation_metrics

    rouge = [{"prompt": "Translate: blue", "completion": "bleu", "metrics": ["rougeL"]}]  # "bleu" as text only
    bleu = [{"prompt": "Translate: blue", "completion": "bleu", "metrics": ["bleu"]}]
    prints = {}
    for installed in ((), ("ja-mecab", "ko-mecab")):
        monkeypatch.setattr(generation_metrics, "installed_mecab", lambda installed=installed: installed)
        prints[installed] = [pipeline.evaluation_fingerprint(scoring, {"name": "m"}, "d", examples)
                             for examples, scoring in ((rouge, {}), (bleu, {}), (rouge, {"metrics": {"t": ["bleu"]}}))]
    without, with_mecab = prints.values()
    assert without[0] == with_mecab[0]  # no BLEU: the tokenizers change nothing
    assert without[1] != with_mecab[1] and without[2] != with_mecab[2]  # BLEU in the examples or the settings


def test_changed_train_settings_start_fresh_and_same_data_keeps_the_base_evaluation(tmp_path, tiny_model_dir,
                                                                                    capsys, caplog):
    """A new train setting retrains from the start (the old checkpoints belong to other settings) and a
    re-prepare that writes the same examples keeps the base evaluation."""
    config = write_config(tmp_path, tiny_model_dir, "change")
    assert main(["run", str(config)]) == 0
    run_dir = tmp_path / "runs" / "change"
    first = (run_dir / "model" / "model.safetensors").read_bytes()
    # Pretend the prepare step's inputs changed (as when a config field is added): same files come out.
    step = run_dir / "steps" / "prepare.json"
    step.write_text(step.read_text().replace('"fingerprint": "', '"fingerprint": "x'))
    capsys.readouterr()
    assert main(["run", str(config), "train.lr=0.01"]) == 0
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert "up to date (skipped): evaluate-base" in text
    assert (run_dir / "model" / "model.safetensors").read_bytes() != first  # retrained, not "resumed" at the end
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if r.get("event") == "train"][0] == 1
    # The finished run was not destroyed: it is kept whole beside, with its own config, model and report.
    kept = tmp_path / "runs" / "change.previous-1"
    assert f"the earlier run is kept whole in {kept}" in caplog.text
    assert (kept / "model" / "model.safetensors").read_bytes() == first
    assert json.loads((kept / "config.json").read_text())["train"]["lr"] == 3e-3
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 0.01
    for name in ("report.json", "eval/base/eval.json", "eval/tuned/eval.json", "metrics.jsonl", "steps/train.json"):
        assert (kept / name).is_file(), name
    assert (kept / "train.jsonl").read_bytes() == (run_dir / "train.jsonl").read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_run_killed_during_training_continues_to_the_same_report(tmp_path, tiny_model_dir, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # Uninterrupted reference run.
    ref = write_config(tmp_path, tiny_model_dir, "reference", epochs=3)
    subprocess.run([sys.executable, "-m", "instructkit", "run", str(ref)], check=True, env=env,
                   capture_output=True, timeout=600)
    # The same run, SIGKILLed once training has written its third checkpoint, then started again.
    cfg = write_config(tmp_path, tiny_model_dir, "killed", epochs=3)
    checkpoints = tmp_path / "runs" / "killed" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "run", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and len(list(checkpoints.glob("step-*"))) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:  # Ctrl-C: a clean exit 130 that says how to continue
        assert proc.returncode == 130, err[-2000:]
        assert "run the same command again" in err
        assert "checkpoint written at step" in err and "to continue from step" in err  # says what happens
    else:
        assert proc.returncode == -signal.SIGKILL
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "steps" / "train.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "instructkit", "run", str(cfg)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resum" in resumed.stderr.lower()
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    assert strip(headline(run_dir)) == strip(headline(tmp_path / "runs" / "reference"))
    a = (tmp_path / "runs" / "reference" / "model" / "model.safetensors").read_bytes()
    b = (run_dir / "model" / "model.safetensors").read_bytes()
    assert a == b


def test_bad_inputs_exit_2_naming_the_culprit(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  - {path: demo, schema: amazon_us_reviews, templates: [amazon_us_reviews.nope]}\n")
    assert main(["prepare", str(bad)]) == 2
    assert "amazon_us_reviews.nope" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl")]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_early_stopping_on_a_metric_validation_never_produces_exits_2_before_training(tmp_path, tiny_model_dir,
                                                                                          capsys):
    """The validation built from the run's templates declares its metrics: a misspelt one (here with a
    direction, greater_is_better: false) is named before the first step, not an epoch into training."""
    config = write_config(tmp_path, tiny_model_dir, "misspelt",
                          early_stopping={"metric": "macro_f2", "greater_is_better": False})
    assert main(["train", str(config)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.early_stopping.metric='macro_f2' is not a metric validation produces (did you mean 'macro_f1'?)" in err
    assert not (tmp_path / "runs" / "misspelt" / "metrics.jsonl").exists()


def test_eval_max_examples_0_validates_the_loss_only(tmp_path, tiny_model_dir, capsys):
    """train.eval_max_examples: 0 keeps the validation loss and runs no task metrics (no generation, no rank
    scoring); early stopping on a task metric then has nothing to measure: exit 2 naming the setting."""
    config = write_config(tmp_path, tiny_model_dir, "loss-only", eval_max_examples=0, eval_every=3)
    assert main(["train", str(config)]) == 0
    records = [json.loads(x) for x in (tmp_path / "runs" / "loss-only" / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val_loss" in r]
    assert validations and all(r["val_loss"] > 0 for r in validations)
    tasks = {k for r in validations for k in r if "/" in k or k in ("macro_f1", "rougeL", "accuracy")}
    assert tasks == set()
    capsys.readouterr()
    config = write_config(tmp_path, tiny_model_dir, "loss-only-es", eval_max_examples=0,
                          early_stopping={"metric": "macro_f1"})
    assert main(["train", str(config)]) == 2
    assert "train.eval_max_examples is 0: no task metrics" in " ".join(capsys.readouterr().err.split())


def test_few_shot_baseline_runs_only_where_the_train_split_has_the_template(caplog):
    from instructkit.config import RunConfig
    from instructkit.run_steps import few_shot_ks

    config = RunConfig.model_validate({"eval": {"few_shot": [1, 3]}})
    pool = [{"template_id": "shop.rating"}]
    assert few_shot_ks(config, [{"template_id": "shop.rating"}, {"template_id": "shop.title"}], pool) == [1, 3]
    assert few_shot_ks(config, [{"template_id": "shop.title"}], pool) == []  # only held-out templates
    assert "no few-shot baseline" in caplog.text
    assert few_shot_ks(config, [{"template_id": "shop.rating"}], []) == []


@pytest.mark.parametrize(("eval_cfg", "threads", "world", "cores", "memory_gb", "expected"), [
    ({}, 1, 1, 2, 24, True),
    ({}, 1, 1, 1, 24, False),  # no idle core
    ({}, 2, 1, 2, 24, False),  # training takes both
    ({}, None, 1, 8, 24, False),  # unset: torch takes every core
    ({}, 1, 2, 8, 24, False),  # under a launcher
    ({"base_beside_training": False}, 1, 1, 8, 24, False),
    ({}, 1, 1, 2, 7, False),  # 4 GB of training + 2 x 1 GB of weights + 0.5 GB > 80% of 7 GB
])
def test_base_evaluation_runs_beside_training_only_on_idle_cpu_cores(monkeypatch, tmp_path, eval_cfg, threads, world,
                                                                     cores, memory_gb, expected):
    from types import SimpleNamespace

    from instructkit.config import RunConfig
    from instructkit.pipeline import base_beside_training

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("instructkit.data.store.default_processes", lambda requested: requested or cores)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    memory_plan = importlib.import_module("instructkit.train.memory_plan")
    monkeypatch.setattr(memory_plan, "system_memory_bytes", lambda: memory_gb * 10**9)
    estimate = SimpleNamespace(total=4 * 10**9, weights=10**9, overhead=5 * 10**8)
    monkeypatch.setattr(memory_plan, "estimate_for_run", lambda config: estimate)
    config = RunConfig.model_validate({"eval": eval_cfg, "train": {"threads": threads}})
    assert base_beside_training(config) is expected
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert base_beside_training(config) is False  # the accelerator is training's
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    (config.run_dir / "checkpoints").mkdir(parents=True)
    assert base_beside_training(config) is False  # an earlier training's outputs are moved aside first


def test_evaluate_after_prepare_and_train_uses_the_recorded_config(tmp_path):
    """Without `instructkit run` (no config.json), `evaluate`/`compare` read the config prepare recorded."""
    from instructkit.run_steps import data_config

    config = write_config(tmp_path, tmp_path / "no-model-needed", "steps")
    assert main(["prepare", str(config), "eval.split=validation"]) == 0
    run_dir = tmp_path / "runs" / "steps"
    assert not (run_dir / "config.json").exists()
    recorded = data_config(run_dir, ["eval.batch_size=3"])
    assert (recorded.model.max_length, recorded.eval.split, recorded.eval.batch_size) == (128, "validation", 3)
    assert data_config(run_dir / "test.jsonl", []).model.max_length == 256  # a JSONL file: the defaults
