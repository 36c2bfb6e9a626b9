"""train.loss_chunk_tokens: the LM head and cross-entropy over the labelled positions in chunks give the
unchunked loss (1e-6) and gradients, and never hold the whole positions x vocabulary logits."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import make_examples, tokenized, train_config
from conftest import build_tiny_llama

from instructkit.data.batching import TokenTable, collate
from instructkit.errors import TrainingError
from instructkit.train.loop import TrainData, TrainOptions, train
from instructkit.train.loss import batch_loss


def _batch(tokenizer, packed: bool, weighted: bool, n: int = 6):
    dataset, _ = tokenized(make_examples(n), tokenizer)
    table = TokenTable.from_dataset(dataset)
    weights = torch.linspace(0.5, 2.0, n).numpy() if weighted else None
    rows = [list(range(n))] if packed else [[i] for i in range(n)]
    return collate(table, rows, tokenizer.pad_token_id, seq2seq=False, packed=packed, weights=weights)


def _loss_and_grads(model, batch, **kwargs):
    """The mean loss over the label tokens (as a step reports it) and its gradients."""
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch, seq2seq=False, **kwargs) / batch.weight_sum
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("logits_at_labels", [True, False], ids=["at_labels", "full_logits"])
@pytest.mark.parametrize("packed,weighted", [(True, False), (False, False), (False, True)],
                         ids=["packed", "padded", "class_weighted"])
def test_chunked_loss_and_gradients_equal_the_unchunked(tiny_tokenizer, packed, weighted, logits_at_labels):
    model = build_tiny_llama(tiny_tokenizer)
    model.train()
    batch = _batch(tiny_tokenizer, packed, weighted)
    assert batch.n_targets > 7  # several chunks of 3, one short
    whole, whole_grads = _loss_and_grads(model, batch, logits_at_labels=True)
    for chunk in (1, 3, 7, 10_000):
        loss, grads = _loss_and_grads(model, batch, logits_at_labels=logits_at_labels, chunk_tokens=chunk)
        assert loss == pytest.approx(whole, abs=1e-6), chunk
        for name, grad in whole_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=f"{name}, chunks of {chunk}")


def test_chunks_never_hold_the_whole_logits(tiny_tokenizer):
    """Tensors saved for backward: unchunked, the [N, vocab] logits' log-softmax; chunked, nothing vocab-wide
    (each chunk's logits are recomputed in backward), only the hidden states."""
    model = build_tiny_llama(tiny_tokenizer)
    batch = _batch(tiny_tokenizer, packed=True, weighted=False)
    vocab = model.config.vocab_size

    def widest_saved(**kwargs) -> int:
        widths = []

        weight = model.lm_head.weight.untyped_storage().data_ptr()

        def pack(tensor):
            if tensor.ndim >= 1 and tensor.shape[-1] == vocab and tensor.untyped_storage().data_ptr() != weight:
                widths.append(tensor.numel() // vocab)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            batch_loss(model, batch, seq2seq=False, logits_at_labels=True, **kwargs)
        return max(widths, default=0)

    assert widest_saved() == batch.n_targets  # all labelled positions' logits at once
    assert widest_saved(chunk_tokens=4) == 0


def test_gemma_softcapping_is_applied_in_chunks(tiny_tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          pad_token_id=tiny_tokenizer.pad_token_id, attn_implementation="eager")
    model = Gemma2ForCausalLM(config)
    batch = _batch(tiny_tokenizer, packed=False, weighted=False)
    whole, whole_grads = _loss_and_grads(model, batch, logits_at_labels=True)
    loss, grads = _loss_and_grads(model, batch, logits_at_labels=True, chunk_tokens=3)
    assert loss == pytest.approx(whole, abs=1e-6)
    for name, grad in whole_grads.items():  # the tied embedding carries the LM head's gradient
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    model.config.final_logit_softcapping = None  # the cap matters here: without it the loss is another
    assert abs(_loss_and_grads(model, batch, logits_at_labels=True)[0] - whole) > 1e-4


def test_softcapping_of_a_text_config_is_applied_in_chunks(tiny_tokenizer):
    """Gemma 4 (and Gemma 3n) through AutoModelForCausalLM is a ForConditionalGeneration whose top config has no
    final_logit_softcapping: the model caps with its text_config's, so the chunks must too (the Gemma 2 softcap
    that fused cross-entropies left out: apple/ml-cross-entropy#48, linkedin/Liger-Kernel#127)."""
    from transformers import AutoModelForCausalLM, Gemma4Config

    text = {"vocab_size": len(tiny_tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 16,
            "final_logit_softcapping": 0.5, "pad_token_id": tiny_tokenizer.pad_token_id,
            "layer_types": ["sliding_attention", "full_attention"], "vocab_size_per_layer_input": len(tiny_tokenizer),
            "hidden_size_per_layer_input": 8}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 8, "position_embedding_size": 64}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma4Config(text_config=text, vision_config=vision, audio_config=None))
    assert getattr(model.config, "final_logit_softcapping", None) is None
    batch = _batch(tiny_tokenizer, packed=False, weighted=False)
    losses = [batch_loss(model, batch, seq2seq=False, logits_at_labels=True, chunk_tokens=chunk).item()
              for chunk in (None, 3)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    model.config.text_config.final_logit_softcapping = None  # the cap matters here: without it the loss is another
    assert abs(batch_loss(model, batch, seq2seq=False, logits_at_labels=True).item() - losses[0]) > 1e-3


def test_logits_that_are_not_the_heads_output_are_refused(tiny_tokenizer):
    """Falcon-H1 multiplies its LM head's output by lm_head_multiplier, a name output_head does not list: the
    chunks of the bare head would train on another loss, silently. Refused; at multiplier 1 it trains."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "falcon_h1", vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
        mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16, lm_head_multiplier=3.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    batch = _batch(tiny_tokenizer, packed=False, weighted=False)
    with pytest.raises(TrainingError, match=r"loss_chunk_tokens is not supported for FalconH1ForCausalLM"):
        batch_loss(model, batch, seq2seq=False, logits_at_labels=True, chunk_tokens=3)
    model.model.lm_head_multiplier = 1.0
    losses = [batch_loss(model, batch, seq2seq=False, logits_at_labels=True, chunk_tokens=chunk).item()
              for chunk in (None, 3)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_scaled_logits_are_refused(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer)
    model.config.logit_scale = 0.5  # as Cohere's config has: logits the chunks would not reproduce
    with pytest.raises(TrainingError, match=r"loss_chunk_tokens.*logit_scale"):
        batch_loss(model, _batch(tiny_tokenizer, True, False), seq2seq=False, logits_at_labels=True, chunk_tokens=4)


def test_training_with_chunks_gives_the_same_steps(tiny_tokenizer, tmp_path):
    dataset, settings = tokenized(make_examples(16), tiny_tokenizer)
    runs = []
    for chunk in (None, 5):
        model = build_tiny_llama(tiny_tokenizer)
        result = train(model, tiny_tokenizer, TrainData(dataset), train_config(max_steps=3, loss_chunk_tokens=chunk),
                       tmp_path / str(chunk), TrainOptions(settings=settings, is_seq2seq=False, show_progress=False))
        runs.append(([r["loss"] for r in result.history if r["event"] == "train"], model))
    # fp32 rounding only: the tied embedding's gradient rows are added into the head's gradient in another
    # order (sparse rows into .grad, train/loss.py) than autograd's dense sum; 1e-6 relative is ~8 fp32 ulps.
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-6, abs=0)
    for (name, p), q in zip(runs[0][1].named_parameters(), runs[1][1].parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=name)


def test_tied_embedding_keeps_one_vocabulary_sized_gradient(tiny_tokenizer):
    """Tied head + embedding: backward allocates ONE [vocab, hidden] tensor (the weight's .grad, the head's
    part added into it), not also a dense embedding gradient and their sum (train/loss.py docstring); the
    embedding's `sparse` flag is as it was afterwards, and .grad is a plain dense tensor."""
    model = build_tiny_llama(tiny_tokenizer).train()
    embedding = model.get_input_embeddings()
    assert embedding.weight is model.get_output_embeddings().weight
    full = embedding.weight.numel() * embedding.weight.element_size()
    batch = _batch(tiny_tokenizer, True, False)
    loss = batch_loss(model, batch, seq2seq=False, logits_at_labels=True, chunk_tokens=3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    vocab_sized = [e.name for e in prof.events() if e.self_cpu_memory_usage >= full]
    assert len(vocab_sized) == 1, vocab_sized
    assert embedding.sparse is False
    assert embedding.weight.grad.layout == torch.strided and embedding.weight.grad.shape == embedding.weight.shape
