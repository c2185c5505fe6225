"""Where each text token's image is: index tables built once per batch, in a fixed number of tensor ops.

Shapes: B batch, T text tokens, M media (images) per sample, C chunk length, R chunks in the batch,
H heads, S = R * C slots.

text_time[b, t] is the media index of token t (a cumsum of `<image>` markers, so non-decreasing
in t): 0 = before the first image, 1..M = image text_time - 1, > M = more markers than images.
The tokens of one image therefore form one contiguous run. Both cross-attention paths read these
tables instead of walking the runs in Python:

- `token_ranges`: the [lo, hi) token range of every media index, for the Triton dk/dv kernel;
- `chunk_plan`: every run cut into chunks of C tokens, each chunk tagged with its image: one main
  chunk per image (which reads the image's keys in place) plus overflow chunks for runs longer
  than C, so a fixed number of batched matmuls serves any layout. C is picked per batch from the
  run lengths (`pick_chunk`: fewest padded slots and chunks), so the slots stay
  <= T + B * M * (C - 1) for every layout and the cost follows T, not where the images sit.

`plan_for` / `ranges_for` return the tables for a text_time tensor, built once and reused while
that tensor is alive and unmodified: every cross-attention layer of a forward, and its backward,
share one plan. No Python loop over tokens or runs; one host sync per plan (C and the overflow
count size the tensors).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

# cost of a chunk and of an overflow chunk in units of one padded slot, measured on CPU (fp32, H = 8,
# N = K = 64, fwd + bwd): a slot (six small matmul rows over 8 heads) about 7 us; an overflow chunk
# about 0.2 ms more (it copies its image's keys and values, the matmuls read the copies, and the
# backward adds their gradients back); a chunk's own call overhead is small beside either
_CHUNK_COST, _OVERFLOW_COST = 1, 27


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


def _powers_of_two(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... up to the first value >= hi."""
    out = [lo]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


