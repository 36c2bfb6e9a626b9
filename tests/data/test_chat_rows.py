"""Reading chat rows (data/chat_rows.py): `messages` and ShareGPT `conversations` (human/gpt/system/
function_call/observation) with `tools`, into the prepared example's messages, completion and tools; bad
rows named by file, line and turn; the real FastChat and Glaive files split by conversation."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from instructkit.config import DatasetConfig, RunConfig, SplitConfig
from instructkit.data import load_examples, prepare
from instructkit.data.chat import ChatPrompt, chat_prompt, example_prompt, full_conversation
from instructkit.data.sources import load_source
from instructkit.errors import DataError
from instructkit.templates.library import TemplateLibrary

TOOLS = [{"name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
GLAIVE_ROW = {
    "conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temperature": 21}'},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
    "tools": json.dumps(TOOLS),
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def read(tmp_path, rows: list, name: str = "chat.jsonl", **kw):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_source(DatasetConfig(path=str(path), **kw), None)


def error_of(tmp_path, rows: list) -> str:
    with pytest.raises(DataError) as info:
        read(tmp_path, rows)
    return str(info.value)


def test_sharegpt_tool_conversation_becomes_messages_tools_and_completion(tmp_path):
    source = read(tmp_path, [GLAIVE_ROW])
    assert source.kind == "chat"
    [row] = source.rows
    assert row["messages"] == [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temperature": 21}'},
    ]
    assert row["tools"] == [{"type": "function", "function": TOOLS[0]}]
    assert row["completion"] == "It is 21 degrees in Paris."
    assert row["prompt"] == ("user: What is the weather in Paris?\n"
                             'assistant: {"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                             'tool: {"temperature": 21}\nassistant:')


def test_final_function_call_is_the_completion_as_json_and_comes_back_as_a_tool_call(tmp_path):
    row = {"conversations": GLAIVE_ROW["conversations"][:2], "tools": TOOLS}
    [parsed] = read(tmp_path, [row]).rows
    assert parsed["completion"] == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert full_conversation(parsed["messages"], parsed["completion"], parsed["tools"])[-1] == {
        "role": "assistant", "content": "", "tool_calls": [CALL]}
    # Without tools (or naming another function) the text stays text.
    assert full_conversation([], parsed["completion"], None)[-1]["content"] == parsed["completion"]
    # A final turn with text and calls comes back as both (the template then writes its own call format).
    row = {"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": "Let me check.\nOne moment.", "tool_calls": [CALL]}],
           "tools": TOOLS}
    [parsed] = read(tmp_path, [row], name="both.jsonl").rows
    assert parsed["completion"] == 'Let me check.\nOne moment.\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert full_conversation(parsed["messages"], parsed["completion"], parsed["tools"])[-1] == {
        "role": "assistant", "content": "Let me check.\nOne moment.", "tool_calls": [CALL]}


def test_a_call_to_a_function_the_tools_do_not_list_is_a_bad_row(tmp_path):
    row = {"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"type": "function", "function": {"name": "get_time", "arguments": {}}}]}],
           "tools": TOOLS}
    message = error_of(tmp_path, [row])
    assert "chat.jsonl: line 1" in message and "turn 2 calls 'get_time', which the row's 'tools' do not list" in message


def test_sharegpt_system_turn_and_column_and_roles(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello.<|im_end|>"}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
             "system": "Be kind."}]
    first, second = read(tmp_path, rows).rows
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert first["completion"] == "Hello." and first["tools"] is None
    assert second["messages"][0] == {"role": "system", "content": "Be kind."}


def test_messages_with_tool_calls_and_tool_turns_are_accepted(tmp_path):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "content": "21"},
                {"role": "assistant", "content": "21 degrees."}]
    [row] = read(tmp_path, [{"messages": messages, "tools": TOOLS}]).rows
    assert row["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert row["messages"][2] == {"role": "tool", "content": "21"}


@pytest.mark.parametrize("turns, tools, expected", [
    ([{"from": "bot", "value": "x"}], None, "turn 1 must be {from: "),
    ([{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "get_weather(Paris)"}], TOOLS,
     'turn 2 (function_call): a function call must be JSON {"name": ..., "arguments": {...}}'),
    ([{"from": "human", "value": "Hi"}, {"from": "observation", "value": "21"}, {"from": "gpt", "value": "ok"}],
     TOOLS, "turn 2 is a tool (observation) turn that does not follow a function call"),
    ([{"from": "human", "value": "Hi"}, {"from": "system", "value": "Be brief."}, {"from": "gpt", "value": "ok"}],
     None, "turn 2 is a system turn after the conversation started"),
    ([{"from": "human", "value": "Hi"}], None, "must end with an assistant turn"),
    ([{"from": "human", "value": "Hi"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'}],
     None, "calls a function but the row has no 'tools'"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "ok"}], "not json [", "column 'tools' must be a list"),
])
def test_bad_sharegpt_rows_name_file_line_and_turn(tmp_path, turns, tools, expected):
    row = {"conversations": turns, **({"tools": tools} if tools is not None else {})}
    message = error_of(tmp_path, [row])
    assert "chat.jsonl: line 1" in message and expected in message


def _m(*turns: tuple) -> dict:
    return {"messages": [{"role": role, "content": text, **extra} for role, text, *rest in turns
                         for extra in [rest[0] if rest else {}]]}


@pytest.mark.parametrize("row, expected", [
    (_m(("user", "Hi"), ("assistant", ""), ("user", "Bye"), ("assistant", "Bye.")), "turn 2 (assistant) is empty"),
    (_m(("user", "  "), ("assistant", "Hello.")), "turn 1 (user) is empty"),
    (_m(("system", "Be brief."), ("user", "Hi"), ("assistant", "<|im_end|>"), ("user", "x"), ("assistant", "y")),
     "turn 3 (assistant) is empty"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""},
                        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}]},
     "column 'conversations': turn 2 (assistant) is empty"),
    (_m(("user", "Hi"), ("assistant", "Hello.", {"weight": 0})), "the final assistant turn has weight 0"),
    (_m(("user", "Hi"), ("assistant", "Hello.", {"reasoning_content": ["a"]})), "'reasoning_content' must be text"),
    (_m(("user", "Hi"), ("assistant", "<think>x</think>Hello.", {"reasoning": "y"})), "must not hold a <think>"),
    (_m(("user", "Hi"), ("assistant", "Hello.", {"weight": 0.5}), ("user", "x"), ("assistant", "y")),
     "turn 2: weight must be 0"),
])
def test_empty_turns_and_bad_weights_are_bad_rows(tmp_path, row, expected):
    """An empty question, or an empty reply before the final one (it would teach empty replies, or give a
    later reply an empty context), names file, line and turn, as an empty final turn does."""
    message = error_of(tmp_path, [row])
    assert "chat.jsonl: line 1" in message and expected in message


def test_weight_zero_marks_an_earlier_reply_as_context_only(tmp_path):
    """OpenAI's fine-tuning format: `weight: 0` on an assistant message keeps it as context, unlearned."""
    row = _m(("user", "Hi"), ("assistant", "Old answer.", {"weight": 0}), ("user", "Again?"),
             ("assistant", "New answer.", {"weight": 1}))
    [read_row] = read(tmp_path, [row]).rows
    assert read_row["messages"][1] == {"role": "assistant", "content": "Old answer.", "weight": 0}
    assert read_row["completion"] == "New answer."


