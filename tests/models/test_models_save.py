"""models/save.py and card.py: the saved folder, generation_config, the model card and its metrics."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _model_helpers import GEMMA_PROVENANCE, card_front_matter, logits_of

from instructkit.config import ModelConfig
from instructkit.errors import ModelError
from instructkit.models.card import update_model_card_metrics
from instructkit.models.load import load_model
from instructkit.models.save import save_instruct_model

# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def test_saved_model_reloads_with_plain_transformers_identical_logits(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = load_model(ModelConfig(name=str(tiny_model_dir)))
    out = save_instruct_model(loaded.model, loaded.tokenizer, tmp_path / "tuned",
                              card={"provenance": loaded.provenance}, train_config={"seed": 7})
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert torch.equal(logits_of(model, tokenizer), logits_of(loaded.model, loaded.tokenizer))
    assert tokenizer.chat_template == loaded.tokenizer.chat_template
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md",
            "instructkit_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0700


@pytest.mark.parametrize("wrapper", ["compiled_lora", "data_parallel_compiled"])
def test_a_compiled_or_ddp_wrapped_model_is_saved_as_the_model_inside(wrapper, tmp_path, tiny_llama, tiny_tokenizer):
    """pytorch#101107 / nanoGPT#325: a wrapped model saved as it is. A torch.compile'd peft model was not
    recognised as peft: its adapter alone was written under a record saying merged (no config.json, no
    model.safetensors); a DataParallel / DDP model had no config. Both now save the plain merged model."""
    from _model_helpers import lora_with_nonzero_update
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    if wrapper == "compiled_lora":
        model = lora_with_nonzero_update(tiny_llama)
        wrapped = torch.compile(model, backend="eager")
    else:
        model = tiny_llama
        wrapped = torch.nn.DataParallel(torch.compile(model, backend="eager"))
    tuned_logits = logits_of(model, tiny_tokenizer)
    out = save_instruct_model(wrapped, tiny_tokenizer, tmp_path / "m", card={}, train_config=None)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "instructkit_config.json").read_text())["adapter_only"] is False
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and not any(k.startswith(("_orig_mod.", "module.")) or "lora" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits_of(reloaded, tiny_tokenizer), tuned_logits, atol=1e-5)


def test_saving_twice_replaces_the_folder(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_llama
    from transformers import AutoModelForCausalLM

    first, second = build_tiny_llama(tiny_tokenizer, seed=1), build_tiny_llama(tiny_tokenizer, seed=2)
    out = tmp_path / "tuned"
    save_instruct_model(first, tiny_tokenizer, out, card={}, train_config=None)
    save_instruct_model(second, tiny_tokenizer, out, card={}, train_config=None)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits_of(reloaded, tiny_tokenizer), logits_of(second, tiny_tokenizer))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned"]


def test_generation_config_stops_at_eos_and_end_of_turn(tmp_path, tiny_llama, tiny_tokenizer):
    from transformers import GenerationConfig

    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "chat", card={}, train_config=None)
    gen = GenerationConfig.from_pretrained(out)
    eos = tiny_tokenizer.convert_tokens_to_ids("</s>")
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sorted(gen.eos_token_id) == sorted([eos, end_of_turn])
    assert gen.pad_token_id == tiny_tokenizer.convert_tokens_to_ids("<pad>")


def test_generation_config_without_chat_template_is_eos_alone(tmp_path, tiny_llama):
    from conftest import build_tiny_tokenizer
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    out = save_instruct_model(tiny_llama, tokenizer, tmp_path / "plain", card={}, train_config=None)
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.convert_tokens_to_ids("</s>")


def test_a_base_generation_config_with_ignored_sampling_flags_still_saves(tmp_path, tiny_tokenizer, caplog):
    """transformers#29988: a base whose generation_config.json sets temperature/top_p without do_sample (as
    Vicuna's and Llama-2-chat copies did) loads with a warning, but save_pretrained refuses a config changed since
    (instructkit sets its stop ids): the tuned model failed at its save. The ignored flags are unset; greedy
    generation is the same as the base config's."""
    from conftest import build_tiny_llama
    from transformers import AutoModelForCausalLM, GenerationConfig

    base = tmp_path / "base"
    model = build_tiny_llama(tiny_tokenizer)
    model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    gen = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.9, "top_p": 0.6,
                                                             "length_penalty": 2.0}))
    ids = tiny_tokenizer("Rating:", return_tensors="pt").input_ids
    as_published = AutoModelForCausalLM.from_pretrained(base).generate(ids, max_new_tokens=8)
    loaded = load_model(ModelConfig(name=str(base)))
    assert "temperature=0.9, top_p=0.6, length_penalty=2.0 had no effect" in caplog.text
    out = save_instruct_model(loaded.model, loaded.tokenizer, tmp_path / "tuned", card={}, train_config=None)
    saved = GenerationConfig.from_pretrained(out)
    assert (saved.temperature, saved.top_p, saved.length_penalty, saved.do_sample) == (None, None, None, None)
    assert saved.eos_token_id == [tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=8, eos_token_id=tiny_tokenizer.eos_token_id),
                       as_published)


