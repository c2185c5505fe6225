"""The one self-attention function every decoder layer calls, and the masks it takes.

Shapes: B batch, T text tokens, H query heads, G key/value heads (G divides H; G < H is GQA),
K head dim.

Two backends, picked per call:
- flash-attn's `flash_attn_func`, when the package is installed, the tensors are fp16/bf16 on CUDA,
  and nothing but causality and ALiBi shapes the scores (flash-attn takes ALiBi as slopes);
- `torch.nn.functional.scaled_dot_product_attention` otherwise, with a mask built by
  `build_sdpa_mask`. A decoder builds that mask once per forward (`DecoderLM.attention_context`)
  and passes it to every layer instead of rebuilding it per layer.

Padding: a padded query still attends to itself, so no softmax row is ever empty. Depending on
backend and version an all-masked row can come out NaN, and a NaN at a padded position would
poison real positions in the next layer (masked probability 0 times a NaN value is NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional: only on GPU machines that have it installed
    from flash_attn import flash_attn_func
    import flash_attn as _flash_attn_pkg
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None
    _flash_attn_pkg = None


def flash_attention_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """True when flash-attn can run attention for tensors on `device` with `dtype`."""
    return (
        flash_attn_func is not None
        and torch.device(device).type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
    )


def attention_backend() -> str:
    """Name of the self-attention implementation used for fp16/bf16 CUDA tensors, for the run log.

    Returns:
        "flash-attn <version>" when flash-attn is installed and CUDA is available, else "sdpa"
        (fp32 and CPU tensors always take the SDPA path).
    """
    if flash_attn_func is not None and torch.cuda.is_available():
        return f"flash-attn {getattr(_flash_attn_pkg, '__version__', '?')}"
    return "sdpa"


def alibi_slopes(num_heads: int, alibi_bias_max: float) -> torch.Tensor:
    """MPT's ALiBi slope per head.

    With n the next power of two >= H, slope j (1-based) is 2^(-j * alibi_bias_max / n). When H is
    not a power of two MPT keeps the odd-indexed slopes first, then the even ones, then cuts to H.
    Computed on the CPU in fp32 so every device sees the same values transformers does.

    Args:
        num_heads: H.
        alibi_bias_max: MPT's `alibi_bias_max` (8 in released models).
    Returns:
        (H,) float32 slopes.
    """
    n = 2 ** math.ceil(math.log2(num_heads))
    exponent = torch.arange(1, n + 1, dtype=torch.float32) * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2.0, exponent)
    if n != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[0::2]])[:num_heads]
    return slopes


def build_sdpa_mask(
    key_padding_mask: torch.Tensor | None,
    seq_len: int,
    *,
    causal: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """The `attn_mask` SDPA needs for causality, key padding and ALiBi.

    ALiBi is added as slope_h * (j - (T - 1)) for key j, the form MPT uses; it differs from the
    textbook slope_h * (j - i) by a constant per query row, which softmax ignores.

    Args:
        key_padding_mask: (B, T) bool or 0/1, True/1 = real token; None = no padding.
        seq_len: T.
        causal: mask keys after the query.
        alibi_slopes: (H,) ALiBi slopes, or None.
        device: where the mask lives.
        dtype: dtype of the float mask (only used with ALiBi).
    Returns:
        None when neither padding nor ALiBi is present (SDPA's own `is_causal` does the rest);
        a bool (B or 1, 1, T, T) mask (True = may attend) without ALiBi; an additive float
        (B or 1, H, T, T) mask with ALiBi.
    """
    if key_padding_mask is None and alibi_slopes is None:
        return None
    allowed_TT = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        allowed_TT = allowed_TT.tril()
    allowed = allowed_TT[None, None]  # (1, 1, T, T)
    if key_padding_mask is not None:
        keys_B11T = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        diagonal_TT = torch.eye(seq_len, dtype=torch.bool, device=device)
        allowed = (allowed & keys_B11T) | diagonal_TT  # padded queries see themselves: no empty row
    if alibi_slopes is None:
        return allowed
    key_pos = torch.arange(1 - seq_len, 1, device=device, dtype=torch.float32)  # j - (T - 1)
    slopes_H1 = alibi_slopes.to(device=device, dtype=torch.float32)[:, None]
    bias_1H1T = (slopes_H1 * key_pos)[None, :, None]
    bias = bias_1H1T.masked_fill(~allowed, float("-inf"))  # (B or 1, H, T, T)
    return bias.to(dtype)


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sdpa_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head (or grouped-query) self-attention, through flash-attn or SDPA.

    The arguments `causal`, `key_padding_mask` and `alibi_slopes` say what the attention is;
    `sdpa_mask` is only a cache of `build_sdpa_mask` over exactly those arguments.

    Args:
        q: (B, H, T, K) queries.
        k: (B, G, T, K) keys, G dividing H.
        v: (B, G, T, K) values.
        causal: query i sees keys j <= i only.
        key_padding_mask: (B, T), True/1 = real token; None = no padding.
        alibi_slopes: (H,) ALiBi slopes, or None.
        sdpa_mask: optional prebuilt `build_sdpa_mask(key_padding_mask, T, causal=causal,
            alibi_slopes=alibi_slopes, ...)`, used when the SDPA path runs.
        scale: softmax scale; None means 1 / sqrt(K).
    Returns:
        (B, H, T, K) attention output. Rows of padded queries hold finite values that callers
        should ignore.
    Raises:
        ValueError: G does not divide H.
    """
    num_heads, num_kv_heads, seq_len = q.shape[1], k.shape[1], q.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_kv_heads} key/value heads do not divide {num_heads} query heads")
    if key_padding_mask is None and flash_attention_usable(q.device, q.dtype):
        out_BTHK = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
            causal=causal,
            alibi_slopes=None if alibi_slopes is None else alibi_slopes.to(q.device, torch.float32),
        )
        return out_BTHK.transpose(1, 2)
    if sdpa_mask is None:
        sdpa_mask = build_sdpa_mask(key_padding_mask, seq_len, causal=causal,
                                    alibi_slopes=alibi_slopes, device=q.device, dtype=q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask, is_causal=causal and sdpa_mask is None, scale=scale,
        enable_gqa=num_kv_heads != num_heads,
    )
