"""An exported megaflamingo model for transformers `trust_remote_code` (torch + transformers only).

Shapes: B batch, M media per sample, F frames (= 1), C channels, S image side, P patch tokens,
N latents, T text tokens, D LM width, Dv vision width, H heads, K head dim, V vocabulary.

    model(input_ids (B, T), attention_mask (B, T), vision_x (B, M, 1, C, S, S)).logits  # (B, T, V)
    model.generate(input_ids, attention_mask=..., vision_x=..., max_new_tokens=...)

The numerics are megaflamingo's (and OpenFlamingo's): the ViT's patch tokens without CLS and
before `ln_post` feed a Perceiver; a gated cross-attention block runs in front of each decoder
layer listed in `config.cross_attn_layers`, where every token attends to the latents of the most
recent `<image>` at or before it (none before the first image: output 0; more `<image>` tokens than
images: the mean over all latents). Positions are 0..T-1 for every row, padded or not.

The decoder is transformers' own class for the LM family (LlamaForCausalLM, MptForCausalLM,
GPTNeoXForCausalLM, Qwen2ForCausalLM), so the KV cache, masks and `generate` are transformers'
own; each cross-attention block enters through a forward pre-hook on its decoder layer. The media
latents and per-token media index reach the hooks through `self._conditioning`, which is set for
the duration of one forward call only. `generate` encodes the images once and passes the latents
to every step.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_megaflamingo import MegaFlamingoConfig

# ----------------------------------------------------------------------------- vision tower


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x) (OpenAI CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """x * gamma (per channel)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class VisionBlock(nn.Module):
    """Pre-norm ViT block with open_clip's parameter names (ln_1, attn, ls_1, ln_2, mlp, ls_2)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        width, eps = cfg["width"], cfg["norm_eps"]
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, cfg["heads"], batch_first=True)
        self.ls_1 = LayerScale(width) if cfg["layer_scale"] else nn.Identity()
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        act = QuickGELU() if cfg["act"] == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, cfg["mlp_width"])), ("gelu", act),
                                              ("c_proj", nn.Linear(cfg["mlp_width"], width))]))
        self.ls_2 = LayerScale(width) if cfg["layer_scale"] else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B*M, 1+P, Dv). Returns: same shape."""
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class VisionTransformerBody(nn.Module):
    """`resblocks` holder, so weight names read `transformer.resblocks.<i>.*` as in open_clip."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg["layers"]))


class VisionTower(nn.Module):
    """The frozen ViT: patch tokens without CLS, before `ln_post` (what the Perceiver reads)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        width, patch = cfg["width"], cfg["patch_size"]
        grid = cfg["image_size"] // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=cfg["norm_eps"]) if cfg["ln_pre"] else nn.Identity()
        self.transformer = VisionTransformerBody(cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images (B*M, C, S, S). Returns: (B*M, P, Dv) patch tokens."""
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (BM, P, Dv)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (BM, 1+P, Dv)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return x[:, 1:]


# ----------------------------------------------------------------------------- Perceiver


class FeedForward(nn.Module):
    """LayerNorm -> Linear (no bias) -> exact GELU -> Linear (no bias)."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, dim * mult, bias=False)
        self.down = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))


class PerceiverAttention(nn.Module):
    """Latents attend to [normalised media tokens; normalised latents]."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Args: media (B, M, P, Dv); latents (B, M, N, Dv). Returns: (B, M, N, Dv)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)  # (B, M, N, H*K)
        k, v = self.to_kv(torch.cat([media, latents], dim=2)).chunk(2, dim=-1)  # (B, M, P+N, H*K)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, M, L, H*K) -> (B, M, H, L, K)
            return x.unflatten(-1, (self.heads, self.dim_head)).transpose(2, 3)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # (B, M, H, N, K)
        return self.to_out(out.transpose(2, 3).flatten(-2))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, cfg: dict) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, cfg["heads"], cfg["dim_head"])
        self.ff = FeedForward(dim, cfg["ff_mult"])

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Each image's P patch tokens -> N latents."""

    def __init__(self, dim: int, cfg: dict) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(cfg["num_latents"], dim))
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg) for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """Args: media (B, M, P, Dv). Returns: (B, M, N, Dv)."""
        latents = self.latents.expand(media.shape[0], media.shape[1], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


# ----------------------------------------------------------------------------- cross-attention


def media_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
    """Each token attends to the latents of image text_time - 1 only.

    Args:
        q: (B, H, T, K) unscaled queries.
        k, v: (B, M, H, N, K) keys / values of every image.
        text_time: (B, T) media index per token (0 = before the first image).
    Returns:
        (B, T, H, K); 0 where text_time == 0, the mean of all values where text_time > M.
    """
    B, H, T, K = q.shape
    M, N = k.shape[1], k.shape[3]
    image = (text_time - 1).clamp(0, M - 1)  # (B, T)
    rows = torch.arange(B, device=q.device)[:, None]
    k_tok = k[rows, image].reshape(B * T, H, N, K)  # the token's own image
    v_tok = v[rows, image].reshape(B * T, H, N, K)
    q_tok = q.transpose(1, 2).reshape(B * T, H, 1, K)
    out = F.scaled_dot_product_attention(q_tok, k_tok, v_tok).view(B, T, H, K)
    out = out.masked_fill((text_time == 0)[:, :, None, None], 0.0)
    over = text_time > M
    if bool(over.any()):  # every key masked in OpenFlamingo: a uniform softmax over all latents
        out = torch.where(over[:, :, None, None], v.mean(dim=(1, 3))[:, None].to(out.dtype), out)
    return out


class GatedCrossAttentionBlock(nn.Module):
    """h + tanh(attn_gate) * to_out(media attention), then h + tanh(ff_gate) * FF(h)."""

    def __init__(self, dim: int, dim_visual: int, cfg: dict) -> None:
        super().__init__()
        self.heads, self.dim_head = cfg["heads"], cfg["dim_head"]
        inner = self.heads * self.dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, cfg["ff_mult"])
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor, media: torch.Tensor | None, text_time: torch.Tensor) -> torch.Tensor:
        """Args: h (B, T, D); media (B, M, N, Dv) or None (no images); text_time (B, T).
        Returns: (B, T, D)."""
        if media is not None and media.shape[1] > 0:
            H, K = self.heads, self.dim_head
            q = self.to_q(self.norm(h)).unflatten(-1, (H, K)).transpose(1, 2)  # (B, H, T, K)
            k, v = self.to_kv(media.to(h.dtype)).unflatten(-1, (2, H, K)).unbind(dim=3)  # (B, M, N, H, K)
            attn = media_attention(q, k.transpose(2, 3), v.transpose(2, 3), text_time)  # (B, T, H, K)
            h = h + self.to_out(torch.tanh(self.attn_gate) * attn.flatten(-2))
        return h + torch.tanh(self.ff_gate) * self.ff(h)


