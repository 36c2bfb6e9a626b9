"""The same examples in every optimizer step, for every system of bench_train.py.

Each system's own sampler (instructkit's seeded length-grouped step groups, the Trainer's
LengthGroupedSampler, TRL's BFD packs drawn at random) puts different examples into each step, and with
a random-init model and a linear schedule the order alone moves the loss after one epoch by several
percent (issue 14: 2.5% between instructkit and the Trainer, the loops themselves being equal). So the
loss goal compares loops only when every system trains on one plan: instructkit's own, which `train()`
builds from (lengths, batch size, seed) and which is replayed here; the Trainer and TRL read it through
`planned(...)`, a subclass whose train dataloader yields those groups as batches.
"""

from __future__ import annotations

from typing import Any


def instructkit_plan(lengths: list[int], batch_size: int, max_length: int, seed: int, device: str,
                     model_config: Any, cfg: Any) -> tuple[Any, int]:
    """The BatchPlan `train.loop.setup` builds for these settings, and its pad multiple."""
    from instructkit.data.sampler import BatchPlan, attention_tokens_of
    from instructkit.train.compile import pad_multiple

    multiple = pad_multiple(cfg.pad_to_multiple_of, device)
    plan = BatchPlan(batch_size=batch_size, grad_accum=1, world_size=1, packing=cfg.packing,
                     max_tokens=cfg.max_tokens_per_batch or batch_size * max_length,
                     attention_tokens=attention_tokens_of(model_config), group_by_length=cfg.group_by_length,
                     seed=seed, pad_to_multiple_of=multiple)
    return plan, multiple


def planned_steps(lengths: list[int], plan: Any, steps: int | None) -> list[list]:
    """plan_step results of the first `steps` optimizer steps, epochs chained (None: one whole epoch).
    Each is [micro-batches of process 0]: lists of rows of example indices."""
    import numpy as np

    from instructkit.data.sampler import plan_epoch

    array = np.array(lengths)
    out: list[list] = []
    epoch = 0
    while True:
        epoch_plan = plan_epoch(array, plan, epoch, None)
        out += list(epoch_plan)
        epoch += 1
        if steps is None:
            return out
        if len(out) >= steps:
            return out[:steps]


def step_examples(steps: list[list]) -> list[list[int]]:
    """The example indices of each planned step (process 0), in plan order: 8 each but an epoch's last."""
    return [[i for mb in step[0] for row in mb for i in row] for step in steps]


def planned(trainer_class: type) -> type:
    """`trainer_class` (transformers Trainer or TRL SFTTrainer) whose training batches are `step_groups`,
    one batch per optimizer step, in order (`Trainer.get_train_dataloader` is the documented override)."""

    class PlannedTrainer(trainer_class):
        def __init__(self, *args: Any, step_groups: list[list[int]], **kwargs: Any):
            self.step_groups = step_groups
            super().__init__(*args, **kwargs)

        def get_train_dataloader(self) -> Any:
            from torch.utils.data import DataLoader

            if len(self.train_dataset) <= max(i for g in self.step_groups for i in g):
                raise SystemExit(f"{trainer_class.__name__}: its dataset has {len(self.train_dataset)} rows, "
                                 "fewer than the planned examples (did it drop or pack any?)")
            loader = DataLoader(self.train_dataset, batch_sampler=self.step_groups, collate_fn=self.data_collator,
                                num_workers=0)
            return self.accelerator.prepare(loader)

    PlannedTrainer.__name__ = f"Planned{trainer_class.__name__}"
    return PlannedTrainer
