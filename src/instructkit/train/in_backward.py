"""The optimizer step inside the backward pass (`train.optimizer_in_backward`), after torchtune.

Each trainable parameter gets its own optimizer (the class train.optimizer names, with its group's
settings) and a `register_post_accumulate_grad_hook`. While armed, the hook runs as soon as autograd has
accumulated the parameter's whole gradient: it steps that parameter's optimizer and sets `.grad = None`.
So the full set of gradients never exists at once: at any moment only the gradients still being
produced are alive (for a tied embedding, the one vocab x hidden gradient).

Why it is the same update as the ordinary step:

- A parameter's hook fires once per backward, after every use of it in the graph has added its part (a
  tied weight's two uses included), and nothing later in backward reads the parameter again.
- The hooks are armed only during the LAST micro-batch of a step. Earlier micro-batches (grad_accum > 1,
  or a packed step that did not fit one micro-batch) accumulate into `.grad` as usual; the hook then
  sees the summed gradient, which the loss normalisation in train/step.py makes the step's gradient.
  Such steps save nothing on gradients (they all exist after the first micro-batch); the result is
  identical. A parameter that got its gradient in an earlier micro-batch but is not used in the last
  one (an MoE expert no token of the last micro-batch was routed to, any input-dependent branch) fires
  no hook then: leaving `armed()` / `measuring()` applies (or measures) every parameter still holding a
  gradient, so it is updated and counted in the global norm as the ordinary step would.
- The learning rate: the schedule drives this object's param_groups; each hook copies its group's lr
  into the parameter's optimizer before stepping.

Clipping by the global gradient norm (`max_grad_norm`), as LOMO does it (Lv et al. 2023, "Full Parameter
Fine-tuning for Large Language Models with Limited Resources", section 3.3): the global norm is known only
once every gradient exists, so train/step.py runs the step's forward and backward passes twice. In the first,
`measuring()`, each hook records its parameter's gradient norm and frees the gradient without updating
anything; `clip_coef()` turns the norms into torch.nn.utils.clip_grad_norm_'s coefficient, from the same
per-tensor norms stacked in the same order (model.parameters(), grouped by device and dtype as
torch.nn.utils.get_total_norm groups them), so the same bits, mixed-dtype models included. The second pass, `armed(coef)`,
scales each gradient by it and steps: the update is the ordinary clipped step's, for twice the forward and
backward compute (dropout replays: the first pass runs on a forked RNG). Without clipping
(`max_grad_norm: null`) one pass does; the README measures what that costs in quality.

What it cannot do: the fp16 grad scaler, and DDP (a hook fires before DDP has averaged the gradient;
refused under several processes: train/sharding.check_processes). The global norm is reported either way: with clipping the
measured total (clip_grad_norm_'s), without it the hooks add up each gradient's squared norm before
applying it. A forward pass that changes buffers (BatchNorm's running statistics; none in the decoder
and encoder-decoder models instructkit trains) would change them twice under clipping.

Memory (`release_free_memory`, train.release_free_memory on CPU): the C allocator's free pages go back to
the system (train/allocator.py) (a) just before the largest parameter's update (Gemma 3's tied embedding,
last in backward: its 0.67 GB gradient, its new 8-bit states on the first step) and (b) after every
`RELEASE_EVERY_BYTES` of gradients applied and freed. Without (b) the heap grows by about one decoder
layer's gradients per layer of backward (freed blocks split by the next layer's temporaries are not
reused: 0.45 GB over Gemma 3's 18 layers), and the step's peak comes at the end of backward.
Measured (bench_memory.py child, Gemma-3-270M lean + checkpointing, batch 4 x 256, 3 steps, 1 thread):
peak 3.68 / 3.64 GB with (a) alone, 3.38 / 3.39 GB with a trim every 8 updates (about 2/3 of a layer, 15
MB), 3.45 GB every 24, 3.39 GB after every update; CPU time per step within the run-to-run noise at every
8 (35.4 / 32.6 s vs 35.6 / 33.3 s, interleaved), 15-20% more after every update (the freed pages fault
back in). RELEASE_EVERY_BYTES = 16 MB (2-3 releases per Gemma 3 layer): 3.39 GB in bench_memory.py's run
(benchmarks/results/memory.json), the HF Trainer 9.13 GB in the same run.

Checkpoints see one optimizer: `state_dict()` numbers the parameters' states 0, 1, ... in param_groups
order, as the ordinary optimizer of the same class would, so a checkpoint loads either way.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype  # clip_grad_norm_'s own grouping

from instructkit.train.allocator import release_free_memory

RELEASE_EVERY_BYTES = 16 * 2**20  # gradient bytes applied between two releases (module docstring)


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by gradient hooks while `armed()`; `step()` does nothing.

    `groups`: param groups as for any torch optimizer; `build(groups) -> optimizer` makes the inner ones.
    `release_free_memory`: return free C-allocator memory before updating the largest CPU parameter and
    after every RELEASE_EVERY_BYTES of gradients applied (module docstring).
    """

    def __init__(self, groups: list[dict[str, Any]], build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
                 release_free_memory: bool = False):
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        defaults: dict[str, Any] | None = None
        for group in groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self._inner[p] = build([{**settings, "params": [p]}])
                defaults = defaults or dict(self._inner[p].defaults)
        super().__init__(groups, defaults or {})
        self._group_index = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
        self._armed = False
        self._measuring = False
        self._coef: torch.Tensor | None = None
        self._squares: list[torch.Tensor] = []
        self._norms: dict[torch.Tensor, torch.Tensor] = {}
        params = [p for group in self.param_groups for p in group["params"]]
        self._release_before = max(params, key=torch.Tensor.numel) if release_free_memory and params else None
        self._release_often = release_free_memory
        self._freed_bytes = 0  # gradient bytes applied and freed since the last release
        ref = weakref.ref(self)
        handles = [p.register_post_accumulate_grad_hook(lambda param, ref=ref: _apply(ref, param))
                   for group in self.param_groups for p in group["params"]]
        weakref.finalize(self, _remove, handles)  # inert hooks go with the optimizer

    @contextlib.contextmanager
    def armed(self, clip_coef: torch.Tensor | None = None) -> Iterator[None]:
        """Apply updates in the backward passes run inside this block (and restart `grad_norm`), each
        gradient multiplied by `clip_coef` (a 0-d tensor from `clip_coef()`) first when given."""
        self._squares = []
        self._armed, self._coef = True, clip_coef
        try:
            yield
            self._flush()
        finally:
            self._armed, self._coef = False, None

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """In the backward passes run inside this block, record each complete gradient's norm and free the
        gradient, updating nothing (the first pass of clipping; module docstring)."""
        self._norms = {}
        self._measuring = True
        try:
            yield
            self._flush()
        finally:
            self._measuring = False

    def _flush(self) -> None:
        """Apply (or measure) each parameter whose gradient came from earlier micro-batches only: no hook
        fired for it in this block's backward, so it still holds its gradient (module docstring)."""
        ref = weakref.ref(self)
        for p in self._params():
            if p.grad is not None:
                _apply(ref, p)

    def clip_coef(self, parameters: Iterable[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(total norm, clip coefficient) of the gradients measured last, as torch.nn.utils.clip_grad_norm_
        computes them over `parameters` (pass model.parameters(): the order of the norms is the order
        of its sum): total = ||(||g_i||)_i||, coef = min(max_norm / (total + 1e-6), 1), 0-d fp32 tensors."""
        norms = [self._norms[p] for p in parameters if p in self._norms]
        if not norms:
            return torch.zeros(()), torch.ones(())
        # get_total_norm's order: the per-tensor norms by (device, dtype) group, each group in order
        grouped = _group_tensors_by_device_and_dtype([norms])
        ordered = [norm.to(norms[0].device) for [group], _ in grouped.values() for norm in group]
        total = torch.linalg.vector_norm(torch.stack(ordered), 2.0)
        return total, torch.clamp(max_norm / (total + 1e-6), max=1.0)

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of all gradients applied in the last `armed()` block (0-d fp32 tensor, no sync)."""
        if not self._squares:
            return torch.zeros(())
        return torch.stack(self._squares).sum().sqrt()

    def inner(self, p: torch.Tensor) -> torch.optim.Optimizer:
        """The optimizer of parameter `p`."""
        return self._inner[p]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Nothing to do: the hooks applied every update during backward."""
        return

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: that parameter's state}, "param_groups": [...]} as one optimizer would have it."""
        packed = super().state_dict()
        state: dict[int, Any] = {}
        for index, p in enumerate(self._params()):
            inner_state = self._inner[p].state_dict()["state"]
            if 0 in inner_state:
                state[index] = inner_state[0]
        packed["state"] = state
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the groups (lr, ...) here and each parameter's state into its own optimizer."""
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        state = state_dict["state"]
        index = 0
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                mine = state.get(index, state.get(str(index)))
                self._inner[p].load_state_dict({"state": {0: mine} if mine is not None else {},
                                                "param_groups": [{**settings, "params": [0]}]})
                index += 1

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]


def _apply(ref: weakref.ref, param: torch.Tensor) -> None:
    """The hook: step `param`'s optimizer on its complete gradient and free the gradient (or, measuring,
    only record the gradient's norm and free it)."""
    owner = ref()
    if owner is None or not (owner._armed or owner._measuring) or param.grad is None:
        return
    cpu = param.device.type == "cpu"
    if owner._measuring:
        with torch.no_grad():  # torch.nn.utils.get_total_norm's per-tensor norm, in the gradient's dtype
            owner._norms[param] = torch.linalg.vector_norm(param.grad.detach(), 2.0)
    else:
        with torch.no_grad():  # a reduction: no gradient-sized temporary (Gemma 3's embedding's is 0.67 GB)
            owner._squares.append(torch.linalg.vector_norm(param.grad.detach(), dtype=torch.float32).square())
            if owner._coef is not None:
                param.grad.mul_(owner._coef.to(param.grad.device))
        if param is owner._release_before and cpu:
            release_free_memory()
            owner._freed_bytes = 0
        inner = owner._inner[param]
        inner.param_groups[0]["lr"] = owner.param_groups[owner._group_index[param]]["lr"]
        inner.step()
    owner._freed_bytes += param.grad.numel() * param.grad.element_size()
    param.grad = None
    if owner._release_often and cpu and owner._freed_bytes >= RELEASE_EVERY_BYTES:
        release_free_memory()
        owner._freed_bytes = 0


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()
