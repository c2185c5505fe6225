"""The lr schedules equal transformers' own (the ones OpenFlamingo's training uses)."""

from __future__ import annotations

import pytest
import torch
import transformers

from megaflamingo.training.schedule import build_scheduler, lr_multiplier


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer,
         steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_matches_transformers(schedule: str, warmup: int) -> None:
    total = 12
    ref_fn = {"constant": lambda o: transformers.get_constant_schedule_with_warmup(o, warmup),
              "linear": lambda o: transformers.get_linear_schedule_with_warmup(o, warmup, total),
              "cosine": lambda o: transformers.get_cosine_schedule_with_warmup(o, warmup, total)}[schedule]
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ours = _lrs(build_scheduler(ours_opt, schedule, warmup, total), ours_opt, total + 2)
    ref = _lrs(ref_fn(ref_opt), ref_opt, total + 2)
    assert ours == pytest.approx(ref, abs=1e-12)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_multiplier(0, "step", 0, 10)
