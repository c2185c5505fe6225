"""Megatron-style tensor-parallel layers, built from an existing full module and an explicit group.

Shapes: B batch, T text tokens, D input width, F output width, V vocabulary rows; a `_local`
suffix is this rank's shard.

- `ColumnParallelLinear`: keeps rows [start, end) of the weight (output features); the input is
  replicated, the output stays sharded. forward: copy_to_group then linear.
- `RowParallelLinear`: keeps the matching columns (input features); the input is sharded, the
  output is summed over the group, then the (replicated) bias is added.
- `VocabParallelEmbedding`: keeps rows [start, end) of TokenEmbedding's frozen base table; the
  trainable `added` rows stay replicated. `attend` (tied head) gives vocab-sharded logits.
- `vocab_parallel_cross_entropy`: per-token cross entropy from vocab-sharded logits.
- `sum_gradient_over`: a replicated parameter whose per-rank gradient is a partial sum (the
  cross-attention gate scales only the local heads) gets the full sum in backward.

Shards of uneven size are allowed (`shard_bounds`: sizes differ by at most one), so a vocabulary
such as 50,280 + 3 added tokens needs no padding. Every sharded parameter carries
`model_parallel = tensor_model_parallel = True`, which DeepSpeed's global grad norm reads.
"""

from __future__ import annotations

from typing import Collection

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megaflamingo.parallel.comm import copy_to_group, reduce_from_group
from megaflamingo.models.embedding import overlay_added_rows