def test_a_generation_config_transformers_refuses_otherwise_is_a_model_error(tiny_llama, tiny_tokenizer):
    from instructkit.models.generation import configure_generation

    tiny_llama.generation_config.num_return_sequences = 3  # greedy cannot return 3: not a flag to unset
    with pytest.raises(ModelError, match="generation config cannot be saved.*num_return_sequences"):
        configure_generation(tiny_llama, tiny_tokenizer)


def test_model_card_front_matter_provenance_data_and_versions(tmp_path, tiny_llama, tiny_tokenizer):
    import transformers

    card = {
        "provenance": GEMMA_PROVENANCE,
        "data_sources": [{"name": "amazon_fine_food", "licence": "CC0-1.0", "rows": 697}],
        "metrics": [{"name": "macro_f1", "value": 0.5123, "ci": [0.45, 0.57]}],
        "tags": ["rating"],
    }
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m", card=card,
                              train_config={"seed": 11, "lr": 1e-4})
    front = card_front_matter(out)
    assert front["license"] == "gemma"
    assert front["base_model"] == "google/gemma-3-270m"
    assert front["library_name"] == "transformers"
    assert front["tags"][0] == "instructkit" and "rating" in front["tags"]
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "Gemma Terms of Use" in text and "ai.google.dev/gemma/terms" in text
    assert "dequantized" in text and "Q4_K_M" in text and GEMMA_PROVENANCE["gguf_sha256"] in text
    assert "| amazon_fine_food | CC0-1.0 | 697 |" in text
    assert f"transformers {transformers.__version__}" in text and f"torch {torch.__version__}" in text
    assert "instructkit" in text.split("Library versions:")[1].splitlines()[0]
    assert "Seed: 11" in text
    assert "| macro_f1 | 0.5123 | [0.4500, 0.5700] |" in text
    saved = json.loads((out / "instructkit_config.json").read_text())
    assert saved["train_config"] == {"seed": 11, "lr": 1e-4}
    assert saved["provenance"]["license_id"] == "gemma"


def test_update_model_card_metrics_adds_the_table(tmp_path, tiny_llama, tiny_tokenizer):
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m",
                              card={"provenance": {"base_model": "x", "licence": "Apache-2.0",
                                                   "license_id": "apache-2.0"}}, train_config=None)
    assert "## Evaluation" not in (out / "README.md").read_text()
    update_model_card_metrics(out, [{"name": "accuracy", "value": 0.755, "ci": [0.695, 0.815]},
                                    {"name": "examples", "value": 200}])
    text = (out / "README.md").read_text()
    assert "| accuracy | 0.7550 | [0.6950, 0.8150] |" in text
    assert "| examples | 200 |  |" in text
    assert card_front_matter(out)["license"] == "apache-2.0"  # the rest of the card is unchanged
    saved = json.loads((out / "instructkit_config.json").read_text())
    assert saved["card"]["metrics"][0]["name"] == "accuracy"


