"""benchmarks/step.py --matmul-floor: the matmul accounting counts every product of a step, forward
and backward, with its FLOPs from the profiled shapes (no timing assertions)."""

from __future__ import annotations

import torch

from tests.benchmarks import load_benchmark


def load_script():
    return load_benchmark("step")


class TinyTrainer:
    """forward: sum(bmm(c, d)) + sum(a @ b) + sum(addmm(bias, a, b)); only a and c take gradients."""

    def __init__(self) -> None:
        self.a = torch.randn(64, 32, requires_grad=True)
        self.b, self.bias = torch.randn(32, 16), torch.randn(16)
        self.c, self.d = torch.randn(3, 8, 4, requires_grad=True), torch.randn(3, 4, 5)

    def forward(self, batch: dict) -> torch.Tensor:
        return (torch.bmm(self.c, self.d).sum() + (self.a @ self.b).sum()
                + torch.addmm(self.bias, self.a, self.b).sum())

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, last: bool = True) -> None:
        self.a.grad = self.c.grad = None


def test_matmul_work_counts_forward_and_input_gradient_products():
    step = load_script()
    work = step.matmul_work(TinyTrainer(), {}, steps=2)
    mm = 2 * 64 * 32 * 16  # a @ b, and addmm's product: each once forward, once for a's gradient
    bmm = 2 * 3 * 8 * 4 * 5  # c @ d forward, and c's gradient (3 x 8 x 5 @ 3 x 5 x 4)
    assert abs(work["gflop"] * 1e9 - (4 * mm + 2 * bmm)) < 1e-3
    assert work["ms"] > 0


def test_flops_of_each_profiled_matmul_kind():
    step = load_script()
    assert step._matmul_flops("aten::mm", [[5, 7], [7, 3]]) == 2 * 5 * 7 * 3
    assert step._matmul_flops("aten::addmm", [[3], [5, 7], [7, 3]]) == 2 * 5 * 7 * 3
    assert step._matmul_flops("aten::bmm", [[4, 5, 7], [4, 7, 3]]) == 2 * 4 * 5 * 7 * 3
    assert step._matmul_flops("aten::baddbmm", [[4, 5, 3], [4, 5, 7], [4, 7, 3]]) == 2 * 4 * 5 * 7 * 3