Group = dist.ProcessGroup | None
"""A process group, or None for no parallelism."""


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of `rank`'s shard when `size` rows are split over `world` ranks.

    The first size % world ranks get one row more; with world dividing size all shards are equal.
    """
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def group_rank_size(group: Group) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) for group None (no parallelism)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _copy(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else copy_to_group(x, group)


def _reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else reduce_from_group(x, group)


def mark_tensor_parallel(param: nn.Parameter, group: Group) -> nn.Parameter:
    """Tag a shard so DeepSpeed counts it on every rank of the group in the global grad norm
    (no tag without a group: the parameter is then whole)."""
    if group is not None:
        param.model_parallel = True
        param.tensor_model_parallel = True
    return param


def _shard_rows(weight: torch.Tensor, rank: int, world: int, parts: int = 1) -> torch.Tensor:
    """Rows of `weight` this rank keeps; with parts > 1 each of the `parts` equal row blocks
    (e.g. the k and v halves of a fused kv projection) is sharded on its own."""
    blocks = weight.chunk(parts, dim=0)
    picked = []
    for block in blocks:
        start, end = shard_bounds(block.shape[0], rank, world)
        picked.append(block[start:end])
    return torch.cat(picked, dim=0).clone()


def gather_dim(local: torch.Tensor, dim: int, full_size: int, group: Group) -> torch.Tensor:
    """All-gather shards (possibly of uneven size, split as `shard_bounds`) back into one tensor.

    Not differentiable; for export and tests.
    """
    rank, world = group_rank_size(group)
    if world == 1:
        return local.detach().clone()
    longest = shard_bounds(full_size, 0, world)[1]
    pad = [0, 0] * (local.dim() - 1 - dim) + [0, longest - local.shape[dim]]
    padded = F.pad(local.detach(), pad).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    sizes = [shard_bounds(full_size, r, world) for r in range(world)]
    return torch.cat([p.narrow(dim, 0, end - start) for p, (start, end) in zip(parts, sizes)], dim=dim)


def sum_gradient_over(param: nn.Parameter, group: Group) -> None:
    """Make the gradient of a replicated `param` the sum of every rank's gradient over `group`.

    For a parameter that multiplies a *sharded* quantity (the cross-attention gate scales the local
    heads before the row-parallel out-projection sums them), each rank's gradient is a partial
    sum; a backward hook all-reduces it before it is accumulated, exactly what using
    `copy_to_group(param)` in the forward would do. No-op for group None.
    """
    if group_rank_size(group)[1] > 1:
        param.register_hook(lambda grad: _all_reduce_copy(grad, group))


def _all_reduce_copy(grad: torch.Tensor, group: Group) -> torch.Tensor:
    summed = grad.clone()
    dist.all_reduce(summed, group=group)
    return summed


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[start:end].T + b[start:end]: the output features are sharded over `group`.

    forward: copy_to_group(x) (identity; the backward all-reduces dL/dx), then the local matmul.

    Args:
        weight: (F_local, D) this rank's rows.
        bias: (F_local,) or None.
        group: the tensor-parallel process group.
        out_features: F, the full output width.
        parts: number of independently sharded row blocks (2 for a fused k;v projection).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Group, out_features: int,
                 parts: int = 1) -> None:
        super().__init__()
        self.group, self.out_features, self.parts = group, out_features, parts
        self.in_features = weight.shape[1]
        self.weight = mark_tensor_parallel(nn.Parameter(weight, requires_grad=weight.requires_grad), group)
        self.bias = None
        if bias is not None:
            self.bias = mark_tensor_parallel(nn.Parameter(bias, requires_grad=bias.requires_grad), group)
        rank, world = group_rank_size(group)
        self.shard_start = shard_bounds(out_features // parts, rank, world)[0]
        """First output row this rank holds (within each part)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group, parts: int = 1) -> "ColumnParallelLinear":
        """Keep this rank's rows of a full `nn.Linear` (its requires_grad is kept)."""
        rank, world = group_rank_size(group)
        weight = _shard_rows(linear.weight.detach(), rank, world, parts).requires_grad_(
            linear.weight.requires_grad)
        bias = None
        if linear.bias is not None:
            bias = _shard_rows(linear.bias.detach()[:, None], rank, world, parts)[:, 0]
            bias.requires_grad_(linear.bias.requires_grad)
        return cls(weight, bias, group, linear.out_features, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., D) replicated. Returns: (..., F_local)."""
        return F.linear(_copy(x, self.group), self.weight, self.bias)

    def full_state(self, names: Collection[str] = ("weight", "bias")) -> dict[str, torch.Tensor]:
        """The full `names` ("weight", "bias") in the plain layout; collective over the group."""
        state = {}
        if "weight" in names:
            state["weight"] = self._gather(self.weight)
        if "bias" in names and self.bias is not None:
            state["bias"] = self._gather(self.bias[:, None])[:, 0]
        return state

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        size = self.out_features // self.parts  # every part is sharded alike, so chunk() splits it back
        return torch.cat([gather_dim(b, 0, size, self.group) for b in local.chunk(self.parts, dim=0)], dim=0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.shape[0]}), parts={self.parts}, bias={self.bias is not None}")


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local @ W[:, start:end].T, plus the replicated bias.

    forward: local matmul, then reduce_from_group (all-reduce; the backward is the identity).

    Args:
        weight: (F, D_local) this rank's columns.
        bias: (F,) replicated, or None.
        group: the tensor-parallel process group.
        in_features: D, the full input width.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Group, in_features: int) -> None:
        super().__init__()
        self.group, self.in_features = group, in_features
        self.out_features = weight.shape[0]
        self.weight = mark_tensor_parallel(nn.Parameter(weight, requires_grad=weight.requires_grad), group)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group) -> "RowParallelLinear":
        """Keep this rank's columns of a full `nn.Linear` (its requires_grad is kept)."""
        rank, world = group_rank_size(group)
        start, end = shard_bounds(linear.in_features, rank, world)
        weight = linear.weight.detach()[:, start:end].clone().requires_grad_(linear.weight.requires_grad)
        bias = None
        if linear.bias is not None:
            bias = linear.bias.detach().clone().requires_grad_(linear.bias.requires_grad)
        return cls(weight, bias, group, linear.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., D_local) sharded. Returns: (..., F) replicated."""
        out = _reduce(F.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias

    def full_state(self, names: Collection[str] = ("weight", "bias")) -> dict[str, torch.Tensor]:
        """The full `names` ("weight", "bias") in the plain layout; collective over the group."""
        state = {}
        if "weight" in names:
            state["weight"] = gather_dim(self.weight, 1, self.in_features, self.group)
        if "bias" in names and self.bias is not None:
            state["bias"] = self.bias.detach().clone()
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), "
                f"out_features={self.out_features}, bias={self.bias is not None}")


class VocabParallelEmbedding(nn.Module):
    """TokenEmbedding with its frozen base table sharded by vocabulary rows over `group`.

    The trainable `added` rows (`<image>`, `<|endofchunk|>`) stay replicated and are the same
    Parameter object as in the source TokenEmbedding. `forward` looks ids up in the local rows and
    sums over the group; `attend` (tied head) returns logits for the local rows only, to be fed to
    `vocab_parallel_cross_entropy`.

    Args:
        embedding: a built `TokenEmbedding` (the full table; only the local rows are kept).
        group: the tensor-parallel process group.
    """

    def __init__(self, embedding: nn.Module, group: Group) -> None:
        super().__init__()
        rank, world = group_rank_size(group)
        self.group, self.num_embeddings, self.dim = group, embedding.num_embeddings, embedding.dim
        self.vocab_start, self.vocab_end = shard_bounds(embedding.num_embeddings, rank, world)
        base = embedding.weight.detach()[self.vocab_start:self.vocab_end].clone()
        self.weight = mark_tensor_parallel(nn.Parameter(base, requires_grad=embedding.weight.requires_grad), group)
        self.register_buffer("trainable_ids", embedding.trainable_ids.clone(), persistent=False)
        self.register_buffer("slot", embedding.slot.clone(), persistent=False)
        self.added = embedding.added

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Args: input_ids (B, T) global ids. Returns: (B, T, D) replicated embeddings."""
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.clamp(0, self.weight.shape[0] - 1), self.weight)
        out = _reduce(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)
        return out if self.added is None else overlay_added_rows(out, input_ids, self.slot, self.added)

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output projection. Args: hidden (B, T, D). Returns: logits (B, T, V_local).

        The added rows' logits are computed on every rank from a copy_to_group of `added` (its
        head-side gradient is summed over the group: only the rank owning a row contributes), so
        every rank runs the same collectives whether or not it owns an added row.
        """
        hidden = _copy(hidden, self.group)
        logits = F.linear(hidden, self.weight)
        if self.added is None:
            return logits
        added_logits = F.linear(hidden, _copy(self.added, self.group))  # (B, T, A)
        ids = self.trainable_ids
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        return logits.index_copy(-1, ids[mine] - self.vocab_start, added_logits[..., mine])

    def full_state(self, names: Collection[str] = ("weight", "added")) -> dict[str, torch.Tensor]:
        """The full `names`: "weight" (the (V, D) base table), "added"; collective over the group."""
        state = {}
        if "weight" in names:
            state["weight"] = gather_dim(self.weight, 0, self.num_embeddings, self.group)
        if "added" in names and self.added is not None:
            state["added"] = self.added.detach().clone()
        return state

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.dim}, local rows [{self.vocab_start}, {self.vocab_end}), "
                f"trainable_ids={self.trainable_ids.tolist()}")


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor, group: Group = None,
                                 vocab_start: int = 0, ignore_index: int = -100) -> torch.Tensor:
    """Cross entropy per token from logits whose vocabulary is sharded over `group`.

    loss = log(sum_v exp(z_v - m)) - (z_target - m), with the max m, the sum and the target logit
    each reduced over the group; computed in fp32. With group None (or of size 1) this is the plain
    single-process cross entropy, so both paths share this one function.

    Args:
        logits_local: (..., V_local) logits for vocabulary rows [vocab_start, vocab_start + V_local).
        targets: (...) global token ids; `ignore_index` marks positions without a loss.
        group: the tensor-parallel group the vocabulary is sharded over, or None.
        vocab_start: first vocabulary row of this rank's shard.
        ignore_index: target value that gives loss 0.
    Returns:
        (...) float32 loss per position (0 where ignored), differentiable in logits_local.
    """
    logits = logits_local.float()
    with torch.no_grad():
        peak = logits.max(dim=-1).values
        if group_rank_size(group)[1] > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - peak.unsqueeze(-1)
    local = targets - vocab_start
    outside = (local < 0) | (local >= logits.shape[-1])
    target_logit = shifted.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = target_logit.masked_fill(outside, 0.0)
    sum_exp = shifted.exp().sum(dim=-1)
    target_logit, sum_exp = _reduce(target_logit, group), _reduce(sum_exp, group)
    loss = sum_exp.log() - target_logit
    return loss.masked_fill(targets == ignore_index, 0.0)
