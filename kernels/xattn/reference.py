"""Media-indexed cross-attention in plain PyTorch: the specification the Triton kernel must meet.

Shapes: B batch, H heads, T text tokens, M media (images) per sample, N latents per image,
K head dim; I = B * M images, R chunks of C tokens (S = R * C slots), R_o overflow chunks.

Semantics (OpenFlamingo's `MaskedCrossAttention` with only_attend_immediate_media=True):
- text_time[b, t] = number of `<image>` tokens at or before t (a cumsum, so non-decreasing in t);
- 1 <= text_time <= M: the token attends to the N latents of image text_time - 1 only;
- text_time == 0 (text before the first image): the attention output is exactly 0;
- text_time > M (more `<image>` tokens than images): every key is masked, and the reference's
  softmax over all-equal logits is uniform over all M * N keys, i.e. the mean of all values.

`media_attention_gather` costs O(T * N) per sample whatever M is, and about the same whatever the
image positions: `layout.plan_for` cuts each image's run of tokens (contiguous, because text_time
is a cumsum) into chunks of C tokens with index tables built once per batch, and `_ChunkAttention`
(an autograd Function with a hand-written backward) runs every chunk against its own image's N
latents with a fixed number of batched matmuls: no Python loop over runs, no per-run stacking, no
zero-filled scatter in backward (on CPU the per-call and copy overheads, not the arithmetic,
dominate when images are many and runs short).
`media_attention_dense` builds the full T x (M * N) masked score matrix, as OpenFlamingo does;
it is kept as a second reference for tests and benchmarks.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .layout import ChunkPlan, plan_for


def _groups(rows: torch.Tensor, plan: ChunkPlan, heads: int) -> list[torch.Tensor]:
    """Slot-major rows (S * H [+ extra], D) as batched matrices: [(I * H, C, D)] main chunks, plus
    (R_o * H, C_o, D) overflow chunks when there are any (views, no copy)."""
    split = plan.num_images * heads * plan.chunk
    D = rows.shape[-1]
    out = [rows[:split].view(-1, plan.chunk, D)]
    if plan.num_over:
        out.append(rows[split:split + plan.num_over * heads * plan.over_chunk].view(-1, plan.over_chunk, D))
    return out


def _token_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, T, K) -> token-major rows (B * T * H + 1, K) in `dtype`, the last row zero (what
    padding slots read). One strided copy (no transposed copy plus a concatenation)."""
    B, H, T, K = x.shape
    rows = x.new_empty(B * T * H + 1, K, dtype=dtype)
    rows[:-1].view(B, T, H, K).copy_(x.transpose(1, 2))
    rows[-1].zero_()
    return rows


def _bmm_groups(a: list[torch.Tensor], b: list[torch.Tensor], out: list[torch.Tensor], trans_b: bool) -> None:
    """out[g] = a[g] @ b[g] (or b[g]^T) for the main and the overflow group."""
    for x, y, o in zip(a, b, out):
        torch.bmm(x, y.transpose(1, 2) if trans_b else y, out=o)


