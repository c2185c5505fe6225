"""Fused linear + cross entropy: the loss and its gradients without the (tokens x V) logits.

Shapes: N token rows, D width, V_local vocabulary rows of this rank (V without tensor
parallelism), A added trainable rows (a tied head's `<image>`, `<|endofchunk|>`), C tokens per chunk.

    loss = sum_i scale[i] * CE(hidden[i] @ W_eff.T, target[i])       over rows with a target

W_eff is `weight` with the rows of `added_ids` replaced by `added` (TokenEmbedding.attend's
index_copy), or `weight` itself. Rows whose target is `ignore_index` cost nothing: only the rows
with a target are gathered. Those are walked C at a time: a (C, V_local) fp32 logit chunk is
formed, its row statistics are computed (and all-reduced over `group` when the vocabulary is
sharded, as `vocab_parallel_cross_entropy` does), and the chunk is turned in place into dL/dlogits,
from which dL/dhidden, dL/dweight and dL/dadded are accumulated right away (Liger-Kernel's
FusedLinearCrossEntropy idea). When one rank holds the whole vocabulary, the PyTorch path turns the
chunk into dL/dlogits with torch's log_softmax instead (`reference.log_softmax_grad_`): the token
losses are then torch's cross_entropy bit for bit (its gradient is within an ulp of autograd's).
Peak memory: one chunk plus the gradients, never N x V. The token losses are kept and summed once
at the end, so the loss does not depend on the chunk length. The backward only scales the stored
gradients by the incoming scalar.

`impl="auto"` runs the Triton row kernels (`triton.py`) on CUDA tensors when triton imports, the
PyTorch steps (`reference.py`) elsewhere; the matmuls are torch's in both.

Tensor parallelism: the statistics are all-reduced here; the caller wraps `hidden` and `added` in
copy_to_group (identity forward, all-reduce backward), exactly as VocabParallelEmbedding.attend and
ColumnParallelLinear do, so the gradients it receives are summed over the vocabulary shards.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch
import torch.distributed as dist

from . import reference

__all__ = ["IMPLS", "LinearCrossEntropyFunction", "default_chunk_tokens", "linear_cross_entropy",
           "triton_available"]

IMPLS = ("auto", "triton", "reference")
CHUNK_ELEMENTS = 1 << 22
"""Logit elements per chunk by default (16 MiB of fp32), unless that is fewer than CHUNK_MIN_ROWS rows."""
CHUNK_MIN_ROWS = 256
"""Token rows per chunk at least, by default. Each chunk's two matmuls read the whole (V_local, D)
weight (and MKL packs it again in every CPU call), so few rows per chunk leave them bound by that
traffic. On the 2-core CPU, the benchmark's loss (502 target rows, V = 32k, forward + dL/dh) took
~500 ms in 131-row chunks, ~417 ms in 256-row and ~406 ms in one 502-row chunk; the 64 MiB chunk
became the step's peak RSS (+~45 MiB), the 32 MiB one did not."""


