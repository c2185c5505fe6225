"""`apply_rope`'s hand-written autograd Function == the plain rotate-half formula under autograd,
bit for bit (outputs and gradients), for full and partial rotary dims, fp32/bf16/fp64, and the
strided (B, H, T, K) views the attention passes in."""

from __future__ import annotations

import pytest
import torch

from megaflamingo.models.rope import apply_rope


def plain_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The textbook formula, differentiated by autograd (the specification)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    first, second = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    rotated = x_rot * cos + torch.cat([-second, first], dim=-1) * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat([rotated, x_pass], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("head_dim,rotary", [(64, 64), (64, 32), (80, 80), (96, 16)])
def test_rope_function_is_the_plain_formula_bit_for_bit(dtype: torch.dtype, head_dim: int, rotary: int) -> None:
    gen = torch.Generator().manual_seed(head_dim + rotary)
    B, T, H = 2, 7, 3
    base = torch.randn(B, T, H, head_dim, generator=gen).to(dtype).transpose(1, 2)  # (B, H, T, K) view
    cos = torch.randn(T, rotary, generator=gen).to(dtype)
    sin = torch.randn(T, rotary, generator=gen).to(dtype)
    grad = torch.randn(B, H, T, head_dim, generator=gen).to(dtype)
    x_ref, x_ours = base.clone().requires_grad_(), base.clone().requires_grad_()
    out_ref, out_ours = plain_rope(x_ref, cos, sin), apply_rope(x_ours, cos, sin)
    out_ref.backward(grad)
    out_ours.backward(grad)
    assert torch.equal(out_ref, out_ours)
    assert torch.equal(x_ref.grad, x_ours.grad)
    with torch.no_grad():  # inference: the same function, no graph
        assert torch.equal(apply_rope(base, cos, sin), out_ref)
