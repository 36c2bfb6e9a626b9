"""Truncation never damages a chat's scaffolding (data/chat_truncate.py): whole earliest exchanges go first
(the system turn stays), then text inside the longest user content; single-turn chat prompts follow the
same rule, in training, generation and rank scoring. Every example stays a well-formed conversation."""

from __future__ import annotations

import json

import pytest
from _chat_helpers import label_spans, parse_chatml, real_tokenizer
from conftest import build_tiny_tokenizer

from instructkit.config import DatasetConfig, RunConfig, SplitConfig
from instructkit.data import load_examples, prepare
from instructkit.data.chat_encode import encode_conversation
from instructkit.data.chat_template import FUNCTION_RESULT
from instructkit.data.chat_truncate import MIN_KEEP_TOKENS
from instructkit.data.tokenize import (
    TokenizeSettings,
    TokenizeStats,
    assemble_prompt,
    encode_completions,
    encode_for_generation,
    encode_prompts,
    tokenize_examples,
)
from instructkit.templates.library import TemplateLibrary

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
REVIEW = (
    "I bought this kettle for the office. It boils a full litre in about three minutes, which is quick, "
    "and the handle stays cool. The lid is stiff at first and the seal smelled of rubber for a week. After "
    "a month of daily use the limescale filter clogged and had to be soaked in vinegar, which the manual "
    "does not mention. The blue light is bright enough to read by in a dark kitchen. It is louder than our "
    "old one and the base wobbles a little on the tiled counter. Customer service answered my question "
    "about spare filters within a day and sent two for free. Overall it does the job, and I would buy it "
    "again for the price, but not at the full price."
)
PROMPT = f"Predict the rating for the following review: {REVIEW}\nRating:"
THREE_EXCHANGES = [
    {"role": "system", "content": "You are a terse support bot for Acme kettles."},
    {"role": "user", "content": "My kettle number 5 leaks. What should I do?"},
    {"role": "assistant", "content": "Tighten the lid seal on kettle 5."},
    {"role": "user", "content": "It still leaks."},
    {"role": "assistant", "content": "Replace the seal: part 5-S."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


@pytest.fixture(scope="module")
def smollm2():
    return real_tokenizer("smollm2-135m-instruct")


def render_ids(tokenizer, messages, **kw) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


def test_64_token_review_keeps_system_and_headers_on_smollm2(smollm2):
    """The issue's case: a ~150-token review at max_length 64 lost the system block and the user header and
    glued <|im_start|> to the middle of the review. Now the review text is cut, inside the user turn."""
    assert len(smollm2(PROMPT, add_special_tokens=False)["input_ids"]) >= 150
    settings = TokenizeSettings(max_length=64, chat_template=True)
    dataset, stats = tokenize_examples([{"prompt": PROMPT, "completion": "5"}], smollm2, settings)
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    assert len(ids) <= 64 and stats.truncated == 1 and stats.dropped == 0
    text = smollm2.decode(ids)
    turns = parse_chatml(text)
    assert [t["role"] for t in turns] == ["system", "user", "assistant"]
    assert turns[0]["content"] == SMOLLM2_SYSTEM and turns[2]["content"] == "5"
    user = turns[1]["content"]
    assert PROMPT.endswith(user) and user.endswith("\nRating:") and 20 < len(user) < len(REVIEW) / 2
    assert [smollm2.decode(ids[a:b]) for a, b in label_spans(labels)] == ["5<|im_end|>"]
    # Generation: the same rule, within max_length - max_new_tokens, ending with the assistant header.
    [fed] = encode_for_generation(smollm2, [PROMPT], settings, max_new_tokens=8)
    assert len(fed) <= 56
    prompt_text = smollm2.decode(fed)
    assert prompt_text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    turns = parse_chatml(prompt_text[:-len("<|im_start|>assistant\n")])
    assert [t["role"] for t in turns] == ["system", "user"] and turns[0]["content"] == SMOLLM2_SYSTEM
    assert PROMPT.endswith(turns[1]["content"])


@pytest.mark.parametrize("mode", ["left", "middle"])
def test_single_turn_prompt_is_cut_inside_the_user_content(mode):
    tokenizer = build_tiny_tokenizer()
    settings = TokenizeSettings(max_length=96, chat_template=True, system_prompt="Rate reviews.", truncation=mode)
    dataset, stats = tokenize_examples([{"prompt": PROMPT, "completion": "5"}], tokenizer, settings)
    ids = dataset[0]["input_ids"]
    assert len(ids) <= 96 and stats.truncated == 1
    turns = parse_chatml(tokenizer.decode(ids))
    assert [(t["role"], t["content"]) for t in turns if t["role"] != "user"] == [("system", "Rate reviews."),
                                                                                 ("assistant", "5")]
    user = turns[1]["content"]
    assert len(user) < len(PROMPT) / 2
    if mode == "left":
        assert PROMPT.endswith(user)
    else:
        assert user.startswith("Predict") and user.endswith("Rating:") and user not in PROMPT


def test_rank_scoring_prompt_is_cut_by_the_same_rule():
    tokenizer = build_tiny_tokenizer()
    settings = TokenizeSettings(max_length=80, chat_template=True)
    [prompt_ids] = encode_prompts(tokenizer, [PROMPT], settings)
    [choice] = encode_completions(tokenizer, ["5"], settings, [PROMPT], add_eos=False)
    encoded = assemble_prompt(tokenizer, PROMPT, prompt_ids, choice, settings)
    assert encoded.truncated and len(encoded.input_ids) <= 80
    text = tokenizer.decode(encoded.input_ids[:encoded.prompt_length])
    assert text.endswith("<|im_start|>assistant\n")
    [user] = parse_chatml(text[:-len("<|im_start|>assistant\n")])
    assert user["role"] == "user" and PROMPT.endswith(user["content"])


def test_earliest_whole_exchanges_go_first_keeping_the_system_turn():
    tokenizer = build_tiny_tokenizer()
    system, second, third = THREE_EXCHANGES[:1], THREE_EXCHANGES[3:5], THREE_EXCHANGES[5:]
    full = render_ids(tokenizer, THREE_EXCHANGES)
    last_two = render_ids(tokenizer, system + second + third)
    last_one = render_ids(tokenizer, system + third)
    assert len(last_one) < len(last_two) < len(full)
    for budget, kept in ((len(last_two), system + second + third), (len(last_one), system + third)):
        [encoded] = encode_conversation(tokenizer, THREE_EXCHANGES, max_length=budget)
        assert encoded.truncated
        assert encoded.input_ids == render_ids(tokenizer, kept)[:len(encoded.input_ids)]
        answers = [m["content"] + "<|im_end|>" for m in kept if m["role"] == "assistant"]
        assert [tokenizer.decode(encoded.input_ids[a:b]) for a, b in label_spans(encoded.labels)] == answers
    # Then inside the longest user content: the last exchange's question loses its start.
    long = system + [{"role": "user", "content": REVIEW}, {"role": "assistant", "content": "Noted."}]
    [encoded] = encode_conversation(tokenizer, long, max_length=len(last_one) + 2 * MIN_KEEP_TOKENS)
    turns = parse_chatml(tokenizer.decode(encoded.input_ids))
    assert turns[0] == {"role": "system", "content": system[0]["content"]}
    assert turns[2] == {"role": "assistant", "content": "Noted."} and REVIEW.endswith(turns[1]["content"])
    # ... but never below MIN_KEEP_TOKENS: a budget that would empty the question drops the example.
    assert encode_conversation(tokenizer, long, max_length=len(last_one)) == [None]


def test_tool_results_are_never_cut_and_no_question_is_emptied():
    """A long tool result stays whole (half a JSON result is no result); the user turn is cut instead,
    keeping at least MIN_KEEP_TOKENS; when that is not enough the example is dropped, not mangled."""
    tokenizer = build_tiny_tokenizer()
    result = json.dumps({"items": [{"sku": f"S-{i}", "price": i * 1.25} for i in range(12)]})
    calls = [{"type": "function", "function": {"name": "lookup", "arguments": {"q": "kettle"}}}]
    conversation = [{"role": "user", "content": REVIEW}, {"role": "assistant", "content": "", "tool_calls": calls},
                    {"role": "tool", "content": result}, {"role": "assistant", "content": "Twelve items."}]
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find items.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    [whole] = encode_conversation(tokenizer, conversation, tools, max_length=1 << 20)
    [encoded] = encode_conversation(tokenizer, conversation, tools, max_length=len(whole.input_ids) - 40)
    text = tokenizer.decode(encoded.input_ids)
    assert encoded.truncated and result in text  # the whole result
    question = next(t["content"] for t in parse_chatml(text) if t["role"] == "user")
    assert REVIEW.endswith(question) and len(tokenizer(question, add_special_tokens=False)["input_ids"]) >= 16
    short = len(whole.input_ids) - len(tokenizer(REVIEW, add_special_tokens=False)["input_ids"])
    assert encode_conversation(tokenizer, conversation, tools, max_length=short) == [None]


def test_answer_that_cannot_fit_is_dropped_never_cut():
    tokenizer = build_tiny_tokenizer()
    conversation = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": REVIEW}]
    assert encode_conversation(tokenizer, conversation, max_length=64) == [None]
    example = {"prompt": "Say it.", "completion": REVIEW, "messages": conversation[:1], "source_id": "d:7"}
    _, stats = tokenize_examples([example], tokenizer, TokenizeSettings(max_length=64, chat_template=True))
    assert stats.dropped == 1 and stats.dropped_ids == ["d:7"]
    note = stats.dropped_note(64)  # what `instructkit train` / `run` warn with
    assert "1 of 1 training examples (100%) dropped" in note and "model.max_length=64" in note and "d:7" in note
    assert TokenizeStats(examples=3).dropped_note(64) is None


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_real_conversations_stay_well_formed_after_truncation(tmp_path, shared_data, which, smollm2):
    """FastChat and Glaive conversations at a small max_length: every row re-parses as whole ChatML turns,
    ends with an assistant turn, and its labels are exactly whole assistant answers."""
    tokenizer = smollm2 if which == "smollm2" else build_tiny_tokenizer()
    folder = shared_data / "conversations"
    rows = []
    for name in ("fastchat_dummy_conversation.json", "glaive_toolcall_en_demo.json"):
        rows += json.loads((folder / name).read_text())[:40]
    results = {t["value"] for r in rows for t in r.get("conversations", []) if t["from"] == "observation"}
    assert results
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RunConfig(name="r", output_dir=str(tmp_path / "runs"), datasets=[DatasetConfig(path=str(path))],
                       split=SplitConfig(validation=0, test=0))
    prepare(config, library=TemplateLibrary([], []))
    examples = load_examples(config.run_dir, "train")
    max_length = 256 if which == "smollm2" else 600
    dataset, stats = tokenize_examples(examples, tokenizer, TokenizeSettings(max_length=max_length,
                                                                             chat_template=True))
    assert stats.truncated > 0 and len(dataset) + stats.dropped >= len(examples)
    for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        assert len(ids) <= max_length
        turns = parse_chatml(tokenizer.decode(ids) + "\n")
        assert turns[-1]["role"] == "assistant" and any(t["role"] == "user" for t in turns)
        answers = [t["content"] + "<|im_end|>" for t in turns if t["role"] == "assistant"]
        learned = [tokenizer.decode(ids[a:b]) for a, b in label_spans(labels)]
        assert learned == answers
        for turn in turns:  # no question emptied, no tool result cut (both seen as user turns on SmolLM2)
            assert turn["content"].strip()
            if turn["content"].startswith(FUNCTION_RESULT) or turn["role"] == "tool":
                assert turn["content"].removeprefix(FUNCTION_RESULT) in results