def test_openai_text_content_parts_read_as_the_same_text(tmp_path):
    """OpenAI's content-part form ([{type: text, text}], input_text/output_text in its Responses API) is
    the text it holds, several parts joined with a newline: the same example as the string form."""
    def parts(*texts, kind="text"):
        return [{"type": kind, "text": t} for t in texts]

    as_parts = {"messages": [{"role": "system", "content": parts("Be brief.")},
                             {"role": "user", "content": parts("Rate this review:", "Great kettle.", kind="input_text")},
                             {"role": "assistant", "content": parts("5", kind="output_text")}]}
    as_text = _m(("system", "Be brief."), ("user", "Rate this review:\nGreat kettle."), ("assistant", "5"))
    [from_parts] = read(tmp_path, [as_parts], name="parts.jsonl").rows
    [from_text] = read(tmp_path, [as_text], name="text.jsonl").rows
    for key in ("messages", "completion", "prompt", "tools"):
        assert from_parts[key] == from_text[key]
    assert from_parts["messages"][1]["content"] == "Rate this review:\nGreat kettle."


def test_a_non_text_content_part_is_a_bad_row_naming_its_type(tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                     {"type": "image_url", "image_url": {"url": "x.png"}}]},
                        {"role": "assistant", "content": "A cat."}]}
    message = error_of(tmp_path, [row])
    assert "chat.jsonl: line 1" in message and "turn 1: content part 2 is of type 'image_url'" in message
    number = {"messages": [{"role": "user", "content": [{"type": "text", "text": 42}]},
                           {"role": "assistant", "content": "A cat."}]}
    assert "turn 1: content part 1 of type 'text' must hold its text as a string" in error_of(tmp_path, [number])
    bare = {"messages": [{"role": "user", "content": ["plain string"]}, {"role": "assistant", "content": "A cat."}]}
    assert "turn 1: content part 1 is 'plain string'; only text parts" in error_of(tmp_path, [bare])


