"""models/attention.py: sdpa_varlen gives what transformers' sdpa gives, packed or padded, forward and backward."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama

from instructkit.models.attention import NAME, register, segments

# Two packed rows: examples of 6, 8 and 6 tokens; of 10, 5, 2 and 3 tokens.
POSITIONS = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5],
                          [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2]])


def test_segments_are_the_runs_from_zero():
    assert segments(POSITIONS[0]) == [(0, 6), (6, 14), (14, 20)]
    assert segments(POSITIONS[1]) == [(0, 10), (10, 15), (15, 17), (17, 20)]
    assert segments(torch.tensor([3, 4, 0, 1])) == [(0, 2), (2, 4)]  # a row that does not start at 0


def _both(model, **inputs):
    model.set_attn_implementation("sdpa")
    reference = model(**inputs, use_cache=False).logits
    model.set_attn_implementation(NAME)
    return reference, model(**inputs, use_cache=False).logits


def test_packed_rows_match_sdpa_forward_and_backward(tiny_tokenizer):
    register()
    model = build_tiny_llama(tiny_tokenizer).train()
    ids = torch.randint(5, 400, (2, 20), generator=torch.Generator().manual_seed(0))
    reference, varlen = _both(model, input_ids=ids, position_ids=POSITIONS)
    torch.testing.assert_close(varlen, reference, rtol=1e-5, atol=1e-5)
    grads = []
    for name in ("sdpa", NAME):
        model.zero_grad()
        model.set_attn_implementation(name)
        model(input_ids=ids, position_ids=POSITIONS, use_cache=False).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_padding_masks_and_generation_go_to_sdpa_unchanged(tiny_tokenizer):
    register()
    model = build_tiny_llama(tiny_tokenizer)
    ids = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    with torch.no_grad():
        reference, varlen = _both(model, input_ids=ids, attention_mask=mask)
        assert torch.equal(varlen[mask.bool()], reference[mask.bool()])
        left = torch.ones(2, 12, dtype=torch.long)
        left[1, :4] = 0  # left padding, as batched generation has it
        model.set_attn_implementation("sdpa")
        expected = model.generate(input_ids=ids, attention_mask=left, max_new_tokens=4, do_sample=False)
        model.set_attn_implementation(NAME)
        got = model.generate(input_ids=ids, attention_mask=left, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("window", [4, 64])
def test_gemma3_sliding_window_inside_a_long_example(window):
    """Gemma 3 alternates sliding-window and full layers: an example longer than the window still only sees
    the last `window` positions in a sliding layer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    register()
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=window,
                              max_position_embeddings=512, layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "sdpa"
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(5, 500, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference, varlen = _both(model, input_ids=ids, position_ids=POSITIONS)
    torch.testing.assert_close(varlen, reference, rtol=1e-5, atol=1e-5)
