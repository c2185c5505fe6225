"""training/step.py without a world: the NaN/Inf guard of the optimizer DeepSpeed steps bare, and
the phase timer. (The step function on real engines: tests/parallel, tests/integration.)"""

from __future__ import annotations

import torch

from megaflamingo.training.step import PhaseTimer, SkipNonFiniteAdamW, pipeline_item


def _two_groups() -> tuple[list[torch.nn.Parameter], SkipNonFiniteAdamW]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = SkipNonFiniteAdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:]}], lr=0.1)
    return params, opt


def _step(params: list[torch.nn.Parameter], opt: SkipNonFiniteAdamW, bad: float | None) -> None:
    for p in params:
        p.grad = torch.ones_like(p)
    if bad is not None:
        params[1].grad[2] = bad  # one element of one group is enough


def test_a_non_finite_gradient_skips_the_whole_update_and_says_so():
    params, opt = _two_groups()
    _step(params, opt, None)
    opt.step()
    assert not opt.overflow
    before = [p.detach().clone() for p in params]
    moments = {k: v.clone() for k, v in opt.state[params[0]].items()}
    for bad in (float("nan"), float("inf"), -float("inf")):
        _step(params, opt, bad)
        opt.step()
        assert opt.overflow  # the flag DeepSpeed reads: engine.was_step_applied() is False
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert all(torch.equal(moments[k], opt.state[params[0]][k]) for k in moments)  # Adam untouched
    _step(params, opt, None)
    opt.step()
    assert not opt.overflow and not torch.equal(before[0], params[0])


def test_the_guard_tells_huge_finite_gradients_from_non_finite_ones():
    """The guard's fast path is one sum per gradient: finite values near float32's maximum (whose sum
    overflows to Inf) must still be a step (the exact fallback); +Inf and -Inf together (a sum of
    NaN) and a NaN in bf16 are not."""
    params, opt = _two_groups()
    for p in params:
        p.grad = torch.full_like(p, 3.0e38)
    assert not opt._any_rank_non_finite()
    params[1].grad[0], params[1].grad[1] = float("inf"), -float("inf")
    assert opt._any_rank_non_finite()
    half = torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))
    half_opt = SkipNonFiniteAdamW([half], lr=0.1)
    half.grad = torch.full_like(half, 3.0e38)
    assert not half_opt._any_rank_non_finite()
    half.grad[3] = float("nan")
    assert half_opt._any_rank_non_finite()


def test_the_guard_is_what_protects_the_weights():
    params, opt = _two_groups()
    opt.active = False  # as when DeepSpeed wraps it and checks the norm itself
    _step(params, opt, float("nan"))
    opt.step()
    assert not opt.overflow and torch.isnan(params[1]).any()


def test_phase_timer_and_pipeline_item():
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer("forward"):
            torch.ones(8).sum()
    assert set(timer.seconds) == {"forward"} and timer.seconds["forward"] >= 0
    batch = {k: torch.zeros(1) for k in ("images", "input_ids", "attention_mask", "labels", "loss_weight")}
    inputs, targets = pipeline_item(batch)
    assert inputs[1] is batch["input_ids"] and targets[1] is batch["loss_weight"]
