"""The pieces a Flamingo forward is made of, shared by `Flamingo` and the pipeline stages.

Shapes: B batch, M media per sample, C channels, S image side, P patch tokens, N latents,
T text tokens, D LM width, Dv vision width, V vocabulary.

    MediaEncoder   vision_x (B, M, 1, C, S, S) -> latents (B, M, N, Dv); text_time (B, T)
    FusionLayer    (h (B, T, D), ctx, latents, text_time) -> h: optional gated cross-attention
                   block, then one decoder layer
    LMHead         h (B, T, D) -> logits (B, T, V)        (models.decoder)

Composition, torchtune-style: each piece holds the model's own modules (vision tower, resampler,
cross-attention block, decoder layer) and calls them; none owns a parameter. `Flamingo` builds
them on demand over its registered modules (`media_encoder()`, `fusion_layers()`,
`lm.head()`), so its state-dict names (`vision.*`, `perceiver.*`, `lm.layers.{i}.*`, `xattn.{i}.*`)
do not move, and a pipeline stage holds the very same pieces. The decoder loop over fusion
layers therefore exists once: `Flamingo.hidden_states` and the pipeline blocks both call
`FusionLayer.forward`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megaflamingo.models.decoder import AttentionContext, KVSlot


class MediaEncoder(nn.Module):
    """Frozen vision tower, then the trainable resampler: images -> media latents.

    Args:
        vision: maps (B*M, C, S, S) images to (B*M, P, Dv) patch tokens.
        resampler: maps (B, M, P, Dv) patch tokens to (B, M, N, Dv) latents.
        media_token_id: the `<image>` token id (for `text_time`).
    """

    def __init__(self, vision: nn.Module, resampler: nn.Module, media_token_id: int) -> None:
        super().__init__()
        self.vision, self.resampler, self.media_token_id = vision, resampler, media_token_id

    def forward(self, vision_x: torch.Tensor) -> torch.Tensor:
        """Args: vision_x (B, M, F, C, S, S) with F == 1. Returns: latents (B, M, N, Dv).

        Raises:
            ValueError: vision_x is not (B, M, 1, C, S, S).
        """
        if vision_x.dim() != 6 or vision_x.shape[2] != 1:
            raise ValueError(f"vision_x must be (B, M, 1, C, S, S), got {tuple(vision_x.shape)}")
        B, M = vision_x.shape[:2]
        tokens = self.vision(vision_x.flatten(0, 2))  # (B*M, P, Dv)
        return self.resampler(tokens.unflatten(0, (B, M)))

    def text_time(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Args: input_ids (B, T). Returns: (B, T) long, how many `<image>` tokens are at or before
        each token (0 = before the first image)."""
        return (input_ids == self.media_token_id).cumsum(dim=-1)


class FusionLayer(nn.Module):
    """An optional gated cross-attention block in front of one decoder layer.

    Args:
        layer: the decoder layer (`DecoderLayer`), called as layer(h, ctx).
        xattn: the cross-attention block (`GatedCrossAttentionBlock`) in front of it, or None;
            called as xattn(h, media, text_time).
    """

    def __init__(self, layer: nn.Module, xattn: nn.Module | None = None) -> None:
        super().__init__()
        self.layer, self.xattn = layer, xattn

    def forward(self, h: torch.Tensor, ctx: AttentionContext, media: torch.Tensor | None = None,
                text_time: torch.Tensor | None = None, kv: KVSlot | None = None) -> torch.Tensor:
        """Args:
            h: (B, T, D) hidden states.
            ctx: the decoder's attention context for this forward.
            media: (B, M, N, Dv) latents; needed when the layer has a cross-attention block.
            text_time: (B, T) long media index per token; needed with media.
            kv: the layer's KV-cache slot when decoding with a cache; it also keeps the
                cross-attention block's media keys/values, computed on the first call.
        Returns:
            (B, T, D).
        Raises:
            ValueError: the layer has a cross-attention block but no media were given.
        """
        if self.xattn is not None:
            if media is None or text_time is None:
                raise ValueError("a fusion layer with cross-attention needs media and text_time")
            if kv is None:
                h = self.xattn(h, media, text_time)
            else:  # the media's keys/values once per prompt
                kv.media_kv = kv.media_kv or self.xattn.media_kv(media)
                h = self.xattn(h, media, text_time, kv.media_kv)
        return self.layer(h, ctx, kv) if kv is not None else self.layer(h, ctx)
