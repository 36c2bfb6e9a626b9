"""Tool calls (data/chat_template.py): `tools` reach a template that renders them; a template that does not
gets the documented plain rendering (specs in the system turn, calls as JSON, answers as tool or user
turns). Function calls are trained as assistant output, tool answers are masked."""

from __future__ import annotations

import json

import pytest
from _chat_helpers import TOOLS_CHATML_TEMPLATE, label_spans, real_tokenizer, tiny_gemma3, tiny_with_template
from conftest import CHATML, build_tiny_tokenizer

from instructkit.data.chat_encode import encode_conversation
from instructkit.data.chat_template import TemplateFeatures, template_features, tools_text

SPEC = {"name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": SPEC}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]
CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def render_ids(tokenizer, messages, **kw) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


def learned(tokenizer, encoded) -> list[str]:
    return [tokenizer.decode(encoded.input_ids[a:b]) for a, b in label_spans(encoded.labels)]


def test_template_features_are_probed_from_the_template():
    assert template_features(build_tiny_tokenizer()) == TemplateFeatures(system=True, tools=False,
                                                                         tool_calls=False, tool_role=True)
    assert template_features(tiny_with_template(TOOLS_CHATML_TEMPLATE)).native_tools
    assert template_features(tiny_gemma3()) == TemplateFeatures(system=True, tools=False, tool_calls=False,
                                                                tool_role=False)


def test_tools_reach_a_template_that_renders_them():
    tokenizer = tiny_with_template(TOOLS_CHATML_TEMPLATE)
    [encoded] = encode_conversation(tokenizer, CONVERSATION, TOOLS, max_length=4096)
    spans = label_spans(encoded.labels)
    assert len(spans) == 2
    for (start, _), i in zip(spans, (1, 3)):
        assert encoded.input_ids[:start] == render_ids(tokenizer, CONVERSATION[:i], tools=TOOLS,
                                                       add_generation_prompt=True)
    text = tokenizer.decode(encoded.input_ids)
    assert text.startswith("<|im_start|>system\n# Tools\n<tools>\n") and '"get_weather"' in text.split("</tools>")[0]
    call, answer = learned(tokenizer, encoded)
    assert call.startswith("<tool_call>") and call.endswith("</tool_call><|im_end|>")
    assert json.loads(call[len("<tool_call>"):-len("</tool_call><|im_end|>")]) == CALL["function"]
    assert answer == "It is 21 degrees in Paris.<|im_end|>"
    assert "<tool_response>" in text and not any("tool_response" in s for s in learned(tokenizer, encoded))


def test_template_without_tools_gets_the_documented_plain_rendering():
    tokenizer = build_tiny_tokenizer()
    [encoded] = encode_conversation(tokenizer, CONVERSATION, TOOLS, max_length=4096)
    assert tools_text(TOOLS) == ("You can call these functions (JSON Schema):\n" + json.dumps(SPEC) + "\n"
                                 'To call one, answer with only the JSON object {"name": <function name>, '
                                 '"arguments": {<arguments>}}.')
    assert tokenizer.decode(encoded.input_ids) == (
        f"<|im_start|>system\n{tools_text(TOOLS)}<|im_end|>\n"
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL_JSON}<|im_end|>\n"
        '<|im_start|>tool\n{"temperature": 21}<|im_end|>\n'
        "<|im_start|>assistant\nIt is 21 degrees in Paris.<|im_end|>")
    assert learned(tokenizer, encoded) == [f"{CALL_JSON}<|im_end|>", "It is 21 degrees in Paris.<|im_end|>"]
    # An existing system turn keeps its text, the specs follow it.
    [with_system] = encode_conversation(tokenizer, [{"role": "system", "content": "Be brief."}, *CONVERSATION],
                                        TOOLS, max_length=4096)
    assert tokenizer.decode(with_system.input_ids).startswith(
        f"<|im_start|>system\nBe brief.\n\n{tools_text(TOOLS)}<|im_end|>\n")


def test_template_refusing_the_tool_role_gets_tool_answers_as_user_turns():
    tokenizer = tiny_gemma3()  # Gemma-3: strict user/model alternation, no tool role, system folded into user
    [encoded] = encode_conversation(tokenizer, CONVERSATION, TOOLS, max_length=4096)
    text = tokenizer.decode(encoded.input_ids)
    assert text == (
        f"<s><start_of_turn>user\n{tools_text(TOOLS)}\n\nWhat is the weather in Paris?<end_of_turn>\n"
        f"<start_of_turn>model\n{CALL_JSON}<end_of_turn>\n"
        '<start_of_turn>user\nFunction result:\n{"temperature": 21}<end_of_turn>\n'
        "<start_of_turn>model\nIt is 21 degrees in Paris.<end_of_turn>")
    assert learned(tokenizer, encoded) == [f"{CALL_JSON}<end_of_turn>", "It is 21 degrees in Paris.<end_of_turn>"]


