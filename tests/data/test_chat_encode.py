"""Chat examples turn by turn with the model's own chat template (data/chat_encode.py through tokenize.py).

The reference is `tokenizer.apply_chat_template`: the prompt of every assistant turn must be exactly what
it renders for the turns before it with add_generation_prompt=True, the labels the answer through the
template's end-of-turn token (EOS when there is none), everything else -100. Checked on the offline tiny
ChatML tokenizer (a template with a system role), the Gemma-3 template on the tiny tokenizer, and the real
SmolLM2 and Gemma-3 tokenizers when present.
"""

from __future__ import annotations

import json

import pytest
from _chat_helpers import (
    GEMMA3_TEMPLATE,
    ROLE_CONTENT_TEMPLATE,
    THINK_DROPPING_TEMPLATE,
    label_spans,
    real_tokenizer,
    tiny_gemma3,
    tiny_deepseek_r1,
    tiny_phi3,
    tiny_qwen3,
    tiny_with_template,
)
from conftest import CHATML, build_tiny_tokenizer

from instructkit.config import DatasetConfig, ModelConfig, RunConfig, SplitConfig
from instructkit.data import load_examples, prepare
from instructkit.data.chat_encode import IGNORE_INDEX, encode_conversation
from instructkit.data.tokenize import (
    TokenizeSettings,
    encode_completions,
    end_of_turn_id,
    stop_token_ids,
    tokenize_examples,
)
from instructkit.errors import TemplateError
from instructkit.templates.library import TemplateLibrary

