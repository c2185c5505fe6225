"""Differentiable collectives over an explicit tensor-parallel group.

The four maps a Megatron-style layer pair needs. Each is an autograd Function whose backward is
the forward's adjoint:
- `copy_to_group`:     forward: identity;             backward: all-reduce (sum) of the gradient.
- `reduce_from_group`: forward: all-reduce (sum);     backward: identity.
- `gather_from_group`: forward: all-gather last dim;  backward: keep this rank's slice.
- `split_to_group`:    forward: keep this rank's slice of the last dim; backward: all-gather.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None
"""A process group (None: the default group)."""


def _size(group: Group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad.clone(), ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split_last(grad, ctx.group), None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_last(grad, ctx.group), None


def copy_to_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: identity; backward: all-reduce the gradient over `group`."""
    return _Copy.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: all-reduce (sum) over `group`; backward: identity."""
    return _Reduce.apply(x, group)


def gather_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: all-gather along the last dim; backward: this rank's slice of the gradient."""
    return _Gather.apply(x, group)


def split_to_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: this rank's slice of the last dim; backward: all-gather the gradient."""
    return _Split.apply(x, group)
