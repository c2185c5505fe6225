"""Triton kernels for media-indexed gated cross-attention (forward, backward) and their launchers.

Shapes: B batch, H heads, T text tokens, M media (images) per sample, N latents per image,
K head dim. The specification is `reference.py`; `__init__.py` wraps these launchers in an
autograd Function.

What is computed:
    attn = media_attention(q, k, v, text_time)          # (B, H, T, K), see reference.py
    out  = tanh(gate) * attn [+ residual]               # gate and residual fused in the epilogue

Why the gate is fused here and the out-projection is not: the Flamingo block computes
x + tanh(g) * to_out(attn). By linearity of to_out that equals x + to_out(tanh(g) * attn), so the
scalar gate folds into this kernel's epilogue, and the residual add x + (...) belongs in the
out-projection GEMM of the model (torch.addmm(x, gated_attn, W_out^T) style), where x has the
model's width D rather than (H, K). The optional `residual` here is for callers whose residual has
the attention output's own shape (B, H, T, K).

Kernel layout: q-like tensors are (B, H, T, K) and k/v stay in the model's (B, M, H, N, K) layout,
read through strides (the last dim must be contiguous); no transposed copy is made.

- Forward: one program per (query block, b, h). text_time is a cumsum, so a block of BLOCK_T
  tokens spans media indices [lo, hi]; the program visits only the latent blocks of images
  lo..hi with an online softmax (base-2 exponent). Tokens with text_time > M (more `<image>`
  tokens than images) attend uniformly to every latent of every image: their logits are set to 0
  and, if a block holds one, the program visits all M images. Tokens with text_time == 0 have no
  key: their attention output is exactly 0.
- Backward: a preprocess kernel computes r = rowsum(dout * attn) (so delta = tanh(g) * r and
  dgate = (1 - tanh(g)^2) * sum(r)); a dq kernel walks the same images as the forward; a dk/dv
  kernel owns one latent block of one image and walks only the query tokens that use that image
  (a (B, M + 2) token-range table built with scatter_reduce), plus, for dv only, the tokens with
  text_time > M. Every output element has one owner program: no atomics, deterministic.

Interpreter (TRITON_INTERPRET=1, CPU tensors): bf16 tl.dot is wrong there, so the launchers ask
the kernels to upcast 16-bit operands to fp32 before every dot (UPCAST); libdevice is unavailable,
so tanh is written with exp (plus a short series near 0 where 1 - exp(-2|x|) would cancel).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import layout

LOG2E = 1.4426950408889634
# finite "minus infinity": exp2(_NEG_BIG - _NEG_BIG) is 1, never NaN (masked afterwards); a
# constexpr because jit code may read only constexpr globals (the interpreter does not check this)
_NEG_BIG = tl.constexpr(-1.0e30)


def interpreting() -> bool:
    """True when this module's kernels were built for the Triton interpreter (TRITON_INTERPRET=1)."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def interpreter_ready() -> bool:
    """True when the kernels here *and* triton's own jit library (tl.max, tl.sum, ...) were built
    for the interpreter; triton builds its library when it is first imported, so TRITON_INTERPRET=1
    must be set before `import triton` anywhere in the process (open_clip and torch._dynamo import it).
    """
    return interpreting() and not isinstance(tl.max, triton.runtime.JITFunction)


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET is set in the environment now (it is read when kernels are built)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _tanh(x):
    # (1 - e) / (1 + e) with e = exp(-2|x|); below |x| = 1/16 a degree-7 series instead, because
    # 1 - e loses relative precision for small |x| (truncation error there < 1e-11 relative).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    near = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.0625, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _gate_value(GATE, HAS_GATE: tl.constexpr):
    if HAS_GATE:
        g = _tanh(tl.load(GATE).to(tl.float32))
    else:
        g = 1.0
    return g


