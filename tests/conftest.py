"""Shared fixtures: 1 torch thread, tiny tokenizer and models built offline, the ../shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Predict the associated rating for the following review: great coffee, fast shipping. Rating: 5",
    "Give a short sentence describing the following product review: the kettle leaks.",
    "Translate to German: a man rides a bike. Ein Mann fährt Fahrrad.",
    "Summarize the dialogue. #Person1#: hello there. #Person2#: hi, how are you?",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,:;'\"()[]{}",
    "positive negative neutral yes no maybe World Sports Business Sci/Tech",
]


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # the template tests run without torch
        pass


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not found (expected ../shared/data beside the project)")
    return SHARED_DATA


def build_tiny_tokenizer(folder: Path | None = None):
    """A byte-level BPE tokenizer (vocab 512) with BOS/EOS/PAD and ChatML tokens, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None
    )
    fast.chat_template = CHATML
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def build_tiny_llama(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def overfit_causal(model, tokenizer, prompts, completions, settings, steps: int) -> float:
    """Plain AdamW (lr 1e-2, seed 0) on the prompt + completion + EOS encodings (`encode_batch`: labels -100
    on the prompt), right-padded into one batch, `steps` full-batch steps; the model is left in eval mode.
    Returns the last step's loss."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from instructkit.data.tokenize import encode_batch

    encoded = encode_batch(tokenizer, list(prompts), list(completions), settings)
    ids = pad_sequence([torch.tensor(e.input_ids) for e in encoded], batch_first=True, padding_value=0)
    labels = pad_sequence([torch.tensor(e.labels) for e in encoded], batch_first=True, padding_value=-100)
    mask = pad_sequence([torch.ones(len(e.input_ids), dtype=torch.long) for e in encoded], batch_first=True)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def build_tiny_t5(tokenizer, seed: int = 0):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama + tokenizer folder (safetensors), as a user's local model would be."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-t5")
    build_tiny_t5(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    return build_tiny_llama(tiny_tokenizer)


@pytest.fixture()
def tiny_t5(tiny_tokenizer):
    return build_tiny_t5(tiny_tokenizer)
