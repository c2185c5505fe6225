"""Rotary position embeddings (RoPE): frequencies, scaling rules, cos/sin tables, the rotation.

Shapes: T text tokens, H heads, K head dim, R rotary dims per head (R <= K; rotate-half layout).
"""

from __future__ import annotations

import math

import torch

from megaflamingo.config import LMConfig
from megaflamingo.models.families import family_of

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def head_dim(cfg: LMConfig) -> int:
    """K: cfg.head_dim, else hidden_size // num_heads."""
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def rotary_dims(cfg: LMConfig) -> int:
    """R: rotary dims per head (0 for ALiBi families)."""
    return 0 if family_of(cfg).positions == "alibi" else int(head_dim(cfg) * cfg.rotary_pct)


def rope_type(cfg: LMConfig) -> str:
    """The RoPE scaling rule named by cfg.rope_scaling ("default" when None)."""
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_rope(cfg: LMConfig) -> None:
    """Check the RoPE settings of `cfg`.

    Raises:
        ValueError: an unsupported scaling rule, a missing scaling key, or odd/zero rotary dims.
    """
    kind = rope_type(cfg)
    _require(kind in ROPE_TYPES, f"rope_scaling type '{kind}' is not supported "
           f"(supported: {', '.join(ROPE_TYPES)})")
    needed = {"linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(kind, ())
    for key in needed:
        _require(key in cfg.rope_scaling, f"rope_scaling type '{kind}' needs '{key}'")
    rot = rotary_dims(cfg)
    _require(0 < rot and rot % 2 == 0,
           f"rotary dims int(head_dim * rotary_pct) = {rot} must be positive and even")


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


class _RotateHalf(torch.autograd.Function):
    """`apply_rope` with a hand-written backward: the same floating-point operations as autograd
    would run on the plain formula (x * cos + rotate_half(x) * sin), bit for bit, without its
    negated copy, concatenation and zero-filled slice gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # noqa: D102
        rot, half = cos.shape[-1], cos.shape[-1] // 2
        x_rot = x[..., :rot]
        rotated = x_rot * cos
        # (-second) * sin == -(second * sin) and a + (-b) == a - b exactly in IEEE arithmetic
        rotated[..., :half] -= x_rot[..., half:] * sin[..., :half]
        rotated[..., half:] += x_rot[..., :half] * sin[..., half:]
        ctx.save_for_backward(cos, sin)
        return rotated if rot == x.shape[-1] else torch.cat([rotated, x[..., rot:]], dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        cos, sin = ctx.saved_tensors
        rot, half = cos.shape[-1], cos.shape[-1] // 2
        g_rot = grad[..., :rot]
        dx_rot = g_rot * cos
        g_sin = g_rot * sin
        dx_rot[..., :half] += g_sin[..., half:]  # first half of x feeds the second half via +sin
        dx_rot[..., half:] -= g_sin[..., :half]  # second half feeds the first half via -sin
        dx = dx_rot if rot == grad.shape[-1] else torch.cat([dx_rot, grad[..., rot:]], dim=-1)
        return dx, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (rotate-half pairing: i with i + R/2).

    out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[R/2:R], x[:R/2]], with the same
    rounding as that formula (and its autograd gradient) but fewer temporaries (`_RotateHalf`).

    Args:
        x: (B, H, T, K).
        cos, sin: (T, R).
    Returns:
        (B, H, T, K); dims R..K pass through unchanged.
    """
    return _RotateHalf.apply(x, cos, sin)