class _ChunkAttention(torch.autograd.Function):
    """Attention of every chunk of tokens over its own image's latents, forward and backward by hand.

    forward: scores = q_c k_c^T / sqrt(K), p = softmax(scores), o_c = p v_c per chunk, read back
    per token (zero / mean-of-values rows for tokens without an image);
    backward: dv_c = p^T do_c, ds = p * (do_c v_c^T - rowsum(p * do_c v_c^T)), dq_c = ds k_c,
    dk_c = ds^T q_c; overflow chunks' dk_c, dv_c are added to their image with one index_add_.
    Main chunks read their image's keys and values in place; only overflow chunks use gathered
    copies. Computes in fp32 (fp64 for fp64 inputs); outputs and gradients in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: ChunkPlan):  # noqa: D102 (see the class docstring)
        B, H, T, K = q.shape
        M, N = k.shape[1], k.shape[3]
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        I, SH = plan.num_images, plan.slot_token.numel() * H
        slot_rows, out_rows, _ = plan.head_rows(H)
        q_c = _token_rows(q, cd).index_select(0, slot_rows)  # (S * H, K)
        kv = [k.reshape(I * H, N, K).to(cd).contiguous(), v.reshape(I * H, N, K).to(cd).contiguous()]
        if plan.num_over:  # gathered copies of the overflow chunks' images
            kv += [x.view(I, -1).index_select(0, plan.over_image).view(-1, N, K) for x in kv]
        k_g, v_g = kv[0::2], kv[1::2]
        scores = q_c.new_empty(SH, N)
        _bmm_groups(_groups(q_c, plan, H), k_g, _groups(scores, plan, H), trans_b=True)
        p = scores.mul_(K ** -0.5).softmax(dim=-1)  # (S * H, N)
        o_rows = q_c.new_empty(SH + 1 + (B * H if plan.any_over else 0), K)  # a zero row, then means
        _bmm_groups(_groups(p, plan, H), v_g, _groups(o_rows, plan, H), trans_b=False)
        o_rows[SH].zero_()
        if plan.any_over:
            o_rows[SH + 1:] = v.to(cd).mean(dim=(1, 3)).reshape(B * H, K)
        out = o_rows.index_select(0, out_rows).to(q.dtype).view(B, T, H, K).transpose(1, 2)
        ctx.save_for_backward(q_c, p, *kv)
        ctx.plan, ctx.shapes, ctx.dtypes = plan, (B, H, T, K, M, N), (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):  # noqa: D102
        q_c, p, *kv = ctx.saved_tensors
        plan, (B, H, T, K, M, N) = ctx.plan, ctx.shapes
        k_g, v_g, SH, cd = kv[0::2], kv[1::2], q_c.shape[0], q_c.dtype
        slot_rows, _, grad_rows = plan.head_rows(H)
        do_tok = _token_rows(dout, cd)  # (B * T * H + 1, K)
        do_c = do_tok.index_select(0, slot_rows)  # (S * H, K)
        p_g, do_g = _groups(p, plan, H), _groups(do_c, plan, H)
        dp = p.new_empty(SH, N)
        _bmm_groups(do_g, v_g, _groups(dp, plan, H), trans_b=True)
        dv_g = [torch.bmm(x.transpose(1, 2), y) for x, y in zip(p_g, do_g)]  # (chunks * H, N, K)
        ds = dp.sub_((p * dp).sum(dim=-1, keepdim=True)).mul_(p).mul_(K ** -0.5)  # (S * H, N)
        ds_g = _groups(ds, plan, H)
        dq_rows = q_c.new_empty(SH + 1, K)
        _bmm_groups(ds_g, k_g, _groups(dq_rows, plan, H), trans_b=False)
        dq_rows[SH].zero_()
        dq = dq_rows.index_select(0, grad_rows).to(ctx.dtypes[0]).view(B, T, H, K).transpose(1, 2)
        dk_g = [torch.bmm(x.transpose(1, 2), y) for x, y in zip(ds_g, _groups(q_c, plan, H))]
        dk, dv = _sum_chunks(dk_g, plan), _sum_chunks(dv_g, plan)  # (I, H * N * K)
        if plan.any_over:  # tokens with text_time > M: d mean(v) / dv = 1 / (M * N) for every key
            d_mean = (plan.over.to(cd)[:, :, None] * do_tok[:-1].view(B, T, H * K)).sum(1) / (M * N)  # (B, H * K)
            dv.view(B, M, H, N, K).add_(d_mean.view(B, 1, H, 1, K))
        return dq, dk.view(B, M, H, N, K).to(ctx.dtypes[1]), dv.view(B, M, H, N, K).to(ctx.dtypes[2]), None


def _sum_chunks(chunk_grads: list[torch.Tensor], plan: ChunkPlan) -> torch.Tensor:
    """Per-chunk gradients [(I * H, N, K), (R_o * H, N, K)] -> (I, H * N * K): each image's main chunk
    plus its overflow chunks (one index_add_, in place on the main chunks' tensor)."""
    grad = chunk_grads[0].view(plan.num_images, -1)
    if plan.num_over:
        grad.index_add_(0, plan.over_image, chunk_grads[1].view(plan.num_over, -1))
    return grad


def media_attention_gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor, plan: ChunkPlan | None = None
) -> torch.Tensor:
    """Attention of each text token over the latents of its own image only.

    Batched matmuls over the chunks of `layout.plan_for` (C queries each, against their image's N
    latents): the queries are gathered with index tables and the outputs read back per token, so
    the cost depends on T and M, not on where the images sit. q, k and v are always inputs of one
    autograd node, so their gradients exist (zeros) even when no token attends to an image.

    Args:
        q: (B, H, T, K) queries (unscaled; scaled here by K ** -0.5).
        k: (B, M, H, N, K) keys of every image.
        v: (B, M, H, N, K) values of every image.
        text_time: (B, T) integer media index per token (0 = before the first image).
        plan: a `layout.chunk_plan(text_time, M)` to use; None for the one `plan_for` keeps per
            text_time tensor (built on first use, shared by every layer of the batch).
    Returns:
        (B, H, T, K) attention output in q's dtype (a transposed view of a (B, T, H, K) tensor);
        rows with text_time == 0 are exactly zero.
    """
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
