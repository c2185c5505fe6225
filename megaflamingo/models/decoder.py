"""Our decoder LMs — LLaMA, MPT and GPT-NeoX — written from their equations.

Shapes: B batch, T text tokens, D width, H query heads, G key/value heads, K head dim,
R rotary dims per head (R <= K), F MLP width, V vocabulary rows.

One layer class serves the three families; the family only picks the parts:

| family   | norm                | positions                 | MLP               | residual            |
|----------|---------------------|---------------------------|-------------------|---------------------|
| llama    | RMSNorm             | RoPE on all K (+ scaling) | SwiGLU (gate, up) | sequential          |
| mpt      | LayerNorm, no bias  | ALiBi, optional qkv clip  | up -> exact GELU  | sequential          |
| gpt_neox | LayerNorm with bias | RoPE on the first R dims  | up -> act(config) | parallel/sequential |

The logits equal transformers' `LlamaForCausalLM`, `MptForCausalLM` and `GPTNeoXForCausalLM`
(fp32, real positions). Matched on purpose:
- positions are 0..T-1 for every row, padded or not, as transformers' forward does;
- MPT's MLP width comes from the checkpoint (transformers builds 4 * D whatever expansion_ratio);
- RMSNorm normalises in fp32 and multiplies by the weight after casting back.
Not matched on purpose: ALiBi uses the config's alibi_bias_max, as MPT's own code does, while
transformers' MptModel always uses 8 (the value every released MPT has).
Every layer is a pure function of (h, ctx): the Flamingo wrapper interleaves its cross-attention
between `embed`, the layers and `logits`, and pipeline stages rebuild `ctx` from the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflamingo.config import LMConfig
from megaflamingo.models.attention import (
    alibi_slopes,
    build_sdpa_mask,
    flash_attention_usable,
    self_attention,
)
from megaflamingo.models.embedding import TokenEmbedding

FAMILIES = ("llama", "mpt", "gpt_neox")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# transformers activation names -> functions. gelu_new / gelu_fast / gelu_pytorch_tanh are the
# same tanh formula written three ways; they agree to float rounding.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
}


# ----------------------------------------------------------------------------- config facts


def head_dim(cfg: LMConfig) -> int:
    """K: cfg.head_dim, else hidden_size // num_heads."""
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def rotary_dims(cfg: LMConfig) -> int:
    """R: rotary dims per head (0 for MPT, which uses ALiBi)."""
    return 0 if cfg.family == "mpt" else int(head_dim(cfg) * cfg.rotary_pct)


def mlp_width(cfg: LMConfig) -> int:
    """F: cfg.intermediate_size, else 4 * hidden_size."""
    return cfg.intermediate_size or 4 * cfg.hidden_size


