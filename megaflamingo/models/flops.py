"""Analytic FLOPs of one Flamingo training step, per sample and per component, frozen-aware.

Shapes: T text tokens per sample, M images per sample, P patch tokens per image (CLS excluded),
N latents per image, D LM width, Dv vision width, V vocabulary rows, L decoder layers.

What each weight costs per token it touches (reference/perf_anchors.md §1.3), counting 2 FLOPs
per multiply-add:

| weights                                                            | passes               | FLOPs |
|--------------------------------------------------------------------|----------------------|-------|
| trainable (Perceiver, cross-attention, the added token rows)        | fwd + dgrad + wgrad  | 6N    |
| frozen on the gradient path (LM layers above the lowest trainable   | fwd + dgrad          | 4N    |
|   module, the LM head)                                             |                      |       |
| frozen off it (the vision tower; with model.freeze_lm_embeddings,   | fwd                  | 2N    |
|   the LM layers below the first cross-attention block)             |                      |       |

Attention cores (the score and value products, no weights) are counted apart: forward
4 * Lq * Lk * (H * K); on the gradient path the backward adds twice that (dQ, dK, dV).
Causal self-attention: `causal="half"` (default, Megatron's convention) counts half the score
matrix, `causal="full"` counts all of it (PaLM / torchtitan, and what
`torch.utils.flop_counter.FlopCounterMode` measures). Non-causal cores (vision, Perceiver,
cross-attention) are always counted in full. Embedding lookups, norms, activations, softmax and
the loss count 0.

Layer layout matches `Flamingo`: the embedding's `<image>` / `<|endofchunk|>` rows train unless
model.freeze_lm_embeddings, so the gradient reaches the embedding through *every* decoder layer;
the vision tower runs under no_grad. A cross-attention token attends to the N latents of one
image (the gather path), so its core costs T_att * N, where T_att is the number of tokens at or
after the first `<image>`.

Three totals (per sample):
- `true`: the sum above; the numerator of MFU.
- `hardware`: `true` plus the forward that activation recompute repeats (decoder layers and
  cross-attention blocks on the gradient path); the numerator of HFU.
- `six_n_all`: 6 * N * tokens over every weight, frozen or not, without attention cores: the
  "6N over all parameters" convention (IDEFICS, Megatron, torchtitan-style MFU), for comparison.
`six_n_trainable` is 6 * N * tokens over the trainable weights only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

from megaflamingo.config import LMConfig, ModelConfig
from megaflamingo.models.families import family_of

CAUSAL_CONVENTIONS = ("half", "full")


@dataclass(frozen=True)
class ComponentFlops:
    """FLOPs per sample of one component in one training step (forward + backward)."""

    name: str
    params: int
    """N: matmul weight elements (biases, norms and lookup tables excluded)."""
    trainable: bool
    matmul_fwd: float
    matmul_bwd: float
    """dgrad (+ wgrad for trainable weights); 0 off the gradient path."""
    attn_fwd: float
    attn_bwd: float
    recompute_fwd: float
    """Forward FLOPs repeated by activation recompute (0 unless recompute was asked for)."""
    six_n: float
    """6 * N * tokens: this component's share of the "6N over all parameters" convention."""

    @property
    def total(self) -> float:
        """True FLOPs: matmuls and attention cores, forward and backward."""
        return self.matmul_fwd + self.matmul_bwd + self.attn_fwd + self.attn_bwd

    @property
    def forward(self) -> float:
        """Forward FLOPs: matmuls and attention cores."""
        return self.matmul_fwd + self.attn_fwd


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per sample of one training step, by component, and the totals built from them."""

    seq_len: int
    num_media: int
    causal: str
    components: tuple[ComponentFlops, ...]

    def __getitem__(self, name: str) -> ComponentFlops:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(f"no component '{name}' (have {', '.join(c.name for c in self.components)})")

    @property
    def true(self) -> float:
        """Frozen-aware FLOPs (MFU numerator)."""
        return sum(c.total for c in self.components)

    @property
    def hardware(self) -> float:
        """`true` plus recomputed forwards (HFU numerator)."""
        return self.true + sum(c.recompute_fwd for c in self.components)

    @property
    def forward(self) -> float:
        """Forward FLOPs of every component."""
        return sum(c.forward for c in self.components)

    @property
    def six_n_all(self) -> float:
        """6 * N * tokens over every weight, frozen or not (no attention cores)."""
        return sum(c.six_n for c in self.components)

    @property
    def six_n_trainable(self) -> float:
        """6 * N * tokens over the trainable weights only."""
        return sum(c.six_n for c in self.components if c.trainable)

    def as_dict(self) -> dict:
        """Plain data for JSON: shapes, totals, and each component's fields."""
        return {
            "seq_len": self.seq_len, "num_media": self.num_media, "causal": self.causal,
            "true": self.true, "hardware": self.hardware, "forward": self.forward,
            "six_n_all": self.six_n_all, "six_n_trainable": self.six_n_trainable,
            "components": {c.name: {f.name: getattr(c, f.name) for f in fields(c) if f.name != "name"}
                           | {"total": c.total} for c in self.components},
        }


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class VisionShape:
    """The ViT sizes FLOP counting needs (from an open_clip vision config)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    mlp_width: int

    @property
    def num_patches(self) -> int:
        """P: patch tokens per image (the CLS token comes on top)."""
        return (self.image_size // self.patch_size) ** 2


def _side(value: int | Sequence[int]) -> int:
    side = value if isinstance(value, int) else value[0]
    if not isinstance(value, int) and any(v != side for v in value):
        raise ValueError(f"non-square vision size {value} is not supported")
    return side


def vision_shape(cfg: ModelConfig) -> VisionShape:
    """The ViT sizes of the vision tower (named open_clip config or inline dict; no weights read).

    Raises:
        ValueError: an unknown open_clip name, or a tower that is not a plain open_clip ViT.
    """
    if cfg.vision.open_clip_config is not None:
        model_cfg = cfg.vision.open_clip_config
    else:
        import open_clip

        model_cfg = open_clip.get_model_config(cfg.vision.open_clip_model)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model '{cfg.vision.open_clip_model}'")
    v = model_cfg["vision_cfg"]
    if v.get("timm_model_name"):
        raise ValueError("FLOP counting supports open_clip's own ViT towers, not timm towers")
    width = v.get("width", 768)
    return VisionShape(image_size=_side(v.get("image_size", 224)), patch_size=_side(v.get("patch_size", 16)),
                       width=width, layers=v.get("layers", 12), mlp_width=int(width * v.get("mlp_ratio", 4.0)))


def lm_shape(cfg: ModelConfig) -> LMConfig:
    """The LM sizes: the inline `model.lm`, or the config.json of `model.lm.hf_path`."""
    if cfg.lm.hf_path is None:
        return cfg.lm
    from megaflamingo.models.hf_weights import lm_config_from_hf

    return lm_config_from_hf(cfg.lm.hf_path)


def _vocab_rows(cfg: ModelConfig, lm: LMConfig) -> int:
    if cfg.vocab_size is not None:
        return cfg.vocab_size
    if cfg.tokenizer is None:
        return lm.vocab_size
    from megaflamingo.models.flamingo import resolve_token_ids

    return resolve_token_ids(cfg).vocab_size


# ----------------------------------------------------------------------------- components


def _component(name: str, params: int, tokens: float, *, passes: int, trainable: bool,
               attn_fwd: float = 0.0, recompute: bool = False) -> ComponentFlops:
    """Weights N applied to `tokens` tokens: passes 1 (fwd), 2 (fwd + dgrad) or 3 (+ wgrad).

    The attention core's backward exists exactly when the gradient flows (passes >= 2).
    """
    matmul_fwd = 2.0 * params * tokens
    on_path = passes >= 2
    return ComponentFlops(
        name=name, params=params, trainable=trainable,
        matmul_fwd=matmul_fwd, matmul_bwd=matmul_fwd * (passes - 1),
        attn_fwd=attn_fwd, attn_bwd=2.0 * attn_fwd if on_path else 0.0,
        recompute_fwd=(matmul_fwd + attn_fwd) if (recompute and on_path) else 0.0,
        six_n=6.0 * params * tokens,
    )


def _vision(v: VisionShape, num_media: int) -> ComponentFlops:
    P, L = v.num_patches, v.num_patches + 1  # patches; tokens with CLS
    patch_embed = 3 * v.patch_size**2 * v.width  # the conv is a matmul over each patch
    per_layer = 4 * v.width**2 + 2 * v.width * v.mlp_width
    params = patch_embed + v.layers * per_layer
    tokens_weighted = num_media * (patch_embed * P + v.layers * per_layer * L) / params
    attn = num_media * v.layers * 4.0 * L * L * v.width
    return _component("vision", params, tokens_weighted, passes=1, trainable=False, attn_fwd=attn)


def _perceiver(cfg: ModelConfig, v: VisionShape, num_media: int) -> ComponentFlops:
    p, Dv, P = cfg.perceiver, v.width, v.num_patches
    inner, N = p.heads * p.dim_head, p.num_latents
    q_out_ff = 2 * Dv * inner + 2 * Dv * Dv * p.ff_mult  # on the N latents
    kv = 2 * Dv * inner  # on the P + N keys
    params = p.depth * (q_out_ff + kv)
    weighted = num_media * p.depth * (q_out_ff * N + kv * (P + N))
    # the first layer's latents are one block for every image: to_q and the latents' to_kv rows
    # run once (`PerceiverAttention`); counted once per sample, which is exact at micro-batch 1
    weighted -= max(num_media - 1, 0) * N * 3 * Dv * inner
    attn = num_media * p.depth * 4.0 * N * (P + N) * inner
    return _component("perceiver", params, weighted / params, passes=3, trainable=True, attn_fwd=attn)


def _xattn(cfg: ModelConfig, D: int, Dv: int, num_blocks: int, T: int, T_att: int, num_media: int,
           recompute: bool) -> ComponentFlops:
    x = cfg.xattn
    inner, N = x.heads * x.dim_head, cfg.perceiver.num_latents
    text = 2 * D * inner + 2 * D * D * x.ff_mult  # to_q, to_out, ff on the T tokens
    kv = 2 * Dv * inner  # to_kv on the M * N latents
    params = num_blocks * (text + kv)
    weighted = num_blocks * (text * T + kv * num_media * N)
    attn = num_blocks * 4.0 * T_att * N * inner
    return _component("xattn", params, weighted / params if params else 0.0, passes=3, trainable=True,
                      attn_fwd=attn, recompute=recompute)


def _lm_layer_params(lm: LMConfig) -> int:
    K = lm.head_dim or lm.hidden_size // lm.num_heads
    H, G, D = lm.num_heads, lm.num_kv_heads or lm.num_heads, lm.hidden_size
    F = lm.intermediate_size or 4 * D
    mlp = family_of(lm).mlp_matrices * D * F  # the family's FLOPs term: 3 gated, 2 plain
    return D * K * (2 * H + 2 * G) + mlp


def _lm_layers(lm: LMConfig, T: int, below: int, causal: str, recompute: bool) -> list[ComponentFlops]:
    """Decoder layers: `below` of them forward only (off the gradient path), the rest fwd + dgrad."""
    K = lm.head_dim or lm.hidden_size // lm.num_heads
    attn_per_layer = 4.0 * T * T * lm.num_heads * K * (0.5 if causal == "half" else 1.0)
    per_layer = _lm_layer_params(lm)
    out = []
    for name, count, passes in (("lm_layers_off_path", below, 1), ("lm_layers", lm.num_layers - below, 2)):
        if count:
            out.append(_component(name, count * per_layer, T, passes=passes, trainable=False,
                                  attn_fwd=count * attn_per_layer, recompute=recompute))
    return out


def count_flops(
    cfg: ModelConfig,
    seq_len: int,
    num_media: int,
    *,
    attending_tokens: int | None = None,
    causal: str = "half",
    recompute: bool = False,
) -> StepFlops:
    """FLOPs per sample of one training step (forward, loss, backward) of `build_model(cfg)`.

    Args:
        cfg: the model config (inline sizes, a named open_clip tower, or a local HF config.json).
        seq_len: T, text tokens per sample (padding included: padded tokens cost the same).
        num_media: M, images per sample (zero-padded images cost the same as real ones).
        attending_tokens: tokens that attend to an image (at or after the first `<image>`);
            None means all T.
        causal: "half" (Megatron: causal self-attention counts half the scores) or "full"
            (PaLM / torchtitan / FlopCounterMode).
        recompute: activation checkpointing recomputes the forward of every decoder layer and
            cross-attention block on the gradient path (counted in `hardware` only).
    Returns:
        A `StepFlops` with components vision, perceiver, xattn, lm_layers (and lm_layers_off_path
        when model.freeze_lm_embeddings leaves layers below the first block off the gradient
        path), lm_head, and lm_head_added (trainable output rows of a tied head).
    Raises:
        ValueError: a bad causal convention or sizes, or a tower this module cannot count.
    """
    if causal not in CAUSAL_CONVENTIONS:
        raise ValueError(f"causal must be one of {CAUSAL_CONVENTIONS}, got '{causal}'")
    if seq_len < 1 or num_media < 0:
        raise ValueError(f"need seq_len >= 1 and num_media >= 0, got {seq_len}, {num_media}")
    T_att = seq_len if attending_tokens is None else attending_tokens
    if not 0 <= T_att <= seq_len:
        raise ValueError(f"attending_tokens {T_att} must lie in [0, seq_len={seq_len}]")
    v, lm = vision_shape(cfg), lm_shape(cfg)
    D, V, every = lm.hidden_size, _vocab_rows(cfg, lm), cfg.cross_attn_every_n_layers
    num_blocks = sum(1 for i in range(lm.num_layers) if (i + 1) % every == 0)
    # Trainable embedding rows pull the gradient through every layer; without them, the layers
    # below the first cross-attention block (index every - 1) see no gradient.
    added = 0 if cfg.freeze_lm_embeddings else 2
    below = min(every - 1, lm.num_layers) if cfg.freeze_lm_embeddings else 0
    components = [
        _vision(v, num_media),
        _perceiver(cfg, v, num_media),
        _xattn(cfg, D, v.width, num_blocks, seq_len, T_att, num_media, recompute),
        *_lm_layers(lm, seq_len, below, causal, recompute),
        _component("lm_head", D * V, seq_len, passes=2, trainable=False),
    ]
    if lm.tie_word_embeddings and added:
        components.append(_component("lm_head_added", D * added, seq_len, passes=3, trainable=True))
    return StepFlops(seq_len=seq_len, num_media=num_media, causal=causal, components=tuple(components))
