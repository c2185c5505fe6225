"""Learning-rate schedules: constant, linear or cosine decay, each after a linear warmup.

The multipliers follow transformers' `get_{constant,linear,cosine}_schedule_with_warmup`, which
OpenFlamingo uses (reference §4.3), so a recipe's lr curve carries over unchanged.
"""

from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The factor applied to the base lr at optimizer step `step` (0-based).

    Args:
        step: optimizer steps taken so far.
        schedule: "constant", "linear" or "cosine".
        warmup_steps: steps of linear warmup from 0.
        total_steps: the run's length (where linear and cosine reach 0).
    Returns:
        The multiplier in [0, 1].
    Raises:
        ValueError: an unknown schedule.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr schedule '{schedule}' (constant, linear or cosine)")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_multiplier`; its state_dict is what checkpoints save."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown lr schedule '{schedule}' (constant, linear or cosine)")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, schedule, warmup_steps, total_steps)
    )
