"""The training loss, defined once for the single-process model and every parallel layout.

Shapes: B batch, T text tokens, V vocabulary rows (V_local: this rank's shard of them).

    loss = (1 / B) * sum_b loss_weight[b] * mean_t CE(logits[b, t], labels[b, t + 1])

Labels are aligned with input_ids (Hugging Face convention) and shifted here; -100 marks tokens
without a loss. Each sample's cross entropy is averaged over its own target tokens (a sample with
none contributes 0), then weighted and averaged over the samples of the micro-batch.

`fused_flamingo_loss` computes the same loss from the final hidden states and the head's weight
(`megaflamingo.kernels.linear_ce`): chunk by chunk over the tokens with a target, never forming the
(B, T, V) logits, its gradients computed in the forward. `head_loss` reads weight, added rows and
vocabulary shard off an LMHead.

Why per-sample means: the loss of a global batch is then exactly the mean of the losses of equal
micro-batches, however the batch is cut into DP ranks and accumulation steps. (OpenFlamingo's
token mean over a per-GPU batch is not: it depends on how many target tokens each GPU drew.) So an
N-rank run and a 1-rank run compute the same loss and gradients for the same global batch. Stream
loss multipliers (OpenFlamingo's loss_multiplier_laion) are per-sample `loss_weight`s.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megaflamingo.kernels.linear_ce import linear_cross_entropy
from megaflamingo.parallel.comm import copy_to_group
from megaflamingo.parallel.layers import vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def weighted_sample_mean(token_loss: torch.Tensor, targets: torch.Tensor,
                         loss_weight: torch.Tensor | None) -> torch.Tensor:
    """Average per-token losses per sample, weight the samples, average over the batch.

    Args:
        token_loss: (B, L) float loss per target position (0 where ignored).
        targets: (B, L) the targets; IGNORE_INDEX where no loss.
        loss_weight: (B,) per-sample weights, or None for all ones.
    Returns:
        Scalar float32 loss.
    """
    counts = (targets != IGNORE_INDEX).sum(dim=-1).clamp(min=1).to(torch.float32)  # (B,)
    per_sample = token_loss.sum(dim=-1) / counts
    if loss_weight is not None:
        per_sample = per_sample * loss_weight.to(per_sample.dtype)
    return per_sample.mean()


def flamingo_loss(logits: torch.Tensor, labels: torch.Tensor, loss_weight: torch.Tensor | None = None,
                  vocab_group=None, vocab_start: int = 0) -> torch.Tensor:
    """Next-token loss of a micro-batch (see the module docstring), full or vocab-sharded logits.

    Args:
        logits: (B, T, V) or, with tensor parallelism, (B, T, V_local) for the vocabulary rows
            [vocab_start, vocab_start + V_local).
        labels: (B, T) ids aligned with input_ids; IGNORE_INDEX = no loss.
        loss_weight: (B,) per-sample weights, or None.
        vocab_group: the tensor-parallel group the vocabulary is sharded over; None = full logits.
        vocab_start: first vocabulary row of this rank's logits.
    Returns:
        Scalar float32 loss, differentiable in logits.
    """
    targets = labels[:, 1:]
    token_loss = vocab_parallel_cross_entropy(logits[:, :-1], targets, vocab_group, vocab_start,
                                              ignore_index=IGNORE_INDEX)
    return weighted_sample_mean(token_loss, targets, loss_weight)


def token_scales(labels: torch.Tensor, loss_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position targets and loss weights that make a token sum equal `flamingo_loss`.

    Position (b, t) predicts labels[b, t + 1]; the last position of each row has no target.

    Args:
        labels: (B, T) ids aligned with input_ids; IGNORE_INDEX = no loss.
        loss_weight: (B,) per-sample weights, or None.
    Returns:
        (targets, scale), each (B * T,): the target id (IGNORE_INDEX where none) and
        loss_weight[b] / (B * targets in row b), so loss = sum_i scale_i * CE_i.
    """
    B, T = labels.shape
    targets = torch.cat([labels[:, 1:], labels.new_full((B, 1), IGNORE_INDEX)], dim=1)  # (B, T)
    counts = (targets != IGNORE_INDEX).sum(dim=-1).clamp(min=1).to(torch.float32)  # (B,)
    weight = torch.ones(B, device=labels.device) if loss_weight is None else loss_weight.to(torch.float32)
    scale = (weight / counts / B)[:, None].expand(B, T)
    return targets.flatten(), scale.flatten()


