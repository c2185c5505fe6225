"""The tensor-parallel plan: which modules of a built, plain Flamingo become which parallel layers.

Shapes: B batch, T text tokens, M media, N latents, D LM width, Dv vision width, H heads, G
key/value heads, K head dim; `_local` is this rank's share (H / tp, G / tp).

`apply_tensor_parallel(model, groups)` swaps modules in place and keeps only the local shards:

| module                                   | becomes                                         |
|------------------------------------------|-------------------------------------------------|
| lm.layers[i].attn                        | `TensorParallelSelfAttention` (local heads)     |
|   q_proj, k_proj, v_proj                 | column-parallel (GQA: H/tp query, G/tp kv heads)|
|   o_proj                                 | row-parallel                                    |
| lm.layers[i].mlp.gate_proj, up_proj      | column-parallel                                 |
| lm.layers[i].mlp.down_proj               | row-parallel                                    |
| lm.embed_tokens (base table)             | `VocabParallelEmbedding` (`added` replicated)   |
| lm.lm_head (untied)                      | column-parallel over the vocabulary             |
| xattn[i]                                 | `TensorParallelCrossAttention` (local heads)    |
|   to_q, to_kv (k and v halves apart)     | column-parallel                                 |
|   to_out                                 | row-parallel                                    |
|   ff.up / ff.down                        | column- / row-parallel                          |
| norms, gates, perceiver, vision          | replicated (unchanged)                          |

Parameter names do not change, so `gather_full_state` gives back the plain model's state dict.
The logits then cover the vocabulary rows [`logits_vocab_start(model.lm)`, ...) of this rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from megaflamingo.models.cross_attention import GatedCrossAttentionBlock
from megaflamingo.models.decoder import AttentionContext, DecoderLM, SelfAttention
from megaflamingo.models.flamingo import Flamingo
from megaflamingo.kernels.xattn import media_attention
from megaflamingo.parallel.comm import copy_to_group
from megaflamingo.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    group_rank_size,
)
from megaflamingo.parallel.topology import ProcessGroups


def _split_heads(count: int, world: int, what: str) -> int:
    if count % world:
        raise ValueError(f"tensor parallelism over {world} ranks does not divide {what}={count}")
    return count // world


class TensorParallelSelfAttention(SelfAttention):
    """SelfAttention over this rank's heads: q/k/v column-parallel, o row-parallel.

    Query heads [head_start, head_start + H_local) and their key/value heads (GQA keeps whole
    groups together: local query head j uses local kv head j // (H / G)). ALiBi slopes and the
    ALiBi SDPA mask in the shared AttentionContext cover all H heads; `forward` takes this rank's
    slice of them, so the context is built once per forward exactly as in the plain model.

    Args:
        attn: the plain module (its full projections are sharded, then dropped).
        group: the tensor-parallel process group.
    """

    def __init__(self, attn: SelfAttention, group) -> None:
        nn.Module.__init__(self)
        rank, world = group_rank_size(group)
        self.num_heads = _split_heads(attn.num_heads, world, "num_heads")
        self.num_kv_heads = _split_heads(attn.num_kv_heads, world, "num_kv_heads")
        self.head_dim, self.qkv_clip = attn.head_dim, attn.qkv_clip
        self.head_start = rank * self.num_heads
        self.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, group)
        self.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, group)
        self.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, group)
        self.o_proj = RowParallelLinear.from_linear(attn.o_proj, group)

    def local_context(self, ctx: AttentionContext) -> AttentionContext:
        """ctx with per-head tensors (ALiBi slopes, ALiBi mask) cut to this rank's heads."""
        if ctx.alibi_slopes is None:
            return ctx
        heads = slice(self.head_start, self.head_start + self.num_heads)
        mask = ctx.sdpa_mask
        if mask is not None and mask.shape[1] > 1:  # (B or 1, H, T, T) additive ALiBi mask
            mask = mask[:, heads]
        return dataclasses.replace(ctx, alibi_slopes=ctx.alibi_slopes[heads], sdpa_mask=mask)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Args: x (B, T, D) replicated; ctx for all heads. Returns: (B, T, D) replicated."""
        return super().forward(x, self.local_context(ctx))


class TensorParallelCrossAttention(GatedCrossAttentionBlock):
    """GatedCrossAttentionBlock over this rank's heads (all heads when group is None).

    Same computation as the plain block, with two additions:
    - the attention gate enters through copy_to_group, because tanh(attn_gate) multiplies the
      *local* heads before the row-parallel to_out sums them: its gradient is a sum over ranks
      (forward: identity; backward: all-reduce). The FF gate multiplies the already-reduced FF
      output and needs nothing;
    - q, k and v stay on the autograd graph (+ 0 * their sums) when no token of the micro-batch
      attends to an image: the gather reference then returns zeros without touching them, and
      to_q, to_kv and the Perceiver would get no gradient on this rank only. ZeRO-2/3 reduce
      gradients from per-parameter hooks in backward, so such a rank would send different buckets
      from its peers (a gloo size mismatch). Adding 0.0 changes no value.

    Args:
        block: the plain block (projections sharded; norms and gates kept as they are).
        group: the tensor-parallel process group, or None (no sharding).
    """

    def __init__(self, block: GatedCrossAttentionBlock, group) -> None:
        nn.Module.__init__(self)
        _, world = group_rank_size(group)
        self.heads = _split_heads(block.heads, world, "xattn heads")
        self.dim_head, self.impl, self.group = block.dim_head, block.impl, group
        self.norm = block.norm
        self.to_q = ColumnParallelLinear.from_linear(block.to_q, group)
        self.to_kv = ColumnParallelLinear.from_linear(block.to_kv, group, parts=2)
        self.to_out = RowParallelLinear.from_linear(block.to_out, group)
        self.attn_gate = block.attn_gate
        self.ff = block.ff
        self.ff.up = ColumnParallelLinear.from_linear(block.ff.up, group)
        self.ff.down = RowParallelLinear.from_linear(block.ff.down, group)
        self.ff_gate = block.ff_gate

    def forward(self, h: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        """Args: h (B, T, D); media (B, M, N, Dv); text_time (B, T) long. Returns: (B, T, D)."""
        H, K = self.heads, self.dim_head
        q = self.to_q(self.norm(h)).unflatten(-1, (H, K)).transpose(1, 2)  # (B, H_local, T, K)
        k, v = self.to_kv(media).unflatten(-1, (2, H, K)).unbind(dim=3)  # 2 x (B, M, N, H_local, K)
        k, v = k.transpose(2, 3), v.transpose(2, 3)  # (B, M, H_local, N, K)
        gate = self.attn_gate if self.group is None else copy_to_group(self.attn_gate, self.group)
        attn = media_attention(q, k, v, text_time, gate=gate, impl=self.impl)  # (B, H_local, T, K)
        attn = attn + 0.0 * (q.sum() + k.sum() + v.sum())  # every trainable weight on the graph
        h = h + self.to_out(attn.transpose(1, 2).flatten(-2))
        return h + torch.tanh(self.ff_gate) * self.ff(h)


def _parallelize_decoder(lm: DecoderLM, group) -> None:
    for layer in lm.layers:
        layer.attn = TensorParallelSelfAttention(layer.attn, group)
        mlp = layer.mlp
        if mlp.gate_proj is not None:
            mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, group)
        mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, group)
        mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, group)
    lm.embed_tokens = VocabParallelEmbedding(lm.embed_tokens, group)
    if lm.lm_head is not None:
        lm.lm_head = ColumnParallelLinear.from_linear(lm.lm_head, group)


def apply_tensor_parallel(model: Flamingo, groups: ProcessGroups) -> Flamingo:
    """Swap a built, plain Flamingo's modules for tensor-parallel ones over `groups.tp`, in place.

    Every rank of the group must hold the same full weights when this is called (build with the
    same seed or load the same checkpoint); each keeps only its shards. With tp == 1 only the
    cross-attention blocks are swapped (unsharded), for the graph guarantee their class documents.

    Args:
        model: the plain model, trainable set already fixed.
        groups: this rank's process groups (the tensor-parallel one is used).
    Returns:
        The same model object, parallelised.
    Raises:
        ValueError: tp does not divide the LM's query or key/value heads or the xattn heads.
    """
    group = groups.tp if groups.dims.tp > 1 else None
    if group is not None:
        _parallelize_decoder(model.lm, group)
    for name in list(model.xattn.keys()):
        model.xattn[name] = TensorParallelCrossAttention(model.xattn[name], group)
    return model


def logits_vocab_start(lm: DecoderLM) -> int:
    """First vocabulary row of this rank's logits (0 without tensor parallelism)."""
    if lm.lm_head is None:
        return getattr(lm.embed_tokens, "vocab_start", 0)
    return getattr(lm.lm_head, "shard_start", 0)


def gather_full_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The plain (unsharded) parameters of a model parallelised by `apply_tensor_parallel`.

    Collective over each parallel layer's group: every rank of the group must call it (with the
    same `trainable_only`). Under ZeRO-3 call it inside `deepspeed.zero.GatheredParameters`.

    Args:
        model: the parallelised model (or any module holding its layers).
        trainable_only: leave out frozen parameters (and skip gathering them).
    Returns:
        {name: full tensor}, with the plain model's names.
    """
    state = {}
    for prefix, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad or not trainable_only}
        if not own:
            continue
        full = module.full_state(own.keys()) if hasattr(module, "full_state") else {}
        for name, param in own.items():
            key = f"{prefix}.{name}" if prefix else name
            state[key] = full[name] if name in full else param.detach().clone()
    return state
