"""Seq2seq (encoder-decoder) training targets: framed as the model's tokenizer frames a target text, so that
what generation feeds the decoder is what training fed it."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import tokenized, train_config
from conftest import build_tiny_tokenizer

from instructkit.data.seq2seq import seq2seq_target_ids
from instructkit.evaluate.generate import generate
from instructkit.train.loop import TrainData, TrainOptions, train

EXAMPLES = [
    {"prompt": "Translate to German: a man rides a bike.", "completion": "Ein Mann fährt Fahrrad.", "task": "t",
     "source_id": "0"},
    {"prompt": "Summarize the dialogue. hello there.", "completion": "great coffee fast shipping", "task": "t",
     "source_id": "1"},
]


def framed_tokenizer(single: str):
    """The tiny tokenizer with a post-processor that frames every text as `single` (BART: "<s> $A </s>")."""
    from tokenizers import processors

    tok = build_tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    return tok


@pytest.mark.parametrize("single", ["<s> $A </s>", "$A </s>", "$A"])
def test_targets_are_framed_by_the_tokenizer_and_end_with_one_eos(single):
    tok = framed_tokenizer(single)
    plain = tok("great coffee", add_special_tokens=False).input_ids
    bos = [tok.bos_token_id] if single.startswith("<s>") else []
    assert seq2seq_target_ids(tok, ["great coffee"]) == [bos + plain + [tok.eos_token_id]]
    assert seq2seq_target_ids(tok, ["great coffee"], add_eos=False) == [bos + plain]


def tiny_bart(tok):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id, dropout=0.0, attention_dropout=0.0)
    model = BartForConditionalGeneration(config)
    # facebook/bart-large's generation config: <s> is forced as the first generated token
    model.generation_config.forced_bos_token_id = tok.bos_token_id
    return model


def test_a_tuned_bart_generates_what_it_was_trained_on(tmp_path):
    """transformers#15559 / #7961: BART's targets are `<s> tok </s>` (decoder inputs `</s> <s> tok`), and its
    generation forces `<s>` first. Targets tokenized without the tokenizer's framing trained the decoder on
    `</s> tok`, which generation never sends: the tuned model dropped its answer's first word
    ("Mann fährt Fahrrad.") or wrote another answer."""
    tok = framed_tokenizer("<s> $A </s>")
    model = tiny_bart(tok)
    dataset, settings = tokenized(EXAMPLES, tok, seq2seq=True)
    train(model, tok, TrainData(dataset), train_config(max_steps=40, lr=3e-3, batch_size=2), tmp_path,
          TrainOptions(settings=settings, is_seq2seq=True, show_progress=False))
    model.eval()
    answers = generate(model, tok, [e["prompt"] for e in EXAMPLES], settings, is_seq2seq=True, max_new_tokens=16)
    assert answers == [e["completion"] for e in EXAMPLES]
    assert dataset[0]["labels"][0] == tok.bos_token_id  # what generation forces first was trained on
