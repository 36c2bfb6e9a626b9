"""Other tools' public tokenization bug reports, replayed against instructkit (one section per report)."""

from __future__ import annotations

import pytest
from _legacy_spm import build_legacy_spm_tokenizer
from conftest import build_tiny_tokenizer

from instructkit.data.token_arrays import encode_chunk
from instructkit.data.tokenize import TokenizeSettings, encode_example
from instructkit.evaluate.fewshot import DEMONSTRATION_END, demonstration_answer_ids
from instructkit.evaluate.scoring import _rank_items
from instructkit.templates.template import Template

SETTINGS = TokenizeSettings(max_length=128)
PAIRS = [("Rating:", "5"), ("Review: great coffee, fast shipping.\nRating:", "positive"),
         ("Translate to German: a man rides a bike.", "Ein Mann fährt Fahrrad."), ("Question:\n", "yes")]


# --------------------------------------------------------------------------------------------------
# huggingface/trl#598 (PR #622; also #980, #1183): a legacy SentencePiece tokenizer (Llama-2, Mistral-v0.1)
# marks the start of every text with "▁", so a text tokenized alone differs from the same text after other
# text ("29871"). The completion " 5" was tokenized alone, "▁ ▁5": training taught a lone "▁" that the
# joint text "Rating: 5" never has, and rank scoring scored every choice that way.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [build_legacy_spm_tokenizer, build_tiny_tokenizer])
def test_a_completion_has_the_tokens_it_has_after_its_prompt(build):
    tok = build()
    eos = tok.eos_token_id
    for prompt, completion in PAIRS:
        joint = tok(f"{prompt} {completion}")["input_ids"] + [eos]
        assert encode_example(tok, prompt, completion, SETTINGS).input_ids == joint
        chunk = encode_chunk(tok, SETTINGS, [{"prompt": prompt, "completion": completion}])
        assert chunk["input_ids"].tolist() == joint  # the token store's batched path too
        [item] = _rank_items(tok, [prompt], [[completion, "no"]], SETTINGS, include_eos=True)
        assert item.prompt_ids + item.choice_ids[0] == joint  # rank scoring


def test_the_legacy_tokenizer_marks_a_text_start():
    """The fixture has the fault's cause: alone, " 5" starts with a lone "▁" that "Rating: 5" lacks."""
    tok = build_legacy_spm_tokenizer()
    assert tok.convert_ids_to_tokens(tok(" 5", add_special_tokens=False)["input_ids"]) == ["▁", "▁5"]
    assert tok.convert_ids_to_tokens(tok("Rating: 5")["input_ids"])[-1] == "▁5"


def test_kshot_choices_have_the_tokens_of_the_demonstrations():
    tok = build_legacy_spm_tokenizer()
    prompt = "Rating: 4\n\nRating:"
    [ids] = demonstration_answer_ids(tok, [" 5"], DEMONSTRATION_END, [prompt])
    in_prompt = tok(f"Rating: 5{DEMONSTRATION_END}{prompt}")["input_ids"]
    start = len(tok("Rating:")["input_ids"])
    assert in_prompt[start:start + len(ids)] == ids
    assert tok.convert_ids_to_tokens(ids)[0] == "▁5"


# --------------------------------------------------------------------------------------------------
# huggingface/trl#3083 / PR #3091 (and trl#1283): TRL appends EOS only when the text does not already end
# with it. A ready-made completion "yes</s>" lost its marker, but a template writing one (`completion:
# "{{ output }}</s>"`, Alpaca-style) rendered "yes</s>": trained "yes </s> </s>", and its reference never
# equalled a generated answer (decoded without special tokens).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", ["</s>", " </s>", "<|endoftext|>\n"])
def test_a_template_that_writes_eos_gets_it_once(marker):
    tok = build_tiny_tokenizer()
    template = Template(id="t.eos", name="eos", dataset="t", task="sentiment", instruction="{{ text }}\nSentiment:",
                        completion="{{ label }}" + marker, answer_choices="positive" + marker + " ||| negative")
    rendered = template.render({"text": "great coffee", "label": "positive"})
    assert rendered.completion == "positive"
    assert rendered.choices == ("positive", "negative")
    encoded = encode_example(tok, rendered.prompt, rendered.completion, SETTINGS)
    assert [t for t in encoded.labels if t != -100] == tok(" positive", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
