"""Media-indexed gated cross-attention: the dispatch the model calls, and its autograd Function.

Shapes: B batch, H heads, T text tokens, M media (images) per sample, N latents per image,
K head dim.

    out = media_attention(q, k, v, text_time, gate, residual)    # (B, H, T, K)
        = residual + tanh(gate) * attention of each token over the latents of its own image

`impl="auto"` runs the Triton kernels (`triton.py`) for CUDA tensors when triton imports, and the
PyTorch reference (`reference.media_attention_gather`, then the gate and residual in torch)
everywhere else. `impl="triton"` on CPU tensors runs the Triton interpreter, which must have been
requested with TRITON_INTERPRET=1 before `triton` (which builds its own jit library at import) and
`megaflamingo.kernels.xattn.triton` were first imported.
The Triton module is imported lazily, on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from .reference import gated_media_attention_reference, media_attention_dense, media_attention_gather

__all__ = [
    "IMPLS",
    "MediaAttentionFunction",
    "gated_media_attention_reference",
    "media_attention",
    "media_attention_dense",
    "media_attention_gather",
    "triton_available",
]

IMPLS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    """True when the `triton` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _kernels() -> ModuleType:
    """The Triton kernel module (imported on first use)."""
    return importlib.import_module(f"{__name__}.triton")


class MediaAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels.

    forward: out = tanh(gate) * media_attention(q, k, v, text_time) [+ residual];
    backward: dq, dk, dv, dgate from the Triton backward kernels; dresidual = dout.
    `gate` and `residual` may be None (no gate, no residual).
    """

    @staticmethod
    def forward(ctx, q, k, v, text_time, gate, residual):  # noqa: D102 (see the class docstring)
        needs_attn = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
        out, attn, lse = _kernels().media_attention_fwd(q, k, v, text_time, gate, residual, store_attn=needs_attn)
        ctx.save_for_backward(q, k, v, text_time, gate, attn, lse)
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        q, k, v, text_time, gate, attn, lse = ctx.saved_tensors
        dq = dk = dv = dgate = None
        if any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4)):
            dq, dk, dv, dgate = _kernels().media_attention_bwd(dout, q, k, v, text_time, gate, attn, lse)
        dresidual = dout if ctx.needs_input_grad[5] else None
        return dq, dk, dv, None, dgate, dresidual


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
                  gate: torch.Tensor | None, residual: torch.Tensor | None) -> None:
    """Raise ValueError unless the arguments have the documented shapes."""
    if q.dim() != 4 or k.dim() != 5 or k.shape != v.shape:
        raise ValueError(f"expected q (B, H, T, K) and k, v (B, M, H, N, K); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, K = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[4] != K:
        raise ValueError(f"k, v {tuple(k.shape)} do not match q {tuple(q.shape)} in B, H or K")
    if tuple(text_time.shape) != (B, T):
        raise ValueError(f"text_time must be (B, T) = {(B, T)}, got {tuple(text_time.shape)}")
    if gate is not None and gate.numel() != 1:
        raise ValueError(f"gate must hold one element, got shape {tuple(gate.shape)}")
    if residual is not None and residual.shape != q.shape:
        raise ValueError(f"residual must have q's shape {tuple(q.shape)}, got {tuple(residual.shape)}")


def _triton_fits(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these tensors, or None when they can."""
    if q.dtype not in _TRITON_DTYPES or k.dtype != q.dtype:
        return f"dtype {q.dtype} / {k.dtype} (supported: fp32, fp16, bf16, all the same)"
    if not 16 <= q.shape[-1] <= 256:
        return f"head dim K = {q.shape[-1]} (supported: 16 <= K <= 256)"
    if k.shape[1] == 0 or k.shape[3] == 0 or q.shape[2] == 0:
        return "an empty dimension (M, N or T is 0)"
    return None


def media_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_time: torch.Tensor,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """residual + tanh(gate) * media-indexed attention (differentiable in q, k, v, gate, residual).

    Args:
        q: (B, H, T, K) queries (unscaled; scaled by K ** -0.5 inside).
        k: (B, M, H, N, K) keys of every image.
        v: (B, M, H, N, K) values of every image.
        text_time: (B, T) integer media index per token: 0 = before the first image (output 0),
            m in 1..M = attend to image m's N latents, > M = mean of all values (reference.py).
        gate: (1,) gate parameter (tanh applied here), or None for no gate.
        residual: (B, H, T, K) added to the gated output, or None.
        impl: "auto" (Triton for CUDA tensors when triton is installed, else the reference),
            "triton" or "reference".
    Returns:
        (B, H, T, K) in q's dtype.
    Raises:
        ValueError: an unknown `impl`, mismatched shapes, or impl="triton" on inputs the kernels
            do not support.
        RuntimeError: impl="triton" without triton, or on CPU tensors without the interpreter
            (TRITON_INTERPRET=1 set before triton and the kernel module were imported).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check_shapes(q, k, v, text_time, gate, residual)
    if impl == "auto":
        impl = "triton" if q.is_cuda and triton_available() and _triton_fits(q, k) is None else "reference"
    if impl == "reference":
        out = media_attention_gather(q, k, v, text_time)
        if gate is not None:
            out = torch.tanh(gate) * out
        if residual is not None:
            out = residual + out
        return out.to(q.dtype)  # an fp32 gate or residual must not promote a bf16 output

    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    reason = _triton_fits(q, k)
    if reason is not None:
        raise ValueError(f"impl='triton' does not support {reason}")
    if not q.is_cuda and not _kernels().interpreter_ready():
        raise RuntimeError(
            "impl='triton' on CPU tensors runs only in the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton and megaflamingo.kernels.xattn.triton are first imported, e.g. in the "
            "environment (or use impl='reference')"
        )
    return MediaAttentionFunction.apply(q, k, v, text_time, gate, residual)
