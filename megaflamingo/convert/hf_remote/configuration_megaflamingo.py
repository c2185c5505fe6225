"""Configuration of an exported megaflamingo model (written by megaflamingo; torch + transformers only).

The vision tower, the Perceiver and the cross-attention blocks are described by plain dicts; the
decoder LM by a transformers config of its own family (llama, mpt, gpt_neox, qwen2), built with
transformers' own class so its KV cache and masks are transformers' own.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig


class MegaFlamingoConfig(PretrainedConfig):
    """A Flamingo model: open_clip-style ViT -> Perceiver -> gated cross-attention in a causal LM.

    Args:
        text_config: the LM's transformers config (or its dict, with `model_type`).
        vision_config: ViT sizes: image_size, patch_size, width, layers, heads, mlp_width, act
            ("gelu" | "quick_gelu"), layer_scale (bool), ln_pre (bool), norm_eps.
        perceiver_config: depth, heads, dim_head, num_latents, ff_mult.
        xattn_config: heads, dim_head, ff_mult.
        cross_attn_layers: decoder layer indices that get a cross-attention block in front.
        media_token_id: id of `<image>`.
        eoc_token_id: id of `<|endofchunk|>` (the end of generation).
    """

    model_type = "megaflamingo"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, vision_config=None, perceiver_config=None, xattn_config=None,
                 cross_attn_layers=(), media_token_id=None, eoc_token_id=None, **kwargs) -> None:
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.text_config = text_config
        self.vision_config = dict(vision_config or {})
        self.perceiver_config = dict(perceiver_config or {})
        self.xattn_config = dict(xattn_config or {})
        self.cross_attn_layers = [int(i) for i in cross_attn_layers]
        self.media_token_id = media_token_id
        self.eoc_token_id = eoc_token_id
        if text_config is not None:
            kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        """The decoder LM's config (generation reads cache sizes from it)."""
        return self.text_config