KETTLE = [
    {"role": "system", "content": "You are a terse support bot for Acme kettles."},
    {"role": "user", "content": "My kettle number 5 leaks. What should I do?"},
    {"role": "assistant", "content": "Tighten the lid seal on kettle 5."},
]
TWO_EXCHANGES = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Vicuna, a language model trained by researchers from LMSYS."},
    {"role": "user", "content": "Have a nice day!"},
    {"role": "assistant", "content": "You too!"},
]
THREE_EXCHANGES = KETTLE + [
    {"role": "user", "content": "It still leaks."},
    {"role": "assistant", "content": "Replace the seal: part 5-S."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

TOKENIZERS = {
    "tiny-chatml": (build_tiny_tokenizer, "<|im_end|>"),
    "tiny-gemma3-template": (tiny_gemma3, "<end_of_turn>"),
    "smollm2": (lambda: real_tokenizer("smollm2-135m-instruct"), "<|im_end|>"),
    # gemma-3-270m is the base model: its tokenizer ships no chat template; the instruct models' one is used.
    "gemma3": (lambda: real_tokenizer("gemma-3-270m", GEMMA3_TEMPLATE), "<end_of_turn>"),
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer_and_end(request):
    build, end = TOKENIZERS[request.param]
    return build(), end


@pytest.fixture(scope="module")
def smollm2():
    return real_tokenizer("smollm2-135m-instruct")


def chat_settings(**kw) -> TokenizeSettings:
    return TokenizeSettings(chat_template=True, **{"max_length": 4096, **kw})


def render_ids(tokenizer, messages, **kw) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


def prepared(tmp_path, rows: list[dict], name: str = "chat") -> list[dict]:
    """Rows of a chat JSONL file through `prepare` (everything in train)."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RunConfig(name="r", output_dir=str(tmp_path / "runs"), datasets=[DatasetConfig(path=str(path))],
                       split=SplitConfig(validation=0, test=0))
    prepare(config, library=TemplateLibrary([], []))
    return load_examples(config.run_dir, "train")


def test_every_assistant_turn_is_trained_on_its_own_generation_prompt(tokenizer_and_end):
    tokenizer, end = tokenizer_and_end
    [encoded] = encode_conversation(tokenizer, THREE_EXCHANGES, max_length=4096)
    turns = [i for i, m in enumerate(THREE_EXCHANGES) if m["role"] == "assistant"]
    spans = label_spans(encoded.labels)
    assert len(spans) == len(turns) == 3
    end_id = tokenizer.convert_tokens_to_ids(end)
    for (start, stop), i in zip(spans, turns):
        assert encoded.input_ids[:start] == render_ids(tokenizer, THREE_EXCHANGES[:i], add_generation_prompt=True)
        answer = encoded.input_ids[start:stop]
        assert encoded.labels[start:stop] == answer
        assert answer[-1] == end_id and tokenizer.decode(answer[:-1]) == THREE_EXCHANGES[i]["content"]
    assert sum(x != IGNORE_INDEX for x in encoded.labels) == sum(b - a for a, b in spans)
    # Concatenated, the turns are the whole conversation as the template renders it (prefix-stable), up to the
    # whitespace written after the final end-of-turn token.
    full = render_ids(tokenizer, THREE_EXCHANGES)
    assert full[:len(encoded.input_ids)] == encoded.input_ids
    assert tokenizer.decode(full[len(encoded.input_ids):]).strip() == ""
    last = encode_conversation(tokenizer, THREE_EXCHANGES, max_length=4096, loss_on="last_assistant_turn")[0]
    assert last.input_ids == encoded.input_ids and label_spans(last.labels) == spans[-1:]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_kettle_conversation_keeps_its_system_turn(tmp_path, which, smollm2):
    tokenizer = smollm2 if which == "smollm2" else build_tiny_tokenizer()
    [example] = prepared(tmp_path, [{"messages": KETTLE}])
    assert example["messages"] == KETTLE[:2] and example["completion"] == KETTLE[2]["content"]
    dataset, stats = tokenize_examples([example], tokenizer, chat_settings())
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nYou are a terse support bot for Acme kettles.<|im_end|>\n"
        "<|im_start|>user\nMy kettle number 5 leaks. What should I do?<|im_end|>\n"
        "<|im_start|>assistant\nTighten the lid seal on kettle 5.<|im_end|>")
    assert [tokenizer.decode(ids[a:b]) for a, b in label_spans(labels)] == ["Tighten the lid seal on kettle 5.<|im_end|>"]
    assert stats.examples == 1 and stats.truncated == 0 and stats.dropped == 0


def test_two_exchange_chat_learns_both_answers_on_smollm2(tmp_path, smollm2):
    [example] = prepared(tmp_path, [{"messages": TWO_EXCHANGES}])
    answers = ["I am Vicuna, a language model trained by researchers from LMSYS.<|im_end|>", "You too!<|im_end|>"]
    expected = (SMOLLM2_SYSTEM + "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n" + answers[0]
                + "\n<|im_start|>user\nHave a nice day!<|im_end|>\n<|im_start|>assistant\n" + answers[1])
    for loss_on, learned in (("all_assistant_turns", answers), ("last_assistant_turn", answers[1:])):
        dataset, _ = tokenize_examples([example], smollm2, chat_settings(loss_on=loss_on))
        ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
        assert smollm2.decode(ids) == expected
        assert [smollm2.decode(ids[a:b]) for a, b in label_spans(labels)] == learned


def test_system_prompt_setting_is_a_first_system_turn_unless_the_data_has_one():
    tokenizer = build_tiny_tokenizer()
    settings = chat_settings(system_prompt="Be brief.")
    example = {"prompt": "Hi", "completion": "Hello.", "messages": [{"role": "user", "content": "Hi"}]}
    dataset, _ = tokenize_examples([example], tokenizer, settings)
    assert tokenizer.decode(dataset[0]["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    kettle = {"prompt": "", "completion": KETTLE[2]["content"], "messages": KETTLE[:2]}
    dataset, _ = tokenize_examples([kettle], tokenizer, settings)
    assert "Be brief." not in tokenizer.decode(dataset[0]["input_ids"])


def test_templated_single_turn_example_is_the_same_conversation():
    """A prompt/completion example with chat_template is [user: prompt, assistant: completion]."""
    tokenizer = build_tiny_tokenizer()
    settings = chat_settings()
    dataset, _ = tokenize_examples([{"prompt": "Rate: great", "completion": "5"}], tokenizer, settings)
    conversation = [{"role": "user", "content": "Rate: great"}, {"role": "assistant", "content": "5"}]
    head = render_ids(tokenizer, conversation[:1], add_generation_prompt=True)
    row = dataset[0]
    assert row["input_ids"][:row["prompt_length"]] == head
    assert row["labels"][row["prompt_length"]:] == encode_completions(tokenizer, ["5"], settings, ["Rate: great"])[0]
    assert tokenizer.decode(row["input_ids"][row["prompt_length"]:]) == "5<|im_end|>"


def test_role_content_template_ends_answers_with_eos_and_stops_only_at_special_tokens():
    """A `role: content` template closes the assistant turn with "\\n" only: completions get EOS, the stop set
    holds no ordinary token (the old probe took the last token of "x", cutting "box" to "bo")."""
    tokenizer = tiny_with_template(ROLE_CONTENT_TEMPLATE)
    settings = chat_settings()
    eos = tokenizer.eos_token_id
    [five] = encode_completions(tokenizer, ["5"], settings, ["My kettle number 5 leaks."])
    assert five[-1] == eos and tokenizer.decode(five[:-1]) == " 5"
    [box] = encode_completions(tokenizer, ["box"], settings, ["What holds the kettle?"])
    assert box[-1] == eos and tokenizer.decode(box[:-1]) == " box"
    assert end_of_turn_id(tokenizer, settings) == eos
    stops = stop_token_ids(tokenizer, settings)
    assert stops == [eos]
    assert not set(tokenizer(" box", add_special_tokens=False)["input_ids"]) & set(stops)
    assert not set(tokenizer("x", add_special_tokens=False)["input_ids"]) & set(stops)
    # Multi-turn: the EOS inserted after an answer is not in the next turn's prompt as the template renders
    # it, so each assistant turn is its own row, on its exact prompt.
    rows = encode_conversation(tokenizer, TWO_EXCHANGES, max_length=4096)
    assert len(rows) == 2
    for row, i in zip(rows, (1, 3)):
        assert row.input_ids[:row.prompt_length] == render_ids(tokenizer, TWO_EXCHANGES[:i],
                                                               add_generation_prompt=True)
        assert tokenizer.decode(row.input_ids[row.prompt_length:]) == f" {TWO_EXCHANGES[i]['content']}</s>"
        assert label_spans(row.labels) == [(row.prompt_length, len(row.input_ids))]


def test_eos_the_template_writes_only_after_the_last_message_is_not_learned_with_every_answer():
    """trl#5526 (Phi-3's training template: the generation span is `content<|end|>`, the EOS outside it). Phi-3's
    template writes EOS after the last message when no generation prompt is asked for. Each turn rendered as
    the last one glued "\n</s>" to every answer ("Hello<|end|>\n</s>"), and as the next prompt has no </s>,
    the conversation fell apart into one row per answer. The answers end at <|end|>, in one row whose
    prompts are apply_chat_template's, and generation stops at <|end|>."""
    tokenizer = tiny_phi3()
    rows = encode_conversation(tokenizer, TWO_EXCHANGES, max_length=4096)
    assert len(rows) == 1
    [row] = rows
    assert [tokenizer.decode(row.input_ids[a:b]) for a, b in label_spans(row.labels)] == [
        "I am Vicuna, a language model trained by researchers from LMSYS.<|end|>", "You too!<|end|>"]
    for (start, _), i in zip(label_spans(row.labels), (1, 3)):
        assert row.input_ids[:start] == render_ids(tokenizer, TWO_EXCHANGES[:i], add_generation_prompt=True)
    full = render_ids(tokenizer, TWO_EXCHANGES)
    assert tokenizer.decode(full[len(row.input_ids):]) == "\n</s>"  # the end of the conversation, unlearned
    assert row.input_ids == full[:len(row.input_ids)]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_of_turn_id(tokenizer, chat_settings()) == end and end in stop_token_ids(tokenizer, chat_settings())
    # A template that ends each assistant turn with EOS (Llama-2) keeps it: it is the turn's own end.
    llama2 = tiny_with_template("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + "
                                "m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
                                "{% endif %}{% endfor %}")
    [row] = encode_conversation(llama2, TWO_EXCHANGES, max_length=4096)
    assert row.input_ids == render_ids(llama2, TWO_EXCHANGES)
    assert [llama2.decode(row.input_ids[a:b]) for a, b in label_spans(row.labels)][1] == " You too! </s>"


def test_reasoning_content_is_learned_as_the_reasoning_template_renders_it(tmp_path):
    """fw-ai/cookbook#378, minimind#737: an assistant turn's `reasoning_content` (DeepSeek's and vLLM's API
    field) was dropped when the row was read, so Qwen3's template wrote an empty <think></think> block and
    the model learned never to reason. It is the turn's <think> block now, which Qwen3's template reads back:
    every row is apply_chat_template's on the messages with the field, the reasoning learned."""
    original = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "reasoning": "Three and three make six.", "content": "6"}]
    [example] = prepared(tmp_path, [{"messages": original}])
    assert example["messages"][1]["content"] == "<think>\nTwo and two make four.\n</think>\n\n4"
    assert example["completion"] == "<think>\nThree and three make six.\n</think>\n\n6"
    tokenizer = tiny_qwen3()
    dataset, _ = tokenize_examples([example], tokenizer, chat_settings())
    native = [{**m, "reasoning_content": m.pop("reasoning")} if "reasoning" in m else m
              for m in (dict(m) for m in original)]
    assert len(dataset) == 2  # Qwen3 drops the reasoning of earlier turns: one row per answer
    answers = [example["messages"][1]["content"], example["completion"]]
    for row, i, answer in zip(dataset, (1, 3), answers):
        assert row["input_ids"] == render_ids(tokenizer, native[:i + 1])[:-1]  # less the last "\n"
        assert row["input_ids"][:row["prompt_length"]] == render_ids(tokenizer, native[:i], add_generation_prompt=True)
        [(a, b)] = label_spans(row["labels"])
        assert tokenizer.decode(row["input_ids"][a:b]) == answer + "<|im_end|>"
    assert "Two and two" not in tokenizer.decode(dataset[1]["input_ids"])  # the history, as Qwen3 sends it


def test_template_that_is_not_prefix_stable_gives_one_row_per_assistant_turn():
    """A template that drops the reasoning of earlier turns: each turn trained on its exact prompt."""
    tokenizer = tiny_with_template(THINK_DROPPING_TEMPLATE)
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>two and two</think>4"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "<think>three and three</think>6"}]
    rows = encode_conversation(tokenizer, messages, max_length=4096)
    assert len(rows) == 2
    for row, i in zip(rows, (1, 3)):
        assert row.input_ids[:row.prompt_length] == render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        [(a, b)] = label_spans(row.labels)
        assert a == row.prompt_length and tokenizer.decode(row.input_ids[a:b]) == messages[i]["content"] + "<|im_end|>"
    assert "<think>two" not in tokenizer.decode(rows[1].input_ids)  # the earlier reasoning, as inference sends it
    example = {"prompt": "", "completion": messages[3]["content"], "messages": messages[:3]}
    dataset, stats = tokenize_examples([example], tokenizer, chat_settings())
    assert dataset["index"] == [0, 0] and stats.examples == 1
    # An earlier turn marked weight 0 gives no row of its own; the template never sees the key.
    marked = [*messages[:1], {**messages[1], "weight": 0}, *messages[2:]]
    assert [row.input_ids for row in encode_conversation(tokenizer, marked, max_length=4096)] == [rows[1].input_ids]


def test_weight_zero_turn_is_context_only_with_the_same_ids():
    """A prefix-stable template: the ids stay apply_chat_template's, only the marked answer loses its labels."""
    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    [plain] = encode_conversation(tokenizer, messages, max_length=4096)
    [marked] = encode_conversation(tokenizer, [*messages[:1], {**messages[1], "weight": 0}, *messages[2:]],
                                   max_length=4096)
    assert marked.input_ids == plain.input_ids
    assert [tokenizer.decode(plain.input_ids[a:b]) for a, b in label_spans(plain.labels)] == ["4<|im_end|>",
                                                                                           "6<|im_end|>"]
    assert [tokenizer.decode(marked.input_ids[a:b]) for a, b in label_spans(marked.labels)] == ["6<|im_end|>"]


def test_assistant_turn_before_any_user_turn_is_context_not_a_template_error():
    """axolotl#723 (ShareGPT with the assistant talking first): a greeting before the first user turn has no
    prompt; turn by turn it rendered an empty conversation and every template failed (TemplateError "empty
    conversation"). It is context now: the ids are apply_chat_template's, the later answers alone learned."""
    greeting = [{"role": "assistant", "content": "Hello! How can I help?"}]
    messages = greeting + [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    tokenizer = build_tiny_tokenizer()
    [row] = encode_conversation(tokenizer, messages, max_length=4096)
    assert row.input_ids == render_ids(tokenizer, messages)[:-1]  # less the newline after the last <|im_end|>
    assert [tokenizer.decode(row.input_ids[a:b]) for a, b in label_spans(row.labels)] == ["4<|im_end|>",
                                                                                       "6<|im_end|>"]
    [last] = encode_conversation(tokenizer, messages, max_length=4096, loss_on="last_assistant_turn")
    assert [tokenizer.decode(last.input_ids[a:b]) for a, b in label_spans(last.labels)] == ["6<|im_end|>"]
    # Not prefix-stable: one row per answer after a user turn, none for the greeting.
    thinking = tiny_with_template(THINK_DROPPING_TEMPLATE)
    rows = encode_conversation(thinking, messages, max_length=4096)
    assert [thinking.decode(r.input_ids[a:b]) for r in rows for a, b in label_spans(r.labels)] == ["4<|im_end|>",
                                                                                                "6<|im_end|>"]


def test_template_whose_assistant_turn_does_not_follow_its_generation_prompt_is_an_error():
    template = CHATML.replace("{% if add_generation_prompt %}<|im_start|>assistant\n",
                              "{% if add_generation_prompt %}<|im_start|>model\n")
    tokenizer = tiny_with_template(template)
    with pytest.raises(TemplateError, match="not as a continuation of its generation prompt"):
        encode_conversation(tokenizer, KETTLE, max_length=4096)


def test_template_whose_generation_prompt_opens_the_reasoning_trains_what_the_model_writes_after_it(tmp_path):
    """DeepSeek-R1-Distill's template: the generation prompt ends "<think>\\n" and the rendered turn drops the
    reasoning, so the turn is not a continuation of its prompt and was refused ("not as a continuation of its
    generation prompt"). Each answer is now trained on apply_chat_template's generation prompt, its labels
    what the model writes after it (the reasoning, "</think>", the reply, EOS); a reply without reasoning
    closes the opened block at once (Qwen3's empty block); one row per answer (earlier reasoning dropped)."""
    original = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"}]
    [example] = prepared(tmp_path, [{"messages": original}])
    tokenizer = tiny_deepseek_r1()
    dataset, stats = tokenize_examples([example], tokenizer, chat_settings())
    assert len(dataset) == 2 and stats.examples == 1
    context = example["messages"]  # the reasoning as a <think> block in the content, which the template drops
    assert context[1]["content"] == "<think>\nTwo and two make four.\n</think>\n\n4"
    written = ["Two and two make four.\n</think>\n\n4</s>", "\n</think>\n\n6</s>"]
    for row, i, answer in zip(dataset, (1, 3), written):
        prompt = render_ids(tokenizer, context[:i], add_generation_prompt=True)
        assert tokenizer.decode(prompt).endswith("<｜Assistant｜><think>\n")
        assert row["input_ids"][:row["prompt_length"]] == prompt
        [(a, b)] = label_spans(row["labels"])
        assert a == row["prompt_length"] and b == len(row["input_ids"])
        assert tokenizer.decode(row["input_ids"][a:b]) == answer
    assert "Two and two" not in tokenizer.decode(dataset[1]["input_ids"])  # the history, as the template sends it
    assert end_of_turn_id(tokenizer, chat_settings()) == tokenizer.eos_token_id


def test_tokenizer_without_chat_template_is_a_clear_error():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat template.*chat_template: false"):
        tokenize_examples([{"prompt": "Hi", "completion": "Hello"}], tokenizer, chat_settings())


def test_loss_on_reaches_the_tokenize_settings():
    config = RunConfig(train={"loss_on": "last_assistant_turn"})
    assert config.train.loss_on == "last_assistant_turn"
    assert RunConfig().train.loss_on == "all_assistant_turns"
    settings = TokenizeSettings.from_model_config(ModelConfig(chat_template=True), False,
                                                  loss_on=config.train.loss_on)
    assert settings.loss_on == "last_assistant_turn" and settings.chat
    with pytest.raises(ValueError, match="loss_on"):
        RunConfig(train={"loss_on": "every_turn"})


def test_a_conversation_the_template_refuses_names_its_example():
    """Gemma's template requires user/assistant alternation: two user turns in a row is the data's fault,
    and the error says which example (source row) it is, not only the roles."""
    example = {"prompt": "Hi\nStill there?", "completion": "Yes.", "source_id": "chats:7",
               "messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Still there?"}]}
    with pytest.raises(TemplateError, match=r"^example chats:7: .*roles user/user: .*must alternate"):
        tokenize_examples([example], tiny_gemma3(), chat_settings())