def rope_type(cfg: LMConfig) -> str:
    """The RoPE scaling rule named by cfg.rope_scaling ("default" when None)."""
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _validate_rope(cfg: LMConfig) -> None:
    kind = rope_type(cfg)
    _check(kind in ROPE_TYPES, f"rope_scaling type '{kind}' is not supported "
           f"(supported: {', '.join(ROPE_TYPES)})")
    needed = {"linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(kind, ())
    for key in needed:
        _check(key in cfg.rope_scaling, f"rope_scaling type '{kind}' needs '{key}'")
    rot = rotary_dims(cfg)
    _check(0 < rot and rot % 2 == 0,
           f"rotary dims int(head_dim * rotary_pct) = {rot} must be positive and even")


def validate_lm_config(cfg: LMConfig) -> None:
    """Check that `cfg` describes a decoder this module can build.

    Raises:
        ValueError: unknown family, inconsistent head sizes, unsupported RoPE scaling or activation.
    """
    _check(cfg.family in FAMILIES,
           f"unknown LM family '{cfg.family}' (expected {', '.join(FAMILIES)})")
    k, kv = head_dim(cfg), cfg.num_kv_heads or cfg.num_heads
    _check(cfg.head_dim is not None or cfg.hidden_size % cfg.num_heads == 0,
           f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    _check(cfg.num_heads % kv == 0, f"num_kv_heads {kv} does not divide num_heads {cfg.num_heads}")
    if cfg.family != "llama":
        _check(kv == cfg.num_heads,
               f"{cfg.family} has no grouped-query attention (num_kv_heads {kv})")
        _check(k * cfg.num_heads == cfg.hidden_size,
               f"{cfg.family} needs num_heads * head_dim == hidden_size")
    if cfg.family == "mpt":
        return
    _check(cfg.hidden_act in ACTIVATIONS, f"hidden_act '{cfg.hidden_act}' is not supported "
           f"(supported: {', '.join(ACTIVATIONS)})")
    _validate_rope(cfg)


# ----------------------------------------------------------------------------- positions


def rope_inv_freq(cfg: LMConfig, seq_len: int) -> torch.Tensor:
    """RoPE inverse frequencies after the configured scaling rule, on the CPU in fp32.

    default: theta^(-2i/R); linear: divided by factor; dynamic (NTK): theta grows to
    theta * (factor * L / P - factor + 1)^(R / (R - 2)) with L = max(T, P), P =
    max_position_embeddings; llama3: wavelengths longer than P0 / low_freq_factor are divided by
    factor, shorter than P0 / high_freq_factor kept, and those in between interpolated (P0 =
    original_max_position_embeddings, default P).

    Args:
        cfg: the LM config (rope_theta, rope_scaling, rotary dims).
        seq_len: T (only the dynamic rule uses it).
    Returns:
        (R/2,) float32.
    """
    scaling, kind, rot = cfg.rope_scaling or {}, rope_type(cfg), rotary_dims(cfg)
    exponents = torch.arange(0, rot, 2, dtype=torch.float32) / rot
    theta = torch.tensor(cfg.rope_theta, dtype=torch.float32)
    if kind == "dynamic":
        length = max(seq_len, cfg.max_position_embeddings)
        stretch = torch.tensor(scaling["factor"] * length / cfg.max_position_embeddings
                               - (scaling["factor"] - 1), dtype=torch.float32)
        theta = theta * stretch ** (rot / (rot - 2))
    inv_freq = 1.0 / theta ** exponents
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    if kind == "llama3":
        inv_freq = _llama3_rescale(inv_freq, scaling, cfg.max_position_embeddings)
    return inv_freq


def _llama3_rescale(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    """Llama 3.1's band-wise frequency rescaling (see `rope_inv_freq`)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling.get("original_max_position_embeddings", max_positions)
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > context / low, inv_freq / factor, blended)
    return torch.where(wavelen < context / high, inv_freq, out)


def rope_cos_sin(cfg: LMConfig, seq_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for positions 0..T-1, computed in fp32 and cast to `dtype`.

    Returns:
        (cos, sin), each (T, R); the R/2 frequencies repeat once (rotate-half layout).
    """
    inv_freq = rope_inv_freq(cfg, seq_len).to(device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # (T, R/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, R)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (rotate-half pairing: i with i + R/2).

    Args:
        x: (B, H, T, K).
        cos, sin: (T, R).
    Returns:
        (B, H, T, K); dims R..K pass through unchanged.
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    first, second = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    rotated = x_rot * cos + torch.cat([-second, first], dim=-1) * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat([rotated, x_pass], dim=-1)


@dataclass
class AttentionContext:
    """What every decoder layer needs besides its input; built once per forward.

    All tensors are derived from (attention_mask, T), so a pipeline stage can rebuild it from the
    mask it receives instead of sending it.
    """

    seq_len: int
    """T."""
    cos: torch.Tensor | None
    """(T, R) RoPE cosines, None for ALiBi models."""
    sin: torch.Tensor | None
    """(T, R) RoPE sines, None for ALiBi models."""
    key_padding_mask: torch.Tensor | None
    """(B, T) bool, True = real token; None when nothing is padded."""
    alibi_slopes: torch.Tensor | None
    """(H,) fp32 ALiBi slopes (MPT), else None."""
    sdpa_mask: torch.Tensor | None
    """`build_sdpa_mask` of the above, or None where SDPA needs none or flash-attn runs."""


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 (LLaMA)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., D). Returns: (..., D) in x's dtype."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(cfg: LMConfig) -> nn.Module:
    """The family's norm: RMSNorm (llama), LayerNorm without bias (mpt), with bias (gpt_neox)."""
    if cfg.family == "llama":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.family == "gpt_neox")


class SelfAttention(nn.Module):
    """Causal self-attention with separate q/k/v/o projections (column/row-parallel later).

    MPT's fused Wqkv and GPT-NeoX's head-interleaved query_key_value are split at load time
    (`hf_weights`), so one module serves every family.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
        self.head_dim, self.qkv_clip = head_dim(cfg), cfg.qkv_clip
        bias = cfg.attention_bias and cfg.family != "mpt"
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=bias)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=bias)

    def _heads(self, x_BTD: torch.Tensor, proj: nn.Linear, num_heads: int) -> torch.Tensor:
        out = proj(x_BTD)
        if self.qkv_clip:  # MPT clamps the fused qkv output; clamping is elementwise, so per part
            out = out.clamp(-self.qkv_clip, self.qkv_clip)
        return out.unflatten(-1, (num_heads, self.head_dim)).transpose(1, 2)  # (B, heads, T, K)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Args: x (B, T, D) normed input; ctx from `attention_context`. Returns: (B, T, D)."""
        q_BHTK = self._heads(x, self.q_proj, self.num_heads)
        k_BGTK = self._heads(x, self.k_proj, self.num_kv_heads)
        v_BGTK = self._heads(x, self.v_proj, self.num_kv_heads)
        if ctx.cos is not None:
            q_BHTK = apply_rope(q_BHTK, ctx.cos, ctx.sin)
            k_BGTK = apply_rope(k_BGTK, ctx.cos, ctx.sin)
        out_BHTK = self_attention(q_BHTK, k_BGTK, v_BGTK, causal=True,
                                  key_padding_mask=ctx.key_padding_mask,
                                  alibi_slopes=ctx.alibi_slopes, sdpa_mask=ctx.sdpa_mask)
        return self.o_proj(out_BHTK.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) for LLaMA (SwiGLU); down(act(up(x))) for MPT and GPT-NeoX."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        width, gated = mlp_width(cfg), cfg.family == "llama"
        bias = cfg.family == "gpt_neox" or (gated and cfg.mlp_bias)
        self.act = ACTIVATIONS["gelu" if cfg.family == "mpt" else cfg.hidden_act]
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=bias) if gated else None
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, T, D) normed input. Returns: (B, T, D)."""
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: attention and MLP, each behind its own norm.

    sequential: h = h + attn(n1(h)); h = h + mlp(n2(h)).
    parallel (GPT-NeoX use_parallel_residual): h = mlp(n2(h)) + attn(n1(h)) + h.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.parallel_residual = cfg.family == "gpt_neox" and cfg.use_parallel_residual
        self.attn_norm, self.attn = build_norm(cfg), SelfAttention(cfg)
        self.mlp_norm, self.mlp = build_norm(cfg), MLP(cfg)

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Args: h (B, T, D); ctx from `DecoderLM.attention_context`. Returns: (B, T, D)."""
        attn_BTD = self.attn(self.attn_norm(h), ctx)
        if self.parallel_residual:
            return self.mlp(self.mlp_norm(h)) + attn_BTD + h  # transformers' summation order
        h = h + attn_BTD
        return h + self.mlp(self.mlp_norm(h))