@triton.jit
def _fwd_kernel(
    Q, Kp, V, TT, GATE, RES, OUT, O, LSE,
    sqb, sqh, sqt,
    skb, skm, skh, skn,
    svb, svm, svh, svn,
    srb, srh, srt,
    stb,
    H, T, M, N, HEAD_DIM,
    qk_scale_log2,
    HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, STORE_O: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    k_ok = offs_k < HEAD_DIM

    tt = tl.load(TT + b * stb + offs_t, mask=t_ok, other=0)  # (BLOCK_T,)
    over = tt > M  # more <image> tokens than images: uniform over all M * N keys
    lo = tl.min(tl.where(t_ok, tt, M + 1), axis=0)
    hi = tl.max(tt, axis=0)
    m_first = tl.maximum(lo, 1)
    m_last = tl.minimum(hi, M)
    m_first = tl.where(hi > M, 1, m_first)  # a block holding an over token visits every image

    q_ptrs = Q + b * sqb + h * sqh + offs_t[:, None] * sqt + offs_k[None, :]
    q = tl.load(q_ptrs, mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_T], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    for m in range(m_first, m_last + 1):  # 1-based media index
        k_base = Kp + b * skb + (m - 1) * skm + h * skh
        v_base = V + b * svb + (m - 1) * svm + h * svh
        for n0 in range(0, N, BLOCK_N):
            n_ok = (n0 + offs_n) < N
            kv_mask = n_ok[:, None] & k_ok[None, :]
            k_blk = tl.load(k_base + (n0 + offs_n)[:, None] * skn + offs_k[None, :], mask=kv_mask, other=0.0)
            v_blk = tl.load(v_base + (n0 + offs_n)[:, None] * svn + offs_k[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k_blk = k_blk.to(tl.float32)
                v_blk = v_blk.to(tl.float32)
            s = tl.dot(q, tl.trans(k_blk), input_precision=DOT_PRECISION) * qk_scale_log2  # (BLOCK_T, BLOCK_N)
            allowed = ((tt == m)[:, None] | over[:, None]) & n_ok[None, :]
            s = tl.where(allowed, tl.where(over[:, None], 0.0, s), _NEG_BIG)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.where(allowed, tl.exp2(s - m_new[:, None]), 0.0)  # rows without a key: m_new = _NEG_BIG
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v_blk.dtype), v_blk, input_precision=DOT_PRECISION)
            m_i = m_new

    has_key = l_i > 0.0
    attn = acc / tl.where(has_key, l_i, 1.0)[:, None]  # rows with no key (text_time == 0) stay 0
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), 0.0)
    tl.store(LSE + pid_bh * T + offs_t, lse, mask=t_ok)
    row_ptrs = pid_bh * T * HEAD_DIM + offs_t[:, None] * HEAD_DIM + offs_k[None, :]
    io_mask = t_ok[:, None] & k_ok[None, :]
    if STORE_O:
        tl.store(O + row_ptrs, attn.to(O.dtype.element_ty), mask=io_mask)
    out = attn * _gate_value(GATE, HAS_GATE)
    if HAS_RES:
        res_ptrs = RES + b * srb + h * srh + offs_t[:, None] * srt + offs_k[None, :]
        out += tl.load(res_ptrs, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(OUT + row_ptrs, out.to(OUT.dtype.element_ty), mask=io_mask)


@triton.jit
def _bwd_preprocess_kernel(
    DO, O, R,
    sdb, sdh, sdt,
    H, T, HEAD_DIM,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_t < T)[:, None] & (offs_k < HEAD_DIM)[None, :]
    do = tl.load(DO + b * sdb + h * sdh + offs_t[:, None] * sdt + offs_k[None, :], mask=mask, other=0.0)
    o = tl.load(O + pid_bh * T * HEAD_DIM + offs_t[:, None] * HEAD_DIM + offs_k[None, :], mask=mask, other=0.0)
    r = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # (BLOCK_T,)
    tl.store(R + pid_bh * T + offs_t, r, mask=offs_t < T)


@triton.jit
def _bwd_dq_kernel(
    Q, Kp, V, TT, GATE, DO, LSE, R, DQ,
    sqb, sqh, sqt,
    skb, skm, skh, skn,
    svb, svm, svh, svn,
    sdb, sdh, sdt,
    stb,
    H, T, M, N, HEAD_DIM,
    qk_scale_log2, sm_scale,
    HAS_GATE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    k_ok = offs_k < HEAD_DIM
    io_mask = t_ok[:, None] & k_ok[None, :]

    tt = tl.load(TT + b * stb + offs_t, mask=t_ok, other=0)  # (BLOCK_T,)
    own_tt = tl.where(tt <= M, tt, 0)  # over tokens have constant logits: no gradient to q
    m_first = tl.maximum(tl.min(tl.where(t_ok & (own_tt > 0), own_tt, M + 1), axis=0), 1)
    m_last = tl.max(own_tt, axis=0)

    g = _gate_value(GATE, HAS_GATE)
    q = tl.load(Q + b * sqb + h * sqh + offs_t[:, None] * sqt + offs_k[None, :], mask=io_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_t[:, None] * sdt + offs_k[None, :], mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    do = (do.to(tl.float32) * g).to(q.dtype)  # gradient w.r.t. the ungated attention output
    lse = tl.load(LSE + pid_bh * T + offs_t, mask=t_ok, other=0.0)
    delta = tl.load(R + pid_bh * T + offs_t, mask=t_ok, other=0.0) * g

    dq = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    for m in range(m_first, m_last + 1):
        k_base = Kp + b * skb + (m - 1) * skm + h * skh
        v_base = V + b * svb + (m - 1) * svm + h * svh
        for n0 in range(0, N, BLOCK_N):
            n_ok = (n0 + offs_n) < N
            kv_mask = n_ok[:, None] & k_ok[None, :]
            k_blk = tl.load(k_base + (n0 + offs_n)[:, None] * skn + offs_k[None, :], mask=kv_mask, other=0.0)
            v_blk = tl.load(v_base + (n0 + offs_n)[:, None] * svn + offs_k[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k_blk = k_blk.to(tl.float32)
                v_blk = v_blk.to(tl.float32)
            s = tl.dot(q, tl.trans(k_blk), input_precision=DOT_PRECISION) * qk_scale_log2  # (BLOCK_T, BLOCK_N)
            own = (own_tt == m)[:, None] & n_ok[None, :]
            p = tl.exp2(tl.where(own, s - lse[:, None], _NEG_BIG))
            dp = tl.dot(do, tl.trans(v_blk), input_precision=DOT_PRECISION)  # (BLOCK_T, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k_blk.dtype), k_blk, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + pid_bh * T * HEAD_DIM + offs_t[:, None] * HEAD_DIM + offs_k[None, :],
             dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, Kp, V, TT, GATE, DO, LSE, R, TOK_LO, TOK_HI, DK, DV,
    sqb, sqh, sqt,
    skb, skm, skh, skn,
    svb, svm, svh, svn,
    sdb, sdh, sdt,
    stb,
    H, T, M, N, HEAD_DIM,
    qk_scale_log2, sm_scale,
    HAS_GATE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    m0 = pid_mn // num_n_blocks  # 0-based image index
    n0 = (pid_mn % num_n_blocks) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_t0 = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < HEAD_DIM
    kv_mask = n_ok[:, None] & k_ok[None, :]

    k_ptrs = Kp + b * skb + m0 * skm + h * skh + offs_n[:, None] * skn + offs_k[None, :]
    v_ptrs = V + b * svb + m0 * svm + h * svh + offs_n[:, None] * svn + offs_k[None, :]
    k_blk = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_K)
    v_blk = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if UPCAST:
        k_blk = k_blk.to(tl.float32)
        v_blk = v_blk.to(tl.float32)
    g = _gate_value(GATE, HAS_GATE)
    dk = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)

    # tokens whose text_time is this image (one contiguous run when text_time is a cumsum)
    t_lo = tl.load(TOK_LO + b * (M + 2) + m0 + 1)
    t_hi = tl.load(TOK_HI + b * (M + 2) + m0 + 1)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + offs_t0
        t_ok = offs_t < T
        io_mask = t_ok[:, None] & k_ok[None, :]
        tt = tl.load(TT + b * stb + offs_t, mask=t_ok, other=0)
        q = tl.load(Q + b * sqb + h * sqh + offs_t[:, None] * sqt + offs_k[None, :], mask=io_mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_t[:, None] * sdt + offs_k[None, :], mask=io_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        do = (do.to(tl.float32) * g).to(q.dtype)
        lse = tl.load(LSE + pid_bh * T + offs_t, mask=t_ok, other=0.0)
        delta = tl.load(R + pid_bh * T + offs_t, mask=t_ok, other=0.0) * g
        s_t = tl.dot(k_blk, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2  # (BLOCK_N, BLOCK_T)
        own = (tt == m0 + 1)[None, :] & n_ok[:, None]
        p_t = tl.exp2(tl.where(own, s_t - lse[None, :], _NEG_BIG))
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v_blk, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_T)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    # tokens with text_time > M attend uniformly (weight exp2(-lse) = 1 / (M N)) to every latent
    t_lo = tl.load(TOK_LO + b * (M + 2) + M + 1)
    t_hi = tl.load(TOK_HI + b * (M + 2) + M + 1)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + offs_t0
        t_ok = offs_t < T
        tt = tl.load(TT + b * stb + offs_t, mask=t_ok, other=0)
        do = tl.load(DO + b * sdb + h * sdh + offs_t[:, None] * sdt + offs_k[None, :],
                     mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        do = (do.to(tl.float32) * g).to(k_blk.dtype)
        lse = tl.load(LSE + pid_bh * T + offs_t, mask=t_ok, other=0.0)
        over = (tt > M)[None, :] & n_ok[:, None]
        p_t = tl.exp2(tl.where(over, -lse[None, :], _NEG_BIG))  # (BLOCK_N, BLOCK_T)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    # dk, dv are contiguous (B, M, H, N, K)
    kv_out = ((b * M + m0) * H + h) * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_k[None, :]
    tl.store(DK + kv_out, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_out, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block_sizes(num_latents: int, head_dim: int, block_t: int | None, block_n: int | None) -> tuple[int, int, int]:
    """Tile sizes: 16 x 16 under the interpreter (cheap, still the GPU dot minimum), 64 x 64 on GPU."""
    small = interpreting()
    bt = block_t or (16 if small else 64)
    bn = block_n or max(16, min(16 if small else 64, triton.next_power_of_2(num_latents)))
    bk = max(16, triton.next_power_of_2(head_dim))
    return bt, bn, bk


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    """x with a contiguous last dim (the kernels take the other strides as arguments)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _num_stages(dtype: torch.dtype) -> int:
    """Software-pipelining depth: 2 for fp32 tiles (twice the shared memory of 16-bit ones), else 3."""
    return 2 if dtype == torch.float32 else 3


def _launch_options(q: torch.Tensor) -> dict:
    """Dot settings (upcast 16-bit operands under the interpreter; exact fp32 dots, no tf32), warps
    and pipelining depth."""
    return {
        "UPCAST": interpreting(),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 or interpreting() else "tf32",
        "num_warps": 4,
        "num_stages": _num_stages(q.dtype),
    }


def token_ranges(text_time: torch.Tensor, num_media: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`layout.ranges_for`: the per-batch token-range table of the PyTorch path's plan, in int32,
    built once per text_time tensor (every layer's backward reuses it; no host sync).

    Args:
        text_time: (B, T) integer media index per token (the caller's tensor, not a converted copy,
            so the table is found again).
        num_media: M.
    Returns:
        (lo, hi), each (B, M + 2) int32: tokens with text_time == j lie in [lo[b, j], hi[b, j]).
    """
    return layout.ranges_for(text_time, num_media)


def media_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_time: torch.Tensor,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    store_attn: bool = True,
    block_t: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launch: out = tanh(gate) * media_attention(q, k, v, text_time) [+ residual].

    Args:
        q: (B, H, T, K) queries (unscaled; K ** -0.5 is applied inside).
        k: (B, M, H, N, K) keys.
        v: (B, M, H, N, K) values.
        text_time: (B, T) integer media index per token (see reference.py).
        gate: (1,) gate parameter, or None for no gate (scale 1).
        residual: (B, H, T, K) added to the gated output, or None.
        store_attn: also write the ungated attention output (the backward needs it). When False,
            or when there is neither gate nor residual, `attn` is `out` itself.
        block_t, block_n: tile sizes over T and N (defaults from `_block_sizes`).
    Returns:
        (out, attn, lse): out and attn (B, H, T, K) contiguous in q's dtype; lse (B, H, T) fp32, the
        base-2 log-sum-exp of the scaled scores per token (0 for tokens without keys).
    """
    B, H, T, K = q.shape
    M, N = k.shape[1], k.shape[3]
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    tt = text_time.to(torch.int32).contiguous()
    out = torch.empty((B, H, T, K), dtype=q.dtype, device=q.device)
    fused = gate is not None or residual is not None
    attn = torch.empty_like(out) if (store_attn and fused) else out
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    res = _rowmajor(residual) if residual is not None else out  # dummy pointer when absent
    bt, bn, bk = _block_sizes(N, K, block_t, block_n)
    grid = (triton.cdiv(T, bt), B * H)
    _fwd_kernel[grid](
        q, k, v, tt, gate if gate is not None else lse, res, out, attn, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        res.stride(0), res.stride(1), res.stride(2),
        tt.stride(0),
        H, T, M, N, K,
        K**-0.5 * LOG2E,
        HAS_GATE=gate is not None, HAS_RES=residual is not None, STORE_O=attn is not out,
        BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, **_launch_options(q),
    )
    return out, attn, lse


def media_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_time: torch.Tensor,
    gate: torch.Tensor | None,
    attn: torch.Tensor,
    lse: torch.Tensor,
    block_t: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward launch for `media_attention_fwd` (the residual's gradient is dout itself).

    Args:
        dout: (B, H, T, K) gradient of `out`.
        q, k, v, text_time, gate: the forward's inputs.
        attn: (B, H, T, K) the forward's ungated attention output.
        lse: (B, H, T) the forward's log-sum-exp.
        block_t, block_n: tile sizes, as in the forward.
    Returns:
        (dq, dk, dv, dgate): dq (B, H, T, K), dk and dv (B, M, H, N, K), dgate (1,) in gate's dtype
        (None without a gate).
    """
    B, H, T, K = q.shape
    M, N = k.shape[1], k.shape[3]
    q, k, v, dout = _rowmajor(q), _rowmajor(k), _rowmajor(v), _rowmajor(dout)
    tt = text_time.to(torch.int32).contiguous()
    bt, bn, bk = _block_sizes(N, K, block_t, block_n)
    opts = _launch_options(q)
    gate_ptr = gate if gate is not None else lse  # dummy pointer when absent

    r = torch.empty((B, H, T), dtype=torch.float32, device=q.device)  # rowsum(dout * attn)
    _bwd_preprocess_kernel[(triton.cdiv(T, bt), B * H)](
        dout, attn, r, dout.stride(0), dout.stride(1), dout.stride(2), H, T, K, BLOCK_T=bt, BLOCK_K=bk,
    )
    common = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        dout.stride(0), dout.stride(1), dout.stride(2),
        tt.stride(0),
        H, T, M, N, K,
        K**-0.5 * LOG2E, K**-0.5,
    )
    dq = torch.empty((B, H, T, K), dtype=q.dtype, device=q.device)
    _bwd_dq_kernel[(triton.cdiv(T, bt), B * H)](
        q, k, v, tt, gate_ptr, dout, lse, r, dq, *common,
        HAS_GATE=gate is not None, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, **opts,
    )
    tok_lo, tok_hi = token_ranges(text_time, M)
    dk = torch.empty((B, M, H, N, K), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, M, H, N, K), dtype=v.dtype, device=v.device)
    _bwd_dkdv_kernel[(M * triton.cdiv(N, bn), B * H)](
        q, k, v, tt, gate_ptr, dout, lse, r, tok_lo, tok_hi, dk, dv, *common,
        HAS_GATE=gate is not None, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, **opts,
    )
    dgate = None
    if gate is not None:
        dgate = ((1.0 - torch.tanh(gate.float()) ** 2) * r.sum()).to(gate.dtype).reshape(gate.shape)
    return dq, dk, dv, dgate