def test_card_accepts_provenance_spread_at_top_level_and_report_rows(tmp_path, tiny_llama, tiny_tokenizer):
    rows = [{"name": "rating · macro_f1", "base": 0.1, "value": 0.5, "value_low": 0.4, "value_high": 0.6,
             "delta": 0.4, "ci_low": 0.3, "ci_high": 0.5, "n": 200}]
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m",
                              card={**GEMMA_PROVENANCE, "seed": 3, "metrics": rows}, train_config=None)
    assert card_front_matter(out)["license"] == "gemma"
    text = (out / "README.md").read_text()
    assert "| metric | base | value | 95% CI | change vs base [95% CI] | n |" in text
    assert ("| rating · macro_f1 | 0.1000 | 0.5000 | [0.4000, 0.6000] | +0.4000 [0.3000, 0.5000] | 200 |"
            in text)
    assert "Seed: 3" in text and "Q4_K_M" in text
    assert "# google/gemma-3-270m instruction-tuned with instructkit" in text  # not the base's short name


def test_update_metrics_of_a_foreign_folder_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="not a model saved by instructkit"):
        update_model_card_metrics(tmp_path, [])


def test_licence_files_travel_with_the_saved_model(tmp_path, tiny_llama, tiny_tokenizer):
    terms = tmp_path / "GEMMA_TERMS.html"
    terms.write_text("<html>terms</html>")
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m",
                              card={"provenance": {**GEMMA_PROVENANCE, "licence_files": [str(terms)]}},
                              train_config=None)
    assert (out / "GEMMA_TERMS.html").read_text() == "<html>terms</html>"
    assert "GEMMA_TERMS.html" in (out / "README.md").read_text()


# --------------------------------------------------------------------------------------------------
# The model-index in the card's YAML header
# --------------------------------------------------------------------------------------------------

REPORT_ROWS = [  # the shape of evaluate.compare.model_card_rows
    {"name": "rating · macro_f1", "template": "rating", "metric": "macro_f1", "section": "seen",
     "base": 0.21, "tuned": 0.55, "value": 0.55, "value_low": 0.5, "value_high": 0.6, "delta": 0.34,
     "ci_low": 0.28, "ci_high": 0.4, "significant": True, "n": 200},
    {"name": "rating · accuracy", "template": "rating", "metric": "accuracy", "section": "seen",
     "base": 0.3, "tuned": 0.6, "value": 0.6, "value_low": 0.53, "value_high": 0.67, "delta": 0.3,
     "ci_low": 0.22, "ci_high": 0.38, "significant": True, "n": 200},
    {"name": "summary · rougeL", "template": "summary", "metric": "rougeL", "section": "unseen",
     "base": 0.12, "tuned": 0.25, "value": 0.25, "value_low": 0.2, "value_high": 0.3, "delta": 0.13,
     "ci_low": 0.08, "ci_high": 0.18, "significant": True, "n": 50},
]


