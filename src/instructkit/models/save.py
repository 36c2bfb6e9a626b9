"""Save the instruct model atomically (temporary folder beside it, then rename) with its model card.

The folder loads with plain `AutoModelForCausalLM.from_pretrained(folder)`, no instructkit needed, under
transformers 5 and 4 alike (compat.add_legacy_fields).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

from instructkit.io import atomic_open, fsync_dir, replace_folder, temp_folder_beside, write_json
from instructkit.models.card import CONFIG_FILE, card_provenance, render_model_card
from instructkit.models.compat import add_legacy_fields
from instructkit.models.generation import configure_generation
from instructkit.models.lora import is_peft_model, pin_base_path
from instructkit.models.lora import merge_lora as merge_adapter


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("instructkit", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def unwrap_model(model: Any) -> Any:
    """The model inside torch.compile's wrapper (`_orig_mod`) and DDP / DataParallel / FSDP (`module`), however
    nested (accelerate's `extract_model_from_parallel`, repeated until nothing is left to unwrap; one call
    leaves a compiled model inside DataParallel). Saved wrapped, a compiled peft model was not recognised as
    one: its adapter alone was written under a record saying merged (no config.json, no weights to load); a
    DDP model had no config (pytorch#101107, nanoGPT#325: `_orig_mod.` / `module.` key prefixes)."""
    from accelerate.utils import extract_model_from_parallel

    while (inner := extract_model_from_parallel(model, keep_torch_compile=False)) is not model:
        model = inner
    return model


def save_instruct_model(model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, card: dict[str, Any],
                        train_config: dict[str, Any] | None, merge_lora: bool = True) -> Path:
    """Save the tuned model to `out_dir` atomically (temporary folder beside it, then rename).

    Writes: config.json + model.safetensors (or, for a peft model with merge_lora=False, the adapter alone:
    adapter_config.json + adapter_model.safetensors), the tokenizer, generation_config.json (EOS plus the
    chat template's end-of-turn token; pad), README.md (model card), instructkit_config.json, and the base
    model's licence files.

    `card` keys (all optional): provenance (LoadedModel.provenance: base model, licence, GGUF sha256,
    dequantized-from note; its keys may also be spread at the card's top level), title, run, description,
    data_sources (list of {name, licence, path, rows}), seed (default: train_config["seed"]), metrics (rows
    {name, value, ci: [lo, hi]} or evaluate.compare.model_card_rows), tags.

    config.json and tokenizer_config.json also carry transformers 4.x's names for their settings
    (compat.add_legacy_fields): loaded with 4.x the model has the same RoPE base, hence the same outputs.
    A model wrapped by torch.compile or DDP is saved as the model inside (`unwrap_model`).
    An adapter saved alone names its base by an absolute path where the base was loaded from a local path
    (`lora.pin_base_path`; instructkit_config.json's provenance "requested" likewise, `resolve_model`).
    A peft model with merge_lora=True is merged in place (`lora.merge_lora`): its base weights then hold the
    adapter, so it can be evaluated as the saved model but not trained further as LoRA. An adapter on a tied
    LM head or input embedding unties them (both saved, config tie_word_embeddings false).
    Raises: OSError when writing fails; `out_dir` then keeps its previous content.
    """
    out_dir = Path(out_dir)
    model = unwrap_model(model)
    adapter_only = False
    if is_peft_model(model):
        if merge_lora:
            model = merge_adapter(model)
        else:
            adapter_only = True
            pin_base_path(model)
    configure_generation(model, tokenizer)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    card = {**card, "seed": card.get("seed", (train_config or {}).get("seed"))}
    record = {
        "format": 1,
        "adapter_only": adapter_only,
        "seq2seq": seq2seq,
        "card": card,
        "provenance": card_provenance(card),
        "train_config": train_config,
        "versions": library_versions(),
    }

    tmp = temp_folder_beside(out_dir)
    template = getattr(tokenizer, "chat_template", None)
    system_prompt = ((train_config or {}).get("model") or {}).get("system_prompt")
    try:
        model.save_pretrained(tmp)
        tokenizer.chat_template = with_default_system(tokenizer, system_prompt)
        tokenizer.save_pretrained(tmp)
        add_legacy_fields(tmp)  # transformers 4.x reads the same model (rope_theta, tokenizer class)
        if adapter_only and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        for path in record["provenance"].get("licence_files") or []:
            if Path(path).is_file():
                shutil.copy2(path, tmp / Path(path).name)
        write_json(tmp / CONFIG_FILE, record)
        with atomic_open(tmp / "README.md") as handle:
            handle.write(render_model_card(record))
        fsync_dir(tmp)
        return replace_folder(tmp, out_dir, keep_existing=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if template is not None:
            tokenizer.chat_template = template


def with_default_system(tokenizer: Any, system_prompt: str | None) -> str | None:
    """The chat template to save: the tokenizer's, adding `system_prompt` as the first turn of a conversation
    that has no system turn, as training did (model.system_prompt), so that plain transformers'
    apply_chat_template gives the prompts the model was tuned on. Unchanged without a system prompt, for a
    template that does not render system turns (training then folded it into the first user turn; the
    model card says so), or for several named templates (a dict)."""
    from instructkit.data.chat_template import template_features

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or system_prompt is None or not template_features(tokenizer).system:
        return template
    literal = json.dumps(system_prompt, ensure_ascii=False)  # a valid Jinja string literal, escapes and all
    return ("{%- if not (messages and messages[0]['role'] == 'system') %}{%- set messages = [{'role': 'system', "
            f"'content': {literal}}}] + messages %}}{{%- endif %}}" + template)
