"""Media-indexed cross-attention in plain PyTorch: the specification the Triton kernel must meet.

Shapes: B batch, H heads, T text tokens, M media (images) per sample, N latents per image,
K head dim.

Semantics (OpenFlamingo's `MaskedCrossAttention` with only_attend_immediate_media=True):
- text_time[b, t] = number of `<image>` tokens at or before t (a cumsum, so non-decreasing in t);
- 1 <= text_time <= M: the token attends to the N latents of image text_time - 1 only;
- text_time == 0 (text before the first image): the attention output is exactly 0;
- text_time > M (more `<image>` tokens than images): every key is masked, and the reference's
  softmax over all-equal logits is uniform over all M * N keys, i.e. the mean of all values.

`media_attention_gather` costs O(T * N) per sample whatever M is, and the same whatever the
image positions: `layout.chunk_plan` cuts each image's run of tokens (contiguous, because
text_time is a cumsum) into chunks of at most C tokens with index tables built once per batch,
and one SDPA call attends every chunk to its own image (no Python loop over runs, no per-run
stacking: on CPU the per-call and copy overheads, not the arithmetic, dominate when images are
many and runs short).
`media_attention_dense` builds the full T x (M * N) masked score matrix, as OpenFlamingo does;
it is kept as a second reference for tests and benchmarks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .layout import ChunkPlan, chunk_plan


class _TokensToSlots(torch.autograd.Function):
    """rows[slot] = tokens[plan.slot_token[slot]]; backward reads each token's own slot back.

    Every token with an image owns exactly one slot; padding slots copy a token but their outputs
    are never read, so their gradient is exactly zero and the backward is a gather, not a scatter.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:  # noqa: D102
        ctx.plan = plan
        return tokens.index_select(0, plan.slot_token)

    @staticmethod
    def backward(ctx, grad_slots: torch.Tensor):  # noqa: D102
        plan = ctx.plan
        grad = grad_slots.index_select(0, plan.token_slot)
        if plan.any_no_image or plan.any_over:
            grad = grad.masked_fill(~plan.has_image.flatten().view(-1, *[1] * (grad.dim() - 1)), 0.0)
        return grad, None


class _SlotsToTokens(torch.autograd.Function):
    """tokens[t] = rows[plan.token_slot[t]]; backward writes each token's gradient to its slot."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:  # noqa: D102
        ctx.plan = plan
        return rows.index_select(0, plan.token_slot)

    @staticmethod
    def backward(ctx, grad_tokens: torch.Tensor):  # noqa: D102
        plan = ctx.plan
        if plan.any_no_image or plan.any_over:  # tokens without a slot must not leak into slot 0
            grad_tokens = grad_tokens.masked_fill(
                ~plan.has_image.flatten().view(-1, *[1] * (grad_tokens.dim() - 1)), 0.0)
        grad = grad_tokens.index_select(0, plan.slot_token)
        return grad.masked_fill(~plan.real_slot.view(-1, *[1] * (grad.dim() - 1)), 0.0), None


class _ImagesToChunks(torch.autograd.Function):
    """rows[r] = images[plan.chunk_image[r]] (main chunks, then overflow chunks); backward sums each
    image's chunks with one sparse CSR (B * M, B * M + R_o) 0/1 matrix product (index_add_ is
    20-100x slower on CPU, and one product writes each image's gradient once)."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:  # noqa: D102
        ctx.plan = plan
        return images.index_select(0, plan.chunk_image)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):  # noqa: D102
        plan = ctx.plan
        flat = grad_rows.reshape(grad_rows.shape[0], -1)
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            summed = plan.image_sum_matrix(work.dtype) @ work  # (B * M, D)
        return summed.to(grad_rows.dtype).view(plan.num_images, *grad_rows.shape[1:]), None


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(K)) v for many small chunks.

    fp32/fp64: two batched matmuls and a softmax (on CPU about 25% faster than SDPA's flash
    kernel at C x N = 8 x 64, whose backward zero-fills and re-tiles per chunk; the (R, H, C, N)
    probabilities it keeps are small); 16-bit: SDPA, which accumulates in fp32.

    Args:
        q: (R, H, C, K); k, v: (R, H, N, K).
    Returns:
        (R, H, C, K).
    """
    if q.dtype not in (torch.float32, torch.float64):
        return F.scaled_dot_product_attention(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (R, H, C, N)
    return torch.matmul(scores.softmax(dim=-1), v)


def media_attention_gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor, plan: ChunkPlan | None = None
) -> torch.Tensor:
    """Attention of each text token over the latents of its own image only.

    One SDPA call over the chunks of `layout.chunk_plan` (C queries each, against their image's N
    latents): the queries and the chunks' keys and values are gathered with index tables, and the
    outputs read back per token, so the cost depends on T and M only, not on where images sit.

    Args:
        q: (B, H, T, K) queries (unscaled; scaled here by K ** -0.5).
        k: (B, M, H, N, K) keys of every image.
        v: (B, M, H, N, K) values of every image.
        text_time: (B, T) integer media index per token (0 = before the first image).
        plan: `chunk_plan(text_time, M)` when the caller built it once for several layers.
    Returns:
        (B, H, T, K) attention output (a transposed view of a (B, T, H, K) tensor); rows with
        text_time == 0 are exactly zero.
    """
    B, H, T, K = q.shape
    M, N = k.shape[1], k.shape[3]
    plan = plan if plan is not None else chunk_plan(text_time, M)
    C, I, R_o = plan.chunk, B * M, plan.num_over
    if I:
        R = I + R_o  # chunks: one main chunk per image, then the overflow chunks
        q_slots = _TokensToSlots.apply(q.transpose(1, 2).reshape(B * T, H, K), plan)  # (R * C, H, K)
        q_c = q_slots.view(R, C, H, K).transpose(1, 2)  # (R, H, C, K)
        k_c, v_c = k.reshape(I, H, N, K), v.reshape(I, H, N, K)  # main chunk i reads image i in place
        if R_o:  # runs longer than C: the overflow chunks need their image's keys gathered
            k_c, v_c = _ImagesToChunks.apply(k_c, plan), _ImagesToChunks.apply(v_c, plan)  # (R, H, N, K)
        out_c = _chunk_attention(q_c, k_c, v_c)  # (R, H, C, K)
        out = _SlotsToTokens.apply(out_c.transpose(1, 2).reshape(R * C, H, K), plan).view(B, T, H, K)
    else:
        out = q.new_zeros(B, T, H, K)
    if plan.any_no_image and I:
        out = out.masked_fill(plan.no_image[:, :, None, None], 0.0)
    if plan.any_over:  # all keys masked: uniform attention over every latent of every image
        mean_v = v.mean(dim=(1, 3))  # (B, H, K)
        out = torch.where(plan.over[:, :, None, None], mean_v[:, None].to(out.dtype), out)
    return out.transpose(1, 2)


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
