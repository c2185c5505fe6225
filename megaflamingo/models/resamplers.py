"""Resamplers behind one contract, picked by `model.resampler`: tower tokens -> the media the
cross-attention blocks read.

Shapes: B batch, M media, P tower tokens per image, N media tokens per image, Dv vision width.

    resampler(tokens (B, M, P, Dv))  ->  media (B, M, N, Dv)

- "perceiver" (default): OpenFlamingo's Perceiver resampler, N = num_latents learned latents
  (`perceiver.PerceiverResampler`; its parameter names are the released checkpoints').
- "none": the tower tokens themselves, layer-normalised (N = P), as in the Flamingo paper's
  resampler ablation; nothing learned stands between the image and the gates but the norm's affine.
  At small scale a freshly initialised Perceiver hides the image (its output is dominated by the
  latents; see README "Demo results"); this one passes it from step 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megaflamingo.config import ModelConfig
from megaflamingo.models.perceiver import PerceiverResampler


class TokenNorm(nn.Module):
    """The "none" resampler: LayerNorm over each tower token.

    Args:
        dim: Dv.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """Args: media (B, M, P, Dv). Returns: (B, M, P, Dv)."""
        return self.norm(media)


def build_resampler(dim: int, cfg: ModelConfig) -> nn.Module:
    """The resampler `cfg.resampler` names, for tower tokens of width `dim`.

    Raises:
        ValueError: an unknown resampler name.
    """
    if cfg.resampler == "perceiver":
        return PerceiverResampler(dim, cfg.perceiver)
    if cfg.resampler == "none":
        return TokenNorm(dim)
    raise ValueError(f"model.resampler: expected perceiver or none, got '{cfg.resampler}'")
