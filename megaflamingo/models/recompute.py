"""Feed-forwards that save fewer tensors for backward and recompute their elementwise ops exactly.

Shapes: ... any leading dims, D width, F hidden width (D * mult, or the LM's MLP width).

Two blocks hold most of the activation memory a training step keeps for backward:

    FeedForward (Perceiver, cross-attention; trainable)  y = down(gelu(up(LN(x))))
        autograd keeps x, LN(x) (D), h = up(LN(x)) (F) and gelu(h) (F), plus LN's mean and rstd;
        `feed_forward` keeps x, mean, rstd and h, and recomputes LN(x) and gelu(h) in backward.
    Gated MLP with frozen weights (the LM's SwiGLU)      y = down(silu(gate(x)) * up(x))
        autograd keeps g = gate(x) (F), silu(g) (F) and u = up(x) (F);
        `frozen_swiglu` keeps g and u and recomputes silu(g) in backward.

No matmul is recomputed: only LayerNorm, GELU and SiLU, which are cheap next to the matmuls.
The backward calls the very aten kernels autograd's formulas call (native_layer_norm_backward,
gelu_backward, silu_backward, mul, and mm with MmBackward's operand layouts: dX = dY @ W,
dW = dY^T @ X on the rows flattened as matmul flattens them), on the same tensors, so outputs and
every gradient are bit-identical to the plain modules' autograd path (tests/models/test_recompute.py).

`recompute_usable` says when the exact path applies: gradients recorded, no autocast, plain
bias-free nn.Linear projections (tensor-parallel layers and ZeRO-3-partitioned parameters, whose
owners must run their own forward hooks, take the plain path) and a float input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten


def recompute_usable(x: torch.Tensor, *linears: nn.Module) -> bool:
    """Whether the recomputing path may replace the plain modules for input `x`.

    Args:
        x: the block's input.
        *linears: the block's projections (and norms, for the ZeRO-3 check).
    Returns:
        True when gradients are recorded, autocast is off, every projection is a bias-free
        nn.Linear, and no parameter is ZeRO-3-partitioned (DeepSpeed's `ds_id`).
    """
    if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or not x.is_floating_point():
        return False
    for m in linears:
        if isinstance(m, nn.Linear) and (type(m) is not nn.Linear or m.bias is not None):
            return False
        if any(hasattr(p, "ds_id") for p in m.parameters(recurse=False)):
            return False
    return all(type(m) in (nn.Linear, nn.LayerNorm) for m in linears)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (N, C), as matmul folds its first operand."""
    return t.reshape(-1, t.shape[-1])


def _linear_backward(grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, want_input: bool,
                     want_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """MmBackward0 of `inp @ weight.t()` (row-major inp, column-major weight.t()).

    Args:
        grad: (..., O) gradient of the output.
        inp: (..., I) the input (only read when `want_weight`).
        weight: (O, I).
        want_input, want_weight: which gradients to form.
    Returns:
        (d inp (..., I) or None, d weight (O, I) or None).
    """
    g2 = _rows(grad)
    d_in = g2.mm(weight).view(*grad.shape[:-1], weight.shape[1]) if want_input else None
    d_w = g2.t().mm(_rows(inp)) if want_weight else None
    return d_in, d_w


class FeedForwardFunction(torch.autograd.Function):
    """y = down(gelu(up(LayerNorm(x)))), saving x, mean, rstd, h (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: D102
        normed, mean, rstd = aten.native_layer_norm(x, [x.shape[-1]], ln_weight, ln_bias, eps)
        h = F.linear(normed, w_up)
        ctx.eps = eps
        ctx.save_for_backward(x, mean, rstd, h, ln_weight, ln_bias, w_up, w_down)
        return F.linear(F.gelu(h), w_down)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):  # noqa: D102
        x, mean, rstd, h, ln_weight, ln_bias, w_up, w_down = ctx.saved_tensors
        want_x, want_lw, want_lb, want_up, want_down = ctx.needs_input_grad[:5]
        act = F.gelu(h)  # recomputed: the forward's values, bit for bit
        d_act, d_down = _linear_backward(dy, act, w_down, True, want_down)
        del act
        dh = aten.gelu_backward(d_act, h)
        del d_act
        normed = aten.native_layer_norm(x, [x.shape[-1]], ln_weight, ln_bias, ctx.eps)[0] if want_up else None
        d_normed, d_up = _linear_backward(dh, normed, w_up, True, want_up)
        del normed, dh
        dx, d_lw, d_lb = aten.native_layer_norm_backward(d_normed, x, [x.shape[-1]], mean, rstd, ln_weight,
                                                         ln_bias, [want_x, want_lw, want_lb])
        return dx, d_lw, d_lb, d_up, d_down, None


def feed_forward(x: torch.Tensor, norm: nn.LayerNorm, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """down(gelu(up(norm(x)))) with exact recompute of LayerNorm and GELU in backward.

    Args:
        x: (..., D) input.
        norm: LayerNorm over D with weight and bias.
        up: bias-free Linear D -> F.
        down: bias-free Linear F -> D.
    Returns:
        (..., D), the plain modules' values.
    """
    return FeedForwardFunction.apply(x, norm.weight, norm.bias, up.weight, down.weight, norm.eps)


class FrozenSwiGLUFunction(torch.autograd.Function):
    """y = down(silu(gate(x)) * up(x)) with frozen weights, saving g and u (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor) -> torch.Tensor:  # noqa: D102
        g, u = F.linear(x, w_gate), F.linear(x, w_up)
        ctx.save_for_backward(g, u, w_gate, w_up, w_down)
        return F.linear(F.silu(g) * u, w_down)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):  # noqa: D102
        g, u, w_gate, w_up, w_down = ctx.saved_tensors
        d_prod, _ = _linear_backward(dy, g, w_down, True, False)
        d_act = d_prod * u  # MulBackward0: grad * other, grad * self
        d_u = d_prod * F.silu(g)  # silu recomputed
        del d_prod
        d_g = aten.silu_backward(d_act, g)
        del d_act
        dx_gate, _ = _linear_backward(d_g, g, w_gate, True, False)
        dx_up, _ = _linear_backward(d_u, u, w_up, True, False)
        return dx_gate + dx_up, None, None, None


def frozen_swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for frozen, bias-free projections, recomputing SiLU in backward.

    Args:
        x: (..., D) input (the normed hidden states).
        gate, up: Linear D -> F; down: Linear F -> D; none of them requiring grad.
    Returns:
        (..., D), the plain modules' values.
    """
    return FrozenSwiGLUFunction.apply(x, gate.weight, up.weight, down.weight)
