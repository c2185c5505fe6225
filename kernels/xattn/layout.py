"""Where each text token's image is: index tables built once per batch, in a fixed number of tensor ops.

Shapes: B batch, T text tokens, M media (images) per sample, C chunk length, R chunks in the batch.

text_time[b, t] is the media index of token t (a cumsum of `<image>` markers, so non-decreasing
in t): 0 = before the first image, 1..M = image text_time - 1, > M = more markers than images.
The tokens of one image therefore form one contiguous run. Both cross-attention paths read these
tables instead of walking the runs in Python:

- `token_ranges`: the [lo, hi) token range of every media index, for the Triton dk/dv kernel;
- `chunk_plan`: every run cut into chunks of at most C tokens, each chunk tagged with its image:
  one main chunk per image (which reads the image's keys in place) plus overflow chunks for runs
  longer than C, so two batched attention calls serve any layout. Slots <= B * (M * C + T): the
  cost depends on T and M, not on where the images sit.

No Python loop over tokens or runs, and one host sync (the overflow count, to size tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def token_ranges(text_time: torch.Tensor, num_media: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last token of each media index.

    Args:
        text_time: (B, T) integer media index per token.
        num_media: M.
    Returns:
        (lo, hi), each (B, M + 2) int64: tokens with text_time == j lie in [lo[b, j], hi[b, j]);
        column M + 1 collects every text_time > M. An unused index has lo = T, hi = 0.
    """
    B, T = text_time.shape
    bucket = text_time.long().clamp(0, num_media + 1)  # (B, T)
    pos = torch.arange(T, device=text_time.device).expand(B, T)
    lo = torch.full((B, num_media + 2), T, dtype=torch.long, device=text_time.device)
    hi = torch.zeros((B, num_media + 2), dtype=torch.long, device=text_time.device)
    lo.scatter_reduce_(1, bucket, pos, reduce="amin")
    hi.scatter_reduce_(1, bucket, pos + 1, reduce="amax")
    return lo, hi


def default_chunk(num_tokens: int, num_media: int) -> int:
    """Chunk length C from the shape only: the power of two nearest 2 T / M, within [4, 256].

    An image's run averages T / M tokens. C about twice that leaves few runs longer than their
    main chunk (overflow chunks copy their image's keys: on CPU those allocations, not the
    arithmetic on padding slots, are what costs), while the padding stays <= C - 1 slots per image
    and the overflow <= T / C chunks per sample for every layout.
    """
    target = 2 * num_tokens / max(num_media, 1)
    c = 4
    while c < 256 and c * 1.5 <= target:
        c *= 2
    return c


