"""The gated cross-attention block inserted before every n-th decoder layer.

Shapes: B batch, T text tokens, M media, N latents per image, D LM width, Dv vision width,
H heads, K head dim; H_local = H / tp under tensor parallelism.

    h = h + tanh(attn_gate) * to_out(MediaAttn(to_q(LN(h)), to_kv(media), text_time))
    h = h + tanh(ff_gate)   * FF(h)

Each token attends to the latents of the most recent image at or before it (text_time = cumsum of
`<image>` tokens); tokens before the first image get exactly 0 from attention, and the gated FF
still runs on them (reference §0.4). Both gates start at 0, so at init the block is the identity.
The attention core is `megaflamingo.kernels.xattn.media_attention`: it reads only each token's own
image (cost independent of M) and applies tanh(attn_gate) in its epilogue; by linearity
tanh(g) * to_out(a) == to_out(tanh(g) * a), and the residual add happens in the out-projection.

The head count is read off the projections' output widths (H_local = width / K), so the block runs
unchanged when tensor parallelism has made to_q / to_kv column-parallel and to_out row-parallel
(H / tp heads per rank; the TP plan also sums attn_gate's per-rank gradient over the group).
q, k and v always stay on the autograd graph, also when no token of a micro-batch attends to an
image: both attention paths are one autograd node with q, k and v as inputs whose backward returns
their (then zero) gradients, so to_q, to_kv and the Perceiver get a gradient on every rank. ZeRO-2/3
reduce gradients from per-parameter hooks in backward; a rank whose weights fell off the graph would
send different buckets from its peers (tests/kernels/test_xattn_block.py checks this).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megaflamingo.config import XAttnConfig
from megaflamingo.kernels.xattn import media_attention
from megaflamingo.models.perceiver import FeedForward


class GatedCrossAttentionBlock(nn.Module):
    """Cross-attention from text to media latents, then a feed-forward, each behind a tanh gate.

    Args:
        dim: D, the LM width.
        dim_visual: Dv, the media latents' width.
        cfg: heads, dim_head, ff_mult.
        impl: attention implementation, "auto" | "triton" | "reference" (config model.kernels.xattn).
    """

    def __init__(self, dim: int, dim_visual: int, cfg: XAttnConfig, impl: str = "auto") -> None:
        super().__init__()
        self.heads, self.dim_head, self.impl = cfg.heads, cfg.dim_head, impl
        inner = cfg.heads * cfg.dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # Shape (1,), not 0-dim: DeepSpeed's parameter broadcast cannot view a 0-dim tensor.
        self.attn_gate = nn.Parameter(torch.full((1,), float(cfg.gate_init)))  # OpenFlamingo: 0
        self.ff = FeedForward(dim, cfg.ff_mult)
        self.ff_gate = nn.Parameter(torch.full((1,), float(cfg.gate_init)))

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the media latents (B, M, N, Dv): 2 x (B, M, H_local, N, K)."""
        k, v = self.to_kv(media).unflatten(-1, (2, -1, self.dim_head)).unbind(dim=3)  # 2 x (B, M, N, H_local, K)
        return k.transpose(2, 3), v.transpose(2, 3)

    def forward(self, h: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor,
                media_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Args:
            h: (B, T, D) hidden states entering the decoder layer.
            media: (B, M, N, Dv) Perceiver latents of every image.
            text_time: (B, T) long, media index per token (0 = before the first image).
            media_kv: `media_kv(media)` computed earlier (decoding with a cache), or None.
        Returns:
            (B, T, D).
        """
        K = self.dim_head
        q = self.to_q(self.norm(h)).unflatten(-1, (-1, K)).transpose(1, 2)  # (B, H_local, T, K)
        k, v = self.media_kv(media) if media_kv is None else media_kv  # (B, M, H_local, N, K)
        # one autograd node over q, k, v: every trainable weight stays on the graph (module docstring)
        attn = media_attention(q, k, v, text_time, gate=self.attn_gate, impl=self.impl)  # (B, H_local, T, K)
        h = h + self.to_out(attn.transpose(1, 2).flatten(-2))
        return h + torch.tanh(self.ff_gate) * self.ff(h)
