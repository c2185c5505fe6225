"""Where each text token's image is: index tables built once per batch, in a fixed number of tensor ops.

Shapes: B batch, T text tokens, M media (images) per sample, I = B * M images, C chunk length,
H heads, S slots.

text_time[b, t] is the media index of token t (a cumsum of `<image>` markers, so non-decreasing
in t): 0 = before the first image, 1..M = image text_time - 1, > M = more markers than images.
The tokens of one image therefore form one contiguous run. Both cross-attention paths read these
tables instead of walking the runs in Python:

- `token_ranges`: the [lo, hi) token range of every media index, for the Triton dk/dv kernel;
- `chunk_plan`: every image's run in one chunk of slots, the images (in order) cut into segments
  whose chunks share one length C (the longest run of the segment), so that each segment is one
  batched matmul against its images' keys *in place*: a contiguous slice of the (I * H, N, K)
  keys, whatever the layout. `pick_segments` chooses the cut that minimises padded slots plus a
  fixed cost per segment (exact dynamic programming): evenly spaced images make one segment
  without padding; irregular ones a few segments with little padding, so the cost follows T and
  M, not where the images sit, and no keys or values are ever copied.

`plan_for` / `ranges_for` return the tables for a text_time tensor, built once and reused while
that tensor is alive and unmodified (the last few tensors' tables are kept): every cross-attention
layer of a forward, and its backward, share one plan. No Python loop over tokens; one host sync
per plan (the run lengths).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

# cost of one more segment in units of one slot, measured on CPU (fp32, H = 8, N = K = 64, fwd + bwd,
# T = 256, M = 33): a slot (one token row of the six small matmuls over every head, its share of the
# softmax and of the index copies) about 8 us, a segment (six more batched-matmul calls and their
# views) 20-35 us
_SEGMENT_COST = 4


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


def pick_segments(run_len: list[int], segment_cost: int = _SEGMENT_COST) -> list[int]:
    """First image of each segment: the cut of the images (in order) of least estimated cost.

    A segment of images [i, j) pads every run to the longest one in it, C = max(run, 1):
    cost = (j - i) * C slots + `segment_cost`. Exact dynamic programming over the cut points:
    best[j] = segment_cost + min over i of (best[i] + (j - i) * max(run[i:j])). The inner loop
    stops once a lower bound of every earlier start i >= 1 (a padding-free prefix plus one
    segment) cannot beat the best found, then tries i = 0 (no prefix): O(I) per image on evenly
    spaced runs.

    Args:
        run_len: tokens per image, I = B * M values.
        segment_cost: the cost of one segment in slots.
    Returns:
        Sorted segment starts, the first 0 (empty for no images).
    """
    I = len(run_len)
    floor = [0] * (I + 1)  # floor[i]: slots of images < i without padding; best[i] >= floor[i] + segment_cost
    for i, r in enumerate(run_len):
        floor[i + 1] = floor[i] + max(r, 1)
    best, cut = [0] * (I + 1), [0] * (I + 1)
    prefix_top = 1
    for j in range(1, I + 1):
        prefix_top = max(prefix_top, run_len[j - 1])
        least, arg, top = j * prefix_top, 0, 1  # start i = 0: one segment [0, j), no prefix
        for i in range(j - 1, 0, -1):
            top = max(top, run_len[i])
            span = (j - i) * top
            if floor[i] + segment_cost + span >= least:  # a lower bound that never falls as i falls
                break
            if best[i] + span < least:
                least, arg = best[i] + span, i
        best[j], cut[j] = least + segment_cost, arg
    starts, j = [], I
    while j > 0:
        j = cut[j]
        starts.append(j)
    return starts[::-1]


@dataclass(frozen=True)
class ChunkPlan:
    """Every image's run of tokens in one chunk of slots; images cut into segments of equal chunks.

    Segment s holds images [i0, i1) (flat index b * M + m, in order), each with a chunk of C_s
    slots (C_s >= every run in it): its rows form one (n_s * H, C_s, D) batch against the images'
    keys in place, (n_s * H, N, K) slices of the (I * H, N, K) keys. Slots of segment s start at
    the segment's base, image i's chunk at base_i = base_s + (i - i0) * C_s.

    Attributes:
        segments: ((i0, i1, C, base), ...) per segment, Python ints.
        num_images: I = B * M.
        chunk_base: (I,) long, first slot of each image's chunk.
        chunk_len: (I,) long, C of each image's segment.
        slot_token: (S,) long, flat token index b * T + t each slot reads; padding slots read B * T.
        token_slot: (B * T,) long, the slot holding each token's output; S for tokens without one.
        has_image: (B, T) bool, tokens that attend to an image (1 <= text_time <= M).
        no_image: (B, T) bool, text before the first image (output exactly 0).
        over: (B, T) bool, more `<image>` markers than images (mean of all values).
        any_no_image, any_over: whether any token is in those cases (Python bools).
    """

    segments: tuple
    num_images: int
    chunk_base: torch.Tensor
    chunk_len: torch.Tensor
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

    def head_rows(self, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row indices between token-major (B * T * H, K) and slot-major (S * H, K) tensors.

        Token row (b * T + t) * H + h; slot c of image i, head h at row base_i * H + h * C_i + c
        (each segment's rows are (n_s * H, C_s) matrices). Built once per head count, kept.

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
            slot_image = torch.repeat_interleave(torch.arange(self.num_images, device=dev), self.chunk_len,
                                                 output_size=S)  # (S,)
            base, length = self.chunk_base[slot_image, None], self.chunk_len[slot_image, None]  # (S, 1)
            offset = torch.arange(S, device=dev)[:, None] - base
            row_of_slot = base * heads + h * length + offset  # (S, H)
            slot_rows = torch.empty(S * heads, dtype=torch.long, device=dev)
            token = self.slot_token[:, None]  # (S, 1)
            token_rows = torch.where(token < B * T, token * heads + h, B * T * heads)
            slot_rows[row_of_slot.flatten()] = token_rows.flatten()
            has = self.token_slot[:, None] < S  # (B * T, 1)
            token_row = row_of_slot[self.token_slot.clamp(max=S - 1)] if S else h.expand(B * T, heads)
            grad_rows = torch.where(has, token_row, S * heads)  # (B * T, H)
            out_rows = grad_rows
            if self.any_over:
                b = torch.arange(B, device=dev).repeat_interleave(T)[:, None]  # (B * T, 1)
                out_rows = torch.where(self.over.flatten()[:, None], S * heads + 1 + b * heads + h, grad_rows)
            self._rows[heads] = (slot_rows, out_rows.flatten(), grad_rows.flatten())
        return self._rows[heads]

    def source_rows(self, heads: int, strides: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each slot row reads a (B, H, T, K) tensor whose rows of K lie `strides` rows apart
        in b, h, t (row r = b * strides[0] + h * strides[1] + t * strides[2]). Built once per
        head count and strides, kept.

        Args:
            heads: H.
            strides: (b, h, t) strides in rows of K elements.
        Returns:
            (index, pad): index (S * H,) the row each slot row reads (0 for padding), pad the slot
            rows that are padding (to be zeroed).
        """
        key = (heads, *strides)
        if key not in self._rows:
            B, T = self.has_image.shape
            slot_rows = self.head_rows(heads)[0]  # (b * T + t) * H + h, B * T * H for padding
            token, h = slot_rows // heads, slot_rows % heads
            pad = token == B * T
            T = max(T, 1)  # no tokens: no slots
            index = torch.where(pad, 0, token // T * strides[0] + h * strides[1] + token % T * strides[2])
            self._rows[key] = (index, pad.nonzero().flatten())
        return self._rows[key]


def chunk_plan(text_time: torch.Tensor, num_media: int, starts: list[int] | None = None) -> ChunkPlan:
    """One chunk of slots per image, images cut into segments of equal chunk length (see ChunkPlan).

    Args:
        text_time: (B, T) integer media index per token, non-decreasing along T.
        num_media: M.
        starts: first image (flat b * M + m) of each segment, sorted, starting at 0; None for the
            cut `pick_segments` finds from the run lengths.
    Returns:
        The ChunkPlan (one host sync: the run lengths).
    """
    B, T = text_time.shape
    M, dev, I = num_media, text_time.device, B * num_media
    tt = text_time.long()
    lo, hi = token_ranges(tt, M)
    start = lo[:, 1:M + 1].flatten()  # (I,) first token of each image's run
    run_len = (hi - lo).clamp(min=0)[:, 1:M + 1].flatten()  # (I,)
    runs = run_len.tolist()
    starts = pick_segments(runs) if starts is None else list(starts)
    segments, lengths, base = [], [], 0
    for i0, i1 in zip(starts, starts[1:] + [I]):
        C = max([1, *runs[i0:i1]])
        segments.append((i0, i1, C, base))
        lengths += [C] * (i1 - i0)
        base += (i1 - i0) * C
    chunk_len = torch.tensor(lengths, dtype=torch.long, device=dev)
    chunk_base = chunk_len.cumsum(0) - chunk_len
    has_image = (tt >= 1) & (tt <= M)  # (B, T)
    no_image, over = tt == 0, tt > M
    if M:
        image = ((tt - 1).clamp(0, M - 1) + torch.arange(B, device=dev)[:, None] * M).flatten()  # (B * T,)
        slot = chunk_base[image] + torch.arange(T, device=dev).repeat(B) - start[image]
    else:
        slot = torch.zeros(B * T, dtype=torch.long, device=dev)
    slot = torch.where(has_image.flatten(), slot, base)  # (B * T,)
    slot_token = torch.full((base + 1,), B * T, dtype=torch.long, device=dev)
    slot_token[slot] = torch.arange(B * T, device=dev)  # tokens without a slot land in the extra entry
    return ChunkPlan(tuple(segments), I, chunk_base, chunk_len, slot_token[:base], slot, has_image, no_image,
                     over, bool(no_image.any()), bool(over.any()))


class _RecentTables:
    """The tables built for the last few text_time tensors, each reused while its tensor is alive
    and unmodified: a batch's layers and backward, also while other batches' tables are built in
    between (micro-batches, or layouts timed in turns)."""

    def __init__(self, size: int = 4) -> None:
        self.size, self.entries = size, []  # [(weakref to text_time, key, table)], most recent last

    def get(self, text_time: torch.Tensor, key: tuple, build):
        full_key = (text_time._version, tuple(text_time.shape), text_time.device, *key)
        self.entries = [e for e in self.entries if e[0]() is not None]  # tables of freed tensors go
        for i, (ref, k, table) in enumerate(self.entries):
            if ref() is text_time and k == full_key:
                self.entries.append(self.entries.pop(i))
                return table
        table = build()
        self.entries = [*self.entries, (weakref.ref(text_time), full_key, table)][-self.size:]
        return table


_PLANS, _RANGES = _RecentTables(), _RecentTables()


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
