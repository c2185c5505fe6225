"""The Perceiver resampler: a fixed set of latents that attend to each image's patch tokens.

Shapes: B batch, M media, P patch tokens per image, N latents, Dv vision width, H heads, K head dim.

Numerics follow OpenFlamingo (reference §2.3): keys and values cover the concatenation of the
normalised media tokens and the normalised latents; no time or frame embeddings (the released
models have none); bias-free projections; exact-erf GELU; a final LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflamingo.config import PerceiverConfig
from megaflamingo.models.recompute import feed_forward, recompute_usable


class FeedForward(nn.Module):
    """LayerNorm -> Linear (no bias) -> GELU -> Linear (no bias); used by perceiver and xattn."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, dim * mult, bias=False)
        self.down = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., D). Returns: (..., D). While training, LayerNorm and GELU are recomputed
        in backward instead of saved (`models.recompute.feed_forward`: same values, same gradients)."""
        if x.requires_grad and recompute_usable(x, self.norm, self.up, self.down):
            return feed_forward(x, self.norm, self.up, self.down)
        return self.down(F.gelu(self.up(self.norm(x))))


class PerceiverAttention(nn.Module):
    """Latents attend to [media tokens; latents]."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Args: media (B, M, P, Dv); latents (B, M, N, Dv). Returns: (B, M, N, Dv)."""
        B, M, N, _ = latents.shape
        media = self.norm_media(media)
        if latents.stride(0) == 0 and latents.stride(1) == 0:
            # the first layer's learned latents, one block expanded over every image: normed and
            # projected once (the same values, with 1 / (B * M) of those matmuls' FLOPs)
            one = self.norm_latents(latents[0, 0])  # (N, Dv)
            q = self.to_q(one).expand(B, M, N, -1)  # (B, M, N, H*K)
            kv = torch.cat([self.to_kv(media), self.to_kv(one).expand(B, M, N, -1)], dim=2)
        else:
            latents = self.norm_latents(latents)
            q = self.to_q(latents)
            kv = self.to_kv(torch.cat([media, latents], dim=2))
        k, v = kv.chunk(2, dim=-1)  # (B, M, P+N, H*K)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, M, L, H*K) -> (B, M, H, L, K)
            return x.unflatten(-1, (self.heads, self.dim_head)).transpose(2, 3)

        # 4-D (B * M, H, L, K): SDPA's fused CPU kernel (saves q, k, v, out and the log-sum-exp; 5-D
        # inputs take the math path, which also saves the score and probability matrices)
        q, k, v = (heads(x).flatten(0, 1) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).unflatten(0, (B, M))  # (B, M, H, N, K)
        return self.to_out(out.transpose(2, 3).flatten(-2))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, cfg.heads, cfg.dim_head)
        self.ff = FeedForward(dim, cfg.ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Resample each image's P patch tokens to N latents.

    Args:
        dim: Dv, the vision width.
        cfg: depth, heads, dim_head, num_latents, ff_mult.
    """

    def __init__(self, dim: int, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim) * cfg.latent_init_std)
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """Args: media (B, M, P, Dv) patch tokens. Returns: (B, M, N, Dv) latents."""
        B, M = media.shape[:2]
        latents = self.latents.expand(B, M, -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)
