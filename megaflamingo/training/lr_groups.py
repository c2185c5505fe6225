"""Per-group learning-rate multipliers (`optim.lr_multipliers`, e.g. the gates at 10x the lr).

Off by default (an empty mapping): OpenFlamingo trains every parameter at one learning rate.
The loop's schedule scales each group's own base lr, so the ratios hold through warmup and decay.
"""

from __future__ import annotations

import torch.nn as nn


def with_lr_multipliers(groups: list[dict], module: nn.Module, lr: float,
                        multipliers: dict[str, float]) -> list[dict]:
    """Optimizer groups split so that parameters whose name contains a key of `multipliers` train
    at lr x its factor (`optim.lr_multipliers`, e.g. {"_gate": 10}); the first matching key wins.

    Args:
        groups: param groups ({"params", "weight_decay", ...}) over `module`'s parameters.
        module: the module the parameters belong to (for their names).
        lr: the base learning rate.
        multipliers: {name part: factor}; empty: `groups` unchanged.
    Returns:
        Groups with an explicit "lr" where a multiplier applies (empty groups left out).
    """
    if not multipliers:
        return groups
    names = {id(p): n for n, p in module.named_parameters()}
    factor = {id(p): next((f for k, f in multipliers.items() if k in names.get(id(p), "")), 1.0)
              for g in groups for p in g["params"]}
    out = []
    for group in groups:
        for f in sorted({factor[id(p)] for p in group["params"]}):
            params = [p for p in group["params"] if factor[id(p)] == f]
            out.append({**group, "params": params, **({"lr": lr * f} if f != 1.0 else {})})
    return out
