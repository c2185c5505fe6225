"""Media-indexed cross-attention in plain PyTorch: the specification the Triton kernel must meet.

Shapes: B batch, H heads, T text tokens, M media (images) per sample, N latents per image,
K head dim.

Semantics (OpenFlamingo's `MaskedCrossAttention` with only_attend_immediate_media=True):
- text_time[b, t] = number of `<image>` tokens at or before t (a cumsum, so non-decreasing in t);
- 1 <= text_time <= M: the token attends to the N latents of image text_time - 1 only;
- text_time == 0 (text before the first image): the attention output is exactly 0;
- text_time > M (more `<image>` tokens than images): every key is masked, and the reference's
  softmax over all-equal logits is uniform over all M * N keys, i.e. the mean of all values.

`media_attention_gather` costs O(T * N) per sample whatever M is: it walks the runs of equal
text_time (contiguous, because text_time is a cumsum) and attends each run to its own image
(runs of equal length share one SDPA call, and rows with the same layout are done together: on CPU
the per-call overhead, not the arithmetic, dominates when images are many and runs short).
`media_attention_dense` builds the full T x (M * N) masked score matrix, as OpenFlamingo does;
it is kept as a second reference for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _runs(text_time_row: list[int]) -> list[tuple[int, int, int]]:
    """Split one row of text_time into (start, end, value) runs of equal values."""
    runs, start = [], 0
    for t in range(1, len(text_time_row) + 1):
        if t == len(text_time_row) or text_time_row[t] != text_time_row[start]:
            runs.append((start, t, text_time_row[start]))
            start = t
    return runs


def _attend_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """Media attention for tokens that share one run layout.

    Args:
        q: (*, H, T, K) queries; every leading index shares `runs`.
        k: (*, M, H, N, K) keys.
        v: (*, M, H, N, K) values.
        runs: (start, end, media index) runs covering [0, T), from `_runs`.
    Returns:
        (*, H, T, K).
    """
    M = k.shape[-4]
    if not runs:
        return torch.zeros_like(q)
    # split / unbind rather than slicing in a loop: their backward is one cat / stack, not one
    # full-size zero gradient per run
    q_runs = q.split([end - start for start, end, _ in runs], dim=-2)  # each (*, H, L, K)
    k_imgs, v_imgs = k.unbind(-4), v.unbind(-4)  # M x (*, H, N, K)
    pieces: list[torch.Tensor | None] = [None] * len(runs)
    same_length: dict[int, list[int]] = {}  # run length -> runs that attend to an image
    for i, (q_run, (start, end, m)) in enumerate(zip(q_runs, runs)):
        if m == 0:
            pieces[i] = torch.zeros_like(q_run)
        elif m <= M:
            same_length.setdefault(end - start, []).append(i)
        else:  # all keys masked: uniform attention over every latent of every image
            mean_v = v.mean(dim=(-4, -2))  # (*, H, K)
            pieces[i] = mean_v.unsqueeze(-2).expand_as(q_run)
    # runs of equal length share one SDPA call (stacked on a new leading dim): with many images
    # the per-call overhead, not the arithmetic, is what costs on CPU
    for group in same_length.values():
        media = [runs[i][2] - 1 for i in group]
        if len(group) == 1:
            pieces[group[0]] = F.scaled_dot_product_attention(q_runs[group[0]], k_imgs[media[0]], v_imgs[media[0]])
            continue
        q_g = torch.stack([q_runs[i] for i in group])  # (G, *, H, L, K)
        k_g = torch.stack([k_imgs[m] for m in media])  # (G, *, H, N, K)
        v_g = torch.stack([v_imgs[m] for m in media])
        for i, out in zip(group, F.scaled_dot_product_attention(q_g, k_g, v_g).unbind(0)):
            pieces[i] = out
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)


def media_attention_gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor
) -> torch.Tensor:
    """Attention of each text token over the latents of its own image only.

    Args:
        q: (B, H, T, K) queries (unscaled; scaled here by K ** -0.5).
        k: (B, M, H, N, K) keys of every image.
        v: (B, M, H, N, K) values of every image.
        text_time: (B, T) integer media index per token (0 = before the first image).
    Returns:
        (B, H, T, K) attention output; rows with text_time == 0 are exactly zero.
    """
    rows = text_time.tolist()
    if all(row == rows[0] for row in rows):  # one layout for the whole batch (e.g. one image, first)
        return _attend_runs(q, k, v, _runs(rows[0]))
    return torch.stack([_attend_runs(q[b], k[b], v[b], _runs(row)) for b, row in enumerate(rows)])


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