def pick_chunks(run_len: torch.Tensor, num_tokens: int) -> tuple[int, int]:
    """Main and overflow chunk lengths (C, C_o) for these runs: least estimated cost.

    Image i takes one main chunk of C tokens and ceil(max(0, run_i - C) / C_o) overflow chunks of
    C_o tokens. cost = padded slots + _CHUNK_COST * chunks + _OVERFLOW_COST * overflow chunks.
    Evenly spaced images get C just above their run length (no overflow); a few long runs get
    long overflow chunks, so few key copies.

    Args:
        run_len: (B * M,) long, tokens per image.
        num_tokens: T.
    Returns:
        (C, C_o), powers of two in [4, T rounded up], C <= C_o (one host sync).
    """
    cands = _powers_of_two(4, num_tokens)
    c = torch.tensor(cands, device=run_len.device)
    main = c[:, None, None]  # (n, 1, 1): C
    over = c[None, :, None]  # (1, n, 1): C_o
    over_chunks = ((run_len - main).clamp(min=0) + over - 1) // over  # (n, n, B * M)
    cost = (main + _CHUNK_COST + over_chunks * (over + _CHUNK_COST + _OVERFLOW_COST)).sum(-1)  # (n, n)
    cost = cost.masked_fill(main[..., 0] > over[..., 0], torch.iinfo(cost.dtype).max)
    best = int(cost.argmin())
    return cands[best // len(cands)], cands[best % len(cands)]


@dataclass(frozen=True)
class ChunkPlan:
    """Runs of tokens cut into chunks, each chunk attending to one image.

    Every image owns one "main" chunk (its first C tokens, padded): main chunk i attends to image
    i = b * M + m, so its keys need no copy. Longer runs continue in "overflow" chunks of C_o
    tokens, which read their image's keys through `over_image`. Slots: I * C main slots, then
    R_o * C_o overflow slots; S = I * C + R_o * C_o.

    Attributes:
        chunk: C, main chunk length.
        over_chunk: C_o, overflow chunk length.
        num_images: I = B * M.
        num_over: R_o, overflow chunks in the batch (at most B * ceil(T / C_o) whatever the layout).
        over_image: (R_o,) long, flat image index b * M + m of each overflow chunk (sorted).
        slot_token: (S,) long, flat token index b * T + t each slot reads; padding slots read B * T.
        token_slot: (B * T,) long, the slot holding each token's output; S for tokens without one.
        has_image: (B, T) bool, tokens that attend to an image (1 <= text_time <= M).
        no_image: (B, T) bool, text before the first image (output exactly 0).
        over: (B, T) bool, more `<image>` markers than images (mean of all values).
        any_no_image, any_over: whether any token is in those cases (Python bools).
    """

    chunk: int
    over_chunk: int
    num_images: int
    num_over: int
    over_image: torch.Tensor
    slot_token: torch.Tensor
    token_slot: torch.Tensor
    has_image: torch.Tensor
    no_image: torch.Tensor
    over: torch.Tensor
    any_no_image: bool
    any_over: bool
    _rows: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def real_slot(self) -> torch.Tensor:
        """(S,) bool: slots that hold a token (False: padding)."""
        return self.slot_token < self.has_image.numel()

    def _slot_row(self, slot: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Row of (slot, head) in the slot-major layout: main chunk i, head h, position c at
        (i * H + h) * C + c; overflow chunk j at I * C * H + (j * H + h) * C_o + c."""
        H, C, Co = heads.numel(), self.chunk, self.over_chunk
        main_slots = self.num_images * C
        is_over = slot >= main_slots
        local = torch.where(is_over, slot - main_slots, slot)
        length = torch.where(is_over, Co, C)
        base = torch.where(is_over, main_slots * H, 0)
        return base + ((local // length) * H + heads) * length + local % length

    def head_rows(self, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row indices between token-major (B * T * H, K) and slot-major (S * H, K) tensors.

        Token row (b * T + t) * H + h; slot rows as `_slot_row`. Built once per head count, kept.

        Args:
            heads: H.
        Returns:
            (slot_rows, out_rows, grad_rows):
            slot_rows (S * H,): the token row each slot row reads, B * T * H (one row past the
              tokens, the caller's zero row) for padding;
            out_rows (B * T * H,): the slot row each token row reads: tokens with an image their
              slot, text before the first image S * H (a zero row), tokens with text_time > M row
              S * H + 1 + b * H + h (their sample's mean of values);
            grad_rows (B * T * H,): as out_rows, but every token without an image reads S * H.
        """
        if heads not in self._rows:
            dev = self.slot_token.device
            h = torch.arange(heads, device=dev)
            B, T = self.has_image.shape
            S = self.slot_token.numel()
            slots = torch.arange(S, device=dev)[:, None]  # (S, 1)
            slot_rows = torch.empty(S * heads, dtype=torch.long, device=dev)
            token_rows = torch.where(self.slot_token[:, None] < B * T, self.slot_token[:, None] * heads + h, B * T * heads)
            slot_rows[self._slot_row(slots, h).flatten()] = token_rows.flatten()
            has = self.token_slot[:, None] < S  # (B * T, 1)
            grad_rows = torch.where(has, self._slot_row(self.token_slot.clamp(max=max(S - 1, 0))[:, None], h), S * heads)
            out_rows = grad_rows
            if self.any_over:
                b = torch.arange(B, device=dev).repeat_interleave(T)[:, None]  # (B * T, 1)
                out_rows = torch.where(self.over.flatten()[:, None], S * heads + 1 + b * heads + h, grad_rows)
            self._rows[heads] = (slot_rows, out_rows.flatten(), grad_rows.flatten())
        return self._rows[heads]


def chunk_plan(text_time: torch.Tensor, num_media: int, chunk: int | None = None,
               over_chunk: int | None = None) -> ChunkPlan:
    """Cut every image's run of tokens into a main chunk and overflow chunks (see ChunkPlan).

    Args:
        text_time: (B, T) integer media index per token, non-decreasing along T.
        num_media: M.
        chunk: C, or None to pick C and C_o from the run lengths (`pick_chunks`).
        over_chunk: C_o (default: C when `chunk` is given).
    Returns:
        The ChunkPlan.
    """
    B, T = text_time.shape
    M, dev = num_media, text_time.device
    tt = text_time.long()
    lo, hi = token_ranges(tt, M)
    start = lo[:, 1:M + 1].flatten()  # (B * M,) first token of each image's run
    run_len = (hi - lo).clamp(min=0)[:, 1:M + 1].flatten()  # (B * M,)
    if chunk is None:
        C, Co = pick_chunks(run_len, T) if M else (4, 4)
    else:
        C, Co = chunk, over_chunk or chunk
    over_count = ((run_len - C).clamp(min=0) + Co - 1) // Co  # chunks after the main one
    first_over = over_count.cumsum(0) - over_count  # (B * M,)
    R_o = int(over_count.sum())
    has_image = (tt >= 1) & (tt <= M)  # (B, T)
    no_image, over = tt == 0, tt > M
    image = ((tt - 1).clamp(0, max(M - 1, 0)) + torch.arange(B, device=dev)[:, None] * M).flatten()
    in_run = torch.arange(T, device=dev).repeat(B) - start[image] if M else torch.zeros_like(image)
    main_slot = image * C + in_run
    in_over = (in_run - C).clamp(min=0)
    over_slot = B * M * C + (first_over[image] + in_over // Co) * Co + in_over % Co if M else main_slot
    num_slots = B * M * C + R_o * Co
    has = has_image.flatten()
    slot = torch.where(has, torch.where(in_run < C, main_slot, over_slot), num_slots)  # (B * T,)
    slot_token = torch.full((num_slots + 1,), B * T, dtype=torch.long, device=dev)
    slot_token[slot] = torch.arange(B * T, device=dev)  # tokens without a slot land in the extra entry
    over_image = torch.repeat_interleave(torch.arange(B * M, device=dev), over_count, output_size=R_o)
    return ChunkPlan(C, Co, B * M, R_o, over_image, slot_token[:num_slots], slot, has_image, no_image, over,
                     bool(no_image.any()), bool(over.any()))


class _LastTable:
    """The table last built for a text_time tensor; reused while that tensor is alive and unmodified."""

    def __init__(self) -> None:
        self.ref, self.key, self.value = None, None, None

    def get(self, text_time: torch.Tensor, key: tuple, build):
        full_key = (text_time._version, tuple(text_time.shape), text_time.device, *key)
        if self.ref is None or self.ref() is not text_time or self.key != full_key:
            self.value = build()
            self.ref, self.key = weakref.ref(text_time), full_key
        return self.value


_PLANS, _RANGES = _LastTable(), _LastTable()


def plan_for(text_time: torch.Tensor, num_media: int) -> ChunkPlan:
    """`chunk_plan(text_time, num_media)`, built once per text_time tensor (all layers of a batch).

    Args and Returns: as `chunk_plan` with the chunk length picked from the layout.
    """
    return _PLANS.get(text_time, (num_media,), lambda: chunk_plan(text_time, num_media))


def ranges_for(text_time: torch.Tensor, num_media: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_ranges(text_time, num_media)` as int32, built once per text_time tensor (no host sync).

    Args and Returns: as `token_ranges`, in int32 (the Triton kernels' index type).
    """
    def build():
        lo, hi = token_ranges(text_time, num_media)
        return lo.to(torch.int32), hi.to(torch.int32)

    return _RANGES.get(text_time, (num_media,), build)
