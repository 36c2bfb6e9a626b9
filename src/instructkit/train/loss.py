"""The loss of a micro-batch and the validation loss: cross-entropy at the label positions only.

Logits are computed only at positions whose next token is a label (`logits_to_keep` with a boolean
[B, T] mask, or a 1-D column index on transformers releases without one): 3 label tokens after a
200-token prompt skip ~98% of a 49k-wide LM head.

Chunked (`train.loss_chunk_tokens`, causal models): the model's forward runs with its LM head fed one
position per row (a forward pre-hook on the head keeps the head's input, the final hidden states at the kept
positions, and hands the head the first of them), then `ChunkedHeadCrossEntropy` runs the head and the
cross-entropy over the labelled positions `chunk_tokens` at a time, forward and again in backward: at most
one chunk's logits exist at any moment, and the head's weight gradient is one buffer added into. The
forward still goes through the model (and any DDP/PEFT wrapper), so its hooks and gradients are the usual
ones; the model's own logits at that one position must equal the chunks' (`check_head_reproduced`), so a
model that scales or caps its head's output in a way the chunks do not reproduce is refused, not trained
on another loss. Gemma 3, 4 x 256 tokens with 256-token completions: the logits of all 1,024 labelled positions take
4 x 1.07 GB; chunks of 64 take ~3 x 0.07 GB.

Tied embeddings (the head's weight IS the input embedding's, trainable, one process): autograd would sum the
head's [V, H] gradient and the embedding's dense [V, H] gradient in a third full-size tensor before it reaches
`.grad` (0.67 GB each in Gemma 3, alive at once at the very end of backward: the step's peak). Instead the
head's backward adds its gradient straight into `weight.grad`, and the embedding runs with `sparse=True` for
that forward (restored after), so its gradient is [tokens, H] rows that AccumulateGrad adds into `.grad` in
place. One vocabulary-sized gradient exists in all; `.grad` is complete, as usual, when the weight's
post-accumulate-grad hooks run (the embedding's part comes last in backward), so in-backward updates see it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

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
               chunk_tokens: int | None = None, unweighted: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over the batch's target tokens of weight x cross-entropy: a scalar, NOT yet normalised.

    `unweighted`: when the batch has class weights (`target_weights`), the plain sum of cross-entropy over
    the same tokens (detached, 0-d fp32) is appended to it: the train loss comparable with the validation
    loss, which is unweighted.

    Causal with `logits_at_labels`: the model returns logits only where `target_mask` is True ([N, V]).
    Otherwise the full [B, T, V] logits are computed and the same positions picked. Seq2seq: the model
    builds decoder inputs from `labels`; every label position is a target. `chunk_tokens` (causal only):
    the head and loss run that many labelled positions at a time (see the module docstring).
    """
    if chunk_tokens and not seq2seq:
        return chunked_loss(model, batch, chunk_tokens, logits_at_labels, unweighted)
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
        ce = F.cross_entropy(logits.float(), batch.targets, reduction="none")
        loss = (ce * batch.target_weights).sum()
        if unweighted is not None and not batch.dummy:
            unweighted.append(ce.detach().sum())
    return loss * 0.0 if batch.dummy else loss


