"""Token embedding with a frozen base table and a small trainable table for the added tokens.

Shapes: B batch, T text tokens, D width, V vocabulary rows (= len(tokenizer)), A added trainable rows.

OpenFlamingo trains the whole embedding matrix but masks every gradient row except `<image>` and
`<|endofchunk|>`. Here those rows live in their own parameter (`added`, IDEFICS-style): the same
update, no optimizer state for the V - A frozen rows, and the base table shards cleanly under
tensor parallelism and ZeRO. `merged_weight()` gives the single (V, D) matrix back for export.
With a tied LM head the same two tables produce the logits, so the added output rows train too,
as they do in OpenFlamingo's tied LMs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def overlay_added_rows(base: torch.Tensor, input_ids: torch.Tensor, slot: torch.Tensor,
                       added: torch.Tensor) -> torch.Tensor:
    """Replace the embeddings of the added tokens by their rows of the trainable table.

    Args:
        base: (B, T, D) embeddings looked up in the base table.
        input_ids: (B, T).
        slot: (V,) row of each id in `added`, -1 for base rows.
        added: (A, D) the trainable rows.
    Returns:
        (B, T, D).
    """
    where = slot[input_ids]  # (B, T)
    rows = F.embedding(where.clamp(min=0), added)
    return torch.where((where >= 0).unsqueeze(-1), rows, base)


class TokenEmbedding(nn.Module):
    """Embedding lookup (`forward`) and tied output projection (`attend`) over base + added rows.

    Args:
        num_embeddings: V, total rows including the added ones.
        dim: D.
        trainable_ids: token ids whose rows live in the trainable `added` table (may be empty).
    """

    def __init__(self, num_embeddings: int, dim: int, trainable_ids: Sequence[int] = ()) -> None:
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        nn.init.normal_(self.weight, std=0.02)
        ordered = sorted(trainable_ids)  # checked in Python: also builds on the meta device
        if ordered and (ordered[0] < 0 or ordered[-1] >= num_embeddings):
            raise ValueError(f"trainable ids {ordered} out of range for {num_embeddings} rows")
        ids = torch.tensor(ordered, dtype=torch.long)
        slot = torch.full((num_embeddings,), -1, dtype=torch.long)
        slot[ids] = torch.arange(ids.numel())
        self.register_buffer("trainable_ids", ids, persistent=False)
        self.register_buffer("slot", slot, persistent=False)
        self.added = nn.Parameter(self.weight.detach()[ids].clone()) if ids.numel() else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Args: input_ids (B, T). Returns: (B, T, D)."""
        out = F.embedding(input_ids, self.weight)
        return out if self.added is None else overlay_added_rows(out, input_ids, self.slot, self.added)

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output projection. Args: hidden (B, T, D). Returns: logits (B, T, V)."""
        logits = F.linear(hidden, self.weight)
        if self.added is None:
            return logits
        return logits.index_copy(-1, self.trainable_ids, F.linear(hidden, self.added))

    def merged_weight(self) -> torch.Tensor:
        """The single (V, D) matrix with the added rows written back (for export)."""
        w = self.weight.detach().clone()
        if self.added is not None:
            w[self.trainable_ids] = self.added.detach().to(w.dtype)
        return w

    @torch.no_grad()
    def load_merged_weight(self, weight: torch.Tensor) -> None:
        """Load a single (V, D) matrix into the base and added tables."""
        if tuple(weight.shape) != (self.num_embeddings, self.dim):
            raise ValueError(
                f"embedding shape {tuple(weight.shape)} != expected {(self.num_embeddings, self.dim)}"
            )
        self.weight.copy_(weight)
        if self.added is not None:
            self.added.copy_(weight[self.trainable_ids])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}, trainable_ids={self.trainable_ids.tolist()}"
