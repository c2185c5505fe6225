"""Our decoder LMs, written from their equations; the family table picks the parts.

Shapes: B batch, T text tokens, D width, H query heads, G key/value heads, K head dim,
R rotary dims per head (R <= K), F MLP width, V vocabulary rows; `_local` marks this rank's heads
under tensor parallelism.

One layer class serves every family; the family's entry in `models.families.FAMILIES` picks
norm (RMSNorm / LayerNorm with or without bias), positions (RoPE on the first R dims, with
scaling rules / ALiBi with optional qkv clip), MLP (gated SwiGLU-style / up -> act), biases and
residual (sequential / GPT-NeoX parallel). Adding a family adds no branch here.

The logits equal transformers' own class of every family in the table (tests/models, fp32, real
positions). Matched on purpose:
- positions are 0..T-1 for every row, padded or not, as transformers' forward does;
- MPT's MLP width comes from the checkpoint (transformers builds 4 * D whatever expansion_ratio);
- RMSNorm normalises in fp32 and multiplies by the weight after casting back.
Not matched on purpose: ALiBi uses the config's alibi_bias_max, as MPT's own code does, while
transformers' MptModel always uses 8 (the value every released MPT has).

Every layer is a pure function of (h, ctx); `attention_context` builds ctx from the mask alone, so
the Flamingo wrapper (`models.fusion`) and pipeline stages drive the same layers. Attention reads
its head count from its projections' output width, so the same class runs on a tensor-parallel
shard (where q/k/v/o are column/row-parallel layers holding H / tp heads).
"""

from __future__ import annotations

import dataclasses
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
from megaflamingo.models.families import family_of
from megaflamingo.models.recompute import frozen_swiglu, recompute_usable
from megaflamingo.models.rope import apply_rope, head_dim, rope_cos_sin, rotary_dims, validate_rope


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


def mlp_width(cfg: LMConfig) -> int:
    """F: cfg.intermediate_size, else 4 * hidden_size."""
    return cfg.intermediate_size or 4 * cfg.hidden_size


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_lm_config(cfg: LMConfig) -> None:
    """Check that `cfg` describes a decoder this module can build.

    Raises:
        ValueError: unknown family, inconsistent head sizes, unsupported RoPE scaling or activation.
    """
    family = family_of(cfg)
    k, kv = head_dim(cfg), cfg.num_kv_heads or cfg.num_heads
    _check(cfg.head_dim is not None or cfg.hidden_size % cfg.num_heads == 0,
           f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    _check(cfg.num_heads % kv == 0, f"num_kv_heads {kv} does not divide num_heads {cfg.num_heads}")
    if not family.grouped_query:
        _check(kv == cfg.num_heads,
               f"{cfg.family} has no grouped-query attention (num_kv_heads {kv})")
        _check(k * cfg.num_heads == cfg.hidden_size,
               f"{cfg.family} needs num_heads * head_dim == hidden_size")
    _check(mlp_activation(cfg) in ACTIVATIONS, f"hidden_act '{cfg.hidden_act}' is not supported "
           f"(supported: {', '.join(ACTIVATIONS)})")
    if family.positions == "rope":
        validate_rope(cfg)


def mlp_activation(cfg: LMConfig) -> str:
    """The MLP activation's transformers name: the family's fixed one, else cfg.hidden_act."""
    return family_of(cfg).activation or cfg.hidden_act


def _bias(fixed: bool | None, configured: bool) -> bool:
    return configured if fixed is None else fixed


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


@dataclass
class KVSlot:
    """One layer's keys and values of the tokens already run (and of the media), for decoding with a cache.

    `SelfAttention` prepends them to the new tokens' keys/values (post-RoPE) and stores the
    result back here, so a caller that passes fresh slots keeps the previous ones unchanged.
    """

    k: torch.Tensor | None = None
    """(B, G, P, K) keys, or None before the first call."""
    v: torch.Tensor | None = None
    """(B, G, P, K) values."""
    media_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    """The cross-attention block's keys/values of the media in front of this layer, if it has
    one: 2 x (B, M, H, N, K), computed on the first call (`FusionLayer`)."""


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
    """The family's norm: RMSNorm ("rms"), LayerNorm without ("layer") or with bias ("layer_bias")."""
    kind = family_of(cfg).norm
    if kind == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=kind == "layer_bias")