def test_model_index_holds_base_and_tuned_values_per_template(tmp_path, tiny_llama, tiny_tokenizer):
    from huggingface_hub import ModelCard

    card = {"provenance": GEMMA_PROVENANCE,
            "data_sources": [{"name": "amazon_fine_food", "licence": "CC0-1.0", "rows": 697}]}
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m", card=card, train_config=None)
    assert "model-index" not in card_front_matter(out)  # no metrics yet
    update_model_card_metrics(out, REPORT_ROWS)

    text = (out / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "gemma" and front["base_model"] == "google/gemma-3-270m"
    assert front["datasets"] == ["amazon_fine_food"]
    (index,) = front["model-index"]
    by_template = {result["dataset"]["config"]: result for result in index["results"]}
    assert set(by_template) == {"rating", "summary"}
    for row in REPORT_ROWS:
        result = by_template[row["template"]]
        assert result["task"]["type"] == "text-generation" and result["dataset"]["split"] == "test"
        metrics = {m["name"]: (m["type"], m["value"]) for m in result["metrics"]}
        assert metrics[f"{row['metric']} (base)"] == (row["metric"], row["base"])
        assert metrics[f"{row['metric']} (tuned)"] == (row["metric"], row["tuned"])

    loaded = ModelCard.load(out / "README.md")  # huggingface_hub's parser reads the same values back
    assert loaded.data.license == "gemma" and loaded.data.base_model == "google/gemma-3-270m"
    got = {(r.dataset_config, r.metric_type, r.metric_name): r.metric_value for r in loaded.data.eval_results}
    expected = {}
    for row in REPORT_ROWS:
        expected[(row["template"], row["metric"], f"{row['metric']} (base)")] = row["base"]
        expected[(row["template"], row["metric"], f"{row['metric']} (tuned)")] = row["tuned"]
    assert got == expected
    assert ("| rating · macro_f1 | 0.2100 | 0.5500 | [0.5000, 0.6000] | +0.3400 [0.2800, 0.4000] | 200 |"
            in text)


def test_model_index_of_plain_rows_leaves_out_missing_values(tmp_path, tiny_llama, tiny_tokenizer):
    from huggingface_hub import ModelCard

    rows = [{"name": "accuracy", "value": 0.755, "ci": [0.695, 0.815]}, {"name": "examples", "value": 200},
            {"name": "perplexity", "value": float("nan")}, {"name": "bleu", "value": None}]
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m",
                              card={"provenance": {"base_model": "org/base", "licence": "Custom terms"},
                                    "metrics": rows}, train_config=None)
    front = card_front_matter(out)
    assert front["license"] == "other" and front["license_name"] == "Custom terms"
    assert front["base_model"] == "org/base" and front["pipeline_tag"] == "text-generation"
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert {m["name"]: m["value"] for m in metrics} == {"accuracy": 0.755, "examples": 200}
    loaded = ModelCard.load(out / "README.md")
    assert {r.metric_name: r.metric_value for r in loaded.data.eval_results} == {"accuracy": 0.755,
                                                                                  "examples": 200}
    assert "| perplexity | nan |  |" in (out / "README.md").read_text()  # the table still shows it


@pytest.mark.parametrize("base", ["folder", "gguf-path", "gguf-name"])
def test_card_metadata_names_no_local_path_as_base_model_or_dataset(base, tmp_path, tiny_model_dir, tiny_llama,
                                                                    tiny_tokenizer):
    """transformers#28286 (PR#28482), autotrain-advanced#648: the Hub refuses a card whose base_model or datasets
    entry is a local path ('"datasets[0]" with value "/var/hf/images/" is not valid'). A model tuned from a local
    folder carried base_model: /abs/path/to/it, one from a .gguf file its path (or file name, in a cache
    converted earlier), data given by path datasets: [/data/x.csv]. The metadata now holds Hub ids only; the
    card's text still names them all."""
    from huggingface_hub import ModelCard

    if base == "folder":
        loaded = load_model(ModelConfig(name=str(tiny_model_dir)))
        assert loaded.provenance.get("base_model") is None  # resolve no longer records the path as one
        provenance, where = loaded.provenance, str(tiny_model_dir)
    else:
        where = "/models/smol.Q8_0.gguf" if base == "gguf-path" else "smol.Q8_0.gguf"
        provenance = {"name": where, "base_model": where, "licence": "unknown (see the GGUF's source)"}
    sources = [{"name": "/data/x.csv", "path": "/data/x.csv"}, {"name": "train.csv", "path": "train.csv"},
               {"name": "org/reviews", "path": "/data/reviews.jsonl"}]
    out = save_instruct_model(tiny_llama, tiny_tokenizer, tmp_path / "m",
                              card={"provenance": provenance, "data_sources": sources}, train_config=None)
    front = card_front_matter(out)
    assert "base_model" not in front
    assert front["datasets"] == ["org/reviews"]
    text = (out / "README.md").read_text()
    assert f"- Base model: `{where}`" in text and "| /data/x.csv |" in text and "| train.csv |" in text
    assert ModelCard.load(out / "README.md").data.base_model is None

