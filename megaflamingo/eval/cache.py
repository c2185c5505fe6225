"""A Decoder with a KV cache: the media are encoded once per prompt, every later call runs only
the new tokens against the cached keys and values of the decoder layers.

Shapes: B rows, M media, N latents, Dv vision width, P cached tokens, T new tokens, G kv heads,
K head dim, V vocabulary.

The cross-attention blocks need no per-token cache: a token attends only to the latents of its
own image (text_time), so the state keeps the latents (B, M, N, Dv), each block's media keys and
values (computed once per prompt) and the last token's text_time; new tokens continue the count. The decoder layers' self-attention appends to `KVSlot`s
(`models/decoder.py`); positions and the causal/padding mask of the new tokens come from
`attention_context(..., past_len=P)`. Same tokens as `UncachedDecoder` (tests/eval/test_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaflamingo.models.decoder import KVSlot


@dataclass(frozen=True)
class CachedState:
    """What the cache keeps between calls (a value: extending returns a new one)."""

    media: torch.Tensor  # (B, M, N, Dv) latents
    kv: tuple[KVSlot, ...]  # per decoder layer: (B, G, P, K) keys and values
    attention_mask: torch.Tensor  # (B, P)
    last_time: torch.Tensor  # (B,) text_time of the last token


class CachedDecoder:
    """The `generation.Decoder` interface over a Flamingo, with a KV cache.

    Args:
        model: a Flamingo (`encode_media`, `text_time`, `fusion_layers`, `lm.embed`,
            `lm.attention_context`, `lm.logits`).
    """

    def __init__(self, model) -> None:
        self.model = model

    def _run(self, media: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
             past: tuple[KVSlot, ...] | None, last_time: torch.Tensor) -> tuple[torch.Tensor, tuple, torch.Tensor]:
        """The new tokens (B, T) through every fusion layer. Returns h (B, T, D), the new slots and
        the new tokens' text_time (B, T)."""
        layers = self.model.fusion_layers()
        past_len = 0 if past is None else past[0].k.shape[2]
        text_time = self.model.text_time(input_ids) + last_time[:, None]  # (B, T)
        h = self.model.lm.embed(input_ids)  # (B, T, D)
        ctx = self.model.lm.attention_context(mask, input_ids.shape[1], h.device, h.dtype, past_len)
        slots = tuple(KVSlot() for _ in layers) if past is None else tuple(KVSlot(s.k, s.v, s.media_kv) for s in past)
        for layer, slot in zip(layers, slots):
            h = layer(h, ctx, media, text_time, slot)
        return h, slots, text_time

    def start(self, vision_x: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, CachedState]:
        media = self.model.encode_media(vision_x)  # once per prompt
        zeros = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        h, slots, text_time = self._run(media, input_ids, attention_mask, None, zeros)
        logits = self.model.lm.logits(h[:, -1:])[:, 0].float()  # (B, V)
        return logits, CachedState(media, slots, attention_mask, text_time[:, -1])

    def extend(self, state: CachedState, tokens: torch.Tensor) -> tuple[torch.Tensor, CachedState]:
        mask = torch.cat([state.attention_mask, torch.ones_like(tokens)], dim=1)  # (B, P + T)
        h, slots, text_time = self._run(state.media, tokens, mask, state.kv, state.last_time)
        logits = self.model.lm.logits(h).float()  # (B, T, V)
        return logits, CachedState(state.media, slots, mask, text_time[:, -1])

    def select(self, state: CachedState, rows: torch.Tensor) -> CachedState:
        rows = rows.to(state.media.device)
        kv = tuple(KVSlot(s.k[rows], s.v[rows], None if s.media_kv is None else
                          (s.media_kv[0][rows], s.media_kv[1][rows])) for s in state.kv)
        return CachedState(state.media[rows], kv, state.attention_mask[rows], state.last_time[rows])