class SelfAttention(nn.Module):
    """Causal self-attention with separate q/k/v/o projections.

    MPT's fused Wqkv and GPT-NeoX's head-interleaved query_key_value are split at load time
    (`hf_weights`), so one module serves every family. The head counts are read off the
    projections' output widths (H_local = width / K), so the module runs unchanged when tensor
    parallelism has made q/k/v column-parallel and o row-parallel; per-head tensors of the
    context (ALiBi slopes and mask, built for all H heads) are then cut to the shard's heads, which
    start at head `q_proj.shard_start / K` (0 for a plain nn.Linear).
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        family = family_of(cfg)
        self.head_dim, self.qkv_clip = head_dim(cfg), cfg.qkv_clip
        q_width = cfg.num_heads * self.head_dim
        kv_width = (cfg.num_kv_heads or cfg.num_heads) * self.head_dim
        qkv_bias = _bias(family.qkv_bias, cfg.attention_bias)
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=qkv_bias)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=_bias(family.o_bias, cfg.attention_bias))

    def _heads(self, x_BTD: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        out = proj(x_BTD)
        if self.qkv_clip:  # MPT clamps the fused qkv output; clamping is elementwise, so per part
            out = out.clamp(-self.qkv_clip, self.qkv_clip)
        return out.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # (B, heads, T, K)

    def _local_context(self, ctx: AttentionContext, num_heads: int) -> AttentionContext:
        """ctx with its per-head tensors (ALiBi slopes, ALiBi mask) cut to this module's heads."""
        if ctx.alibi_slopes is None or ctx.alibi_slopes.shape[0] == num_heads:
            return ctx
        start = getattr(self.q_proj, "shard_start", 0) // self.head_dim
        heads = slice(start, start + num_heads)
        mask = ctx.sdpa_mask
        if mask is not None and mask.shape[1] > 1:  # (B or 1, H, T, T) additive ALiBi mask
            mask = mask[:, heads]
        return dataclasses.replace(ctx, alibi_slopes=ctx.alibi_slopes[heads], sdpa_mask=mask)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, kv: KVSlot | None = None) -> torch.Tensor:
        """Args: x (B, T, D) normed input; ctx from `attention_context` (all H heads; with
        `past_len` = P when kv holds P tokens); kv: the cache slot of this layer, or None.
        Returns: (B, T, D)."""
        q_BHTK = self._heads(x, self.q_proj)  # H_local query heads
        k_BGTK = self._heads(x, self.k_proj)  # G_local key/value heads
        v_BGTK = self._heads(x, self.v_proj)
        if ctx.cos is not None:
            q_BHTK = apply_rope(q_BHTK, ctx.cos, ctx.sin)
            k_BGTK = apply_rope(k_BGTK, ctx.cos, ctx.sin)
        if kv is not None:  # keys/values become (B, G, P + T, K)
            if kv.k is not None:
                k_BGTK, v_BGTK = torch.cat([kv.k, k_BGTK], dim=2), torch.cat([kv.v, v_BGTK], dim=2)
            kv.k, kv.v = k_BGTK, v_BGTK
        local = self._local_context(ctx, q_BHTK.shape[1])
        out_BHTK = self_attention(q_BHTK, k_BGTK, v_BGTK, causal=True,
                                  key_padding_mask=local.key_padding_mask,
                                  alibi_slopes=local.alibi_slopes, sdpa_mask=local.sdpa_mask)
        return self.o_proj(out_BHTK.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) for gated families (SwiGLU); down(act(up(x))) otherwise."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        family = family_of(cfg)
        width, bias = mlp_width(cfg), _bias(family.mlp_bias, cfg.mlp_bias)
        self.act = ACTIVATIONS[mlp_activation(cfg)]
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=bias) if family.gated_mlp else None
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, T, D) normed input. Returns: (B, T, D)."""
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        if self._recompute_silu(x):  # saves gate(x) and up(x) only; same values and gradients
            return frozen_swiglu(x, self.gate_proj, self.up_proj, self.down_proj)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def _recompute_silu(self, x: torch.Tensor) -> bool:
        """Whether `frozen_swiglu` applies: SiLU gate, frozen plain projections, x needing a gradient."""
        return (self.act is F.silu and x.requires_grad
                and not any(p.requires_grad for p in self.parameters())
                and recompute_usable(x, self.gate_proj, self.up_proj, self.down_proj))


class DecoderLayer(nn.Module):
    """Pre-norm block: attention and MLP, each behind its own norm.

    sequential: h = h + attn(n1(h)); h = h + mlp(n2(h)).
    parallel (GPT-NeoX use_parallel_residual): h = mlp(n2(h)) + attn(n1(h)) + h.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.parallel_residual = family_of(cfg).parallel_residual and cfg.use_parallel_residual
        self.attn_norm, self.attn = build_norm(cfg), SelfAttention(cfg)
        self.mlp_norm, self.mlp = build_norm(cfg), MLP(cfg)

    def forward(self, h: torch.Tensor, ctx: AttentionContext, kv: KVSlot | None = None) -> torch.Tensor:
        """Args: h (B, T, D); ctx from `attention_context`; kv: cache slot (decoding) or None.
        Returns: (B, T, D)."""
        attn_BTD = self.attn(self.attn_norm(h), ctx, kv)
        if self.parallel_residual:
            return self.mlp(self.mlp_norm(h)) + attn_BTD + h  # transformers' summation order
        h = h + attn_BTD
        return h + self.mlp(self.mlp_norm(h))