# ----------------------------------------------------------------------------- the model


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a transformers causal LM (`layers`, or `blocks` for MPT)."""
    base = lm.base_model
    for name in ("layers", "blocks", "h"):
        found = getattr(base, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}")


class MegaFlamingoForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """The Flamingo model (see the module docstring)."""

    config_class = MegaFlamingoConfig
    base_model_prefix = "megaflamingo"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: MegaFlamingoConfig) -> None:
        super().__init__(config)
        width = config.vision_config["width"]
        self.vision = VisionTower(config.vision_config)
        self.perceiver = PerceiverResampler(width, config.perceiver_config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        dim = self.language_model.get_input_embeddings().embedding_dim
        self.cross_attn = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(dim, width, config.xattn_config) for i in config.cross_attn_layers})
        self._conditioning = None
        layers = decoder_layers(self.language_model)
        for i in config.cross_attn_layers:
            layers[i].register_forward_pre_hook(partial(self._cross_attend, str(i)), with_kwargs=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # exported weights are always loaded; nothing here is meant to be trained from scratch

    def encode_media(self, vision_x: torch.Tensor) -> torch.Tensor:
        """Args: vision_x (B, M, 1, C, S, S). Returns: media latents (B, M, N, Dv)."""
        if vision_x.dim() != 6 or vision_x.shape[2] != 1:
            raise ValueError(f"vision_x must be (B, M, 1, C, S, S), got {tuple(vision_x.shape)}")
        B, M = vision_x.shape[:2]
        tokens = self.vision(vision_x.flatten(0, 2).to(self.vision.conv1.weight.dtype))  # (B*M, P, Dv)
        return self.perceiver(tokens.unflatten(0, (B, M)))

    def _cross_attend(self, key: str, module: nn.Module, args: tuple, kwargs: dict):
        media, text_time = self._conditioning
        block = self.cross_attn[key]
        if args:
            return (block(args[0], media, text_time), *args[1:]), kwargs
        kwargs["hidden_states"] = block(kwargs["hidden_states"], media, text_time)
        return args, kwargs

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                vision_x: torch.Tensor | None = None, media: torch.Tensor | None = None,
                text_time: torch.Tensor | None = None, **kwargs):
        """Args:
            input_ids: (B, T) with `<image>` where each image sits.
            attention_mask: (B, T) 1 real, 0 padding (left or right).
            vision_x: (B, M, 1, C, S, S) images, zero-padded to M; or pass `media` instead.
            media: (B, M, N, Dv) latents from `encode_media` (generation passes them).
            text_time: (B, T) media index of each input token; computed from input_ids when None
                (pass it when input_ids are only the new tokens after a KV cache).
            **kwargs: passed to the LM (cache, use_cache, labels, ...).
        Returns:
            The LM's output (`.logits` (B, T, V), `.loss` with labels, the cache).
        """
        if media is None and vision_x is not None:
            media = self.encode_media(vision_x)
        if text_time is None:
            text_time = (input_ids == self.config.media_token_id).cumsum(dim=-1)
        self._conditioning = (media, text_time)
        try:
            return self.language_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._conditioning = None

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        new = inputs["input_ids"].shape[1]
        inputs["text_time"] = (input_ids == self.config.media_token_id).cumsum(dim=-1)[:, -new:]
        inputs.pop("vision_x", None)  # generate() encoded them once into `media`
        return inputs

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor | None = None, vision_x: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs):
        """transformers' generate with the images encoded once (greedy by default, stops at
        `<|endofchunk|>`; see generation_config.json). Args: as `forward`, plus generation kwargs."""
        if kwargs.get("media") is None and vision_x is not None:
            kwargs["media"] = self.encode_media(vision_x)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