def test_chat_prompt_and_example_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt(messages) == "system: Be brief.\nuser: Hi\nassistant:"
    prompt = example_prompt({"prompt": "P", "completion": "C", "messages": messages, "tools": [CALL]})
    assert isinstance(prompt, ChatPrompt) and prompt == "P" and prompt.messages == tuple(messages)
    assert example_prompt({"prompt": "P", "completion": "C"}) == "P"


def test_real_fastchat_and_glaive_files_are_read_and_split_by_conversation(tmp_path, shared_data):
    folder = shared_data / "conversations"
    fastchat = json.loads((folder / "fastchat_dummy_conversation.json").read_text())
    glaive = json.loads((folder / "glaive_toolcall_en_demo.json").read_text())
    source = load_source(DatasetConfig(path=str(folder / "glaive_toolcall_en_demo.json")), None)
    assert source.kind == "chat" and len(source.rows) == len(glaive) == 300
    calls = sum(1 for r in source.rows for m in r["messages"] if m.get("tool_calls"))
    tool_turns = sum(1 for r in source.rows for m in r["messages"] if m["role"] == "tool")
    expected = Counter(t["from"] for r in glaive for t in r["conversations"])
    assert calls == expected["function_call"] and tool_turns == expected["observation"] == 211
    for row, raw in zip(source.rows, glaive):  # 109 rows have `tools: "[]"`: no tools
        specs = json.loads(raw["tools"])
        assert row["tools"] == ([{"type": "function", "function": spec} for spec in specs] or None)
    for row, raw in zip(source.rows, glaive):  # each row is the whole conversation
        assert len(row["messages"]) + 1 == len(raw["conversations"])
        assert row["completion"] == raw["conversations"][-1]["value"].strip()

    config = RunConfig(name="r", output_dir=str(tmp_path / "runs"), split=SplitConfig(seed=0),
                       datasets=[DatasetConfig(path=str(folder / "fastchat_dummy_conversation.json"),
                                               name="fastchat", choices="none"),
                                 DatasetConfig(path=str(folder / "glaive_toolcall_en_demo.json"), name="glaive")])
    stats = prepare(config, library=TemplateLibrary([], [])).stats
    for name in ("fastchat", "glaive"):  # stats.json says what the examples are scored with
        assert stats["datasets"][name]["answers"]["metrics"] == ["rougeL", "token_f1"]
        assert stats["datasets"][name]["answers"]["choices"] is None
    by_split = {s: load_examples(config.run_dir, s) for s in ("train", "validation", "test")}
    ids = {s: {ex["source_id"] for ex in exs} for s, exs in by_split.items()}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    assert not (ids["validation"] & ids["test"])
    for exs in by_split.values():
        for ex in exs:
            assert ex["metrics"] == ["rougeL", "token_f1"]
            if ex["dataset"] == "fastchat":
                raw = fastchat[int(ex["source_id"].split(":")[-1])]["conversations"]
                assert [m["content"] for m in ex["messages"]] + [ex["completion"]] == [t["value"] for t in raw]
            else:
                assert ex["template_id"] == "glaive.chat"
                raw = glaive[int(ex["source_id"].split(":")[-1])]
                assert (ex.get("tools") or []) == [{"type": "function", "function": t} for t in json.loads(raw["tools"])]
