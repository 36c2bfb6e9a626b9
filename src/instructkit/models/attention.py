"""`sdpa_varlen`: attention over packed rows, one example at a time, for CPUs.

A packed row holds several examples end to end, `position_ids` restarting at 0 for each. transformers'
own sdpa path turns that into a [rows, 1, width, width] block mask and runs one masked attention over the
whole row: width^2 work however short the examples, and on CPU a masked kernel. Here each example (a run
of positions from 0) gets its own causal `scaled_dot_product_attention` call without a mask: the work is
sum_i T_i^2, as with FlashAttention's varlen kernels. Measured at 1 thread on the SmolLM2-135M attention
shape (9 heads, 3 key/value heads, head dim 64), a 1,024-token row of 8 examples of 128: 0.38 s masked,
0.12 s per example (forward + backward). Each row is unbound and split into its examples (not sliced): the
backward is then one stack / cat instead of a zero-filled batch-sized tensor per example and layer; on
3 rows x 150 tokens of 50-token examples, 30 layers, 1 thread: 0.307 -> 0.228 s, gradients bitwise equal.

It is registered with transformers' public `AttentionInterface` / `AttentionMaskInterface` under the name
"sdpa_varlen" (model.attn_implementation; 'auto' picks it on CPU for the architectures in
VARLEN_MODEL_TYPES). Whatever it does not cover goes to transformers' sdpa unchanged: a padding mask
(padded batches, generation), a key/value cache longer than the query, non-causal attention. A sliding
window is applied inside an example longer than the window. The per-example loop reads the segment
starts on the host: right for a CPU, wrong for a GPU (there FlashAttention's varlen kernels do this).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

NAME = "sdpa_varlen"
# Architectures whose attention is plain causal sdpa (no logit softcapping, no attention sinks), tested here.
VARLEN_MODEL_TYPES = frozenset({"llama", "gemma3_text"})


def segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of `positions` (1-D) that starts at 0: the examples of a packed row.

    [0 1 2 0 1 0 1 2 3] -> [(0, 3), (3, 5), (5, 9)]; a row not starting at 0 is one run from its start.
    """
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], int(positions.shape[0])]))


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal mask of one example that also hides keys `window` or more positions back: [length, length]."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril().triu(-(window - 1))


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, T, D], key/value [B, H_kv, T, D] -> ([B, T, H, D], None).

    Each example of each row attends causally to itself (see the module docstring); other cases go to
    transformers' `sdpa_attention_forward` with the arguments as they came.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    causal = getattr(module, "is_causal", True)
    if (attention_mask is not None or positions is None or not causal or query.shape[2] != key.shape[2]
            or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    positions = positions.expand(query.shape[0], -1)
    rows = []
    # unbind + split, not slicing: their backward is one stack / cat, where each slice's backward would
    # zero-fill a tensor of the whole batch's size and add into it (per example, per layer).
    for r, (q_row, k_row, v_row) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        lengths = [end - start for start, end in segments(positions[r])]
        parts = []
        for q, k, v in zip(*(t.unsqueeze(0).split(lengths, dim=2) for t in (q_row, k_row, v_row))):
            length = q.shape[2]
            if window and length > window:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(length, window, q.device),
                                                     dropout_p=dropout, scale=scaling, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling,
                                                     enable_gqa=gqa)
            parts.append(out)
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """transformers mask function: no mask at all when there is no padding mask (packed rows are split by
    `varlen_attention` instead of masked), else transformers' sdpa mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register "sdpa_varlen" with transformers (idempotent); return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME


PROBE_TOKENS = 6  # tokens of each example in the packing probe
ALONE_TOLERANCE = 0.05  # packed against alone, as a share of the largest logit (keeps_packed_examples_apart)


@torch.no_grad()
def keeps_packed_examples_apart(model: torch.nn.Module, one_row: bool) -> bool:
    """Whether `model` reads each example of a packed row as it reads that example alone (attention within
    the example, positions restarting at its position_ids), as train.packing needs; logs a warning when not.

    The probe: two rows whose first examples differ (PROBE_TOKENS tokens each) and whose second examples are
    the same, and that second example alone. When attention stays within each example, the second example's
    logits are the same in both rows; when the model also numbers positions by position_ids, they are those
    of the example alone. The two rows run in the same kernels, so theirs must agree to 1e-3 of the largest
    logit (bitwise on deterministic kernels); the example alone runs in other shapes, which in bf16 round
    differently (0.6% of the largest logit measured on CPU), so it is accepted to ALONE_TOLERANCE (5%): the
    positions misnumbered move tiny GPT-2 and OPT logits by 44-118% of the largest. A model
    whose attention ignores the restarts (in transformers 5: OPT, BLOOM, GPTBigCode under sdpa_varlen, remote
    code without transformers' packed-sequence masks) gives one causal attention over the whole row, so every
    later example reads the earlier ones (the leak of modelscope/ms-swift#4439, huggingface/blog#2307's list
    of models that take position_ids); one that keeps attention apart but numbers positions through the row
    (position embeddings from the row's length, not position_ids) trains each example at positions it never
    has at inference. `one_row`: the rows run as one forward each (FlashAttention's layout,
    data/sampler.one_row_attention), else as one batch. Run on the model as it will train (on its device,
    wrapped by FSDP2: every process calls it), in eval mode (no dropout, no random draw) and eager (not
    compiled); the model is put back in the mode it was in.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or model.get_input_embeddings().num_embeddings
    n = PROBE_TOKENS
    device = next(model.parameters()).device
    tokens = (torch.arange(3 * n, device=device) + 1) % vocab
    rows = torch.stack([torch.cat([tokens[:n], tokens[2 * n:]]), torch.cat([tokens[n:2 * n], tokens[2 * n:]])])
    positions = torch.arange(n, device=device).repeat(2).expand(2, -1)
    training = model.training
    model.eval()
    try:
        batches = [(rows[:1], positions[:1]), (rows[1:], positions[1:])] if one_row else [(rows, positions)]
        batches.append((tokens[None, 2 * n:], positions[:1, :n]))  # the second example alone
        with torch.compiler.set_stance("force_eager"):  # a compiled model: no compilation for the probe
            logits = [model(input_ids=ids, position_ids=pos, use_cache=False).logits.float() for ids, pos in batches]
    finally:
        model.train(training)
    second, alone = torch.cat(logits[:-1])[:, n:], logits[-1][0]
    scale = max(1.0, second.abs().max().item())
    apart = (second[0] - second[1]).abs().max().item() <= 1e-3 * scale
    restarted = apart and (second - alone).abs().max().item() <= ALONE_TOLERANCE * scale
    if not restarted:
        why = ("attends across the examples of a packed row (it ignores the position_ids restarts), so each example "
               "would read the ones before it") if not apart else (
               "numbers positions through a packed row instead of by its position_ids, so each example would "
               "train at positions it never has alone")
        logger.warning("train.packing is off: %s (attention %s) %s; training on padded rows instead",
                       type(model).__name__, getattr(config, "_attn_implementation", None), why)
    return restarted