def triton_available() -> bool:
    """True when the `triton` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def default_chunk_tokens(vocab_local: int) -> int:
    """C such that a (C, V_local) fp32 chunk holds about CHUNK_ELEMENTS values, and at least
    CHUNK_MIN_ROWS rows (a 256 x 32k chunk is 32 MiB, a 256 x 128k one 128 MiB)."""
    return max(CHUNK_MIN_ROWS, CHUNK_ELEMENTS // max(vocab_local, 1))


def _steps(impl: str) -> ModuleType:
    """The module with the three row steps: reference.py, or triton.py (imported on first use)."""
    return reference if impl == "reference" else importlib.import_module(f"{__name__}.triton")


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """x reduced in place over `group` (no-op without one)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: forward computes the loss and every gradient chunk by chunk (see the
    module docstring); backward returns them times the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, added, targets, scale, added_ids, group, vocab_start,
                chunk_tokens, ignore_index, impl, grad_enabled):  # noqa: D102 (see the class docstring)
        want = [grad_enabled and w for w in ctx.needs_input_grad[:3]]  # no gradient work under no_grad
        loss, grads = _forward(hidden, weight, added, targets, scale, added_ids, group, vocab_start,
                               chunk_tokens, ignore_index, _steps(impl), *want)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        dh, dw, da = (None if g.numel() == 0 else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return dh, dw, da, None, None, None, None, None, None, None, None, None


def _added_columns(added_ids: torch.Tensor | None, vocab_start: int,
                   vocab_local: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(A,) bool: which added rows this rank holds, and their local columns; or (None, None)."""
    if added_ids is None:
        return None, None
    mine = (added_ids >= vocab_start) & (added_ids < vocab_start + vocab_local)
    return mine, added_ids[mine] - vocab_start


def _forward(hidden: torch.Tensor, weight: torch.Tensor, added: torch.Tensor | None, targets: torch.Tensor,
             scale: torch.Tensor, added_ids: torch.Tensor | None, group: dist.ProcessGroup | None,
             vocab_start: int, chunk_tokens: int | None, ignore_index: int, steps: ModuleType,
             want_dh: bool, want_dw: bool, want_da: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The loss and its gradients at grad_loss = 1, chunk by chunk (see the module docstring).

    Args: as `linear_cross_entropy`, plus `steps` (reference or triton module) and which of
        (hidden, weight, added) want a gradient.
    Returns:
        (scalar fp32 loss, (dh (N, D), dw (V_local, D), da (A, D))), an empty tensor for each
        gradient not wanted.
    """
    V_local = weight.shape[0]
    rows = torch.nonzero(targets != ignore_index)[:, 0]  # (N_t,) rows with a target
    mine, cols = _added_columns(added_ids if added is not None else None, vocab_start, V_local)
    h_all, t_all, s_all = hidden.index_select(0, rows), targets.index_select(0, rows), scale.index_select(0, rows)
    local_t = t_all - vocab_start
    local_t = torch.where((local_t >= 0) & (local_t < V_local), local_t, -1)
    token_loss = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(h_all) if want_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
    da = torch.zeros(added.shape, dtype=torch.float32, device=added.device) if want_da else None
    C = chunk_tokens or default_chunk_tokens(V_local)
    # one rank holds the whole vocabulary: the reference's single log_softmax step (the Triton
    # kernels keep the three steps)
    whole = steps is reference and (group is None or dist.get_world_size(group) == 1)
    # one logit buffer for every chunk: a fresh (C, V_local) allocation per chunk costs page faults
    buf = torch.empty(min(C, rows.numel()), V_local, dtype=torch.float32, device=hidden.device)
    for lo in range(0, rows.numel(), C):
        h, t, s = h_all[lo:lo + C], local_t[lo:lo + C], s_all[lo:lo + C].float()
        z = buf[:h.shape[0]]  # (C, V_local)
        if weight.dtype == torch.float32:
            torch.mm(h, weight.t(), out=z)
        else:
            z.copy_(h @ weight.t())
        if cols is not None and cols.numel():
            z[:, cols] = (h @ added[mine].t()).float()
        if whole:  # nothing to all-reduce: torch's row-wise log_softmax
            token_loss[lo:lo + C] = steps.log_softmax_grad_(z, t, s)
        else:
            peak = _all_reduce(steps.row_peak(z), group, dist.ReduceOp.MAX)
            sumexp, zt = _all_reduce(steps.exp_shifted_(z, peak, t), group)  # z <- exp(z - peak)
            token_loss[lo:lo + C] = sumexp.log() - zt
            steps.exp_to_grad_(z, sumexp, t, s)
        g = z  # now dL/dz, (C, V_local) fp32
        g_added = g[:, cols] if cols is not None and cols.numel() else None
        if g_added is not None:
            g[:, cols] = 0.0  # those columns come from `added`, not from the base rows
        g = g.to(weight.dtype)
        if want_dh:
            if dh.dtype == g.dtype:
                torch.mm(g, weight, out=dh[lo:lo + C])
            else:
                dh[lo:lo + C] = g @ weight
            if g_added is not None:
                dh[lo:lo + C] += g_added.to(weight.dtype) @ added[mine]
        if want_dw:
            dw += (g.t() @ h).float()
        if want_da and g_added is not None:
            da[mine] += (g_added.to(added.dtype).t() @ h).float()
    loss = (s_all.float() * token_loss).sum()  # one sum over every row: the same loss for any chunk length
    full_dh = torch.zeros_like(hidden).index_copy_(0, rows, dh) if want_dh else None
    empty = hidden.new_empty(0)
    return loss, (full_dh if want_dh else empty, dw.to(weight.dtype) if want_dw else empty,
                  da.to(added.dtype) if want_da else empty)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    *,
    added: torch.Tensor | None = None,
    added_ids: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    chunk_tokens: int | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor:
    """sum_i scale[i] * cross_entropy(hidden[i] @ W_eff.T, targets[i]), never forming all logits.

    Args:
        hidden: (N, D) token rows (after the final norm).
        weight: (V_local, D) output rows [vocab_start, vocab_start + V_local) of the head.
        targets: (N,) global token ids; `ignore_index` rows contribute nothing and cost nothing.
        scale: (N,) per-row weight of the loss (float).
        added: (A, D) trainable rows that replace rows `added_ids` of `weight` (a tied head), or None.
        added_ids: (A,) global ids of the `added` rows (required with `added`).
        group: the tensor-parallel group the vocabulary is sharded over, or None.
        vocab_start: first vocabulary row of `weight`.
        chunk_tokens: C, token rows per logit chunk (default: `default_chunk_tokens(V_local)`).
        ignore_index: the target value without a loss.
        impl: "auto" (Triton row kernels for CUDA tensors when triton is installed), "triton" or
            "reference".
    Returns:
        Scalar float32 loss, differentiable in hidden, weight and added.
    Raises:
        ValueError: an unknown `impl`, mismatched shapes, or `added` without `added_ids`.
        RuntimeError: impl="triton" without triton, or on CPU tensors outside the interpreter.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, D) and weight (V, D); got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or scale.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} and scale {tuple(scale.shape)} must be ({hidden.shape[0]},)")
    if added is not None and (added_ids is None or added.shape != (added_ids.numel(), hidden.shape[1])):
        raise ValueError("added (A, D) needs added_ids (A,)")
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and triton_available() else "reference"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
        if not hidden.is_cuda and not _steps("triton").interpreter_ready():
            raise RuntimeError("impl='triton' on CPU tensors runs only in the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before triton is first imported (or use impl='reference')")
    return LinearCrossEntropyFunction.apply(hidden, weight, added, targets, scale, added_ids, group,
                                            vocab_start, chunk_tokens, ignore_index, impl,
                                            torch.is_grad_enabled())
