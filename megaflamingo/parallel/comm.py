"""Differentiable collectives over an explicit tensor-parallel group.

The four maps a Megatron-style layer pair needs. Each is an autograd Function whose backward is
the forward's adjoint:
- `copy_to_group`:     forward: identity;             backward: all-reduce (sum) of the gradient.
- `reduce_from_group`: forward: all-reduce (sum);     backward: identity.
- `gather_from_group`: forward: all-gather last dim;  backward: keep this rank's slice.
- `split_to_group`:    forward: keep this rank's slice of the last dim; backward: all-gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """forward: identity; backward: all-reduce the gradient over `group`."""
    return _Copy.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """forward: all-reduce (sum) over `group`; backward: identity."""
    return _Reduce.apply(x, group)


def gather_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """forward: all-gather along the last dim; backward: this rank's slice of the gradient."""
    return _Gather.apply(x, group)


def split_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """forward: this rank's slice of the last dim; backward: all-gather the gradient."""
    return _Split.apply(x, group)
