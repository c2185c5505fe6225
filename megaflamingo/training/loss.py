"""The training loss, defined once for the single-process model and every parallel layout.

Shapes: B batch, T text tokens, V vocabulary rows (V_local: this rank's shard of them).

    loss = (1 / B) * sum_b loss_weight[b] * mean_t CE(logits[b, t], labels[b, t + 1])

Labels are aligned with input_ids (Hugging Face convention) and shifted here; -100 marks tokens
without a loss. Each sample's cross entropy is averaged over its own target tokens (a sample with
none contributes 0), then weighted and averaged over the samples of the micro-batch.

Why per-sample means: the loss of a global batch is then exactly the mean of the losses of equal
micro-batches, however the batch is cut into DP ranks and accumulation steps. (OpenFlamingo's
token mean over a per-GPU batch is not: it depends on how many target tokens each GPU drew.) So an
N-rank run and a 1-rank run compute the same loss and gradients for the same global batch. Stream
loss multipliers (OpenFlamingo's loss_multiplier_laion) are per-sample `loss_weight`s.
"""

from __future__ import annotations

import torch

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
