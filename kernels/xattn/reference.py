"""Media-indexed cross-attention in plain PyTorch: the specification the Triton kernel must meet.

Shapes: B batch, H heads, T text tokens, M media (images) per sample, N latents per image,
K head dim; I = B * M images, S slots (one chunk of slots per image).

Semantics (OpenFlamingo's `MaskedCrossAttention` with only_attend_immediate_media=True):
- text_time[b, t] = number of `<image>` tokens at or before t (a cumsum, so non-decreasing in t);
- 1 <= text_time <= M: the token attends to the N latents of image text_time - 1 only;
- text_time == 0 (text before the first image): the attention output is exactly 0;
- text_time > M (more `<image>` tokens than images): every key is masked, and the reference's
  softmax over all-equal logits is uniform over all M * N keys, i.e. the mean of all values.

`media_attention_gather` costs O(T * N) per sample whatever M is, and about the same whatever the
image positions: `layout.plan_for` gives each image's run of tokens (contiguous, because text_time
is a cumsum) one chunk of slots, with index tables built once per batch, and cuts the images into
a few segments of equal chunk length; `_ChunkAttention` (an autograd Function with a hand-written
backward) runs each segment against its images' N latents with six batched matmuls that read the
keys and values in place: no Python loop over runs, no per-run stacking, no key copies, no
zero-filled scatter in backward (on CPU the per-call and copy overheads, not the arithmetic,
dominate when images are many and runs short).
`media_attention_dense` builds the full T x (M * N) masked score matrix, as OpenFlamingo does;
it is kept as a second reference for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .layout import ChunkPlan, plan_for


def _segments(rows: torch.Tensor, plan: ChunkPlan, heads: int, transpose: bool = False) -> list[torch.Tensor]:
    """Slot-major rows (S * H [+ extra], D) as one (n_s * H, C_s, D) batch per segment, or its
    (n_s * H, D, C_s) transpose (views: one as_strided each, the cheapest view op)."""
    D, at = rows.shape[-1], rows.storage_offset()
    return [rows.as_strided(((i1 - i0) * heads, D, C) if transpose else ((i1 - i0) * heads, C, D),
                            (C * D, 1, D) if transpose else (C * D, D, 1), at + base * heads * D)
            for i0, i1, C, base in plan.segments]


def _images(x: torch.Tensor, plan: ChunkPlan, heads: int, transpose: bool = False) -> list[torch.Tensor]:
    """Contiguous (I * H, N, K) keys, values or their gradients as one (n_s * H, N, K) slice per
    segment, or its (n_s * H, K, N) transpose (views)."""
    _, N, K = x.shape
    at = x.storage_offset()
    return [x.as_strided(((i1 - i0) * heads, K, N) if transpose else ((i1 - i0) * heads, N, K),
                         (N * K, 1, K) if transpose else (N * K, K, 1), at + i0 * heads * N * K)
            for i0, i1, _, _ in plan.segments]


def _gather_slots(x: torch.Tensor, plan: ChunkPlan, dtype: torch.dtype, extra: int = 0) -> torch.Tensor:
    """(B, H, T, K) -> slot-major rows (S * H + extra, K) in `dtype`, padding rows zero (the extra
    rows are left uninitialised): one gather that reads x's rows in place through its strides (no
    token-major copy first) when its last dim is contiguous and its other strides are multiples of
    K, else through a contiguous copy."""
    B, H, T, K = x.shape
    SH = plan.slot_token.numel() * H
    if not x.numel():
        return x.new_zeros(SH + extra, K, dtype=dtype)
    strides = [0 if n == 1 else s for n, s in zip(x.shape[:3], x.stride()[:3])]
    if x.stride(3) != 1 and K > 1 or any(s % K for s in strides):
        x = x.contiguous()
        strides = list(x.stride()[:3])
    rows = [s // K for s in strides]
    src = x.as_strided((sum((n - 1) * s for n, s in zip(x.shape[:3], rows)) + 1, K), (K, 1))
    index, pad = plan.source_rows(H, tuple(rows))
    out = x.new_empty(SH + extra, K, dtype=dtype)
    if x.dtype == dtype:
        torch.index_select(src, 0, index, out=out[:SH])
    else:
        out[:SH] = src.index_select(0, index)
    return out.index_fill_(0, pad, 0) if pad.numel() else out


def _bmm_segments(a: list[torch.Tensor], b: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """out[s] = a[s] @ b[s] per segment (plain bmm: baddbmm with alpha, beta = 0 runs slower)."""
    for x, y, o in zip(a, b, out):
        torch.bmm(x, y, out=o)


class _ChunkAttention(torch.autograd.Function):
    """Attention of every image's chunk of tokens over its own latents, forward and backward by hand.

    forward: scores = q_c k^T with q_c = q / sqrt(K) (scaled once, saved scaled), p = softmax(scores),
    o_c = p v per image chunk, read back per token (zero / mean-of-values rows for tokens without an
    image);
    backward: dv = p^T do_c, ds = p * (do_c v^T - rowsum(p * do_c v^T)), dk = ds^T q_c,
    dq_c = ds k / sqrt(K). Six batched matmuls per segment of the plan, all reading the keys and
    values in place and writing dk, dv in place (one chunk per image: no copies, no index_add).
    Computes in fp32 (fp64 for fp64 inputs); outputs and gradients in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: ChunkPlan):  # noqa: D102 (see the class docstring)
        B, H, T, K = q.shape
        M, N = k.shape[1], k.shape[3]
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        I, SH = plan.num_images, plan.slot_token.numel() * H
        _, out_rows, _ = plan.head_rows(H)
        q_c = _gather_slots(q, plan, cd).mul_(K ** -0.5)  # (S * H, K), scaled once for scores and dk
        k_i = k.reshape(I * H, N, K).to(cd).contiguous()  # no copy for contiguous fp32 / fp64 keys
        v_i = v.reshape(I * H, N, K).to(cd).contiguous()
        scores = q_c.new_empty(SH, N)
        _bmm_segments(_segments(q_c, plan, H), _images(k_i, plan, H, True), _segments(scores, plan, H))
        p = torch.softmax(scores, dim=-1, out=scores)  # (S * H, N), in place
        o_rows = q_c.new_empty(SH + 1 + (B * H if plan.any_over else 0), K)  # a zero row, then means
        _bmm_segments(_segments(p, plan, H), _images(v_i, plan, H), _segments(o_rows, plan, H))
        o_rows[SH].zero_()
        if plan.any_over:  # M = 0: every key is masked and there is none, so 0 (as the dense reference)
            o_rows[SH + 1:] = v_i.view(B, M, H, N, K).sum(dim=(1, 3)).reshape(B * H, K) / max(M * N, 1)
        out = o_rows.index_select(0, out_rows).to(q.dtype).view(B, T, H, K).transpose(1, 2)
        ctx.save_for_backward(q_c, p, k_i, v_i)
        ctx.plan, ctx.shapes, ctx.dtypes = plan, (B, H, T, K, M, N), (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):  # noqa: D102
        q_c, p, k_i, v_i = ctx.saved_tensors
        plan, (B, H, T, K, M, N) = ctx.plan, ctx.shapes
        SH, cd = q_c.shape[0], q_c.dtype
        grad_rows = plan.head_rows(H)[2]
        do_c = _gather_slots(dout, plan, cd, extra=1)  # (S * H + 1, K), padding rows zero
        do_s = _segments(do_c, plan, H)
        dp = p.new_empty(SH, N)
        _bmm_segments(do_s, _images(v_i, plan, H, True), _segments(dp, plan, H))
        dv = torch.empty_like(v_i)  # (I * H, N, K)
        _bmm_segments(_segments(p, plan, H, True), do_s, _images(dv, plan, H))
        ds = dp.sub_((p * dp).sum(dim=-1, keepdim=True)).mul_(p)  # (S * H, N), without the 1 / sqrt(K)
        dk = torch.empty_like(k_i)
        _bmm_segments(_segments(ds, plan, H, True), _segments(q_c, plan, H), _images(dk, plan, H))  # q_c scaled
        ds.mul_(K ** -0.5)
        dq_rows = do_c  # do_c is read for the last time above: dq overwrites it
        _bmm_segments(_segments(ds, plan, H), _images(k_i, plan, H), _segments(dq_rows, plan, H))
        dq_rows[SH].zero_()
        dq = dq_rows.index_select(0, grad_rows).to(ctx.dtypes[0]).view(B, T, H, K).transpose(1, 2)
        if plan.any_over:  # tokens with text_time > M: d mean(v) / dv = 1 / (M * N) for every key
            d_mean = (plan.over.to(cd)[:, :, None, None] * dout.transpose(1, 2)).sum(1) / max(M * N, 1)  # (B, H, K)
            dv.view(B, M, H, N, K).add_(d_mean.view(B, 1, H, 1, K))
        return dq, dk.view(B, M, H, N, K).to(ctx.dtypes[1]), dv.view(B, M, H, N, K).to(ctx.dtypes[2]), None


