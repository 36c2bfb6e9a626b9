"""The model card of a saved instruct model: README.md with Hugging Face metadata, and its metrics.

The card is a `huggingface_hub.ModelCard`. Its YAML header (`ModelCardData`) holds license (license_name
when the licence has no Hub identifier), base_model, library_name (peft for an adapter saved alone),
pipeline_tag (text2text-generation for seq2seq), tags, datasets (the data sources' names) and, once there
are metrics, a `model-index` with base and tuned values per template. base_model and datasets hold only
names of Hub repository form (`hub_id`): the Hub refuses a card whose base_model or datasets entry is a
local path (transformers#28286, autotrain-advanced#648), so a model tuned from a folder or a .gguf file, or
on a CSV file, names it in the card's text only:

    model-index:
    - name: <the card's title>
      results:
      - task: {type: text-generation, name: <report section>}
        dataset: {name: held-out test split, template <tid>, type: <sources>, config: <tid>, split: test}
        metrics:
        - {type: macro_f1, name: macro_f1 (base), value: 0.41}
        - {type: macro_f1, name: macro_f1 (tuned), value: 0.55}

A row without a base value ({name, value, ci}) gives one metric named as the row. Missing and non-finite
values stay out of the model-index (the table still shows them). The body is markdown: base model and
licence, training data, training, the evaluation table with 95% intervals, and how to load the model.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

from instructkit.errors import ModelError
from instructkit.io import atomic_open, write_json

CONFIG_FILE = "instructkit_config.json"  # card + training config + provenance, inside a saved model

PROVENANCE_KEYS = ("name", "base_model", "licence", "license_id", "instruct", "package", "gguf_file",
                   "gguf_sha256", "dequantized_from", "licence_files", "requested", "folder", "kind")


def card_provenance(card: dict[str, Any]) -> dict[str, Any]:
    """card["provenance"], or the provenance keys spread at the card's top level (`{**loaded.provenance}`)."""
    if card.get("provenance"):
        return dict(card["provenance"])
    return {k: card[k] for k in PROVENANCE_KEYS if k in card}


def update_model_card_metrics(out_dir: str | os.PathLike, metrics_rows: list[dict[str, Any]]) -> None:
    """Put `metrics_rows` ({name, value, ci}, or `evaluate.compare.model_card_rows`) into a saved model's
    card: its metrics table and its model-index.

    README.md and instructkit_config.json are each rewritten atomically.
    Raises: ModelError when `out_dir` holds no instructkit_config.json (not saved by instructkit).
    """
    out_dir = Path(out_dir)
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{out_dir} is not a model saved by instructkit (no {CONFIG_FILE})")
    record = json.loads(path.read_text(encoding="utf-8"))
    record["card"]["metrics"] = list(metrics_rows)
    write_json(path, record)
    with atomic_open(out_dir / "README.md") as handle:
        handle.write(render_model_card(record))