def attention_context(cfg: LMConfig, attention_mask: torch.Tensor | None, seq_len: int,
                      device: torch.device | str, dtype: torch.dtype, past_len: int = 0) -> AttentionContext:
    """Positions and masks for one forward, shared by all layers (and rebuilt by pipeline stages).

    Args:
        cfg: the LM config (family positions, heads, RoPE settings).
        attention_mask: (B, P + T), 1 = real token, 0 = padding (left or right); None = no padding.
        seq_len: T, the tokens this forward runs.
        device: device of the hidden states.
        dtype: dtype of the hidden states (RoPE tables and float masks follow it).
        past_len: P, tokens already in the layers' KV cache (decoding); their positions come first.
    Returns:
        An `AttentionContext` covering all H heads (RoPE tables and mask rows of the T new tokens).
    Raises:
        ValueError: attention_mask is not (B, P + T).
    """
    if past_len:
        return _cached_context(cfg, attention_mask, seq_len, past_len, device, dtype)
    key_padding = None
    if attention_mask is not None:
        if attention_mask.ndim != 2 or attention_mask.shape[1] != seq_len:
            raise ValueError(f"attention_mask must be (B, {seq_len}), got {tuple(attention_mask.shape)}")
        key_padding = attention_mask.to(device=device, dtype=torch.bool)
        if bool(key_padding.all()):  # nothing padded: keep the mask-free flash/is_causal paths
            key_padding = None
    cos = sin = slopes = None
    if family_of(cfg).positions == "alibi":
        slopes = alibi_slopes(cfg.num_heads, cfg.alibi_bias_max).to(device)
    else:
        cos, sin = rope_cos_sin(cfg, seq_len, device, dtype)
    sdpa_mask = None
    if not (key_padding is None and flash_attention_usable(device, dtype)):
        sdpa_mask = build_sdpa_mask(key_padding, seq_len, causal=True, alibi_slopes=slopes,
                                    device=device, dtype=dtype)
    return AttentionContext(seq_len, cos, sin, key_padding, slopes, sdpa_mask)


def _cached_context(cfg: LMConfig, attention_mask: torch.Tensor | None, seq_len: int, past_len: int,
                    device: torch.device | str, dtype: torch.dtype) -> AttentionContext:
    """`attention_context` for T new tokens after P cached ones: the last T rows of the full
    (P + T) context. The mask is always explicit (SDPA's `is_causal` aligns a T x (P + T) mask
    top-left), except where flash-attn runs mask-free (its causal mask aligns bottom-right, >= 2.1)."""
    full = attention_context(cfg, attention_mask, past_len + seq_len, device, dtype)
    cos, sin = (None, None) if full.cos is None else (full.cos[past_len:], full.sin[past_len:])
    mask = full.sdpa_mask
    if mask is None and not (full.key_padding_mask is None and flash_attention_usable(device, dtype)):
        mask = build_sdpa_mask(torch.ones(1, past_len + seq_len, dtype=torch.bool, device=device),
                               past_len + seq_len, causal=True, device=device, dtype=dtype)
    mask = None if mask is None else mask[:, :, past_len:]  # (B or 1, 1 or H, T, P + T)
    return AttentionContext(seq_len, cos, sin, full.key_padding_mask, full.alibi_slopes, mask)


class LMHead(nn.Module):
    """Final norm, then the output projection: an untied head Linear, or the embedding's `attend`.

    A view over the LM's own modules (`DecoderLM.head()` builds one on demand; pipeline stages
    hold one): it owns no parameter of its own, so the LM's state-dict names stay as they are.

    Args:
        norm: the final norm.
        projection: the untied head (`lm_head`, maybe column-parallel), or the token embedding
            when the head is tied (its `attend` gives the logits, maybe vocab-sharded).
        tied: whether `projection` is the embedding.
    """

    def __init__(self, norm: nn.Module, projection: nn.Module, tied: bool) -> None:
        super().__init__()
        self.norm, self.projection, self.tied = norm, projection, tied

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Args: h (B, T, D). Returns: logits (B, T, V) (V_local rows under tensor parallelism)."""
        h = self.norm(h)
        return self.projection.attend(h) if self.tied else self.projection(h)


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
                          device: torch.device | str, dtype: torch.dtype, past_len: int = 0) -> AttentionContext:
        """`attention_context(self.cfg, ...)`: positions and masks for one forward."""
        return attention_context(self.cfg, attention_mask, seq_len, device, dtype, past_len)

    def head(self) -> LMHead:
        """A view of the final norm and output projection as one module (see `LMHead`)."""
        tied = self.lm_head is None
        return LMHead(self.norm, self.embed_tokens if tied else self.lm_head, tied)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and head. Args: h (B, T, D). Returns: logits (B, T, V)."""
        return self.head()(h)

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
