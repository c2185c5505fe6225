"""The Flamingo model: frozen vision tower -> Perceiver -> gated cross-attention in a frozen LM.

Shapes: B batch, M media per sample, F frames (= 1), C channels, S image side, P patch tokens,
N latents, T text tokens, D LM width, Dv vision width, V vocabulary.

    Flamingo(vision_x (B, M, F, C, S, S), input_ids (B, T), attention_mask (B, T)) -> logits (B, T, V)

A cross-attention block sits before decoder layer i iff (i + 1) % cross_attn_every_n_layers == 0.
Media are an explicit forward argument: nothing is stored on modules between calls. What trains is
fixed here, at construction: the Perceiver, every cross-attention block, and the added token rows.

The forward is a composition of `models.fusion` pieces built over the registered modules:
`media_encoder()` (vision -> Perceiver), `fusion_layers()` (optional cross-attention block +
decoder layer i) and `lm.head()` (final norm + head). Pipeline stages hold the same pieces.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from megaflamingo.config import ConfigError, ModelConfig
from megaflamingo.models.cross_attention import GatedCrossAttentionBlock
from megaflamingo.models.decoder import DecoderLM, build_decoder
from megaflamingo.models.fusion import FusionLayer, MediaEncoder
from megaflamingo.models.resamplers import build_resampler
from megaflamingo.models.towers import build_tower
from megaflamingo.models.vision import VisionEncoder


def xattn_layer_indices(num_layers: int, every_n: int) -> list[int]:
    """Decoder layers that get a cross-attention block in front of them (reference §0.3)."""
    return [i for i in range(num_layers) if (i + 1) % every_n == 0]


class Flamingo(nn.Module):
    """A Flamingo vision-language model (single process, parallelism-free).

    Args:
        vision: the frozen vision tower.
        lm: the decoder LM, already resized to the tokenizer's vocabulary.
        cfg: the resolved model config (token ids filled in).
    """

    def __init__(self, vision: VisionEncoder, lm: DecoderLM, cfg: ModelConfig) -> None:
        super().__init__()
        self.media_token_id = cfg.media_token_id
        self.vision = vision
        self.perceiver = build_resampler(vision.width, cfg)  # the Perceiver unless model.resampler says
        self.lm = lm
        dim = lm.embed_tokens.dim
        self.xattn = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(dim, vision.width, cfg.xattn, impl=cfg.kernels.xattn)
                for i in xattn_layer_indices(len(lm.layers), cfg.cross_attn_every_n_layers)
            }
        )
        self._freeze()

    def _freeze(self) -> None:
        self.vision.requires_grad_(False)
        self.lm.requires_grad_(False)
        if self.lm.embed_tokens.added is not None:
            self.lm.embed_tokens.added.requires_grad_(True)

    def media_encoder(self) -> MediaEncoder:
        """The vision tower and the Perceiver as one module (a view: no parameters of its own)."""
        return MediaEncoder(self.vision, self.perceiver, self.media_token_id)

    def fusion_layers(self) -> list[FusionLayer]:
        """Decoder layer i with the cross-attention block in front of it (if any), for every i."""
        return [FusionLayer(layer, self.xattn[str(i)] if str(i) in self.xattn else None)
                for i, layer in enumerate(self.lm.layers)]

    def encode_media(self, vision_x: torch.Tensor) -> torch.Tensor:
        """Args: vision_x (B, M, F, C, S, S) with F == 1. Returns: latents (B, M, N, Dv)."""
        return self.media_encoder()(vision_x)

    def text_time(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) media index per token: how many `<image>` tokens are at or before it."""
        return self.media_encoder().text_time(input_ids)

    def forward(
        self,
        vision_x: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            vision_x: (B, M, 1, C, S, S) images, zero-padded to M per sample.
            input_ids: (B, T) token ids with `<image>` where each image sits.
            attention_mask: (B, T) 1 for real tokens, 0 for padding; None means all real.
        Returns:
            logits (B, T, V).
        """
        return self.lm.logits(self.hidden_states(vision_x, input_ids, attention_mask))

    def hidden_states(self, vision_x: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` without the LM head: the last decoder layer's output (B, T, D) (decoding
        needs the logits of the last position only)."""
        media = self.encode_media(vision_x)  # (B, M, N, Dv)
        text_time = self.text_time(input_ids)  # (B, T)
        h = self.lm.embed(input_ids)  # (B, T, D)
        ctx = self.lm.attention_context(attention_mask, input_ids.shape[1], h.device, h.dtype)
        for layer in self.fusion_layers():
            h = layer(h, ctx, media, text_time)
        return h


def resolve_token_ids(cfg: ModelConfig) -> ModelConfig:
    """The config `build_model` builds from: vocab_size filled from the LM when no tokenizer is named.

    Reads no file. A config that names a tokenizer or an LM checkpoint must be resolved first
    (`megaflamingo.resolve.resolve_model`; `megaflamingo.build_model` does both).

    Raises:
        ConfigError: vocab_size or a Flamingo token id is still unknown.
    """
    if cfg.tokenizer is None and cfg.lm.hf_path is None and cfg.vocab_size is None:
        cfg = dataclasses.replace(cfg, vocab_size=cfg.lm.vocab_size)
    for name in ("vocab_size", "media_token_id", "eoc_token_id"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"model.{name} is not set: resolve the config first "
                              f"(megaflamingo.resolve.resolve_model, or megaflamingo.build_model)")
    return cfg


def construct_model(cfg: ModelConfig, tower: nn.Module | None = None) -> Flamingo:
    """The Flamingo modules a config describes, with the modules' own initialisation and no weight
    file read (`parallel.materialize.build_rank_model` constructs them on the meta device).

    Args:
        cfg: a resolved model config whose LM is inline (`lm.hf_path` None: the sizes are in `lm`).
        tower: the vision tower, already built; None: built here from `cfg.vision`.
    Returns:
        The model in fp32, with its trainable set fixed.
    """
    cfg = resolve_token_ids(cfg)
    trainable_ids = () if cfg.freeze_lm_embeddings else (cfg.media_token_id, cfg.eoc_token_id)
    lm = build_decoder(cfg.lm, vocab_size=cfg.vocab_size, trainable_ids=trainable_ids)
    return Flamingo(tower if tower is not None else build_tower(cfg.vision), lm, cfg)


def build_model(cfg: ModelConfig, seed: int | None = None) -> Flamingo:
    """Build a Flamingo model from a resolved model config (random init unless weight paths are given).

    The one-rank case of the rank-local build (`models.materialize`; the parallel one is
    `parallel.materialize.build_rank_model`), so a single process starts from exactly the values
    every parallel layout starts from: frozen weights read from the files the config names, every
    other parameter drawn from (seed, its name). Reads no tokenizer and no OpenFlamingo checkpoint
    (`megaflamingo.build_model` resolves the config and imports that checkpoint too). Under
    `torch.device("meta")` only the shapes are built (`construct_model`: an inline LM, no file).

    Args:
        cfg: the model section, resolved (`megaflamingo.resolve.resolve_model`): vocab_size and
            the token ids set. An inline LM without a tokenizer needs only the token ids.
        seed: the initialisation seed; None: `torch.initial_seed()`, the seed of the last
            `torch.manual_seed(s)`, so that call then this one give the model a run with
            train.seed = s starts from, on any layout.
    Returns:
        The model (trainable weights fp32, frozen ones in `cfg.frozen_dtype`), its trainable set
        fixed (Perceiver, cross-attention, added rows).
    Raises:
        ConfigError: the config is not resolved.
        ValueError / FileNotFoundError: a weight file does not match the config, or is missing or
            truncated (one line naming it).
    """
    from megaflamingo.models import materialize

    if torch.get_default_device().type == "meta":  # shapes only (planning): nothing to draw or read
        return construct_model(cfg)
    return materialize.build_model(cfg, torch.initial_seed() if seed is None else seed)[0]
