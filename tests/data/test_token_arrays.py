"""The token store's batched encoding (data/token_arrays.py) gives the ids, labels and stats of the
per-example path (tokenize.encode_batch + assemble), token for token."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from instructkit.data.token_arrays import _rows_to_arrays, encode_chunk
from instructkit.data.tokenize import IGNORE_INDEX, TokenizeSettings, encode_batch, encode_example

TEXT = "the tea was strong and fresh but the box came open and half of it spilled on the floor"
WORDS = TEXT.split()


def _examples(n: int = 60) -> list[dict]:
    """Prompts from empty to far over max_length, repeated prompts, a few distinct completions."""
    out = []
    for i in range(n):
        prompt = " ".join(WORDS[j % len(WORDS)] for j in range(i * i % 97))
        completion = ["5", "1", "yes it was", "a long answer " * (i % 5)][i % 4]
        out.append({"prompt": prompt if i % 9 else "", "completion": completion, "source_id": f"s{i}"})
    out += [dict(out[3]), dict(out[10])]  # the same example twice
    return out


def _with_post_processor(tokenizer, single: str):
    """A copy of `tokenizer` whose own special tokens are `single` (e.g. BOS in front, EOS at the end)."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    specials = [(t, tokenizer.convert_tokens_to_ids(t)) for t in ("<s>", "</s>")]
    backend.post_processor = TemplateProcessing(single=single, special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(params=["plain", "bos", "bos_eos", "eos"])
def tokenizer(request, tiny_tokenizer):
    single = {"plain": None, "bos": "<s> $A", "bos_eos": "<s> $A </s>", "eos": "$A </s>"}[request.param]
    return tiny_tokenizer if single is None else _with_post_processor(tiny_tokenizer, single)


def _reference(tokenizer, settings, examples):
    encoded = encode_batch(tokenizer, [e["prompt"] for e in examples], [e["completion"] for e in examples], settings)
    return _rows_to_arrays(examples, [[e] for e in encoded])


@pytest.mark.parametrize("truncation", ["left", "middle"])
@pytest.mark.parametrize("max_length", [3, 9, 40, 512])
def test_batched_equals_per_example(tokenizer, truncation, max_length):
    examples = _examples()
    settings = TokenizeSettings(max_length=max_length, truncation=truncation)
    got, want = encode_chunk(tokenizer, settings, examples), _reference(tokenizer, settings, examples)
    for name in ("input_ids", "labels", "lengths", "label_lengths", "prompt_length", "index"):
        assert got[name].dtype == want[name].dtype, name
        assert np.array_equal(got[name], want[name]), name
    assert got["stats"].to_dict() == want["stats"].to_dict()
    if max_length == 9:  # this case cuts some prompts and drops the long answers
        assert 0 < got["stats"].truncated and 0 < got["stats"].dropped < len(examples)


def test_rows_are_prompt_then_completion_with_eos(tiny_tokenizer):
    tokenizer = _with_post_processor(tiny_tokenizer, "<s> $A")
    examples = _examples(12)
    settings = TokenizeSettings(max_length=16)
    got = encode_chunk(tokenizer, settings, examples)
    ends = np.cumsum(got["lengths"])
    for row, (end, length, cut) in enumerate(zip(ends, got["lengths"], got["prompt_length"])):
        ids, labels = got["input_ids"][end - length:end], got["labels"][end - length:end]
        example = examples[got["index"][row]]
        want = encode_example(tokenizer, example["prompt"], example["completion"], settings)
        assert ids.tolist() == want.input_ids and labels.tolist() == want.labels
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and length <= 16
        assert (labels[:cut] == IGNORE_INDEX).all() and (labels[cut:] == ids[cut:]).all()


@pytest.mark.parametrize("settings", [TokenizeSettings(max_length=24, chat_template=True),
                                      TokenizeSettings(max_length=24, seq2seq=True)])
def test_chat_and_seq2seq_take_the_per_example_path(tiny_tokenizer, settings):
    examples = _examples(20)
    got = encode_chunk(tiny_tokenizer, settings, examples)
    if settings.chat:
        from instructkit.data.tokenize import _training_rows

        want = _rows_to_arrays(examples, [_training_rows(tiny_tokenizer, e, settings) for e in examples])
    else:
        want = _reference(tiny_tokenizer, settings, examples)
    for name in ("input_ids", "labels", "lengths", "prompt_length", "index"):
        assert np.array_equal(got[name], want[name]), name
    assert got["stats"].to_dict() == want["stats"].to_dict()


def test_an_empty_chunk(tiny_tokenizer):
    got = encode_chunk(tiny_tokenizer, TokenizeSettings(), [])
    assert len(got["input_ids"]) == len(got["index"]) == 0 and got["stats"].examples == 0


def test_a_prompt_that_starts_with_bos_text_gets_one_bos(tokenizer):
    """trl#1400 (the double-BOS bug): text already rendered with its BOS ("<s>[INST] ..." templates,
    `apply_chat_template(tokenize=False)`) tokenized with the tokenizer's own special tokens began
    <s><s>; both encoding paths, training and generation, keep exactly one BOS."""
    from instructkit.data.tokenize import encode_for_generation, encode_prompts

    bos = tokenizer.bos_token_id
    examples = [{"prompt": "<s>[INST] was the tea strong? [/INST]", "completion": "yes", "source_id": "a"},
                {"prompt": "was the tea strong?", "completion": "yes", "source_id": "b"},
                {"prompt": "<s><s> two on purpose", "completion": "no", "source_id": "c"}]
    settings = TokenizeSettings(max_length=64)
    got = encode_chunk(tokenizer, settings, examples)
    want = _reference(tokenizer, settings, examples)
    assert np.array_equal(got["input_ids"], want["input_ids"])
    prompts = [e["prompt"] for e in examples]
    ids = encode_prompts(tokenizer, prompts, settings)
    assert encode_for_generation(tokenizer, prompts, settings, max_new_tokens=8) == ids
    adds_bos = tokenizer("x")["input_ids"][0] == bos
    assert [x[:3].count(bos) for x in ids] == [1, int(adds_bos), 2]  # the BOS tokens of the text, once each
    assert ids[0][1:] == tokenizer(prompts[0], add_special_tokens=False)["input_ids"][1:]
