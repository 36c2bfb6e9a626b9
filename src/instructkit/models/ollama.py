"""An Ollama `Modelfile` for an exported GGUF: FROM, the chat TEMPLATE, stop tokens, default parameters.

    ollama create my-model -f Modelfile

Ollama templates are Go `text/template`, not Jinja. The tokenizer's Jinja chat template is recognised by
rendering it on probe conversations and comparing with each known family's rendering (`FAMILIES`):

- ChatML (SmolLM2, Qwen2): `<|im_start|>role\\ncontent<|im_end|>\\n`; a system message the Jinja template
  adds by itself when none is given (SmolLM2's) becomes the Modelfile's SYSTEM;
- Gemma: `<start_of_turn>user\\n...<end_of_turn>\\n`, the assistant as `model`, a system message put in
  front of the first user turn. BOS is not in the TEMPLATE: llama.cpp adds it (tokenizer.ggml.add_bos_token).

Any other template gets no TEMPLATE line: Ollama then picks one from the GGUF's `tokenizer.chat_template`.
A model tuned without a chat template gets `{{ .Prompt }}`: the prompt goes in as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.data.tokenize import TokenizeSettings, stop_token_ids

logger = logging.getLogger(__name__)

MODELFILE = "Modelfile"
PROBE_SYSTEM = "SYSTEM-3141"
PROBE = [
    {"role": "system", "content": PROBE_SYSTEM},
    {"role": "user", "content": "USER-2718"},
    {"role": "assistant", "content": "ASSISTANT-1618"},
    {"role": "user", "content": "USER-1414"},
]

CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

GEMMA_TEMPLATE = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""


def render_chatml(messages: list[dict[str, str]], bos: str) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def render_gemma(messages: list[dict[str, str]], bos: str) -> str:
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    out = []
    for i, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{m['content'].strip()}<end_of_turn>\n")
    return bos + "".join(out) + "<start_of_turn>model\n"


@dataclass(frozen=True)
class Family:
    """A chat format: its rendering in Python (to recognise the Jinja template) and its Go template."""

    name: str
    render: Callable[[list[dict[str, str]], str], str]
    template: str


FAMILIES = (Family("chatml", render_chatml, CHATML_TEMPLATE), Family("gemma", render_gemma, GEMMA_TEMPLATE))


@dataclass
class ChatFormat:
    family: Family | None
    default_system: str | None = None


def modelfile_path(gguf_path: str | Path) -> Path:
    """Where the Modelfile of `gguf_path` goes: beside it."""
    return Path(gguf_path).parent / MODELFILE


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe is no known family
        return None


def chat_format(tokenizer: Any) -> ChatFormat:
    """The family of the tokenizer's Jinja chat template, and the system message it adds by itself.

    Recognised when the template renders the probe conversation (system, user, assistant, user) exactly as
    the family does, and a lone user turn the same way or with one system turn put before it.
    """
    if not getattr(tokenizer, "chat_template", None):
        return ChatFormat(None)
    bos = tokenizer.bos_token or ""
    full, alone = _render(tokenizer, PROBE), _render(tokenizer, PROBE[1:2])
    for family in FAMILIES:
        if full != family.render(PROBE, bos) or alone is None:
            continue
        if alone == family.render(PROBE[1:2], bos):
            return ChatFormat(family)
        for_default = family.render([{"role": "system", "content": PROBE_SYSTEM}, PROBE[1]], bos)
        head, sep, tail = for_default.partition(PROBE_SYSTEM)
        if sep and alone.startswith(head) and alone.endswith(tail) and len(alone) >= len(head) + len(tail):
            return ChatFormat(family, alone[len(head):len(alone) - len(tail)])
    return ChatFormat(None)


def stop_strings(tokenizer: Any, config: Any) -> list[str]:
    """The special tokens generation stops at (EOS, the chat template's end-of-turn), as text."""
    gen_eos = getattr(config, "eos_token_id", None)
    try:
        ids = stop_token_ids(tokenizer, TokenizeSettings(chat_template=True), gen_eos)
    except ValueError:
        return []
    return [tok for tok in tokenizer.convert_ids_to_tokens(ids) if tok]


def _quoted(text: str) -> str | None:
    """`text` in Modelfile triple quotes; None when it holds triple quotes itself."""
    return None if '"""' in text else f'"""{text}"""'


def render_modelfile(tokenizer: Any, config: Any, gguf_path: str | Path,
                     provenance: dict[str, Any] | None = None, *, chat: bool = True,
                     system_prompt: str | None = None, num_ctx: int = 4096) -> str:
    """The Modelfile text for `gguf_path` (FROM is relative to the Modelfile, which sits beside it).

    `chat` and `system_prompt` are the run's `model.chat_template` and `model.system_prompt`: a model tuned
    on plain prompts (no chat template) gets TEMPLATE {{ .Prompt }}; the system prompt it was tuned with
    becomes SYSTEM. Parameters: temperature 0 and repeat_penalty 1 (greedy, as instructkit evaluates: Ollama's
    server default repeat_penalty 1.1 applied to every model whose Modelfile leaves it unset, ollama#17679, and
    penalizes its own answer at temperature 0 too), num_ctx min(`num_ctx`, the context length), one `stop`
    per stop token. The saved model's licence file, when there is one,
    goes in.
    """
    gguf_path = Path(gguf_path)
    fmt = chat_format(tokenizer) if chat else ChatFormat(None)
    lines = ["# Written by instructkit. Create the Ollama model with:",
             f"#   ollama create {gguf_path.stem.split('.')[0] or 'model'} -f {MODELFILE}",
             f"FROM ./{gguf_path.name}", ""]
    if not chat or not getattr(tokenizer, "chat_template", None):
        lines += ["# no chat template: the model was tuned on plain prompts, which go in as they are",
                  'TEMPLATE """{{ .Prompt }}"""']
    elif fmt.family is not None:
        lines += [f"# chat template: {fmt.family.name} (translated from the tokenizer's Jinja chat template)",
                  f"TEMPLATE {_quoted(fmt.family.template)}"]
        system = system_prompt if system_prompt is not None else fmt.default_system
        if system and _quoted(system):
            lines.append(f"SYSTEM {_quoted(system)}")
        elif system:  # Ollama's parser has no escapes: the value would end at its first triple quote
            logger.warning('Modelfile: the system prompt holds """, which a Modelfile cannot quote; no SYSTEM '
                           "written: give it with each request")
            lines.append('# the system prompt the model was tuned with holds """, which a Modelfile cannot '
                         "quote: give it as the system message of each request")
        elif system_prompt == "":  # trained with an empty system turn: not the template's default text
            lines.append("# trained with an empty system prompt: no SYSTEM (the template then writes none)")
    else:
        logger.warning("Modelfile: chat template not recognised (neither ChatML nor Gemma); no TEMPLATE "
                       "written, Ollama derives one from the GGUF's tokenizer.chat_template")
        lines.append("# no TEMPLATE: Ollama derives one from the GGUF's tokenizer.chat_template")
    lines.append("")
    for stop in stop_strings(tokenizer, config):
        lines.append(f'PARAMETER stop "{stop}"')
    context = getattr(config, "max_position_embeddings", None) or num_ctx
    lines += ["PARAMETER temperature 0", "PARAMETER repeat_penalty 1", f"PARAMETER num_ctx {min(num_ctx, int(context))}"]
    for path in (provenance or {}).get("licence_files") or []:
        path = Path(path)
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
        if text and _quoted(text):
            lines += ["", f"LICENSE {_quoted(text)}"]
            break
    return "\n".join(lines) + "\n"
