"""The reference learning-rate schedule: constant, then cosine decay to ``lr * min_lr_ratio``,
after an optional linear warm-up; and a run's length fitted to a wall-clock budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def lr_factor(step: int, *, total_steps: int, cosine_after: int, min_lr_ratio: float,
              warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < cosine_after or total_steps <= cosine_after:
        return 1.0
    progress = min(1.0, (step - cosine_after) / max(1, total_steps - cosine_after))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(slots=True)
class StepPlan:
    """How many steps a run trains and the step where its cosine decay begins. The schedule reads
    it at every step, so a :class:`StepBudget` may refit both while the run trains."""

    steps: int
    cosine_after: int


def build_optimizer(params, optim_cfg, total_steps: int | StepPlan):
    """Adam plus the schedule as a ``LambdaLR``: ``(optimizer, scheduler)``. ``total_steps``: the
    run's length, or a :class:`StepPlan` whose later changes the schedule follows."""
    plan = total_steps if isinstance(total_steps, StepPlan) else StepPlan(total_steps, optim_cfg.cosine_after)
    # fused: one kernel over every parameter instead of a Python loop of small ones (the tiny step's
    # update took 11 of its ~290 ms with the loop; docs/benchmarks.md "Train step")
    opt = torch.optim.Adam(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay,
                           fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: lr_factor(s, total_steps=plan.steps, cosine_after=plan.cosine_after,
                            min_lr_ratio=optim_cfg.min_lr_ratio, warmup_steps=optim_cfg.warmup_steps),
    )
    return opt, sched


class StepBudget:
    """Fit a run's length to a wall-clock deadline (``train.time_budget_s``).

    ``train.steps`` is the most the run may train. From the steps' measured pace (the mean over
    every step since the first :meth:`update`, validations and checkpoints included), each
    :meth:`update` before the cosine decay begins sets the run's length to the steps that end by
    the deadline, at most the maximum, and moves the decay's start with it so that the decay
    keeps its share of the run (``optim.cosine_after / train.steps``). Once the decay has begun
    the length only shrinks, and only when the pace says the run would end after the deadline:
    the decay then ends sooner (the rate falls faster) instead of being cut off. A run that fits
    its maximum trains exactly the plan it would train without a budget.

    Like Lightning's ``Trainer(max_time=...)``, but the run still ends on a decayed rate, and every
    rank must apply the same plan: the caller broadcasts rank 0's.
    """

    def __init__(self, plan: StepPlan, *, deadline: float, max_steps: int, cosine_after: int,
                 min_pace_steps: int = 20) -> None:
        self.plan = plan
        self.deadline = deadline
        self.max_steps = max_steps
        self.decay_share = cosine_after / max_steps
        self.min_pace_steps = min_pace_steps
        self._anchor: tuple[int, float] | None = None
        self.logged_steps: int | None = None  # the length last reported in the log

    def pace(self, step: int, now: float) -> float | None:
        """Seconds per step since the first update, or None while fewer than ``min_pace_steps``."""
        if self._anchor is None or step - self._anchor[0] < self.min_pace_steps:
            return None
        return (now - self._anchor[1]) / (step - self._anchor[0])

    def update(self, step: int, now: float) -> bool:
        """Refit the plan after ``step`` completed steps at time ``now`` (the deadline's clock);
        True when it changed."""
        if self._anchor is None:  # the first steps pay one-off costs: the pace starts after them
            self._anchor = (step, now)
            return False
        pace = self.pace(step, now)
        if pace is None:
            return False
        fits = step + max(0, math.floor((self.deadline - now) / max(pace, 1e-9)))
        before = (self.plan.steps, self.plan.cosine_after)
        if step < self.plan.cosine_after:  # the decay has not begun: the run may grow or shrink
            steps = min(self.max_steps, max(step, fits))  # never past the maximum nor before now
            self.plan.steps = steps
            self.plan.cosine_after = max(step, round(self.decay_share * steps))
        elif fits < self.plan.steps:  # decaying: only an overrun changes the plan
            self.plan.steps = max(step, fits)
        return (self.plan.steps, self.plan.cosine_after) != before


class RowRates:
    """Scale the optimiser's update of some rows of some parameters: a learning rate per row.

    Adam's step does not grow with the gradient, so scaling a row's gradient does not change its
    rate; this scales the step itself. ``step(opt)`` runs ``opt.step()`` and then moves each
    ``(parameter, rows)`` pair ``scale`` times as far as the optimiser did (weight decay and
    momentum included), so ``scale=3`` is three times the learning rate for those rows.

    Why not a parameter group: Adam's groups hold whole tensors, and the pose rows are 18 of the
    head's rows; splitting the head into two parameters would change every checkpoint's keys.
    """

    def __init__(self, rows: Sequence[tuple[torch.Tensor, slice]], scale: float) -> None:
        if scale <= 0:
            raise ValueError(f"row learning-rate scale: expected a number > 0, got {scale}")
        self.rows = list(rows)
        self.scale = scale

    def step(self, opt: torch.optim.Optimizer) -> None:
        if self.scale == 1.0:
            opt.step()
            return
        before = [p.detach()[rows].clone() for p, rows in self.rows]
        opt.step()
        with torch.no_grad():
            for (p, rows), old in zip(self.rows, before):
                p[rows].sub_(old).mul_(self.scale).add_(old)


def pose_row_rates(model, optim_cfg) -> RowRates:
    """:class:`RowRates` for the regressor head's pose rows at ``optim.pose_lr_scale``."""
    head, pose = model.regressor.head, model.regressor.layout.pose
    return RowRates([(head.weight, pose), (head.bias, pose)], optim_cfg.pose_lr_scale)