def test_parallel_calls_answers_are_one_user_turn_on_a_template_that_alternates_roles():
    """Two calls in one assistant turn, two tool answers in a row: Gemma-3 refuses two user turns in a row,
    so the answers become one user turn, each with its own "Function result:" line."""
    tokenizer = tiny_gemma3()
    paris = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    conversation = [CONVERSATION[0], {"role": "assistant", "content": "", "tool_calls": [CALL, paris]},
                    {"role": "tool", "content": '{"temperature": 21}'}, {"role": "tool", "content": '{"temperature": 25}'},
                    {"role": "assistant", "content": "21 in Paris, 25 in Rome."}]
    [encoded] = encode_conversation(tokenizer, conversation, TOOLS, max_length=4096)
    text = tokenizer.decode(encoded.input_ids)
    assert ('<start_of_turn>user\nFunction result:\n{"temperature": 21}\nFunction result:\n{"temperature": 25}'
            "<end_of_turn>\n<start_of_turn>model\n21 in Paris, 25 in Rome.<end_of_turn>") in text
    rome = CALL_JSON.replace("Paris", "Rome")
    assert learned(tokenizer, encoded) == [f"{CALL_JSON}\n{rome}<end_of_turn>", "21 in Paris, 25 in Rome.<end_of_turn>"]


def test_final_turn_with_text_and_calls_is_learned_as_the_template_renders_it():
    """Read from data, the final turn is flattened to text + call JSON; with a template that renders tool
    calls it is rebuilt, so the label is the template's own call format, not bare JSON."""
    from instructkit.data.chat import full_conversation, message_text

    tokenizer = tiny_with_template(TOOLS_CHATML_TEMPLATE)
    final = {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]}
    messages = full_conversation(CONVERSATION[:1], message_text(final), TOOLS)
    assert messages[-1] == final
    [encoded] = encode_conversation(tokenizer, messages, TOOLS, max_length=4096)
    expected = render_ids(tokenizer, [*CONVERSATION[:1], final], tools=TOOLS)
    assert encoded.input_ids == expected[:len(encoded.input_ids)]
    [answer] = learned(tokenizer, encoded)
    assert answer.startswith("<tool_call>") and answer.endswith("</tool_call><|im_end|>")  # this template's form


def test_template_that_drops_system_turns_gets_the_system_text_in_the_first_user_turn():
    template = CHATML.replace("{% for message in messages %}",
                              "{% for message in messages if message['role'] != 'system' %}")
    tokenizer = tiny_with_template(template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    [encoded] = encode_conversation(tokenizer, messages, max_length=4096)
    assert tokenizer.decode(encoded.input_ids) == (
        "<|im_start|>user\nBe brief.\n\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>")


def test_smollm2_renders_tool_conversations_in_the_plain_form():
    tokenizer = real_tokenizer("smollm2-135m-instruct")
    features = template_features(tokenizer)
    assert features.system and not features.tools and not features.native_tools
    [encoded] = encode_conversation(tokenizer, CONVERSATION, TOOLS, max_length=4096)
    assert learned(tokenizer, encoded) == [f"{CALL_JSON}<|im_end|>", "It is 21 degrees in Paris.<|im_end|>"]
    assert tokenizer.decode(encoded.input_ids).startswith(f"<|im_start|>system\n{tools_text(TOOLS)}<|im_end|>")


def test_function_call_turn_without_a_final_answer_is_trained():
    tokenizer = build_tiny_tokenizer()
    [encoded] = encode_conversation(tokenizer, CONVERSATION[:2], TOOLS, max_length=4096)
    assert learned(tokenizer, encoded) == [f"{CALL_JSON}<|im_end|>"]


# DeepSeek-V3's way with tool calls: the arguments are concatenated as a string (its template fails on an
# object), between its own call markers.
DEEPSEEK_TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<tools>' }}{% for t in tools %}{{ t | tojson }}{% endfor %}{{ '</tools>' }}{% endif %}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ '<|User|>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' and m['tool_calls'] -%}{{ '<|Assistant|>' }}{%- for tool in m['tool_calls'] -%}"
    "{{ '<|tool_call_begin|>' + tool['type'] + '<|tool_sep|>' + tool['function']['name'] + '\\n```json\\n' + "
    "tool['function']['arguments'] + '\\n```<|tool_call_end|>' }}{%- endfor -%}{{ '<|end_of_sentence|>' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ '<|Assistant|>' + m['content'] + '<|end_of_sentence|>' }}"
    "{%- elif m['role'] == 'tool' -%}{{ '<|tool_output_begin|>' + m['content'] + '<|tool_output_end|>' }}"
    "{%- endif -%}{%- endfor -%}{% if add_generation_prompt %}{{ '<|Assistant|>' }}{% endif %}")
