"""The loss of a micro-batch and the validation loss: cross-entropy at the label positions only.

Logits are computed only at positions whose next token is a label (`logits_to_keep` with a boolean
[B, T] mask, or a 1-D column index on transformers releases without one): 3 label tokens after a
200-token prompt skip ~98% of a 49k-wide LM head.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from instructkit.data.batching import Batch, collate
from instructkit.train.distributed import all_reduce_sum, to_device
from instructkit.train.state import Run


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    """True when the (base) model's forward takes `logits_to_keep` (Llama, Gemma3, ... in transformers 5)."""
    import inspect

    base = model
    while True:
        inner = getattr(base, "module", None) or (base.get_base_model() if hasattr(base, "get_base_model") else None)
        if inner is None or inner is base:
            break
        base = inner
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@functools.cache
def boolean_logits_to_keep() -> bool:
    """True when transformers takes a [B, T] boolean `logits_to_keep` (its `slice_logits_to_keep` helper,
    transformers >= 5.2x); older 5.x releases index `hidden_states[:, logits_to_keep]` and need a 1-D index."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def batch_loss(model: torch.nn.Module, batch: Batch, *, seq2seq: bool, logits_at_labels: bool) -> torch.Tensor:
    """Sum over the batch's target tokens of weight x cross-entropy: a scalar, NOT yet normalised.

    Causal with `logits_at_labels`: the model returns logits only where `target_mask` is True ([N, V]).
    Otherwise the full [B, T, V] logits are computed and the same positions picked. Seq2seq: the model
    builds decoder inputs from `labels`; every label position is a target.
    """
    if seq2seq or not logits_at_labels:
        logits = model(**batch.inputs, use_cache=False).logits[batch.target_mask]
    elif boolean_logits_to_keep() and batch.target_mask.shape[0] > 1:
        logits = model(**batch.inputs, use_cache=False, logits_to_keep=batch.target_mask).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        # The columns labelled in any row, as a 1-D index (every transformers 5 release takes it); on a
        # packed one-row batch these are exactly the labelled positions.
        columns = batch.target_mask.any(dim=0).nonzero().squeeze(1)
        logits = model(**batch.inputs, use_cache=False, logits_to_keep=columns).logits
        logits = logits[batch.target_mask[:, columns]]
    if batch.target_weights is None:
        loss = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
    else:
        loss = (F.cross_entropy(logits.float(), batch.targets, reduction="none") * batch.target_weights).sum()
    return loss * 0.0 if batch.dummy else loss


@torch.no_grad()
def validation_loss(run: Run, micro_batches: Sequence[Sequence]) -> tuple[float, int]:
    """Token-weighted mean cross-entropy of the label tokens over all processes, and their count.

    `micro_batches`: this process's share of `plan_eval` (rows of validation example indices). Only the
    logits at labels are computed (or kept, one micro-batch at a time): no full-vocabulary logits for the
    whole split. The loss is nan when the split has no label token.
    """
    accelerator = run.accelerator
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    for mb in micro_batches:
        batch = to_device(collate(run.val_table, list(mb), run.pad_id, seq2seq=run.seq2seq, packed=run.plan.packing),
                          accelerator.device)
        with accelerator.autocast():
            total += batch_loss(run.model, batch, seq2seq=run.seq2seq, logits_at_labels=run.logits_at_labels).double()
        count += batch.n_targets
    loss_sum, n = all_reduce_sum(accelerator, [total.item(), count])
    return (loss_sum / n if n else float("nan")), int(n)