def fused_flamingo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        loss_weight: torch.Tensor | None = None, vocab_group=None, vocab_start: int = 0,
                        added: torch.Tensor | None = None, added_ids: torch.Tensor | None = None,
                        chunk_tokens: int | None = None, impl: str = "auto") -> torch.Tensor:
    """`flamingo_loss(head(hidden), labels, loss_weight)` without the (B, T, V) logits.

    Args:
        hidden: (B, T, D) final hidden states after the final norm.
        weight: (V_local, D) the head's rows [vocab_start, vocab_start + V_local) (V_local = V
            without tensor parallelism).
        labels: (B, T) ids aligned with input_ids; IGNORE_INDEX = no loss.
        loss_weight: (B,) per-sample weights, or None.
        vocab_group: the tensor-parallel group the vocabulary is sharded over; None = whole head.
        vocab_start: first vocabulary row of `weight`.
        added: (A, D) a tied head's trainable rows, replacing rows `added_ids` of `weight`, or None.
        added_ids: (A,) their global ids.
        chunk_tokens: token rows per logit chunk (None: `default_chunk_tokens`: 16 MiB of fp32 logits,
            at least 256 rows).
        impl: "auto", "triton" or "reference" (see megaflamingo.kernels.linear_ce).
    Returns:
        Scalar float32 loss, differentiable in hidden, weight and added.
    """
    B, T, D = hidden.shape
    targets, scale = token_scales(labels, loss_weight)
    rows = hidden.reshape(B * T, D)
    if vocab_group is not None:  # each rank holds part of the vocabulary: sum dL/dh (and dL/dadded)
        rows = copy_to_group(rows, vocab_group)
        added = None if added is None else copy_to_group(added, vocab_group)
    return linear_cross_entropy(rows, weight, targets, scale, added=added, added_ids=added_ids,
                                group=vocab_group, vocab_start=vocab_start, chunk_tokens=chunk_tokens,
                                ignore_index=IGNORE_INDEX, impl=impl)


def head_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
              loss_weight: torch.Tensor | None = None, vocab_group=None, vocab_start: int = 0,
              chunk_tokens: int | None = None, impl: str = "auto") -> torch.Tensor:
    """`flamingo_loss(head(hidden), ...)` through `fused_flamingo_loss`, for an `LMHead`.

    Args:
        head: an LMHead (final norm + untied Linear / ColumnParallelLinear, or the tied
            TokenEmbedding / VocabParallelEmbedding with its `added` rows).
        hidden: (B, T, D) hidden states before the final norm.
        labels, loss_weight, vocab_group, vocab_start, chunk_tokens, impl: as `fused_flamingo_loss`.
    Returns:
        Scalar float32 loss.
    Raises:
        ValueError: an untied head with a bias (not supported by the fused loss).
    """
    proj = head.projection
    if getattr(proj, "bias", None) is not None:
        raise ValueError("the fused loss supports bias-free heads only")
    added = getattr(proj, "added", None) if head.tied else None
    return fused_flamingo_loss(head.norm(hidden), proj.weight, labels, loss_weight, vocab_group, vocab_start,
                               added=added, added_ids=proj.trainable_ids if added is not None else None,
                               chunk_tokens=chunk_tokens, impl=impl)


class FusedHeadLoss:
    """The pipeline's loss through the fused path: called on the final-norm output of the last stage.

    `loss(hidden, labels, loss_weight, vocab_group=, vocab_start=)`, the signature of
    `flamingo_loss` with the normed hidden states (B, T, D) in place of the logits; the head's
    weight and added rows are read from `head` (the same parameters the last stage holds).
    `takes_hidden` tells the pipeline builder to end the last stage at the final norm.

    Args:
        head: the LM's LMHead (after tensor parallelism was applied).
        impl: "auto", "triton" or "reference".
    """

    takes_hidden = True
    __name__ = "fused_flamingo_loss"

    def __init__(self, head: nn.Module, impl: str = "auto") -> None:
        self.head, self.impl = head, impl

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor, loss_weight: torch.Tensor | None = None,
                 vocab_group=None, vocab_start: int = 0) -> torch.Tensor:
        proj = self.head.projection
        added = getattr(proj, "added", None) if self.head.tied else None
        return fused_flamingo_loss(hidden, proj.weight, labels, loss_weight, vocab_group, vocab_start,
                                   added=added, added_ids=proj.trainable_ids if added is not None else None,
                                   impl=self.impl)
