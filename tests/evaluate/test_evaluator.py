"""The evaluate API on tiny models: result structure, metrics that match the predictions, k-shot prompts,
validation during training, files written, and bad inputs named."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from instructkit.config import EvalConfig, ModelConfig
from instructkit.data.tokenize import TokenizeSettings
from instructkit.errors import DataError, InstructkitError, TemplateError
from instructkit.evaluate.evaluator import evaluate_examples, evaluate_run, make_validation_fn
from instructkit.evaluate.metric_registry import METRICS

RATING = "shop.rating"
DESCRIBE = "shop.describe"
REVIEWS = [
    ("great coffee, fast shipping", "5", "great coffee"),
    ("the kettle leaks", "1", "kettle leaks"),
    ("a man rides a bike", "4", "a bike"),
    ("hello there how are you", "2", "a greeting"),
]


def example(template_id: str, i: int, *, source: str | None = None) -> dict:
    text, stars, headline = REVIEWS[i % len(REVIEWS)]
    rating = template_id == RATING
    return {
        "prompt": f"Predict the rating: {text}. Rating:" if rating else f"Describe the review: {text}.",
        "completion": stars if rating else headline,
        "choices": ["1", "2", "3", "4", "5"] if rating else None,
        "task": "rating" if rating else "summarization",
        "template_id": template_id,
        "template_version": "1",
        "source_id": source or f"shop:{i}",
        "dataset": "shop",
        "label": stars if rating else None,
        "metrics": ["accuracy", "macro_f1"] if rating else ["rougeL"],
    }


def examples(n: int = 4) -> list[dict]:
    return [example(RATING, i) for i in range(n)] + [example(DESCRIBE, i) for i in range(n)]


CFG = EvalConfig(bootstrap_resamples=200, batch_size=4)
SETTINGS = TokenizeSettings(max_length=64)
SHORT = {"summarization": 6}


@pytest.fixture(scope="module")
def learned_llama(tiny_tokenizer):
    """A tiny Llama overfitted on the 8 examples (both templates) with plain AdamW, prompt labels masked."""
    from conftest import build_tiny_llama, overfit_causal

    model = build_tiny_llama(tiny_tokenizer, seed=2)
    exs = examples()
    loss = overfit_causal(model, tiny_tokenizer, [e["prompt"] for e in exs], [e["completion"] for e in exs],
                          SETTINGS, steps=80)
    assert loss < 0.05
    return model


def check_metric(entry: dict) -> None:
    assert set(entry) == {"value", "low", "high"}
    assert entry["low"] <= entry["value"] <= entry["high"]


# --------------------------------------------------------------------------------------------------
# evaluate_examples
# --------------------------------------------------------------------------------------------------


def test_result_structure_with_confidence_intervals(tiny_llama, tiny_tokenizer):
    data = examples()
    result = evaluate_examples(tiny_llama, tiny_tokenizer, data, SETTINGS, is_seq2seq=False, cfg=CFG,
                               max_new_tokens_by_task=SHORT, model_name="tiny", split="test")
    out = json.loads(json.dumps(result.to_json()))  # JSON-serialisable as is
    assert {"model", "split", "n", "k_shot", "templates", "tasks"} <= set(out)
    assert (out["model"], out["split"], out["n"], out["k_shot"]) == ("tiny", "test", 8, 0)
    assert set(out["templates"]) == {RATING, DESCRIBE}
    for tid, names in ((RATING, {"accuracy", "macro_f1"}), (DESCRIBE, {"rougeL"})):
        t = out["templates"][tid]
        assert (t["dataset"], t["n"], t["held_out"]) == ("shop", 4, False)
        assert set(t["metrics"]) == names
        for entry in t["metrics"].values():
            check_metric(entry)
        assert t["perplexity"] > 1 and math.isfinite(t["perplexity"])
        assert t["mean_prompt_tokens"] > 5
        assert t["unparseable"] == 0
    assert out["templates"][RATING]["scored_by"] == "rank"
    assert out["templates"][DESCRIBE]["scored_by"] == "generation"
    assert set(out["tasks"]) == {"shop/rating", "shop/summarization"}
    check_metric(out["tasks"]["shop/rating"]["metrics"]["accuracy"])
    assert out["tasks"]["shop/rating"]["templates"] == [RATING]

    # The metrics are those of the predictions written out.
    preds = result.predictions
    assert [p["index"] for p in preds] == list(range(8))
    rating = [p for p in preds if p["template_id"] == RATING]
    for p in rating:
        assert p["prediction"] in {"1", "2", "3", "4", "5"}
        assert p["prediction"] == max(p["choice_logprobs"], key=p["choice_logprobs"].get)
        assert p["correct"] == (p["prediction"] == p["reference"])
    accuracy = sum(p["correct"] for p in rating) / 4
    assert out["templates"][RATING]["metrics"]["accuracy"]["value"] == pytest.approx(accuracy)
    described = [p for p in preds if p["template_id"] == DESCRIBE]
    assert all(p["choice_logprobs"] is None and p["correct"] is None for p in described)


def test_learned_model_scores_perfectly(learned_llama, tiny_tokenizer):
    """A model that knows the answers: rank accuracy 1, generated headlines exact, perplexity near 1."""
    # max_new_tokens 6: generation cuts prompts to max_length - max_new_tokens (64 - 6 keeps them whole).
    result = evaluate_examples(learned_llama, tiny_tokenizer, examples(), SETTINGS, is_seq2seq=False, cfg=CFG,
                               max_new_tokens_by_task=SHORT)
    t = result.to_json()["templates"]
    # all 4 right: the exact interval [0.025 ** (1/4), 1] = [0.398, 1], not the bootstrap's point [1, 1]
    assert t[RATING]["metrics"]["accuracy"] == pytest.approx({"value": 1.0, "low": 0.025 ** 0.25, "high": 1.0})
    assert t[RATING]["metrics"]["macro_f1"]["value"] == 1.0
    assert t[DESCRIBE]["metrics"]["rougeL"]["value"] == pytest.approx(1.0)
    assert [p["prediction"] for p in result.predictions[4:]] == [h for _, _, h in REVIEWS]
    assert t[RATING]["perplexity"] < 1.1 and t[DESCRIBE]["perplexity"] < 1.1
    assert t[RATING]["confusion"]["labels"] == ["1", "2", "3", "4", "5"]
    assert t[RATING]["confusion"]["matrix"][4][4] == 1  # the 5-star review, predicted 5


def test_classification_by_generation_maps_answers(learned_llama, tiny_tokenizer):
    result = evaluate_examples(learned_llama, tiny_tokenizer, examples(), SETTINGS, is_seq2seq=False, cfg=CFG,
                               classify_by="generate", max_new_tokens_by_task=SHORT)
    t = result.to_json()["templates"][RATING]
    assert t["scored_by"] == "generation" and t["unparseable"] == 0
    assert t["metrics"]["accuracy"]["value"] == 1.0
    assert all(p["generated"] == p["prediction"] for p in result.predictions[:4])


def test_cap_per_template_is_seeded(tiny_llama, tiny_tokenizer):
    data = [example(RATING, i) for i in range(10)]
    cfg = EvalConfig(bootstrap_resamples=100, max_examples=3)
    a = evaluate_examples(tiny_llama, tiny_tokenizer, data, SETTINGS, is_seq2seq=False, cfg=cfg, seed=1)
    b = evaluate_examples(tiny_llama, tiny_tokenizer, data, SETTINGS, is_seq2seq=False, cfg=cfg, seed=1)
    assert a.n == 3 and [p["index"] for p in a.predictions] == [p["index"] for p in b.predictions]


def test_seq2seq_evaluation(tiny_t5, tiny_tokenizer):
    settings = TokenizeSettings(max_length=64, seq2seq=True)
    result = evaluate_examples(tiny_t5, tiny_tokenizer, examples(2), settings, is_seq2seq=True, cfg=CFG,
                               max_new_tokens_by_task=SHORT)
    out = result.to_json()
    assert out["n"] == 4 and out["templates"][RATING]["scored_by"] == "rank"
    for t in out["templates"].values():
        for entry in t["metrics"].values():
            check_metric(entry)


def test_few_shot_prompts_hold_k_demonstrations_of_the_same_template(tiny_llama, tiny_tokenizer):
    pool = [example(RATING, i, source=f"pool:{i}") for i in range(6)]
    pool.append(example(DESCRIBE, 0, source="pool:d"))
    pool.append(example(RATING, 0, source="shop:0"))  # the evaluated row itself: must never be shown
    data = [example(RATING, i) for i in range(4)]
    result = evaluate_examples(tiny_llama, tiny_tokenizer, data, TokenizeSettings(max_length=256),
                               is_seq2seq=False, cfg=CFG, few_shot_pool=pool, k_shot=3, seed=0)
    assert result.to_json()["k_shot"] == 3
    by_source = {d["source_id"]: d for d in pool}
    for p, ex in zip(result.predictions, data):
        demos = p["demonstrations"]
        assert len(demos) == 3 and len(set(demos)) == 3
        assert ex["source_id"] not in demos
        assert all(by_source[s]["template_id"] == RATING for s in demos)
        blocks = p["prompt"].split("\n\n")
        assert blocks[-1] == ex["prompt"]
        assert blocks[:-1] == [f"{by_source[s]['prompt']} {by_source[s]['completion']}" for s in demos]
    # Seeded: the same draw again; another seed draws differently somewhere.
    again = evaluate_examples(tiny_llama, tiny_tokenizer, data, TokenizeSettings(max_length=256),
                              is_seq2seq=False, cfg=CFG, few_shot_pool=pool, k_shot=3, seed=0)
    other = evaluate_examples(tiny_llama, tiny_tokenizer, data, TokenizeSettings(max_length=256),
                              is_seq2seq=False, cfg=CFG, few_shot_pool=pool, k_shot=3, seed=5)
    drawn = [p["demonstrations"] for p in result.predictions]
    assert [p["demonstrations"] for p in again.predictions] == drawn
    assert [p["demonstrations"] for p in other.predictions] != drawn
    # A short max_length cuts demonstrations from the left: counted.
    cut = evaluate_examples(tiny_llama, tiny_tokenizer, data, TokenizeSettings(max_length=24),
                            is_seq2seq=False, cfg=CFG, few_shot_pool=pool, k_shot=3)
    assert cut.templates[RATING]["truncated_prompts"] == 4


def test_k_shot_leaves_out_templates_the_pool_has_no_example_of(tiny_llama, tiny_tokenizer):
    """A held-out template is never in the train split: its k-shot prompts would hold no demonstration, so
    it is not scored under a k-shot name; a pool with none of the evaluated templates is an error."""
    pool = [example(RATING, i, source=f"pool:{i}") for i in range(4)]
    data = [example(RATING, i) for i in range(3)] + [example(DESCRIBE, i) for i in range(3)]
    result = evaluate_examples(tiny_llama, tiny_tokenizer, data, TokenizeSettings(max_length=256),
                               is_seq2seq=False, cfg=CFG, max_new_tokens_by_task=SHORT, few_shot_pool=pool,
                               k_shot=1)
    assert set(result.templates) == {RATING} and result.n == 3
    assert all(len(p["demonstrations"]) == 1 for p in result.predictions)
    with pytest.raises(DataError, match="demonstration pool"):
        evaluate_examples(tiny_llama, tiny_tokenizer, data[3:], TokenizeSettings(max_length=256),
                          is_seq2seq=False, cfg=CFG, max_new_tokens_by_task=SHORT, few_shot_pool=pool, k_shot=1)


def test_unknown_metric_is_named(tiny_llama, tiny_tokenizer):
    data = [dict(example(RATING, 0), metrics=["acuracy"])]
    with pytest.raises(InstructkitError, match="acuracy"):
        evaluate_examples(tiny_llama, tiny_tokenizer, data, SETTINGS, is_seq2seq=False, cfg=CFG)
    with pytest.raises(InstructkitError, match="acuracy"):  # when the loop is set up, not mid-training
        make_validation_fn(tiny_tokenizer, data, SETTINGS, is_seq2seq=False)


# --------------------------------------------------------------------------------------------------
# Validation during training
# --------------------------------------------------------------------------------------------------


def test_validation_fn_fixed_subset_flat_keys_and_mode_restored(learned_llama, tiny_tokenizer):
    data = examples() + [example(RATING, i, source=f"x:{i}") for i in range(4, 12)]
    validate = make_validation_fn(tiny_tokenizer, data, SETTINGS, is_seq2seq=False, max_examples=6, seed=3,
                                  max_new_tokens_by_task=SHORT)
    learned_llama.train()
    first = validate(learned_llama)
    assert learned_llama.training  # restored
    learned_llama.eval()
    second = validate(learned_llama)
    assert not learned_llama.training
    assert first == second  # the same subset, the same (deterministic) answers
    assert {"accuracy", "macro_f1", f"{RATING}/accuracy", f"{RATING}/macro_f1"} <= set(first)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in first.values())
    assert first["rougeL"] == first[f"{DESCRIBE}/rougeL"]  # the subset (seed 3) holds both templates
    per_template = [v for k, v in first.items() if k.endswith("/accuracy")]
    assert first["accuracy"] == pytest.approx(sum(per_template) / len(per_template))
    # declared before any validation (the loop checks train.early_stopping.metric against them), each with
    # its MetricSpec's direction
    assert set(validate.metrics) == set(first)
    assert all(higher is METRICS[key.rsplit("/", 1)[-1]].higher_is_better for key, higher in validate.metrics.items())


def test_validation_includes_generation_metrics(learned_llama, tiny_tokenizer):
    validate = make_validation_fn(tiny_tokenizer, examples(), SETTINGS, is_seq2seq=False, max_examples=200,
                                  max_new_tokens_by_task=SHORT)
    values = validate(learned_llama)
    assert values["rougeL"] == pytest.approx(1.0) and values[f"{DESCRIBE}/rougeL"] == pytest.approx(1.0)
    assert values["accuracy"] == 1.0


# --------------------------------------------------------------------------------------------------
# evaluate_run: files in, files out, bad input named
# --------------------------------------------------------------------------------------------------


def write_split(folder, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_evaluate_run_writes_eval_and_predictions(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    write_split(run, "test", examples(2))
    write_split(run, "train", [example(RATING, i, source=f"t:{i}") for i in range(3)]
                + [example(DESCRIBE, i, source=f"t:{i}") for i in range(3)])
    out = tmp_path / "eval"
    cfg = EvalConfig(bootstrap_resamples=100, max_new_tokens={"summarization": 4})
    result = evaluate_run(str(tiny_model_dir), run, "test", out, cfg, ModelConfig(max_length=128), k_shot=1)
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result.to_json()))
    assert saved["model"] == str(tiny_model_dir) and saved["k_shot"] == 1 and saved["n"] == 4
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["template_id"] == RATING
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_evaluate_run_accepts_a_jsonl_file_and_a_loaded_model(tmp_path, tiny_llama, tiny_tokenizer):
    write_split(tmp_path, "mine", examples(1))
    loaded = SimpleNamespace(model=tiny_llama, tokenizer=tiny_tokenizer, is_seq2seq=False)
    cfg = EvalConfig(bootstrap_resamples=100, max_new_tokens={"summarization": 4})
    result = evaluate_run(loaded, tmp_path / "mine.jsonl", "test", tmp_path / "out", cfg, ModelConfig())
    assert result.n == 2 and (tmp_path / "out" / "eval.json").is_file()


def test_missing_field_names_file_and_field(tmp_path, tiny_llama, tiny_tokenizer):
    rows = examples(1)
    del rows[1]["completion"]
    write_split(tmp_path, "test", rows)
    loaded = SimpleNamespace(model=tiny_llama, tokenizer=tiny_tokenizer, is_seq2seq=False)
    with pytest.raises(DataError) as info:
        evaluate_run(loaded, tmp_path, "test", tmp_path / "out", CFG, ModelConfig())
    message = str(info.value)
    assert "test.jsonl" in message and "'completion'" in message and "example 2" in message


def test_empty_split_names_split_and_file(tmp_path, tiny_llama, tiny_tokenizer):
    write_split(tmp_path, "validation", [])
    loaded = SimpleNamespace(model=tiny_llama, tokenizer=tiny_tokenizer, is_seq2seq=False)
    with pytest.raises(DataError, match=r"validation\.jsonl.*'validation' split has no examples"):
        evaluate_run(loaded, tmp_path, "validation", tmp_path / "out", CFG, ModelConfig())


def test_missing_split_file_is_named(tmp_path, tiny_llama, tiny_tokenizer):
    write_split(tmp_path, "train", examples(1))
    loaded = SimpleNamespace(model=tiny_llama, tokenizer=tiny_tokenizer, is_seq2seq=False)
    with pytest.raises(DataError, match=r"test\.jsonl"):
        evaluate_run(loaded, tmp_path, "test", tmp_path / "out", CFG, ModelConfig())


def test_unknown_template_without_metrics_is_named(tmp_path, tiny_llama, tiny_tokenizer):
    rows = examples(1)
    for r in rows:
        del r["metrics"]
    write_split(tmp_path, "test", rows)
    loaded = SimpleNamespace(model=tiny_llama, tokenizer=tiny_tokenizer, is_seq2seq=False)
    with pytest.raises(TemplateError, match=r"test\.jsonl.*'shop\.describe'.*metrics"):
        evaluate_run(loaded, tmp_path, "test", tmp_path / "out", CFG, ModelConfig())


def test_choice_too_long_for_max_length_names_template_and_example(tmp_path, tiny_llama, tiny_tokenizer):
    rows = [dict(example(RATING, 0), choices=["one " * 40, "5"], completion="5")]
    write_split(tmp_path, "test", rows)
    loaded = SimpleNamespace(model=tiny_llama, tokenizer=tiny_tokenizer, is_seq2seq=False)
    with pytest.raises(DataError, match=r"test\.jsonl.*shop\.rating.*example 1"):
        evaluate_run(loaded, tmp_path, "test", tmp_path / "out", CFG, ModelConfig(max_length=16))


def test_answers_cut_at_max_new_tokens_are_counted(learned_llama, tiny_tokenizer, caplog):
    """lm-evaluation-harness#3400: an answer that reaches max_new_tokens without EOS is cut short, not ended;
    eval.json counts them per template and task, predictions.jsonl flags them, the log names the template."""
    ended = evaluate_examples(learned_llama, tiny_tokenizer, examples(), SETTINGS, is_seq2seq=False, cfg=CFG,
                              max_new_tokens_by_task=SHORT)
    assert ended.templates[DESCRIBE]["cut_short"] == 0  # 6 tokens: every headline ends with EOS
    assert ended.templates[RATING]["cut_short"] is None  # ranked, not generated
    assert ended.tasks["shop/summarization"]["cut_short"] == 0
    with caplog.at_level("WARNING", logger="instructkit.evaluate.template_scoring"):
        cut = evaluate_examples(learned_llama, tiny_tokenizer, examples(), SETTINGS, is_seq2seq=False, cfg=CFG,
                                max_new_tokens_by_task={"summarization": 1})
    # One token: every headline has 2+ tokens, so none can end (EOS would be a second token).
    assert cut.templates[DESCRIBE]["cut_short"] == 4
    assert cut.tasks["shop/summarization"]["cut_short"] == 4
    assert [p["cut_short"] for p in cut.predictions[4:]] == [True] * 4
    assert "shop.describe: 4 of 4 generated answers reached max_new_tokens=1" in caplog.text
    assert "eval.max_new_tokens.summarization" in caplog.text


def test_completion_outside_its_choices_names_file_example_and_template(tmp_path, tiny_llama, tiny_tokenizer):
    """EleutherAI/lm-evaluation-harness#811: a gold answer outside the options scored 0 in silence (a rating
    "1 star" against choices 1..5: every prediction wrong, the example missing from the confusion matrix)."""
    rows = examples(2)
    rows[1] = dict(rows[1], completion="1 star")  # the second rating example
    write_split(tmp_path, "test", rows)
    loaded = SimpleNamespace(model=tiny_llama, tokenizer=tiny_tokenizer, is_seq2seq=False)
    with pytest.raises(DataError, match=r"test\.jsonl: example 2 \(shop\.rating\): completion '1 star' is not one "
                                        r"of its choices \['1', '2', '3', '4', '5'\]"):
        evaluate_run(loaded, tmp_path, "test", tmp_path / "out", CFG, ModelConfig())
    bad = [dict(example(RATING, 0), completion=" 5")]  # compared exactly: the leading space is not "5"
    with pytest.raises(DataError, match=r"examples: example 1 \(shop\.rating\): completion ' 5'"):
        evaluate_examples(tiny_llama, tiny_tokenizer, bad, SETTINGS, is_seq2seq=False, cfg=CFG)
    with pytest.raises(DataError, match=r"validation examples: example 1"):
        make_validation_fn(tiny_tokenizer, bad, SETTINGS, is_seq2seq=False)