def _one_image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
    """M = 1: every token with an image attends to the same N latents, so one fused SDPA call over
    the whole sequence (q and the output in their own layout: no plan, no gathers), then zeros for
    text before the image and the mean of the values for text_time > 1. Computes in fp32 (fp64 for
    fp64 inputs); returns q's dtype. One host sync (whether every token has the image)."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = F.scaled_dot_product_attention(q.to(cd), k[:, 0].to(cd), v[:, 0].to(cd))  # (B, H, T, K)
    has_image = text_time == 1  # (B, T)
    if not bool(has_image.all()):
        out = out.masked_fill(~has_image[:, None, :, None], 0.0)
        over = text_time > 1
        if bool(over.any()):
            out = out + v[:, 0].to(cd).mean(dim=2, keepdim=True) * over[:, None, :, None].to(cd)
    return out.to(q.dtype)


def media_attention_gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor, plan: ChunkPlan | None = None
) -> torch.Tensor:
    """Attention of each text token over the latents of its own image only.

    Batched matmuls over the segments of `layout.plan_for` (one chunk of queries per image, against
    its image's N latents read in place): the queries are gathered with index tables and the
    outputs read back per token, so the cost depends on T and M, not on where the images sit.
    One image per sample (M = 1) is one fused SDPA call over the whole sequence instead.
    q, k and v are always inputs of one autograd node, so their gradients exist (zeros) even when
    no token attends to an image.

    Args:
        q: (B, H, T, K) queries (unscaled; scaled here by K ** -0.5).
        k: (B, M, H, N, K) keys of every image.
        v: (B, M, H, N, K) values of every image.
        text_time: (B, T) integer media index per token (0 = before the first image).
        plan: a `layout.chunk_plan(text_time, M)` to use (M = 1 needs none: one SDPA call over
            the sequence); None for the one `plan_for` keeps per
            text_time tensor (built on first use, shared by every layer of the batch).
    Returns:
        (B, H, T, K) attention output in q's dtype (for M > 1 a transposed view of a (B, T, H, K)
        tensor); rows with text_time == 0 are exactly zero.
    """
    if k.shape[1] == 1:
        return _one_image_attention(q, k, v, text_time)
    plan = plan if plan is not None else plan_for(text_time, k.shape[1])
    return _ChunkAttention.apply(q, k, v, plan)


def media_attention_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor
) -> torch.Tensor:
    """The same result through a dense (T, M * N) masked score matrix, as OpenFlamingo computes it.

    Args and Returns: as `media_attention_gather`.
    """
    B, H, T, K = q.shape
    M, N = k.shape[1], k.shape[3]
    k_all = k.permute(0, 2, 1, 3, 4).reshape(B, H, M * N, K)  # (B, H, M*N, K)
    v_all = v.permute(0, 2, 1, 3, 4).reshape(B, H, M * N, K)
    scores = torch.einsum("bhtk,bhjk->bhtj", q * K**-0.5, k_all)  # (B, H, T, M*N)
    key_media = torch.arange(1, M + 1, device=q.device).repeat_interleave(N)  # (M*N,)
    allowed = text_time[:, None, :, None] == key_media[None, None, None, :]  # (B, 1, T, M*N)
    scores = scores.masked_fill(~allowed, -torch.finfo(scores.dtype).max)
    attn = scores.softmax(dim=-1)
    attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    return torch.einsum("bhtj,bhjk->bhtk", attn, v_all)


def gated_media_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_time: torch.Tensor,
    gate: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + tanh(gate) * media_attention(q, k, v, text_time); the fused op's specification.

    Args:
        q, k, v, text_time: as `media_attention_gather`.
        gate: (1,) gate parameter (tanh is applied here).
        residual: (B, H, T, K) added to the gated output, or None for no residual.
    Returns:
        (B, H, T, K).
    """
    out = torch.tanh(gate) * media_attention_gather(q, k, v, text_time)
    return out if residual is None else residual + out