class DecoderLM(nn.Module):
    """A decoder-only causal LM: token embedding, `layers`, final norm, head.

    Args:
        cfg: the LM config (family and sizes).
        vocab_size: V, rows of the embedding and head; None means cfg.vocab_size.
        trainable_ids: token ids whose embedding rows live in TokenEmbedding's trainable table.
    Raises:
        ValueError: `cfg` fails `validate_lm_config`.
    """

    def __init__(self, cfg: LMConfig, vocab_size: int | None = None,
                 trainable_ids: Sequence[int] = ()) -> None:
        super().__init__()
        validate_lm_config(cfg)
        self.cfg = cfg
        self.vocab_size = vocab_size or cfg.vocab_size
        self.embed_tokens = TokenEmbedding(self.vocab_size, cfg.hidden_size, trainable_ids)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = build_norm(cfg)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, self.vocab_size, bias=False))
        self._init_linears()

    @torch.no_grad()
    def _init_linears(self) -> None:
        # Random-init models (tests, inline configs) get the usual std-0.02 start; checkpoints
        # overwrite it. The embedding keeps TokenEmbedding's own init.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    module.bias.zero_()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Args: input_ids (B, T). Returns: (B, T, D) token embeddings."""
        return self.embed_tokens(input_ids)

    def attention_context(self, attention_mask: torch.Tensor | None, seq_len: int,
                          device: torch.device | str, dtype: torch.dtype) -> AttentionContext:
        """Positions and masks for one forward, shared by all layers.

        Args:
            attention_mask: (B, T), 1 = real token, 0 = padding (left or right); None = no padding.
            seq_len: T.
            device: device of the hidden states.
            dtype: dtype of the hidden states (RoPE tables and float masks follow it).
        Returns:
            An `AttentionContext`.
        Raises:
            ValueError: attention_mask is not (B, T).
        """
        key_padding = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[1] != seq_len:
                raise ValueError(f"attention_mask must be (B, {seq_len}), "
                                 f"got {tuple(attention_mask.shape)}")
            key_padding = attention_mask.to(device=device, dtype=torch.bool)
            if bool(key_padding.all()):  # nothing padded: keep the mask-free flash/is_causal paths
                key_padding = None
        cos = sin = slopes = None
        if self.cfg.family == "mpt":
            slopes = alibi_slopes(self.cfg.num_heads, self.cfg.alibi_bias_max).to(device)
        else:
            cos, sin = rope_cos_sin(self.cfg, seq_len, device, dtype)
        sdpa_mask = None
        if not (key_padding is None and flash_attention_usable(device, dtype)):
            sdpa_mask = build_sdpa_mask(key_padding, seq_len, causal=True, alibi_slopes=slopes,
                                        device=device, dtype=dtype)
        return AttentionContext(seq_len, cos, sin, key_padding, slopes, sdpa_mask)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and head. Args: h (B, T, D). Returns: logits (B, T, V)."""
        h = self.norm(h)
        return self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: input_ids (B, T); attention_mask (B, T), 1 = real, 0 = pad. Returns: (B, T, V)."""
        h = self.embed(input_ids)
        ctx = self.attention_context(attention_mask, input_ids.shape[1], h.device, h.dtype)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.logits(h)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with the added embedding rows merged into one (V, D) `embed_tokens.weight`.

        This is the form `hf_weights.ours_to_hf` exports.
        """
        state = {k: v for k, v in self.state_dict().items() if k != "embed_tokens.added"}
        state["embed_tokens.weight"] = self.embed_tokens.merged_weight()
        return state


def build_decoder(cfg: LMConfig, vocab_size: int | None = None,
                  trainable_ids: Sequence[int] = ()) -> DecoderLM:
    """Build a randomly initialised `DecoderLM` (see `hf_weights.load_hf_lm` for checkpoints).

    Args:
        cfg: the LM config.
        vocab_size: embedding/head rows; None means cfg.vocab_size.
        trainable_ids: ids of the added-token rows (TokenEmbedding's trainable table).
    Returns:
        The decoder, fp32, on the CPU.
    Raises:
        ValueError: an invalid or unsupported config.
    """
    return DecoderLM(cfg, vocab_size, trainable_ids)