DEEPSEEK_SPECIAL = ("<|User|>", "<|Assistant|>", "<|tool_call_begin|>", "<|tool_sep|>", "<|tool_call_end|>",
                    "<|end_of_sentence|>", "<|tool_output_begin|>", "<|tool_output_end|>")


@pytest.mark.parametrize("printed", [False, True], ids=["concatenated", "printed"])
def test_template_that_takes_arguments_as_json_text_gets_them_so(printed):
    """transformers#45419, Qwen3-Coder#444: templates disagree on a call's arguments, an object or its JSON
    text (OpenAI's wire form). A template that concatenates them as a string failed on the object, so its
    tool calls were taken as unsupported and trained as bare JSON; one that prints them as they are wrote
    {'city': 'Paris'}, a Python dict, and trained that. Each now gets the JSON text, and the ids are
    apply_chat_template's on the conversation in OpenAI's form."""
    template = DEEPSEEK_TOOLS_TEMPLATE
    if printed:
        template = template.replace("+ tool['function']['arguments'] +", "}}{{ tool['function']['arguments'] }}{{")
    tokenizer = tiny_with_template(template, *DEEPSEEK_SPECIAL)
    features = template_features(tokenizer)
    assert features.native_tools and features.arguments_text
    [encoded] = encode_conversation(tokenizer, CONVERSATION, TOOLS, max_length=4096)
    wire = [CONVERSATION[0], {**CONVERSATION[1], "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}, *CONVERSATION[2:]]
    assert encoded.input_ids == render_ids(tokenizer, wire, tools=TOOLS)
    call = '<|tool_call_begin|>function<|tool_sep|>get_weather\n```json\n{"city": "Paris"}\n```<|tool_call_end|>'
    assert learned(tokenizer, encoded) == [f"{call}<|end_of_sentence|>", "It is 21 degrees in Paris.<|end_of_sentence|>"]


def test_templates_that_render_an_object_get_the_object():
    """`| tojson` (Qwen2.5, Hermes) and iterating `| items` (Qwen3-Coder's XML parameters) take the object."""
    assert not template_features(tiny_with_template(TOOLS_CHATML_TEMPLATE)).arguments_text
    items = TOOLS_CHATML_TEMPLATE.replace(
        "{{ c['function'] | tojson }}",
        "{{ c['function']['name'] }}{% for k, v in c['function']['arguments'] | items %}<{{ k }}>{{ v }}</{{ k }}>"
        "{% endfor %}")
    tokenizer = tiny_with_template(items)
    features = template_features(tokenizer)
    assert features.native_tools and not features.arguments_text
    [encoded] = encode_conversation(tokenizer, CONVERSATION, TOOLS, max_length=4096)
    assert learned(tokenizer, encoded)[0] == "<tool_call>get_weather<city>Paris</city></tool_call><|im_end|>"


# Mistral-7B-Instruct-v0.3's way with tool calls: every call and every result carries an id of 9 letters and
# digits, or the template raises.
MISTRAL_TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{{ '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{% endif %}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined -%}{{ '[TOOL_CALLS] [' }}"
    "{%- for tool_call in message['tool_calls'] -%}{%- set out = tool_call['function'] | tojson -%}{{ out[:-1] }}"
    "{%- if tool_call['id'] is not defined or tool_call['id'] | length != 9 -%}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif -%}"
    "{{ ', \"id\": \"' + tool_call['id'] + '\"}' }}{%- if not loop.last -%}{{ ', ' }}{%- endif -%}{%- endfor -%}"
    "{{ ']' + eos_token }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if message['tool_call_id'] is not defined or message['tool_call_id'] | length != 9 -%}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif -%}"
    "{{ '[TOOL_RESULTS] {\"content\": ' + message['content'] + ', \"call_id\": \"' + message['tool_call_id'] + "
    "'\"}[/TOOL_RESULTS]' }}{%- endif -%}{%- endfor -%}")
MISTRAL_SPECIAL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                   "[/TOOL_RESULTS]")


def test_call_ids_and_tool_names_reach_the_template():
    """vllm#9019, transformers#30621 (review: a call carries its id, the tool message its tool_call_id): the
    ids and names of OpenAI-form data were dropped when the row was read, so Mistral's template, which
    requires them, was taken as not rendering tool calls and trained bare JSON. They are kept; the ids are
    apply_chat_template's on the data as written."""
    from collections import Counter

    from instructkit.data.chat_rows import parse_chat

    tokenizer = tiny_with_template(MISTRAL_TOOLS_TEMPLATE, *MISTRAL_SPECIAL)
    features = template_features(tokenizer)
    assert features.native_tools and features.call_ids
    data = [CONVERSATION[0], {**CONVERSATION[1], "tool_calls": [{"id": "abcDEF123", **CALL}]},
            {**CONVERSATION[2], "tool_call_id": "abcDEF123", "name": "get_weather"}, CONVERSATION[3]]
    turns, tools = parse_chat({"messages": data, "tools": TOOLS}, "chat.jsonl: line 1", Counter())
    assert turns[1]["tool_calls"][0]["id"] == "abcDEF123" and turns[2]["tool_call_id"] == "abcDEF123"
    [encoded] = encode_conversation(tokenizer, turns, tools, max_length=4096)
    assert encoded.input_ids == render_ids(tokenizer, data, tools=TOOLS)
    assert learned(tokenizer, encoded) == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]</s>',
        " It is 21 degrees in Paris.</s>"]
    # Data without ids (ShareGPT) gets ids the template accepts, each result the id of its call.
    [encoded] = encode_conversation(tokenizer, CONVERSATION, TOOLS, max_length=4096)
    text = tokenizer.decode(encoded.input_ids)
    assert '"id": "call00001"}]</s>[TOOL_RESULTS] {"content": {"temperature": 21}, "call_id": "call00001"}' in text


def test_a_tool_answer_gets_the_name_of_the_call_it_answers():
    """Templates that write the function's name with its result get it from the call when the data (ShareGPT
    observations) has none; parallel calls' answers each get their own call's name."""
    template = TOOLS_CHATML_TEMPLATE.replace("'<|im_start|>user\\n<tool_response>' + m['content']",
                                             "'<|im_start|>user\\n<tool_response>' + m['name'] + ': ' + m['content']")
    tokenizer = tiny_with_template(template)
    assert template_features(tokenizer).native_tools
    rome = {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Rome"}}}
    conversation = [CONVERSATION[0], {"role": "assistant", "content": "", "tool_calls": [CALL, rome]},
                    {"role": "tool", "content": "21"}, {"role": "tool", "content": "noon"},
                    {"role": "assistant", "content": "21 degrees; it is noon in Rome."}]
    tools = [*TOOLS, {"type": "function", "function": {**SPEC, "name": "get_time"}}]
    [encoded] = encode_conversation(tokenizer, conversation, tools, max_length=4096)
    text = tokenizer.decode(encoded.input_ids)
    assert "<tool_response>get_weather: 21</tool_response>" in text
    assert "<tool_response>get_time: noon</tool_response>" in text


# OpenAI's tool-call ids ("call_" + 24 letters and digits), which Mistral's template refuses, and the
# 9-character digests they are replaced by (blake2b in base 36: the same in every run, whatever the hash seed).
PARIS_ID, ROME_ID = "call_Vq3bN8xZkT2mLp4RwY7dHc1F", "call_Jf6sA0uEoG9iKx2QyB5nMr8W"
PARIS_SHORT, ROME_SHORT = "zofuejcg0", "3zg1p9ogp"
ROME = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}


def openai_conversation(paris_id: str, rome_id: str) -> list[dict]:
    """Two parallel calls with their ids, each answered with its `tool_call_id` (OpenAI's chat format)."""
    return [CONVERSATION[0], {"role": "assistant", "content": "",
                              "tool_calls": [{"id": paris_id, **CALL}, {"id": rome_id, **ROME}]},
            {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": paris_id, "name": "get_weather"},
            {"role": "tool", "content": '{"temperature": 25}', "tool_call_id": rome_id, "name": "get_weather"},
            {"role": "assistant", "content": "21 degrees in Paris, 25 in Rome."}]


def test_call_ids_the_template_refuses_are_replaced_by_ones_it_accepts(caplog, monkeypatch):
    """vllm#9019: Mistral's template raises unless every id is 9 letters and digits, so an OpenAI-format tool
    dataset (ids "call_" + 24 characters) stopped training at its first example. Each id is replaced by a
    9-character digest of it, the same in the call and its answer, distinct for distinct calls; the ids are
    apply_chat_template's on the conversation with those ids, in training and in evaluation prompts."""
    from collections import Counter

    from instructkit.data import chat_template
    from instructkit.data.chat_encode import prompt_ids
    from instructkit.data.chat_rows import parse_chat
    from instructkit.data.chat_template import short_call_id, template_name

    assert (short_call_id(PARIS_ID), short_call_id(ROME_ID)) == (PARIS_SHORT, ROME_SHORT)
    monkeypatch.setattr(chat_template, "_WARNED", set())  # whichever test warned first
    tokenizer = tiny_with_template(MISTRAL_TOOLS_TEMPLATE, *MISTRAL_SPECIAL)
    assert template_features(tokenizer).call_ids
    data = openai_conversation(PARIS_ID, ROME_ID)
    wire = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"][
        "arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in data]
    turns, tools = parse_chat({"messages": wire, "tools": TOOLS}, "chat.jsonl: line 1", Counter())
    with caplog.at_level("WARNING", logger="instructkit.data.chat_template"):
        [encoded] = encode_conversation(tokenizer, turns, tools, max_length=4096, source="chat.jsonl: line 1")
        [again] = encode_conversation(tokenizer, turns, tools, max_length=4096, source="chat.jsonl: line 1")
    expected = openai_conversation(PARIS_SHORT, ROME_SHORT)
    assert encoded.input_ids == again.input_ids == render_ids(tokenizer, expected, tools=TOOLS)
    text = tokenizer.decode(encoded.input_ids)
    for short, answer in ((PARIS_SHORT, 21), (ROME_SHORT, 25)):
        assert f'"id": "{short}"}}' in text
        assert f'[TOOL_RESULTS] {{"content": {{"temperature": {answer}}}, "call_id": "{short}"}}' in text
    warned = [r.getMessage() for r in caplog.records if "ids" in r.getMessage()]
    assert len(warned) == 1 and template_name(tokenizer) in warned[0] and "digest" in warned[0]
    # Evaluation and generation prompts: the same ids.
    ids, _ = prompt_ids(tokenizer, turns[:-1], tools)
    assert ids == render_ids(tokenizer, expected[:-1], tools=TOOLS, add_generation_prompt=True)


def test_call_ids_the_template_accepts_are_kept():
    """An id of the form the template renders stays as the data has it, beside one replaced."""
    tokenizer = tiny_with_template(MISTRAL_TOOLS_TEMPLATE, *MISTRAL_SPECIAL)
    for paris in ("abcDEF123", PARIS_ID):
        [encoded] = encode_conversation(tokenizer, openai_conversation(paris, "XyZ987abc"), TOOLS, max_length=4096)
        expected = openai_conversation(PARIS_SHORT if paris == PARIS_ID else paris, "XyZ987abc")
        assert encoded.input_ids == render_ids(tokenizer, expected, tools=TOOLS)


def test_replaced_call_ids_that_collide_stay_distinct(monkeypatch):
    """Two ids whose digests coincide: the later one (in order of appearance) takes its next digest."""
    from instructkit.data import chat_template

    digest = chat_template.short_call_id
    monkeypatch.setattr(chat_template, "short_call_id", lambda i, salt=0: "same00000" if salt == 0 else digest(i, salt))
    tokenizer = tiny_with_template(MISTRAL_TOOLS_TEMPLATE, *MISTRAL_SPECIAL)
    [encoded] = encode_conversation(tokenizer, openai_conversation(PARIS_ID, ROME_ID), TOOLS, max_length=4096)
    expected = openai_conversation("same00000", digest(ROME_ID, 1))
    assert encoded.input_ids == render_ids(tokenizer, expected, tools=TOOLS)


def test_a_template_error_besides_the_ids_still_names_the_example():
    """A conversation the template refuses for another reason (two user turns in a row) is not trained with
    replaced ids: the template's own error, naming the example."""
    from instructkit.errors import TemplateError

    alternating = MISTRAL_TOOLS_TEMPLATE.replace(
        "{%- if message['role'] == 'user' -%}",
        "{%- if message['role'] == 'user' and loop.previtem is defined and loop.previtem['role'] == 'user' -%}"
        "{{ raise_exception('Conversation roles must alternate') }}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}", 1)
    tokenizer = tiny_with_template(alternating, *MISTRAL_SPECIAL)
    assert template_features(tokenizer).call_ids
    conversation = openai_conversation(PARIS_ID, ROME_ID)
    assert encode_conversation(tokenizer, conversation, TOOLS, max_length=4096)[0] is not None  # alternating
    with pytest.raises(TemplateError, match=r"chat\.jsonl: line 7: .*roles must alternate"):
        encode_conversation(tokenizer, [{"role": "user", "content": "Hello."}, *conversation], TOOLS,
                            max_length=4096, source="chat.jsonl: line 7")
