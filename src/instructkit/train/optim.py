"""The optimizer and the learning-rate schedule.

`train.optimizer` picks the update rule; all skip weight decay on 1-D tensors (biases, norms):

    adamw       torch AdamW, fused (one kernel for all parameters, CPU and CUDA): two fp32 moments,
                8 bytes per trainable parameter
    adamw_8bit  bitsandbytes AdamW8bit (pip install 'instructkit[lowbit]'): both moments in 8 bits with a
                float32 scale per 256 values, ~2.03 bytes per parameter; tensors under 4,096 values keep
                fp32 moments (bitsandbytes' min_8bit_size), and so do the embedding matrices unless
                `train.embedding_optim_bits: 8`: transformers' Trainer registers the same 32-bit override
                for every nn.Embedding under its bitsandbytes optimizers, as bitsandbytes' StableEmbedding
                does (rare tokens' rows get rare, large updates that 8-bit moments quantize badly)
    adafactor   transformers.Adafactor at a fixed lr (relative_step, scale_parameter and warmup_init off, no
                first moment): a row and a column second-moment vector per matrix, ~0 bytes per parameter

Measured here (1 thread, 12 matrices of 2048 x 2048 = 50.3 M parameters, steady step; benchmarks/
bench_memory.py notes): fused AdamW 0.11 s, bitsandbytes AdamW8bit 1.90 s, torchao 0.18 AdamW8bit 2.49 s
(and 48 s of torch.compile on its first step), Adafactor 0.58 s. On one 262,144 x 640 matrix (Gemma 3's
embedding): bitsandbytes 12-15 s, torchao 52 s. Hence bitsandbytes: faster, and no compiler needed.
torchao's FP8-state AdamWFp8 (e4m3 moments, a scale per 256 values; torchao 0.18, 2026-12-01,
benchmarks/bench_optim_step.py, side by side, 1 thread, on a loaded machine): 0.67x the time of
`adamw_8bit` here on the same 50.3 M values (36 vs 54 ns a value; fused AdamW 2.2 ns), after ~20 s of
torch.compile per tensor shape on a cold cache. That would take ~2.7 s off Gemma-3-270M's 31-35 s
memory-lean step: not the 5-10x that would let one setting meet the memory and the time goals together,
for a compiler at run time and another state format; adamw_8bit stays on bitsandbytes.

bitsandbytes' CPU update dequantizes a whole tensor's moments to fp32 before re-quantizing them (about 5
fp32 copies of the tensor at once: 3.6 GB for that embedding). `LowBitAdamW` runs it over slices of
SLICE_VALUES values (whole 256-value quantization blocks, so every value gets the very same update), which
bounds that transient to ~5 x 4 MB. Tensors whose moments bitsandbytes keeps in fp32 (the embedding by
default, tensors under 4,096 values) are updated on CPU by torch's fused AdamW kernel on bitsandbytes' own
state tensors: the same rule as `adamw`, ~15x faster than bitsandbytes' 32-bit CPU update (0.033 s vs 0.51 s
on SmolLM2's 49,152 x 576 embedding, 1 thread), with no whole-tensor temporaries.

`train.optimizer_in_backward` wraps any of them in train/in_backward.InBackwardOptimizer.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.adamw import adamw as functional_adamw

from instructkit.config import TrainConfig
from instructkit.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

SLICE_VALUES = 1 << 20  # values per bitsandbytes CPU update call (a multiple of its 256-value blocks)
QUANT_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer block


def param_groups(model: torch.nn.Module, weight_decay: float, *,
                 embedding_optim_bits: int | None = None) -> list[dict[str, Any]]:
    """The trainable parameters in groups: weight matrices (decayed) and 1-D tensors (not decayed).

    `embedding_optim_bits`: the nn.Embedding weights (a tied LM head is the same tensor) go in a group of
    their own, decayed, with that "optim_bits" (read by adamw_8bit; see the module docstring).
    Raises TrainingError when nothing is trainable.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    apart = set()
    if embedding_optim_bits is not None:
        apart = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in trainable if p.ndim >= 2 and id(p) not in apart]
    embeddings = [p for p in trainable if id(p) in apart]
    no_decay = [p for p in trainable if p.ndim < 2 and id(p) not in apart]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": embeddings, "weight_decay": weight_decay, "optim_bits": embedding_optim_bits},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise TrainingError("the model has no trainable parameters (all frozen?)")
    return groups


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names over the model's trainable parameters (see the module docstring).

    With `cfg.optimizer_in_backward`: an InBackwardOptimizer holding one such optimizer per parameter,
    applied by gradient hooks (train/in_backward.py). Raises ConfigError when adamw_8bit is asked for
    without bitsandbytes installed, TrainingError when nothing is trainable.
    """
    bits = cfg.embedding_optim_bits if cfg.optimizer == "adamw_8bit" else None
    groups = param_groups(model, cfg.weight_decay, embedding_optim_bits=bits)
    build = optimizer_factory(cfg.optimizer, cfg.lr)
    if cfg.optimizer_in_backward:
        from instructkit.train.in_backward import InBackwardOptimizer

        return InBackwardOptimizer(groups, build, release_free_memory=cfg.release_free_memory)
    return build(groups)


def optimizer_factory(name: str, lr: float) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    """`groups -> optimizer` for train.optimizer `name` ("adamw", "adamw_8bit", "adafactor") at peak `lr`."""
    if name == "adamw":
        return lambda groups: _fused_adamw(groups, lr)
    if name == "adamw_8bit":
        cls = low_bit_adamw_class()
        return lambda groups: cls(groups, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return lambda groups: Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False,
                                        warmup_init=False)
    raise ConfigError(f"train.optimizer={name!r}: expected adamw, adamw_8bit or adafactor")


def _fused_adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError) as exc:
        logger.info("fused AdamW unavailable here (%s); using the default implementation", exc)
        return torch.optim.AdamW(groups, lr=lr)


@functools.cache
def low_bit_adamw_class() -> type:
    """bitsandbytes' AdamW8bit with its CPU update run slice by slice (`LowBitAdamW`).

    Raises ConfigError when bitsandbytes is not installed.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:
        raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes: pip install 'instructkit[lowbit]' "
                          f"(or 'bitsandbytes>=0.50,<0.51'); import failed: {exc}") from None

    class LowBitAdamW(bnb.optim.AdamW8bit):
        """AdamW8bit; on CPU, 8-bit tensors over SLICE_VALUES values are updated SLICE_VALUES at a time and
        fp32-moment tensors by torch's fused AdamW; a param group's "optim_bits" (8 or 32) overrides the
        optimizer's for its tensors."""

        def get_config(self, gindex: int, pindex: int, group: dict) -> dict:
            config = super().get_config(gindex, pindex, group)
            if "optim_bits" in group:
                config["optim_bits"] = group["optim_bits"]
            return config

        @torch.no_grad()
        def update_step(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
            plain = p.device.type == "cpu" and self.args.max_unorm <= 0  # no update-norm clipping
            if plain and self.state[p]["state1"].dtype == torch.float32:
                return self._fused_32bit_update(group, p, gindex, pindex)
            if not plain or p.numel() <= SLICE_VALUES:
                return super().update_step(group, p, gindex, pindex)
            state, config = self.state[p], self.get_config(gindex, pindex, group)
            state["step"] += 1
            values, grads = p.data.contiguous().view(-1), p.grad.contiguous().view(-1)
            first, second = state["state1"].view(-1), state["state2"].view(-1)
            beta1, beta2 = config["betas"][:2]
            for start in range(0, values.numel(), SLICE_VALUES):
                end = min(start + SLICE_VALUES, values.numel())
                blocks = slice(start // QUANT_BLOCK, math.ceil(end / QUANT_BLOCK))
                bnb_functional.optimizer_update_8bit_blockwise(
                    self.optimizer_name, grads[start:end], values[start:end], first[start:end],
                    second[start:end], beta1, beta2, 0.0, 0.0, config["eps"], state["step"], config["lr"],
                    state["qmap1"], state["qmap2"], state["absmax1"][blocks], state["absmax2"][blocks],
                    config["weight_decay"], gnorm_scale=1.0, skip_zeros=config["skip_zeros"])
            if values.data_ptr() != p.data.data_ptr():  # p was not contiguous: write the update back
                p.data.copy_(values.view_as(p))
            return None

        def _fused_32bit_update(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
            """fp32 moments (state1 = m, state2 = v, as bitsandbytes keeps them): torch's fused AdamW
            kernel, the default optimizer's update, in place and without whole-tensor temporaries."""
            state, config = self.state[p], self.get_config(gindex, pindex, group)
            step = torch.tensor(float(state["step"]))  # the kernel adds 1, as bitsandbytes' counter does
            state["step"] += 1
            functional_adamw([p.data], [p.grad], [state["state1"]], [state["state2"]], [], [step],
                             fused=True, amsgrad=False, beta1=config["betas"][0], beta2=config["betas"][1],
                             lr=config["lr"], weight_decay=config["weight_decay"], eps=config["eps"],
                             maximize=False)

    return LowBitAdamW


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Warmup rises (step + 1) / (warmup + 1), so step 0 already learns; then linear decays to 0 at `total`,
    cosine follows half a cosine, constant stays 1. total 100, warmup 5: steps 0..4 -> 1/6 .. 5/6,
    step 5 -> 1.0, step 99 (linear) -> 1 - 94/95 = 0.011.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def warmup_steps(ratio: float, total: int) -> int:
    """Optimizer steps of warmup: `ratio` x `total` rounded, and at least 1 when `ratio` > 0 (a short run must
    not silently lose the warmup it asked for: 0.05 x 9 steps rounds to 0). 0.05 x 264 -> 13."""
    return max(1, round(ratio * total)) if ratio > 0 else 0


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(cfg.warmup_ratio, total_steps)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup, cfg.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