def render_model_card(record: dict[str, Any]) -> str:
    """README.md: the Hub metadata (`card_metadata`) + provenance, data, training, metrics, usage."""
    from huggingface_hub import ModelCard

    card, prov = record["card"], record.get("provenance") or {}
    adapter_only, seq2seq = record.get("adapter_only", False), record.get("seq2seq", False)
    lines = [f"# {card_title(record)}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    lines += model_card_provenance(prov)
    lines += model_card_data(card.get("data_sources") or [])
    lines += model_card_training(record)
    lines += model_card_metrics(card.get("metrics") or [])
    lines += model_card_usage(adapter_only, seq2seq)
    lines += model_card_prompting((record.get("train_config") or {}).get("model") or {})
    body = "\n".join(lines).rstrip() + "\n"
    return str(ModelCard(f"---\n{card_metadata(record).to_yaml()}\n---\n\n{body}"))


def card_base_model(prov: dict[str, Any]) -> str:
    return prov.get("base_model") or prov.get("name") or "unknown"


def card_title(record: dict[str, Any]) -> str:
    card = record["card"]
    base_model = card_base_model(record.get("provenance") or {})
    title = card.get("title") or f"{base_model} instruction-tuned with instructkit"
    if card.get("run"):
        title += f" (run {card['run']})"
    return title


def card_metadata(record: dict[str, Any]) -> Any:
    """The card's YAML header as a `huggingface_hub.ModelCardData` (see the module docstring)."""
    from huggingface_hub import ModelCardData

    card, prov = record["card"], record.get("provenance") or {}
    seq2seq = record.get("seq2seq", False)
    pipeline_tag = "text2text-generation" if seq2seq else "text-generation"
    license_id = prov.get("license_id") or "other"
    sources = [str(s.get("name")) for s in card.get("data_sources") or [] if s.get("name")]
    results = eval_results(card.get("metrics") or [], task_type=pipeline_tag,
                           dataset_type="+".join(sources) or "unknown")
    hub_sources = [name for name in sources if hub_id(name)]
    return ModelCardData(
        license=license_id,
        license_name=str(prov["licence"]) if license_id == "other" and prov.get("licence") else None,
        base_model=hub_id(prov.get("base_model")),
        library_name="peft" if record.get("adapter_only", False) else "transformers",
        pipeline_tag=pipeline_tag,
        tags=["instructkit", "instruction-tuning",
              *[t for t in card.get("tags", []) if t not in ("instructkit", "instruction-tuning")]],
        datasets=hub_sources or None,
        model_name=card_title(record) if results else None,
        eval_results=results or None,
    )


FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")


def hub_id(name: Any) -> str | None:
    """`name` when it has the form of a Hub repository id (`huggingface_hub.utils.validate_repo_id`: `name` or
    `namespace/name`, letters, digits and - _ . only) and is no model or data file's name (FILE_SUFFIXES),
    else None: an absolute or ./relative path, a Windows path, a path of more than two parts, model.gguf."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str) or not name or name.lower().endswith(FILE_SUFFIXES):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def metric_number(value: Any) -> int | float | None:
    """A metric value fit for the model-index: a plain int or a finite float; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if math.isfinite(float(value)) else None


def eval_results(rows: list[dict[str, Any]], *, task_type: str, dataset_type: str) -> list[Any]:
    """Metrics rows as `huggingface_hub.EvalResult`s: a row with a base value gives "<metric> (base)" and
    "<metric> (tuned)"; other rows give one result named as the row. One model-index entry per template
    (dataset config = template id); rows without a number are left out."""
    from huggingface_hub import EvalResult

    results = []
    for row in rows:
        template = row.get("template")
        dataset_name = f"held-out test split, template {template}" if template else "held-out test split"
        if "base" in row:
            metric = str(row.get("metric") or row.get("name", "?"))
            tuned = row.get("tuned", row.get("value"))
            values = [(f"{metric} (base)", row["base"]), (f"{metric} (tuned)", tuned)]
        else:
            metric = str(row.get("name", "?"))
            values = [(metric, row.get("value"))]
        for name, value in values:
            number = metric_number(value)
            if number is None:
                continue
            results.append(EvalResult(
                task_type=task_type, task_name=row.get("section") or None,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_config=str(template) if template else None, dataset_split="test",
                metric_type=metric, metric_name=name, metric_value=number,
            ))
    return results


def model_card_provenance(prov: dict[str, Any]) -> list[str]:
    lines = ["## Base model and licence", ""]
    lines.append(f"- Base model: `{prov.get('base_model') or prov.get('name') or 'unknown'}`")
    lines.append(f"- Licence of the base model: {prov.get('licence') or 'unknown'}")
    if prov.get("license_id") == "gemma":
        lines.append("- Gemma is provided under and subject to the Gemma Terms of Use found at "
                     "https://ai.google.dev/gemma/terms; this model is a derivative and the same terms "
                     "apply.")
    if prov.get("dequantized_from"):
        lines.append(f"- Starting weights: {prov['dequantized_from']}")
    if prov.get("gguf_sha256"):
        lines.append(f"- GGUF file: `{prov.get('gguf_file', '?')}`, sha256 `{prov['gguf_sha256']}`")
    files = [Path(f).name for f in prov.get("licence_files") or []]
    if files:
        lines.append(f"- Licence files shipped in this folder: {', '.join(files)}")
    return lines + [""]


def model_card_data(sources: list[dict[str, Any]]) -> list[str]:
    if not sources:
        return ["## Training data", "", "Not recorded.", ""]
    lines = ["## Training data", "", "| source | licence | rows | path |", "|---|---|---|---|"]
    for src in sources:
        lines.append(f"| {src.get('name', '?')} | {src.get('licence') or src.get('license') or 'unknown'} "
                     f"| {src.get('rows', '')} | {src.get('path', '')} |")
    return lines + [""]


def model_card_training(record: dict[str, Any]) -> list[str]:
    card, versions = record["card"], record.get("versions") or {}
    lines = ["## Training", ""]
    lines.append(f"- Seed: {card.get('seed')}")
    if record.get("adapter_only"):
        lines.append("- Saved as a LoRA adapter alone (apply it to the base model with peft).")
    lines.append("- Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(f"- Full training configuration: `{CONFIG_FILE}`")
    return lines + [""]


def format_metric_value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def interval(low: Any, high: Any) -> str:
    return f"[{format_metric_value(low)}, {format_metric_value(high)}]" if low is not None else ""


def metric_row_cells(row: dict[str, Any]) -> dict[str, str]:
    """One metrics row as table cells. Accepts {name, value, ci: [lo, hi]} and the report's rows
    ({name, base, value, value_low, value_high, delta, ci_low, ci_high, n})."""
    ci = row.get("ci") or (row.get("value_low"), row.get("value_high"))
    cells = {"metric": str(row.get("name", "?")), "value": format_metric_value(row.get("value")),
             "95% CI": interval(*ci)}
    if "base" in row:
        cells["base"] = format_metric_value(row["base"])
    if "delta" in row:
        delta = f"{row['delta']:+.4f}" if isinstance(row["delta"], float) else str(row["delta"])
        change_ci = interval(row.get("ci_low"), row.get("ci_high"))
        cells["change vs base [95% CI]"] = f"{delta} {change_ci}".strip()
    if "n" in row:
        cells["n"] = str(row["n"])
    return cells


def model_card_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics table: metric | value | 95% CI, plus base / change / n columns when rows carry them."""
    if not rows:
        return []
    cells = [metric_row_cells(row) for row in rows]
    order = ["metric", "base", "value", "95% CI", "change vs base [95% CI]", "n"]
    columns = [c for c in order if any(c in row for row in cells)]
    lines = ["## Evaluation", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in cells]
    return lines + [""]


def model_card_usage(adapter_only: bool, seq2seq: bool) -> list[str]:
    """The card's loading code. An adapter saved alone loads with peft's AutoPeftModelFor<task> (the
    seq2seq one for T5: the causal one refuses a seq2seq adapter), then takes the saved generation config:
    peft loads the base model's, whose stop tokens may lack the chat template's end-of-turn (a base tuned on
    ChatML stops at <|im_end|>), so a plain-peft generate ran past the answer (cf. LlamaFactory#7943: the
    full fine-tune stopped, the LoRA did not)."""
    auto = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM"
    if adapter_only:
        peft_auto = "AutoPeftModelForSeq2SeqLM" if seq2seq else "AutoPeftModelForCausalLM"
        code = [f"from peft import {peft_auto}", "from transformers import AutoTokenizer, GenerationConfig", "",
                f'model = {peft_auto}.from_pretrained("PATH")',
                "# the stop tokens it was tuned with (peft keeps the base model's generation config)",
                'model.generation_config = GenerationConfig.from_pretrained("PATH")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    else:
        code = [f"from transformers import {auto}, AutoTokenizer", "",
                f'model = {auto}.from_pretrained("PATH")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    return ["## Loading", "", "```python", *code, "```", ""]


def model_card_prompting(model: dict[str, Any]) -> list[str]:
    """How the model was prompted in training: its chat template and system prompt (models/save.py);
    nothing when the record does not say (a model saved without its run's settings)."""
    if "chat_template" not in model:
        return []
    if not model["chat_template"]:
        return ["## Prompting", "", "Tuned on plain prompts (no chat template): send the prompt text as it is.", ""]
    lines = ["## Prompting", "", ("Tuned on conversations rendered by the saved chat template: use "
                                  "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.")]
    system = model.get("system_prompt")
    if system is not None:
        lines += ["", (f"Every conversation without a system turn was trained with the system prompt {system!r}; "
                       "the saved chat template adds it to such conversations (when the template renders system "
                       "turns; otherwise put it first yourself).")]
    return [*lines, ""]


def data_sources(datasets: list[Any]) -> list[dict]:
    """The model card's data sources: name, path, schema and licence (from a SOURCE.txt beside the data) of
    each configured dataset (`RunConfig.datasets`)."""
    sources = []
    for entry in datasets:
        path = entry.path or next(iter((entry.files or entry.parallel or {}).values()), None)
        licence = ""
        if path == "demo":
            licence = "Apache-2.0 (written for instructkit)"
        elif path:
            source_txt = Path(path).parent / "SOURCE.txt" if Path(path).is_file() else Path(path) / "SOURCE.txt"
            if source_txt.is_file():
                for line in source_txt.read_text(errors="replace").splitlines():
                    if line.lower().startswith("license"):
                        licence = line.split(":", 1)[-1].strip()
                        break
        sources.append({"name": entry.name or entry.schema_name or str(path), "path": str(path),
                        "schema": entry.schema_name, "licence": licence or "see the data's own terms"})
    return sources