def chunked_loss(model: torch.nn.Module, batch: Batch, chunk_tokens: int, logits_at_labels: bool,
                 unweighted: list[torch.Tensor] | None = None) -> torch.Tensor:
    """batch_loss's value, with the LM head and cross-entropy run over `chunk_tokens` labelled positions at a
    time (recomputed in backward); `unweighted` as batch_loss's. Raises TrainingError for a model whose head
    the loss cannot reproduce."""
    head = output_head(model)
    softcap = final_logit_softcapping(head_owner(model))
    captured: list[torch.Tensor] = []

    def keep_input(module: torch.nn.Module, args: tuple) -> tuple:
        if not args:
            raise TrainingError("train.loss_chunk_tokens: this model calls its LM head with keyword arguments; "
                                "set train.loss_chunk_tokens: null")
        captured.append(args[0])
        return (args[0][..., :1, :],) + tuple(args[1:])  # the model's own head runs on one position (checked)

    tied = tied_input_embedding(model, head) if torch.is_grad_enabled() else None
    handle = head.register_forward_pre_hook(keep_input)
    try:
        keep = {"logits_to_keep": batch.target_mask} if logits_at_labels and boolean_logits_to_keep() else {}
        with sparse_lookup(tied):
            output = model(**batch.inputs, use_cache=False, **keep)
    finally:
        handle.remove()
    hidden = captured[0]
    check_head_reproduced(model, getattr(output, "logits", None), hidden[..., :1, :], head, softcap)
    hidden = hidden if hidden.ndim == 2 else hidden[batch.target_mask]  # [N, H], in `targets` order
    plain = [] if unweighted is not None and batch.target_weights is not None and not batch.dummy else None
    total = ChunkedHeadCrossEntropy.apply(hidden, head.weight, head.bias, batch.targets, batch.target_weights,
                                          chunk_tokens, softcap, tied is not None, plain)
    if plain is not None:
        unweighted.append(plain[0])  # type: ignore[union-attr]
    return total * 0.0 if batch.dummy else total


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum_i w_i x CE(softcap(hidden_i @ W^T + b), target_i), computed `chunk` rows at a time.

    Forward keeps nothing vocabulary-wide: only `hidden` [N, H] (and the targets) are saved. Backward
    recomputes each chunk's logits, turns them into their gradient in place (softmax - one-hot), and adds
    the chunk's weight gradient into ONE [V, H] buffer with addmm_: one LM-head-sized gradient in all, where
    autograd, summing per-chunk gradients of a tied head (non-contiguous transposes), would hold three.
    `plain` (a list, with weights): the unweighted sum of cross-entropy is appended to it (detached).
    `into_grad` (tied embeddings, see the module docstring): that buffer is `weight.grad` itself (created
    as zeros when None) and autograd gets no weight gradient. Matmuls run in the autocast dtype when
    autocast is on (as the model's own head would), the softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, chunk, softcap, into_grad=False, plain=None):
        ctx.dtype = _autocast_dtype(hidden) or hidden.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        plain_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], weight, bias, softcap, ctx.dtype)[0]
            ce = F.cross_entropy(logits, targets[rows], reduction="none")
            total += (ce if weights is None else ce * weights[rows]).sum()
            if plain is not None:
                plain_total += ce.detach().sum()
        if plain is not None:
            plain.append(plain_total)
        ctx.save_for_backward(hidden, weight, bias, targets, weights)
        ctx.chunk, ctx.softcap = chunk, softcap
        ctx.grad_owner = weight if into_grad else None  # the leaf whose .grad backward adds into
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets, weights = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        owner = ctx.grad_owner
        if owner is not None and need_weight:
            if owner.grad is None:
                owner.grad = grad_weight
            grad_weight = owner.grad
        grad_bias = torch.zeros_like(bias) if need_bias and bias is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            grad, capped = _chunk_logits(hidden[rows], weight, bias, ctx.softcap, ctx.dtype)
            grad = grad.softmax(dim=-1)
            grad[torch.arange(grad.shape[0], device=grad.device), targets[rows]] -= 1.0
            scale = grad_total if weights is None else grad_total * weights[rows, None]
            grad.mul_(scale)
            if capped is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2
                grad.mul_(1.0 - capped.square())
            if grad_hidden is not None:
                grad_hidden[rows] = (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t().to(weight.dtype), hidden[rows].to(weight.dtype))
            if grad_bias is not None:
                grad_bias += grad.sum(0).to(bias.dtype)
        if owner is not None:
            grad_weight = None  # already in owner.grad
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def tied_input_embedding(model: torch.nn.Module, head: torch.nn.Linear) -> torch.nn.Embedding | None:
    """The model's input embedding when it shares `head`'s trainable weight and its gradient can go straight
    into `.grad` (one process: DDP / FSDP2 reduce gradients through autograd's own accumulation); else None."""
    owner = head_owner(model)
    embedding = owner.get_input_embeddings() if hasattr(owner, "get_input_embeddings") else None
    if not isinstance(embedding, torch.nn.Embedding) or embedding.weight is not head.weight:
        return None
    if not head.weight.requires_grad or type(head.weight) is not torch.nn.Parameter:
        return None
    several = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    return None if several else embedding


@contextlib.contextmanager
def sparse_lookup(embedding: torch.nn.Embedding | None) -> Iterator[None]:
    """`embedding.sparse = True` inside the block (its gradient: looked-up rows only), then as it was."""
    if embedding is None:
        yield
        return
    was = embedding.sparse
    embedding.sparse = True
    try:
        yield
    finally:
        embedding.sparse = was


def _autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk (softcapped), and tanh(raw / softcap) when capped (for the backward)."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


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


def final_logit_softcapping(owner: torch.nn.Module) -> float | None:
    """The model's `final_logit_softcapping` (Gemma 2, Gemma 3n, ...), read from its text config as transformers'
    multimodal models read it (Gemma 3n's and Gemma 4's top config has none; it sits in `text_config`)."""
    config = getattr(owner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None)


@torch.no_grad()
def check_head_reproduced(model: torch.nn.Module, logits: torch.Tensor | None, hidden: torch.Tensor,
                          head: torch.nn.Linear, softcap: float | None) -> None:
    """Raise TrainingError when the model's own logits at one position ([..., 1, V], its head run on `hidden`
    [..., 1, H]) differ from what the chunks compute there: the model changes its head's output in a way
    chunked_loss does not reproduce (Falcon-H1 multiplies it by lm_head_multiplier; any softcap, scale or
    vocabulary cut a config does not name where output_head looks), and the loss would be another one, silently
    (the fused-cross-entropy fault of apple/ml-cross-entropy#48 and Liger-Kernel#127: Gemma 2's softcap left
    out). Tolerance: 1e-4 of the largest logit in fp32, 2e-2 under half-precision autocast (a few bf16 ulps)."""
    if logits is None or hidden.numel() == 0:
        return
    dtype = _autocast_dtype(hidden) or hidden.dtype
    ours = _chunk_logits(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, softcap, dtype)[0]
    theirs = logits.detach().float().reshape(-1, logits.shape[-1])
    tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * max(1.0, ours.abs().max().item())
    if theirs.shape != ours.shape or (theirs - ours).abs().max().item() > tolerance:
        raise TrainingError(f"train.loss_chunk_tokens is not supported for {type(head_owner(model)).__name__}: its "
                            "logits are not its LM head's output (or that softcapped), so the chunks would compute "
                            "another loss; set train.loss_chunk_tokens: null")


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
