"""Chat templates and tokenizers for the chat tests: offline tiny ones, and the real SmolLM2 / Gemma-3 ones
when their packages (or instructkit's converted cache) are present."""

from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import build_tiny_tokenizer

# Gemma-3's chat template as shipped with google/gemma-3-*-it (system folded into the first user turn,
# strict user/model alternation, `model` for the assistant, <end_of_turn> closing every turn).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# A plain `role: content` template: no special token closes the assistant turn.
ROLE_CONTENT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Phi-3-mini-4k-instruct's chat template: <|end|> closes every turn, and EOS follows the last message when no
# generation prompt is asked for (the end of the conversation).
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def tiny_phi3():
    return tiny_with_template(PHI3_TEMPLATE, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


# ChatML with tools in the Qwen2.5 manner: specs in the system turn, calls as <tool_call>, answers as
# <tool_response> in a user turn.
TOOLS_CHATML_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% endif %}{{ '# Tools\\n<tools>\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') -%}"
    "{{ '<|im_start|>assistant\\n' }}{% for c in m['tool_calls'] %}{{ '<tool_call>' }}{{ c['function'] | tojson }}"
    "{{ '</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{ '<|im_start|>user\\n<tool_response>' + m['content'] + '</tool_response><|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# ChatML that drops the reasoning (<think>...</think>) of every assistant turn but the last one, like the
# reasoning models' templates: NOT prefix-stable.
THINK_DROPPING_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and not loop.last -%}"
    "{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1].lstrip() + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


# DeepSeek-R1-Distill's chat template (deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B, tokenizer_config.json), its
# tool parts left out, eos_token for its literal <｜end▁of▁sentence｜>: the generation prompt opens the
# reasoning block ("<｜Assistant｜><think>\\n") and every assistant turn is rendered without its reasoning.
DEEPSEEK_R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + eos_token }}"
    "{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def tiny_deepseek_r1():
    tokenizer = tiny_with_template(DEEPSEEK_R1_TEMPLATE, "<｜User｜>", "<｜Assistant｜>")
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


# Qwen3's chat template, its tool parts left out: an assistant turn's reasoning (`reasoning_content`, or a
# <think> block at the start of its content) is written as <think>...</think> for the turns after the last
# user turn and dropped from earlier ones; the last turn without reasoning gets an empty <think> block.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}\n"
    '{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n'
    '{%- for message in messages[::-1] %}\n'
    '    {%- set index = (messages|length - 1) - loop.index0 %}\n'
    '    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith(\'<tool_response>\') and message.content.endswith(\'</tool_response>\')) %}\n'
    '        {%- set ns.multi_step_tool = false %}\n'
    '        {%- set ns.last_query_index = index %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- for message in messages %}\n'
    "    {%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set reasoning_content = '' %}\n"
    '        {%- if message.reasoning_content is string %}\n'
    '            {%- set reasoning_content = message.reasoning_content %}\n'
    '        {%- else %}\n'
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    '            {%- endif %}\n'
    '        {%- endif %}\n'
    '        {%- if loop.index0 > ns.last_query_index %}\n'
    '            {%- if loop.last or (not loop.last and reasoning_content) %}\n'
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    '            {%- else %}\n'
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    '            {%- endif %}\n'
    '        {%- else %}\n'
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    '        {%- endif %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '    {%- if enable_thinking is defined and enable_thinking is false %}\n'
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}'
)


def tiny_qwen3():
    """The tiny tokenizer with Qwen3's template; <think> and </think> are added tokens, not special, as in Qwen3."""
    tokenizer = tiny_with_template(QWEN3_TEMPLATE)
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def tiny_with_template(template: str, *extra_special: str):
    """The tiny ChatML tokenizer of conftest with another chat template (and extra special tokens)."""
    tokenizer = build_tiny_tokenizer()
    if extra_special:
        tokenizer.add_tokens(list(extra_special), special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


def tiny_gemma3():
    return tiny_with_template(GEMMA3_TEMPLATE, "<start_of_turn>", "<end_of_turn>")


def real_tokenizer(name: str, template: str | None = None):
    """The tokenizer of registry model `name`: from instructkit's converted cache, else read from the GGUF
    of its installed package; skipped (with the install command) when neither is there. A tokenizer
    without a chat template gets `template` (skipped when None)."""
    from transformers import AutoTokenizer

    from instructkit.models.gguf_cache import default_cache_dir
    from instructkit.models.registry import MODEL_REGISTRY, missing_modules, registry_folder

    spec = MODEL_REGISTRY[name]
    folder = registry_folder(spec, default_cache_dir(), convert=False)
    if folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif missing_modules(spec) or spec.locate != "package_file":
        pytest.skip(f"the {name} tokenizer is not available (not converted in {default_cache_dir()} and its "
                    f"package is not installed): {spec.install}")
    else:
        package = importlib.util.find_spec(spec.module).submodule_search_locations[0]
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=spec.gguf_file)
    if not tokenizer.chat_template:
        if template is None:
            pytest.skip(f"the {name} tokenizer has no chat template")
        tokenizer.chat_template = template
    return tokenizer


_BLOCK = re.compile(r"<\|im_start\|>(system|user|assistant|tool)\n(.*?)<\|im_end\|>\n?", re.DOTALL)


def parse_chatml(text: str) -> list[dict]:
    """The turns of a ChatML text, which must consist of whole `<|im_start|>role\\n...<|im_end|>` blocks.

    Raises AssertionError naming the first stray text (a cut header, a special token glued to a text).
    """
    turns, at = [], 0
    for match in _BLOCK.finditer(text):
        assert match.start() == at, f"stray text before a turn: {text[at:match.start()]!r}"
        assert "<|im_start|>" not in match.group(2), f"a turn holds a turn header: {match.group(0)!r}"
        turns.append({"role": match.group(1), "content": match.group(2)})
        at = match.end()
    assert at == len(text), f"stray text after the last turn: {text[at:]!r}"
    return turns


def label_spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of every run of labelled (not -100) positions."""
    spans, start = [], None
    for k, value in enumerate([*labels, -100]):
        if value != -100 and start is None:
            start = k
        elif value == -100 and start is not None:
            spans.append((start, k))
            start = None
    return spans
