"""Cross entropy of one chunk of logits, in plain PyTorch: the specification the Triton kernels meet.

Shapes: C tokens in the chunk, V_local vocabulary columns of this rank (V without tensor
parallelism).

The fused linear + cross entropy (`__init__.py`) walks the tokens chunk by chunk: it forms a
(C, V_local) fp32 logit chunk, then calls the three steps below, all-reducing the statistics over
the vocabulary group between them, and finally turns the chunk, in place, into the gradient of the
loss w.r.t. those logits. The formulas are `megaflamingo.parallel.layers.vocab_parallel_cross_entropy`'s:

    peak   = max_v z_v                                  (all-reduced: MAX)
    sumexp = sum_v exp(z_v - peak),  zt = z_target - peak   (all-reduced: SUM; zt is 0 off-shard)
    loss   = log(sumexp) - zt
    dL/dz  = scale * (exp(z - peak) / sumexp - onehot(target))

Each step works on the chunk in place (z -> exp(z - peak) -> dL/dz): one (C, V_local) buffer,
five passes over it (max, subtract, exp, sum, scale).
"""

from __future__ import annotations

import torch


def row_peak(logits: torch.Tensor) -> torch.Tensor:
    """Step 1: the row maximum.

    Args:
        logits: (C, V_local) fp32 chunk.
    Returns:
        (C,) fp32.
    """
    return logits.max(dim=-1).values


def exp_shifted_(logits: torch.Tensor, peak: torch.Tensor, local_target: torch.Tensor) -> torch.Tensor:
    """Step 2, in place: logits <- exp(z - peak); returns sum_v exp(z - peak) and the shifted target
    logit z_target - peak (0 where the target is off-shard).

    Args:
        logits: (C, V_local) fp32 chunk (overwritten with exp(z - peak)).
        peak: (C,) the (group-wide) row maximum.
        local_target: (C,) long, target column in this shard, or -1 when another rank holds it.
    Returns:
        (2, C) fp32: sumexp, shifted target logit (one tensor: one all-reduce for both).
    """
    shifted = logits.sub_(peak[:, None])
    inside = local_target >= 0
    target = shifted.gather(1, local_target.clamp(min=0)[:, None])[:, 0].masked_fill(~inside, 0.0)
    return torch.stack([shifted.exp_().sum(dim=-1), target])


def exp_to_grad_(exp_shifted: torch.Tensor, sumexp: torch.Tensor, local_target: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """Step 3, in place: exp(z - peak) <- scale * (softmax - onehot(target)) = dL/dz.

    Args:
        exp_shifted: (C, V_local) fp32, step 2's output (overwritten).
        sumexp: (C,) the group-wide sum of exp(z - peak).
        local_target: (C,) long, as in `exp_shifted_`.
        scale: (C,) fp32 d loss / d (token loss).
    Returns:
        `exp_shifted`, now dL/dlogits.
    """
    grad = exp_shifted.mul_((scale / sumexp)[:, None])
    rows = torch.nonzero(local_target >= 0)[:, 0]
    grad[rows, local_target[rows]] -= scale[rows]
    return grad
