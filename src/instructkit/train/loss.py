"""The loss of a micro-batch and the validation loss: cross-entropy at the label positions only.

Logits are computed only at positions whose next token is a label (`logits_to_keep` with a boolean
[B, T] mask, or a 1-D column index on transformers releases without one): 3 label tokens after a
200-token prompt skip ~98% of a 49k-wide LM head.

Chunked (`train.loss_chunk_tokens`, causal models): the model's forward runs with its LM head fed no
position (a forward pre-hook on the head keeps the head's input, the final hidden states at the kept
positions, and hands the head an empty slice), then the head and the cross-entropy run over the labelled
positions `chunk_tokens` at a time, each chunk under activation checkpointing: only its hidden states are
saved and its logits are recomputed in backward, so at most one chunk's logits exist at any moment. The
forward still goes through the model (and any DDP/PEFT wrapper), so its hooks and gradients are the
usual ones. Gemma 3, 4 x 256 tokens with 256-token completions: the logits of all 1,024 labelled positions
take 4 x 1.07 GB; chunks of 128 take 4 x 0.13 GB.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from instructkit.data.batching import Batch, collate
from instructkit.errors import TrainingError
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


def batch_loss(model: torch.nn.Module, batch: Batch, *, seq2seq: bool, logits_at_labels: bool,
               chunk_tokens: int | None = None) -> torch.Tensor:
    """Sum over the batch's target tokens of weight x cross-entropy: a scalar, NOT yet normalised.

    Causal with `logits_at_labels`: the model returns logits only where `target_mask` is True ([N, V]).
    Otherwise the full [B, T, V] logits are computed and the same positions picked. Seq2seq: the model
    builds decoder inputs from `labels`; every label position is a target. `chunk_tokens` (causal only):
    the head and loss run that many labelled positions at a time (see the module docstring).
    """
    if chunk_tokens and not seq2seq:
        return chunked_loss(model, batch, chunk_tokens, logits_at_labels)
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


def chunked_loss(model: torch.nn.Module, batch: Batch, chunk_tokens: int, logits_at_labels: bool) -> torch.Tensor:
    """batch_loss's value, with the LM head and cross-entropy run over `chunk_tokens` labelled positions at a
    time (recomputed in backward). Raises TrainingError for a model whose head the loss cannot reproduce."""
    head = output_head(model)
    softcap = getattr(getattr(head_owner(model), "config", None), "final_logit_softcapping", None)
    captured: list[torch.Tensor] = []

    def keep_input(module: torch.nn.Module, args: tuple) -> tuple:
        if not args:
            raise TrainingError("train.loss_chunk_tokens: this model calls its LM head with keyword arguments; "
                                "set train.loss_chunk_tokens: null")
        captured.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])  # the model's own head runs on no position

    handle = head.register_forward_pre_hook(keep_input)
    try:
        keep = {"logits_to_keep": batch.target_mask} if logits_at_labels and boolean_logits_to_keep() else {}
        model(**batch.inputs, use_cache=False, **keep)
    finally:
        handle.remove()
    hidden = captured[0]
    hidden = hidden if hidden.ndim == 2 else hidden[batch.target_mask]  # [N, H], in `targets` order
    total = hidden[:0].float().sum()  # 0, in the graph even when there is no labelled position (a dummy)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        weights = None if batch.target_weights is None else batch.target_weights[start:end]
        total = total + checkpoint(_chunk_ce, hidden[start:end], head.weight, head.bias, batch.targets[start:end],
                                   weights, softcap, use_reentrant=False)
    return total * 0.0 if batch.dummy else total


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              weights: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if weights is None:
        return F.cross_entropy(logits, targets, reduction="sum")
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


def head_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / PEFT wrappers (the one with get_output_embeddings and config)."""
    base = model
    for _ in range(8):
        inner = getattr(base, "module", None) or (base.get_base_model() if hasattr(base, "get_base_model") else None)
        if inner is None or inner is base:
            break
        base = inner
    return base


_SCALED_LOGITS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The LM head (a Linear) whose input chunked_loss takes over. Raises TrainingError when the model has
    none, or scales its logits in a way chunked_loss does not reproduce (only Gemma's softcapping is)."""
    owner = head_owner(model)
    head = owner.get_output_embeddings() if hasattr(owner, "get_output_embeddings") else None
    config = getattr(owner, "config", None)
    scaled = [name for name in _SCALED_LOGITS if getattr(config, name, None) not in (None, 1, 1.0)]
    if not isinstance(head, torch.nn.Linear) or scaled:
        why = f"its config scales the logits ({', '.join(scaled)})" if scaled else "no Linear LM head found"
        raise TrainingError(f"train.loss_chunk_tokens is not supported for {type(owner).__name__}: {why}; set "
                            "train.loss_chunk_tokens: null")
    return head


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
            total += batch_loss(run.model, batch, seq2seq=run.seq2seq, logits_at_labels=run.logits_at_labels,
                                chunk_tokens=run.cfg.loss_chunk_tokens).double()
        count += batch.n_targets
    loss_sum, n = all_reduce_sum(accelerator, [total.item(), count])
    return (loss_sum / n if n else float("nan")), int(n)