@dataclass(frozen=True)
class ChunkPlan:
    """Runs of tokens cut into chunks of C tokens, each chunk attending to one image.

    Every image owns one "main" chunk (its first C tokens, padded): main chunk i attends to image
    i = b * M + m, so the keys need no copy. Longer runs continue in "overflow" chunks of C tokens,
    which read their image's keys through `over_image`. Slots: B * M * C main slots, then
    R_o * C overflow slots.

    Attributes:
        chunk: C.
        num_images: B * M.
        num_over: R_o, overflow chunks in the batch (at most B * ceil(T / C) whatever the layout).
        over_image: (R_o,) long, flat image index b * M + m of each overflow chunk (sorted).
        over_count: (B * M,) long, overflow chunks per image.
        slot_token: (S,) long, flat token index b * T + t each slot reads (padding slots read
            token 0; their outputs are never read).
        token_slot: (B * T,) long, the slot holding each token's output (0 for tokens without one).
        real_slot: (S,) bool, slots that hold a token (False: padding).
        has_image: (B, T) bool, tokens that attend to an image (1 <= text_time <= M).
        no_image: (B, T) bool, text before the first image (output exactly 0).
        over: (B, T) bool, more `<image>` markers than images (mean of all values).
        any_no_image, any_over: whether any token is in those cases (Python bools).
    """

    chunk: int
    num_images: int
    num_over: int
    over_image: torch.Tensor
    over_count: torch.Tensor
    slot_token: torch.Tensor
    token_slot: torch.Tensor
    real_slot: torch.Tensor
    has_image: torch.Tensor
    no_image: torch.Tensor
    over: torch.Tensor
    any_no_image: bool
    any_over: bool

    @property
    def chunk_image(self) -> torch.Tensor:
        """(B * M + R_o,) long: the image of every chunk, main chunks first."""
        return torch.cat([torch.arange(self.num_images, device=self.over_image.device), self.over_image])

    def image_sum_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """(B * M, B * M + R_o) sparse CSR 0/1 matrix: row i sums image i's main and overflow chunks."""
        dev, I = self.over_count.device, self.num_images
        counts = self.over_count + 1
        crow = torch.zeros(I + 1, dtype=torch.long, device=dev)
        crow[1:] = counts.cumsum(0)
        col = torch.empty(I + self.num_over, dtype=torch.long, device=dev)
        col[crow[:-1]] = torch.arange(I, device=dev)  # the main chunk, then the overflow chunks
        over_pos = torch.ones(I + self.num_over, dtype=torch.bool, device=dev)
        over_pos[crow[:-1]] = False
        col[over_pos] = I + torch.arange(self.num_over, device=dev)  # sorted by image, as the chunks
        ones = torch.ones(I + self.num_over, dtype=dtype, device=dev)
        return torch.sparse_csr_tensor(crow, col, ones, size=(I, I + self.num_over))


def chunk_plan(text_time: torch.Tensor, num_media: int, chunk: int | None = None) -> ChunkPlan:
    """Cut every image's run of tokens into a main chunk and overflow chunks (see ChunkPlan).

    Args:
        text_time: (B, T) integer media index per token, non-decreasing along T.
        num_media: M.
        chunk: C, or None for `default_chunk(T, M)`.
    Returns:
        The ChunkPlan.
    """
    B, T = text_time.shape
    M, dev = num_media, text_time.device
    C = chunk or default_chunk(T, M)
    tt = text_time.long()
    lo, hi = token_ranges(tt, M)
    start = lo[:, 1:M + 1].flatten()  # (B * M,) first token of each image's run
    run_len = (hi - lo).clamp(min=0)[:, 1:M + 1].flatten()  # (B * M,)
    over_count = ((run_len - 1).clamp(min=0) // C)  # chunks after the main one
    first_over = over_count.cumsum(0) - over_count  # (B * M,)
    R_o = int(over_count.sum())
    has_image = (tt >= 1) & (tt <= M)  # (B, T)
    no_image, over = tt == 0, tt > M
    image = ((tt - 1).clamp(0, max(M - 1, 0)) + torch.arange(B, device=dev)[:, None] * M).flatten()
    in_run = torch.arange(T, device=dev).repeat(B) - start[image] if M else torch.zeros_like(image)
    rank = in_run // C
    main_slot = image * C + in_run
    over_slot = B * M * C + (first_over[image] + rank - 1) * C + in_run % C if M else main_slot
    slot = torch.where(rank == 0, main_slot, over_slot)  # (B * T,)
    has = has_image.flatten()
    num_slots = (B * M + R_o) * C
    slot_token = torch.zeros(num_slots, dtype=torch.long, device=dev)
    slot_token[slot[has]] = torch.arange(B * T, device=dev)[has]
    real_slot = torch.zeros(num_slots, dtype=torch.bool, device=dev)
    real_slot[slot[has]] = True
    over_image = torch.repeat_interleave(torch.arange(B * M, device=dev), over_count, output_size=R_o)
    return ChunkPlan(C, B * M, R_o, over_image, over_count, slot_token, torch.where(has, slot, 0), real_slot,
                     has_image, no_image, over, bool(no_image.any()), bool(over.any()))
